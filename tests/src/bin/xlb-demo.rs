//! `xlb-demo`: xlb's showcase, run by `./x demo`.
//!
//! Builds a client, a balancer and three real servers in network namespaces on one L2
//! segment, starts `xlb run` on the balancer, configures a VIP through the CLI as an
//! operator would, sends a few hundred HTTP requests from the client to the VIP and
//! reports who answered, the balancer's counters, and the proof that the replies went
//! straight from the reals to the client. Everything is torn down at the end, also on
//! failure and on Ctrl-C. Needs root.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use lb_userspace::state::fmt_mac;
use xlb_tests::capture::FrameTap;
use xlb_tests::harness::{
    self, Daemon, HttpAnswer, LinkCounters, VIP, balanced_topology, real_name,
};
use xlb_tests::netns::unique_prefix;

/// Number of real servers in the demo.
const REALS: usize = 3;

/// The service the demo balances.
const SERVICE: &str = "203.0.113.10:80/tcp";

/// Per-request connect/read timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Widest bar of the chart, in characters.
const BAR_WIDTH: usize = 40;

#[derive(Debug, Parser)]
#[command(about = "xlb demo: HTTP through an XDP load balancer to three real servers")]
struct Args {
    /// HTTP requests to send, one TCP connection each.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    requests: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "xlb-demo creates network namespaces and loads XDP programs: run it as root \
             (./x demo does)"
        );
        return ExitCode::from(2);
    }
    harness::trap_interrupts();
    // Failures are panics with a message (the harness's style): print just the message;
    // the guards then tear everything down while the panic unwinds.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        eprintln!("\nxlb-demo: {msg}\nxlb-demo: tearing down");
    }));
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| run(&args));
    let took = started.elapsed().as_secs_f64();
    match outcome {
        Ok(Ok(())) => {
            println!("\n{}", bold(&format!("demo passed in {took:.1} s")));
            ExitCode::SUCCESS
        }
        Ok(Err(why)) => {
            println!(
                "\n{}",
                bold(&format!("demo FAILED after {took:.1} s: {why}"))
            );
            ExitCode::FAILURE
        }
        Err(_) if harness::interrupted() => {
            eprintln!("xlb-demo: interrupted after {took:.1} s; everything torn down");
            ExitCode::from(130)
        }
        Err(_) => {
            eprintln!("xlb-demo: everything torn down; demo FAILED after {took:.1} s");
            ExitCode::FAILURE
        }
    }
}

