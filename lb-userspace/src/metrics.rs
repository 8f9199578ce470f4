//! Prometheus metrics over HTTP (`--metrics-addr`), built at each scrape from
//! the controller's published snapshot, the data path's counters (read on
//! handles of their own), the last conntrack count and the probe statuses. A
//! scrape never waits on the controller and never walks the conntrack table.
//! `xlb decap --metrics-addr` serves the decapsulator's counters the same way.
//!
//! Names follow the Prometheus conventions: counters end in `_total`, units
//! are base units named in the metric (`_bytes`, `_seconds`), and a VIP is
//! the labels `address`, `port`, `protocol` (a real adds `real`). Every
//! metric is listed in docs/operations.md.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State as AxState,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    controller::{Activity, Handle},
    counters::{FlowCounter, FlowCounts, Reader},
    decap::DecapCounters,
    health::engine::Board,
    model::Vip,
    views,
};

type Labels = Vec<(String, String)>;

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    /// The controller (its snapshot only).
    pub handle: Handle,
    /// The data path's counters.
    pub reader: Arc<Reader>,
    /// The conntrack count.
    pub flows: Arc<FlowCounter>,
    /// The probe statuses.
    pub board: Board,
    /// The controller's own counters.
    pub activity: Arc<Activity>,
    /// Announcement, drain and VRRP role.
    pub node: crate::node::NodeHandle,
    /// The fleet's store, in store mode.
    pub store: Option<crate::store::Store>,
    /// Flow sync, when on.
    pub sync: Option<crate::flowsync::SyncHandle>,
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The labels naming a VIP: `address`, `port`, `protocol`.
fn vip_labels(vip: &Vip) -> Labels {
    labels(&[
        ("address", vip.addr.to_string()),
        ("port", vip.port.to_string()),
        ("protocol", vip.proto.to_string()),
    ])
}

/// A gauge's value from a count.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `xlb_build_info{version,commit} 1`, in both the daemon's and `xlb decap`'s
/// metrics.
fn register_build_info(reg: &mut Registry) {
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("commit", crate::COMMIT.to_owned()),
    ]))
    .set(1);
    reg.register(
        "build_info",
        "Always 1; the labels say which xlb build is running",
        info,
    );
}

