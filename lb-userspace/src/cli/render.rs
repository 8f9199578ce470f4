//! How the CLI prints what the daemon answers.

use serde::Serialize;

use crate::{
    api::{RealHealth, Stats, Status, VipStatus},
    controller::ReloadOutcome,
    desired::Source,
    model::Vip,
    views::{RealView, VipView},
};

use super::rate::Rates;

/// `secs` (Unix time) as an HTTP date, e.g. `Mon, 30 Nov 2026 07:08:18 GMT`.
fn date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// The health word of a real: `-` (not probed), `pending`, `up` or `DOWN`.
fn health_word(h: Option<&RealHealth>) -> String {
    match h.map(|h| (h.check.as_str(), h.status.as_ref())) {
        Some(("none", _)) | None => "-".to_owned(),
        Some((_, None)) => "pending".to_owned(),
        // Slow start: the share of its weight the real has so far.
        Some((_, Some(s))) if s.up => match h.and_then(|h| h.slow_start) {
            Some(percent) => format!("up {percent}%"),
            None => "up".to_owned(),
        },
        Some((_, Some(_))) => "DOWN".to_owned(),
    }
}

fn marked(value: String, source: Source) -> String {
    match source {
        Source::Config => value,
        Source::Override => format!("{value}*"),
    }
}

/// `xlb vip list`, `xlb real list`.
pub fn vips(vips: &[VipView]) {
    if vips.is_empty() {
        println!("no virtual services");
        return;
    }
    for v in vips {
        println!(
            "{}  forward={} scheduler={} table={}  packets={} bytes={} flows={} active={}{}",
            v.vip,
            v.forward,
            v.scheduler,
            v.table_size,
            v.packets,
            v.bytes,
            v.flows,
            v.active_flows,
            if v.guarded { "  AVALANCHE GUARD" } else { "" }
        );
        if v.reals.is_empty() {
            println!("  (no reals: packets are dropped and counted as drop_no_real)");
        }
        for r in &v.reals {
            let mac = if r.resolved {
                r.mac.clone()
            } else {
                "unresolved".to_owned()
            };
            println!(
                "  -> {:<40} weight={:<6} admin={:<9} mac={}  packets={} bytes={} flows={} active={}",
                r.addr,
                marked(r.weight.to_string(), r.weight_source),
                marked(r.admin.to_string(), r.admin_source),
                mac,
                r.packets,
                r.bytes,
                r.flows,
                r.active_flows
            );
        }
    }
}

/// The last reload as one line.
fn reload_line(r: &ReloadOutcome) -> String {
    if r.successful {
        return format!("last reload: ok at {} ({})", date(r.at), r.source);
    }
    let success = r.last_success_at.map_or_else(|| "never".to_owned(), date);
    format!(
        "last reload: FAILED at {} ({}): {}; the running state is the one loaded at {success}",
        date(r.at),
        r.source,
        r.error.as_deref().unwrap_or("unknown error")
    )
}

