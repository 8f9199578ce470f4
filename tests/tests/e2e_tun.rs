//! netns end-to-end, tunnel mode and the rest of issue #3's data path: real TCP and UDP
//! through the XDP balancer with `xlb run` and the `xlb` CLI, and on the real servers
//! `xlb realserver setup` plus `xlb decap` exactly as an operator runs them.
//!
//! - TUN: IPIP (IPv4 VIP, IPv4 reals), IP6IP6 (IPv6 VIP, IPv6 reals) and 4in6 (IPv4
//!   VIP, IPv6 reals), decapsulated by `xlb decap` on each real's `eth0`, replies
//!   straight to the client;
//! - `xlb realserver setup` / `teardown` on a namespace of their own;
//! - UDP echo through a VIP from many source ports, by DR and through IPIP;
//! - an established TCP connection across `xlb real add` and `xlb real drain`;
//! - IPv6 direct return.
//!
//! Needs root (namespaces, XDP) and runs one test at a time (`./x test` does both). The
//! binaries come from `XLB_BIN` / `XLB_TESTSRV_BIN`, or from the target directory after
//! `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;
use xlb_tests::harness::{require_root, stats};

use lb_userspace::pin::DECAP_LAYOUT_VERSION;
use lb_userspace::state::fmt_mac;
use xlb_tests::capture::FrameTap;
use xlb_tests::harness::{
    Daemon, DecapProc, HttpAnswer, KeepAlive, Lab, LinkCounters, PinnedRun, Proc, QUICK_CHECK,
    RunDir, VIP, balanced_topology, http_get, path_str, proven_up, real_health, real_listed,
    real_name, start_real, wait_health, wait_until, xlb_bin,
};
use xlb_tests::netns::{Host, Netns, unique_prefix};

/// The IPv6 VIP, in the range the client routes through the balancer.
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);

const TCP_SERVICE: &str = "203.0.113.10:80/tcp";
const TCP6_SERVICE: &str = "[2001:db8:203::10]:80/tcp";
const UDP_SERVICE: &str = "203.0.113.10:9000/udp";
const UDP_PORT: u16 = 9000;

/// HTTP body size: replies much larger than requests make a detour through the balancer
/// impossible to miss in its byte counters.
const BODY_BYTES: usize = 65_536;

/// Connections per traffic run: a fair share (a third each) cannot fall under a fifth by
/// chance (over 3.5 standard deviations away).
const CONNECTIONS: usize = 150;
const TIMEOUT: Duration = Duration::from_secs(3);

/// What every real serves: HTTP with large bodies on every address and family (`[::]`
/// also takes IPv4), UDP echo on the VIP itself so that replies leave from the VIP.
const SERVER_ARGS: [&str; 6] = [
    "--http",
    "[::]:80",
    "--udp",
    "203.0.113.10:9000",
    "--body-bytes",
    "65536",
];

