//! Typed handles on the XDP program's maps: the only code that writes them.
//!
//! The daemon, the tests and the benchmarks all go through [`Dataplane`], so
//! what the tests check is exactly what the daemon does.

use std::{
    collections::HashSet, ffi::CString, os::fd::AsFd as _, path::PathBuf, ptr::NonNull, sync::Arc,
};

use crate::{
    conntrack::{self, Table},
    pin::PinDir,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode},
    util::nr_cpus,
};
use lb_common::{
    AddrKey, Config, Counter, FLOWS_DEFAULT, FlowKey, FlowState, MAX_REALS, MAX_VIPS, RING_ENTRIES,
    RING_POOL, RING_SIZE_MAX, RealDef, VIP_FILTER_BITS_LOG2, VIP_FILTER_WORDS, VIP_SLOTS_LEN,
    VipKey, VipMeta, map_names, prog_names, stat, vip_filter_slot, vip_slot_tag,
};

/// The compiled balancer object, built by build.rs with aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Sizes and pinning chosen when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the connection-tracking table (all CPUs together).
    pub flows: u32,
    /// Pin (or reuse pinned) maps here; `None`: maps live as long as the process.
    pub pin: Option<PinDir>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flows: FLOWS_DEFAULT,
            pin: None,
        }
    }
}

/// Every map of the balancer object (`AYA_LOGS` carries the program's debug
/// log lines to the daemon).
pub const BALANCER_MAPS: [&str; 17] = [
    "AYA_LOGS",
    map_names::VIPS,
    map_names::VIP_SLOTS,
    map_names::VIP_ADDRS,
    map_names::VIP_FILTER,
    map_names::RINGS,
    map_names::REALS,
    map_names::CONFIG,
    map_names::FLOWS,
    map_names::FLOW_KEYS,
    map_names::CT_PARAMS,
    map_names::FLOOD,
    map_names::STATS,
    map_names::VIP_STATS,
    map_names::REAL_STATS,
    map_names::PEER_FLOWS,
    map_names::FLOW_EVENTS,
];

/// Failures loading the program or touching its maps. A variant that wraps
/// another error returns it as its `source()` and does not repeat it (print
/// the causes with [`crate::chain::Chain`] or anyhow's `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded (verifier, missing privileges, ...).
    #[error("loading the XDP object failed")]
    Load(#[from] aya::EbpfError),
    /// A program in the object could not be loaded or attached.
    #[error("XDP program {name}")]
    Program {
        /// Which program.
        name: &'static str,
        /// What went wrong.
        source: aya::programs::ProgramError,
    },
    /// A program the daemon needs is not in the object.
    #[error("program {0} is missing from the XDP object (build mismatch?)")]
    MissingProgram(&'static str),
    /// A map the daemon needs is not in the object.
    #[error("map {0} is missing from the XDP object (build mismatch?)")]
    MissingMap(&'static str),
    /// A map operation failed.
    #[error("map {name}")]
    Map {
        /// Which map.
        name: &'static str,
        /// What went wrong.
        source: aya::maps::MapError,
    },
    /// Memory-mapping the ring map failed.
    #[error("mapping {name} into memory failed")]
    Mmap {
        /// Which map.
        name: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The interface name is not valid.
    #[error("invalid interface name '{0}'")]
    IfaceName(String),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] crate::pin::PinError),
    /// An index outside a map's capacity.
    #[error("{what} {index} is out of range (capacity {capacity})")]
    OutOfRange {
        /// What kind of index.
        what: &'static str,
        /// The index given.
        index: u32,
        /// The capacity.
        capacity: u32,
    },
    /// A map that does not have the shape this xlb expects.
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A memory-mappable array map mapped into our memory as `len` values of
/// `T` with no gaps (the caller's `T` matches the kernel's layout: values
/// `round_up(value_size, 8)` bytes apart), written without a system call.
pub(crate) struct Mapped<T> {
    ptr: NonNull<T>,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is owned by this value and only written through &mut self.
unsafe impl<T> Send for Mapped<T> {}
// SAFETY: shared references only read (the conntrack table reads each value
// volatile: the data path writes it concurrently anyway).
unsafe impl<T> Sync for Mapped<T> {}

impl<T> Mapped<T> {
    pub(crate) fn new(map: MapData, len: usize, name: &'static str) -> Result<Self> {
        let bytes = len * size_of::<T>();
        let fd = map.fd().as_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of exactly `bytes` bytes; the
        // kernel keeps the map alive while the mapping exists.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<T>()).ok_or(DataplaneError::Mmap {
            name,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Self {
            ptr,
            len,
            _map: map,
        })
    }

    /// The first value (for volatile access by callers that stay below [`Self::len`]).
    pub(crate) fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }

    /// Values mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Values `[off, off + len)`; callers check the range.
    fn range(&self, off: u32, len: u32) -> &[T] {
        debug_assert!(off as usize + len as usize <= self.len);
        // SAFETY: the range is inside the mapping (checked by callers).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off as usize), len as usize) }
    }

    fn range_mut(&mut self, off: u32, len: u32) -> &mut [T] {
        debug_assert!(off as usize + len as usize <= self.len);
        // SAFETY: as above, and &mut self makes this the only writer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off as usize), len as usize) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what Mapped::new mapped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len * size_of::<T>());
        }
    }
}

