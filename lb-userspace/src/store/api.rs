//! The control API in store mode: a change (`xlb apply`, `xlb vip|real ...`)
//! is applied to the newest document this node has seen, validated as
//! without a store (the same [`Spec::apply`] and reach checks), and written
//! with a compare-and-swap on that document's revision. Then the call waits
//! until this node has applied the revision it wrote, so what the CLI prints
//! next is already in force here. `GET /v1/fleet` answers `xlb fleet`.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{Status, Store, StoreError, document, node};
use crate::{
    controller::{self, ControlError},
    desired::{Edit, Spec},
    neighbor::Iface,
};

/// Longest a change waits for this node to apply what it wrote.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// Why a change in store mode was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Invalid, or not applicable on this node: nothing was written.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The store refused or failed the write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Written, but this node could not apply it (or not in time).
    #[error("written to the store as revision {revision}, but {why}")]
    NotApplied {
        /// The revision written.
        revision: i64,
        /// What happened on this node.
        why: String,
    },
}

/// A change written and applied here.
#[derive(Debug)]
pub struct Written {
    /// The revision written.
    pub revision: i64,
    /// Map writes and tables rebuilt on this node.
    pub writes: usize,
    /// Tables rebuilt on this node.
    pub tables: usize,
}

impl Store {
    /// Applies `edit` to the newest document seen (refused if that is not
    /// revision `if_revision`, when given), writes the result with a
    /// compare-and-swap on that revision, and waits for this node to apply it.
    pub async fn change(
        &self,
        iface: &Iface,
        edit: Edit,
        if_revision: Option<i64>,
    ) -> Result<Written, ChangeError> {
        let (read, spec) = self
            .view
            .borrow()
            .seen
            .clone()
            .unwrap_or((0, Spec::default()));
        check_revision(if_revision, read)?;
        let mut next = spec;
        next.apply(edit).map_err(ControlError::from)?;
        controller::check_reach(iface, &next.effective_cow()).map_err(ControlError::from)?;
        let text = document::render(&next);
        // Read back as every node will read it: a document that does not
        // parse is not written, and this node's store task takes this parse
        // when the watch brings these bytes back (see [`super::Own`]).
        let parsed =
            document::parse(&self.options.desired_key(), &text).map_err(StoreError::from)?;
        drop(next);
        let key = self.options.desired_key();
        let t = self.options.timeout;
        let mut client = self.options.connect().await?;
        self.own.put(text.clone(), parsed);
        let guard = if read == 0 {
            Compare::version(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, read)
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key.clone(), text, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = match super::timed(t, client.txn(txn)).await {
            Ok(resp) => resp,
            Err(err) => {
                self.own.clear();
                return Err(err.into());
            }
        };
        if !resp.succeeded() {
            self.own.clear();
            let now = resp
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(g) => {
                        Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                    }
                    _ => None,
                })
                .unwrap_or(0);
            return Err(StoreError::Conflict { read, now }.into());
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        tracing::info!(
            revision,
            based_on = read,
            "desired state written to the store"
        );
        let mut view = self.view.clone();
        let waited = tokio::time::timeout(
            APPLY_WAIT,
            view.wait_for(|v| {
                v.applied >= revision || v.failed.as_ref().is_some_and(|(r, _)| *r >= revision)
            }),
        )
        .await;
        let not_applied = |why: String| ChangeError::NotApplied { revision, why };
        match waited {
            Err(_) => Err(not_applied(format!(
                "this node has not applied it within {APPLY_WAIT:?} (see `xlb fleet`)"
            ))),
            Ok(Err(_)) => Err(not_applied("the daemon is shutting down".into())),
            Ok(Ok(v)) => match (&v.failed, v.changes) {
                (Some((r, why)), _) if *r >= revision => {
                    Err(not_applied(format!("this node could not apply it: {why}")))
                }
                (_, Some((r, writes, tables))) if r == revision => Ok(Written {
                    revision,
                    writes,
                    tables,
                }),
                _ => Ok(Written {
                    revision,
                    writes: 0,
                    tables: 0,
                }),
            },
        }
    }

    /// Refuses `if_revision` (when given) unless it is the revision of the
    /// newest document seen: what a plan (`xlb apply --dry-run`) checks.
    pub fn check_revision(&self, if_revision: Option<i64>) -> Result<(), StoreError> {
        let seen = self.view.borrow().seen.as_ref().map_or(0, |(r, _)| *r);
        check_revision(if_revision, seen)
    }

    /// The answer of `GET /v1/fleet`.
    pub fn fleet(&self) -> Fleet {
        let nodes = self.view.borrow().nodes.clone();
        let mut differs = node::differences(&nodes);
        Fleet {
            store: self.status(),
            nodes: nodes
                .into_values()
                .map(|report| FleetNode {
                    differs: differs.remove(&report.name).unwrap_or_default(),
                    report,
                })
                .collect(),
        }
    }
}

/// A conflict when `want` is given and is not `seen`, the revision a
/// change would be based on.
fn check_revision(want: Option<i64>, seen: i64) -> Result<(), StoreError> {
    match want {
        Some(want) if want != seen => Err(StoreError::Conflict {
            read: want,
            now: seen,
        }),
        _ => Ok(()),
    }
}

/// Answer of `GET /v1/fleet`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fleet {
    /// This node's view of the store.
    pub store: Status,
    /// Every node with a live key, by name.
    pub nodes: Vec<FleetNode>,
}

/// One node in `GET /v1/fleet`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetNode {
    /// What it reports.
    #[serde(flatten)]
    pub report: node::Report,
    /// How it differs from the majority.
    pub differs: node::Differs,
}
