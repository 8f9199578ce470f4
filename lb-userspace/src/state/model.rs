//! The model of the maps — which VIP ids, ring ranges and real slots are in
//! use and what they hold — and the one reconcile step that moves the maps to
//! a new desired state.
//!
//! A reconcile is **planned** whole before the first write: ids, ring ranges,
//! tables. Only resources the current model does not use are allocated. The
//! **commit** then writes, in an order packets never see half-done:
//!
//! 1. real slots that become live (new reals, re-enabled ones, new MACs);
//! 2. each changed table into a ring no VIP entry points at, then the VIP
//!    entry that publishes it (a new VIP: its address count first);
//! 3. removed VIPs out of the VIP map;
//! 4. real slots that no table names any more are cleared (disabled and
//!    removed reals): after the flip, so their flows are never dropped.
//!
//! Every write records its inverse (ring contents included); if one fails the
//! writes are undone newest first and the model is unchanged. What the change
//! replaced (ids, ranges) is freed only once it succeeded.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    AddrKey, MAX_REALS, MAX_VIPS, REAL_NONE, RING_POOL, RealDef, VIP_F_HASH_SRC_ONLY, VIP_F_TUNNEL,
    VipKey, VipMeta,
};
use serde::{Deserialize, Serialize};

use super::{
    StateError,
    alloc::{self, RingPool},
    plan::{self, RealInput},
    writer::{Maps, Op, PauseHook, Writer},
};
use crate::{
    dataplane::DataplaneError,
    desired::{Desired, VipOptions},
    maglev::{self, Backend},
    model::{Forward, Scheduler, Vip, addr_bytes},
};

/// A service as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Its VIP id (index of its counters).
    pub id: u32,
    /// Offsets in the ring pool of its two tables (each `table_size` long).
    pub rings: [u32; 2],
    /// Which of `rings` is live.
    pub live: usize,
    /// Its options as written.
    pub options: VipOptions,
    /// Real slot id of each of its reals that has one.
    pub slots: BTreeMap<IpAddr, u32>,
    /// Effective weight of each real in the live table (absent: no live slot).
    pub table: BTreeMap<IpAddr, u32>,
    /// The `hash_seed` the live table was built with.
    #[serde(default)]
    pub hash_seed: u64,
}

impl Applied {
    /// The VIP entry that publishes ring `off` with these options.
    fn meta(&self, off: u32) -> VipMeta {
        VipMeta {
            vip_id: self.id,
            ring_off: off,
            ring_size: self.options.table_size,
            flags: match self.options.scheduler {
                Scheduler::Maglev => 0,
                Scheduler::MaglevSrc => VIP_F_HASH_SRC_ONLY,
            } | match self.options.forward {
                Forward::Dr => 0,
                Forward::Tun => VIP_F_TUNNEL,
            },
        }
    }

    /// The live VIP entry.
    pub fn live_meta(&self) -> VipMeta {
        self.meta(self.rings[self.live])
    }
}

/// A real slot as it is in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The real's address.
    pub addr: IpAddr,
    /// The MAC written into the slot (the next hop's in TUN mode).
    pub mac: [u8; 6],
    /// Whether the slot is written (false: cleared, the real is disabled).
    pub live: bool,
    /// Generation written with it: conntrack entries of an earlier owner of
    /// the slot id do not match and are re-hashed.
    #[serde(default)]
    pub generation: u32,
}

impl Slot {
    /// The map value of this slot.
    pub fn def(&self) -> RealDef {
        if !self.live {
            return cleared_real();
        }
        let (addr, family) = addr_bytes(self.addr);
        RealDef {
            addr,
            mac: self.mac,
            family,
            flags: 0,
            generation: self.generation,
        }
    }
}

/// An empty real slot.
pub fn cleared_real() -> RealDef {
    RealDef {
        addr: [0; 16],
        mac: [0; 6],
        family: 0,
        flags: 0,
        generation: 0,
    }
}

/// What the maps hold, as far as the daemon wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// Applied services.
    pub services: BTreeMap<Vip, Applied>,
    /// Slot id → its contents.
    pub slots: BTreeMap<u32, Slot>,
    /// Ranges of the ring pool in use.
    pub rings: RingPool,
    next_real_id: u32,
    next_generation: u32,
}

/// What a reconcile reads besides the model.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The effective desired state.
    pub desired: &'a Desired,
    /// Known MACs (of the real, or of the next hop toward it).
    pub macs: &'a BTreeMap<IpAddr, [u8; 6]>,
    /// Health verdicts (absent: up).
    pub health: &'a BTreeMap<(Vip, IpAddr), bool>,
    /// VIPs the avalanche guard held before.
    pub guarded: &'a BTreeSet<Vip>,
    /// The guard's threshold.
    pub min_healthy: f64,
    /// Reals in slow start: the percent of their weight they have (absent: all).
    pub ramp: &'a BTreeMap<(Vip, IpAddr), u32>,
}