/// The data of array map `name`, taken out of the object.
fn take_array(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData> {
    match take(ebpf, name)? {
        Map::Array(data) => Ok(data),
        _ => Err(DataplaneError::MissingMap(name)),
    }
}

/// The ring map: RING_ENTRIES entries of [u32; 2], exactly RING_POOL u32
/// slots with no gaps, so a table is written with one copy.
fn rings(map: MapData) -> Result<Mapped<u32>> {
    Mapped::new(map, (RING_ENTRIES as usize) * 2, map_names::RINGS)
}

/// `XLB_VIP_SLOTS` (`lb_common::VipSlot`) as five words per entry, and the
/// key whose entry each slot holds. The first VIP on a slot holds it; a VIP
/// that shares a slot with the holder is found by the program in
/// `XLB_VIPS`, and takes the slot over when the holder leaves.
struct VipSlots {
    entries: Mapped<[u64; 5]>,
    holders: std::collections::HashMap<u32, VipKey>,
}

impl VipSlots {
    /// Takes the slots over with the VIPs the map holds (a pinned map may be
    /// under a running program): per slot the first of its keys in key
    /// order; entries that already say so are left alone, the rest are
    /// written or emptied.
    fn new(map: MapData, vips: &[(VipKey, VipMeta)]) -> Result<Self> {
        let mut slots = Self {
            entries: Mapped::new(map, VIP_SLOTS_LEN as usize, map_names::VIP_SLOTS)?,
            holders: std::collections::HashMap::new(),
        };
        let mut first: std::collections::BTreeMap<u32, (VipKey, VipMeta)> =
            std::collections::BTreeMap::new();
        for (key, meta) in vips {
            first
                .entry(vip_slot(key))
                .and_modify(|held| {
                    if *key < held.0 {
                        *held = (*key, *meta);
                    }
                })
                .or_insert((*key, *meta));
        }
        for slot in 0..VIP_SLOTS_LEN {
            match first.get(&slot) {
                Some(&(key, meta)) => {
                    if slots.read(slot) != Some((key, meta)) {
                        slots.write(slot, &key, &meta);
                    }
                    slots.holders.insert(slot, key);
                }
                None if slots.read(slot).is_some() => slots.empty(slot),
                None => {}
            }
        }
        Ok(slots)
    }

    /// The VIP entry `slot` holds, `None` when it is empty (or being written).
    fn read(&self, slot: u32) -> Option<(VipKey, VipMeta)> {
        let w = &self.entries.range(slot, 1)[0];
        // SAFETY: reads of our mapping; volatile, as the program's are.
        let [hi, lo, tag, m0, m1] =
            std::array::from_fn(|i| unsafe { std::ptr::read_volatile(&w[i]) });
        let [port0, port1, proto, family, ..] = tag.to_ne_bytes();
        if family == 0 {
            return None;
        }
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&hi.to_ne_bytes());
        addr[8..].copy_from_slice(&lo.to_ne_bytes());
        let key = VipKey {
            addr,
            port_be: u16::from_ne_bytes([port0, port1]),
            proto,
            family,
        };
        // SAFETY: VipMeta is 16 bytes of plain integers.
        let meta = unsafe { std::mem::transmute::<[u64; 2], VipMeta>([m0, m1]) };
        Some((key, meta))
    }

    /// Writes `key` and `meta` into `slot` in the order `lb_common::VipSlot`
    /// gives: the entry matches no key until its last word is written.
    fn write(&mut self, slot: u32, key: &VipKey, meta: &VipMeta) {
        let w = &mut self.entries.range_mut(slot, 1)[0];
        let [hi, lo] = key_words(key);
        // SAFETY: VipMeta is 16 bytes of plain integers.
        let [m0, m1] = unsafe { std::mem::transmute::<VipMeta, [u64; 2]>(*meta) };
        // SAFETY: aligned word stores into our mapping; the fences keep the
        // program from seeing them in another order.
        unsafe {
            let seq = (std::ptr::read_volatile(&w[2]) >> 32) as u32;
            std::ptr::write_volatile(&mut w[2], u64::from(seq.wrapping_add(1)) << 32);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            std::ptr::write_volatile(&mut w[0], hi);
            std::ptr::write_volatile(&mut w[1], lo);
            std::ptr::write_volatile(&mut w[3], m0);
            std::ptr::write_volatile(&mut w[4], m1);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let tag = vip_slot_tag(key.port_be, key.proto, key.family);
            std::ptr::write_volatile(
                &mut w[2],
                u64::from(tag) | u64::from(seq.wrapping_add(2)) << 32,
            );
        }
    }

    /// Empties `slot`: its tag word gets family 0 and a new `seq`.
    fn empty(&mut self, slot: u32) {
        let w = &mut self.entries.range_mut(slot, 1)[0];
        // SAFETY: as in write.
        unsafe {
            let seq = (std::ptr::read_volatile(&w[2]) >> 32) as u32;
            std::ptr::write_volatile(&mut w[2], u64::from(seq.wrapping_add(1)) << 32);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// `key` was put into `XLB_VIPS` with `meta`: its slot follows when it is
    /// free or already `key`'s.
    fn put(&mut self, key: &VipKey, meta: &VipMeta) {
        let slot = vip_slot(key);
        match self.holders.get(&slot) {
            Some(holder) if holder != key => {}
            _ => {
                self.write(slot, key, meta);
                self.holders.insert(slot, *key);
            }
        }
    }

    /// `key` is about to leave `XLB_VIPS`: its slot is emptied when it held
    /// it (the program then finds the key in `XLB_VIPS` until it is gone).
    /// Returns the slot to give to another key, if any.
    fn release(&mut self, key: &VipKey) -> Option<u32> {
        let slot = vip_slot(key);
        if self.holders.get(&slot) != Some(key) {
            return None;
        }
        self.empty(slot);
        self.holders.remove(&slot);
        Some(slot)
    }
}

/// A VIP key's address as the two native words the program compares.
fn key_words(key: &VipKey) -> [u64; 2] {
    let (hi, lo) = key.addr.split_at(8);
    [
        u64::from_ne_bytes(hi.try_into().expect("8 bytes")),
        u64::from_ne_bytes(lo.try_into().expect("8 bytes")),
    ]
}

/// The VIP filter (`XLB_VIP_FILTER`) and the keys behind its bits. The
/// program passes a packet whose bit is clear without looking its key up, so
/// a bit is set before its first key enters a VIP map and cleared only after
/// its last key left (each word is written whole, by this one writer). A
/// word write may reach the program byte by byte (the kernel copies array
/// values with `memcpy`), which is harmless: a write changes one bit, so
/// every byte the program can read is the old or the new one, and the other
/// bits of the word read the same either way.
struct VipFilter {
    map: Array<MapData, u64>,
    /// Keys holding each bit: how many.
    refs: Vec<u32>,
    vips: HashSet<VipKey>,
    addrs: HashSet<AddrKey>,
}

impl VipFilter {
    /// Takes the filter over, with every key the VIP maps already hold (a
    /// pinned map of an earlier run may be running under a program): every
    /// word is rewritten from them.
    fn new(
        map: Array<MapData, u64>,
        vips: impl IntoIterator<Item = VipKey>,
        addrs: impl IntoIterator<Item = AddrKey>,
    ) -> Result<Self> {
        let mut filter = Self {
            map,
            refs: vec![0; 1 << VIP_FILTER_BITS_LOG2],
            vips: HashSet::new(),
            addrs: HashSet::new(),
        };
        for key in vips {
            if filter.vips.insert(key) {
                filter.refs[vip_slot(&key) as usize] += 1;
            }
        }
        for key in addrs {
            if filter.addrs.insert(key) {
                filter.refs[addr_slot(&key) as usize] += 1;
            }
        }
        for word in 0..VIP_FILTER_WORDS {
            filter.write_word(word)?;
        }
        Ok(filter)
    }

    fn write_word(&mut self, word: u32) -> Result<()> {
        let bits = &self.refs[(word as usize) * 64..][..64];
        let value = bits
            .iter()
            .enumerate()
            .fold(0u64, |w, (i, &n)| if n > 0 { w | 1 << i } else { w });
        self.map
            .set(word, &value, 0)
            .map_err(map_err(map_names::VIP_FILTER))
    }

    /// One more key on `slot`: its bit is set (in the map) when it was clear.
    fn hold(&mut self, slot: u32) -> Result<()> {
        self.refs[slot as usize] += 1;
        if self.refs[slot as usize] == 1 {
            return self.write_word(slot >> 6).inspect_err(|_| {
                self.refs[slot as usize] -= 1;
            });
        }
        Ok(())
    }

    /// One key fewer on `slot`: its bit is cleared when it was the last. A
    /// failed write leaves the bit set, which only costs a lookup.
    fn release(&mut self, slot: u32) -> Result<()> {
        self.refs[slot as usize] -= 1;
        if self.refs[slot as usize] == 0 {
            return self.write_word(slot >> 6);
        }
        Ok(())
    }
}

fn vip_slot(key: &VipKey) -> u32 {
    vip_filter_slot(&key.addr, key.port_be, key.proto)
}

fn addr_slot(key: &AddrKey) -> u32 {
    vip_filter_slot(&key.addr, 0, 0)
}

/// The loaded XDP object and typed handles on all its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, AddrKey, u32>,
    filter: VipFilter,
    flows: Arc<Table>,
    rings: Mapped<u32>,
    slots: VipSlots,
    reals: Array<MapData, RealDef>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, Counter>,
    vip_stats: PerCpuArray<MapData, Counter>,
    real_stats: PerCpuArray<MapData, Counter>,
}

pub(crate) fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
}

