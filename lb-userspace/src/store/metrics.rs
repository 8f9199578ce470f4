//! The store's metrics (prefix `xlb_`): whether etcd is reachable, since when
//! it is not, the revision applied, and the live nodes seen.

use std::time::SystemTime;

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};

use super::Store;

/// Adds the store's metrics to `reg`.
pub fn register(reg: &mut Registry, store: &Store) {
    let v = store.view.borrow();
    let connected = Gauge::<i64>::default();
    connected.set(i64::from(v.connected));
    let since = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    since.set(
        v.unreachable_since
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    let revision = Gauge::<i64>::default();
    revision.set(v.applied);
    let failed = Gauge::<i64>::default();
    failed.set(i64::from(v.failed.is_some()));
    let nodes = Gauge::<i64>::default();
    nodes.set(i64::try_from(v.nodes.len()).unwrap_or(i64::MAX));
    reg.register(
        "store_connected",
        "1 while the fleet's store (etcd) answers",
        connected,
    );
    reg.register(
        "store_unreachable_seconds",
        "Seconds since the store stopped answering (0 while connected)",
        since,
    );
    reg.register(
        "store_revision",
        "Revision of the store's desired state this node applied",
        revision,
    );
    reg.register(
        "store_apply_failed",
        "1 while the newest revision of the store could not be applied on this node",
        failed,
    );
    reg.register(
        "fleet_nodes",
        "Nodes with a live key in the store (this one included)",
        nodes,
    );
}
