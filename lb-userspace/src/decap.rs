//! `xlb decap`: the real-server side of TUN mode. Loads the `lb-decap` XDP
//! object, tells it this host's tunnel endpoint addresses and the balancers'
//! tunnel sources it accepts, and attaches it.
//!
//! Like the balancer, the maps and the link can be pinned (default
//! [`DEFAULT_PIN_DIR`]): the decapsulator then keeps running when `xlb decap`
//! stops, a restarted `xlb decap` swaps its program in on the pinned link, and
//! `xlb decap stats` reads the pinned counters and `xlb decap teardown`
//! detaches it.

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{Xdp, XdpMode},
};
use lb_common::{AddrKey, Counter, SrcPrefix, decap_stat, map_names, prog_names};

use crate::{
    dataplane::{
        DataplaneError, attach_xdp, clone_map, load_xdp, map_err, sum, take, xdp, xdp_mut,
    },
    model::addr_bytes,
    pin::{LAYOUT_VERSION, PinDir},
};

/// The compiled decapsulator object, built by build.rs with aya-build.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Default pin directory of `xlb decap`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb-decap";

/// Every map of the decap object.
pub const DECAP_MAPS: [&str; 3] = [
    map_names::DECAP_ADDRS,
    map_names::DECAP_STATS,
    map_names::DECAP_SRCS,
];

/// The loaded decapsulator and handles on its maps.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, AddrKey, u32>,
    srcs: LpmTrie<MapData, SrcPrefix, u32>,
    stats: PerCpuArray<MapData, Counter>,
}

impl Decap {
    /// Loads the object into the kernel, not attached, maps not pinned.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(None)
    }

    /// Loads the object, reusing (or creating and pinning) its maps in `pin`.
    /// Reused maps keep a previous run's addresses and sources (its program
    /// may still be running on them) until [`Decap::set_addrs`] and
    /// [`Decap::set_srcs`] replace them.
    pub fn load_with(pin: Option<&PinDir>) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<_> = pin
            .map(|dir| DECAP_MAPS.iter().map(|n| (*n, dir.map(n))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(DECAP_OBJECT)?;
        load_xdp(&mut ebpf, prog_names::DECAP)?;
        let addrs = HashMap::try_from(take(&mut ebpf, map_names::DECAP_ADDRS)?)
            .map_err(map_err(map_names::DECAP_ADDRS))?;
        let srcs = LpmTrie::try_from(take(&mut ebpf, map_names::DECAP_SRCS)?)
            .map_err(map_err(map_names::DECAP_SRCS))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, map_names::DECAP_STATS)?)
            .map_err(map_err(map_names::DECAP_STATS))?;
        Ok(Self {
            ebpf,
            addrs,
            srcs,
            stats,
        })
    }

    /// The loaded program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp(&self.ebpf, prog_names::DECAP)
    }

    /// Attaches to `iface` until this value is dropped.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        attach_xdp(&mut self.ebpf, prog_names::DECAP, iface, mode).map(drop)
    }

    /// Attaches to `iface` and pins the link: it stays attached after this
    /// process exits. When a previous run left its link pinned, this object's
    /// program replaces the one behind it instead (no packet sees none).
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: XdpMode,
        pin: &PinDir,
    ) -> Result<(), DataplaneError> {
        let name = prog_names::DECAP;
        let prog = |source| DataplaneError::Program { name, source };
        if pin.has_link() {
            let link = crate::pin::open_link(&pin.link())?;
            let prog_ref = xdp_mut(&mut self.ebpf, name)?;
            let id = prog_ref.attach_to_link(link).map_err(prog)?;
            drop(prog_ref.take_link(id).map_err(prog)?);
            return Ok(());
        }
        let id = attach_xdp(&mut self.ebpf, name, iface, mode)?;
        let link = xdp_mut(&mut self.ebpf, name)?.take_link(id).map_err(prog)?;
        crate::pin::pin_link(link, &pin.link()).map_err(DataplaneError::Pin)
    }

    /// Accepts tunnels addressed to `addr`.
    pub fn add_addr(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        self.addrs
            .insert(&addr_key(addr), &1, 0)
            .map_err(map_err(map_names::DECAP_ADDRS))
    }

    /// Accepts tunnels addressed to exactly `addrs`: adds them first, then
    /// removes the others (a running program never sees an empty set).
    pub fn set_addrs(&mut self, addrs: &[IpAddr]) -> Result<(), DataplaneError> {
        for a in addrs {
            self.add_addr(*a)?;
        }
        let keep: Vec<AddrKey> = addrs.iter().map(|a| addr_key(*a)).collect();
        let stale: Vec<AddrKey> = self
            .addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in stale {
            self.addrs
                .remove(&key)
                .map_err(map_err(map_names::DECAP_ADDRS))?;
        }
        Ok(())
    }

    /// Accepts tunnels whose outer source is in one of `prefixes` (address,
    /// length; the caller has checked each length against its family), or
    /// from every source when `prefixes` is empty. Adds first, then removes
    /// the others.
    pub fn set_srcs(&mut self, prefixes: &[(IpAddr, u8)]) -> Result<(), DataplaneError> {
        let keep: Vec<Key<SrcPrefix>> = if prefixes.is_empty() {
            // A zero-length prefix matches every source of both families.
            vec![Key::new(
                0,
                SrcPrefix {
                    family: 0,
                    addr: [0; 16],
                    _pad: [0; 3],
                },
            )]
        } else {
            prefixes.iter().map(|(a, len)| src_key(*a, *len)).collect()
        };
        for key in &keep {
            self.srcs
                .insert(key, &1, 0)
                .map_err(map_err(map_names::DECAP_SRCS))?;
        }
        let same = |a: &Key<SrcPrefix>, b: &Key<SrcPrefix>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let stale: Vec<Key<SrcPrefix>> = self
            .srcs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.iter().any(|w| same(k, w)))
            .collect();
        for key in stale {
            self.srcs
                .remove(&key)
                .map_err(map_err(map_names::DECAP_SRCS))?;
        }
        Ok(())
    }

    /// Every counter summed over CPUs, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
        counters(&self.stats)
    }

    /// A reader of the counters on a file descriptor of its own (for the
    /// metrics server's task).
    pub fn counter_reader(&self) -> Result<DecapCounters, DataplaneError> {
        let data = clone_map(&self.stats, map_names::DECAP_STATS)?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(data))
            .map_err(map_err(map_names::DECAP_STATS))?;
        Ok(DecapCounters { stats })
    }
}

