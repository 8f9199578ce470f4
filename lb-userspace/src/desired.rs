//! The desired state: what the operator asked for, in two layers.
//!
//! - The **base** ([`Desired`]): services, their reals, weights, admin states and
//!   health checks, as given by the configuration file, `xlb apply`, or
//!   `xlb vip add` / `xlb real add` / `xlb real del`. A reload of `--config`
//!   replaces it.
//! - The **overrides** ([`Overrides`]): weights and admin states an operator set by
//!   hand (`xlb real set|drain|disable|enable`). They win over the base, survive
//!   reloads and restarts, and are removed one real at a time with
//!   `xlb real reset-override`, or when their real leaves the base.
//!
//! [`Spec`] holds both; [`Spec::effective`] is what the reconcile step applies.
//! Every change, whoever asks for it, is one [`Edit`] applied by
//! [`Spec::apply`]: the API, the CLI, the config loader and the tests share it.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{MAX_REALS, MAX_VIPS, RING_POOL, RING_SIZE_DEFAULT, RING_SIZE_MAX};
use serde::{Deserialize, Serialize};

use crate::{
    health::{HealthCheck, Planned, ProbeKind},
    maglev,
    model::{Forward, Scheduler, Vip},
};

/// Largest weight a real can have.
pub const MAX_WEIGHT: u32 = 65535;

/// Why a desired state or an edit of it was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
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
    /// The real has no override to remove.
    #[error("real {real} of {vip} has no override; its values come from the configuration")]
    NoOverride {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
    },
    /// A capacity of the maps would be exceeded.
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
    /// The VIP's address can never be a service address.
    #[error("invalid VIP {vip}: {why}")]
    VipAddress {
        /// The VIP.
        vip: Vip,
        /// What kind of address it is.
        why: &'static str,
    },
    /// The real's address can never be a real server's.
    #[error("invalid real {real}: {why}")]
    RealAddress {
        /// The real.
        real: IpAddr,
        /// What kind of address it is.
        why: &'static str,
    },
    /// An edit that changes nothing was asked for with no values.
    #[error("give a weight and/or an admin state")]
    NothingToSet,
    /// A VIP edit was asked for with no values.
    #[error("give a scheduler, a table size and/or a health check")]
    NothingToSetVip,
}

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

    /// The check `real` is probed with: the one that applies, unless it is `none`.
    fn probe(&self, real: IpAddr) -> Option<&HealthCheck> {
        self.check(real).filter(|c| c.kind != ProbeKind::None)
    }
}

/// Services by VIP: one layer of the desired state (or both, merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The seed of every Maglev permutation (`hash_seed`): nodes of a fleet
    /// with the same seed build the same tables; another seed puts the reals
    /// in other slots. 0 (unset) is the unseeded table.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hash_seed: u64,
    /// The services by VIP.
    pub services: BTreeMap<Vip, ServiceSpec>,
}

