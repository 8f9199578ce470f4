//! netns end-to-end, a fleet of three balancers sharing one desired state in a real
//! etcd (Debian's `etcd-server`, in its own namespace on the segment): one `xlb apply`
//! reaches every node and every node sends 10,000 random flows to the same real, also
//! after a `hash_seed` moved most of them to other reals; a real
//! that one node cannot reach stays in everywhere, one that two cannot reach goes out
//! everywhere; two operators applying at once get one winner and one conflict; the
//! fleet keeps forwarding while etcd is down (a node restarted meanwhile serves its
//! saved state) and catches up when it returns, also after a compaction.
//!
//! The daemons use short store settings (`--store-interval-ms 200 --store-lease-ttl 2
//! --store-timeout-ms 1000`) and probes (200 ms, rise 2, fall 2) so that every wait is
//! short. Needs root and runs one test at a time (`./x test` does both).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use xlb_tests::etcd::{ETCD, Etcd, store_args};
use xlb_tests::harness::{
    Daemon, Proc, RunDir, VIP, balanced_topology, http_get, json, pass_on_switch_port,
    require_root, start_reals, wait_until,
};
use xlb_tests::netns::{Host, Topology, unique_prefix};

const SERVICE: &str = "203.0.113.10:80/tcp";
/// A second service, routed by the client through node C (see [`Fleet::start`]).
const SERVICE_C: &str = "203.0.113.20:80/tcp";
const VIP_C: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const SERVER_ARGS: [&str; 2] = ["--http", "0.0.0.0:80"];
const REALS: [&str; 3] = ["198.51.100.11", "198.51.100.12", "198.51.100.13"];

/// The desired state the scenarios start from: both services on the three reals,
/// probed over TCP every 200 ms.
fn config(weights: [u32; 3]) -> String {
    let mut out = String::from("services:\n");
    for vip in [SERVICE, SERVICE_C] {
        out.push_str(&format!(
            "  - vip: {vip}\n    health_check: {{kind: tcp, interval_ms: 200, timeout_ms: \
             100, rise: 2, fall: 2, jitter_percent: 0}}\n    reals:\n"
        ));
        for (real, w) in REALS.iter().zip(weights) {
            out.push_str(&format!("      - {{address: {real}, weight: {w}}}\n"));
        }
    }
    out
}

/// Three balancers (`a` is the topology's, `b` and `c` added) in store mode, the
/// servers on the reals and etcd. Fields drop in order: daemons, etcd, servers,
/// extra hosts, namespaces, run directory.
struct Fleet {
    nodes: Vec<Daemon>,
    etcd: Etcd,
    _servers: Vec<Proc>,
    extra: Vec<Host>,
    topo: Topology,
    dirs: Vec<RunDir>,
    prefix: String,
}

impl Fleet {
    fn start(tag: &str) -> Fleet {
        let mut topo = balanced_topology(&unique_prefix(tag), 3);
        let run = RunDir::new(&format!("xlb-{}", topo.prefix()));
        let b = topo.add_host("lb2", "lb2", 3);
        let c = topo.add_host("lb3", "lb3", 4);
        // Node C serves SERVICE_C: it needs the pass program on its switch port.
        pass_on_switch_port(&mut topo, &c.switch_port);
        topo.add_vip_on_reals(IpAddr::V4(VIP_C));
        topo.client
            .ns
            .ip(&format!("route add {VIP_C}/32 via {}", c.ipv4));
        let servers = start_reals(&topo, &SERVER_ARGS);
        let etcd = Etcd::start(&topo, run.path());
        let prefix = format!("/xlb/{}", topo.prefix());
        let mut fleet = Fleet {
            nodes: Vec::new(),
            etcd,
            _servers: servers,
            extra: vec![b, c],
            topo,
            dirs: Vec::new(),
            prefix,
        };
        for (i, _) in ["a", "b", "c"].iter().enumerate() {
            let dir = RunDir::new(&format!("xlb-{}-{i}", fleet.topo.prefix()));
            fleet.dirs.push(dir);
            let d = fleet.start_node(i);
            fleet.nodes.push(d);
        }
        fleet.dirs.push(run);
        fleet
    }

