//! `xlb decap`: the real-server side of TUN mode. Loads the `lb-decap` XDP
//! object, tells it this host's tunnel endpoint addresses and attaches it.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{AddrKey, Counter, decap_stat, map_names, prog_names};

use crate::{
    dataplane::{DataplaneError, attach_xdp, load_xdp, map_err, sum, take, xdp},
    model::addr_bytes,
};

/// The compiled decapsulator object, built by build.rs with aya-build.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// The loaded decapsulator and handles on its maps.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, AddrKey, u32>,
    stats: PerCpuArray<MapData, Counter>,
}

impl Decap {
    /// Loads the object into the kernel, not attached.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new().load(DECAP_OBJECT)?;
        load_xdp(&mut ebpf, prog_names::DECAP)?;
        let addrs = HashMap::try_from(take(&mut ebpf, map_names::DECAP_ADDRS)?)
            .map_err(map_err(map_names::DECAP_ADDRS))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, map_names::DECAP_STATS)?)
            .map_err(map_err(map_names::DECAP_STATS))?;
        Ok(Self { ebpf, addrs, stats })
    }

    /// The loaded program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp(&self.ebpf, prog_names::DECAP)
    }

    /// Attaches to `iface` until this value is dropped.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        attach_xdp(&mut self.ebpf, prog_names::DECAP, iface, mode).map(drop)
    }

    /// Accepts tunnels addressed to `addr`.
    pub fn add_addr(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        let (bytes, family) = addr_bytes(addr);
        let key = AddrKey {
            addr: bytes,
            family,
            _pad: [0; 3],
        };
        self.addrs
            .insert(&key, &1, 0)
            .map_err(map_err(map_names::DECAP_ADDRS))
    }

    /// Every counter summed over CPUs, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
        (0..decap_stat::COUNT)
            .map(|i| {
                let c = sum(&self.stats, i, map_names::DECAP_STATS)?;
                Ok((decap_stat::NAMES[i as usize], c))
            })
            .collect()
    }
}