/// `DIR/NAME` as a string, for a command-line argument.
fn file_in(dir: &RunDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// Runs `xlb ARGS` inside `ns` (a real server's commands, no daemon involved) and returns
/// its stdout; panics with its stderr if it fails.
fn xlb_in(ns: &Netns, args: &[&str]) -> String {
    let bin = xlb_bin();
    let bin = bin.to_str().expect("the xlb path is UTF-8");
    let argv: Vec<&str> = std::iter::once(bin).chain(args.iter().copied()).collect();
    let out = ns.try_exec(&argv);
    assert!(
        out.status.success(),
        "`xlb {}` in {} failed ({}): {}",
        args.join(" "),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).expect("xlb prints UTF-8")
}

/// `sysctl -n KEY` inside `ns`.
fn sysctl(ns: &Netns, key: &str) -> String {
    let out = ns.exec(&["sysctl", "-n", key]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `ip -j addr show dev lo` in `ns`: one JSON object per address.
fn lo_addr_info(ns: &Netns) -> Vec<serde_json::Value> {
    let out = ns.ip("-j addr show dev lo");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`ip -j addr` printed invalid JSON: {e}"));
    json[0]["addr_info"]
        .as_array()
        .unwrap_or_else(|| panic!("no addr_info for lo in {}: {json}", ns.name()))
        .clone()
}

/// The addresses on `lo` in `ns`.
fn lo_addrs(ns: &Netns) -> BTreeSet<IpAddr> {
    lo_addr_info(ns)
        .iter()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

/// The addresses on `lo` in `ns` with their prefix lengths (`203.0.113.10/32`).
fn lo_prefixes(ns: &Netns) -> BTreeSet<String> {
    lo_addr_info(ns)
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect()
}

/// The state a real server is in before anyone prepared it: no VIP on `lo`, ARP answered
/// for any local address on any interface, strict reverse-path filtering (the default of
/// many distributions). The topology builder prepares its reals for direct return; this
/// undoes it so that `xlb realserver setup` has to do the work.
fn unprepare_real(real: &Host) {
    real.ns.ip(&format!("addr del {VIP}/32 dev lo"));
    real.ns.sysctl("net.ipv4.conf.all.arp_ignore", "0");
    real.ns.sysctl("net.ipv4.conf.all.arp_announce", "0");
    real.ns.sysctl("net.ipv4.conf.all.rp_filter", "1");
    real.ns.sysctl("net.ipv4.conf.lo.rp_filter", "1");
}

/// The sysctls `xlb realserver setup` changes.
const SETUP_SYSCTLS: [&str; 4] = [
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.lo.rp_filter",
];

/// The values of [`SETUP_SYSCTLS`] in `ns`, in order.
fn setup_sysctls(ns: &Netns) -> Vec<String> {
    SETUP_SYSCTLS.iter().map(|k| sysctl(ns, k)).collect()
}

/// Sets [`SETUP_SYSCTLS`] in `ns` as a stock host has them (ARP answered for
/// any local address, strict reverse-path filtering); returns them read back.
fn stock_setup_sysctls(ns: &Netns) -> Vec<String> {
    for (key, value) in SETUP_SYSCTLS.iter().zip(["0", "0", "1", "1"]) {
        ns.sysctl(key, value);
    }
    setup_sysctls(ns)
}

/// A tunnel-mode lab: the balancer's daemon, and on every real `xlb realserver setup`
/// (both VIPs on `lo`), `xlb decap --iface eth0` and `xlb-testsrv`. Nothing configured
/// on the daemon yet. Fields drop in order: decapsulators, daemon and servers, then the
/// namespaces and the scratch directory.
struct TunLab {
    decaps: Vec<DecapProc>,
    lab: Lab,
    _scratch: RunDir,
}

impl TunLab {
    /// Builds it with `reals` reals; `daemon_args` go to `xlb run` after `--no-pin`.
    fn start(tag: &str, reals: usize, daemon_args: &[&str]) -> TunLab {
        Self::start_with(tag, reals, daemon_args, &[])
    }

    /// [`TunLab::start`] with `decap_args` for every real's `xlb decap`.
    fn start_with(tag: &str, reals: usize, daemon_args: &[&str], decap_args: &[&str]) -> TunLab {
        require_root();
        let topo = balanced_topology(&unique_prefix(tag), reals);
        let scratch = RunDir::new(&format!("xlb-{}-rs", topo.prefix()));
        let mut decaps = Vec::new();
        let mut servers: Vec<Proc> = Vec::new();
        for (i, real) in topo.reals.iter().enumerate() {
            unprepare_real(real);
            let state = file_in(&scratch, &format!("{}.json", real_name(i)));
            let vip6 = VIP6.to_string();
            let vip4 = VIP.to_string();
            let args = [
                "realserver",
                "setup",
                "--vip",
                &vip4,
                "--vip",
                &vip6,
                "--state",
                &state,
            ];
            xlb_in(&real.ns, &args);
            decaps.push(DecapProc::start(real, decap_args));
            servers.push(start_real(&real.ns, &real_name(i), &SERVER_ARGS));
        }
        let args: Vec<&str> = std::iter::once("--no-pin")
            .chain(daemon_args.iter().copied())
            .collect();
        let daemon = Daemon::start_with(&topo.lb.ns, "eth0", &args);
        TunLab {
            decaps,
            lab: Lab {
                daemon,
                servers,
                topo,
            },
            _scratch: scratch,
        }
    }

    /// Stops every decapsulator and returns their exit reports, in real order.
    fn decap_counters(&mut self) -> Vec<BTreeMap<String, u64>> {
        self.decaps.iter_mut().map(DecapProc::stop).collect()
    }
}

/// Packets of the verdict counter named exactly `name` (`tx_tun`, `drop_too_big`, ...).
fn verdict(stats: &serde_json::Value, name: &str) -> u64 {
    stats["verdicts"]
        .as_array()
        .and_then(|v| v.iter().find(|c| c["name"] == name))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("no verdict {name} in {stats}"))
}

/// Asserts that no drop or abort verdict was counted.
fn assert_no_drops(stats: &serde_json::Value) {
    for c in stats["verdicts"].as_array().expect("verdicts") {
        let name = c["name"].as_str().unwrap_or_default();
        if name.starts_with("drop") || name == "aborted" {
            assert_eq!(c["packets"], 0, "{name} is not zero: {stats}");
        }
    }
}

/// `count` HTTP requests from the client to `target`, one connection each; panics on the
/// first failure.
fn http_requests(lab: &Lab, target: SocketAddr, count: usize) -> Vec<HttpAnswer> {
    lab.topo.client.ns.run_in(|| {
        (0..count)
            .map(|i| {
                http_get(target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("request {i} of {count} to {target}: {e}"))
            })
            .collect()
    })
}

/// Answers per real name; asserts every body is complete.
fn per_real(answers: &[HttpAnswer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        assert_eq!(a.body_bytes, BODY_BYTES, "a truncated body from {}", a.real);
        *counts.entry(a.real.clone()).or_default() += 1;
    }
    counts
}

/// Asserts each of the first `reals` reals answered at least a fifth of `answers`.
fn assert_fair_spread(answers: &[HttpAnswer], reals: usize) {
    let counts = per_real(answers);
    for i in 0..reals {
        let got = counts.get(&real_name(i)).copied().unwrap_or(0);
        assert!(
            got * 5 >= answers.len(),
            "{} answered {got} of {} connections, under 20%: {counts:?}",
            real_name(i),
            answers.len()
        );
    }
}

/// Asserts the replies' bytes never crossed the balancer: the client received all the
/// bodies while the balancer received a small fraction of that.
fn assert_direct_return(lb: &LinkCounters, client: &LinkCounters, connections: usize) {
    let reply_bytes = (connections * BODY_BYTES) as u64;
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
}

/// The real that `xlb simulate SERVICE --src SRC` names.
fn simulated(lab: &Lab, service: &str, src: SocketAddr) -> IpAddr {
    let src = src.to_string();
    let out = lab.daemon.cli_ok(&["simulate", service, "--src", &src]);
    out.trim()
        .strip_prefix(&format!("{src} -> {service} goes to real "))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `xlb simulate` answer: {out:?}"))
}

/// The name (`rsN`) of the real whose IPv4 or IPv6 address is `addr`.
fn name_of(lab: &Lab, addr: IpAddr) -> String {
    let i = lab
        .topo
        .reals
        .iter()
        .position(|h| IpAddr::V4(h.ipv4) == addr || IpAddr::V6(h.ipv6) == addr)
        .unwrap_or_else(|| panic!("{addr} is not one of the reals"));
    real_name(i)
}

/// Asserts every decapsulator counted no malformed, foreign or aborted tunnel packet and
/// decapsulated `kind` packets for the reals that answered; returns the total of `kind`.
fn assert_decapsulated(
    counters: &[BTreeMap<String, u64>],
    kind: &str,
    answered: &BTreeMap<String, usize>,
) -> u64 {
    let get = |c: &BTreeMap<String, u64>, name: &str| {
        c.get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in the decap report {c:?}"))
    };
    let mut total = 0;
    for (i, c) in counters.iter().enumerate() {
        for bad in ["pass_not_local", "pass_malformed", "aborted"] {
            assert_eq!(
                get(c, bad),
                0,
                "{}'s decap counted {bad}: {c:?}",
                real_name(i)
            );
        }
        let got = get(c, kind);
        if answered.contains_key(&real_name(i)) {
            assert!(
                got > 0,
                "{} answered but its decap counted no {kind}: {c:?}",
                real_name(i)
            );
        }
        total += got;
    }
    total
}

/// Lets the last FINs and ACKs cross the balancer before counters are read.
fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn ipip_tunnel_reaches_every_real_and_replies_bypass_the_balancer() {
    // Outer sources spread over a prefix by flow hash: the reals' decap must not care.
    let mut tun = TunLab::start("tt", 3, &["--tunnel-src", "192.0.2.0/24"]);
    let lab = &tun.lab;
    lab.daemon
        .cli_ok(&["vip", "add", TCP_SERVICE, "--forward", "tun"]);
    for real in &lab.topo.reals {
        lab.daemon
            .cli_ok(&["real", "add", TCP_SERVICE, &real.ipv4.to_string()]);
    }
    let lb_before = LinkCounters::read(&lab.topo.lb);
    let client_before = LinkCounters::read(&lab.topo.client);
    let stats_before = stats(lab);
    let tap = FrameTap::start(&lab.topo.client, VIP);

    let answers = http_requests(lab, SocketAddr::from((VIP, 80)), CONNECTIONS);
    settle();
    let frames = tap.finish();
    let lb = LinkCounters::read(&lab.topo.lb).since(&lb_before);
    let client = LinkCounters::read(&lab.topo.client).since(&client_before);
    let stats = stats(lab);

    assert_fair_spread(&answers, lab.topo.reals.len());
    assert_direct_return(&lb, &client, CONNECTIONS);
    // Replies come from the reals' MACs, never the balancer's.
    for (mac, count) in &frames.from_peer {
        assert!(
            lab.topo.reals.iter().any(|r| r.mac == *mac),
            "{count} frames from {VIP} carried source MAC {} (balancer: {}), not a real's",
            fmt_mac(mac),
            fmt_mac(&lab.topo.lb.mac)
        );
    }

    // Everything the client sent to the VIP left the balancer in a tunnel, none by DR.
    let tunnelled = verdict(&stats, "tx_tun") - verdict(&stats_before, "tx_tun");
    assert!(
        tunnelled >= frames.to_peer,
        "tx_tun grew by {tunnelled}, the client sent {} packets to {VIP}: {stats}",
        frames.to_peer
    );
    assert_eq!(verdict(&stats, "tx_dr"), 0, "a TUN VIP used DR: {stats}");
    assert_no_drops(&stats);

    // And every tunnelled packet was decapsulated on a real.
    let answered = per_real(&answers);
    let counters = tun.decap_counters();
    let decapsulated = assert_decapsulated(&counters, "decap_ipip", &answered);
    assert_eq!(
        decapsulated, tunnelled,
        "the balancer tunnelled {tunnelled} packets, the reals decapsulated {decapsulated}: \
         {counters:?}"
    );
    for c in &counters {
        assert_eq!(c["decap_ip6ip6"] + c["decap_4in6"], 0, "odd tunnels: {c:?}");
    }
}

/// Configures `service` in TUN mode over the reals' IPv6 addresses, sends
/// CONNECTIONS HTTP requests to `target` and checks what every tunnel test
/// checks: a fair spread, direct return, no drops, and every tunnelled packet
/// decapsulated on a real by `decap_counter`. Returns the balancer's stats.
fn tunnel_to_ipv6_reals(
    tun: &mut TunLab,
    service: &str,
    target: SocketAddr,
    decap_counter: &str,
) -> serde_json::Value {
    let lab = &tun.lab;
    lab.daemon
        .cli_ok(&["vip", "add", service, "--forward", "tun"]);
    for real in &lab.topo.reals {
        lab.daemon
            .cli_ok(&["real", "add", service, &real.ipv6.to_string()]);
    }
    let lb_before = LinkCounters::read(&lab.topo.lb);
    let client_before = LinkCounters::read(&lab.topo.client);

    let answers = http_requests(lab, target, CONNECTIONS);
    settle();
    let lb = LinkCounters::read(&lab.topo.lb).since(&lb_before);
    let client = LinkCounters::read(&lab.topo.client).since(&client_before);
    let stats = stats(lab);

    assert_fair_spread(&answers, lab.topo.reals.len());
    assert_direct_return(&lb, &client, CONNECTIONS);
    assert_no_drops(&stats);
    let tunnelled = verdict(&stats, "tx_tun");
    let answered = per_real(&answers);
    let counters = tun.decap_counters();
    let decapsulated = assert_decapsulated(&counters, decap_counter, &answered);
    assert_eq!(
        decapsulated, tunnelled,
        "the balancer tunnelled {tunnelled} packets, the reals decapsulated {decapsulated}: \
         {counters:?}"
    );
    stats
}

#[test]
fn ip6ip6_tunnel_carries_ipv6_clients_to_ipv6_reals() {
    let mut tun = TunLab::start("ts", 3, &["--tunnel-src6", "2001:db8:ff::/96"]);
    let stats = tunnel_to_ipv6_reals(
        &mut tun,
        TCP6_SERVICE,
        SocketAddr::from((VIP6, 80)),
        "decap_ip6ip6",
    );
    let tunnelled = verdict(&stats, "tx_tun");
    assert!(
        tunnelled >= (CONNECTIONS * 4) as u64,
        "tx_tun is {tunnelled} after {CONNECTIONS} connections: {stats}"
    );
}

#[test]
fn ipv4_vip_tunnels_to_ipv6_reals_in_4in6() {
    // No --tunnel-src6: the outer source is the balancer's own IPv6 address.
    let mut tun = TunLab::start("tf", 3, &[]);
    tunnel_to_ipv6_reals(
        &mut tun,
        TCP_SERVICE,
        SocketAddr::from((VIP, 80)),
        "decap_4in6",
    );
}

#[test]
fn realserver_setup_prepares_the_host_and_teardown_restores_it() {
    require_root();
    let ns = Netns::new(&format!("{}-rs", unique_prefix("tr")));
    let scratch = RunDir::new(&format!("xlb-{}", ns.name()));
    let state = file_in(&scratch, "rs.json");
    ns.ip("link set dev lo up");
    // A host as it might be found: one VIP already on lo by hand, stock ARP behaviour,
    // strict reverse-path filtering.
    let by_hand = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11));
    ns.ip(&format!("addr add {by_hand}/32 dev lo"));
    // And one with a prefix of its own: it is on lo, so setup leaves it alone too.
    let wide = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 12));
    ns.ip(&format!("addr add {wide}/24 dev lo"));
    let before = stock_setup_sysctls(&ns);
    let lo_before = lo_prefixes(&ns);
    let bin = xlb_bin();
    let bin = bin.to_str().expect("UTF-8 path");

    // An address that can never be a VIP is bad input, refused before anything
    // changes (a loopback VIP once took 127.0.0.1/8 off lo at teardown).
    for json in [false, true] {
        let mut argv = vec![bin, "realserver", "setup", "--vip", "203.0.113.10"];
        argv.extend(["--vip", "127.0.0.1", "--state", &state]);
        if json {
            argv.push("--json");
        }
        let out = ns.try_exec(&argv);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "setup --vip 127.0.0.1: {stderr}"
        );
        let message = if json { stdout.clone() } else { stderr.clone() };
        assert!(
            message.contains("'127.0.0.1' for '--vip")
                && message.contains("a loopback address (127.0.0.0/8) never reaches the wire"),
            "setup --vip 127.0.0.1 does not name the flag and why: {message}"
        );
        if json {
            assert_eq!(stderr, "", "setup --json: stderr");
        }
    }
    assert_eq!(lo_prefixes(&ns), lo_before, "a refused setup changed lo");
    let unchanged = setup_sysctls(&ns);
    assert_eq!(unchanged, before, "a refused setup changed the sysctls");
    assert!(
        !std::path::Path::new(&state).exists(),
        "a refused setup wrote its state file"
    );

    let argv = [
        bin,
        "realserver",
        "setup",
        "--vip",
        "203.0.113.10",
        "--vip",
        "2001:db8:203::10",
        "--vip",
        "203.0.113.11",
        "--vip",
        "203.0.113.12",
        "--state",
        &state,
    ];
    let done = ns.try_exec(&argv);
    let out = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(done.status.success(), "setup failed: {done:?}");
    // Only results on stdout; nothing on stderr (no library noise either).
    assert_eq!(
        String::from_utf8_lossy(&done.stderr),
        "",
        "setup wrote to stderr"
    );
    let after = setup_sysctls(&ns);
    assert_eq!(after, ["1", "2", "2", "2"], "sysctls after setup ({out})");
    let lo = lo_addrs(&ns);
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6), by_hand] {
        assert!(lo.contains(&vip), "{vip} is not on lo after setup: {lo:?}");
    }

    // Setup again is harmless (a unit restarted); teardown still restores the originals.
    xlb_in(
        &ns,
        &[
            "realserver",
            "setup",
            "--vip",
            "203.0.113.10",
            "--state",
            &state,
        ],
    );
    let out = xlb_in(&ns, &["realserver", "teardown", "--state", &state]);
    let restored = setup_sysctls(&ns);
    assert_eq!(restored, before, "sysctls after teardown ({out})");
    // The VIPs setup added are gone; the ones that were there before stay,
    // with their own prefixes.
    assert_eq!(lo_prefixes(&ns), lo_before, "lo after teardown ({out})");
    assert!(
        !std::path::Path::new(&state).exists(),
        "teardown left its state file {state}"
    );

    // A second teardown has nothing to undo and says so.
    let out = ns.try_exec(&[bin, "realserver", "teardown", "--state", &state]);
    assert!(!out.status.success(), "a second teardown succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no realserver state"),
        "a second teardown did not explain itself: {stderr}"
    );
}

