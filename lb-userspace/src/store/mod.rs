//! Store mode: a fleet of balancers sharing one desired state in etcd
//! (`xlb run --store etcd://HOST:PORT[,HOST:PORT]/PREFIX`). docs/cluster.md
//! describes the keys, the health rule and the failure cases.
//!
//! - [`document`]: the desired state as one YAML document (`PREFIX/desired`).
//! - [`node`]: what each node reports under `PREFIX/nodes/NAME` (lease-bound),
//!   table fingerprints, the fleet's health rule and `xlb fleet`'s flags.
//! - [`sync`]: the task that watches the store, hands each new revision to the
//!   controller (it never writes the maps itself), keeps the node key alive
//!   and feeds the fleet's health view to the controller.
//! - [`api`]: how API changes reach the store (compare-and-swap on the
//!   revision read) and the answer of `xlb fleet`.
//! - [`metrics`]: the store's Prometheus metrics.

pub mod api;
pub mod document;
pub mod metrics;
pub mod node;
pub mod sync;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::desired::Spec;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `--store` URL is not `etcd://HOST:PORT[,HOST:PORT]/PREFIX`.
    #[error("invalid store '{url}': {why}")]
    Url {
        /// What was given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// A TLS or password file could not be read.
    #[error("{what} {path}: {error}")]
    File {
        /// Which option.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// etcd answered with an error or not at all.
    #[error("the store is unreachable ({0}); nothing was written")]
    Unreachable(String),
    /// An etcd call took longer than its timeout.
    #[error("the store did not answer within {0:?}; nothing was written")]
    Timeout(Duration),
    /// Someone else changed the desired state since it was read.
    #[error(
        "conflict: the desired state changed in the store since revision {read} (now {now}); \
         nothing was written. Look at it again (`xlb status`, `xlb fleet`) and retry"
    )]
    Conflict {
        /// The revision the change was based on.
        read: i64,
        /// The revision in the store.
        now: i64,
    },
    /// The document in the store is not a valid desired state.
    #[error(transparent)]
    Document(#[from] document::DocumentError),
}

/// Where the store is and how to log in: `--store` and its companions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    /// `HOST:PORT` of each etcd member.
    pub endpoints: Vec<String>,
    /// The key prefix, without a trailing `/` (e.g. `/xlb/edge1`).
    pub prefix: String,
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;
    fn from_str(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Url {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it must start with etcd://"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("no key prefix: write etcd://HOST:PORT/PREFIX"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad(
                "the key prefix is empty: write etcd://HOST:PORT/PREFIX",
            ));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (h, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("'{host}' is not HOST:PORT")))?;
            if h.is_empty() || !port.parse::<u16>().is_ok_and(|p| p != 0) {
                return Err(bad(&format!("'{host}' is not HOST:PORT")));
            }
            endpoints.push(host.to_owned());
        }
        Ok(Self {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

impl<'de> Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Clap's parser for `--store`.
pub fn parse_url(s: &str) -> Result<StoreUrl, String> {
    s.parse().map_err(|e: StoreError| e.to_string())
}

/// Everything store mode needs, from the settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where.
    pub url: StoreUrl,
    /// This node's name (its key is `PREFIX/nodes/NAME`).
    pub node: String,
    /// CA certificate (PEM) that signed the etcd servers' certificates: TLS.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for etcd's client-certificate auth.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// User name and the file holding its password.
    pub user: Option<(String, PathBuf)>,
    /// Time to live of the node key's lease.
    pub lease_ttl: Duration,
    /// How often the node key, the fleet's health view and the watch's
    /// progress are refreshed.
    pub interval: Duration,
    /// Longest any one etcd call may take.
    pub timeout: Duration,
    /// Where the last applied document is kept for a restart while etcd is down.
    pub cache: PathBuf,
    /// The flow sync address this node publishes in its key (flow sync on).
    pub sync: Option<std::net::SocketAddr>,
}

impl Options {
    /// The key of the desired state.
    pub fn desired_key(&self) -> String {
        format!("{}/desired", self.url.prefix)
    }

    /// The prefix of the node keys.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.url.prefix)
    }

    /// Connects (lazily: the first call dials).
    pub async fn connect(&self) -> Result<etcd_client::Client, StoreError> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout)
            .with_keep_alive(self.interval.max(Duration::from_secs(1)), self.timeout);
        let read = |what: &'static str, p: &PathBuf| {
            std::fs::read(p).map_err(|error| StoreError::File {
                what,
                path: p.display().to_string(),
                error,
            })
        };
        let tls = self.ca.is_some() || self.cert_key.is_some();
        if tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read("--store-ca", ca)?));
            }
            if let Some((cert, key)) = &self.cert_key {
                t = t.identity(etcd_client::Identity::from_pem(
                    read("--store-cert", cert)?,
                    read("--store-key", key)?,
                ));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, file)) = &self.user {
            let pw = String::from_utf8_lossy(&read("--store-password-file", file)?)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            opts = opts.with_user(user.clone(), pw);
        }
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = self
            .url
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        timed(
            self.timeout,
            etcd_client::Client::connect(endpoints, Some(opts)),
        )
        .await
    }
}

