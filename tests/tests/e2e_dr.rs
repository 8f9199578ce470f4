//! netns end-to-end, direct server return: real TCP and UDP clients and servers in
//! namespaces, through the XDP program the daemon attached, with `xlb run` and the `xlb`
//! CLI used exactly as an operator uses them.
//!
//! Needs root (namespaces, XDP) and runs one test at a time (`./x test` does both). The
//! binaries come from `XLB_BIN` / `XLB_TESTSRV_BIN`, or from the target directory after
//! `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Output;
use std::time::Duration;
use xlb_tests::harness::{require_root, stats};

use lb_userspace::state::fmt_mac;
use xlb_tests::capture::FrameTap;
use xlb_tests::harness::{
    Daemon, HttpAnswer, Lab, LinkCounters, QUICK_CHECK, VIP, http_get, proven_up, real_health,
    real_listed, real_name, wait_health,
};

const TCP_SERVICE: &str = "203.0.113.10:80/tcp";
const UDP_SERVICE: &str = "203.0.113.10:9000/udp";
const UDP_PORT: u16 = 9000;

/// HTTP body size: replies much larger than requests make a detour through the balancer
/// impossible to miss in its byte counters.
const BODY_BYTES: usize = 65_536;

/// Enough connections that a fair share (a third each) cannot fall under a fifth by
/// chance (4 standard deviations away).
const CONNECTIONS: usize = 240;
const TIMEOUT: Duration = Duration::from_secs(3);

/// What every real serves: HTTP with large bodies on any address, UDP echo on the VIP
/// itself (so that replies leave from the VIP, as DR needs).
const SERVER_ARGS: [&str; 6] = [
    "--http",
    "0.0.0.0:80",
    "--udp",
    "203.0.113.10:9000",
    "--body-bytes",
    "65536",
];

/// Three reals behind the TCP and the UDP service, configured through the CLI.
fn configured_lab(tag: &str) -> Lab {
    require_root();
    let lab = Lab::start(tag, 3, &SERVER_ARGS);
    for service in [TCP_SERVICE, UDP_SERVICE] {
        lab.daemon.cli_ok(&["vip", "add", service]);
        for real in &lab.topo.reals {
            lab.daemon
                .cli_ok(&["real", "add", service, &real.ipv4.to_string()]);
        }
    }
    lab
}

/// `count` HTTP requests from the client to the VIP, one connection each; panics on the
/// first failure.
fn http_requests(lab: &Lab, count: usize) -> Vec<HttpAnswer> {
    let target = SocketAddr::from((VIP, 80));
    lab.topo.client.ns.run_in(|| {
        (0..count)
            .map(|i| {
                http_get(target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("request {i} of {count} to {target}: {e}"))
            })
            .collect()
    })
}

/// Packets of the verdict counters `xlb stats --json` names `name` or `name_*` (e.g.
/// `tx` and `tx_dr`), added up.
fn verdict_packets(stats: &serde_json::Value, name: &str) -> u64 {
    let prefix = format!("{name}_");
    let verdicts = stats["verdicts"]
        .as_array()
        .unwrap_or_else(|| panic!("no verdicts in {stats}"));
    let matching: Vec<u64> = verdicts
        .iter()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n == name || n.starts_with(&prefix))
        })
        .map(|c| c["packets"].as_u64().expect("packets are a number"))
        .collect();
    assert!(!matching.is_empty(), "no verdict {name} in {stats}");
    matching.iter().sum()
}

/// A VIP's packets from `xlb stats --json`.
fn vip_packets(stats: &serde_json::Value, service: &str) -> u64 {
    stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == service))
        .and_then(|s| s["packets"].as_u64())
        .unwrap_or_else(|| panic!("no VIP {service} in {stats}"))
}

/// The real `xlb simulate SERVICE --src CLIENT:PORT` names, as `rsN`.
fn simulated_real(lab: &Lab, service: &str, port: u16) -> String {
    let src = format!("{}:{port}", lab.topo.client.ipv4);
    let out = lab.daemon.cli_ok(&["simulate", service, "--src", &src]);
    // "198.51.100.2:40000 -> 203.0.113.10:80/tcp goes to real 198.51.100.12"
    let addr = out
        .trim()
        .strip_prefix(&format!("{src} -> {service} goes to real "))
        .and_then(|a| a.parse::<Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("unexpected `xlb simulate` answer: {out:?}"));
    let (i, _) = lab
        .real_by_addr(addr)
        .unwrap_or_else(|| panic!("xlb simulate named {addr}, not one of the reals"));
    real_name(i)
}

