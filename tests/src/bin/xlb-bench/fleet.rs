//! Section 5, a fleet on etcd: how long one write of the desired state takes
//! to reach every node.
//!
//! etcd (Debian's `etcd-server`) and three `xlb run --store` daemons, each in
//! its own namespace on one segment, with the reals there too (they only
//! answer ARP: nothing is probed and no traffic flows). Each change is one
//! `xlb apply` through node A that changes the weight of one real. A watch on
//! the fleet's prefix, opened by this process from etcd's namespace, sees the
//! desired document's put (the etcd commit) and each node's report of the
//! revision it applied; the propagation of a change is the time from the
//! first to the last of those three reports, each taken with the monotonic
//! clock when the watch delivers it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use xlb_tests::etcd::{ETCD, Etcd};
use xlb_tests::harness::{Daemon, RunDir, balanced_topology, check_interrupted};
use xlb_tests::netns::{Host, Topology, unique_prefix};

use crate::report::{Fleet, FleetCase};

/// Nodes of the fleet.
const NODES: [&str; 3] = ["a", "b", "c"];
/// Reals on the segment (the large configuration's count).
const REALS: usize = 10;
/// The longest one change may take to reach every node before the run
/// counts it as lost (and panics: the figures would be wrong).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the first load of a configuration may take on every node.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two changes, so that each starts from a quiet fleet.
const GAP: Duration = Duration::from_millis(100);

/// One configuration: VIPs × reals, their table size.
struct Shape {
    vips: usize,
    reals: usize,
    table_size: u32,
}

const SMALL: Shape = Shape {
    vips: 2,
    reals: 3,
    table_size: 65_537,
};
/// 1,000 VIPs fit the ring pool (2 tables each) with 8,191-slot tables.
const LARGE: Shape = Shape {
    vips: 1000,
    reals: REALS,
    table_size: 8191,
};

pub fn run(quick: bool) -> Fleet {
    let changes = if quick { (10, 5) } else { (50, 50) };
    let fleet = Bench::start();
    let cases = vec![
        fleet.measure("small", &SMALL, changes.0),
        fleet.measure("1,000 VIPs × 10 reals", &LARGE, changes.1),
    ];
    Fleet {
        nodes: NODES.len(),
        cases,
    }
}

/// What the watch saw, when it delivered it.
enum Seen {
    /// The desired document was put at this revision.
    Desired(i64, Instant),
    /// A node reported the revision it applied.
    Node(String, i64, Instant),
}

/// The fleet under measurement. Fields drop in order: the daemons, etcd, the
/// extra balancer hosts, the topology, the run directories.
struct Bench {
    nodes: Vec<Daemon>,
    etcd: Etcd,
    _extra: Vec<Host>,
    _topo: Topology,
    dirs: Vec<RunDir>,
    prefix: String,
    seen: mpsc::Receiver<Seen>,
}

