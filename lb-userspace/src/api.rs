//! The control API: HTTP+JSON on a Unix socket, served by the daemon.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/vips | | `[VipView]` |
//! | POST | /v1/vips | `{"vip": "203.0.113.10:80/tcp", "scheduler"?, "table_size"?}` | 201 `VipView` |
//! | GET | /v1/vips/{proto}/{addr}/{port} | | `VipView` |
//! | DELETE | /v1/vips/{proto}/{addr}/{port} | | 204 |
//! | POST | /v1/vips/{proto}/{addr}/{port}/reals | `{"addr": "198.51.100.11", "weight"?}` | 201 `VipView` |
//! | PUT | /v1/vips/{proto}/{addr}/{port}/reals/{real} | `{"weight": N}` | `VipView` |
//! | DELETE | /v1/vips/{proto}/{addr}/{port}/reals/{real} | | 204 |
//! | GET | /v1/stats | | `Stats` |
//! | GET | /v1/simulate?vip=..&src=IP:PORT | | `{"real": ..}` |
//!
//! Errors answer `{"error": "..."}` with 400 (bad input), 404 (unknown VIP or
//! real), 409 (already exists), 422 (real cannot be resolved) or 500.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State as AxState},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use lb_common::{flow_hash, src_hash, stat};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::Dataplane,
    model::{Forward, Proto, Scheduler, Vip, addr_bytes},
    neighbor::{self, Iface, NeighborError},
    state::{State, StateError, VipOptions, VipView},
};

/// Everything the handlers share. The mutex is never held across an await.
pub struct Shared {
    /// The dataplane and the model, changed together.
    pub inner: Mutex<Inner>,
    /// The interface the balancer is attached to.
    pub iface: Iface,
    /// How long to wait for a real's ARP/NDP answer.
    pub resolve_timeout: Duration,
}

/// The state guarded by [`Shared::inner`].
pub struct Inner {
    /// The maps.
    pub dp: Dataplane,
    /// The configured services.
    pub state: State,
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

/// The JSON body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for the operator.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
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
}

/// Body of `PUT /v1/vips/{proto}/{addr}/{port}/reals/{real}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetReal {
    /// The new weight, 0..=65535 (0 drains: no new flows, tracked flows stay).
    pub weight: u32,
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
    /// Its name (`tx`, `pass_not_vip`, ...).
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
        .route("/v1/stats", get(stats))
        .route("/v1/simulate", get(simulate))
        .with_state(shared)
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the maps inconsistent with
    // the model (every change is applied before the model is updated), so a
    // poisoned lock is still safe to use.
    shared
        .inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn vip_from_path(proto: &str, addr: &str, port: &str) -> ApiResult<Vip> {
    let proto: Proto = proto
        .parse()
        .map_err(|e: crate::model::ParseError| ApiError::bad_request(e.to_string()))?;
    let addr: IpAddr =
        crate::model::parse_real(addr).map_err(|e| ApiError::bad_request(e.to_string()))?;
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

fn view_of(inner: &Inner, vip: &Vip) -> ApiResult<VipView> {
    inner
        .state
        .view(&inner.dp)?
        .into_iter()
        .find(|v| v.vip == *vip)
        .ok_or_else(|| StateError::UnknownVip(*vip).into())
}

async fn list_vips(AxState(shared): AxState<Arc<Shared>>) -> ApiResult<Json<Vec<VipView>>> {
    let inner = lock(&shared);
    Ok(Json(inner.state.view(&inner.dp)?))
}

async fn get_vip(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
) -> ApiResult<Json<VipView>> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let inner = lock(&shared);
    Ok(Json(view_of(&inner, &vip)?))
}

async fn add_vip(
    AxState(shared): AxState<Arc<Shared>>,
    Json(body): Json<AddVip>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let vip: Vip = body
        .vip
        .parse()
        .map_err(|e: crate::model::ParseError| ApiError::bad_request(e.to_string()))?;
    let mut options = VipOptions::default();
    if let Some(s) = &body.scheduler {
        options.scheduler = s
            .parse()
            .map_err(|e: crate::model::ParseError| ApiError::bad_request(e.to_string()))?;
    }
    if let Some(size) = body.table_size {
        options.table_size = size;
    }
    if let Some(f) = &body.forward {
        options.forward = f
            .parse()
            .map_err(|e: crate::model::ParseError| ApiError::bad_request(e.to_string()))?;
    }
    let mut inner = lock(&shared);
    let Inner { dp, state } = &mut *inner;
    state.add_vip(dp, vip, options)?;
    Ok((StatusCode::CREATED, Json(view_of(&inner, &vip)?)))
}

async fn del_vip(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let mut inner = lock(&shared);
    let Inner { dp, state } = &mut *inner;
    state.del_vip(dp, &vip)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port)): Path<(String, String, String)>,
    Json(body): Json<AddReal>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real =
        crate::model::parse_real(&body.addr).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let weight = body.weight.unwrap_or(1);
    // Refuse early what would be refused anyway, before waiting on ARP.
    let forward = {
        let inner = lock(&shared);
        inner.state.check_add_real(&vip, real, weight)?;
        inner.state.forward(&vip).unwrap_or_default()
    };
    let known = lock(&shared).state.mac(real);
    let mac = match (known, forward) {
        // Known from another VIP; a DR VIP still needs the real on the segment.
        (Some(mac), Forward::Tun) => mac,
        (Some(mac), Forward::Dr) if shared.iface.on_link(real) => mac,
        (_, Forward::Dr) => neighbor::resolve(&shared.iface, real, shared.resolve_timeout).await?,
        (None, Forward::Tun) => {
            neighbor::resolve_next_hop(&shared.iface, real, shared.resolve_timeout).await?
        }
    };
    let mut inner = lock(&shared);
    let Inner { dp, state } = &mut *inner;
    state.add_real(dp, &vip, real, mac, weight)?;
    Ok((StatusCode::CREATED, Json(view_of(&inner, &vip)?)))
}

async fn del_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut inner = lock(&shared);
    let Inner { dp, state } = &mut *inner;
    state.del_real(dp, &vip, real)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_real(
    AxState(shared): AxState<Arc<Shared>>,
    Path((proto, addr, port, real)): Path<(String, String, String, String)>,
    Json(body): Json<SetReal>,
) -> ApiResult<Json<VipView>> {
    let vip = vip_from_path(&proto, &addr, &port)?;
    let real = crate::model::parse_real(&real).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut inner = lock(&shared);
    let Inner { dp, state } = &mut *inner;
    state.set_weight(dp, &vip, real, body.weight)?;
    Ok(Json(view_of(&inner, &vip)?))
}

async fn stats(AxState(shared): AxState<Arc<Shared>>) -> ApiResult<Json<Stats>> {
    let inner = lock(&shared);
    let counters = inner.dp.verdicts().map_err(StateError::from)?;
    let events = inner
        .dp
        .events()
        .map_err(StateError::from)?
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
    let vip: Vip = q
        .vip
        .parse()
        .map_err(|e: crate::model::ParseError| ApiError::bad_request(e.to_string()))?;
    let src: SocketAddr = q.src.parse().map_err(|_| {
        ApiError::bad_request(format!("invalid source '{}': expected IP:PORT", q.src))
    })?;
    let inner = lock(&shared);
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
