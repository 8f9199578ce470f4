//! The `xlb` command line: `xlb run` is the daemon, every other subcommand is a
//! client of its control API.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;

use crate::{
    api::{AddReal, AddVip, SetReal, Simulated, Stats},
    client::Client,
    daemon::{self, DataPathOptions, RunOptions},
    decap::Decap,
    model::{Forward, Scheduler, Vip, parse_real},
    realserver,
    state::VipView,
};

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";

/// xlb: an XDP layer-4 load balancer (LVS-DR style, Maglev hashing).
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
    /// Run the daemon: load and attach the XDP program, serve the control API.
    Run(RunArgs),
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
    /// Real-server side of TUN mode: decapsulate tunnelled VIP traffic with XDP.
    Decap(DecapArgs),
    /// Prepare (or undo) a real server for DR/TUN: VIPs on lo, ARP and rp_filter sysctls.
    #[command(subcommand)]
    Realserver(RealserverCommand),
    /// Show which real server a flow goes to.
    Simulate {
        /// The VIP, e.g. 203.0.113.10:80/tcp.
        vip: Vip,
        /// The client's address and port, e.g. 198.51.100.7:40000.
        #[arg(long)]
        src: std::net::SocketAddr,
    },
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

/// Arguments of `xlb run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface that receives VIP traffic.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: Mode,
    /// Startup configuration (YAML), applied before the program is attached.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for a real's ARP/NDP answer.
    #[arg(long, default_value_t = 3)]
    pub resolve_timeout: u64,
    /// Connection-tracking table size (flows, all CPUs; ~100 bytes each).
    #[arg(long, default_value_t = lb_common::FLOWS_DEFAULT)]
    pub conntrack_size: u32,
    /// New flows each CPU may add to the conntrack table per second; above it
    /// flows are forwarded by Maglev alone (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub new_flow_limit: u32,
    /// Seconds after which an idle UDP flow is forgotten.
    #[arg(long, default_value_t = 30)]
    pub udp_idle_timeout: u64,
    /// Largest IP packet after encapsulation (default: the interface's MTU).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// IPv4 prefix for tunnel sources, e.g. 192.0.2.0/24 (default: the interface's address).
    #[arg(long, value_parser = parse_v4_prefix)]
    pub tunnel_src: Option<(std::net::Ipv4Addr, u8)>,
    /// IPv6 prefix for tunnel sources, e.g. 2001:db8:ff::/96 (default: the interface's address).
    #[arg(long, value_parser = parse_v6_prefix)]
    pub tunnel_src6: Option<(std::net::Ipv6Addr, u8)>,
}

/// Arguments of `xlb decap`.
#[derive(Debug, Args)]
pub struct DecapArgs {
    /// Interface that receives the balancer's tunnels.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: Mode,
    /// Tunnel endpoint addresses to accept (default: every address of the interface).
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
    /// Log the counters every this many seconds (0: only when stopping).
    #[arg(long, default_value_t = 0)]
    pub report_interval: u64,
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

fn parse_prefix<A: std::str::FromStr>(s: &str, max: u8) -> Result<(A, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not ADDRESS/PREFIX-LENGTH"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an address of the right family"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length '{len}' is not 0-{max}"))?;
    Ok((addr, len))
}

fn parse_v4_prefix(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    parse_prefix(s, 32)
}

fn parse_v6_prefix(s: &str) -> Result<(std::net::Ipv6Addr, u8), String> {
    parse_prefix(s, 128)
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
    /// Change a real server's weight (0 drains it: no new flows, tracked flows stay).
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

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Run(args) => {
            daemon::run(RunOptions {
                iface: args.iface,
                mode: xdp_mode(args.xdp_mode),
                config: args.config,
                socket: cli.socket,
                resolve_timeout: Duration::from_secs(args.resolve_timeout),
                datapath: DataPathOptions {
                    flows: args.conntrack_size,
                    new_flow_limit: args.new_flow_limit,
                    udp_idle: Duration::from_secs(args.udp_idle_timeout),
                    mtu: args.mtu,
                    tunnel_src_v4: args.tunnel_src,
                    tunnel_src_v6: args.tunnel_src6,
                },
            })
            .await
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
        }) => {
            let body = AddVip {
                vip: vip.to_string(),
                scheduler: Some(scheduler.to_string()),
                table_size: Some(table_size),
                forward: Some(forward.to_string()),
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
            let _: VipView = client
                .call(
                    Method::PUT,
                    &format!("/v1/vips/{}/reals/{real}", vip.path()),
                    Some(&SetReal { weight }),
                )
                .await?;
            println!("real {real} of {vip} now has weight {weight}");
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
        Command::Simulate { vip, src } => {
            let path = format!(
                "/v1/simulate?vip={}&src={}",
                urlencode(&vip.to_string()),
                urlencode(&src.to_string())
            );
            let sim: Simulated = client
                .call(Method::GET, &path, None::<&()>)
                .await
                .context("simulate failed")?;
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
    let iface = crate::neighbor::Iface::lookup(&args.iface)
        .with_context(|| format!("cannot use interface {}", args.iface))?;
    let addrs: Vec<IpAddr> = if args.addrs.is_empty() {
        iface.nets.iter().map(|(a, _)| *a).collect()
    } else {
        args.addrs.clone()
    };
    if addrs.is_empty() {
        anyhow::bail!(
            "{} has no addresses; give the tunnel endpoint with --addr",
            args.iface
        );
    }
    let mut decap = Decap::load().context("loading the decap program failed (run as root)")?;
    for a in &addrs {
        decap.add_addr(*a)?;
    }
    decap
        .attach(&args.iface, xdp_mode(args.xdp_mode))
        .with_context(|| {
            format!(
                "attaching XDP to {} failed (another XDP program attached? try --xdp-mode skb)",
                args.iface
            )
        })?;
    tracing::info!(iface = %args.iface, ?addrs, "decapsulating tunnels");
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
            "{}  forward={} scheduler={} table={}  packets={} bytes={} flows={}",
            v.vip, v.forward, v.scheduler, v.table_size, v.packets, v.bytes, v.flows
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
