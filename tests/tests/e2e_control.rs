//! netns end-to-end, the control plane's faults: what must never take a service down
//! or leave the maps different from what the daemon believes. A real that does not
//! answer ARP, a real disabled under load, health checks failing next to drained reals,
//! a second daemon started by mistake, a crash in the middle of a change, metrics
//! scrapes of a huge conntrack table, and changes made by hand across restarts.
//!
//! Needs root and runs one test at a time (`./x test` does both).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use aya::maps::{Array, Map, MapData};
use lb_common::{Config, FlowKey, FlowState, map_names};
use nix::sys::signal::Signal;
use xlb_tests::harness;
use xlb_tests::harness::{
    Daemon, KeepAlive, Lab, PinnedRun, Proc, RunDir, VIP, WAIT, api_request, balanced_topology,
    http_get, json, real_name, require_root, start_real, start_reals, wait_until,
};
use xlb_tests::netns::{Topology, unique_prefix};

const SERVICE: &str = "203.0.113.10:80/tcp";
const TIMEOUT: Duration = Duration::from_secs(3);
const SERVER_ARGS: [&str; 2] = ["--http", "0.0.0.0:80"];

fn target() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn status(daemon: &Daemon) -> serde_json::Value {
    json(&daemon.cli_ok(&["status", "--json"]), "xlb status --json")
}

fn vip_of<'a>(status: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    status["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == service))
        .unwrap_or_else(|| panic!("no VIP {service} in {status}"))
}

