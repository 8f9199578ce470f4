//! `xlb run`: load the program, apply the startup config, attach, serve the API
//! until SIGINT/SIGTERM, then detach and clean up.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
    dataplane::{Dataplane, LoadOptions},
    model::Forward,
    neighbor::{self, Iface},
    state::{State, VipOptions},
};

/// Data-path settings of `xlb run`.
#[derive(Debug, Clone)]
pub struct DataPathOptions {
    /// Conntrack table size (flows, all CPUs).
    pub flows: u32,
    /// New flows tracked per CPU per second before the flood guard bypasses
    /// the table (0: no limit).
    pub new_flow_limit: u32,
    /// Idle time after which a UDP flow is forgotten.
    pub udp_idle: Duration,
    /// Largest L3 packet after encapsulation; `None`: the interface's MTU.
    pub mtu: Option<u32>,
    /// IPv4 tunnel source prefix; `None`: the interface's first IPv4 address.
    pub tunnel_src_v4: Option<(Ipv4Addr, u8)>,
    /// IPv6 tunnel source prefix (at most 32 host bits are used); `None`: the
    /// interface's first global IPv6 address.
    pub tunnel_src_v6: Option<(Ipv6Addr, u8)>,
}

impl Default for DataPathOptions {
    fn default() -> Self {
        Self {
            flows: lb_common::FLOWS_DEFAULT,
            new_flow_limit: 0,
            udp_idle: Duration::from_secs(30),
            mtu: None,
            tunnel_src_v4: None,
            tunnel_src_v6: None,
        }
    }
}

/// The config map's contents for `iface` and `opts`.
pub fn datapath_config(iface: &Iface, opts: &DataPathOptions) -> Config {
    let mtu = opts.mtu.unwrap_or_else(|| iface_mtu(&iface.name));
    let (v4, v4_len) = opts.tunnel_src_v4.unwrap_or_else(|| {
        let first = iface.nets.iter().find_map(|(a, _)| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        (first.unwrap_or(Ipv4Addr::UNSPECIFIED), 32)
    });
    let (v6, v6_len) = opts.tunnel_src_v6.unwrap_or_else(|| {
        let first = iface.nets.iter().find_map(|(a, _)| match a {
            IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(*v6),
            _ => None,
        });
        (first.unwrap_or(Ipv6Addr::UNSPECIFIED), 128)
    });
    let host_v4 = u32::MAX.checked_shr(u32::from(v4_len.min(32))).unwrap_or(0);
    // Only the low 32 bits of an IPv6 source vary.
    let host_v6 = u32::MAX
        .checked_shr(u32::from(v6_len.clamp(96, 128) - 96))
        .unwrap_or(0);
    Config {
        iface_mac: iface.mac,
        _pad: [0; 2],
        mtu,
        new_flow_limit: opts.new_flow_limit,
        udp_idle_ns: u64::try_from(opts.udp_idle.as_nanos()).unwrap_or(u64::MAX),
        tun_src_v4: (u32::from(v4) & !host_v4).to_be_bytes(),
        tun_host_v4: host_v4,
        tun_src_v6: {
            let mut b = v6.octets();
            let low = u32::from_be_bytes([b[12], b[13], b[14], b[15]]) & !host_v6;
            b[12..].copy_from_slice(&low.to_be_bytes());
            b
        },
        tun_host_v6: host_v6,
        _pad2: 0,
    }
}

/// The interface's MTU from sysfs, or 1500 when it cannot be read.
fn iface_mtu(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

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
    /// Data-path settings.
    pub datapath: DataPathOptions,
}

/// Runs the daemon until a signal arrives.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let file = opts
        .config
        .as_deref()
        .map(ConfigFile::load)
        .transpose()
        .context("invalid configuration; nothing was loaded")?;
    let iface = Iface::lookup(&opts.iface)
        .with_context(|| format!("cannot use interface {}", opts.iface))?;
    let mut dp = Dataplane::load_with(&LoadOptions {
        flows: opts.datapath.flows,
    })
    .context(
        "loading the XDP program failed (run as root, on a kernel with BPF and BTF support)",
    )?;
    let config = datapath_config(&iface, &opts.datapath);
    dp.set_config(&config)?;
    tracing::info!(
        mtu = config.mtu,
        flows = opts.datapath.flows,
        new_flow_limit = config.new_flow_limit,
        "data path configured"
    );
    let mut state = State::new();
    if let Some(file) = &file {
        apply_startup(&mut dp, &mut state, &iface, file, opts.resolve_timeout).await?;
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
                forward: s.forward,
                table_size: s.table_size,
            },
        )?;
        for r in &s.reals {
            let mac = match s.forward {
                Forward::Dr => neighbor::resolve(iface, r.address, timeout).await,
                Forward::Tun => neighbor::resolve_next_hop(iface, r.address, timeout).await,
            }
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

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