/// The reason label of a verdict that drops the packet (`drop_*`, and
/// `aborted`: XDP_ABORTED drops it too), or `None` for the others.
fn drop_reason(verdict: &'static str) -> Option<&'static str> {
    match verdict {
        "aborted" => Some("aborted"),
        v => v.strip_prefix("drop_"),
    }
}

/// Renders every metric in the OpenMetrics text format, with `flows` the
/// conntrack count to report.
pub fn render(src: &Sources, flows: &FlowCounts) -> Result<String, String> {
    let mut reg = Registry::with_prefix("xlb");
    register_build_info(&mut reg);
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let dropped = Family::<Labels, Counter>::default();
    let conntrack_events = Family::<Labels, Counter>::default();
    let bypassed = Counter::<u64>::default();
    let sync_lost = Counter::<u64>::default();
    let vip_packets = Family::<Labels, Counter>::default();
    let vip_bytes = Family::<Labels, Counter>::default();
    let vip_flows = Family::<Labels, Counter>::default();
    let vip_active = Family::<Labels, Gauge>::default();
    let vip_reals = Family::<Labels, Gauge>::default();
    let vip_serving = Family::<Labels, Gauge>::default();
    let vip_guarded = Family::<Labels, Gauge>::default();
    let real_packets = Family::<Labels, Counter>::default();
    let real_bytes = Family::<Labels, Counter>::default();
    let real_flows = Family::<Labels, Counter>::default();
    let real_active = Family::<Labels, Gauge>::default();
    let real_healthy = Family::<Labels, Gauge>::default();
    let real_resolved = Family::<Labels, Gauge>::default();
    let real_weight = Family::<Labels, Gauge>::default();
    let real_effective = Family::<Labels, Gauge>::default();
    let real_changes = Family::<Labels, Counter>::default();
    let conntrack = Gauge::<i64>::default();
    let conntrack_limit = Gauge::<i64>::default();
    let unresolved = Gauge::<i64>::default();
    let reconciles = Counter::<u64>::default();
    let reconcile_errors = Counter::<u64>::default();
    let health_flips = Counter::<u64>::default();

    let snap = src.handle.snapshot();
    for (c, name) in src
        .reader
        .verdicts()
        .map_err(|e| e.to_string())?
        .iter()
        .zip(lb_common::stat::VERDICT_NAMES)
    {
        let l = labels(&[("verdict", name.to_owned())]);
        packets.get_or_create(&l).inc_by(c.packets);
        bytes.get_or_create(&l).inc_by(c.bytes);
        if let Some(reason) = drop_reason(name) {
            dropped
                .get_or_create(&labels(&[("reason", reason.to_owned())]))
                .inc_by(c.packets);
        }
    }
    for (name, n) in src.reader.events().map_err(|e| e.to_string())? {
        match name.strip_prefix("conntrack_") {
            Some(event) => conntrack_events
                .get_or_create(&labels(&[("event", event.to_owned())]))
                .inc_by(n),
            None if name == "sync_report_lost" => sync_lost.inc_by(n),
            None => bypassed.inc_by(n),
        };
    }
    for v in views::vips(&snap, &src.reader, flows).map_err(|e| e.to_string())? {
        let vl = vip_labels(&v.vip);
        vip_packets.get_or_create(&vl).inc_by(v.packets);
        vip_bytes.get_or_create(&vl).inc_by(v.bytes);
        vip_flows.get_or_create(&vl).inc_by(v.flows);
        vip_active.get_or_create(&vl).set(gauge(v.active_flows));
        vip_reals
            .get_or_create(&vl)
            .set(gauge(v.reals.len() as u64));
        let serving = v
            .reals
            .iter()
            .filter(|r| r.effective_weight.is_some_and(|w| w > 0))
            .count();
        vip_serving.get_or_create(&vl).set(gauge(serving as u64));
        vip_guarded.get_or_create(&vl).set(i64::from(v.guarded));
        for r in v.reals {
            let mut rl = vl.clone();
            rl.push(("real".to_owned(), r.addr.to_string()));
            real_packets.get_or_create(&rl).inc_by(r.packets);
            real_bytes.get_or_create(&rl).inc_by(r.bytes);
            real_flows.get_or_create(&rl).inc_by(r.flows);
            real_active.get_or_create(&rl).set(gauge(r.active_flows));
            real_healthy.get_or_create(&rl).set(i64::from(r.healthy));
            real_resolved.get_or_create(&rl).set(i64::from(r.resolved));
            real_weight.get_or_create(&rl).set(i64::from(r.weight));
            real_effective
                .get_or_create(&rl)
                .set(i64::from(r.effective_weight.unwrap_or(0)));
            real_changes.get_or_create(&rl).inc_by(r.table_changes);
        }
    }
    conntrack.set(gauge(flows.entries));
    conntrack_limit.set(i64::from(src.reader.flow_capacity()));
    unresolved.set(gauge(src.activity.unresolved()));
    reconciles.inc_by(src.activity.reconcile_count());
    reconcile_errors.inc_by(src.activity.reconcile_errors());
    health_flips.inc_by(src.board.flips());

    reg.register(
        "packets",
        "Packets seen by the data path, by verdict",
        packets,
    );
    reg.register("bytes", "Bytes seen by the data path, by verdict", bytes);
    reg.register(
        "dropped_packets",
        "Packets the data path dropped, by reason (the drop_* verdicts and aborted)",
        dropped,
    );
    reg.register(
        "conntrack_events",
        "Conntrack lookups and updates (hit, miss, new, stale, insert_failed, peer_hit: a flow another balancer reported)",
        conntrack_events,
    );
    reg.register(
        "sync_reports_lost",
        "Flow sync reports the data path could not queue (the report ring was full); \
         each is tried again on the flow's next packet",
        sync_lost,
    );
    reg.register(
        "flood_guard_bypassed_flows",
        "New flows not tracked because of the flood guard (forwarded by Maglev alone)",
        bypassed,
    );
    reg.register("vip_packets", "Packets forwarded per VIP", vip_packets);
    reg.register("vip_bytes", "Bytes forwarded per VIP", vip_bytes);
    reg.register("vip_new_flows", "New flows per VIP", vip_flows);
    reg.register(
        "vip_active_flows",
        "Flows of the VIP's reals active in the conntrack table (counted every 5 s)",
        vip_active,
    );
    reg.register("vip_reals", "Reals configured for the VIP", vip_reals);
    reg.register(
        "vip_serving_reals",
        "Reals the VIP's live table sends new flows to (effective weight above 0)",
        vip_serving,
    );
    reg.register(
        "vip_avalanche_guard_active",
        "1 while the avalanche guard keeps unhealthy reals of the VIP in its table",
        vip_guarded,
    );
    reg.register(
        "real_packets",
        "Packets forwarded per VIP and real",
        real_packets,
    );
    reg.register("real_bytes", "Bytes forwarded per VIP and real", real_bytes);
    reg.register("real_new_flows", "New flows per VIP and real", real_flows);
    reg.register(
        "real_active_flows",
        "Flows of the real active in the conntrack table (counted every 5 s)",
        real_active,
    );
    reg.register(
        "real_healthy",
        "1 when the real's health verdict in force is up (or it is not probed)",
        real_healthy,
    );
    reg.register(
        "real_resolved",
        "1 when the real's MAC (or its next hop's) is known; 0: kept out of the table",
        real_resolved,
    );
    reg.register(
        "real_weight",
        "Configured weight of the real (override or config)",
        real_weight,
    );
    reg.register(
        "real_effective_weight",
        "Weight of the real in the live Maglev table (0: no new flows, or out of it)",
        real_effective,
    );
    reg.register(
        "real_table_changes",
        "Times the real entered or left the set of reals the live table sends new flows to",
        real_changes,
    );
    reg.register(
        "conntrack_entries",
        "Entries in the conntrack table (counted every 5 s)",
        conntrack,
    );
    reg.register(
        "conntrack_entries_limit",
        "Flows the conntrack table is sized for (--conntrack-size rounded up to a power of two)",
        conntrack_limit,
    );
    reg.register(
        "unresolved_reals",
        "Reals whose MAC is not known yet",
        unresolved,
    );
    reg.register("reconciles", "Reconcile steps run", reconciles);
    reg.register(
        "reconcile_errors",
        "Reconcile steps that failed (and were undone)",
        reconcile_errors,
    );
    reg.register(
        "reconcile_duration_seconds",
        "Time a reconcile step took",
        src.activity.reconcile_seconds(),
    );
    reg.register("health_flips", "Health verdict changes", health_flips);
    crate::node::register_metrics(&mut reg, &src.node.status());
    register_reload(&mut reg, &src.activity);
    register_probe_metrics(&mut reg, &src.board);
    if let Some(store) = &src.store {
        crate::store::metrics::register(&mut reg, store);
    }
    if let Some(sync) = &src.sync {
        sync.stats.register(&mut reg);
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Renders `xlb decap`'s metrics from its counters (as
/// [`DecapCounters::read`] gives them).
pub fn render_decap(counters: &[(&'static str, lb_common::Counter)]) -> Result<String, String> {
    let mut root = Registry::with_prefix("xlb");
    register_build_info(&mut root);
    let reg = root.sub_registry_with_prefix("decap");
    let decap_packets = Family::<Labels, Counter>::default();
    let decap_bytes = Family::<Labels, Counter>::default();
    let passed = Family::<Labels, Counter>::default();
    let dropped = Family::<Labels, Counter>::default();
    for (name, c) in counters {
        if let Some(encap) = name.strip_prefix("decap_") {
            let l = labels(&[("encapsulation", encap.to_owned())]);
            decap_packets.get_or_create(&l).inc_by(c.packets);
            decap_bytes.get_or_create(&l).inc_by(c.bytes);
        } else if let Some(reason) = name.strip_prefix("pass_") {
            passed
                .get_or_create(&labels(&[("reason", reason.to_owned())]))
                .inc_by(c.packets);
        } else {
            let reason =
                drop_reason(name).ok_or_else(|| format!("unknown decap counter {name}"))?;
            dropped
                .get_or_create(&labels(&[("reason", reason.to_owned())]))
                .inc_by(c.packets);
        }
    }
    reg.register(
        "decapsulated_packets",
        "Tunnel packets decapsulated, by encapsulation (ipip, ip6ip6, 4in6)",
        decap_packets,
    );
    reg.register(
        "decapsulated_bytes",
        "Bytes of the tunnel packets decapsulated (outer headers included), by encapsulation",
        decap_bytes,
    );
    reg.register(
        "passed_packets",
        "Packets passed to the kernel untouched, by reason (not_tunnel, not_local, malformed)",
        passed,
    );
    reg.register(
        "dropped_packets",
        "Packets dropped, by reason (not_allowed_src, aborted)",
        dropped,
    );
    let mut out = String::new();
    encode(&mut out, &root).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The HTTP answer to a scrape.
fn exposition(rendered: Result<String, String>) -> impl IntoResponse {
    match rendered {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            e,
        ),
    }
}

/// The last configuration load (start-up, SIGHUP, `xlb apply`), under
/// Prometheus's own names: `xlb_config_last_reload_successful` (0 or 1) and
/// `xlb_config_last_reload_success_timestamp_seconds`.
fn register_reload(reg: &mut Registry, activity: &Activity) {
    let last = activity.last_reload();
    let successful = Gauge::<i64>::default();
    successful.set(i64::from(last.as_ref().is_none_or(|r| r.successful)));
    let success_at = Gauge::<i64>::default();
    success_at.set(
        last.and_then(|r| r.last_success_at)
            .map_or(0, |t| i64::try_from(t).unwrap_or(i64::MAX)),
    );
    reg.register(
        "config_last_reload_successful",
        "Whether the last configuration load (start-up, SIGHUP, xlb apply) succeeded",
        successful,
    );
    reg.register(
        "config_last_reload_success_timestamp_seconds",
        "When a configuration load last succeeded, Unix seconds",
        success_at,
    );
}

/// Per-real probe metrics, labelled with the VIP as `address`, `port`,
/// `protocol` and the `real`: `xlb_real_flaps_total` (verdict changes) and
/// `xlb_probe_duration_seconds` (a histogram of probe durations, timeouts
/// included).
fn register_probe_metrics(reg: &mut Registry, board: &Board) {
    let flaps = Family::<Labels, Counter>::default();
    for ((vip, real), st) in board.statuses() {
        let l = labels(&[
            ("address", vip.addr.to_string()),
            ("port", vip.port.to_string()),
            ("protocol", vip.proto.to_string()),
            ("real", real.to_string()),
        ]);
        flaps.get_or_create(&l).inc_by(st.flaps);
    }
    reg.register(
        "real_flaps",
        "Health verdict changes of the real (up to down and back)",
        flaps,
    );
    reg.register(
        "probe_duration_seconds",
        "Time health probes of the real took (a timed-out probe counts its timeout)",
        board.durations(),
    );
}

async fn scrape(AxState(src): AxState<Sources>) -> impl IntoResponse {
    let flows = src.flows.fresh(Duration::ZERO).await;
    exposition(render(&src, &flows))
}

async fn scrape_decap(AxState(counters): AxState<Arc<DecapCounters>>) -> impl IntoResponse {
    exposition(
        counters
            .read()
            .map_err(|e| e.to_string())
            .and_then(|c| render_decap(&c)),
    )
}

/// Binds the metrics address, if one is given: at start-up, before the data
/// path is touched, so that an address in use stops the program early.
pub async fn bind(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => {
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding the metrics address {addr}")
            })?))
        }
        None => Ok(None),
    }
}

