//! `xlb decap`: the real-server side of TUN mode. Loads the `lb-decap` XDP
//! object with this host's tunnel endpoint addresses and the balancers'
//! tunnel sources it accepts (a read-only global, [`DecapSettings`]), and
//! attaches it.
//!
//! Like the balancer, the counters and the link can be pinned (default
//! [`DEFAULT_PIN_DIR`]): the decapsulator then keeps running when `xlb decap`
//! stops, a restarted `xlb decap` swaps its program (with its own endpoints
//! and sources) in on the pinned link, and `xlb decap stats` reads the pinned
//! counters and `xlb decap teardown` detaches it.

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{Counter, DECAP_SET_SYMBOL, DecapSet, decap_stat, map_names, prog_names};

use crate::{
    dataplane::{
        DataplaneError, attach_xdp, clone_map, load_xdp, map_err, sum, take, xdp, xdp_mut,
    },
    pin::{DECAP_LAYOUT_VERSION, PinDir},
};

/// The compiled decapsulator object, built by build.rs with aya-build.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Default pin directory of `xlb decap`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb-decap";

/// Every map of the decap object.
pub const DECAP_MAPS: [&str; 1] = [map_names::DECAP_STATS];

/// Maps earlier versions of the decapsulator pinned (its endpoint hash and
/// source trie, now the program's read-only [`DecapSet`]). Nothing reads
/// them; a new `xlb decap` removes them once its program is on the link, and
/// `xlb decap teardown` removes them too.
pub const LEGACY_DECAP_MAPS: [&str; 2] = ["XLB_DECAP_ADDRS", "XLB_DECAP_SRCS"];

/// A tunnel endpoint or source list the decapsulator cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    /// More addresses or prefixes of one family than the program holds.
    #[error(
        "too many {what} ({flag}): {count} {family} given, the decapsulator holds at most {max} \
         per address family"
    )]
    TooMany {
        /// What the list is.
        what: &'static str,
        /// The flag that gives it.
        flag: &'static str,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// How many distinct entries were given.
        count: usize,
        /// The capacity.
        max: usize,
    },
    /// A prefix length longer than its address.
    #[error("--allow-src {addr}/{len}: prefix length is not 0-{max}")]
    PrefixLength {
        /// The address.
        addr: IpAddr,
        /// The length given.
        len: u8,
        /// 32 or 128.
        max: u8,
    },
}

/// What one decapsulator accepts, checked against its capacity: the value
/// its program is loaded with (changing it means loading a new program).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapSettings {
    set: DecapSet,
}

impl DecapSettings {
    /// Tunnels addressed to one of `addrs`, from a source in one of
    /// `prefixes` (address, length), or from every source when `prefixes`
    /// is empty (a /0 of each family). Duplicates count once; host bits of
    /// a prefix are ignored. Refuses more than [`lb_common::MAX_DECAP_ADDRS`] endpoints
    /// or [`lb_common::MAX_DECAP_SRCS`] prefixes of one family.
    pub fn new(addrs: &[IpAddr], prefixes: &[(IpAddr, u8)]) -> Result<Self, DecapError> {
        let mut v4: Vec<u32> = Vec::new();
        let mut v6: Vec<[u64; 2]> = Vec::new();
        for a in addrs {
            match a {
                IpAddr::V4(a) => push_new(&mut v4, u32::from_ne_bytes(a.octets())),
                IpAddr::V6(a) => push_new(&mut v6, words(a.octets())),
            }
        }
        let all = [(IpAddr::from([0u8; 4]), 0), (IpAddr::from([0u8; 16]), 0)];
        let prefixes = if prefixes.is_empty() {
            &all[..]
        } else {
            prefixes
        };
        let mut s4: Vec<[u32; 2]> = Vec::new();
        let mut s6: Vec<[u64; 4]> = Vec::new();
        for &(addr, len) in prefixes {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(DecapError::PrefixLength { addr, len, max });
            }
            match addr {
                IpAddr::V4(a) => {
                    let mask = mask_bytes::<4>(len);
                    let net: [u8; 4] = std::array::from_fn(|i| a.octets()[i] & mask[i]);
                    push_new(&mut s4, [u32::from_ne_bytes(net), u32::from_ne_bytes(mask)]);
                }
                IpAddr::V6(a) => {
                    let mask = mask_bytes::<16>(len);
                    let net: [u8; 16] = std::array::from_fn(|i| a.octets()[i] & mask[i]);
                    let (n, m) = (words(net), words(mask));
                    push_new(&mut s6, [n[0], n[1], m[0], m[1]]);
                }
            }
        }
        let endpoints = (
            "tunnel endpoints",
            "--addr, or the interface's addresses without it",
        );
        let sources = ("allowed tunnel source prefixes", "--allow-src");
        let mut set = DecapSet::EMPTY;
        set.v4_addr_count = fill(&mut set.v4_addrs, &v4, endpoints, "IPv4")?;
        set.v6_addr_count = fill(&mut set.v6_addrs, &v6, endpoints, "IPv6")?;
        set.v4_src_count = fill(&mut set.v4_srcs, &s4, sources, "IPv4")?;
        set.v6_src_count = fill(&mut set.v6_srcs, &s6, sources, "IPv6")?;
        Ok(Self { set })
    }
}

