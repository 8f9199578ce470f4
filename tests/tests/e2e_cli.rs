//! netns end-to-end, the day-2 commands: exit codes and `--json` errors, `xlb check`,
//! `xlb apply --dry-run`, `xlb save` round trips, the last reload's result,
//! `xlb vip set` with open connections, `xlb stats --rate|--zero`, `xlb real list`,
//! JSON logs, and `xlb top` driven in tmux. The real daemon and CLI, real HTTP
//! through the XDP program.
//!
//! Needs root and runs one test at a time (`./x test` does both).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use xlb_tests::harness::{
    Daemon, KeepAlive, Lab, RunDir, VIP, json, real_name, require_root, wait_until,
};
use xlb_tests::netns::Host;

const SERVICE: &str = "203.0.113.10:80/tcp";
const TIMEOUT: Duration = Duration::from_secs(3);
const SERVER_ARGS: [&str; 2] = ["--http", "0.0.0.0:80"];
const METRICS: &str = "127.0.0.1:9814";

fn target() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// Writes `text` to `DIR/NAME` and returns the path as a string.
fn write_file(dir: &RunDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_str().expect("UTF-8 path").to_owned()
}

/// A `services:` document for `SERVICE` with `extra` lines under the VIP and
/// `(address, weight)` reals.
fn services_yaml(extra: &str, reals: &[(Ipv4Addr, u32)]) -> String {
    let mut text = format!("services:\n  - vip: {SERVICE}\n{extra}    reals:\n");
    for (addr, weight) in reals {
        text.push_str(&format!(
            "      - address: {addr}\n        weight: {weight}\n"
        ));
    }
    text
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `xlb ARGS` without and with `--json`: both exit `want`; as text the error
/// is on stderr, naming `needle`; as JSON it is the error document on stdout,
/// with `kind`, and stderr is empty.
fn assert_fails(daemon: &Daemon, args: &[&str], want: i32, kind: &str, needle: &str) {
    let what = format!("xlb {}", args.join(" "));
    let out = daemon.cli(args);
    let stderr = text(&out.stderr);
    assert_eq!(
        code(&out),
        Some(want),
        "{what}: exit code; stderr: {stderr}"
    );
    assert_eq!(text(&out.stdout), "", "{what}: stdout on failure");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(needle),
        "{what}: stderr does not name {needle:?}: {stderr}"
    );
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = daemon.cli(&with_json);
    assert_eq!(code(&out), Some(want), "{what} --json: exit code");
    assert_eq!(text(&out.stderr), "", "{what} --json: stderr");
    let doc = json(&text(&out.stdout), &format!("{what} --json"));
    assert_eq!(doc["error"]["kind"], kind, "{what} --json: {doc}");
    let message = doc["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{what} --json: the message does not name {needle:?}: {doc}"
    );
    assert_eq!(
        doc.as_object().map(|o| o.len()),
        Some(1),
        "{what} --json: only the error: {doc}"
    );
}

/// `GET /v1/desired` (the effective state), which a refused or dry-run command must
/// leave as it was.
fn desired(daemon: &Daemon) -> String {
    let (status, body) = daemon.api("GET", "/v1/desired", None);
    assert_eq!(status, 200, "GET /v1/desired: {body}");
    body
}

fn status(daemon: &Daemon) -> serde_json::Value {
    json(&daemon.cli_ok(&["status", "--json"]), "xlb status --json")
}

/// The value of the one sample named `series` in a scrape of the daemon's metrics.
fn metric(host: &Host, series: &str) -> f64 {
    let addr: SocketAddr = METRICS.parse().expect("metrics address");
    let body = host.ns.run_in(|| {
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    });
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {series} in the scrape:\n{body}"))
}

