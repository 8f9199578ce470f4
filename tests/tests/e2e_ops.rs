//! netns end-to-end, operations: what an operator does to a running balancer. Hitless
//! restarts from pins (a crash, `--replace`), `xlb teardown`, `xlb apply` and SIGHUP
//! reloads of the desired state, the control socket's permissions and the Prometheus
//! endpoint, all with the real daemon and CLI, real HTTP through the XDP program.
//!
//! Needs root (namespaces, XDP, a bpffs mount) and runs one test at a time (`./x test`
//! does both). The binaries come from `XLB_BIN` / `XLB_TESTSRV_BIN`, or from the target
//! directory after `cargo build --workspace --bins`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use xlb_tests::harness::require_root;

use aya::maps::{Array, HashMap as AyaHashMap, Map, MapData};
use lb_common::{VipKey, VipMeta, VipSlot, map_names};
use lb_userspace::model::Vip;

use nix::sys::signal::Signal;
use xlb_tests::harness::{
    Daemon, KeepAlive, Lab, PinnedRun, RunDir, VIP, balanced_topology, http_get, json,
    metric_samples, scrape_metrics, start_reals, wait_until, xlb_bin,
};
use xlb_tests::netns::{Host, Topology, unique_prefix};

const SERVICE: &str = "203.0.113.10:80/tcp";
const TIMEOUT: Duration = Duration::from_secs(3);
const SERVER_ARGS: [&str; 2] = ["--http", "0.0.0.0:80"];

fn target() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// `SERVICE` with every real of `topo`, configured through the CLI.
fn configure(daemon: &Daemon, topo: &Topology) {
    daemon.cli_ok(&["vip", "add", SERVICE]);
    for real in &topo.reals {
        daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
}

/// `xlb status --json`.
fn status(daemon: &Daemon) -> serde_json::Value {
    json(&daemon.cli_ok(&["status", "--json"]), "xlb status --json")
}

/// The VIP `service` of a `status` / `vip list` / `stats` answer.
fn vip_of<'a>(vips: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
    vips.as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == service))
        .unwrap_or_else(|| panic!("no VIP {service} in {vips}"))
}

fn packets(v: &serde_json::Value) -> u64 {
    v["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no packets counter in {v}"))
}

/// What a VIP is, without what it has counted: VIP, options and each real's address,
/// weight, admin state and MAC.
fn shape(vip: &serde_json::Value) -> serde_json::Value {
    let reals: Vec<serde_json::Value> = vip["reals"]
        .as_array()
        .unwrap_or_else(|| panic!("no reals in {vip}"))
        .iter()
        .map(|r| {
            serde_json::json!({
                "addr": r["addr"], "weight": r["weight"], "admin": r["admin"], "mac": r["mac"],
            })
        })
        .collect();
    serde_json::json!({
        "vip": vip["vip"], "id": vip["id"], "scheduler": vip["scheduler"],
        "forward": vip["forward"], "table_size": vip["table_size"], "reals": reals,
    })
}

/// Addresses of the reals of `service` in `xlb vip list --json`.
fn real_addrs(daemon: &Daemon, service: &str) -> Vec<String> {
    let list = json(
        &daemon.cli_ok(&["vip", "list", "--json"]),
        "xlb vip list --json",
    );
    vip_of(&list, service)["reals"]
        .as_array()
        .unwrap_or_else(|| panic!("no reals in {list}"))
        .iter()
        .map(|r| {
            r["addr"]
                .as_str()
                .expect("addresses are strings")
                .to_owned()
        })
        .collect()
}

/// The `ip -d link show eth0` of a host.
fn link_details(host: &Host) -> String {
    String::from_utf8_lossy(&host.ns.ip("-d link show eth0").stdout).into_owned()
}

/// The id of the XDP program on a host's `eth0`, if any.
fn xdp_prog_id(host: &Host) -> Option<u64> {
    let out = host.ns.ip("-j -d link show eth0");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    links[0]["xdp"]["prog"]["id"].as_u64()
}