/// `xlb status` (every VIP), `xlb real list VIP` (`only` that VIP).
pub fn status(status: &Status, only: Option<Vip>) {
    if only.is_none() {
        println!(
            "interface {}   reconciles {}   conntrack {}/{}",
            status.iface, status.reconciles, status.conntrack.entries, status.conntrack.capacity
        );
        if let Some(store) = &status.store {
            println!("{}", store_line(store));
        }
        if let Some(r) = &status.last_reload {
            println!("{}", reload_line(r));
        }
        if let Some(at) = status.zeroed_at {
            println!("counters since {} (xlb stats --zero)", date(at));
        }
        if status.vips.is_empty() {
            println!("no virtual services");
            return;
        }
    }
    let mut overrides = false;
    let mut unresolved = Vec::new();
    for v in status
        .vips
        .iter()
        .filter(|v| only.is_none_or(|o| o == v.view.vip))
    {
        let view = &v.view;
        if only.is_none() {
            println!();
        }
        println!(
            "{}  {} {} table {}{}   packets {}  bytes {}  new flows {}  active {}",
            view.vip,
            view.forward,
            view.scheduler,
            view.table_size,
            if view.guarded {
                "  [AVALANCHE GUARD: health ignored]"
            } else {
                ""
            },
            view.packets,
            view.bytes,
            view.flows,
            view.active_flows
        );
        println!(
            "  {:<28} {:>7} {:>6} {:<10} {:<8} {:<8} {:>5} {:>10} {:>12} {:>9} {:>7}",
            "real",
            "weight",
            "in use",
            "admin",
            "resolved",
            "health",
            "flaps",
            "packets",
            "bytes",
            "flows",
            "active"
        );
        let mut errors = Vec::new();
        for r in &view.reals {
            overrides |= r.weight_source == Source::Override || r.admin_source == Source::Override;
            let h = v.health.iter().find(|h| h.addr == r.addr);
            let flaps = h
                .and_then(|h| h.status.as_ref())
                .map_or_else(|| "-".to_owned(), |s| s.flaps.to_string());
            if let Some(e) = h
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.last_error.as_ref())
            {
                errors.push(format!("{}: {e}", r.addr));
            }
            if let Some(why) = &r.unresolved_reason {
                unresolved.push(format!("{} of {}: {why}", r.addr, view.vip));
            }
            println!(
                "  {:<28} {:>7} {:>6} {:<10} {:<8} {:<8} {:>5} {:>10} {:>12} {:>9} {:>7}",
                r.addr.to_string(),
                marked(r.weight.to_string(), r.weight_source),
                r.effective_weight
                    .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                marked(r.admin.to_string(), r.admin_source),
                if r.resolved { "yes" } else { "NO" },
                health_word(h),
                flaps,
                r.packets,
                r.bytes,
                r.flows,
                r.active_flows
            );
        }
        if !errors.is_empty() {
            println!("  last probe errors:");
            for e in errors {
                println!("    {e}");
            }
        }
    }
    if overrides {
        println!();
        println!(
            "* set by hand (override): survives reloads; `xlb real reset-override VIP REAL` removes it"
        );
    }
    if !unresolved.is_empty() {
        println!();
        println!("unresolved reals (out of the tables until they answer):");
        for line in unresolved {
            println!("  {line}");
        }
    }
}

/// The health word of every (VIP, real) of `status` (`xlb top`).
pub fn real_health(status: &Status) -> std::collections::BTreeMap<(Vip, std::net::IpAddr), String> {
    status
        .vips
        .iter()
        .flat_map(|v| {
            v.health
                .iter()
                .map(move |h| ((v.view.vip, h.addr), health_word(Some(h))))
        })
        .collect()
}

/// One real of `xlb real list --json`: its view and its health.
#[derive(Serialize)]
pub struct RealListed<'a> {
    /// The real, its weights, admin state, sources and counters.
    #[serde(flatten)]
    pub view: &'a RealView,
    /// `up` (`up N%` during slow start), `DOWN`, `pending` or `-` (not probed).
    pub health: String,
    /// The probe kind, or `none`.
    pub check: &'a str,
    /// How a `tcp` check probes: `connect` or `syn` (absent for other kinds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::health::TcpMode>,
    /// Where probes go: `real` or `vip` (through the forwarding path).
    pub via: crate::health::Via,
    /// The last probe failure, in full.
    pub last_error: Option<&'a str>,
}

/// The reals of `v` for `xlb real list --json`.
pub fn real_list(v: &VipStatus) -> Vec<RealListed<'_>> {
    v.view
        .reals
        .iter()
        .map(|r| {
            let h = v.health.iter().find(|h| h.addr == r.addr);
            RealListed {
                view: r,
                health: health_word(h),
                check: h.map_or("none", |h| h.check.as_str()),
                mode: h.and_then(|h| h.mode),
                via: h.map(|h| h.via).unwrap_or_default(),
                last_error: h
                    .and_then(|h| h.status.as_ref())
                    .and_then(|s| s.last_error.as_deref()),
            }
        })
        .collect()
}