/// Serves `app` on `listener` until the process ends.
fn spawn_server(listener: TcpListener, app: Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics server stopped");
        }
    })
}

/// Serves `/metrics` on `listener` (bound at start-up, before the data path
/// is touched).
pub fn serve(listener: TcpListener, src: Sources) -> JoinHandle<()> {
    spawn_server(
        listener,
        Router::new().route("/metrics", get(scrape)).with_state(src),
    )
}

/// Serves `xlb decap`'s `/metrics` on `listener`.
pub fn serve_decap(listener: TcpListener, counters: DecapCounters) -> JoinHandle<()> {
    spawn_server(
        listener,
        Router::new()
            .route("/metrics", get(scrape_decap))
            .with_state(Arc::new(counters)),
    )
}

#[cfg(test)]
mod tests {
    use lb_common::{Counter, decap_stat, stat};

    use super::{drop_reason, render_decap};

    #[test]
    fn every_dropping_verdict_has_a_reason_and_no_other_does() {
        let reasons: Vec<_> = stat::VERDICT_NAMES
            .iter()
            .filter_map(|v| drop_reason(v))
            .collect();
        assert_eq!(
            reasons,
            [
                "no_real",
                "fragment",
                "aborted",
                "malformed",
                "too_big",
                "unsupported",
                "no_tunnel_source"
            ]
        );
    }

