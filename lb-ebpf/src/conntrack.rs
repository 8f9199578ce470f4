//! Connection tracking: a flow keeps its real across changes of the real set.
//!
//! The table (`XLB_FLOWS`) is xlb's own: buckets of four 16-byte ways in one
//! cache line, a flow known by a tag of the table's seeded hash; see
//! `lb_common::CtWay` and docs/architecture.md, "The conntrack table".
//!
//! - A TCP SYN always takes a fresh Maglev choice and (re)writes the entry, so a
//!   reused 5-tuple never inherits a stale real.
//! - Any other packet uses its entry when there is one and its real still
//!   exists: the real's slot is in use and has the generation the entry
//!   recorded (a slot given to another real has another generation); UDP
//!   entries idle longer than `Config::udp_idle_ns` (plus the stamp's grain,
//!   `lb_common::udp_stamp_grain_ns`) are ignored.
//! - A hit writes nothing but a stamp older than its grain, and the flags on
//!   its first hit (the flow is answered) and for flow sync's reports. The
//!   first hit also records the flow's key for userspace (`XLB_FLOW_KEYS`):
//!   a new entry writes only its bucket's line, so a flood's lone SYNs cost
//!   one line each. A tunnel's outer header needs the flow hash (an IPv6
//!   flow label, the host bits of an IPv4 tunnel source prefix), computed
//!   again on a hit; an IPv4 tunnel from one source address needs none.
//! - New entries are rate-limited per CPU (flood guard): above the limit the
//!   flow is forwarded by Maglev alone, which still gives a consistent answer
//!   while the real set is unchanged.
//! - Only an entry that did not exist (or had expired) counts as a new flow: a
//!   SYN retransmit, a flood-guard bypass or an ICMP error is no new flow.
//! - Flow sync (`Config::sync`): the first hit of an entry (the flow's second
//!   packet: a lone SYN or datagram never is one, so a flood sends nothing)
//!   reports the flow as confirmed, a FIN or RST from the client reports its
//!   end, each once (the way's flags; a report the full ring lost is tried
//!   again on the next packet). A non-SYN packet that misses takes the real a
//!   peer reported for its flow, when that real is still the one in this
//!   node's slot, and the entry is promoted into the conntrack table.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::size_of,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    CT_BUSY, CT_F_HIT, CT_F_UDP, CT_FLAGS_SHIFT, CT_REAL_BITS, CT_REAL_MASK, CT_TAG_MASK, CT_WAYS,
    Config, CtBucket, CtWay, FLOW_EVENT_END, FLOW_EVENT_NEW, FLOW_F_ENDED, FLOW_F_REPORTED,
    FlowEvent, FlowKey, PROTO_UDP, RealDef, TCP_STAMP_GRAIN_NS, VIP_F_HASH_SRC_ONLY, VIP_F_TUNNEL,
    VipMeta, WINDOW_NEW_FLOWS, ct_age_ns, ct_age_units, ct_evict_rank, ct_generation, ct_hash,
    ct_pin, ct_stamp, ct_tag, flow_hash, src_hash, stat, udp_stamp_grain_ns,
};

use crate::{
    forward,
    maps::{CLOCK, CT_PARAMS, FLOW_EVENTS, FLOW_KEYS, FLOWS, PEER_FLOWS},
    parse::Aligned,
    select, stats,
};

/// TCP flag bits (the header's 14th byte).
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

/// The real chosen for a flow and whether the flow is new.
pub struct Choice {
    pub real_id: u32,
    /// The real's definition (looked up once, used to forward).
    pub real: &'static RealDef,
    /// A conntrack entry was created for the flow (counted as a new flow).
    pub new_flow: bool,
    /// The flow's 5-tuple [`flow_hash`]; on a hit only for a tunnel VIP
    /// whose outer header uses it (0 otherwise: DR, and an IPv4 tunnel from
    /// a single source address, need none).
    pub hash: u32,
}