/// `xlb stats --rate`.
pub fn rates(rates: &Rates) {
    println!(
        "{:<44} {:>10} {:>12} {:>9} {:>8}",
        format!("rates over {:.1} s", rates.interval_s),
        "pkt/s",
        "bytes/s",
        "flows/s",
        "active"
    );
    if rates.vips.is_empty() {
        println!("no virtual services");
    }
    for v in &rates.vips {
        println!(
            "{:<44} {:>10.0} {:>12.0} {:>9.0} {:>8}",
            v.vip.to_string(),
            v.packets_per_s,
            v.bytes_per_s,
            v.flows_per_s,
            v.active_flows
        );
        for r in &v.reals {
            println!(
                "  -> {:<39} {:>10.0} {:>12.0} {:>9.0} {:>8}",
                r.addr.to_string(),
                r.packets_per_s,
                r.bytes_per_s,
                r.flows_per_s,
                r.active_flows
            );
        }
    }
}

/// `xlb stats`.
pub fn stats(stats: &Stats) {
    if let Some(at) = stats.zeroed_at {
        println!("counters since {} (xlb stats --zero)", date(at));
        println!();
    }
    println!("{:<16} {:>12} {:>14}", "verdict", "packets", "bytes");
    for v in &stats.verdicts {
        println!("{:<16} {:>12} {:>14}", v.name, v.packets, v.bytes);
    }
    println!();
    println!("{:<24} {:>12}", "event", "count");
    for e in &stats.events {
        println!("{:<24} {:>12}", e.name, e.count);
    }
    println!();
    vips(&stats.vips);
}

/// The store line of `xlb status` and `xlb fleet`.
fn store_line(s: &crate::store::Status) -> String {
    let state = match s.unreachable_since {
        Some(since) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(since);
            let ago = std::time::SystemTime::now()
                .duration_since(at)
                .map_or(0, |d| d.as_secs());
            format!(
                "store unreachable since {} ({ago} s): forwarding with revision {}, own health verdicts",
                httpdate::fmt_http_date(at),
                s.revision
            )
        }
        None if s.connected => format!("connected, revision {}", s.revision),
        None => format!("connecting, revision {}", s.revision),
    };
    let mut line = format!("store {}   node {}   {state}", s.url, s.node);
    if let Some(e) = &s.error {
        line.push_str(&format!("\n  NOT APPLIED: {e}"));
    }
    line
}

/// `xlb fleet`.
pub fn fleet(fleet: &crate::store::api::Fleet) {
    println!("{}", store_line(&fleet.store));
    if fleet.nodes.is_empty() {
        println!("no live nodes in the store");
        return;
    }
    for n in &fleet.nodes {
        let r = &n.report;
        let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
        let mut flags = Vec::new();
        if n.differs.revision {
            flags.push("REVISION DIFFERS".to_owned());
        }
        if !n.differs.tables.is_empty() {
            let vips: Vec<String> = n.differs.tables.iter().map(ToString::to_string).collect();
            flags.push(format!("TABLES DIFFER: {}", vips.join(" ")));
        }
        println!();
        println!(
            "{}  revision {}  addresses {}{}{}",
            r.name,
            r.revision,
            addrs.join(","),
            if flags.is_empty() { "" } else { "  " },
            flags.join("  ")
        );
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
        if let Some(sync) = r.sync {
            println!("  flow sync {sync}");
        }
        for (vip, fp) in &r.tables {
            println!("  table {vip} {fp}");
        }
        let down: Vec<String> = r
            .verdicts
            .iter()
            .filter(|v| !v.up)
            .map(|v| format!("{} of {}", v.real, v.vip))
            .collect();
        println!(
            "  probes {} reals, sees down: {}",
            r.verdicts.len(),
            if down.is_empty() {
                "none".to_owned()
            } else {
                down.join(", ")
            }
        );
    }
}
