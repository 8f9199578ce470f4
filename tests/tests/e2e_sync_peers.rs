//! netns end-to-end, where flow sync finds its peers: balancers in store mode (a real
//! etcd, as in e2e_fleet.rs) with `--sync-listen` and no `--sync-peer` take each other
//! as peers from their node keys: the first node has nothing to pull, a second one
//! pulls from it, a flow confirmed on one lands in the others' peer tables, a third node
//! started later is sent to and admitted, and a stopped node leaves the peer lists.
//! Two balancers in multicast mode (`--sync-multicast` over the test bridge) pull by
//! hello, sync through the group, and admit by key and cluster id.
//!
//! ```text
//!   client (.2) ── bridge 198.51.100.0/24 ── a (.1, VIP traffic) ┤ b (.3) ┤ c (.4)
//!                                            etcd (.5) ┤ rs1 (.11) ┤ rs2 (.12)
//! ```
//!
//! Needs root and runs one test at a time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use lb_common::{FlowKey, FlowState};
use xlb_tests::etcd::{Etcd, store_args};
use xlb_tests::harness::{
    Daemon, KeepAlive, PinnedRun, Proc, RunDir, VIP, balanced_topology, flow_key, json,
    metric_samples, path_str, require_root, scrape_metrics, start_reals, wait_until,
};
use xlb_tests::netns::{Host, Topology, unique_prefix};

const SYNC_PORT: u16 = 9815;
const METRICS_PORT: u16 = 9814;
const DESIRED: &str = "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      \
                       - address: 198.51.100.11\n      - address: 198.51.100.12\n";

/// A balancer with flow sync and no configured peer, its data path pinned so that
/// the test reads its peer flow table.
struct Node<'a> {
    daemon: Daemon,
    host: &'a Host,
    run: PinnedRun,
    /// Its `--sync-listen` address.
    listen: String,
}

