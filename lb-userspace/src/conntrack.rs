//! The conntrack table as userspace sees it: `XLB_FLOWS` (buckets of four
//! ways, see [`lb_common::CtWay`]), `XLB_FLOW_KEYS` (each way's key) and
//! `XLB_CT_PARAMS` (the table's seed and size), both arrays memory-mapped.
//!
//! The data path writes the table; the daemon only reads it (counting, full
//! copies to peers). The data path records a flow's key at its first hit
//! (its answer), not when it inserts the entry: a flow never answered is
//! counted but has no key to copy. [`Table::insert`] and [`Table::remove`]
//! exist for tests and the bench, which write entries while no packet flows.
//! A read takes each way's word, stamp and pin, then the word again, and
//! drops a way that changed meanwhile; a listed entry's key is checked
//! against its bucket and tag, so a way caught mid-write is never listed
//! under another flow's key.

use std::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya::maps::{Array, Map, MapData};
use lb_common::{
    CT_F_UDP, CT_FLAGS_SHIFT, CT_REAL_BITS, CT_REAL_MASK, CT_STAMP_SHIFT, CT_TAG_MASK, CT_WAYS,
    CtBucket, CtParams, CtWay, FLOW_F_ENDED, FLOW_F_REPORTED, FlowKey, FlowState, PROTO_UDP,
    ct_age_units, ct_buckets, ct_evict_rank, ct_hash, ct_pin, ct_stamp, ct_tag, ct_words,
    flow_hash, map_names,
};

use crate::dataplane::{DataplaneError, Mapped, map_err};

/// The conntrack table, memory-mapped.
pub struct Table {
    buckets: Mapped<CtBucket>,
    keys: Mapped<FlowKey>,
    params: CtParams,
}

/// A way as read: its word (tag and flags), stamp and pin.
#[derive(Clone, Copy, Debug)]
pub struct Way {
    /// Tag (low 56 bits) and flags (top byte).
    pub word: u64,
    /// [`CtWay::stamp`].
    pub stamp: u32,
    /// [`CtWay::pin`].
    pub pin: u32,
}

impl Way {
    /// The real id the flow is pinned to.
    pub fn real_id(&self) -> u32 {
        self.pin & CT_REAL_MASK
    }

    /// The generation bits the entry keeps ([`lb_common::ct_generation`]).
    pub fn generation(&self) -> u32 {
        self.pin >> CT_REAL_BITS
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        (self.word >> CT_FLAGS_SHIFT) as u8
    }

    /// A UDP flow.
    pub fn udp(&self) -> bool {
        self.flags() & CT_F_UDP != 0
    }

    /// `CLOCK_MONOTONIC` of the last packet, ns (0: never stamped), given
    /// the time now.
    pub fn last_seen_ns(&self, now_ns: u64) -> u64 {
        if self.stamp == 0 {
            return 0;
        }
        // The stamp's unit, with the high bits of now (a stamp is never
        // ahead of now, so at most one wrap back).
        let now_units = now_ns >> CT_STAMP_SHIFT;
        let age_units = u64::from(ct_age_units(now_units as u32, self.stamp));
        now_units.saturating_sub(age_units) << CT_STAMP_SHIFT
    }
}

/// Where a flow sits: its bucket index and tag.
struct Place {
    bucket: usize,
    tag: u64,
}

impl Table {
    /// The table of the given maps (`XLB_FLOWS`, `XLB_FLOW_KEYS`,
    /// `XLB_CT_PARAMS`). Parameters that match the table's size are kept (a
    /// table pinned by an earlier load keeps its seed, so its flows stay
    /// where they were put); a table just created gets a random seed.
    pub fn open(buckets: MapData, keys: MapData, params: MapData) -> Result<Self, DataplaneError> {
        let count = buckets
            .info()
            .map_err(map_err(map_names::FLOWS))?
            .max_entries();
        if !count.is_power_of_two() || count < 2 {
            return Err(DataplaneError::Invalid(format!(
                "the conntrack table has {count} buckets, not a power of two of at least 2"
            )));
        }
        let key_count = keys
            .info()
            .map_err(map_err(map_names::FLOW_KEYS))?
            .max_entries();
        if key_count != count * CT_WAYS {
            return Err(DataplaneError::Invalid(format!(
                "the conntrack table has {count} buckets but {key_count} keys (expected {})",
                count * CT_WAYS
            )));
        }
        let shift = 64 - count.trailing_zeros();
        let mut params_map: Array<MapData, CtParams> =
            Array::try_from(Map::Array(params)).map_err(map_err(map_names::CT_PARAMS))?;
        let current = params_map
            .get(&0, 0)
            .map_err(map_err(map_names::CT_PARAMS))?;
        let params = if current.shift == shift && current.seed != 0 {
            current
        } else {
            let fresh = CtParams {
                seed: random_seed(),
                shift,
                _pad: 0,
            };
            params_map
                .set(0, &fresh, 0)
                .map_err(map_err(map_names::CT_PARAMS))?;
            fresh
        };
        Ok(Self {
            buckets: Mapped::new(buckets, count as usize, map_names::FLOWS)?,
            keys: Mapped::new(keys, (count * CT_WAYS) as usize, map_names::FLOW_KEYS)?,
            params,
        })
    }

