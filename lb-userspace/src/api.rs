//! The control API: HTTP+JSON on a Unix socket, served by the daemon. Every
//! change goes through [`Shared::change`] or [`Shared::apply`], i.e. through
//! the one reconcile step. The routes are documented in docs/api.md.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State as AxState, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use lb_common::{flow_hash, src_hash, stat};
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    dataplane::Dataplane,
    health::{Engine, HealthCheck, ProbeStatus},
    metrics::Metrics,
    model::{Proto, Scheduler, Vip, addr_bytes},
    neighbor::{Iface, NeighborError},
    state::{
        Admin, Changes, Desired, RealSpec, ServiceSpec, State, StateError, VipOptions, VipView,
    },
};

/// Everything the handlers share. The std mutex is never held across an await.
pub struct Shared {
    /// The dataplane and the model, changed together.
    pub inner: Mutex<Inner>,
    /// Serialises changes (held across MAC resolution, never with `inner`).
    pub changes: tokio::sync::Mutex<()>,
    /// The interface the balancer is attached to.
    pub iface: Iface,
    /// How long to wait for a real's ARP/NDP answer.
    pub resolve_timeout: Duration,
    /// Where the state is saved after every change.
    pub state_file: PathBuf,
    /// The configuration file, reloaded on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// The daemon's own metrics.
    pub metrics: Metrics,
    /// The health checker.
    pub health: Engine,
}

/// The state guarded by [`Shared::inner`].
pub struct Inner {
    /// The maps.
    pub dp: Dataplane,
    /// The desired state and what is applied.
    pub state: State,
}

impl Shared {
    /// Locks the dataplane and model. A panic while holding the lock cannot
    /// leave the maps inconsistent with the model (a change is undone unless
    /// it completes), so a poisoned lock is still safe to use.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The JSON body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for the operator.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::warn!(status = self.status.as_u16(), error = %self.message, "request refused");
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StateError> for ApiError {
    fn from(err: StateError) -> Self {
        let status = match &err {
            StateError::VipExists(_) | StateError::RealExists { .. } => StatusCode::CONFLICT,
            StateError::UnknownVip(_) | StateError::UnknownReal { .. } => StatusCode::NOT_FOUND,
            StateError::Full { .. }
            | StateError::TableSize(_)
            | StateError::Family { .. }
            | StateError::Weight(_) => StatusCode::BAD_REQUEST,
            StateError::NoMac(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StateError::Dataplane(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: err.to_string(),
        }
    }
}

impl From<NeighborError> for ApiError {
    fn from(err: NeighborError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: err.to_string(),
        }
    }
}

impl From<crate::dataplane::DataplaneError> for ApiError {
    fn from(err: crate::dataplane::DataplaneError) -> Self {
        StateError::from(err).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(err: JsonRejection) -> Self {
        Self::bad_request(format!("invalid request body: {}", err.body_text()))
    }
}

type ApiResult<T> = Result<T, ApiError>;

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

/// Body of `PUT /v1/vips/{proto}/{addr}/{port}/reals/{real}`.
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
}

/// Answer of `PUT /v1/desired`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    /// Map writes made.
    pub writes: usize,
    /// Tables rebuilt.
    pub tables: usize,
}

impl From<Changes> for Applied {
    fn from(c: Changes) -> Self {
        Self {
            writes: c.writes,
            tables: c.tables,
        }
    }
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

/// Answer of `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The interface the balancer serves.
    pub iface: String,
    /// Reconcile steps run since start.
    pub reconciles: u64,
    /// Every VIP with its reals, counters and health.
    pub vips: Vec<VipStatus>,
}

/// A VIP in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VipStatus {
    /// The VIP, its reals and counters.
    #[serde(flatten)]
    pub view: VipView,
    /// Health of each probed real, by address.
    pub health: Vec<RealHealth>,
}

/// Health of one real.
#[derive(Debug, Serialize, Deserialize)]
pub struct RealHealth {
    /// The real.
    pub addr: IpAddr,
    /// The probe kind, or `none`.
    pub check: String,
    /// The engine's status, when probed.
    pub status: Option<ProbeStatus>,
}

/// Query of `GET /v1/simulate`.
#[derive(Debug, Deserialize)]
pub struct SimulateQuery {
    vip: String,
    src: String,
}

/// Answer of `GET /v1/simulate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Simulated {
    /// The real the flow goes to, or none when the VIP has no usable real.
    pub real: Option<IpAddr>,
}