/// A setup that fails half-way (here the last sysctl cannot be written: it is
/// bind-mounted read-only for that one command) leaves the host as it found it:
/// the VIPs it had put on `lo` are gone again, the sysctls it had already written
/// have their old values back, and no state file is written.
#[test]
fn realserver_setup_that_fails_half_way_undoes_what_it_did() {
    require_root();
    let ns = Netns::new(&format!("{}-rs", unique_prefix("tu")));
    let scratch = RunDir::new(&format!("xlb-{}", ns.name()));
    let state = file_in(&scratch, "rs.json");
    ns.ip("link set dev lo up");
    let before = stock_setup_sysctls(&ns);
    let lo_before = lo_prefixes(&ns);
    let bin = xlb_bin();
    let bin = bin.to_str().expect("UTF-8 path");
    // A state file that is not one is bad input, refused before anything changes.
    let corrupt = file_in(&scratch, "corrupt.json");
    std::fs::write(&corrupt, "{bad").expect("write");
    let out = ns.try_exec(&[
        bin,
        "realserver",
        "setup",
        "--vip",
        "203.0.113.10",
        "--state",
        &corrupt,
    ]);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr)),
        (
            Some(2),
            format!(
                "error: {corrupt} is not a realserver state file: key must be a string at line 1 \
                 column 2\n"
            )
            .into()
        ),
        "setup with a corrupt state file"
    );
    assert_eq!(lo_prefixes(&ns), lo_before, "a refused setup changed lo");
    // `ip netns exec` gives its command a mount namespace of its own: the
    // read-only bind mount lives and dies with this one shell.
    let locked = "/proc/sys/net/ipv4/conf/lo/rp_filter";
    let script = format!(
        "mount --bind -o ro {locked} {locked} && exec {bin} realserver setup \
         --vip 203.0.113.10 --vip 2001:db8:203::10 --state {state}"
    );
    let out = ns.try_exec(&["sh", "-c", &script]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "setup with {locked} read-only: {stderr}"
    );
    assert_eq!(
        lo_prefixes(&ns),
        lo_before,
        "a failed setup left VIPs on lo"
    );
    let after = setup_sysctls(&ns);
    assert_eq!(after, before, "a failed setup left sysctls changed");
    assert!(
        !std::path::Path::new(&state).exists(),
        "a failed setup wrote its state file"
    );
    assert_eq!(
        stderr,
        "error: setting sysctl net/ipv4/conf/lo/rp_filter=2: Read-only file system (os error \
         30); nothing was changed\n",
        "the failed setup says what failed and that it undid the rest"
    );
}

