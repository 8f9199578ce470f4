//! The `xlb` command line: `xlb run` is the daemon, `xlb decap` and `xlb
//! realserver` run on real servers, every other subcommand is a client of the
//! daemon's control API.
//!
//! - [`args`]: the subcommands and flags.
//! - [`error`]: exit codes and error output, the same for every command.
//! - [`render`]: how answers are printed.
//! - [`rate`]: rates from two readings of the counters (`stats --rate`, `top`).
//! - [`top`]: `xlb top`, the live terminal view.
//! - this module: what each subcommand does.
//!
//! With `--json` every command prints one JSON document on stdout: its answer,
//! or the error document of [`error::report`].

pub mod args;
pub mod error;
pub mod node;
pub mod rate;
pub mod render;
pub mod top;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hyper::Method;
use serde::Serialize;

pub use args::{Cli, Command};
use args::{DecapArgs, DecapCommand, RealCommand, RealRef, RealserverCommand, VipCommand};
use error::{CliError, ErrorKind, bad_input};

use crate::{
    api::{
        AddReal, AddVip, Applied, ApplyBody, Planned, SetReal, SetVip, Simulated, Stats, Status,
        zero::Zeroed,
    },
    client::Client,
    config::Config,
    daemon,
    decap::{Decap, DecapSettings},
    desired::{Admin, Desired},
    pin, realserver,
    views::VipView,
};

/// Where a command's answer goes: JSON (`--json`) or text.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints `value` as JSON with `--json`, else runs `text`.
    fn emit<T: Serialize>(self, value: &T, text: impl FnOnce()) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            text();
        }
        Ok(())
    }

    /// Prints `line` as text, or `value` as JSON.
    fn line<T: Serialize>(self, value: &T, line: &str) -> anyhow::Result<()> {
        self.emit(value, || println!("{line}"))
    }
}

/// Reads a configuration file's text; an unreadable file is bad input.
fn read_config(file: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).map_err(|e| bad_input(format!("{}: {e}", file.display())))
}

/// Validates `text` (of `file`) as the daemon's load does; errors are bad input.
fn validate(file: &std::path::Path, text: &str) -> anyhow::Result<Config> {
    Config::parse(&file.display().to_string(), text).map_err(|e| bad_input(e.to_string()))
}

/// `xlb apply [--dry-run] FILE`: the daemon validates the file (as `xlb check`
/// does, plus what only it can see) and records the result as a reload.
async fn apply(
    client: &Client,
    out: Out,
    file: &std::path::Path,
    dry_run: bool,
    if_revision: Option<i64>,
) -> anyhow::Result<()> {
    let text = read_config(file)?;
    let body = ApplyBody {
        yaml: text.clone(),
        file: Some(file.display().to_string()),
        revision: if_revision,
    };
    let (method, path) = if dry_run {
        (Method::POST, "/v1/desired/plan")
    } else {
        (Method::PUT, "/v1/desired")
    };
    let answer = client
        .call::<_, serde_json::Value>(method, path, Some(&body))
        .await;
    // The daemon's error names the file too; but a file too big for a request,
    // or a daemon out of reach, still gets the file's own error (bad input).
    let answer = match answer {
        Err(e) => {
            validate(file, &text)?;
            return Err(e);
        }
        Ok(answer) => answer,
    };
    if dry_run {
        let planned: Planned = serde_json::from_value(answer)?;
        return out.emit(&planned, || {
            if planned.changes.is_empty() {
                println!("dry run: applying {} changes nothing", file.display());
                return;
            }
            println!(
                "dry run: applying {} would make {} changes (nothing applied):",
                file.display(),
                planned.changes.len()
            );
            for change in &planned.changes {
                println!("{change}");
            }
        });
    }
    let applied: Applied = serde_json::from_value(answer)?;
    let services = validate(file, &text)?.desired.services.len();
    let revision = applied
        .revision
        .map_or_else(String::new, |r| format!(" (store revision {r})"));
    out.emit(&applied, || {
        println!(
            "applied {}: {services} services, {} map writes, {} tables rebuilt{revision}",
            file.display(),
            applied.writes,
            applied.tables
        );
    })
}

