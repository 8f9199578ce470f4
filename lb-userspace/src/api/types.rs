//! Bodies of the control API's requests and answers, shared by the daemon
//! and the CLI.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    controller::ReloadOutcome,
    desired::Admin,
    diff::Change,
    health::{HealthCheck, ProbeStatus},
    state::Changes,
    views::VipView,
};

/// The JSON body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for the operator.
    pub error: String,
}

/// Body of `POST /v1/vips`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddVip {
    /// The VIP, `203.0.113.10:80/tcp`.
    pub vip: String,
    /// `maglev` (default) or `maglev-src`.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Maglev table size, a prime (default 65537).
    #[serde(default)]
    pub table_size: Option<u32>,
    /// `dr` (default) or `tun`.
    #[serde(default)]
    pub forward: Option<String>,
    /// Health check of its reals (default: none).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Body of `PUT /v1/vips/{proto}/{addr}/{port}`: settings changed in place
/// (absent: unchanged).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVip {
    /// `maglev` or `maglev-src`.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Maglev table size, a prime.
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Health check of its reals (kind `none`: not probed).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Body of `POST /v1/vips/{proto}/{addr}/{port}/reals`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddReal {
    /// The real's address.
    pub addr: String,
    /// Its weight, 0..=65535 (default 1; 0 takes no new flows).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// Body of `PUT /v1/vips/{proto}/{addr}/{port}/reals/{real}`: values set by
/// hand (the override layer).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetReal {
    /// The new weight, 0..=65535.
    #[serde(default)]
    pub weight: Option<u32>,
    /// `enabled`, `drain` or `disabled`.
    #[serde(default)]
    pub admin: Option<Admin>,
}

/// Body of `PUT /v1/desired`: a whole desired state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    /// A configuration document in YAML (the `services:` part is applied).
    pub yaml: String,
    /// Its file name, for error messages.
    #[serde(default)]
    pub file: Option<String>,
    /// Store mode: write only if the store's desired state is still at this
    /// revision (default: the newest one this node has seen).
    #[serde(default)]
    pub revision: Option<i64>,
}

/// Answer of `PUT /v1/desired`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    /// Map writes made.
    pub writes: usize,
    /// Tables rebuilt.
    pub tables: usize,
    /// Store mode: the revision written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

impl From<Changes> for Applied {
    fn from(c: Changes) -> Self {
        Self {
            writes: c.writes,
            tables: c.tables,
            revision: None,
        }
    }
}

/// Answer of `POST /v1/desired/plan`: what `PUT /v1/desired` with the same
/// body would change, nothing applied.
#[derive(Debug, Serialize, Deserialize)]
pub struct Planned {
    /// Each VIP and real added, removed or changed (effective values:
    /// overrides set by hand stay and win).
    pub changes: Vec<Change>,
}

/// Query of `GET /v1/desired`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredQuery {
    /// `effective` (default: the base with the overrides applied) or `base`
    /// (what the configuration and `xlb apply` set, as `xlb save` prints it).
    #[serde(default)]
    pub layer: Option<String>,
}

/// Answer of `GET /v1/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Every verdict counter, by name.
    pub verdicts: Vec<VerdictStat>,
    /// Event counters (conntrack, flood guard), by name.
    pub events: Vec<EventStat>,
    /// Every VIP with its counters.
    pub vips: Vec<VipView>,
    /// When `xlb stats --zero` last zeroed the counters shown, Unix seconds
    /// (absent: counted since the data path was loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeroed_at: Option<u64>,
}

/// One verdict counter.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerdictStat {
    /// Its name (`tx_dr`, `pass_not_vip`, ...).
    pub name: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One event counter.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventStat {
    /// Its name (`conntrack_hit`, ...).
    pub name: String,
    /// How many times it happened.
    pub count: u64,
}

/// The conntrack table in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Conntrack {
    /// Entries at the last count.
    pub entries: u64,
    /// Capacity.
    pub capacity: u32,
    /// Milliseconds since the last count (absent: not counted yet).
    pub counted_ms_ago: Option<u64>,
}

/// Answer of `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The interface the balancer serves.
    pub iface: String,
    /// Reconcile steps run since start.
    pub reconciles: u64,
    /// The conntrack table.
    pub conntrack: Conntrack,
    /// The last load of a whole configuration (start-up, SIGHUP, `xlb apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadOutcome>,
    /// When `xlb stats --zero` last zeroed the counters shown, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeroed_at: Option<u64>,
    /// Every VIP with its reals, counters and health.
    pub vips: Vec<VipStatus>,
    /// The node: announcement through BIRD, drain, VRRP role.
    #[serde(default)]
    pub node: crate::node::NodeStatus,
    /// Store mode: the store and the revision applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store::Status>,
}

/// A VIP in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VipStatus {
    /// The VIP, its reals and counters.
    #[serde(flatten)]
    pub view: VipView,
    /// Health of each real, by address.
    pub health: Vec<RealHealth>,
}

/// Health of one real.
#[derive(Debug, Serialize, Deserialize)]
pub struct RealHealth {
    /// The real.
    pub addr: IpAddr,
    /// The probe kind, or `none`.
    pub check: String,
    /// How a `tcp` check probes: `connect` or `syn` (absent for other kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::health::TcpMode>,
    /// Where probes go: `real` (its address) or `vip` (through the forwarding path).
    #[serde(default)]
    pub via: crate::health::Via,
    /// The probe status, when probed (with `flaps`, its verdict changes).
    pub status: Option<ProbeStatus>,
    /// Slow start: the percent of its weight the real has now (absent: all).
    #[serde(default)]
    pub slow_start: Option<u32>,
}

/// Body of `POST /v1/simulate`: many flows at once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateBatch {
    /// The flows.
    pub flows: Vec<SimulateFlow>,
}

/// One flow of [`SimulateBatch`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateFlow {
    /// The VIP, `203.0.113.10:80/tcp`.
    pub vip: String,
    /// The client's address and port.
    pub src: String,
}

/// Answer of `POST /v1/simulate`: the real of each flow, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct SimulatedBatch {
    /// One entry per flow: its real, or none when the VIP has no usable real.
    pub reals: Vec<Option<IpAddr>>,
}

/// Answer of `GET /v1/simulate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Simulated {
    /// The real the flow goes to, or none when the VIP has no usable real.
    pub real: Option<IpAddr>,
}
