//! The command line's shape: subcommands, arguments and flags (clap).

use std::{net::IpAddr, path::PathBuf};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::{
    health::{CheckField, HealthCheck, ProbeKind, TcpMode, Via},
    model::{Forward, Scheduler, Vip, parse_real},
    pin, realserver,
    settings::{DEFAULT_SOCKET, DEFAULT_STATE_FILE, Mode, Settings},
};

/// The exit codes, as `xlb --help` shows them (docs/operations.md has the same table).
pub const EXIT_CODES: &str = "\
Exit status:
  0  done
  1  any other failure (the daemon could not write its maps, a system call failed, ...)
  2  bad input: an argument, flag or file is invalid (what `xlb check` refuses; clap's usage
     errors too)
  3  the daemon is unreachable: no socket, no permission on it, nothing answering, no answer in
     time, shutting down
  4  refused by the daemon: valid on paper, not in the running state (unknown or existing VIP
     or real, a real not on the segment, ...); `xlb teardown` while a daemon runs on the pins,
     `xlb decap teardown` while `xlb decap` runs on them

With --json, stdout holds one JSON document: the answer, or on failure
{\"error\": {\"kind\": \"bad_input|unreachable|refused|other\", \"message\": \"...\"}}.";

/// xlb: an XDP layer-4 load balancer (LVS-DR / LVS-TUN style, Maglev hashing).
#[derive(Debug, Parser)]
#[command(name = "xlb", version = crate::VERSION, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print JSON on stdout: the answer, or an error as {"error": {"kind", "message"}}.
    #[arg(long, global = true)]
    pub json: bool,
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
        #[arg(long, allow_negative_numbers = true, value_parser = unsigned::<i64, 0>)]
        if_revision: Option<i64>,
        /// Print what would change (VIPs and reals added, removed, changed) and apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a configuration file without a daemon (what the daemon's load checks).
    Check {
        /// The YAML file.
        file: PathBuf,
    },
    /// Store mode: the fleet's nodes, their revisions, tables and verdicts;
    /// nodes that differ from the majority are flagged.
    Fleet,
    /// Print the running desired state as a configuration file `xlb apply` takes back
    /// (the base: overrides set by hand are not in it and stay in the daemon).
    Save,
    /// Show VIPs, reals, weights, health, where values come from, the last reload, and counters.
    Status,
    /// Manage virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Manage the real servers of a virtual service.
    #[command(subcommand)]
    Real(RealCommand),
    /// Show the balancer's counters (since the last `--zero`).
    Stats {
        /// Zero the counters `xlb stats`, `status` and `vip list` show (the metrics keep counting).
        #[arg(long, conflicts_with = "rate")]
        zero: bool,
        /// Show rates (packets/s, bytes/s, new flows/s) per VIP and real over --interval.
        #[arg(long)]
        rate: bool,
        /// Seconds over which --rate measures.
        #[arg(
            long,
            default_value = "1",
            requires = "rate",
            allow_negative_numbers = true,
            value_parser = parse_interval
        )]
        interval: f64,
    },
    /// A live view of every VIP and real: rates, active flows, health, weight
    /// (keys: p b f a n sort, r reverses, q quits).
    Top {
        /// Seconds between refreshes.
        #[arg(
            long,
            default_value = "1",
            allow_negative_numbers = true,
            value_parser = parse_interval
        )]
        interval: f64,
    },
    /// Show which real server a flow goes to.
    Simulate {
        /// The VIP, e.g. 203.0.113.10:80/tcp.
        #[arg(required_unless_present = "batch")]
        vip: Option<Vip>,
        /// The client's address and port, e.g. 198.51.100.7:40000.
        #[arg(long, required_unless_present = "batch", value_parser = crate::settings::parse_socket_addr)]
        src: Option<std::net::SocketAddr>,
        /// Many flows at once: a file with one `VIP SRC` per line (`-`: stdin);
        /// prints `VIP SRC REAL` per line (`-` for no real), in order.
        #[arg(long, conflicts_with_all = ["vip", "src"])]
        batch: Option<PathBuf>,
    },
    /// Take this balancer out of the routers' choice (withdraw its VIPs),
    /// keep forwarding what still arrives, and wait until it is safe to stop.
    Drain(super::node::DrainArgs),
    /// Exit 0 when this balancer can take traffic (for keepalived's vrrp_script).
    Ready(super::node::ReadyArgs),
    /// Record the VRRP role keepalived entered (for its notify_* hooks).
    Role(super::node::RoleArgs),
    /// Remove a pinned data path (detaches the program, drops tracked flows).
    Teardown {
        /// The pin directory the daemon used.
        #[arg(long, default_value = pin::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The state file the daemon used.
        #[arg(long, default_value = DEFAULT_STATE_FILE)]
        state_file: PathBuf,
        /// Detach the data path even while a daemon runs on it (refused otherwise).
        #[arg(long)]
        force: bool,
    },
    /// Real-server side of TUN mode: decapsulate tunnelled VIP traffic with XDP.
    Decap(DecapArgs),
    /// Prepare (or undo) a real server for DR/TUN: VIPs on lo, ARP and rp_filter sysctls.
    #[command(subcommand)]
    Realserver(RealserverCommand),
    /// Man pages and shell completions, for packaging: `xlb generate man DIR`,
    /// `xlb generate completions SHELL`.
    #[command(hide = true)]
    Generate(crate::generate::GenerateArgs),
}