/// Copies `list` into the front of `slots` and returns the count; refuses a
/// list longer than `slots` (`what` is the list's name and flag).
fn fill<T: Copy>(
    slots: &mut [T],
    list: &[T],
    (what, flag): (&'static str, &'static str),
    family: &'static str,
) -> Result<u32, DecapError> {
    let Some(front) = slots.get_mut(..list.len()) else {
        return Err(DecapError::TooMany {
            what,
            flag,
            family,
            count: list.len(),
            max: slots.len(),
        });
    };
    front.copy_from_slice(list);
    Ok(list.len() as u32)
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// 16 address bytes as the two native words the program compares.
fn words(b: [u8; 16]) -> [u64; 2] {
    let (hi, lo) = b.split_at(8);
    [
        u64::from_ne_bytes(hi.try_into().expect("8 bytes")),
        u64::from_ne_bytes(lo.try_into().expect("8 bytes")),
    ]
}

/// The network mask of a `len`-bit prefix, as `N` bytes.
fn mask_bytes<const N: usize>(len: u8) -> [u8; N] {
    std::array::from_fn(|i| {
        let keep = usize::from(len).saturating_sub(i * 8).min(8);
        !(0xffu8.checked_shr(keep as u32).unwrap_or(0))
    })
}

/// The loaded decapsulator and a handle on its counters.
pub struct Decap {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, Counter>,
}

impl Decap {
    /// Loads the object with `settings`, not attached, maps not pinned.
    pub fn load(settings: &DecapSettings) -> Result<Self, DataplaneError> {
        Self::load_with(settings, None)
    }

    /// Loads the object with `settings`, reusing (or creating and pinning)
    /// its counters in `pin`.
    pub fn load_with(
        settings: &DecapSettings,
        pin: Option<&PinDir>,
    ) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader.override_global(DECAP_SET_SYMBOL, &settings.set, true);
        let paths: Vec<_> = pin
            .map(|dir| DECAP_MAPS.iter().map(|n| (*n, dir.map(n))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(DECAP_OBJECT)?;
        load_xdp(&mut ebpf, prog_names::DECAP)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, map_names::DECAP_STATS)?)
            .map_err(map_err(map_names::DECAP_STATS))?;
        Ok(Self { ebpf, stats })
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
        } else {
            let id = attach_xdp(&mut self.ebpf, name, iface, mode)?;
            let link = xdp_mut(&mut self.ebpf, name)?.take_link(id).map_err(prog)?;
            crate::pin::pin_link(link, &pin.link()).map_err(DataplaneError::Pin)?;
        }
        // The program that read them is off the link now.
        for legacy in LEGACY_DECAP_MAPS {
            let path = pin.map(legacy);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|source| {
                    DataplaneError::Pin(crate::pin::PinError::Io {
                        what: "removing the unused pin",
                        path,
                        source,
                    })
                })?;
            }
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
        .join(format!("v{DECAP_LAYOUT_VERSION}"))
        .join(map_names::DECAP_STATS);
    let data = MapData::from_pin(&path).map_err(map_err(map_names::DECAP_STATS))?;
    let stats =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::DECAP_STATS))?;
    counters(&stats)
}