/// Sets the flag when dropped, so a failing test stops the load it started before the
/// thread scope waits for it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A bounded HTTP load: one connection per request to the VIP, counted per phase.
struct Load {
    /// The phase requests are counted in (set by the test: before, during, after).
    phase: AtomicUsize,
    /// Answered requests per phase.
    ok: [AtomicUsize; 3],
    /// Failed requests, with their phase and error.
    failures: Mutex<Vec<(usize, String)>>,
    stop: AtomicBool,
}

/// The load stops by itself after this many requests or this long, whatever the test does.
const LOAD_MAX_REQUESTS: usize = 100_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

impl Load {
    fn new() -> Load {
        Load {
            phase: AtomicUsize::new(0),
            ok: Default::default(),
            failures: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    /// Sends requests until told to stop (or its bounds). Call inside the client's
    /// namespace.
    fn run(&self) {
        let started = Instant::now();
        for _ in 0..LOAD_MAX_REQUESTS {
            if self.stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_MAX_TIME {
                break;
            }
            let phase = self.phase.load(Ordering::Relaxed);
            match http_get(target(), TIMEOUT) {
                Ok(_) => {
                    self.ok[phase].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.failures.lock().expect("not poisoned").push((phase, e)),
            }
        }
    }

    fn ok(&self, phase: usize) -> usize {
        self.ok[phase].load(Ordering::Relaxed)
    }

    /// Waits until `n` requests of the current phase were answered.
    fn wait_for(&self, n: usize) {
        let phase = self.phase.load(Ordering::Relaxed);
        wait_until(
            &format!("{n} answered requests in load phase {phase}"),
            || self.ok(phase) >= n || self.stop.load(Ordering::Relaxed),
        );
    }
}

#[test]
fn kill_9_and_restart_adopts_the_pins_and_no_request_fails() {
    require_root();
    let topo = balanced_topology(&unique_prefix("oh"), 3);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    configure(&daemon, &topo);
    let before = status(&daemon);
    let shape_before = shape(vip_of(&before["vips"], SERVICE));

    let load = Load::new();
    // Requests each phase must see answered before the test moves on.
    let per_phase = 100;
    let (before_kill, after_restart, restarted_log) = thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        let client = s.spawn(|| topo.client.ns.run_in(|| load.run()));
        load.wait_for(per_phase);
        let before_kill = packets(vip_of(&status(&daemon)["vips"], SERVICE));

        // A crash: no clean-up, the socket file stays, the data path runs on its pins.
        daemon.kill();
        load.phase.store(1, Ordering::Relaxed);
        load.wait_for(per_phase);

        daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
        load.phase.store(2, Ordering::Relaxed);
        let after_restart = status(&daemon);
        load.wait_for(per_phase);
        load.stop.store(true, Ordering::Relaxed);
        client.join().expect("the load thread panicked");
        (before_kill, after_restart, daemon.log())
    });

    let failures = load.failures.lock().expect("not poisoned");
    let answered = [load.ok(0), load.ok(1), load.ok(2)];
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the kill -9 and restart (phase 0 before, 1 without \
         daemon, 2 restarted); first ones: {:?}",
        failures.len(),
        failures.len() + answered.iter().sum::<usize>(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        answered.iter().all(|n| *n >= per_phase),
        "answered per phase: {answered:?}"
    );
    assert!(
        restarted_log.contains("adopted the running data path"),
        "the restarted daemon did not adopt the pins; its log:\n{restarted_log}"
    );

    // The same VIP and reals, the counters carried on.
    let restarted = vip_of(&after_restart["vips"], SERVICE);
    assert_eq!(
        shape(restarted),
        shape_before,
        "the restarted daemon shows another VIP/real set"
    );
    let at_restart = packets(restarted);
    assert!(
        at_restart > before_kill,
        "VIP packets went from {before_kill} before the kill to {at_restart} after the \
         restart: counters were reset (or nothing was counted while no daemon ran)"
    );
    let at_end = packets(vip_of(&status(&daemon)["vips"], SERVICE));
    assert!(
        at_end > at_restart,
        "VIP packets did not grow after the restart ({at_restart} -> {at_end})"
    );
}

/// The meta `service`'s slot of the pinned `XLB_VIP_SLOTS` at `pin` holds,
/// when the slot holds `service`.
fn vip_slot_meta(pin: &Path, service: &str) -> Option<VipMeta> {
    let key = service.parse::<Vip>().expect("a valid service").key();
    let map = MapData::from_pin(pin).unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()));
    let slots: Array<_, VipSlot> = Array::try_from(Map::Array(map)).expect("an array map");
    let slot = lb_common::vip_filter_slot(&key.addr, key.port_be, key.proto);
    let entry = slots
        .get(&slot, 0)
        .unwrap_or_else(|e| panic!("reading slot {slot}: {e}"));
    let held = (entry.addr, entry.port_be, entry.proto, entry.family);
    (held == (key.addr, key.port_be, key.proto, key.family)).then_some(entry.meta)
}

