//! netns end-to-end, the balancer in a cluster: two balancers announce the VIP through
//! BIRD over BGP to a router that spreads flows over both by ECMP; `xlb drain` takes one
//! out under load without breaking a connection; a VIP without a real that can serve is
//! withdrawn; `xlb ready` and `xlb role` as keepalived's hooks call them.
//!
//! ```text
//!   out (192.0.2.2) ── router (192.0.2.1 | 198.51.100.2, BIRD, ECMP)
//!                              │ bridge 198.51.100.0/24
//!          lb1 (.1, xlb + BIRD) ┤ lb2 (.3, xlb + BIRD) ┤ rs1 (.11) ┤ rs2 (.12)
//! ```
//!
//! Needs root, BIRD 2 (`./x setup` installs bird2) and runs one test at a time.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::thread;
use std::time::Duration;

use etherparse::PacketBuilder;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};
use xlb_tests::cluster::{
    Cluster, Failover, Failure, Load, Pair, SERVICE, SYNC_PORT, Setup, add_a_real_then_fail_lb1,
    finish,
};
use xlb_tests::harness::{VIP, require_root, wait_until};
use xlb_tests::netns::Netns;

#[test]
fn bird_announces_serving_vips_and_drain_withdraws_without_breaking_connections() {
    require_root();
    let cluster = Cluster::start("cbg");
    let (lb1, lb2) = ("198.51.100.1", "198.51.100.3");
    cluster.wait_hops(&[lb1, lb2]);
    let node = cluster.node(0);
    assert_eq!(
        node["bird"]["announced"],
        serde_json::json!([VIP.to_string()]),
        "{node}"
    );
    assert_eq!(node["bird"]["in_sync"], true, "{node}");

    let load = Load::start(&cluster.out, 24);
    // ECMP spreads the flows: both balancers carry VIP traffic before the drain.
    let before = [cluster.vip_packets(0), cluster.vip_packets(1)];
    wait_until("both balancers forward VIP packets", || {
        cluster.vip_packets(0) > before[0] && cluster.vip_packets(1) > before[1]
    });

    let drained = cluster.daemons[0].cli_ok(&["drain", "--quiet", "1", "--timeout", "25"]);
    assert!(drained.contains("routes withdrawn from BIRD"), "{drained}");
    assert!(drained.contains("safe to stop"), "{drained}");
    assert_eq!(
        cluster.hops(),
        [lb2],
        "the router still sends VIP traffic to lb1"
    );
    let node = cluster.node(0);
    assert_eq!(node["drain"]["safe_to_stop"], true, "{node}");
    assert_eq!(node["bird"]["announced"], serde_json::json!([]), "{node}");
    // keepalived's check fails on a draining node, not on the other.
    let ready = cluster.daemons[0].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded on a draining node"
    );
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("draining"),
        "{ready:?}"
    );
    assert!(
        cluster.daemons[1]
            .cli_ok(&["ready"])
            .contains("ready: serving 203.0.113.10")
    );

    // Nothing reaches lb1 any more, and the load goes on through lb2 alone.
    let after_drain = cluster.vip_packets(0);
    thread::sleep(Duration::from_millis(500));
    let (broken, failed, answered) = load.finish();
    assert_eq!(
        cluster.vip_packets(0),
        after_drain,
        "lb1 still receives VIP packets"
    );
    assert_eq!(broken, 0, "kept-alive connections broken by the drain");
    assert_eq!(failed, 0, "new connections failed during the drain");
    assert!(
        answered > 10,
        "the load hardly ran: {answered} new connections"
    );

    let cancelled = cluster.daemons[0].cli_ok(&["drain", "--cancel"]);
    assert!(cancelled.contains("announced again"), "{cancelled}");
    cluster.wait_hops(&[lb1, lb2]);

    // A VIP without a real that can serve is withdrawn; one real back announces it.
    for real in &cluster.topo.reals {
        cluster.daemons[1].cli_ok(&["real", "disable", SERVICE, &real.ipv4.to_string()]);
    }
    cluster.wait_hops(&[lb1]);
    let ready = cluster.daemons[1].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded without a serving real"
    );
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("no VIP has a real that can serve"),
        "{ready:?}"
    );
    let rs1 = cluster.topo.reals[0].ipv4.to_string();
    cluster.daemons[1].cli_ok(&["real", "enable", SERVICE, &rs1]);
    cluster.wait_hops(&[lb1, lb2]);
}