/// Runs one etcd call with a deadline.
pub async fn timed<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Unreachable(e.to_string())),
        Err(_) => Err(StoreError::Timeout(limit)),
    }
}

/// What the daemon knows of the store, published by [`sync`] for the API,
/// `xlb status`, `xlb fleet` and the metrics.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Whether the last etcd exchange worked.
    pub connected: bool,
    /// Since when it has not (absent: connected).
    pub unreachable_since: Option<SystemTime>,
    /// The revision this node applied (0: none yet).
    pub applied: i64,
    /// The revision of the newest document seen, with the newest valid state
    /// (the same document, unless that one is invalid): what API changes are
    /// based on and compare.
    pub seen: Option<(i64, Spec)>,
    /// The newest revision, when this node could not apply it, and why.
    pub failed: Option<(i64, String)>,
    /// Map writes and tables rebuilt by the last revision applied.
    pub changes: Option<(i64, usize, usize)>,
    /// The nodes' reports, by name, as last read from the store (kept while
    /// the store is unreachable).
    pub nodes: std::collections::BTreeMap<String, node::Report>,
    /// Whether a first listing of the store was read and its document (if
    /// any) handed to the controller: flow sync's start-up pull waits for it.
    pub listed: bool,
}

/// The store's side of the daemon, shared by the API and the metrics.
#[derive(Clone)]
pub struct Store {
    /// The settings.
    pub options: Arc<Options>,
    /// The published view.
    pub view: watch::Receiver<View>,
    /// The document this node is writing, parsed before the write.
    own: Own,
}

/// The document an API change on this node is writing and its parse, made
/// before the write (a document this node could not read back is not
/// written): when the watch delivers the same bytes, the store task takes
/// this parse instead of parsing them again. The same bytes parse to the
/// same state whatever the revision (the document's name only appears in
/// errors), so a document written by anyone else, or other bytes, is parsed
/// and validated as always.
#[derive(Clone, Default)]
pub(crate) struct Own(Arc<std::sync::Mutex<Option<(String, Spec)>>>);

impl Own {
    /// Keeps `text` and its parse `spec` (replacing an older one).
    fn put(&self, text: String, spec: Spec) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((text, spec));
    }

    /// The parse of `text` when it is the document kept (which is dropped).
    fn take(&self, text: &[u8]) -> Option<Spec> {
        let mut own = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match own.take() {
            Some((t, spec)) if t.as_bytes() == text => Some(spec),
            other => {
                *own = other;
                None
            }
        }
    }

    /// Forgets the document kept (its write failed).
    fn clear(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// The `store:` part of `xlb status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The store URL.
    pub url: String,
    /// This node's name.
    pub node: String,
    /// Whether etcd is reachable.
    pub connected: bool,
    /// Seconds since the epoch when it became unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    /// The revision applied.
    pub revision: i64,
    /// Why the newest revision was not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Store {
    /// The status line of `xlb status`.
    pub fn status(&self) -> Status {
        let v = self.view.borrow();
        Status {
            url: self.options.url.to_string(),
            node: self.options.node.clone(),
            connected: v.connected,
            unreachable_since: v.unreachable_since.map(epoch),
            revision: v.applied,
            error: v
                .failed
                .as_ref()
                .map(|(rev, e)| format!("revision {rev} not applied: {e}")),
        }
    }
}

/// Seconds since the epoch.
pub fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The host's name: the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "xlb".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_error_is_said_once_however_it_is_printed() {
        let doc = document::parse("xlb/desired", "services: 7\n").expect_err("not a list");
        let text = doc.to_string();
        let err = StoreError::from(doc);
        assert_eq!(err.to_string(), text);
        assert_eq!(crate::chain::Chain(&err).to_string(), text);
        assert_eq!(format!("{:#}", anyhow::Error::from(err)), text);
    }

    #[test]
    fn store_urls_parse_and_name_what_is_wrong() {
        let u: StoreUrl = "etcd://192.0.2.1:2379,192.0.2.2:2379/xlb/edge1/"
            .parse()
            .expect("valid");
        assert_eq!(u.endpoints, ["192.0.2.1:2379", "192.0.2.2:2379"]);
        assert_eq!(u.prefix, "/xlb/edge1");
        assert_eq!(
            u.to_string(),
            "etcd://192.0.2.1:2379,192.0.2.2:2379/xlb/edge1"
        );
        for (bad, why) in [
            ("http://192.0.2.1:2379/xlb", "must start with etcd://"),
            ("etcd://192.0.2.1:2379", "no key prefix"),
            ("etcd://192.0.2.1:2379/", "prefix is empty"),
            ("etcd://192.0.2.1/xlb", "'192.0.2.1' is not HOST:PORT"),
            ("etcd://192.0.2.1:0/xlb", "'192.0.2.1:0' is not HOST:PORT"),
        ] {
            let err = bad.parse::<StoreUrl>().expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