#[test]
fn tcp_to_the_vip_reaches_every_real_and_replies_bypass_the_balancer() {
    let lab = configured_lab("ed");
    let lb_before = LinkCounters::read(&lab.topo.lb);
    let client_before = LinkCounters::read(&lab.topo.client);
    let tap = FrameTap::start(&lab.topo.client, VIP);

    let answers = http_requests(&lab, CONNECTIONS);
    // Let the last FINs and ACKs cross the balancer before reading its counters.
    std::thread::sleep(Duration::from_millis(200));
    let frames = tap.finish();
    let lb = LinkCounters::read(&lab.topo.lb).since(&lb_before);
    let client = LinkCounters::read(&lab.topo.client).since(&client_before);

    // Every real gets a fair share (a third expected; at least a fifth required).
    let mut per_real: BTreeMap<&str, usize> = BTreeMap::new();
    for answer in &answers {
        assert_eq!(
            answer.body_bytes, BODY_BYTES,
            "a truncated body from {}",
            answer.real
        );
        *per_real.entry(answer.real.as_str()).or_default() += 1;
    }
    for i in 0..lab.topo.reals.len() {
        let got = per_real.get(real_name(i).as_str()).copied().unwrap_or(0);
        assert!(
            got * 5 >= CONNECTIONS,
            "{} answered {got} of {CONNECTIONS} connections, under 20%: {per_real:?}",
            real_name(i)
        );
    }

    // Replies come from the reals' MACs, never the balancer's.
    let real_macs: Vec<[u8; 6]> = lab.topo.reals.iter().map(|r| r.mac).collect();
    assert!(
        frames.from_peer_total() >= CONNECTIONS as u64,
        "the client's tap saw only {} frames from {VIP}",
        frames.from_peer_total()
    );
    for (mac, count) in &frames.from_peer {
        assert!(
            real_macs.contains(mac),
            "{count} frames from {VIP} carried source MAC {} (balancer: {}), not a real's",
            fmt_mac(mac),
            fmt_mac(&lab.topo.lb.mac)
        );
    }
    for (i, real) in lab.topo.reals.iter().enumerate() {
        assert!(
            frames.from_peer_via(&real.mac) > 0,
            "no reply frame from {}'s MAC",
            real_name(i)
        );
    }

    // The replies' bytes never crossed the balancer's link: it saw the requests only.
    let reply_bytes = (CONNECTIONS * BODY_BYTES) as u64;
    assert!(
        client.rx_bytes >= reply_bytes,
        "the client received {} bytes, less than the {reply_bytes} bytes of bodies",
        client.rx_bytes
    );
    assert!(
        lb.rx_bytes * 10 < client.rx_bytes,
        "the balancer received {} bytes while the client received {}: replies went through it",
        lb.rx_bytes,
        client.rx_bytes
    );

    // The daemon's counters agree.
    let stats = stats(&lab);
    assert!(
        verdict_packets(&stats, "tx") > 0,
        "no XDP_TX verdict counted: {stats}"
    );
    let vip = vip_packets(&stats, TCP_SERVICE);
    assert!(
        vip >= frames.to_peer,
        "VIP {TCP_SERVICE} counted {vip} packets, the client sent {} to it",
        frames.to_peer
    );
    for verdict in stats["verdicts"].as_array().expect("verdicts") {
        let name = verdict["name"].as_str().unwrap_or_default();
        if name.starts_with("drop") || name == "aborted" {
            assert_eq!(verdict["packets"], 0, "{name} is not zero: {stats}");
        }
    }
}

#[test]
fn the_same_five_tuple_always_lands_on_the_same_real() {
    let lab = configured_lab("es");

    // UDP: twenty datagrams from one source port, one real answers them all, from the VIP.
    let client = SocketAddr::from((lab.topo.client.ipv4, 40_000));
    let to = SocketAddr::from((VIP, UDP_PORT));
    let names: Vec<String> = lab.topo.client.ns.run_in(|| {
        let socket = UdpSocket::bind(client).unwrap_or_else(|e| panic!("bind {client}: {e}"));
        socket
            .set_read_timeout(Some(TIMEOUT))
            .expect("UDP read timeout");
        (0..20)
            .map(|i| {
                let payload = format!("ping {i}");
                socket
                    .send_to(payload.as_bytes(), to)
                    .unwrap_or_else(|e| panic!("send datagram {i} to {to}: {e}"));
                let mut buf = [0u8; 256];
                let (n, from) = socket
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("no answer to datagram {i}: {e}"));
                assert_eq!(from, to, "datagram {i} answered from {from}, not the VIP");
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (name, echoed) = reply
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("odd UDP answer {reply:?}"));
                assert_eq!(echoed, payload, "UDP echo mangled");
                name.to_owned()
            })
            .collect()
    });
    assert!(
        names.iter().all(|n| *n == names[0]),
        "one UDP 5-tuple went to several reals: {names:?}"
    );
    assert_eq!(
        names[0],
        simulated_real(&lab, UDP_SERVICE, client.port()),
        "xlb simulate disagrees with the real that answered UDP"
    );

    // TCP: every connection reached the real `xlb simulate` names for its source port.
    let answers = http_requests(&lab, 60);
    for answer in &answers {
        let expected = simulated_real(&lab, TCP_SERVICE, answer.local_port);
        assert_eq!(
            answer.real, expected,
            "the connection from port {} reached {}, xlb simulate says {expected}",
            answer.local_port, answer.real
        );
    }
}