#[test]
fn bird_down_is_reported_and_retried_and_role_is_recorded() {
    require_root();
    let mut cluster = Cluster::start("cbr");
    cluster.wait_hops(&["198.51.100.1", "198.51.100.3"]);
    // lb1's BIRD stops: announcing fails and says so, forwarding goes on.
    cluster.birds.remove(0);
    cluster.daemons[0].cli_ok(&[
        "real",
        "disable",
        SERVICE,
        &cluster.topo.reals[0].ipv4.to_string(),
    ]);
    cluster.daemons[0].cli_ok(&[
        "real",
        "disable",
        SERVICE,
        &cluster.topo.reals[1].ipv4.to_string(),
    ]);
    wait_until("lb1 reports BIRD out of sync", || {
        cluster.node(0)["bird"]["in_sync"] == false
    });
    let status = cluster.daemons[0].cli_ok(&["status"]);
    assert!(
        status.contains("BIRD NOT IN SYNC: BIRD's control socket"),
        "{status}"
    );
    let metrics_free = cluster.node(0);
    assert!(
        metrics_free["bird"]["error_since"].as_u64().is_some(),
        "{metrics_free}"
    );

    // `xlb role` as keepalived's notify hooks call it.
    cluster.daemons[1].cli_ok(&["role", "backup"]);
    assert_eq!(cluster.node(1)["role"]["role"], "backup");
    cluster.daemons[1].cli_ok(&["role", "master"]);
    assert_eq!(cluster.node(1)["role"]["role"], "master");
    let bad = cluster.daemons[1].cli(&["role", "primary"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid value 'primary'"),
        "{bad:?}"
    );
}

#[test]
fn keepalived_pair_with_flow_sync_fails_over_without_breaking_connections() {
    let mut pair = Pair::start("cvr", true);
    let (f, took) = pair.fail_over();
    report_vrrp(true, &f, took);
    assert_eq!(f.broken, 0, "kept-alive connections broken by the failover");
    assert_eq!(f.failed, 0, "new connections failed during the failover");
    assert!(
        f.answered > 10,
        "the load hardly ran: {} new connections",
        f.answered
    );
    // keepalived's check: a draining node is not ready, so it would give the VIP up.
    let ready = pair.daemons[1].cli(&["ready"]);
    assert!(ready.status.success(), "{ready:?}");
    pair.daemons[1].cli_ok(&["drain", "--no-wait"]);
    let ready = pair.daemons[1].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded on a draining node"
    );
}

#[test]
fn keepalived_pair_without_flow_sync_breaks_connections_once_a_real_was_added() {
    let (f, took) = Pair::start("cvo", false).fail_over();
    report_vrrp(false, &f, took);
    assert!(
        f.broken > 0,
        "no connection broke without flow sync: the scenario proves nothing"
    );
}

