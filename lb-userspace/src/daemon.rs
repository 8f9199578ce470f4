//! `xlb run`: load the program, apply the startup config, attach, serve the API
//! until SIGINT/SIGTERM, then detach and clean up.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use lb_common::{Config, prog_names};
use tokio::{net::UnixListener, signal::unix::SignalKind};

use crate::{
    api::{self, Inner, Shared},
    config::ConfigFile,
    dataplane::Dataplane,
    neighbor::{self, Iface},
    state::{State, VipOptions},
};

/// Options of `xlb run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Interface to attach to.
    pub iface: String,
    /// XDP attach mode.
    pub mode: XdpMode,
    /// Startup configuration.
    pub config: Option<PathBuf>,
    /// Control socket path.
    pub socket: PathBuf,
    /// How long to wait for a real's ARP/NDP answer.
    pub resolve_timeout: Duration,
}

/// Runs the daemon until a signal arrives.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = opts
        .config
        .as_deref()
        .map(ConfigFile::load)
        .transpose()
        .context("invalid configuration; nothing was loaded")?;
    let iface = Iface::lookup(&opts.iface)
        .with_context(|| format!("cannot use interface {}", opts.iface))?;
    let mut dp = Dataplane::load().context(
        "loading the XDP program failed (run as root, on a kernel with BPF and BTF support)",
    )?;
    dp.set_config(&Config {
        iface_mac: iface.mac,
        _pad: [0; 2],
    })?;
    let mut state = State::new();
    if let Some(config) = &config {
        apply_startup(&mut dp, &mut state, &iface, config, opts.resolve_timeout).await?;
    }
    let listener = bind_socket(&opts.socket)?;
    dp.attach(prog_names::BALANCER, &opts.iface, opts.mode)
        .with_context(|| {
            format!(
                "attaching XDP to {} failed (another XDP program attached? driver without native \
                 XDP? try --xdp-mode skb)",
                opts.iface
            )
        })?;
    tracing::info!(
        iface = %opts.iface,
        mode = ?opts.mode,
        socket = %opts.socket.display(),
        "xlb attached and serving"
    );

    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner { dp, state }),
        iface,
        resolve_timeout: opts.resolve_timeout,
    });
    let served = axum::serve(listener, api::router(shared.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    // Dropping the dataplane detaches the program and frees the maps.
    drop(shared);
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!("xlb detached and stopped");
    served.context("the control API failed")
}

async fn apply_startup(
    dp: &mut Dataplane,
    state: &mut State,
    iface: &Iface,
    config: &ConfigFile,
    timeout: Duration,
) -> anyhow::Result<()> {
    for s in &config.services {
        state.add_vip(
            dp,
            s.vip,
            VipOptions {
                scheduler: s.scheduler,
                table_size: s.table_size,
            },
        )?;
        for r in &s.reals {
            let mac = neighbor::resolve(iface, r.address, timeout)
                .await
                .with_context(|| format!("service {}: real {}", s.vip, r.address))?;
            state.add_real(dp, &s.vip, r.address, mac, r.weight)?;
        }
    }
    Ok(())
}

/// Binds the control socket, refusing to steal one a live daemon still serves.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another xlb daemon is serving {} (stop it, or pick another --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions on {}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