/// Asserts that an `xlb` command failed and that its stderr names every one of `needles`.
fn assert_failed_naming(out: &Output, what: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for needle in needles {
        assert!(
            stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: stderr does not mention {needle:?}: {stderr}"
        );
    }
}

#[test]
fn cli_errors_name_the_problem_and_leave_the_state_unchanged() {
    require_root();
    let lab = Lab::start("ec", 1, &["--http", "0.0.0.0:80"]);
    let daemon = &lab.daemon;

    let out = daemon.cli(&["vip", "add", "203.0.113.10:99999/tcp"]);
    assert_failed_naming(&out, "vip add with port 99999", &["99999", "out of range"]);

    daemon.cli_ok(&["vip", "add", TCP_SERVICE]);
    let before = daemon.cli_ok(&["vip", "list", "--json"]);

    let out = daemon.cli(&["real", "add", "203.0.113.77:80/tcp", "198.51.100.11"]);
    assert_failed_naming(
        &out,
        "real add to an unknown VIP",
        &["203.0.113.77:80/tcp", "unknown"],
    );

    let out = daemon.cli(&["real", "add", TCP_SERVICE, "192.0.2.50"]);
    assert_failed_naming(&out, "real add off the segment", &["192.0.2.50", "not on"]);

    assert_eq!(
        daemon.cli_ok(&["vip", "list", "--json"]),
        before,
        "refused commands changed the state"
    );

    // The daemon still serves: a good real goes in after the bad ones.
    let real = lab.topo.reals[0].ipv4;
    daemon.cli_ok(&["real", "add", TCP_SERVICE, &real.to_string()]);
    let list: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["vip", "list", "--json"])).expect("JSON");
    assert_eq!(
        list[0]["reals"][0]["addr"],
        IpAddr::V4(real).to_string(),
        "the real is not listed: {list}"
    );
}

