//! Which reals go into a VIP's Maglev table, and with what weight: the
//! operator's say, health verdicts and the avalanche guard.
//!
//! - A real that is disabled or not resolved yet (no MAC) is not in the table
//!   and has no live slot.
//! - A drained real, or one of weight 0, is in with weight 0: no new flows,
//!   its tracked flows stay.
//! - The other reals **can serve**. A healthy one is in with its weight; an
//!   unhealthy one with weight 0, unless the guard holds.
//! - The **avalanche guard** never lets health checks take a VIP below
//!   `needed = max(1, ceil(min_healthy × servable))` healthy reals: below it,
//!   health is ignored for that VIP and every real that can serve stays in.
//!   Once on, it stays on until `min(needed + 1, servable)` reals are healthy
//!   (hysteresis: a real that flaps at the threshold does not flip the table).
//! - **Slow start**: a real in slow start has a percent of its weight. While
//!   one real of a VIP ramps, every weight of the VIP's table is in
//!   hundredths (weight × 100, the ramping real's weight × percent), so a
//!   weight-1 real can take 1% of a weight-1 real's share. Maglev shares
//!   depend only on weight ratios: once the ramp ends and the weights are
//!   plain again, the table is the one it was before.

use std::{collections::BTreeMap, net::IpAddr};

use crate::desired::Admin;

/// What the plan needs to know of one real.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealInput {
    /// The real.
    pub addr: IpAddr,
    /// Its weight.
    pub weight: u32,
    /// The operator's state.
    pub admin: Admin,
    /// Whether its MAC (or next hop's) is known.
    pub resolved: bool,
    /// Its health verdict (true when not probed).
    pub healthy: bool,
    /// Percent of its weight it has (slow start), 1..=100.
    pub ramp: u32,
}

impl RealInput {
    /// Whether the real needs a live slot: tracked flows can reach it.
    pub fn live(&self) -> bool {
        self.resolved && self.admin != Admin::Disabled
    }

    /// Whether the real can take new flows, health aside.
    pub fn servable(&self) -> bool {
        self.live() && self.admin == Admin::Enabled && self.weight > 0
    }
}

/// A VIP's table membership and whether the guard holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights {
    /// Effective weight of every real with a live slot.
    pub table: BTreeMap<IpAddr, u32>,
    /// Whether the avalanche guard ignores health for this VIP.
    pub guarded: bool,
    /// Reals that can serve.
    pub servable: usize,
    /// Of those, the healthy ones.
    pub healthy: usize,
}