/// Answer of `xlb check --json`.
#[derive(Serialize)]
struct Checked {
    file: String,
    valid: bool,
    services: usize,
    reals: usize,
    /// The seed of the Maglev permutations, when the file sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_seed: Option<u64>,
}

/// `xlb check FILE`: the daemon's validation of a file, without a daemon: its
/// keys and values, and the daemon settings' pairings that need no host.
fn check(out: Out, file: &std::path::Path) -> anyhow::Result<()> {
    let config = validate(file, &read_config(file)?)?;
    crate::daemon::check_settings(&config.daemon, Some((&config, file))).map_err(|e| {
        let message = format!("{e:#}");
        let named = format!("{}: ", file.display());
        bad_input(if message.starts_with(&named) {
            message
        } else {
            named + &message
        })
    })?;
    let checked = Checked {
        file: file.display().to_string(),
        valid: true,
        services: config.desired.services.len(),
        reals: config.desired.pairs().count(),
        hash_seed: (config.desired.hash_seed != 0).then_some(config.desired.hash_seed),
    };
    let seed = checked
        .hash_seed
        .map_or_else(String::new, |s| format!(", hash_seed {s}"));
    out.line(
        &checked,
        &format!(
            "{}: valid ({} services, {} reals{seed})",
            checked.file, checked.services, checked.reals
        ),
    )
}

/// `xlb stats [--zero | --rate]`.
async fn stats(client: &Client, out: Out, zero: bool, rate: Option<f64>) -> anyhow::Result<()> {
    if zero {
        let z: Zeroed = client
            .call(Method::POST, "/v1/stats/zero", None::<&()>)
            .await?;
        return out.line(
            &z,
            "counters zeroed: xlb stats, status and vip/real list count from now; the \
             Prometheus metrics keep counting",
        );
    }
    if let Some(secs) = rate {
        let rates = rate::measure(client, Duration::from_secs_f64(secs)).await?;
        return out.emit(&rates, || render::rates(&rates));
    }
    let stats: Stats = client.call(Method::GET, "/v1/stats", None::<&()>).await?;
    out.emit(&stats, || render::stats(&stats))
}

fn real_path(at: &RealRef) -> String {
    format!("/v1/vips/{}/reals/{}", at.vip.path(), at.real)
}

async fn set_real(client: &Client, at: &RealRef, body: SetReal) -> anyhow::Result<VipView> {
    client.call(Method::PUT, &real_path(at), Some(&body)).await
}

