//! Flow sync (issue 12): the names of its per-packet cases (measured in
//! [`crate::per_packet`]) and the `sync` section, two real daemons in
//! namespaces, one taking new connections and reporting them to the other.
//!
//! ```text
//!   client (.2) ── bridge 198.51.100.0/24 ── lb1 (.1, xlb, VIP) ── rs1 (.11), rs2 (.12)
//!                                        └── lb2 (.3, xlb: flow sync only)
//! ```
//!
//! The client opens new TCP connections to the VIP at a fixed rate; lb1's data
//! path reports each once confirmed, its daemon sends them to lb2, whose daemon
//! writes them into its peer flow table (`XLB_PEER_FLOWS`, pinned, so this
//! process reads it too).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use lb_common::{FlowKey, FlowState};
use serde::{Deserialize, Serialize};
use xlb_tests::harness::{
    Daemon, PinnedRun, VIP, balanced_topology, flow_key, metric_samples, pass_on_switch_port,
    path_str, scrape_metrics, start_reals, wait_until,
};
use xlb_tests::netns::{Host, unique_prefix};

use crate::report::{PerPacket, Spread, percentile};

/// Per-packet case: a tracked flow already reported, sync on.
pub const TRACKED_ON: &str = "TCP, tracked flow (DR), sync on";
/// Per-packet case: a SYN (new flow, never reported), sync on.
pub const SYN_ON: &str = "TCP SYN, new flow (DR), sync on";
/// Per-packet case: the first hit of an entry, sync off.
pub const FIRST_HIT_OFF: &str = "TCP, first hit of a tracked flow (DR), sync off";
/// Per-packet case: the first hit of an entry, sync on (the reporting packet).
pub const FIRST_HIT_ON: &str = "TCP, first hit of a tracked flow (DR), sync on: reported";
/// Per-packet case: a non-SYN packet without an entry, sync off.
pub const MISS_OFF: &str = "TCP non-SYN, conntrack miss (DR), sync off";
/// Per-packet case: the same, sync on, not in the peer flows.
pub const MISS_ON: &str = "TCP non-SYN, conntrack miss (DR), sync on, no peer flow";
/// Per-packet case: the same, sync on, served from the peer flows (promoted).
pub const MISS_PEER: &str = "TCP non-SYN, conntrack miss (DR), sync on, from a peer flow";

/// The sync-on cases against their sync-off counterparts: (what, off, on).
const PAIRS: [(&str, &str, &str); 5] = [
    (
        "tracked flow, already reported (a flag test)",
        "TCP, tracked flow (DR)",
        TRACKED_ON,
    ),
    (
        "TCP SYN, new flow (never reported)",
        "TCP SYN, new flow (DR)",
        SYN_ON,
    ),
    (
        "the reporting packet (a ring reserve and submit)",
        FIRST_HIT_OFF,
        FIRST_HIT_ON,
    ),
    (
        "conntrack miss, not in the peer flows (one more lookup)",
        MISS_OFF,
        MISS_ON,
    ),
    (
        "conntrack miss served from a peer flow (promotion instead of Maglev)",
        MISS_OFF,
        MISS_PEER,
    ),
];

