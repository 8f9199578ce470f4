//! The `xlb` command line: `xlb run` is the daemon, every other subcommand is a
//! client of its control API.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;

use crate::{
    api::{AddReal, AddVip, Simulated, Stats},
    client::Client,
    daemon::{self, RunOptions},
    model::{Scheduler, Vip, parse_real},
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
                mode: match args.xdp_mode {
                    Mode::Native => XdpMode::Driver,
                    Mode::Skb => XdpMode::Skb,
                    Mode::Auto => XdpMode::Default,
                },
                config: args.config,
                socket: cli.socket,
                resolve_timeout: Duration::from_secs(args.resolve_timeout),
            })
            .await
        }
        Command::Vip(VipCommand::Add {
            vip,
            scheduler,
            table_size,
        }) => {
            let body = AddVip {
                vip: vip.to_string(),
                scheduler: Some(scheduler.to_string()),
                table_size: Some(table_size),
            };
            let _: VipView = client.call(Method::POST, "/v1/vips", Some(&body)).await?;
            println!("added VIP {vip}");
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
            "{}  scheduler={} table={}  packets={} bytes={}",
            v.vip, v.scheduler, v.table_size, v.packets, v.bytes
        );
        if v.reals.is_empty() {
            println!("  (no reals: packets are dropped and counted as drop_no_real)");
        }
        for r in &v.reals {
            println!(
                "  -> {:<40} weight={:<5} mac={}  packets={} bytes={}",
                r.addr, r.weight, r.mac, r.packets, r.bytes
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
    print_vips(&stats.vips);
}
