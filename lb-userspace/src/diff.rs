//! What changes between two desired states, VIP by VIP and real by real:
//! `xlb apply --dry-run` prints it, the reconcile step logs it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    desired::{Desired, RealSpec, ServiceSpec},
    health::HealthCheck,
    model::Vip,
};

/// What happened to a VIP or a real.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// It is new.
    Added,
    /// It is gone.
    Removed,
    /// Some of its settings differ.
    Changed,
}

/// One VIP or real that differs, or the `hash_seed` (no VIP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Added, removed or changed.
    pub action: Action,
    /// The VIP; absent for the `hash_seed`, which is the whole state's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Vip>,
    /// The real, when the change is a real's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real: Option<IpAddr>,
    /// Added: its settings (`weight 1`); removed: what it had; changed: each
    /// setting that differs as `name old -> new`.
    pub details: Vec<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = match self.action {
            Action::Added => '+',
            Action::Removed => '-',
            Action::Changed => '~',
        };
        match (self.vip, self.real) {
            (Some(vip), Some(real)) => write!(f, "{sign} real {real} of {vip}")?,
            (Some(vip), None) => write!(f, "{sign} VIP {vip}")?,
            (None, _) => return write!(f, "{sign} {}", self.details.join("; ")),
        }
        if self.details.is_empty() {
            return Ok(());
        }
        match self.action {
            Action::Changed => write!(f, ": {}", self.details.join("; ")),
            Action::Added | Action::Removed => write!(f, " ({})", self.details.join(", ")),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Settings lists formatted on this thread (a test counts them: a change
    /// of one real must not format the settings of every real).
    static FORMATTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts one settings list formatted (tests only).
fn formatted() {
    #[cfg(test)]
    FORMATTED.set(FORMATTED.get() + 1);
}

fn vip_settings(s: &ServiceSpec) -> Vec<(String, String)> {
    formatted();
    let mut out = vec![
        ("forward".to_owned(), s.options.forward.to_string()),
        ("scheduler".to_owned(), s.options.scheduler.to_string()),
        ("table_size".to_owned(), s.options.table_size.to_string()),
    ];
    out.extend(check_settings(s.health.as_ref()));
    out
}

fn real_settings(r: &RealSpec) -> Vec<(String, String)> {
    formatted();
    let mut out = vec![
        ("weight".to_owned(), r.weight.to_string()),
        ("admin".to_owned(), r.admin.to_string()),
    ];
    out.extend(check_settings(r.health.as_ref()));
    out
}

/// A health check as `health_check.FIELD value` pairs (kind `none` when there
/// is none), so that a change names the fields that differ.
fn check_settings(check: Option<&HealthCheck>) -> Vec<(String, String)> {
    let none = || vec![("health_check.kind".to_owned(), "none".to_owned())];
    let Some(check) = check else {
        return none();
    };
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(check) else {
        return none();
    };
    fields
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("health_check.{k}"), v)
        })
        .collect()
}

/// `name old -> new` for every setting that differs (`unset` where one side
/// has no such setting).
fn differences(old: &[(String, String)], new: &[(String, String)]) -> Vec<String> {
    let get = |list: &[(String, String)], key: &str| {
        list.iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| "unset".to_owned(), |(_, v)| v.clone())
    };
    let mut keys: Vec<&String> = old.iter().chain(new).map(|(k, _)| k).collect();
    keys.dedup();
    let mut seen = std::collections::BTreeSet::new();
    keys.into_iter()
        .filter(|k| seen.insert(k.as_str()))
        .filter_map(|k| {
            let (a, b) = (get(old, k), get(new, k));
            (a != b).then(|| format!("{k} {a} -> {b}"))
        })
        .collect()
}

/// The settings of an added or removed VIP or real; of a health check, only its kind.
fn listed(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .filter_map(|(k, v)| match k.strip_prefix("health_check.") {
            Some("kind") => Some(format!("health_check {v}")),
            Some(_) => None,
            None => Some(format!("{k} {v}")),
        })
        .collect()
}