/// The flow sync table of the per-packet section: the sync cases and the
/// sync on − off deltas (nothing when the run had no sync cases).
pub fn per_packet_md(w: &mut String, p: &PerPacket) {
    let case = |name: &str| p.cases.iter().find(|c| c.name == name);
    if case(FIRST_HIT_ON).is_none() {
        return;
    }
    line(w, "#### Flow sync: the cost of the report (issue 12)");
    line(w, "");
    line(
        w,
        "The same rounds and floors as the table above, with `Config::sync = 1` (flow sync on) \
         beside the same path with sync off. The reporting case writes the flow's conntrack \
         entry back without `FLOW_F_REPORTED` (stamped now) before every call, so each call is \
         an entry's first hit and reserves and submits a report in the ring; the ring \
         (8,192 reports) is drained every 1,024 calls, outside the timed calls, and the run \
         checks that it carried exactly one report per call and lost none. The miss cases \
         delete the flow's entry before every call; the promotion case's flow is in \
         `XLB_PEER_FLOWS` and the run checks that every call took it from there \
         (`conntrack_peer_hit`). The tracked case with sync on cycles through flows that \
         already reported their confirmation, as a long flow's packets do.",
    );
    line(w, "");
    line(
        w,
        "| case | mean ns | median ns | p99 ns | × floor, mean | × floor, median |",
    );
    line(w, "| --- | ---: | ---: | ---: | ---: | ---: |");
    let names: Vec<&str> =
        PAIRS
            .iter()
            .flat_map(|(_, off, on)| [*off, *on])
            .fold(Vec::new(), |mut v, n| {
                if !v.contains(&n) {
                    v.push(n);
                }
                v
            });
    for c in names.iter().filter_map(|n| case(n)) {
        line(
            w,
            &format!(
                "| {} | {:.1} | {:.1} | {:.1} | {} | {} |",
                c.name,
                c.mean_ns,
                c.median_ns,
                c.p99_ns,
                spread(&c.ratio_tx_floor_mean, 2),
                spread(&c.ratio_tx_floor, 2)
            ),
        );
    }
    line(w, "");
    line(
        w,
        "Sync on vs off, per round (the on case's round mean or median minus the off case's \
         in the same round), ns, median (min–max) over the rounds:",
    );
    line(w, "");
    line(w, "| path | Δ mean ns | Δ median ns |");
    line(w, "| --- | ---: | ---: |");
    for (what, off, on) in PAIRS {
        let (Some(off), Some(on)) = (case(off), case(on)) else {
            continue;
        };
        let delta = |a: &[f64], b: &[f64]| {
            Spread::of(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f64>>())
        };
        line(
            w,
            &format!(
                "| {what} | {} | {} |",
                spread(&delta(&on.round_means_ns, &off.round_means_ns), 1),
                spread(&delta(&on.round_medians_ns, &off.round_medians_ns), 1)
            ),
        );
    }
    line(w, "");
}

// ---------------------------------------------------------------- the sync section

/// What the `sync` section measured.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncRun {
    /// New connections per second the client aimed at.
    pub rate: u32,
    pub seconds: f64,
    /// Connections opened (answered by a real, checked).
    pub connections: u64,
    pub answered: u64,
    /// Connections whose peer entry the poll saw on lb2.
    pub seen: u64,
    /// Lag measured by polling lb2's peer table: from `connect()` returning on
    /// the client (its ACK, the flow's second packet, is on its way to lb1)
    /// to the entry being in lb2's table, ms.
    pub poll_lag_ms: Summary,
    /// The poll's interval, µs (the resolution of `poll_lag_ms`).
    pub poll_interval_us: u64,
    /// p50 and p99 of lb2's `xlb_sync_lag_seconds` (report → peer map write),
    /// as the upper bound of the bucket that holds them, ms.
    pub histogram_p50_ms: f64,
    pub histogram_p99_ms: f64,
    /// Samples in that histogram during the run (new and ended flows).
    pub histogram_count: f64,
    /// lb1's counters during the run.
    pub messages_sent: f64,
    pub flows_sent: f64,
    pub bytes_sent: f64,
    /// lb2's counters during the run.
    pub messages_received: f64,
    pub flows_received: f64,
    pub flows_ended: f64,
    pub dropped: f64,
    /// Failovers under load, sync off and on (full runs only).
    pub failovers: Vec<FailoverRun>,
}

/// One failover under load (issue 12's scenarios 1 and 5).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverRun {
    /// What failed.
    pub scenario: String,
    pub sync: bool,
    /// Kept-alive connections broken (a reset, a 2 s stall, another real), of how many.
    pub broken: usize,
    pub connections: usize,
    /// New connections (one every 50 ms) that failed, and answered.
    pub failed: usize,
    pub answered: usize,
    /// From the failure until a new connection started after it was answered, ms.
    pub recovered_ms: Option<f64>,
    /// VRRP only: from the cut until lb2 was master (`xlb role`), ms.
    pub master_ms: Option<f64>,
}