#[test]
fn exit_codes_json_errors_check_dry_run_save_and_the_last_reload() {
    require_root();
    let lab = Lab::start_with(
        "ce",
        3,
        &SERVER_ARGS,
        &["--no-pin", "--metrics-addr", METRICS],
    );
    let d = &lab.daemon;
    let dir = RunDir::new(&format!("xlb-cfg-{}", lab.topo.prefix()));
    let r: Vec<Ipv4Addr> = lab.topo.reals.iter().map(|h| h.ipv4).collect();

    // `xlb check` needs no daemon: the socket it is given does not exist.
    let base = write_file(
        &dir,
        "base.yaml",
        &services_yaml("", &[(r[0], 1), (r[1], 1)]),
    );
    let out = d.cli(&["--socket", "/nonexistent/xlb.sock", "check", &base]);
    assert_eq!(code(&out), Some(0), "xlb check: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{base}: valid (1 services, 2 reals)\n")
    );
    let out = d.cli(&["check", &base, "--json"]);
    assert_eq!(
        json(&text(&out.stdout), "xlb check --json"),
        serde_json::json!({"file": base, "valid": true, "services": 1, "reals": 2})
    );
    d.cli_ok(&["apply", &base]);
    let bad = write_file(
        &dir,
        "bad.yaml",
        &services_yaml("    table_size: 100\n", &[(r[0], 1)]),
    );
    let off = write_file(
        &dir,
        "off.yaml",
        &services_yaml("", &[(r[0], 1), ("192.0.2.50".parse().expect("ip"), 1)]),
    );

    // One exit code per kind of failure, whatever the command.
    let before = desired(d);
    let real0 = r[0].to_string();
    let unknown_flow = write_file(
        &dir,
        "flows.txt",
        "203.0.113.77:80/tcp 198.51.100.7:40000\n",
    );
    let mixed_flow = write_file(
        &dir,
        "mixed.txt",
        &format!("{SERVICE} 198.51.100.7:40000\n{SERVICE} [2001:db8:100::7]:40000\n"),
    );
    // A daemon setting `xlb run` would refuse at start without looking at the host.
    let unkeyed = write_file(
        &dir,
        "unkeyed.yaml",
        "daemon:\n  sync_listen: 198.51.100.1:9815\n",
    );
    // A zero timeout (no UDP tracking at all) is refused at start, nothing started.
    let zero = write_file(&dir, "zero.yaml", "daemon:\n  udp_idle_timeout: 0\n");
    // A malformed line is named by its line in the file (comments and blank
    // lines count), before anything is sent.
    let malformed_flow = write_file(
        &dir,
        "malformed.txt",
        &format!("# flows\n{SERVICE} 198.51.100.7:40000\n\n{SERVICE} 198.51.100.7\n"),
    );
    let cases: [(&[&str], i32, &str, &str); 25] = [
        (
            &["simulate", "--batch", &malformed_flow],
            2,
            "bad_input",
            "malformed.txt:4: invalid source '198.51.100.7': expected IP:PORT",
        ),
        (
            &["run", "--no-pin"],
            2,
            "bad_input",
            "no interface: give --iface or daemon.interface in the config file",
        ),
        (
            &["run", "--no-pin", "--iface", "eth0", "--config", &zero],
            2,
            "bad_input",
            "zero.yaml: daemon.udp_idle_timeout: 0 is not between 1 and 86400",
        ),
        (
            &[
                "run",
                "--no-pin",
                "--iface",
                "eth0",
                "--resolve-timeout",
                "0",
            ],
            2,
            "bad_input",
            "invalid value '0' for '--resolve-timeout <RESOLVE_TIMEOUT>': 0 is not between 1 \
             and 60",
        ),
        (
            &[
                "vip",
                "add",
                "203.0.113.12:80/tcp",
                "--check",
                "tcp",
                "--check-port",
                "70000",
            ],
            2,
            "bad_input",
            "invalid value '70000' for '--check-port <PORT>': port must be 1-65535, not 70000",
        ),
        (
            &["--socket", "/nonexistent/xlb.sock", "status"],
            3,
            "unreachable",
            "cannot reach the xlb daemon at /nonexistent/xlb.sock",
        ),
        (
            &["--socket", "/nonexistent/xlb.sock", "apply", &base],
            3,
            "unreachable",
            "cannot reach the xlb daemon",
        ),
        (
            &["vip", "add", "203.0.113.10:99999/tcp"],
            2,
            "bad_input",
            "port 99999 is out of range",
        ),
        (
            &["vip", "add", "203.0.113.12:80/tcp", "--check-path", "/x"],
            2,
            "bad_input",
            "--check-path needs --check KIND",
        ),
        (
            &["vip", "add", "203.0.113.12:80/tcp", "--table-size", "100"],
            2,
            "bad_input",
            "invalid table size 100",
        ),
        (
            &[
                "vip",
                "add",
                "203.0.113.12:80/tcp",
                "--check",
                "tcp",
                "--check-interval",
                "10",
            ],
            2,
            "bad_input",
            "health check: interval_ms must be at least 100, not 10 (--check-interval)",
        ),
        (
            &[
                "vip",
                "set",
                SERVICE,
                "--check",
                "none",
                "--check-port",
                "8080",
            ],
            2,
            "bad_input",
            "--check-port has no effect with --check none",
        ),
        (&["vip", "set", SERVICE], 2, "bad_input", "nothing to set"),
        (
            &["apply", "--dry-run", "--if-revision", "42", &base],
            2,
            "bad_input",
            "a revision is only checked in store mode (xlb run --store)",
        ),
        (
            &["check", &bad],
            2,
            "bad_input",
            "bad.yaml: services[0].table_size: 100 is not a prime",
        ),
        (
            &["check", &unkeyed],
            2,
            "bad_input",
            "unkeyed.yaml: invalid flow sync settings: --sync-listen needs --sync-key-file \
             (daemon.sync_key_file)",
        ),
        (
            &["apply", &bad],
            2,
            "bad_input",
            "bad.yaml: services[0].table_size: 100 is not a prime",
        ),
        (
            &["real", "add", "203.0.113.77:80/tcp", &real0],
            4,
            "refused",
            "unknown VIP 203.0.113.77:80/tcp",
        ),
        (
            &["vip", "add", SERVICE],
            4,
            "refused",
            "VIP 203.0.113.10:80/tcp already exists",
        ),
        (
            &["real", "list", "203.0.113.77:80/tcp"],
            4,
            "refused",
            "unknown VIP 203.0.113.77:80/tcp",
        ),
        (
            &[
                "simulate",
                "203.0.113.77:80/tcp",
                "--src",
                "198.51.100.7:40000",
            ],
            4,
            "refused",
            "unknown VIP 203.0.113.77:80/tcp",
        ),
        (
            &["simulate", SERVICE, "--src", "[2001:db8:100::7]:40000"],
            2,
            "bad_input",
            "source 2001:db8:100::7 is IPv6 and VIP 203.0.113.10:80/tcp is IPv4: a flow has one \
             address family",
        ),
        (
            &["simulate", "--batch", &mixed_flow],
            2,
            "bad_input",
            "flows[1]: source 2001:db8:100::7 is IPv6 and VIP 203.0.113.10:80/tcp is IPv4",
        ),
        (
            &["simulate", "--batch", &unknown_flow],
            4,
            "refused",
            "flows[0]: unknown VIP 203.0.113.77:80/tcp",
        ),
        (
            &["apply", "--dry-run", &off],
            4,
            "refused",
            "192.0.2.50 is not on",
        ),
    ];
    for (args, want, kind, needle) in cases {
        assert_fails(d, args, want, kind, needle);
    }
    // A negative number is a value out of range, not an unknown argument; a
    // mistyped flag after a numeric one is still a flag, not its value.
    let more = "\n\nFor more information, try '--help'.\n";
    for (args, stderr) in [
        (
            &["real", "add", SERVICE, &real0, "--weight", "-1"][..],
            format!(
                "error: invalid value '-1' for '--weight <WEIGHT>': -1 is not in 0..=65535{more}"
            ),
        ),
        (
            &["vip", "set", SERVICE, "--check-interval", "-5"],
            format!(
                "error: invalid value '-5' for '--check-interval <INTERVAL_MS>': must be at \
                 least 100, not -5{more}"
            ),
        ),
        (
            &["real", "add", SERVICE, &real0, "--weight", "-w"],
            format!(
                "error: unexpected argument '-w' found\n\n  tip: to pass '-w' as a value, use \
                 '-- -w'\n\nUsage: xlb real add [OPTIONS] <VIP> <REAL>{more}"
            ),
        ),
    ] {
        let out = d.cli(args);
        assert_eq!(
            (code(&out), text(&out.stderr)),
            (Some(2), stderr),
            "xlb {}",
            args.join(" ")
        );
    }
    assert_eq!(
        desired(d),
        before,
        "a refused command changed the desired state"
    );

    // A bad query string is a 400 with the JSON error body every other refusal
    // has, naming the parameter; a misspelt one is refused, not ignored (a
    // `layr=base` once answered the effective state as if it were the base).
    let queries = [
        (
            format!("/v1/simulate?vip={SERVICE}"),
            "invalid query: Failed to deserialize query string: missing field `src`",
        ),
        (
            "/v1/desired?layr=base".to_owned(),
            "invalid query: Failed to deserialize query string: layr: unknown field `layr`, \
             expected `layer`",
        ),
        (
            format!("/v1/simulate?vip={SERVICE}&src=198.51.100.7:40000&sauce=1"),
            "invalid query: Failed to deserialize query string: sauce: unknown field `sauce`, \
             expected `vip` or `src`",
        ),
    ];
    for (path, message) in queries {
        let (status, body) = d.api("GET", &path, None);
        assert_eq!(status, 400, "GET {path}: {body}");
        assert_eq!(
            json(&body, &format!("GET {path}")),
            serde_json::json!({ "error": message }),
            "GET {path}"
        );
    }

    // A route that takes no body refuses one (the same 400 and JSON error
    // body) before it does anything, rather than ignoring it.
    let zeroed_at =
        |d: &Daemon| json(&d.api("GET", "/v1/stats", None).1, "stats")["zeroed_at"].clone();
    let zeroed_before = zeroed_at(d);
    let vips_before = d.api("GET", "/v1/vips", None);
    let extra = r#"{"vip": "203.0.113.10:80/tcp"}"#;
    for (method, path) in [
        ("POST", "/v1/stats/zero"),
        ("DELETE", "/v1/vips/tcp/203.0.113.10/80"),
        ("GET", "/v1/status"),
    ] {
        let (status, body) = d.api(method, path, Some(extra));
        assert_eq!(status, 400, "{method} {path} with a body: {body}");
        assert_eq!(
            json(&body, &format!("{method} {path}")),
            serde_json::json!({
                "error": format!(
                    "invalid request body: {method} {path} takes no body (got {} bytes)",
                    extra.len()
                )
            }),
            "{method} {path} with a body"
        );
    }
    assert_eq!(
        zeroed_at(d),
        zeroed_before,
        "a refused zero zeroed the counters"
    );
    assert_eq!(
        d.api("GET", "/v1/vips", None),
        vips_before,
        "a refused delete changed the VIPs"
    );
    // An empty JSON object gives no field, so it is taken as no body.
    let (code, body) = d.api("GET", "/v1/status", Some(" {} "));
    assert_eq!(code, 200, "GET /v1/status with {{}}: {body}");
    // Without a body (or with `{}`) it does what it says.
    let (code, body) = d.api("POST", "/v1/stats/zero", Some("{}"));
    assert_eq!(code, 200, "POST /v1/stats/zero with {{}}: {body}");
    let (code, body) = d.api("POST", "/v1/stats/zero", None);
    assert_eq!(code, 200, "{body}");
    assert_ne!(
        zeroed_at(d),
        zeroed_before,
        "POST /v1/stats/zero without a body"
    );

    // The last reload: the refused `xlb apply bad.yaml` above is recorded, with
    // when the configuration in force was loaded.
    let s = status(d);
    let last = &s["last_reload"];
    assert_eq!(last["successful"], false, "{s}");
    assert_eq!(last["source"], format!("xlb apply {bad}"), "{s}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("services[0].table_size: 100 is not a prime")),
        "{s}"
    );
    let loaded_at = last["last_success_at"].as_u64().expect("a load succeeded");
    assert_eq!(
        metric(&lab.topo.lb, "xlb_config_last_reload_successful"),
        0.0
    );
    assert_eq!(
        metric(
            &lab.topo.lb,
            "xlb_config_last_reload_success_timestamp_seconds"
        ),
        loaded_at as f64
    );
    let shown = d.cli_ok(&["status"]);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("last reload: FAILED at ")
                && l.contains(&format!("(xlb apply {bad}): {bad}: services[0].table_size"))),
        "xlb status does not show the failed reload:\n{shown}"
    );

    // --dry-run: the changes, named with what changed, and nothing applied.
    let next = write_file(
        &dir,
        "next.yaml",
        &services_yaml(
            "    scheduler: maglev-src\n",
            &[(r[0], 1), (r[1], 3), (r[2], 1)],
        ),
    );
    let out = d.cli_ok(&["apply", "--dry-run", &next]);
    assert_eq!(
        out,
        format!(
            "dry run: applying {next} would make 3 changes (nothing applied):\n\
             ~ VIP {SERVICE}: scheduler maglev -> maglev-src\n\
             ~ real {} of {SERVICE}: weight 1 -> 3\n\
             + real {} of {SERVICE} (weight 1, admin enabled, health_check none)\n",
            r[1], r[2]
        )
    );
    let planned = json(
        &d.cli_ok(&["apply", "--dry-run", &next, "--json"]),
        "xlb apply --dry-run --json",
    );
    assert_eq!(
        planned["changes"][1],
        serde_json::json!({"action": "changed", "vip": SERVICE, "real": r[1].to_string(),
            "details": ["weight 1 -> 3"]}),
        "{planned}"
    );
    assert_eq!(desired(d), before, "a dry run changed the desired state");
    assert_eq!(
        d.cli_ok(&["apply", "--dry-run", &base]),
        format!("dry run: applying {base} changes nothing\n")
    );

    // A successful apply is the last reload again.
    d.cli_ok(&["apply", &next]);
    assert_eq!(status(d)["last_reload"]["successful"], true);
    let before_huge = desired(d);
    assert_eq!(
        metric(&lab.topo.lb, "xlb_config_last_reload_successful"),
        1.0
    );

    // A body over the API's limit is refused before it is read whole: still
    // the last reload, failed, saying why; the CLI names the file's size.
    let huge = write_file(&dir, "huge.yaml", &"# padding\n".repeat(300_000));
    assert_fails(
        d,
        &["apply", &huge],
        2,
        "bad_input",
        "huge.yaml: (document): 3000000 bytes; a configuration holds at most 1048576 bytes",
    );
    let s = status(d);
    let last = &s["last_reload"];
    assert_eq!(last["successful"], false, "{s}");
    assert_eq!(last["source"], "xlb apply (request)", "{s}");
    assert_eq!(
        last["error"],
        "invalid request body: over the limit of 2097152 bytes (a configuration holds at most \
         1048576 bytes)",
        "{s}"
    );
    assert_eq!(
        metric(&lab.topo.lb, "xlb_config_last_reload_successful"),
        0.0
    );
    assert_eq!(
        desired(d),
        before_huge,
        "a refused body changed the desired state"
    );
    d.cli_ok(&["apply", &next]);

    // save -> apply -> save: the same bytes, and the apply changes nothing. An
    // override is not saved, and stays.
    d.cli_ok(&["real", "drain", SERVICE, &real0]);
    let saved = d.cli_ok(&["save"]);
    let mut want = String::from(
        "# The desired state of an xlb daemon (its base), written by `xlb save`; `xlb apply` \
         takes it back.\n",
    );
    want.push_str(&format!(
        "# Not in it: the daemon: section, and values set by hand (xlb real set, drain, disable, \
         enable),\n# which stay in the daemon and keep winning over these until `xlb real \
         reset-override`.\nservices:\n- vip: {SERVICE}\n  scheduler: maglev-src\n  forward: dr\n  \
         table_size: 65537\n  reals:\n"
    ));
    for (addr, weight) in [(r[0], 1), (r[1], 3), (r[2], 1)] {
        want.push_str(&format!("  - address: {addr}\n    weight: {weight}\n"));
    }
    assert_eq!(saved, want);
    let file = write_file(&dir, "saved.yaml", &saved);
    assert_eq!(
        d.cli_ok(&["apply", &file]),
        format!("applied {file}: 1 services, 0 map writes, 0 tables rebuilt\n")
    );
    assert_eq!(d.cli_ok(&["save"]), saved, "save -> apply -> save differs");
    let list = json(
        &d.cli_ok(&["real", "list", SERVICE, "--json"]),
        "xlb real list --json",
    );
    assert_eq!(list[0]["admin"], "drain", "the override went away: {list}");
    assert_eq!(list[0]["admin_source"], "override", "{list}");

    // The default log format, to a file (as to journald): no timestamps, no colours.
    let log = d.log();
    let serving = log
        .lines()
        .find(|l| l.contains("xlb serving"))
        .unwrap_or_else(|| panic!("no `xlb serving` line in the log:\n{log}"));
    assert!(
        serving
            .trim_start()
            .starts_with("INFO lb_userspace::daemon: xlb serving"),
        "a plain log line starts with its level: {serving:?}"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in the log:\n{log}");
}

