//! netns end-to-end, monitoring: what Prometheus scrapes from a running balancer and
//! from `xlb decap` on its real servers, and the Grafana dashboard and alert rules
//! shipped in packaging/monitoring/, checked against those scrapes and with promtool.
//!
//! Needs root (namespaces, XDP) and `promtool` (Debian's prometheus package, installed
//! by `./x setup`); runs one test at a time (`./x test` does both).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use xlb_tests::harness::{
    Daemon, DecapProc, Lab, VIP, balanced_topology, http_get, metric_samples, require_root,
    scrape_metrics, start_reals, wait_until, xlb_bin,
};
use xlb_tests::netns::{Host, unique_prefix};

/// The VIP with reals, in tunnel mode so that the reals' decapsulators count it too.
const SERVICE: &str = "203.0.113.10:80/tcp";
/// SERVICE as the labels of its series.
const SERVICE_LABELS: &str = r#"address="203.0.113.10",port="80",protocol="tcp""#;
/// A VIP with no real: its packets are dropped (reason `no_real`).
const EMPTY_SERVICE: &str = "203.0.113.10:9000/udp";
const EMPTY_SERVICE_LABELS: &str = r#"address="203.0.113.10",port="9000",protocol="udp""#;
/// Where the daemon serves its metrics (balancer namespace) and each `xlb decap` its own
/// (each real's namespace).
const METRICS_ADDR: &str = "127.0.0.1:9814";
const DECAP_METRICS_ADDR: &str = "127.0.0.1:9815";
const CONNTRACK_SIZE: &str = "4096";
const REQUESTS: usize = 30;
const DATAGRAMS: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Labels a query may use that come from Prometheus (target labels, histogram buckets)
/// rather than from an exported series.
const PROMETHEUS_LABELS: [&str; 3] = ["instance", "job", "le"];

/// Every drop reason of the data path, as `xlb_dropped_packets_total{reason}` names it.
const DROP_REASONS: [&str; 7] = [
    "aborted",
    "fragment",
    "malformed",
    "no_real",
    "no_tunnel_source",
    "too_big",
    "unsupported",
];

fn monitoring_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/monitoring")
        .join(name)
}

