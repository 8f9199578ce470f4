//! The probe tasks: one tokio task per (VIP, real) with a health check. Each
//! probes on its own schedule (interval with jitter, first probe at a random
//! point of the first interval), applies rise/fall hysteresis and reports
//! flips to the daemon's controller, which applies them through the reconcile step. A slow
//! or black-holed real only ever delays its own task.
//!
//! Reals start healthy: a freshly started daemon never empties a service while
//! the first probes run. Only a real the adopted state already holds down
//! starts down, and comes back after `rise` passing probes. The avalanche guard (in `state`) decides whether a
//! verdict may actually take a real out.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{HealthCheck, probe};
use crate::model::Vip;

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
        }
    }
}

impl ProbeStatus {
    /// A status that starts healthy.
    pub fn new() -> Self {
        Self::default()
    }

    /// A status that starts down: a real the state (e.g. the state file a
    /// restarted daemon adopted) already holds out of its table. It comes back
    /// after `rise` successes, like any real that went down.
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

struct Running {
    check: HealthCheck,
    task: JoinHandle<()>,
}

/// What the probe tasks know, readable by anyone (status, metrics) without
/// asking the engine's owner.
#[derive(Clone, Default)]
pub struct Board {
    status: Arc<Mutex<BTreeMap<Key, ProbeStatus>>>,
    flips: Arc<AtomicU64>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, ProbeStatus>> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status of every probed real.
    pub fn statuses(&self) -> BTreeMap<Key, ProbeStatus> {
        self.lock().clone()
    }

    /// Number of verdict flips since start.
    pub fn flips(&self) -> u64 {
        self.flips.load(Ordering::Relaxed)
    }
}

/// Owns the probe tasks (one per probed real); owned by the daemon's controller.
pub struct Engine {
    running: BTreeMap<Key, Running>,
    board: Board,
    report: Report,
}

impl Engine {
    /// An engine with no checks that reports flips to `report`.
    pub fn new(report: Report) -> Self {
        Self {
            running: BTreeMap::new(),
            board: Board::default(),
            report,
        }
    }

    /// A handle on the probe statuses.
    pub fn board(&self) -> Board {
        self.board.clone()
    }

    /// Stops every probe task.
    pub fn stop(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.task.abort();
        }
    }

    /// The verdict of every real being probed (reals probed for less than
    /// one probe have the verdict they started with).
    pub fn verdicts(&self) -> BTreeMap<Key, bool> {
        let status = self.board.lock();
        self.running
            .keys()
            .map(|k| (*k, status.get(k).is_none_or(|s| s.up)))
            .collect()
    }

