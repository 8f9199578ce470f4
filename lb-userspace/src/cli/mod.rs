//! The `xlb` command line: `xlb run` is the daemon, `xlb decap` and `xlb
//! realserver` run on real servers, every other subcommand is a client of the
//! daemon's control API.
//!
//! - [`args`]: the subcommands and flags.
//! - [`render`]: how answers are printed.
//! - this module: what each subcommand does.

pub mod args;
pub mod render;

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use hyper::Method;

pub use args::{Cli, Command};
use args::{DecapArgs, DecapCommand, RealCommand, RealRef, RealserverCommand, VipCommand};

use crate::{
    api::{AddReal, AddVip, Applied, ApplyBody, SetReal, Simulated, Stats, Status},
    client::Client,
    config::Config,
    daemon,
    decap::Decap,
    desired::Admin,
    pin, realserver,
    views::VipView,
};

fn real_path(at: &RealRef) -> String {
    format!("/v1/vips/{}/reals/{}", at.vip.path(), at.real)
}

async fn set_real(client: &Client, at: &RealRef, body: SetReal) -> anyhow::Result<VipView> {
    client.call(Method::PUT, &real_path(at), Some(&body)).await
}

async fn set_admin(client: &Client, at: &RealRef, admin: Admin) -> anyhow::Result<()> {
    let body = SetReal {
        weight: None,
        admin: Some(admin),
    };
    set_real(client, at, body).await.map(drop)
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            daemon::run(args.settings, args.config, cli.socket).await
        }
        Command::Apply { file, if_revision } => {
            // Validate locally first: errors name the file and place at once.
            let config = Config::load(&file)?;
            let body = ApplyBody {
                yaml: std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                file: Some(file.display().to_string()),
                revision: if_revision,
            };
            let applied: Applied = client.call(Method::PUT, "/v1/desired", Some(&body)).await?;
            let revision = applied
                .revision
                .map_or_else(String::new, |r| format!(" (store revision {r})"));
            println!(
                "applied {}: {} services, {} map writes, {} tables rebuilt{revision}",
                file.display(),
                config.desired.services.len(),
                applied.writes,
                applied.tables
            );
            Ok(())
        }
        Command::Fleet { json } => {
            let fleet: crate::store::api::Fleet =
                client.call(Method::GET, "/v1/fleet", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet)?);
            } else {
                render::fleet(&fleet);
            }
            Ok(())
        }
        Command::Status { json } => {
            let status: Status = client.call(Method::GET, "/v1/status", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                render::status(&status);
            }
            Ok(())
        }
        Command::Teardown {
            pin_dir,
            state_file,
        } => {
            let removed = pin::teardown(&pin_dir)?;
            crate::state::persist::remove(&state_file);
            if removed.is_empty() {
                println!("nothing pinned at {}", pin_dir.display());
            } else {
                println!(
                    "removed {} pins under {}: the data path is detached",
                    removed.len(),
                    pin_dir.display()
                );
            }
            Ok(())
        }
        Command::Decap(args) => run_decap(args).await,
        Command::Generate(args) => crate::generate::run(args),
        Command::Realserver(RealserverCommand::Setup { vips, state }) => {
            let applied = realserver::setup(&vips, &state).await?;
            for vip in &vips {
                println!("{vip} is on lo");
            }
            for (key, old) in &applied.sysctls {
                println!("set {} (was {old})", key.replace('/', "."));
            }
            println!(
                "recorded in {} for `xlb realserver teardown`",
                state.display()
            );
            Ok(())
        }
        Command::Realserver(RealserverCommand::Teardown { state }) => {
            let applied = realserver::teardown(&state).await?;
            for vip in &applied.vips {
                println!("removed {vip} from lo");
            }
            for (key, old) in &applied.sysctls {
                println!("restored {} = {old}", key.replace('/', "."));
            }
            Ok(())
        }
        Command::Vip(cmd) => vip(&client, cmd).await,
        Command::Real(cmd) => real(&client, cmd).await,
        Command::Stats { json } => {
            let stats: Stats = client.call(Method::GET, "/v1/stats", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                render::stats(&stats);
            }
            Ok(())
        }
        Command::Simulate {
            batch: Some(file),
            json,
            ..
        } => simulate_batch(&client, &file, json).await,
        Command::Simulate {
            vip: Some(vip),
            src: Some(src),
            json,
            ..
        } => {
            let query =
                serde_urlencoded::to_string([("vip", vip.to_string()), ("src", src.to_string())])
                    .context("encoding the query")?;
            let sim: Simulated = client
                .call(Method::GET, &format!("/v1/simulate?{query}"), None::<&()>)
                .await
                .context("simulate failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sim)?);
                return Ok(());
            }
            match sim.real {
                Some(real) => println!("{src} -> {vip} goes to real {real}"),
                None => println!("{src} -> {vip} is dropped: the VIP has no usable real"),
            }
            Ok(())
        }
        Command::Simulate { .. } => bail!("give a VIP and --src, or --batch FILE"),
    }
}