/// `service`'s meta in the pinned `XLB_VIPS` at `pin`.
fn vip_meta(pin: &Path, service: &str) -> VipMeta {
    let key = service.parse::<Vip>().expect("a valid service").key();
    let map = MapData::from_pin(pin).unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()));
    let vips: AyaHashMap<_, VipKey, VipMeta> =
        AyaHashMap::try_from(Map::HashMap(map)).expect("a hash map");
    vips.get(&key, 0)
        .unwrap_or_else(|e| panic!("{service} in {}: {e}", pin.display()))
}

/// An upgrade as the package does it: SIGTERM leaves the data path running,
/// `xlb run --replace` swaps the program in place, from pins of a release
/// that had one map fewer (`XLB_VIP_SLOTS`), and an open connection keeps
/// its real throughout.
#[test]
fn an_open_connection_keeps_its_real_across_run_replace() {
    require_root();
    let topo = balanced_topology(&unique_prefix("or"), 3);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    configure(&daemon, &topo);
    let shape_before = shape(vip_of(&status(&daemon)["vips"], SERVICE));
    let prog_before = xdp_prog_id(&topo.lb).expect("an XDP program on the balancer's eth0");

    let mut conn = topo
        .client
        .ns
        .run_in(|| KeepAlive::connect(target(), TIMEOUT))
        .unwrap_or_else(|e| panic!("connecting to the VIP: {e}"));
    let mut get = |when: &str| -> String {
        let answers: Vec<String> = (0..5)
            .map(|i| {
                conn.get()
                    .unwrap_or_else(|e| panic!("request {i} {when} on the open connection: {e}"))
                    .real
            })
            .collect();
        assert!(
            answers.iter().all(|r| *r == answers[0]),
            "one connection was answered by several reals {when}: {answers:?}"
        );
        answers[0].clone()
    };
    let first = get("before the upgrade");

    // SIGTERM: a pinned daemon leaves the data path running.
    let stopped = daemon.stop().expect("the daemon stopped");
    assert!(
        stopped.success(),
        "xlb run exited with {stopped} on SIGTERM"
    );
    assert!(
        daemon
            .log()
            .contains("the data path keeps running from its pins"),
        "the stopped daemon did not leave its data path; its log:\n{}",
        daemon.log()
    );
    assert_eq!(get("with no daemon running"), first);

    // The upgrade comes from a release without XLB_VIP_SLOTS: its pins lack
    // that map (the running program keeps its own; unpinning frees nothing).
    let slots_pin = run
        .pins()
        .into_iter()
        .find(|p| p.ends_with(map_names::VIP_SLOTS))
        .unwrap_or_else(|| panic!("no {} pin in {:?}", map_names::VIP_SLOTS, run.pins()));
    let slots_pin = run.pin_dir().join(slots_pin);
    std::fs::remove_file(&slots_pin)
        .unwrap_or_else(|e| panic!("removing {}: {e}", slots_pin.display()));

    daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &["--replace"]);
    let log = daemon.log();
    assert!(
        log.contains("program replaced in place"),
        "xlb run --replace did not replace the program; its log:\n{log}"
    );
    let prog_after = xdp_prog_id(&topo.lb).expect("an XDP program on eth0 after --replace");
    assert_ne!(
        prog_after, prog_before,
        "eth0 still runs program {prog_before} after --replace"
    );
    assert_eq!(get("after xlb run --replace"), first);
    // The new daemon made the missing map and gave the service its slot
    // before its program, which reads it, took over.
    assert_eq!(
        vip_slot_meta(&slots_pin, SERVICE),
        Some(vip_meta(
            &slots_pin.with_file_name(map_names::VIPS),
            SERVICE
        )),
        "{SERVICE}'s entry in the re-created {}",
        slots_pin.display()
    );

    // The new program serves new connections too, with the same VIP and reals.
    let fresh = topo.client.ns.run_in(|| http_get(target(), TIMEOUT));
    fresh.unwrap_or_else(|e| panic!("a new connection after --replace: {e}"));
    assert_eq!(
        shape(vip_of(&status(&daemon)["vips"], SERVICE)),
        shape_before,
        "the replacing daemon shows another VIP/real set"
    );
}

