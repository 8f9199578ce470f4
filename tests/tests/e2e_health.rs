//! netns end-to-end, health checking: real servers that stop, answer 503 or come back,
//! the daemon's probes taking them out of the Maglev table and bringing them back, the
//! avalanche guard, and the operator's overrides, with `xlb run` and the `xlb` CLI as an
//! operator uses them and real HTTP through the XDP program.
//!
//! Needs root (namespaces, XDP, a bpffs mount) and runs one test at a time (`./x test`
//! does both). The binaries come from `XLB_BIN` / `XLB_TESTSRV_BIN`, or from the target
//! directory after `cargo build --workspace --bins`.
//!
//! Probes use short settings (interval 200 ms, timeout 100 ms, rise 2, fall 2) so a
//! verdict takes a fraction of a second; every wait is bounded by [`WAIT`], which a
//! healthy run stays far below.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use xlb_tests::harness::require_root;

use xlb_tests::harness::{
    Daemon, KeepAlive, Lab, PinnedRun, Proc, RunDir, VIP, balanced_topology, http_get, real_name,
    start_real, wait_until,
};
use xlb_tests::netns::{Topology, unique_prefix};

const SERVICE: &str = "203.0.113.10:80/tcp";
const TIMEOUT: Duration = Duration::from_secs(3);

/// Probe settings of every test: an HTTP GET of /health every 200 ms (±10%), 100 ms to
/// answer, 2 failures take a real out, 2 successes bring it back.
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 100;
const RISE: u64 = 2;
const FALL: u64 = 2;
const CHECK: [&str; 12] = [
    "--check",
    "http",
    "--check-path",
    "/health",
    "--check-interval",
    "200",
    "--check-timeout",
    "100",
    "--check-rise",
    "2",
    "--check-fall",
    "2",
];

/// How long a bounded wait for the daemon, a probe verdict or the load may take before
/// the test fails (never a measure of speed).
const WAIT: Duration = Duration::from_secs(30);

/// Where the daemon serves Prometheus metrics, inside the balancer's namespace.
const METRICS_ADDR: &str = "127.0.0.1:9814";

fn target() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// A scratch directory for the `--health-fail-file` switches and YAML files, removed
/// when dropped.
struct Scratch(RunDir);

impl Scratch {
    fn new(prefix: &str) -> Scratch {
        Scratch(RunDir::new(&format!("xlb-health-{prefix}")))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// The file whose existence makes real `i` answer 503 on /health.
    fn fail_file(&self, i: usize) -> PathBuf {
        self.path().join(format!("{}.fail", real_name(i)))
    }
}

/// Makes real `i`'s /health answer 503 (`true`) or 200 again (`false`).
fn set_failing(scratch: &Scratch, i: usize, failing: bool) {
    let file = scratch.fail_file(i);
    if failing {
        std::fs::write(&file, b"")
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", file.display()));
    } else {
        std::fs::remove_file(&file)
            .unwrap_or_else(|e| panic!("cannot remove {}: {e}", file.display()));
    }
}

/// What every real serves: HTTP on port 80 and 8080, /health failing while its switch
/// file exists.
fn server_args(scratch: &Scratch, i: usize) -> Vec<String> {
    let file = scratch.fail_file(i);
    vec![
        "--http".into(),
        "0.0.0.0:80".into(),
        "--http".into(),
        "0.0.0.0:8080".into(),
        "--health-fail-file".into(),
        file.to_str().expect("UTF-8 temp path").into(),
    ]
}

/// Starts (or restarts) real `i`'s server.
fn start_server(lab: &Lab, scratch: &Scratch, i: usize) -> Proc {
    let args = server_args(scratch, i);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_real(&lab.topo.reals[i].ns, &real_name(i), &args)
}

/// A topology of `reals` reals with their servers and `xlb run --no-pin EXTRA...` on
/// the balancer; nothing configured yet.
fn lab(tag: &str, reals: usize, extra: &[&str]) -> (Lab, Scratch) {
    let mut args = vec!["--no-pin"];
    args.extend_from_slice(extra);
    lab_with(&unique_prefix(tag), reals, |topo| {
        Daemon::start_with(&topo.lb.ns, "eth0", &args)
    })
}

/// Like [`lab`] with the daemon `start` starts.
fn lab_with(prefix: &str, reals: usize, start: impl FnOnce(&Topology) -> Daemon) -> (Lab, Scratch) {
    require_root();
    let topo = balanced_topology(prefix, reals);
    let scratch = Scratch::new(topo.prefix());
    // One connection per request: let the client reuse TIME_WAIT ports.
    topo.client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    topo.client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let daemon = start(&topo);
    let mut lab = Lab {
        daemon,
        servers: Vec::new(),
        topo,
    };
    lab.servers = (0..reals)
        .map(|i| start_server(&lab, &scratch, i))
        .collect();
    (lab, scratch)
}

/// `xlb vip add SERVICE` with the HTTP check, then every real.
fn configure(lab: &Lab, service: &str, check: &[&str]) {
    let mut args = vec!["vip", "add", service];
    args.extend_from_slice(check);
    lab.daemon.cli_ok(&args);
    for real in &lab.topo.reals {
        lab.daemon
            .cli_ok(&["real", "add", service, &real.ipv4.to_string()]);
    }
}

fn addr(lab: &Lab, i: usize) -> String {
    IpAddr::V4(lab.topo.reals[i].ipv4).to_string()
}

/// `xlb status --json`.
fn status(daemon: &Daemon) -> serde_json::Value {
    let out = daemon.cli_ok(&["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("xlb status --json: {e}: {out}"))
}

/// One real of one VIP as `xlb status --json` shows it.
#[derive(Debug, Clone)]
struct RealState {
    /// In the live table with this weight (`None`: not in it at all, i.e. disabled).
    in_use: Option<u64>,
    /// The verdict the state holds (`healthy` in the VIP view).
    healthy: bool,
    /// The admin state.
    admin: String,
    /// The probe kind, or `none`.
    check: String,
    /// The engine's verdict, `None` before the first probe or when not probed.
    probe_up: Option<bool>,
    /// Probes run.
    probes: u64,
    /// The last probe error.
    last_error: Option<String>,
    /// New flows sent to it.
    flows: u64,
}

impl RealState {
    /// In the table with a weight, and healthy.
    fn serving(&self) -> bool {
        self.in_use.is_some_and(|w| w > 0) && self.healthy
    }

    /// Taken out by health: weight 0 in the table, verdict down.
    fn removed_by_health(&self) -> bool {
        self.in_use == Some(0) && !self.healthy
    }
}

/// The VIP `service` in a status.
fn vip<'a>(status: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    status["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == service))
        .unwrap_or_else(|| panic!("no VIP {service} in {status}"))
}

fn real_state(status: &serde_json::Value, service: &str, addr: &str) -> RealState {
    let v = vip(status, service);
    let find = |list: &str| {
        v[list]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["addr"] == addr))
            .unwrap_or_else(|| panic!("no real {addr} in {list} of {service}: {v}"))
            .clone()
    };
    let (r, h) = (find("reals"), find("health"));
    let s = &h["status"];
    RealState {
        in_use: r["effective_weight"].as_u64(),
        healthy: r["healthy"].as_bool().expect("healthy is a bool"),
        admin: r["admin"].as_str().expect("admin").to_owned(),
        check: h["check"].as_str().expect("check").to_owned(),
        probe_up: s["up"].as_bool(),
        probes: s["probes"].as_u64().unwrap_or(0),
        last_error: s["last_error"].as_str().map(str::to_owned),
        flows: r["flows"].as_u64().expect("flows"),
    }
}

