//! The node's routes: status, drain and VRRP role (see [`crate::node`]).

use std::time::Duration;

use axum::{Json, extract::State as AxState, extract::rejection::JsonRejection};
use serde::{Deserialize, Serialize};

use super::{ApiError, Context, NoBody};
use crate::node::{DEFAULT_QUIET, MAX_QUIET, NodeStatus, Role};

/// `POST /v1/node/drain`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// How long no VIP packet must arrive before the node is safe to stop
    /// (ms) [default: 2000].
    pub quiet_ms: Option<u64>,
}

/// `DELETE /v1/node/drain`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Undrained {
    /// Whether a drain was under way (and is now cancelled).
    pub was_draining: bool,
}

/// `PUT /v1/node/role`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// The VRRP state keepalived reports.
    pub role: Role,
}

fn stopped() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
        message: "the daemon is stopping".into(),
    }
}

/// `GET /v1/node`.
pub async fn status(AxState(ctx): AxState<Context>, _: NoBody) -> Json<NodeStatus> {
    Json(ctx.sources.node.status())
}

/// `POST /v1/node/drain`: withdraw every VIP and watch the traffic stop.
pub async fn drain(
    AxState(ctx): AxState<Context>,
    body: Result<Json<DrainBody>, JsonRejection>,
) -> Result<Json<NodeStatus>, ApiError> {
    let Json(body) = body?;
    let quiet = body.quiet_ms.map_or(DEFAULT_QUIET, Duration::from_millis);
    if quiet > MAX_QUIET {
        return Err(ApiError::bad_request(format!(
            "quiet_ms {} is longer than the {} s allowed",
            quiet.as_millis(),
            MAX_QUIET.as_secs()
        )));
    }
    ctx.sources
        .node
        .drain(quiet)
        .await
        .map(Json)
        .ok_or_else(stopped)
}

/// `DELETE /v1/node/drain`: announce again.
pub async fn undrain(
    AxState(ctx): AxState<Context>,
    _: NoBody,
) -> Result<Json<Undrained>, ApiError> {
    ctx.sources
        .node
        .cancel_drain()
        .await
        .map(|was_draining| Json(Undrained { was_draining }))
        .ok_or_else(stopped)
}

/// `PUT /v1/node/role`: what keepalived's notify hooks report.
pub async fn role(
    AxState(ctx): AxState<Context>,
    body: Result<Json<RoleBody>, JsonRejection>,
) -> Result<Json<NodeStatus>, ApiError> {
    let Json(body) = body?;
    ctx.sources
        .node
        .set_role(body.role)
        .await
        .ok_or_else(stopped)?;
    Ok(Json(ctx.sources.node.status()))
}