/// A measuring interval in seconds: 0.1 to 3600.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 3600")),
    }
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
    /// Tunnel endpoint addresses to accept (default: every address of the interface);
    /// at most 64 per address family.
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
    /// Log the counters every this many seconds (0: only when stopping).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = unsigned::<u64, 0>)]
    pub report_interval: u64,
    /// Serve the counters as Prometheus metrics here, e.g. 127.0.0.1:9815.
    #[arg(long = "metrics-addr", value_parser = crate::settings::parse_socket_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Accept tunnels only from this source prefix, e.g. the balancers'
    /// --tunnel-src 192.0.2.0/24 (repeat for several, at most 64 per address
    /// family). Without it every source is accepted (and a warning is logged).
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
        /// The pin directory `xlb decap` uses.
        #[arg(long, default_value = crate::decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach the pinned decapsulator and remove its pins (stop `xlb decap` first).
    Teardown {
        /// The pin directory `xlb decap` uses.
        #[arg(long, default_value = crate::decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Detach it even while `xlb decap` runs on it (refused otherwise).
        #[arg(long)]
        force: bool,
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

/// A VIP address for `xlb realserver setup --vip`: refused when it can never
/// be a service address (loopback, multicast, ...), as everywhere else.
fn parse_vip_addr(s: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address"))?;
    match crate::desired::unusable(addr) {
        Some(why) => Err(why.to_owned()),
        None => Ok(addr),
    }
}

/// `xlb realserver ...`.
#[derive(Debug, Subcommand)]
pub enum RealserverCommand {
    /// Put VIPs on lo and set arp_ignore=1, arp_announce=2, rp_filter=2.
    Setup {
        /// A VIP address this real serves (repeat for several).
        #[arg(long = "vip", required = true, value_parser = parse_vip_addr)]
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
    /// Probe kind for the VIP's reals: tcp, http, https, udp or none.
    #[arg(long = "check", value_parser = parse_kind)]
    pub kind: Option<ProbeKind>,
    /// Port to probe (default: the VIP's port).
    #[arg(long = "check-port", allow_negative_numbers = true, value_parser = parse_check_port)]
    pub port: Option<u16>,
    /// Where probes go: real (the real's address) or vip (a TCP SYN to the
    /// VIP through the tunnel, TUN, or at the real's MAC, DR; tcp checks only).
    #[arg(long = "check-via", value_parser = clap::builder::ValueParser::new(str::parse::<Via>))]
    pub via: Option<Via>,
    /// How a tcp check probes: connect (a full handshake, then a reset; the
    /// default) or syn (a half-open SYN from a raw socket: cheaper, needs
    /// CAP_NET_RAW at start-up).
    #[arg(long = "check-mode", value_parser = clap::builder::ValueParser::new(str::parse::<TcpMode>))]
    pub mode: Option<TcpMode>,
    /// HTTP path.
    #[arg(long = "check-path")]
    pub path: Option<String>,
    /// Accepted HTTP statuses, e.g. 200-399.
    #[arg(long = "check-status")]
    pub status: Option<String>,
    /// Milliseconds between probes.
    #[arg(long = "check-interval", allow_negative_numbers = true, value_parser = unsigned::<u64, { crate::health::MIN_INTERVAL_MS }>)]
    pub interval_ms: Option<u64>,
    /// Probe timeout, milliseconds [default: 1000, or the interval when shorter].
    #[arg(long = "check-timeout", allow_negative_numbers = true, value_parser = unsigned::<u64, 1>)]
    pub timeout_ms: Option<u64>,
    /// Successes that bring a real back.
    #[arg(long = "check-rise", allow_negative_numbers = true, value_parser = unsigned::<u32, 1>)]
    pub rise: Option<u32>,
    /// Failures that take a real out.
    #[arg(long = "check-fall", allow_negative_numbers = true, value_parser = unsigned::<u32, 1>)]
    pub fall: Option<u32>,
}

/// A whole number for a numeric flag. Clap reads these flags with
/// `allow_negative_numbers`, so `-1` reaches here as a value (rather than as
/// an unknown flag, while a mistyped flag is still one) and is refused as out
/// of range, naming the flag's least value `MIN`; a value from 0 up is
/// checked where it is used, with the message the API and the file give.
fn unsigned<T, const MIN: u64>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match s.parse::<i128>() {
        Ok(v) if v < 0 => Err(format!("must be at least {MIN}, not {s}")),
        // A number too large for the flag keeps the parser's own message.
        Ok(_) => s.parse().map_err(|e: T::Err| e.to_string()),
        Err(_) => Err("expected a whole number".to_owned()),
    }
}

/// A real's weight, 0-65535: a number out of range, a negative one too,
/// names the range; anything else is not a number at all.
fn parse_weight(s: &str) -> Result<u32, String> {
    match s.parse::<i128>() {
        Ok(v) => u32::try_from(v)
            .ok()
            .filter(|w| *w <= 65535)
            .ok_or_else(|| format!("{v} is not in 0..=65535")),
        Err(_) => Err("expected a whole number from 0 to 65535".to_owned()),
    }
}

/// A number of seconds (its range is checked where it is used).
pub(super) fn parse_seconds(s: &str) -> Result<f64, String> {
    s.parse()
        .map_err(|_| "expected a number of seconds, e.g. 2 or 0.5".to_owned())
}

/// A port to probe, 1-65535, refused with the text the health check's own
/// validation gives (a port of 0 or over 65535 alike).
fn parse_check_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(crate::health::bad_port(s)),
    }
}