/// What a reconcile did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Map writes made (a ring counts one).
    pub writes: usize,
    /// Tables rebuilt and published.
    pub tables: usize,
}

/// A successful reconcile: the new model and guard state.
#[derive(Debug)]
pub struct Outcome {
    /// The model after the change.
    pub model: Model,
    /// VIPs the guard holds now.
    pub guarded: BTreeSet<Vip>,
    /// Guard state per VIP with the counts, for the log.
    pub guard_changes: Vec<(Vip, bool, usize, usize)>,
    /// What was written.
    pub changes: Changes,
}

/// How a reconcile treats what the model says is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write only the difference.
    Diff,
    /// Rewrite every slot and table (adoption: the maps may differ from the model).
    Rewrite,
}

/// One table to publish.
struct TablePlan {
    vip: Vip,
    ring: u32,
    table: Vec<u32>,
    new_meta: VipMeta,
    /// The entry it replaces; `None` for a new VIP.
    old_meta: Option<VipMeta>,
}

/// The whole change, before any write.
#[derive(Default)]
struct Plan {
    /// Ids whose counters start from zero.
    new_slots: Vec<u32>,
    /// Slots made live or rewritten: (id, new, old).
    ups: Vec<(u32, RealDef, RealDef)>,
    tables: Vec<TablePlan>,
    /// VIPs to remove: (key, live entry).
    gone: Vec<(Vip, VipMeta)>,
    /// Slots to clear after the flips: (id, old).
    downs: Vec<(u32, RealDef)>,
    /// Slot ids and ring ranges to free once the change succeeded.
    freed_slots: Vec<u32>,
    freed_rings: Vec<u32>,
}

fn full(what: &'static str, capacity: u32) -> StateError {
    StateError::Dataplane(DataplaneError::OutOfRange {
        what,
        index: capacity,
        capacity,
    })
}

impl Model {
    /// An empty model (the maps of a freshly loaded object are empty too).
    pub fn new() -> Self {
        Self::default()
    }