/// What the caller does with the flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// A packet of the flow: refresh its entry, record it when new, count events.
    Packet,
    /// An ICMP error about the flow: read the entry only (no stamp refresh, no
    /// new entry, no conntrack events).
    ErrorAbout,
}

/// Now, CLOCK_MONOTONIC at tick resolution (a few ms): the kernel's cached
/// time (`bpf_ktime_get_coarse_ns`), which every tracked packet can afford.
/// Stamps, idle timeouts and rate windows need no better.
///
/// That time only moves at a tick, when the jiffies counter does, so it is
/// read once per tick and CPU and kept in [`CLOCK`] with the jiffies it was
/// read at: a packet in the same tick reads the jiffies (one load, the
/// verifier inlines `bpf_jiffies64` on 64-bit JITs) and this CPU's element
/// (inlined too), and calls no helper. A CPU whose first packet of a tick
/// came between the jiffies' increment and the timekeeping update keeps the
/// previous tick's time for that tick: up to one tick behind, as any
/// coarse reading may be.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helpers without arguments or side effects.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's element of a per-CPU array; nothing else on this
    // CPU runs the program while it does.
    let cache = unsafe { &mut *cache };
    // A zero time is an element never written (it starts zeroed).
    if cache.jiffies == jiffies && cache.ns != 0 {
        return cache.ns;
    }
    // SAFETY: as above.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    cache.jiffies = jiffies;
    cache.ns = ns;
    ns
}

/// The real for `flow`: from the conntrack table, else from a peer's report,
/// else from the VIP's table (then recorded for [`Track::Packet`]). `None`
/// when the VIP has no usable real. The flow hash is only computed when the
/// table is consulted, or for a tunnel. `tcp_flags`: the TCP header's flags
/// (0 for UDP).
#[inline(always)]
pub fn choose(
    meta: &VipMeta,
    held: &Aligned<FlowKey>,
    tcp_flags: u8,
    track: Track,
    config: &Config,
) -> Option<Choice> {
    let flow = &held.0;
    let syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let packet = track == Track::Packet;
    let udp = flow.proto == PROTO_UDP;
    let table = Table::of(held);
    let mut stamp = 0u64;
    if !syn && let Some(table) = &table {
        match table.find() {
            Some(way) => {
                stamp = now();
                let age = ct_age_ns(stamp, way.stamp);
                let grain = if udp {
                    udp_stamp_grain_ns(config.udp_idle_ns)
                } else {
                    TCP_STAMP_GRAIN_NS
                };
                let fresh = !udp || age <= config.udp_idle_ns.saturating_add(grain);
                let real_id = way.pin & CT_REAL_MASK;
                if fresh
                    && let Some(real) = select::real(real_id)
                    && ct_generation(real.generation) == way.pin >> CT_REAL_BITS
                {
                    if packet {
                        // Coarsely, so that most packets write nothing (a
                        // written line must leave every other CPU's cache).
                        if age >= grain {
                            // SAFETY: a way of a live bucket; a 4-byte store
                            // that can only ever move a stamp.
                            unsafe {
                                write_volatile(addr_of_mut!((*way.at).stamp), ct_stamp(stamp))
                            };
                        }
                        stats::event(stat::CT_HIT);
                        let mut add = if config.sync != 0 {
                            report(held, &way, tcp_flags, stamp)
                        } else {
                            0
                        };
                        // The first hit marks the flow as answered: an
                        // insert into a full bucket evicts such flows last.
                        if (way.word >> CT_FLAGS_SHIFT) as u8 & CT_F_HIT == 0 {
                            add |= CT_F_HIT;
                        }
                        if add != 0 {
                            // A compare-and-swap, so that a way another CPU
                            // rewrote meanwhile keeps its own flags.
                            let word = way.word | (u64::from(add) << CT_FLAGS_SHIFT);
                            // SAFETY: a way of a live bucket.
                            let won = unsafe { cas(addr_of_mut!((*way.at).word), way.word, word) };
                            // The first answer records the flow's key for
                            // userspace: a flood's lone SYNs never write one.
                            if won && add & CT_F_HIT != 0 {
                                write_key(held, way.slot);
                            }
                        }
                    }
                    // Only a tunnel's outer header uses the flow hash, and
                    // not every one of them.
                    let hash = if meta.flags & VIP_F_TUNNEL != 0 && forward::uses_hash(real, config)
                    {
                        flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto)
                    } else {
                        0
                    };
                    return Some(Choice {
                        real_id,
                        real,
                        new_flow: false,
                        hash,
                    });
                }
                // An idle UDP entry is as good as gone: only a live entry
                // whose real is gone is stale.
                if fresh && packet {
                    stats::event(stat::CT_STALE);
                }
            }
            None => {
                if packet {
                    stats::event(stat::CT_MISS);
                    if config.sync != 0
                        && let Some(choice) = from_peer(flow, table)
                    {
                        return Some(choice);
                    }
                }
            }
        }
    }
    let hash = flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto);
    let maglev = if meta.flags & VIP_F_HASH_SRC_ONLY != 0 {
        src_hash(&flow.src)
    } else {
        hash
    };
    let real_id = select::pick(meta, maglev)?;
    let real = select::real(real_id)?;
    let mut new_flow = false;
    if packet
        && let Some(table) = &table
        && admit_new_flow(config)
    {
        if stamp == 0 {
            stamp = now();
        }
        let flags = if udp { CT_F_UDP } else { 0 };
        // A SYN did not look: a SYN whose tuple has an entry (a retransmit,
        // or a reused tuple) re-pins it without counting a new flow. Any
        // other packet got here without a usable entry (none, idle or
        // stale): a new flow for its real.
        match table.insert(flags, ct_pin(real_id, real.generation), ct_stamp(stamp)) {
            Insert::New => new_flow = true,
            Insert::Repinned => new_flow = !syn,
            Insert::Failed => stats::event(stat::CT_INSERT_FAILED),
        }
        if new_flow {
            stats::event(stat::CT_NEW);
        }
    }
    Some(Choice {
        real_id,
        real,
        new_flow,
        hash,
    })
}