/// Scenario 1 (`kill -9` of a balancer behind the ECMP router after a real was
/// added) and 5 (a keepalived pair's master cut off after a real was added),
/// each with flow sync off and on.
fn failovers() -> Vec<FailoverRun> {
    use xlb_tests::cluster::{Cluster, Failure, Pair, Setup, add_a_real_then_fail_lb1, finish};
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let mut out = Vec::new();
    for sync in [false, true] {
        eprintln!("xlb-bench:   kill -9 of a balancer behind ECMP, sync {sync}");
        let mut cluster = Cluster::start_with(
            if sync { "bfs" } else { "bfo" },
            Setup {
                reals: 3,
                in_vip: 2,
                sync,
            },
        );
        let (load, late, at) = add_a_real_then_fail_lb1(&mut cluster, Failure::Kill);
        let f = finish(load, late, at);
        out.push(FailoverRun {
            scenario: "kill -9 of a balancer (BGP/ECMP, BIRD)".to_owned(),
            sync,
            broken: f.broken + f.late_broken,
            connections: 48,
            failed: f.failed,
            answered: f.answered,
            recovered_ms: ms(f.recovered),
            master_ms: None,
        });
        drop(cluster);
        eprintln!("xlb-bench:   keepalived pair, master cut off, sync {sync}");
        let (f, took) = Pair::start(if sync { "bvs" } else { "bvo" }, sync).fail_over();
        out.push(FailoverRun {
            scenario: "keepalived master cut off (VRRPv3, 100 ms adverts)".to_owned(),
            sync,
            broken: f.broken,
            connections: 24,
            failed: f.failed,
            answered: f.answered,
            recovered_ms: ms(f.recovered),
            master_ms: ms(Some(took)),
        });
    }
    out
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// How long a connection stays open before its request is read and it is
/// closed: longer than any lag, so lb2 sees the confirmation before the end.
const HOLD: Duration = Duration::from_millis(300);
/// Client threads sharing the rate.
const THREADS: u32 = 4;
const METRICS_PORT: u16 = 9814;
const SYNC_PORT: u16 = 9815;
/// How long the poll waits for a flow before counting it as never seen.
const GIVE_UP: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_micros(200);

pub fn run(quick: bool) -> SyncRun {
    let rate: u32 = 1000;
    let seconds = if quick { 1.0 } else { 5.0 };
    let mut topo = balanced_topology(&unique_prefix("bsy"), 2);
    let servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
    let lb2 = topo.add_host("lb2", "lb2", 3);
    pass_on_switch_port(&mut topo, "lb2");
    topo.client.ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
    topo.client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    topo.client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let run2 = PinnedRun::new(&format!("{}-lb2", topo.prefix()));
    let run1 = PinnedRun::new(&format!("{}-lb1", topo.prefix()));
    let reals: Vec<String> = topo.reals.iter().map(|r| r.ipv4.to_string()).collect();
    let lb1 = &topo.lb;
    let d2 = balancer(&lb2, lb1, &run2, &reals);
    let d1 = balancer(lb1, &lb2, &run1, &reals);
    let peer_flows = run2.peer_flows();
    let metrics = |host: &Host| {
        metric_samples(&scrape_metrics(
            host,
            SocketAddr::from((host.ipv4, METRICS_PORT)),
        ))
    };
    // One connection end to end before measuring: the VIP serves.
    wait_until("a connection through lb1 is answered", || {
        topo.client.ns.run_in(|| connect_and_get().is_ok())
    });
    // Its end reached lb2: the counters read next include all of it.
    wait_until("lb2 removed the check connection's flow", || {
        metrics(&lb2)
            .get("xlb_sync_flows_ended_total")
            .is_some_and(|&n| n >= 1.0)
    });
    let before1 = metrics(lb1);
    let before2 = metrics(&lb2);
    let client = topo.client.ipv4;
    let (tx, rx) = mpsc::channel::<(FlowKey, Instant)>();
    let total = (f64::from(rate) * seconds) as u64;
    let poller = std::thread::spawn(move || poll(&peer_flows, &rx));
    let (connections, answered) = topo.client.ns.run_in(|| {
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let tx = tx.clone();
                    s.spawn(move || load(t, rate, total, client, &tx))
                })
                .collect();
            threads
                .into_iter()
                .map(|h| h.join().expect("a load thread"))
                .fold((0, 0), |(c, a), (c2, a2)| (c + c2, a + a2))
        })
    });
    drop(tx);
    let (lags, seen, interval) = poller.join().expect("the poll thread");
    // The ends went out with the closes: let the last batch arrive.
    std::thread::sleep(Duration::from_millis(200));
    let after1 = metrics(lb1);
    let after2 = metrics(&lb2);
    let d = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, name: &str| {
        let sum = |m: &BTreeMap<String, f64>| {
            m.iter()
                .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
                .map(|(_, v)| v)
                .sum::<f64>()
        };
        sum(a) - sum(b)
    };
    let (hist_count, p50, p99) = histogram(&before2, &after2);
    let mut out = SyncRun {
        rate,
        seconds,
        connections,
        answered,
        seen,
        poll_lag_ms: summary(&lags),
        poll_interval_us: interval,
        histogram_p50_ms: p50 * 1000.0,
        histogram_p99_ms: p99 * 1000.0,
        histogram_count: hist_count,
        messages_sent: d(&after1, &before1, "xlb_sync_messages_sent_total"),
        flows_sent: d(&after1, &before1, "xlb_sync_flows_sent_total"),
        bytes_sent: d(&after1, &before1, "xlb_sync_bytes_sent_total"),
        messages_received: d(&after2, &before2, "xlb_sync_messages_received_total"),
        flows_received: d(&after2, &before2, "xlb_sync_flows_received_total"),
        flows_ended: d(&after2, &before2, "xlb_sync_flows_ended_total"),
        dropped: d(&after2, &before2, "xlb_sync_dropped_total"),
        failovers: Vec::new(),
    };
    assert_eq!(
        out.answered, out.connections,
        "some connections through lb1 were not answered: the load measured a broken path"
    );
    assert!(
        out.seen > 0 && out.flows_received > 0.0,
        "lb2 received no flow from lb1: flow sync is not working ({out:?})"
    );
    drop((d1, d2, servers));
    eprintln!(
        "xlb-bench:   {} connections, {} seen on lb2, lag p50 {:.2} ms p99 {:.2} ms (poll)",
        out.connections, out.seen, out.poll_lag_ms.p50, out.poll_lag_ms.p99
    );
    if !quick {
        drop(topo);
        out.failovers = failovers();
    }
    out
}