#[cfg(test)]
mod tests {
    use lb_common::{MAX_DECAP_ADDRS, MAX_DECAP_SRCS};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn prefixes_become_network_and_mask_words_with_host_bits_cleared() {
        let s = DecapSettings::new(
            &[ip("192.0.2.21"), ip("2001:db8:100::21"), ip("192.0.2.21")],
            &[(ip("198.51.100.77"), 20), (ip("2001:db8:ff::1"), 96)],
        )
        .expect("fits")
        .set;
        assert_eq!(
            (s.v4_addr_count, s.v6_addr_count),
            (1, 1),
            "duplicates count once"
        );
        assert_eq!(s.v4_addrs[0], u32::from_ne_bytes([192, 0, 2, 21]));
        assert_eq!(s.v4_src_count, 1);
        assert_eq!(
            s.v4_srcs[0],
            [
                u32::from_ne_bytes([198, 51, 96, 0]),
                u32::from_ne_bytes([255, 255, 240, 0])
            ]
        );
        let net6: std::net::Ipv6Addr = "2001:db8:ff::".parse().expect("v6");
        let mut mask = [0xffu8; 16];
        mask[12..].fill(0);
        let (n, m) = (words(net6.octets()), words(mask));
        assert_eq!(s.v6_srcs[0], [n[0], n[1], m[0], m[1]]);
    }

    #[test]
    fn no_allowed_source_is_a_zero_mask_of_each_family() {
        let s = DecapSettings::new(&[ip("192.0.2.21")], &[])
            .expect("fits")
            .set;
        assert_eq!((s.v4_src_count, s.v6_src_count), (1, 1));
        assert_eq!(s.v4_srcs[0], [0, 0]);
        assert_eq!(s.v6_srcs[0], [0; 4]);
    }

    #[test]
    fn more_than_the_capacity_is_refused_naming_the_flag() {
        let many: Vec<(IpAddr, u8)> = (0..=MAX_DECAP_SRCS)
            .map(|i| (IpAddr::from([198, 51, 100, i as u8]), 32))
            .collect();
        let err = DecapSettings::new(&[ip("192.0.2.21")], &many).expect_err("65 prefixes");
        assert_eq!(
            err.to_string(),
            "too many allowed tunnel source prefixes (--allow-src): 65 IPv4 given, the \
             decapsulator holds at most 64 per address family"
        );
        // 64 of each family fit.
        let v6: Vec<(IpAddr, u8)> = (0..MAX_DECAP_SRCS)
            .map(|i| {
                (
                    IpAddr::from([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i as u8]),
                    128,
                )
            })
            .collect();
        let mut both = many[..MAX_DECAP_SRCS].to_vec();
        both.extend(v6);
        assert!(DecapSettings::new(&[ip("192.0.2.21")], &both).is_ok());
        let addrs: Vec<IpAddr> = (0..=MAX_DECAP_ADDRS)
            .map(|i| IpAddr::from([203, 0, 113, i as u8]))
            .collect();
        let err = DecapSettings::new(&addrs, &[]).expect_err("65 endpoints");
        assert_eq!(
            err.to_string(),
            "too many tunnel endpoints (--addr, or the interface's addresses without it): 65 \
             IPv4 given, the decapsulator holds at most 64 per address family"
        );
        let err =
            DecapSettings::new(&[ip("192.0.2.21")], &[(ip("192.0.2.0"), 33)]).expect_err("/33");
        assert_eq!(
            err.to_string(),
            "--allow-src 192.0.2.0/33: prefix length is not 0-32"
        );
    }
}