/// `xlb simulate --batch FILE`: one request for every `VIP SRC` line.
async fn simulate_batch(client: &Client, file: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use crate::api::{SimulateBatch, SimulateFlow, SimulatedBatch};
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the flows from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut flows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(vip), Some(src), None) = (words.next(), words.next(), words.next()) else {
            bail!(
                "{}:{}: expected `VIP SRC`, e.g. `203.0.113.10:80/tcp 198.51.100.7:40000`",
                file.display(),
                n + 1
            );
        };
        flows.push(SimulateFlow {
            vip: vip.to_owned(),
            src: src.to_owned(),
        });
    }
    let body = SimulateBatch { flows };
    let answer: SimulatedBatch = client
        .call(Method::POST, "/v1/simulate", Some(&body))
        .await
        .context("simulate failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let mut out = String::new();
    for (flow, real) in body.flows.iter().zip(&answer.reals) {
        let real = real.map_or_else(|| "-".to_owned(), |r| r.to_string());
        out.push_str(&format!("{} {} {real}\n", flow.vip, flow.src));
    }
    print!("{out}");
    Ok(())
}

async fn vip(client: &Client, cmd: VipCommand) -> anyhow::Result<()> {
    match cmd {
        VipCommand::Add {
            vip,
            scheduler,
            table_size,
            forward,
            check,
        } => {
            let body = AddVip {
                vip: vip.to_string(),
                scheduler: Some(scheduler.to_string()),
                table_size: Some(table_size),
                forward: Some(forward.to_string()),
                health_check: check.check()?,
            };
            let _: VipView = client.call(Method::POST, "/v1/vips", Some(&body)).await?;
            println!("added VIP {vip} ({forward}, {scheduler})");
        }
        VipCommand::Del { vip } => {
            let () = client
                .call(
                    Method::DELETE,
                    &format!("/v1/vips/{}", vip.path()),
                    None::<&()>,
                )
                .await?;
            println!("removed VIP {vip}");
        }
        VipCommand::List { json } => {
            let vips: Vec<VipView> = client.call(Method::GET, "/v1/vips", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vips)?);
            } else {
                render::vips(&vips);
            }
        }
    }
    Ok(())
}

async fn real(client: &Client, cmd: RealCommand) -> anyhow::Result<()> {
    match cmd {
        RealCommand::Add { at, weight } => {
            let body = AddReal {
                addr: at.real.to_string(),
                weight: Some(weight),
            };
            let view: VipView = client
                .call(
                    Method::POST,
                    &format!("/v1/vips/{}/reals", at.vip.path()),
                    Some(&body),
                )
                .await?;
            let r = view.reals.iter().find(|r| r.addr == at.real);
            match r {
                Some(r) if r.resolved => println!(
                    "added real {} ({}) to {} with weight {weight}",
                    at.real, r.mac, at.vip
                ),
                _ => println!(
                    "added real {} to {} with weight {weight}; not resolved yet ({}): it joins \
                     the table when it answers",
                    at.real,
                    at.vip,
                    r.and_then(|r| r.unresolved_reason.clone())
                        .unwrap_or_else(|| "resolving".to_owned())
                ),
            }
        }
        RealCommand::Set { at, weight } => {
            let body = SetReal {
                weight: Some(weight),
                admin: None,
            };
            set_real(client, &at, body).await?;
            println!(
                "real {} of {} now has weight {weight} (override)",
                at.real, at.vip
            );
        }
        RealCommand::Drain(at) => {
            set_admin(client, &at, Admin::Drain).await?;
            println!(
                "real {} of {} drains: no new flows, tracked flows stay (override)",
                at.real, at.vip
            );
        }
        RealCommand::Disable(at) => {
            set_admin(client, &at, Admin::Disabled).await?;
            println!(
                "real {} of {} is disabled: its flows move to the other reals (override)",
                at.real, at.vip
            );
        }
        RealCommand::Enable(at) => {
            set_admin(client, &at, Admin::Enabled).await?;
            println!("real {} of {} is enabled (override)", at.real, at.vip);
        }
        RealCommand::ResetOverride(at) => {
            let view: VipView = client
                .call(
                    Method::DELETE,
                    &format!("{}/override", real_path(&at)),
                    None::<&()>,
                )
                .await?;
            let r = view.reals.iter().find(|r| r.addr == at.real);
            match r {
                Some(r) => println!(
                    "real {} of {}: override removed; weight {}, {} from the configuration",
                    at.real, at.vip, r.weight, r.admin
                ),
                None => println!("real {} of {}: override removed", at.real, at.vip),
            }
        }
        RealCommand::Del(at) => {
            let () = client
                .call(Method::DELETE, &real_path(&at), None::<&()>)
                .await?;
            println!("removed real {} from {}", at.real, at.vip);
        }
        RealCommand::List { vip, json } => {
            let view: VipView = client
                .call(
                    Method::GET,
                    &format!("/v1/vips/{}", vip.path()),
                    None::<&()>,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view.reals)?);
            } else {
                render::vips(std::slice::from_ref(&view));
            }
        }
    }
    Ok(())
}