fn real_of(status: &serde_json::Value, addr: Ipv4Addr) -> &serde_json::Value {
    vip_of(status, SERVICE)["reals"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["addr"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no real {addr} in {status}"))
}

/// A verdict counter from `xlb stats --json`.
fn verdict(daemon: &Daemon, name: &str) -> u64 {
    let stats = json(&daemon.cli_ok(&["stats", "--json"]), "xlb stats --json");
    stats["verdicts"]
        .as_array()
        .and_then(|v| v.iter().find(|c| c["name"] == name))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("no verdict {name} in {stats}"))
}

/// Writes `text` to `dir/name`; returns the path.
fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// A config file: `SERVICE` with `reals` (address, extra YAML keys) and `extra` service keys.
fn config_yaml(reals: &[(Ipv4Addr, &str)], extra: &str) -> String {
    let mut out = format!("services:\n  - vip: {SERVICE}\n{extra}    reals:\n");
    for (addr, keys) in reals {
        out.push_str(&format!("      - address: {addr}\n{keys}"));
    }
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Answers of `n` one-connection requests to the VIP from the client: real name or error.
fn requests(topo: &Topology, n: usize) -> Vec<Result<String, String>> {
    topo.client.ns.run_in(|| {
        (0..n)
            .map(|_| http_get(target(), TIMEOUT).map(|a| a.real))
            .collect()
    })
}

/// One request on every kept-alive connection: the connections whose answer failed
/// or came from another real than before, with what happened.
fn check_keep_alive(conns: &mut [(KeepAlive, String)]) -> Vec<String> {
    let mut broken = Vec::new();
    for (i, (c, real)) in conns.iter_mut().enumerate() {
        match c.get() {
            Ok(a) if a.real == *real => {}
            Ok(a) => broken.push(format!("connection {i} moved from {real} to {}", a.real)),
            Err(e) => broken.push(format!("connection {i} on {real}: {e}")),
        }
    }
    broken
}

#[test]
fn a_real_that_does_not_answer_arp_is_kept_out_and_joins_within_2s_of_coming_up() {
    require_root();
    let topo = balanced_topology(&unique_prefix("cu"), 3);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let dir = RunDir::new(&format!("xlb-{}", topo.prefix()));
    let reals: Vec<Ipv4Addr> = topo.reals.iter().map(|r| r.ipv4).collect();
    let config = write_file(
        dir.path(),
        "xlb.yaml",
        &config_yaml(&[(reals[0], ""), (reals[1], ""), (reals[2], "")], ""),
    );
    // The third real is powered off: its link is down, nobody answers ARP for it.
    topo.reals[2].ns.ip("link set eth0 down");
    let daemon = Daemon::start_in(
        &topo.lb.ns,
        "eth0",
        dir.path(),
        &[
            "--no-pin",
            "--resolve-timeout",
            "1",
            "--config",
            path_str(&config),
        ],
    );
    let st = status(&daemon);
    let off = real_of(&st, reals[2]);
    assert_eq!(off["resolved"], false, "the powered-off real: {off}");
    assert!(
        off["unresolved_reason"]
            .as_str()
            .is_some_and(|r| r.contains("ARP")),
        "no reason given for the unresolved real: {off}"
    );
    assert!(
        off["effective_weight"].is_null(),
        "it is in the table: {off}"
    );
    // The others serve every request.
    let answers = requests(&topo, 40);
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert!(
        answers.iter().all(|a| a.as_deref() != Ok("rs3")),
        "the unresolved real answered"
    );

    // Powered on: it joins the table within 2 s.
    topo.reals[2].ns.ip("link set eth0 up");
    let up = Instant::now();
    wait_until("the real resolved and in the table", || {
        let st = status(&daemon);
        let r = real_of(&st, reals[2]);
        r["resolved"] == true && r["effective_weight"] == 1
    });
    let took = up.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the real joined {took:?} after its link came up; the daemon should ask every second"
    );
    let answers = requests(&topo, 60);
    assert!(
        answers.iter().any(|a| a.as_deref() == Ok("rs3")),
        "the resolved real gets no new flows: {answers:?}"
    );
}

#[test]
fn disabling_a_real_under_load_drops_nothing_and_moves_no_other_flow() {
    require_root();
    let lab = Lab::start("cd", 3, &SERVER_ARGS);
    let daemon = &lab.daemon;
    // A big table: building it takes a while, which is when a slot cleared too early
    // would drop the disabled real's packets.
    daemon.cli_ok(&["vip", "add", SERVICE, "--table-size", "655373"]);
    for real in &lab.topo.reals {
        daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
    let mut conns = harness::keep_alive(&lab.topo, target(), 30, TIMEOUT);
    assert!(
        conns.iter().any(|(_, r)| r == "rs3") && conns.iter().any(|(_, r)| r != "rs3"),
        "30 connections did not spread over the reals: {:?}",
        conns.iter().map(|(_, r)| r).collect::<Vec<_>>()
    );
    let drops_before = verdict(daemon, "drop_no_real");
    let stop = AtomicBool::new(false);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let gone = lab.topo.reals[2].ipv4.to_string();
    thread::scope(|s| {
        // Every connection keeps sending while the real is disabled.
        for (i, (c, real)) in conns.iter_mut().enumerate() {
            let (stop, failures) = (&stop, &failures);
            s.spawn(move || {
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) || sent < 3 {
                    sent += 1;
                    match c.get() {
                        Ok(a) if a.real == *real => {}
                        other => {
                            if real != "rs3" {
                                failures.lock().expect("lock").push(format!(
                                    "connection {i} on {real}: {:?}",
                                    other.map(|a| a.real)
                                ));
                            }
                            return;
                        }
                    }
                }
            });
        }
        thread::sleep(Duration::from_millis(200));
        daemon.cli_ok(&["real", "disable", SERVICE, &gone]);
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().expect("lock");
    assert!(
        failures.is_empty(),
        "connections on the other reals failed: {failures:?}"
    );
    assert_eq!(
        verdict(daemon, "drop_no_real") - drops_before,
        0,
        "packets were dropped for want of a real while the table was rebuilt"
    );
    // New flows never reach the disabled real.
    let answers = requests(&lab.topo, 40);
    assert!(
        answers.iter().all(|a| matches!(a, Ok(r) if r != "rs3")),
        "{answers:?}"
    );
}

#[test]
fn failing_checks_never_empty_a_service_when_the_other_reals_are_drained() {
    require_root();
    let topo = balanced_topology(&unique_prefix("cg"), 4);
    let dir = RunDir::new(&format!("xlb-{}", topo.prefix()));
    let fail = |i: usize| dir.path().join(format!("{}.fail", real_name(i)));
    let servers: Vec<Proc> = (0..4)
        .map(|i| {
            let file = fail(i);
            start_real(
                &topo.reals[i].ns,
                &real_name(i),
                &[
                    "--http",
                    "0.0.0.0:80",
                    "--health-fail-file",
                    path_str(&file),
                ],
            )
        })
        .collect();
    let reals: Vec<Ipv4Addr> = topo.reals.iter().map(|r| r.ipv4).collect();
    let check = "    health_check:\n      kind: http\n      path: /health\n      interval_ms: 200\n      timeout_ms: 100\n      rise: 2\n      fall: 2\n";
    let drain = "        drain: true\n";
    let config = write_file(
        dir.path(),
        "xlb.yaml",
        &config_yaml(
            &[
                (reals[0], ""),
                (reals[1], ""),
                (reals[2], drain),
                (reals[3], drain),
            ],
            check,
        ),
    );
    let daemon = Daemon::start_in(
        &topo.lb.ns,
        "eth0",
        dir.path(),
        &["--no-pin", "--config", path_str(&config)],
    );
    // Both enabled reals fail their check.
    for i in [0, 1] {
        std::fs::write(fail(i), b"").expect("fail file");
    }
    // The guard must engage: both reals that can serve are down.
    let deadline = Instant::now() + WAIT;
    loop {
        let st = status(&daemon);
        let v = vip_of(&st, SERVICE);
        let down = v["health"].as_array().map_or(0, |h| {
            h.iter().filter(|r| r["status"]["up"] == false).count()
        });
        if down == 2 && v["guarded"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the avalanche guard is not on with both enabled reals down: {st}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let drops = verdict(&daemon, "drop_no_real");
    let answers = requests(&topo, 40);
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(ok, 40, "{ok} of 40 requests answered: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a.as_deref(), Ok("rs1" | "rs2"))),
        "drained reals got new flows: {answers:?}"
    );
    assert_eq!(verdict(&daemon, "drop_no_real"), drops);
    drop(servers);
}

/// The data path's config map (the interface MAC the frames are sent from) as pinned.
fn pinned_config(run: &PinnedRun) -> Config {
    let path = run
        .pin_dir()
        .join(format!("v{}", lb_userspace::pin::LAYOUT_VERSION))
        .join(map_names::CONFIG);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening the pinned {}: {e}", path.display()));
    let map: Array<MapData, Config> =
        Array::try_from(Map::Array(data)).expect("the config map is an array");
    map.get(&0, 0).expect("reading the config map")
}

#[test]
fn a_second_daemon_fails_before_touching_the_running_data_path() {
    require_root();
    let topo = balanced_topology(&unique_prefix("cx"), 2);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    daemon.cli_ok(&["vip", "add", SERVICE]);
    for real in &topo.reals {
        daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
    let before = pinned_config(&run);
    // Another interface with another MAC and MTU, as a mistyped unit would name.
    topo.lb
        .ns
        .ip("link add xlbtest0 mtu 1280 type veth peer name xlbtest1");
    topo.lb.ns.ip("link set xlbtest0 up");
    let mut second = Daemon::spawn_in(
        &topo.lb.ns,
        "xlbtest0",
        run.dir(),
        &["--pin-dir", path_str(run.pin_dir())],
    );
    let (code, log) = second.wait_exit();
    assert!(!code.success(), "a second daemon started: {log}");
    assert!(
        log.contains("another xlb daemon is running"),
        "the second daemon's error does not say why: {log}"
    );
    assert_eq!(
        pinned_config(&run),
        before,
        "the second daemon wrote the running data path's config"
    );
    // The first one still serves, and its socket still answers.
    let answers = requests(&topo, 20);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    daemon.cli_ok(&["status"]);
}

#[test]
fn a_crash_at_any_write_of_a_change_keeps_every_flow_and_the_restart_serves() {
    require_root();
    let topo = balanced_topology(&unique_prefix("ck"), 4);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let reals: Vec<String> = topo.reals.iter().map(|r| r.ipv4.to_string()).collect();
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    daemon.cli_ok(&["vip", "add", SERVICE, "--table-size", "4093"]);
    for real in &reals[..3] {
        daemon.cli_ok(&["real", "add", SERVICE, real]);
    }
    let mut conns = harness::keep_alive(&topo, target(), 20, TIMEOUT);
    // Adding the fourth real writes its slot, its table, then the flip: a crash after
    // each of these writes in turn.
    for write in 1..=3 {
        daemon.stop();
        let n = write.to_string();
        daemon = Daemon::start_in_env(
            &topo.lb.ns,
            "eth0",
            run.dir(),
            &["--pin-dir", path_str(run.pin_dir())],
            &[("XLB_TEST_PAUSE_AFTER_WRITES", &n)],
        );
        let mut cli: std::process::Child = daemon
            .command(&["real", "add", SERVICE, &reals[3]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xlb real add");
        daemon.wait_for_log(&format!("pausing after map write {write} "));
        daemon.kill();
        let _ = cli.kill();
        let _ = cli.wait();
        let broken = check_keep_alive(&mut conns);
        assert!(
            broken.is_empty(),
            "crash after write {write}: established connections broke: {broken:?}"
        );
        daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
        let broken = check_keep_alive(&mut conns);
        assert!(
            broken.is_empty(),
            "restart after a crash at write {write}: established connections broke: {broken:?}"
        );
        let answers = requests(&topo, 30);
        let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "restart after a crash at write {write}: new connections failed: {failed:?}\n{}",
            daemon.log()
        );
        let st = status(&daemon);
        let listed = vip_of(&st, SERVICE)["reals"].as_array().map_or(0, Vec::len);
        assert_eq!(listed, 3, "the unsaved change is half there: {st}");
    }
    // And the change goes through once nothing stops it.
    daemon.cli_ok(&["real", "add", SERVICE, &reals[3]]);
    wait_until("the fourth real gets new flows", || {
        requests(&topo, 20)
            .iter()
            .any(|a| a.as_deref() == Ok("rs4"))
    });
    assert!(check_keep_alive(&mut conns).is_empty());
}

#[test]
fn scraping_a_million_tracked_flows_never_delays_a_change() {
    require_root();
    let topo = balanced_topology(&unique_prefix("cm"), 2);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let metrics = "127.0.0.1:9815";
    let daemon = Daemon::start_pinned(
        &topo.lb.ns,
        "eth0",
        &run,
        &["--conntrack-size", "2000000", "--metrics-addr", metrics],
    );
    daemon.cli_ok(&["vip", "add", SERVICE, "--table-size", "251"]);
    for real in &topo.reals {
        daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
    // A million flows in the conntrack table, as a busy balancer has.
    let flows = lb_userspace::conntrack::Table::open_pinned(
        &run.pin_dir()
            .join(format!("v{}", lb_userspace::pin::LAYOUT_VERSION)),
    )
    .expect("the pinned conntrack table");
    for n in 0..1_000_000u32 {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[198, 18, (n >> 8) as u8, n as u8]);
        let key = FlowKey {
            src,
            dst: {
                let mut d = [0u8; 16];
                d[..4].copy_from_slice(&VIP.octets());
                d
            },
            ports: (n >> 16) << 16 | 80,
            proto: 6,
            family: lb_common::FAMILY_V4,
            _pad: [0; 2],
        };
        let state = FlowState {
            real_id: 1,
            ..FlowState::default()
        };
        flows.insert(&key, &state);
    }
    let stop = AtomicBool::new(false);
    // The latest scrape's count: the daemon counts the table every 5 s, so
    // the changes wait until a scrape shows the big table (the insert above
    // may end between two counts).
    let seen = AtomicU64::new(0);
    let real = topo.reals[0].ipv4.to_string();
    let path = format!("/v1/vips/tcp/{VIP}/80/reals/{real}");
    let mut took = Vec::new();
    let scrapes = thread::scope(|s| {
        let scraper = s.spawn(|| {
            let mut scrapes = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = topo.lb.ns.exec(&[
                    "curl",
                    "-s",
                    "--max-time",
                    "30",
                    &format!("http://{metrics}/metrics"),
                ]);
                let text = String::from_utf8_lossy(&out.stdout);
                if let Some(v) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("xlb_conntrack_entries "))
                {
                    seen.store(v.trim().parse().unwrap_or(0), Ordering::Relaxed);
                }
                scrapes += 1;
            }
            scrapes
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.load(Ordering::Relaxed) < 500_000 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        for weight in 2..12 {
            let started = Instant::now();
            let (code, body) = api_request(
                daemon.socket(),
                "PUT",
                &path,
                Some(&format!("{{\"weight\": {weight}}}")),
            );
            took.push(started.elapsed());
            assert_eq!(code, 200, "PUT weight answered {code}: {body}");
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        scraper.join().expect("the scraper panicked")
    });
    let entries = seen.load(Ordering::Relaxed);
    assert!(
        entries >= 500_000,
        "the scrapes did not see the big table ({entries} entries, {scrapes} scrapes)"
    );
    let worst = took.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(100),
        "a weight change took {worst:?} while the metrics were scraped ({took:?})"
    );
}

#[test]
fn changes_made_by_hand_survive_reloads_and_restarts_until_reset() {
    require_root();
    let topo = balanced_topology(&unique_prefix("co"), 3);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let reals: Vec<Ipv4Addr> = topo.reals.iter().map(|r| r.ipv4).collect();
    let all = config_yaml(&[(reals[0], ""), (reals[1], ""), (reals[2], "")], "");
    let config = write_file(run.dir(), "xlb.yaml", &all);
    let args = ["--config", path_str(&config)];
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &args);
    let (r2, r3) = (reals[1].to_string(), reals[2].to_string());
    daemon.cli_ok(&["real", "drain", SERVICE, &r2]);
    daemon.cli_ok(&["real", "set", SERVICE, &r3, "--weight", "5"]);
    let expect_overrides = |daemon: &Daemon, when: &str| {
        let st = status(daemon);
        let (a, b) = (real_of(&st, reals[1]), real_of(&st, reals[2]));
        assert_eq!(
            (&a["admin"], &a["admin_source"]),
            (&"drain".into(), &"override".into()),
            "{when}: {a}"
        );
        assert_eq!(
            (&b["weight"], &b["weight_source"]),
            (&5.into(), &"override".into()),
            "{when}: {b}"
        );
        assert_eq!(
            a["effective_weight"], 0,
            "{when}: the drained real takes flows"
        );
    };
    expect_overrides(&daemon, "after the commands");

    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded");
    expect_overrides(&daemon, "after a reload of the same file");
    daemon.cli_ok(&["apply", path_str(&config)]);
    expect_overrides(&daemon, "after `xlb apply` of the same file");
    // A VIP added by hand is not in the file: the restart below starts from
    // the file's VIPs, removing it from the adopted maps (it once failed to
    // start, removing the VIP a second time).
    daemon.cli_ok(&["vip", "add", "203.0.113.40:80/tcp"]);
    // A restart as the unit does it: same --config.
    daemon.stop();
    daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &args);
    expect_overrides(&daemon, "after a restart with --config");
    let vips: Vec<String> = json(&daemon.cli_ok(&["vip", "list", "--json"]), "xlb vip list")
        .as_array()
        .expect("a list of VIPs")
        .iter()
        .map(|v| v["vip"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(vips, [SERVICE], "the hand-added VIP outlived the restart");
    daemon.kill();
    daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &args);
    expect_overrides(&daemon, "after kill -9 and a restart with --config");
    let text = daemon.cli_ok(&["status"]);
    assert!(
        text.contains("drain*"),
        "status does not mark the override:\n{text}"
    );

    // Reset: the file's values apply again.
    daemon.cli_ok(&["real", "reset-override", SERVICE, &r2]);
    let st = status(&daemon);
    let a = real_of(&st, reals[1]);
    assert_eq!(
        (&a["admin"], &a["admin_source"]),
        (&"enabled".into(), &"config".into())
    );
    assert_eq!(a["effective_weight"], 1);
    let out = daemon.cli(&["real", "reset-override", SERVICE, &r2]);
    assert!(!out.status.success(), "resetting twice succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no override"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A real that leaves the file takes its override with it.
    let two = config_yaml(&[(reals[0], ""), (reals[1], "")], "");
    write_file(run.dir(), "xlb.yaml", &two);
    daemon.signal(Signal::SIGHUP);
    wait_until("the reload removed the third real", || {
        vip_of(&status(&daemon), SERVICE)["reals"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    });
    write_file(run.dir(), "xlb.yaml", &all);
    daemon.signal(Signal::SIGHUP);
    wait_until("the reload brought the third real back", || {
        vip_of(&status(&daemon), SERVICE)["reals"]
            .as_array()
            .is_some_and(|r| r.len() == 3)
    });
    let st = status(&daemon);
    let b = real_of(&st, reals[2]);
    assert_eq!(
        (&b["weight"], &b["weight_source"]),
        (&1.into(), &"config".into()),
        "an override outlived its real: {b}"
    );
}
