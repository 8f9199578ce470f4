//! The probe scheduler: one task drives every probe of every (VIP, real)
//! pair, no task per real. Probes are due on a timer (a wheel of deadlines:
//! the next probe of a real is scheduled when its previous one ends), start
//! when due, and run concurrently, at most [`MAX_IN_FLIGHT`] at once; each is
//! bounded by its check's timeout, so a slow or black-holed real only delays
//! its own next probe. Results go through rise/fall hysteresis; flips are
//! reported to the daemon's controller, which applies them through the
//! reconcile step, and run the check's notify hooks.
//!
//! The deadlines are in timer wheels of [`TICK`] ticks ([`Wheel`]), and
//! the task sleeps on one tokio timer, re-armed only when the earliest tick
//! changes: every probe due in the same tick starts in the same turn, and the
//! SYNs of its half-open probes go out together.
//! Half-open probes (`mode: syn`) are not futures: the scheduler sends their
//! SYN itself and keeps them in a table by connection, with their timeouts
//! in a second wheel; the answer reader hands it the answers in batches. A real's
//! status is its own (shared with the [`Board`], which finds it by key
//! only when it is read), so a probe's result takes no lock but its own.
//!
//! Reals start healthy (`start: up`, the default): a freshly started daemon
//! never empties a service while the first probes run. With `start: down`
//! a real new to the state starts down and comes in after `rise` passing
//! probes; so does a real the adopted state already holds down. The
//! avalanche guard (in `state`) decides whether a verdict may actually take
//! a real out.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque, hash_map},
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use std::sync::MutexGuard;

use foldhash::HashMap;
use futures::{StreamExt as _, stream::FuturesUnordered};
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};

use super::{
    HealthCheck, Planned, ProbeKind, Start, TcpMode, Via, command,
    path::{self, Answer, Flow, Paths, Reply, SynBuf, SynOut, SynSent},
    probe::{Prober, Target},
    wheel::{Round, Wheel},
};
use crate::model::{Forward, Vip};

/// The tick of the scheduler's timer wheels: it wakes at most once per tick
/// for deadlines (answers wake it too), starting every probe due in the tick
/// (up to a tick early) and sending their SYNs together; a timeout ends at
/// the first tick boundary after it (up to a tick late, never early).
pub const TICK: Duration = Duration::from_millis(5);

/// Probes running at once, at most. Due probes beyond it wait for a free
/// place (their real is probed late, never skipped).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Buckets of `xlb_probe_duration_seconds`.
const DURATION_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What the engine knows of one real's health.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeStatus {
    /// The current verdict.
    pub up: bool,
    /// Consecutive successes.
    pub successes: u32,
    /// Consecutive failures.
    pub failures: u32,
    /// The last failure, e.g. "connection refused", "HTTP 503", "timeout".
    pub last_error: Option<String>,
    /// Seconds since the epoch of the last flip.
    pub since: u64,
    /// Probes run.
    pub probes: u64,
    /// Verdict changes (up to down and down to up) since probing began.
    #[serde(default)]
    pub flaps: u64,
}

/// The outcome of one probe step under rise/fall hysteresis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flip {
    /// No change of verdict.
    None,
    /// The real just went down (fall failures in a row).
    Down,
    /// The real just came back (rise successes in a row).
    Up,
}

impl Default for ProbeStatus {
    /// A status that starts healthy.
    fn default() -> Self {
        Self {
            up: true,
            successes: 0,
            failures: 0,
            last_error: None,
            since: now_secs(),
            probes: 0,
            flaps: 0,
        }
    }
}

impl ProbeStatus {
    /// A status that starts healthy.
    pub fn new() -> Self {
        Self::default()
    }

    /// A status that starts down: a real the state (e.g. the state file a
    /// restarted daemon adopted) already holds out of its table, or a new
    /// real of a check with `start: down`. It comes back after `rise`
    /// successes, like any real that went down.
    pub fn down(reason: &str) -> Self {
        Self {
            up: false,
            last_error: Some(reason.to_owned()),
            ..Self::default()
        }
    }

    /// Applies one probe result; returns the flip it causes, if any.
    pub fn record(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> Flip {
        self.probes += 1;
        match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                if !self.up && self.successes >= rise {
                    self.up = true;
                    self.since = now_secs();
                    self.flaps += 1;
                    return Flip::Up;
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_error = Some(e);
                if self.up && self.failures >= fall {
                    self.up = false;
                    self.since = now_secs();
                    self.flaps += 1;
                    return Flip::Down;
                }
            }
        }
        Flip::None
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wait before the next probe: `interval` spread by ±`jitter_percent`.
pub fn jittered(interval: Duration, jitter_percent: u32) -> Duration {
    let spread = interval.as_secs_f64() * f64::from(jitter_percent.min(50)) / 100.0;
    let offset = rand::rng().random_range(-spread..=spread);
    Duration::from_secs_f64((interval.as_secs_f64() + offset).max(0.001))
}

/// A probed real: (VIP, real).
pub type Key = (Vip, IpAddr);

/// Where verdict flips go (the daemon's controller).
pub type Report = Arc<dyn Fn(Vip, IpAddr, bool) + Send + Sync>;

/// One probe, boxed.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Starts one probe of a real.
pub type ProbeFn = Arc<dyn Fn() -> ProbeFuture + Send + Sync>;

/// The labels of a real's probe-duration series.
type Labels = Vec<(String, String)>;

/// One real's probe durations: a histogram of [`DURATION_BUCKETS`] (and
/// +Inf) kept next to its status, under the lock its probe's result takes
/// anyway (a `prometheus_client` histogram per real, its own allocation
/// behind its own lock and cold in the cache, was a tenth of the daemon's
/// time at 5,000 probes/s).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ProbeDurations {
    sum: f64,
    count: u64,
    /// Observations per bucket (not cumulative), the last one +Inf.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
}

impl ProbeDurations {
    fn observe(&mut self, seconds: f64) {
        self.sum += seconds;
        self.count += 1;
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|upper| seconds <= *upper)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket] += 1;
    }
}

