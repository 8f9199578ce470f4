//! The desired state of the balancer and the one reconcile step that applies it.
//!
//! [`Desired`] is everything the operator asked for: services, their reals,
//! weights and administrative states. Every change — `xlb apply`, a CLI
//! command, a config reload, a health verdict — builds a new `Desired` (or new
//! health facts) and calls [`State::reconcile`], which computes the difference
//! against what is in the maps and writes only what changes, in an order
//! packets can never observe half-done:
//!
//! - a real's slot in `XLB_REALS` is written before any table names it;
//! - a VIP's new Maglev table is written into its spare ring and published by
//!   one `XLB_VIPS` update (a new VIP: its table, counters and address first,
//!   the `XLB_VIPS` insert last);
//! - a slot is cleared only after no table names it.
//!
//! Every map write records its inverse; if one fails, the writes already made
//! are undone in reverse order and the model is left as it was.
//!
//! Real slots (ids) are per (VIP, real) pair, so counters are per pair and
//! disabling a real in one VIP cannot disturb another VIP's flows. Ids are
//! handed out round robin so a freed id is reused as late as possible
//! (conntrack entries may still name it; the data path re-hashes those once
//! the slot is cleared).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    AddrKey, MAX_REALS, MAX_VIPS, REAL_NONE, RING_POOL, RING_SIZE_DEFAULT, RING_SIZE_MAX, RealDef,
    VIP_F_HASH_SRC_ONLY, VIP_F_TUNNEL, VipKey, VipMeta,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    health::HealthCheck,
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
    #[error("cannot have more than {limit} {what}")]
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
    /// A real's MAC was not resolved before reconciling (a bug in the caller).
    #[error("no MAC known for real {0}")]
    NoMac(IpAddr),
    /// A map update failed; the writes already made were undone.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// Largest weight a real can have.
pub const MAX_WEIGHT: u32 = 65535;

/// Options of a VIP beyond its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// The operator's say over a real, which wins over health checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// In the table when healthy, with its weight.
    #[default]
    Enabled,
    /// Weight 0: no new flows; its tracked flows stay until they end.
    Drain,
    /// Out of the table and its tracked flows are moved to other reals.
    Disabled,
}

impl std::fmt::Display for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enabled => "enabled",
            Self::Drain => "drain",
            Self::Disabled => "disabled",
        })
    }
}

/// One real server of a service, as desired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealSpec {
    /// Relative share of new flows, 0..=65535.
    pub weight: u32,
    /// The operator's state.
    #[serde(default)]
    pub admin: Admin,
    /// This real's own health check (else the service's).
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

impl Default for RealSpec {
    fn default() -> Self {
        Self {
            weight: 1,
            admin: Admin::Enabled,
            health: None,
        }
    }
}

/// One service, as desired.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Its options.
    pub options: VipOptions,
    /// The health check of its reals (none: never probed, always healthy).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Its reals.
    pub reals: BTreeMap<IpAddr, RealSpec>,
}

impl ServiceSpec {
    /// The check that applies to `real`: its own, else the service's.
    pub fn check(&self, real: IpAddr) -> Option<&HealthCheck> {
        self.reals
            .get(&real)
            .and_then(|r| r.health.as_ref())
            .or(self.health.as_ref())
    }
}

/// Everything the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The services by VIP.
    pub services: BTreeMap<Vip, ServiceSpec>,
}

impl Desired {
    /// How each real is reached: by direct return when any VIP uses it in DR
    /// mode (then the real itself must be on the segment), else by tunnel (the
    /// next hop of the route toward it).
    pub fn reach(&self) -> BTreeMap<IpAddr, Forward> {
        let mut out = BTreeMap::new();
        for s in self.services.values() {
            for real in s.reals.keys() {
                let mode = out.entry(*real).or_insert(s.options.forward);
                if s.options.forward == Forward::Dr {
                    *mode = Forward::Dr;
                }
            }
        }
        out
    }

    /// Checks the values that do not depend on the running state: weights,
    /// table sizes, address families, capacities.
    pub fn validate(&self) -> Result<()> {
        if self.services.len() > MAX_VIPS as usize {
            return Err(StateError::Full {
                what: "VIPs",
                limit: MAX_VIPS,
            });
        }
        let pairs: usize = self.services.values().map(|s| s.reals.len()).sum();
        if pairs >= MAX_REALS as usize {
            return Err(StateError::Full {
                what: "reals (over all VIPs)",
                limit: MAX_REALS - 1,
            });
        }
        let slots: u64 = self
            .services
            .values()
            .map(|s| 2 * u64::from(s.options.table_size))
            .sum();
        if slots > u64::from(RING_POOL) {
            return Err(StateError::Full {
                what: "Maglev table slots (two tables of table_size per VIP)",
                limit: RING_POOL,
            });
        }
        for (vip, s) in &self.services {
            let size = s.options.table_size;
            if !maglev::is_prime(size) || size > RING_SIZE_MAX {
                return Err(StateError::TableSize(size));
            }
            for (real, spec) in &s.reals {
                if spec.weight > MAX_WEIGHT {
                    return Err(StateError::Weight(spec.weight));
                }
                check_family(vip, s.options.forward, *real)?;
            }
        }
        Ok(())
    }
}

/// One line per difference between two desired states ("VIP ... added",
/// "real ... of ... drained", ...), for the log.
pub fn describe_changes(old: &Desired, new: &Desired) -> Vec<String> {
    let mut out = Vec::new();
    for vip in old.services.keys() {
        if !new.services.contains_key(vip) {
            out.push(format!("VIP {vip} removed"));
        }
    }
    for (vip, s) in &new.services {
        let Some(o) = old.services.get(vip) else {
            out.push(format!(
                "VIP {vip} added ({}, {}, table {})",
                s.options.forward, s.options.scheduler, s.options.table_size
            ));
            for (real, r) in &s.reals {
                out.push(format!(
                    "real {real} of {vip} added (weight {}, {})",
                    r.weight, r.admin
                ));
            }
            continue;
        };
        if o.options != s.options {
            out.push(format!(
                "VIP {vip} now {}, {}, table {}",
                s.options.forward, s.options.scheduler, s.options.table_size
            ));
        }
        if o.health != s.health {
            out.push(format!("VIP {vip} health check changed"));
        }
        for real in o.reals.keys() {
            if !s.reals.contains_key(real) {
                out.push(format!("real {real} of {vip} removed"));
            }
        }
        for (real, r) in &s.reals {
            match o.reals.get(real) {
                None => out.push(format!(
                    "real {real} of {vip} added (weight {}, {})",
                    r.weight, r.admin
                )),
                Some(p) => {
                    if p.weight != r.weight {
                        out.push(format!(
                            "real {real} of {vip} weight {} -> {}",
                            p.weight, r.weight
                        ));
                    }
                    if p.admin != r.admin {
                        out.push(format!("real {real} of {vip} {} -> {}", p.admin, r.admin));
                    }
                    if p.health != r.health {
                        out.push(format!("real {real} of {vip} health check changed"));
                    }
                }
            }
        }
    }
    out
}

