//! The services the operator configured and their mapping onto the dataplane.
//!
//! [`State`] owns id allocation (VIP ids, ring slots, real ids) and applies each
//! change in an order packets can never observe half-done: a new Maglev table is
//! written into the VIP's spare ring and published by one VIP-map update; a real
//! is written before any table names it and cleared only after none does. A
//! change that fails leaves both the model and the maps as they were.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    MAX_REALS, MAX_VIPS, REAL_NONE, RING_SIZE_DEFAULT, RING_SIZE_MAX, RealDef, VIP_F_HASH_SRC_ONLY,
    VIP_F_TUNNEL, VipMeta,
};
use serde::Serialize;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    maglev::{self, Backend},
    model::{Forward, Scheduler, Vip, addr_bytes},
};

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The VIP is already configured.
    #[error("VIP {0} already exists")]
    VipExists(Vip),
    /// No such VIP.
    #[error("unknown VIP {0}; add it first with `xlb vip add {0}`")]
    UnknownVip(Vip),
    /// The real is already in this VIP.
    #[error("real {real} is already in VIP {vip}")]
    RealExists {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
    },
    /// The real is not in this VIP.
    #[error("real {real} is not in VIP {vip}")]
    UnknownReal {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
    },
    /// A capacity of the maps is reached.
    #[error("cannot add {what}: the limit of {limit} is reached")]
    Full {
        /// What could not be added.
        what: &'static str,
        /// The limit.
        limit: u32,
    },
    /// The real's address family cannot serve the VIP in its forwarding mode.
    #[error("real {real} cannot serve {vip} in {forward} mode: {why}")]
    Family {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
        /// The VIP's mode.
        forward: Forward,
        /// Why.
        why: &'static str,
    },
    /// The weight is out of range.
    #[error("invalid weight {0}: must be 0-{MAX_WEIGHT}")]
    Weight(u32),
    /// The Maglev table size is not usable.
    #[error("invalid table size {0}: must be a prime between 2 and {RING_SIZE_MAX}")]
    TableSize(u32),
    /// The map update failed; nothing was changed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// Largest weight a real can have.
pub const MAX_WEIGHT: u32 = 65535;

/// Options of a VIP beyond its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipOptions {
    /// How flows are hashed.
    pub scheduler: Scheduler,
    /// How packets reach the reals.
    pub forward: Forward,
    /// Maglev table size (prime).
    pub table_size: u32,
}

impl Default for VipOptions {
    fn default() -> Self {
        Self {
            scheduler: Scheduler::Maglev,
            forward: Forward::Dr,
            table_size: RING_SIZE_DEFAULT,
        }
    }
}

/// A real server inside one VIP.
#[derive(Clone, Copy, Debug)]
struct Member {
    weight: u32,
}

/// One configured VIP.
#[derive(Clone, Debug)]
struct Service {
    id: u32,
    /// Which of the VIP's two rings (`id * 2` or `id * 2 + 1`) is live.
    live_ring: u32,
    options: VipOptions,
    members: BTreeMap<IpAddr, Member>,
}

/// A real server known to the dataplane (shared by every VIP that lists it).
#[derive(Clone, Copy, Debug)]
struct RealSlot {
    id: u32,
    mac: [u8; 6],
    /// How many VIPs list it.
    refs: u32,
}

/// What `xlb vip list` and the API show of a VIP.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VipView {
    /// The VIP.
    pub vip: Vip,
    /// Its VIP id in the maps.
    pub id: u32,
    /// Its scheduler.
    pub scheduler: Scheduler,
    /// Its forwarding mode.
    pub forward: Forward,
    /// Its Maglev table size.
    pub table_size: u32,
    /// Packets forwarded for it.
    pub packets: u64,
    /// Bytes forwarded for it.
    pub bytes: u64,
    /// New flows it received.
    pub flows: u64,
    /// Its reals.
    pub reals: Vec<RealView>,
}

/// What the API shows of a real inside a VIP.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RealView {
    /// The real's address.
    pub addr: IpAddr,
    /// Its weight in this VIP.
    pub weight: u32,
    /// MAC of the next hop toward it (itself in DR mode).
    pub mac: String,
    /// Packets forwarded to it (over all VIPs).
    pub packets: u64,
    /// Bytes forwarded to it (over all VIPs).
    pub bytes: u64,
    /// New flows sent to it (over all VIPs).
    pub flows: u64,
}

