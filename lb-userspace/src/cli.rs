//! The `xlb` command line: `xlb run` is the daemon, `xlb decap` and `xlb
//! realserver` run on real servers, every other subcommand is a client of the
//! daemon's control API.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;

use crate::{
    api::{AddReal, AddVip, Applied, ApplyBody, SetReal, Simulated, Stats, Status},
    client::Client,
    config::{Config, parse_prefix},
    daemon::{self, DataPathOptions, RunOptions},
    decap::Decap,
    health::{HealthCheck, ProbeKind},
    model::{Forward, Scheduler, Vip, parse_real},
    pin, realserver,
    state::{Admin, VipView},
};

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Group given the control socket when it exists and no other is named.
pub const DEFAULT_SOCKET_GROUP: &str = "xlb";
/// Default state file.
pub const DEFAULT_STATE_FILE: &str = "/run/xlb/state.json";

/// xlb: an XDP layer-4 load balancer (LVS-DR / LVS-TUN style, Maglev hashing).
#[derive(Debug, Parser)]
#[command(name = "xlb", version, about)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load (or adopt) the XDP program, serve the control API.
    Run(Box<RunArgs>),
    /// Send a configuration file's services to the running daemon (one reconcile).
    Apply {
        /// The YAML file (see docs/config.md).
        file: PathBuf,
    },
    /// Show VIPs, reals, weights, health and counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Manage the real servers of a virtual service.
    #[command(subcommand)]
    Real(RealCommand),
    /// Show the balancer's counters.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which real server a flow goes to.
    Simulate {
        /// The VIP, e.g. 203.0.113.10:80/tcp.
        vip: Vip,
        /// The client's address and port, e.g. 198.51.100.7:40000.
        #[arg(long)]
        src: std::net::SocketAddr,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a pinned data path (detaches the program, drops tracked flows).
    Teardown {
        /// The pin directory the daemon used.
        #[arg(long, default_value = pin::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The state file the daemon used.
        #[arg(long, default_value = DEFAULT_STATE_FILE)]
        state_file: PathBuf,
    },
    /// Real-server side of TUN mode: decapsulate tunnelled VIP traffic with XDP.
    Decap(DecapArgs),
    /// Prepare (or undo) a real server for DR/TUN: VIPs on lo, ARP and rp_filter sysctls.
    #[command(subcommand)]
    Realserver(RealserverCommand),
}

/// XDP attach modes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Native (driver) mode, the fast one.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Skb,
    /// Let the kernel choose.
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, false)
    }
}

/// Arguments of `xlb run`. Flags win over the config file's `daemon:` section.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface that receives VIP traffic.
    #[arg(long)]
    pub iface: Option<String>,
    /// XDP attach mode [default: native].
    #[arg(long, value_enum)]
    pub xdp_mode: Option<Mode>,
    /// Configuration file (desired state and daemon settings), reloaded on SIGHUP.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for a real's ARP/NDP answer.
    #[arg(long, default_value_t = 3)]
    pub resolve_timeout: u64,
    /// Connection-tracking table size (flows, all CPUs; ~100 bytes each) [default: 1048576].
    #[arg(long)]
    pub conntrack_size: Option<u32>,
    /// New flows each CPU may add to the conntrack table per second; above it
    /// flows are forwarded by Maglev alone (0: no limit) [default: 0].
    #[arg(long)]
    pub new_flow_limit: Option<u32>,
    /// Seconds after which an idle UDP flow is forgotten [default: 30].
    #[arg(long)]
    pub udp_idle_timeout: Option<u64>,
    /// Largest IP packet after encapsulation (default: the interface's MTU).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// IPv4 prefix for tunnel sources, e.g. 192.0.2.0/24 (default: the interface's address).
    #[arg(long, value_parser = |s: &str| parse_prefix::<std::net::Ipv4Addr>(s, 32))]
    pub tunnel_src: Option<(std::net::Ipv4Addr, u8)>,
    /// IPv6 prefix for tunnel sources, e.g. 2001:db8:ff::/96 (default: the interface's address).
    #[arg(long, value_parser = |s: &str| parse_prefix::<std::net::Ipv6Addr>(s, 128))]
    pub tunnel_src6: Option<(std::net::Ipv6Addr, u8)>,
    /// bpffs directory for pins [default: /sys/fs/bpf/xlb].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Do not pin: the data path stops with the daemon.
    #[arg(long, conflicts_with_all = ["pin_dir", "replace"])]
    pub no_pin: bool,
    /// Atomically replace the program of a running (pinned) data path with this
    /// binary's, keeping maps, flows and counters.
    #[arg(long)]
    pub replace: bool,
    /// Where the daemon keeps its state for the next daemon.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9814.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Group allowed to use the control socket (default: `xlb` if that group exists, else root only).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Health checks never take a VIP below this share of its reals (0.0-1.0) [default: 0.5].
    #[arg(long)]
    pub min_healthy: Option<f64>,
}