/// How many of `answers` each real gave, by name.
fn answered(answers: &[HttpAnswer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.real.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn a_real_without_the_vip_on_lo_is_down_via_the_vip_and_up_via_its_address() {
    require_root();
    let mut lab = Lab::start("ev", 2, &SERVER_ARGS);
    let via_vip = TCP_SERVICE;
    let via_real = "203.0.113.11:80/tcp";
    let rs1 = IpAddr::V4(lab.topo.reals[0].ipv4);
    let rs2 = IpAddr::V4(lab.topo.reals[1].ipv4);
    let vip_on_lo = |verb: &str| {
        lab.topo.reals[0]
            .ns
            .ip(&format!("addr {verb} {VIP}/32 dev lo"));
    };
    vip_on_lo("del");
    let configure = |daemon: &Daemon, service: &str, via: &str| {
        let mut args = vec!["vip", "add", service, "--check", "tcp", "--check-via", via];
        args.extend(QUICK_CHECK);
        daemon.cli_ok(&args);
        for real in [rs1, rs2] {
            daemon.cli_ok(&["real", "add", service, &real.to_string()]);
        }
    };
    configure(&lab.daemon, via_vip, "vip");
    configure(&lab.daemon, via_real, "real");
    // Only a TCP handshake goes through the forwarding path: other kinds are refused.
    let out = lab.daemon.cli(&[
        "vip",
        "add",
        "203.0.113.12:80/tcp",
        "--check",
        "http",
        "--check-via",
        "vip",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: health check: via: vip probes with a TCP handshake sent through the forwarding \
         path: it serves kind tcp only, not http (--check-via)"
    );

    // rs1 does not own the VIP: the SYN sent to its MAC gets no answer. Its address
    // answers all the same.
    let daemon = &lab.daemon;
    wait_health(daemon, via_vip, rs2, "rs2 up via the VIP", proven_up);
    wait_health(daemon, via_real, rs1, "rs1 up via its address", proven_up);
    let down = wait_health(daemon, via_vip, rs1, "rs1 down via the VIP", |h| {
        h["status"]["up"] == false
    });
    assert_eq!(
        down["status"]["last_error"],
        "no answer from 198.51.100.11 for 203.0.113.10:80 sent to its MAC within 150 ms",
        "{down}"
    );
    let listed = real_listed(daemon, via_vip, rs1);
    assert_eq!(
        (&listed["health"], &listed["check"], &listed["via"]),
        (&"DOWN".into(), &"tcp".into(), &"vip".into()),
        "{listed}"
    );
    assert_eq!(real_listed(daemon, via_real, rs1)["health"], "up");
    assert_eq!(real_health(daemon, via_real, rs1)["via"], "real");
    let counts = answered(&http_requests(&lab, 30));
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["rs2"], "{counts:?}");

    // The VIP back on its lo: up, and it serves.
    vip_on_lo("add");
    wait_health(daemon, via_vip, rs1, "rs1 up via the VIP", |h| {
        h["status"]["up"] == true
    });
    // The verdict reaches the table once the controller takes it.
    xlb_tests::harness::wait_until("rs1 back in the VIP's table", || {
        real_listed(daemon, via_vip, rs1)["effective_weight"]
            .as_u64()
            .is_some_and(|w| w > 0)
    });
    let counts = answered(&http_requests(&lab, 40));
    assert!(
        counts.contains_key("rs1"),
        "rs1 is back yet unused: {counts:?}"
    );

    // A daemon started without CAP_NET_RAW cannot send such probes: it says so and
    // takes the reals down, never up.
    lab.daemon.stop();
    lab.daemon = Daemon::start_with_bounding_set(
        &lab.topo.lb.ns,
        "eth0",
        "-all,+bpf,+perfmon,+net_admin,+chown",
        &["--no-pin"],
    );
    configure(&lab.daemon, via_vip, "vip");
    let down = wait_health(
        &lab.daemon,
        via_vip,
        rs1,
        "rs1 down without CAP_NET_RAW",
        |h| h["status"]["up"] == false,
    );
    assert_eq!(
        down["status"]["last_error"],
        "via: vip needs raw sockets: CAP_NET_RAW was missing at start-up",
        "{down}"
    );
    let log = lab.daemon.log();
    assert_eq!(
        log.matches("health checks with via: vip or mode: syn cannot run")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn a_real_whose_mac_changes_silently_is_learnt_again() {
    require_root();
    let lab = Lab::start("dm", 1, &["--http", "0.0.0.0:80"]);
    let lb = &lab.topo.lb.ns;
    // Entries go stale a second after their last confirmation, and a stale
    // entry in use is probed after one more (the defaults: 15-45 s and 5 s).
    lb.sysctl("net.ipv4.neigh.eth0.base_reachable_time_ms", "1000");
    lb.sysctl("net.ipv4.neigh.eth0.delay_first_probe_time", "1");
    lab.daemon.cli_ok(&["vip", "add", TCP_SERVICE]);
    let real = &lab.topo.reals[0];
    let addr = IpAddr::V4(real.ipv4);
    lab.daemon
        .cli_ok(&["real", "add", TCP_SERVICE, &addr.to_string()]);
    assert_eq!(http_requests(&lab, 1)[0].real, real_name(0));
    assert_eq!(
        real_listed(&lab.daemon, TCP_SERVICE, addr)["mac"],
        fmt_mac(&real.mac)
    );

    // A new NIC, announced to nobody: no gratuitous ARP.
    real.ns.sysctl("net.ipv4.conf.all.arp_notify", "0");
    real.ns.sysctl("net.ipv4.conf.eth0.arp_notify", "0");
    let new_mac = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x99];
    real.ns
        .ip(&format!("link set dev eth0 address {}", fmt_mac(&new_mac)));
    let target = SocketAddr::from((VIP, 80));
    xlb_tests::harness::wait_until("traffic reaches the real at its new MAC", || {
        let listed = real_listed(&lab.daemon, TCP_SERVICE, addr);
        listed["mac"] == fmt_mac(&new_mac)
            && lab
                .topo
                .client
                .ns
                .run_in(|| http_get(target, Duration::from_millis(500)))
                .is_ok_and(|a| a.real == real_name(0))
    });
    assert!(
        lab.daemon.log().contains("real's MAC changed"),
        "{}",
        lab.daemon.log()
    );
}
