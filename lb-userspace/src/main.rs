//! The `xlb` binary: parse arguments, set up logging, hand over to the library.

use std::io::IsTerminal as _;

use clap::Parser as _;
use lb_userspace::{
    cli::{Cli, Command, error},
    config::Config,
    settings::LogFormat,
};
use tracing_subscriber::EnvFilter;

/// The daemon's log format: `--log-format`, else the config file's
/// `daemon.log_format` (a file that does not load is reported by the daemon).
fn log_format(cli: &Cli) -> LogFormat {
    let Command::Run(args) = &cli.command else {
        return LogFormat::Plain;
    };
    args.settings
        .log_format
        .or_else(|| {
            let config = Config::load(args.config.as_deref()?).ok()?;
            config.daemon.log_format
        })
        .unwrap_or(LogFormat::Plain)
}

/// A client command writing into a closed pipe (`xlb stats | head -1`) ends
/// by SIGPIPE as other tools do, instead of panicking in `println!`. Rust
/// ignores SIGPIPE, and it stays ignored: a daemon that closes the control
/// socket early (a body it refuses before reading it) must give the client an
/// error to report, not kill it. Only a failed write to stdout raises it.
fn end_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            use nix::sys::signal::{SigHandler, Signal, raise, signal};
            // SAFETY: restoring SIGPIPE's default action; no handler runs.
            let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
            let _ = raise(Signal::SIGPIPE);
        }
        default(info);
    }));
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return error::usage(&err),
    };
    // The daemon and the decapsulator (whose counter reports are info lines) log at
    // info by default; client commands only print results.
    let long_running = matches!(cli.command, Command::Run(_) | Command::Decap(_));
    if !long_running {
        end_quietly_on_a_closed_stdout();
    }
    // netlink-packet-route warns about every kernel attribute newer than itself
    // (IFLA_INET6_CONF on 6.x kernels): noise on the operator's stderr, not a fault.
    let level = if long_running { "info" } else { "warn" };
    let default = format!("{level},netlink_packet_route=error");
    let filter = EnvFilter::try_from_env("XLB_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log_format(&cli) {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => {
            // journald (and any log collector) stamps lines itself.
            let terminal =
                std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_none();
            let builder = builder.with_ansi(terminal);
            if terminal {
                builder.init();
            } else {
                builder.without_time().init();
            }
        }
    }
    let json = cli.json;
    match lb_userspace::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => error::exit(&err, json),
    }
}
