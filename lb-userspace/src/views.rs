//! What the operator sees of the VIPs and reals: the controller's published
//! [`Snapshot`] joined with the data path's counters and the last conntrack
//! count. Built by the API and the metrics alike, without asking the
//! controller anything.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    controller::Snapshot,
    counters::{FlowCounts, Reader},
    dataplane::DataplaneError,
    desired::{Admin, Source},
    model::{Forward, Scheduler, Vip},
    state::fmt_mac,
};

/// A VIP with its reals and counters (`xlb vip list`, `xlb status`, the API).
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
    /// Flows of its reals active in the conntrack table (last count).
    pub active_flows: u64,
    /// Its reals.
    pub reals: Vec<RealView>,
}

/// A real inside a VIP.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RealView {
    /// The real's address.
    pub addr: IpAddr,
    /// Its weight.
    pub weight: u32,
    /// Where the weight comes from: `config` or `override`.
    pub weight_source: Source,
    /// The weight it has in the live table (0: no new flows; absent when out of it).
    pub effective_weight: Option<u32>,
    /// The operator's state.
    pub admin: Admin,
    /// Where the admin state comes from: `config` or `override`.
    pub admin_source: Source,
    /// The health verdict in force (true when not probed).
    pub healthy: bool,
    /// Whether its MAC (of the next hop in TUN mode) is known.
    pub resolved: bool,
    /// Why it is not resolved yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved_reason: Option<String>,
    /// MAC of the next hop toward it (itself in DR mode), or empty.
    pub mac: String,
    /// Packets forwarded to it for this VIP.
    pub packets: u64,
    /// Bytes forwarded to it for this VIP.
    pub bytes: u64,
    /// New flows sent to it for this VIP.
    pub flows: u64,
    /// Its flows active in the conntrack table (last count): 0 once a drain is done.
    pub active_flows: u64,
    /// How many times it entered or left the set of reals the live table
    /// sends new flows to, since it was added.
    #[serde(default)]
    pub table_changes: u64,
}

/// Every VIP of `snap` with its counters.
pub fn vips(
    snap: &Snapshot,
    reader: &Reader,
    flows: &FlowCounts,
) -> Result<Vec<VipView>, DataplaneError> {
    snap.vips
        .iter()
        .map(|v| {
            let counter = reader.vip_counter(v.id)?;
            let reals = v
                .reals
                .iter()
                .map(|r| {
                    let (c, active) = match r.slot {
                        Some((id, generation)) => (
                            reader.real_counter(id)?,
                            flows
                                .by_slot
                                .get(&(id, lb_common::ct_generation(generation)))
                                .copied()
                                .unwrap_or(0),
                        ),
                        None => (Default::default(), 0),
                    };
                    Ok(RealView {
                        addr: r.addr,
                        weight: r.weight,
                        weight_source: r.weight_source,
                        effective_weight: r.effective_weight,
                        admin: r.admin,
                        admin_source: r.admin_source,
                        healthy: r.healthy,
                        resolved: r.mac.is_some(),
                        unresolved_reason: r.unresolved.clone(),
                        mac: r.mac.as_ref().map(fmt_mac).unwrap_or_default(),
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.flows,
                        active_flows: active,
                        table_changes: r.table_changes,
                    })
                })
                .collect::<Result<Vec<_>, DataplaneError>>()?;
            Ok(VipView {
                vip: v.vip,
                id: v.id,
                scheduler: v.options.scheduler,
                forward: v.options.forward,
                table_size: v.options.table_size,
                guarded: v.guarded,
                packets: counter.packets,
                bytes: counter.bytes,
                flows: counter.flows,
                active_flows: reals.iter().map(|r| r.active_flows).sum(),
                reals,
            })
        })
        .collect()
}

/// Per-VIP lookup helper: the view of `vip`, if configured.
pub fn find(views: Vec<VipView>, vip: &Vip) -> Option<VipView> {
    views.into_iter().find(|v| v.vip == *vip)
}

/// Active flows by (VIP, real), for the metrics.
pub fn active_by_real(views: &[VipView]) -> BTreeMap<(Vip, IpAddr), u64> {
    views
        .iter()
        .flat_map(|v| {
            v.reals
                .iter()
                .map(move |r| ((v.vip, r.addr), r.active_flows))
        })
        .collect()
}
