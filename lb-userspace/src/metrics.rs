//! Prometheus metrics over HTTP (`--metrics-addr`), built at each scrape from
//! the controller's published snapshot, the data path's counters (read on
//! handles of their own), the last conntrack count and the probe statuses. A
//! scrape never waits on the controller and never walks the conntrack table.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State as AxState, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    controller::{Activity, Handle},
    counters::{FlowCounter, FlowCounts, Reader},
    health::engine::Board,
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
    /// The fleet's store, in store mode.
    pub store: Option<crate::store::Store>,
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Renders every metric in the Prometheus text format, with `flows` the
/// conntrack count to report.
pub fn render(src: &Sources, flows: &FlowCounts) -> Result<String, String> {
    let mut reg = Registry::with_prefix("xlb");
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let events = Family::<Labels, Counter>::default();
    let vip_packets = Family::<Labels, Counter>::default();
    let vip_bytes = Family::<Labels, Counter>::default();
    let vip_flows = Family::<Labels, Counter>::default();
    let real_packets = Family::<Labels, Counter>::default();
    let real_bytes = Family::<Labels, Counter>::default();
    let real_flows = Family::<Labels, Counter>::default();
    let real_active = Family::<Labels, Gauge>::default();
    let real_healthy = Family::<Labels, Gauge>::default();
    let real_resolved = Family::<Labels, Gauge>::default();
    let real_weight = Family::<Labels, Gauge>::default();
    let vip_guarded = Family::<Labels, Gauge>::default();
    let conntrack = Gauge::<i64>::default();
    let conntrack_capacity = Gauge::<i64>::default();
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
    }
    for (name, n) in src.reader.events().map_err(|e| e.to_string())? {
        events
            .get_or_create(&labels(&[("event", name.to_owned())]))
            .inc_by(n);
    }
    for v in views::vips(&snap, &src.reader, flows).map_err(|e| e.to_string())? {
        let vl = labels(&[("vip", v.vip.to_string())]);
        vip_packets.get_or_create(&vl).inc_by(v.packets);
        vip_bytes.get_or_create(&vl).inc_by(v.bytes);
        vip_flows.get_or_create(&vl).inc_by(v.flows);
        vip_guarded.get_or_create(&vl).set(i64::from(v.guarded));
        for r in v.reals {
            let rl = labels(&[("vip", v.vip.to_string()), ("real", r.addr.to_string())]);
            real_packets.get_or_create(&rl).inc_by(r.packets);
            real_bytes.get_or_create(&rl).inc_by(r.bytes);
            real_flows.get_or_create(&rl).inc_by(r.flows);
            real_active
                .get_or_create(&rl)
                .set(i64::try_from(r.active_flows).unwrap_or(i64::MAX));
            real_healthy.get_or_create(&rl).set(i64::from(r.healthy));
            real_resolved.get_or_create(&rl).set(i64::from(r.resolved));
            real_weight
                .get_or_create(&rl)
                .set(i64::from(r.effective_weight.unwrap_or(0)));
        }
    }
    conntrack.set(i64::try_from(flows.entries).unwrap_or(i64::MAX));
    conntrack_capacity.set(i64::from(src.reader.flow_capacity()));
    unresolved.set(i64::try_from(src.activity.unresolved()).unwrap_or(0));
    reconciles.inc_by(src.activity.reconcile_count());
    reconcile_errors.inc_by(src.activity.reconcile_errors());
    health_flips.inc_by(src.board.flips());

    reg.register("packets", "Packets by data-path verdict", packets);
    reg.register("bytes", "Bytes by data-path verdict", bytes);
    reg.register(
        "events",
        "Data-path events (conntrack, flood guard)",
        events,
    );
    reg.register("vip_packets", "Packets forwarded per VIP", vip_packets);
    reg.register("vip_bytes", "Bytes forwarded per VIP", vip_bytes);
    reg.register("vip_new_flows", "New flows per VIP", vip_flows);
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
        "1 when the real's health verdict in force is up",
        real_healthy,
    );
    reg.register(
        "real_resolved",
        "1 when the real's MAC (or its next hop's) is known; 0: kept out of the table",
        real_resolved,
    );
    reg.register(
        "real_weight",
        "Weight of the real in the live Maglev table",
        real_weight,
    );
    reg.register(
        "vip_avalanche_guard",
        "1 while the avalanche guard keeps unhealthy reals of the VIP in its table",
        vip_guarded,
    );
    reg.register(
        "conntrack_entries",
        "Entries in the conntrack table (counted every 5 s)",
        conntrack,
    );
    reg.register(
        "conntrack_capacity",
        "Capacity of the conntrack table",
        conntrack_capacity,
    );
    reg.register(
        "unresolved_reals",
        "Reals whose MAC is not known yet",
        unresolved,
    );
    reg.register("reconciles", "Reconcile steps run", reconciles);
    reg.register(
        "reconcile_errors",
        "Reconcile steps that failed",
        reconcile_errors,
    );
    reg.register(
        "reconcile_seconds",
        "Time a reconcile step took",
        src.activity.reconcile_seconds(),
    );
    reg.register("health_flips", "Health verdict changes", health_flips);
    if let Some(store) = &src.store {
        crate::store::metrics::register(&mut reg, store);
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

async fn scrape(AxState(src): AxState<Sources>) -> impl IntoResponse {
    let flows = src.flows.fresh(Duration::ZERO).await;
    match render(&src, &flows) {
        Ok(body) => (
            axum::http::StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            e,
        ),
    }
}

/// Serves `/metrics` on `listener` (bound at start-up, before the data path
/// is touched).
pub fn serve(listener: TcpListener, src: Sources) -> JoinHandle<()> {
    let app = Router::new().route("/metrics", get(scrape)).with_state(src);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics server stopped");
        }
    })
}