/// A second handle on the decapsulator's counters.
pub struct DecapCounters {
    stats: PerCpuArray<MapData, Counter>,
}

impl DecapCounters {
    /// Every counter summed over CPUs, by name.
    pub fn read(&self) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
        counters(&self.stats)
    }
}

fn counters(
    stats: &PerCpuArray<MapData, Counter>,
) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
    (0..decap_stat::COUNT)
        .map(|i| {
            let c = sum(stats, i, map_names::DECAP_STATS)?;
            Ok((decap_stat::NAMES[i as usize], c))
        })
        .collect()
}

/// The counters of the decapsulator pinned under `pin_dir` (as `xlb decap
/// --pin-dir` made it), read without loading anything: for `xlb decap stats`
/// while `xlb decap` runs, or after it left the data path running.
pub fn pinned_counters(pin_dir: &Path) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
    let path = pin_dir
        .join(format!("v{LAYOUT_VERSION}"))
        .join(map_names::DECAP_STATS);
    let data = MapData::from_pin(&path).map_err(map_err(map_names::DECAP_STATS))?;
    let stats =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::DECAP_STATS))?;
    counters(&stats)
}

fn addr_key(addr: IpAddr) -> AddrKey {
    let (bytes, family) = addr_bytes(addr);
    AddrKey {
        addr: bytes,
        family,
        _pad: [0; 3],
    }
}

/// The trie key of `net`/`len`: the family byte, then the prefix.
fn src_key(net: IpAddr, len: u8) -> Key<SrcPrefix> {
    let (mut addr, family) = addr_bytes(net);
    // Host bits cleared, so that equal prefixes have equal keys.
    let bits = usize::from(len);
    for (i, b) in addr.iter_mut().enumerate() {
        let keep = bits.saturating_sub(i * 8).min(8);
        *b &= !(0xffu8.checked_shr(keep as u32).unwrap_or(0));
    }
    Key::new(
        8 + u32::from(len),
        SrcPrefix {
            family,
            addr,
            _pad: [0; 3],
        },
    )
}
