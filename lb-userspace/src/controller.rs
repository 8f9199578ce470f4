//! The controller: the one task that owns the balancer's [`State`] and the
//! maps. Everything that changes them reaches it as an [`Event`] over a
//! bounded channel:
//!
//! - edits from the API (CLI commands, `xlb apply`), config reloads and, in a
//!   fleet, each new revision of the store's document, each with the MACs its
//!   sender already resolved;
//! - health verdicts from the probe tasks, or in a fleet (`--store`) the
//!   fleet's health view from the store task, which then decides;
//! - neighbour-table changes (RTM_NEWNEIGH) and the results of resolution rounds;
//! - `xlb simulate` queries, which read the live table.
//!
//! After every change it updates the health engine (a new probe list only
//! when the spec changed), publishes a [`Snapshot`] that readers (status,
//! metrics) use without ever waiting on it, and saves the state file: before
//! the answer to an API edit, else after the event and before the next one
//! (a store revision is answered first: see `Controller::save`). Once a
//! second it converges: verdicts the state does not hold yet (a lost event, a
//! failed write) are applied again, verdicts of reals no longer probed are
//! cleared, and unresolved reals are asked again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    desired::{Admin, Desired, Edit, Source, Spec, SpecError, VipOptions},
    health::{Engine, Planned, ProbeKind, TcpMode, Via, engine::Board, path::Paths},
    model::{Forward, Vip},
    neighbor::{self, Iface, NeighborError, Resolution},
    state::{Changes, State, StateError, persist, writer::PauseHook},
};

/// Capacity of the event channel.
const EVENTS: usize = 1024;

/// How often the controller converges and retries unresolved reals.
const TICK: Duration = Duration::from_secs(1);

/// How long a probe's verdict waits for others before the controller applies
/// it. None: the loop takes every event already queued first (`biased`), so
/// the verdicts of a burst of flips (every real behind a failed switch port)
/// that queued up meanwhile are one reconcile, one snapshot and one save, and
/// a lone verdict reaches the table as soon as it is taken (a check that sees
/// a probe up finds the real in the table).
const VERDICT_WINDOW: Duration = Duration::ZERO;

/// How often every real's MAC is checked against the neighbour table (the
/// neighbour events catch changes at once; this is the safety net).
const MAC_REFRESH: Duration = Duration::from_secs(30);

/// The once-a-second convergence looks at every verdict only when something
/// it reads changed since it last found nothing to fix, and at least this often.
const FULL_SWEEP: Duration = Duration::from_secs(30);

/// Unresolved reals are asked every second this long, then every [`SLOW_RETRY`].
const FAST_RETRIES: Duration = Duration::from_secs(300);

/// Retry interval of reals unresolved for longer than [`FAST_RETRIES`].
const SLOW_RETRY: Duration = Duration::from_secs(5);

/// Why the controller refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The edit is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A real can never be reached the way its VIP needs.
    #[error(transparent)]
    Neighbor(#[from] NeighborError),
    /// Writing the maps failed; nothing changed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The controller stopped (the daemon is shutting down).
    #[error("the daemon is shutting down")]
    Stopped,
}

impl From<StateError> for ControlError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Spec(e) => Self::Spec(e),
            StateError::Dataplane(e) => Self::Dataplane(e),
        }
    }
}

/// What reaches the controller.
#[expect(
    clippy::large_enum_variant,
    reason = "edits are rare; verdicts, the frequent events, are small anyway"
)]
pub enum Event {
    /// Change the desired state.
    Edit {
        /// The change.
        edit: Edit,
        /// What the sender found resolving the reals the change adds.
        resolution: Box<Resolution>,
        /// Where the result goes.
        reply: oneshot::Sender<Result<Changes, ControlError>>,
    },
    /// A probe task's verdict flipped.
    Verdict {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
        /// The new verdict.
        up: bool,
    },
    /// The kernel learnt or changed a neighbour's MAC.
    Neighbour {
        /// The neighbour's address.
        addr: IpAddr,
        /// Its MAC.
        mac: [u8; 6],
    },
    /// A resolution round ended.
    Resolved(Box<Resolution>),
    /// The fleet's health view (store mode), or `None`: this node's own
    /// probes decide (no store, or the store is unreachable).
    FleetHealth(Option<BTreeMap<(Vip, IpAddr), bool>>),
    /// Which real the live table gives a flow hash.
    Simulate {
        /// The VIP.
        vip: Vip,
        /// The flow hash.
        hash: u32,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Option<IpAddr>, ControlError>>,
    },
}

/// What the API and the metrics see of one real.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealModel {
    /// The real.
    pub addr: IpAddr,
    /// Its weight.
    pub weight: u32,
    /// Where the weight comes from.
    pub weight_source: Source,
    /// The operator's state.
    pub admin: Admin,
    /// Where the admin state comes from.
    pub admin_source: Source,
    /// Its weight in the live table (absent: not in it).
    pub effective_weight: Option<u32>,
    /// Its slot id and the slot's generation (absent: none yet).
    pub slot: Option<(u32, u32)>,
    /// MAC of the real (DR) or of the next hop toward it (TUN), once known.
    pub mac: Option<[u8; 6]>,
    /// Why it is not resolved yet.
    pub unresolved: Option<String>,
    /// The verdict in force.
    pub healthy: bool,
    /// The probe kind that applies, if any.
    pub check: Option<ProbeKind>,
    /// How a `tcp` check probes (absent for other kinds).
    #[serde(default)]
    pub check_mode: Option<TcpMode>,
    /// Where its probes go.
    #[serde(default)]
    pub via: Via,
    /// How many times it entered or left the set of reals the VIP's live
    /// table sends new flows to (effective weight above 0), since it was added.
    #[serde(default)]
    pub table_changes: u64,
    /// Slow start: the percent of its weight it has now (absent: all).
    #[serde(default)]
    pub ramp: Option<u32>,
}

impl RealModel {
    /// Whether the live table sends it new flows.
    pub fn serving(&self) -> bool {
        self.effective_weight.is_some_and(|w| w > 0)
    }
}