/// The API's routes over `shared`.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/vips", get(list_vips).post(add_vip))
        .route(
            "/v1/vips/{proto}/{addr}/{port}",
            get(get_vip).delete(del_vip),
        )
        .route(
            "/v1/vips/{proto}/{addr}/{port}/reals",
            axum::routing::post(add_real),
        )
        .route(
            "/v1/vips/{proto}/{addr}/{port}/reals/{real}",
            axum::routing::delete(del_real).put(set_real),
        )
        .route("/v1/desired", put(apply).get(desired))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/simulate", get(simulate))
        .with_state(shared)
}

fn parse_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(e.to_string())
}

fn vip_from_path(proto: &str, addr: &str, port: &str) -> ApiResult<Vip> {
    let proto: Proto = proto.parse().map_err(parse_err)?;
    let addr: IpAddr = crate::model::parse_real(addr).map_err(parse_err)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(ApiError::bad_request(format!(
                "invalid port '{port}': out of range (1-65535)"
            )));
        }
    };
    Ok(Vip { addr, port, proto })
}

fn view_of(shared: &Shared, vip: &Vip) -> ApiResult<VipView> {
    let inner = shared.lock();
    inner
        .state
        .view(&inner.dp)?
        .into_iter()
        .find(|v| v.vip == *vip)
        .ok_or_else(|| StateError::UnknownVip(*vip).into())
}

async fn list_vips(AxState(shared): AxState<Arc<Shared>>) -> ApiResult<Json<Vec<VipView>>> {
    let inner = shared.lock();
    Ok(Json(inner.state.view(&inner.dp)?))
}

async fn get_vip(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
) -> ApiResult<Json<VipView>> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    Ok(Json(view_of(&shared, &vip)?))
}

async fn add_vip(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Json<AddVip>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let Json(body) = body?;
    let vip: Vip = body.vip.parse().map_err(parse_err)?;
    let mut options = VipOptions::default();
    if let Some(s) = &body.scheduler {
        options.scheduler = s.parse().map_err(parse_err)?;
    }
    if let Some(size) = body.table_size {
        options.table_size = size;
    }
    if let Some(f) = &body.forward {
        options.forward = f.parse().map_err(parse_err)?;
    }
    if let Some(hc) = &body.health_check {
        hc.validate()
            .map_err(|m| ApiError::bad_request(format!("health_check: {m}")))?;
    }
    shared
        .change(|d| {
            if d.services.contains_key(&vip) {
                return Err(StateError::VipExists(vip));
            }
            d.services.insert(
                vip,
                ServiceSpec {
                    options,
                    health: body.health_check,
                    reals: Default::default(),
                },
            );
            Ok(())
        })
        .await?;
    tracing::info!(%vip, forward = %options.forward, "VIP added");
    Ok((StatusCode::CREATED, Json(view_of(&shared, &vip)?)))
}

async fn del_vip(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    shared
        .change(|d| {
            d.services.remove(&vip).ok_or(StateError::UnknownVip(vip))?;
            Ok(())
        })
        .await?;
    tracing::info!(%vip, "VIP removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn add_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    body: Result<Json<AddReal>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let Json(body) = body?;
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&body.addr).map_err(parse_err)?;
    let weight = body.weight.unwrap_or(1);
    // Refuse early what would be refused anyway, before waiting on ARP.
    shared.lock().state.check_add_real(&vip, real, weight)?;
    shared
        .change(|d| {
            let s = d
                .services
                .get_mut(&vip)
                .ok_or(StateError::UnknownVip(vip))?;
            if s.reals.contains_key(&real) {
                return Err(StateError::RealExists { vip, real });
            }
            s.reals.insert(
                real,
                RealSpec {
                    weight,
                    ..RealSpec::default()
                },
            );
            Ok(())
        })
        .await?;
    tracing::info!(%vip, %real, weight, "real added");
    Ok((StatusCode::CREATED, Json(view_of(&shared, &vip)?)))
}

async fn set_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
    body: Result<Json<SetReal>, JsonRejection>,
) -> ApiResult<Json<VipView>> {
    let Json(body) = body?;
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(parse_err)?;
    if body.weight.is_none() && body.admin.is_none() {
        return Err(ApiError::bad_request("give a weight and/or an admin state"));
    }
    shared
        .change(|d| {
            let s = d
                .services
                .get_mut(&vip)
                .ok_or(StateError::UnknownVip(vip))?;
            let r = s
                .reals
                .get_mut(&real)
                .ok_or(StateError::UnknownReal { vip, real })?;
            if let Some(w) = body.weight {
                r.weight = w;
            }
            if let Some(a) = body.admin {
                r.admin = a;
            }
            Ok(())
        })
        .await?;
    tracing::info!(%vip, %real, weight = ?body.weight, admin = ?body.admin, "real changed");
    Ok(Json(view_of(&shared, &vip)?))
}

