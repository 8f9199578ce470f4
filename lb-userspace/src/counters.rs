//! Reading what the data path counts, on handles of its own: the per-CPU
//! verdict, event, VIP and real counters, and the conntrack table.
//!
//! The conntrack table can hold millions of flows. [`Reader::flows_by_slot`]
//! walks it with `BPF_MAP_LOOKUP_BATCH` (thousands of entries per system call)
//! on its own file descriptor, from a task of its own ([`spawn_flow_counter`]),
//! and publishes the counts: a status call or a metrics scrape only reads the
//! last published counts, and nothing waits on the walk.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{Counter, FlowKey, FlowState, PROTO_UDP, map_names, stat, udp_stamp_grain_ns};
use tokio::sync::watch;

use crate::dataplane::{Dataplane, DataplaneError, map_err, sum};

/// A TCP flow whose last packet is older than this does not count as active
/// (its conntrack entry stays until the LRU evicts it).
pub const TCP_ACTIVE: Duration = Duration::from_secs(60);

/// How often the conntrack table is counted.
pub const FLOW_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Read-only handles on the counters and the conntrack table.
pub struct Reader {
    stats: PerCpuArray<MapData, Counter>,
    vip_stats: PerCpuArray<MapData, Counter>,
    real_stats: PerCpuArray<MapData, Counter>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    capacity: u32,
}

/// Conntrack entries counted by one walk.
#[derive(Clone, Debug, Default)]
pub struct FlowCounts {
    /// Active flows by real slot id and the slot's generation when the flow
    /// was tracked (entries of an earlier owner of the slot id do not count
    /// for the current one).
    pub by_slot: BTreeMap<(u32, u32), u64>,
    /// Every entry in the table (active or not).
    pub entries: u64,
    /// When the walk ended (`None`: never counted yet).
    pub at: Option<Instant>,
    /// How long the walk took.
    pub took: Duration,
}

impl Reader {
    /// A reader of `dp`'s counters and conntrack table, on file descriptors
    /// of its own: readers never wait on the task that writes the maps.
    pub fn of(dp: &Dataplane) -> Result<Self, DataplaneError> {
        let [stats, vip_stats, real_stats, flows] = dp.reader_maps()?;
        let capacity = flows
            .info()
            .map_err(map_err(map_names::FLOWS))?
            .max_entries();
        Ok(Self {
            stats: typed(stats, map_names::STATS)?,
            vip_stats: typed(vip_stats, map_names::VIP_STATS)?,
            real_stats: typed(real_stats, map_names::REAL_STATS)?,
            flows: typed(flows, map_names::FLOWS)?,
            capacity,
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

    /// The conntrack table's capacity (entries).
    pub fn flow_capacity(&self) -> u32 {
        self.capacity
    }

    /// Counts the conntrack table: every entry, and per real slot the active
    /// ones (UDP: seen within `udp_idle` plus the stamp's grain, as the data
    /// path decides; TCP: within [`TCP_ACTIVE`], or never stamped).
    pub fn flows_by_slot(&self, udp_idle: Duration) -> Result<FlowCounts, DataplaneError> {
        let started = Instant::now();
        let now = monotonic_ns();
        let mut counts = FlowCounts::default();
        let udp_idle_ns = u64::try_from(udp_idle.as_nanos()).unwrap_or(u64::MAX);
        let udp_window = udp_idle_ns.saturating_add(udp_stamp_grain_ns(udp_idle_ns));
        let tcp_window = u64::try_from(TCP_ACTIVE.as_nanos()).unwrap_or(u64::MAX);
        let mut count = |key: &FlowKey, state: &FlowState| {
            counts.entries += 1;
            let window = if key.proto == PROTO_UDP {
                udp_window
            } else {
                tcp_window
            };
            if state.last_seen_ns == 0 || now.saturating_sub(state.last_seen_ns) <= window {
                *counts
                    .by_slot
                    .entry((state.real_id, state.generation))
                    .or_default() += 1;
            }
        };
        match walk_batched(&self.flows, &mut count) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A kernel without batched lookups on this map: one entry at a time.
                for item in self.flows.iter() {
                    let (k, v) = item.map_err(map_err(map_names::FLOWS))?;
                    count(&k, &v);
                }
            }
            Err(e) => {
                return Err(DataplaneError::Map {
                    name: map_names::FLOWS,
                    source: aya::maps::MapError::IoError(e),
                });
            }
        }
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

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` for every entry of `map`, fetching them in batches.
fn walk_batched(
    map: &HashMap<MapData, FlowKey, FlowState>,
    f: &mut impl FnMut(&FlowKey, &FlowState),
) -> std::io::Result<()> {
    use aya::maps::IterableMap as _;
    const BATCH: usize = 4096;
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut keys = vec![
        FlowKey {
            src: [0; 16],
            dst: [0; 16],
            ports: 0,
            proto: 0,
            family: 0,
            _pad: [0; 2],
        };
        BATCH
    ];
    let mut values = vec![FlowState::default(); BATCH];
    // The hash map's cursor is a bucket index (u32); room for a u64 to be safe.
    let mut cursor = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: u32::try_from(fd).unwrap_or(0),
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and values
        // of the map's key and value sizes, and at two cursor words, all of
        // which outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let got = attr.count as usize;
        for i in 0..got.min(BATCH) {
            f(&keys[i], &values[i]);
        }
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
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
    /// when that is longer: the last one, or a new walk.
    pub async fn fresh(&self, max_age: Duration) -> Arc<FlowCounts> {
        let young = |c: &FlowCounts| {
            let age = max_age.max(c.took * 10);
            c.at.is_some_and(|at| at.elapsed() <= age)
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