/// What the API and the metrics see of one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipModel {
    /// The VIP.
    pub vip: Vip,
    /// Its id in the maps.
    pub id: u32,
    /// Its options.
    pub options: VipOptions,
    /// The `hash_seed` its live table was built with.
    #[serde(default, skip_serializing_if = "crate::desired::is_zero")]
    pub hash_seed: u64,
    /// Whether the avalanche guard ignores health for it.
    pub guarded: bool,
    /// Its reals.
    pub reals: Vec<RealModel>,
}

/// The controller's state as readers see it, published after every change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Both layers of the desired state (the controller's own, shared).
    pub spec: Arc<Spec>,
    /// The effective desired state when overrides apply, made once from
    /// `spec` (without overrides it is `spec`'s base: nothing is copied).
    effective: OnceLock<Desired>,
    /// Every VIP as applied.
    pub vips: Vec<VipModel>,
    /// MACs known, by real.
    pub macs: BTreeMap<IpAddr, [u8; 6]>,
}

impl Snapshot {
    /// The effective desired state (base with overrides): the spec's base
    /// when no override applies, else made from the spec once, on first use.
    pub fn desired(&self) -> &Desired {
        self.spec
            .base_when_effective()
            .unwrap_or_else(|| self.effective.get_or_init(|| self.spec.effective()))
    }

    /// The state as published, `prev` the snapshot before it (the table
    /// changes of each real carry on from it).
    fn of(state: &State, pending: &BTreeMap<IpAddr, Pending>, prev: &Snapshot) -> Self {
        let mut snap = Self {
            spec: state.spec_shared(),
            macs: state.macs().clone(),
            ..Self::default()
        };
        snap.vips = snap.models(state, pending, prev);
        snap
    }

    /// Every VIP of the effective state as applied.
    fn models(
        &self,
        state: &State,
        pending: &BTreeMap<IpAddr, Pending>,
        prev: &Snapshot,
    ) -> Vec<VipModel> {
        let spec = &self.spec;
        let model = state.model();
        let prev_vips: BTreeMap<&Vip, &VipModel> = prev.vips.iter().map(|v| (&v.vip, v)).collect();
        self.desired()
            .services
            .iter()
            .filter_map(|(vip, s)| {
                let a = model.services.get(vip)?;
                let reals =
                    s.reals
                        .iter()
                        .map(|(addr, r)| {
                            let (weight_source, admin_source) = spec.sources(vip, *addr);
                            let effective_weight = a.table.get(addr).copied();
                            let serving = effective_weight.is_some_and(|w| w > 0);
                            let table_changes = prev_vips
                                .get(vip)
                                .and_then(|v| v.reals.iter().find(|p| p.addr == *addr))
                                .map_or(0, |p| p.table_changes + u64::from(p.serving() != serving));
                            RealModel {
                                addr: *addr,
                                weight: r.weight,
                                weight_source,
                                admin: r.admin,
                                admin_source,
                                effective_weight,
                                slot: a.slots.get(addr).map(|id| {
                                    (*id, model.slots.get(id).map_or(0, |s| s.generation))
                                }),
                                mac: state.mac(*addr),
                                unresolved: if state.mac(*addr).is_some() {
                                    None
                                } else {
                                    Some(pending.get(addr).map_or_else(
                                        || "resolving".to_owned(),
                                        |p| p.reason.clone(),
                                    ))
                                },
                                healthy: state.healthy(vip, *addr),
                                check: s
                                    .check(*addr)
                                    .map(|c| c.kind)
                                    .filter(|k| *k != ProbeKind::None),
                                check_mode: s
                                    .check(*addr)
                                    .filter(|c| c.kind == ProbeKind::Tcp)
                                    .map(|c| c.mode),
                                via: s.check(*addr).map(|c| c.via).unwrap_or_default(),
                                table_changes,
                                ramp: state.ramp().get(&(*vip, *addr)).copied(),
                            }
                        })
                        .collect();
                Some(VipModel {
                    vip: *vip,
                    id: a.id,
                    options: a.options,
                    hash_seed: a.hash_seed,
                    guarded: state.guarded().contains(vip),
                    reals,
                })
            })
            .collect()
    }
}

/// The result of the last load of a whole configuration: at start-up, on
/// SIGHUP, or by `xlb apply` (what `systemctl reload` runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// Whether it was applied.
    pub successful: bool,
    /// When it ended, Unix seconds.
    pub at: u64,
    /// What asked for it: `start-up`, `SIGHUP` or `xlb apply`, and the file.
    pub source: String,
    /// Why it was refused, in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When a load last succeeded, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<u64>,
}

/// Now, Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the controller counts of its own work (the data path's counters live
/// in maps); read by the metrics and `xlb status`.
pub struct Activity {
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    reconcile_seconds: Histogram,
    unresolved: AtomicU64,
    reload: watch::Sender<Option<ReloadOutcome>>,
}

impl Activity {
    /// Empty metrics.
    pub fn new() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            reconcile_seconds: Histogram::new([
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            unresolved: AtomicU64::new(0),
            reload: watch::channel(None).0,
        }
    }

    /// Records the result of loading a whole configuration (`source`: what
    /// asked for it).
    pub fn record_reload(&self, source: String, result: Result<(), String>) {
        let at = unix_now();
        self.reload.send_modify(|last| {
            let before = last.as_ref().and_then(|l| l.last_success_at);
            *last = Some(ReloadOutcome {
                successful: result.is_ok(),
                at,
                source,
                last_success_at: if result.is_ok() { Some(at) } else { before },
                error: result.err(),
            });
        });
    }