/// The table of one VIP. `was_guarded` is the guard's state before.
pub fn weights(reals: &[RealInput], min_healthy: f64, was_guarded: bool) -> Weights {
    let servable = reals.iter().filter(|r| r.servable()).count();
    let healthy = reals.iter().filter(|r| r.servable() && r.healthy).count();
    let guarded = if servable == 0 {
        false
    } else {
        let needed = ((min_healthy.clamp(0.0, 1.0) * servable as f64).ceil() as usize).max(1);
        if was_guarded {
            healthy < (needed + 1).min(servable)
        } else {
            healthy < needed
        }
    };
    let serving = |r: &RealInput| r.servable() && (r.healthy || guarded);
    let ramping = reals.iter().any(|r| serving(r) && r.ramp < 100);
    let table = reals
        .iter()
        .filter(|r| r.live())
        .map(|r| {
            let w = match (serving(r), ramping) {
                (false, _) => 0,
                (true, false) => r.weight,
                (true, true) => (r.weight * r.ramp.clamp(1, 100)).max(1),
            };
            (r.addr, w)
        })
        .collect();
    Weights {
        table,
        guarded,
        servable,
        healthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(last: u8, admin: Admin, weight: u32, healthy: bool) -> RealInput {
        RealInput {
            addr: IpAddr::from([198, 51, 100, last]),
            weight,
            admin,
            resolved: true,
            healthy,
            ramp: 100,
        }
    }

    fn serving(w: &Weights) -> usize {
        w.table.values().filter(|w| **w > 0).count()
    }

    #[test]
    fn drained_reals_do_not_count_and_health_never_empties_the_service() {
        // 2 enabled + 2 drained, both enabled ones fail their check.
        let reals = [
            real(11, Admin::Enabled, 1, false),
            real(12, Admin::Enabled, 1, false),
            real(13, Admin::Drain, 1, true),
            real(14, Admin::Drain, 1, true),
        ];
        let w = weights(&reals, 0.5, false);
        assert!(w.guarded, "{w:?}");
        assert_eq!((w.servable, w.healthy), (2, 0));
        assert_eq!(serving(&w), 2, "the two enabled reals stay in: {w:?}");
        // Even with no threshold at all, health never takes the last real out.
        let w = weights(&reals, 0.0, false);
        assert!(w.guarded);
        assert_eq!(serving(&w), 2);
    }

    #[test]
    fn the_guard_engages_below_the_threshold_and_releases_with_one_real_to_spare() {
        let at = |down: &[u8], was| {
            let reals: Vec<RealInput> = (11..15)
                .map(|l| real(l, Admin::Enabled, 1, !down.contains(&l)))
                .collect();
            weights(&reals, 0.5, was)
        };
        // 2 of 4 healthy: needed = 2, honoured.
        let w = at(&[11, 12], false);
        assert!(!w.guarded);
        assert_eq!(serving(&w), 2);
        // 1 of 4: the guard keeps all four in.
        let w = at(&[11, 12, 13], false);
        assert!(w.guarded);
        assert_eq!(serving(&w), 4);
        // Back to 2 of 4: still guarded (needs 3 to release).
        let w = at(&[11, 12], true);
        assert!(w.guarded, "released without a spare real: {w:?}");
        assert_eq!(serving(&w), 4);
        // 3 of 4: released; the one down leaves.
        let w = at(&[11], true);
        assert!(!w.guarded);
        assert_eq!(serving(&w), 3);
    }

    #[test]
    fn disabled_and_unresolved_reals_are_out_and_drained_ones_get_zero() {
        let mut unresolved = real(14, Admin::Enabled, 1, true);
        unresolved.resolved = false;
        let reals = [
            real(11, Admin::Enabled, 5, true),
            real(12, Admin::Drain, 5, true),
            real(13, Admin::Disabled, 5, true),
            unresolved,
        ];
        let w = weights(&reals, 0.5, false);
        let want: BTreeMap<IpAddr, u32> = [
            (IpAddr::from([198, 51, 100, 11]), 5),
            (IpAddr::from([198, 51, 100, 12]), 0),
        ]
        .into();
        assert_eq!(w.table, want);
        assert!(!w.guarded);
    }

    #[test]
    fn a_ramping_real_gets_its_percent_in_hundredths_and_plain_weights_come_back() {
        let mut reals = [
            real(11, Admin::Enabled, 1, true),
            real(12, Admin::Enabled, 2, true),
            real(13, Admin::Enabled, 1, true),
            real(14, Admin::Drain, 1, true),
        ];
        reals[2].ramp = 10;
        let w = weights(&reals, 0.5, false);
        let at = |l: u8| w.table[&IpAddr::from([198, 51, 100, l])];
        assert_eq!((at(11), at(12), at(13), at(14)), (100, 200, 10, 0));
        // A ramp of a real that does not serve (down) scales nothing.
        reals[2].healthy = false;
        let w = weights(&reals, 0.5, false);
        let at = |l: u8| w.table[&IpAddr::from([198, 51, 100, l])];
        assert_eq!((at(11), at(12), at(13)), (1, 2, 0));
        reals[2].healthy = true;
        reals[2].ramp = 100;
        let w = weights(&reals, 0.5, false);
        let at = |l: u8| w.table[&IpAddr::from([198, 51, 100, l])];
        assert_eq!((at(11), at(12), at(13)), (1, 2, 1));
    }
}