/// Whether `n` is 0 (an unset seed is not written out).
pub fn is_zero(n: &u64) -> bool {
    *n == 0
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

    /// Every real to probe, with its check, the port to probe and its VIP's
    /// forwarding mode: the reals whose check (their own, else the
    /// service's) is not `none`.
    pub fn probes(&self) -> BTreeMap<(Vip, IpAddr), Planned> {
        let mut out = BTreeMap::new();
        for (vip, s) in &self.services {
            for real in s.reals.keys() {
                if let Some(c) = s.probe(*real) {
                    let planned = Planned {
                        check: c.clone(),
                        port: c.port.unwrap_or(vip.port),
                        forward: s.options.forward,
                    };
                    out.insert((*vip, *real), planned);
                }
            }
        }
        out
    }

    /// Whether `real` of `vip` is probed: one entry of [`Desired::probes`],
    /// looked up without making the list.
    pub fn probed(&self, vip: &Vip, real: IpAddr) -> bool {
        self.services
            .get(vip)
            .is_some_and(|s| s.reals.contains_key(&real) && s.probe(real).is_some())
    }

    /// Every (VIP, real) pair.
    pub fn pairs(&self) -> impl Iterator<Item = (Vip, IpAddr)> + '_ {
        self.services
            .iter()
            .flat_map(|(vip, s)| s.reals.keys().map(move |r| (*vip, *r)))
    }

    /// Whether `real` is in `vip`.
    pub fn has_real(&self, vip: &Vip, real: IpAddr) -> bool {
        self.services
            .get(vip)
            .is_some_and(|s| s.reals.contains_key(&real))
    }

    /// Checks the values that do not depend on the running state: weights,
    /// table sizes, address families, capacities.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.services.len() > MAX_VIPS as usize {
            return Err(SpecError::Full {
                what: "VIPs",
                limit: MAX_VIPS,
            });
        }
        let pairs: usize = self.services.values().map(|s| s.reals.len()).sum();
        if pairs >= MAX_REALS as usize {
            return Err(SpecError::Full {
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
            return Err(SpecError::Full {
                what: "Maglev table slots (two tables of table_size per VIP)",
                limit: RING_POOL,
            });
        }
        for (vip, s) in &self.services {
            check_vip_addr(vip)?;
            check_table_size(s.options.table_size)?;
            for (real, spec) in &s.reals {
                check_real_addr(*real)?;
                check_weight(spec.weight)?;
                check_family(vip, s.options.forward, *real)?;
            }
        }
        Ok(())
    }
}

/// Why `addr` can never be a VIP or a real server, if it cannot: the
/// unspecified address, loopback, multicast, broadcast, link-local.
pub fn unusable(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("0.0.0.0 is the unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => {
            Some("a loopback address (127.0.0.0/8) never reaches the wire")
        }
        IpAddr::V4(a) if a.is_multicast() => {
            Some("a multicast address (224.0.0.0/4) is not a unicast service")
        }
        IpAddr::V4(a) if a.is_broadcast() => Some("255.255.255.255 is the broadcast address"),
        IpAddr::V4(a) if a.is_link_local() => {
            Some("a link-local address (169.254.0.0/16) does not leave its segment's hosts")
        }
        IpAddr::V6(a) if a.is_unspecified() => Some(":: is the unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("::1 is the loopback address"),
        IpAddr::V6(a) if a.is_multicast() => {
            Some("a multicast address (ff00::/8) is not a unicast service")
        }
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("a link-local address (fe80::/10) cannot be routed")
        }
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address: write the IPv4 address")
        }
        _ => None,
    }
}

/// Refuses a VIP whose address can never be a service address.
pub fn check_vip_addr(vip: &Vip) -> Result<(), SpecError> {
    match unusable(vip.addr) {
        Some(why) => Err(SpecError::VipAddress { vip: *vip, why }),
        None => Ok(()),
    }
}

/// Refuses a real whose address can never be a real server's.
pub fn check_real_addr(real: IpAddr) -> Result<(), SpecError> {
    match unusable(real) {
        Some(why) => Err(SpecError::RealAddress { real, why }),
        None => Ok(()),
    }
}

/// Refuses a weight above [`MAX_WEIGHT`].
pub fn check_weight(weight: u32) -> Result<(), SpecError> {
    if weight > MAX_WEIGHT {
        return Err(SpecError::Weight(weight));
    }
    Ok(())
}

/// Refuses a table size that is not a usable prime.
pub fn check_table_size(size: u32) -> Result<(), SpecError> {
    if !maglev::is_prime(size) || size > RING_SIZE_MAX {
        return Err(SpecError::TableSize(size));
    }
    Ok(())
}

/// Whether `real` can serve `vip` in mode `forward`.
pub fn check_family(vip: &Vip, forward: Forward, real: IpAddr) -> Result<(), SpecError> {
    let why = match (forward, vip.addr.is_ipv4(), real.is_ipv4()) {
        (Forward::Dr, v4, r4) if v4 != r4 => {
            "direct return forwards the packet unchanged, so the real must be of the VIP's \
             address family"
        }
        (Forward::Tun, false, true) => "an IPv6 VIP needs IPv6 reals (IPv6-in-IPv4 is not offered)",
        _ => return Ok(()),
    };
    Err(SpecError::Family {
        vip: *vip,
        real,
        forward,
        why,
    })
}