async fn set_admin(client: &Client, at: &RealRef, admin: Admin) -> anyhow::Result<VipView> {
    let body = SetReal {
        weight: None,
        admin: Some(admin),
    };
    set_real(client, at, body).await
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    let out = Out { json: cli.json };
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            daemon::run(args.settings, args.config, cli.socket).await
        }
        Command::Apply {
            file,
            dry_run,
            if_revision,
        } => apply(&client, out, &file, dry_run, if_revision).await,
        Command::Fleet => {
            let fleet: crate::store::api::Fleet =
                client.call(Method::GET, "/v1/fleet", None::<&()>).await?;
            out.emit(&fleet, || render::fleet(&fleet))
        }
        Command::Check { file } => check(out, &file),
        Command::Save => {
            let base: Desired = client
                .call(Method::GET, "/v1/desired?layer=base", None::<&()>)
                .await?;
            if out.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::config::document(&base))?
                );
            } else {
                print!("{}", crate::config::to_yaml(&base)?);
            }
            Ok(())
        }
        Command::Status => {
            let status: Status = client.call(Method::GET, "/v1/status", None::<&()>).await?;
            out.emit(&status, || {
                render::status(&status, None);
                node::render(&status.node);
            })
        }
        Command::Teardown {
            pin_dir,
            state_file,
            force,
        } => {
            let removed = teardown(&pin_dir, force, pin::Holder::Daemon)?;
            crate::state::persist::remove(&state_file);
            let line = if removed.is_empty() {
                format!("nothing pinned at {}", pin_dir.display())
            } else {
                format!(
                    "removed {} pins under {}: the data path is detached",
                    removed.len(),
                    pin_dir.display()
                )
            };
            out.line(&serde_json::json!({ "removed_pins": removed }), &line)
        }
        Command::Decap(args) => run_decap(out, args).await,
        Command::Drain(args) => node::drain(&client, out, args).await,
        Command::Ready(args) => node::ready(&client, out, args).await,
        Command::Role(args) => node::role(&client, out, args).await,
        Command::Generate(args) => crate::generate::run(args),
        Command::Realserver(RealserverCommand::Setup { vips, state }) => {
            let applied = realserver::setup(&vips, &state).await?;
            out.emit(&applied, || {
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
            })
        }
        Command::Realserver(RealserverCommand::Teardown { state }) => {
            let applied = realserver::teardown(&state).await?;
            out.emit(&applied, || {
                for vip in &applied.vips {
                    println!("removed {vip} from lo");
                }
                for (key, old) in &applied.sysctls {
                    println!("restored {} = {old}", key.replace('/', "."));
                }
            })
        }
        Command::Vip(cmd) => vip(&client, out, cmd).await,
        Command::Real(cmd) => real(&client, out, cmd).await,
        Command::Stats {
            zero,
            rate,
            interval,
        } => stats(&client, out, zero, rate.then_some(interval)).await,
        Command::Top { interval } => {
            if out.json {
                return Err(bad_input(
                    "xlb top is interactive and has no --json; use `xlb stats --rate --json`",
                ));
            }
            top::run(&client, &cli.socket, Duration::from_secs_f64(interval)).await
        }
        Command::Simulate {
            batch: Some(file), ..
        } => simulate_batch(&client, out, &file).await,
        Command::Simulate {
            vip: Some(vip),
            src: Some(src),
            ..
        } => {
            let query =
                serde_urlencoded::to_string([("vip", vip.to_string()), ("src", src.to_string())])
                    .context("encoding the query")?;
            let sim: Simulated = client
                .call(Method::GET, &format!("/v1/simulate?{query}"), None::<&()>)
                .await
                .context("simulate failed")?;
            let line = match sim.real {
                Some(real) => format!("{src} -> {vip} goes to real {real}"),
                None => format!("{src} -> {vip} is dropped: the VIP has no usable real"),
            };
            out.line(&sim, &line)
        }
        Command::Simulate { .. } => Err(bad_input("give a VIP and --src, or --batch FILE")),
    }
}

