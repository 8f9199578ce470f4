//! The balancer's state: the desired state, the facts the daemon learns
//! (MACs, health verdicts), and the model of the maps, changed only through
//! one reconcile step.
//!
//! # Layout
//!
//! - [`model`]: what is in the maps, the plan + commit reconcile, adoption.
//! - [`plan`]: table membership, health and the avalanche guard.
//! - [`alloc`]: ring ranges, VIP ids, real-slot ids.
//! - [`writer`]: the [`writer::Maps`] interface and the undo log.
//! - [`persist`]: the state file a restarted daemon adopts.
//!
//! [`State`] ties them together. The daemon's controller owns one; the tests
//! and benchmarks drive one the same way, through [`State::edit`].

pub mod alloc;
pub mod model;
pub mod persist;
pub mod plan;
pub mod writer;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

pub use model::{Applied, Changes, Model, Slot};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::DataplaneError,
    desired::{Desired, Edit, Next, Spec, SpecError, describe_changes},
    health::{ProbeKind, Start},
    model::{Forward, Vip},
};
use model::{Inputs, Mode, Outcome};
use writer::{Maps, PauseHook};

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The desired state or the edit is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A map update failed; the writes already made were undone.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Formats a MAC as `02:00:00:00:00:01`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Known MACs by real address.
pub type Macs = BTreeMap<IpAddr, [u8; 6]>;

/// Health verdicts by (VIP, real): true is up.
pub type Verdicts = BTreeMap<(Vip, IpAddr), bool>;

/// The desired state, what the daemon learnt, and the model of the maps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Shared with the controller's snapshot (not copied at each change).
    #[serde(with = "shared")]
    spec: Arc<Spec>,
    /// Health verdicts in force: (VIP, real) → up. Absent: up.
    #[serde(with = "verdicts")]
    health: BTreeMap<(Vip, IpAddr), bool>,
    /// VIPs whose health verdicts the avalanche guard ignores.
    guarded: BTreeSet<Vip>,
    /// Known MACs by real address (of the real, or the next hop toward it).
    macs: BTreeMap<IpAddr, [u8; 6]>,
    model: Model,
    /// The avalanche guard's threshold.
    min_healthy: f64,
    /// Reals in slow start and the percent of their weight they have (not
    /// saved: a restarted daemon gives every real its whole weight).
    #[serde(skip)]
    ramp: BTreeMap<(Vip, IpAddr), u32>,
}