/// Arguments of `xlb decap`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DecapArgs {
    /// `xlb decap stats`; none: run the decapsulator.
    #[command(subcommand)]
    pub command: Option<DecapCommand>,
    /// Interface that receives the balancer's tunnels.
    #[arg(long, required = true)]
    pub iface: Option<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: Mode,
    /// Tunnel endpoint addresses to accept (default: every address of the interface).
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
    /// Log the counters every this many seconds (0: only when stopping).
    #[arg(long, default_value_t = 0)]
    pub report_interval: u64,
    /// Accept tunnels only from this source prefix, e.g. the balancers'
    /// --tunnel-src 192.0.2.0/24 (repeat for several). Without it every source
    /// is accepted (and a warning is logged).
    #[arg(long = "allow-src", value_parser = parse_src_prefix)]
    pub allow_srcs: Vec<(IpAddr, u8)>,
    /// bpffs directory for pins: the decapsulator keeps running from them
    /// after `xlb decap` stops (`xlb teardown --pin-dir DIR` removes it).
    #[arg(long, default_value = crate::decap::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Do not pin: the decapsulator stops with `xlb decap`.
    #[arg(long)]
    pub no_pin: bool,
}

/// `xlb decap ...` subcommands.
#[derive(Debug, Subcommand)]
pub enum DecapCommand {
    /// Print the counters of the decapsulator pinned by a running `xlb decap`.
    Stats {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// The pin directory `xlb decap` uses.
        #[arg(long, default_value = crate::decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach the pinned decapsulator and remove its pins.
    Teardown {
        /// The pin directory `xlb decap` uses.
        #[arg(long, default_value = crate::decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// An IPv4 or IPv6 prefix (ADDRESS/LENGTH) for `--allow-src`.
fn parse_src_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = crate::config::parse_prefix::<IpAddr>(s, 128)?;
    if addr.is_ipv4() && len > 32 {
        return Err(format!("prefix length '{len}' is not 0-32"));
    }
    Ok((addr, len))
}

/// `xlb realserver ...`.
#[derive(Debug, Subcommand)]
pub enum RealserverCommand {
    /// Put VIPs on lo and set arp_ignore=1, arp_announce=2, rp_filter=2.
    Setup {
        /// A VIP address this real serves (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        /// Where to record what was changed (for teardown).
        #[arg(long, default_value = realserver::STATE_FILE)]
        state: PathBuf,
    },
    /// Undo what setup changed.
    Teardown {
        /// The state file setup wrote.
        #[arg(long, default_value = realserver::STATE_FILE)]
        state: PathBuf,
    },
}

/// Health-check flags of `xlb vip add`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Probe kind for the VIP's reals: tcp, http, udp or none.
    #[arg(long = "check", value_parser = parse_kind)]
    pub kind: Option<ProbeKind>,
    /// Port to probe (default: the VIP's port).
    #[arg(long = "check-port")]
    pub port: Option<u16>,
    /// HTTP path.
    #[arg(long = "check-path")]
    pub path: Option<String>,
    /// Accepted HTTP statuses, e.g. 200-399.
    #[arg(long = "check-status")]
    pub status: Option<String>,
    /// Milliseconds between probes.
    #[arg(long = "check-interval")]
    pub interval_ms: Option<u64>,
    /// Probe timeout, milliseconds.
    #[arg(long = "check-timeout")]
    pub timeout_ms: Option<u64>,
    /// Successes that bring a real back.
    #[arg(long = "check-rise")]
    pub rise: Option<u32>,
    /// Failures that take a real out.
    #[arg(long = "check-fall")]
    pub fall: Option<u32>,
}

fn parse_kind(s: &str) -> Result<ProbeKind, String> {
    match s {
        "tcp" => Ok(ProbeKind::Tcp),
        "http" => Ok(ProbeKind::Http),
        "udp" => Ok(ProbeKind::Udp),
        "none" => Ok(ProbeKind::None),
        _ => Err(format!("'{s}' is not tcp, http, udp or none")),
    }
}

impl CheckArgs {
    fn check(&self) -> anyhow::Result<Option<HealthCheck>> {
        let Some(kind) = self.kind else {
            if self.port.is_some() || self.path.is_some() || self.interval_ms.is_some() {
                bail!("the --check-* options need --check KIND");
            }
            return Ok(None);
        };
        let d = HealthCheck::default();
        let c = HealthCheck {
            kind,
            port: self.port,
            path: self.path.clone().unwrap_or(d.path),
            expect_status: self.status.clone().unwrap_or(d.expect_status),
            interval_ms: self.interval_ms.unwrap_or(d.interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or(d.timeout_ms),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            ..d
        };
        c.validate()
            .map_err(|m| anyhow::anyhow!("health check: {m}"))?;
        Ok(Some(c))
    }
}

/// `xlb vip ...`.
#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Add a virtual service, e.g. `xlb vip add 203.0.113.10:80/tcp`.
    Add {
        /// ADDRESS:PORT/PROTOCOL (IPv6 as [ADDRESS]:PORT/PROTOCOL).
        vip: Vip,
        /// maglev (5-tuple) or maglev-src (source address only).
        #[arg(long, default_value = "maglev")]
        scheduler: Scheduler,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = lb_common::RING_SIZE_DEFAULT)]
        table_size: u32,
        /// dr (MAC rewrite, reals on this segment) or tun (IPIP/IP6IP6/4in6).
        #[arg(long, default_value = "dr")]
        forward: Forward,
        /// Health check of the VIP's reals.
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Remove a virtual service and forget its reals.
    Del {
        /// The VIP.
        vip: Vip,
    },
    /// List virtual services.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `xlb real ...`.
#[derive(Debug, Subcommand)]
pub enum RealCommand {
    /// Add a real server to a VIP; the daemon resolves its MAC first.
    Add {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
        /// Relative weight, 0-65535 (0: no new flows).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
    /// Change a real server's weight.
    Set {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
        /// New weight, 0-65535.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
    /// Drain a real: no new flows, its tracked flows stay until they end.
    Drain {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
    },
    /// Disable a real: out of the table, its flows move to other reals.
    Disable {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
    },
    /// Enable a drained or disabled real again.
    Enable {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
    },
    /// Remove a real server from a VIP.
    Del {
        /// The VIP.
        vip: Vip,
        /// The real's address.
        #[arg(value_parser = parse_real)]
        real: IpAddr,
    },
    /// List the real servers of a VIP.
    List {
        /// The VIP.
        vip: Vip,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Builds the daemon's options from flags, the config file's `daemon:`
/// section and defaults, in that order of precedence.
fn run_options(args: RunArgs, socket: PathBuf) -> anyhow::Result<RunOptions> {
    let file = match &args.config {
        Some(path) => {
            Config::load(path)
                .context("invalid configuration; nothing was loaded")?
                .daemon
        }
        None => Default::default(),
    };
    let iface = args
        .iface
        .or(file.interface)
        .context("no interface: give --iface or daemon.interface in the config file")?;
    let mode = match (args.xdp_mode, file.xdp_mode.as_deref()) {
        (Some(m), _) => m,
        (None, Some(s)) => s.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        (None, None) => Mode::Native,
    };
    if let Some(share) = args.min_healthy
        && !(0.0..=1.0).contains(&share)
    {
        bail!("--min-healthy {share} is not between 0.0 and 1.0");
    }
    let pin_dir = if args.no_pin {
        None
    } else {
        Some(
            args.pin_dir
                .or(file.pin_dir)
                .unwrap_or_else(|| pin::DEFAULT_PIN_DIR.into()),
        )
    };
    Ok(RunOptions {
        iface,
        mode: xdp_mode(mode),
        config: args.config,
        socket,
        // root:xlb when an `xlb` group exists, else root only.
        socket_group: args.socket_group.or(file.socket_group).or_else(|| {
            nix::unistd::Group::from_name(DEFAULT_SOCKET_GROUP)
                .ok()
                .flatten()
                .map(|_| DEFAULT_SOCKET_GROUP.to_owned())
        }),
        resolve_timeout: Duration::from_secs(args.resolve_timeout),
        datapath: DataPathOptions {
            flows: args
                .conntrack_size
                .or(file.conntrack_size)
                .unwrap_or(lb_common::FLOWS_DEFAULT),
            new_flow_limit: args.new_flow_limit.or(file.new_flow_limit).unwrap_or(0),
            udp_idle: Duration::from_secs(
                args.udp_idle_timeout
                    .or(file.udp_idle_timeout)
                    .unwrap_or(30),
            ),
            mtu: args.mtu.or(file.mtu),
            tunnel_src_v4: args.tunnel_src.or(file.tunnel_source),
            tunnel_src_v6: args.tunnel_src6.or(file.tunnel_source6),
        },
        pin_dir,
        replace: args.replace,
        state_file: args.state_file,
        metrics: args.metrics_addr.or(file.metrics_address),
        min_healthy: args.min_healthy.or(file.min_healthy).unwrap_or(0.5),
    })
}

async fn set_real(client: &Client, vip: &Vip, real: IpAddr, body: SetReal) -> anyhow::Result<()> {
    let _: VipView = client
        .call(
            Method::PUT,
            &format!("/v1/vips/{}/reals/{real}", vip.path()),
            Some(&body),
        )
        .await?;
    Ok(())
}

async fn set_admin(client: &Client, vip: &Vip, real: IpAddr, admin: Admin) -> anyhow::Result<()> {
    let body = SetReal {
        weight: None,
        admin: Some(admin),
    };
    set_real(client, vip, real, body).await
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Run(args) => daemon::run(run_options(*args, cli.socket)?).await,
        Command::Apply { file } => {
            // Validate locally first: errors name the file and place at once.
            let config = Config::load(&file)?;
            let body = ApplyBody {
                yaml: std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                file: Some(file.display().to_string()),
            };
            let applied: Applied = client.call(Method::PUT, "/v1/desired", Some(&body)).await?;
            println!(
                "applied {}: {} services, {} map writes, {} tables rebuilt",
                file.display(),
                config.desired.services.len(),
                applied.writes,
                applied.tables
            );
            Ok(())
        }
        Command::Status { json } => {
            let status: Status = client.call(Method::GET, "/v1/status", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Teardown {
            pin_dir,
            state_file,
        } => {
            let removed = pin::teardown(&pin_dir)?;
            let _ = std::fs::remove_file(&state_file);
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
        Command::Vip(VipCommand::Add {
            vip,
            scheduler,
            table_size,
            forward,
            check,
        }) => {
            let body = AddVip {
                vip: vip.to_string(),
                scheduler: Some(scheduler.to_string()),
                table_size: Some(table_size),
                forward: Some(forward.to_string()),
                health_check: check.check()?,
            };
            let _: VipView = client.call(Method::POST, "/v1/vips", Some(&body)).await?;
            println!("added VIP {vip} ({forward}, {scheduler})");
            Ok(())
        }
        Command::Vip(VipCommand::Del { vip }) => {
            let () = client
                .call(
                    Method::DELETE,
                    &format!("/v1/vips/{}", vip.path()),
                    None::<&()>,
                )
                .await?;
            println!("removed VIP {vip}");
            Ok(())
        }
        Command::Vip(VipCommand::List { json }) => {
            let vips: Vec<VipView> = client.call(Method::GET, "/v1/vips", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vips)?);
            } else {
                print_vips(&vips);
            }
            Ok(())
        }
        Command::Real(RealCommand::Add { vip, real, weight }) => {
            let body = AddReal {
                addr: real.to_string(),
                weight: Some(weight),
            };
            let view: VipView = client
                .call(
                    Method::POST,
                    &format!("/v1/vips/{}/reals", vip.path()),
                    Some(&body),
                )
                .await?;
            let mac = view
                .reals
                .iter()
                .find(|r| r.addr == real)
                .map_or_else(|| "?".to_owned(), |r| r.mac.clone());
            println!("added real {real} ({mac}) to {vip} with weight {weight}");
            Ok(())
        }
        Command::Real(RealCommand::Set { vip, real, weight }) => {
            let body = SetReal {
                weight: Some(weight),
                admin: None,
            };
            set_real(&client, &vip, real, body).await?;
            println!("real {real} of {vip} now has weight {weight}");
            Ok(())
        }
        Command::Real(RealCommand::Drain { vip, real }) => {
            set_admin(&client, &vip, real, Admin::Drain).await?;
            println!("real {real} of {vip} drains: no new flows, tracked flows stay");
            Ok(())
        }
        Command::Real(RealCommand::Disable { vip, real }) => {
            set_admin(&client, &vip, real, Admin::Disabled).await?;
            println!("real {real} of {vip} is disabled: its flows move to the other reals");
            Ok(())
        }
        Command::Real(RealCommand::Enable { vip, real }) => {
            set_admin(&client, &vip, real, Admin::Enabled).await?;
            println!("real {real} of {vip} is enabled");
            Ok(())
        }
        Command::Real(RealCommand::Del { vip, real }) => {
            let () = client
                .call(
                    Method::DELETE,
                    &format!("/v1/vips/{}/reals/{real}", vip.path()),
                    None::<&()>,
                )
                .await?;
            println!("removed real {real} from {vip}");
            Ok(())
        }
        Command::Real(RealCommand::List { vip, json }) => {
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
                print_vips(std::slice::from_ref(&view));
            }
            Ok(())
        }
        Command::Stats { json } => {
            let stats: Stats = client.call(Method::GET, "/v1/stats", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(())
        }
        Command::Simulate { vip, src, json } => {
            let path = format!(
                "/v1/simulate?vip={}&src={}",
                urlencode(&vip.to_string()),
                urlencode(&src.to_string())
            );
            let sim: Simulated = client
                .call(Method::GET, &path, None::<&()>)
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
    }
}

/// `xlb decap`: attach the decapsulator and run until SIGINT/SIGTERM.
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
    let mode = xdp_mode(args.xdp_mode);
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

fn xdp_mode(mode: Mode) -> XdpMode {
    match mode {
        Mode::Native => XdpMode::Driver,
        Mode::Skb => XdpMode::Skb,
        Mode::Auto => XdpMode::Default,
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_vips(vips: &[VipView]) {
    if vips.is_empty() {
        println!("no virtual services");
        return;
    }
    for v in vips {
        println!(
            "{}  forward={} scheduler={} table={}  packets={} bytes={} flows={}{}",
            v.vip,
            v.forward,
            v.scheduler,
            v.table_size,
            v.packets,
            v.bytes,
            v.flows,
            if v.guarded { "  AVALANCHE GUARD" } else { "" }
        );
        if v.reals.is_empty() {
            println!("  (no reals: packets are dropped and counted as drop_no_real)");
        }
        for r in &v.reals {
            println!(
                "  -> {:<40} weight={:<5} mac={}  packets={} bytes={} flows={}",
                r.addr, r.weight, r.mac, r.packets, r.bytes, r.flows
            );
        }
    }
}

fn print_status(status: &Status) {
    println!(
        "interface {}   reconciles {}",
        status.iface, status.reconciles
    );
    if status.vips.is_empty() {
        println!("no virtual services");
        return;
    }
    for v in &status.vips {
        let view = &v.view;
        println!();
        println!(
            "{}  {} {}{}   packets {}  bytes {}  new flows {}",
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
            view.flows
        );
        println!(
            "  {:<28} {:>6} {:>6} {:<9} {:<7} {:<26} {:>10} {:>12} {:>9}",
            "real",
            "weight",
            "in use",
            "admin",
            "health",
            "last error",
            "packets",
            "bytes",
            "flows"
        );
        for r in &view.reals {
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
            println!(
                "  {:<28} {:>6} {:>6} {:<9} {:<7} {:<26.26} {:>10} {:>12} {:>9}",
                r.addr.to_string(),
                r.weight,
                r.effective_weight
                    .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                r.admin.to_string(),
                health,
                last_error,
                r.packets,
                r.bytes,
                r.flows
            );
        }
    }
}

fn print_stats(stats: &Stats) {
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
    print_vips(&stats.vips);
}
