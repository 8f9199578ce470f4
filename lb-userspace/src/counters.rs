//! Reading what the data path counts, on handles of its own: the per-CPU
//! verdict, event, VIP and real counters, and the conntrack table.
//!
//! The conntrack table can hold millions of flows. [`Reader::flows_by_slot`]
//! walks its memory-mapped buckets (no system call; the keys are not read),
//! from a task of its own ([`spawn_flow_counter`]), and publishes the counts:
//! a status call or a metrics scrape only reads the last published counts,
//! and nothing waits on the walk.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{Counter, map_names, stat, udp_stamp_grain_ns};
use tokio::sync::watch;

use crate::{
    conntrack::{Table, monotonic_ns},
    dataplane::{Dataplane, DataplaneError, map_err, sum},
};

/// A TCP flow whose last packet is older than this does not count as active
/// (its conntrack entry stays until a new flow of its bucket evicts it).
pub const TCP_ACTIVE: Duration = Duration::from_secs(60);

/// How often the conntrack table is counted.
pub const FLOW_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Read-only handles on the counters and the conntrack table.
pub struct Reader {
    stats: PerCpuArray<MapData, Counter>,
    vip_stats: PerCpuArray<MapData, Counter>,
    real_stats: PerCpuArray<MapData, Counter>,
    flows: Arc<Table>,
}

/// Conntrack entries counted by one walk.
#[derive(Clone, Debug, Default)]
pub struct FlowCounts {
    /// Active flows by real slot id and the slot's generation when the flow
    /// was tracked, as the entry keeps it (`lb_common::ct_generation`: look
    /// a real up through it); entries of an earlier owner of the slot id do
    /// not count for the current one.
    pub by_slot: BTreeMap<(u32, u32), u64>,
    /// Every entry in the table (active or not).
    pub entries: u64,
    /// When the walk ended (`None`: never counted yet).
    pub at: Option<Instant>,
    /// How long the walk took.
    pub took: Duration,
    /// [`Reader::flows_written`] when the walk began (`None`: unknown).
    pub written: Option<u64>,
}

impl Reader {
    /// A reader of `dp`'s counters and conntrack table, on file descriptors
    /// of its own: readers never wait on the task that writes the maps.
    pub fn of(dp: &Dataplane) -> Result<Self, DataplaneError> {
        let ([stats, vip_stats, real_stats], flows) = dp.reader_maps()?;
        Ok(Self {
            stats: typed(stats, map_names::STATS)?,
            vip_stats: typed(vip_stats, map_names::VIP_STATS)?,
            real_stats: typed(real_stats, map_names::REAL_STATS)?,
            flows,
        })
    }

    /// The verdict counters summed over CPUs, in `lb_common::stat` order.
    pub fn verdicts(&self) -> Result<Vec<Counter>, DataplaneError> {
        (0..stat::VERDICTS)
            .map(|i| sum(&self.stats, i, map_names::STATS))
            .collect()
    }

    /// The event counters summed over CPUs, as (name, count).
    pub fn events(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        stat::EVENTS
            .iter()
            .map(|&(i, name)| Ok((name, sum(&self.stats, i, map_names::STATS)?.packets)))
            .collect()
    }

    /// VIP `id`'s counter summed over CPUs.
    pub fn vip_counter(&self, id: u32) -> Result<Counter, DataplaneError> {
        sum(&self.vip_stats, id, map_names::VIP_STATS)
    }

    /// Real slot `id`'s counter summed over CPUs.
    pub fn real_counter(&self, id: u32) -> Result<Counter, DataplaneError> {
        sum(&self.real_stats, id, map_names::REAL_STATS)
    }

    /// Flows the conntrack table is sized for.
    pub fn flow_capacity(&self) -> u32 {
        self.flows.capacity()
    }

    /// Entries the data path has written into the conntrack table so far
    /// (`conntrack_new` plus `conntrack_peer_hit`): when it has not moved, a
    /// count still holds but for ageing.
    pub fn flows_written(&self) -> Result<u64, DataplaneError> {
        let new = sum(&self.stats, stat::CT_NEW, map_names::STATS)?.packets;
        let peer = sum(&self.stats, stat::CT_PEER_HIT, map_names::STATS)?.packets;
        Ok(new.wrapping_add(peer))
    }