/// Three datagrams from each of `sources` client ports starting at `first_port` to the
/// UDP service, one socket per port; checks every answer comes from the VIP with the
/// payload echoed and that each flow stayed on one real. Returns (port, real name).
fn udp_flows(lab: &Lab, first_port: u16, sources: u16) -> Vec<(u16, String)> {
    let to = SocketAddr::from((VIP, UDP_PORT));
    let client = lab.topo.client.ipv4;
    lab.topo.client.ns.run_in(|| {
        (first_port..first_port + sources)
            .map(|port| {
                let from = SocketAddr::from((client, port));
                let socket = UdpSocket::bind(from).unwrap_or_else(|e| panic!("bind {from}: {e}"));
                socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                let mut names = BTreeSet::new();
                for n in 0..3 {
                    let payload = format!("port {port} datagram {n}");
                    socket
                        .send_to(payload.as_bytes(), to)
                        .unwrap_or_else(|e| panic!("send from {from}: {e}"));
                    let mut buf = [0u8; 256];
                    let (len, replier) = socket
                        .recv_from(&mut buf)
                        .unwrap_or_else(|e| panic!("no answer to {payload:?}: {e}"));
                    assert_eq!(
                        replier, to,
                        "{payload:?} answered from {replier}, not the VIP"
                    );
                    let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
                    let (name, echoed) = reply
                        .split_once(' ')
                        .unwrap_or_else(|| panic!("odd UDP answer {reply:?}"));
                    assert_eq!(echoed, payload, "UDP echo mangled");
                    names.insert(name.to_owned());
                }
                assert_eq!(
                    names.len(),
                    1,
                    "the flow from {from} hit several reals: {names:?}"
                );
                (port, names.into_iter().next().expect("one name"))
            })
            .collect()
    })
}

/// Asserts the UDP flows spread fairly over the reals and went where `xlb simulate`
/// says (a sample of them).
fn assert_udp_spread(lab: &Lab, flows: &[(u16, String)], mode: &str) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, name) in flows {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    for i in 0..lab.topo.reals.len() {
        let got = counts.get(real_name(i).as_str()).copied().unwrap_or(0);
        assert!(
            got * 5 >= flows.len(),
            "{mode}: {} answered {got} of {} UDP flows, under 20%: {counts:?}",
            real_name(i),
            flows.len()
        );
    }
    let client = lab.topo.client.ipv4;
    for (port, name) in flows.iter().step_by(10) {
        let expected = name_of(lab, simulated(lab, UDP_SERVICE, (client, *port).into()));
        assert_eq!(*name, expected, "{mode}: UDP flow from port {port}");
    }
}

#[test]
fn udp_echo_from_many_source_ports_spreads_and_replies_come_from_the_vip() {
    const SOURCES: u16 = 120;
    let mut tun = TunLab::start("tu", 3, &[]);
    let lab = &tun.lab;
    let add_reals = || {
        for real in &lab.topo.reals {
            lab.daemon
                .cli_ok(&["real", "add", UDP_SERVICE, &real.ipv4.to_string()]);
        }
    };

    // Direct return first: the reals' decapsulators pass plain VIP packets untouched.
    lab.daemon.cli_ok(&["vip", "add", UDP_SERVICE]);
    add_reals();
    let flows = udp_flows(lab, 41_000, SOURCES);
    assert_udp_spread(lab, &flows, "DR");
    let dr = stats(lab);
    let datagrams = u64::from(SOURCES) * 3;
    assert!(
        verdict(&dr, "tx_dr") >= datagrams,
        "tx_dr is below the {datagrams} datagrams sent: {dr}"
    );

    // The same service through IPIP tunnels.
    lab.daemon.cli_ok(&["vip", "del", UDP_SERVICE]);
    lab.daemon
        .cli_ok(&["vip", "add", UDP_SERVICE, "--forward", "tun"]);
    add_reals();
    let flows = udp_flows(lab, 42_000, SOURCES);
    assert_udp_spread(lab, &flows, "TUN");
    let both = stats(lab);
    let tunnelled = verdict(&both, "tx_tun");
    assert!(
        tunnelled >= datagrams,
        "tx_tun is below the {datagrams} datagrams sent: {both}"
    );
    assert_no_drops(&both);

    let answered: BTreeMap<String, usize> = flows.iter().map(|(_, n)| (n.clone(), 1)).collect();
    let counters = tun.decap_counters();
    let decapsulated = assert_decapsulated(&counters, "decap_ipip", &answered);
    assert_eq!(
        decapsulated, tunnelled,
        "the balancer tunnelled {tunnelled} datagrams, the reals decapsulated {decapsulated}"
    );
    let passed: u64 = counters.iter().map(|c| c["pass_not_tunnel"]).sum();
    assert!(
        passed >= datagrams,
        "the decapsulators passed {passed} plain packets, fewer than the {datagrams} DR datagrams"
    );
}