/// The spec is saved as itself (serde's `rc` feature is not on).
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::desired::Spec;

    pub fn serialize<S: Serializer>(spec: &Arc<Spec>, s: S) -> Result<S::Ok, S::Error> {
        Spec::serialize(spec, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Spec>, D::Error> {
        Spec::deserialize(d).map(Arc::new)
    }
}

/// JSON maps need string keys: the verdicts are stored as a list.
mod verdicts {
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

impl State {
    /// An empty state with the guard threshold `min_healthy` (0.0..=1.0).
    pub fn new(min_healthy: f64) -> Self {
        Self {
            min_healthy: min_healthy.clamp(0.0, 1.0),
            ..Self::default()
        }
    }

    /// Sets the avalanche guard's threshold (takes effect at the next reconcile).
    pub fn set_min_healthy(&mut self, share: f64) {
        self.min_healthy = share.clamp(0.0, 1.0);
    }

    /// Both layers of the desired state.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Both layers of the desired state, shared (the controller's snapshot
    /// holds it without a copy).
    pub fn spec_shared(&self) -> Arc<Spec> {
        self.spec.clone()
    }

    /// The effective desired state (base with overrides), borrowing the
    /// base when no override applies.
    pub fn desired(&self) -> Cow<'_, Desired> {
        self.spec.effective_cow()
    }

    /// The model of the maps.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// VIPs the avalanche guard holds.
    pub fn guarded(&self) -> &BTreeSet<Vip> {
        &self.guarded
    }

    /// Health verdicts in force (absent: up).
    pub fn health(&self) -> &BTreeMap<(Vip, IpAddr), bool> {
        &self.health
    }

    /// Reals in slow start and the percent of their weight they have.
    pub fn ramp(&self) -> &BTreeMap<(Vip, IpAddr), u32> {
        &self.ramp
    }

    /// Sets the slow-start percents (absent: whole weight) and applies them;
    /// on error the previous ones stay.
    pub fn set_ramp<M: Maps>(
        &mut self,
        maps: &mut M,
        ramp: BTreeMap<(Vip, IpAddr), u32>,
    ) -> Result<Changes, StateError> {
        let before = std::mem::replace(&mut self.ramp, ramp);
        let r = self.reconcile(maps);
        if r.is_err() {
            self.ramp = before;
        }
        r
    }

    /// Whether `real` of `vip` is held up (true when never probed down).
    pub fn healthy(&self, vip: &Vip, real: IpAddr) -> bool {
        self.health.get(&(*vip, real)).copied().unwrap_or(true)
    }

    /// The MAC known for a real address, if any.
    pub fn mac(&self, real: IpAddr) -> Option<[u8; 6]> {
        self.macs.get(&real).copied()
    }

    /// Known MACs.
    pub fn macs(&self) -> &BTreeMap<IpAddr, [u8; 6]> {
        &self.macs
    }

    /// Reals of the desired state whose MAC (DR) or next hop's MAC (TUN) is
    /// not known yet, with how they are reached.
    pub fn unresolved(&self) -> BTreeMap<IpAddr, Forward> {
        let mut reach = self.desired().reach();
        reach.retain(|real, _| !self.macs.contains_key(real));
        reach
    }

    /// Which real the live table in the maps gives flow hash `hash` of `vip`
    /// (`xlb simulate`): what the data path would pick for a new flow.
    pub fn real_for<M: Maps>(
        &self,
        maps: &M,
        vip: &Vip,
        hash: u32,
    ) -> Result<Option<IpAddr>, StateError> {
        let a = self
            .model
            .services
            .get(vip)
            .ok_or(SpecError::UnknownVip(*vip))?;
        let size = a.options.table_size;
        let slot = maps.read_ring(a.rings[a.live] + hash % size, 1)?;
        Ok(self.model.real_by_id(slot[0]))
    }

    /// Applies one edit of the desired state, with the MACs of reals learnt
    /// for it. On error nothing changed: not the spec, not the maps.
    pub fn edit<M: Maps>(
        &mut self,
        maps: &mut M,
        edit: Edit,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
        pause: PauseHook,
    ) -> Result<Changes, StateError> {
        let next = self.spec.applied(edit)?;
        self.take_next(maps, next, macs, pause)
    }

    /// Applies `next`, what [`Spec::applied`] made of this state's spec (so
    /// already validated: a caller that checked it does not apply it twice).
    pub fn take_next<M: Maps>(
        &mut self,
        maps: &mut M,
        next: Next,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
        pause: PauseHook,
    ) -> Result<Changes, StateError> {
        let changes = self.commit(maps, Arc::new(next.spec), macs, None, pause)?;
        for (vip, real) in next.dropped {
            tracing::info!(%vip, %real, "override of a real that left the configuration dropped");
        }
        Ok(changes)
    }

    /// Records a health verdict and applies it (the table changes only when
    /// the real's membership does).
    pub fn set_health<M: Maps>(
        &mut self,
        maps: &mut M,
        verdicts: &[((Vip, IpAddr), bool)],
    ) -> Result<Changes, StateError> {
        let spec = self.spec.clone();
        self.commit(
            maps,
            spec,
            &BTreeMap::new(),
            Some(verdicts),
            PauseHook::default(),
        )
    }

    /// Applies MACs learnt or changed since the last change.
    pub fn learn_macs<M: Maps>(
        &mut self,
        maps: &mut M,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
    ) -> Result<Changes, StateError> {
        let spec = self.spec.clone();
        self.commit(maps, spec, macs, None, PauseHook::default())
    }

    /// Runs the reconcile step again on the current inputs.
    pub fn reconcile<M: Maps>(&mut self, maps: &mut M) -> Result<Changes, StateError> {
        let spec = self.spec.clone();
        self.commit(maps, spec, &BTreeMap::new(), None, PauseHook::default())
    }

    /// Reconciles to `spec` with the extra MACs and verdicts; commits the new
    /// state only when the maps took the change.
    fn commit<M: Maps>(
        &mut self,
        maps: &mut M,
        spec: Arc<Spec>,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
        verdicts: Option<&[((Vip, IpAddr), bool)]>,
        pause: PauseHook,
    ) -> Result<Changes, StateError> {
        self.step(spec, macs, verdicts.unwrap_or_default(), |model, inputs| {
            model.reconcile(maps, inputs, Mode::Diff, pause)
        })
    }

    /// Runs one reconcile `step` from the current model to `spec` (with the
    /// MACs and verdicts learnt for it); on success logs what changed and
    /// takes the new state, on error changes nothing.
    fn step(
        &mut self,
        spec: Arc<Spec>,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
        verdicts: &[((Vip, IpAddr), bool)],
        step: impl FnOnce(&Model, &Inputs<'_>) -> Result<Outcome, StateError>,
    ) -> Result<Changes, StateError> {
        // Both borrowed when no override applies (the common case): the
        // desired state is not copied at each change.
        let desired = spec.effective_cow();
        let before = self.spec.effective_cow();
        let (macs, health) = self.inputs_for(&before, &desired, macs, verdicts);
        let inputs = Inputs {
            desired: &desired,
            macs: &macs,
            health: &health,
            guarded: &self.guarded,
            min_healthy: self.min_healthy,
            ramp: &self.ramp,
        };
        let out = step(&self.model, &inputs)?;
        for line in describe_changes(&before, &desired) {
            tracing::info!("{line}");
        }
        drop((before, desired));
        Ok(self.take(spec, macs, health, out))
    }

    /// The MACs and verdicts of a new desired state: what is known plus what
    /// was learnt, without entries of reals that left (a real removed and
    /// added again starts afresh, like any new real) and without verdicts of
    /// reals whose check this change removes (healthy by definition, in the
    /// same change). A real new to the state whose check says `start: down`
    /// starts down.
    fn inputs_for(
        &self,
        before: &Desired,
        desired: &Desired,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
        verdicts: &[((Vip, IpAddr), bool)],
    ) -> (Macs, Verdicts) {
        let reach = desired.reach();
        let mut known = self.macs.clone();
        known.extend(macs.iter().map(|(a, m)| (*a, *m)));
        known.retain(|a, _| reach.contains_key(a));
        let mut health = self.health.clone();
        for (vip, s) in &desired.services {
            for real in s.reals.keys() {
                let starts_down = s
                    .check(*real)
                    .is_some_and(|c| c.kind != ProbeKind::None && c.start == Start::Down);
                if starts_down && !before.has_real(vip, *real) {
                    health.insert((*vip, *real), false);
                }
            }
        }
        for (key, up) in verdicts {
            if *up {
                health.remove(key);
            } else {
                health.insert(*key, false);
            }
        }
        health.retain(|(vip, real), _| desired.has_real(vip, *real));
        health.retain(|(vip, real), _| !before.probed(vip, *real) || desired.probed(vip, *real));
        (known, health)
    }

    fn take(
        &mut self,
        spec: Arc<Spec>,
        macs: BTreeMap<IpAddr, [u8; 6]>,
        health: BTreeMap<(Vip, IpAddr), bool>,
        out: Outcome,
    ) -> Changes {
        for (vip, on, healthy, servable) in &out.guard_changes {
            if *on {
                tracing::warn!(
                    %vip,
                    healthy,
                    servable,
                    "avalanche guard on: too few healthy reals, health is ignored for this VIP"
                );
            } else {
                tracing::info!(%vip, healthy, servable, "avalanche guard released");
            }
        }
        self.spec = spec;
        self.macs = macs;
        let desired = self.spec.effective_cow();
        self.ramp
            .retain(|(vip, real), _| desired.has_real(vip, *real));
        self.health = health;
        self.model = out.model;
        self.guarded = out.guarded;
        out.changes
    }

    /// Takes over maps a previous daemon left (or that a failed start
    /// pinned), `self` being the state it saved (or an empty one): makes the
    /// maps say what `spec` says, with `macs` learnt for it, rewriting every
    /// slot and table and removing what the model does not know.
    pub fn adopt<M: Maps>(
        &mut self,
        maps: &mut M,
        spec: Spec,
        macs: &BTreeMap<IpAddr, [u8; 6]>,
    ) -> Result<Changes, StateError> {
        spec.effective_cow().validate()?;
        self.step(Arc::new(spec), macs, &[], |model, inputs| {
            model.clone().adopt(maps, inputs)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::desired::{Admin, VipOptions};
    use crate::health::HealthCheck;
    use crate::state::writer::fake::FakeMaps;

    fn vip() -> Vip {
        "203.0.113.10:80/tcp".parse().expect("VIP")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    fn four_reals() -> State {
        with_reals(0.5, vip(), &[11, 12, 13, 14])
    }

    /// A state with `vip` (a 13-slot table) and reals 198.51.100.`reals`,
    /// each with weight 1 and a MAC, applied to a fake of the maps.
    pub(crate) fn with_reals(min_healthy: f64, vip: Vip, reals: &[u8]) -> State {
        let ip = |l: u8| IpAddr::from([198, 51, 100, l]);
        let mut st = State::new(min_healthy);
        let mut maps = FakeMaps::default();
        let options = VipOptions {
            table_size: 13,
            ..VipOptions::default()
        };
        st.edit(
            &mut maps,
            Edit::AddVip {
                vip,
                options,
                health: None,
            },
            &BTreeMap::new(),
            PauseHook::default(),
        )
        .expect("vip");
        for l in reals {
            let add = Edit::AddReal {
                vip,
                real: ip(*l),
                weight: 1,
            };
            let mac = BTreeMap::from([(ip(*l), [2, 0, 0, 0, 0, *l])]);
            st.edit(&mut maps, add, &mac, PauseHook::default())
                .expect("real");
        }
        st
    }

    #[test]
    fn a_verdict_dies_with_its_real() {
        let mut st = four_reals();
        let mut maps = FakeMaps::default();
        st.set_health(&mut maps, &[((vip(), ip(12)), false)])
            .expect("down");
        assert!(!st.healthy(&vip(), ip(12)));
        st.edit(
            &mut maps,
            Edit::DelReal {
                vip: vip(),
                real: ip(12),
            },
            &BTreeMap::new(),
            PauseHook::default(),
        )
        .expect("del");
        st.edit(
            &mut maps,
            Edit::AddReal {
                vip: vip(),
                real: ip(12),
                weight: 1,
            },
            &BTreeMap::new(),
            PauseHook::default(),
        )
        .expect("add");
        assert!(
            st.healthy(&vip(), ip(12)),
            "the old verdict outlived the real"
        );
        // Its MAC was forgotten with it too: it waits for resolution again.
        assert!(st.unresolved().contains_key(&ip(12)));
    }

    #[test]
    fn removing_the_check_clears_its_verdicts_and_the_guard_in_the_same_change() {
        let mut st = with_reals(0.5, vip(), &[]);
        let mut maps = FakeMaps::default();
        let check = |kind| Edit::SetVip {
            vip: vip(),
            scheduler: None,
            table_size: None,
            health: Some(HealthCheck {
                kind,
                ..HealthCheck::default()
            }),
        };
        st.edit(
            &mut maps,
            check(ProbeKind::Http),
            &BTreeMap::new(),
            PauseHook::default(),
        )
        .expect("check");
        for l in [11, 12, 13, 14] {
            let add = Edit::AddReal {
                vip: vip(),
                real: ip(l),
                weight: 1,
            };
            let mac = BTreeMap::from([(ip(l), [2, 0, 0, 0, 0, l])]);
            st.edit(&mut maps, add, &mac, PauseHook::default())
                .expect("real");
        }
        let down: Vec<_> = [11, 12, 13].map(|l| ((vip(), ip(l)), false)).into();
        st.set_health(&mut maps, &down).expect("down");
        assert!(st.guarded().contains(&vip()), "three of four down");
        st.edit(
            &mut maps,
            check(ProbeKind::None),
            &BTreeMap::new(),
            PauseHook::default(),
        )
        .expect("no check");
        assert!(st.health().is_empty(), "{:?}", st.health());
        assert!(
            !st.guarded().contains(&vip()),
            "the guard outlived the check"
        );
        let table = &st.model().services[&vip()].table;
        assert!(
            [11, 12, 13, 14]
                .iter()
                .all(|l| table.get(&ip(*l)) == Some(&1)),
            "{table:?}"
        );
    }

    #[test]
    fn drained_reals_never_let_the_guard_empty_a_service() {
        let mut st = four_reals();
        let mut maps = FakeMaps::default();
        for l in [13, 14] {
            st.edit(
                &mut maps,
                Edit::SetReal {
                    vip: vip(),
                    real: ip(l),
                    weight: None,
                    admin: Some(Admin::Drain),
                },
                &BTreeMap::new(),
                PauseHook::default(),
            )
            .expect("drain");
        }
        st.set_health(
            &mut maps,
            &[((vip(), ip(11)), false), ((vip(), ip(12)), false)],
        )
        .expect("down");
        assert!(st.guarded().contains(&vip()));
        let table = &st.model().services[&vip()].table;
        assert_eq!(table[&ip(11)], 1, "{table:?}");
        assert_eq!(table[&ip(12)], 1, "{table:?}");
    }

    #[test]
    fn state_round_trips_through_json() {
        let st = four_reals();
        let json = serde_json::to_string(&st).expect("serialize");
        let back: State = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, st);
    }
}
