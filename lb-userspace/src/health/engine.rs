//! The probe tasks: one tokio task per (VIP, real) with a health check. Each
//! probes on its own schedule (interval with jitter, first probe at a random
//! point of the first interval), applies rise/fall hysteresis and reports
//! flips to the daemon, which applies them through the reconcile step. A slow
//! or black-holed real only ever delays its own task.
//!
//! Reals start healthy: a freshly started daemon never empties a service while
//! the first probes run. The avalanche guard (in `state`) decides whether a
//! verdict may actually take a real out.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime},
};

use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{HealthCheck, ProbeKind, probe};
use crate::{api::Shared, model::Vip};

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

type Key = (Vip, IpAddr);

struct Running {
    check: HealthCheck,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    running: BTreeMap<Key, Running>,
    status: Arc<Mutex<BTreeMap<Key, ProbeStatus>>>,
    shared: Weak<Shared>,
}

/// Owns the probe tasks.
#[derive(Default)]
pub struct Engine {
    inner: Mutex<Inner>,
    flips: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// An engine with no checks.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts probing (after the daemon is serving).
    pub fn start(&self, shared: &Arc<Shared>) {
        self.lock().shared = Arc::downgrade(shared);
        self.sync(shared);
    }

    /// Stops every probe task.
    pub fn stop(&self) {
        let mut inner = self.lock();
        for (_, r) in std::mem::take(&mut inner.running) {
            r.task.abort();
        }
    }

    /// Number of verdict flips since start.
    pub fn flips(&self) -> u64 {
        self.flips.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The status of every probed real.
    pub fn statuses(&self) -> BTreeMap<Key, ProbeStatus> {
        let status = self.lock().status.clone();
        let s = status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.clone()
    }

    /// Starts, restarts or stops tasks so that exactly the reals of the
    /// desired state with a check (other than `none`) are probed. Reals that
    /// leave, or whose check is removed, are reported healthy again.
    pub fn sync(&self, shared: &Shared) {
        let desired = shared.lock().state.desired().clone();
        let mut inner = self.lock();
        if inner.shared.upgrade().is_none() {
            // Not started yet; start() syncs.
            return;
        }
        let mut wanted: BTreeMap<Key, (HealthCheck, u16)> = BTreeMap::new();
        for (vip, s) in &desired.services {
            for real in s.reals.keys() {
                if let Some(c) = s.check(*real)
                    && c.kind != ProbeKind::None
                {
                    wanted.insert((*vip, *real), (c.clone(), c.port.unwrap_or(vip.port)));
                }
            }
        }
        let stale: Vec<Key> = inner
            .running
            .iter()
            .filter(|(k, r)| wanted.get(k).is_none_or(|(c, _)| *c != r.check))
            .map(|(k, _)| *k)
            .collect();
        let mut cleared = Vec::new();
        for k in stale {
            if let Some(r) = inner.running.remove(&k) {
                r.task.abort();
            }
            if !wanted.contains_key(&k) {
                let status = inner.status.clone();
                status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&k);
                cleared.push(k);
            }
        }
        for (k, (check, port)) in wanted {
            if inner.running.contains_key(&k) {
                continue;
            }
            let task = tokio::spawn(probe_loop(
                k,
                check.clone(),
                SocketAddr::new(k.1, port),
                inner.status.clone(),
                inner.shared.clone(),
            ));
            inner.running.insert(k, Running { check, task });
        }
        drop(inner);
        // A real no longer probed must not stay out because of an old verdict.
        for (vip, real) in cleared {
            if desired
                .services
                .get(&vip)
                .is_some_and(|s| s.reals.contains_key(&real))
                && !shared.lock().state.healthy(&vip, real)
            {
                shared.set_health(&vip, real, true);
            }
        }
    }

    fn flipped(&self) {
        self.flips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn probe_loop(
    (vip, real): Key,
    check: HealthCheck,
    target: SocketAddr,
    status: Arc<Mutex<BTreeMap<Key, ProbeStatus>>>,
    shared: Weak<Shared>,
) {
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    // Spread the first probes of many reals over one interval.
    let first = rand::rng().random_range(0.0..=interval.as_secs_f64());
    tokio::time::sleep(Duration::from_secs_f64(first)).await;
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry((vip, real))
        .or_default();
    loop {
        let result = match tokio::time::timeout(timeout, probe::run(&check, target)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {} ms", check.timeout_ms)),
        };
        let flip = {
            let mut s = status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let st = s.entry((vip, real)).or_default();
            st.record(result, check.rise, check.fall)
        };
        if flip != Flip::None {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let up = flip == Flip::Up;
            let error = status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&(vip, real))
                .and_then(|s| s.last_error.clone())
                .unwrap_or_default();
            if up {
                tracing::info!(%vip, %real, "health: real is up again");
            } else {
                tracing::warn!(%vip, %real, %error, "health: real is down");
            }
            shared.health.flipped();
            shared.set_health(&vip, real, up);
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
}
