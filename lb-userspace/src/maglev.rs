//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! Each real gets a permutation of the table's slots derived from its address;
//! reals take turns claiming their next preferred free slot until the table is
//! full. A real with twice the weight takes twice the turns. The table depends
//! only on the set of (address, weight) pairs — not on insertion order or on
//! real ids' history — so two balancers with the same configuration build the
//! same table and agree on every flow.
//!
//! The permutations are keyed hashes of the addresses. The keys are fixed
//! (part of the format), and the desired state's `hash_seed` is mixed into
//! them: seed 0, the default, gives the tables every earlier version built;
//! any other seed gives every real new permutations, so the same reals fill
//! the slots in another order. The flow hash (which slot a packet reads) is
//! not seeded.

use std::net::IpAddr;

use lb_common::REAL_NONE;
use siphasher::sip::SipHasher13;

use crate::model::addr_bytes;

/// One real as the table builder sees it.
#[derive(Clone, Copy, Debug)]
pub struct Backend {
    /// The real's address: the only input to its permutation.
    pub addr: IpAddr,
    /// Relative share of slots; 0 takes no slots.
    pub weight: u32,
    /// What the table stores for this real.
    pub id: u32,
}

/// Whether `n` is prime (table sizes must be, for the permutations to cover every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Fixed keys: changing them changes every table, so they are part of the format.
const OFFSET_KEYS: (u64, u64) = (0x786c_622d_6f66_6673, 0x6d61_676c_6576_3031);
const SKIP_KEYS: (u64, u64) = (0x786c_622d_736b_6970, 0x6d61_676c_6576_3032);

/// `keys` with `seed` mixed in: seed 0 leaves them as they are.
fn seeded(keys: (u64, u64), seed: u64) -> (u64, u64) {
    (keys.0 ^ seed, keys.1)
}

fn hash(addr: IpAddr, keys: (u64, u64)) -> u64 {
    let (bytes, family) = addr_bytes(addr);
    let mut h = SipHasher13::new_with_keys(keys.0, keys.1);
    std::hash::Hasher::write(&mut h, &[family]);
    std::hash::Hasher::write(&mut h, &bytes);
    std::hash::Hasher::finish(&h)
}