#[test]
fn teardown_detaches_the_pinned_data_path() {
    require_root();
    let topo = balanced_topology(&unique_prefix("ot"), 1);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let run = PinnedRun::new(topo.prefix());
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    configure(&daemon, &topo);
    let request = || topo.client.ns.run_in(|| http_get(target(), TIMEOUT));
    request().unwrap_or_else(|e| panic!("a request with the daemon running: {e}"));
    let pin_dir = run.pin_dir().to_str().expect("UTF-8 path").to_owned();
    let state_file = run.state_file().to_str().expect("UTF-8 path").to_owned();
    let teardown = [
        "teardown",
        "--pin-dir",
        &pin_dir,
        "--state-file",
        &state_file,
    ];

    // Under a running daemon: refused (4), nothing removed, still forwarding.
    let pins = run.pins();
    let out = daemon.cli(&teardown);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "teardown under a running daemon: {stderr}"
    );
    assert!(
        stderr.contains("a running xlb daemon uses the pins") && stderr.contains("--force"),
        "the refusal should name the running daemon and --force: {stderr}"
    );
    assert_eq!(run.pins(), pins, "a refused teardown removed pins");
    assert!(
        run.state_file().exists(),
        "a refused teardown removed the state file"
    );
    request().unwrap_or_else(|e| panic!("a request after a refused teardown: {e}"));

    daemon.stop();
    assert!(
        link_details(&topo.lb).contains("xdp"),
        "no XDP program on eth0 after a pinned daemon stopped: {}",
        link_details(&topo.lb)
    );
    request().unwrap_or_else(|e| panic!("a request after the pinned daemon stopped: {e}"));
    assert!(
        !run.pins().is_empty(),
        "nothing pinned under {}",
        run.pin_dir().display()
    );

    assert_detached(&daemon, &topo.lb, &teardown);
    assert_eq!(run.pins(), Vec::<String>::new(), "pins left after teardown");
    assert!(
        !run.state_file().exists(),
        "the state file is still there after teardown"
    );

    // Nothing forwards VIP traffic any more (the balancer host does not route).
    let short = Duration::from_secs(1);
    let after = topo.client.ns.run_in(|| http_get(target(), short));
    assert!(
        after.is_err(),
        "a request to the VIP was answered after teardown: {after:?}"
    );
    let out = daemon.cli_ok(&teardown);
    assert!(
        out.contains("nothing pinned"),
        "a second teardown should find nothing: {out}"
    );

    // `--force` detaches a running daemon's data path all the same.
    let mut daemon = Daemon::start_pinned(&topo.lb.ns, "eth0", &run, &[]);
    configure(&daemon, &topo);
    request().unwrap_or_else(|e| panic!("a request with the second daemon running: {e}"));
    assert_detached(&daemon, &topo.lb, &[&teardown[..], &["--force"]].concat());
    // That daemon stops on its own: the data path it would go on reporting
    // and changing is gone, and it leaves no state file behind.
    let (status, log) = daemon.wait_exit();
    assert!(
        status.success(),
        "the detached daemon exited {status}: {log}"
    );
    assert!(
        log.contains("the data path was detached from under this daemon"),
        "the detached daemon's log does not say why it stopped: {log}"
    );
    assert!(
        !run.state_file().exists(),
        "the state file is back after the forced teardown"
    );
}

/// Runs `xlb ARGS` (a teardown), which must say it detached the data path
/// and leave `lb`'s eth0 without an XDP program.
fn assert_detached(daemon: &Daemon, lb: &Host, args: &[&str]) {
    let command = args.join(" ");
    let out = daemon.cli_ok(args);
    assert!(
        out.contains("the data path is detached"),
        "unexpected `xlb {command}` output: {out}"
    );
    let details = link_details(lb);
    assert!(
        !details.contains("xdp"),
        "eth0 still has an XDP program after xlb {command}: {details}"
    );
}