/// What an insert did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// The flow took an empty way, or evicted the bucket's oldest flow.
    New,
    /// The flow had a way (idle, stale, or a SYN's retransmit): rewritten.
    Repinned,
    /// Every way was being written by other CPUs, or one took the chosen
    /// way first: the flow goes untracked this time.
    Failed,
}

/// A flow's place in the conntrack table: its bucket and tag.
struct Table<'a> {
    key: &'a Aligned<FlowKey>,
    bucket: *mut CtBucket,
    index: u32,
    tag: u64,
}

/// A way found for a flow, as read.
struct Found {
    at: *mut CtWay,
    /// The way's index in `XLB_FLOW_KEYS` (bucket × ways + way).
    slot: u32,
    word: u64,
    stamp: u32,
    pin: u32,
}

// The key's words are read from its 8-aligned holder.
const _: () = assert!(size_of::<Aligned<FlowKey>>() == size_of::<[u64; 5]>());

/// The key as five words, read from its 8-aligned holder (a 40-byte struct
/// copy is a memmove call in BPF).
#[inline(always)]
fn key_words(key: &Aligned<FlowKey>) -> [u64; 5] {
    // SAFETY: an 8-aligned 40-byte value (asserted above) read as five words.
    unsafe { (key as *const Aligned<FlowKey>).cast::<[u64; 5]>().read() }
}

impl<'a> Table<'a> {
    /// The flow's bucket; `None` before the daemon sized the table.
    #[inline(always)]
    fn of(key: &'a Aligned<FlowKey>) -> Option<Self> {
        let params = CT_PARAMS.get(0)?;
        let shift = params.shift;
        if shift == 0 || shift > 63 {
            return None;
        }
        let h = ct_hash(params.seed, &key_words(key));
        let index = (h >> shift) as u32;
        let bucket = FLOWS.get_ptr_mut(index)?;
        Some(Self {
            key,
            bucket,
            index,
            tag: ct_tag(h),
        })
    }