/// Builds a lookup table of `size` slots (a prime) over `backends`, with the
/// permutations of `seed` (the desired state's `hash_seed`; 0 when unset).
///
/// Returns `size` real ids; every slot holds [`REAL_NONE`] when no backend has a
/// non-zero weight.
pub fn build(backends: &[Backend], size: u32, seed: u64) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size must be prime");
    let m = u64::from(size);
    let mut table = vec![REAL_NONE; size as usize];
    let mut live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return table;
    }
    // Canonical order so the result never depends on how the caller listed them.
    live.sort_by_key(|b| addr_bytes(b.addr));
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));

    // Per backend: current position in its permutation, its skip, its credit.
    let (offset_keys, skip_keys) = (seeded(OFFSET_KEYS, seed), seeded(SKIP_KEYS, seed));
    let mut pos: Vec<u64> = live.iter().map(|b| hash(b.addr, offset_keys) % m).collect();
    let skip: Vec<u64> = live
        .iter()
        .map(|b| hash(b.addr, skip_keys) % (m - 1) + 1)
        .collect();
    let mut credit = vec![0u64; live.len()];

    let mut filled = 0u64;
    while filled < m {
        for i in 0..live.len() {
            credit[i] += u64::from(live[i].weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            // Claim this backend's next preferred slot that is still free. The
            // permutation visits every slot (m prime, 0 < skip < m), so this ends.
            loop {
                let slot = pos[i] as usize;
                pos[i] = (pos[i] + skip[i]) % m;
                if table[slot] == REAL_NONE {
                    table[slot] = live[i].id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use proptest::prelude::*;

    use super::*;

    const GOLDEN_DIGEST: u64 = 0x8cb8_47eb_2346_a2a7;
    /// The same table with `hash_seed: 7`.
    const GOLDEN_DIGEST_SEED_7: u64 = 0x2895_9a64_a6cd_8f61;

    fn reals(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i + 1)),
                weight: 1,
                id: i + 1,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for &id in table {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    #[test]
    fn every_slot_is_filled() {
        let table = build(&reals(3), 65537, 0);
        assert_eq!(table.len(), 65537);
        assert!(table.iter().all(|&id| (1..=3).contains(&id)));
    }

    #[test]
    fn no_live_backend_leaves_the_table_empty() {
        let mut b = reals(2);
        for r in &mut b {
            r.weight = 0;
        }
        assert!(build(&b, 251, 0).iter().all(|&id| id == REAL_NONE));
        assert!(build(&[], 251, 0).iter().all(|&id| id == REAL_NONE));
    }

    #[test]
    fn table_is_deterministic_and_order_independent() {
        let b = reals(10);
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(build(&b, 65537, 0), build(&reversed, 65537, 0));
    }

    #[test]
    fn spread_is_even_for_100_reals() {
        let table = build(&reals(100), 65537, 0);
        let s = shares(&table);
        assert_eq!(s.len(), 100);
        let max = *s.values().max().expect("non-empty") as f64;
        let min = *s.values().min().expect("non-empty") as f64;
        assert!(max / min <= 1.01, "max {max} min {min}");
    }

    #[test]
    fn removing_one_real_moves_few_other_slots() {
        let before_reals = reals(100);
        let before = build(&before_reals, 65537, 0);
        let removed = before_reals[42].id;
        let after = build(
            &before_reals
                .iter()
                .copied()
                .filter(|b| b.id != removed)
                .collect::<Vec<_>>(),
            65537,
            0,
        );
        let mut moved_other = 0usize;
        for (old, new) in before.iter().zip(&after) {
            assert_ne!(*new, removed, "removed real still in table");
            if *old != removed && old != new {
                moved_other += 1;
            }
        }
        let share = moved_other as f64 / before.len() as f64;
        assert!(share < 0.03, "{:.2}% of other slots moved", share * 100.0);
    }

    #[test]
    fn weights_set_slot_shares_within_one_percent() {
        let mut b = reals(4);
        for (r, w) in b.iter_mut().zip([1, 2, 3, 4]) {
            r.weight = w;
        }
        let table = build(&b, 65537, 0);
        let s = shares(&table);
        for r in &b {
            let got = s[&r.id] as f64 / 65537.0;
            let want = f64::from(r.weight) / 10.0;
            assert!(
                (got - want).abs() < 0.01,
                "real {} got {got} want {want}",
                r.id
            );
        }
    }

    /// FNV-1a over a table: a stable digest that needs no dependency.
    fn digest(table: &[u32]) -> u64 {
        table.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, id| {
            (h ^ u64::from(*id)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// The table for a fixed set of reals is pinned here: two balancers (or two
    /// builds, or two processes) with the same configuration must build the same
    /// table, or flows split between them behind ECMP would change reals. Seed 0
    /// (no `hash_seed`) is the table of every earlier version.
    #[test]
    fn table_is_the_same_in_every_process_and_build() {
        let mut b = reals(5);
        b[2].weight = 3;
        let d = digest(&build(&b, 4099, 0));
        assert_eq!(d, GOLDEN_DIGEST, "the Maglev table changed: {d:#x}");
        let d = digest(&build(&b, 4099, 7));
        assert_eq!(
            d, GOLDEN_DIGEST_SEED_7,
            "the table of hash_seed 7 changed: {d:#x}"
        );
    }

    /// Another seed puts the same reals in other slots (about as many slots
    /// change as a random reshuffle would), with the same shares, and the
    /// table still depends only on the reals and the seed.
    #[test]
    fn a_seed_reshuffles_the_slots_and_keeps_the_shares() {
        let b = reals(3);
        let plain = build(&b, 65537, 0);
        let mut reversed = b.clone();
        reversed.reverse();
        for seed in [1, 7, u64::MAX] {
            let seeded = build(&b, 65537, seed);
            assert_eq!(seeded, build(&reversed, 65537, seed), "seed {seed}");
            let moved = plain.iter().zip(&seeded).filter(|(a, b)| a != b).count();
            // Three reals: a random reassignment moves two thirds of the slots.
            let share = moved as f64 / plain.len() as f64;
            assert!(
                (0.6..0.73).contains(&share),
                "seed {seed}: {:.1}% of the slots moved",
                share * 100.0
            );
            let s = shares(&seeded);
            let (max, min) = (s.values().max(), s.values().min());
            assert!(
                max.zip(min)
                    .is_some_and(|(max, min)| *max as f64 / *min as f64 <= 1.01),
                "seed {seed}: {s:?}"
            );
        }
        assert_ne!(build(&b, 65537, 1), build(&b, 65537, 2));
    }

    #[test]
    fn primes_are_recognised() {
        assert!(is_prime(65537) && is_prime(251) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }

    #[test]
    fn weights_scaled_alike_build_the_same_table() {
        // Slow start puts a VIP's weights in hundredths while a real ramps;
        // when it ends, the plain weights must give back the same table.
        let mut b = reals(7);
        for (i, r) in b.iter_mut().enumerate() {
            r.weight = 1 + i as u32 % 3;
        }
        let plain = build(&b, 4099, 0);
        for r in &mut b {
            r.weight *= 100;
        }
        assert_eq!(build(&b, 4099, 0), plain);
    }

    proptest! {
        #[test]
        fn any_backend_set_fills_every_slot_with_a_member(n in 1u32..40, size_idx in 0usize..3) {
            let size = [251u32, 1009, 4099][size_idx];
            let b = reals(n);
            let table = build(&b, size, 0);
            prop_assert!(table.iter().all(|&id| id >= 1 && id <= n));
        }
    }
}