fn report_vrrp(sync: bool, f: &Failover, took: Duration) {
    eprintln!(
        "VRRP failover, sync {}: lb2 master {:.2} s after the cut, new connections answered \
         again after {}; {} of 24 connections broken, {} new connections failed, {} answered",
        if sync { "on" } else { "off" },
        took.as_secs_f64(),
        seconds(f.recovered),
        f.broken,
        f.failed,
        f.answered
    );
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

#[test]
fn without_flow_sync_a_killed_balancer_breaks_connections_once_a_real_was_added() {
    failover_without_sync("cfo", Failure::Kill);
}

#[test]
fn without_flow_sync_a_cut_link_breaks_connections_once_a_real_was_added() {
    failover_without_sync("cfc", Failure::Cut);
}

fn failover_without_sync(tag: &str, failure: Failure) {
    require_root();
    let mut cluster = Cluster::start_with(
        tag,
        Setup {
            reals: 3,
            in_vip: 2,
            sync: false,
        },
    );
    let (load, late, failed_at) = add_a_real_then_fail_lb1(&mut cluster, failure);
    let f = finish(load, late, failed_at);
    eprintln!(
        "sync off, lb1 {}: new connections answered again after {}; {} of 40 connections \
         broken (+{} of 8 late ones), {} new connections failed, {} answered",
        if failure == Failure::Kill {
            "killed"
        } else {
            "cut off"
        },
        seconds(f.recovered),
        f.broken,
        f.late_broken,
        f.failed,
        f.answered
    );
    // The scenario bites: lb2's table sends some of lb1's flows to the new real.
    assert!(
        f.broken > 0,
        "no connection broke without flow sync: the scenario proves nothing"
    );
}

#[test]
fn with_flow_sync_a_cut_link_breaks_no_connection() {
    require_root();
    let mut cluster = Cluster::start_with(
        "cfk",
        Setup {
            reals: 3,
            in_vip: 2,
            sync: true,
        },
    );
    let (load, late, failed_at) = add_a_real_then_fail_lb1(&mut cluster, Failure::Cut);
    let f = finish(load, late, failed_at);
    eprintln!(
        "sync on, lb1 cut off: new connections answered again after {}; {} of 40 connections \
         broken (+{} of 8 late ones), {} new connections failed, {} answered",
        seconds(f.recovered),
        f.broken,
        f.late_broken,
        f.failed,
        f.answered
    );
    f.assert_nothing_broke();
}

#[test]
fn with_flow_sync_killed_and_restarted_balancers_break_no_connection() {
    require_root();
    let mut cluster = Cluster::start_with(
        "cfs",
        Setup {
            reals: 3,
            in_vip: 2,
            sync: true,
        },
    );
    let (load, late, _) = add_a_real_then_fail_lb1(&mut cluster, Failure::Kill);
    let lb2 = cluster.metrics(1);
    assert!(
        lb2["xlb_sync_flows_received_total"] > 0.0,
        "lb2 heard of none of lb1's flows: {lb2:?}"
    );
    assert!(
        lb2[r#"xlb_conntrack_events_total{event="peer_hit"}"#] > 0.0,
        "lb2 never took a flow from lb1's reports"
    );

    // Scenario 3: lb1 comes back, pulls every flow from lb2 before BIRD announces
    // it, takes its share of the flows; then lb2 dies.
    cluster.restart(0);
    cluster.wait_hops(&["198.51.100.1", "198.51.100.3"]);
    let node = cluster.node(0);
    assert_eq!(node["sync"]["ready"], true, "{node}");
    assert_eq!(
        node["sync"]["pulled_from"],
        format!("198.51.100.3:{SYNC_PORT}"),
        "{node}"
    );
    assert!(
        node["sync"]["pulled_flows"].as_u64() >= Some(48),
        "the restarted lb1 pulled too few flows: {node}"
    );
    let text = cluster.daemons[0].cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "flow sync on 198.51.100.1:{SYNC_PORT} with 198.51.100.3:{SYNC_PORT} (config)"
        )) && text.contains(&format!("flows from 198.51.100.3:{SYNC_PORT}")),
        "{text}"
    );
    let before = cluster.vip_packets(0);
    wait_until("the restarted lb1 forwards VIP packets", || {
        cluster.vip_packets(0) > before
    });
    thread::sleep(Duration::from_millis(500));
    let killed = std::time::Instant::now();
    cluster.kill(1);
    cluster.wait_hops(&["198.51.100.1"]);
    thread::sleep(Duration::from_secs(3));
    let f = finish(load, late, killed);
    eprintln!(
        "sync on, lb1 killed, restarted, lb2 killed: new connections answered again after {}; \
         {} of 40 connections broken (+{} of 8 late ones), {} new connections failed, {} \
         answered",
        seconds(f.recovered),
        f.broken,
        f.late_broken,
        f.failed,
        f.answered
    );
    f.assert_nothing_broke();

    forged_messages_and_a_syn_flood(&cluster);
}

