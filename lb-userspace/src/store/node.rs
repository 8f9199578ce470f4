//! What each node reports under `PREFIX/nodes/NAME` (a JSON value bound to
//! the node's lease), the table fingerprint, the fleet's health rule, and
//! the flags `xlb fleet` puts on nodes that differ.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;

use crate::{
    controller::Snapshot,
    maglev::{self, Backend},
    model::{Vip, addr_bytes},
};

/// One (VIP, real) health verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The VIP.
    pub vip: Vip,
    /// The real.
    pub real: IpAddr,
    /// Whether this node's probes see it up.
    pub up: bool,
}

/// The value of `PREFIX/nodes/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The node's name.
    pub name: String,
    /// The addresses of its balancing interface.
    pub addresses: Vec<IpAddr>,
    /// The revision of the desired state it applied (0: none).
    pub revision: i64,
    /// Why it could not apply the newest revision, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fingerprint of each VIP's live Maglev table (16 hex digits).
    pub tables: BTreeMap<Vip, String>,
    /// Its own probes' verdicts.
    pub verdicts: Vec<Verdict>,
    /// Seconds since the epoch of this report.
    pub updated: u64,
    /// Where its flow sync receives (`--sync-advertise`, else
    /// `--sync-listen`): the other nodes take it as a peer. Absent without
    /// flow sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SocketAddr>,
}

/// The flow sync addresses the live nodes other than `own` publish.
pub fn sync_peers(nodes: &BTreeMap<String, Report>, own: &str) -> BTreeMap<String, SocketAddr> {
    nodes
        .iter()
        .filter(|(name, _)| *name != own)
        .filter_map(|(name, r)| r.sync.map(|a| (name.clone(), a)))
        .collect()
}

/// Fingerprint of one Maglev table (reals and weights, size, `hash_seed`): a
/// hash of the address in each slot, in slot order (slot ids and real ids
/// play no part, so two nodes agree exactly when they send every hash value
/// to the same real).
pub fn fingerprint(table: &BTreeMap<IpAddr, u32>, size: u32, seed: u64) -> String {
    let addrs: Vec<IpAddr> = table.keys().copied().collect();
    let backends: Vec<Backend> = table
        .iter()
        .enumerate()
        .map(|(i, (addr, weight))| Backend {
            addr: *addr,
            weight: *weight,
            id: u32::try_from(i).unwrap_or(u32::MAX),
        })
        .collect();
    let mut h = SipHasher13::new_with_keys(0, 0);
    for id in maglev::build(&backends, size, seed) {
        match addrs.get(id as usize) {
            Some(addr) => {
                let (bytes, family) = addr_bytes(*addr);
                std::hash::Hasher::write(&mut h, &[family]);
                std::hash::Hasher::write(&mut h, &bytes);
            }
            None => std::hash::Hasher::write(&mut h, &[0xff]),
        }
    }
    format!("{:016x}", std::hash::Hasher::finish(&h))
}

/// Fingerprints of every VIP of `snap`, reusing `cache` for tables whose
/// inputs did not change (building a table costs about a millisecond).
pub fn fingerprints(snap: &Snapshot, cache: &mut FingerprintCache) -> BTreeMap<Vip, String> {
    let mut out = BTreeMap::new();
    let mut next = BTreeMap::new();
    for v in &snap.vips {
        let table: BTreeMap<IpAddr, u32> = v
            .reals
            .iter()
            .filter_map(|r| r.effective_weight.map(|w| (r.addr, w)))
            .collect();
        let (size, seed) = (v.options.table_size, v.hash_seed);
        let fp = match cache.0.remove(&v.vip) {
            Some(c) if c.table == table && c.size == size && c.seed == seed => c.fingerprint,
            _ => fingerprint(&table, size, seed),
        };
        out.insert(v.vip, fp.clone());
        next.insert(
            v.vip,
            Cached {
                table,
                size,
                seed,
                fingerprint: fp,
            },
        );
    }
    cache.0 = next;
    out
}

/// The inputs and fingerprint of each VIP's table, last time.
#[derive(Default)]
pub struct FingerprintCache(BTreeMap<Vip, Cached>);

/// One VIP's table inputs and its fingerprint.
struct Cached {
    table: BTreeMap<IpAddr, u32>,
    size: u32,
    seed: u64,
    fingerprint: String,
}

/// The fleet's health view: for every (VIP, real) this node probes, down
/// when a strict majority of the live nodes that probe it see it down.
/// `own` is this node's verdicts (fresher than its published report);
/// `others` the other live nodes' reports.
pub fn fleet_view<'a>(
    own: &BTreeMap<(Vip, IpAddr), bool>,
    others: impl Iterator<Item = &'a Report>,
) -> BTreeMap<(Vip, IpAddr), bool> {
    let mut votes: BTreeMap<(Vip, IpAddr), (u32, u32)> = own
        .iter()
        .map(|(k, up)| (*k, (1, u32::from(!*up))))
        .collect();
    for r in others {
        for v in &r.verdicts {
            if let Some((n, down)) = votes.get_mut(&(v.vip, v.real)) {
                *n += 1;
                *down += u32::from(!v.up);
            }
        }
    }
    votes
        .into_iter()
        .map(|(k, (n, down))| (k, 2 * down <= n))
        .collect()
}