/// `xlb_probe_duration_seconds`: each probed real's durations, labelled
/// with its VIP (`address`, `port`, `protocol`) and `real`, as of when
/// [`Board::durations`] was called.
#[derive(Debug)]
pub struct Durations(Vec<(Labels, ProbeDurations)>);

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); DURATION_BUCKETS.len() + 1];
        for (labels, d) in &self.0 {
            for (i, (upper, n)) in buckets.iter_mut().enumerate() {
                *upper = DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
                *n = d.buckets[i];
            }
            encoder
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(d.sum, d.count, &buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn duration_labels((vip, real): &Key) -> Labels {
    [
        ("address", vip.addr.to_string()),
        ("port", vip.port.to_string()),
        ("protocol", vip.proto.to_string()),
        ("real", real.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// What the scheduler records of one real.
#[derive(Debug, Default)]
struct Probed {
    status: ProbeStatus,
    durations: ProbeDurations,
}

impl Probed {
    fn shared(status: ProbeStatus) -> Shared {
        Arc::new(Mutex::new(Self {
            status,
            durations: ProbeDurations::default(),
        }))
    }
}

/// One real's status and probe durations, shared by the scheduler (which
/// writes them) and the [`Board`] (which reads them).
type Shared = Arc<Mutex<Probed>>;

/// Locks one real's [`Probed`] (its status and probe durations); a poisoned
/// lock still holds the last values written.
fn lock_probed(probed: &Shared) -> MutexGuard<'_, Probed> {
    probed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the scheduler knows, readable by anyone (status, metrics) without
/// asking the engine's owner.
#[derive(Clone, Default)]
pub struct Board {
    status: Arc<Mutex<BTreeMap<Key, Shared>>>,
    flips: Arc<AtomicU64>,
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, Shared>> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status of every probed real.
    pub fn statuses(&self) -> BTreeMap<Key, ProbeStatus> {
        self.lock()
            .iter()
            .map(|(k, s)| (*k, lock_probed(s).status.clone()))
            .collect()
    }

    /// Number of verdict flips since start.
    pub fn flips(&self) -> u64 {
        self.flips.load(Ordering::Relaxed)
    }

    /// Probe durations by VIP and real, as they are now.
    pub fn durations(&self) -> Durations {
        Durations(
            self.lock()
                .iter()
                .map(|(k, s)| (duration_labels(k), lock_probed(s).durations))
                .collect(),
        )
    }
}

/// How a real is probed.
enum Probe {
    /// By the future the function starts.
    Run(ProbeFn),
    /// Half-open (`mode: syn`): a SYN to this address and port, sent and
    /// matched with its answer by the scheduler itself.
    Syn(SocketAddr),
}

/// Sends the SYNs of half-open probes: the raw sockets of [`Paths`] (a fake
/// in tests).
pub trait SynSend: Send + Sync {
    /// The balancer's address toward `real` (asked once, and again after a
    /// probe that got no answer).
    fn source(&self, real: IpAddr) -> Result<IpAddr, String>;
    /// Sends `syns` (the SYNs due in one wake-up), built in `buf`, and puts
    /// the result of each, in order, in `results`.
    fn send(&self, syns: &[SynOut], buf: &mut SynBuf, results: &mut Vec<SynSent>);
}

impl SynSend for Paths {
    fn source(&self, real: IpAddr) -> Result<IpAddr, String> {
        self.syn_ready()?;
        path::source_toward(real)
    }

    fn send(&self, syns: &[SynOut], buf: &mut SynBuf, results: &mut Vec<SynSent>) {
        self.send_syns(syns, buf, results);
    }
}

/// The half-open side of the scheduler: what sends the SYNs, and the
/// batches of answers.
struct Syn {
    sender: Arc<dyn SynSend>,
    replies: mpsc::UnboundedReceiver<Vec<Reply>>,
}

/// What the engine tells its scheduler.
enum Command {
    /// Probe `key` (again, from scratch) with `probe` under `check`'s timing;
    /// a probe that takes longer than the timeout fails with `expired`.
    Start {
        key: Key,
        check: Box<HealthCheck>,
        probe: Probe,
        expired: String,
    },
    /// Stop probing `key`.
    Stop(Key),
}

/// Owns the probe scheduler; owned by the daemon's controller.
pub struct Engine {
    running: BTreeMap<Key, (HealthCheck, Forward)>,
    /// Probes through the forwarding path (`via: vip`), when the daemon has them.
    paths: Option<Arc<Paths>>,
    board: Board,
    tx: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Engine {
    /// An engine with no checks that reports flips to `report` (and runs
    /// the checks' notify hooks), its `via: vip` probes sent by `paths`.
    /// Needs a tokio runtime.
    pub fn new(report: Report, paths: Option<Arc<Paths>>) -> Self {
        let board = Board::default();
        let flips = board.flips.clone();
        let on_flip: OnFlip = Arc::new(
            move |(vip, real): Key, check: &HealthCheck, st: &ProbeStatus| {
                let error = st.last_error.clone().unwrap_or_default();
                if st.up {
                    tracing::info!(%vip, %real, "health: real is up again");
                } else {
                    tracing::warn!(%vip, %real, %error, "health: real is down");
                }
                flips.fetch_add(1, Ordering::Relaxed);
                report(vip, real, st.up);
                notify(vip, real, check, st.up, error);
            },
        );
        let syn = paths.as_ref().map(|p| Syn {
            sender: p.clone(),
            replies: p.subscribe(),
        });
        let mut engine = Self::with_hook(board, on_flip, syn);
        engine.paths = paths;
        engine
    }

    fn with_hook(board: Board, on_flip: OnFlip, syn: Option<Syn>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(Scheduler::new(board.clone(), on_flip, syn).run(rx));
        Self {
            running: BTreeMap::new(),
            paths: None,
            board,
            tx,
            task,
        }
    }

    /// A handle on the probe statuses.
    pub fn board(&self) -> Board {
        self.board.clone()
    }

    /// Stops every probe.
    pub fn stop(&mut self) {
        self.running.clear();
        self.task.abort();
    }

    /// The verdict of every real being probed (reals probed for less than
    /// one probe have the verdict they started with).
    pub fn verdicts(&self) -> BTreeMap<Key, bool> {
        let status = self.board.lock();
        self.running
            .keys()
            .map(|k| (*k, status.get(k).is_none_or(|s| lock_probed(s).status.up)))
            .collect()
    }

    /// Starts, restarts or stops probes so that exactly the reals of
    /// `wanted` are probed, each with its check, port and forwarding mode
    /// (a change of any restarts its probes). A real in `down`
    /// (a verdict the state already holds, e.g. adopted from a previous
    /// daemon) or new under `start: down` starts from a down verdict, so it
    /// comes in after `rise` passing probes.
    pub fn sync(&mut self, wanted: BTreeMap<Key, Planned>, down: &BTreeSet<Key>) {
        let stale: Vec<Key> = self
            .running
            .iter()
            .filter(|(k, (c, f))| {
                wanted
                    .get(k)
                    .is_none_or(|w| w.check != *c || w.forward != *f)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.running.remove(&k);
            let _ = self.tx.send(Command::Stop(k));
            if !wanted.contains_key(&k) {
                self.board.lock().remove(&k);
            }
        }
        for (k, planned) in wanted {
            let Planned {
                check,
                port,
                forward,
            } = planned;
            if self.running.contains_key(&k) {
                continue;
            }
            if down.contains(&k) {
                let reason = match check.start {
                    Start::Down => "start: down, not proven up yet",
                    Start::Up => "down when the daemon started",
                };
                self.board
                    .lock()
                    .entry(k)
                    .or_insert_with(|| Probed::shared(ProbeStatus::down(reason)));
            }
            let timeout = Duration::from_millis(check.timeout_ms);
            let (probe, expired): (Probe, String) = match check.via {
                Via::Real if check.kind == ProbeKind::Tcp && check.mode == TcpMode::Syn => {
                    let expired = format!(
                        "timeout after {} ms (no answer to the SYN)",
                        timeout.as_millis()
                    );
                    (Probe::Syn(SocketAddr::new(k.1, port)), expired)
                }
                Via::Real => {
                    let prober = Arc::new(Prober::new(check.clone()));
                    let target = Target {
                        vip: k.0,
                        addr: SocketAddr::new(k.1, port),
                    };
                    let probe: ProbeFn = Arc::new(move || {
                        let prober = prober.clone();
                        Box::pin(async move { prober.run(&target).await })
                    });
                    (Probe::Run(probe), timed_out(timeout))
                }
                Via::Vip => {
                    let paths = self.paths.clone();
                    let (vip, real) = k;
                    let probe: ProbeFn = Arc::new(move || {
                        let paths = paths.clone();
                        Box::pin(async move {
                            match paths {
                                Some(p) => p.probe(vip, real, port, forward).await,
                                None => Err("via: vip probes are not available here".to_owned()),
                            }
                        })
                    });
                    let to = SocketAddr::new(vip.addr, port);
                    (
                        Probe::Run(probe),
                        path::timeout_reason(forward, real, to, timeout),
                    )
                }
            };
            let _ = self.tx.send(Command::Start {
                key: k,
                check: Box::new(check.clone()),
                probe,
                expired,
            });
            self.running.insert(k, (check, forward));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the notify hook of a flip, if the check has one, in a task of its own.
fn notify(vip: Vip, real: IpAddr, check: &HealthCheck, up: bool, error: String) {
    let argv = if up {
        &check.notify_up
    } else {
        &check.notify_down
    };
    if argv.is_empty() {
        return;
    }
    let argv = argv.clone();
    let limit = Duration::from_millis(check.notify_timeout_ms);
    let port = check.port.unwrap_or(vip.port);
    tokio::spawn(async move {
        let mut env = Target {
            vip,
            addr: SocketAddr::new(real, port),
        }
        .env();
        env.push(("XLB_STATE", if up { "up" } else { "down" }.to_owned()));
        env.push(("XLB_REASON", if up { String::new() } else { error }));
        if let Err(err) = command::run(&argv, &env, Some(limit)).await {
            tracing::warn!(%vip, %real, program = %argv[0], %err, "health: notify command failed");
        }
    });
}

/// Called with each flip: the key, its check and its new status.
type OnFlip = Arc<dyn Fn(Key, &HealthCheck, &ProbeStatus) + Send + Sync>;

/// What a probe that outlives its timeout fails with (probes via the real).
fn timed_out(timeout: Duration) -> String {
    format!("timeout after {} ms", timeout.as_millis())
}

/// A real under probing.
struct Entry {
    key: Key,
    check: HealthCheck,
    probe: Probe,
    /// The failure of a probe that outlives the timeout.
    expired: String,
    /// Bumped at each (re)start: results and deadlines of an older
    /// generation are ignored.
    generation: u64,
    /// Its status and probe durations, on the board from its first probe on
    /// (`None` before).
    status: Option<Shared>,
    /// The balancer's address toward the real (`mode: syn`), as the routes
    /// picked it; forgotten after a probe that got no answer, so a changed
    /// route is followed.
    source: Option<IpAddr>,
    /// The half-open probe waiting for its answer: its connection and number.
    awaiting: Option<(Flow, u64)>,
}

/// A half-open probe waiting for its answer.
struct HalfOpen {
    /// Its real's place in [`Scheduler::entries`].
    slot: usize,
    /// Its number (see [`Entry::awaiting`]).
    probe: u64,
    /// The acknowledgement number its answer carries: the SYN's sequence + 1.
    ack: u32,
    started: Instant,
}

/// A probe that ended: its real's place, generation, result and duration.
type Done = (usize, u64, Result<(), String>, Duration);

/// Why a SYN answered by a RST fails.
const REFUSED: &str = "connection refused: the SYN was answered by a RST";

/// The one task that runs every probe.
struct Scheduler {
    board: Board,
    on_flip: OnFlip,
    syn: Option<Syn>,
    /// The reals, by place (a free place is `None`, listed in `free`).
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// The place of each real.
    slots: HashMap<Key, usize>,
    /// Next probes: (place, generation).
    due: Wheel<(usize, u64)>,
    /// Probes due that wait for room to start, earliest first.
    ready: VecDeque<(usize, u64)>,
    /// Timeouts of half-open probes: (place, probe number).
    expiry: Wheel<(usize, u64)>,
    /// What came out of a wheel (reused).
    swept: Vec<(usize, u64)>,
    /// Half-open probes waiting for their answer, by connection (looked up
    /// two or three times a probe: foldhash, not SipHash).
    half_open: HashMap<Flow, HalfOpen>,
    in_flight: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    generations: u64,
    probes: u64,
    /// The SYNs of this wake-up, sent together at its end, and their reals' places.
    outbox: Vec<SynOut>,
    outbox_slots: Vec<usize>,
    /// Where SYNs are built, and what sending them gave (reused).
    buf: SynBuf,
    sent: Vec<SynSent>,
}

impl Scheduler {
    fn new(board: Board, on_flip: OnFlip, syn: Option<Syn>) -> Self {
        Self {
            board,
            on_flip,
            syn,
            entries: Vec::new(),
            free: Vec::new(),
            slots: HashMap::default(),
            due: Wheel::new(Instant::now(), TICK),
            ready: VecDeque::new(),
            expiry: Wheel::new(Instant::now(), TICK),
            swept: Vec::new(),
            half_open: HashMap::default(),
            in_flight: FuturesUnordered::new(),
            generations: 0,
            probes: 0,
            outbox: Vec::new(),
            outbox_slots: Vec::new(),
            buf: SynBuf::default(),
            sent: Vec::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed = None;
        loop {
            let now = Instant::now();
            self.expire(now);
            self.start_due(now);
            let next = self.next_wake();
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed = next;
            }
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => self.finished(done),
                Some(replies) = replies(&mut self.syn) => self.answered(&replies),
                () = &mut timer, if armed.is_some() => armed = None,
            }
        }
    }

    /// Probes running: futures and half-open probes.
    fn running(&self) -> usize {
        self.in_flight.len() + self.half_open.len()
    }

    /// When the task must wake next: the earliest timeout, or the earliest
    /// next probe if there is room to start it.
    fn next_wake(&self) -> Option<Instant> {
        let due = self
            .due
            .next_deadline()
            .filter(|_| self.running() < MAX_IN_FLIGHT);
        let expiry = self.expiry.next_deadline();
        match (due, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start {
                key,
                check,
                probe,
                expired,
            } => {
                if let Some(slot) = self.slots.remove(&key) {
                    self.remove(slot);
                }
                self.generations += 1;
                let generation = self.generations;
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.entries.push(None);
                    self.entries.len() - 1
                });
                // Spread the first probes of many reals over one interval.
                let interval = Duration::from_millis(check.interval_ms);
                let first = rand::rng().random_range(0.0..=interval.as_secs_f64());
                self.due.insert(
                    Instant::now() + Duration::from_secs_f64(first),
                    Round::Down,
                    (slot, generation),
                );
                self.entries[slot] = Some(Entry {
                    key,
                    check: *check,
                    probe,
                    expired,
                    generation,
                    status: None,
                    source: None,
                    awaiting: None,
                });
                self.slots.insert(key, slot);
            }
            Command::Stop(key) => {
                if let Some(slot) = self.slots.remove(&key) {
                    self.remove(slot);
                }
            }
        }
    }

    /// Forgets the real at `slot` and its half-open probe.
    fn remove(&mut self, slot: usize) {
        if let Some(e) = self.entries.get_mut(slot).and_then(Option::take) {
            if let Some((flow, _)) = e.awaiting {
                self.half_open.remove(&flow);
            }
            self.free.push(slot);
        }
    }

    /// Starts every probe that is due by `now`, while there is room; the
    /// SYNs of half-open probes go out together at the end.
    fn start_due(&mut self, now: Instant) {
        self.due.expire(now, &mut self.swept);
        self.ready.extend(self.swept.drain(..));
        while self.running() < MAX_IN_FLIGHT {
            let Some((slot, generation)) = self.ready.pop_front() else {
                break;
            };
            let Some(e) = self
                .entries
                .get_mut(slot)
                .and_then(Option::as_mut)
                .filter(|e| e.generation == generation)
            else {
                continue;
            };
            if e.status.is_none() {
                let status = self
                    .board
                    .lock()
                    .entry(e.key)
                    .or_insert_with(|| Probed::shared(ProbeStatus::new()))
                    .clone();
                e.status = Some(status);
            }
            match &e.probe {
                Probe::Run(probe) => {
                    let timeout = Duration::from_millis(e.check.timeout_ms);
                    let probe = probe();
                    let expired = e.expired.clone();
                    self.in_flight.push(Box::pin(async move {
                        let started = Instant::now();
                        let result = match tokio::time::timeout(timeout, probe).await {
                            Ok(r) => r,
                            Err(_) => Err(expired),
                        };
                        (slot, generation, result, started.elapsed())
                    }));
                }
                Probe::Syn(to) => {
                    let to = *to;
                    if let Err(err) = self.queue_syn(slot, to, now) {
                        self.record(slot, Err(err), Duration::ZERO, now);
                    }
                }
            }
        }
        self.send_syns(now);
    }

    /// Puts the SYN of a half-open probe of the real at `slot` (to `to`) in
    /// the outbox, and waits for its answer in [`Self::half_open`].
    fn queue_syn(&mut self, slot: usize, to: SocketAddr, now: Instant) -> Result<(), String> {
        let Some(syn) = &self.syn else {
            return Err("mode: syn probes are not available here".to_owned());
        };
        let Some(e) = self.entries.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let source = match e.source {
            Some(source) => source,
            None => *e.source.insert(syn.sender.source(to.ip())?),
        };
        let mut rng = rand::rng();
        let from = loop {
            let from = SocketAddr::new(source, rng.random_range(1024..=u16::MAX));
            if !self.half_open.contains_key(&(from, to)) {
                break from;
            }
        };
        let isn: u32 = rng.random();
        self.outbox.push(SynOut { from, to, isn });
        self.outbox_slots.push(slot);
        self.probes += 1;
        let probe = self.probes;
        e.awaiting = Some(((from, to), probe));
        let timeout = Duration::from_millis(e.check.timeout_ms);
        self.expiry.insert(now + timeout, Round::Up, (slot, probe));
        self.half_open.insert(
            (from, to),
            HalfOpen {
                slot,
                probe,
                ack: isn.wrapping_add(1),
                started: now,
            },
        );
        Ok(())
    }

    /// Sends the SYNs in the outbox; a probe whose SYN could not go fails
    /// with the reason, one whose SYN found the interface's queue full (a
    /// burst after the daemon was held off the CPU) is due again at the next
    /// tick.
    fn send_syns(&mut self, now: Instant) {
        let Some(syn) = &self.syn else { return };
        if self.outbox.is_empty() {
            return;
        }
        syn.sender.send(&self.outbox, &mut self.buf, &mut self.sent);
        let mut sent = std::mem::take(&mut self.sent);
        for (i, result) in sent.drain(..).enumerate() {
            if result == SynSent::Sent {
                continue;
            }
            let (flow, slot) = (
                (self.outbox[i].from, self.outbox[i].to),
                self.outbox_slots[i],
            );
            self.half_open.remove(&flow);
            let Some(e) = self.entries.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            e.awaiting = None;
            match result {
                SynSent::Failed(err) => {
                    e.source = None;
                    self.record(slot, Err(err), Duration::ZERO, now);
                }
                // Its tick's burst filled the interface's queue: again at the next tick.
                _ => self
                    .due
                    .insert(now + TICK, Round::Down, (slot, e.generation)),
            }
        }
        self.sent = sent;
        self.outbox.clear();
        self.outbox_slots.clear();
    }

    /// Fails every half-open probe whose timeout has passed by `now`.
    fn expire(&mut self, now: Instant) {
        let mut swept = std::mem::take(&mut self.swept);
        self.expiry.expire(now, &mut swept);
        for (slot, probe) in swept.drain(..) {
            let Some(e) = self.entries.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let Some((flow, _)) = e.awaiting.filter(|(_, p)| *p == probe) else {
                // Answered already, or a newer probe.
                continue;
            };
            e.awaiting = None;
            e.source = None;
            let expired = e.expired.clone();
            let started = self.half_open.remove(&flow).map_or(now, |h| h.started);
            self.record(slot, Err(expired), now - started, now);
        }
        self.swept = swept;
    }

    /// Hands answers to the half-open probes that wait for them.
    fn answered(&mut self, replies: &[Reply]) {
        let now = Instant::now();
        for reply in replies {
            // A stray answer (another ack) leaves the probe waiting.
            let h = match self.half_open.entry(reply.flow) {
                hash_map::Entry::Occupied(o) if o.get().ack == reply.ack => o.remove(),
                _ => continue,
            };
            let Some(e) = self.entries.get_mut(h.slot).and_then(Option::as_mut) else {
                continue;
            };
            if e.awaiting.is_none_or(|(_, p)| p != h.probe) {
                continue;
            }
            e.awaiting = None;
            let result = match reply.answer {
                Answer::Accepted => Ok(()),
                Answer::Refused => Err(REFUSED.to_owned()),
            };
            self.record(h.slot, result, now - h.started, now);
        }
    }

    /// Records the result of a probe that ran as a future.
    fn finished(&mut self, (slot, generation, result, took): Done) {
        let current = self
            .entries
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.generation == generation);
        if current {
            self.record(slot, result, took, Instant::now());
        }
    }

    /// Records a probe's result and schedules the real's next probe.
    fn record(&mut self, slot: usize, result: Result<(), String>, took: Duration, now: Instant) {
        let Some(e) = self.entries.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let Some(status) = &e.status else { return };
        let flipped = {
            let mut real = lock_probed(status);
            real.durations.observe(took.as_secs_f64());
            let flip = real.status.record(result, e.check.rise, e.check.fall);
            (flip != Flip::None).then(|| real.status.clone())
        };
        if let Some(st) = flipped {
            (self.on_flip)(e.key, &e.check, &st);
        }
        let wait = jittered(
            Duration::from_millis(e.check.interval_ms),
            e.check.jitter_percent,
        );
        self.due
            .insert(now + wait, Round::Down, (slot, e.generation));
    }
}

/// The next batch of answers for half-open probes (never, without them).
async fn replies(syn: &mut Option<Syn>) -> Option<Vec<Reply>> {
    match syn {
        Some(syn) => syn.replies.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_in_a_row_take_a_real_down_and_rise_bring_it_back() {
        let mut s = ProbeStatus::new();
        let fail = || Err("connection refused".to_owned());
        assert_eq!(s.record(fail(), 2, 3), Flip::None);
        assert_eq!(s.record(fail(), 2, 3), Flip::None);
        // A success in between resets the failure count.
        assert_eq!(s.record(Ok(()), 2, 3), Flip::None);
        assert_eq!(s.record(fail(), 2, 3), Flip::None);
        assert_eq!(s.record(fail(), 2, 3), Flip::None);
        assert_eq!(s.record(fail(), 2, 3), Flip::Down);
        assert!(!s.up);
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert_eq!(s.record(fail(), 2, 3), Flip::None, "no second Down");
        assert_eq!(s.record(Ok(()), 2, 3), Flip::None);
        assert_eq!(s.record(Ok(()), 2, 3), Flip::Up);
        assert!(s.up);
    }

    #[test]
    fn a_real_restored_down_comes_back_after_rise_successes() {
        let mut s = ProbeStatus::down("down when the daemon started");
        assert!(!s.up);
        assert_eq!(s.record(Err("timeout".to_owned()), 2, 3), Flip::None);
        assert_eq!(s.record(Ok(()), 2, 3), Flip::None);
        assert_eq!(s.record(Ok(()), 2, 3), Flip::Up);
        assert!(s.up);
    }

    #[test]
    fn probe_durations_encode_as_the_client_library_s_histogram_does() {
        use prometheus_client::{
            encoding::text::encode,
            metrics::{family::Family, histogram::Histogram},
            registry::Registry,
        };
        let key: Key = (
            "203.0.113.10:80/tcp".parse().expect("VIP"),
            [198, 51, 100, 11].into(),
        );
        // On a bound, between bounds, past the last one, none at all.
        let seen = [0.0005, 0.0003, 0.004, 0.3, 5.0, 7.5, 0.0];
        let reference =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        let mut ours = ProbeDurations::default();
        for v in seen {
            reference.get_or_create(&duration_labels(&key)).observe(v);
            ours.observe(v);
        }
        let text = |f: &dyn Fn(&mut Registry)| {
            let mut reg = Registry::default();
            f(&mut reg);
            let mut out = String::new();
            encode(&mut out, &reg).expect("encode");
            out
        };
        let expected = text(&|r| r.register("probe_duration_seconds", "d", reference.clone()));
        let got = text(&|r| {
            r.register(
                "probe_duration_seconds",
                "d",
                Durations(vec![(duration_labels(&key), ours)]),
            );
        });
        assert_eq!(got, expected);
        let every = got.lines().any(|l| {
            l.starts_with("probe_duration_seconds_bucket{le=\"+Inf\"") && l.ends_with("} 7")
        });
        assert!(every, "not every probe in the +Inf bucket:\n{got}");
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let base = Duration::from_millis(2000);
        for _ in 0..1000 {
            let d = jittered(base, 10);
            assert!(
                d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200),
                "{d:?}"
            );
        }
        assert_eq!(jittered(base, 0), base);
    }

    // --- the scheduler, on tokio's paused clock: sleeps end at once, in
    // order, and `Instant` reads virtual time, so timing is exact and
    // instant to test.

    use std::sync::atomic::AtomicBool;

    /// Flips reported, with the virtual time and the real of each.
    type Flips = Arc<Mutex<Vec<(Instant, Key, Flip)>>>;

    const SECOND: Duration = Duration::from_secs(1);
    /// Slack for the float arithmetic of `jittered`.
    const EPSILON: Duration = Duration::from_millis(1);

    fn key(last: u8) -> Key {
        (
            "203.0.113.10:80/tcp".parse().expect("VIP"),
            IpAddr::from([198, 51, 100, last]),
        )
    }

    fn many(i: u16) -> Key {
        (
            key(0).0,
            IpAddr::from([198, 51, (i / 250) as u8, (i % 250) as u8]),
        )
    }

    /// The defaults: interval 2 s, timeout 1 s, rise 3, fall 3, jitter 10%.
    fn defaults() -> HealthCheck {
        HealthCheck::default()
    }

    fn ms(d: u64) -> Duration {
        Duration::from_millis(d)
    }

    /// An engine whose flips are recorded instead of reported.
    fn engine() -> (Engine, Flips) {
        engine_with(None)
    }

    /// An engine whose flips are recorded, its half-open probes sent by `syn`.
    fn engine_with(syn: Option<Syn>) -> (Engine, Flips) {
        let flips = Flips::default();
        let seen = flips.clone();
        let on_flip: OnFlip = Arc::new(move |key, _: &HealthCheck, st: &ProbeStatus| {
            let flip = if st.up { Flip::Up } else { Flip::Down };
            seen.lock()
                .expect("flips")
                .push((Instant::now(), key, flip));
        });
        (Engine::with_hook(Board::default(), on_flip, syn), flips)
    }

    /// Probes `key` with `probe` (a fake) under `check`.
    fn start<P, F>(engine: &mut Engine, key: Key, check: HealthCheck, probe: P)
    where
        P: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let probe: ProbeFn = Arc::new(move || Box::pin(probe()));
        engine.running.insert(key, (check.clone(), Forward::Dr));
        let expired = timed_out(Duration::from_millis(check.timeout_ms));
        engine
            .tx
            .send(Command::Start {
                key,
                check: Box::new(check),
                probe: Probe::Run(probe),
                expired,
            })
            .expect("scheduler");
    }

    fn flips_of(flips: &Flips, key: Key) -> Vec<(Instant, Flip)> {
        flips
            .lock()
            .expect("flips")
            .iter()
            .filter(|(_, k, _)| *k == key)
            .map(|(t, _, f)| (*t, *f))
            .collect()
    }

    /// A probe that passes while `healthy` is set and is refused otherwise.
    fn switchable(
        healthy: &Arc<AtomicBool>,
    ) -> impl Fn() -> std::future::Ready<Result<(), String>> + Send + Sync + 'static {
        let healthy = healthy.clone();
        move || {
            std::future::ready(if healthy.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("connection refused".to_owned())
            })
        }
    }

    fn status_of(engine: &Engine, key: Key) -> ProbeStatus {
        engine.board.statuses()[&key].clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_real_goes_down_after_fall_intervals_and_comes_back_after_rise() {
        let check = defaults();
        let interval = ms(check.interval_ms);
        let (lo, hi) = (interval.mul_f64(0.9), interval.mul_f64(1.1));
        let (mut engine, flips) = engine();
        let healthy = Arc::new(AtomicBool::new(true));
        start(&mut engine, key(11), check.clone(), switchable(&healthy));

        tokio::time::sleep(30 * SECOND).await;
        assert!(
            flips_of(&flips, key(11)).is_empty(),
            "a healthy real flipped"
        );
        assert!(
            status_of(&engine, key(11)).probes >= 13,
            "too few probes in 30 s"
        );

        // The service stops: the next probe fails, fall - 1 intervals later it is out.
        healthy.store(false, Ordering::Relaxed);
        let failed = Instant::now();
        tokio::time::sleep(30 * SECOND).await;
        let down = {
            let f = flips_of(&flips, key(11));
            assert_eq!(f.len(), 1, "one flip expected: {f:?}");
            assert_eq!(f[0].1, Flip::Down);
            f[0].0 - failed
        };
        assert!(
            down >= lo * (check.fall - 1) && down <= hi * check.fall + EPSILON,
            "down {down:?} after the failure; expected within fall ({}) intervals",
            check.fall
        );
        let st = status_of(&engine, key(11));
        assert!(!st.up);
        assert_eq!(st.last_error.as_deref(), Some("connection refused"));
        assert_eq!(st.flaps, 1);

        // It recovers: rise passing probes bring it back.
        healthy.store(true, Ordering::Relaxed);
        let recovered = Instant::now();
        tokio::time::sleep(30 * SECOND).await;
        let up = {
            let f = flips_of(&flips, key(11));
            assert_eq!(f.len(), 2, "two flips expected: {f:?}");
            assert_eq!(f[1].1, Flip::Up);
            f[1].0 - recovered
        };
        assert!(
            up >= lo * (check.rise - 1) && up <= hi * check.rise + EPSILON,
            "up {up:?} after recovery; expected within rise ({}) intervals",
            check.rise
        );
        let st = status_of(&engine, key(11));
        assert!(st.up);
        assert_eq!(st.flaps, 2);
        // Every probe's duration was observed under the real's labels.
        let mut text = String::new();
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register("probe_duration_seconds", "", engine.board.durations());
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        let count = format!(
            "probe_duration_seconds_count{{address=\"203.0.113.10\",port=\"80\",protocol=\"tcp\",real=\"198.51.100.11\"}} {}",
            st.probes
        );
        assert!(text.contains(&count), "{count} not in\n{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_black_holed_real_never_delays_the_probes_of_another() {
        let check = defaults();
        let interval = ms(check.interval_ms);
        let timeout = ms(check.timeout_ms);
        let (mut engine, flips) = engine();
        let start_at = Instant::now();
        // A thousand reals whose probes never return (bounded by the timeout)...
        for i in 0..1000u16 {
            start(&mut engine, many(i), check.clone(), std::future::pending);
        }
        // ...and one healthy real probed alongside them.
        let probed = Arc::new(Mutex::new(Vec::new()));
        let times = probed.clone();
        start(&mut engine, key(12), check.clone(), move || {
            times.lock().expect("times").push(Instant::now());
            std::future::ready(Ok(()))
        });

        tokio::time::sleep(60 * SECOND).await;
        let times = probed.lock().expect("times").clone();
        assert!(
            times[0] - start_at <= interval,
            "first probe at {:?}",
            times[0] - start_at
        );
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap <= interval.mul_f64(1.1) + EPSILON,
                "the healthy real waited {gap:?} between probes"
            );
        }
        assert!(times.len() >= 26, "only {} probes in 60 s", times.len());
        assert!(flips_of(&flips, key(12)).is_empty());

        // Every black-holed real went down once, after fall timeouts; each of
        // its probes takes interval + timeout.
        let worst_down = interval + timeout * check.fall + interval.mul_f64(1.1) * (check.fall - 1);
        for i in 0..1000u16 {
            let f = flips_of(&flips, many(i));
            assert_eq!(f.len(), 1, "real {i}: {f:?}");
            assert_eq!(f[0].1, Flip::Down);
            assert!(
                f[0].0 - start_at <= worst_down + EPSILON,
                "real {i} down at {:?}",
                f[0].0 - start_at
            );
        }
        let hole = status_of(&engine, many(0));
        assert_eq!(hole.last_error.as_deref(), Some("timeout after 1000 ms"));
        let cycle_min = timeout + interval.mul_f64(0.9);
        assert!(
            hole.probes <= 60_000 / cycle_min.as_millis() as u64 + 1,
            "{} probes of a black-holed real in 60 s: timeouts do not extend its cycle",
            hole.probes
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_probes_of_many_reals_spread_over_one_interval() {
        let check = defaults();
        let (mut engine, _) = engine();
        let start_at = Instant::now();
        let first: Arc<Mutex<BTreeMap<Key, Duration>>> = Arc::default();
        for i in 0..1000u16 {
            let key = many(i);
            let first = first.clone();
            start(&mut engine, key, check.clone(), move || {
                first
                    .lock()
                    .expect("first")
                    .entry(key)
                    .or_insert_with(|| Instant::now() - start_at);
                std::future::ready(Ok(()))
            });
        }
        tokio::time::sleep(ms(check.interval_ms) + EPSILON).await;
        let first = first.lock().expect("first");
        assert_eq!(
            first.len(),
            1000,
            "every real is probed within one interval"
        );
        // Twenty 100 ms buckets, 5% expected in each; lockstep would put all in one.
        let mut buckets = [0usize; 21];
        for d in first.values() {
            buckets[(d.as_millis() / 100) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|n| *n <= 150),
            "first probes bunch up: {buckets:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_bound_of_probes_run_at_once_and_none_is_skipped() {
        let check = HealthCheck {
            interval_ms: 1000,
            timeout_ms: 1000,
            ..defaults()
        };
        let (mut engine, _) = engine();
        let running = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let n = MAX_IN_FLIGHT as u16 + 1000;
        for i in 0..n {
            let (running, most) = (running.clone(), most.clone());
            start(&mut engine, many(i), check.clone(), move || {
                let (running, most) = (running.clone(), most.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(ms(900)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            });
        }
        tokio::time::sleep(10 * SECOND).await;
        assert_eq!(most.load(Ordering::SeqCst), MAX_IN_FLIGHT as u64);
        let statuses = engine.board.statuses();
        assert_eq!(statuses.len(), usize::from(n));
        assert!(
            statuses.values().all(|s| s.probes >= 3 && s.up),
            "a real was starved"
        );
    }

    /// A SYN: from, to, sequence number.
    type Sent = (SocketAddr, SocketAddr, u32);

    /// Sends no SYN: records them, and counts the lookups of the source.
    #[derive(Default)]
    struct FakeSyn {
        sent: Mutex<Vec<Sent>>,
        lookups: AtomicU64,
    }

    impl SynSend for FakeSyn {
        fn source(&self, _: IpAddr) -> Result<IpAddr, String> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok(IpAddr::from([198, 51, 100, 1]))
        }

        fn send(&self, syns: &[SynOut], _: &mut SynBuf, results: &mut Vec<SynSent>) {
            results.clear();
            let mut sent = self.sent.lock().expect("sent");
            for syn in syns {
                sent.push((syn.from, syn.to, syn.isn));
                results.push(SynSent::Sent);
            }
        }
    }

    impl FakeSyn {
        fn sent(&self) -> Vec<Sent> {
            self.sent.lock().expect("sent").clone()
        }
    }

    /// An engine whose half-open probes go to a fake; answers go in by the sender.
    fn syn_engine() -> (
        Engine,
        Flips,
        Arc<FakeSyn>,
        mpsc::UnboundedSender<Vec<Reply>>,
    ) {
        let fake = Arc::new(FakeSyn::default());
        let (tx, replies) = mpsc::unbounded_channel();
        let syn = Syn {
            sender: fake.clone(),
            replies,
        };
        let (engine, flips) = engine_with(Some(syn));
        (engine, flips, fake, tx)
    }

    /// Probes `key` half-open on port 8080 under `check`.
    fn start_syn(engine: &mut Engine, key: Key, check: HealthCheck) {
        engine.running.insert(key, (check.clone(), Forward::Dr));
        let expired = format!(
            "timeout after {} ms (no answer to the SYN)",
            check.timeout_ms
        );
        engine
            .tx
            .send(Command::Start {
                key,
                check: Box::new(check),
                probe: Probe::Syn(SocketAddr::new(key.1, 8080)),
                expired,
            })
            .expect("scheduler");
    }

    /// The answer to `syn`, acknowledging `ack` (the right one: its sequence + 1).
    fn reply((from, to, _): Sent, ack: u32, answer: Answer) -> Reply {
        Reply {
            flow: (from, to),
            ack,
            answer,
        }
    }

    /// Waits (virtual time) until `n` SYNs went out; returns the last.
    async fn nth_syn(fake: &FakeSyn, n: usize) -> Sent {
        for _ in 0..10_000 {
            if let Some(s) = fake.sent().get(n - 1) {
                return *s;
            }
            tokio::time::sleep(ms(1)).await;
        }
        panic!("SYN {n} never sent: {:?}", fake.sent());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_pass_on_a_syn_ack_fail_on_a_rst_and_expire_without_an_answer() {
        let check = HealthCheck {
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 1,
            fall: 1,
            jitter_percent: 0,
            ..defaults()
        };
        let (mut engine, flips, fake, tx) = syn_engine();
        start_syn(&mut engine, key(11), check);
        let syn = nth_syn(&fake, 1).await;
        assert_eq!(syn.1, SocketAddr::new(key(11).1, 8080));
        assert_eq!(syn.0.ip(), IpAddr::from([198, 51, 100, 1]));
        let ack = syn.2.wrapping_add(1);

        // An answer to another sequence number or another connection: ignored.
        let mut other = syn;
        other.1.set_port(8081);
        tx.send(vec![
            reply(syn, ack.wrapping_add(1), Answer::Accepted),
            reply(other, ack, Answer::Accepted),
        ])
        .expect("send");
        tokio::time::sleep(ms(1)).await;
        assert_eq!(
            status_of(&engine, key(11)).probes,
            0,
            "a stray answer counted"
        );
        // The SYN-ACK passes.
        tx.send(vec![reply(syn, ack, Answer::Accepted)])
            .expect("send");
        tokio::time::sleep(ms(1)).await;
        let st = status_of(&engine, key(11));
        assert_eq!((st.probes, st.up, st.successes), (1, true, 1));

        // The next SYN, an interval later, is refused.
        let syn = nth_syn(&fake, 2).await;
        tx.send(vec![reply(syn, syn.2.wrapping_add(1), Answer::Refused)])
            .expect("send");
        tokio::time::sleep(ms(1)).await;
        let st = status_of(&engine, key(11));
        assert!(!st.up);
        assert_eq!(
            st.last_error.as_deref(),
            Some("connection refused: the SYN was answered by a RST")
        );
        assert_eq!(flips_of(&flips, key(11)).len(), 1);

        // The third gets no answer: it fails at its timeout, and a late
        // answer is ignored.
        let syn = nth_syn(&fake, 3).await;
        let sent_at = Instant::now();
        tokio::time::sleep(ms(499)).await;
        assert_eq!(status_of(&engine, key(11)).probes, 2, "expired early");
        tokio::time::sleep(ms(2)).await;
        let st = status_of(&engine, key(11));
        assert_eq!(
            st.probes,
            3,
            "not expired {:?} after the SYN",
            Instant::now() - sent_at
        );
        assert_eq!(
            st.last_error.as_deref(),
            Some("timeout after 500 ms (no answer to the SYN)")
        );
        tx.send(vec![reply(syn, syn.2.wrapping_add(1), Answer::Accepted)])
            .expect("send");
        tokio::time::sleep(ms(1)).await;
        assert_eq!(
            status_of(&engine, key(11)).probes,
            3,
            "a late answer counted"
        );
        // The source toward the real is asked again after a probe without answer.
        assert_eq!(fake.lookups.load(Ordering::SeqCst), 1);
        nth_syn(&fake, 4).await;
        assert_eq!(fake.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_probe_s_timeout_never_fails_the_next_probe() {
        // The next probe starts before the previous one's timeout would have
        // passed (interval 100 ms, jitter 10%, timeout 100 ms).
        let check = HealthCheck {
            interval_ms: 100,
            timeout_ms: 100,
            rise: 1,
            fall: 1,
            ..defaults()
        };
        let (mut engine, flips, fake, tx) = syn_engine();
        start_syn(&mut engine, key(11), check);
        for n in 1..=50 {
            let syn = nth_syn(&fake, n).await;
            tx.send(vec![reply(syn, syn.2.wrapping_add(1), Answer::Accepted)])
                .expect("send");
        }
        tokio::time::sleep(ms(1)).await;
        let st = status_of(&engine, key(11));
        assert_eq!((st.probes, st.failures), (50, 0), "{st:?}");
        assert!(flips_of(&flips, key(11)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_count_in_the_bound_and_a_stopped_real_forgets_its_own() {
        let check = HealthCheck {
            interval_ms: 1000,
            timeout_ms: 1000,
            ..defaults()
        };
        let (mut engine, _, fake, _tx) = syn_engine();
        let n = MAX_IN_FLIGHT as u16 + 100;
        for i in 0..n {
            start_syn(&mut engine, many(i), check.clone());
        }
        // No answers: every SYN waits its whole timeout (1 s), and almost
        // every real was due within the first interval.
        tokio::time::sleep(ms(999)).await;
        assert_eq!(fake.sent().len(), MAX_IN_FLIGHT, "the bound was not kept");
        tokio::time::sleep(5 * SECOND).await;
        let statuses = engine.board.statuses();
        assert_eq!(statuses.len(), usize::from(n));
        assert!(
            statuses.values().all(|s| s.probes >= 2),
            "a real was starved"
        );
        engine.sync(BTreeMap::new(), &BTreeSet::new());
        tokio::time::sleep(ms(1)).await;
        let sent = fake.sent().len();
        tokio::time::sleep(5 * SECOND).await;
        assert_eq!(fake.sent().len(), sent, "a stopped real was probed");
        assert!(engine.board.statuses().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_check_restarts_the_real_and_a_removed_one_is_forgotten() {
        let (mut engine, _) = engine();
        let vip = key(0).0;
        let c = HealthCheck {
            interval_ms: 200,
            timeout_ms: 100,
            rise: 1,
            fall: 1,
            start: Start::Down,
            ..defaults()
        };
        let mut wanted = BTreeMap::from([(
            (vip, key(11).1),
            Planned {
                check: c.clone(),
                port: 1,
                forward: Forward::Dr,
            },
        )]);
        // start: down and in the down set: starts down with the reason.
        engine.sync(wanted.clone(), &BTreeSet::from([key(11)]));
        assert_eq!(
            engine.verdicts(),
            BTreeMap::from([(key(11), false)]),
            "down until proven up"
        );
        assert_eq!(
            status_of(&engine, key(11)).last_error.as_deref(),
            Some("start: down, not proven up yet")
        );
        wanted.clear();
        engine.sync(wanted, &BTreeSet::new());
        assert!(engine.verdicts().is_empty());
        assert!(engine.board.statuses().is_empty());
    }
}
