//! The control API: HTTP+JSON on a Unix socket, served by the daemon. Changes
//! go to the controller as [`crate::desired::Edit`]s; reads use the
//! controller's published snapshot and the data path's counters. The routes
//! are documented in docs/api.md.
//!
//! - [`types`]: request and answer bodies (shared with the CLI).
//! - [`routes`]: the handlers.
//! - [`node`]: the node's handlers (drain, VRRP role).

pub mod node;
pub mod routes;
pub mod types;
pub mod zero;

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{
        FromRequest, Request,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};

pub use routes::router;
pub use types::*;

use crate::{
    chain::Chain, controller::ControlError, desired::SpecError, metrics::Sources, neighbor::Iface,
};

/// What the handlers share: read handles and the controller's handle.
#[derive(Clone)]
pub struct Context {
    /// Snapshot, counters, conntrack count, probe statuses, daemon metrics.
    pub sources: Sources,
    /// The interface the balancer serves (for resolving new reals).
    pub iface: Arc<Iface>,
    /// How long to wait for a new real's ARP/NDP answer before handing the
    /// change to the controller with the real unresolved.
    pub resolve_timeout: Duration,
    /// The counters' values at the last `xlb stats --zero`.
    pub baseline: zero::Baseline,
    /// The fleet's store: in store mode, changes are written there.
    pub store: Option<crate::store::Store>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the operator.
    pub message: String,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
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

/// The one mapping from the controller's errors to HTTP statuses.
impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        let status = match &err {
            ControlError::Spec(SpecError::VipExists(_) | SpecError::RealExists { .. }) => {
                StatusCode::CONFLICT
            }
            ControlError::Spec(
                SpecError::UnknownVip(_)
                | SpecError::UnknownReal { .. }
                | SpecError::NoOverride { .. },
            ) => StatusCode::NOT_FOUND,
            ControlError::Spec(_) => StatusCode::BAD_REQUEST,
            ControlError::Neighbor(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Dataplane(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: Chain(&err).to_string(),
        }
    }
}

impl From<crate::store::api::ChangeError> for ApiError {
    fn from(err: crate::store::api::ChangeError) -> Self {
        use crate::store::{StoreError, api::ChangeError};
        let status = match &err {
            ChangeError::Control(_) => None,
            ChangeError::Store(StoreError::Conflict { .. }) => Some(StatusCode::CONFLICT),
            ChangeError::Store(StoreError::Unreachable(_) | StoreError::Timeout(_)) => {
                Some(StatusCode::SERVICE_UNAVAILABLE)
            }
            ChangeError::Store(_) | ChangeError::NotApplied { .. } => {
                Some(StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        match (status, err) {
            (_, ChangeError::Control(e)) => e.into(),
            (status, err) => Self {
                status: status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message: Chain(&err).to_string(),
            },
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(err: SpecError) -> Self {
        ControlError::from(err).into()
    }
}

impl From<crate::dataplane::DataplaneError> for ApiError {
    fn from(err: crate::dataplane::DataplaneError) -> Self {
        ControlError::from(err).into()
    }
}

/// Largest request body, bytes: a configuration document (at most
/// `MAX_CONFIG_BYTES`) whose JSON escaping doubled it.
pub const MAX_BODY_BYTES: usize = 2 * crate::config::MAX_CONFIG_BYTES;

impl From<JsonRejection> for ApiError {
    fn from(err: JsonRejection) -> Self {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::bad_request(format!(
                "invalid request body: over the limit of {MAX_BODY_BYTES} bytes (a \
                 configuration holds at most {} bytes)",
                crate::config::MAX_CONFIG_BYTES
            ));
        }
        Self::bad_request(format!("invalid request body: {}", err.body_text()))
    }
}

/// A query string that does not fit its route (a parameter missing, unknown
/// or malformed): a 400 with the JSON error body, as a bad body gets.
impl From<QueryRejection> for ApiError {
    fn from(err: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query: {}", err.body_text()))
    }
}

/// The body of a route that takes none (every `GET` and `DELETE`, and `POST
/// /v1/stats/zero`): it must be empty (white space at most) or an empty JSON
/// object (`{}`, what many clients send for "no parameters"). Anything else
/// is refused with a 400, before the route does anything, rather than
/// ignored: a request that says more than the route reads is a mistake, as
/// an unknown field in a body is.
#[derive(Debug)]
pub struct NoBody;

/// Whether `body` gives nothing: empty, white space, or `{}`.
fn says_nothing(body: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    let text = text.trim();
    text.is_empty()
        || serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .is_ok_and(|fields| fields.is_empty())
}

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Kept for the refusal only (cheap copies, no text built per request).
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::bad_request(format!("invalid request body: {}", e.body_text()))
        })?;
        if says_nothing(&body) {
            return Ok(Self);
        }
        Err(ApiError::bad_request(format!(
            "invalid request body: {method} {} takes no body (got {} bytes)",
            uri.path(),
            body.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::says_nothing;

    #[test]
    fn a_body_says_nothing_when_empty_blank_or_an_empty_object() {
        for body in ["", " \r\n", "{}", " { }\n"] {
            assert!(says_nothing(body.as_bytes()), "{body:?}");
        }
        for body in ["{\"vip\": 1}", "[]", "null", "0", "{", "\u{0}", "{}{}"] {
            assert!(!says_nothing(body.as_bytes()), "{body:?}");
        }
        assert!(!says_nothing(&[0xff, 0xfe]), "not UTF-8");
    }
}