/// Starts a balancer on `host` with the VIP on `reals` and flow sync to `peer`.
fn balancer(host: &Host, peer: &Host, run: &PinnedRun, reals: &[String]) -> Daemon {
    let dir = run.dir();
    let mut yaml = format!("services:\n  - vip: {VIP}:80/tcp\n    reals:\n");
    for r in reals {
        yaml.push_str(&format!("      - address: {r}\n"));
    }
    let config = dir.join("xlb.yaml");
    std::fs::write(&config, yaml).expect("writing the balancer's config");
    let key = dir.join("sync.key");
    std::fs::write(&key, "a shared key of the bench cluster\n").expect("writing the key");
    let metrics = format!("{}:{METRICS_PORT}", host.ipv4);
    let listen = format!("{}:{SYNC_PORT}", host.ipv4);
    let to = format!("{}:{SYNC_PORT}", peer.ipv4);
    Daemon::start_pinned(
        &host.ns,
        "eth0",
        run,
        &[
            "--config",
            path_str(&config),
            "--metrics-addr",
            &metrics,
            "--sync-listen",
            &listen,
            "--sync-peer",
            &to,
            "--sync-key-file",
            path_str(&key),
            "--sync-pull-timeout-ms",
            "1000",
            // The namespaces share the host name, the node name's default.
            "--node-name",
            host.ns.name(),
        ],
    )
}

/// One connection to the VIP with a request, answered (the check before the run).
fn connect_and_get() -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    answer(&mut s)
}

fn answer(s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    if buf[..n].starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("answer {:?}", String::from_utf8_lossy(&buf[..n])))
    }
}