/// `xlb simulate --batch FILE`: one request for every `VIP SRC` line.
async fn simulate_batch(client: &Client, out: Out, file: &std::path::Path) -> anyhow::Result<()> {
    use crate::api::{SimulateBatch, SimulateFlow, SimulatedBatch};
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the flows from stdin")?
    } else {
        std::fs::read_to_string(file).map_err(|e| bad_input(format!("{}: {e}", file.display())))?
    };
    let mut flows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let at = || format!("{}:{}", file.display(), n + 1);
        let (Some(vip), Some(src), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad_input(format!(
                "{}: expected `VIP SRC`, e.g. `203.0.113.10:80/tcp 198.51.100.7:40000`",
                at()
            )));
        };
        // Malformed values are named by their line here; what needs the
        // running state (an unknown VIP, a family mismatch) the daemon names.
        vip.parse::<crate::model::Vip>()
            .map_err(|e| bad_input(format!("{}: {e}", at())))?;
        crate::model::parse_source(src).map_err(|e| bad_input(format!("{}: {e}", at())))?;
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
    if out.json {
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

async fn vip(client: &Client, out: Out, cmd: VipCommand) -> anyhow::Result<()> {
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
                health_check: check.check().map_err(|e| bad_input(e.to_string()))?,
            };
            let view: VipView = client.call(Method::POST, "/v1/vips", Some(&body)).await?;
            out.line(&view, &format!("added VIP {vip} ({forward}, {scheduler})"))
        }
        VipCommand::Set {
            vip,
            scheduler,
            table_size,
            check,
        } => {
            let body = SetVip {
                scheduler: scheduler.map(|s| s.to_string()),
                table_size,
                health_check: check.check().map_err(|e| bad_input(e.to_string()))?,
            };
            if body.scheduler.is_none() && body.table_size.is_none() && body.health_check.is_none()
            {
                return Err(bad_input(
                    "nothing to set: give --scheduler, --table-size and/or --check",
                ));
            }
            let view: VipView = client
                .call(
                    Method::PUT,
                    &format!("/v1/vips/{}", vip.path()),
                    Some(&body),
                )
                .await?;
            out.line(
                &view,
                &format!(
                    "VIP {vip} now {}, table {}{}: established flows stay on their reals",
                    view.scheduler,
                    view.table_size,
                    if body.health_check.is_some() {
                        ", new health check"
                    } else {
                        ""
                    }
                ),
            )
        }
        VipCommand::Del { vip } => {
            let () = client
                .call(
                    Method::DELETE,
                    &format!("/v1/vips/{}", vip.path()),
                    None::<&()>,
                )
                .await?;
            out.line(
                &serde_json::json!({ "removed": vip }),
                &format!("removed VIP {vip}"),
            )
        }
        VipCommand::List => {
            let vips: Vec<VipView> = client.call(Method::GET, "/v1/vips", None::<&()>).await?;
            out.emit(&vips, || render::vips(&vips))
        }
    }
}

async fn real(client: &Client, out: Out, cmd: RealCommand) -> anyhow::Result<()> {
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
            let line = match r {
                Some(r) if r.resolved => format!(
                    "added real {} ({}) to {} with weight {weight}",
                    at.real, r.mac, at.vip
                ),
                _ => format!(
                    "added real {} to {} with weight {weight}; not resolved yet ({}): it joins \
                     the table when it answers",
                    at.real,
                    at.vip,
                    r.and_then(|r| r.unresolved_reason.clone())
                        .unwrap_or_else(|| "resolving".to_owned())
                ),
            };
            out.line(&view, &line)
        }
        RealCommand::Set { at, weight } => {
            let body = SetReal {
                weight: Some(weight),
                admin: None,
            };
            let view = set_real(client, &at, body).await?;
            out.line(
                &view,
                &format!(
                    "real {} of {} now has weight {weight} (override)",
                    at.real, at.vip
                ),
            )
        }
        RealCommand::Drain(at) => {
            let view = set_admin(client, &at, Admin::Drain).await?;
            out.line(
                &view,
                &format!(
                    "real {} of {} drains: no new flows, tracked flows stay (override)",
                    at.real, at.vip
                ),
            )
        }
        RealCommand::Disable(at) => {
            let view = set_admin(client, &at, Admin::Disabled).await?;
            out.line(
                &view,
                &format!(
                    "real {} of {} is disabled: its flows move to the other reals (override)",
                    at.real, at.vip
                ),
            )
        }
        RealCommand::Enable(at) => {
            let view = set_admin(client, &at, Admin::Enabled).await?;
            out.line(
                &view,
                &format!("real {} of {} is enabled (override)", at.real, at.vip),
            )
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
            let line = match r {
                Some(r) => format!(
                    "real {} of {}: override removed; weight {}, {} from the configuration",
                    at.real, at.vip, r.weight, r.admin
                ),
                None => format!("real {} of {}: override removed", at.real, at.vip),
            };
            out.line(&view, &line)
        }
        RealCommand::Del(at) => {
            let () = client
                .call(Method::DELETE, &real_path(&at), None::<&()>)
                .await?;
            out.line(
                &serde_json::json!({ "removed": at.real, "vip": at.vip }),
                &format!("removed real {} from {}", at.real, at.vip),
            )
        }
        RealCommand::List { vip } => {
            let status: Status = client.call(Method::GET, "/v1/status", None::<&()>).await?;
            let Some(one) = status.vips.iter().find(|v| v.view.vip == vip) else {
                return Err(CliError::new(
                    ErrorKind::Refused,
                    crate::desired::SpecError::UnknownVip(vip).to_string(),
                )
                .into());
            };
            out.emit(&render::real_list(one), || {
                render::status(&status, Some(vip))
            })
        }
    }
}