/// What an operator set by hand on one real.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// A weight that wins over the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// An admin state that wins over the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
}

/// The override layer: (VIP, real) → what was set by hand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides(pub BTreeMap<(Vip, IpAddr), Override>);

impl Serialize for Overrides {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // JSON maps need string keys: a list of entries.
        #[derive(Serialize)]
        struct Entry<'a> {
            vip: Vip,
            real: IpAddr,
            #[serde(flatten)]
            set: &'a Override,
        }
        s.collect_seq(self.0.iter().map(|((vip, real), set)| Entry {
            vip: *vip,
            real: *real,
            set,
        }))
    }
}

impl<'de> Deserialize<'de> for Overrides {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Entry {
            vip: Vip,
            real: IpAddr,
            #[serde(flatten)]
            set: Override,
        }
        Ok(Self(
            Vec::<Entry>::deserialize(d)?
                .into_iter()
                .map(|e| ((e.vip, e.real), e.set))
                .collect(),
        ))
    }
}

/// Where a real's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The base: the configuration file, `xlb apply`, `xlb vip|real add`.
    Config,
    /// Set by hand with `xlb real set|drain|disable|enable`.
    Override,
}

/// The whole desired state: the base and the overrides on top of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The base layer.
    pub base: Desired,
    /// The override layer.
    #[serde(default)]
    pub overrides: Overrides,
}

/// One change of the desired state.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Add a VIP to the base.
    AddVip {
        /// The VIP.
        vip: Vip,
        /// Its options.
        options: VipOptions,
        /// The health check of its reals.
        health: Option<HealthCheck>,
    },
    /// Change a VIP's settings in the base, in place: its VIP id, reals and
    /// tracked flows stay (`xlb vip set`).
    SetVip {
        /// The VIP.
        vip: Vip,
        /// A new scheduler.
        scheduler: Option<Scheduler>,
        /// A new Maglev table size.
        table_size: Option<u32>,
        /// A new health check of its reals (kind `none`: not probed).
        health: Option<HealthCheck>,
    },
    /// Remove a VIP (and its overrides).
    DelVip(Vip),
    /// Add a real to a VIP of the base.
    AddReal {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
        /// Its weight.
        weight: u32,
    },
    /// Set a real's weight and/or admin state by hand (the override layer).
    SetReal {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
        /// The weight to force.
        weight: Option<u32>,
        /// The admin state to force.
        admin: Option<Admin>,
    },
    /// Remove a real from a VIP (and its override).
    DelReal {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
    },
    /// Remove what was set by hand on a real: the base's values apply again.
    ResetOverride {
        /// The VIP.
        vip: Vip,
        /// The real.
        real: IpAddr,
    },
    /// Replace the base (config file, `xlb apply`, reload); overrides whose
    /// real is still there are kept.
    Replace(Desired),
    /// Replace both layers: a node of a fleet taking the store's document.
    Load(Spec),
}

impl Spec {
    /// The base with the overrides applied: what the maps must say.
    pub fn effective(&self) -> Desired {
        self.effective_cow().into_owned()
    }

    /// The base, when it is the effective state: no override applies.
    pub fn base_when_effective(&self) -> Option<&Desired> {
        self.overrides.0.is_empty().then_some(&self.base)
    }