fn parse_kind(s: &str) -> Result<ProbeKind, String> {
    match s {
        "tcp" => Ok(ProbeKind::Tcp),
        "http" => Ok(ProbeKind::Http),
        "https" => Ok(ProbeKind::Https),
        "udp" => Ok(ProbeKind::Udp),
        "none" => Ok(ProbeKind::None),
        _ => Err(format!(
            "'{s}' is not tcp, http, https, udp or none (exec checks are set in the configuration file or the API)"
        )),
    }
}

impl CheckArgs {
    /// The health check these flags describe, if any.
    pub fn check(&self) -> anyhow::Result<Option<HealthCheck>> {
        let given = [
            ("--check-port", self.port.is_some()),
            ("--check-via", self.via.is_some()),
            ("--check-mode", self.mode.is_some()),
            ("--check-path", self.path.is_some()),
            ("--check-status", self.status.is_some()),
            ("--check-interval", self.interval_ms.is_some()),
            ("--check-timeout", self.timeout_ms.is_some()),
            ("--check-rise", self.rise.is_some()),
            ("--check-fall", self.fall.is_some()),
        ];
        let first = given.iter().find(|(_, set)| *set).map(|(flag, _)| flag);
        let Some(kind) = self.kind else {
            if let Some(flag) = first {
                bail!("{flag} needs --check KIND (tcp, http, https, udp or none)");
            }
            return Ok(None);
        };
        if let (ProbeKind::None, Some(flag)) = (kind, first) {
            bail!("{flag} has no effect with --check none (its reals are not probed)");
        }
        let d = HealthCheck::default();
        let interval_ms = self.interval_ms.unwrap_or(d.interval_ms);
        let c = HealthCheck {
            kind,
            port: self.port,
            via: self.via.unwrap_or(d.via),
            mode: self.mode.unwrap_or(d.mode),
            path: self.path.clone().unwrap_or(d.path),
            expect_status: self.status.clone().unwrap_or(d.expect_status),
            interval_ms,
            timeout_ms: self
                .timeout_ms
                .unwrap_or_else(|| crate::health::defaults::timeout_ms(interval_ms)),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            ..d
        };
        c.validate().map_err(|e| match check_flag(e.field) {
            Some(flag) => anyhow::anyhow!("health check: {e} ({flag})"),
            None => anyhow::anyhow!("health check: {e}"),
        })?;
        Ok(Some(c))
    }
}