    /// The last configuration load, if any.
    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.reload.borrow().clone()
    }

    /// Records one reconcile.
    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// Reconciles so far (for `xlb status`).
    pub fn reconcile_count(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// Reconciles that failed.
    pub fn reconcile_errors(&self) -> u64 {
        self.reconcile_errors.load(Ordering::Relaxed)
    }

    /// How long reconciles took.
    pub fn reconcile_seconds(&self) -> Histogram {
        self.reconcile_seconds.clone()
    }

    /// Records how many reals are unresolved.
    pub fn set_unresolved(&self, n: usize) {
        self.unresolved.store(n as u64, Ordering::Relaxed);
    }

    /// Reals unresolved now.
    pub fn unresolved(&self) -> u64 {
        self.unresolved.load(Ordering::Relaxed)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// How API handlers and other tasks talk to the controller.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Event>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Handle {
    /// The last published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Sends an event (waits while the channel is full).
    pub async fn send(&self, event: Event) -> Result<(), ControlError> {
        self.tx.send(event).await.map_err(|_| ControlError::Stopped)
    }

    /// Applies `edit` with what was found resolving the reals it adds.
    pub async fn edit(&self, edit: Edit, resolution: Resolution) -> Result<Changes, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Event::Edit {
            edit,
            resolution: Box::new(resolution),
            reply,
        })
        .await?;
        answer.await.map_err(|_| ControlError::Stopped)?
    }

    /// Which real the live table gives `hash` for `vip`.
    pub async fn simulate(&self, vip: Vip, hash: u32) -> Result<Option<IpAddr>, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(Event::Simulate { vip, hash, reply }).await?;
        answer.await.map_err(|_| ControlError::Stopped)?
    }

    /// Follows the published snapshots (the node task announces from them).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// A sender for tasks that report to the controller (probes, neighbour watch).
    pub fn sender(&self) -> mpsc::Sender<Event> {
        self.tx.clone()
    }
}

/// An unresolved real.
#[derive(Clone, Debug)]
struct Pending {
    /// Why it is not resolved.
    reason: String,
    /// Since when.
    since: Instant,
    /// When to ask again.
    next: Instant,
}

/// Which spec the health engine's probe list was last made of: the list is
/// made again only for another spec (every edit makes a new one; verdicts,
/// MACs and ramps keep it).
#[derive(Debug, Default)]
struct ProbeList {
    /// The spec of the last list (weak: it does not keep the spec alive, and
    /// the allocation it points to is not reused while it exists).
    of: Weak<Spec>,
}

impl ProbeList {
    /// The probe list of `spec`, unless the last one was made of it.
    fn changed(&mut self, spec: &Arc<Spec>) -> Option<BTreeMap<(Vip, IpAddr), Planned>> {
        if self.of.ptr_eq(&Arc::downgrade(spec)) {
            return None;
        }
        self.of = Arc::downgrade(spec);
        Some(spec.effective_cow().probes())
    }
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the state is saved after every change.
    pub state_file: PathBuf,
    /// Test hook: stop after the n-th map write of an edit.
    pub pause: PauseHook,
}

