//! How the CLI prints what the daemon answers.

use crate::{
    api::{Stats, Status},
    desired::Source,
    views::VipView,
};

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

/// `xlb status`.
pub fn status(status: &Status) {
    println!(
        "interface {}   reconciles {}   conntrack {}/{}",
        status.iface, status.reconciles, status.conntrack.entries, status.conntrack.capacity
    );
    if let Some(store) = &status.store {
        println!("{}", store_line(store));
    }
    if status.vips.is_empty() {
        println!("no virtual services");
        return;
    }
    let mut overrides = false;
    let mut unresolved = Vec::new();
    for v in &status.vips {
        let view = &v.view;
        println!();
        println!(
            "{}  {} {}{}   packets {}  bytes {}  new flows {}  active {}",
            view.vip,
            view.forward,
            view.scheduler,
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
            "  {:<28} {:>7} {:>6} {:<10} {:<10} {:<7} {:<30} {:>10} {:>12} {:>9} {:>7}",
            "real",
            "weight",
            "in use",
            "admin",
            "resolved",
            "health",
            "last error",
            "packets",
            "bytes",
            "flows",
            "active"
        );
        for r in &view.reals {
            overrides |= r.weight_source == Source::Override || r.admin_source == Source::Override;
            let h = v.health.iter().find(|h| h.addr == r.addr);
            let health = match h.map(|h| (h.check.as_str(), h.status.as_ref())) {
                Some(("none", _)) | None => "-".to_owned(),
                Some((_, None)) => "pending".to_owned(),
                Some((_, Some(s))) if s.up => "up".to_owned(),
                Some((_, Some(_))) => "DOWN".to_owned(),
            };
            let last_error = h
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.last_error.clone())
                .unwrap_or_default();
            if let Some(why) = &r.unresolved_reason {
                unresolved.push(format!("{} of {}: {why}", r.addr, view.vip));
            }
            println!(
                "  {:<28} {:>7} {:>6} {:<10} {:<10} {:<7} {:<30} {:>10} {:>12} {:>9} {:>7}",
                r.addr.to_string(),
                marked(r.weight.to_string(), r.weight_source),
                r.effective_weight
                    .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                marked(r.admin.to_string(), r.admin_source),
                if r.resolved { "yes" } else { "NO" },
                health,
                last_error,
                r.packets,
                r.bytes,
                r.flows,
                r.active_flows
            );
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

/// `xlb stats`.
pub fn stats(stats: &Stats) {
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