    /// Starts, restarts or stops tasks so that exactly the reals of `wanted`
    /// are probed, each with its check and port. A new task of a real in
    /// `down` (a verdict the state already holds, e.g. adopted from a previous
    /// daemon) starts from that verdict, so the real comes back after `rise`
    /// passing probes instead of staying out with no probe to bring it back.
    pub fn sync(&mut self, wanted: BTreeMap<Key, (HealthCheck, u16)>, down: &BTreeSet<Key>) {
        let stale: Vec<Key> = self
            .running
            .iter()
            .filter(|(k, r)| wanted.get(k).is_none_or(|(c, _)| *c != r.check))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(r) = self.running.remove(&k) {
                r.task.abort();
            }
            if !wanted.contains_key(&k) {
                self.board.lock().remove(&k);
            }
        }
        for (k, (check, port)) in wanted {
            if self.running.contains_key(&k) {
                continue;
            }
            if down.contains(&k) {
                self.board
                    .lock()
                    .entry(k)
                    .or_insert_with(|| ProbeStatus::down("down when the daemon started"));
            }
            let task = tokio::spawn(probe_loop(
                k,
                check.clone(),
                SocketAddr::new(k.1, port),
                self.board.clone(),
                self.report.clone(),
            ));
            self.running.insert(k, Running { check, task });
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn probe_loop(
    key: Key,
    check: HealthCheck,
    target: SocketAddr,
    board: Board,
    report: Report,
) {
    let (vip, real) = key;
    let flips = board.flips.clone();
    let on_flip = |flip: Flip, error: &str| {
        let up = flip == Flip::Up;
        if up {
            tracing::info!(%vip, %real, "health: real is up again");
        } else {
            tracing::warn!(%vip, %real, %error, "health: real is down");
        }
        flips.fetch_add(1, Ordering::Relaxed);
        report(vip, real, up);
        true
    };
    schedule(
        key,
        &check,
        &board.status,
        || probe::run(&check, target),
        on_flip,
    )
    .await;
}

/// One real's probe schedule: the first probe at a random point of the first
/// interval, then one every `interval_ms` (± jitter) after the previous one
/// ended; each bounded by `timeout_ms`, so a black-holed real is probed every
/// interval + timeout. Applies rise/fall and calls `report` with each flip and
/// the last error; stops when `report` returns false (the daemon is gone).
/// `probe` is [`probe::run`] in the daemon and a fake in tests.
async fn schedule<P, F>(
    key: Key,
    check: &HealthCheck,
    status: &Mutex<BTreeMap<Key, ProbeStatus>>,
    mut probe: P,
    mut report: impl FnMut(Flip, &str) -> bool,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    // Spread the first probes of many reals over one interval.
    let first = rand::rng().random_range(0.0..=interval.as_secs_f64());
    tokio::time::sleep(Duration::from_secs_f64(first)).await;
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key)
        .or_default();
    loop {
        let result = match tokio::time::timeout(timeout, probe()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {} ms", check.timeout_ms)),
        };
        let (flip, error) = {
            let mut s = status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let st = s.entry(key).or_default();
            let flip = st.record(result, check.rise, check.fall);
            (flip, st.last_error.clone().unwrap_or_default())
        };
        if flip != Flip::None && !report(flip, &error) {
            return;
        }
        tokio::time::sleep(jittered(interval, check.jitter_percent)).await;
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

    // --- the schedule, on tokio's paused clock: sleeps end at once, in order,
    // and `Instant` reads virtual time, so timing is exact and instant to test.

    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::time::Instant;

    /// Flips reported by a schedule, with the virtual time of each.
    type Flips = Arc<Mutex<Vec<(Instant, Flip)>>>;
    type Statuses = Arc<Mutex<BTreeMap<Key, ProbeStatus>>>;

    const SECOND: Duration = Duration::from_secs(1);
    /// Slack for the float arithmetic of `jittered`.
    const EPSILON: Duration = Duration::from_millis(1);

    fn key(last: u8) -> Key {
        (
            "203.0.113.10:80/tcp".parse().expect("VIP"),
            IpAddr::from([198, 51, 100, last]),
        )
    }

    /// The defaults: interval 2 s, timeout 1 s, rise 3, fall 3, jitter 10%.
    fn defaults() -> HealthCheck {
        HealthCheck::default()
    }

    fn ms(d: u64) -> Duration {
        Duration::from_millis(d)
    }

    /// Runs `schedule` for `key` in a task, recording its flips.
    fn spawn<P, F>(key: Key, check: HealthCheck, status: &Statuses, probe: P) -> Flips
    where
        P: FnMut() -> F + Send + 'static,
        F: Future<Output = Result<(), String>> + Send,
    {
        let flips = Flips::default();
        let (status, recorded) = (status.clone(), flips.clone());
        tokio::spawn(async move {
            let report = |flip, _: &str| {
                recorded.lock().expect("flips").push((Instant::now(), flip));
                true
            };
            schedule(key, &check, &status, probe, report).await;
        });
        flips
    }

    /// A probe that passes while `healthy` is set and is refused otherwise.
    fn switchable(
        healthy: &Arc<AtomicBool>,
    ) -> impl FnMut() -> std::future::Ready<Result<(), String>> + Send + 'static {
        let healthy = healthy.clone();
        move || {
            std::future::ready(if healthy.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("connection refused".to_owned())
            })
        }
    }