/// The owner of the state and the maps.
pub struct Controller {
    state: State,
    dp: Dataplane,
    iface: Iface,
    engine: Engine,
    /// The `via: vip` prober: told the MACs at every change.
    paths: Arc<Paths>,
    options: Options,
    metrics: Arc<Activity>,
    /// Unresolved reals.
    pending: BTreeMap<IpAddr, Pending>,
    /// Next hop of each real (itself in DR mode), as last resolved.
    hops: BTreeMap<IpAddr, IpAddr>,
    /// Whether a resolution round is running.
    resolving: bool,
    /// The running confirmation of stale neighbour entries, if any.
    confirming: Option<tokio::task::JoinHandle<()>>,
    /// Reals in slow start: since when, and for how long.
    ramps: BTreeMap<(Vip, IpAddr), (Instant, Duration)>,
    /// The fleet's verdicts, when they decide instead of the local probes'.
    fleet: Option<BTreeMap<(Vip, IpAddr), bool>>,
    /// What the health engine's probe list was made of.
    probes: ProbeList,
    /// A change reached the maps since the state file was last written.
    unsaved: bool,
    /// Verdicts received and not applied yet.
    verdicts: Waiting,
    /// Changes committed or refused, and fleet views taken, since start:
    /// with the engine's flips, what the health convergence reads.
    changes: u64,
    fleet_views: u64,
    /// When the health convergence last found nothing to fix.
    health_sweep: Sweep,
    /// The next hops whose stale neighbour entries are confirmed, as last
    /// worked out (again after a change or a resolution round).
    watched: Option<Arc<BTreeSet<IpAddr>>>,
    tx: mpsc::Sender<Event>,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Controller {
    /// A controller over `state` and `dp` (already adopted and applied, with
    /// `resolution` what start-up found resolving the reals), its `via: vip`
    /// probes sent by `paths`, and the handle to reach it.
    pub fn new(
        state: State,
        dp: Dataplane,
        iface: Iface,
        options: Options,
        metrics: Arc<Activity>,
        resolution: &Resolution,
        paths: Arc<Paths>,
    ) -> (Self, Handle, mpsc::Receiver<Event>, Board) {
        let (tx, rx) = mpsc::channel(EVENTS);
        let verdicts = tx.clone();
        let engine = Engine::new(
            Arc::new(move |vip, real, up| {
                // A full channel loses the event; the next convergence applies it.
                let _ = verdicts.try_send(Event::Verdict { vip, real, up });
            }),
            Some(paths.clone()),
        );
        let board = engine.board();
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut c = Self {
            state,
            dp,
            iface,
            engine,
            paths,
            options,
            metrics,
            pending: BTreeMap::new(),
            hops: BTreeMap::new(),
            resolving: false,
            confirming: None,
            ramps: BTreeMap::new(),
            fleet: None,
            probes: ProbeList::default(),
            unsaved: false,
            verdicts: Waiting::default(),
            changes: 0,
            fleet_views: 0,
            health_sweep: Sweep::default(),
            watched: None,
            tx: tx.clone(),
            snapshot,
        };
        c.track_unresolved(&BTreeMap::new());
        c.note_failures(resolution);
        c.publish();
        let handle = Handle {
            tx,
            snapshot: snapshot_rx,
        };
        (c, handle, rx, board)
    }

    /// Runs until every handle is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        self.sync_engine();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(MAC_REFRESH);
        refresh.tick().await;
        loop {
            let due = self.verdicts.due();
            let verdicts_due =
                tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now));
            tokio::select! {
                // Queued events first: the verdicts among them wait together.
                biased;
                event = rx.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                () = verdicts_due, if due.is_some() => self.apply_verdicts(),
                _ = tick.tick() => {
                    self.apply_verdicts();
                    self.converge();
                }
                _ = refresh.tick() => self.refresh_macs(),
            }
            // After the event was handled, before the next one.
            self.save();
        }
        self.engine.stop();
    }

    /// Applies the verdicts received since the last time ([`VERDICT_WINDOW`]),
    /// unless the fleet's view decides (store mode): the reals whose verdict
    /// differs from the state's.
    fn apply_verdicts(&mut self) {
        let verdicts = self.verdicts.take();
        if self.fleet.is_some() || verdicts.is_empty() {
            return;
        }
        let fix = changed_verdicts(&verdicts, &self.state);
        if fix.is_empty() {
            return;
        }
        if fix.len() > 1 {
            tracing::info!(
                verdicts = fix.len(),
                "health verdicts that came together applied in one change"
            );
        }
        let mut ramping = false;
        for &((vip, real), up) in &fix {
            if up {
                self.start_ramp(vip, real);
                ramping = true;
            } else {
                self.ramps.remove(&(vip, real));
            }
        }
        if ramping {
            // The ramps are in place before the reals enter the table.
            self.apply_ramps();
        }
        let r = self.state.set_health(&mut self.dp, &fix);
        let _ = self.committed(r.map_err(ControlError::from), Instant::now());
    }

    fn handle(&mut self, event: Event) {
        if !matches!(event, Event::Verdict { .. }) {
            // Whatever else comes sees the verdicts that came before it.
            self.apply_verdicts();
        }
        match event {
            Event::Edit {
                edit,
                resolution,
                reply,
            } => {
                // The answer to an API edit promises the change is in the
                // state file; a store revision is saved after the answer (its
                // document is in the store's own file: see `save`).
                let load = matches!(edit, Edit::Load(_));
                let result = self.edit(edit, &resolution.found);
                self.note_failures(&resolution);
                if !load {
                    self.save();
                }
                let _ = reply.send(result);
            }
            Event::Verdict { vip, real, up } => {
                self.verdicts
                    .add((vip, real), up, tokio::time::Instant::now());
            }
            Event::FleetHealth(view) => {
                self.fleet = view;
                self.fleet_views += 1;
                self.converge_health();
            }
            Event::Neighbour { addr, mac } => self.neighbour(addr, mac),
            Event::Resolved(res) => {
                self.resolving = false;
                self.resolved(*res);
            }
            Event::Simulate { vip, hash, reply } => {
                let _ = reply.send(self.simulate(&vip, hash));
            }
        }
    }

    /// Applies an edit, refusing reals that can never be reached.
    fn edit(
        &mut self,
        edit: Edit,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
    ) -> Result<Changes, ControlError> {
        let started = Instant::now();
        // The edit is made and validated once, on its own result (a whole
        // document for a `Load`), checked for reach, then taken as it is.
        let next = self.state.spec().applied(edit)?;
        check_reach(&self.iface, &next.spec.effective_cow())?;
        let before = self.state.spec_shared();
        let before = before.effective_cow();
        let r = self
            .state
            .take_next(&mut self.dp, next, macs, self.options.pause)
            .map_err(ControlError::from);
        if r.is_ok() {
            self.track_unresolved(macs);
        }
        let r = self.committed(r, started);
        if r.is_ok() {
            // A probed real added to a VIP that already serves ramps up from
            // now (one that starts down ramps when it comes up).
            let desired = self.state.desired();
            let added: Vec<(Vip, IpAddr)> = desired
                .services
                .iter()
                .filter_map(|(vip, s)| {
                    let was = before.services.get(vip).filter(|b| !b.reals.is_empty())?;
                    Some((vip, s, was))
                })
                .flat_map(|(vip, s, was)| {
                    s.reals
                        .keys()
                        .filter(|real| !was.reals.contains_key(real))
                        .map(|real| (*vip, *real))
                })
                .filter(|(vip, real)| desired.probed(vip, *real) && self.state.healthy(vip, *real))
                .collect();
            drop(desired);
            for (vip, real) in added {
                self.start_ramp(vip, real);
            }
            self.apply_ramps();
        }
        r
    }

    /// Starts the slow start of a real, if its check has one.
    fn start_ramp(&mut self, vip: Vip, real: IpAddr) {
        let ms = self
            .state
            .desired()
            .services
            .get(&vip)
            .and_then(|s| s.check(real))
            .map_or(0, |c| c.slow_start_ms);
        if ms > 0 {
            self.ramps
                .insert((vip, real), (Instant::now(), Duration::from_millis(ms)));
        }
    }

    /// Puts the slow-start percents of now into the table when they changed
    /// (called once a second: the table is rebuilt at most that often).
    fn apply_ramps(&mut self) {
        let now = Instant::now();
        let desired = self.state.desired();
        self.ramps.retain(|(vip, real), (since, total)| {
            now - *since < *total && desired.has_real(vip, *real)
        });
        let want: BTreeMap<(Vip, IpAddr), u32> = self
            .ramps
            .iter()
            .map(|(k, (since, total))| (*k, ramp_percent(now - *since, *total)))
            .collect();
        if &want != self.state.ramp() {
            let r = self.state.set_ramp(&mut self.dp, want);
            let _ = self.committed(r.map_err(ControlError::from), now);
        }
    }

    /// After a reconcile: metrics, state file, health engine, snapshot.
    fn committed(
        &mut self,
        result: Result<Changes, ControlError>,
        started: Instant,
    ) -> Result<Changes, ControlError> {
        self.metrics.reconciled(started.elapsed(), result.is_ok());
        self.changes += 1;
        self.watched = None;
        match &result {
            Ok(_) => {
                self.unsaved = true;
                self.sync_engine();
                self.publish();
            }
            Err(err) => {
                let err = crate::chain::Chain(err);
                tracing::warn!(%err, "change refused");
            }
        }
        result
    }

    /// Gives the health engine the probe list, when the spec changed since
    /// it was last given one (a verdict, a MAC or a ramp leaves it as it is).
    fn sync_engine(&mut self) {
        let Some(probes) = self.probes.changed(&self.state.spec_shared()) else {
            return;
        };
        let down: BTreeSet<(Vip, IpAddr)> = self
            .state
            .health()
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(k, _)| *k)
            .collect();
        self.engine.sync(probes, &down);
    }

    /// Writes the state file when a change reached the maps since the last
    /// write: before the answer to an API edit, else once per event, after
    /// it was handled and before the next one is taken. A store revision is
    /// thus saved just after its answer, while the store task saves the
    /// document and reports it: a node killed in between restarts with the
    /// revision's document (`store.json`) and adopts the maps from the state
    /// before it, which rewrites every table and slot to that document.
    fn save(&mut self) {
        if !std::mem::take(&mut self.unsaved) {
            return;
        }
        if let Err(err) = persist::save(&self.options.state_file, &self.iface.name, &self.state) {
            let err = crate::chain::Chain(&err);
            tracing::error!(%err, "could not save the state file; a restarted daemon rebuilds from its config");
        }
    }

    fn publish(&mut self) {
        let snap = Snapshot::of(&self.state, &self.pending, &self.snapshot.borrow());
        self.paths.set_macs(&snap.macs);
        self.metrics.set_unresolved(self.pending.len());
        self.snapshot.send_replace(Arc::new(snap));
    }

    /// Keeps `pending` to the reals the state cannot reach yet.
    fn track_unresolved(&mut self, learnt: &BTreeMap<IpAddr, [u8; 6]>) {
        let unresolved = self.state.unresolved();
        self.pending.retain(|r, _| unresolved.contains_key(r));
        let now = Instant::now();
        for real in unresolved.keys() {
            if !self.pending.contains_key(real) {
                tracing::warn!(%real, "real not resolved yet: kept out of the tables, asking again every second");
                self.pending.insert(
                    *real,
                    Pending {
                        reason: "resolving".to_owned(),
                        since: now,
                        next: now,
                    },
                );
            }
        }
        for real in learnt.keys() {
            self.pending.remove(real);
        }
    }

    /// Once a second: verdicts, unresolved reals, stale neighbours.
    fn converge(&mut self) {
        self.converge_health();
        self.apply_ramps();
        self.retry_unresolved();
        self.confirm_neighbours();
    }

    /// Asks the kernel to confirm the neighbour entries of resolved reals'
    /// next hops that went stale (a real whose MAC changed without
    /// announcing itself is then learnt again; the change arrives as a
    /// neighbour event).
    fn confirm_neighbours(&mut self) {
        if self.confirming.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let hops = match &self.watched {
            Some(hops) => hops.clone(),
            None => {
                let hops: BTreeSet<IpAddr> = self
                    .state
                    .desired()
                    .reach()
                    .into_iter()
                    .filter(|(real, _)| self.state.mac(*real).is_some())
                    .filter_map(|(real, mode)| {
                        self.hops
                            .get(&real)
                            .copied()
                            .or((mode == Forward::Dr).then_some(real))
                    })
                    .collect();
                self.watched.insert(Arc::new(hops)).clone()
            }
        };
        if hops.is_empty() {
            return;
        }
        let iface = self.iface.clone();
        self.confirming = Some(tokio::spawn(async move {
            match neighbor::confirm_stale(&iface, &hops).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(entries = n, "asked the kernel to confirm stale neighbours")
                }
                Err(err) => tracing::debug!(%err, "confirming stale neighbours failed"),
            }
        }));
    }

    /// Applies the verdicts in force that the state does not hold yet: the
    /// local probes', or, in a fleet, the fleet's where it has one.
    /// Skipped while nothing it reads changed since it last found nothing to
    /// fix (no flip, no change, no fleet view), except every [`FULL_SWEEP`]:
    /// with thousands of reals the sweep was the largest part of the
    /// controller's once-a-second work.
    fn converge_health(&mut self) {
        let now = Instant::now();
        // Read before the verdicts: a flip from here on makes the next one due.
        let epoch = (self.engine.board().flips(), self.changes, self.fleet_views);
        if !self.health_sweep.due(epoch, now) {
            return;
        }
        let mut verdicts = self.engine.verdicts();
        if let Some(fleet) = &self.fleet {
            for (key, up) in &mut verdicts {
                if let Some(f) = fleet.get(key) {
                    *up = *f;
                }
            }
        }
        let fix = verdict_fixes(&verdicts, &self.state);
        self.health_sweep.swept(epoch, now, fix.is_empty());
        if !fix.is_empty() {
            tracing::info!(
                verdicts = fix.len(),
                "applying health verdicts the maps do not hold yet"
            );
            let r = self.state.set_health(&mut self.dp, &fix);
            let _ = self.committed(r.map_err(ControlError::from), Instant::now());
        }
    }

    /// Starts a resolution round for the unresolved reals that are due.
    fn retry_unresolved(&mut self) {
        if self.resolving || self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let reach = self.state.desired().reach();
        let due: BTreeMap<IpAddr, Forward> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .filter_map(|(r, _)| reach.get(r).map(|m| (*r, *m)))
            .collect();
        if due.is_empty() {
            return;
        }
        for real in due.keys() {
            if let Some(p) = self.pending.get_mut(real) {
                let wait = if now - p.since < FAST_RETRIES {
                    TICK
                } else {
                    SLOW_RETRY
                };
                p.next = now + wait;
            }
        }
        self.resolving = true;
        let iface = self.iface.refreshed();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut res = neighbor::resolve_all(&iface, &due, Duration::from_millis(300)).await;
            for err in res.failed.values_mut() {
                if let NeighborError::Unresolved { real, iface, .. } = err {
                    *err = NeighborError::NoAnswer {
                        hop: *real,
                        iface: iface.clone(),
                    };
                }
            }
            let _ = tx.send(Event::Resolved(Box::new(res))).await;
        });
    }

    /// Re-reads every real's MAC (a real whose NIC was replaced, a gateway
    /// that failed over).
    fn refresh_macs(&mut self) {
        if self.resolving {
            return;
        }
        let reach = self.state.desired().reach();
        if reach.is_empty() {
            return;
        }
        self.resolving = true;
        let iface = self.iface.refreshed();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let res = neighbor::resolve_all(&iface, &reach, Duration::ZERO).await;
            let _ = tx.send(Event::Resolved(Box::new(res))).await;
        });
    }

    /// Records why reals of `res` are not resolved (and the hops found).
    fn note_failures(&mut self, res: &Resolution) {
        self.hops.extend(res.hops.iter().map(|(r, h)| (*r, *h)));
        self.watched = None;
        let mut changed = false;
        for (real, err) in &res.failed {
            if let Some(p) = self.pending.get_mut(real) {
                p.reason = err.to_string();
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
    }

    fn resolved(&mut self, res: Resolution) {
        self.note_failures(&res);
        let learnt: BTreeMap<IpAddr, [u8; 6]> = res
            .found
            .into_iter()
            .filter(|(r, mac)| self.state.mac(*r) != Some(*mac))
            .collect();
        self.learn(learnt);
        // The reasons changed even when no MAC did.
        self.publish();
    }

    fn neighbour(&mut self, addr: IpAddr, mac: [u8; 6]) {
        if neighbor::is_group(&mac) {
            return;
        }
        let reach = self.state.desired().reach();
        let learnt: BTreeMap<IpAddr, [u8; 6]> = reach
            .iter()
            .filter(|(real, mode)| {
                let hop = self.hops.get(*real).copied().or(match mode {
                    Forward::Dr => Some(**real),
                    Forward::Tun => None,
                });
                hop == Some(addr)
            })
            .filter(|(real, _)| self.state.mac(**real) != Some(mac))
            .map(|(real, _)| (*real, mac))
            .collect();
        self.learn(learnt);
    }

    fn learn(&mut self, learnt: BTreeMap<IpAddr, [u8; 6]>) {
        if learnt.is_empty() {
            return;
        }
        for (real, mac) in &learnt {
            match self.state.mac(*real) {
                None => tracing::info!(%real, mac = %crate::state::fmt_mac(mac), "real resolved"),
                Some(old) => tracing::info!(
                    %real,
                    old = %crate::state::fmt_mac(&old),
                    mac = %crate::state::fmt_mac(mac),
                    "real's MAC changed"
                ),
            }
        }
        let started = Instant::now();
        let r = self.state.learn_macs(&mut self.dp, &learnt);
        if r.is_ok() {
            self.track_unresolved(&learnt);
        }
        let _ = self.committed(r.map_err(ControlError::from), started);
    }

    fn simulate(&self, vip: &Vip, hash: u32) -> Result<Option<IpAddr>, ControlError> {
        Ok(self.state.real_for(&self.dp, vip, hash)?)
    }
}

/// The share of its weight a real in slow start has after `elapsed` of
/// `total`, in percent: linear, rounded up, at least 1.
pub fn ramp_percent(elapsed: Duration, total: Duration) -> u32 {
    let share = elapsed.as_secs_f64() / total.as_secs_f64().max(f64::EPSILON);
    ((share * 100.0).ceil() as u32).clamp(1, 100)
}

/// Verdicts waiting to be applied ([`VERDICT_WINDOW`]): the last of each
/// real, due a window after the first of them came.
#[derive(Default)]
struct Waiting {
    verdicts: BTreeMap<(Vip, IpAddr), bool>,
    due: Option<tokio::time::Instant>,
}

impl Waiting {
    /// Adds a verdict reached at `now`: it replaces the real's waiting one,
    /// and the first of a window starts it.
    fn add(&mut self, key: (Vip, IpAddr), up: bool, now: tokio::time::Instant) {
        self.verdicts.insert(key, up);
        self.due.get_or_insert(now + VERDICT_WINDOW);
    }

    /// When the waiting verdicts are to be applied (`None`: none wait).
    fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// Every waiting verdict, leaving none (and no window).
    fn take(&mut self) -> BTreeMap<(Vip, IpAddr), bool> {
        self.due = None;
        std::mem::take(&mut self.verdicts)
    }
}

/// What the health convergence reads, as counts: the engine's flips, the
/// controller's changes and the fleet views it took.
type Epoch = (u64, u64, u64);

/// When the health convergence must look at every verdict: when what it
/// reads changed since it last found nothing to fix, and at least every
/// [`FULL_SWEEP`] (a safety net for a path that changes them unseen).
#[derive(Debug, Default)]
struct Sweep {
    clean: Option<(Epoch, Instant)>,
}

impl Sweep {
    fn due(&self, epoch: Epoch, now: Instant) -> bool {
        self.clean
            .is_none_or(|(at, when)| at != epoch || now.duration_since(when) >= FULL_SWEEP)
    }

    /// Records a sweep at `epoch`: `clean` when it found nothing to fix (a
    /// sweep that found something is due again until one finds nothing).
    fn swept(&mut self, epoch: Epoch, now: Instant, clean: bool) {
        self.clean = clean.then_some((epoch, now));
    }
}

/// The verdicts of `verdicts` that differ from the state's, for reals the
/// desired state still has.
fn changed_verdicts(
    verdicts: &BTreeMap<(Vip, IpAddr), bool>,
    state: &State,
) -> Vec<((Vip, IpAddr), bool)> {
    let desired = state.desired();
    verdicts
        .iter()
        .filter(|(key, up)| desired.has_real(&key.0, key.1) && state.healthy(&key.0, key.1) != **up)
        .map(|(key, up)| (*key, *up))
        .collect()
}

/// The verdicts to apply so that `state` holds what the probes say: every
/// probed real whose verdict differs, and every real held down that is no
/// longer probed (its check was removed), back up.
pub fn verdict_fixes(
    probed: &BTreeMap<(Vip, IpAddr), bool>,
    state: &State,
) -> Vec<((Vip, IpAddr), bool)> {
    let mut fix = changed_verdicts(probed, state);
    fix.extend(
        state
            .health()
            .iter()
            .filter(|(key, up)| !**up && !probed.contains_key(key))
            .map(|(key, _)| (*key, true)),
    );
    fix
}

/// Refuses a desired state that could never work on this host: a VIP on one
/// of the host's own addresses (it would take that port from the host), a
/// real that is one of them, a VIP or real on the broadcast address of one of
/// the interface's subnets, a DR real off the interface's segments, a tunnel
/// of a family the balancer has no source address for.
pub fn check_reach(iface: &Iface, desired: &Desired) -> Result<(), NeighborError> {
    let iface = &iface.refreshed();
    let own = neighbor::host_addrs();
    for vip in desired.services.keys() {
        iface.check_not_broadcast(vip.addr, &format!("VIP {vip}"))?;
        if own.contains(&vip.addr) && !iface.local_vips {
            return Err(NeighborError::OwnAddress {
                what: format!("VIP {vip}"),
                addr: vip.addr,
            });
        }
    }
    for (vip, s) in &desired.services {
        if s.options.forward != Forward::Tun {
            continue;
        }
        for real in s.reals.keys() {
            let (v4, family, flag) = match real {
                IpAddr::V4(_) => (0, "IPv4", ""),
                IpAddr::V6(_) => (1, "IPv6", "6"),
            };
            if !iface.tunnel_sources[v4] {
                return Err(NeighborError::NoTunnelSource {
                    vip: vip.to_string(),
                    real: *real,
                    family,
                    flag,
                    iface: iface.name.clone(),
                });
            }
        }
    }
    for (real, mode) in desired.reach() {
        iface.check_not_broadcast(real, &format!("real {real}"))?;
        if own.contains(&real) {
            return Err(NeighborError::OwnAddress {
                what: format!("real {real}"),
                addr: real,
            });
        }
        if mode == Forward::Dr {
            iface.check_on_link(real)?;
        }
    }
    Ok(())
}

/// Refuses what `desired` could never do on this host, as every way in
/// (the API, `xlb apply`, a reload, the start with `--config`, a change
/// written to the store) must: [`check_reach`], then [`check_routes`] for the
/// reals it adds to `current`.
pub async fn check_host(
    iface: &Iface,
    desired: &Desired,
    current: &Desired,
) -> Result<(), NeighborError> {
    check_reach(iface, desired)?;
    check_routes(iface, desired, current).await
}

/// Refuses a TUN real that `desired` adds to `current` when the kernel's
/// route to it leaves through another interface than the balancer's: the
/// balancer could not send the packets the kernel would. Only reals being
/// added are looked up: a real whose route moves later stays in its service,
/// unresolved with that reason, until the route comes back. A real with no
/// route at all is not refused either: it waits, unresolved, for one.
async fn check_routes(
    iface: &Iface,
    desired: &Desired,
    current: &Desired,
) -> Result<(), NeighborError> {
    let known = current.reach();
    for (real, mode) in desired.reach() {
        if mode != Forward::Tun || known.get(&real) == Some(&Forward::Tun) {
            continue;
        }
        if let Err(err @ NeighborError::OtherIface { .. }) = neighbor::next_hop(iface, real).await {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthCheck;
    use crate::state::writer::fake::FakeMaps;

    #[test]
    fn the_health_sweep_runs_again_only_after_a_change_or_a_full_interval() {
        let t0 = Instant::now();
        let mut sweep = Sweep::default();
        assert!(sweep.due((0, 0, 0), t0), "the first sweep");
        sweep.swept((0, 0, 0), t0, true);
        let soon = t0 + TICK;
        assert!(!sweep.due((0, 0, 0), soon), "nothing changed");
        assert!(sweep.due((1, 0, 0), soon), "a flip");
        assert!(sweep.due((0, 1, 0), soon), "a change");
        assert!(sweep.due((0, 0, 1), soon), "a fleet view");
        assert!(!sweep.due((0, 0, 0), t0 + FULL_SWEEP - TICK));
        assert!(sweep.due((0, 0, 0), t0 + FULL_SWEEP), "the safety net");
        // A sweep that found something to fix is due again, changed or not.
        sweep.swept((2, 0, 0), soon, false);
        assert!(sweep.due((2, 0, 0), soon + TICK));
        sweep.swept((2, 1, 0), soon + TICK, true);
        assert!(!sweep.due((2, 1, 0), soon + 2 * TICK));
    }

    #[test]
    fn a_tunnel_with_no_source_address_of_its_family_is_refused() {
        let iface = Iface {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            nets: vec![("198.51.100.1".parse().expect("addr"), 24)],
            tunnel_sources: [true, false],
            local_vips: false,
        };
        let vip: Vip = "[2001:db8:203::10]:80/tcp".parse().expect("VIP");
        let mut spec = Spec::default();
        spec.apply(Edit::AddVip {
            vip,
            options: VipOptions {
                forward: Forward::Tun,
                ..VipOptions::default()
            },
            health: None,
        })
        .expect("vip");
        spec.apply(Edit::AddReal {
            vip,
            real: "2001:db8:100::11".parse().expect("addr"),
            weight: 1,
        })
        .expect("real");
        let err = check_reach(&iface, &spec.effective())
            .expect_err("no IPv6 source")
            .to_string();
        assert!(
            err.contains("no IPv6 address to send tunnels from") && err.contains("--tunnel-src6"),
            "{err}"
        );
        let iface = Iface {
            tunnel_sources: [true, true],
            ..iface
        };
        check_reach(&iface, &spec.effective()).expect("with a source");
    }

    #[test]
    fn the_snapshot_sees_the_effective_state_after_an_edit_and_a_verdict() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        let mut state = crate::state::tests::with_reals(0.0, vip, &[11, 12]);
        let mut maps = FakeMaps::default();
        let pending = BTreeMap::new();
        let weight = |snap: &Snapshot, l: u8| snap.desired().services[&vip].reals[&ip(l)].weight;
        let first = Snapshot::of(&state, &pending, &Snapshot::default());
        assert_eq!(weight(&first, 11), 1);
        // An override is in the effective state, not in the base.
        let set = Edit::SetReal {
            vip,
            real: ip(11),
            weight: Some(5),
            admin: None,
        };
        state
            .edit(&mut maps, set, &BTreeMap::new(), PauseHook::default())
            .expect("override");
        let edited = Snapshot::of(&state, &pending, &first);
        assert_eq!(weight(&edited, 11), 5, "the override applies");
        assert_eq!(edited.desired(), &*state.desired());
        assert_eq!(weight(&first, 11), 1, "an older snapshot keeps its state");
        // A verdict keeps the spec: the same effective state, the real down.
        state
            .set_health(&mut maps, &[((vip, ip(12)), false)])
            .expect("down");
        let verdict = Snapshot::of(&state, &pending, &edited);
        assert!(Arc::ptr_eq(&verdict.spec, &edited.spec));
        assert_eq!(verdict.desired(), edited.desired());
        let healthy = |snap: &Snapshot, l: u8| {
            snap.vips[0]
                .reals
                .iter()
                .find(|r| r.addr == ip(l))
                .map(|r| r.healthy)
        };
        assert_eq!(healthy(&verdict, 12), Some(false));
        assert_eq!(healthy(&edited, 12), Some(true));
        // With the override gone the base is the effective state again.
        let reset = Edit::ResetOverride { vip, real: ip(11) };
        state
            .edit(&mut maps, reset, &BTreeMap::new(), PauseHook::default())
            .expect("reset");
        let reset = Snapshot::of(&state, &pending, &verdict);
        assert_eq!(weight(&reset, 11), 1);
        assert_eq!(reset.desired(), &reset.spec.base);
    }

    #[test]
    fn the_probe_list_is_made_again_when_a_check_comes_or_goes_not_at_a_verdict() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        let mut state = crate::state::tests::with_reals(0.0, vip, &[11, 12]);
        let mut maps = FakeMaps::default();
        let mut list = ProbeList::default();
        assert_eq!(list.changed(&state.spec_shared()), Some(BTreeMap::new()));
        assert_eq!(list.changed(&state.spec_shared()), None, "the same spec");
        let check = |health| Edit::SetVip {
            vip,
            scheduler: None,
            table_size: None,
            health: Some(health),
        };
        state
            .edit(
                &mut maps,
                check(HealthCheck::default()),
                &BTreeMap::new(),
                PauseHook::default(),
            )
            .expect("a check");
        let probed = list.changed(&state.spec_shared()).expect("a new spec");
        assert_eq!(
            probed.keys().copied().collect::<Vec<_>>(),
            [(vip, ip(11)), (vip, ip(12))]
        );
        // Verdicts and MACs keep the spec, and so the list.
        state
            .set_health(&mut maps, &[((vip, ip(12)), false)])
            .expect("down");
        state
            .learn_macs(&mut maps, &BTreeMap::from([(ip(11), [2, 0, 0, 0, 0, 99])]))
            .expect("a MAC");
        assert_eq!(list.changed(&state.spec_shared()), None);
        let none = HealthCheck {
            kind: ProbeKind::None,
            ..HealthCheck::default()
        };
        state
            .edit(
                &mut maps,
                check(none),
                &BTreeMap::new(),
                PauseHook::default(),
            )
            .expect("no check");
        assert_eq!(list.changed(&state.spec_shared()), Some(BTreeMap::new()));
    }

    #[test]
    fn verdicts_wait_one_window_from_the_first_and_the_last_of_a_real_wins() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        let t0 = tokio::time::Instant::now();
        let mut waiting = Waiting::default();
        assert_eq!(waiting.due(), None);
        waiting.add((vip, ip(11)), false, t0);
        waiting.add((vip, ip(12)), false, t0 + Duration::from_millis(5));
        waiting.add((vip, ip(11)), true, t0 + Duration::from_millis(15));
        assert_eq!(
            waiting.due(),
            Some(t0 + VERDICT_WINDOW),
            "a later verdict does not push the window out"
        );
        assert_eq!(
            waiting.take(),
            BTreeMap::from([((vip, ip(11)), true), ((vip, ip(12)), false)])
        );
        assert_eq!(waiting.due(), None);
        assert!(waiting.take().is_empty());
        // The next verdict opens a new window.
        let t1 = t0 + Duration::from_millis(30);
        waiting.add((vip, ip(13)), false, t1);
        assert_eq!(waiting.due(), Some(t1 + VERDICT_WINDOW));
    }

    #[test]
    fn only_verdicts_that_differ_from_the_state_are_applied() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        // Applied: only the reals whose verdict differs from the state's.
        let mut state = crate::state::tests::with_reals(0.0, vip, &[11, 12, 13]);
        let mut maps = FakeMaps::default();
        state
            .set_health(&mut maps, &[((vip, ip(13)), false)])
            .expect("down");
        let taken = BTreeMap::from([
            ((vip, ip(11)), false),
            ((vip, ip(12)), true),
            ((vip, ip(13)), false),
            ((vip, ip(99)), false),
        ]);
        assert_eq!(
            changed_verdicts(&taken, &state),
            [((vip, ip(11)), false)],
            "12 is up already, 13 down already, 99 no real of the VIP"
        );
    }

    #[test]
    fn verdicts_converge_and_unprobed_reals_come_back() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        let mut state = crate::state::tests::with_reals(0.0, vip, &[11, 12, 13]);
        let mut maps = FakeMaps::default();
        // 12 was held down, then its check was removed (not probed any more);
        // 11 is probed down but the verdict never reached the state.
        state
            .set_health(&mut maps, &[((vip, ip(12)), false)])
            .expect("down");
        let probed = BTreeMap::from([((vip, ip(11)), false), ((vip, ip(13)), true)]);
        let fix = verdict_fixes(&probed, &state);
        assert_eq!(fix, [((vip, ip(11)), false), ((vip, ip(12)), true)]);
        state.set_health(&mut maps, &fix).expect("fix");
        assert!(verdict_fixes(&probed, &state).is_empty(), "converged");
        assert!(state.healthy(&vip, ip(12)) && !state.healthy(&vip, ip(11)));
    }
}