/// Whether `real` can serve `vip` in mode `forward`.
pub fn check_family(vip: &Vip, forward: Forward, real: IpAddr) -> Result<()> {
    let why = match (forward, vip.addr.is_ipv4(), real.is_ipv4()) {
        (Forward::Dr, v4, r4) if v4 != r4 => {
            "direct return forwards the packet unchanged, so the real must be of the VIP's \
             address family"
        }
        (Forward::Tun, false, true) => "an IPv6 VIP needs IPv6 reals (IPv6-in-IPv4 is not offered)",
        _ => return Ok(()),
    };
    Err(StateError::Family {
        vip: *vip,
        real,
        forward,
        why,
    })
}

/// The map writes a reconcile makes. Implemented by [`Dataplane`]; tests use a
/// recording fake to check that a change writes only what it must.
pub trait Maps {
    /// Writes a Maglev table into a ring that no VIP uses yet.
    fn write_ring(&mut self, ring_id: u32, table: &[u32]) -> Result<(), DataplaneError>;
    /// Inserts or replaces a VIP.
    fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError>;
    /// Removes a VIP.
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    /// Sets the number of VIPs on an address (0 removes it).
    fn set_vip_addr(&mut self, key: &AddrKey, count: u32) -> Result<(), DataplaneError>;
    /// Writes a real slot.
    fn put_real(&mut self, id: u32, real: &RealDef) -> Result<(), DataplaneError>;
    /// Zeroes a VIP's counters.
    fn reset_vip_counter(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Zeroes a real slot's counters.
    fn reset_real_counter(&mut self, id: u32) -> Result<(), DataplaneError>;
}

impl Maps for Dataplane {
    fn write_ring(&mut self, ring_id: u32, table: &[u32]) -> Result<(), DataplaneError> {
        Dataplane::write_ring(self, ring_id, table)
    }
    fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        Dataplane::put_vip(self, key, meta)
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        Dataplane::remove_vip(self, key)
    }
    fn set_vip_addr(&mut self, key: &AddrKey, count: u32) -> Result<(), DataplaneError> {
        Dataplane::set_vip_addr(self, key, count)
    }
    fn put_real(&mut self, id: u32, real: &RealDef) -> Result<(), DataplaneError> {
        Dataplane::put_real(self, id, real)
    }
    fn reset_vip_counter(&mut self, id: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_vip_counter(self, id)
    }
    fn reset_real_counter(&mut self, id: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_real_counter(self, id)
    }
}

/// A map write that can be undone.
#[derive(Clone, Copy, Debug)]
enum Op {
    PutVip(VipKey, VipMeta),
    RemoveVip(VipKey),
    SetAddr(AddrKey, u32),
    PutReal(u32, RealDef),
}

/// Runs map writes, remembering how to undo them.
struct Writer<'m, M: Maps> {
    maps: &'m mut M,
    undo: Vec<Op>,
    writes: usize,
}

impl<M: Maps> Writer<'_, M> {
    fn exec(maps: &mut M, op: Op) -> Result<(), DataplaneError> {
        match op {
            Op::PutVip(k, m) => maps.put_vip(&k, &m),
            Op::RemoveVip(k) => maps.remove_vip(&k),
            Op::SetAddr(k, n) => maps.set_vip_addr(&k, n),
            Op::PutReal(id, r) => maps.put_real(id, &r),
        }
    }

    /// Performs `op`; `inverse` restores what it replaced.
    fn write(&mut self, op: Op, inverse: Op) -> Result<(), DataplaneError> {
        Self::exec(self.maps, op)?;
        self.undo.push(inverse);
        self.writes += 1;
        Ok(())
    }

    fn ring(&mut self, ring_id: u32, table: &[u32]) -> Result<(), DataplaneError> {
        // Rings are written only while no VIP points at them: nothing to undo.
        self.maps.write_ring(ring_id, table)?;
        self.writes += 1;
        Ok(())
    }

    fn rollback(self) {
        for op in self.undo.into_iter().rev() {
            if let Err(err) = Self::exec(self.maps, op) {
                tracing::error!(%err, ?op, "undoing a map write failed; run `xlb apply` again");
            }
        }
    }
}

/// A service as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    id: u32,
    /// Offsets in the ring pool of the VIP's two tables (each `table_size` long).
    rings: [u32; 2],
    /// Which of `rings` is live.
    live: usize,
    options: VipOptions,
    /// Real slot id of each real of the service.
    slots: BTreeMap<IpAddr, u32>,
    /// Effective weight of each real in the live table (absent: not in it).
    table: BTreeMap<IpAddr, u32>,
}

/// A real slot as it is in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    /// The real's address.
    addr: IpAddr,
    /// The MAC written into the slot.
    mac: [u8; 6],
    /// Whether the slot is written (false: cleared because the real is disabled).
    live: bool,
}

/// First-fit allocator of ranges in the ring pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RingPool {
    /// Used ranges: start → length.
    used: BTreeMap<u32, u32>,
}

impl RingPool {
    fn alloc(&mut self, len: u32) -> Option<u32> {
        let mut start = 0u32;
        for (&s, &l) in &self.used {
            if s - start >= len {
                break;
            }
            start = s + l;
        }
        if u64::from(start) + u64::from(len) > u64::from(RING_POOL) {
            return None;
        }
        self.used.insert(start, len);
        Some(start)
    }