    fn status_of(status: &Statuses, key: Key) -> ProbeStatus {
        status.lock().expect("status")[&key].clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_real_goes_down_after_fall_intervals_and_comes_back_after_rise() {
        let check = defaults();
        let interval = ms(check.interval_ms);
        let (lo, hi) = (interval.mul_f64(0.9), interval.mul_f64(1.1));
        let status = Statuses::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let flips = spawn(key(11), check.clone(), &status, switchable(&healthy));

        tokio::time::sleep(30 * SECOND).await;
        assert!(
            flips.lock().expect("flips").is_empty(),
            "a healthy real flipped"
        );
        assert!(
            status_of(&status, key(11)).probes >= 13,
            "too few probes in 30 s"
        );

        // The service stops: the next probe fails, fall - 1 intervals later it is out.
        healthy.store(false, Ordering::Relaxed);
        let failed = Instant::now();
        tokio::time::sleep(30 * SECOND).await;
        let down = {
            let f = flips.lock().expect("flips");
            assert_eq!(f.len(), 1, "one flip expected: {f:?}");
            assert_eq!(f[0].1, Flip::Down);
            f[0].0 - failed
        };
        assert!(
            down >= lo * (check.fall - 1) && down <= hi * check.fall + EPSILON,
            "down {down:?} after the failure; expected within fall ({}) intervals",
            check.fall
        );
        let st = status_of(&status, key(11));
        assert!(!st.up);
        assert_eq!(st.last_error.as_deref(), Some("connection refused"));

        // It recovers: rise passing probes bring it back.
        healthy.store(true, Ordering::Relaxed);
        let recovered = Instant::now();
        tokio::time::sleep(30 * SECOND).await;
        let up = {
            let f = flips.lock().expect("flips");
            assert_eq!(f.len(), 2, "two flips expected: {f:?}");
            assert_eq!(f[1].1, Flip::Up);
            f[1].0 - recovered
        };
        assert!(
            up >= lo * (check.rise - 1) && up <= hi * check.rise + EPSILON,
            "up {up:?} after recovery; expected within rise ({}) intervals",
            check.rise
        );
        assert!(status_of(&status, key(11)).up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_black_holed_real_never_delays_the_probes_of_another() {
        let check = defaults();
        let interval = ms(check.interval_ms);
        let timeout = ms(check.timeout_ms);
        let status = Statuses::default();
        let start = Instant::now();
        // A thousand reals whose probes never return (bounded by the timeout)...
        let holes: Vec<Flips> = (0..1000u16)
            .map(|i| {
                let key = (
                    key(0).0,
                    IpAddr::from([198, 51, (i / 250) as u8, (i % 250) as u8]),
                );
                spawn(key, check.clone(), &status, std::future::pending)
            })
            .collect();
        // ...and one healthy real probed alongside them.
        let probed = Arc::new(Mutex::new(Vec::new()));
        let times = probed.clone();
        let flips = spawn(key(12), check.clone(), &status, move || {
            times.lock().expect("times").push(Instant::now());
            std::future::ready(Ok(()))
        });

        tokio::time::sleep(60 * SECOND).await;
        let times = probed.lock().expect("times").clone();
        assert!(
            times[0] - start <= interval,
            "first probe at {:?}",
            times[0] - start
        );
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap <= interval.mul_f64(1.1) + EPSILON,
                "the healthy real waited {gap:?} between probes"
            );
        }
        assert!(times.len() >= 26, "only {} probes in 60 s", times.len());
        assert!(flips.lock().expect("flips").is_empty());

        // Every black-holed real went down once, after fall timeouts; each of
        // its probes takes interval + timeout.
        let worst_down = interval + timeout * check.fall + interval.mul_f64(1.1) * (check.fall - 1);
        for (i, f) in holes.iter().enumerate() {
            let f = f.lock().expect("flips");
            assert_eq!(f.len(), 1, "real {i}: {f:?}");
            assert_eq!(f[0].1, Flip::Down);
            assert!(
                f[0].0 - start <= worst_down + EPSILON,
                "real {i} down at {:?}",
                f[0].0 - start
            );
        }
        let hole = status_of(&status, (key(0).0, IpAddr::from([198, 51, 0, 0])));
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
        let status = Statuses::default();
        let start = Instant::now();
        let first: Arc<Mutex<BTreeMap<Key, Duration>>> = Arc::default();
        for i in 0..1000u16 {
            let key = (
                key(0).0,
                IpAddr::from([198, 51, (i / 250) as u8, (i % 250) as u8]),
            );
            let first = first.clone();
            spawn(key, check.clone(), &status, move || {
                first
                    .lock()
                    .expect("first")
                    .entry(key)
                    .or_insert_with(|| Instant::now() - start);
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
}
