//! The `xlb` binary: parse arguments, set up logging, hand over to the library.

use clap::Parser as _;
use lb_userspace::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The daemon and the decapsulator (whose counter reports are info lines) log at
    // info by default; client commands only print results.
    let default = if matches!(cli.command, Command::Run(_) | Command::Decap(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("XLB_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    match lb_userspace::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