/// Keep-alive connections opened in the client's namespace, one GET each to learn their
/// real.
fn open_conns(lab: &Lab, count: usize) -> Vec<(KeepAlive, HttpAnswer)> {
    let target = SocketAddr::from((VIP, 80));
    lab.topo.client.ns.run_in(|| {
        (0..count)
            .map(|i| {
                let mut conn = KeepAlive::connect(target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("keep-alive connection {i}: {e}"));
                let first = conn
                    .get()
                    .unwrap_or_else(|e| panic!("first request on connection {i}: {e}"));
                (conn, first)
            })
            .collect()
    })
}

/// `rounds` more requests on every open connection, a little apart (about a second in
/// all); panics unless each is answered by the connection's first real.
fn keep_using(conns: &mut [(KeepAlive, HttpAnswer)], rounds: usize, why: &str) {
    for round in 0..rounds {
        for (conn, first) in conns.iter_mut() {
            let (port, real) = (first.local_port, &first.real);
            let answer = conn
                .get()
                .unwrap_or_else(|e| panic!("{why}: round {round} on port {port}: {e}"));
            assert_eq!(
                answer.real, *real,
                "{why}: the connection from port {port} moved from {real} to {}",
                answer.real
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn established_connections_survive_adding_and_draining_reals() {
    require_root();
    let lab = Lab::start("tk", 4, &SERVER_ARGS);
    lab.daemon.cli_ok(&["vip", "add", TCP_SERVICE]);
    // Three of the four reals at first.
    for real in &lab.topo.reals[..3] {
        lab.daemon
            .cli_ok(&["real", "add", TCP_SERVICE, &real.ipv4.to_string()]);
    }
    let client = lab.topo.client.ipv4;
    let mut conns = open_conns(&lab, 40);
    keep_using(&mut conns, 1, "before any change");

    // A fourth real joins: Maglev now sends about a quarter of these 5-tuples to it, but
    // the open connections are tracked and stay where they are.
    let rs4 = lab.topo.reals[3].ipv4;
    lab.daemon
        .cli_ok(&["real", "add", TCP_SERVICE, &rs4.to_string()]);
    let moved: Vec<u16> = conns
        .iter()
        .filter(|(_, first)| {
            let now = simulated(&lab, TCP_SERVICE, (client, first.local_port).into());
            name_of(&lab, now) != first.real
        })
        .map(|(_, first)| first.local_port)
        .collect();
    assert!(
        !moved.is_empty(),
        "adding rs4 moved none of the 40 open 5-tuples in Maglev: the test proves nothing"
    );
    eprintln!(
        "adding rs4 gave {} of the {} open 5-tuples another real in Maglev: {moved:?}",
        moved.len(),
        conns.len()
    );
    keep_using(&mut conns, 6, "after adding rs4");

    // New connections follow the new table, rs4 included.
    let target = SocketAddr::from((VIP, 80));
    let fresh = http_requests(&lab, target, 60);
    for a in &fresh {
        let expected = name_of(
            &lab,
            simulated(&lab, TCP_SERVICE, (client, a.local_port).into()),
        );
        assert_eq!(
            a.real, expected,
            "new connection from port {}",
            a.local_port
        );
    }
    let fresh_counts = per_real(&fresh);
    assert!(
        fresh_counts.contains_key("rs4"),
        "no new connection reached rs4: {fresh_counts:?}"
    );

    // Drain the real that serves the first open connection: it keeps its connections
    // and gets no new ones.
    let drained = conns[0].1.real.clone();
    let drained_addr = lab
        .topo
        .host(&drained)
        .unwrap_or_else(|| panic!("no host {drained}"))
        .ipv4;
    lab.daemon
        .cli_ok(&["real", "drain", TCP_SERVICE, &drained_addr.to_string()]);
    keep_using(&mut conns, 6, &format!("after draining {drained}"));
    let fresh = http_requests(&lab, target, 60);
    let fresh_counts = per_real(&fresh);
    assert!(
        !fresh_counts.contains_key(&drained),
        "new connections reached the drained {drained}: {fresh_counts:?}"
    );
    assert_eq!(
        fresh_counts.len(),
        3,
        "new connections should spread over the three other reals: {fresh_counts:?}"
    );

    let stats = stats(&lab);
    assert_no_drops(&stats);
    let hits = stats["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "conntrack_hit"))
        .and_then(|e| e["count"].as_u64())
        .unwrap_or_else(|| panic!("no conntrack_hit in {stats}"));
    assert!(hits > 0, "no conntrack hit counted: {stats}");
}

#[test]
fn ipv6_direct_return_reaches_every_real() {
    require_root();
    let lab = Lab::start("tv", 3, &SERVER_ARGS);
    lab.topo.add_vip_on_reals(IpAddr::V6(VIP6));
    lab.daemon.cli_ok(&["vip", "add", TCP6_SERVICE]);
    for real in &lab.topo.reals {
        lab.daemon
            .cli_ok(&["real", "add", TCP6_SERVICE, &real.ipv6.to_string()]);
    }
    let lb_before = LinkCounters::read(&lab.topo.lb);
    let client_before = LinkCounters::read(&lab.topo.client);

    let answers = http_requests(&lab, SocketAddr::from((VIP6, 80)), CONNECTIONS);
    settle();
    let lb = LinkCounters::read(&lab.topo.lb).since(&lb_before);
    let client = LinkCounters::read(&lab.topo.client).since(&client_before);
    let stats = stats(&lab);

    assert_fair_spread(&answers, lab.topo.reals.len());
    assert_direct_return(&lb, &client, CONNECTIONS);
    let forwarded = verdict(&stats, "tx_dr");
    assert!(
        forwarded >= (CONNECTIONS * 4) as u64,
        "tx_dr is {forwarded} after {CONNECTIONS} connections: {stats}"
    );
    assert_eq!(verdict(&stats, "tx_tun"), 0, "a DR VIP tunnelled: {stats}");
    assert_no_drops(&stats);
}

/// `POST /` with a `body`-byte body on a fresh connection; `Ok` once a 200 answer head
/// arrives.
fn http_post(to: SocketAddr, body: usize, timeout: Duration) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)
        .map_err(|e| format!("connect {to}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {to}\r\nContent-Length: {body}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&vec![b'u'; body]))
        .map_err(|e| format!("upload to {to}: {e}"))?;
    let mut answer = [0u8; 12];
    stream
        .read_exact(&mut answer)
        .map_err(|e| format!("no answer from {to} after the upload: {e}"))?;
    if &answer != b"HTTP/1.1 200" {
        return Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&answer)
        ));
    }
    Ok(())
}

#[test]
fn tunnel_uploads_at_full_mss_shrink_by_icmp_too_big_or_fit_the_advertised_mss() {
    let tun = TunLab::start("tm", 1, &[]);
    let lab = &tun.lab;
    lab.daemon
        .cli_ok(&["vip", "add", TCP_SERVICE, "--forward", "tun"]);
    lab.daemon
        .cli_ok(&["vip", "add", TCP6_SERVICE, "--forward", "tun"]);
    let real = &lab.topo.reals[0];
    lab.daemon
        .cli_ok(&["real", "add", TCP_SERVICE, &real.ipv4.to_string()]);
    lab.daemon
        .cli_ok(&["real", "add", TCP6_SERVICE, &real.ipv6.to_string()]);
    const UPLOAD: usize = 100_000;
    let targets = [SocketAddr::from((VIP, 80)), SocketAddr::from((VIP6, 80))];

    // With the stock MSS (MTU - 40 / - 60) the client's full-size segments are 1500 bytes;
    // with the 20 / 40-byte outer header they no longer fit. The balancer answers them
    // with ICMP "fragmentation needed" / "packet too big" from the VIP, the client's
    // path MTU discovery shrinks its segments, and the upload goes through.
    for target in targets {
        let before = verdict(&stats(lab), "tx_icmp_too_big_reply");
        lab.topo
            .client
            .ns
            .run_in(|| http_post(target, UPLOAD, TIMEOUT))
            .unwrap_or_else(|e| panic!("full-MSS upload through the tunnel: {e}"));
        let replied = verdict(&stats(lab), "tx_icmp_too_big_reply") - before;
        assert!(
            replied > 0,
            "upload to {target} went through without a too-big reply: it never was too big?"
        );
    }
    // Forget the path MTU the client learnt, so the next uploads start at full size.
    lab.topo.client.ns.ip("route flush cache");
    lab.topo.client.ns.ip("-6 route flush cache");

    // The remedy docs/operations.md gives: the real advertises an MSS with room for the
    // outer header on its route to the clients.
    real.ns.ip(&format!(
        "route change 198.51.100.0/24 dev eth0 proto kernel scope link src {} advmss 1440",
        real.ipv4
    ));
    real.ns
        .ip("-6 route change 2001:db8:100::/64 dev eth0 proto kernel metric 256 advmss 1400");
    let before = stats(lab);
    for target in targets {
        lab.topo
            .client
            .ns
            .run_in(|| http_post(target, UPLOAD, TIMEOUT))
            .unwrap_or_else(|e| panic!("upload with the advertised MSS: {e}"));
    }
    let after = stats(lab);
    for name in ["drop_too_big", "tx_icmp_too_big_reply"] {
        assert_eq!(
            verdict(&after, name),
            verdict(&before, name),
            "packets too big for the tunnel with the advertised MSS ({name}): {after}"
        );
    }
}

/// Adds the TCP VIP in TUN mode with the lab's first real; returns the VIP's address.
fn tun_vip_to_first_real(lab: &Lab) -> SocketAddr {
    lab.daemon
        .cli_ok(&["vip", "add", TCP_SERVICE, "--forward", "tun"]);
    let real = &lab.topo.reals[0];
    lab.daemon
        .cli_ok(&["real", "add", TCP_SERVICE, &real.ipv4.to_string()]);
    SocketAddr::from((VIP, 80))
}

/// `xlb decap stats --json --pin-dir DIR`, run as an operator would on the real
/// server (the pin directory is a bpffs every namespace shares).
fn decap_stats(pin_dir: &str) -> serde_json::Value {
    let out = std::process::Command::new(xlb_bin())
        .args(["decap", "stats", "--json", "--pin-dir", pin_dir])
        .output()
        .expect("running xlb decap stats");
    assert!(
        out.status.success(),
        "xlb decap stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("xlb decap stats --json prints JSON")
}

/// `xlb decap stats` where nothing is pinned fails saying each cause once: what it
/// could not do, the map, the system call, the OS error (aya's map error and
/// ours once printed the system call twice).
#[test]
fn decap_stats_with_nothing_pinned_says_each_cause_once() {
    require_root();
    let dir = RunDir::new(&format!("xlb-{}-nopins", unique_prefix("tn")));
    let pin_dir = path_str(dir.path());
    let out = std::process::Command::new(xlb_bin())
        .args(["decap", "stats", "--pin-dir", pin_dir])
        .output()
        .expect("running xlb decap stats");
    assert_eq!(
        out.status.code(),
        Some(1),
        "xlb decap stats with nothing pinned"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "error: cannot read the decap counters under {pin_dir} (is `xlb decap` running with \
             this --pin-dir? run as root): map XLB_DECAP_STATS: `BPF_OBJ_GET` failed: No such \
             file or directory (os error 2)\n"
        )
    );
}

fn decap_packets(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no decap counter {name} in {stats}"))
}

#[test]
fn pinned_decap_keeps_running_and_accepts_only_the_balancers_sources() {
    let pins = PinnedRun::new(&unique_prefix("dk"));
    let pin_dir = pins.pin_dir().to_str().expect("UTF-8 path").to_owned();
    let mut tun = TunLab::start_with(
        "dk",
        1,
        &["--tunnel-src", "192.0.2.0/24"],
        &["--pin-dir", &pin_dir, "--allow-src", "192.0.2.0/24"],
    );
    let lab = &tun.lab;
    let target = tun_vip_to_first_real(lab);
    http_requests(lab, target, 3);
    let decapsulated = decap_packets(&decap_stats(&pin_dir), "decap_ipip");
    assert!(
        decapsulated >= 3,
        "xlb decap stats does not show the decapsulated requests"
    );

    // While `xlb decap` runs on the pins, a teardown is refused and removes
    // nothing: the decapsulator goes on decapsulating.
    let pinned = pins.pins();
    let out = decap_teardown(&pin_dir, &[]);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr)),
        (
            Some(4),
            format!(
                "error: a running xlb decap uses the pins under {pin_dir}/v{DECAP_LAYOUT_VERSION}: stop \
                 it first (`systemctl stop xlb-decap`), or pass --force to detach the \
                 decapsulator anyway; nothing was removed\n"
            )
            .into()
        ),
        "xlb decap teardown under a running xlb decap"
    );
    assert_eq!(pins.pins(), pinned, "a refused teardown removed pins");
    // So is a second `xlb decap` on the same pins, before it loads anything.
    let bin = xlb_bin();
    let second = [
        path_str(&bin),
        "decap",
        "--iface",
        "eth0",
        "--pin-dir",
        &pin_dir,
    ];
    let out = lab.topo.reals[0].ns.try_exec(&second);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr)),
        (
            Some(1),
            format!(
                "error: another xlb decap is running on the pin directory \
                 {pin_dir}/v{DECAP_LAYOUT_VERSION}; stop it first, or use another --pin-dir\n"
            )
            .into()
        ),
        "a second xlb decap on the same pins"
    );
    http_requests(lab, target, 3);
    assert!(
        decap_packets(&decap_stats(&pin_dir), "decap_ipip") >= decapsulated + 3,
        "no longer decapsulating after a refused teardown"
    );

    // Stopping `xlb decap` leaves the pinned decapsulator running.
    tun.decap_counters();
    let lab = &tun.lab;
    http_requests(lab, target, 3);

    // A restart swaps the program on the pinned link and replaces the source
    // list: with a prefix that is not the balancer's, its tunnels are dropped.
    let real = &lab.topo.reals[0];
    let restarted = DecapProc::start(
        real,
        &["--pin-dir", &pin_dir, "--allow-src", "203.0.113.0/24"],
    );
    let before = decap_packets(&decap_stats(&pin_dir), "drop_not_allowed_src");
    let refused = lab
        .topo
        .client
        .ns
        .run_in(|| http_get(target, Duration::from_secs(1)));
    assert!(
        refused.is_err(),
        "a tunnel from an unlisted source was decapsulated"
    );
    assert!(
        decap_packets(&decap_stats(&pin_dir), "drop_not_allowed_src") > before,
        "no drop_not_allowed_src counted"
    );

    // `--force` detaches it from under the running `xlb decap`.
    let out = decap_teardown(&pin_dir, &["--force"]);
    assert!(
        out.status.success(),
        "xlb decap teardown --force failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        pins.pins().is_empty(),
        "pins left after teardown: {:?}",
        pins.pins()
    );
    let link = String::from_utf8_lossy(&real.ns.ip("-d link show eth0").stdout).into_owned();
    assert!(
        !link.contains("xdp"),
        "the real's eth0 still has an XDP program after xlb decap teardown --force: {link}"
    );
    // That `xlb decap` stops on its own: no NIC runs the program it reports.
    let mut restarted = restarted;
    let (status, log) = restarted.wait_exit();
    assert!(
        status.success(),
        "the detached xlb decap exited {status}: {log}"
    );
    assert!(
        log.contains("the decapsulator was detached from under this xlb decap"),
        "the detached xlb decap's log does not say why it stopped: {log}"
    );
    let out = decap_teardown(&pin_dir, &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("removed 0 pins under {pin_dir}\n"),
        "a second teardown"
    );
}