    /// The table pinned in `dir` (a versioned pin directory,
    /// `PIN_DIR/v{LAYOUT_VERSION}`), for tools and tests.
    pub fn open_pinned(dir: &std::path::Path) -> Result<Self, DataplaneError> {
        let pinned = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(map_err(name));
        Self::open(
            pinned(map_names::FLOWS)?,
            pinned(map_names::FLOW_KEYS)?,
            pinned(map_names::CT_PARAMS)?,
        )
    }

    /// Flows the table is sized for: a quarter of its ways, one per bucket
    /// (see [`lb_common::ct_buckets`]).
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.buckets.len()).unwrap_or(u32::MAX)
    }

    fn place(&self, key: &FlowKey) -> Place {
        let h = ct_hash(self.params.seed, &ct_words(key));
        Place {
            bucket: (h >> self.params.shift) as usize,
            tag: ct_tag(h),
        }
    }

    /// The bucket `key` belongs to.
    pub fn bucket_of(&self, key: &FlowKey) -> usize {
        self.place(key).bucket
    }

    fn way_ptr(&self, bucket: usize, way: usize) -> *mut CtWay {
        debug_assert!(bucket < self.buckets.len() && way < CT_WAYS as usize);
        // SAFETY: inside the mapping (bucket below its length, way below 4).
        unsafe { addr_of_mut!((*self.buckets.as_ptr().add(bucket)).ways[way]) }
    }

    /// Way `way` of bucket `bucket`, read as the data path reads it: `None`
    /// when empty, being written, or changed while it was read.
    pub fn way(&self, bucket: usize, way: usize) -> Option<Way> {
        let at = self.way_ptr(bucket, way);
        // SAFETY: a way inside the mapping; the data path writes it
        // concurrently, so every field is read once, volatile, as a whole.
        unsafe {
            let word = read_volatile(addr_of!((*at).word));
            if word & CT_TAG_MASK == 0 {
                return None;
            }
            let stamp = read_volatile(addr_of!((*at).stamp));
            let pin = read_volatile(addr_of!((*at).pin));
            let again = read_volatile(addr_of!((*at).word));
            (again & CT_TAG_MASK == word & CT_TAG_MASK).then_some(Way {
                word: again,
                stamp,
                pin,
            })
        }
    }

    /// The key recorded for way `way` of bucket `bucket`.
    fn key_of(&self, bucket: usize, way: usize) -> FlowKey {
        let i = bucket * CT_WAYS as usize + way;
        // SAFETY: inside the mapping; a key the data path is writing is
        // caught by the tag check of the callers.
        unsafe { read_volatile(self.keys.as_ptr().add(i)) }
    }

    /// The flow's entry as a [`FlowState`] (the generation as the entry
    /// keeps it: [`lb_common::ct_generation`]; the hash recomputed).
    fn state(key: &FlowKey, way: &Way, now_ns: u64) -> FlowState {
        FlowState {
            real_id: way.real_id(),
            generation: way.generation(),
            last_seen_ns: way.last_seen_ns(now_ns),
            hash: flow_hash(&key.src, &key.dst, key.ports, key.proto),
            flags: u32::from(way.flags()) & (FLOW_F_REPORTED | FLOW_F_ENDED),
        }
    }

    /// The way of `key`: the first in its bucket with its tag, as the data
    /// path finds it (the key is not compared: a flow never answered has no
    /// key recorded, and two flows of one bucket share a tag with
    /// probability 2^-56 per way).
    fn find(&self, key: &FlowKey) -> Option<(usize, usize, Way)> {
        let place = self.place(key);
        (0..CT_WAYS as usize).find_map(|i| {
            let way = self.way(place.bucket, i)?;
            (way.word & CT_TAG_MASK == place.tag).then_some((place.bucket, i, way))
        })
    }

    /// The entry of `key`, if tracked.
    pub fn get(&self, key: &FlowKey) -> Option<FlowState> {
        let now = monotonic_ns();
        self.find(key)
            .map(|(_, _, way)| Self::state(key, &way, now))
    }

    /// Writes `key`'s entry where the data path would: its own way, else an
    /// empty one, else the way of the highest [`lb_common::ct_evict_rank`]. For tests and the
    /// bench (no packet may write the bucket meanwhile). The generation is
    /// kept as the entry keeps it, the hash is not stored (it is the key's).
    pub fn insert(&self, key: &FlowKey, state: &FlowState) {
        let place = self.place(key);
        let stamp = if state.last_seen_ns == 0 {
            0
        } else {
            ct_stamp(state.last_seen_ns)
        };
        let mut chosen = None;
        let mut empty = None;
        let mut oldest: Option<(usize, u64)> = None;
        for i in 0..CT_WAYS as usize {
            match self.way(place.bucket, i) {
                Some(way) if way.word & CT_TAG_MASK == place.tag => {
                    chosen = Some(i);
                    break;
                }
                Some(way) => {
                    let rank = ct_evict_rank(way.flags(), ct_age_units(stamp, way.stamp));
                    if oldest.is_none_or(|(_, r)| rank > r) {
                        oldest = Some((i, rank));
                    }
                }
                None => {
                    if empty.is_none() {
                        empty = Some(i);
                    }
                }
            }
        }
        let i = chosen.or(empty).or(oldest.map(|(i, _)| i)).unwrap_or(0);
        let mut flags = (state.flags & (FLOW_F_REPORTED | FLOW_F_ENDED)) as u8;
        if key.proto == PROTO_UDP {
            flags |= CT_F_UDP;
        }
        let at = self.way_ptr(place.bucket, i);
        let slot = place.bucket * CT_WAYS as usize + i;
        // SAFETY: inside the mappings; the word is cleared first (the way
        // matches no flow while it is written), then the key (the data path
        // writes it at the first hit, this always), the stamp, the pin and
        // last the word, as the data path orders its own writes.
        unsafe {
            write_volatile(addr_of_mut!((*at).word), 0);
            write_volatile(self.keys.as_ptr().add(slot), *key);
            write_volatile(addr_of_mut!((*at).stamp), stamp);
            write_volatile(
                addr_of_mut!((*at).pin),
                ct_pin(state.real_id, state.generation),
            );
            write_volatile(
                addr_of_mut!((*at).word),
                place.tag | (u64::from(flags) << CT_FLAGS_SHIFT),
            );
        }
    }

    /// Removes `key`'s entry; `false` when it had none. For tests and the bench.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let Some((bucket, i, _)) = self.find(key) else {
            return false;
        };
        let at = self.way_ptr(bucket, i);
        // SAFETY: inside the mapping.
        unsafe { write_volatile(addr_of_mut!((*at).word), 0) };
        true
    }

    /// Whether any way of bucket `b` holds something: the ways' words or-ed,
    /// so that a walk skips an empty bucket with one load per way.
    fn occupied(&self, b: usize) -> bool {
        let mut any = 0;
        for i in 0..CT_WAYS as usize {
            // SAFETY: a way inside the mapping, read as in `way`.
            any |= unsafe { read_volatile(addr_of!((*self.way_ptr(b, i)).word)) };
        }
        any != 0
    }

    /// Calls `f` for every way in use, without its key (what counting needs).
    pub fn for_each_way(&self, mut f: impl FnMut(&Way)) {
        for b in 0..self.buckets.len() {
            if !self.occupied(b) {
                continue;
            }
            for i in 0..CT_WAYS as usize {
                if let Some(way) = self.way(b, i) {
                    f(&way);
                }
            }
        }
    }

    /// Calls `f` for every tracked flow whose key is recorded, with that key:
    /// the flows answered at least once (the data path records a key at a
    /// flow's first hit, and a peer's flow when it is promoted) and those
    /// [`Table::insert`] wrote. A way whose key does not hash to its bucket
    /// and tag (never answered, or being rewritten) is left out.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowState)) {
        let now = monotonic_ns();
        for b in 0..self.buckets.len() {
            if !self.occupied(b) {
                continue;
            }
            for i in 0..CT_WAYS as usize {
                let Some(way) = self.way(b, i) else {
                    continue;
                };
                let key = self.key_of(b, i);
                let place = self.place(&key);
                if place.bucket == b && place.tag == way.word & CT_TAG_MASK {
                    f(&key, &Self::state(&key, &way, now));
                }
            }
        }
    }

    /// Ways in use.
    pub fn len(&self) -> usize {
        let mut n = 0;
        self.for_each_way(|_| n += 1);
        n
    }

    /// No way in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Buckets and keys to create for a table sized for `flows` flows.