/// The configured services and the ids they occupy in the maps.
#[derive(Debug, Default)]
pub struct State {
    services: BTreeMap<Vip, Service>,
    reals: BTreeMap<IpAddr, RealSlot>,
    /// How many VIPs use each address.
    addr_refs: BTreeMap<IpAddr, u32>,
    /// Where the search for a free real id starts: ids are handed out round
    /// robin so a freed id is reused as late as possible (conntrack entries may
    /// still name it; the data path re-hashes those once the slot is cleared).
    next_real_id: u32,
}

/// Formats a MAC as `02:00:00:00:00:01`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl State {
    /// An empty state (the maps of a freshly loaded object are empty too).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `vip` is configured.
    pub fn has_vip(&self, vip: &Vip) -> bool {
        self.services.contains_key(vip)
    }

    /// The configured VIPs.
    pub fn vips(&self) -> impl Iterator<Item = &Vip> {
        self.services.keys()
    }

    /// The forwarding mode of `vip`.
    pub fn forward(&self, vip: &Vip) -> Option<Forward> {
        self.services.get(vip).map(|s| s.options.forward)
    }

    /// Checks that `real` could be added to `vip` with `weight`, without
    /// changing anything (the daemon calls it before spending time resolving
    /// the real's MAC).
    pub fn check_add_real(&self, vip: &Vip, real: IpAddr, weight: u32) -> Result<()> {
        let service = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        if service.members.contains_key(&real) {
            return Err(StateError::RealExists { vip: *vip, real });
        }
        if weight > MAX_WEIGHT {
            return Err(StateError::Weight(weight));
        }
        let forward = service.options.forward;
        let family_error = |why| StateError::Family {
            vip: *vip,
            real,
            forward,
            why,
        };
        match (forward, vip.addr.is_ipv4(), real.is_ipv4()) {
            (Forward::Dr, v4, r4) if v4 != r4 => {
                return Err(family_error(
                    "direct return forwards the packet unchanged, so the real must be of the \
                     VIP's address family",
                ));
            }
            (Forward::Tun, false, true) => {
                return Err(family_error(
                    "an IPv6 VIP needs IPv6 reals (IPv6-in-IPv4 is not offered)",
                ));
            }
            _ => {}
        }
        if !self.reals.contains_key(&real) && self.free_real_id().is_none() {
            return Err(StateError::Full {
                what: "real",
                limit: MAX_REALS - 1,
            });
        }
        Ok(())
    }

    fn free_vip_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.services.values().map(|s| s.id).collect();
        (0..MAX_VIPS).find(|id| !used.contains(id))
    }

    fn free_real_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.reals.values().map(|r| r.id).collect();
        // Id 0 is REAL_NONE; start after the last id handed out.
        let start = self.next_real_id.clamp(1, MAX_REALS - 1);
        (start..MAX_REALS)
            .chain(1..start)
            .find(|id| !used.contains(id))
    }

    /// Adds a VIP with no reals (packets to it are dropped and counted until it has one).
    pub fn add_vip(&mut self, dp: &mut Dataplane, vip: Vip, options: VipOptions) -> Result<()> {
        if self.services.contains_key(&vip) {
            return Err(StateError::VipExists(vip));
        }
        if !maglev::is_prime(options.table_size) || options.table_size > RING_SIZE_MAX {
            return Err(StateError::TableSize(options.table_size));
        }
        let id = self.free_vip_id().ok_or(StateError::Full {
            what: "VIP",
            limit: MAX_VIPS,
        })?;
        let service = Service {
            id,
            live_ring: id * 2,
            options,
            members: BTreeMap::new(),
        };
        // Table first, then counters, then the address, then the VIP itself: the
        // VIP entry is what makes packets use the rest.
        dp.write_ring(service.live_ring, &self.table(&service))?;
        dp.reset_vip_counter(id)?;
        let addr_count = self.addr_refs.get(&vip.addr).copied().unwrap_or(0) + 1;
        dp.set_vip_addr(&vip.addr_key(), addr_count)?;
        if let Err(err) = dp.put_vip(&vip.key(), &meta(&service, service.live_ring)) {
            // Roll the address count back; best effort, the count is only a hint
            // for fragment handling and is rewritten on the next change.
            let _ = dp.set_vip_addr(&vip.addr_key(), addr_count - 1);
            return Err(err.into());
        }
        self.addr_refs.insert(vip.addr, addr_count);
        self.services.insert(vip, service);
        tracing::info!(%vip, id, "VIP added");
        Ok(())
    }

    /// Removes a VIP and releases its reals.
    pub fn del_vip(&mut self, dp: &mut Dataplane, vip: &Vip) -> Result<()> {
        let service = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        dp.remove_vip(&vip.key())?;
        // The VIP is gone from the data path; the rest is cleanup.
        let members: Vec<IpAddr> = service.members.keys().copied().collect();
        self.services.remove(vip);
        let count = self.addr_refs.get(&vip.addr).copied().unwrap_or(1) - 1;
        if let Err(err) = dp.set_vip_addr(&vip.addr_key(), count) {
            tracing::warn!(%vip, %err, "could not update the VIP address count");
        }
        if count == 0 {
            self.addr_refs.remove(&vip.addr);
        } else {
            self.addr_refs.insert(vip.addr, count);
        }
        for real in members {
            self.release_real(dp, real);
        }
        tracing::info!(%vip, "VIP removed");
        Ok(())
    }

    /// Adds `real` (with its MAC already resolved) to `vip`.
    pub fn add_real(
        &mut self,
        dp: &mut Dataplane,
        vip: &Vip,
        real: IpAddr,
        mac: [u8; 6],
        weight: u32,
    ) -> Result<()> {
        self.check_add_real(vip, real, weight)?;
        // Make the real known to the dataplane before any table names it.
        let (slot, new_slot) = match self.reals.get(&real) {
            Some(slot) => (*slot, false),
            None => {
                let id = self.free_real_id().ok_or(StateError::Full {
                    what: "real",
                    limit: MAX_REALS - 1,
                })?;
                (RealSlot { id, mac, refs: 0 }, true)
            }
        };
        if new_slot || slot.mac != mac {
            dp.put_real(slot.id, &real_def(real, &mac))?;
            if new_slot {
                dp.reset_real_counter(slot.id)?;
            }
        }
        let mut service = self.services[vip].clone();
        service.members.insert(real, Member { weight });
        let mut tracked = self.reals.clone();
        tracked.insert(
            real,
            RealSlot {
                mac,
                refs: slot.refs + 1,
                ..slot
            },
        );
        if let Err(err) = self.publish(dp, vip, &mut service, &tracked) {
            if new_slot {
                let _ = dp.put_real(slot.id, &cleared_real());
            }
            return Err(err);
        }
        self.reals = tracked;
        self.services.insert(*vip, service);
        if new_slot {
            self.next_real_id = slot.id + 1;
        }
        tracing::info!(%vip, %real, mac = %fmt_mac(&mac), weight, "real added");
        Ok(())
    }

    /// Changes `real`'s weight in `vip`. Weight 0 drains it: no new flows, its
    /// tracked flows stay.
    pub fn set_weight(
        &mut self,
        dp: &mut Dataplane,
        vip: &Vip,
        real: IpAddr,
        weight: u32,
    ) -> Result<()> {
        if weight > MAX_WEIGHT {
            return Err(StateError::Weight(weight));
        }
        let service = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        let Some(member) = service.members.get(&real) else {
            return Err(StateError::UnknownReal { vip: *vip, real });
        };
        if member.weight == weight {
            return Ok(());
        }
        let mut service = service.clone();
        service.members.insert(real, Member { weight });
        let reals = self.reals.clone();
        self.publish(dp, vip, &mut service, &reals)?;
        self.services.insert(*vip, service);
        tracing::info!(%vip, %real, weight, "real weight changed");
        Ok(())
    }

    /// Removes `real` from `vip`; its slots move to the other reals.
    pub fn del_real(&mut self, dp: &mut Dataplane, vip: &Vip, real: IpAddr) -> Result<()> {
        let service = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        if !service.members.contains_key(&real) {
            return Err(StateError::UnknownReal { vip: *vip, real });
        }
        let mut service = service.clone();
        service.members.remove(&real);
        let reals = self.reals.clone();
        self.publish(dp, vip, &mut service, &reals)?;
        self.services.insert(*vip, service);
        self.release_real(dp, real);
        tracing::info!(%vip, %real, "real removed");
        Ok(())
    }

    /// Drops one reference to `real`; the last one clears it from the maps.
    fn release_real(&mut self, dp: &mut Dataplane, real: IpAddr) {
        let Some(slot) = self.reals.get_mut(&real) else {
            return;
        };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs == 0 {
            let id = slot.id;
            self.reals.remove(&real);
            // No table names it any more; a packet that read an old table slot
            // just before the swap finds family 0 and is counted as no-real.
            if let Err(err) = dp.put_real(id, &cleared_real()) {
                tracing::warn!(%real, %err, "could not clear the real's map entry");
            }
        }
    }

    /// Builds `service`'s table into its spare ring and makes it live.
    fn publish(
        &self,
        dp: &mut Dataplane,
        vip: &Vip,
        service: &mut Service,
        reals: &BTreeMap<IpAddr, RealSlot>,
    ) -> Result<()> {
        let spare = service.live_ring ^ 1;
        let table = table_with(service, reals);
        dp.write_ring(spare, &table)?;
        dp.put_vip(&vip.key(), &meta(service, spare))?;
        service.live_ring = spare;
        Ok(())
    }

    fn table(&self, service: &Service) -> Vec<u32> {
        table_with(service, &self.reals)
    }

    /// Which real the live table in the maps gives a flow hash (`xlb simulate`).
    pub fn real_for(&self, dp: &Dataplane, vip: &Vip, hash: u32) -> Result<Option<IpAddr>> {
        let service = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        let size = service.options.table_size;
        let table = dp.read_ring(service.live_ring, size)?;
        let id = table[(hash % size) as usize];
        Ok(self.real_by_id(id))
    }

    /// The address of real `id`, if it is one of ours.
    pub fn real_by_id(&self, id: u32) -> Option<IpAddr> {
        if id == REAL_NONE {
            return None;
        }
        self.reals
            .iter()
            .find(|(_, slot)| slot.id == id)
            .map(|(addr, _)| *addr)
    }

    /// The scheduler of `vip`.
    pub fn scheduler(&self, vip: &Vip) -> Option<Scheduler> {
        self.services.get(vip).map(|s| s.options.scheduler)
    }

    /// What the operator sees of every VIP, with live counters.
    pub fn view(&self, dp: &Dataplane) -> Result<Vec<VipView>> {
        self.services
            .iter()
            .map(|(vip, s)| {
                let counter = dp.vip_counter(s.id)?;
                let reals = s
                    .members
                    .iter()
                    .map(|(addr, m)| {
                        let slot = self.reals[addr];
                        let c = dp.real_counter(slot.id)?;
                        Ok(RealView {
                            addr: *addr,
                            weight: m.weight,
                            mac: fmt_mac(&slot.mac),
                            packets: c.packets,
                            bytes: c.bytes,
                            flows: c.flows,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(VipView {
                    vip: *vip,
                    id: s.id,
                    scheduler: s.options.scheduler,
                    forward: s.options.forward,
                    table_size: s.options.table_size,
                    packets: counter.packets,
                    bytes: counter.bytes,
                    flows: counter.flows,
                    reals,
                })
            })
            .collect()
    }
}

fn table_with(service: &Service, reals: &BTreeMap<IpAddr, RealSlot>) -> Vec<u32> {
    let backends: Vec<Backend> = service
        .members
        .iter()
        .map(|(addr, m)| Backend {
            addr: *addr,
            weight: m.weight,
            id: reals.get(addr).map_or(lb_common::REAL_NONE, |r| r.id),
        })
        .collect();
    maglev::build(&backends, service.options.table_size)
}

fn meta(service: &Service, ring: u32) -> VipMeta {
    VipMeta {
        vip_id: service.id,
        ring_id: ring,
        ring_size: service.options.table_size,
        flags: match service.options.scheduler {
            Scheduler::Maglev => 0,
            Scheduler::MaglevSrc => VIP_F_HASH_SRC_ONLY,
        } | match service.options.forward {
            Forward::Dr => 0,
            Forward::Tun => VIP_F_TUNNEL,
        },
    }
}

fn real_def(addr: IpAddr, mac: &[u8; 6]) -> RealDef {
    let (bytes, family) = addr_bytes(addr);
    RealDef {
        addr: bytes,
        mac: *mac,
        family,
        flags: 0,
    }
}

fn cleared_real() -> RealDef {
    RealDef {
        addr: [0; 16],
        mac: [0; 6],
        family: 0,
        flags: 0,
    }
}
