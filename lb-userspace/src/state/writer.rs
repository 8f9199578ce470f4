//! The map writes a reconcile makes, and their undo log.
//!
//! [`Maps`] is the narrow interface the reconcile step writes through:
//! [`Dataplane`] implements it for the kernel, the unit tests with a fake that
//! can fail at any write. [`Writer`] records the inverse of every write (the
//! old contents of a ring range included) and replays them in reverse order
//! when a later write fails, so the maps end as they were before the change.

use lb_common::{AddrKey, RealDef, VipKey, VipMeta};

use crate::dataplane::{Dataplane, DataplaneError};

/// The map operations of a reconcile.
pub trait Maps {
    /// Writes `table` into the ring pool at `off`.
    fn write_ring(&mut self, off: u32, table: &[u32]) -> Result<(), DataplaneError>;
    /// Reads `len` slots of the ring pool at `off`.
    fn read_ring(&self, off: u32, len: u32) -> Result<Vec<u32>, DataplaneError>;
    /// Inserts or replaces a VIP.
    fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError>;
    /// Removes a VIP.
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    /// Sets the number of VIPs on an address (0 removes it).
    fn set_vip_addr(&mut self, key: &AddrKey, count: u32) -> Result<(), DataplaneError>;
    /// Writes a real slot.
    fn put_real(&mut self, id: u32, real: &RealDef) -> Result<(), DataplaneError>;
    /// Zeroes a VIP's counters (its id goes to a new VIP).
    fn reset_vip_counter(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Zeroes a real slot's counters (its id goes to a new real).
    fn reset_real_counter(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Every VIP entry (for adoption).
    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError>;
    /// Every VIP-address entry (for adoption).
    fn vip_addrs(&self) -> Result<Vec<(AddrKey, u32)>, DataplaneError>;
    /// Ids of every written (non-empty) real slot (for adoption).
    fn live_reals(&self) -> Result<Vec<(u32, RealDef)>, DataplaneError>;
}

impl Maps for Dataplane {
    fn write_ring(&mut self, off: u32, table: &[u32]) -> Result<(), DataplaneError> {
        Dataplane::write_ring(self, off, table)
    }
    fn read_ring(&self, off: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        Dataplane::read_ring(self, off, len)
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
    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError> {
        Dataplane::vips(self)
    }
    fn vip_addrs(&self) -> Result<Vec<(AddrKey, u32)>, DataplaneError> {
        Dataplane::vip_addrs(self)
    }
    fn live_reals(&self) -> Result<Vec<(u32, RealDef)>, DataplaneError> {
        Dataplane::live_reals(self)
    }
}

/// A map write that can be undone.
#[derive(Clone, Debug)]
pub enum Op {
    /// Insert or replace a VIP.
    PutVip(VipKey, VipMeta),
    /// Remove a VIP.
    RemoveVip(VipKey),
    /// Set an address's VIP count.
    SetAddr(AddrKey, u32),
    /// Write a real slot.
    PutReal(u32, RealDef),
    /// Write a ring range.
    Ring(u32, Vec<u32>),
}

/// Stops the daemon after the n-th map write of a change, so that a test can
/// kill it there (`XLB_TEST_PAUSE_AFTER_WRITES=N`; see docs/development.md).
#[derive(Clone, Copy, Debug, Default)]
pub struct PauseHook(pub Option<usize>);

impl PauseHook {
    /// The hook set by the environment, if any.
    pub fn from_env() -> Self {
        Self(
            std::env::var("XLB_TEST_PAUSE_AFTER_WRITES")
                .ok()
                .and_then(|v| v.parse().ok()),
        )
    }
}

/// Runs map writes, remembering how to undo them.
pub struct Writer<'m, M: Maps> {
    maps: &'m mut M,
    undo: Vec<Op>,
    writes: usize,
    pause: PauseHook,
}

impl<'m, M: Maps> Writer<'m, M> {
    /// A writer on `maps`.
    pub fn new(maps: &'m mut M, pause: PauseHook) -> Self {
        Self {
            maps,
            undo: Vec::new(),
            writes: 0,
            pause,
        }
    }

    /// The maps, for reads and counter resets (which need no undo: the
    /// counters belong to an id nothing uses yet).
    pub fn maps(&mut self) -> &mut M {
        self.maps
    }

    /// Writes made so far.
    pub fn writes(&self) -> usize {
        self.writes
    }

    fn exec(maps: &mut M, op: &Op) -> Result<(), DataplaneError> {
        match op {
            Op::PutVip(k, m) => maps.put_vip(k, m),
            Op::RemoveVip(k) => maps.remove_vip(k),
            Op::SetAddr(k, n) => maps.set_vip_addr(k, *n),
            Op::PutReal(id, r) => maps.put_real(*id, r),
            Op::Ring(off, t) => maps.write_ring(*off, t),
        }
    }

    /// Performs `op`; `inverse` restores what it replaced.
    pub fn write(&mut self, op: Op, inverse: Op) -> Result<(), DataplaneError> {
        Self::exec(self.maps, &op)?;
        self.undo.push(inverse);
        self.written();
        Ok(())
    }

    /// Writes `table` at ring offset `off`, keeping the old contents for undo.
    pub fn ring(&mut self, off: u32, table: &[u32]) -> Result<(), DataplaneError> {
        let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
        let old = self.maps.read_ring(off, len)?;
        self.maps.write_ring(off, table)?;
        self.undo.push(Op::Ring(off, old));
        self.written();
        Ok(())
    }

    fn written(&mut self) {
        self.writes += 1;
        if self.pause.0 == Some(self.writes) {
            tracing::warn!(
                writes = self.writes,
                "test hook: pausing after map write {} (XLB_TEST_PAUSE_AFTER_WRITES)",
                self.writes
            );
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    /// Undoes every write, newest first.
    pub fn rollback(self) {
        for op in self.undo.iter().rev() {
            if let Err(err) = Self::exec(self.maps, op) {
                let err = crate::chain::Chain(&err);
                tracing::error!(%err, ?op, "undoing a map write failed; run `xlb apply` again");
            }
        }
    }
}

/// An in-memory stand-in for the maps, for unit tests.
#[cfg(test)]
pub mod fake {
    use std::collections::BTreeMap;

    use lb_common::{AddrKey, RealDef, VipKey, VipMeta};

    use super::Maps;
    use crate::dataplane::DataplaneError;

    /// An in-memory copy of the maps that can fail the n-th write.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct FakeMaps {
        pub vips: BTreeMap<VipKey, VipMeta>,
        pub addrs: BTreeMap<AddrKey, u32>,
        pub reals: BTreeMap<u32, RealDef>,
        pub rings: BTreeMap<u32, u32>,
        pub log: Vec<String>,
        pub fail_at: Option<usize>,
        pub writes: usize,
    }

    impl FakeMaps {
        fn step(&mut self, what: String) -> Result<(), DataplaneError> {
            if self.fail_at == Some(self.writes) {
                // Fail once; the undo writes that follow go through.
                self.fail_at = None;
                return Err(DataplaneError::IfaceName("injected failure".into()));
            }
            self.writes += 1;
            self.log.push(what);
            Ok(())
        }

        /// The maps' contents, without the write log.
        pub fn contents(&self) -> Self {
            Self {
                log: Vec::new(),
                fail_at: None,
                writes: 0,
                ..self.clone()
            }
        }
    }

    impl Maps for FakeMaps {
        fn write_ring(&mut self, off: u32, table: &[u32]) -> Result<(), DataplaneError> {
            self.step(format!("ring {off}"))?;
            for (i, id) in table.iter().enumerate() {
                let at = off + i as u32;
                if *id == 0 {
                    self.rings.remove(&at);
                } else {
                    self.rings.insert(at, *id);
                }
            }
            Ok(())
        }
        fn read_ring(&self, off: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
            Ok((off..off + len)
                .map(|i| self.rings.get(&i).copied().unwrap_or(0))
                .collect())
        }
        fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
            self.step(format!("put_vip ring={}", meta.ring_off))?;
            self.vips.insert(*key, *meta);
            Ok(())
        }
        fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
            self.step("remove_vip".into())?;
            // As the kernel's hash map: removing a key that is not there fails.
            match self.vips.remove(key) {
                Some(_) => Ok(()),
                None => Err(DataplaneError::Map {
                    name: "XLB_VIPS",
                    source: aya::maps::MapError::KeyNotFound,
                }),
            }
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
            if real.family == 0 {
                self.reals.remove(&id);
            } else {
                self.reals.insert(id, *real);
            }
            Ok(())
        }
        fn reset_vip_counter(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn reset_real_counter(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError> {
            Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn vip_addrs(&self) -> Result<Vec<(AddrKey, u32)>, DataplaneError> {
            Ok(self.addrs.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn live_reals(&self) -> Result<Vec<(u32, RealDef)>, DataplaneError> {
            Ok(self.reals.iter().map(|(k, v)| (*k, *v)).collect())
        }
    }
}