/// [`pin::teardown`] for `xlb teardown` and `xlb decap teardown`: pins a
/// running `holder` uses are a refusal (exit 4).
fn teardown(pin_dir: &Path, force: bool, holder: pin::Holder) -> anyhow::Result<Vec<PathBuf>> {
    pin::teardown(pin_dir, force, holder).map_err(|err| match err {
        pin::PinError::InUse { .. } => CliError::new(ErrorKind::Refused, err.to_string()).into(),
        err => anyhow::Error::from(err),
    })
}

/// `xlb decap`: attach the decapsulator and run until SIGINT/SIGTERM; or
/// `xlb decap stats|teardown` on a pinned one.
async fn run_decap(out: Out, args: DecapArgs) -> anyhow::Result<()> {
    if let Some(DecapCommand::Stats { pin_dir }) = &args.command {
        let counters = crate::decap::pinned_counters(pin_dir).with_context(|| {
            format!(
                "cannot read the decap counters under {} (is `xlb decap` running with this \
                 --pin-dir? run as root)",
                pin_dir.display()
            )
        })?;
        if out.json {
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
    if let Some(DecapCommand::Teardown { pin_dir, force }) = &args.command {
        let removed = teardown(pin_dir, *force, pin::Holder::Decap)?;
        return out.line(
            &serde_json::json!({ "removed_pins": removed }),
            &format!("removed {} pins under {}", removed.len(), pin_dir.display()),
        );
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
    // Checked before anything is loaded: a refused list leaves a running
    // decapsulator as it is.
    let settings =
        DecapSettings::new(&addrs, &args.allow_srcs).map_err(|e| bad_input(e.to_string()))?;
    let metrics_listener = crate::metrics::bind(args.metrics_addr).await?;
    let pin = if args.no_pin {
        None
    } else {
        Some(pin::PinDir::prepare_layout(
            &args.pin_dir,
            pin::DECAP_LAYOUT_VERSION,
        )?)
    };
    // Held until it stops: `xlb decap teardown` refuses while it runs.
    let _pin_lock = pin
        .as_ref()
        .map(|pin| pin.lock(pin::Holder::Decap))
        .transpose()?;
    if args.allow_srcs.is_empty() {
        tracing::warn!(
            "no --allow-src: accepting tunnels from any source, so anyone who can reach this \
             host can inject packets to its VIPs; give the balancers' tunnel source prefixes"
        );
    }
    let mut decap = Decap::load_with(&settings, pin.as_ref())
        .context("loading the decap program failed (run as root)")?;
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
    let metrics_task = match metrics_listener {
        Some(l) => Some(crate::metrics::serve_decap(l, decap.counter_reader()?)),
        None => None,
    };
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
    // A forced teardown of the pins stops it too: no NIC runs the program
    // whose counters it would go on reporting.
    let stop = daemon::stop_signal(
        pin.clone(),
        "the decapsulator was detached from under this xlb decap (its pins were removed: `xlb \
         decap teardown --force`); stopping",
    );
    tokio::pin!(stop);
    if args.report_interval == 0 {
        (&mut stop).await;
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs(args.report_interval));
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => report(&decap),
            }
        }
    }
    let detached = pin.as_ref().is_some_and(|pin| !pin.has_link());
    if !detached {
        report(&decap);
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    if detached {
        tracing::info!("xlb decap stopped: its decapsulator had been detached");
    } else if pin.is_some() {
        tracing::info!(
            "xlb decap stopped; the decapsulator keeps running from its pins (`xlb decap \
             teardown --pin-dir {}` removes it)",
            args.pin_dir.display()
        );
    }
    Ok(())
}