/// Scenario 6, against lb1 (lb2 is dead, its address is still a peer's): messages
/// with another key, of another cluster, replayed, or from a source that is no peer
/// are dropped and counted; a SYN flood makes no sync traffic.
fn forged_messages_and_a_syn_flood(cluster: &Cluster) {
    use lb_userspace::flowsync::wire::{self, Entry, Header, Key, Kind, Op};
    let to = SocketAddr::from((cluster.host(0).ipv4, SYNC_PORT));
    let key = Key::new(b"a shared key of the test cluster").expect("the test key");
    let wrong = Key::new(b"a shared key of another cluster").expect("a key");
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[192, 0, 2, 77]);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&VIP.octets());
    let entry = Entry {
        op: Op::New,
        flow: lb_common::FlowKey {
            src,
            dst,
            ports: (40_000 << 16) | 80,
            proto: 6,
            family: lb_common::FAMILY_V4,
            _pad: [0; 2],
        },
        real: cluster.topo.reals[0].ipv4.into(),
        at_ns: 0,
    };
    let header = |cluster_id, seq| Header {
        kind: Kind::Flows,
        cluster: cluster_id,
        node: 99,
        epoch: 1,
        seq,
        sent_ns: 0,
    };
    let send_from = |ns: &Netns, msg: &[u8]| {
        ns.run_in(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            socket.send_to(msg, to).expect("sending a sync message");
        });
    };
    let before = cluster.metrics(0);
    let good = wire::encode(&key, &header(1, 5), &[entry]);
    send_from(
        &cluster.lb2.ns,
        &wire::encode(&wrong, &header(1, 1), &[entry]),
    );
    send_from(
        &cluster.lb2.ns,
        &wire::encode(&key, &header(2, 2), &[entry]),
    );
    send_from(&cluster.lb2.ns, &good);
    send_from(&cluster.lb2.ns, &good);
    send_from(&cluster.topo.client.ns, &good);
    let grew = |m: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, series: &str| {
        m[series] - before[series]
    };
    let dropped = |reason: &str| format!(r#"xlb_sync_dropped_total{{reason="{reason}"}}"#);
    wait_until("lb1 counted the forged messages", || {
        let m = cluster.metrics(0);
        grew(&m, &before, &dropped("replay")) >= 1.0
            && grew(&m, &before, &dropped("unknown_peer")) >= 1.0
    });
    let m = cluster.metrics(0);
    for (series, want) in [
        (dropped("bad_tag"), 1.0),
        (dropped("foreign"), 1.0),
        (dropped("replay"), 1.0),
        (dropped("unknown_peer"), 1.0),
        ("xlb_sync_messages_received_total".to_owned(), 1.0),
    ] {
        assert_eq!(grew(&m, &before, &series), want, "{series}");
    }

    // 500 SYNs from addresses that exist nowhere (the reals' answers die on the
    // way back): tracked, never confirmed, never reported. The reports of the
    // load's last connections (their ends) are out first.
    let sent = || cluster.metrics(0)["xlb_sync_flows_sent_total"];
    wait_until("lb1's flow reports settle", || {
        let a = sent();
        thread::sleep(Duration::from_millis(300));
        sent() == a
    });
    let before = cluster.metrics(0);
    send_syns(&cluster.out, 500);
    thread::sleep(Duration::from_millis(500));
    let m = cluster.metrics(0);
    assert!(
        grew(&m, &before, r#"xlb_conntrack_events_total{event="new"}"#) >= 500.0,
        "the SYN flood did not reach lb1"
    );
    assert_eq!(
        grew(&m, &before, "xlb_sync_flows_sent_total"),
        0.0,
        "a SYN flood became sync traffic: {:?}",
        m.iter()
            .filter(|(k, _)| k.contains("sync") || k.contains("conntrack_events"))
            .map(|(k, v)| (k, v - before[k]))
            .filter(|(_, d)| *d != 0.0)
            .collect::<Vec<_>>()
    );
}

/// Sends `n` TCP SYNs to the VIP from `ns`, each from another port of addresses in
/// 192.0.2.100-199, which no host has.
fn send_syns(ns: &Netns, n: u16) {
    ns.run_in(|| {
        // IPPROTO_RAW: we write the IP header (the kernel fills in its id and checksum).
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .expect("a raw socket (needs root)");
        let dest = SockaddrIn::from(SocketAddrV4::new(VIP, 80));
        for i in 0..n {
            let src = [192, 0, 2, 100 + u8::try_from(i % 100).expect("below 100")];
            let mut packet = Vec::with_capacity(64);
            PacketBuilder::ipv4(src, VIP.octets(), 64)
                .tcp(20_000 + i, 80, u32::from(i), 64240)
                .syn()
                .write(&mut packet, &[])
                .expect("building a SYN");
            sendto(fd.as_raw_fd(), &packet, &dest, MsgFlags::empty()).expect("sending a SYN");
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
}