    fn host(&self, i: usize) -> &Host {
        if i == 0 {
            &self.topo.lb
        } else {
            &self.extra[i - 1]
        }
    }

    fn start_node(&self, i: usize) -> Daemon {
        let name = ["a", "b", "c"][i];
        let store = store_args(&self.prefix);
        let mut args = vec![
            "--no-pin",
            "--node-name",
            name,
            "--resolve-timeout",
            "1",
            "--metrics-addr",
            "127.0.0.1:9814",
        ];
        args.extend(store.iter().map(String::as_str));
        Daemon::start_in(&self.host(i).ns, "eth0", self.dirs[i].path(), &args)
    }

    /// The revision of the desired state: the config version.
    fn desired_revision(&self) -> i64 {
        self.etcd.mod_revision(&format!("{}/desired", self.prefix))
    }

    /// The store's metrics of node `i` (`xlb_store_*` lines).
    fn store_metrics(&self, i: usize) -> String {
        let out = self
            .host(i)
            .ns
            .exec(&["curl", "-s", "http://127.0.0.1:9814/metrics"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("xlb_store_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The value of metric `name` of node `i`.
    fn metric(&self, i: usize, name: &str) -> f64 {
        let text = self.store_metrics(i);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} on node {i}: {text}"))
    }

    /// `xlb fleet --json` on node `i`.
    fn fleet(&self, i: usize) -> serde_json::Value {
        json(
            &self.nodes[i].cli_ok(&["fleet", "--json"]),
            "xlb fleet --json",
        )
    }

    /// `xlb status --json` on node `i`.
    fn status(&self, i: usize) -> serde_json::Value {
        json(
            &self.nodes[i].cli_ok(&["status", "--json"]),
            "xlb status --json",
        )
    }

    /// Waits until every node reports revision `rev` in its own status and `xlb fleet`
    /// on node 0 lists three nodes at `rev` with nothing flagged.
    fn wait_converged(&self, rev: i64) {
        wait_until(&format!("every node applies revision {rev}"), || {
            (0..3).all(|i| self.status(i)["store"]["revision"] == rev)
        });
        wait_until(
            &format!("xlb fleet shows three nodes at revision {rev}, nothing flagged"),
            || {
                let f = self.fleet(0);
                let nodes = f["nodes"].as_array().cloned().unwrap_or_default();
                nodes.len() == 3
                    && nodes.iter().all(|n| {
                        n["revision"] == rev
                            && n["differs"]["revision"] == false
                            && n["differs"]["tables"].as_array().is_some_and(Vec::is_empty)
                    })
            },
        );
    }

    /// `xlb simulate --batch FILE` on node `i`: one `VIP SRC REAL` line per flow.
    fn simulate(&self, i: usize, file: &Path) -> Vec<String> {
        let out = self.nodes[i].cli_ok(&["simulate", "--batch", file.to_str().expect("UTF-8")]);
        out.lines().map(str::to_owned).collect()
    }

    /// Writes `text` to a file of the run directory.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dirs[3].path().join(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }

    /// The health a node's status gives each real of SERVICE.
    fn healthy(&self, i: usize) -> BTreeMap<String, bool> {
        let s = self.status(i);
        let vip = s["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["vip"] == SERVICE))
            .cloned()
            .unwrap_or_default();
        vip["reals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r["addr"].as_str().unwrap_or_default().to_owned(),
                    r["healthy"] == true,
                )
            })
            .collect()
    }
}

/// 10,000 random client flows to SERVICE and SERVICE_C, one `VIP SRC` per line.
fn random_flows() -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut out = String::new();
    for n in 0..10_000 {
        let src = SocketAddrV4::new(
            Ipv4Addr::new(198, 18, rng.random(), rng.random()),
            rng.random_range(1024..=65535),
        );
        let vip = if n % 2 == 0 { SERVICE } else { SERVICE_C };
        out.push_str(&format!("{vip} {src}\n"));
    }
    out
}

/// The reals the simulated flows go to, with how many each.
fn spread(lines: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        let real = l.rsplit(' ').next().unwrap_or_default().to_owned();
        *out.entry(real).or_default() += 1;
    }
    out
}