/// A scratch directory for configuration files, named after the topology.
fn config_dir(topo: &Topology) -> RunDir {
    RunDir::new(&format!("xlb-cfg-{}", topo.prefix()))
}

/// Writes `text` to `DIR/NAME` and returns the path as a string.
fn write_file(dir: &RunDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_str().expect("UTF-8 path").to_owned()
}

/// A `services:` document for `SERVICE` with `(address, weight)` reals.
fn services_yaml(reals: &[(Ipv4Addr, u32)]) -> String {
    let mut text = format!("services:\n  - vip: {SERVICE}\n    reals:\n");
    for (addr, weight) in reals {
        text.push_str(&format!(
            "      - address: {addr}\n        weight: {weight}\n"
        ));
    }
    text
}

/// `(map writes, tables rebuilt)` of `xlb apply`'s "applied FILE: N services, W map
/// writes, T tables rebuilt".
fn applied_counts(out: &str) -> (usize, usize) {
    let number_before = |what: &str| -> usize {
        let head = out
            .split(what)
            .next()
            .filter(|h| h.len() < out.len())
            .unwrap_or_else(|| panic!("no {what:?} in `xlb apply` output: {out:?}"));
        head.rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {what:?} in {out:?}"))
    };
    (
        number_before(" map writes"),
        number_before(" tables rebuilt"),
    )
}

/// Asserts that an `xlb` command failed and that its stderr names every one of `needles`.
fn assert_failed_naming(out: &Output, what: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: stderr does not mention {needle:?}: {stderr}"
        );
    }
    stderr
}