/// Thread `t` of the load: every `THREADS`-th of `total` connections at
/// `rate` per second in all, each kept open [`HOLD`], then asked and closed.
/// Returns (opened, answered).
fn load(
    t: u32,
    rate: u32,
    total: u64,
    client: std::net::Ipv4Addr,
    tx: &mpsc::Sender<(FlowKey, Instant)>,
) -> (u64, u64) {
    let period = Duration::from_secs(1) / rate;
    let start = Instant::now();
    let mut open: VecDeque<(Instant, TcpStream)> = VecDeque::new();
    let (mut opened, mut answered) = (0, 0);
    for k in (u64::from(t)..total).step_by(THREADS as usize) {
        xlb_tests::harness::check_interrupted();
        let due = start + period * u32::try_from(k).expect("few connections");
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        answered += close_due(&mut open, false);
        let s = TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connection {k} to the VIP: {e}"));
        let at = Instant::now();
        opened += 1;
        let port = s.local_addr().expect("a local address").port();
        let _ = tx.send((flow_key(IpAddr::V4(client), port), at));
        open.push_back((at, s));
    }
    std::thread::sleep(HOLD);
    answered += close_due(&mut open, true);
    (opened, answered)
}

/// Asks and closes the connections open [`HOLD`] or longer (`all`: every
/// one); returns how many were answered.
fn close_due(open: &mut VecDeque<(Instant, TcpStream)>, all: bool) -> u64 {
    let mut n = 0;
    while let Some((at, _)) = open.front() {
        if !all && at.elapsed() < HOLD {
            break;
        }
        let (_, mut s) = open.pop_front().expect("front exists");
        if answer(&mut s).is_ok() {
            n += 1;
        }
    }
    n
}

