//! Rates from two readings of the counters: `xlb stats --rate` (one shot, like
//! `ipvsadm -L --rate`) and `xlb top` (every refresh).

use std::{net::IpAddr, time::Duration};

use hyper::Method;
use serde::Serialize;

use crate::{client::Client, desired::Admin, model::Vip, views::VipView};

/// Rates of every VIP and real over one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rates {
    /// The interval measured, seconds.
    pub interval_s: f64,
    /// Every VIP, in the daemon's order.
    pub vips: Vec<VipRate>,
}

/// The rates of one VIP.
#[derive(Clone, Debug, Serialize)]
pub struct VipRate {
    /// The VIP.
    pub vip: Vip,
    /// Packets forwarded per second.
    pub packets_per_s: f64,
    /// Bytes forwarded per second.
    pub bytes_per_s: f64,
    /// New flows per second.
    pub flows_per_s: f64,
    /// Active flows at the end (last conntrack count).
    pub active_flows: u64,
    /// Its reals.
    pub reals: Vec<RealRate>,
}

/// The rates of one real of a VIP.
#[derive(Clone, Debug, Serialize)]
pub struct RealRate {
    /// The real.
    pub addr: IpAddr,
    /// Packets forwarded to it per second.
    pub packets_per_s: f64,
    /// Bytes forwarded to it per second.
    pub bytes_per_s: f64,
    /// New flows sent to it per second.
    pub flows_per_s: f64,
    /// Its active flows at the end (last conntrack count).
    pub active_flows: u64,
    /// Its weight in the live table (absent: out of it).
    pub effective_weight: Option<u32>,
    /// Its admin state.
    pub admin: Admin,
    /// The health verdict in force.
    pub healthy: bool,
}

/// `(after - before) / secs`; a counter that went down (zeroed, or a real
/// removed and added back) counts from zero.
fn per_s(before: Option<u64>, after: u64, secs: f64) -> f64 {
    let delta = before.map_or(0, |b| after.checked_sub(b).unwrap_or(after));
    #[expect(
        clippy::cast_precision_loss,
        reason = "a rate shown to a person; 2^52 packets per interval is far away"
    )]
    let delta = delta as f64;
    delta / secs
}

/// The rates between two readings taken `elapsed` apart. A VIP or real absent
/// from `before` (added meanwhile) has no rate yet (0).
pub fn between(before: &[VipView], after: &[VipView], elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let vips = after
        .iter()
        .map(|v| {
            let b = before.iter().find(|b| b.vip == v.vip);
            let reals = v
                .reals
                .iter()
                .map(|r| {
                    let br = b.and_then(|b| b.reals.iter().find(|x| x.addr == r.addr));
                    RealRate {
                        addr: r.addr,
                        packets_per_s: per_s(br.map(|x| x.packets), r.packets, secs),
                        bytes_per_s: per_s(br.map(|x| x.bytes), r.bytes, secs),
                        flows_per_s: per_s(br.map(|x| x.flows), r.flows, secs),
                        active_flows: r.active_flows,
                        effective_weight: r.effective_weight,
                        admin: r.admin,
                        healthy: r.healthy,
                    }
                })
                .collect();
            VipRate {
                vip: v.vip,
                packets_per_s: per_s(b.map(|x| x.packets), v.packets, secs),
                bytes_per_s: per_s(b.map(|x| x.bytes), v.bytes, secs),
                flows_per_s: per_s(b.map(|x| x.flows), v.flows, secs),
                active_flows: v.active_flows,
                reals,
            }
        })
        .collect();
    Rates {
        interval_s: elapsed.as_secs_f64(),
        vips,
    }
}

/// Reads the counters twice, `interval` apart, and returns the rates.
pub async fn measure(client: &Client, interval: Duration) -> anyhow::Result<Rates> {
    let read = || client.call::<(), Vec<VipView>>(Method::GET, "/v1/vips", None);
    let before = read().await?;
    let start = tokio::time::Instant::now();
    tokio::time::sleep(interval).await;
    let after = read().await?;
    Ok(between(&before, &after, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(packets: u64, real_packets: [u64; 2]) -> VipView {
        let real = |n: u8, packets: u64| crate::views::RealView {
            addr: IpAddr::from([198, 51, 100, n]),
            weight: 1,
            weight_source: crate::desired::Source::Config,
            effective_weight: Some(1),
            admin: Admin::Enabled,
            admin_source: crate::desired::Source::Config,
            healthy: true,
            resolved: true,
            unresolved_reason: None,
            mac: String::new(),
            packets,
            bytes: packets * 100,
            flows: packets / 10,
            active_flows: 3,
            table_changes: 0,
        };
        VipView {
            vip: "203.0.113.10:80/tcp".parse().expect("vip"),
            id: 1,
            scheduler: crate::model::Scheduler::Maglev,
            forward: crate::model::Forward::Dr,
            table_size: 65537,
            guarded: false,
            packets,
            bytes: packets * 100,
            flows: packets / 10,
            active_flows: 6,
            reals: vec![real(11, real_packets[0]), real(12, real_packets[1])],
        }
    }

    #[test]
    fn rates_are_the_differences_over_the_interval() {
        let before = [view(1000, [600, 400])];
        let after = [view(3000, [2600, 400])];
        let r = between(&before, &after, Duration::from_secs(2));
        let v = &r.vips[0];
        assert_eq!(
            (v.packets_per_s, v.bytes_per_s, v.flows_per_s),
            (1000.0, 100_000.0, 100.0)
        );
        assert_eq!(v.reals[0].packets_per_s, 1000.0);
        assert_eq!(v.reals[1].packets_per_s, 0.0);
        // Zeroed in between: counted from zero, never negative.
        let zeroed = [view(500, [500, 0])];
        let r = between(&after, &zeroed, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, 500.0);
        // New since the first reading: no rate yet.
        let r = between(&[], &after, Duration::from_secs(1));
        assert_eq!(r.vips[0].packets_per_s, 0.0);
    }
}