/// The flag of `xlb vip add|set` that sets `field`, so a command-line error
/// points at what to change; none for the fields only the configuration file
/// and the API set (their defaults are valid, so the flags never trip them).
fn check_flag(field: CheckField) -> Option<&'static str> {
    use CheckField as F;
    match field {
        F::Port => Some("--check-port"),
        F::Via => Some("--check-via"),
        F::Mode => Some("--check-mode"),
        F::IntervalMs => Some("--check-interval"),
        F::TimeoutMs => Some("--check-timeout"),
        F::Rise => Some("--check-rise"),
        F::Fall => Some("--check-fall"),
        F::Path => Some("--check-path"),
        F::ExpectStatus => Some("--check-status"),
        F::JitterPercent
        | F::Host
        | F::Sni
        | F::Command
        | F::NotifyUp
        | F::NotifyDown
        | F::NotifyTimeoutMs
        | F::SlowStartMs => None,
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
        #[arg(
            long,
            default_value_t = lb_common::RING_SIZE_DEFAULT,
            allow_negative_numbers = true,
            value_parser = unsigned::<u32, 2>
        )]
        table_size: u32,
        /// dr (MAC rewrite, reals on this segment) or tun (IPIP/IP6IP6/4in6).
        #[arg(long, default_value = "dr")]
        forward: Forward,
        /// Health check of the VIP's reals.
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Change a virtual service's scheduler, table size or health check in place:
    /// its reals and established flows stay.
    Set {
        /// The VIP.
        vip: Vip,
        /// maglev (5-tuple) or maglev-src (source address only).
        #[arg(long)]
        scheduler: Option<Scheduler>,
        /// Maglev table size (a prime).
        #[arg(long, allow_negative_numbers = true, value_parser = unsigned::<u32, 2>)]
        table_size: Option<u32>,
        /// Health check of the VIP's reals (replaces the one it has; --check none: no probes).
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Remove a virtual service and forget its reals.
    Del {
        /// The VIP.
        vip: Vip,
    },
    /// List virtual services.
    List,
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
        #[arg(
            long,
            default_value_t = 1,
            allow_negative_numbers = true,
            value_parser = parse_weight
        )]
        weight: u32,
    },
    /// Set a real server's weight by hand (an override: survives reloads and restarts).
    Set {
        /// The VIP and the real.
        #[command(flatten)]
        at: RealRef,
        /// New weight, 0-65535.
        #[arg(
            long,
            allow_negative_numbers = true,
            value_parser = parse_weight
        )]
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
    /// List the real servers of a VIP: weight, admin state, health, last error,
    /// active flows, and where each value comes from.
    List {
        /// The VIP.
        vip: Vip,
    },
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory as _;

    use super::*;

    /// The `--check-*` flags of `xlb vip SUBCOMMAND` (`--check` itself sets the kind).
    fn check_flags(subcommand: &str) -> BTreeSet<String> {
        let cli = Cli::command();
        let vip = cli.find_subcommand("vip").expect("xlb vip");
        let sub = vip.find_subcommand(subcommand).expect(subcommand);
        sub.get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| l.starts_with("check-"))
            .map(|l| format!("--{l}"))
            .collect()
    }

    #[test]
    fn every_check_field_maps_to_a_flag_of_vip_add_and_set_or_none_sets_it() {
        let mapped: BTreeSet<String> = CheckField::ALL
            .iter()
            .filter_map(|&f| check_flag(f))
            .map(str::to_owned)
            .collect();
        // Each flag names exactly one field, and every field a flag sets has it.
        let with_flag = CheckField::ALL
            .iter()
            .filter(|&&f| check_flag(f).is_some())
            .count();
        assert_eq!(
            mapped.len(),
            with_flag,
            "two fields share a flag: {mapped:?}"
        );
        for sub in ["add", "set"] {
            assert_eq!(check_flags(sub), mapped, "xlb vip {sub}: flags vs fields");
        }
    }

    #[test]
    fn a_refused_check_flag_is_named_in_the_error() {
        let tcp = || CheckArgs {
            kind: Some(ProbeKind::Tcp),
            port: None,
            via: None,
            mode: None,
            path: None,
            status: None,
            interval_ms: None,
            timeout_ms: None,
            rise: None,
            fall: None,
        };
        let http = || CheckArgs {
            kind: Some(ProbeKind::Http),
            ..tcp()
        };
        let cases = [
            (
                CheckArgs {
                    port: Some(0),
                    ..tcp()
                },
                "port must be 1-65535, not 0 (--check-port)",
            ),
            (
                CheckArgs {
                    via: Some(Via::Vip),
                    ..http()
                },
                "serves kind tcp only, not http (--check-via)",
            ),
            (
                CheckArgs {
                    mode: Some(TcpMode::Syn),
                    ..http()
                },
                "serves kind tcp only, not http (--check-mode)",
            ),
            (
                CheckArgs {
                    interval_ms: Some(10),
                    ..tcp()
                },
                "interval_ms must be at least 100, not 10 (--check-interval)",
            ),
            (
                CheckArgs {
                    timeout_ms: Some(0),
                    ..tcp()
                },
                "timeout_ms must be between 1 and interval_ms (2000), not 0 (--check-timeout)",
            ),
            (
                CheckArgs {
                    rise: Some(0),
                    ..tcp()
                },
                "rise must be at least 1, not 0 (--check-rise)",
            ),
            (
                CheckArgs {
                    fall: Some(0),
                    ..tcp()
                },
                "fall must be at least 1, not 0 (--check-fall)",
            ),
            (
                CheckArgs {
                    path: Some("x".into()),
                    ..http()
                },
                "path 'x' must start with / (--check-path)",
            ),
            (
                CheckArgs {
                    status: Some("2xx".into()),
                    ..http()
                },
                "expect_status '2xx' is not a status (200) or a range (200-399) (--check-status)",
            ),
        ];
        for (args, tail) in cases {
            let message = args.check().expect_err(tail).to_string();
            assert!(
                message.starts_with("health check: ") && message.ends_with(tail),
                "{message:?} does not end with {tail:?}"
            );
        }
    }

    #[test]
    fn a_negative_number_is_out_of_range_and_a_mistyped_flag_still_a_flag() {
        let vip = "203.0.113.10:80/tcp";
        let real = ["real", "add", vip, "198.51.100.11"];
        let check = ["vip", "add", vip, "--check", "tcp"];
        let cases: [(Vec<&str>, &str); 14] = [
            (
                [&real[..], &["--weight", "-1"]].concat(),
                "invalid value '-1' for '--weight <WEIGHT>': -1 is not in 0..=65535",
            ),
            (
                [&check[..], &["--check-port", "-1"]].concat(),
                "invalid value '-1' for '--check-port <PORT>': port must be 1-65535, not -1",
            ),
            (
                [&check[..], &["--check-interval", "-5"]].concat(),
                "invalid value '-5' for '--check-interval <INTERVAL_MS>': must be at least 100, \
                 not -5",
            ),
            (
                [&check[..], &["--check-timeout", "-1"]].concat(),
                "invalid value '-1' for '--check-timeout <TIMEOUT_MS>': must be at least 1, not -1",
            ),
            (
                [&check[..], &["--check-rise", "-1"]].concat(),
                "invalid value '-1' for '--check-rise <RISE>': must be at least 1, not -1",
            ),
            (
                [&check[..], &["--check-fall", "-2"]].concat(),
                "invalid value '-2' for '--check-fall <FALL>': must be at least 1, not -2",
            ),
            (
                vec!["vip", "set", vip, "--table-size", "-7"],
                "invalid value '-7' for '--table-size <TABLE_SIZE>': must be at least 2, not -7",
            ),
            (
                vec!["stats", "--rate", "--interval", "-1"],
                "invalid value '-1' for '--interval <INTERVAL>': '-1' is not a number of seconds \
                 from 0.1 to 3600",
            ),
            (
                vec!["apply", "--if-revision", "-1", "x.yaml"],
                "invalid value '-1' for '--if-revision <IF_REVISION>': must be at least 0, not -1",
            ),
            (
                vec!["decap", "--iface", "eth0", "--report-interval", "-1"],
                "invalid value '-1' for '--report-interval <REPORT_INTERVAL>': must be at least \
                 0, not -1",
            ),
            (
                vec!["run", "--udp-idle-timeout", "-1"],
                "invalid value '-1' for '--udp-idle-timeout <UDP_IDLE_TIMEOUT>': -1 is not \
                 between 1 and 86400",
            ),
            (
                vec!["run", "--new-flow-limit", "-1"],
                "invalid value '-1' for '--new-flow-limit <NEW_FLOW_LIMIT>': -1 is not between \
                 0 and 4294967295",
            ),
            // A mistyped flag after a numeric one is not taken for its value.
            (
                [&real[..], &["--weight", "-x"]].concat(),
                "unexpected argument '-x' found",
            ),
            (
                [&real[..], &["--weight", "--wieght"]].concat(),
                "unexpected argument '--wieght' found",
            ),
        ];
        for (args, want) in cases {
            let err = Cli::try_parse_from(std::iter::once("xlb").chain(args.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let text = err.to_string();
            assert_eq!(
                text.lines().next(),
                Some(format!("error: {want}").as_str()),
                "{args:?}"
            );
        }
        // The drain's seconds are checked where they are used, a negative one too.
        let cli = Cli::try_parse_from(["xlb", "drain", "--quiet", "-1"]).expect("a number");
        assert!(matches!(cli.command, Command::Drain(ref a) if a.quiet == -1.0));
    }

    /// A word where a number belongs says what kind of number, never a
    /// parser's "invalid digit found in string".
    #[test]
    fn a_word_where_a_number_belongs_says_which_number() {
        let vip = "203.0.113.10:80/tcp";
        for (args, want) in [
            (
                vec!["real", "add", vip, "198.51.100.11", "--weight", "heavy"],
                "invalid value 'heavy' for '--weight <WEIGHT>': expected a whole number from 0 \
                 to 65535",
            ),
            (
                vec!["real", "set", vip, "198.51.100.11", "--weight", "70000"],
                "invalid value '70000' for '--weight <WEIGHT>': 70000 is not in 0..=65535",
            ),
            (
                vec![
                    "vip",
                    "add",
                    vip,
                    "--check",
                    "tcp",
                    "--check-interval",
                    "2s",
                ],
                "invalid value '2s' for '--check-interval <INTERVAL_MS>': expected a whole number",
            ),
            (
                vec!["apply", "--if-revision", "abc", "x.yaml"],
                "invalid value 'abc' for '--if-revision <IF_REVISION>': expected a whole number",
            ),
            (
                vec!["drain", "--timeout", "abc"],
                "invalid value 'abc' for '--timeout <TIMEOUT>': expected a number of seconds, \
                 e.g. 2 or 0.5",
            ),
        ] {
            let err = Cli::try_parse_from(std::iter::once("xlb").chain(args.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert_eq!(
                err.to_string().lines().next(),
                Some(format!("error: {want}").as_str()),
                "{args:?}"
            );
        }
    }
}