    /// Counts the conntrack table: every entry, and per real slot the active
    /// ones (UDP: seen within `udp_idle` plus the stamp's grain, as the data
    /// path decides; TCP: within [`TCP_ACTIVE`], or never stamped).
    pub fn flows_by_slot(&self, udp_idle: Duration) -> Result<FlowCounts, DataplaneError> {
        let started = Instant::now();
        let now = monotonic_ns();
        let mut counts = FlowCounts {
            written: self.flows_written().ok(),
            ..FlowCounts::default()
        };
        let udp_idle_ns = u64::try_from(udp_idle.as_nanos()).unwrap_or(u64::MAX);
        let udp_window = udp_idle_ns.saturating_add(udp_stamp_grain_ns(udp_idle_ns));
        let tcp_window = u64::try_from(TCP_ACTIVE.as_nanos()).unwrap_or(u64::MAX);
        self.flows.for_each_way(|way| {
            counts.entries += 1;
            let window = if way.udp() { udp_window } else { tcp_window };
            let last_seen = way.last_seen_ns(now);
            if last_seen == 0 || now.saturating_sub(last_seen) <= window {
                *counts
                    .by_slot
                    .entry((way.real_id(), way.generation()))
                    .or_default() += 1;
            }
        });
        counts.took = started.elapsed();
        counts.at = Some(Instant::now());
        Ok(counts)
    }
}

/// A typed handle on a map given by its data.
fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    data: MapData,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// The conntrack count, shared by everyone who reads it: one walk at a time,
/// on a blocking thread, and a count younger than ten times the last walk's
/// duration is served as it is. However many requests arrive, walking takes
/// at most about a tenth of one CPU (a small table is counted afresh for
/// every request; a table of a million flows about once a second).
pub struct FlowCounter {
    reader: Arc<Reader>,
    udp_idle: Duration,
    last: watch::Sender<Arc<FlowCounts>>,
    walking: tokio::sync::Mutex<()>,
}

impl FlowCounter {
    /// A counter over `reader`'s conntrack table.
    pub fn new(reader: Arc<Reader>, udp_idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            reader,
            udp_idle,
            last: watch::channel(Arc::new(FlowCounts::default())).0,
            walking: tokio::sync::Mutex::new(()),
        })
    }

    /// The last count, whatever its age.
    pub fn last(&self) -> Arc<FlowCounts> {
        self.last.borrow().clone()
    }

    /// A count at most `max_age` old, or at most ten walk durations old
    /// when that is longer and the data path wrote no entry since: the last
    /// one, or a new walk.
    pub async fn fresh(&self, max_age: Duration) -> Arc<FlowCounts> {
        let written = self.reader.flows_written().ok();
        let young = |c: &FlowCounts| {
            let Some(at) = c.at else {
                return false;
            };
            let unchanged = written.is_none() || c.written == written;
            at.elapsed() <= max_age || (unchanged && at.elapsed() <= c.took * 10)
        };
        let last = self.last();
        if young(&last) {
            return last;
        }
        let _turn = self.walking.lock().await;
        // Another request may have walked while this one waited.
        let last = self.last();
        if young(&last) {
            return last;
        }
        let reader = self.reader.clone();
        let udp_idle = self.udp_idle;
        match tokio::task::spawn_blocking(move || reader.flows_by_slot(udp_idle)).await {
            Ok(Ok(counts)) => {
                let counts = Arc::new(counts);
                self.last.send_replace(counts.clone());
                counts
            }
            Ok(Err(err)) => {
                let err = crate::chain::Chain(&err);
                tracing::warn!(%err, "counting the conntrack table failed");
                last
            }
            Err(_) => last,
        }
    }

    /// Keeps the count at most [`FLOW_COUNT_INTERVAL`] old.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLOW_COUNT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.fresh(FLOW_COUNT_INTERVAL).await;
            }
        })
    }
}