/// How a node differs from the rest of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Differs {
    /// Its revision is not the one most nodes applied.
    pub revision: bool,
    /// VIPs whose table differs from most nodes' (or that it lacks or has alone).
    pub tables: Vec<Vip>,
}

/// The most common value (ties: the greatest, so every node picks the same).
fn mode<T: Ord + Clone>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(v, _)| v)
}

/// For each node, how it differs from the majority of the fleet.
pub fn differences(nodes: &BTreeMap<String, Report>) -> BTreeMap<String, Differs> {
    let revision = mode(nodes.values().map(|r| r.revision));
    let vips: BTreeSet<Vip> = nodes
        .values()
        .flat_map(|r| r.tables.keys())
        .copied()
        .collect();
    let tables: BTreeMap<Vip, Option<String>> = vips
        .iter()
        .map(|vip| {
            (
                *vip,
                mode(nodes.values().map(|r| r.tables.get(vip).cloned())).flatten(),
            )
        })
        .collect();
    nodes
        .iter()
        .map(|(name, r)| {
            let d = Differs {
                revision: Some(r.revision) != revision,
                tables: tables
                    .iter()
                    .filter(|(vip, fp)| r.tables.get(vip) != fp.as_ref())
                    .map(|(vip, _)| *vip)
                    .collect(),
            };
            (name.clone(), d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip() -> Vip {
        "203.0.113.10:80/tcp".parse().expect("VIP")
    }

    fn ip(l: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, l])
    }

    fn report(name: &str, down: &[u8]) -> Report {
        Report {
            name: name.into(),
            verdicts: [11, 12, 13]
                .iter()
                .map(|l| Verdict {
                    vip: vip(),
                    real: ip(*l),
                    up: !down.contains(l),
                })
                .collect(),
            ..Report::default()
        }
    }

    #[test]
    fn a_real_is_out_only_when_a_majority_of_live_nodes_see_it_down() {
        let own: BTreeMap<(Vip, IpAddr), bool> = [11, 12, 13]
            .iter()
            .map(|l| ((vip(), ip(*l)), *l != 11))
            .collect();
        // Alone: its own verdicts.
        let view = fleet_view(&own, std::iter::empty());
        assert!(!view[&(vip(), ip(11))] && view[&(vip(), ip(12))]);
        // One of three sees 11 down: in.
        let (b, c) = (report("b", &[]), report("c", &[]));
        let view = fleet_view(&own, [&b, &c].into_iter());
        assert!(view[&(vip(), ip(11))], "{view:?}");
        // Two of three: out everywhere, also on a node that sees it up.
        let b = report("b", &[11]);
        assert!(!fleet_view(&own, [&b, &c].into_iter())[&(vip(), ip(11))]);
        let own_up: BTreeMap<(Vip, IpAddr), bool> = own.keys().map(|k| (*k, true)).collect();
        let a = report("a", &[11]);
        assert!(!fleet_view(&own_up, [&a, &b].into_iter())[&(vip(), ip(11))]);
        // Two nodes, one down: a tie is not a majority.
        assert!(fleet_view(&own_up, [&a].into_iter())[&(vip(), ip(11))]);
    }

    #[test]
    fn fingerprints_follow_the_addresses_not_the_ids() {
        let t = BTreeMap::from([(ip(11), 1), (ip(12), 1), (ip(13), 2)]);
        let fp = fingerprint(&t, 251, 0);
        assert_eq!(fp, fingerprint(&t.clone(), 251, 0));
        assert_eq!(fp.len(), 16);
        let mut other = t.clone();
        other.insert(ip(13), 1);
        assert_ne!(fp, fingerprint(&other, 251, 0));
        assert_ne!(fp, fingerprint(&t, 257, 0));
        assert_ne!(fp, fingerprint(&t, 251, 7), "the seed moves the reals");
    }

    #[test]
    fn the_node_off_the_majority_is_flagged() {
        let mut nodes = BTreeMap::new();
        for (name, rev, fp) in [("a", 7, "x"), ("b", 7, "x"), ("c", 6, "y")] {
            let r = Report {
                name: name.into(),
                revision: rev,
                tables: BTreeMap::from([(vip(), fp.to_owned())]),
                ..Report::default()
            };
            nodes.insert(name.to_owned(), r);
        }
        let d = differences(&nodes);
        assert_eq!(d["a"], Differs::default());
        assert_eq!(
            d["c"],
            Differs {
                revision: true,
                tables: vec![vip()]
            }
        );
    }
}
