//! The store task of a node: one session at a time with etcd.
//!
//! A session lists the prefix at one revision (the document and the node
//! keys), applies the document if it is newer than what the node applied,
//! grants a lease and puts the node's key on it, then watches the prefix
//! from the listed revision + 1. Every `interval` it renews the lease,
//! asks the watch for a progress notification, republishes the node's
//! report when it changed, and hands the controller the fleet's health view.
//!
//! Any failure ends the session: an etcd error, a call over its timeout, a
//! watch silent for three intervals plus the timeout (a stalled stream), a
//! lease gone, or a watch cancelled because its revision was compacted. The
//! node then keeps forwarding with what it applied, falls back to its own
//! health verdicts, and starts a new session (re-listing, so a compacted
//! history is no problem) every `interval` until etcd answers again.
//!
//! The task never writes the maps: each document goes to the controller as
//! one [`Edit::Load`].

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;

use super::{
    Options, Own, Store, StoreError, View, document,
    node::{self, FingerprintCache, Report, Verdict},
    timed,
};
use crate::{
    controller::{Event, Handle},
    desired::{Edit, Spec},
    health::engine::Board,
    model::Vip,
    neighbor::{self, Iface},
    state::persist,
};

/// How a session ended without etcd failing.
enum Relist {
    /// The watched revision was compacted: list again, then watch.
    Compacted(i64),
}

/// The store task's state.
pub struct Sync {
    options: Arc<Options>,
    handle: Handle,
    iface: Arc<Iface>,
    board: Board,
    resolve_timeout: Duration,
    view: watch::Sender<View>,
    fingerprints: FingerprintCache,
    /// The document this node's API is writing, already parsed.
    own: Own,
    /// The health view last handed to the controller.
    sent_health: Option<Option<BTreeMap<(Vip, IpAddr), bool>>>,
    /// The services of the last document read (only changed ones are read again).
    parts: document::Parts,
}

impl Sync {
    /// A store task for `options`, starting from `cached` (the document and
    /// revision saved by the last run, already applied), and the handle the
    /// API and the metrics read.
    pub fn new(
        options: Options,
        handle: Handle,
        iface: Arc<Iface>,
        board: Board,
        resolve_timeout: Duration,
        cached: Option<(i64, Spec)>,
    ) -> (Self, Store) {
        let options = Arc::new(options);
        let view = View {
            connected: false,
            unreachable_since: None,
            applied: cached.as_ref().map_or(0, |(r, _)| *r),
            seen: cached,
            ..View::default()
        };
        let (tx, rx) = watch::channel(view);
        let own = Own::default();
        let store = Store {
            options: options.clone(),
            view: rx,
            own: own.clone(),
        };
        let sync = Self {
            options,
            handle,
            iface,
            board,
            resolve_timeout,
            view: tx,
            fingerprints: FingerprintCache::default(),
            own,
            sent_health: None,
            parts: document::Parts::default(),
        };
        (sync, store)
    }

    /// Runs sessions until the daemon stops.
    pub async fn run(mut self) {
        loop {
            match self.session().await {
                Ok(Relist::Compacted(rev)) => tracing::warn!(
                    compacted = rev,
                    "the watched revision was compacted in the store: listing the desired state again"
                ),
                Err(err) => {
                    self.lost(&err);
                    tokio::time::sleep(self.options.interval).await;
                }
            }
        }
    }

    /// Marks the store unreachable (logged once per outage) and falls back
    /// to this node's own verdicts.
    fn lost(&mut self, err: &StoreError) {
        let mut logged = false;
        self.view.send_modify(|v| {
            if v.unreachable_since.is_none() {
                v.unreachable_since = Some(SystemTime::now());
                logged = true;
            }
            v.connected = false;
        });
        if logged {
            let applied = self.view.borrow().applied;
            tracing::error!(
                store = %self.options.url,
                %err,
                revision = applied,
                "store unreachable: forwarding with the last applied revision, health from this \
                 node's own probes; retrying every {:?}",
                self.options.interval
            );
        } else {
            tracing::debug!(%err, "store still unreachable");
        }
        self.send_health(None);
    }

