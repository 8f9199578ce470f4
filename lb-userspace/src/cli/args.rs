//! The command line's shape: subcommands, arguments and flags (clap).

use std::{net::IpAddr, path::PathBuf};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::{
    health::{HealthCheck, ProbeKind},
    model::{Forward, Scheduler, Vip, parse_real},
    pin, realserver,
    settings::{DEFAULT_SOCKET, DEFAULT_STATE_FILE, Mode, Settings},
};

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
        /// Store mode: write only if the fleet's desired state is still at
        /// this revision (`xlb status` shows it); else a conflict, nothing written.
        #[arg(long)]
        if_revision: Option<i64>,
    },
    /// Store mode: the fleet's nodes, their revisions, tables and verdicts;
    /// nodes that differ from the majority are flagged.
    Fleet {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show VIPs, reals, weights, health, where values come from, and counters.
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
        #[arg(required_unless_present = "batch")]
        vip: Option<Vip>,
        /// The client's address and port, e.g. 198.51.100.7:40000.
        #[arg(long, required_unless_present = "batch")]
        src: Option<std::net::SocketAddr>,
        /// Many flows at once: a file with one `VIP SRC` per line (`-`: stdin);
        /// prints `VIP SRC REAL` per line (`-` for no real), in order.
        #[arg(long, conflicts_with_all = ["vip", "src"])]
        batch: Option<PathBuf>,
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
    /// Man pages and shell completions, for packaging (see generate.rs).
    #[command(hide = true)]
    Generate(crate::generate::GenerateArgs),
}

/// Arguments of `xlb run`. Flags win over the config file's `daemon:` section.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (desired state and daemon settings), reloaded on SIGHUP.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The daemon's settings.
    #[command(flatten)]
    pub settings: Settings,
}

/// Arguments of `xlb decap`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DecapArgs {
    /// `xlb decap stats|teardown`; none: run the decapsulator.
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
    /// after `xlb decap` stops (`xlb decap teardown` removes it).
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
    let p = crate::settings::parse_prefix::<IpAddr>(s, 128)?;
    if p.addr.is_ipv4() && p.len > 32 {
        return Err(format!("prefix length '{}' is not 0-32", p.len));
    }
    Ok((p.addr, p.len))
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
    /// The health check these flags describe, if any.
    pub fn check(&self) -> anyhow::Result<Option<HealthCheck>> {
        let Some(kind) = self.kind else {
            let given = [
                ("--check-port", self.port.is_some()),
                ("--check-path", self.path.is_some()),
                ("--check-status", self.status.is_some()),
                ("--check-interval", self.interval_ms.is_some()),
                ("--check-timeout", self.timeout_ms.is_some()),
                ("--check-rise", self.rise.is_some()),
                ("--check-fall", self.fall.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                bail!("{flag} needs --check KIND (tcp, http, udp or none)");
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

/// A VIP and one of its reals.
#[derive(Debug, Args)]
pub struct RealRef {
    /// The VIP.
    pub vip: Vip,
    /// The real's address.
    #[arg(value_parser = parse_real)]
    pub real: IpAddr,
}

/// `xlb real ...`.
#[derive(Debug, Subcommand)]
pub enum RealCommand {
    /// Add a real server to a VIP. The daemon resolves its MAC; a real that
    /// does not answer yet is kept out of the table and asked again.
    Add {
        /// The VIP and the real.
        #[command(flatten)]
        at: RealRef,
        /// Relative weight, 0-65535 (0: no new flows).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
    /// Set a real server's weight by hand (an override: survives reloads and restarts).
    Set {
        /// The VIP and the real.
        #[command(flatten)]
        at: RealRef,
        /// New weight, 0-65535.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
    /// Drain a real (override): no new flows, its tracked flows stay until they end.
    Drain(RealRef),
    /// Disable a real (override): out of the table, its flows move to other reals.
    Disable(RealRef),
    /// Enable a drained or disabled real again (override).
    Enable(RealRef),
    /// Remove what was set by hand on a real: the configuration's values apply again.
    ResetOverride(RealRef),
    /// Remove a real server from a VIP.
    Del(RealRef),
    /// List the real servers of a VIP.
    List {
        /// The VIP.
        vip: Vip,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