impl Dataplane {
    /// Loads the object with default sizes (see [`Dataplane::load_with`]).
    pub fn load() -> Result<Self> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads the object into the kernel (maps created, programs verified), not attached.
    pub fn load_with(options: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let (buckets, keys) = conntrack::sizes(options.flows);
        loader.map_max_entries(map_names::FLOWS, buckets);
        loader.map_max_entries(map_names::FLOW_KEYS, keys);
        loader.map_max_entries(map_names::PEER_FLOWS, options.flows.max(1));
        let pins: Vec<(&str, PathBuf)> = match &options.pin {
            Some(dir) => BALANCER_MAPS.iter().map(|n| (*n, dir.map(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            // Reuses the pinned map when present (after checking it matches the
            // object), else creates and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [prog_names::BALANCER, prog_names::PASS] {
            load_xdp(&mut ebpf, name)?;
        }
        let vips = HashMap::try_from(take(&mut ebpf, map_names::VIPS)?)
            .map_err(map_err(map_names::VIPS))?;
        let vip_addrs = HashMap::try_from(take(&mut ebpf, map_names::VIP_ADDRS)?)
            .map_err(map_err(map_names::VIP_ADDRS))?;
        let entries = vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIPS))?;
        let filter = VipFilter::new(
            Array::try_from(take(&mut ebpf, map_names::VIP_FILTER)?)
                .map_err(map_err(map_names::VIP_FILTER))?,
            entries.iter().map(|(key, _)| *key),
            vip_addrs
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err(map_names::VIP_ADDRS))?,
        )?;
        let flows = Arc::new(Table::open(
            take_array(&mut ebpf, map_names::FLOWS)?,
            take_array(&mut ebpf, map_names::FLOW_KEYS)?,
            take_array(&mut ebpf, map_names::CT_PARAMS)?,
        )?);
        let rings = rings(take_array(&mut ebpf, map_names::RINGS)?)?;
        let slots = VipSlots::new(take_array(&mut ebpf, map_names::VIP_SLOTS)?, &entries)?;
        let reals = Array::try_from(take(&mut ebpf, map_names::REALS)?)
            .map_err(map_err(map_names::REALS))?;
        let config = Array::try_from(take(&mut ebpf, map_names::CONFIG)?)
            .map_err(map_err(map_names::CONFIG))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, map_names::STATS)?)
            .map_err(map_err(map_names::STATS))?;
        let vip_stats = PerCpuArray::try_from(take(&mut ebpf, map_names::VIP_STATS)?)
            .map_err(map_err(map_names::VIP_STATS))?;
        let real_stats = PerCpuArray::try_from(take(&mut ebpf, map_names::REAL_STATS)?)
            .map_err(map_err(map_names::REAL_STATS))?;
        Ok(Self {
            ebpf,
            vips,
            vip_addrs,
            filter,
            flows,
            rings,
            slots,
            reals,
            config,
            stats,
            vip_stats,
            real_stats,
        })
    }

    /// The loaded balancer program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program(&self, name: &'static str) -> Result<&Xdp> {
        xdp(&self.ebpf, name)
    }

    /// Attaches program `name` to `iface` (resolved in the calling thread's netns).
    /// It stays attached until this value is dropped.
    pub fn attach(&mut self, name: &'static str, iface: &str, mode: XdpMode) -> Result<()> {
        attach_xdp(&mut self.ebpf, name, iface, mode).map(drop)
    }

    /// Attaches program `name` to `iface` and pins the link at `pin.link()`:
    /// it stays attached after this process exits.
    pub fn attach_pinned(
        &mut self,
        name: &'static str,
        iface: &str,
        mode: XdpMode,
        pin: &PinDir,
    ) -> Result<(), DataplaneError> {
        let id = attach_xdp(&mut self.ebpf, name, iface, mode)?;
        let link = xdp_mut(&mut self.ebpf, name)?
            .take_link(id)
            .map_err(|source| DataplaneError::Program { name, source })?;
        crate::pin::pin_link(link, &pin.link()).map_err(DataplaneError::Pin)
    }

    /// Atomically swaps the program behind the pinned link for this object's
    /// program `name` (bpf_link_update: no packet sees no program).
    pub fn replace_pinned(
        &mut self,
        name: &'static str,
        pin: &PinDir,
    ) -> Result<(), DataplaneError> {
        let link = crate::pin::open_link(&pin.link()).map_err(DataplaneError::Pin)?;
        let prog = xdp_mut(&mut self.ebpf, name)?;
        let id = prog
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program { name, source })?;
        // The pin keeps the link; our handle can go.
        let link = prog
            .take_link(id)
            .map_err(|source| DataplaneError::Program { name, source })?;
        drop(link);
        Ok(())
    }

    /// Routes the program's aya-log lines into this process's logs (call once;
    /// `None` when the object carries no log map).
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// The VIP map's entry for `key`.
    pub fn get_vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        match self.vips.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::Map {
                name: map_names::VIPS,
                source,
            }),
        }
    }

    /// Writes the interface settings.
    pub fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Writes a Maglev table at slot offset `off` of the ring pool (not yet
    /// live unless a VIP points at it).
    pub fn write_ring(&mut self, off: u32, table: &[u32]) -> Result<()> {
        let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
        check(len.saturating_sub(1), RING_SIZE_MAX, "ring size")?;
        check(
            off.saturating_add(len).saturating_sub(1),
            RING_POOL,
            "ring pool slot",
        )?;
        self.rings.range_mut(off, len).copy_from_slice(table);
        // Make the table visible before the VIP update (a syscall) that publishes it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Reads back `len` slots of the ring pool from offset `off`.
    pub fn read_ring(&self, off: u32, len: u32) -> Result<Vec<u32>> {
        check(len.saturating_sub(1), RING_SIZE_MAX, "ring size")?;
        check(
            off.saturating_add(len).saturating_sub(1),
            RING_POOL,
            "ring pool slot",
        )?;
        Ok(self.rings.range(off, len).to_vec())
    }

    /// Inserts or replaces a VIP (its filter bit set first, its slot entry
    /// written after it is in `XLB_VIPS`).
    pub fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        check(meta.vip_id, MAX_VIPS, "VIP id")?;
        if !self.filter.vips.contains(key) {
            self.filter.hold(vip_slot(key))?;
            self.filter.vips.insert(*key);
        }
        self.vips
            .insert(key, meta, 0)
            .map_err(map_err(map_names::VIPS))?;
        self.slots.put(key, meta);
        Ok(())
    }

    /// Removes a VIP: its slot entry emptied first, then the `XLB_VIPS`
    /// entry, then its filter bit unless another key holds it; a key left on
    /// the slot takes it over.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let freed = self.slots.release(key);
        let removed = self.vips.remove(key);
        let gone = matches!(removed, Ok(()) | Err(aya::maps::MapError::KeyNotFound));
        if gone && self.filter.vips.remove(key) {
            self.filter.release(vip_slot(key))?;
        }
        if let Some(slot) = freed {
            let next = self
                .filter
                .vips
                .iter()
                .filter(|k| vip_slot(k) == slot)
                .min()
                .copied();
            // A failed read leaves the slot empty, which only costs the
            // program the XLB_VIPS lookup for that key.
            if let Some(next) = next
                && let Ok(Some(meta)) = self.get_vip(&next)
            {
                self.slots.put(&next, &meta);
            }
        }
        removed.map_err(map_err(map_names::VIPS))
    }

    /// The VIP entry of `XLB_VIP_SLOTS` on `key`'s slot, as the program
    /// reads it (`None`: empty); it may be another key's.
    pub fn vip_slot(&self, key: &VipKey) -> Option<(VipKey, VipMeta)> {
        self.slots.read(vip_slot(key))
    }

    /// Sets how many VIPs live on an address (0 removes the address), with
    /// its filter bit as for [`Dataplane::put_vip`] and [`Dataplane::remove_vip`].
    pub fn set_vip_addr(&mut self, key: &AddrKey, count: u32) -> Result<()> {
        if count == 0 {
            let removed = self.vip_addrs.remove(key);
            let gone = matches!(removed, Ok(()) | Err(aya::maps::MapError::KeyNotFound));
            if gone && self.filter.addrs.remove(key) {
                self.filter.release(addr_slot(key))?;
            }
            removed.map_err(map_err(map_names::VIP_ADDRS))
        } else {
            if !self.filter.addrs.contains(key) {
                self.filter.hold(addr_slot(key))?;
                self.filter.addrs.insert(*key);
            }
            self.vip_addrs
                .insert(key, &count, 0)
                .map_err(map_err(map_names::VIP_ADDRS))
        }
    }

    /// Writes real `id` (family 0 clears it).
    pub fn put_real(&mut self, id: u32, real: &RealDef) -> Result<()> {
        check(id, MAX_REALS, "real id")?;
        self.reals
            .set(id, real, 0)
            .map_err(map_err(map_names::REALS))
    }

    /// Every VIP entry.
    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIPS))
    }

    /// Every VIP-address entry.
    pub fn vip_addrs(&self) -> Result<Vec<(AddrKey, u32)>> {
        self.vip_addrs
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIP_ADDRS))
    }

    /// Every written (non-empty) real slot.
    pub fn live_reals(&self) -> Result<Vec<(u32, RealDef)>> {
        let mut out = Vec::new();
        for id in 0..MAX_REALS {
            let def = self.reals.get(&id, 0).map_err(map_err(map_names::REALS))?;
            if def.family != 0 {
                out.push((id, def));
            }
        }
        Ok(out)
    }

    /// Second handles (duplicated file descriptors) on the maps readers use:
    /// the verdict, VIP and real counters, in that order, and the conntrack
    /// table (one mapping, shared).
    pub fn reader_maps(&self) -> Result<([MapData; 3], Arc<Table>)> {
        Ok((
            [
                clone_map(&self.stats, map_names::STATS)?,
                clone_map(&self.vip_stats, map_names::VIP_STATS)?,
                clone_map(&self.real_stats, map_names::REAL_STATS)?,
            ],
            self.flows.clone(),
        ))
    }

    /// Flow sync's maps: the report ring and the peer flow table (taken out
    /// of the object: call once), with a second handle on the peer flow
    /// table and a view of the conntrack table for full copies.
    pub fn sync_maps(&mut self) -> Result<crate::flowsync::Maps> {
        let events = aya::maps::RingBuf::try_from(take(&mut self.ebpf, map_names::FLOW_EVENTS)?)
            .map_err(map_err(map_names::FLOW_EVENTS))?;
        let peer_flows: HashMap<MapData, FlowKey, FlowState> =
            HashMap::try_from(take(&mut self.ebpf, map_names::PEER_FLOWS)?)
                .map_err(map_err(map_names::PEER_FLOWS))?;
        let peer_flows_read = HashMap::try_from(Map::LruHashMap(clone_map(
            &peer_flows,
            map_names::PEER_FLOWS,
        )?))
        .map_err(map_err(map_names::PEER_FLOWS))?;
        Ok(crate::flowsync::Maps {
            events,
            peer_flows,
            peer_flows_read,
            flows: self.flows.clone(),
        })
    }

    /// The verdict counters summed over CPUs, in `lb_common::stat` order.
    pub fn verdicts(&self) -> Result<Vec<Counter>> {
        (0..stat::VERDICTS)
            .map(|i| sum(&self.stats, i, map_names::STATS))
            .collect()
    }

    /// The event counters summed over CPUs, as (name, count) in `stat::EVENTS` order.
    pub fn events(&self) -> Result<Vec<(&'static str, u64)>> {
        stat::EVENTS
            .iter()
            .map(|&(i, name)| Ok((name, sum(&self.stats, i, map_names::STATS)?.packets)))
            .collect()
    }

    /// The conntrack entry of a flow, if any (its generation as the entry
    /// keeps it, see `lb_common::ct_generation`).
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        Ok(self.flows.get(key))
    }

    /// Flows in the conntrack table (a walk over the mapped table).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Flows the conntrack table is sized for, all usable by every CPU (one
    /// table shared by all CPUs, see docs/architecture.md).
    pub fn flow_capacity(&self) -> u32 {
        self.flows.capacity()
    }

    /// The conntrack table (tests and the bench also write entries through it).
    pub fn flows(&self) -> &Table {
        &self.flows
    }

    /// VIP `id`'s counter summed over CPUs.
    pub fn vip_counter(&self, id: u32) -> Result<Counter> {
        sum(&self.vip_stats, id, map_names::VIP_STATS)
    }

    /// Real `id`'s counter summed over CPUs.
    pub fn real_counter(&self, id: u32) -> Result<Counter> {
        sum(&self.real_stats, id, map_names::REAL_STATS)
    }

    /// Zeroes VIP `id`'s counter (the id is being given to a new VIP).
    pub fn reset_vip_counter(&mut self, id: u32) -> Result<()> {
        zero(&mut self.vip_stats, id, map_names::VIP_STATS)
    }

    /// Zeroes real `id`'s counter.
    pub fn reset_real_counter(&mut self, id: u32) -> Result<()> {
        zero(&mut self.real_stats, id, map_names::REAL_STATS)
    }
}