/// Every VIP and real that differs from `old` to `new`: the `hash_seed`
/// first, then removals, then additions and changes, in VIP and real order.
/// Only what differs is formatted: the reconcile step diffs the whole
/// desired state at every change, and equal services and reals (nearly all
/// of them) cost a comparison each.
pub fn diff(old: &Desired, new: &Desired) -> Vec<Change> {
    let mut out = Vec::new();
    if old.hash_seed != new.hash_seed {
        let seed = |s: u64| {
            if s == 0 {
                "unset".to_owned()
            } else {
                s.to_string()
            }
        };
        out.push(Change {
            action: Action::Changed,
            vip: None,
            real: None,
            details: vec![format!(
                "hash_seed {} -> {}: every Maglev table is rebuilt, new flows may go to other \
                 reals (tracked flows keep theirs)",
                seed(old.hash_seed),
                seed(new.hash_seed)
            )],
        });
    }
    let change = |action, vip: &Vip, real, details| Change {
        action,
        vip: Some(*vip),
        real,
        details,
    };
    for (vip, s) in &old.services {
        if !new.services.contains_key(vip) {
            out.push(change(Action::Removed, vip, None, listed(&vip_settings(s))));
        }
    }
    for (vip, s) in &new.services {
        let Some(o) = old.services.get(vip) else {
            out.push(change(Action::Added, vip, None, listed(&vip_settings(s))));
            for (real, r) in &s.reals {
                let details = listed(&real_settings(r));
                out.push(change(Action::Added, vip, Some(*real), details));
            }
            continue;
        };
        if o == s {
            continue;
        }
        let vip_changes = differences(&vip_settings(o), &vip_settings(s));
        if !vip_changes.is_empty() {
            out.push(change(Action::Changed, vip, None, vip_changes));
        }
        for (real, r) in &o.reals {
            if !s.reals.contains_key(real) {
                let details = listed(&real_settings(r));
                out.push(change(Action::Removed, vip, Some(*real), details));
            }
        }
        for (real, r) in &s.reals {
            let (action, details) = match o.reals.get(real) {
                None => (Action::Added, listed(&real_settings(r))),
                Some(p) if p == r => continue,
                Some(p) => (
                    Action::Changed,
                    differences(&real_settings(p), &real_settings(r)),
                ),
            };
            if action == Action::Added || !details.is_empty() {
                out.push(change(action, vip, Some(*real), details));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        desired::{Admin, VipOptions},
        health::ProbeKind,
        model::Scheduler,
    };

    fn vip(s: &str) -> Vip {
        s.parse().expect("vip")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn two_reals() -> Desired {
        let mut d = Desired::default();
        let mut s = ServiceSpec::default();
        s.reals.insert(ip("198.51.100.11"), RealSpec::default());
        s.reals.insert(ip("198.51.100.12"), RealSpec::default());
        d.services.insert(vip("203.0.113.10:80/tcp"), s);
        d
    }

    #[test]
    fn every_difference_names_what_changed_from_what() {
        let old = two_reals();
        let mut new = old.clone();
        let v = vip("203.0.113.10:80/tcp");
        let s = new.services.get_mut(&v).expect("vip");
        s.options.scheduler = Scheduler::MaglevSrc;
        s.options.table_size = 251;
        s.health = Some(HealthCheck {
            kind: ProbeKind::Tcp,
            interval_ms: 500,
            ..HealthCheck::default()
        });
        s.reals.get_mut(&ip("198.51.100.11")).expect("real").weight = 7;
        s.reals.get_mut(&ip("198.51.100.12")).expect("real").admin = Admin::Drain;
        s.reals.insert(ip("198.51.100.13"), RealSpec::default());
        new.services.insert(
            vip("203.0.113.11:53/udp"),
            ServiceSpec {
                options: VipOptions::default(),
                ..ServiceSpec::default()
            },
        );
        let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert!(
            lines[0].starts_with(
                "~ VIP 203.0.113.10:80/tcp: scheduler maglev -> maglev-src; table_size 65537 -> 251; "
            ),
            "{}",
            lines[0]
        );
        for part in [
            "; health_check.kind none -> tcp",
            "; health_check.interval_ms unset -> 500",
            "; health_check.path unset -> /",
        ] {
            assert!(lines[0].contains(part), "{part:?} not in {}", lines[0]);
        }
        assert_eq!(
            lines[1..],
            [
                "~ real 198.51.100.11 of 203.0.113.10:80/tcp: weight 1 -> 7",
                "~ real 198.51.100.12 of 203.0.113.10:80/tcp: admin enabled -> drain",
                "+ real 198.51.100.13 of 203.0.113.10:80/tcp (weight 1, admin enabled, \
                 health_check none)",
                "+ VIP 203.0.113.11:53/udp (forward dr, scheduler maglev, table_size 65537, \
                 health_check none)",
            ]
        );
        let removed: Vec<String> = diff(&new, &old).iter().map(ToString::to_string).collect();
        assert_eq!(
            removed[0],
            "- VIP 203.0.113.11:53/udp (forward dr, scheduler maglev, table_size 65537, \
             health_check none)"
        );
        assert!(
            removed.contains(
                &"- real 198.51.100.13 of 203.0.113.10:80/tcp (weight 1, admin enabled, \
              health_check none)"
                    .to_owned()
            )
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn one_changed_real_formats_only_that_real_s_settings() {
        let mut old = Desired::default();
        for v in 1..=100u8 {
            let mut s = ServiceSpec::default();
            for r in 11..=20u8 {
                s.reals
                    .insert(IpAddr::from([198, 51, 100, r]), RealSpec::default());
            }
            old.services
                .insert(vip(&format!("203.0.113.{v}:80/tcp")), s);
        }
        let mut new = old.clone();
        let v = vip("203.0.113.50:80/tcp");
        new.services
            .get_mut(&v)
            .and_then(|s| s.reals.get_mut(&ip("198.51.100.11")))
            .expect("real")
            .weight = 2;
        FORMATTED.set(0);
        let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            ["~ real 198.51.100.11 of 203.0.113.50:80/tcp: weight 1 -> 2"]
        );
        // Its VIP's settings on both sides and the real's on both sides.
        assert_eq!(
            FORMATTED.get(),
            4,
            "settings formatted for unchanged entries"
        );
        FORMATTED.set(0);
        assert!(diff(&new, &new).is_empty());
        assert_eq!(FORMATTED.get(), 0);
    }

    #[test]
    fn a_new_hash_seed_comes_first_and_says_what_it_does() {
        let old = two_reals();
        let mut new = old.clone();
        new.hash_seed = 7;
        new.services
            .get_mut(&vip("203.0.113.10:80/tcp"))
            .and_then(|s| s.reals.get_mut(&ip("198.51.100.11")))
            .expect("real")
            .weight = 2;
        let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "~ hash_seed unset -> 7: every Maglev table is rebuilt, new flows may go to \
                 other reals (tracked flows keep theirs)",
                "~ real 198.51.100.11 of 203.0.113.10:80/tcp: weight 1 -> 2",
            ]
        );
        let json = serde_json::to_value(&diff(&old, &new)[0]).expect("json");
        assert_eq!(json["action"], "changed");
        assert!(json.get("vip").is_none(), "{json}");
        let back = diff(&new, &old);
        assert!(back[0].to_string().starts_with("~ hash_seed 7 -> unset: "));
    }
}