impl Bench {
    fn start() -> Bench {
        let topo = balanced_topology(&unique_prefix("bf"), REALS);
        let run = RunDir::new(&format!("xlb-{}", topo.prefix()));
        let extra = vec![
            topo.add_host("lb2", "lb2", 3),
            topo.add_host("lb3", "lb3", 4),
        ];
        let etcd = Etcd::start(&topo, run.path());
        let prefix = format!("/xlb/{}", topo.prefix());
        let seen = watch(etcd.host.ns.name(), &prefix);
        let store = format!("etcd://{ETCD}{prefix}");
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let dir = RunDir::new(&format!("xlb-{}-{i}", topo.prefix()));
            let ns = if i == 0 {
                &topo.lb.ns
            } else {
                &extra[i - 1].ns
            };
            // The store settings are the defaults: a change travels by the watch,
            // whatever the interval.
            let args = ["--no-pin", "--store", &store, "--node-name", name];
            nodes.push(Daemon::start_in(ns, "eth0", dir.path(), &args));
            dirs.push(dir);
        }
        dirs.push(run);
        Bench {
            nodes,
            etcd,
            _extra: extra,
            _topo: topo,
            dirs,
            prefix,
            seen,
        }
    }

    /// Loads `shape`, then makes `changes` changes of one real's weight, each
    /// once the last reached every node, and times each.
    fn measure(&self, name: &str, shape: &Shape, changes: usize) -> FleetCase {
        eprintln!(
            "xlb-bench: fleet: {} VIPs × {} reals, {changes} changes",
            shape.vips, shape.reals
        );
        let mut weights = vec![vec![1u32; shape.reals]; shape.vips];
        let file = self.dirs[NODES.len()].path().join("fleet.yaml");
        let text = config(shape, &weights);
        let bytes = text.len();
        std::fs::write(&file, &text).expect("write the configuration");
        let file = file.to_str().expect("UTF-8 path").to_owned();
        self.drain();
        let out = self.nodes[0].cli(&["apply", &file]);
        assert!(
            out.status.success() || self.applied_later(&out),
            "loading {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.until_all_report(self.etcd.mod_revision(&self.desired_key()), LOAD_TIMEOUT);

        let (mut propagation_ms, mut first_ms, mut apply_ms) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..changes {
            check_interrupted();
            // One real's weight flips between 1 and 2, in another VIP each time.
            let (v, r) = ((k * 7) % shape.vips, k % shape.reals);
            weights[v][r] = 3 - weights[v][r];
            std::fs::write(&file, config(shape, &weights)).expect("write the configuration");
            thread::sleep(GAP);
            self.drain();
            let started = Instant::now();
            self.nodes[0].cli_ok(&["apply", &file]);
            apply_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let (committed, reports) = self.change_seen();
            let first = reports.values().min().expect("three reports");
            let last = reports.values().max().expect("three reports");
            first_ms.push(first.duration_since(committed).as_secs_f64() * 1e3);
            propagation_ms.push(last.duration_since(committed).as_secs_f64() * 1e3);
        }
        FleetCase {
            name: name.to_owned(),
            vips: shape.vips,
            reals_per_vip: shape.reals,
            table_size: shape.table_size,
            document_bytes: bytes,
            change: "the weight of one real (1 ↔ 2), another VIP each change".to_owned(),
            propagation_ms,
            first_node_ms: first_ms,
            apply_ms,
        }
    }

    /// Whether a failed `xlb apply` only timed out waiting for node A (a large
    /// first load may take longer than its wait): the write itself went in.
    fn applied_later(&self, out: &std::process::Output) -> bool {
        String::from_utf8_lossy(&out.stderr).contains("has not applied it within")
    }

    fn desired_key(&self) -> String {
        format!("{}/desired", self.prefix)
    }

    /// Forgets what the watch saw so far.
    fn drain(&self) {
        while self.seen.try_recv().is_ok() {}
    }

    /// Waits for every node to report revision `rev` or later.
    fn until_all_report(&self, rev: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut at = BTreeMap::new();
        while at.len() < NODES.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen.recv_timeout(left) {
                Ok(Seen::Node(node, r, t)) if r >= rev => {
                    at.insert(node, t);
                }
                Ok(_) => {}
                Err(e) => panic!("revision {rev} reached only {at:?} within {timeout:?}: {e}"),
            }
        }
    }

    /// The next write of the desired document and the first report of its
    /// revision (or a later one) by every node.
    fn change_seen(&self) -> (Instant, BTreeMap<String, Instant>) {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let mut committed = None;
        let mut reports = BTreeMap::new();
        loop {
            if let Some((_, at)) = committed
                && reports.len() == NODES.len()
            {
                return (at, reports);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen.recv_timeout(left) {
                Ok(Seen::Desired(rev, at)) => committed = Some((rev, at)),
                Ok(Seen::Node(node, rev, at)) => {
                    if committed.is_some_and(|(want, _)| rev >= want) {
                        reports.entry(node).or_insert(at);
                    }
                }
                Err(e) => panic!(
                    "a change did not reach every node within {CHANGE_TIMEOUT:?} (write seen: \
                     {}, reports: {:?}): {e}",
                    committed.is_some(),
                    reports.keys().collect::<Vec<_>>()
                ),
            }
        }
    }
}

/// The `xlb apply` document of `shape` with `weights[vip][real]`.
fn config(shape: &Shape, weights: &[Vec<u32>]) -> String {
    let mut out = String::from("services:\n");
    for (v, reals) in weights.iter().enumerate() {
        // 1,000 VIPs: 203.0.113.10-13, 250 ports each.
        let _ = writeln!(
            out,
            "  - vip: 203.0.113.{}:{}/tcp\n    table_size: {}\n    reals:",
            10 + v / 250,
            8000 + v % 250,
            shape.table_size
        );
        for (r, w) in reals.iter().enumerate() {
            let _ = writeln!(
                out,
                "      - {{address: 198.51.100.{}, weight: {w}}}",
                11 + r
            );
        }
    }
    out
}

/// Watches the whole prefix from etcd's namespace `ns` in a thread of its
/// own, sending what it sees with the time the watch delivered it. The
/// thread ends when etcd goes away or the receiver is dropped.
fn watch(ns: &str, prefix: &str) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready) = mpsc::channel();
    let (ns, prefix) = (ns.to_owned(), prefix.to_owned());
    thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("etcd's netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async move {
            let mut client = Client::connect([ETCD], None).await.expect("etcd answers");
            let mut stream = client
                .watch(
                    format!("{prefix}/"),
                    Some(WatchOptions::new().with_prefix()),
                )
                .await
                .expect("a watch on the fleet's prefix");
            let desired = format!("{prefix}/desired");
            let nodes = format!("{prefix}/nodes/");
            let _ = ready_tx.send(());
            while let Ok(Some(msg)) = stream.message().await {
                let at = Instant::now();
                for ev in msg.events() {
                    let Some(kv) = ev.kv().filter(|_| ev.event_type() == EventType::Put) else {
                        continue;
                    };
                    let seen = if kv.key() == desired.as_bytes() {
                        Seen::Desired(kv.mod_revision(), at)
                    } else if let Some(name) = kv.key().strip_prefix(nodes.as_bytes()) {
                        let report: serde_json::Value =
                            serde_json::from_slice(kv.value()).unwrap_or_default();
                        let Some(rev) = report["revision"].as_i64() else {
                            continue;
                        };
                        Seen::Node(String::from_utf8_lossy(name).into_owned(), rev, at)
                    } else {
                        continue;
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
            }
        });
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("the watch on etcd starts");
    rx
}