    fn free(&mut self, start: u32) {
        self.used.remove(&start);
    }
}

/// What a reconcile did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Map writes made (rings count one each).
    pub writes: usize,
    /// Tables rebuilt and published.
    pub tables: usize,
}

/// The desired state, health facts, and the ids they occupy in the maps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    desired: Desired,
    /// Health verdicts: (VIP, real) → up. Absent means up (never probed).
    #[serde(with = "health_serde")]
    health: BTreeMap<(Vip, IpAddr), bool>,
    /// Share of a VIP's reals that must stay in its table; below it health
    /// verdicts are ignored for that VIP (fail open). 0.0 disables the guard.
    min_healthy: f64,
    /// VIPs whose health verdicts are currently ignored by the guard.
    guarded: BTreeSet<Vip>,
    services: BTreeMap<Vip, Applied>,
    /// Slot id → its contents.
    slots: BTreeMap<u32, Slot>,
    /// Known MACs by real address (the next hop toward it).
    macs: BTreeMap<IpAddr, [u8; 6]>,
    next_real_id: u32,
    rings: RingPool,
}

/// JSON maps need string keys: the health map is stored as a list.
mod health_serde {
    use std::{collections::BTreeMap, net::IpAddr};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::Vip;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<(Vip, IpAddr), bool>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        m.iter()
            .map(|((v, r), up)| (*v, *r, *up))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(Vip, IpAddr), bool>, D::Error> {
        Ok(Vec::<(Vip, IpAddr, bool)>::deserialize(d)?
            .into_iter()
            .map(|(v, r, up)| ((v, r), up))
            .collect())
    }
}