/// The demo proper. Panics on a broken setup; returns `Err` when the balancing itself
/// fell short (a failed request, a real with no traffic).
fn run(args: &Args) -> Result<(), String> {
    println!(
        "{}",
        bold("xlb demo: an XDP load balancer, three real servers, direct server return")
    );
    println!(
        "
  client 198.51.100.2 ─┐                      ┌─ rs1 198.51.100.11
  lb     198.51.100.1 ─┼── one L2 segment ────┼─ rs2 198.51.100.12
    (xlb on eth0)      │   (bridge in `sw`)   └─ rs3 198.51.100.13
                       │   every real holds VIP 203.0.113.10 on lo
  request: client → lb (XDP rewrites the MACs, XDP_TX) → real
  reply:   real → client, straight, from the VIP"
    );

    section(1, "network namespaces");
    let t = Instant::now();
    let prefix = unique_prefix("dmo");
    let topo = balanced_topology(&prefix, REALS);
    println!(
        "  {prefix}-{{client,lb,rs1,rs2,rs3,sw}} ready in {:.1} s; lb eth0 MAC {}",
        t.elapsed().as_secs_f64(),
        fmt_mac(&topo.lb.mac)
    );
    for (i, real) in topo.reals.iter().enumerate() {
        println!(
            "  {} {}  MAC {}",
            real_name(i),
            real.ipv4,
            fmt_mac(&real.mac)
        );
    }

    section(2, "real servers");
    let server_args = ["--http", "0.0.0.0:80", "--udp", "0.0.0.0:9000"];
    for i in 0..REALS {
        println!(
            "  {}# xlb-testsrv --name {} {}",
            real_name(i),
            real_name(i),
            server_args.join(" ")
        );
    }
    let servers = harness::start_reals(&topo, &server_args);
    println!("  all {} answered `ready`", servers.len());

    section(3, "the balancer daemon");
    println!("  lb# xlb run --iface eth0");
    let t = Instant::now();
    let mut daemon = Daemon::start(&topo.lb.ns, "eth0");
    println!(
        "  API up in {:.1} s on {}; its log:",
        t.elapsed().as_secs_f64(),
        daemon.socket().display()
    );
    print_indented(&daemon.log(), "    | ");

    section(4, "configuration, through the CLI");
    operator(&daemon, &["vip", "add", SERVICE]);
    for real in &topo.reals {
        let addr = real.ipv4.to_string();
        operator(&daemon, &["real", "add", SERVICE, &addr]);
    }

    section(5, "traffic");
    let requests = usize::try_from(args.requests).expect("u32 fits usize");
    let target = SocketAddr::from((VIP, 80));
    println!(
        "  client: {requests} × GET http://{VIP}/ (one TCP connection each, {}s timeout)",
        REQUEST_TIMEOUT.as_secs()
    );
    let lb_before = LinkCounters::read(&topo.lb);
    let tap = FrameTap::start(&topo.client, VIP);
    let t = Instant::now();
    let results: Vec<Result<HttpAnswer, String>> = topo.client.ns.run_in(|| {
        let mut results = Vec::with_capacity(requests);
        for _ in 0..requests {
            if harness::interrupted() {
                break;
            }
            results.push(harness::http_get(target, REQUEST_TIMEOUT));
        }
        results
    });
    harness::check_interrupted();
    let took = t.elapsed();
    // The last FINs and ACKs are still on the wire when the last read returns.
    std::thread::sleep(Duration::from_millis(200));
    let frames = tap.finish();
    let lb_delta = LinkCounters::read(&topo.lb).since(&lb_before);

    let ok: Vec<&HttpAnswer> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "  sent {}, ok {}, failed {} in {:.2} s ({:.0} requests/s)",
        results.len(),
        ok.len(),
        failed.len(),
        took.as_secs_f64(),
        results.len() as f64 / took.as_secs_f64().max(1e-9)
    );
    for why in failed.iter().take(5) {
        println!("    failure: {why}");
    }
    let mut per_real: BTreeMap<String, usize> =
        (0..REALS).map(|i| (real_name(i), 0usize)).collect();
    for answer in &ok {
        *per_real.entry(answer.real.clone()).or_default() += 1;
    }
    println!("\n  answered by:");
    let max = per_real.values().copied().max().unwrap_or(0).max(1);
    for (i, real) in topo.reals.iter().enumerate() {
        let count = per_real[&real_name(i)];
        println!(
            "    {} {:<14} {:<width$} {count:>5}  {:>5.1}%",
            real_name(i),
            real.ipv4,
            "█".repeat(count * BAR_WIDTH / max),
            100.0 * count as f64 / ok.len().max(1) as f64,
            width = BAR_WIDTH
        );
    }

    section(6, "what the balancer saw");
    operator(&daemon, &["vip", "list"]);
    operator(&daemon, &["stats"]);

    section(7, "direct server return");
    println!("  frames the client received from {VIP}, by source MAC (AF_PACKET tap on its eth0):");
    for (i, real) in topo.reals.iter().enumerate() {
        println!(
            "    {} {}  {:>6}",
            real_name(i),
            fmt_mac(&real.mac),
            frames.from_peer_via(&real.mac)
        );
    }
    let via_lb = frames.from_peer_via(&topo.lb.mac);
    println!("    lb  {}  {via_lb:>6}", fmt_mac(&topo.lb.mac));
    let other: u64 = frames.from_peer_total()
        - via_lb
        - topo
            .reals
            .iter()
            .map(|r| frames.from_peer_via(&r.mac))
            .sum::<u64>();
    if other > 0 {
        println!("    other   {other:>6}");
    }
    println!(
        "  lb eth0 meanwhile: received {} packets, sent {} (XDP_TX counts as sent)",
        lb_delta.rx_packets, lb_delta.tx_packets
    );
    println!(
        "  → the balancer only carried the client's {} packets to the VIP; the {} reply frames\n    \
         went from the reals straight to the client (through the balancer it would have\n    \
         received {}+ packets, and they would carry its MAC).",
        frames.to_peer,
        frames.from_peer_total(),
        frames.to_peer + frames.from_peer_total()
    );

    section(8, "where does a flow go?");
    let first = ok.first().copied();
    let mut simulate_ok = true;
    if let Some(first) = first {
        let src = format!("{}:{}", topo.client.ipv4, first.local_port);
        let out = operator(&daemon, &["simulate", SERVICE, "--src", &src]);
        let predicted = out
            .split_whitespace()
            .last()
            .and_then(|w| w.parse::<IpAddr>().ok())
            .and_then(|ip| topo.reals.iter().position(|r| IpAddr::V4(r.ipv4) == ip))
            .map(real_name);
        simulate_ok = predicted.as_deref() == Some(first.real.as_str());
        println!(
            "  the first request came from {src} and was answered by {}: {}",
            first.real,
            if simulate_ok {
                "the same real ✓"
            } else {
                "a different real ✗"
            }
        );
    }

    section(9, "teardown");
    let t = Instant::now();
    let status = daemon.stop();
    println!(
        "  xlb run stopped ({}); its last words:",
        status.map_or_else(|| "not reaped".to_owned(), |s| s.to_string())
    );
    let log = daemon.log();
    let lines: Vec<&str> = log.lines().collect();
    print_indented(&lines[lines.len().saturating_sub(2)..].join("\n"), "    | ");
    drop(daemon);
    drop(servers);
    drop(topo);
    println!(
        "  servers stopped, namespaces {prefix}-* deleted in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let silent: Vec<&String> = per_real
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(name, _)| name)
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "{} of {} requests failed",
            failed.len(),
            results.len()
        ));
    }
    if !silent.is_empty() {
        return Err(format!("no request reached {silent:?}"));
    }
    if via_lb > 0 {
        return Err(format!("{via_lb} reply frames came through the balancer"));
    }
    if !simulate_ok {
        return Err("`xlb simulate` disagreed with the real that answered".to_owned());
    }
    Ok(())
}

/// Prints `lb# xlb ARGS`, runs it, prints its output indented, and returns it; a
/// failing command ends the demo.
fn operator(daemon: &Daemon, args: &[&str]) -> String {
    println!("\n  lb# xlb {}", args.join(" "));
    let out = daemon.cli_ok(args);
    print_indented(out.trim_end(), "    ");
    out
}

fn print_indented(text: &str, prefix: &str) {
    for line in text.lines() {
        println!("{prefix}{line}");
    }
}

fn section(n: u32, title: &str) {
    println!("\n{}", bold(&format!("[{n}] {title}")));
}

/// Bold on a terminal, plain otherwise (logs, CI).
fn bold(text: &str) -> String {
    if std::io::stdout().is_terminal() {
        format!("\x1b[1m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}