/// `xlb decap teardown --pin-dir DIR EXTRA...`, run as an operator would on the real.
fn decap_teardown(pin_dir: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(xlb_bin())
        .args(["decap", "teardown", "--pin-dir", pin_dir])
        .args(extra)
        .output()
        .expect("running xlb decap teardown")
}

/// The half-open (SYN-RECV) connections to `port` in `ns`.
fn half_open(ns: &Netns, port: u16) -> String {
    let out = ns.exec(&[
        "ss",
        "-Htn",
        "state",
        "syn-recv",
        &format!("( sport = :{port} )"),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_real_whose_decap_stops_is_down_via_the_vip_and_still_up_via_its_address() {
    let mut tun = TunLab::start(
        "tv",
        2,
        &[
            "--tunnel-src",
            "192.0.2.0/24",
            "--tunnel-src6",
            "2001:db8:ff::/96",
        ],
    );
    let daemon = &tun.lab.daemon;
    let via_vip = TCP_SERVICE;
    let via_real = "203.0.113.11:80/tcp";
    let nothing_listens = "203.0.113.10:81/tcp";
    for (service, via) in [
        (via_vip, "vip"),
        (via_real, "real"),
        (nothing_listens, "vip"),
    ] {
        let mut args = vec!["vip", "add", service, "--forward", "tun"];
        args.extend(["--check", "tcp", "--check-via", via]);
        args.extend(QUICK_CHECK);
        daemon.cli_ok(&args);
        for real in &tun.lab.topo.reals {
            daemon.cli_ok(&["real", "add", service, &real.ipv4.to_string()]);
        }
    }
    // And an IPv6 VIP on the reals' IPv6 addresses (IP6IP6; answers to the IPv6 socket).
    let mut args = vec!["vip", "add", TCP6_SERVICE, "--forward", "tun"];
    args.extend(["--check", "tcp", "--check-via", "vip"]);
    args.extend(QUICK_CHECK);
    daemon.cli_ok(&args);
    for real in &tun.lab.topo.reals {
        daemon.cli_ok(&["real", "add", TCP6_SERVICE, &real.ipv6.to_string()]);
    }
    let rs1 = IpAddr::V4(tun.lab.topo.reals[0].ipv4);
    let rs2 = IpAddr::V4(tun.lab.topo.reals[1].ipv4);
    let rs1_v6 = IpAddr::V6(tun.lab.topo.reals[0].ipv6);
    let rs2_v6 = IpAddr::V6(tun.lab.topo.reals[1].ipv6);
    // The option is part of the saved desired state.
    let saved = daemon.cli_ok(&["save"]);
    assert_eq!(saved.matches("via: vip").count(), 3, "{saved}");
    assert_eq!(saved.matches("via: real").count(), 1, "{saved}");

    // Every real answers through the tunnel, and on its address.
    for service in [via_vip, via_real] {
        for real in [rs1, rs2] {
            wait_health(
                daemon,
                service,
                real,
                &format!("{real} up for {service}"),
                proven_up,
            );
        }
    }
    for real in [rs1_v6, rs2_v6] {
        wait_health(daemon, TCP6_SERVICE, real, &format!("{real} up"), proven_up);
    }
    // A reset through the tunnel is a refusal, not a timeout.
    let refused = wait_health(daemon, nothing_listens, rs1, "refused on port 81", |h| {
        h["status"]["up"] == false
    });
    assert_eq!(
        refused["status"]["last_error"],
        "connection refused through the tunnel by 198.51.100.11 for 203.0.113.10:81",
        "{refused}"
    );
    // The daemon resets each half-open connection its probes leave on the real.
    wait_until("no half-open probe connection on rs1", || {
        half_open(&tun.lab.topo.reals[0].ns, 80).is_empty()
    });
    // The probes really went through rs1's decapsulator: no client sent anything yet.
    let counters = tun.decaps[0].stop();
    assert!(
        counters["decap_ipip"] >= 3,
        "rs1's decap saw no probes: {counters:?}"
    );

    // Its decap stopped: rs1 is down via the VIP, with the tunnel named, and still up
    // via its address (what `via: real` cannot see).
    let down = wait_health(daemon, via_vip, rs1, "rs1 down via the VIP", |h| {
        h["status"]["up"] == false
    });
    assert_eq!(
        down["status"]["last_error"],
        "no answer through the tunnel from 198.51.100.11 for 203.0.113.10:80 within 150 ms",
        "{down}"
    );
    let down6 = wait_health(
        daemon,
        TCP6_SERVICE,
        rs1_v6,
        "rs1 down via the IPv6 VIP",
        |h| h["status"]["up"] == false,
    );
    assert_eq!(
        down6["status"]["last_error"],
        "no answer through the tunnel from 2001:db8:100::11 for [2001:db8:203::10]:80 within 150 \
         ms",
        "{down6}"
    );
    let probes = real_health(daemon, via_real, rs1)["status"]["probes"]
        .as_u64()
        .expect("probes");
    let up = wait_health(
        daemon,
        via_real,
        rs1,
        "rs1 probed again via its address",
        |h| h["status"]["probes"].as_u64() > Some(probes + 2),
    );
    assert!(proven_up(&up), "via its address rs1 is still up: {up}");
    let listed = real_listed(daemon, via_vip, rs1);
    assert_eq!(
        (&listed["health"], &listed["check"], &listed["via"]),
        (&"DOWN".into(), &"tcp".into(), &"vip".into()),
        "{listed}"
    );
    assert_eq!(
        listed["last_error"], down["status"]["last_error"],
        "{listed}"
    );
    let listed = real_listed(daemon, via_real, rs1);
    assert_eq!(
        (&listed["health"], &listed["via"]),
        (&"up".into(), &"real".into()),
        "{listed}"
    );
    // And no new flow goes to it.
    let answers = http_requests(&tun.lab, SocketAddr::from((VIP, 80)), 30);
    let counts = per_real(&answers);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["rs2"], "{counts:?}");

    // Its decap is back: up again, and it serves.
    tun.decaps[0] = DecapProc::start(&tun.lab.topo.reals[0], &[]);
    let daemon = &tun.lab.daemon;
    wait_health(daemon, via_vip, rs1, "rs1 up again via the VIP", |h| {
        h["status"]["up"] == true
    });
    let answers = http_requests(&tun.lab, SocketAddr::from((VIP, 80)), 40);
    let counts = per_real(&answers);
    assert!(
        counts.contains_key("rs1"),
        "rs1 is back yet unused: {counts:?}"
    );
}

/// The id of the XDP program attached to `eth0` in `ns` (`ip -j -d link show`).
fn xdp_prog_id(ns: &Netns) -> u64 {
    let out = ns.exec(&["ip", "-j", "-d", "link", "show", "eth0"]);
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("ip -j link show prints JSON");
    links[0]["xdp"]["prog"]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no XDP program on eth0: {links}"))
}

/// Pins the endpoint hash and source trie an earlier `xlb decap` pinned next to its
/// counters (layout v3), filled as it filled them, for the upgrade to find.
fn pin_previous_decap_maps(pin_dir: &std::path::Path) -> Vec<String> {
    use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
    let v3 = lb_userspace::pin::PinDir::prepare_layout(pin_dir, DECAP_LAYOUT_VERSION)
        .expect("the v3 pin directory");
    let mut addrs: HashMap<MapData, [u8; 20], u32> =
        HashMap::create(64, 0).expect("creating the old endpoint hash");
    let mut endpoint = [0u8; 20];
    endpoint[..4].copy_from_slice(&[198, 51, 100, 11]);
    endpoint[16] = lb_common::FAMILY_V4;
    addrs.insert(&endpoint, &1, 0).expect("an old endpoint");
    // BPF_F_NO_PREALLOC, which the kernel requires of an LPM trie.
    let mut srcs: LpmTrie<MapData, [u8; 20], u32> =
        LpmTrie::create(64, 1).expect("creating the old source trie");
    srcs.insert(&Key::new(0, [0; 20]), &1, 0)
        .expect("an old /0 source");
    let names = lb_userspace::decap::LEGACY_DECAP_MAPS;
    addrs.pin(v3.map(names[0])).expect("pinning the old hash");
    srcs.pin(v3.map(names[1])).expect("pinning the old trie");
    names.iter().map(|n| format!("v3/{n}")).collect()
}

#[test]
fn decap_restarted_with_other_sources_swaps_them_on_the_link_and_refuses_too_many() {
    let pins = PinnedRun::new(&unique_prefix("ds"));
    let pin_dir = pins.pin_dir().to_str().expect("UTF-8 path").to_owned();
    // An upgrade: the previous version's endpoint and source maps are pinned there.
    let legacy = pin_previous_decap_maps(pins.pin_dir());
    let mut tun = TunLab::start_with(
        "ds",
        1,
        &["--tunnel-src", "192.0.2.0/24"],
        // Not the balancer's prefix: its tunnels are dropped.
        &["--pin-dir", &pin_dir, "--allow-src", "203.0.113.0/24"],
    );
    // The new program is on the link; the maps only the old one read are gone.
    let left = pins.pins();
    assert!(
        legacy.iter().all(|l| !left.contains(l)),
        "the previous version's maps are still pinned: {left:?}"
    );
    assert_eq!(
        left,
        ["v3/XLB_DECAP_STATS", "v3/link"],
        "pins after the upgrade"
    );
    let lab = &tun.lab;
    let target = tun_vip_to_first_real(lab);
    let client = &lab.topo.client.ns;
    let refused = client.run_in(|| http_get(target, Duration::from_secs(1)));
    assert!(
        refused.is_err(),
        "a tunnel from outside --allow-src was decapsulated"
    );
    let dropped = decap_packets(&decap_stats(&pin_dir), "drop_not_allowed_src");
    assert!(dropped > 0, "no drop_not_allowed_src counted");
    let first = xdp_prog_id(&lab.topo.reals[0].ns);
    tun.decap_counters();
    // Its run directory goes before the next one (same name) is made.
    tun.decaps.clear();

    // Restarted with the balancer's prefix: its tunnels now pass, through a new
    // program on the same pinned link, and the counters carry on.
    let lab = &tun.lab;
    let real = &lab.topo.reals[0];
    tun.decaps.push(DecapProc::start(
        real,
        &["--pin-dir", &pin_dir, "--allow-src", "192.0.2.0/24"],
    ));
    let lab = &tun.lab;
    let real = &lab.topo.reals[0];
    let second = xdp_prog_id(&real.ns);
    assert_ne!(first, second, "the restart did not swap the program");
    http_requests(lab, target, 3);
    let stats = decap_stats(&pin_dir);
    assert!(decap_packets(&stats, "decap_ipip") >= 3, "{stats}");
    assert_eq!(
        decap_packets(&stats, "drop_not_allowed_src"),
        dropped,
        "the old drops were kept and nothing more was dropped"
    );
    tun.decap_counters();

    // 65 IPv4 prefixes: refused before anything is loaded, naming the flag and
    // the limit; the running program keeps its sources.
    let lab = &tun.lab;
    let real = &lab.topo.reals[0];
    let mut args = vec![
        "decap".to_owned(),
        "--iface".to_owned(),
        "eth0".to_owned(),
        "--pin-dir".to_owned(),
        pin_dir.clone(),
    ];
    for i in 0..65 {
        args.extend(["--allow-src".to_owned(), format!("198.51.100.{i}/32")]);
    }
    let out = real
        .ns
        .command(xlb_bin().to_str().expect("UTF-8 path"))
        .args(&args)
        .output()
        .expect("running xlb decap");
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        (
            Some(2),
            "error: too many allowed tunnel source prefixes (--allow-src): 65 IPv4 given, the \
             decapsulator holds at most 64 per address family"
        ),
    );
    assert_eq!(xdp_prog_id(&real.ns), second, "the program was replaced");
    http_requests(lab, target, 3);
}