    /// [`Spec::effective`], borrowing the base when no override applies (the
    /// reconcile step reads the whole desired state at every change: a copy
    /// of 1,000 VIPs costs about a millisecond to make and another to drop).
    pub fn effective_cow(&self) -> Cow<'_, Desired> {
        if let Some(base) = self.base_when_effective() {
            return Cow::Borrowed(base);
        }
        let mut out = self.base.clone();
        for ((vip, real), set) in &self.overrides.0 {
            if let Some(r) = out
                .services
                .get_mut(vip)
                .and_then(|s| s.reals.get_mut(real))
            {
                if let Some(w) = set.weight {
                    r.weight = w;
                }
                if let Some(a) = set.admin {
                    r.admin = a;
                }
            }
        }
        Cow::Owned(out)
    }

    /// Where `real`'s weight and admin state come from.
    pub fn sources(&self, vip: &Vip, real: IpAddr) -> (Source, Source) {
        let o = self.overrides.0.get(&(*vip, real));
        let source = |set: bool| {
            if set {
                Source::Override
            } else {
                Source::Config
            }
        };
        (
            source(o.is_some_and(|o| o.weight.is_some())),
            source(o.is_some_and(|o| o.admin.is_some())),
        )
    }

    /// Applies `edit`; on error nothing changed. Returns the overrides the
    /// edit dropped because their real left (for the log).
    pub fn apply(&mut self, edit: Edit) -> Result<Vec<(Vip, IpAddr)>, SpecError> {
        let next = self.applied(edit)?;
        *self = next.spec;
        Ok(next.dropped)
    }

    /// What `edit` makes of this spec, validated (the base is not copied
    /// when the edit replaces it).
    pub fn applied(&self, edit: Edit) -> Result<Next, SpecError> {
        let mut next = match edit {
            // The whole base is replaced: only the overrides are kept.
            Edit::Replace(desired) => Self {
                base: desired,
                overrides: self.overrides.clone(),
            },
            Edit::Load(spec) => spec,
            edit => self.edited(edit)?,
        };
        // Overrides die with their real.
        let dropped: Vec<(Vip, IpAddr)> = next
            .overrides
            .0
            .keys()
            .filter(|(vip, real)| !next.base.has_real(vip, *real))
            .copied()
            .collect();
        for k in &dropped {
            next.overrides.0.remove(k);
        }
        next.effective_cow().validate()?;
        Ok(Next {
            spec: next,
            dropped,
        })
    }

    /// Sets a real's weight and/or admin state in the override layer, in
    /// place ([`Edit::SetReal`]); on error nothing changed. It checks all an
    /// override can break: the weight's range and that the real is there.
    pub fn set_override(
        &mut self,
        vip: Vip,
        real: IpAddr,
        weight: Option<u32>,
        admin: Option<Admin>,
    ) -> Result<(), SpecError> {
        if weight.is_none() && admin.is_none() {
            return Err(SpecError::NothingToSet);
        }
        if let Some(w) = weight {
            check_weight(w)?;
        }
        let s = self
            .base
            .services
            .get(&vip)
            .ok_or(SpecError::UnknownVip(vip))?;
        if !s.reals.contains_key(&real) {
            return Err(SpecError::UnknownReal { vip, real });
        }
        let o = self.overrides.0.entry((vip, real)).or_default();
        if weight.is_some() {
            o.weight = weight;
        }
        if admin.is_some() {
            o.admin = admin;
        }
        Ok(())
    }

    /// A copy of this spec with a piece-wise `edit` made (not validated as a whole).
    fn edited(&self, edit: Edit) -> Result<Self, SpecError> {
        let mut next = self.clone();
        match edit {
            Edit::AddVip {
                vip,
                options,
                health,
            } => {
                if next.base.services.contains_key(&vip) {
                    return Err(SpecError::VipExists(vip));
                }
                check_vip_addr(&vip)?;
                check_table_size(options.table_size)?;
                next.base.services.insert(
                    vip,
                    ServiceSpec {
                        options,
                        health,
                        reals: BTreeMap::new(),
                    },
                );
            }
            Edit::SetVip {
                vip,
                scheduler,
                table_size,
                health,
            } => {
                if scheduler.is_none() && table_size.is_none() && health.is_none() {
                    return Err(SpecError::NothingToSetVip);
                }
                let s = next
                    .base
                    .services
                    .get_mut(&vip)
                    .ok_or(SpecError::UnknownVip(vip))?;
                if let Some(size) = table_size {
                    check_table_size(size)?;
                    s.options.table_size = size;
                }
                if let Some(scheduler) = scheduler {
                    s.options.scheduler = scheduler;
                }
                if health.is_some() {
                    s.health = health;
                }
            }
            Edit::DelVip(vip) => {
                next.base
                    .services
                    .remove(&vip)
                    .ok_or(SpecError::UnknownVip(vip))?;
            }
            Edit::AddReal { vip, real, weight } => {
                check_real_addr(real)?;
                check_weight(weight)?;
                let s = next
                    .base
                    .services
                    .get_mut(&vip)
                    .ok_or(SpecError::UnknownVip(vip))?;
                if s.reals.contains_key(&real) {
                    return Err(SpecError::RealExists { vip, real });
                }
                check_family(&vip, s.options.forward, real)?;
                s.reals.insert(
                    real,
                    RealSpec {
                        weight,
                        ..RealSpec::default()
                    },
                );
            }
            Edit::SetReal {
                vip,
                real,
                weight,
                admin,
            } => next.set_override(vip, real, weight, admin)?,
            Edit::DelReal { vip, real } => {
                let s = next
                    .base
                    .services
                    .get_mut(&vip)
                    .ok_or(SpecError::UnknownVip(vip))?;
                s.reals
                    .remove(&real)
                    .ok_or(SpecError::UnknownReal { vip, real })?;
            }
            Edit::ResetOverride { vip, real } => {
                if !next.base.has_real(&vip, real) {
                    if next.base.services.contains_key(&vip) {
                        return Err(SpecError::UnknownReal { vip, real });
                    }
                    return Err(SpecError::UnknownVip(vip));
                }
                next.overrides
                    .0
                    .remove(&(vip, real))
                    .ok_or(SpecError::NoOverride { vip, real })?;
            }
            Edit::Replace(desired) => next.base = desired,
            Edit::Load(spec) => next = spec,
        }
        Ok(next)
    }
}