    fn reached(&mut self) {
        let mut since = None;
        self.view.send_modify(|v| {
            since = v.unreachable_since.take();
            v.connected = true;
        });
        if let Some(since) = since {
            tracing::info!(
                store = %self.options.url,
                after_seconds = since.elapsed().map_or(0, |d| d.as_secs()),
                "store reachable again"
            );
        }
    }

    async fn session(&mut self) -> Result<Relist, StoreError> {
        let t = self.options.timeout;
        let mut client = self.options.connect().await?;
        let prefix = format!("{}/", self.options.url.prefix);
        let listed = timed(
            t,
            client.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let listed_at = listed.header().map_or(0, |h| h.revision());
        self.reached();
        let desired_key = self.options.desired_key();
        let nodes_prefix = self.options.nodes_prefix();
        let mut nodes = BTreeMap::new();
        let mut doc = None;
        for kv in listed.kvs() {
            if kv.key() == desired_key.as_bytes() {
                doc = Some((kv.mod_revision(), kv.value().to_vec()));
            } else if let Some(r) = parse_node(&nodes_prefix, kv.key(), kv.value()) {
                nodes.insert(r.name.clone(), r);
            }
        }
        self.set_nodes(nodes.clone());
        if let Some((rev, text)) = doc {
            self.take(rev, &text).await;
        }
        self.view.send_modify(|v| v.listed = true);

        let ttl = i64::try_from(self.options.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = timed(t, client.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut renewals) = timed(t, client.lease_keep_alive(lease)).await?;
        let node_key = format!("{nodes_prefix}{}", self.options.node);
        let mut published = None;
        self.publish(&mut client, &node_key, lease, &mut published)
            .await?;
        let watch = WatchOptions::new()
            .with_prefix()
            .with_start_revision(listed_at + 1)
            .with_progress_notify();
        let (mut requests, mut events) = timed(t, client.watch(prefix, Some(watch))).await?.split();
        let interval = self.options.interval;
        let stall = 3 * interval + t;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                msg = events.message() => {
                    let msg = msg
                        .map_err(|e| StoreError::Unreachable(e.to_string()))?
                        .ok_or_else(|| StoreError::Unreachable("the watch stream ended".into()))?;
                    heard = Instant::now();
                    if msg.compact_revision() > 0 {
                        return Ok(Relist::Compacted(msg.compact_revision()));
                    }
                    if msg.canceled() {
                        return Err(StoreError::Unreachable(format!(
                            "the watch was cancelled: {}", msg.cancel_reason()
                        )));
                    }
                    let mut doc = None;
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if kv.key() == desired_key.as_bytes() {
                            match ev.event_type() {
                                EventType::Put => doc = Some((kv.mod_revision(), kv.value().to_vec())),
                                EventType::Delete => tracing::error!(
                                    key = %desired_key,
                                    "the desired state was deleted from the store; keeping the \
                                     last applied revision"
                                ),
                            }
                        } else if let Some(name) = kv.key().strip_prefix(nodes_prefix.as_bytes()) {
                            let name = String::from_utf8_lossy(name).into_owned();
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Some(r) = parse_node(&nodes_prefix, kv.key(), kv.value()) {
                                        nodes.insert(name, r);
                                    }
                                }
                                EventType::Delete => {
                                    nodes.remove(&name);
                                }
                            }
                            self.set_nodes(nodes.clone());
                        }
                    }
                    if let Some((rev, text)) = doc {
                        self.take(rev, &text).await;
                        self.publish(&mut client, &node_key, lease, &mut published).await?;
                    }
                }
                renewal = renewals.message() => {
                    let r = renewal
                        .map_err(|e| StoreError::Unreachable(e.to_string()))?
                        .ok_or_else(|| StoreError::Unreachable("the lease renewal stream ended".into()))?;
                    if r.ttl() <= 0 {
                        return Err(StoreError::Unreachable("the node's lease expired".into()));
                    }
                    renewed = Instant::now();
                }
                _ = tick.tick() => {
                    if heard.elapsed() > stall {
                        return Err(StoreError::Unreachable(format!(
                            "the watch stalled: no event or progress notification for {stall:?}"
                        )));
                    }
                    if renewed.elapsed() > self.options.lease_ttl {
                        return Err(StoreError::Unreachable(
                            "the node's lease was not renewed within its time to live".into(),
                        ));
                    }
                    timed(t, async { keeper.keep_alive().await }).await?;
                    timed(t, async { requests.request_progress().await }).await?;
                    self.publish(&mut client, &node_key, lease, &mut published).await?;
                    let own = self.own_verdicts();
                    let others = nodes.iter().filter(|(n, _)| **n != self.options.node).map(|(_, r)| r);
                    let view = node::fleet_view(&own, others);
                    self.send_health(Some(view));
                }
            }
        }
    }

    fn set_nodes(&self, nodes: BTreeMap<String, Report>) {
        self.view.send_modify(|v| v.nodes = nodes);
    }

    /// Applies revision `rev` of the document, if this node has not yet.
    async fn take(&mut self, rev: i64, text: &[u8]) {
        if already_applied(&self.view.borrow(), rev) {
            return;
        }
        // The document this node's API just wrote was parsed before the write.
        let parsed = match self.own.take(text) {
            Some(spec) => Ok(spec),
            None => self.parts.parse(
                &format!("{}@{rev}", self.options.desired_key()),
                &String::from_utf8_lossy(text),
            ),
        };
        let result = match parsed {
            Ok(spec) => {
                self.view
                    .send_modify(|v| v.seen = Some((rev, spec.clone())));
                self.load(spec).await
            }
            Err(e) => {
                // Changes through the API overwrite it, based on the last valid state.
                self.view.send_modify(|v| {
                    if let Some(seen) = &mut v.seen {
                        seen.0 = rev;
                    } else {
                        v.seen = Some((rev, Spec::default()));
                    }
                });
                Err(e.to_string())
            }
        };
        match result {
            Ok((writes, tables)) => {
                tracing::info!(
                    revision = rev,
                    writes,
                    tables,
                    "desired state applied from the store"
                );
                if let Err(err) =
                    persist::save_store(&self.options.cache, rev, &String::from_utf8_lossy(text))
                {
                    let err = crate::chain::Chain(&err);
                    tracing::error!(%err, "could not save the store's document; a restart while the store is down starts from an older one");
                }
                self.view.send_modify(|v| {
                    v.applied = rev;
                    v.failed = None;
                    v.changes = Some((rev, writes, tables));
                });
            }
            Err(err) => {
                tracing::error!(revision = rev, %err, "revision of the store not applied; keeping the last applied one");
                self.view.send_modify(|v| v.failed = Some((rev, err)));
            }
        }
    }

    /// Hands `spec` to the controller, with the MACs of reals it does not know
    /// yet; nothing when the controller already has it (a document written
    /// again unchanged: 0 writes, 0 tables).
    async fn load(&self, spec: Spec) -> Result<(usize, usize), String> {
        let snap = self.handle.snapshot();
        if *snap.spec == spec {
            return Ok((0, 0));
        }
        let known = snap.macs.clone();
        drop(snap);
        let mut unknown = spec.effective_cow().reach();
        unknown.retain(|r, _| !known.contains_key(r));
        let resolution = if unknown.is_empty() {
            neighbor::Resolution::default()
        } else {
            neighbor::resolve_all(&self.iface, &unknown, self.resolve_timeout).await
        };
        self.handle
            .edit(Edit::Load(spec), resolution)
            .await
            .map(|c| (c.writes, c.tables))
            .map_err(|e| e.to_string())
    }

    /// This node's own probes' verdicts, for the reals it probes.
    fn own_verdicts(&self) -> BTreeMap<(Vip, IpAddr), bool> {
        let snap = self.handle.snapshot();
        let desired = snap.desired();
        self.board
            .statuses()
            .into_iter()
            .filter(|((vip, real), _)| desired.probed(vip, *real))
            .map(|(k, s)| (k, s.up))
            .collect()
    }

    fn send_health(&mut self, view: Option<BTreeMap<(Vip, IpAddr), bool>>) {
        if self.sent_health.as_ref() == Some(&view) {
            return;
        }
        if self
            .handle
            .sender()
            .try_send(Event::FleetHealth(view.clone()))
            .is_ok()
        {
            self.sent_health = Some(view);
        }
    }

    /// Puts the node's report on its lease when it changed.
    async fn publish(
        &mut self,
        client: &mut etcd_client::Client,
        key: &str,
        lease: i64,
        published: &mut Option<Report>,
    ) -> Result<(), StoreError> {
        let snap = self.handle.snapshot();
        let (applied, failed) = {
            let v = self.view.borrow();
            (v.applied, v.failed.clone())
        };
        let mut report = Report {
            name: self.options.node.clone(),
            addresses: self.iface.nets.iter().map(|(a, _)| *a).collect(),
            revision: applied,
            error: failed.map(|(rev, e)| format!("revision {rev} not applied: {e}")),
            tables: node::fingerprints(&snap, &mut self.fingerprints),
            verdicts: self
                .own_verdicts()
                .into_iter()
                .map(|((vip, real), up)| Verdict { vip, real, up })
                .collect(),
            updated: 0,
            sync: self.options.sync,
        };
        if published.as_ref() == Some(&report) {
            return Ok(());
        }
        let unstamped = report.clone();
        report.updated = super::epoch(SystemTime::now());
        let value = serde_json::to_vec(&report).unwrap_or_default();
        timed(
            self.options.timeout,
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        *published = Some(unstamped);
        Ok(())
    }
}

