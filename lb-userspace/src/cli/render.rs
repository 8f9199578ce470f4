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
            "  {:<28} {:>7} {:>6} {:<10} {:<10} {:<7} {:>5} {:<30} {:>10} {:>12} {:>9} {:>7}",
            "real",
            "weight",
            "in use",
            "admin",
            "resolved",
            "health",
            "flaps",
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
                Some((_, Some(s))) if s.up => match h.and_then(|h| h.slow_start) {
                    Some(percent) => format!("up {percent}%"),
                    None => "up".to_owned(),
                },
                Some((_, Some(_))) => "DOWN".to_owned(),
            };
            let flaps = h
                .and_then(|h| h.status.as_ref())
                .map_or_else(|| "-".to_owned(), |s| s.flaps.to_string());
            let last_error = h
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.last_error.clone())
                .unwrap_or_default();
            if let Some(why) = &r.unresolved_reason {
                unresolved.push(format!("{} of {}: {why}", r.addr, view.vip));
            }
            println!(
                "  {:<28} {:>7} {:>6} {:<10} {:<10} {:<7} {:>5} {:<30} {:>10} {:>12} {:>9} {:>7}",
                r.addr.to_string(),
                marked(r.weight.to_string(), r.weight_source),
                r.effective_weight
                    .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                marked(r.admin.to_string(), r.admin_source),
                if r.resolved { "yes" } else { "NO" },
                health,
                flaps,
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