    #[test]
    fn every_decap_counter_is_one_series() {
        let counters: Vec<_> = decap_stat::NAMES
            .iter()
            .zip(1..)
            .map(|(name, n)| {
                let c = Counter {
                    packets: n,
                    bytes: 100 * n,
                    flows: 0,
                    _pad: 0,
                };
                (*name, c)
            })
            .collect();
        let text = render_decap(&counters).expect("every decap counter has a series");
        let mut got: Vec<&str> = text.lines().filter(|l| l.starts_with("xlb_")).collect();
        let version = env!("CARGO_PKG_VERSION");
        let commit = crate::COMMIT;
        let build = format!("xlb_build_info{{version=\"{version}\",commit=\"{commit}\"}} 1");
        let mut want = vec![
            build.as_str(),
            "xlb_decap_decapsulated_packets_total{encapsulation=\"ipip\"} 4",
            "xlb_decap_decapsulated_packets_total{encapsulation=\"ip6ip6\"} 5",
            "xlb_decap_decapsulated_packets_total{encapsulation=\"4in6\"} 6",
            "xlb_decap_decapsulated_bytes_total{encapsulation=\"ipip\"} 400",
            "xlb_decap_decapsulated_bytes_total{encapsulation=\"ip6ip6\"} 500",
            "xlb_decap_decapsulated_bytes_total{encapsulation=\"4in6\"} 600",
            "xlb_decap_passed_packets_total{reason=\"not_tunnel\"} 1",
            "xlb_decap_passed_packets_total{reason=\"not_local\"} 2",
            "xlb_decap_passed_packets_total{reason=\"malformed\"} 3",
            "xlb_decap_dropped_packets_total{reason=\"aborted\"} 7",
            "xlb_decap_dropped_packets_total{reason=\"not_allowed_src\"} 8",
        ];
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "{text}");
        assert_eq!(
            render_decap(&[("bogus", Counter::default())]),
            Err("unknown decap counter bogus".to_owned())
        );
    }
}
