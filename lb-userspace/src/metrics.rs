//! Prometheus metrics over HTTP (`--metrics-addr`), built at each scrape from
//! the per-CPU counters, the desired state and the health engine.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{Router, extract::State as AxState, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::task::JoinHandle;

use crate::api::Shared;

type Labels = Vec<(String, String)>;

/// Counters the daemon itself keeps (the data path's live in maps).
pub struct Metrics {
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    reconcile_seconds: Histogram,
    /// Conntrack entry count and when it was taken (walking the table is not free).
    conntrack: std::sync::Mutex<Option<(Instant, usize)>>,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            reconcile_seconds: Histogram::new([
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            conntrack: std::sync::Mutex::new(None),
        }
    }

    /// Records one reconcile.
    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// Reconciles so far (for `xlb status`).
    pub fn reconcile_count(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Renders every metric in the Prometheus text format.
pub fn render(shared: &Shared) -> Result<String, String> {
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
    let real_healthy = Family::<Labels, Gauge>::default();
    let real_weight = Family::<Labels, Gauge>::default();
    let vip_guarded = Family::<Labels, Gauge>::default();
    let conntrack = Gauge::<i64>::default();
    let reconciles = Counter::<u64>::default();
    let reconcile_errors = Counter::<u64>::default();
    let health_flips = Counter::<u64>::default();
    {
        let inner = shared.lock();
        for (c, name) in inner
            .dp
            .verdicts()
            .map_err(|e| e.to_string())?
            .iter()
            .zip(lb_common::stat::VERDICT_NAMES)
        {
            let l = labels(&[("verdict", name.to_owned())]);
            packets.get_or_create(&l).inc_by(c.packets);
            bytes.get_or_create(&l).inc_by(c.bytes);
        }
        for (name, n) in inner.dp.events().map_err(|e| e.to_string())? {
            events
                .get_or_create(&labels(&[("event", name.to_owned())]))
                .inc_by(n);
        }
        for v in inner.state.view(&inner.dp).map_err(|e| e.to_string())? {
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
                real_healthy.get_or_create(&rl).set(i64::from(r.healthy));
                real_weight
                    .get_or_create(&rl)
                    .set(i64::from(r.effective_weight.unwrap_or(0)));
            }
        }
        let mut cached = shared
            .metrics
            .conntrack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = match *cached {
            Some((at, n)) if at.elapsed() < Duration::from_secs(10) => n,
            _ => {
                let n = inner.dp.flow_count();
                *cached = Some((Instant::now(), n));
                n
            }
        };
        conntrack.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    reconciles.inc_by(shared.metrics.reconciles.load(Ordering::Relaxed));
    reconcile_errors.inc_by(shared.metrics.reconcile_errors.load(Ordering::Relaxed));
    health_flips.inc_by(shared.health.flips());

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
        "real_healthy",
        "1 when the real's last health verdict is up",
        real_healthy,
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
        "Flows in the conntrack table",
        conntrack,
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
        shared.metrics.reconcile_seconds.clone(),
    );
    reg.register("health_flips", "Health verdict changes", health_flips);
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

async fn scrape(AxState(shared): AxState<Arc<Shared>>) -> impl IntoResponse {
    match render(&shared) {
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

/// Serves `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(shared);
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics server stopped");
        }
    }))
}