/// A client command whose stdout is a pipe nobody reads (`xlb ... | head -1`
/// after head exits) ends by SIGPIPE as other tools do: no panic, no
/// backtrace, no exit code outside the documented ones.
#[test]
fn a_command_writing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = RunDir::new("xlb-pipe");
    let file = write_file(&dir, "ok.yaml", &services_yaml("", &[]));
    let (read, write) = nix::unistd::pipe().expect("a pipe");
    drop(read);
    let out = Command::new(xlb_tests::harness::xlb_bin())
        .args(["check", &file, "--json"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("running xlb check");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}, stderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), "", "nothing on stderr");
}

/// `n` reals' names and addresses of the lab, `rsN` -> address.
fn names(lab: &Lab) -> BTreeMap<String, Ipv4Addr> {
    lab.topo
        .reals
        .iter()
        .enumerate()
        .map(|(i, h)| (real_name(i), h.ipv4))
        .collect()
}

/// Sends requests on `conn` from a thread until the flag is set (at most
/// 100,000), 5 ms apart; the thread returns the reals that answered.
fn load(
    mut conn: KeepAlive,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(KeepAlive, Vec<String>)> {
    thread::spawn(move || {
        let mut answered = Vec::new();
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let real = conn
                .get()
                .unwrap_or_else(|e| panic!("a request on the open connection: {e}"))
                .real;
            if !answered.contains(&real) {
                answered.push(real);
            }
            thread::sleep(Duration::from_millis(5));
        }
        (conn, answered)
    })
}