/// A second handle on `map`'s kernel object (a duplicated file descriptor).
pub(crate) fn clone_map<K: aya::Pod, V>(
    map: &impl IterableMap<K, V>,
    name: &'static str,
) -> Result<MapData> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| DataplaneError::Map {
            name,
            source: aya::maps::MapError::IoError(e),
        })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

/// Program `name` of `ebpf`, as an XDP program.
pub(crate) fn xdp<'e>(ebpf: &'e Ebpf, name: &'static str) -> Result<&'e Xdp> {
    ebpf.program(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Program `name` of `ebpf`, as an XDP program, mutably.
pub(crate) fn xdp_mut<'e>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut Xdp> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Loads program `name` of `ebpf` into the kernel (the verifier runs here).
pub(crate) fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    xdp_mut(ebpf, name)?
        .load()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Attaches program `name` of `ebpf` to `iface` (resolved in the calling
/// thread's network namespace).
pub(crate) fn attach_xdp(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    mode: XdpMode,
) -> Result<aya::programs::xdp::XdpLinkId> {
    let cname = CString::new(iface).map_err(|_| DataplaneError::IfaceName(iface.to_owned()))?;
    xdp_mut(ebpf, name)?
        .attach(cname.as_c_str(), mode)
        .map_err(|source| DataplaneError::Program { name, source })
}

fn check(index: u32, capacity: u32, what: &'static str) -> Result<()> {
    if index < capacity {
        Ok(())
    } else {
        Err(DataplaneError::OutOfRange {
            what,
            index,
            capacity,
        })
    }
}

pub(crate) fn sum(
    map: &PerCpuArray<MapData, Counter>,
    index: u32,
    name: &'static str,
) -> Result<Counter> {
    let values = map.get(&index, 0).map_err(map_err(name))?;
    Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
        flows: acc.flows + c.flows,
        _pad: 0,
    }))
}

fn zero(map: &mut PerCpuArray<MapData, Counter>, index: u32, name: &'static str) -> Result<()> {
    let cpus = nr_cpus().map_err(|(_, source)| DataplaneError::Map {
        name,
        source: aya::maps::MapError::IoError(source),
    })?;
    let values = PerCpuValues::try_from(vec![Counter::default(); cpus.get() as usize]).map_err(
        |source| DataplaneError::Map {
            name,
            source: aya::maps::MapError::IoError(source),
        },
    )?;
    map.set(index, values, 0).map_err(map_err(name))
}
