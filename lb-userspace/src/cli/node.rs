//! `xlb drain`, `xlb ready` and `xlb role`: the node in a cluster (see
//! [`crate::node`]), and the node block of `xlb status`.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args;
use hyper::Method;

use super::{Out, error::bad_input};
use crate::{
    api::node::{DrainBody, RoleBody, Undrained},
    client::Client,
    node::{NodeStatus, Role},
};

/// Arguments of `xlb drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Announce the VIPs again (ends a drain).
    #[arg(long, conflicts_with_all = ["quiet", "timeout", "no_wait"])]
    pub cancel: bool,
    /// Seconds without any VIP packet after which the node is safe to stop.
    #[arg(long, allow_negative_numbers = true, default_value_t = 2.0, value_parser = super::args::parse_seconds)]
    pub quiet: f64,
    /// Give up waiting after this many seconds (the drain goes on).
    #[arg(long, allow_negative_numbers = true, default_value_t = 60.0, value_parser = super::args::parse_seconds)]
    pub timeout: f64,
    /// Start the drain and return at once.
    #[arg(long)]
    pub no_wait: bool,
}

/// Arguments of `xlb ready`.
#[derive(Debug, Args)]
pub struct ReadyArgs {
    /// Require a serving real for this VIP address (repeat for several);
    /// without it, any VIP will do.
    #[arg(long = "vip")]
    pub vips: Vec<IpAddr>,
}

/// Arguments of `xlb role`.
#[derive(Debug, Args)]
pub struct RoleArgs {
    /// The VRRP state keepalived entered.
    #[arg(value_enum)]
    pub role: Role,
}

fn seconds(what: &str, s: f64, max: Duration) -> anyhow::Result<Duration> {
    if !s.is_finite() || s < 0.0 || s > max.as_secs_f64() {
        return Err(bad_input(format!(
            "--{what} {s} is not 0-{} seconds",
            max.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(s))
}

/// `xlb drain`.
pub(super) async fn drain(client: &Client, out: Out, args: DrainArgs) -> anyhow::Result<()> {
    if args.cancel {
        let answer: Undrained = client
            .call(Method::DELETE, "/v1/node/drain", None::<&()>)
            .await?;
        let line = if answer.was_draining {
            "drain cancelled: the VIPs are announced again"
        } else {
            "not draining: nothing to cancel"
        };
        return out.line(&answer, line);
    }
    let quiet = seconds("quiet", args.quiet, crate::node::MAX_QUIET)?;
    let timeout = seconds("timeout", args.timeout, Duration::from_secs(86_400))?;
    let body = DrainBody {
        quiet_ms: Some(quiet.as_millis() as u64),
    };
    let mut status: NodeStatus = client
        .call(Method::POST, "/v1/node/drain", Some(&body))
        .await?;
    let withdrawn = |s: &NodeStatus| s.drain.as_ref().is_some_and(|d| d.withdrawn);
    if !out.json {
        match &status.bird {
            Some(b) if withdrawn(&status) => {
                println!("draining: routes withdrawn from BIRD ({})", b.socket)
            }
            Some(b) => println!(
                "draining: withdrawing from BIRD ({}) failed so far: {}; retrying",
                b.socket,
                b.error.as_deref().unwrap_or("not confirmed yet")
            ),
            None => println!(
                "draining: no route announcement configured; `xlb ready` now fails, so \
                 keepalived moves the VIPs away"
            ),
        }
    }
    let started = Instant::now();
    while !args.no_wait && !status.drain.as_ref().is_some_and(|d| d.safe_to_stop) {
        if started.elapsed() >= timeout {
            let d = status.drain.unwrap_or_default();
            bail!(
                "not safe to stop after {:.0} s: routes withdrawn: {}, {} VIP packets/s still \
                 arrive (the drain goes on; `xlb drain --cancel` ends it)",
                timeout.as_secs_f64(),
                if d.withdrawn { "yes" } else { "no" },
                d.packets_per_second
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = client.call(Method::GET, "/v1/node", None::<&()>).await?;
        if status.drain.is_none() {
            bail!("the drain was cancelled (`xlb drain --cancel`) before it completed");
        }
    }
    out.emit(&status, || {
        match status.drain.as_ref().filter(|d| d.safe_to_stop) {
            Some(d) => println!(
                "safe to stop: no VIP packet for {:.1} s since the routes were withdrawn",
                d.idle_ms as f64 / 1000.0
            ),
            None => println!("draining; `xlb status` shows when it is safe to stop"),
        }
    })
}

/// `xlb ready`: exit 0 when the node can take traffic.
pub(super) async fn ready(client: &Client, out: Out, args: ReadyArgs) -> anyhow::Result<()> {
    let status: NodeStatus = client.call(Method::GET, "/v1/node", None::<&()>).await?;
    match status.not_ready(&args.vips) {
        Some(why) => bail!("not ready: {why}"),
        None => {
            let serving: Vec<String> = status.serving.iter().map(ToString::to_string).collect();
            out.line(&status, &format!("ready: serving {}", serving.join(", ")))
        }
    }
}

/// `xlb role`.
pub(super) async fn role(client: &Client, out: Out, args: RoleArgs) -> anyhow::Result<()> {
    let body = RoleBody { role: args.role };
    let status: NodeStatus = client
        .call(Method::PUT, "/v1/node/role", Some(&body))
        .await?;
    out.line(&status, &format!("role recorded: {}", args.role.name()))
}

/// The node block of `xlb status` (nothing when there is nothing to say).
pub fn render(status: &NodeStatus) {
    if status.bird.is_none()
        && status.drain.is_none()
        && status.role.is_none()
        && status.sync.is_none()
    {
        return;
    }
    println!();
    if let Some(b) = &status.bird {
        let announced: Vec<String> = b.announced.iter().map(ToString::to_string).collect();
        println!(
            "announced via BIRD ({}): {}",
            b.socket,
            if announced.is_empty() {
                "nothing".to_owned()
            } else {
                announced.join(", ")
            }
        );
        if let Some(err) = &b.error {
            println!("  BIRD NOT IN SYNC: {err}");
        }
    }
    if let Some(d) = &status.drain {
        println!(
            "DRAINING: routes withdrawn: {}, last VIP packet {:.1} s ago, {} packets/s, safe to \
             stop: {}",
            if d.withdrawn { "yes" } else { "no" },
            d.idle_ms as f64 / 1000.0,
            d.packets_per_second,
            if d.safe_to_stop { "yes" } else { "no" }
        );
    }
    if let Some(r) = &status.role {
        println!("VRRP role: {}", r.role.name());
    }
    if let Some(s) = &status.sync {
        let peers: Vec<String> = s
            .peers
            .iter()
            .map(|p| format!("{} ({})", p.address, p.source.name()))
            .collect();
        let multicast = s
            .multicast
            .as_ref()
            .map_or_else(String::new, |m| format!(", multicast {m},"));
        println!(
            "flow sync on {}{multicast} with {}",
            s.listen,
            if peers.is_empty() {
                "no peer".to_owned()
            } else {
                peers.join(", ")
            }
        );
        match (&s.pulled_from, &s.pull_error) {
            _ if !s.ready => println!("  PULLING the peers' flows: nothing announced yet"),
            _ if s.first_in_fleet => println!(
                "  start-up copy: none needed: first node of the fleet (no other node in the \
                 store publishes a sync address)"
            ),
            (Some(from), _) => println!("  start-up copy: {} flows from {from}", s.pulled_flows),
            (None, Some(err)) => println!("  start-up copy: none ({err})"),
            (None, None) => println!("  start-up copy: no peer to pull from"),
        }
    }
}