/// Polls `xlb status --json` until `ok` holds for it; returns that status and when it
/// was seen. Panics after [`WAIT`] quoting the last status and the daemon's log.
fn wait_status(
    daemon: &Daemon,
    what: &str,
    mut ok: impl FnMut(&serde_json::Value) -> bool,
) -> (serde_json::Value, Instant) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(daemon);
        if ok(&s) {
            return (s, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "not within {WAIT:?}: {what}; last status: {s:#}\ndaemon log:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until real `i` of `service` is in its table and healthy after at least one probe.
fn wait_serving(lab: &Lab, service: &str, i: usize) -> Instant {
    let a = addr(lab, i);
    wait_status(&lab.daemon, &format!("{a} serves {service}"), |s| {
        let r = real_state(s, service, &a);
        r.serving() && r.probe_up == Some(true)
    })
    .1
}

/// `count` requests to `to` from the client, one connection each; the name of the real
/// that answered each, or its error.
fn requests(lab: &Lab, to: SocketAddr, count: usize) -> Vec<Result<String, String>> {
    lab.topo.client.ns.run_in(|| {
        (0..count)
            .map(|_| http_get(to, TIMEOUT).map(|a| a.real))
            .collect()
    })
}

/// `count` requests that must all succeed; the reals that answered.
fn answered_by(lab: &Lab, to: SocketAddr, count: usize) -> Vec<String> {
    requests(lab, to, count)
        .into_iter()
        .enumerate()
        .map(|(n, r)| r.unwrap_or_else(|e| panic!("request {n} of {count} to {to}: {e}")))
        .collect()
}

/// Sets the flag when dropped, so a failing test stops the load before the thread
/// scope waits for it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The load stops by itself after this many requests or this long, whatever the test does.
const LOAD_MAX_REQUESTS: usize = 100_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

/// A bounded HTTP load to the VIP, one connection per request, each recorded with the
/// time it started.
#[derive(Default)]
struct Load {
    done: Mutex<Vec<(Instant, Result<String, String>)>>,
    answered: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    /// Sends requests until told to stop (or its bounds). Call inside the client's
    /// namespace.
    fn run(&self) {
        let started = Instant::now();
        for _ in 0..LOAD_MAX_REQUESTS {
            if self.stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_MAX_TIME {
                break;
            }
            let at = Instant::now();
            let result = http_get(target(), TIMEOUT).map(|a| a.real);
            if result.is_ok() {
                self.answered.fetch_add(1, Ordering::Relaxed);
            }
            self.done.lock().expect("not poisoned").push((at, result));
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits until `n` more requests than now are answered.
    fn wait_for_more(&self, n: usize) {
        let goal = self.answered.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + WAIT;
        while self.answered.load(Ordering::Relaxed) < goal {
            assert!(
                !self.stop.load(Ordering::Relaxed),
                "the load stopped before {goal} answers"
            );
            assert!(
                Instant::now() < deadline,
                "the load did not reach {goal} answers within {WAIT:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn a_stopped_real_leaves_within_fall_intervals_and_no_request_fails_after() {
    let (mut lab, scratch) = lab("hs", 3, &[]);
    configure(&lab, SERVICE, &CHECK);
    for i in 0..3 {
        wait_serving(&lab, SERVICE, i);
    }
    let rs1 = addr(&lab, 0);

    let load = Load::default();
    let (stopped, removed, down_seen, restarted, back) = thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        let client = s.spawn(|| lab.topo.client.ns.run_in(|| load.run()));
        load.wait_for_more(100);

        lab.servers[0].stop();
        let stopped = Instant::now();
        let (down_seen, removed) = wait_status(&lab.daemon, "rs1 removed by health", |s| {
            real_state(s, SERVICE, &rs1).removed_by_health()
        });
        // The other reals take over: enough answers after the removal to hit every
        // slot rs1 held many times over.
        load.wait_for_more(300);

        lab.servers[0] = start_server(&lab, &scratch, 0);
        let restarted = Instant::now();
        let back = wait_serving(&lab, SERVICE, 0);
        load.wait_for_more(300);
        load.stop.store(true, Ordering::Relaxed);
        client.join().expect("the load thread panicked");
        (stopped, removed, down_seen, restarted, back)
    });

    let done = load.done.into_inner().expect("not poisoned");
    let during: Vec<&String> = done
        .iter()
        .filter(|(at, _)| *at >= stopped && *at < removed)
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let after: Vec<&(Instant, Result<String, String>)> =
        done.iter().filter(|(at, _)| *at >= removed).collect();
    let failed_after: Vec<&String> = after.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let detection = removed - stopped;
    let returned = back - restarted;
    eprintln!(
        "health e2e: {} requests; rs1 removed {} ms after its server stopped ({} requests \
         failed in that window), back {} ms after it restarted; {} requests after the \
         removal, {} failed",
        done.len(),
        ms(detection),
        during.len(),
        ms(returned),
        after.len(),
        failed_after.len()
    );

    assert!(
        failed_after.is_empty(),
        "{} of {} requests started after rs1 left the table failed; first: {:?}",
        failed_after.len(),
        after.len(),
        &failed_after[..failed_after.len().min(5)]
    );
    let down = real_state(&down_seen, SERVICE, &rs1);
    assert_eq!(
        down.last_error.as_deref(),
        Some("connection refused"),
        "rs1's last error: {down:?}"
    );
    // Exact timing is the engine's unit tests' business (paused clock); here the bound
    // fall × interval (+10% jitter) + timeout gets a second of slack for polling the CLI
    // on a loaded 2-core machine.
    let bound = Duration::from_millis(FALL * INTERVAL_MS * 11 / 10 + TIMEOUT_MS);
    assert!(
        detection <= bound + Duration::from_secs(1),
        "rs1 left the table {} ms after its server stopped; fall × interval + timeout is {} ms",
        ms(detection),
        ms(bound)
    );
    let rs1_name = real_name(0);
    let after_back = done
        .iter()
        .filter(|(at, r)| *at >= back && r.as_ref().is_ok_and(|n| *n == rs1_name))
        .count();
    assert!(
        after_back > 0,
        "rs1 is back in the table but answered none of the requests after it"
    );
    // It came back after rise passing probes, not before.
    assert!(
        returned >= Duration::from_millis((RISE - 1) * INTERVAL_MS * 9 / 10),
        "rs1 came back {} ms after its restart, before rise ({RISE}) probes could pass",
        ms(returned)
    );
}

#[test]
fn an_http_503_takes_a_real_out_for_new_flows_only_while_a_tcp_check_keeps_it() {
    let (lab, scratch) = lab("hh", 3, &[]);
    // Two services on the same servers, both probing port 80: one with an HTTP GET of
    // /health, one with a TCP connect.
    let tcp_service = "203.0.113.10:8080/tcp";
    configure(&lab, SERVICE, &CHECK);
    let mut tcp_check = CHECK.to_vec();
    tcp_check[1] = "tcp";
    tcp_check.extend(["--check-port", "80"]);
    configure(&lab, tcp_service, &tcp_check);
    for i in 0..3 {
        wait_serving(&lab, SERVICE, i);
        wait_serving(&lab, tcp_service, i);
    }
    let rs1 = addr(&lab, 0);
    let rs1_name = real_name(0);
    let tcp_probes = real_state(&status(&lab.daemon), tcp_service, &rs1).probes;
    // An established connection on rs1, to see what a health verdict does to it.
    let mut conn = lab.topo.client.ns.run_in(|| {
        (0..60)
            .find_map(|_| {
                let mut c = KeepAlive::connect(target(), TIMEOUT).expect("connect to the VIP");
                let first = c.get().expect("first request on a kept-alive connection");
                (first.real == rs1_name).then_some(c)
            })
            .expect("none of 60 connections landed on rs1")
    });

    set_failing(&scratch, 0, true);
    let failing = Instant::now();
    let (down, removed) = wait_status(&lab.daemon, "rs1 removed by the HTTP check", |s| {
        real_state(s, SERVICE, &rs1).removed_by_health()
    });
    eprintln!(
        "health e2e: rs1 removed {} ms after /health turned 503",
        ms(removed - failing)
    );
    let http = real_state(&down, SERVICE, &rs1);
    assert_eq!(http.check, "http");
    assert_eq!(http.last_error.as_deref(), Some("HTTP 503"), "{http:?}");
    // Meanwhile the TCP check of the same port kept passing.
    let (later, _) = wait_status(&lab.daemon, "more TCP probes of rs1", |s| {
        real_state(s, tcp_service, &rs1).probes >= tcp_probes + RISE + FALL
    });
    let tcp = real_state(&later, tcp_service, &rs1);
    assert!(
        tcp.serving() && tcp.probe_up == Some(true) && tcp.last_error.is_none(),
        "the TCP check should pass against a server answering 503: {tcp:?}"
    );

    // The established connection stays on rs1 (conntrack), new ones avoid it.
    let answer = conn.get().expect("the connection established on rs1 broke");
    assert_eq!(answer.real, rs1_name, "the established flow moved");
    let http_answers = answered_by(&lab, target(), 90);
    assert!(
        !http_answers.contains(&rs1_name),
        "rs1 still got new connections on {SERVICE}"
    );
    let tcp_answers = answered_by(&lab, SocketAddr::from((VIP, 8080)), 90);
    assert!(
        tcp_answers.contains(&rs1_name),
        "rs1 got no connection on {tcp_service}, whose TCP check passes"
    );

    // Disabling it moves the established flow: another real resets it.
    lab.daemon.cli_ok(&["real", "disable", SERVICE, &rs1]);
    let moved = conn.get();
    assert!(
        moved.is_err(),
        "the flow of a disabled real should move to another real (which resets it): {moved:?}"
    );
    lab.daemon.cli_ok(&["real", "enable", SERVICE, &rs1]);
    let r = real_state(&status(&lab.daemon), SERVICE, &rs1);
    assert!(
        r.removed_by_health(),
        "enabled, but its probes still fail: {r:?}"
    );

    // Healthy again: back after rise probes.
    set_failing(&scratch, 0, false);
    wait_serving(&lab, SERVICE, 0);
    assert!(
        answered_by(&lab, target(), 90).contains(&rs1_name),
        "rs1 is back in {SERVICE}'s table but got no connection"
    );
}

/// `GET /metrics` from the daemon's metrics address (inside the balancer's namespace).
fn scrape(lab: &Lab) -> String {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("metrics address");
    xlb_tests::harness::scrape_metrics(&lab.topo.lb, addr)
}

/// The value of the sample `name{labels}` in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn the_avalanche_guard_keeps_every_real_when_three_of_four_fail() {
    let (mut lab, scratch) = lab(
        "hg",
        4,
        &["--metrics-addr", METRICS_ADDR, "--min-healthy", "0.5"],
    );
    configure(&lab, SERVICE, &CHECK);
    for i in 0..4 {
        wait_serving(&lab, SERVICE, i);
    }
    let addrs: Vec<String> = (0..4).map(|i| addr(&lab, i)).collect();
    // SERVICE as the labels of its series.
    let vip_labels = r#"address="203.0.113.10",port="80",protocol="tcp""#;
    let guard_series = format!("xlb_vip_avalanche_guard_active{{{vip_labels}}}");
    assert_eq!(sample(&scrape(&lab), &guard_series), Some(0.0));

    for server in &mut lab.servers[..3] {
        server.stop();
    }
    let stopped = Instant::now();
    let (guarded, guard_on) = wait_status(&lab.daemon, "three reals down and the guard on", |s| {
        vip(s, SERVICE)["guarded"] == true
            && addrs[..3]
                .iter()
                .all(|a| real_state(s, SERVICE, a).probe_up == Some(false))
    });
    eprintln!(
        "health e2e: three of four reals stopped, guard on {} ms later",
        ms(guard_on - stopped)
    );
    for a in &addrs[..3] {
        let r = real_state(&guarded, SERVICE, a);
        assert!(!r.healthy, "{a} should be unhealthy: {r:?}");
        assert_eq!(
            r.in_use,
            Some(1),
            "the guard should keep {a} in the table: {r:?}"
        );
        assert_eq!(
            r.last_error.as_deref(),
            Some("connection refused"),
            "{a}: {r:?}"
        );
    }
    assert_eq!(real_state(&guarded, SERVICE, &addrs[3]).in_use, Some(1));

    // The operator sees it: the status table, the guard metric, the verdicts.
    let text = lab.daemon.cli_ok(&["status"]);
    assert!(text.contains("AVALANCHE GUARD"), "xlb status:\n{text}");
    assert!(text.contains("connection refused"), "xlb status:\n{text}");
    assert_eq!(text.matches("DOWN").count(), 3, "xlb status:\n{text}");
    let metrics = scrape(&lab);
    assert_eq!(sample(&metrics, &guard_series), Some(1.0), "{metrics}");
    for (i, a) in addrs.iter().enumerate() {
        let series = format!("xlb_real_healthy{{{vip_labels},real=\"{a}\"}}");
        let want = if i < 3 { 0.0 } else { 1.0 };
        assert_eq!(sample(&metrics, &series), Some(want), "{series}: {metrics}");
    }
    let flips = sample(&metrics, "xlb_health_flips_total").expect("xlb_health_flips_total");
    assert!(flips >= 3.0, "xlb_health_flips_total {flips}");

    // Fail open: new connections still go to all four (those to the stopped three are
    // refused by their hosts, which is the price of never emptying the service).
    let before = guarded;
    let results = requests(&lab, target(), 120);
    let after = status(&lab.daemon);
    eprintln!(
        "xlb status under the guard, after 120 requests:\n{}",
        lab.daemon.cli_ok(&["status"])
    );
    for a in &addrs {
        let flows = real_state(&after, SERVICE, a).flows - real_state(&before, SERVICE, a).flows;
        assert!(
            flows >= 12,
            "{a} got {flows} of 120 new flows under the guard; all four should share them"
        );
    }
    let rs4 = real_name(3);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .all(|n| *n == rs4),
        "only rs4 can answer"
    );

    // All four down: the table still keeps all of them.
    lab.servers[3].stop();
    let (all_down, _) = wait_status(&lab.daemon, "all four reals down", |s| {
        addrs
            .iter()
            .all(|a| real_state(s, SERVICE, a).probe_up == Some(false))
    });
    assert_eq!(vip(&all_down, SERVICE)["guarded"], true);
    for a in &addrs {
        assert_eq!(real_state(&all_down, SERVICE, a).in_use, Some(1), "{a}");
    }

    // Two come back: half the reals are healthy, enough for the threshold but not for
    // the guard to let go (it waits for one real to spare, so that a real flapping at
    // the threshold does not flip the table).
    lab.servers[0] = start_server(&lab, &scratch, 0);
    lab.servers[3] = start_server(&lab, &scratch, 3);
    let (two_up, _) = wait_status(&lab.daemon, "two reals up again", |s| {
        real_state(s, SERVICE, &addrs[0]).probe_up == Some(true)
            && real_state(s, SERVICE, &addrs[3]).probe_up == Some(true)
    });
    assert_eq!(
        vip(&two_up, SERVICE)["guarded"],
        true,
        "the guard let go at exactly the threshold"
    );
    // A third comes back: the guard lets go and only the healthy three serve.
    lab.servers[1] = start_server(&lab, &scratch, 1);
    let (released, _) = wait_status(&lab.daemon, "guard released", |s| {
        vip(s, SERVICE)["guarded"] == false
            && real_state(s, SERVICE, &addrs[0]).serving()
            && real_state(s, SERVICE, &addrs[1]).serving()
            && real_state(s, SERVICE, &addrs[3]).serving()
    });
    let r = real_state(&released, SERVICE, &addrs[2]);
    assert!(
        r.removed_by_health(),
        "{} should be out again: {r:?}",
        addrs[2]
    );
    assert_eq!(sample(&scrape(&lab), &guard_series), Some(0.0));
    let answers = answered_by(&lab, target(), 60);
    assert!(
        answers
            .iter()
            .all(|n| *n == real_name(0) || *n == real_name(1) || *n == rs4),
        "{answers:?}"
    );

    // Three down and the guard on again; then the check is removed: no real
    // has a check, every one is healthy and the guard off in that change.
    lab.servers[0].stop();
    lab.servers[1].stop();
    wait_status(&lab.daemon, "the guard on again", |s| {
        vip(s, SERVICE)["guarded"] == true
    });
    lab.daemon
        .cli_ok(&["vip", "set", SERVICE, "--check", "none"]);
    let unchecked = status(&lab.daemon);
    assert_eq!(
        vip(&unchecked, SERVICE)["guarded"],
        false,
        "the guard outlived the check: {unchecked:#}"
    );
    for a in &addrs {
        let r = real_state(&unchecked, SERVICE, a);
        assert!(
            r.healthy && r.in_use == Some(1),
            "{a} kept the removed check's verdict: {r:?}"
        );
    }
    let metrics = scrape(&lab);
    assert_eq!(sample(&metrics, &guard_series), Some(0.0), "{metrics}");
}

#[test]
fn disable_wins_over_a_passing_probe_and_kind_none_keeps_a_failing_real() {
    let (lab, scratch) = lab("ho", 3, &[]);
    configure(&lab, SERVICE, &CHECK);
    for i in 0..3 {
        wait_serving(&lab, SERVICE, i);
    }
    let rs1 = addr(&lab, 0);
    let rs1_name = real_name(0);

    // Disabled: out of the table although every probe passes.
    lab.daemon.cli_ok(&["real", "disable", SERVICE, &rs1]);
    let probes = real_state(&status(&lab.daemon), SERVICE, &rs1).probes;
    let (s, _) = wait_status(&lab.daemon, "more probes of the disabled rs1", |s| {
        real_state(s, SERVICE, &rs1).probes >= probes + RISE + FALL
    });
    let r = real_state(&s, SERVICE, &rs1);
    assert_eq!(r.admin, "disabled");
    assert_eq!(
        r.probe_up,
        Some(true),
        "the probes of rs1 should pass: {r:?}"
    );
    assert_eq!(
        r.in_use, None,
        "a disabled real stays out of the table: {r:?}"
    );
    assert!(
        !answered_by(&lab, target(), 90).contains(&rs1_name),
        "the disabled rs1 got new connections"
    );

    // Enabled: back at once (its probes pass).
    lab.daemon.cli_ok(&["real", "enable", SERVICE, &rs1]);
    let r = real_state(&status(&lab.daemon), SERVICE, &rs1);
    assert!(r.serving(), "enabled rs1 should be in the table: {r:?}");
    assert!(
        answered_by(&lab, target(), 90).contains(&rs1_name),
        "the enabled rs1 got no connection"
    );

    // Failing /health: the probe takes it out...
    set_failing(&scratch, 0, true);
    wait_status(&lab.daemon, "rs1 removed by health", |s| {
        real_state(s, SERVICE, &rs1).removed_by_health()
    });
    // ...and a per-real `health_check: {kind: none}` brings it back and keeps it.
    let yaml = format!(
        "services:\n  - vip: {SERVICE}\n    health_check:\n      kind: http\n      \
         path: /health\n      interval_ms: {INTERVAL_MS}\n      timeout_ms: {TIMEOUT_MS}\n      \
         rise: {RISE}\n      fall: {FALL}\n    reals:\n      - address: {rs1}\n        \
         health_check: {{kind: none}}\n      - address: {}\n      - address: {}\n",
        addr(&lab, 1),
        addr(&lab, 2)
    );
    let file = scratch.path().join("override.yaml");
    std::fs::write(&file, yaml).expect("write the YAML");
    lab.daemon
        .cli_ok(&["apply", file.to_str().expect("UTF-8 temp path")]);
    // A real without a check is healthy by definition: back in the table in
    // the apply's own change, no verdict of the old check left behind.
    let s = status(&lab.daemon);
    let r = real_state(&s, SERVICE, &rs1);
    assert!(r.serving(), "rs1 with kind none is not back at once: {r:?}");
    assert_eq!(r.check, "none", "{r:?}");
    // Several probe rounds later (counted on rs2, still probed) it is still in, and serves.
    let rs2 = addr(&lab, 1);
    let probes = real_state(&s, SERVICE, &rs2).probes;
    let (s, _) = wait_status(&lab.daemon, "more probes of rs2", |s| {
        real_state(s, SERVICE, &rs2).probes >= probes + RISE + FALL
    });
    let r = real_state(&s, SERVICE, &rs1);
    assert!(r.serving(), "rs1 with kind none left the table: {r:?}");
    assert!(
        answered_by(&lab, target(), 90).contains(&rs1_name),
        "rs1 (kind none, /health failing) got no connection"
    );
    // The other reals are still probed.
    for i in 1..3 {
        let r = real_state(&status(&lab.daemon), SERVICE, &addr(&lab, i));
        assert_eq!(r.check, "http", "{r:?}");
    }
}

#[test]
fn a_disabled_real_and_a_down_verdict_survive_a_daemon_restart() {
    let prefix = unique_prefix("hr");
    // Declared first, dropped last: the bpffs goes after the daemons and namespaces.
    let run = PinnedRun::new(&prefix);
    let (mut lab, scratch) = lab_with(&prefix, 3, |topo| {
        Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[])
    });
    // rise 10 (2 s at least): a restored verdict is visible long enough to be seen.
    let mut check = CHECK;
    check[9] = "10";
    configure(&lab, SERVICE, &check);
    for i in 0..3 {
        wait_serving(&lab, SERVICE, i);
    }
    let (rs1, rs2) = (addr(&lab, 0), addr(&lab, 1));

    // rs1 disabled by the operator, rs2 taken out by its probes.
    lab.daemon.cli_ok(&["real", "disable", SERVICE, &rs1]);
    lab.servers[1].stop();
    wait_status(&lab.daemon, "rs2 removed by health", |s| {
        real_state(s, SERVICE, &rs2).removed_by_health()
    });

    // SIGTERM: the daemon leaves the pinned data path running. rs2 recovers while no
    // daemon runs; the next daemon adopts the pins and the state file.
    let stopped = lab.daemon.stop();
    assert!(
        stopped.is_some_and(|s| s.success()),
        "xlb run ended with {stopped:?}; its log:
{}",
        lab.daemon.log()
    );
    lab.servers[1] = start_server(&lab, &scratch, 1);
    lab.daemon = Daemon::start_pinned(&lab.topo.lb.ns, "eth0", &run, &[]);
    let restarted = Instant::now();
    let log = lab.daemon.log();
    assert!(
        log.contains("adopted the running data path"),
        "the restarted daemon did not adopt the pins; its log:\n{log}"
    );

    let s = status(&lab.daemon);
    let r1 = real_state(&s, SERVICE, &rs1);
    assert_eq!(r1.admin, "disabled", "rs1 after the restart: {r1:?}");
    assert_eq!(r1.in_use, None, "rs1 after the restart: {r1:?}");
    let r2 = real_state(&s, SERVICE, &rs2);
    assert!(
        r2.removed_by_health(),
        "rs2 was down when the daemon stopped and must pass rise probes first: {r2:?}"
    );
    assert_eq!(
        r2.last_error.as_deref(),
        Some("down when the daemon started")
    );

    // rs2 passes its probes and comes back; rs1 stays out although its probes pass.
    let back = wait_serving(&lab, SERVICE, 1);
    eprintln!(
        "health e2e: rs2 (down before the restart, rise 10) back {} ms after the new daemon \
         answered",
        ms(back - restarted)
    );
    let s = status(&lab.daemon);
    let r1 = real_state(&s, SERVICE, &rs1);
    assert_eq!(r1.probe_up, Some(true), "{r1:?}");
    assert_eq!(
        r1.in_use, None,
        "the disabled rs1 came back by itself: {r1:?}"
    );
    let answers = answered_by(&lab, target(), 90);
    assert!(
        !answers.contains(&real_name(0)),
        "the disabled rs1 got connections"
    );
    assert!(
        answers.contains(&real_name(1)),
        "rs2 is back but got no connection"
    );

    lab.daemon.cli_ok(&["real", "enable", SERVICE, &rs1]);
    assert!(real_state(&status(&lab.daemon), SERVICE, &rs1).serving());
}

/// The short timing of every test's checks, as YAML lines of a `health_check`.
fn short_timing() -> String {
    timing(INTERVAL_MS, TIMEOUT_MS)
}

/// Check timing with rise and fall of every test, as YAML lines of a `health_check`.
fn timing(interval_ms: u64, timeout_ms: u64) -> String {
    format!(
        "      interval_ms: {interval_ms}\n      timeout_ms: {timeout_ms}\n      rise: {RISE}\n      \
         fall: {FALL}\n"
    )
}

/// `services:` with `SERVICE`, the reals `reals` (by index) and a health check of
/// `check` (YAML lines indented by six spaces).
fn service_yaml(lab: &Lab, reals: &[usize], check: &str) -> String {
    let mut yaml = format!("services:\n  - vip: {SERVICE}\n    health_check:\n{check}    reals:\n");
    for i in reals {
        yaml.push_str(&format!("      - address: {}\n", addr(lab, *i)));
    }
    yaml
}

/// Writes `yaml` to the scratch directory and `xlb apply`s it.
fn apply(lab: &Lab, scratch: &Scratch, yaml: &str) {
    let file = scratch.path().join("apply.yaml");
    std::fs::write(&file, yaml).expect("write the YAML");
    lab.daemon
        .cli_ok(&["apply", file.to_str().expect("UTF-8 temp path")]);
}

/// `xlb status --json`'s view of one real's probe status field `field`.
fn probe_field(
    status: &serde_json::Value,
    service: &str,
    addr: &str,
    field: &str,
) -> serde_json::Value {
    let v = vip(status, service);
    v["health"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["addr"] == addr))
        .map(|h| {
            if field == "slow_start" {
                h["slow_start"].clone()
            } else {
                h["status"][field].clone()
            }
        })
        .unwrap_or_else(|| panic!("no health of {addr} in {v}"))
}

/// The lines of `file`, or none while it does not exist.
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn https_checks_verify_against_the_ca_given_or_not_at_all_and_http_checks_read_the_body() {
    let (mut lab, scratch) = lab(
        "hs",
        3,
        &["--min-healthy", "0", "--metrics-addr", METRICS_ADDR],
    );
    // A self-signed certificate for rs.test, made here; every real serves HTTPS with it.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["rs.test".to_owned()])
        .expect("certificate parameters")
        .self_signed(&key)
        .expect("self-signed certificate");
    let (cert_file, key_file) = (scratch.path().join("rs.pem"), scratch.path().join("rs.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write the certificate");
    std::fs::write(&key_file, key.serialize_pem()).expect("write the key");
    lab.servers.clear();
    lab.servers = (0..3)
        .map(|i| {
            let mut args = server_args(&scratch, i);
            args.extend(
                [
                    "--https",
                    "0.0.0.0:443",
                    "--tls-cert",
                    cert_file.to_str().expect("UTF-8"),
                    "--tls-key",
                    key_file.to_str().expect("UTF-8"),
                ]
                .map(str::to_owned),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            start_real(&lab.topo.reals[i].ns, &real_name(i), &args)
        })
        .collect();
    let notes = scratch.path().join("notify.log");
    let notify = |state: &str| {
        format!(
            "      notify_{state}: [/bin/sh, -c, 'echo \"$XLB_STATE $XLB_REAL_ADDRESS $XLB_VIP $XLB_REASON\" >> {}']\n",
            notes.display()
        )
    };
    let https = |tls: &str| {
        format!(
            "      kind: https\n      port: 443\n      path: /health\n{tls}{}{}{}",
            notify("up"),
            notify("down"),
            short_timing()
        )
    };
    let all = [0, 1, 2];
    let rs1 = addr(&lab, 0);

    // Verified against the certificate as the CA, with its name as SNI: all up.
    let ca = format!(
        "      sni: rs.test\n      tls_ca: {}\n",
        cert_file.display()
    );
    apply(&lab, &scratch, &service_yaml(&lab, &all, &https(&ca)));
    for i in all {
        wait_serving(&lab, SERVICE, i);
    }
    // /health answering 503 over TLS takes rs1 out, and back when it answers 200.
    set_failing(&scratch, 0, true);
    let (s, _) = wait_status(&lab.daemon, "rs1 out on HTTPS 503", |s| {
        real_state(s, SERVICE, &rs1).removed_by_health()
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs1).last_error.as_deref(),
        Some("HTTP 503")
    );
    set_failing(&scratch, 0, false);
    wait_serving(&lab, SERVICE, 0);
    // Both flips ran their notify command, with the real, the VIP and the reason.
    wait_until("two notify lines", || lines(&notes).len() >= 2);
    assert_eq!(
        lines(&notes),
        [
            format!("down {rs1} {SERVICE} HTTP 503"),
            // Up has no reason: an empty last word.
            format!("up {rs1} {SERVICE} "),
        ],
        "notify lines"
    );
    // Counted per real: in status and as a metric with the VIP's three labels.
    let s = status(&lab.daemon);
    assert_eq!(probe_field(&s, SERVICE, &rs1, "flaps"), 2);
    assert_eq!(probe_field(&s, SERVICE, &addr(&lab, 1), "flaps"), 0);
    let labels =
        format!("{{address=\"203.0.113.10\",port=\"80\",protocol=\"tcp\",real=\"{rs1}\"}}");
    let scraped = scrape(&lab);
    assert_eq!(
        sample(&scraped, &format!("xlb_real_flaps_total{labels}")),
        Some(2.0),
        "{scraped}"
    );
    let probes = sample(
        &scraped,
        &format!("xlb_probe_duration_seconds_count{labels}"),
    )
    .unwrap_or_else(|| panic!("no probe durations of {rs1}: {scraped}"));
    assert!(probes >= 4.0, "{probes} probe durations of {rs1}");

    // Verified against the system's CA store: the self-signed certificate fails.
    apply(
        &lab,
        &scratch,
        &service_yaml(&lab, &all, &https("      sni: rs.test\n")),
    );
    // The probes' statuses are published before the controller applies their
    // verdicts: wait for both, the refusals and the guard holding the VIP.
    wait_status(
        &lab.daemon,
        "every HTTPS probe refused, the avalanche guard holding the VIP",
        |s| {
            vip(s, SERVICE)["guarded"].as_bool() == Some(true)
                && all.iter().all(|i| {
                    let r = real_state(s, SERVICE, &addr(&lab, *i));
                    r.probe_up == Some(false)
                        && r.last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("UnknownIssuer"))
                })
        },
    );
    // Not verified: the same certificate is accepted, every real comes back.
    apply(
        &lab,
        &scratch,
        &service_yaml(&lab, &all, &https("      tls_verify: false\n")),
    );
    for i in all {
        wait_serving(&lab, SERVICE, i);
    }

    // HTTP on the body: `/` answers 200 with the real's name, so a check for rs1's
    // name passes on rs1 only.
    let body = format!(
        "      kind: http\n      port: 80\n      path: /\n      expect_body: {}\n{}",
        real_name(0),
        short_timing()
    );
    apply(&lab, &scratch, &service_yaml(&lab, &all, &body));
    let (s, _) = wait_status(&lab.daemon, "rs2 and rs3 out on the body", |s| {
        (1..3).all(|i| real_state(s, SERVICE, &addr(&lab, i)).removed_by_health())
    });
    assert!(real_state(&s, SERVICE, &rs1).serving());
    assert_eq!(
        real_state(&s, SERVICE, &addr(&lab, 1))
            .last_error
            .as_deref(),
        Some(format!("HTTP 200 without '{}' in the body", real_name(0)).as_str())
    );
}

#[test]
fn exec_checks_start_down_ramp_up_slowly_and_tcp_probes_leave_no_time_wait() {
    let (lab, scratch) = lab("hx", 3, &["--min-healthy", "0"]);
    let dir = scratch.path().display().to_string();
    // Down while DIR/ADDRESS.down exists; hangs while DIR/ADDRESS.slow exists. A
    // command takes longer than a connect: a longer timeout, so a busy machine is no
    // failure.
    let exec_timeout_ms = 400;
    let exec = format!(
        "      kind: exec\n      command: [/bin/sh, -c, 'if [ -e {dir}/$XLB_REAL_ADDRESS.slow ]; \
         then exec sleep 30; fi; test ! -e {dir}/$XLB_REAL_ADDRESS.down || {{ echo not ready >&2; \
         exit 1; }}']\n      start: down\n      slow_start_ms: 3000\n{}",
        timing(500, exec_timeout_ms)
    );
    let switch = |i: usize, what: &str, on: bool| {
        let file = scratch.path().join(format!("{}.{what}", addr(&lab, i)));
        if on {
            std::fs::write(&file, b"").expect("create the switch");
        } else {
            std::fs::remove_file(&file).expect("remove the switch");
        }
    };
    let (rs1, rs2, rs3) = (addr(&lab, 0), addr(&lab, 1), addr(&lab, 2));
    apply(&lab, &scratch, &service_yaml(&lab, &[0, 1], &exec));
    for i in 0..2 {
        wait_serving(&lab, SERVICE, i);
    }
    wait_status(&lab.daemon, "the first ramps end", |s| {
        [&rs1, &rs2].iter().all(|a| {
            real_state(s, SERVICE, a).in_use == Some(1)
                && probe_field(s, SERVICE, a, "slow_start").is_null()
        })
    });

    // The command's exit code decides, its stderr is the reason.
    switch(1, "down", true);
    let (s, _) = wait_status(&lab.daemon, "rs2 out on exit code 1", |s| {
        real_state(s, SERVICE, &rs2).removed_by_health()
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs2).last_error.as_deref(),
        Some("exit code 1: not ready")
    );
    switch(1, "down", false);
    wait_serving(&lab, SERVICE, 1);
    // A command that does not end in time fails the probe.
    switch(1, "slow", true);
    let (s, _) = wait_status(&lab.daemon, "rs2 out on a hanging command", |s| {
        real_state(s, SERVICE, &rs2).removed_by_health()
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs2).last_error.as_deref(),
        Some(format!("timeout after {exec_timeout_ms} ms").as_str())
    );
    switch(1, "slow", false);
    wait_serving(&lab, SERVICE, 1);
    wait_status(&lab.daemon, "rs2's ramp ends", |s| {
        real_state(s, SERVICE, &rs2).in_use == Some(1)
            && probe_field(s, SERVICE, &rs2, "slow_start").is_null()
    });

    // rs3 joins under `start: down` while its command fails: out from the start...
    switch(2, "down", true);
    apply(&lab, &scratch, &service_yaml(&lab, &[0, 1, 2], &exec));
    let s = status(&lab.daemon);
    let r = real_state(&s, SERVICE, &rs3);
    assert!(r.removed_by_health(), "a new real under start: down: {r:?}");
    let want = if r.probes == 0 {
        "start: down, not proven up yet"
    } else {
        // Its first probe (at a random point of the first interval) came already.
        "exit code 1: not ready"
    };
    assert_eq!(r.last_error.as_deref(), Some(want), "{r:?}");
    let (s, _) = wait_status(&lab.daemon, "rs3 probed several times", |s| {
        real_state(s, SERVICE, &rs3).probes >= RISE + FALL
    });
    assert!(real_state(&s, SERVICE, &rs3).removed_by_health());
    // ...and, once its command passes, ramps up: its share of the table in hundredths
    // of the others' steps up, then the weights are plain again.
    switch(2, "down", false);
    let mut seen = Vec::new();
    wait_status(&lab.daemon, "rs3's ramp ends", |s| {
        let (r1, r3) = (real_state(s, SERVICE, &rs1), real_state(s, SERVICE, &rs3));
        if let (Some(w1), Some(w3)) = (r1.in_use, r3.in_use)
            && w1 == 100
            && w3 > 0
            && seen.last() != Some(&w3)
        {
            assert_eq!(
                probe_field(s, SERVICE, &rs3, "slow_start"),
                w3,
                "the percent shown is the share in the table"
            );
            seen.push(w3);
        }
        r3.serving() && r3.in_use == Some(1) && r1.in_use == Some(1)
    });
    assert!(
        seen.len() >= 3 && seen.windows(2).all(|w| w[0] < w[1]) && seen.iter().all(|w| *w < 100),
        "rs3's weight in hundredths during its ramp: {seen:?}"
    );

    // TCP probes close with a reset: after many of them the balancer holds no TIME_WAIT
    // socket toward the reals.
    apply(
        &lab,
        &scratch,
        &service_yaml(
            &lab,
            &[0, 1, 2],
            &format!("      kind: tcp\n{}", short_timing()),
        ),
    );
    let probes = real_state(&status(&lab.daemon), SERVICE, &rs1).probes;
    wait_status(&lab.daemon, "ten more TCP probes of rs1", |s| {
        real_state(s, SERVICE, &rs1).probes >= probes + 10
    });
    let out = lab.topo.lb.ns.exec(&["ss", "-tanH", "state", "time-wait"]);
    let waiting = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        [&rs1, &rs2, &rs3]
            .iter()
            .all(|a| !waiting.contains(&format!("{a}:80"))),
        "TIME_WAIT sockets toward the reals on the balancer:\n{waiting}"
    );
}

#[test]
fn syn_checks_pass_a_listener_and_take_out_a_refusing_or_silent_real() {
    let (mut lab, scratch) = lab("hy", 3, &["--min-healthy", "0"]);
    let (rs1, rs2, rs3) = (addr(&lab, 0), addr(&lab, 1), addr(&lab, 2));
    // Half-open probes of port 8080, where every real's server listens; rs2's own
    // check probes port 9, where nothing does, so its SYNs are answered by a RST.
    let syn = |port: u16| format!("      kind: tcp\n      mode: syn\n      port: {port}\n");
    let mut yaml = service_yaml(
        &lab,
        &[0, 1, 2],
        &format!("{}{}", syn(8080), short_timing()),
    );
    yaml = yaml.replace(
        &format!("      - address: {rs2}\n"),
        &format!(
            "      - address: {rs2}\n        health_check:\n{}",
            format!("{}{}", syn(9), short_timing()).replace("      ", "          ")
        ),
    );
    apply(&lab, &scratch, &yaml);
    let (s, _) = wait_status(&lab.daemon, "rs1 and rs3 up, rs2 out", |s| {
        let (r1, r2, r3) = (
            real_state(s, SERVICE, &rs1),
            real_state(s, SERVICE, &rs2),
            real_state(s, SERVICE, &rs3),
        );
        r1.probes >= RISE + FALL
            && r3.probes >= RISE + FALL
            && r1.serving()
            && r3.serving()
            && r2.removed_by_health()
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs2).last_error.as_deref(),
        Some("connection refused: the SYN was answered by a RST")
    );
    // Status and the real list say how each real is probed.
    let listed = xlb_tests::harness::json(
        &lab.daemon.cli_ok(&["real", "list", SERVICE, "--json"]),
        "real list --json",
    );
    for r in listed.as_array().expect("reals") {
        assert_eq!(
            (&r["check"], &r["mode"]),
            (&"tcp".into(), &"syn".into()),
            "{r}"
        );
    }
    for a in [&rs1, &rs3] {
        let r = real_state(&s, SERVICE, a);
        assert_eq!(r.probe_up, Some(true), "{a}: {r:?}");
        assert_eq!(r.last_error, None, "{a}: {r:?}");
    }
    // The probes are half-open: rs1 completes no handshake (its passive opens stay
    // put over ten probes; a connect probe would add one each).
    let opens = || lab.topo.reals[0].ns.tcp_counter("PassiveOpens");
    let (before, probes) = (opens(), real_state(&s, SERVICE, &rs1).probes);
    wait_status(&lab.daemon, "ten more probes of rs1", |s| {
        real_state(s, SERVICE, &rs1).probes >= probes + 10
    });
    assert_eq!(opens(), before, "handshakes completed on rs1");

    // rs3 goes silent: its answers are dropped (a blackhole route back to the
    // balancer), so its probes time out and it goes out.
    let lb = lab.topo.lb.ipv4.to_string();
    lab.topo.reals[2]
        .ns
        .ip(&format!("route add blackhole {lb}/32"));
    let (s, _) = wait_status(&lab.daemon, "rs3 out by timeout", |s| {
        real_state(s, SERVICE, &rs3).removed_by_health()
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs3).last_error.as_deref(),
        Some(format!("timeout after {TIMEOUT_MS} ms (no answer to the SYN)").as_str())
    );
    assert!(real_state(&s, SERVICE, &rs1).serving());
    // Its answers come back: in again after rise probes.
    lab.topo.reals[2]
        .ns
        .ip(&format!("route del blackhole {lb}/32"));
    wait_serving(&lab, SERVICE, 2);

    // The SYN of a real whose MAC the daemon knows leaves as a whole frame on a
    // packet socket, not through the balancer's routing: with its route to rs1
    // prohibited (where a raw socket's send fails), rs1 keeps passing and rs2's
    // SYNs keep drawing their RST.
    let (s, _) = wait_status(&lab.daemon, "rs1 probed", |s| {
        real_state(s, SERVICE, &rs1).probes > 0
    });
    let probes = real_state(&s, SERVICE, &rs1).probes;
    let lb_ns = &lab.topo.lb.ns;
    lb_ns.ip(&format!("route add prohibit {rs1}/32"));
    let (s, _) = wait_status(&lab.daemon, "ten probes of rs1 past its route", |s| {
        real_state(s, SERVICE, &rs1).probes >= probes + 10
    });
    lb_ns.ip(&format!("route del prohibit {rs1}/32"));
    let r = real_state(&s, SERVICE, &rs1);
    assert_eq!(
        (r.probe_up, r.last_error.as_deref()),
        (Some(true), None),
        "{r:?}"
    );
    assert!(r.serving(), "{r:?}");
    assert_eq!(
        real_state(&s, SERVICE, &rs2).last_error.as_deref(),
        Some("connection refused: the SYN was answered by a RST")
    );

    // Without CAP_NET_RAW the daemon cannot send them: it says so and holds the
    // reals down, never up (the guard keeps the VIP's reals in: all are down).
    lab.daemon.stop();
    lab.daemon = Daemon::start_with_bounding_set(
        &lab.topo.lb.ns,
        "eth0",
        "-all,+bpf,+perfmon,+net_admin,+chown",
        &["--no-pin", "--min-healthy", "0"],
    );
    apply(&lab, &scratch, &yaml);
    let (s, _) = wait_status(&lab.daemon, "rs1 down without CAP_NET_RAW", |s| {
        real_state(s, SERVICE, &rs1).probe_up == Some(false)
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs1).last_error.as_deref(),
        Some("mode: syn needs raw sockets: CAP_NET_RAW was missing at start-up")
    );
}

#[test]
fn syn_checks_of_a_real_whose_mac_is_not_known_go_through_the_kernel() {
    let (lab, scratch) = lab("hk", 1, &["--min-healthy", "0", "--resolve-timeout", "1"]);
    let rs1 = addr(&lab, 0);
    // rs1 answers no ARP on eth0, so the daemon, which resolves a DR real on eth0
    // only, never learns its MAC; a second link from the balancer to rs1
    // (192.0.2.0/30) and the balancer's route to rs1 through it let the kernel
    // reach rs1 there. So every SYN to rs1 must go on the raw socket, routed by
    // the kernel.
    let (lb, real) = (&lab.topo.lb.ns, &lab.topo.reals[0].ns);
    real.sysctl("net.ipv4.conf.eth0.arp_ignore", "8");
    lb.ip(&format!(
        "link add name xk0 type veth peer name xk1 netns {}",
        real.name()
    ));
    lb.ip("addr add 192.0.2.1/30 dev xk0");
    lb.ip("link set dev xk0 up");
    real.ip("addr add 192.0.2.2/30 dev xk1");
    real.ip("link set dev xk1 up");
    lb.ip(&format!("route add {rs1}/32 via 192.0.2.2 dev xk0"));
    lb.ip(&format!("neigh flush to {rs1}"));
    let rx = || {
        let out = real.exec(&["cat", "/sys/class/net/xk1/statistics/rx_packets"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .expect("rx_packets")
    };
    let before = rx();
    let yaml = |port: u16| {
        service_yaml(
            &lab,
            &[0],
            &format!(
                "      kind: tcp\n      mode: syn\n      port: {port}\n{}",
                short_timing()
            ),
        )
    };
    apply(&lab, &scratch, &yaml(8080));
    // Unresolved (out of the table), and yet probed: its SYNs are answered.
    let (s, _) = wait_status(&lab.daemon, "rs1 probed up while unresolved", |s| {
        let r = real_state(s, SERVICE, &rs1);
        r.probes >= RISE && r.probe_up == Some(true)
    });
    let listed = vip(&s, SERVICE)["reals"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["addr"] == rs1.as_str()))
        .cloned()
        .expect("rs1 in the status");
    assert_eq!(listed["resolved"], false, "{listed}");
    assert!(
        listed["effective_weight"].is_null(),
        "in the table: {listed}"
    );
    assert_eq!(real_state(&s, SERVICE, &rs1).last_error, None);
    // They went over the second link, where the kernel routes them.
    let probes = real_state(&s, SERVICE, &rs1).probes;
    assert!(
        rx() >= before + probes,
        "{probes} probes but {} packets on rs1's second link",
        rx() - before
    );

    // A port where nothing listens: the RST comes back the same way.
    apply(&lab, &scratch, &yaml(9));
    let (s, _) = wait_status(&lab.daemon, "rs1 refused", |s| {
        real_state(s, SERVICE, &rs1).probe_up == Some(false)
    });
    assert_eq!(
        real_state(&s, SERVICE, &rs1).last_error.as_deref(),
        Some("connection refused: the SYN was answered by a RST")
    );
}
