//! A real etcd server (Debian's `etcd-server`) in its own namespace on a
//! topology's segment, for the fleet tests and the fleet benchmark: its data
//! under the run's directory, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::harness::{Proc, json, wait_until};
use crate::netns::{Host, Topology};

/// etcd's host id on the segment.
pub const ETCD_ID: u8 = 5;
/// etcd's client address (the host [`ETCD_ID`] of the segment).
pub const ETCD: &str = "198.51.100.5:2379";

/// `xlb run`'s flags for a node of the fleet in etcd under `prefix`, with the
/// tests' short store settings (a lease of 2 s renewed every 200 ms, calls of at
/// most 1 s), so that every wait is short.
pub fn store_args(prefix: &str) -> Vec<String> {
    [
        "--store",
        &format!("etcd://{ETCD}{prefix}"),
        "--store-interval-ms",
        "200",
        "--store-lease-ttl",
        "2",
        "--store-timeout-ms",
        "1000",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `etcd` in its own namespace, data under a run directory.
pub struct Etcd {
    /// Its namespace on the segment.
    pub host: Host,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Etcd {
    /// Starts etcd on a new host of `topo` with its data in `dir/etcd` (log
    /// `dir/etcd.log`) and waits until it answers.
    pub fn start(topo: &Topology, dir: &Path) -> Etcd {
        let host = topo.add_host("etcd", "e", ETCD_ID);
        let mut etcd = Etcd {
            host,
            dir: dir.join("etcd"),
            proc: None,
        };
        etcd.run();
        etcd
    }

    /// Starts (again) the server, on the same data.
    pub fn run(&mut self) {
        let log = std::fs::File::create(self.dir.with_extension("log")).expect("etcd log");
        let mut cmd = self.host.ns.command("etcd");
        cmd.args([
            "--name",
            "e",
            "--data-dir",
            self.dir.to_str().expect("UTF-8 path"),
            "--listen-client-urls",
            &format!("http://{ETCD}"),
            "--advertise-client-urls",
            &format!("http://{ETCD}"),
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "e=http://127.0.0.1:2380",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        self.proc = Some(Proc::spawn("etcd", &mut cmd));
        wait_until("etcd answers", || {
            self.ctl(&["endpoint", "health"]).status.success()
        });
    }

    /// Stops the server (SIGTERM), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// `etcdctl ARGS...` against it, from its namespace.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.host
            .ns
            .command("etcdctl")
            .args(["--endpoints", ETCD, "--command-timeout", "2s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl runs")
    }

    /// The revision of `key` (its last change).
    pub fn mod_revision(&self, key: &str) -> i64 {
        let out = self.ctl(&["get", key, "-w", "json"]);
        let v = json(&String::from_utf8_lossy(&out.stdout), "etcdctl get -w json");
        v["kvs"][0]["mod_revision"]
            .as_i64()
            .expect("the key exists")
    }

    /// The store's current revision (every node report moves it too).
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v = json(
            &String::from_utf8_lossy(&out.stdout),
            "etcdctl endpoint status",
        );
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("a revision")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