#[test]
fn apply_changes_only_what_differs_and_a_bad_file_changes_nothing() {
    require_root();
    let lab = Lab::start("oa", 3, &SERVER_ARGS);
    let daemon = &lab.daemon;
    let dir = config_dir(&lab.topo);
    let reals: Vec<Ipv4Addr> = lab.topo.reals.iter().map(|r| r.ipv4).collect();
    let even: Vec<(Ipv4Addr, u32)> = reals.iter().map(|r| (*r, 1)).collect();

    let file = write_file(&dir, "even.yaml", &services_yaml(&even));
    let out = daemon.cli_ok(&["apply", &file]);
    assert!(
        out.starts_with(&format!("applied {file}: 1 services")),
        "unexpected `xlb apply` output: {out:?}"
    );
    assert_eq!(
        applied_counts(&out).1,
        1,
        "a new VIP builds one table: {out:?}"
    );
    let desired = || {
        let (code, body) = daemon.api("GET", "/v1/desired", None);
        assert_eq!(code, 200, "GET /v1/desired answered {code}: {body}");
        body
    };
    let list_before = daemon.cli_ok(&["vip", "list", "--json"]);
    let desired_before = desired();

    let wrong_family = format!(
        "{}      - address: {}\n",
        services_yaml(&even),
        lab.topo.reals[0].ipv6
    );
    let off_segment = format!("{}      - address: 192.0.2.50\n", services_yaml(&even));
    let cases: [(&str, String, Vec<&str>); 5] = [
        (
            "port.yaml",
            "services:\n  - vip: 203.0.113.10:99999/tcp\n".to_owned(),
            vec!["services[0].vip", "port 99999 is out of range"],
        ),
        (
            "field.yaml",
            format!("{}    colour: blue\n", services_yaml(&even)),
            vec!["services[0]", "unknown field `colour`"],
        ),
        (
            "family.yaml",
            wrong_family,
            vec![
                "services[0].reals[3].address",
                "cannot serve 203.0.113.10:80/tcp",
            ],
        ),
        (
            "weight.yaml",
            services_yaml(&[(reals[0], 70_000)]),
            vec!["services[0].reals[0].weight", "70000 is out of range"],
        ),
        // Valid on paper, refused by the daemon: DR reals must be on the segment.
        ("segment.yaml", off_segment, vec!["192.0.2.50", "not on"]),
    ];
    for (name, text, needles) in &cases {
        let path = write_file(&dir, name, text);
        let out = daemon.cli(&["apply", &path]);
        // Every error names the file, the daemon's own too.
        let mut needles = needles.clone();
        needles.push(&path);
        let stderr = assert_failed_naming(&out, &format!("xlb apply {name}"), &needles);
        assert_eq!(
            stderr.matches(needles[1]).count(),
            1,
            "xlb apply {name} repeats its error: {stderr}"
        );
        assert_eq!(
            daemon.cli_ok(&["vip", "list", "--json"]),
            list_before,
            "xlb apply {name} failed but changed the VIPs"
        );
        assert_eq!(
            desired(),
            desired_before,
            "xlb apply {name} changed /v1/desired"
        );
    }

    // The daemon validates what it is sent, whatever the client checked.
    let body = serde_json::json!({
        "yaml": "services:\n  - vip: 203.0.113.10:99999/tcp\n",
        "file": "sent.yaml",
    })
    .to_string();
    let (code, answer) = daemon.api("PUT", "/v1/desired", Some(&body));
    assert_eq!(
        code, 400,
        "PUT /v1/desired with a bad port answered {code}: {answer}"
    );
    assert!(
        answer.contains("sent.yaml: services[0].vip"),
        "the API error does not name the file and place: {answer}"
    );
    assert_eq!(
        desired(),
        desired_before,
        "a refused PUT /v1/desired changed it"
    );

    // One weight changes: one table is rebuilt, and only it and the VIP entry are written.
    let mut heavier = even.clone();
    heavier[1].1 = 3;
    let file = write_file(&dir, "heavier.yaml", &services_yaml(&heavier));
    let out = daemon.cli_ok(&["apply", &file]);
    let (writes, tables) = applied_counts(&out);
    assert_eq!(
        tables, 1,
        "one weight changed, {tables} tables rebuilt: {out:?}"
    );
    assert!(
        (1..=2).contains(&writes),
        "one weight changed: expected the new table and the VIP entry pointing at it, got \
         {writes} map writes: {out:?}"
    );
    let list = json(
        &daemon.cli_ok(&["vip", "list", "--json"]),
        "xlb vip list --json",
    );
    let weights: Vec<u64> = vip_of(&list, SERVICE)["reals"]
        .as_array()
        .expect("reals")
        .iter()
        .map(|r| r["weight"].as_u64().expect("weights are numbers"))
        .collect();
    assert_eq!(weights, [1, 3, 1], "weights after the apply: {list}");

    // The same file again: nothing to do.
    let out = daemon.cli_ok(&["apply", &file]);
    assert_eq!(
        applied_counts(&out),
        (0, 0),
        "re-applying an unchanged file wrote maps: {out:?}"
    );
}