/// Runs promtool with `args` in packaging/monitoring, `stdin` fed to it; returns its
/// exit success and its output (stdout then stderr).
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_file(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's prometheus package (./x setup)")
        });
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "xlb-alerts.yml"], "");
    assert!(ok, "promtool check rules failed:\n{out}");
    assert!(out.contains("SUCCESS: 12 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "xlb-alerts.test.yml"], "");
    assert!(ok, "promtool test rules failed:\n{out}");
}

/// The samples scraped from `addr` in `host`'s namespace.
fn scrape(host: &Host, addr: &str) -> BTreeMap<String, f64> {
    metric_samples(&scrape_text(host, addr))
}

fn scrape_text(host: &Host, addr: &str) -> String {
    scrape_metrics(host, addr.parse().expect("metrics address"))
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in the scrape: {samples:#?}"))
}

/// The metric names of the samples.
fn names(samples: &BTreeMap<String, f64>) -> BTreeSet<String> {
    samples
        .keys()
        .map(|s| s.split('{').next().unwrap_or(s).to_owned())
        .collect()
}

/// The label names of the samples.
fn label_names(samples: &BTreeMap<String, f64>) -> BTreeSet<String> {
    samples
        .keys()
        .filter_map(|s| s.split_once('{'))
        .flat_map(|(_, labels)| {
            labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(name, _)| name.to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The values of `name`'s samples by the value of their label `label`.
fn by_label(samples: &BTreeMap<String, f64>, name: &str, label: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{{label}=\"");
    samples
        .iter()
        .filter_map(|(series, v)| {
            let value = series.strip_prefix(&prefix)?.split('"').next()?;
            Some((value.to_owned(), *v))
        })
        .collect()
}

/// The exposition in the Prometheus text format promtool lints (2.42 reads no
/// OpenMetrics): a counter family `x` of samples `x_total` is declared as `x_total`,
/// and the `# UNIT` and `# EOF` lines go.
fn classic_text(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    openmetrics
        .lines()
        .filter(|l| !l.starts_with("# EOF") && !l.starts_with("# UNIT "))
        .map(|l| {
            for kind in ["# TYPE ", "# HELP "] {
                if let Some(rest) = l.strip_prefix(kind) {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    if counters.contains(name) {
                        return format!("{kind}{name}_total {tail}\n");
                    }
                }
            }
            format!("{l}\n")
        })
        .collect()
}

/// Asserts promtool's linter finds nothing to say about an exposition.
fn assert_lints_clean(what: &str, text: &str) {
    let (ok, out) = promtool(&["check", "metrics"], &classic_text(text));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics on {what}:\n{out}\n{text}"
    );
}

/// `text` without its double-quoted strings (label values, regexes).
fn unquoted(text: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        match (quoted, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, true, _) => escaped = false,
            (_, false, '"') => quoted = !quoted,
            (false, _, c) => out.push(c),
            (true, false, _) => {}
        }
    }
    out
}

/// The identifiers of a PromQL expression, outside strings.
fn identifiers(expr: &str) -> Vec<String> {
    unquoted(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .map(str::to_owned)
        .collect()
}

/// The label names an expression groups by (`by (...)`, `without (...)`) or matches
/// (`{name=...}`).
fn query_labels(expr: &str) -> BTreeSet<String> {
    let text = unquoted(expr);
    let mut labels = BTreeSet::new();
    for keyword in ["by (", "without ("] {
        for part in text.split(keyword).skip(1) {
            let list = part.split(')').next().unwrap_or_default();
            labels.extend(list.split(',').map(|l| l.trim().to_owned()));
        }
    }
    for part in text.split('{').skip(1) {
        let matchers = part.split('}').next().unwrap_or_default();
        labels.extend(
            matchers
                .split(',')
                .filter_map(|m| m.split(['=', '!']).next())
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
    }
    labels
}

/// Every PromQL expression of the dashboard (panel targets and variable queries) and
/// of the alert rules, with where it comes from.
fn shipped_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let path = monitoring_file("xlb-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dash: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let panels = dash["panels"].as_array().expect("dashboard panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("panel title");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("target expr");
            queries.push((format!("dashboard panel {title:?}"), expr.to_owned()));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("variables") {
        if let Some(def) = var["definition"].as_str() {
            let expr = def
                .strip_prefix("label_values(")
                .and_then(|d| d.rsplit_once(','))
                .map(|(selector, _)| selector)
                .unwrap_or_else(|| panic!("odd variable query {def}"));
            queries.push((
                format!("dashboard variable {}", var["name"]),
                expr.to_owned(),
            ));
        }
    }
    let path = monitoring_file("xlb-alerts.yml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    for group in rules["groups"].as_sequence().expect("rule groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("alert expr");
            queries.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    queries
}

/// A settled scrape: two scrapes in a row whose forwarding counters (per VIP, per real,
/// decapsulated) agree: no late packet, such as a FIN still crossing, moved them in
/// between. (The verdict counters keep moving with the health probes' answers.)
fn settled(mut scrape: impl FnMut() -> BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut last = scrape();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let next = scrape();
        let moving = |m: &BTreeMap<String, f64>| -> Vec<f64> {
            m.iter()
                .filter(|(k, _)| {
                    [
                        "xlb_vip_packets",
                        "xlb_real_packets",
                        "xlb_decap_decapsulated_packets",
                    ]
                    .iter()
                    .any(|p| k.starts_with(p))
                })
                .map(|(_, v)| *v)
                .collect()
        };
        if moving(&next) == moving(&last) {
            return next;
        }
        last = next;
    }
    panic!("the packet counters never settled: {last:#?}");
}

#[test]
fn dashboard_and_alerts_use_what_the_daemon_and_decap_export() {
    require_root();
    let topo = balanced_topology(&unique_prefix("mx"), 2);
    let servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
    let daemon = Daemon::start_with(
        &topo.lb.ns,
        "eth0",
        &[
            "--no-pin",
            "--metrics-addr",
            METRICS_ADDR,
            "--conntrack-size",
            CONNTRACK_SIZE,
        ],
    );
    let lab = Lab {
        daemon,
        servers,
        topo,
    };
    // Declared after the lab: dropped (stopped) before it.
    let decaps: Vec<DecapProc> = lab
        .topo
        .reals
        .iter()
        .map(|r| DecapProc::start(r, &["--metrics-addr", DECAP_METRICS_ADDR]))
        .collect();
    let d = &lab.daemon;
    d.cli_ok(&[
        "vip",
        "add",
        SERVICE,
        "--forward",
        "tun",
        "--check",
        "tcp",
        "--check-interval",
        "200",
        "--check-timeout",
        "100",
    ]);
    let reals: Vec<String> = lab.topo.reals.iter().map(|r| r.ipv4.to_string()).collect();
    for real in &reals {
        d.cli_ok(&["real", "add", SERVICE, real]);
    }
    d.cli_ok(&["vip", "add", EMPTY_SERVICE]);
    let lb = &lab.topo.lb;
    let serving = format!("xlb_vip_serving_reals{{{SERVICE_LABELS}}}");
    wait_until("both reals serving in the metrics", || {
        scrape(lb, METRICS_ADDR).get(&serving) == Some(&2.0)
    });

    // Table membership: a drained real leaves the set of reals new flows go to, and
    // comes back when enabled: two changes for it, none for the other.
    d.cli_ok(&["real", "drain", SERVICE, &reals[0]]);
    wait_until("the drained real out of the serving set", || {
        scrape(lb, METRICS_ADDR).get(&serving) == Some(&1.0)
    });
    d.cli_ok(&["real", "enable", SERVICE, &reals[0]]);
    wait_until("the real back in the serving set", || {
        scrape(lb, METRICS_ADDR).get(&serving) == Some(&2.0)
    });

    lab.topo.client.ns.run_in(|| {
        for i in 0..REQUESTS {
            http_get(SocketAddr::from((VIP, 80)), TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
        }
        let socket = UdpSocket::bind("0.0.0.0:0").expect("UDP socket");
        for _ in 0..DATAGRAMS {
            socket
                .send_to(b"nobody serves this", (VIP, 9000))
                .expect("send a datagram");
        }
    });

    let m = settled(|| scrape(lb, METRICS_ADDR));
    let text = scrape_text(lb, METRICS_ADDR);
    assert_lints_clean("the daemon's metrics", &text);
    let decap_texts: Vec<String> = lab
        .topo
        .reals
        .iter()
        .map(|r| scrape_text(r, DECAP_METRICS_ADDR))
        .collect();
    assert_lints_clean("xlb decap's metrics", &decap_texts[0]);
    let decap_m: Vec<BTreeMap<String, f64>> = lab
        .topo
        .reals
        .iter()
        .map(|r| settled(|| scrape(r, DECAP_METRICS_ADDR)))
        .collect();

    // The commit label is the one `xlb --version` prints.
    let version = Command::new(xlb_bin())
        .arg("--version")
        .output()
        .expect("xlb --version");
    let version = String::from_utf8(version.stdout).expect("UTF-8");
    let commit = version
        .trim()
        .strip_prefix(&format!("xlb {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("xlb --version prints the release and the commit: {version:?}"));
    assert!(
        commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "built from this git checkout, the commit is its short hash: {commit:?}"
    );
    let build = format!(
        "xlb_build_info{{version=\"{}\",commit=\"{commit}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&m, &build), 1.0);
    assert_eq!(sample(&decap_m[0], &build), 1.0);

    // Per VIP and per real, labelled address/port/protocol (and real).
    let vip_packets = sample(&m, &format!("xlb_vip_packets_total{{{SERVICE_LABELS}}}"));
    assert!(
        vip_packets >= (3 * REQUESTS) as f64,
        "{vip_packets} VIP packets for {REQUESTS} connections"
    );
    let vip_flows = sample(&m, &format!("xlb_vip_new_flows_total{{{SERVICE_LABELS}}}"));
    assert!(vip_flows >= REQUESTS as f64, "{vip_flows} new flows");
    assert_eq!(sample(&m, &serving), 2.0);
    assert_eq!(
        sample(&m, &format!("xlb_vip_reals{{{SERVICE_LABELS}}}")),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("xlb_vip_serving_reals{{{EMPTY_SERVICE_LABELS}}}")
        ),
        0.0
    );
    let mut real_flows = 0.0;
    for (i, real) in reals.iter().enumerate() {
        let labels = format!("{SERVICE_LABELS},real=\"{real}\"");
        real_flows += sample(&m, &format!("xlb_real_new_flows_total{{{labels}}}"));
        assert_eq!(sample(&m, &format!("xlb_real_healthy{{{labels}}}")), 1.0);
        assert_eq!(
            sample(&m, &format!("xlb_real_effective_weight{{{labels}}}")),
            1.0
        );
        let changes = sample(&m, &format!("xlb_real_table_changes_total{{{labels}}}"));
        assert_eq!(
            changes,
            if i == 0 { 2.0 } else { 0.0 },
            "table changes of {real}"
        );
        // What the balancer tunnelled to the real is what the real's decapsulator
        // unwrapped (the probes go to the real directly, not through the tunnel).
        let sent = sample(&m, &format!("xlb_real_packets_total{{{labels}}}"));
        let unwrapped = sample(
            &decap_m[i],
            "xlb_decap_decapsulated_packets_total{encapsulation=\"ipip\"}",
        );
        assert!(sent > 0.0, "nothing sent to {real}");
        assert_eq!(
            unwrapped, sent,
            "{real}: the balancer tunnelled {sent} packets, its decap unwrapped {unwrapped}"
        );
        assert_eq!(
            by_label(&decap_m[i], "xlb_decap_dropped_packets_total", "reason")
                .keys()
                .collect::<Vec<_>>(),
            ["aborted", "not_allowed_src"]
        );
        assert!(
            sample(
                &decap_m[i],
                "xlb_decap_passed_packets_total{reason=\"not_tunnel\"}"
            ) > 0.0,
            "{real}'s own traffic (ARP, probes) not counted as passed"
        );
    }
    assert_eq!(
        real_flows, vip_flows,
        "the reals' new flows add up to the VIP's"
    );

    // Drops by reason: every reason has its series, and the empty VIP's datagrams are
    // counted as no_real (in the verdict too).
    let drops = by_label(&m, "xlb_dropped_packets_total", "reason");
    assert_eq!(
        drops.keys().map(String::as_str).collect::<Vec<_>>(),
        DROP_REASONS,
        "{drops:?}"
    );
    assert_eq!(drops["no_real"], DATAGRAMS as f64, "{drops:?}");
    assert_eq!(
        sample(&m, "xlb_packets_total{verdict=\"drop_no_real\"}"),
        DATAGRAMS as f64
    );
    assert_eq!(
        sample(&m, "xlb_conntrack_entries_limit"),
        CONNTRACK_SIZE.parse::<f64>().expect("size")
    );
    assert!(sample(&m, "xlb_conntrack_entries") > 0.0);

    // Every series the dashboard and the alerts query is exported (by the daemon, or
    // for xlb_decap_* by `xlb decap`), and every label they use is on some series.
    let daemon_names = names(&m);
    let decap_names = names(&decap_m[0]);
    let mut labels = label_names(&m);
    labels.extend(label_names(&decap_m[0]));
    labels.extend(PROMETHEUS_LABELS.map(str::to_owned));
    for (source, expr) in shipped_queries() {
        for name in identifiers(&expr)
            .into_iter()
            .filter(|i| i.starts_with("xlb_"))
        {
            let exported = if name.starts_with("xlb_decap_") {
                decap_names.contains(&name)
            } else {
                daemon_names.contains(&name)
            };
            assert!(
                exported,
                "{source} queries {name}, which is not exported: {expr}"
            );
        }
        for label in query_labels(&expr) {
            assert!(
                labels.contains(&label),
                "{source} uses the label {label:?}, which no series has: {expr}"
            );
        }
    }
    drop(decaps);
}