/// Whether revision `rev` is the one this node applied, with nothing failed
/// since: a session's listing (or a watch replay) hands it the document it
/// already applied, which is then not parsed nor handed on again. A failed
/// newer revision makes the node try again (a real it could not reach may
/// be reachable now).
fn already_applied(view: &View, rev: i64) -> bool {
    view.applied == rev && view.failed.is_none()
}

/// The report under a node key, if `key` is one and its value parses.
fn parse_node(prefix: &str, key: &[u8], value: &[u8]) -> Option<Report> {
    key.strip_prefix(prefix.as_bytes())?;
    match serde_json::from_slice::<Report>(value) {
        Ok(r) => Some(r),
        Err(err) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), %err, "ignoring a node key that is not a node report");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_already_applied_is_skipped_and_others_are_taken() {
        let mut view = View {
            applied: 7,
            ..View::default()
        };
        assert!(already_applied(&view, 7));
        // A newer revision, an older one (a replay after a compaction) and
        // the first document of a node that applied none are all taken.
        assert!(!already_applied(&view, 8));
        assert!(!already_applied(&view, 6));
        assert!(!already_applied(&View::default(), 1));
        // After a failure the same revision is taken again.
        view.failed = Some((8, "198.51.100.99 is not reachable".into()));
        assert!(!already_applied(&view, 7));
        assert!(!already_applied(&view, 8));
    }

    #[test]
    fn the_own_parse_is_taken_only_for_the_same_bytes() {
        let text = "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - { address: 198.51.100.11 }\n";
        let spec = document::parse("store", text).expect("valid");
        let own = Own::default();
        own.put(text.to_owned(), spec.clone());
        // Other bytes (someone else's write) are parsed as always, and the
        // parse kept stays for its own bytes.
        let other = text.replace("198.51.100.11", "198.51.100.12");
        assert_eq!(own.take(other.as_bytes()), None);
        assert_eq!(own.take(text.as_bytes()), Some(spec.clone()));
        // Taken once: a second delivery of the bytes is parsed.
        assert_eq!(own.take(text.as_bytes()), None);
        own.put(text.to_owned(), spec);
        own.clear();
        assert_eq!(own.take(text.as_bytes()), None);
    }
}