    /// The way holding the flow. Its word is read again after its stamp and
    /// pin: a way rewritten in between (by an insert, which first marks it
    /// busy) is no hit.
    #[inline(always)]
    fn find(&self) -> Option<Found> {
        for i in 0..CT_WAYS as usize {
            // SAFETY: `bucket` is a live element of FLOWS; `i` is below its
            // way count. Volatile: each read happens, in this order.
            unsafe {
                let at = addr_of_mut!((*self.bucket).ways[i]);
                let word = read_volatile(addr_of!((*at).word));
                if word & CT_TAG_MASK == self.tag {
                    let stamp = read_volatile(addr_of!((*at).stamp));
                    let pin = read_volatile(addr_of!((*at).pin));
                    let again = read_volatile(addr_of!((*at).word));
                    if again & CT_TAG_MASK != self.tag {
                        return None;
                    }
                    return Some(Found {
                        at,
                        slot: self.index.wrapping_mul(CT_WAYS) + i as u32,
                        word: again,
                        stamp,
                        pin,
                    });
                }
            }
        }
        None
    }

    /// Writes the flow's entry: into its own way, else an empty one, else
    /// the way of the highest `ct_evict_rank` (a way another CPU is writing
    /// is left alone). The way is claimed with a compare-and-swap, so two CPUs
    /// never write one way at once.
    #[inline(always)]
    fn insert(&self, flags: u8, pin: u32, stamp: u32) -> Insert {
        let mut own = CT_WAYS;
        let mut empty = CT_WAYS;
        let mut oldest = CT_WAYS;
        let mut oldest_rank = 0u64;
        let mut words = [0u64; CT_WAYS as usize];
        for (i, seen) in words.iter_mut().enumerate() {
            // SAFETY: as in `find`.
            unsafe {
                let at = addr_of!((*self.bucket).ways[i]);
                let word = read_volatile(addr_of!((*at).word));
                *seen = word;
                if word & CT_TAG_MASK == self.tag {
                    // The first, as `find` reads it (two ways of one flow
                    // need a race; the later one ages out).
                    if own == CT_WAYS {
                        own = i as u32;
                    }
                } else if word == 0 {
                    if empty == CT_WAYS {
                        empty = i as u32;
                    }
                } else if word & CT_TAG_MASK != 0 {
                    // A flood's lone SYNs first, then idle flows, then
                    // handshakes under way, then active flows (`ct_evict_rank`).
                    let age = ct_age_units(stamp, read_volatile(addr_of!((*at).stamp)));
                    let rank = ct_evict_rank((word >> CT_FLAGS_SHIFT) as u8, age);
                    if oldest == CT_WAYS || rank > oldest_rank {
                        oldest = i as u32;
                        oldest_rank = rank;
                    }
                }
            }
        }
        let (way, outcome) = if own < CT_WAYS {
            (own, Insert::Repinned)
        } else if empty < CT_WAYS {
            (empty, Insert::New)
        } else if oldest < CT_WAYS {
            (oldest, Insert::New)
        } else {
            return Insert::Failed;
        };
        let i = (way & (CT_WAYS - 1)) as usize;
        // SAFETY: as in `find`; the compare-and-swap makes this CPU the
        // way's only writer until it stores the word.
        unsafe {
            let at = addr_of_mut!((*self.bucket).ways[i]);
            if !cas(addr_of_mut!((*at).word), words[i], CT_BUSY) {
                return Insert::Failed;
            }
            // An entry that is answered already (a peer's flow) records its
            // key now; any other at its first hit.
            if flags & CT_F_HIT != 0 {
                write_key(self.key, self.index.wrapping_mul(CT_WAYS) + way);
            }
            write_volatile(addr_of_mut!((*at).stamp), stamp);
            write_volatile(addr_of_mut!((*at).pin), pin);
            write_volatile(
                addr_of_mut!((*at).word),
                self.tag | (u64::from(flags) << CT_FLAGS_SHIFT),
            );
        }
        outcome
    }
}

