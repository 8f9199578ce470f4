//! netns end-to-end, hostile or mistaken input: addresses that can never be a
//! service, health checks that would inject headers, YAML that expands, pin
//! directories that are not xlb's, TUN reals routed through another
//! interface. Every refusal names what is wrong and changes
//! nothing. Needs root; runs one test at a time (`./x test` does both).

use std::path::Path;

use nix::sys::signal::Signal;
use xlb_tests::harness::{
    Daemon, Lab, RunDir, json, path_str, real_listed, require_root, wait_until, xlb_bin,
};

const SERVICE: &str = "203.0.113.10:80/tcp";
const SERVER_ARGS: [&str; 2] = ["--http", "0.0.0.0:80"];

/// Asserts that `out` failed and its stderr mentions every needle; returns stderr.
fn refused(out: &std::process::Output, what: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} succeeded: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: stderr does not mention {n:?}: {stderr}"
        );
    }
    stderr
}

#[test]
fn addresses_that_can_never_serve_and_injected_headers_are_refused() {
    require_root();
    let lab = Lab::start("ia", 1, &SERVER_ARGS);
    let daemon = &lab.daemon;
    daemon.cli_ok(&["vip", "add", SERVICE]);
    let before = daemon.cli_ok(&["vip", "list", "--json"]);
    let own = lab.topo.lb.ipv4.to_string();
    let dir = RunDir::new(&format!("xlb-{}-bcast", lab.topo.prefix()));
    let broadcast_file = dir.path().join("broadcast.yaml");
    std::fs::write(
        &broadcast_file,
        format!("services:\n  - vip: {SERVICE}\n    reals:\n      - address: 198.51.100.255\n"),
    )
    .expect("write");
    let broadcast_file = broadcast_file.to_str().expect("UTF-8").to_owned();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["vip".into(), "add".into(), format!("{own}:80/tcp")],
            vec!["is an address of this host", &own, "--allow-local-vips"],
        ),
        (
            vec!["vip".into(), "add".into(), "198.51.100.255:80/tcp".into()],
            vec!["VIP 198.51.100.255:80/tcp is the broadcast address of 198.51.100.0/24 on eth0"],
        ),
        (
            vec![
                "real".into(),
                "add".into(),
                SERVICE.into(),
                "198.51.100.255".into(),
            ],
            vec!["real 198.51.100.255 is the broadcast address of 198.51.100.0/24 on eth0"],
        ),
        (
            vec!["apply".into(), broadcast_file.clone()],
            vec!["broadcast.yaml: real 198.51.100.255 is the broadcast address of 198.51.100.0/24"],
        ),
        (
            vec!["vip".into(), "add".into(), "224.0.0.5:80/tcp".into()],
            vec!["invalid VIP 224.0.0.5:80/tcp", "multicast"],
        ),
        (
            vec!["vip".into(), "add".into(), "0.0.0.0:80/tcp".into()],
            vec!["invalid VIP 0.0.0.0:80/tcp", "unspecified"],
        ),
        (
            vec!["real".into(), "add".into(), SERVICE.into(), own.clone()],
            vec!["is an address of this host"],
        ),
        (
            vec![
                "real".into(),
                "add".into(),
                SERVICE.into(),
                "127.0.0.1".into(),
            ],
            vec!["invalid real 127.0.0.1", "loopback"],
        ),
        (
            vec![
                "vip".into(),
                "add".into(),
                "203.0.113.11:80/tcp".into(),
                "--check".into(),
                "http".into(),
                "--check-path".into(),
                "/a\r\nX-Injected: 1".into(),
            ],
            vec!["health check: path", "control character"],
        ),
        (
            vec![
                "vip".into(),
                "add".into(),
                "203.0.113.11:80/tcp".into(),
                "--check".into(),
                "tcp".into(),
                "--check-port".into(),
                "0".into(),
            ],
            vec!["port must be 1-65535"],
        ),
        (
            vec![
                "vip".into(),
                "add".into(),
                "203.0.113.11:80/tcp".into(),
                "--check-path".into(),
                "/health".into(),
            ],
            vec!["--check-path needs --check KIND"],
        ),
        (
            vec![
                "vip".into(),
                "add".into(),
                "203.0.113.11:80/tcp".into(),
                "--check".into(),
                "http".into(),
                "--check-mode".into(),
                "syn".into(),
            ],
            vec![
                "health check: mode: syn is a half-open TCP probe: it serves kind tcp only, not http",
            ],
        ),
        (
            vec![
                "vip".into(),
                "add".into(),
                "203.0.113.11:80/tcp".into(),
                "--check".into(),
                "tcp".into(),
                "--check-mode".into(),
                "half".into(),
            ],
            vec!["'half' is not connect or syn"],
        ),
    ];
    for (args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = daemon.cli(&args);
        let stderr = refused(&out, &format!("xlb {}", args.join(" ")), needles);
        if stderr.contains("broadcast address of") {
            assert_eq!(
                code(&out),
                4,
                "a host-dependent refusal is exit 4: {stderr}"
            );
        }
    }
    assert_eq!(
        daemon.cli_ok(&["vip", "list", "--json"]),
        before,
        "a refused command changed the state"
    );
    // The API refuses the same things without the CLI's checks.
    let (code, body) = daemon.api(
        "POST",
        "/v1/vips",
        Some(r#"{"vip": "203.0.113.12:80/tcp", "health_check": {"kind": "http", "path": "/a\r\nX: y"}}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("control character"), "{body}");

    // The interface's subnets are read again at each change, not only at the
    // start: a subnet added to eth0 since takes DR reals, and its broadcast
    // address is refused.
    lab.topo.lb.ns.ip("addr add 192.0.2.1/24 dev eth0");
    let out = daemon.cli(&["real", "add", SERVICE, "192.0.2.255"]);
    let stderr = refused(
        &out,
        "xlb real add on the new subnet's broadcast address",
        &["real 192.0.2.255 is the broadcast address of 192.0.2.0/24 on eth0"],
    );
    assert_eq!(self::code(&out), 4, "{stderr}");
    daemon.cli_ok(&["real", "add", SERVICE, "192.0.2.50"]);
    let list = json(
        &daemon.cli_ok(&["real", "list", SERVICE, "--json"]),
        "xlb real list --json",
    );
    assert!(
        list.as_array()
            .is_some_and(|reals| reals.iter().any(|r| r["addr"] == "192.0.2.50")),
        "the real on the added subnet is not listed: {list}"
    );
}

#[test]
fn yaml_anchors_and_oversized_documents_are_refused_before_parsing() {
    require_root();
    let lab = Lab::start("iy", 1, &SERVER_ARGS);
    let daemon = &lab.daemon;
    let dir = RunDir::new(&format!("xlb-{}-yaml", lab.topo.prefix()));
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("UTF-8").to_owned()
    };
    // A billion-laughs style document: a few hundred bytes of nested aliases.
    let mut laughs = String::from("a: &a [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
    for (prev, next) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .windows(2)
        .map(|w| (w[0], w[1]))
    {
        laughs.push_str(&format!(
            "{next}: &{next} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let file = write("laughs.yaml", &laughs);
    let out = daemon.cli(&["apply", &file]);
    refused(
        &out,
        "apply of nested aliases",
        &["line 1", "anchors and aliases"],
    );
    let body = serde_json::json!({"yaml": laughs, "file": "sent.yaml"}).to_string();
    let (code, answer) = daemon.api("PUT", "/v1/desired", Some(&body));
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("sent.yaml: line 1"), "{answer}");

    let big = format!("# {}\n", "x".repeat(2 << 20));
    let body = serde_json::json!({"yaml": big}).to_string();
    let (code, answer) = daemon.api("PUT", "/v1/desired", Some(&body));
    assert!(
        code == 400 || code == 413,
        "a 2 MiB document answered {code}: {}",
        &answer[..answer.len().min(200)]
    );
    let list = json(&daemon.cli_ok(&["vip", "list", "--json"]), "vip list");
    assert_eq!(
        list,
        serde_json::json!([]),
        "a refused document changed the state"
    );
}

#[test]
fn pins_are_never_mounted_over_or_removed_outside_xlb_s_own() {
    require_root();
    let dir = RunDir::new("xlb-input-pins");
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).expect("mkdir");
    std::fs::write(busy.join("keep.txt"), b"precious").expect("write");
    // `xlb teardown` on a directory that is not a bpffs removes nothing.
    let out = std::process::Command::new(xlb_bin())
        .args(["teardown", "--pin-dir"])
        .arg(&busy)
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .output()
        .expect("xlb teardown");
    refused(&out, "teardown of a plain directory", &["not a bpffs"]);
    assert_eq!(
        std::fs::read(busy.join("keep.txt")).expect("the file is still there"),
        b"precious"
    );
    // `xlb run --pin-dir` on a directory with files in it refuses to mount over it.
    let lab = Lab::start("ip", 1, &SERVER_ARGS);
    let out = lab
        .daemon
        .command(&[])
        .args(["--socket"])
        .arg(dir.path().join("other.sock"))
        .args(["run", "--iface", "eth0", "--pin-dir"])
        .arg(&busy)
        .arg("--state-file")
        .arg(dir.path().join("other.json"))
        .output()
        .expect("xlb run");
    refused(
        &out,
        "run with a busy pin dir",
        &["neither a bpffs nor an empty directory"],
    );
    assert!(Path::new(&busy.join("keep.txt")).exists());
}

/// A state file `xlb run` cannot write stops the start, saying the cause once
/// (it was once both in the error's message and its source).
#[test]
fn a_state_file_that_cannot_be_written_stops_the_start_saying_its_cause_once() {
    require_root();
    let lab = Lab::start("is", 1, &SERVER_ARGS);
    let dir = RunDir::new(&format!("xlb-{}-state", lab.topo.prefix()));
    let out = lab
        .daemon
        .command(&[])
        .args(["--socket"])
        .arg(dir.path().join("other.sock"))
        .args(["run", "--iface", "eth0", "--no-pin", "--state-file"])
        .arg("/dev/null/xlb/state.json")
        .env("XLB_LOG", "off")
        .output()
        .expect("xlb run");
    assert_eq!(
        (
            code(&out),
            String::from_utf8_lossy(&out.stderr).into_owned()
        ),
        (
            1,
            "error: creating the directory of /dev/null/xlb/state.json: Not a directory (os \
             error 20)\n"
                .to_owned()
        )
    );
    // The daemon that runs is untouched.
    lab.daemon.cli_ok(&["status"]);
}

/// A capability mask from a `/proc/PID/status` line.
fn caps_of(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.trim(), 16).expect("hex mask")
}

#[test]
fn the_daemon_starts_under_the_unit_s_capabilities_and_keeps_only_three() {
    require_root();
    let lab = Lab::start("ic", 2, &SERVER_ARGS);
    let daemon = &lab.daemon;
    let pid = daemon.pid().as_raw();
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39), in every thread.
    let want: u64 = (1 << 12) | (1 << 38) | (1 << 39);
    for field in ["CapEff:", "CapPrm:"] {
        assert_eq!(caps_of(pid, field), want, "{field} of the daemon");
    }
    // The bounding set shrinks only with CAP_SETPCAP, which the unit does not
    // give: it stays the unit's (CAP_CHOWN and CAP_NET_RAW more), never more.
    // CAP_NET_RAW (13) served only at start-up: it is in no other set.
    assert_eq!(
        caps_of(pid, "CapBnd:") & !(want | 1 | (1 << 13)),
        0,
        "CapBnd: of the daemon"
    );
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let tid: i32 = task
            .expect("task")
            .file_name()
            .to_str()
            .and_then(|t| t.parse().ok())
            .expect("tid");
        let path = format!("/proc/{pid}/task/{tid}/status");
        let status = std::fs::read_to_string(&path).expect("task status");
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("CapEff");
        assert_eq!(eff, want, "thread {tid} kept other capabilities");
    }
    assert!(
        daemon.log().contains("dropped every other capability"),
        "{}",
        daemon.log()
    );
    // And it still does its work: changes, ARP for new reals, traffic.
    daemon.cli_ok(&["vip", "add", SERVICE]);
    for real in &lab.topo.reals {
        daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
    let list = json(&daemon.cli_ok(&["vip", "list", "--json"]), "vip list");
    assert!(
        list[0]["reals"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["resolved"] == true)),
        "{list}"
    );
    let answers = lab.topo.client.ns.run_in(|| {
        (0..20)
            .map(|_| {
                xlb_tests::harness::http_get(
                    std::net::SocketAddr::from((xlb_tests::harness::VIP, 80)),
                    std::time::Duration::from_secs(3),
                )
            })
            .collect::<Vec<_>>()
    });
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
}