/// What `xlb vip list` and the API show of a VIP.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
    /// Whether the avalanche guard is holding unhealthy reals in its table.
    pub guarded: bool,
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RealView {
    /// The real's address.
    pub addr: IpAddr,
    /// Its configured weight.
    pub weight: u32,
    /// The weight it has in the live table (0: no new flows; absent when out of it).
    pub effective_weight: Option<u32>,
    /// The operator's state.
    pub admin: Admin,
    /// The last health verdict (true when never probed).
    pub healthy: bool,
    /// MAC of the next hop toward it (itself in DR mode).
    pub mac: String,
    /// Packets forwarded to it for this VIP.
    pub packets: u64,
    /// Bytes forwarded to it for this VIP.
    pub bytes: u64,
    /// New flows sent to it for this VIP.
    pub flows: u64,
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

    /// The desired state now in force.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Sets the avalanche-guard threshold (share of reals, 0.0..=1.0).
    pub fn set_min_healthy(&mut self, share: f64) {
        self.min_healthy = share.clamp(0.0, 1.0);
    }

    /// The VIPs whose health verdicts the avalanche guard currently ignores.
    pub fn guarded(&self) -> &BTreeSet<Vip> {
        &self.guarded
    }

    /// The health verdict of a real (true when never probed).
    pub fn healthy(&self, vip: &Vip, real: IpAddr) -> bool {
        self.health.get(&(*vip, real)).copied().unwrap_or(true)
    }

    /// Whether `vip` is configured.
    pub fn has_vip(&self, vip: &Vip) -> bool {
        self.desired.services.contains_key(vip)
    }

    /// The forwarding mode of `vip`.
    pub fn forward(&self, vip: &Vip) -> Option<Forward> {
        self.desired.services.get(vip).map(|s| s.options.forward)
    }

    /// The scheduler of `vip`.
    pub fn scheduler(&self, vip: &Vip) -> Option<Scheduler> {
        self.desired.services.get(vip).map(|s| s.options.scheduler)
    }

    /// The MAC known for a real address, if any.
    pub fn mac(&self, real: IpAddr) -> Option<[u8; 6]> {
        self.macs.get(&real).copied()
    }

    /// Reals of `desired` whose MAC is not known yet, with whether any VIP
    /// reaches them by direct return (then the real itself must be on the
    /// segment; otherwise the next hop toward it is resolved).
    pub fn unresolved(&self, desired: &Desired) -> BTreeMap<IpAddr, Forward> {
        let mut reach = desired.reach();
        reach.retain(|real, _| !self.macs.contains_key(real));
        reach
    }

    /// Applies `desired` (with the MACs of reals not known before) to the maps.
    pub fn reconcile<M: Maps>(
        &mut self,
        maps: &mut M,
        desired: Desired,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
    ) -> Result<Changes> {
        desired.validate()?;
        let mut next = self.clone();
        next.desired = desired;
        // A verdict dies with its real: one removed and added again starts
        // healthy, like any new real (and is not kept out with no probe to
        // bring it back).
        next.health.retain(|(vip, real), _| {
            next.desired
                .services
                .get(vip)
                .is_some_and(|s| s.reals.contains_key(real))
        });
        for (addr, mac) in macs {
            next.macs.insert(*addr, *mac);
        }
        for s in next.desired.services.values() {
            for real in s.reals.keys() {
                if !next.macs.contains_key(real) {
                    return Err(StateError::NoMac(*real));
                }
            }
        }
        let mut w = Writer {
            maps,
            undo: Vec::new(),
            writes: 0,
        };
        let mut tables = 0;
        match next.apply(self, &mut w, &mut tables) {
            Ok(()) => {
                let changes = Changes {
                    writes: w.writes,
                    tables,
                };
                next.forget_unused_macs();
                *self = next;
                Ok(changes)
            }
            Err(err) => {
                w.rollback();
                Err(err.into())
            }
        }
    }

    /// Drops MACs of reals no service lists any more.
    fn forget_unused_macs(&mut self) {
        let used: BTreeSet<IpAddr> = self
            .desired
            .services
            .values()
            .flat_map(|s| s.reals.keys().copied())
            .collect();
        self.macs.retain(|a, _| used.contains(a));
    }

    fn free_vip_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.services.values().map(|s| s.id).collect();
        (0..MAX_VIPS).find(|id| !used.contains(id))
    }

    fn alloc_slot(&mut self) -> Option<u32> {
        // Id 0 is REAL_NONE; start after the last id handed out.
        let start = self.next_real_id.clamp(1, MAX_REALS - 1);
        let id = (start..MAX_REALS)
            .chain(1..start)
            .find(|id| !self.slots.contains_key(id))?;
        self.next_real_id = id + 1;
        Some(id)
    }

    /// Effective weights of a service's reals given health and the guard:
    /// disabled reals are left out; drained or unhealthy ones get 0.
    fn effective(&mut self, vip: &Vip) -> BTreeMap<IpAddr, u32> {
        let spec = &self.desired.services[vip];
        let enabled: Vec<(&IpAddr, &RealSpec)> = spec
            .reals
            .iter()
            .filter(|(_, r)| r.admin != Admin::Disabled)
            .collect();
        let healthy = enabled
            .iter()
            .filter(|(a, _)| self.health.get(&(*vip, **a)).copied().unwrap_or(true))
            .count();
        // Avalanche guard: never let health take a VIP below min_healthy of its
        // reals; then ignore health for it altogether (fail open).
        let guard = !enabled.is_empty()
            && self.min_healthy > 0.0
            && (healthy as f64) < self.min_healthy * enabled.len() as f64;
        if guard {
            if self.guarded.insert(*vip) {
                tracing::warn!(
                    %vip,
                    healthy,
                    total = enabled.len(),
                    "avalanche guard: too few healthy reals, keeping all of them in the table"
                );
            }
        } else if self.guarded.remove(vip) {
            tracing::info!(%vip, "avalanche guard released");
        }
        enabled
            .into_iter()
            .map(|(addr, r)| {
                let up = guard || self.health.get(&(*vip, *addr)).copied().unwrap_or(true);
                let w = if r.admin == Admin::Drain || !up {
                    0
                } else {
                    r.weight
                };
                (*addr, w)
            })
            .collect()
    }

    /// Writes the difference between `old` and `self` (already holding the new
    /// desired state) through `w`, updating `self`'s applied records.
    fn apply<M: Maps>(
        &mut self,
        old: &State,
        w: &mut Writer<'_, M>,
        tables: &mut usize,
    ) -> Result<(), DataplaneError> {
        // 1. Services that go away: out of the data path first, then cleanup.
        let gone: Vec<Vip> = old
            .services
            .keys()
            .filter(|v| !self.desired.services.contains_key(v))
            .copied()
            .collect();
        for vip in &gone {
            let applied = self.services.remove(vip).expect("applied service");
            w.write(
                Op::RemoveVip(vip.key()),
                Op::PutVip(vip.key(), meta(&applied, applied.rings[applied.live])),
            )?;
            for r in applied.rings {
                self.rings.free(r);
            }
            self.release_addr(vip, w)?;
            for id in applied.slots.values() {
                self.clear_slot(*id, w)?;
                self.slots.remove(id);
            }
        }
        // 2. New and changed services.
        let vips: Vec<Vip> = self.desired.services.keys().copied().collect();
        for vip in vips {
            self.apply_service(&vip, w, tables)?;
        }
        Ok(())
    }

    fn apply_service<M: Maps>(
        &mut self,
        vip: &Vip,
        w: &mut Writer<'_, M>,
        tables: &mut usize,
    ) -> Result<(), DataplaneError> {
        let spec = self.desired.services[vip].clone();
        let is_new = !self.services.contains_key(vip);
        let mut applied = match self.services.get(vip) {
            Some(a) => a.clone(),
            None => {
                let id = self.free_vip_id().ok_or(DataplaneError::OutOfRange {
                    what: "VIP id",
                    index: MAX_VIPS,
                    capacity: MAX_VIPS,
                })?;
                let size = spec.options.table_size;
                let pool_full = || DataplaneError::OutOfRange {
                    what: "Maglev table slots in the ring pool",
                    index: size,
                    capacity: RING_POOL,
                };
                let a = self.rings.alloc(size).ok_or_else(pool_full)?;
                let b = self.rings.alloc(size).ok_or_else(pool_full)?;
                Applied {
                    id,
                    rings: [a, b],
                    live: 0,
                    options: spec.options,
                    slots: BTreeMap::new(),
                    table: BTreeMap::new(),
                }
            }
        };
        // Slots of new reals, and slots whose MAC or liveness changed.
        for (real, r) in &spec.reals {
            let mac = self.macs[real];
            let live = r.admin != Admin::Disabled;
            let id = match applied.slots.get(real) {
                Some(id) => *id,
                None => {
                    let id = self.alloc_slot().ok_or(DataplaneError::OutOfRange {
                        what: "real id",
                        index: MAX_REALS,
                        capacity: MAX_REALS,
                    })?;
                    applied.slots.insert(*real, id);
                    w.maps.reset_real_counter(id)?;
                    self.slots.insert(
                        id,
                        Slot {
                            addr: *real,
                            mac,
                            live: false,
                        },
                    );
                    id
                }
            };
            let slot = self.slots[&id];
            if slot.live != live || (live && slot.mac != mac) {
                let (new, old) = (
                    slot_def(*real, &mac, live),
                    slot_def(*real, &slot.mac, slot.live),
                );
                w.write(Op::PutReal(id, new), Op::PutReal(id, old))?;
                self.slots.insert(
                    id,
                    Slot {
                        addr: *real,
                        mac,
                        live,
                    },
                );
            }
        }
        // The table, if it changes.
        let effective = self.effective(vip);
        if is_new || effective != applied.table || spec.options != applied.options {
            let resized = applied.options.table_size != spec.options.table_size;
            applied.options = spec.options;
            applied.table = effective;
            let table = table_of(&applied);
            let size = spec.options.table_size;
            let ring = if is_new {
                applied.rings[applied.live]
            } else if resized {
                // A new size needs new ranges: the new table goes into a fresh
                // one; the old ones are freed once it is live.
                self.rings.alloc(size).ok_or(DataplaneError::OutOfRange {
                    what: "Maglev table slots in the ring pool",
                    index: size,
                    capacity: RING_POOL,
                })?
            } else {
                applied.rings[applied.live ^ 1]
            };
            w.ring(ring, &table)?;
            if is_new {
                w.maps.reset_vip_counter(applied.id)?;
                let count = self.addr_count(&vip.addr);
                w.write(
                    Op::SetAddr(vip.addr_key(), count + 1),
                    Op::SetAddr(vip.addr_key(), count),
                )?;
                w.write(
                    Op::PutVip(vip.key(), meta(&applied, ring)),
                    Op::RemoveVip(vip.key()),
                )?;
            } else {
                let mut before_applied = applied.clone();
                before_applied.options = self.services[vip].options;
                let before = meta(&before_applied, applied.rings[applied.live]);
                w.write(
                    Op::PutVip(vip.key(), meta(&applied, ring)),
                    Op::PutVip(vip.key(), before),
                )?;
            }
            if resized && !is_new {
                for r in applied.rings {
                    self.rings.free(r);
                }
                let spare = self.rings.alloc(size).ok_or(DataplaneError::OutOfRange {
                    what: "Maglev table slots in the ring pool",
                    index: size,
                    capacity: RING_POOL,
                })?;
                applied.rings = [ring, spare];
                applied.live = 0;
            } else if !is_new {
                applied.live ^= 1;
            }
            *tables += 1;
            tracing::debug!(%vip, reals = applied.table.len(), "table published");
        }
        // Reals that left the service: clear their slots now no table names them.
        let leaving: Vec<(IpAddr, u32)> = applied
            .slots
            .iter()
            .filter(|(a, _)| !spec.reals.contains_key(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (real, id) in leaving {
            self.clear_slot(id, w)?;
            self.slots.remove(&id);
            applied.slots.remove(&real);
        }
        self.services.insert(*vip, applied);
        Ok(())
    }

    /// How many applied services use `addr`.
    fn addr_count(&self, addr: &IpAddr) -> u32 {
        self.services.keys().filter(|v| v.addr == *addr).count() as u32
    }

    fn release_addr<M: Maps>(
        &self,
        vip: &Vip,
        w: &mut Writer<'_, M>,
    ) -> Result<(), DataplaneError> {
        // `vip` is already out of self.services.
        let count = self.addr_count(&vip.addr);
        w.write(
            Op::SetAddr(vip.addr_key(), count),
            Op::SetAddr(vip.addr_key(), count + 1),
        )
    }

    fn clear_slot<M: Maps>(&self, id: u32, w: &mut Writer<'_, M>) -> Result<(), DataplaneError> {
        let Some(slot) = self.slots.get(&id) else {
            return Ok(());
        };
        if !slot.live {
            return Ok(());
        }
        w.write(
            Op::PutReal(id, cleared_real()),
            Op::PutReal(id, slot_def(slot.addr, &slot.mac, true)),
        )
    }

    // --- convenience operations: each is one reconcile of a modified desired state ---

    fn modified(&self, f: impl FnOnce(&mut Desired) -> Result<()>) -> Result<Desired> {
        let mut d = self.desired.clone();
        f(&mut d)?;
        Ok(d)
    }

    /// Adds a VIP with no reals (packets to it are dropped and counted until it has one).
    pub fn add_vip<M: Maps>(&mut self, maps: &mut M, vip: Vip, options: VipOptions) -> Result<()> {
        let d = self.modified(|d| {
            if d.services.contains_key(&vip) {
                return Err(StateError::VipExists(vip));
            }
            d.services.insert(
                vip,
                ServiceSpec {
                    options,
                    health: None,
                    reals: BTreeMap::new(),
                },
            );
            Ok(())
        })?;
        self.reconcile(maps, d, &BTreeMap::new())?;
        tracing::info!(%vip, forward = %options.forward, "VIP added");
        Ok(())
    }

    /// Removes a VIP and its reals.
    pub fn del_vip<M: Maps>(&mut self, maps: &mut M, vip: &Vip) -> Result<()> {
        let d = self.modified(|d| {
            d.services.remove(vip).ok_or(StateError::UnknownVip(*vip))?;
            Ok(())
        })?;
        self.reconcile(maps, d, &BTreeMap::new())?;
        tracing::info!(%vip, "VIP removed");
        Ok(())
    }

    /// Checks that `real` could be added to `vip` with `weight`, without
    /// changing anything (the daemon calls it before spending time resolving
    /// the real's MAC).
    pub fn check_add_real(&self, vip: &Vip, real: IpAddr, weight: u32) -> Result<()> {
        let s = self
            .desired
            .services
            .get(vip)
            .ok_or(StateError::UnknownVip(*vip))?;
        if s.reals.contains_key(&real) {
            return Err(StateError::RealExists { vip: *vip, real });
        }
        if weight > MAX_WEIGHT {
            return Err(StateError::Weight(weight));
        }
        check_family(vip, s.options.forward, real)
    }

    /// Adds `real` (its MAC already resolved) to `vip`.
    pub fn add_real<M: Maps>(
        &mut self,
        maps: &mut M,
        vip: &Vip,
        real: IpAddr,
        mac: [u8; 6],
        weight: u32,
    ) -> Result<()> {
        self.check_add_real(vip, real, weight)?;
        let d = self.modified(|d| {
            let s = d
                .services
                .get_mut(vip)
                .ok_or(StateError::UnknownVip(*vip))?;
            s.reals.insert(
                real,
                RealSpec {
                    weight,
                    ..RealSpec::default()
                },
            );
            Ok(())
        })?;
        let macs = BTreeMap::from([(real, mac)]);
        self.reconcile(maps, d, &macs)?;
        tracing::info!(%vip, %real, mac = %fmt_mac(&mac), weight, "real added");
        Ok(())
    }

    /// Changes what the operator says of a real: its weight and/or admin state.
    pub fn set_real<M: Maps>(
        &mut self,
        maps: &mut M,
        vip: &Vip,
        real: IpAddr,
        weight: Option<u32>,
        admin: Option<Admin>,
    ) -> Result<()> {
        let d = self.modified(|d| {
            let s = d
                .services
                .get_mut(vip)
                .ok_or(StateError::UnknownVip(*vip))?;
            let r = s
                .reals
                .get_mut(&real)
                .ok_or(StateError::UnknownReal { vip: *vip, real })?;
            if let Some(w) = weight {
                r.weight = w;
            }
            if let Some(a) = admin {
                r.admin = a;
            }
            Ok(())
        })?;
        self.reconcile(maps, d, &BTreeMap::new())?;
        tracing::info!(%vip, %real, ?weight, admin = ?admin, "real changed");
        Ok(())
    }

    /// Changes `real`'s weight in `vip` (0 drains it).
    pub fn set_weight<M: Maps>(
        &mut self,
        maps: &mut M,
        vip: &Vip,
        real: IpAddr,
        weight: u32,
    ) -> Result<()> {
        self.set_real(maps, vip, real, Some(weight), None)
    }

    /// Removes `real` from `vip`; its slots move to the other reals.
    pub fn del_real<M: Maps>(&mut self, maps: &mut M, vip: &Vip, real: IpAddr) -> Result<()> {
        let d = self.modified(|d| {
            let s = d
                .services
                .get_mut(vip)
                .ok_or(StateError::UnknownVip(*vip))?;
            s.reals
                .remove(&real)
                .ok_or(StateError::UnknownReal { vip: *vip, real })?;
            Ok(())
        })?;
        self.reconcile(maps, d, &BTreeMap::new())?;
        tracing::info!(%vip, %real, "real removed");
        Ok(())
    }

    /// Records a health verdict and applies it (the table changes only when
    /// the effective membership does).
    pub fn set_health<M: Maps>(
        &mut self,
        maps: &mut M,
        vip: &Vip,
        real: IpAddr,
        up: bool,
    ) -> Result<Changes> {
        if !self
            .desired
            .services
            .get(vip)
            .is_some_and(|s| s.reals.contains_key(&real))
        {
            return Err(StateError::UnknownReal { vip: *vip, real });
        }
        let before = self.health.insert((*vip, real), up);
        let d = self.desired.clone();
        match self.reconcile(maps, d, &BTreeMap::new()) {
            Ok(c) => Ok(c),
            Err(err) => {
                match before {
                    Some(b) => self.health.insert((*vip, real), b),
                    None => self.health.remove(&(*vip, real)),
                };
                Err(err)
            }
        }
    }

    // --- queries ---

    /// Which real the live table in the maps gives a flow hash (`xlb simulate`).
    pub fn real_for(&self, dp: &Dataplane, vip: &Vip, hash: u32) -> Result<Option<IpAddr>> {
        let applied = self.services.get(vip).ok_or(StateError::UnknownVip(*vip))?;
        let size = applied.options.table_size;
        let table = dp.read_ring(applied.rings[applied.live], size)?;
        let id = table[(hash % size) as usize];
        Ok(self.real_by_id(id))
    }

    /// The address of the real in slot `id`, if it is one of ours.
    pub fn real_by_id(&self, id: u32) -> Option<IpAddr> {
        if id == REAL_NONE {
            return None;
        }
        self.services
            .values()
            .flat_map(|s| s.slots.iter())
            .find(|(_, i)| **i == id)
            .map(|(a, _)| *a)
    }

    /// The VIP ids and live table offsets in the maps, to check pins against on adoption.
    pub fn applied_vips(&self) -> impl Iterator<Item = (Vip, u32, u32)> + '_ {
        self.services
            .iter()
            .map(|(v, a)| (*v, a.id, a.rings[a.live]))
    }

    /// What the operator sees of every VIP, with live counters.
    pub fn view(&self, dp: &Dataplane) -> Result<Vec<VipView>> {
        self.services
            .iter()
            .map(|(vip, a)| {
                let counter = dp.vip_counter(a.id)?;
                let spec = &self.desired.services[vip];
                let reals = spec
                    .reals
                    .iter()
                    .map(|(addr, r)| {
                        let id = a.slots[addr];
                        let c = dp.real_counter(id)?;
                        Ok(RealView {
                            addr: *addr,
                            weight: r.weight,
                            effective_weight: a.table.get(addr).copied(),
                            admin: r.admin,
                            healthy: self.healthy(vip, *addr),
                            mac: fmt_mac(&self.slots[&id].mac),
                            packets: c.packets,
                            bytes: c.bytes,
                            flows: c.flows,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(VipView {
                    vip: *vip,
                    id: a.id,
                    scheduler: a.options.scheduler,
                    forward: a.options.forward,
                    table_size: a.options.table_size,
                    guarded: self.guarded.contains(vip),
                    packets: counter.packets,
                    bytes: counter.bytes,
                    flows: counter.flows,
                    reals,
                })
            })
            .collect()
    }
}

fn table_of(applied: &Applied) -> Vec<u32> {
    let backends: Vec<Backend> = applied
        .table
        .iter()
        .map(|(addr, weight)| Backend {
            addr: *addr,
            weight: *weight,
            id: applied.slots[addr],
        })
        .collect();
    maglev::build(&backends, applied.options.table_size)
}

fn meta(applied: &Applied, ring: u32) -> VipMeta {
    VipMeta {
        vip_id: applied.id,
        ring_off: ring,
        ring_size: applied.options.table_size,
        flags: match applied.options.scheduler {
            Scheduler::Maglev => 0,
            Scheduler::MaglevSrc => VIP_F_HASH_SRC_ONLY,
        } | match applied.options.forward {
            Forward::Dr => 0,
            Forward::Tun => VIP_F_TUNNEL,
        },
    }
}

fn slot_def(addr: IpAddr, mac: &[u8; 6], live: bool) -> RealDef {
    if !live {
        return cleared_real();
    }
    let (bytes, family) = addr_bytes(addr);
    RealDef {
        addr: bytes,
        mac: *mac,
        family,
        flags: 0,
        // generation: set by the allocator (lead)
        generation: 0,
    }
}

fn cleared_real() -> RealDef {
    RealDef {
        addr: [0; 16],
        mac: [0; 6],
        family: 0,
        flags: 0,
        // generation: set by the allocator (lead)
        generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every map write; can be told to fail the n-th write.
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        fail_at: Option<usize>,
        vips: BTreeMap<VipKey, VipMeta>,
        reals: BTreeMap<u32, RealDef>,
        addrs: BTreeMap<AddrKey, u32>,
    }

    impl Recorder {
        fn step(&mut self, what: String) -> Result<(), DataplaneError> {
            if self.fail_at == Some(self.log.len()) {
                // Fail once; the undo writes that follow must go through.
                self.fail_at = None;
                return Err(DataplaneError::IfaceName("injected failure".into()));
            }
            self.log.push(what);
            Ok(())
        }
    }

    impl Maps for Recorder {
        fn write_ring(&mut self, ring_id: u32, _: &[u32]) -> Result<(), DataplaneError> {
            self.step(format!("ring {ring_id}"))
        }
        fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
            self.step(format!("put_vip ring={}", meta.ring_off))?;
            self.vips.insert(*key, *meta);
            Ok(())
        }
        fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
            self.step("remove_vip".into())?;
            self.vips.remove(key);
            Ok(())
        }
        fn set_vip_addr(&mut self, key: &AddrKey, count: u32) -> Result<(), DataplaneError> {
            self.step(format!("addr {count}"))?;
            if count == 0 {
                self.addrs.remove(key);
            } else {
                self.addrs.insert(*key, count);
            }
            Ok(())
        }
        fn put_real(&mut self, id: u32, real: &RealDef) -> Result<(), DataplaneError> {
            self.step(format!("real {id} family={}", real.family))?;
            self.reals.insert(id, *real);
            Ok(())
        }
        fn reset_vip_counter(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn reset_real_counter(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
    }

    fn vip(s: &str) -> Vip {
        s.parse().expect("valid VIP")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid address")
    }

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    fn two_reals() -> (State, Recorder) {
        let mut st = State::new();
        let mut rec = Recorder::default();
        let v = vip("203.0.113.10:80/tcp");
        st.add_vip(&mut rec, v, VipOptions::default()).expect("vip");
        st.add_real(&mut rec, &v, ip("198.51.100.11"), mac(11), 1)
            .expect("real");
        st.add_real(&mut rec, &v, ip("198.51.100.12"), mac(12), 1)
            .expect("real");
        rec.log.clear();
        (st, rec)
    }

    #[test]
    fn new_vip_writes_table_address_then_vip() {
        let mut st = State::new();
        let mut rec = Recorder::default();
        st.add_vip(&mut rec, vip("203.0.113.10:80/tcp"), VipOptions::default())
            .expect("vip");
        assert_eq!(rec.log, ["ring 0", "addr 1", "put_vip ring=0"]);
    }

    #[test]
    fn adding_a_real_writes_its_slot_then_flips_to_the_spare_ring() {
        let (mut st, mut rec) = two_reals();
        let v = vip("203.0.113.10:80/tcp");
        st.add_real(&mut rec, &v, ip("198.51.100.13"), mac(13), 1)
            .expect("real");
        // Live ring was 0 after the second real's flip? Rings alternate per change.
        assert_eq!(rec.log.len(), 3, "{:?}", rec.log);
        assert!(rec.log[0].starts_with("real ") && rec.log[0].ends_with("family=4"));
        assert!(rec.log[1].starts_with("ring "));
        assert!(rec.log[2].starts_with("put_vip ring="));
    }

    #[test]
    fn weight_change_rebuilds_only_that_vips_table() {
        let (mut st, mut rec) = two_reals();
        let other = vip("203.0.113.11:80/tcp");
        st.add_vip(&mut rec, other, VipOptions::default())
            .expect("vip");
        rec.log.clear();
        st.set_weight(
            &mut rec,
            &vip("203.0.113.10:80/tcp"),
            ip("198.51.100.11"),
            5,
        )
        .expect("weight");
        assert_eq!(rec.log.len(), 2, "{:?}", rec.log);
        assert!(rec.log[0].starts_with("ring "));
        assert!(rec.log[1].starts_with("put_vip"));
        // An unchanged weight writes nothing.
        rec.log.clear();
        st.set_weight(
            &mut rec,
            &vip("203.0.113.10:80/tcp"),
            ip("198.51.100.11"),
            5,
        )
        .expect("weight");
        assert!(rec.log.is_empty(), "{:?}", rec.log);
    }

    #[test]
    fn removing_a_real_flips_the_table_before_clearing_its_slot() {
        let (mut st, mut rec) = two_reals();
        st.del_real(&mut rec, &vip("203.0.113.10:80/tcp"), ip("198.51.100.12"))
            .expect("del");
        assert_eq!(rec.log.len(), 3, "{:?}", rec.log);
        assert!(rec.log[0].starts_with("ring "));
        assert!(rec.log[1].starts_with("put_vip"));
        assert!(rec.log[2].ends_with("family=0"), "{:?}", rec.log);
    }

    #[test]
    fn removing_a_vip_removes_it_before_cleanup() {
        let (mut st, mut rec) = two_reals();
        st.del_vip(&mut rec, &vip("203.0.113.10:80/tcp"))
            .expect("del");
        assert_eq!(rec.log[0], "remove_vip");
        assert_eq!(rec.log[1], "addr 0");
        assert!(rec.log[2..].iter().all(|l| l.ends_with("family=0")));
        assert!(rec.vips.is_empty() && rec.addrs.is_empty());
    }

    #[test]
    fn failed_write_is_undone_and_the_model_unchanged() {
        let (mut st, mut rec) = two_reals();
        let before_vips = rec.vips.clone();
        let before_reals = rec.reals.clone();
        let before_desired = st.desired.clone();
        // Fail the VIP flip (third write: slot, ring, put_vip).
        rec.fail_at = Some(2);
        let err = st
            .add_real(
                &mut rec,
                &vip("203.0.113.10:80/tcp"),
                ip("198.51.100.13"),
                mac(13),
                1,
            )
            .expect_err("injected failure");
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(st.desired, before_desired, "model changed");
        assert_eq!(rec.vips, before_vips, "VIP map not restored");
        // The new slot was written, then cleared by the undo.
        let changed: Vec<_> = rec
            .reals
            .iter()
            .filter(|(id, r)| before_reals.get(id) != Some(r) && r.family != 0)
            .collect();
        assert!(changed.is_empty(), "real slot left behind: {changed:?}");
    }

    #[test]
    fn invalid_desired_state_writes_nothing() {
        let (mut st, mut rec) = two_reals();
        let mut d = st.desired.clone();
        d.services
            .get_mut(&vip("203.0.113.10:80/tcp"))
            .expect("vip")
            .reals
            .insert(ip("2001:db8::1"), RealSpec::default());
        let err = st
            .reconcile(&mut rec, d, &BTreeMap::from([(ip("2001:db8::1"), mac(1))]))
            .expect_err("family mismatch");
        assert!(err.to_string().contains("address family"), "{err}");
        assert!(rec.log.is_empty());
    }

    #[test]
    fn drain_keeps_the_slot_and_disable_clears_it() {
        let (mut st, mut rec) = two_reals();
        let v = vip("203.0.113.10:80/tcp");
        st.set_real(&mut rec, &v, ip("198.51.100.11"), None, Some(Admin::Drain))
            .expect("drain");
        assert!(
            rec.log.iter().all(|l| !l.starts_with("real ")),
            "{:?}",
            rec.log
        );
        rec.log.clear();
        st.set_real(
            &mut rec,
            &v,
            ip("198.51.100.11"),
            None,
            Some(Admin::Disabled),
        )
        .expect("disable");
        assert!(
            rec.log.iter().any(|l| l.ends_with("family=0")),
            "{:?}",
            rec.log
        );
        rec.log.clear();
        st.set_real(
            &mut rec,
            &v,
            ip("198.51.100.11"),
            None,
            Some(Admin::Enabled),
        )
        .expect("enable");
        assert!(
            rec.log.iter().any(|l| l.ends_with("family=4")),
            "{:?}",
            rec.log
        );
    }

    #[test]
    fn a_real_removed_while_down_comes_back_healthy() {
        let (mut st, mut rec) = two_reals();
        let v = vip("203.0.113.10:80/tcp");
        let r = ip("198.51.100.12");
        st.set_health(&mut rec, &v, r, false).expect("health");
        assert!(!st.healthy(&v, r));
        st.del_real(&mut rec, &v, r).expect("del");
        st.add_real(&mut rec, &v, r, mac(12), 1).expect("add");
        assert!(st.healthy(&v, r), "the old verdict outlived the real");
        assert_eq!(st.services[&v].table.get(&r), Some(&1));
    }

    #[test]
    fn avalanche_guard_keeps_unhealthy_reals_below_the_threshold() {
        let mut st = State::new();
        st.set_min_healthy(0.5);
        let mut rec = Recorder::default();
        let v = vip("203.0.113.10:80/tcp");
        st.add_vip(&mut rec, v, VipOptions::default()).expect("vip");
        for last in 11..15u8 {
            st.add_real(
                &mut rec,
                &v,
                ip(&format!("198.51.100.{last}")),
                mac(last),
                1,
            )
            .expect("real");
        }
        st.set_health(&mut rec, &v, ip("198.51.100.11"), false)
            .expect("health");
        st.set_health(&mut rec, &v, ip("198.51.100.12"), false)
            .expect("health");
        let eff = |st: &State| st.services[&v].table.clone();
        // 2 of 4 healthy: exactly at the threshold, still honoured.
        assert_eq!(eff(&st)[&ip("198.51.100.11")], 0);
        assert!(st.guarded().is_empty());
        // A third failure would leave 1 of 4: the guard keeps everyone in.
        st.set_health(&mut rec, &v, ip("198.51.100.13"), false)
            .expect("health");
        assert!(st.guarded().contains(&v));
        assert!(eff(&st).values().all(|w| *w == 1), "{:?}", eff(&st));
        // Recovery releases the guard.
        st.set_health(&mut rec, &v, ip("198.51.100.13"), true)
            .expect("health");
        assert!(st.guarded().is_empty());
        assert_eq!(eff(&st)[&ip("198.51.100.12")], 0);
    }

    #[test]
    fn changing_the_table_size_publishes_into_new_ranges_and_frees_the_old() {
        let (mut st, mut rec) = two_reals();
        let v = vip("203.0.113.10:80/tcp");
        let mut d = st.desired.clone();
        d.services.get_mut(&v).expect("vip").options.table_size = 251;
        st.reconcile(&mut rec, d, &BTreeMap::new()).expect("resize");
        let a = &st.services[&v];
        // The two old 65537-slot ranges are free again: the pool holds only
        // the two new 251-slot ranges.
        assert_eq!(
            st.rings.used.values().copied().collect::<Vec<_>>(),
            [251, 251]
        );
        assert_eq!(rec.vips[&v.key()].ring_off, a.rings[a.live]);
        assert_eq!(rec.vips[&v.key()].ring_size, 251);
    }

    #[test]
    fn ring_pool_is_first_fit_and_refuses_overflow() {
        let mut pool = RingPool::default();
        let a = pool.alloc(100).expect("a");
        let b = pool.alloc(100).expect("b");
        assert_eq!((a, b), (0, 100));
        pool.free(a);
        assert_eq!(pool.alloc(50), Some(0), "reuses the hole");
        assert_eq!(
            pool.alloc(60),
            Some(200),
            "too big for the rest of the hole"
        );
        assert_eq!(pool.alloc(RING_POOL), None);
    }

    #[test]
    fn changes_are_described_one_per_line() {
        let (st, _) = two_reals();
        let old = st.desired.clone();
        let mut new = old.clone();
        let v = vip("203.0.113.10:80/tcp");
        let s = new.services.get_mut(&v).expect("vip");
        s.reals.get_mut(&ip("198.51.100.11")).expect("real").weight = 7;
        s.reals.get_mut(&ip("198.51.100.12")).expect("real").admin = Admin::Drain;
        new.services
            .insert(vip("203.0.113.11:53/udp"), ServiceSpec::default());
        let lines = describe_changes(&old, &new);
        assert_eq!(
            lines,
            [
                "real 198.51.100.11 of 203.0.113.10:80/tcp weight 1 -> 7",
                "real 198.51.100.12 of 203.0.113.10:80/tcp enabled -> drain",
                "VIP 203.0.113.11:53/udp added (dr, maglev, table 65537)",
            ]
        );
        assert!(describe_changes(&new, &new).is_empty());
    }

    #[test]
    fn state_round_trips_through_json() {
        let (st, _) = two_reals();
        let json = serde_json::to_string(&st).expect("serialize");
        let back: State = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.desired, st.desired);
        assert_eq!(back.services, st.services);
    }
}