/// An edit applied to a [`Spec`]: see [`Spec::applied`].
#[derive(Debug)]
pub struct Next {
    /// Both layers after the edit.
    pub spec: Spec,
    /// Overrides the edit dropped because their real left (for the log).
    pub dropped: Vec<(Vip, IpAddr)>,
}

/// One line per difference between two desired states ("+ VIP ...",
/// "~ real ... of ...: weight 1 -> 3", ...), for the log.
pub fn describe_changes(old: &Desired, new: &Desired) -> Vec<String> {
    crate::diff::diff(old, new)
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The reals `desired` names that `known` has no MAC for.
pub fn unknown_reals(desired: &Desired, known: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, Forward> {
    let mut reach = desired.reach();
    reach.retain(|real, _| !known.contains(real));
    reach
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(s: &str) -> Vip {
        s.parse().expect("valid VIP")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid address")
    }

    #[test]
    fn a_real_is_probed_exactly_when_it_is_in_the_probe_list() {
        let (checked, unchecked) = (vip("203.0.113.10:80/tcp"), vip("203.0.113.11:80/tcp"));
        // Two VIPs with the same two reals, one checked.
        let mut spec = spec_with_two_reals();
        let copy = spec.base.services[&checked].clone();
        spec.base.services.insert(unchecked, copy);
        spec.base.services.get_mut(&checked).expect("VIP").health = Some(HealthCheck::default());
        // A real's own check `none` turns its service's off for it alone.
        let none = HealthCheck {
            kind: ProbeKind::None,
            ..HealthCheck::default()
        };
        spec.base
            .services
            .get_mut(&checked)
            .and_then(|s| s.reals.get_mut(&ip("198.51.100.12")))
            .expect("real")
            .health = Some(none);
        let desired = spec.effective();
        let probes = desired.probes();
        assert_eq!(probes.len(), 1);
        for v in [checked, unchecked, vip("203.0.113.12:80/tcp")] {
            for r in ["198.51.100.11", "198.51.100.12", "198.51.100.13"] {
                assert_eq!(
                    desired.probed(&v, ip(r)),
                    probes.contains_key(&(v, ip(r))),
                    "{v} {r}"
                );
            }
        }
    }

    fn spec_with_two_reals() -> Spec {
        let mut spec = Spec::default();
        let v = vip("203.0.113.10:80/tcp");
        spec.apply(Edit::AddVip {
            vip: v,
            options: VipOptions::default(),
            health: None,
        })
        .expect("vip");
        for r in ["198.51.100.11", "198.51.100.12"] {
            spec.apply(Edit::AddReal {
                vip: v,
                real: ip(r),
                weight: 1,
            })
            .expect("real");
        }
        spec
    }

    #[test]
    fn an_override_survives_replacing_the_base_and_reset_restores_the_base() {
        let mut spec = spec_with_two_reals();
        let v = vip("203.0.113.10:80/tcp");
        let r = ip("198.51.100.11");
        spec.apply(Edit::SetReal {
            vip: v,
            real: r,
            weight: None,
            admin: Some(Admin::Drain),
        })
        .expect("drain");
        // A reload with the same file: the drain stays.
        let base = spec.base.clone();
        spec.apply(Edit::Replace(base)).expect("replace");
        assert_eq!(spec.effective().services[&v].reals[&r].admin, Admin::Drain);
        assert_eq!(spec.sources(&v, r), (Source::Config, Source::Override));
        spec.apply(Edit::ResetOverride { vip: v, real: r })
            .expect("reset");
        assert_eq!(
            spec.effective().services[&v].reals[&r].admin,
            Admin::Enabled
        );
        assert_eq!(
            spec.apply(Edit::ResetOverride { vip: v, real: r }),
            Err(SpecError::NoOverride { vip: v, real: r })
        );
    }

    #[test]
    fn the_effective_state_is_the_base_itself_until_an_override_applies() {
        let mut spec = spec_with_two_reals();
        assert!(matches!(spec.effective_cow(), Cow::Borrowed(_)));
        assert_eq!(spec.effective(), spec.base);
        let (v, r) = (vip("203.0.113.10:80/tcp"), ip("198.51.100.11"));
        spec.apply(Edit::SetReal {
            vip: v,
            real: r,
            weight: Some(5),
            admin: None,
        })
        .expect("override");
        let effective = spec.effective_cow();
        assert!(matches!(effective, Cow::Owned(_)));
        assert_eq!(effective.services[&v].reals[&r].weight, 5);
        assert_eq!(spec.base.services[&v].reals[&r].weight, 1);
    }

    #[test]
    fn an_override_dies_with_its_real() {
        let mut spec = spec_with_two_reals();
        let v = vip("203.0.113.10:80/tcp");
        let r = ip("198.51.100.12");
        spec.apply(Edit::SetReal {
            vip: v,
            real: r,
            weight: Some(7),
            admin: None,
        })
        .expect("weight");
        let mut base = spec.base.clone();
        base.services.get_mut(&v).expect("vip").reals.remove(&r);
        let dropped = spec.apply(Edit::Replace(base)).expect("replace");
        assert_eq!(dropped, [(v, r)]);
        assert!(spec.overrides.0.is_empty());
        // Added again, it has the base's values.
        spec.apply(Edit::AddReal {
            vip: v,
            real: r,
            weight: 1,
        })
        .expect("add");
        assert_eq!(spec.effective().services[&v].reals[&r].weight, 1);
    }

    #[test]
    fn a_refused_edit_changes_nothing() {
        let mut spec = spec_with_two_reals();
        let before = spec.clone();
        let v = vip("203.0.113.10:80/tcp");
        let cases = [
            (
                Edit::AddReal {
                    vip: v,
                    real: ip("2001:db8::1"),
                    weight: 1,
                },
                "address family",
            ),
            (
                Edit::AddReal {
                    vip: v,
                    real: ip("198.51.100.11"),
                    weight: 1,
                },
                "already in VIP",
            ),
            (
                Edit::SetReal {
                    vip: v,
                    real: ip("198.51.100.11"),
                    weight: Some(70_000),
                    admin: None,
                },
                "invalid weight 70000",
            ),
            (
                Edit::SetReal {
                    vip: v,
                    real: ip("198.51.100.99"),
                    weight: Some(1),
                    admin: None,
                },
                "is not in VIP",
            ),
            (
                Edit::DelVip(vip("203.0.113.77:80/tcp")),
                "unknown VIP 203.0.113.77:80/tcp",
            ),
            (
                Edit::AddVip {
                    vip: vip("203.0.113.11:80/tcp"),
                    options: VipOptions {
                        table_size: 65536,
                        ..VipOptions::default()
                    },
                    health: None,
                },
                "invalid table size 65536",
            ),
            (
                Edit::SetVip {
                    vip: v,
                    scheduler: Some(Scheduler::MaglevSrc),
                    table_size: Some(100),
                    health: None,
                },
                "invalid table size 100",
            ),
            (
                Edit::SetVip {
                    vip: v,
                    scheduler: None,
                    table_size: None,
                    health: None,
                },
                "give a scheduler, a table size and/or a health check",
            ),
            (
                Edit::SetVip {
                    vip: vip("203.0.113.77:80/tcp"),
                    scheduler: Some(Scheduler::MaglevSrc),
                    table_size: None,
                    health: None,
                },
                "unknown VIP 203.0.113.77:80/tcp",
            ),
        ];
        for (edit, want) in cases {
            let err = spec.apply(edit.clone()).expect_err("refused").to_string();
            assert!(err.contains(want), "{edit:?}: got {err:?}, want {want:?}");
            assert_eq!(spec, before, "{edit:?} changed the spec");
        }
    }

    #[test]
    fn set_vip_changes_only_what_it_is_given_and_keeps_the_reals_and_overrides() {
        let mut spec = spec_with_two_reals();
        let v = vip("203.0.113.10:80/tcp");
        spec.apply(Edit::SetReal {
            vip: v,
            real: ip("198.51.100.11"),
            weight: Some(5),
            admin: None,
        })
        .expect("override");
        let mut want = spec.clone();
        spec.apply(Edit::SetVip {
            vip: v,
            scheduler: None,
            table_size: Some(251),
            health: None,
        })
        .expect("set vip");
        let s = want.base.services.get_mut(&v).expect("vip");
        s.options.table_size = 251;
        assert_eq!(spec, want);
    }

    #[test]
    fn addresses_that_can_never_serve_are_refused_with_the_reason() {
        let mut spec = spec_with_two_reals();
        let before = spec.clone();
        for (v, want) in [
            ("0.0.0.0:80/tcp", "unspecified"),
            ("127.0.0.1:80/tcp", "loopback"),
            ("224.0.0.5:80/tcp", "multicast"),
            ("255.255.255.255:53/udp", "broadcast"),
            ("[::]:80/tcp", "unspecified"),
            ("[ff02::1]:80/tcp", "multicast"),
        ] {
            let err = spec
                .apply(Edit::AddVip {
                    vip: vip(v),
                    options: VipOptions::default(),
                    health: None,
                })
                .expect_err(v)
                .to_string();
            assert!(
                err.contains(want) && err.contains("invalid VIP"),
                "{v}: {err}"
            );
        }
        for (r, want) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("224.0.0.5", "multicast"),
            ("169.254.1.1", "link-local"),
        ] {
            let err = spec
                .apply(Edit::AddReal {
                    vip: vip("203.0.113.10:80/tcp"),
                    real: ip(r),
                    weight: 1,
                })
                .expect_err(r)
                .to_string();
            assert!(
                err.contains(want) && err.contains("invalid real"),
                "{r}: {err}"
            );
        }
        assert_eq!(spec, before);
    }

    #[test]
    fn changes_are_described_one_per_line() {
        let spec = spec_with_two_reals();
        let old = spec.effective();
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
                "~ real 198.51.100.11 of 203.0.113.10:80/tcp: weight 1 -> 7",
                "~ real 198.51.100.12 of 203.0.113.10:80/tcp: admin enabled -> drain",
                "+ VIP 203.0.113.11:53/udp (forward dr, scheduler maglev, table_size 65537, \
                 health_check none)",
            ]
        );
        assert!(describe_changes(&new, &new).is_empty());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let mut spec = spec_with_two_reals();
        spec.apply(Edit::SetReal {
            vip: vip("203.0.113.10:80/tcp"),
            real: ip("198.51.100.11"),
            weight: Some(3),
            admin: Some(Admin::Disabled),
        })
        .expect("override");
        let json = serde_json::to_string(&spec).expect("serialize");
        let back: Spec = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, spec);
    }
}
