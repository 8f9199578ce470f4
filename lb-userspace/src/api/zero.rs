//! `xlb stats --zero`: the counters the CLI shows start again from zero, the
//! way `ipvsadm --zero` does, without touching the data path. The daemon keeps
//! a baseline (every counter's value at the zero) and the API subtracts it;
//! the BPF per-CPU counters and the Prometheus metrics, which must stay
//! monotonic, keep counting from the start.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Stats;
use crate::{model::Vip, views::VipView};

/// Packets, bytes and new flows of one VIP or real.
type Triple = (u64, u64, u64);

/// Every counter's value at the last zero.
#[derive(Clone, Debug, Default)]
struct Counts {
    at: Option<u64>,
    verdicts: BTreeMap<String, (u64, u64)>,
    events: BTreeMap<String, u64>,
    vips: BTreeMap<Vip, Triple>,
    reals: BTreeMap<(Vip, IpAddr), Triple>,
}

/// Answer of `POST /v1/stats/zero`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Zeroed {
    /// When the counters were zeroed, Unix seconds.
    pub zeroed_at: u64,
}

/// The baseline, shared by the API's handlers (published with a watch
/// channel: a zero replaces it whole, readers take the current one).
#[derive(Clone)]
pub struct Baseline(Arc<watch::Sender<Arc<Counts>>>);

impl Default for Baseline {
    fn default() -> Self {
        Self(Arc::new(watch::channel(Arc::new(Counts::default())).0))
    }
}

/// `now - base`; a counter below its baseline started again after the zero
/// (a real removed and added back): its whole value counts.
fn since(now: u64, base: u64) -> u64 {
    now.checked_sub(base).unwrap_or(now)
}

impl Baseline {
    /// Records `raw` (unzeroed counters) as the new zero, at `at`.
    pub fn zero(&self, raw: &Stats, at: u64) {
        let mut c = Counts {
            at: Some(at),
            ..Counts::default()
        };
        for v in &raw.verdicts {
            c.verdicts.insert(v.name.clone(), (v.packets, v.bytes));
        }
        for e in &raw.events {
            c.events.insert(e.name.clone(), e.count);
        }
        for v in &raw.vips {
            c.vips.insert(v.vip, (v.packets, v.bytes, v.flows));
            for r in &v.reals {
                c.reals
                    .insert((v.vip, r.addr), (r.packets, r.bytes, r.flows));
            }
        }
        self.0.send_replace(Arc::new(c));
    }

    /// When the counters were last zeroed, Unix seconds.
    pub fn zeroed_at(&self) -> Option<u64> {
        self.0.borrow().at
    }

    /// The counters of `views` counted from the last zero.
    pub fn views(&self, views: &mut [VipView]) {
        let c = self.0.borrow().clone();
        for v in views {
            let (p, b, f) = c.vips.get(&v.vip).copied().unwrap_or_default();
            (v.packets, v.bytes, v.flows) =
                (since(v.packets, p), since(v.bytes, b), since(v.flows, f));
            for r in &mut v.reals {
                let (p, b, f) = c.reals.get(&(v.vip, r.addr)).copied().unwrap_or_default();
                (r.packets, r.bytes, r.flows) =
                    (since(r.packets, p), since(r.bytes, b), since(r.flows, f));
            }
        }
    }

    /// `stats` counted from the last zero.
    pub fn stats(&self, stats: &mut Stats) {
        let c = self.0.borrow().clone();
        for v in &mut stats.verdicts {
            let (p, b) = c.verdicts.get(&v.name).copied().unwrap_or_default();
            (v.packets, v.bytes) = (since(v.packets, p), since(v.bytes, b));
        }
        for e in &mut stats.events {
            e.count = since(e.count, c.events.get(&e.name).copied().unwrap_or_default());
        }
        self.views(&mut stats.vips);
        stats.zeroed_at = c.at;
    }
}