/// The exit code of `out`, with its stderr when it has none.
fn code(out: &std::process::Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The `unresolved_reason` of real `addr` of `service`, `None` once it is resolved.
fn unresolved_reason(daemon: &Daemon, service: &str, addr: &str) -> Option<String> {
    let real = real_listed(daemon, service, addr.parse().expect("address"));
    match real["resolved"].as_bool() {
        Some(true) => None,
        _ => Some(
            real["unresolved_reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
    }
}

#[test]
fn tun_reals_routed_through_another_interface_are_refused_and_reasons_follow_the_route() {
    require_root();
    let mut lab = Lab::start("it", 1, &SERVER_ARGS);
    let daemon = &lab.daemon;
    let lb = &lab.topo.lb.ns;
    // A second interface on the balancer (a veth pair, both ends here), whose
    // subnet the kernel routes through it.
    lb.ip("link add xo0 type veth peer name xo1");
    lb.ip("addr add 192.0.2.1/24 dev xo0");
    lb.ip("link set dev xo0 up");
    lb.ip("link set dev xo1 up");
    let tun = "203.0.113.20:80/tcp";
    daemon.cli_ok(&["vip", "add", tun, "--forward", "tun"]);
    let before = daemon.cli_ok(&["vip", "list", "--json"]);

    let out = daemon.cli(&["real", "add", tun, "192.0.2.50"]);
    let stderr = refused(
        &out,
        "real add through xo0",
        &["192.0.2.50", "leaves through xo0, not eth0"],
    );
    assert_eq!(code(&out), 4, "refused is exit 4: {stderr}");
    let dir = RunDir::new(&format!("xlb-{}-route", lab.topo.prefix()));
    let file = dir.path().join("other.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - vip: {tun}\n    forward: tun\n    reals:\n      - address: 192.0.2.50\n"
        ),
    )
    .expect("write");
    let out = daemon.cli(&["apply", file.to_str().expect("UTF-8")]);
    let stderr = refused(
        &out,
        "apply through xo0",
        &["other.yaml: ", "192.0.2.50", "leaves through xo0"],
    );
    assert_eq!(code(&out), 4, "refused is exit 4: {stderr}");
    assert_eq!(
        daemon.cli_ok(&["vip", "list", "--json"]),
        before,
        "a refused change changed the state"
    );

    // No route at all is not refused: the real waits for one, and its
    // reason follows the route as it changes.
    let far = "203.0.113.77";
    daemon.cli_ok(&["real", "add", tun, far]);
    let reason = |what: &str, ok: &dyn Fn(&Option<String>) -> bool| {
        let mut last = None;
        wait_until(what, || {
            last = unresolved_reason(daemon, tun, far);
            ok(&last)
        });
        last
    };
    reason("no route first", &|r| {
        r.as_deref() == Some(&format!("no route to {far}"))
    });
    lb.ip(&format!("route add {far}/32 via 192.0.2.2 dev xo0"));
    reason("the reason names the other interface", &|r| {
        r.as_deref()
            .is_some_and(|r| r.contains("leaves through xo0"))
    });
    let hop = lab.topo.reals[0].ipv4;
    lb.ip(&format!("route replace {far}/32 via {hop} dev eth0"));
    reason("resolved through its gateway on eth0", &Option::is_none);
    let real = real_listed(daemon, tun, far.parse().expect("address"));
    let mac = lab.topo.reals[0]
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(real["mac"], mac.as_str(), "the gateway's MAC: {real}");

    // The other ways in make the same check: a start with `--config`...
    lab.daemon.stop();
    let lb = &lab.topo.lb.ns;
    let file_arg = path_str(&file);
    let mut refused_start =
        Daemon::spawn_in(lb, "eth0", dir.path(), &["--no-pin", "--config", file_arg]);
    let (status, log) = refused_start.wait_exit();
    assert!(!status.success(), "a start with other.yaml: {log}");
    assert!(
        log.contains("other.yaml") && log.contains("192.0.2.50 leaves through xo0"),
        "the start names the file, the real and the interface: {log}"
    );
    // ...and a reload (SIGHUP) of the file the daemon started with.
    let fine = format!("services:\n  - vip: {tun}\n    forward: tun\n    reals: []\n");
    std::fs::write(&file, &fine).expect("write");
    let mut daemon = Daemon::start_in(lb, "eth0", dir.path(), &["--no-pin", "--config", file_arg]);
    let before = daemon.cli_ok(&["vip", "list", "--json"]);
    std::fs::write(
        &file,
        fine.replace("reals: []", "reals:\n      - address: 192.0.2.50"),
    )
    .expect("write");
    daemon.signal(Signal::SIGHUP);
    let log = daemon.wait_for_log("reload failed");
    assert!(
        log.lines().any(|l| l.contains("reload failed")
            && l.contains(file_arg)
            && l.contains("192.0.2.50 leaves through xo0")),
        "the failed reload names the file, the real and the interface: {log}"
    );
    assert_eq!(
        daemon.cli_ok(&["vip", "list", "--json"]),
        before,
        "a refused reload changed the state"
    );
}