/// Looks the flows up in lb2's peer table until each is there (or
/// [`GIVE_UP`]); returns their lags (ms), how many were seen and the mean
/// interval between passes (µs).
fn poll(
    peer_flows: &HashMap<MapData, FlowKey, FlowState>,
    rx: &mpsc::Receiver<(FlowKey, Instant)>,
) -> (Vec<f64>, u64, u64) {
    let mut pending: Vec<(FlowKey, Instant)> = Vec::new();
    let mut lags = Vec::new();
    let mut open = true;
    let (mut passes, started) = (0u64, Instant::now());
    while open || !pending.is_empty() {
        loop {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let now = Instant::now();
        pending.retain(|(k, at)| {
            if peer_flows.get(k, 0).is_ok() {
                lags.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                false
            } else {
                now.duration_since(*at) < GIVE_UP
            }
        });
        passes += 1;
        std::thread::sleep(POLL);
    }
    let seen = lags.len() as u64;
    let interval = started.elapsed().as_micros() as u64 / passes.max(1);
    (lags, seen, interval)
}

fn summary(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let p = |q: f64| percentile_f(&v, q);
    Summary {
        p50: p(50.0),
        p90: p(90.0),
        p99: p(99.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

fn percentile_f(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The report's own percentile, on integer nanoseconds.
    let ns: Vec<u64> = sorted.iter().map(|x| (x * 1e6) as u64).collect();
    percentile(&ns, q) / 1e6
}

/// lb2's lag histogram during the run: (samples, p50, p99), the quantiles
/// as the upper bound (s) of the bucket that holds them.
fn histogram(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, f64, f64) {
    let prefix = "xlb_sync_lag_seconds_bucket{le=\"";
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last().map_or(0.0, |b| b.1);
    let q = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * count && count > 0.0)
            .map_or(f64::NAN, |b| b.0)
    };
    (count, q(0.5), q(0.99))
}

/// The `sync` section of docs/benchmarks.md.
pub fn section_md(w: &mut String, s: &SyncRun) {
    line(w, "## Flow sync between two balancers (issue 12)");
    line(w, "");
    line(
        w,
        &format!(
            "Two real `xlb run` daemons in namespaces on one bridge, each with flow sync to \
             the other (UDP, HMAC): lb1 holds the VIP and takes the traffic, lb2 only receives \
             sync messages. A client opens new TCP connections to the VIP at {} per second for \
             {:.0} s ({} connections, from {} threads, paced; each is kept open {} ms, then \
             sends a request, reads the real's answer ({} of {} answered) and closes, so each \
             flow is reported twice: confirmed and ended).",
            s.rate,
            s.seconds,
            s.connections,
            THREADS,
            HOLD.as_millis(),
            s.answered,
            s.connections
        ),
    );
    line(w, "");
    line(
        w,
        &format!(
            "**Sync lag, measured by polling** lb2's peer flow table (pinned, read by the \
             bench every {} µs on average): from `connect()` returning on the client (its \
             ACK, the flow's confirming second packet, is then on its way to lb1's XDP) to \
             the flow's entry being in lb2's table. {} of {} flows seen; p50 {:.2} ms, p90 \
             {:.2} ms, p99 {:.2} ms, max {:.2} ms. The resolution is the poll interval.",
            s.poll_interval_us,
            s.seen,
            s.connections,
            s.poll_lag_ms.p50,
            s.poll_lag_ms.p90,
            s.poll_lag_ms.p99,
            s.poll_lag_ms.max
        ),
    );
    line(w, "");
    line(
        w,
        &format!(
            "**Sync lag, lb2's histogram** `xlb_sync_lag_seconds` (report time in lb1's data \
             path → peer map write, {:.0} samples: confirmations and ends): p50 ≤ {} ms, p99 ≤ \
             {} ms. Bucket resolution: each figure is the upper bound of the bucket holding \
             the quantile (buckets 1, 2, 5, 10, 15, 20, 50 ms ...).",
            s.histogram_count, s.histogram_p50_ms, s.histogram_p99_ms
        ),
    );
    line(w, "");
    let per_k = |x: f64| x * 1000.0 / (s.connections.max(1) as f64);
    line(w, "| per 1,000 new flows | lb1 sent | lb2 received |");
    line(w, "| --- | ---: | ---: |");
    line(
        w,
        &format!(
            "| messages | {:.1} | {:.1} |",
            per_k(s.messages_sent),
            per_k(s.messages_received)
        ),
    );
    line(
        w,
        &format!(
            "| flow records (confirmed + ended) | {:.0} | {:.0} + {:.0} |",
            per_k(s.flows_sent),
            per_k(s.flows_received),
            per_k(s.flows_ended)
        ),
    );
    line(
        w,
        &format!("| bytes (UDP payload) | {:.0} | |", per_k(s.bytes_sent)),
    );
    line(w, "");
    let mut note = format!(
        "lb2 counts confirmed flows it wrote (`xlb_sync_flows_received_total`) and ended \
         flows it removed (`xlb_sync_flows_ended_total`) apart. Messages dropped by lb2 during the run: {:.0}. ",
        s.dropped
    );
    let _ = write!(
        note,
        "At {} new flows/s that is {:.0} messages/s and {:.1} kB/s from the sending balancer.",
        s.rate,
        per_k(s.messages_sent) * f64::from(s.rate) / 1000.0,
        per_k(s.bytes_sent) * f64::from(s.rate) / 1000.0 / 1000.0
    );
    line(w, &note);
    line(w, "");
    if s.failovers.is_empty() {
        return;
    }
    line(w, "### Failovers under load");
    line(w, "");
    line(
        w,
        "The end-to-end tests' scenarios (tests/src/cluster.rs), timed: three reals of which \
         the VIP has two, kept-alive connections asking every 100 ms (broken: a reset, a 2 s \
         stall or another real's answer) and a new connection every 50 ms; a third real is \
         added on both balancers, then one fails. *Answered again* is the time from the \
         failure until a new connection started after it was answered (a SYN lost on the dead \
         path is retransmitted after 1 s).",
    );
    line(w, "");
    line(
        w,
        "| scenario | flow sync | connections broken | new connections failed / answered | answered again after | lb2 master after |",
    );
    line(w, "| --- | --- | ---: | ---: | ---: | ---: |");
    let ms = |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |v| format!("{v:.0} ms"));
    for f in &s.failovers {
        line(
            w,
            &format!(
                "| {} | {} | {} of {} | {} / {} | {} | {} |",
                f.scenario,
                if f.sync { "on" } else { "off" },
                f.broken,
                f.connections,
                f.failed,
                f.answered,
                ms(f.recovered_ms),
                f.master_ms
                    .map_or_else(|| "–".to_owned(), |v| format!("{v:.0} ms"))
            ),
        );
    }
    line(w, "");
}

fn line(w: &mut String, s: &str) {
    w.push_str(s);
    w.push('\n');
}

fn spread(s: &Spread, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}