#[test]
fn one_apply_reaches_the_fleet_which_agrees_on_every_flow_health_and_conflicts() {
    require_root();
    let fleet = Fleet::start("fa");

    // (1) One `xlb apply` through node A reaches all three nodes.
    let file = fleet.file("fleet.yaml", &config([1, 1, 1]));
    let out = fleet.nodes[0].cli_ok(&["apply", file.to_str().expect("UTF-8")]);
    let rev = fleet.desired_revision();
    assert!(
        out.contains(&format!("(store revision {rev})")),
        "xlb apply names the revision it wrote ({rev}): {out}"
    );
    fleet.wait_converged(rev);
    // What etcd holds is the document an operator reads with etcdctl.
    let doc = fleet.etcd.ctl(&[
        "get",
        "--print-value-only",
        &format!("{}/desired", fleet.prefix),
    ]);
    let doc = String::from_utf8_lossy(&doc.stdout);
    assert!(
        doc.contains("vip: 203.0.113.10:80/tcp") && doc.contains("address: 198.51.100.12"),
        "{doc}"
    );
    // 10,000 random 5-tuples: the same real from every node, every real used.
    let flows = fleet.file("flows.txt", &random_flows());
    let on_a = fleet.simulate(0, &flows);
    assert_eq!(on_a.len(), 10_000);
    let used = spread(&on_a);
    assert_eq!(
        used.keys().cloned().collect::<BTreeSet<_>>(),
        REALS.iter().map(|r| (*r).to_owned()).collect(),
        "{used:?}"
    );
    for i in [1, 2] {
        assert!(
            fleet.simulate(i, &flows) == on_a,
            "node {i} sends some flow to another real than node a"
        );
    }

    // One hash seed for the fleet: checked like any key, previewed by --dry-run,
    // applied by every node, which then send many flows to other reals than
    // before and still agree on every flow.
    let bad = fleet.file(
        "bad-seed.yaml",
        &format!("hash_seed: -7\n{}", config([1, 1, 1])),
    );
    let out = fleet.nodes[0].cli(&["apply", bad.to_str().expect("UTF-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2)
            && err.contains(
                "bad-seed.yaml: hash_seed: -7 is negative: the seed is an unsigned \
                             integer from 0 to 18446744073709551615"
            ),
        "{out:?}"
    );
    assert_eq!(fleet.desired_revision(), rev, "nothing written");
    // A node's own configuration file (what `systemctl reload` applies) sets
    // the store and holds no services: applying it would empty the fleet.
    let node_file = fleet.file(
        "node.yaml",
        "daemon:\n  store: etcd://198.51.100.5:2379/xlb\nservices: []\n",
    );
    let out = fleet.nodes[0].cli(&["apply", node_file.to_str().expect("UTF-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(4)
            && err.contains(
                "node.yaml sets daemon.store: it configures a node whose desired state comes \
                 from the store, not services to apply; nothing applied"
            ),
        "{out:?}"
    );
    assert_eq!(fleet.desired_revision(), rev, "nothing written");
    let seeded = fleet.file(
        "seeded.yaml",
        &format!("hash_seed: 7\n{}", config([1, 1, 1])),
    );
    let seeded = seeded.to_str().expect("UTF-8");
    let out = fleet.nodes[0].cli_ok(&["check", seeded]);
    assert_eq!(
        out.trim(),
        format!("{seeded}: valid (2 services, 6 reals, hash_seed 7)")
    );
    let out = fleet.nodes[0].cli_ok(&["apply", "--dry-run", seeded]);
    assert_eq!(
        out,
        format!(
            "dry run: applying {seeded} would make 1 changes (nothing applied):\n~ hash_seed \
             unset -> 7: every Maglev table is rebuilt, new flows may go to other reals \
             (tracked flows keep theirs)\n"
        )
    );
    fleet.nodes[0].cli_ok(&["apply", seeded]);
    let seed_rev = fleet.desired_revision();
    fleet.wait_converged(seed_rev);
    let saved = fleet.nodes[1].cli_ok(&["save"]);
    assert!(saved.contains("\nhash_seed: 7\nservices:\n"), "{saved}");
    let on_a_seeded = fleet.simulate(0, &flows);
    let moved = on_a
        .iter()
        .zip(&on_a_seeded)
        .filter(|(before, now)| before != now)
        .count();
    // Three reals reshuffled: about two flows of three go elsewhere.
    assert!(
        (5_500..7_800).contains(&moved),
        "{moved} of 10,000 flows moved to another real with hash_seed 7"
    );
    for i in [1, 2] {
        assert!(
            fleet.simulate(i, &flows) == on_a_seeded,
            "node {i} sends some flow to another real than node a with hash_seed 7"
        );
    }
    // Without the seed again: the unseeded tables, flow for flow.
    fleet.nodes[2].cli_ok(&["apply", file.to_str().expect("UTF-8")]);
    let rev = fleet.desired_revision();
    fleet.wait_converged(rev);
    for i in 0..3 {
        assert!(
            fleet.simulate(i, &flows) == on_a,
            "node {i}: no seed gives back the first tables"
        );
    }

    // (2) A real fails for node B only: the fleet keeps it in, tables stay identical.
    let blocked = REALS[0];
    fleet.extra[0]
        .ns
        .ip(&format!("route add prohibit {blocked}/32"));
    wait_until("node b reports the real down", || {
        fleet.fleet(0)["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["name"] == "b")
            .flat_map(|n| n["verdicts"].as_array().cloned().unwrap_or_default())
            .any(|v| v["vip"] == SERVICE && v["real"] == blocked && v["up"] == false)
    });
    // Let every node take B's report into its view (several store intervals).
    thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(
            fleet.healthy(i).get(blocked),
            Some(&true),
            "node {i}: one node of three seeing {blocked} down keeps it in"
        );
        assert!(fleet.simulate(i, &flows) == on_a, "node {i}: table changed");
    }
    fleet.wait_converged(rev);

    // ...and for node C too: out everywhere, node A included, tables identical.
    fleet.extra[1]
        .ns
        .ip(&format!("route add prohibit {blocked}/32"));
    wait_until(
        "two nodes of three seeing the real down take it out everywhere",
        || (0..3).all(|i| fleet.healthy(i).get(blocked) == Some(&false)),
    );
    // The verdict shows before every table is rebuilt: wait for the tables.
    let mut without = Vec::new();
    wait_until("node a's table no longer sends flows to the real", || {
        without = fleet.simulate(0, &flows);
        !spread(&without).contains_key(blocked)
    });
    for i in [1, 2] {
        wait_until(&format!("node {i}'s table equals node a's"), || {
            fleet.simulate(i, &flows) == without
        });
    }
    fleet.wait_converged(rev);
    for host in &fleet.extra {
        host.ns.ip(&format!("route del prohibit {blocked}/32"));
    }
    wait_until("the real is back everywhere", || {
        (0..3).all(|i| fleet.healthy(i).get(blocked) == Some(&true))
    });

    // A state that one node cannot apply (a VIP on node B's own address, written
    // with etcdctl past the CLI's checks) is reported by that node and does not stop
    // the others.
    let own_vip = format!("{}:80/tcp", fleet.extra[0].ipv4);
    let bad = format!(
        "{}  - vip: {own_vip}\n    reals:\n      - {{address: {}}}\n",
        config([1, 1, 1]),
        REALS[1]
    );
    let put = fleet
        .etcd
        .ctl(&["put", &format!("{}/desired", fleet.prefix), &bad]);
    assert!(put.status.success(), "{put:?}");
    let bad_rev = fleet.desired_revision();
    wait_until("nodes a and c apply it, node b says why not", || {
        let b = fleet.status(1);
        fleet.status(0)["store"]["revision"] == bad_rev
            && fleet.status(2)["store"]["revision"] == bad_rev
            && b["store"]["revision"] == rev
            && b["store"]["error"].as_str().is_some_and(|e| {
                e.contains(&format!("revision {bad_rev} not applied")) && e.contains(&own_vip)
            })
    });
    wait_until("xlb fleet flags node b", || {
        fleet.fleet(0)["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == "b" && n["differs"]["revision"] == true && n["error"].is_string())
    });
    // Any node fixes it with the CLI, based on the revision it saw.
    let out = fleet.nodes[1].cli_ok(&["apply", file.to_str().expect("UTF-8")]);
    let rev = fleet.desired_revision();
    assert!(out.contains(&format!("(store revision {rev})")), "{out}");
    fleet.wait_converged(rev);
    assert!(fleet.status(1)["store"]["error"].is_null());

    // (4) Two operators apply at once, both from revision `rev`: one wins, the other
    // gets a conflict, and every node ends with the winner's state, never a mix.
    let files = [
        fleet.file("op1.yaml", &config([2, 1, 1])),
        fleet.file("op2.yaml", &config([1, 1, 3])),
    ];
    let rev_arg = rev.to_string();
    let children: Vec<_> = [0, 1]
        .iter()
        .map(|&i| {
            fleet.nodes[i]
                .command(&[
                    "apply",
                    "--if-revision",
                    &rev_arg,
                    files[i].to_str().expect("UTF-8"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("xlb apply starts")
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("xlb apply ends"))
        .collect();
    let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one apply wins: {outs:?}");
    let lost = &outs[1 - won[0]];
    let err = String::from_utf8_lossy(&lost.stderr);
    assert!(
        lost.status.code() != Some(0)
            && err.contains("conflict")
            && err.contains(&format!("since revision {rev}")),
        "the other gets a conflict: {err}"
    );
    let now = fleet.desired_revision();
    let said = String::from_utf8_lossy(&outs[won[0]].stdout);
    assert!(
        said.contains(&format!("(store revision {now})")),
        "the winner wrote the desired state's revision {now}: {said}"
    );
    fleet.wait_converged(now);
    let winner: [u32; 3] = [[2, 1, 1], [1, 1, 3]][won[0]];
    for i in 0..3 {
        let vips = json(
            &fleet.nodes[i].cli_ok(&["vip", "list", "--json"]),
            "vip list",
        );
        for v in vips.as_array().expect("a list") {
            let weights: Vec<u64> = v["reals"]
                .as_array()
                .expect("reals")
                .iter()
                .map(|r| r["weight"].as_u64().expect("weight"))
                .collect();
            assert_eq!(
                weights,
                winner.map(u64::from),
                "node {i}, {}: the winner's weights",
                v["vip"]
            );
        }
    }
    // A stale revision is refused without writing.
    let out = fleet.nodes[2].cli(&[
        "apply",
        "--if-revision",
        &rev_arg,
        files[0].to_str().expect("UTF-8"),
    ]);
    assert!(!out.status.success(), "a stale --if-revision is refused");
    assert_eq!(fleet.desired_revision(), now, "nothing written");
    // So is a plan against it: its diff would be against a state no longer current.
    let out = fleet.nodes[2].cli(&[
        "apply",
        "--dry-run",
        "--if-revision",
        &rev_arg,
        files[0].to_str().expect("UTF-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(4)
            && err.contains(&format!(
                "conflict: the desired state changed in the store since revision {rev} (now {now})"
            )),
        "a plan at a stale revision is refused (exit 4, the conflict): {out:?}"
    );
    let out = fleet.nodes[2].cli_ok(&[
        "apply",
        "--dry-run",
        "--if-revision",
        &now.to_string(),
        files[0].to_str().expect("UTF-8"),
    ]);
    assert!(
        out.starts_with(&format!("dry run: applying {}", files[0].display())),
        "a plan at the current revision answers: {out}"
    );
    assert_eq!(fleet.desired_revision(), now, "nothing written");
}

#[test]
fn the_fleet_forwards_through_a_store_outage_and_catches_up_after_compaction() {
    require_root();
    let mut fleet = Fleet::start("fb");
    let file = fleet.file("fleet.yaml", &config([1, 1, 1]));
    fleet.nodes[0].cli_ok(&["apply", file.to_str().expect("UTF-8")]);
    let rev = fleet.desired_revision();
    fleet.wait_converged(rev);

    // A client loop of real TCP requests through node A, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        let ns = fleet.topo.client.ns.name().to_owned();
        thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("client netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let to = SocketAddr::from((VIP, 80));
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                match http_get(to, Duration::from_secs(2)) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().expect("errors").push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    assert_eq!(fleet.metric(0, "xlb_store_connected"), 1.0);
    assert_eq!(fleet.metric(0, "xlb_store_unreachable_seconds"), 0.0);

    // (3) etcd stops for 30 s.
    fleet.etcd.stop();
    wait_until("node a says the store is unreachable", || {
        fleet.nodes[0]
            .cli_ok(&["status"])
            .contains("store unreachable since")
    });
    let status = fleet.status(0);
    assert_eq!(status["store"]["connected"], false, "{status}");
    assert_eq!(status["store"]["revision"], rev, "{status}");
    assert_eq!(fleet.metric(0, "xlb_store_connected"), 0.0);
    assert_eq!(fleet.metric(0, "xlb_store_revision"), rev as f64);
    assert!(fleet.metric(0, "xlb_store_unreachable_seconds") > 0.0);
    let log = fleet.nodes[0].log();
    assert_eq!(
        log.matches("store unreachable:").count(),
        1,
        "logged once per outage: {log}"
    );
    // (5) Node C restarted while etcd is down serves its last state (SERVICE_C goes
    // through it).
    fleet.nodes[2].stop();
    let c = fleet.start_node(2);
    fleet.nodes[2] = c;
    let log = fleet.nodes[2].log();
    assert!(
        log.contains("starting from the store's document saved last")
            && log.contains(&format!("revision={rev}")),
        "{log}"
    );
    let reals: BTreeSet<String> = fleet.topo.client.ns.run_in(|| {
        (0..30)
            .map(|_| {
                http_get(SocketAddr::from((VIP_C, 80)), Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("node c, restarted without its store: {e}"))
                    .real
            })
            .collect()
    });
    assert!(
        reals.len() > 1,
        "node c spreads flows over its reals: {reals:?}"
    );
    assert_eq!(fleet.status(2)["store"]["revision"], rev);
    thread::sleep(Duration::from_secs(30));

    // etcd returns: a change made through node B reaches everyone.
    fleet.etcd.run();
    wait_until("node a reconnects", || {
        fleet.status(0)["store"]["connected"] == true
    });
    fleet.nodes[1].cli_ok(&["real", "set", SERVICE, REALS[2], "--weight", "3"]);
    let rev2 = fleet.desired_revision();
    assert!(rev2 > rev);
    fleet.wait_converged(rev2);

    // Node C is cut off from etcd while two changes are made and the history is
    // compacted; it catches up when it can reach etcd again.
    fleet.extra[1].ns.ip(&format!(
        "route add prohibit {}/32",
        ETCD.split(':').next().unwrap_or_default()
    ));
    wait_until("node c loses the store", || {
        fleet.status(2)["store"]["connected"] == false
    });
    fleet.nodes[0].cli_ok(&["real", "drain", SERVICE, REALS[0]]);
    fleet.nodes[0].cli_ok(&["real", "set", SERVICE_C, REALS[1], "--weight", "2"]);
    let rev3 = fleet.desired_revision();
    let compacted = fleet
        .etcd
        .ctl(&["compact", &fleet.etcd.revision().to_string()]);
    assert!(compacted.status.success(), "{compacted:?}");
    fleet.extra[1].ns.ip(&format!(
        "route del prohibit {}/32",
        ETCD.split(':').next().unwrap_or_default()
    ));
    fleet.wait_converged(rev3);
    let vips = json(
        &fleet.nodes[2].cli_ok(&["vip", "list", "--json"]),
        "vip list",
    );
    let drained = vips
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["vip"] == SERVICE)
        .flat_map(|v| v["reals"].as_array().cloned().unwrap_or_default())
        .any(|r| r["addr"] == REALS[0] && r["admin"] == "drain");
    assert!(
        drained,
        "node c has the drain made while it was cut off: {vips}"
    );

    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "requests through node a failed during the outage: {:?}",
        errors.lock().expect("errors")
    );
    assert!(ok > 500, "the load ran ({ok} requests)");
    println!("fleet: store outage: requests={ok} failed={failed}");
}

#[test]
fn store_settings_and_documents_are_checked_before_anything_is_written() {
    require_root();
    let topo = balanced_topology(&unique_prefix("fc"), 1);
    let dir = RunDir::new(&format!("xlb-{}", topo.prefix()));
    let mut d = Daemon::spawn_in(
        &topo.lb.ns,
        "eth0",
        dir.path(),
        &["--no-pin", "--store", "etcd://198.51.100.5/x"],
    );
    let (status, log) = d.wait_exit();
    assert_eq!(status.code(), Some(2), "bad input: {log}");
    assert!(
        log.contains("invalid store 'etcd://198.51.100.5/x': '198.51.100.5' is not HOST:PORT"),
        "{log}"
    );
    let cfg = dir.path().join("xlb.yaml");
    std::fs::write(&cfg, config([1, 1, 1])).expect("config");
    let mut d = Daemon::spawn_in(
        &topo.lb.ns,
        "eth0",
        dir.path(),
        &[
            "--no-pin",
            "--store",
            "etcd://198.51.100.5:2379/x",
            "--config",
            cfg.to_str().expect("UTF-8"),
        ],
    );
    let (status, log) = d.wait_exit();
    assert_eq!(status.code(), Some(2), "bad input: {log}");
    assert!(
        log.contains("services are given, but with a store"),
        "{log}"
    );
    // No store: `xlb fleet` says so and fails.
    let d = Daemon::start(&topo.lb.ns, "eth0");
    // `xlb check` makes the same refusal as the start, and the settings'
    // pairings, with no daemon and no store reached.
    let stored = dir.path().join("stored.yaml");
    std::fs::write(
        &stored,
        format!(
            "daemon:\n  store: etcd://198.51.100.5:2379/x\n{}",
            config([1, 1, 1])
        ),
    )
    .expect("config");
    let paired = dir.path().join("paired.yaml");
    std::fs::write(
        &paired,
        "daemon:\n  store: etcd://198.51.100.5:2379/x\n  store_cert: /etc/xlb/c.pem\n",
    )
    .expect("config");
    for (file, want) in [
        (&stored, "stored.yaml: services are given, but with a store"),
        (
            &paired,
            "paired.yaml: invalid store settings: --store-cert and --store-key go together",
        ),
    ] {
        let out = d.cli(&["check", file.to_str().expect("UTF-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && err.contains(want),
            "{want}: {out:?}"
        );
    }
    let out = d.cli(&["fleet"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this daemon is not in a fleet"),
        "{out:?}"
    );
}