    fn next_generation(&mut self) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.next_generation
    }

    /// The address of the real in slot `id`, if it is one of ours.
    pub fn real_by_id(&self, id: u32) -> Option<IpAddr> {
        if id == REAL_NONE {
            return None;
        }
        self.slots.get(&id).map(|s| s.addr)
    }

    /// Moves the maps to `inputs.desired` through `maps`.
    pub fn reconcile<M: Maps>(
        &self,
        maps: &mut M,
        inputs: &Inputs<'_>,
        mode: Mode,
        pause: PauseHook,
    ) -> Result<Outcome, StateError> {
        inputs.desired.validate()?;
        let mut next = self.clone();
        let mut guarded = BTreeSet::new();
        let mut guard_changes = Vec::new();
        let plan = next.plan(self, inputs, mode, &mut guarded, &mut guard_changes)?;
        let mut w = Writer::new(maps, pause);
        if let Err(err) = self.commit(&mut w, &plan, mode) {
            w.rollback();
            return Err(err.into());
        }
        let changes = Changes {
            writes: w.writes(),
            tables: plan.tables.len(),
        };
        // The change is in: what it replaced can be given out again.
        for (vip, _) in &plan.gone {
            next.services.remove(vip);
        }
        for off in &plan.freed_rings {
            next.rings.free(*off);
        }
        for id in &plan.freed_slots {
            next.slots.remove(id);
        }
        Ok(Outcome {
            model: next,
            guarded,
            guard_changes,
            changes,
        })
    }

    /// Plans the change into `self` (the next model, a copy of `before`),
    /// allocating fresh ids and ranges.
    fn plan(
        &mut self,
        before: &Model,
        inputs: &Inputs<'_>,
        mode: Mode,
        guarded: &mut BTreeSet<Vip>,
        guard_changes: &mut Vec<(Vip, bool, usize, usize)>,
    ) -> Result<Plan, StateError> {
        let mut plan = Plan::default();
        let mut vip_ids: BTreeSet<u32> = self.services.values().map(|a| a.id).collect();
        let mut slot_ids: BTreeSet<u32> = self.slots.keys().copied().collect();
        let pool_full = || full("Maglev table slots in the ring pool", RING_POOL);

        for (vip, spec) in &inputs.desired.services {
            let old = before.services.get(vip);
            // Copied only when it changes: a VIP that stays as it was is
            // already in `self` (a copy of `before`).
            let mut a = match old {
                Some(a) => Cow::Borrowed(a),
                None => {
                    let id = alloc::vip_id(&vip_ids).ok_or_else(|| full("VIP id", MAX_VIPS))?;
                    vip_ids.insert(id);
                    let size = spec.options.table_size;
                    let r0 = self.rings.alloc(size).ok_or_else(pool_full)?;
                    let r1 = self.rings.alloc(size).ok_or_else(pool_full)?;
                    Cow::Owned(Applied {
                        id,
                        rings: [r0, r1],
                        // The first table goes into rings[0].
                        live: 1,
                        options: spec.options,
                        slots: BTreeMap::new(),
                        table: BTreeMap::new(),
                        hash_seed: inputs.desired.hash_seed,
                    })
                }
            };
            let mut reals = Vec::with_capacity(spec.reals.len());
            for (addr, r) in &spec.reals {
                let mac = inputs.macs.get(addr).copied();
                let input = RealInput {
                    addr: *addr,
                    weight: r.weight,
                    admin: r.admin,
                    resolved: mac.is_some(),
                    healthy: inputs.health.get(&(*vip, *addr)).copied().unwrap_or(true),
                    ramp: inputs.ramp.get(&(*vip, *addr)).copied().unwrap_or(100),
                };
                reals.push(input);
                match (a.slots.get(addr).copied(), mac.filter(|_| input.live())) {
                    (Some(id), Some(mac)) => {
                        let slot = self.slots[&id];
                        let new = if slot.live {
                            Slot { mac, ..slot }
                        } else {
                            // Re-enabled: a new generation, so flows tracked to
                            // the slot before it was cleared re-hash.
                            Slot {
                                mac,
                                live: true,
                                generation: self.next_generation(),
                                ..slot
                            }
                        };
                        if new != slot || mode == Mode::Rewrite {
                            plan.ups.push((id, new.def(), slot.def()));
                            self.slots.insert(id, new);
                        }
                    }
                    (Some(id), None) => {
                        let slot = self.slots[&id];
                        if slot.live || mode == Mode::Rewrite {
                            plan.downs.push((id, slot.def()));
                            self.slots.insert(
                                id,
                                Slot {
                                    live: false,
                                    ..slot
                                },
                            );
                        }
                    }
                    (None, Some(mac)) => {
                        let id = alloc::real_id(&slot_ids, &mut self.next_real_id)
                            .ok_or_else(|| full("real id", MAX_REALS))?;
                        slot_ids.insert(id);
                        let slot = Slot {
                            addr: *addr,
                            mac,
                            live: true,
                            generation: self.next_generation(),
                        };
                        plan.new_slots.push(id);
                        plan.ups.push((id, slot.def(), cleared_real()));
                        self.slots.insert(id, slot);
                        a.to_mut().slots.insert(*addr, id);
                    }
                    (None, None) => {}
                }
            }
            // Reals that left the service: cleared after the flip, then freed.
            let leaving: Vec<(IpAddr, u32)> = a
                .slots
                .iter()
                .filter(|(addr, _)| !spec.reals.contains_key(addr))
                .map(|(addr, id)| (*addr, *id))
                .collect();
            for (addr, id) in leaving {
                let slot = self.slots[&id];
                if slot.live || mode == Mode::Rewrite {
                    plan.downs.push((id, slot.def()));
                }
                plan.freed_slots.push(id);
                a.to_mut().slots.remove(&addr);
            }
            let was = inputs.guarded.contains(vip);
            let w = plan::weights(&reals, inputs.min_healthy, was);
            if w.guarded {
                guarded.insert(*vip);
            }
            if w.guarded != was {
                guard_changes.push((*vip, w.guarded, w.healthy, w.servable));
            }
            let changed = old.is_none()
                || mode == Mode::Rewrite
                || w.table != a.table
                || spec.options != a.options
                || inputs.desired.hash_seed != a.hash_seed;
            if changed {
                let a = a.to_mut();
                let resized = old.is_some() && a.options.table_size != spec.options.table_size;
                let size = spec.options.table_size;
                let ring = if resized {
                    let fresh = self.rings.alloc(size).ok_or_else(pool_full)?;
                    let spare = self.rings.alloc(size).ok_or_else(pool_full)?;
                    plan.freed_rings.extend(a.rings);
                    a.rings = [spare, fresh];
                    a.live = 0;
                    fresh
                } else {
                    a.rings[a.live ^ 1]
                };
                a.live ^= 1;
                a.options = spec.options;
                a.table = w.table;
                a.hash_seed = inputs.desired.hash_seed;
                let backends: Vec<Backend> = a
                    .table
                    .iter()
                    .map(|(addr, weight)| Backend {
                        addr: *addr,
                        weight: *weight,
                        id: a.slots[addr],
                    })
                    .collect();
                plan.tables.push(TablePlan {
                    vip: *vip,
                    ring,
                    table: maglev::build(&backends, size, a.hash_seed),
                    new_meta: a.meta(ring),
                    old_meta: old.map(Applied::live_meta),
                });
            }
            if let Cow::Owned(a) = a {
                self.services.insert(*vip, a);
            }
        }
        for (vip, a) in &before.services {
            if inputs.desired.services.contains_key(vip) {
                continue;
            }
            plan.gone.push((*vip, a.live_meta()));
            for id in a.slots.values() {
                let slot = self.slots[id];
                if slot.live {
                    plan.downs.push((*id, slot.def()));
                }
                plan.freed_slots.push(*id);
            }
            plan.freed_rings.extend(a.rings);
        }
        Ok(plan)
    }

    /// Writes `plan` in the order the module doc gives. `self` is the model before.
    fn commit<M: Maps>(
        &self,
        w: &mut Writer<'_, M>,
        plan: &Plan,
        mode: Mode,
    ) -> Result<(), DataplaneError> {
        for id in &plan.new_slots {
            w.maps().reset_real_counter(*id)?;
        }
        for (id, new, old) in &plan.ups {
            w.write(Op::PutReal(*id, *new), Op::PutReal(*id, *old))?;
        }
        let mut counts: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for vip in self.services.keys() {
            *counts.entry(vip.addr).or_default() += 1;
        }
        for t in &plan.tables {
            let key = t.vip.key();
            w.ring(t.ring, &t.table)?;
            match (&t.old_meta, mode) {
                (Some(old), Mode::Diff) => {
                    w.write(Op::PutVip(key, t.new_meta), Op::PutVip(key, *old))?;
                }
                // Adoption: the entry may or may not be there; the address
                // counts are rewritten whole by the adoption itself.
                (Some(old), Mode::Rewrite) => {
                    w.write(Op::PutVip(key, t.new_meta), Op::PutVip(key, *old))?;
                }
                (None, _) => {
                    w.maps().reset_vip_counter(t.new_meta.vip_id)?;
                    let n = counts.entry(t.vip.addr).or_default();
                    let addr = t.vip.addr_key();
                    w.write(Op::SetAddr(addr, *n + 1), Op::SetAddr(addr, *n))?;
                    *n += 1;
                    w.write(Op::PutVip(key, t.new_meta), Op::RemoveVip(key))?;
                }
            }
        }
        for (vip, old) in &plan.gone {
            let key = vip.key();
            w.write(Op::RemoveVip(key), Op::PutVip(key, *old))?;
            let n = counts.entry(vip.addr).or_default();
            let addr = vip.addr_key();
            w.write(
                Op::SetAddr(addr, n.saturating_sub(1)),
                Op::SetAddr(addr, *n),
            )?;
            *n = n.saturating_sub(1);
        }
        for (id, old) in &plan.downs {
            w.write(Op::PutReal(*id, cleared_real()), Op::PutReal(*id, *old))?;
        }
        Ok(())
    }

    /// Takes over maps that a previous daemon (or a start that failed) left,
    /// with `self` the model it saved (empty when there is none): makes the
    /// maps say exactly what the model says. Either ring of a table that was
    /// mid-flip is accepted; ring ranges the kernel still reads but the model
    /// does not know are kept out of use until no VIP entry points at them;
    /// VIP keys, addresses and real slots the model does not know are removed.
    pub fn adopt<M: Maps>(
        mut self,
        maps: &mut M,
        inputs: &Inputs<'_>,
    ) -> Result<Outcome, StateError> {
        let kernel: BTreeMap<VipKey, VipMeta> = maps.vips()?.into_iter().collect();
        let mut reserved = Vec::new();
        let mut reset = false;
        for (key, meta) in &kernel {
            let known = self.services.iter().find(|(v, _)| v.key() == *key);
            match known {
                Some((_, a)) if a.rings.contains(&meta.ring_off) => {}
                _ => {
                    if self.rings.reserve(meta.ring_off, meta.ring_size) {
                        reserved.push(meta.ring_off);
                    } else {
                        reset = true;
                    }
                }
            }
        }
        if reset {
            // The saved model does not fit what the kernel reads (a state file
            // from another run): rebuild every table in fresh ranges.
            tracing::warn!(
                "the state file does not match the pinned maps; rebuilding every table in fresh \
                 ranges"
            );
            self = Model::default();
            reserved.clear();
            for meta in kernel.values() {
                if self.rings.reserve(meta.ring_off, meta.ring_size) {
                    reserved.push(meta.ring_off);
                }
            }
        }
        // Generations only grow: never below what the kernel's slots carry,
        // nor (for a model rebuilt from nothing) below the clock, so a
        // conntrack entry of an earlier owner of a slot id does not match
        // (entries keep 18 bits of it: see docs/architecture.md, "The
        // conntrack table").
        let live_max = maps
            .live_reals()?
            .iter()
            .map(|(_, d)| d.generation)
            .max()
            .unwrap_or(0);
        self.next_generation = self.next_generation.max(live_max);
        if self.services.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            self.next_generation = self.next_generation.max(now);
        }
        for (vip, a) in &mut self.services {
            // The next table goes into the ring the kernel does not read.
            a.live = match kernel.get(&vip.key()) {
                Some(m) if m.ring_off == a.rings[0] => 0,
                _ => 1,
            };
        }
        let mut outcome = self.reconcile(maps, inputs, Mode::Rewrite, PauseHook::default())?;
        let model = &outcome.model;
        let mut w = Writer::new(maps, PauseHook::default());
        let cleaned = model.remove_unknown(&mut w);
        let writes = w.writes();
        if let Err(err) = cleaned {
            w.rollback();
            return Err(err.into());
        }
        for off in reserved {
            outcome.model.rings.free(off);
        }
        outcome.changes.writes += writes;
        Ok(outcome)
    }

    /// Removes from the maps what this model does not know. Reads the maps
    /// as they are now: the reconcile before it has already removed the VIPs
    /// the saved model knew and the desired state dropped (a VIP added with
    /// the CLI, or taken out of the file, before a restart).
    fn remove_unknown<M: Maps>(&self, w: &mut Writer<'_, M>) -> Result<(), DataplaneError> {
        let known: BTreeSet<VipKey> = self.services.keys().map(Vip::key).collect();
        for (key, meta) in w.maps().vips()? {
            if !known.contains(&key) {
                w.write(Op::RemoveVip(key), Op::PutVip(key, meta))?;
            }
        }
        let mut counts: BTreeMap<AddrKey, u32> = BTreeMap::new();
        for vip in self.services.keys() {
            *counts.entry(vip.addr_key()).or_default() += 1;
        }
        let present: BTreeMap<AddrKey, u32> = w.maps().vip_addrs()?.into_iter().collect();
        for (key, n) in &present {
            let want = counts.get(key).copied().unwrap_or(0);
            if want != *n {
                w.write(Op::SetAddr(*key, want), Op::SetAddr(*key, *n))?;
            }
        }
        for (key, n) in &counts {
            if !present.contains_key(key) {
                w.write(Op::SetAddr(*key, *n), Op::SetAddr(*key, 0))?;
            }
        }
        let live: BTreeSet<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.live)
            .map(|(id, _)| *id)
            .collect();
        for (id, def) in w.maps().live_reals()? {
            if !live.contains(&id) {
                w.write(Op::PutReal(id, cleared_real()), Op::PutReal(id, def))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Admin, RealSpec, ServiceSpec};
    use crate::state::writer::fake::FakeMaps;

    fn vip(s: &str) -> Vip {
        s.parse().expect("valid VIP")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    const SMALL: u32 = 13;

    fn service(reals: &[(u8, Admin)]) -> ServiceSpec {
        ServiceSpec {
            options: VipOptions {
                table_size: SMALL,
                ..VipOptions::default()
            },
            health: None,
            reals: reals
                .iter()
                .map(|(l, admin)| {
                    (
                        ip(*l),
                        RealSpec {
                            admin: *admin,
                            ..RealSpec::default()
                        },
                    )
                })
                .collect(),
        }
    }

    fn macs() -> BTreeMap<IpAddr, [u8; 6]> {
        (1..=30).map(|l| (ip(l), mac(l))).collect()
    }

    struct World {
        model: Model,
        maps: FakeMaps,
        macs: BTreeMap<IpAddr, [u8; 6]>,
        health: BTreeMap<(Vip, IpAddr), bool>,
        guarded: BTreeSet<Vip>,
    }

    impl World {
        fn new() -> Self {
            Self {
                model: Model::new(),
                maps: FakeMaps::default(),
                macs: macs(),
                health: BTreeMap::new(),
                guarded: BTreeSet::new(),
            }
        }

        fn apply(&mut self, desired: &Desired) -> Result<Changes, StateError> {
            let inputs = Inputs {
                desired,
                macs: &self.macs,
                health: &self.health,
                guarded: &self.guarded,
                min_healthy: 0.5,
                ramp: &BTreeMap::new(),
            };
            let out =
                self.model
                    .reconcile(&mut self.maps, &inputs, Mode::Diff, PauseHook::default())?;
            self.model = out.model;
            self.guarded = out.guarded;
            Ok(out.changes)
        }

        /// The real each slot of a VIP's live table names, from the maps alone.
        fn served(&self, v: &Vip) -> BTreeSet<IpAddr> {
            let meta = self.maps.vips[&v.key()];
            let table = self
                .maps
                .read_ring(meta.ring_off, meta.ring_size)
                .expect("ring");
            table
                .iter()
                .filter(|id| **id != 0)
                .map(|id| {
                    let def = self.maps.reals.get(id).unwrap_or_else(|| {
                        panic!("the live table of {v} names the empty slot {id}")
                    });
                    IpAddr::from([def.addr[0], def.addr[1], def.addr[2], def.addr[3]])
                })
                .collect()
        }
    }

    fn desired(services: &[(&str, ServiceSpec)]) -> Desired {
        Desired {
            hash_seed: 0,
            services: services.iter().map(|(v, s)| (vip(v), s.clone())).collect(),
        }
    }

    /// The ring of a VIP's live table, from the maps alone.
    fn live_ring(world: &World, v: &str) -> Vec<u32> {
        let meta = world.maps.vips[&vip(v).key()];
        world
            .maps
            .read_ring(meta.ring_off, meta.ring_size)
            .expect("ring")
    }

    #[test]
    fn a_new_hash_seed_rebuilds_every_table_and_seed_0_gives_the_first_back() {
        let mut world = World::new();
        let (a, b) = ("203.0.113.10:80/tcp", "203.0.113.11:80/tcp");
        let reals = service(&[
            (11, Admin::Enabled),
            (12, Admin::Enabled),
            (13, Admin::Enabled),
        ]);
        let mut d = desired(&[(a, reals.clone()), (b, reals)]);
        world.apply(&d).expect("apply");
        let unseeded = live_ring(&world, a);
        d.hash_seed = 7;
        let c = world.apply(&d).expect("seed");
        assert_eq!((c.tables, c.writes), (2, 4), "two rings and two entries");
        let seeded = live_ring(&world, a);
        let moved = unseeded.iter().zip(&seeded).filter(|(x, y)| x != y).count();
        assert!(
            moved > unseeded.len() / 2,
            "{moved} of {} slots moved",
            unseeded.len()
        );
        assert_eq!(
            world.served(&vip(a)),
            BTreeSet::from([ip(11), ip(12), ip(13)])
        );
        assert_eq!(world.apply(&d).expect("again"), Changes::default());
        d.hash_seed = 0;
        world.apply(&d).expect("unseed");
        assert_eq!(live_ring(&world, a), unseeded);
    }

    #[test]
    fn a_new_vip_writes_its_slots_table_and_address_before_its_entry() {
        let mut world = World::new();
        let d = desired(&[("203.0.113.10:80/tcp", service(&[(11, Admin::Enabled)]))]);
        world.apply(&d).expect("apply");
        assert_eq!(
            world.maps.log,
            ["real 1 family=4", "ring 0", "addr 1", "put_vip ring=0"]
        );
    }

    #[test]
    fn disabling_a_real_flips_the_table_before_clearing_its_slot() {
        let mut world = World::new();
        let v = "203.0.113.10:80/tcp";
        let d = desired(&[(v, service(&[(11, Admin::Enabled), (12, Admin::Enabled)]))]);
        world.apply(&d).expect("apply");
        world.maps.log.clear();
        let d = desired(&[(v, service(&[(11, Admin::Enabled), (12, Admin::Disabled)]))]);
        world.apply(&d).expect("disable");
        assert_eq!(world.maps.log.len(), 3, "{:?}", world.maps.log);
        assert!(world.maps.log[0].starts_with("ring "));
        assert!(world.maps.log[1].starts_with("put_vip"));
        assert!(
            world.maps.log[2].ends_with("family=0"),
            "{:?}",
            world.maps.log
        );
        assert_eq!(world.served(&vip(v)), BTreeSet::from([ip(11)]));
    }

    #[test]
    fn an_unresolved_real_is_left_out_until_its_mac_is_known() {
        let mut world = World::new();
        world.macs.remove(&ip(12));
        let v = "203.0.113.10:80/tcp";
        let d = desired(&[(v, service(&[(11, Admin::Enabled), (12, Admin::Enabled)]))]);
        world.apply(&d).expect("apply with one unresolved real");
        assert_eq!(world.served(&vip(v)), BTreeSet::from([ip(11)]));
        world.macs.insert(ip(12), mac(12));
        let c = world.apply(&d).expect("resolved");
        assert_eq!(c.tables, 1);
        assert_eq!(world.served(&vip(v)), BTreeSet::from([ip(11), ip(12)]));
    }

    #[test]
    fn an_unchanged_desired_state_writes_nothing() {
        let mut world = World::new();
        let d = desired(&[("203.0.113.10:80/tcp", service(&[(11, Admin::Enabled)]))]);
        world.apply(&d).expect("apply");
        assert_eq!(world.apply(&d).expect("again"), Changes::default());
    }

    /// A change of several VIPs at once: one removed, one added (which may
    /// take the removed one's resources), one resized, reals disabled, added
    /// and removed.
    fn before_and_after() -> (Desired, Desired) {
        let before = desired(&[
            (
                "203.0.113.10:80/tcp",
                service(&[(11, Admin::Enabled), (12, Admin::Enabled)]),
            ),
            (
                "203.0.113.11:80/tcp",
                service(&[(13, Admin::Enabled), (14, Admin::Enabled)]),
            ),
            (
                "203.0.113.12:53/udp",
                service(&[(15, Admin::Enabled), (16, Admin::Drain)]),
            ),
        ]);
        let mut resized = service(&[(15, Admin::Enabled), (17, Admin::Enabled)]);
        resized.options.table_size = 17;
        let after = desired(&[
            (
                "203.0.113.10:80/tcp",
                service(&[
                    (11, Admin::Disabled),
                    (12, Admin::Enabled),
                    (18, Admin::Enabled),
                ]),
            ),
            ("203.0.113.12:53/udp", resized),
            (
                "203.0.113.13:80/tcp",
                service(&[(19, Admin::Enabled), (20, Admin::Enabled)]),
            ),
        ]);
        (before, after)
    }

    #[test]
    fn a_failure_at_any_write_leaves_the_maps_and_the_model_as_they_were() {
        let (before, after) = before_and_after();
        let mut reference = World::new();
        reference.apply(&before).expect("before");
        let total = {
            let mut w = World::new();
            w.apply(&before).expect("before");
            w.maps.writes = 0;
            w.apply(&after).expect("after").writes
        };
        assert!(total >= 10, "the change should be big: {total} writes");
        for at in 0..total {
            let mut world = World::new();
            world.apply(&before).expect("before");
            let maps_before = world.maps.contents();
            let model_before = world.model.clone();
            world.maps.writes = 0;
            world.maps.fail_at = Some(at);
            let err = world.apply(&after).expect_err("injected failure");
            assert!(err.to_string().contains("injected"), "{err}");
            assert_eq!(
                world.maps.contents(),
                maps_before,
                "a failure at write {at} left the maps changed"
            );
            assert_eq!(world.model, model_before, "failure at write {at}");
            // And the same change then goes through, with the right result.
            world.apply(&after).expect("retry");
            assert_eq!(
                world.served(&vip("203.0.113.13:80/tcp")),
                BTreeSet::from([ip(19), ip(20)])
            );
            assert_eq!(
                world.served(&vip("203.0.113.10:80/tcp")),
                BTreeSet::from([ip(12), ip(18)])
            );
            assert!(
                !world
                    .maps
                    .vips
                    .contains_key(&vip("203.0.113.11:80/tcp").key())
            );
        }
    }

    #[test]
    fn a_change_never_writes_into_a_range_or_slot_the_old_state_uses() {
        let (before, after) = before_and_after();
        let mut world = World::new();
        world.apply(&before).expect("before");
        let old_ranges: Vec<(u32, u32)> = world
            .model
            .rings
            .used()
            .iter()
            .map(|(s, l)| (*s, *l))
            .collect();
        let live: Vec<(u32, u32)> = world
            .maps
            .vips
            .values()
            .map(|m| (m.ring_off, m.ring_size))
            .collect();
        let old_slots: BTreeSet<u32> = world.model.slots.keys().copied().collect();
        world.maps.log.clear();
        world.apply(&after).expect("after");
        for line in &world.maps.log {
            if let Some(off) = line.strip_prefix("ring ") {
                let off: u32 = off.parse().expect("offset");
                assert!(
                    !live.iter().any(|(s, l)| off >= *s && off < s + l),
                    "wrote into the live range at {off}"
                );
            }
        }
        // The new VIP did not take the removed VIP's ranges or slot ids.
        let new = &world.model.services[&vip("203.0.113.13:80/tcp")];
        for r in new.rings {
            assert!(
                !old_ranges.iter().any(|(s, _)| *s == r),
                "the new VIP reuses range {r} freed in the same change"
            );
        }
        for id in new.slots.values() {
            assert!(
                !old_slots.contains(id),
                "the new VIP reuses slot {id} freed in the same change"
            );
        }
    }

    #[test]
    fn resizing_a_table_publishes_into_new_ranges_and_frees_the_old() {
        let mut world = World::new();
        let v = "203.0.113.10:80/tcp";
        let d = desired(&[(v, service(&[(11, Admin::Enabled)]))]);
        world.apply(&d).expect("apply");
        let mut bigger = d.clone();
        bigger
            .services
            .get_mut(&vip(v))
            .expect("vip")
            .options
            .table_size = 251;
        world.apply(&bigger).expect("resize");
        assert_eq!(
            world
                .model
                .rings
                .used()
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [251, 251]
        );
        let a = &world.model.services[&vip(v)];
        assert_eq!(world.maps.vips[&vip(v).key()].ring_off, a.rings[a.live]);
        assert_eq!(world.maps.vips[&vip(v).key()].ring_size, 251);
    }

    #[test]
    fn adoption_drops_a_vip_the_saved_model_knew_and_the_new_desired_state_lacks() {
        // The daemon stopped with three VIPs (one added with the CLI, say) and
        // restarts with a file that has two: the reconcile removes the third,
        // and the clean-up after it must not remove it again.
        let (before, _) = before_and_after();
        let mut world = World::new();
        world.apply(&before).expect("before");
        let saved = world.model.clone();
        let mut fewer = before.clone();
        fewer.services.remove(&vip("203.0.113.11:80/tcp"));
        let (no_health, no_guard, all_macs) = (BTreeMap::new(), BTreeSet::new(), macs());
        let inputs = Inputs {
            desired: &fewer,
            macs: &all_macs,
            health: &no_health,
            guarded: &no_guard,
            min_healthy: 0.5,
            ramp: &BTreeMap::new(),
        };
        let out = saved
            .adopt(&mut world.maps, &inputs)
            .expect("adoption with a VIP fewer");
        world.model = out.model;
        let keys: BTreeSet<VipKey> = world.maps.vips.keys().copied().collect();
        let want: BTreeSet<VipKey> = fewer.services.keys().map(Vip::key).collect();
        assert_eq!(keys, want);
        assert_eq!(
            world.served(&vip("203.0.113.10:80/tcp")),
            BTreeSet::from([ip(11), ip(12)])
        );
    }

    #[test]
    fn adoption_takes_either_ring_and_removes_what_the_model_does_not_know() {
        let (before, after) = before_and_after();
        let mut world = World::new();
        world.apply(&before).expect("before");
        let saved = world.model.clone();
        // The next change is cut off by a crash after each write in turn: the
        // maps are anywhere between the two states, the model is the old one.
        let total = {
            let mut w = World::new();
            w.apply(&before).expect("before");
            w.maps.writes = 0;
            w.apply(&after).expect("after").writes
        };
        for cut in 0..=total {
            // Replay the change, stopping after `cut` writes (no undo: a crash).
            let mut maps = world.maps.clone();
            maps.fail_at = Some(cut);
            maps.writes = 0;
            let no_health = BTreeMap::new();
            let no_guard = BTreeSet::new();
            let all_macs = macs();
            let inputs = Inputs {
                desired: &after,
                macs: &all_macs,
                health: &no_health,
                guarded: &no_guard,
                min_healthy: 0.5,
                ramp: &BTreeMap::new(),
            };
            let mut next = saved.clone();
            let plan = next
                .plan(
                    &saved,
                    &inputs,
                    Mode::Diff,
                    &mut BTreeSet::new(),
                    &mut Vec::new(),
                )
                .expect("plan");
            {
                let mut w = Writer::new(&mut maps, PauseHook::default());
                let _ = saved.commit(&mut w, &plan, Mode::Diff);
            }
            maps.fail_at = None;
            let partial = maps;
            let mut restarted = World {
                model: Model::new(),
                maps: partial,
                macs: macs(),
                health: BTreeMap::new(),
                guarded: BTreeSet::new(),
            };
            let inputs = Inputs {
                desired: &before,
                macs: &restarted.macs,
                health: &restarted.health,
                guarded: &restarted.guarded,
                min_healthy: 0.5,
                ramp: &BTreeMap::new(),
            };
            let out = saved
                .clone()
                .adopt(&mut restarted.maps, &inputs)
                .unwrap_or_else(|e| panic!("adoption after a crash at write {cut}: {e}"));
            restarted.model = out.model;
            for (v, s) in &before.services {
                let want: BTreeSet<IpAddr> = s
                    .reals
                    .iter()
                    .filter(|(_, r)| r.admin == Admin::Enabled)
                    .map(|(a, _)| *a)
                    .collect();
                assert_eq!(restarted.served(v), want, "crash at write {cut}: {v}");
            }
            assert_eq!(
                restarted.maps.vips.len(),
                before.services.len(),
                "crash at write {cut}: unknown VIPs kept"
            );
            let live_model: BTreeSet<u32> = restarted
                .model
                .slots
                .iter()
                .filter(|(_, s)| s.live)
                .map(|(id, _)| *id)
                .collect();
            let live_maps: BTreeSet<u32> = restarted.maps.reals.keys().copied().collect();
            assert_eq!(live_maps, live_model, "crash at write {cut}: slots");
            // The model and the maps agree: the same change now goes through.
            restarted.apply(&after).expect("the change after adoption");
            assert_eq!(
                restarted.served(&vip("203.0.113.13:80/tcp")),
                BTreeSet::from([ip(19), ip(20)])
            );
        }
    }
}