#[test]
fn sighup_reloads_the_config_file_and_a_bad_edit_changes_nothing() {
    require_root();
    let topo = balanced_topology(&unique_prefix("oc"), 3);
    let _servers = start_reals(&topo, &SERVER_ARGS);
    let dir = config_dir(&topo);
    let reals: Vec<Ipv4Addr> = topo.reals.iter().map(|r| r.ipv4).collect();
    let two = services_yaml(&[(reals[0], 1), (reals[1], 1)]);
    let config = write_file(
        &dir,
        "xlb.yaml",
        &format!("daemon:\n  interface: eth0\n{two}"),
    );
    let mut daemon = Daemon::start_with(&topo.lb.ns, "eth0", &["--no-pin", "--config", &config]);
    let names = |addrs: &[Ipv4Addr]| addrs.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(real_addrs(&daemon, SERVICE), names(&reals[..2]));

    // Add the third real and reload.
    let three = services_yaml(&[(reals[0], 1), (reals[1], 1), (reals[2], 1)]);
    write_file(&dir, "xlb.yaml", &three);
    daemon.signal(Signal::SIGHUP);
    wait_until("the third real after SIGHUP", || {
        real_addrs(&daemon, SERVICE).len() == 3
    });
    assert_eq!(real_addrs(&daemon, SERVICE), names(&reals));
    daemon.wait_for_log("configuration reloaded");
    let last = &status(&daemon)["last_reload"];
    assert_eq!(
        (&last["successful"], &last["source"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(format!("SIGHUP {config}"))
        ),
        "{last}"
    );
    let before = daemon.cli_ok(&["vip", "list", "--json"]);

    // A schema error: refused before anything is touched.
    let bad = services_yaml(&[(reals[0], 1), (reals[1], 1), (reals[2], 70_000)]);
    write_file(&dir, "xlb.yaml", &bad);
    assert_reload_changes_nothing(
        &mut daemon,
        "reload refused",
        &[config.as_str(), "services[0].reals[2].weight", "70000"],
        &before,
    );

    // An error only the daemon can see (a DR real off the segment): nothing changes either.
    let off = format!("{three}      - address: 192.0.2.50\n");
    write_file(&dir, "xlb.yaml", &off);
    assert_reload_changes_nothing(
        &mut daemon,
        "reload failed",
        &[config.as_str(), "192.0.2.50", "not on"],
        &before,
    );
    // Both are recorded as the last reload, failed, with the reason in full.
    let last = &status(&daemon)["last_reload"];
    assert_eq!(last["successful"], false, "{last}");
    assert_eq!(last["source"], format!("SIGHUP {config}"), "{last}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("192.0.2.50") && e.contains(config.as_str())),
        "{last}"
    );
    // The daemon still serves after both.
    let answer = topo.client.ns.run_in(|| http_get(target(), TIMEOUT));
    answer.unwrap_or_else(|e| panic!("a request after the refused reloads: {e}"));
}

/// Sends SIGHUP, waits for the log line containing `event`, checks it names
/// every one of `needles`, and that `xlb vip list --json` is still `before`.
fn assert_reload_changes_nothing(daemon: &mut Daemon, event: &str, needles: &[&str], before: &str) {
    daemon.signal(Signal::SIGHUP);
    let log = daemon.wait_for_log(event);
    let line = log
        .lines()
        .find(|l| l.contains(event))
        .expect("the line just waited for");
    for needle in needles {
        assert!(
            line.contains(needle),
            "the {event} line does not name {needle:?}: {line}"
        );
    }
    assert_eq!(
        daemon.cli_ok(&["vip", "list", "--json"]),
        before,
        "a {event} changed the VIPs"
    );
}

/// `xlb --socket SOCKET ARGS` as uid 65534 (nobody) with group `gid` and no others.
fn xlb_as_nobody(socket: &Path, gid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
        .arg(xlb_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux): {e}"))
}

#[test]
fn only_root_and_the_socket_group_may_use_the_control_socket() {
    require_root();
    // nobody's own group on Debian; the user is created by base-passwd everywhere.
    const NOGROUP: u32 = 65534;
    const OTHER_GID: u32 = 65533;
    let topo = balanced_topology(&unique_prefix("op"), 1);
    let daemon = Daemon::start(&topo.lb.ns, "eth0");
    let meta = std::fs::metadata(daemon.socket()).expect("the control socket exists");
    // The default group: `xlb` when the machine has it (the package creates it), else root.
    let default_gid = nix::unistd::Group::from_name("xlb")
        .ok()
        .flatten()
        .map_or(0, |g| g.gid.as_raw());
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, 0, default_gid),
        "the default control socket is not root:xlb (or root:root without an xlb group) 0660"
    );
    let out = xlb_as_nobody(daemon.socket(), NOGROUP, &["status"]);
    let stderr = assert_failed_naming(&out, "xlb status as nobody", &["Permission denied"]);
    assert!(
        stderr.contains(daemon.socket().to_str().expect("UTF-8")),
        "the error does not name the socket: {stderr}"
    );
    assert!(daemon.cli_ok(&["status"]).contains("interface eth0"));
    drop(daemon);

    // With --socket-group, members of that group get in; others still do not.
    let daemon = Daemon::start_with(
        &topo.lb.ns,
        "eth0",
        &["--no-pin", "--socket-group", "nogroup"],
    );
    let meta = std::fs::metadata(daemon.socket()).expect("the control socket exists");
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, NOGROUP),
        "--socket-group nogroup did not make the socket root:nogroup 0660"
    );
    let out = xlb_as_nobody(daemon.socket(), NOGROUP, &["status"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("interface eth0"),
        "xlb status as a member of the socket group failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = xlb_as_nobody(daemon.socket(), OTHER_GID, &["vip", "add", SERVICE]);
    assert_failed_naming(
        &out,
        "xlb vip add outside the socket group",
        &["Permission denied"],
    );
    assert_eq!(
        daemon.cli_ok(&["vip", "list"]).trim(),
        "no virtual services"
    );
}

fn sample(samples: &BTreeMap<String, f64>, series: &str, text: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in the scrape:\n{text}"))
}

#[test]
fn metrics_endpoint_reports_the_real_counters() {
    require_root();
    let addr = SocketAddr::from(([127, 0, 0, 1], 9814));
    let lab = Lab::start_with(
        "om",
        3,
        &SERVER_ARGS,
        &["--no-pin", "--metrics-addr", &addr.to_string()],
    );
    configure(&lab.daemon, &lab.topo);
    let changes = 1 + lab.topo.reals.len();
    let requests = 90;
    lab.topo.client.ns.run_in(|| {
        for i in 0..requests {
            http_get(target(), TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e}"));
        }
    });

    // Read the daemon's counters on both sides of the scrape until no late packet (a FIN
    // still crossing the balancer) moved them in between.
    let vip_counts = || {
        let stats = json(&lab.daemon.cli_ok(&["stats", "--json"]), "xlb stats --json");
        let vip = vip_of(&stats["vips"], SERVICE);
        (packets(vip), vip["bytes"].as_u64().expect("bytes"))
    };
    let mut attempts = 0;
    let (counts, text) = loop {
        let before = vip_counts();
        let text = scrape_metrics(&lab.topo.lb, addr);
        if vip_counts() == before {
            break (before, text);
        }
        attempts += 1;
        assert!(attempts < 50, "the VIP counters never settled");
        thread::sleep(Duration::from_millis(100));
    };
    let m = metric_samples(&text);
    // SERVICE as the labels every per-VIP series carries.
    let vip_label = r#"address="203.0.113.10",port="80",protocol="tcp""#;
    let vip_packets = sample(&m, &format!("xlb_vip_packets_total{{{vip_label}}}"), &text);
    let vip_bytes = sample(&m, &format!("xlb_vip_bytes_total{{{vip_label}}}"), &text);
    assert!(vip_packets > 0.0, "no VIP packets counted:\n{text}");
    assert_eq!(
        (vip_packets as u64, vip_bytes as u64),
        counts,
        "the metrics and `xlb stats --json` disagree on (packets, bytes)"
    );
    assert!(
        vip_packets as usize >= requests,
        "{vip_packets} VIP packets for {requests} connections"
    );
    let new_flows = sample(
        &m,
        &format!("xlb_vip_new_flows_total{{{vip_label}}}"),
        &text,
    );
    assert!(
        new_flows as usize >= requests,
        "{new_flows} new flows for {requests} connections"
    );

    let mut real_sum = 0.0;
    for real in &lab.topo.reals {
        let labels = format!("{vip_label},real=\"{}\"", real.ipv4);
        let packets = sample(&m, &format!("xlb_real_packets_total{{{labels}}}"), &text);
        assert!(packets > 0.0, "real {} got no packets:\n{text}", real.ipv4);
        real_sum += packets;
        let healthy = sample(&m, &format!("xlb_real_healthy{{{labels}}}"), &text);
        assert_eq!(
            healthy, 1.0,
            "real {} is not healthy in the metrics",
            real.ipv4
        );
        for name in ["xlb_real_weight", "xlb_real_effective_weight"] {
            let weight = sample(&m, &format!("{name}{{{labels}}}"), &text);
            assert_eq!(weight, 1.0, "real {}: {name} {weight}", real.ipv4);
        }
    }
    assert_eq!(
        real_sum, vip_packets,
        "the per-real packet counters do not add up to the VIP's"
    );

    let reconciles = sample(&m, "xlb_reconciles_total", &text);
    assert!(
        reconciles >= changes as f64,
        "{reconciles} reconciles after {changes} changes"
    );
    assert_eq!(sample(&m, "xlb_reconcile_errors_total", &text), 0.0);
    let tx: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("xlb_packets_total{verdict=\"tx"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        tx >= vip_packets,
        "{tx} XDP_TX packets, {vip_packets} for the VIP"
    );
    assert!(
        sample(&m, "xlb_conntrack_entries", &text) > 0.0,
        "the conntrack gauge is zero after {requests} connections"
    );
}