/// A kept-alive connection from the client to the VIP, and the real that
/// answered its first request.
fn open_connection(lab: &Lab) -> (KeepAlive, String) {
    let mut conn = lab
        .topo
        .client
        .ns
        .run_in(|| KeepAlive::connect(target(), TIMEOUT))
        .unwrap_or_else(|e| panic!("connecting to the VIP: {e}"));
    let first = conn
        .get()
        .unwrap_or_else(|e| panic!("first request: {e}"))
        .real;
    (conn, first)
}

fn configure(lab: &Lab) {
    lab.daemon.cli_ok(&["vip", "add", SERVICE]);
    for real in &lab.topo.reals {
        lab.daemon
            .cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
    }
}

#[test]
fn vip_set_keeps_flows_and_rate_zero_and_real_list_count_the_real_that_gets_traffic() {
    require_root();
    let lab = Lab::start_with(
        "cv",
        3,
        &SERVER_ARGS,
        &[
            "--no-pin",
            "--metrics-addr",
            METRICS,
            "--log-format",
            "json",
        ],
    );
    let d = &lab.daemon;

    // JSON logs: every line is an object; the start-up line carries its fields.
    let log = d.log();
    let serving = log
        .lines()
        .map(|l| json(l, "a log line of `xlb run --log-format json`"))
        .find(|l| l["fields"]["message"] == "xlb serving")
        .unwrap_or_else(|| panic!("no `xlb serving` line in the log:\n{log}"));
    assert_eq!(serving["level"], "INFO", "{serving}");
    assert_eq!(serving["fields"]["iface"], "eth0", "{serving}");
    assert!(serving["timestamp"].is_string(), "{serving}");

    configure(&lab);
    let by_name = names(&lab);
    let (mut conn, first) = open_connection(&lab);
    let id = json(&d.cli_ok(&["vip", "list", "--json"]), "vip list")[0]["id"].clone();

    // vip set, as operations.md shows it: new scheduler, table and check (its
    // timeout the interval, shorter than 1000 ms), the open connection stays.
    assert_eq!(
        d.cli_ok(&[
            "vip",
            "set",
            SERVICE,
            "--scheduler",
            "maglev-src",
            "--table-size",
            "251",
            "--check",
            "tcp",
            "--check-interval",
            "500"
        ]),
        format!(
            "VIP {SERVICE} now maglev-src, table 251, new health check: established flows stay \
             on their reals\n"
        )
    );
    let vip = json(&d.cli_ok(&["vip", "list", "--json"]), "vip list")[0].clone();
    assert_eq!(
        (&vip["scheduler"], &vip["table_size"], &vip["id"]),
        (
            &serde_json::json!("maglev-src"),
            &serde_json::json!(251),
            &id
        ),
        "{vip}"
    );
    let check = &json(&desired(d), "GET /v1/desired")["services"][SERVICE]["health"];
    assert_eq!(
        (&check["kind"], &check["interval_ms"], &check["timeout_ms"]),
        (
            &serde_json::json!("tcp"),
            &serde_json::json!(500),
            &serde_json::json!(500)
        ),
        "{check}"
    );
    for i in 0..5 {
        let real = conn
            .get()
            .unwrap_or_else(|e| panic!("request {i} after vip set: {e}"))
            .real;
        assert_eq!(real, first, "the open connection moved after vip set");
    }

    // stats --zero: the CLI's counters start from 0, the metrics keep counting.
    let verdict = |stats: &serde_json::Value, name: &str| {
        stats["verdicts"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or_else(|| panic!("no verdict {name} in {stats}"))
    };
    let stats = json(&d.cli_ok(&["stats", "--json"]), "stats --json");
    let (vip_before, tx_before) = (
        stats["vips"][0]["packets"].as_u64().expect("packets"),
        verdict(&stats, "tx_dr"),
    );
    assert!(vip_before >= 6, "6 requests, {vip_before} packets: {stats}");
    let tx_dr = "xlb_packets_total{verdict=\"tx_dr\"}";
    let counted = metric(&lab.topo.lb, tx_dr);
    assert!(counted > 0.0, "no tx_dr packets counted before the zero");
    assert_eq!(
        d.cli_ok(&["stats", "--zero"]),
        "counters zeroed: xlb stats, status and vip/real list count from now; the Prometheus \
         metrics keep counting\n"
    );
    // Zero but for the open connection's last delayed ACK, if it comes after the zero.
    let stats = json(&d.cli_ok(&["stats", "--json"]), "stats --json");
    assert!(
        verdict(&stats, "tx_dr") <= 2,
        "tx_dr since the zero: {stats}"
    );
    assert!(
        stats["vips"][0]["packets"].as_u64().is_some_and(|p| p <= 2),
        "VIP packets since the zero (before: {vip_before}, tx_dr {tx_before}): {stats}"
    );
    assert!(stats["zeroed_at"].is_u64(), "{stats}");
    assert!(metric(&lab.topo.lb, tx_dr) >= counted, "a metric went down");

    // stats --rate under load on the open connection: only its real has a rate.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = load(conn, stop.clone());
    let rates = json(
        &d.cli_ok(&["stats", "--rate", "--interval", "1", "--json"]),
        "stats --rate --json",
    );
    let text_rates = d.cli_ok(&["stats", "--rate", "--interval", "0.5"]);
    stop.store(true, Ordering::Relaxed);
    let (_conn, answered) = worker.join().expect("the load thread");
    assert_eq!(
        answered,
        std::slice::from_ref(&first),
        "the open connection moved"
    );
    let busy = by_name[&first].to_string();
    let v = &rates["vips"][0];
    assert!(v["packets_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{rates}");
    for r in v["reals"].as_array().expect("reals") {
        let pps = r["packets_per_s"].as_f64().expect("a rate");
        if r["addr"] == busy.as_str() {
            assert!(pps > 0.0, "the busy real {busy} has no rate: {rates}");
        } else {
            assert_eq!(pps, 0.0, "an idle real has a rate: {rates}");
        }
    }
    assert!(
        text_rates.starts_with("rates over 0.5 s")
            && text_rates
                .lines()
                .any(|l| l.starts_with(&format!("  -> {busy} "))),
        "xlb stats --rate:\n{text_rates}"
    );
    let stats = json(&d.cli_ok(&["stats", "--json"]), "stats --json");
    assert!(
        verdict(&stats, "tx_dr") > 0,
        "nothing counted since the zero"
    );
    assert!(
        d.cli_ok(&["status"]).contains("counters since "),
        "xlb status does not say the counters were zeroed"
    );

    // real list: health and the last probe error in full. Port 9 has no server,
    // so every probe fails (the avalanche guard keeps the reals serving).
    d.cli_ok(&[
        "vip",
        "set",
        SERVICE,
        "--check",
        "tcp",
        "--check-port",
        "9",
        "--check-interval",
        "100",
        "--check-timeout",
        "50",
        "--check-fall",
        "1",
    ]);
    let mut listed = serde_json::Value::Null;
    wait_until("every real DOWN with a last error", || {
        listed = json(
            &d.cli_ok(&["real", "list", SERVICE, "--json"]),
            "real list --json",
        );
        listed.as_array().is_some_and(|a| {
            a.len() == 3
                && a.iter()
                    .all(|r| r["health"] == "DOWN" && r["last_error"].is_string())
        })
    });
    let shown = d.cli_ok(&["real", "list", SERVICE]);
    assert!(
        shown.starts_with(&format!("{SERVICE}  dr maglev-src table 251")),
        "xlb real list:\n{shown}"
    );
    for r in listed.as_array().expect("reals") {
        let (addr, error) = (
            r["addr"].as_str().expect("addr"),
            r["last_error"].as_str().expect("error"),
        );
        assert_eq!(r["check"], "tcp", "{r}");
        assert_eq!(r["mode"], "connect", "{r}");
        assert!(
            shown.contains(&format!("\n    {addr}: {error}\n")),
            "xlb real list does not show {addr}'s last error {error:?} in full:\n{shown}"
        );
    }
}

/// A tmux server of its own (`tmux -L NAME`), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running tmux {}: {e} (is tmux installed?)", args.join(" ")))
    }

    /// The visible screen of the session's one pane.
    fn screen(&self) -> String {
        text(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The rows of reals on a `xlb top` screen, in order: (address, packets/s).
fn real_rows(screen: &str) -> Vec<(String, u64)> {
    screen
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip_while(|w| *w != "->").skip(1);
            let addr = words.next()?.to_owned();
            let pps = words.next()?.parse().ok()?;
            Some((addr, pps))
        })
        .collect()
}

#[test]
fn top_shows_the_rate_of_the_real_that_gets_traffic_and_sorts_by_key() {
    require_root();
    let lab = Lab::start("ct", 2, &SERVER_ARGS);
    configure(&lab);
    let by_name = names(&lab);
    let (conn, first) = open_connection(&lab);
    let busy = by_name[&first].to_string();
    let idle = by_name
        .values()
        .map(ToString::to_string)
        .find(|a| *a != busy)
        .expect("two reals");
    let stop = Arc::new(AtomicBool::new(false));
    let worker = load(conn, stop.clone());

    let cmd = lab.daemon.command(&["top"]);
    let mut line = String::new();
    for (k, v) in cmd.get_envs() {
        if let (k, Some(v)) = (k.to_string_lossy(), v) {
            line.push_str(&format!("{k}={} ", v.to_string_lossy()));
        }
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        line.push_str(&format!(" {}", a.to_string_lossy()));
    }
    let tmux = Tmux(format!("xlb-{}", lab.topo.prefix()));
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "30",
        &format!("env {line}"),
    ]);
    assert!(
        out.status.success(),
        "tmux new-session: {}",
        text(&out.stderr)
    );

    // The busy real gets a rate, the idle one none, sorted by packets/s.
    let mut screen = String::new();
    wait_until("xlb top showing a rate for the busy real", || {
        screen = tmux.screen();
        real_rows(&screen)
            .first()
            .is_some_and(|(a, pps)| *a == busy && *pps > 0)
    });
    assert!(screen.contains("sorted by pkt/s"), "{screen}");
    let rows = real_rows(&screen);
    assert_eq!(rows.len(), 2, "{screen}");
    assert_eq!(rows[1], (idle.clone(), 0), "{screen}");

    // `r` reverses: the idle real comes first.
    tmux.run(&["send-keys", "-t", "top", "r"]);
    wait_until("xlb top reversed", || {
        screen = tmux.screen();
        screen.contains("sorted by pkt/s (reversed)")
            && real_rows(&screen).first().is_some_and(|(a, _)| *a == idle)
    });
    // `a`: by active flows (the busy real holds the open connection), reversed still.
    tmux.run(&["send-keys", "-t", "top", "a"]);
    wait_until("xlb top sorted by active flows", || {
        screen = tmux.screen();
        screen.contains("sorted by active (reversed)")
    });
    tmux.run(&["send-keys", "-t", "top", "q"]);
    wait_until("xlb top quitting on q", || {
        !tmux.run(&["has-session", "-t", "top"]).status.success()
    });
    stop.store(true, Ordering::Relaxed);
    let (_conn, answered) = worker.join().expect("the load thread");
    assert_eq!(answered, [first], "the open connection moved");
}