impl<'a> Node<'a> {
    /// Starts `name` on `host` with flow sync on its address, the test's key, and
    /// `extra` (where the desired state and the peers come from).
    fn start_with(host: &'a Host, name: &str, key: &str, extra: &[&str]) -> Node<'a> {
        let listen = format!("{}:{SYNC_PORT}", host.ipv4);
        Self::start_on(host, name, key, listen, extra)
    }

    /// As `start_with`, with flow sync on `listen`.
    fn start_on(host: &'a Host, name: &str, key: &str, listen: String, extra: &[&str]) -> Node<'a> {
        let run = PinnedRun::new(&format!("{}-{name}", host.ns.name()));
        let metrics = format!("{}:{METRICS_PORT}", host.ipv4);
        let mut args = vec![
            "--node-name",
            name,
            "--sync-listen",
            &listen,
            "--sync-key-file",
            key,
            "--metrics-addr",
            &metrics,
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_pinned(&host.ns, "eth0", &run, &args);
        Node {
            daemon,
            host,
            run,
            listen,
        }
    }

    /// In store mode (the store's short test settings), peers from the store only.
    fn start(host: &'a Host, name: &str, prefix: &str, key: &str) -> Node<'a> {
        let store = store_args(prefix);
        let mut extra: Vec<&str> = store.iter().map(String::as_str).collect();
        extra.extend(["--sync-pull-timeout-ms", "5000"]);
        Self::start_with(host, name, key, &extra)
    }

    fn sync_status(&self) -> serde_json::Value {
        json(
            &self.daemon.cli_ok(&["status", "--json"]),
            "xlb status --json",
        )["node"]["sync"]
            .clone()
    }

    /// The peers `xlb status --json` lists, as (address, source).
    fn peers(&self) -> Vec<(String, String)> {
        self.sync_status()["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["address"].as_str().unwrap_or_default().to_owned(),
                    p["source"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn metric(&self, series: &str) -> f64 {
        let addr = SocketAddr::from((self.host.ipv4, METRICS_PORT));
        metric_samples(&scrape_metrics(self.host, addr))
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in {}'s metrics", self.host.ns.name()))
    }

    fn sync_addr(&self) -> String {
        self.listen.clone()
    }
}

fn store_peers(nodes: &[&Node<'_>]) -> Vec<(String, String)> {
    nodes
        .iter()
        .map(|n| (n.sync_addr(), "store".to_owned()))
        .collect()
}

fn has(table: &HashMap<MapData, FlowKey, FlowState>, key: &FlowKey) -> bool {
    table.get(key, 0).is_ok()
}

/// A kept-alive connection from the client to the VIP, answered once (so confirmed on
/// the balancer that carries it), and its flow key.
fn confirmed_flow(topo: &Topology) -> (KeepAlive, FlowKey) {
    let client = IpAddr::V4(topo.client.ipv4);
    topo.client.ns.run_in(|| {
        let mut c = KeepAlive::connect(SocketAddr::from((VIP, 80)), Duration::from_secs(2))
            .expect("a connection to the VIP");
        let answer = c.get().expect("an answer through the VIP");
        let key = flow_key(client, answer.local_port);
        (c, key)
    })
}

#[test]
fn store_nodes_take_each_other_as_sync_peers_as_they_come_and_go() {
    require_root();
    let topo = balanced_topology(&unique_prefix("spe"), 2);
    let run = RunDir::new(&format!("xlb-{}", topo.prefix()));
    let servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
    let etcd = Etcd::start(&topo, run.path());
    let key = run.path().join("sync.key");
    std::fs::write(&key, "a shared key of the test cluster\n").expect("writing the key");
    let key = path_str(&key).to_owned();
    let prefix = format!("/xlb/{}", topo.prefix());
    let host_b = topo.add_host("lb2", "lb2", 3);
    let host_c = topo.add_host("lb3", "lb3", 4);

    // The first node of the fleet: no other node key, nothing to pull.
    let a = Node::start(&topo.lb, "a", &prefix, &key);
    wait_until("a's start-up pull is over", || {
        a.sync_status()["ready"] == true
    });
    let s = a.sync_status();
    assert_eq!(s["first_in_fleet"], true, "{s}");
    assert_eq!(s["pulled_from"], serde_json::Value::Null, "{s}");
    let text = a.daemon.cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "flow sync on {} with no peer\n  start-up copy: none needed: first node of the fleet",
            a.sync_addr()
        )),
        "{text}"
    );
    let desired = run.path().join("desired.yaml");
    std::fs::write(&desired, DESIRED).expect("writing the desired state");
    a.daemon.cli_ok(&["apply", path_str(&desired)]);

    // A flow through a before b exists: b's start-up pull brings it.
    let (mut first, first_key) = confirmed_flow(&topo);
    let b = Node::start(&host_b, "b", &prefix, &key);
    wait_until("b's start-up pull is over", || {
        b.sync_status()["ready"] == true
    });
    let s = b.sync_status();
    assert_eq!(s["pulled_from"], a.sync_addr(), "{s}");
    assert!(s["pulled_flows"].as_u64() >= Some(1), "{s}");
    assert!(
        has(&b.run.peer_flows(), &first_key),
        "b did not pull a's flow"
    );
    wait_until("a and b list each other from the store", || {
        a.peers() == store_peers(&[&b]) && b.peers() == store_peers(&[&a])
    });
    assert_eq!(a.metric(r#"xlb_sync_peers{source="store"}"#), 1.0);
    assert_eq!(a.metric(r#"xlb_sync_peers{source="config"}"#), 0.0);
    let text = a.daemon.cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "flow sync on {} with {} (store)",
            a.sync_addr(),
            b.sync_addr()
        )),
        "{text}"
    );

    // A flow confirmed on a lands in b's peer table by a's report.
    let (_second, second_key) = confirmed_flow(&topo);
    let peer_b = b.run.peer_flows();
    wait_until("a's report of the flow reaches b's peer table", || {
        has(&peer_b, &second_key)
    });

    // A third node started later: it pulls, a sends to it and it admits a.
    let c = Node::start(&host_c, "c", &prefix, &key);
    wait_until("c's start-up pull is over", || {
        c.sync_status()["ready"] == true
    });
    let s = c.sync_status();
    assert!(
        s["pulled_from"] == a.sync_addr() || s["pulled_from"] == b.sync_addr(),
        "{s}"
    );
    let peer_c = c.run.peer_flows();
    assert!(has(&peer_c, &first_key) && has(&peer_c, &second_key));
    wait_until("every node lists the two others", || {
        a.peers() == store_peers(&[&b, &c])
            && b.peers() == store_peers(&[&a, &c])
            && c.peers() == store_peers(&[&a, &b])
    });
    let received = c.metric("xlb_sync_messages_received_total");
    let (_third, third_key) = confirmed_flow(&topo);
    wait_until("a's report reaches c's and b's peer tables", || {
        has(&peer_c, &third_key) && has(&peer_b, &third_key)
    });
    assert!(c.metric("xlb_sync_messages_received_total") > received);
    assert_eq!(
        c.metric(r#"xlb_sync_dropped_total{reason="unknown_peer"}"#),
        0.0
    );
    // The first connection still works, through a.
    first.get().expect("the first connection still answers");

    // c stops: its key expires with its lease and the others drop it.
    drop(c);
    wait_until("a and b drop the stopped c", || {
        a.peers() == store_peers(&[&b]) && b.peers() == store_peers(&[&a])
    });
    assert_eq!(a.metric(r#"xlb_sync_peers{source="store"}"#), 1.0);
    drop((a, b, etcd, servers, run));
}

const GROUP: &str = "239.255.98.15:9816";
const GROUP_V6: &str = "[ff05::98:15]:9816";

/// Flow sync over IPv4: the group and the host's address.
fn v4(host: &Host) -> (&'static str, String) {
    (GROUP, format!("{}:{SYNC_PORT}", host.ipv4))
}

/// Flow sync over IPv6: the hellos carry the IPv6 pull address, and the group
/// is an IPv6 one.
fn v6(host: &Host) -> (&'static str, String) {
    (GROUP_V6, format!("[{}]:{SYNC_PORT}", host.ipv6))
}

/// A balancer with flow sync on `listen` in multicast mode to `group` on eth0, its
/// VIP from a config file.
fn multicast_node<'a>(
    host: &'a Host,
    name: &str,
    dir: &std::path::Path,
    key: &str,
    (group, listen): (&str, String),
) -> Node<'a> {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, DESIRED).expect("writing the config");
    let extra = [
        "--config",
        path_str(&config),
        "--sync-multicast",
        group,
        "--sync-interface",
        "eth0",
        "--sync-pull-timeout-ms",
        "3000",
    ];
    Node::start_on(host, name, key, listen, &extra)
}

/// Two balancers' hosts for multicast sync: the topology's balancer and a
/// second one (`lb2`), the reals serving HTTP, and the cluster's key file.
struct MulticastLab {
    topo: Topology,
    host_b: Host,
    run: RunDir,
    key: String,
    _servers: Vec<Proc>,
}

impl MulticastLab {
    fn new(tag: &str) -> MulticastLab {
        let topo = balanced_topology(&unique_prefix(tag), 2);
        let run = RunDir::new(&format!("xlb-{}", topo.prefix()));
        let servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
        let key = run.path().join("sync.key");
        std::fs::write(&key, "a shared key of the test cluster\n").expect("writing the key");
        let key = path_str(&key).to_owned();
        let host_b = topo.add_host("lb2", "lb2", 3);
        MulticastLab {
            topo,
            host_b,
            run,
            key,
            _servers: servers,
        }
    }

    /// Starts `a` on the balancer, which hears no hello within the pull
    /// timeout and announces without a copy, opens a connection through it,
    /// then `b`, which hears a's hello and pulls that flow from it; flow sync
    /// of both on `addr`'s group and address family. Gives both nodes and the
    /// open connection.
    fn pull_by_hello(
        &self,
        addr: fn(&Host) -> (&'static str, String),
    ) -> (Node<'_>, Node<'_>, KeepAlive) {
        let (dir, key) = (self.run.path(), self.key.as_str());
        let a = multicast_node(&self.topo.lb, "a", dir, key, addr(&self.topo.lb));
        wait_until("a's start-up pull is over", || {
            a.sync_status()["ready"] == true
        });
        let s = a.sync_status();
        assert!(
            s["pull_error"]
                .as_str()
                .is_some_and(|e| e.contains("no hello heard on the multicast group")),
            "{s}"
        );
        assert_eq!(
            s["multicast"],
            format!("{} on eth0", addr(&self.topo.lb).0),
            "{s}"
        );
        let (first, first_key) = confirmed_flow(&self.topo);

        let b = multicast_node(&self.host_b, "b", dir, key, addr(&self.host_b));
        wait_until("b's start-up pull is over", || {
            b.sync_status()["ready"] == true
        });
        let s = b.sync_status();
        assert_eq!(s["pulled_from"], a.sync_addr(), "{s}");
        assert!(
            has(&b.run.peer_flows(), &first_key),
            "b did not pull a's flow"
        );
        (a, b, first)
    }
}

#[test]
fn multicast_sync_sends_once_to_the_group_and_admits_by_key() {
    use lb_userspace::flowsync::wire::{self, Entry, Header, Key, Kind, Op};
    require_root();
    let lab = MulticastLab::new("smc");
    let topo = &lab.topo;
    let (a, b, mut first) = lab.pull_by_hello(v4);
    let peer_b = b.run.peer_flows();
    let text = b.daemon.cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "flow sync on {}, multicast {GROUP} on eth0, with no peer",
            b.sync_addr()
        )),
        "{text}"
    );

    // A flow confirmed on a reaches b through the group: one message per batch.
    let sent = a.metric("xlb_sync_messages_sent_total");
    let flows = a.metric("xlb_sync_flows_sent_total");
    let (_second, second_key) = confirmed_flow(topo);
    wait_until("a's report reaches b's peer table by multicast", || {
        has(&peer_b, &second_key)
    });
    assert!(a.metric("xlb_sync_flows_sent_total") > flows);
    let messages = a.metric("xlb_sync_messages_sent_total") - sent;
    assert!(
        (1.0..=a.metric("xlb_sync_flows_sent_total") - flows).contains(&messages),
        "{messages} messages for one batch or so"
    );
    // a does not take its own looped-back messages.
    assert_eq!(a.metric("xlb_sync_messages_received_total"), 0.0);

    // On the group, from a host that is no balancer: another cluster's message and
    // one with another key are dropped and counted; one with the key is admitted.
    topo.client.ns.ip("route add 224.0.0.0/4 dev eth0");
    let entry = |port: u16| Entry {
        op: Op::New,
        flow: flow_key(IpAddr::V4(topo.client.ipv4), port),
        real: topo.reals[0].ipv4.into(),
        at_ns: 0,
    };
    let header = |cluster, seq| Header {
        kind: Kind::Flows,
        cluster,
        node: 99,
        epoch: 1,
        seq,
        sent_ns: 0,
    };
    // And one from a node that took b's name (the default, the host name, can
    // be shared): b drops it as same_node_id; to a it is any other node's.
    let same_name = Header {
        node: lb_userspace::flowsync::node_id("b"),
        ..header(1, 4)
    };
    let good = Key::new(b"a shared key of the test cluster").expect("the key");
    let wrong = Key::new(b"a shared key of another cluster").expect("a key");
    let foreign = wire::encode(&good, &header(2, 1), &[entry(40_001)]);
    let forged = wire::encode(&wrong, &header(1, 2), &[entry(40_002)]);
    let admitted = wire::encode(&good, &header(1, 3), &[entry(40_003)]);
    let clash = wire::encode(&good, &same_name, &[entry(40_004)]);
    let dropped =
        |n: &Node<'_>, r: &str| n.metric(&format!(r#"xlb_sync_dropped_total{{reason="{r}"}}"#));
    let before = [
        dropped(&b, "foreign"),
        dropped(&b, "bad_tag"),
        dropped(&b, "same_node_id"),
    ];
    let received = b.metric("xlb_sync_messages_received_total");
    let group: SocketAddr = GROUP.parse().expect("the group");
    topo.client.ns.run_in(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        for msg in [&foreign, &forged, &admitted, &clash] {
            socket.send_to(msg, group).expect("sending to the group");
        }
    });
    wait_until("b counted the four messages", || {
        b.metric("xlb_sync_messages_received_total") > received
            && dropped(&b, "foreign") > before[0]
            && dropped(&b, "bad_tag") > before[1]
            && dropped(&b, "same_node_id") > before[2]
    });
    assert_eq!(dropped(&b, "foreign"), before[0] + 1.0);
    assert_eq!(dropped(&b, "bad_tag"), before[1] + 1.0);
    assert_eq!(dropped(&b, "same_node_id"), before[2] + 1.0);
    assert!(
        !has(&peer_b, &entry(40_004).flow),
        "b took a same-name node's flow"
    );
    assert_eq!(b.metric("xlb_sync_messages_received_total"), received + 1.0);
    assert!(has(&peer_b, &entry(40_003).flow));
    assert!(!has(&peer_b, &entry(40_001).flow) && !has(&peer_b, &entry(40_002).flow));
    assert_eq!(dropped(&a, "foreign"), 1.0, "a is on the group too");
    first.get().expect("the first connection still answers");
    drop((a, b));
}

#[test]
fn multicast_sync_over_ipv6_pulls_by_hello_and_carries_reports() {
    require_root();
    let lab = MulticastLab::new("smv");
    let topo = &lab.topo;
    // b hears a's IPv6 hello and pulls the open flow over IPv6 TCP.
    let (a, b, mut first) = lab.pull_by_hello(v6);
    let peer_b = b.run.peer_flows();

    // A flow confirmed on a reaches b through the IPv6 group.
    let flows = a.metric("xlb_sync_flows_sent_total");
    let (_second, second_key) = confirmed_flow(topo);
    wait_until(
        "a's report reaches b's peer table by IPv6 multicast",
        || has(&peer_b, &second_key),
    );
    assert!(a.metric("xlb_sync_flows_sent_total") > flows);
    assert_eq!(a.metric("xlb_sync_messages_received_total"), 0.0);
    first.get().expect("the first connection still answers");
    drop((a, b));
}

#[test]
fn sync_settings_that_cannot_work_stop_the_start_before_anything_is_loaded() {
    require_root();
    let topo = balanced_topology(&unique_prefix("sbd"), 1);
    let run = PinnedRun::new(&format!("{}-bad", topo.prefix()));
    let key = run.dir().join("sync.key");
    std::fs::write(&key, "a shared key of the test cluster\n").expect("writing the key");
    let key = path_str(&key);
    let listen = format!("{}:{SYNC_PORT}", topo.lb.ipv4);
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--store",
                "etcd://198.51.100.5:2379/x",
                "--sync-listen",
                "0.0.0.0:9815",
            ],
            "--sync-listen 0.0.0.0:9815 is a wildcard address, which the other balancers \
             cannot reach: with --store or --sync-multicast give --sync-advertise ADDR:PORT",
        ),
        (
            &[
                "--sync-listen",
                &listen,
                "--sync-multicast",
                "192.0.2.9:9816",
                "--sync-interface",
                "eth0",
            ],
            "--sync-multicast 192.0.2.9:9816 (daemon.sync_multicast): 192.0.2.9 is not a \
             multicast address",
        ),
        (
            &[
                "--sync-listen",
                &listen,
                "--sync-multicast",
                GROUP,
                "--sync-interface",
                "nosuch0",
            ],
            "--sync-interface nosuch0 (daemon.sync_interface): no such interface",
        ),
        (
            &["--sync-listen", &listen, "--sync-multicast", GROUP],
            "--sync-multicast 239.255.98.15:9816 needs --sync-interface IFACE",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["--pin-dir", path_str(run.pin_dir()), "--sync-key-file", key];
        all.extend_from_slice(args);
        let mut d = Daemon::spawn_in(&topo.lb.ns, "eth0", run.dir(), &all);
        let (status, log) = d.wait_exit();
        assert_eq!(status.code(), Some(2), "{args:?}: bad input: {log}");
        assert!(
            log.contains("invalid flow sync settings") && log.contains(want),
            "{args:?}: {log}"
        );
        assert_eq!(
            run.pins(),
            Vec::<String>::new(),
            "{args:?} pinned something"
        );
    }
    let link = topo.lb.ns.ip("-d link show dev eth0");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "a program is attached"
    );
}