async fn del_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(parse_err)?;
    shared
        .change(|d| {
            let s = d
                .services
                .get_mut(&vip)
                .ok_or(StateError::UnknownVip(vip))?;
            s.reals
                .remove(&real)
                .ok_or(StateError::UnknownReal { vip, real })?;
            Ok(())
        })
        .await?;
    tracing::info!(%vip, %real, "real removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn apply(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Json<ApplyBody>, JsonRejection>,
) -> ApiResult<Json<Applied>> {
    let Json(body) = body?;
    let file = body.file.as_deref().unwrap_or("request");
    let config = Config::parse(file, &body.yaml).map_err(parse_err)?;
    // Errors only the daemon can see (a real off the segment, no ARP answer)
    // name the file too.
    let changes = shared.apply(config.desired).await.map_err(|e| ApiError {
        status: e.status,
        message: format!("{file}: {}", e.message),
    })?;
    tracing::info!(
        file,
        writes = changes.writes,
        tables = changes.tables,
        "desired state applied"
    );
    Ok(Json(changes.into()))
}

async fn desired(AxState(shared): AxState<Arc<Shared>>) -> Json<Desired> {
    Json(shared.lock().state.desired().clone())
}

async fn status(AxState(shared): AxState<Arc<Shared>>) -> ApiResult<Json<Status>> {
    let views = {
        let inner = shared.lock();
        inner.state.view(&inner.dp)?
    };
    let statuses = shared.health.statuses();
    let desired = shared.lock().state.desired().clone();
    let vips = views
        .into_iter()
        .map(|view| {
            let health = view
                .reals
                .iter()
                .map(|r| RealHealth {
                    addr: r.addr,
                    check: desired
                        .services
                        .get(&view.vip)
                        .and_then(|s| s.check(r.addr))
                        .map_or_else(
                            || "none".to_owned(),
                            |c| format!("{:?}", c.kind).to_lowercase(),
                        ),
                    status: statuses.get(&(view.vip, r.addr)).cloned(),
                })
                .collect();
            VipStatus { view, health }
        })
        .collect();
    Ok(Json(Status {
        iface: shared.iface.name.clone(),
        reconciles: shared.metrics.reconcile_count(),
        vips,
    }))
}

async fn stats(AxState(shared): AxState<Arc<Shared>>) -> ApiResult<Json<Stats>> {
    let inner = shared.lock();
    let counters = inner.dp.verdicts()?;
    let events = inner
        .dp
        .events()?
        .into_iter()
        .map(|(name, count)| EventStat {
            name: name.to_owned(),
            count,
        })
        .collect();
    let verdicts = counters
        .iter()
        .zip(stat::VERDICT_NAMES)
        .map(|(c, name)| VerdictStat {
            name: name.to_owned(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    Ok(Json(Stats {
        verdicts,
        events,
        vips: inner.state.view(&inner.dp)?,
    }))
}

async fn simulate(
    AxState(shared): AxState<Arc<Shared>>,
    Query(q): Query<SimulateQuery>,
) -> ApiResult<Json<Simulated>> {
    let vip: Vip = q.vip.parse().map_err(parse_err)?;
    let src: SocketAddr = q.src.parse().map_err(|_| {
        ApiError::bad_request(format!("invalid source '{}': expected IP:PORT", q.src))
    })?;
    let inner = shared.lock();
    let scheduler = inner
        .state
        .scheduler(&vip)
        .ok_or(StateError::UnknownVip(vip))?;
    let (s, _) = addr_bytes(src.ip());
    let (d, _) = addr_bytes(vip.addr);
    let hash = match scheduler {
        Scheduler::Maglev => flow_hash(
            &s,
            &d,
            (u32::from(src.port()) << 16) | u32::from(vip.port),
            vip.proto.number(),
        ),
        Scheduler::MaglevSrc => src_hash(&s),
    };
    Ok(Json(Simulated {
        real: inner.state.real_for(&inner.dp, &vip, hash)?,
    }))
}