/// `xlb decap`: attach the decapsulator and run until SIGINT/SIGTERM; or
/// `xlb decap stats|teardown` on a pinned one.
async fn run_decap(args: DecapArgs) -> anyhow::Result<()> {
    if let Some(DecapCommand::Stats { json, pin_dir }) = &args.command {
        let counters = crate::decap::pinned_counters(pin_dir).with_context(|| {
            format!(
                "cannot read the decap counters under {} (is `xlb decap` running with this \
                 --pin-dir? run as root)",
                pin_dir.display()
            )
        })?;
        if *json {
            let map: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(n, c)| {
                    let v = serde_json::json!({ "packets": c.packets, "bytes": c.bytes });
                    ((*n).to_owned(), v)
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&map)?);
        } else {
            for (name, c) in &counters {
                println!("{name:<24} {:>12} packets {:>14} bytes", c.packets, c.bytes);
            }
        }
        return Ok(());
    }
    if let Some(DecapCommand::Teardown { pin_dir }) = &args.command {
        let removed = pin::teardown(pin_dir)?;
        println!("removed {} pins under {}", removed.len(), pin_dir.display());
        return Ok(());
    }
    let iface_name = args.iface.clone().context("--iface is required")?;
    let iface = crate::neighbor::Iface::lookup(&iface_name)
        .with_context(|| format!("cannot use interface {iface_name}"))?;
    let addrs: Vec<IpAddr> = if args.addrs.is_empty() {
        iface.nets.iter().map(|(a, _)| *a).collect()
    } else {
        args.addrs.clone()
    };
    if addrs.is_empty() {
        bail!("{iface_name} has no addresses; give the tunnel endpoint with --addr");
    }
    let pin = if args.no_pin {
        None
    } else {
        Some(pin::PinDir::prepare(&args.pin_dir)?)
    };
    let mut decap =
        Decap::load_with(pin.as_ref()).context("loading the decap program failed (run as root)")?;
    decap.set_addrs(&addrs)?;
    if args.allow_srcs.is_empty() {
        tracing::warn!(
            "no --allow-src: accepting tunnels from any source, so anyone who can reach this \
             host can inject packets to its VIPs; give the balancers' tunnel source prefixes"
        );
    }
    decap.set_srcs(&args.allow_srcs)?;
    let mode = args.xdp_mode.xdp();
    match &pin {
        Some(pin) => decap.attach_pinned(&iface_name, mode, pin),
        None => decap.attach(&iface_name, mode),
    }
    .with_context(|| {
        format!(
            "attaching XDP to {iface_name} failed (another XDP program attached? try --xdp-mode skb)"
        )
    })?;
    tracing::info!(iface = %iface_name, ?addrs, allow_src = ?args.allow_srcs, "decapsulating tunnels");
    let report = |decap: &Decap| {
        if let Ok(counters) = decap.counters() {
            let line: Vec<String> = counters
                .iter()
                .map(|(name, c)| format!("{name}={}", c.packets))
                .collect();
            tracing::info!("decap counters: {}", line.join(" "));
        }
    };
    if args.report_interval == 0 {
        daemon::shutdown_signal().await;
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs(args.report_interval));
        let stop = daemon::shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => report(&decap),
            }
        }
    }
    report(&decap);
    if pin.is_some() {
        tracing::info!(
            "xlb decap stopped; the decapsulator keeps running from its pins (`xlb decap \
             teardown --pin-dir {}` removes it)",
            args.pin_dir.display()
        );
    }
    Ok(())
}
