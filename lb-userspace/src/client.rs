//! The CLI's side of the control API: HTTP/1.1 over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::{
    api::ErrorBody,
    cli::error::{CliError, ErrorKind},
};

fn unreachable(message: String) -> anyhow::Error {
    CliError::new(ErrorKind::Unreachable, message).into()
}

/// The kind of failure an error answer is: 400 the request is invalid (bad
/// input), 503 the daemon is going away (unreachable), other 4xx refused,
/// the rest (a map write failed) other.
fn answer_kind(status: hyper::StatusCode) -> ErrorKind {
    match status.as_u16() {
        400 => ErrorKind::BadInput,
        503 => ErrorKind::Unreachable,
        401..=499 => ErrorKind::Refused,
        _ => ErrorKind::Other,
    }
}

/// How long the CLI waits for the daemon (adding a real may wait for ARP).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A client of one daemon.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the
    /// daemon's message, of the kind its status says (see `answer_kind`); not
    /// reaching the daemon is an `Unreachable` error.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "the xlb daemon did not answer within {REQUEST_TIMEOUT:?}"
                ))
            })?
    }

    async fn call_inner<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            unreachable(format!(
                "cannot reach the xlb daemon at {}: {e} (is `xlb run` running? pick another \
                 socket with --socket or XLB_SOCKET)",
                self.socket.display()
            ))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(format!("HTTP handshake with the daemon failed: {e}")))?;
        let conn = tokio::spawn(conn);
        let payload = match body {
            Some(b) => serde_json::to_vec(b).context("encoding the request")?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "xlb")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(format!("sending the request to the daemon: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the daemon's answer: {e}")))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CliError::new(answer_kind(status), msg).into());
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).context("decoding the daemon's answer")
    }
}