pub fn sizes(flows: u32) -> (u32, u32) {
    let buckets = ct_buckets(flows);
    (buckets, buckets * CT_WAYS)
}

/// A random, nonzero seed (`getrandom`), or a time-derived one if the
/// kernel's generator cannot be read.
fn random_seed() -> u64 {
    let mut seed = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `seed`.
    let got = unsafe { libc::getrandom(addr_of_mut!(seed).cast(), size_of::<u64>(), 0) };
    if got != 8 {
        seed = monotonic_ns() ^ u64::from(std::process::id()).rotate_left(32);
    }
    seed | 1
}

/// `CLOCK_MONOTONIC` in ns: the clock of the data path's stamps.
pub fn monotonic_ns() -> u64 {
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

#[cfg(test)]
mod tests {
    use lb_common::{CT_STAMP_SHIFT, ct_generation, ct_stamp};

    use super::*;

    #[test]
    fn a_table_has_four_ways_per_flow_in_whole_buckets() {
        assert_eq!(sizes(4096), (4096, 16384));
        assert_eq!(sizes(3000), (4096, 16384), "rounded up to a power of two");
        assert_eq!(sizes(1), (2, 8), "at least two buckets");
        assert_eq!(sizes(134_217_728), (1 << 27, 1 << 29), "the largest size");
    }

    #[test]
    fn a_pin_keeps_the_real_and_the_low_generation_bits() {
        let pin = ct_pin(16383, 0x0004_0005);
        let way = Way {
            word: 1,
            stamp: 1,
            pin,
        };
        assert_eq!(way.real_id(), 16383);
        assert_eq!(way.generation(), 5, "bits above the 18 kept are dropped");
        assert_eq!(way.generation(), ct_generation(0x0004_0005));
    }

    #[test]
    fn a_stamp_reads_back_as_the_time_it_was_taken_to_its_unit() {
        let unit = 1u64 << CT_STAMP_SHIFT;
        for taken in [5 * unit + 7, (u64::from(u32::MAX) + 3) * unit + 1] {
            let way = Way {
                word: 1,
                stamp: ct_stamp(taken),
                pin: 0,
            };
            // Read later, also across the stamp's 32-bit wrap.
            for later in [0, unit, 1000 * unit] {
                assert_eq!(way.last_seen_ns(taken + later), taken / unit * unit);
            }
        }
        let never = Way {
            word: 1,
            stamp: 0,
            pin: 0,
        };
        assert_eq!(never.last_seen_ns(123 * unit), 0, "never stamped");
    }

    #[test]
    fn a_full_bucket_gives_up_a_flood_s_lone_syn_then_idle_then_handshake_then_active() {
        use lb_common::{CT_F_HIT, CT_GRACE_UNITS, CT_IDLE_UNITS, ct_age_units, ct_evict_rank};
        let lone_syn = ct_evict_rank(0, CT_GRACE_UNITS);
        let idle = ct_evict_rank(CT_F_HIT, CT_IDLE_UNITS + 5);
        let handshake = ct_evict_rank(0, CT_GRACE_UNITS - 1);
        let active = ct_evict_rank(CT_F_HIT, CT_IDLE_UNITS - 1);
        assert!(lone_syn > idle && idle > handshake && handshake > active);
        assert!(
            ct_evict_rank(CT_F_HIT, 10) > ct_evict_rank(CT_F_HIT, 9),
            "the least recently seen first within a rank"
        );
        // A stamp a little ahead of now (another CPU's clock) is no age.
        assert_eq!(ct_age_units(100, 102), 0);
        assert_eq!(ct_age_units(2, u32::MAX), 3, "across the wrap");
    }

    #[test]
    fn tags_are_never_zero_and_seeds_move_flows() {
        let words = [1, 2, 3, 4, 5];
        for seed in 0..1000u64 {
            assert_ne!(ct_tag(ct_hash(seed, &words)), 0);
        }
        assert_ne!(ct_hash(1, &words), ct_hash(3, &words));
    }
}