/// Records `key` as the key of the way at `slot` of `XLB_FLOW_KEYS`, for
/// userspace (flow sync's full copies), which keeps a key only
/// when it hashes to its way's bucket and tag.
#[inline(always)]
fn write_key(key: &Aligned<FlowKey>, slot: u32) {
    let Some(at) = FLOW_KEYS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: an element of the keys array, written as five words.
    unsafe { at.cast::<[u64; 5]>().write(key_words(key)) };
}

/// Compare-and-swap of a word in a map value: `true` when `*p` was `old` and
/// is now `new`. BPF_CMPXCHG (a full barrier; the verifier allows it on
/// map values).
#[inline(always)]
unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: the caller's pointer is an aligned word of a map value.
    // Success is read from the returned old value: the intrinsic's own flag
    // makes bitcode that bpf-linker's LLVM refuses ("Invalid record").
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).0
            == old
    }
}

/// Flow sync: reports a tracked flow's confirmation (its first hit) or its
/// end (a FIN or RST), each once. Returns the flags to mark the way with
/// (none when the report did not get into the ring: tried again on the next
/// packet).
#[inline(always)]
fn report(flow: &Aligned<FlowKey>, way: &Found, tcp_flags: u8, stamp: u64) -> u8 {
    let flags = (way.word >> CT_FLAGS_SHIFT) as u8;
    let reported = FLOW_F_REPORTED as u8;
    let ended = FLOW_F_ENDED as u8;
    if flags & reported == 0 && tcp_flags & TCP_RST != 0 {
        // Reset before it was confirmed (a client refusing a spoofed
        // handshake's SYN-ACK): nothing worth a peer's memory.
        return reported | ended;
    }
    let (kind, add) = if flags & reported == 0 {
        (FLOW_EVENT_NEW, reported)
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 && flags & ended == 0 {
        (FLOW_EVENT_END, ended)
    } else {
        return 0;
    };
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        stats::event(stat::SYNC_LOST);
        return 0;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` is the reserved record, written whole before the submit
    // (the key as five words).
    unsafe {
        addr_of_mut!((*event).flow)
            .cast::<[u64; 5]>()
            .write(key_words(flow));
        addr_of_mut!((*event).real_id).write(way.pin & CT_REAL_MASK);
        addr_of_mut!((*event).generation).write(way.pin >> CT_REAL_BITS);
        addr_of_mut!((*event).kind).write(kind);
        addr_of_mut!((*event)._pad).write(0);
        addr_of_mut!((*event).at_ns).write(stamp);
    }
    slot.submit(0);
    add
}

/// A flow another balancer reported, if its real is still the one in this
/// node's slot: promoted into the conntrack table (already known to the
/// peers, so not reported again) and forwarded there.
#[inline(always)]
fn from_peer(flow: &FlowKey, table: &Table) -> Option<Choice> {
    // SAFETY: a lookup in a map only this program and the daemon touch.
    let peer = unsafe { PEER_FLOWS.get(flow) }?;
    let real = select::real(peer.real_id)?;
    if real.generation != peer.generation {
        return None;
    }
    let udp = if flow.proto == PROTO_UDP { CT_F_UDP } else { 0 };
    let pin = ct_pin(peer.real_id, peer.generation);
    // Peers report confirmed flows only: answered already.
    let flags = udp | CT_F_HIT | FLOW_F_REPORTED as u8;
    if table.insert(flags, pin, ct_stamp(now())) == Insert::Failed {
        stats::event(stat::CT_INSERT_FAILED);
    }
    stats::event(stat::CT_PEER_HIT);
    Some(Choice {
        real_id: peer.real_id,
        real,
        new_flow: false,
        hash: peer.hash,
    })
}

/// The flood guard: may this CPU track one more new flow in this second?
#[inline(always)]
fn admit_new_flow(config: &Config) -> bool {
    let ok = stats::admit(WINDOW_NEW_FLOWS, config.new_flow_limit);
    if !ok {
        stats::event(stat::CT_FLOOD_BYPASS);
    }
    ok
}
