//! `xlb run`: load (or adopt) the data path, apply the desired state, serve the
//! control API and metrics, reload on SIGHUP, and on SIGINT/SIGTERM either
//! leave the pinned data path running (hitless restarts) or detach it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use lb_common::{Config as DpConfig, prog_names};
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, signal::unix::SignalKind};

use crate::{
    api::{self, ApiError, Inner, Shared},
    config::Config,
    dataplane::{Dataplane, LoadOptions},
    health,
    metrics::Metrics,
    model::Forward,
    neighbor::{self, Iface, NeighborError},
    pin::{LAYOUT_VERSION, PinDir},
    state::{Changes, Desired, State, StateError},
};

/// How often the reals' MACs are checked against the neighbour table.
const MAC_REFRESH: Duration = Duration::from_secs(30);

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
pub fn datapath_config(iface: &Iface, opts: &DataPathOptions) -> DpConfig {
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
    DpConfig {
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
        icmp_too_big_limit: lb_common::ICMP_TOO_BIG_LIMIT_DEFAULT,
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
    /// Configuration file (desired state), reloaded on SIGHUP.
    pub config: Option<PathBuf>,
    /// Control socket path.
    pub socket: PathBuf,
    /// Group given access to the control socket (root only when `None`).
    pub socket_group: Option<String>,
    /// How long to wait for a real's ARP/NDP answer.
    pub resolve_timeout: Duration,
    /// Data-path settings.
    pub datapath: DataPathOptions,
    /// bpffs directory for pins; `None`: no pins, the data path stops with the daemon.
    pub pin_dir: Option<PathBuf>,
    /// Replace the program of an adopted data path with this binary's.
    pub replace: bool,
    /// Where the desired state and ids are kept for the next daemon.
    pub state_file: PathBuf,
    /// Prometheus metrics address.
    pub metrics: Option<SocketAddr>,
    /// Avalanche-guard threshold (share of reals).
    pub min_healthy: f64,
}

/// What the state file holds: enough for a restarted daemon to adopt the maps.
#[derive(Serialize, Deserialize)]
struct StateFile {
    layout: u32,
    iface: String,
    state: State,
}

/// Writes the state file atomically (temp file + rename).
pub fn save_state(path: &Path, iface: &str, state: &State) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let file = StateFile {
        layout: LAYOUT_VERSION,
        iface: iface.to_owned(),
        state: state.clone(),
    };
    std::fs::write(&tmp, serde_json::to_vec(&file)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Reads the state a previous daemon left and checks it against the pinned maps.
fn adopt_state(path: &Path, iface: &str, dp: &Dataplane) -> anyhow::Result<State> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "pinned maps exist but the state file {} cannot be read; `xlb teardown` starts over \
             (drops tracked flows)",
            path.display()
        )
    })?;
    let file: StateFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an xlb state file", path.display()))?;
    if file.layout != LAYOUT_VERSION {
        bail!(
            "{} was written for map layout v{}; this xlb uses v{LAYOUT_VERSION}",
            path.display(),
            file.layout
        );
    }
    if file.iface != iface {
        bail!(
            "the pinned data path is attached to {}, not {iface}; use --iface {} or \
             `xlb teardown` first",
            file.iface,
            file.iface
        );
    }
    for (vip, id, ring) in file.state.applied_vips() {
        let meta = dp.get_vip(&vip.key())?;
        if meta.is_none_or(|m| m.vip_id != id || m.ring_off != ring) {
            bail!(
                "the state file {} does not match the pinned maps (VIP {vip}); `xlb teardown` \
                 starts over (drops tracked flows)",
                path.display()
            );
        }
    }
    Ok(file.state)
}

impl Shared {
    /// Applies a new desired state: resolves the MACs it needs (without any
    /// lock held), then reconciles and persists. Changes are serialised, so two
    /// concurrent requests cannot lose each other's update.
    pub async fn apply(&self, desired: Desired) -> Result<Changes, ApiError> {
        let _turn = self.changes.lock().await;
        self.apply_locked(desired).await
    }

    /// Like [`Shared::apply`] with `f` applied to the current desired state.
    pub async fn change(
        &self,
        f: impl FnOnce(&mut Desired) -> Result<(), StateError>,
    ) -> Result<Changes, ApiError> {
        let _turn = self.changes.lock().await;
        let mut desired = self.lock().state.desired().clone();
        f(&mut desired)?;
        self.apply_locked(desired).await
    }

    async fn apply_locked(&self, desired: Desired) -> Result<Changes, ApiError> {
        desired.validate()?;
        // Direct return needs every DR real on the segment, even when its MAC
        // is already known from a tunnel VIP.
        for (real, mode) in desired.reach() {
            if mode == Forward::Dr {
                self.iface.check_on_link(real)?;
            }
        }
        let unresolved = self.lock().state.unresolved(&desired);
        let lookups = unresolved.into_iter().map(|(real, mode)| async move {
            let mac = match mode {
                Forward::Dr => neighbor::resolve(&self.iface, real, self.resolve_timeout).await,
                Forward::Tun => {
                    neighbor::resolve_next_hop(&self.iface, real, self.resolve_timeout).await
                }
            }?;
            Ok::<_, NeighborError>((real, mac))
        });
        let macs: BTreeMap<IpAddr, [u8; 6]> = futures::future::try_join_all(lookups)
            .await?
            .into_iter()
            .collect();
        let changes = self.commit(|dp, state| {
            let before = state.desired().clone();
            let changes = state.reconcile(dp, desired, &macs)?;
            // One log line per change, whatever asked for it (CLI, apply, reload).
            for line in crate::state::describe_changes(&before, state.desired()) {
                tracing::info!("{line}");
            }
            Ok(changes)
        })?;
        self.health.sync(self);
        Ok(changes)
    }

    /// Runs one reconcile step `f` on the maps and the model: times it for
    /// the metrics and, when it succeeds, saves the state file for the next
    /// daemon.
    fn commit<T>(
        &self,
        f: impl FnOnce(&mut Dataplane, &mut State) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let started = Instant::now();
        let mut inner = self.lock();
        let Inner { dp, state } = &mut *inner;
        let result = f(dp, state);
        self.metrics.reconciled(started.elapsed(), result.is_ok());
        if result.is_ok()
            && let Err(err) = save_state(&self.state_file, &self.iface.name, state)
        {
            tracing::error!(%err, "could not save the state file; a restarted daemon may not adopt");
        }
        result
    }

    /// Re-resolves the MAC of every real (or its next hop) and applies the ones
    /// that changed: a real server whose NIC was replaced, a gateway that
    /// failed over. A real that does not answer keeps its last known MAC.
    pub async fn refresh_macs(&self) {
        let _turn = self.changes.lock().await;
        let (desired, known) = {
            let inner = self.lock();
            let desired = inner.state.desired().clone();
            let known: BTreeMap<IpAddr, (Forward, [u8; 6])> = desired
                .reach()
                .into_iter()
                .filter_map(|(real, mode)| Some((real, (mode, inner.state.mac(real)?))))
                .collect();
            (desired, known)
        };
        // One dump of the neighbour table; a route lookup per tunnel real.
        let Ok(table) = neighbor::table(&self.iface).await else {
            return;
        };
        let mut changed = BTreeMap::new();
        for (real, (mode, old)) in &known {
            let hop = match mode {
                Forward::Dr => *real,
                Forward::Tun => match neighbor::next_hop(&self.iface, *real).await {
                    Ok(hop) => hop,
                    Err(_) => continue,
                },
            };
            // Absent (expired, never refreshed): keep the last known MAC.
            if let Some(mac) = table.get(&hop)
                && mac != old
            {
                changed.insert(*real, *mac);
            }
        }
        if changed.is_empty() {
            return;
        }
        for (real, mac) in &changed {
            tracing::info!(%real, mac = %crate::state::fmt_mac(mac), "real's MAC changed");
        }
        if let Err(err) = self.commit(|dp, state| state.reconcile(dp, desired, &changed)) {
            tracing::error!(%err, "applying changed MACs failed");
        }
    }

    /// Records a health verdict (called by the health engine).
    pub fn set_health(&self, vip: &crate::model::Vip, real: IpAddr, up: bool) {
        if let Err(err) = self.commit(|dp, state| state.set_health(dp, vip, real, up)) {
            tracing::error!(%vip, %real, %err, "applying a health verdict failed");
        }
    }
}

/// Runs the daemon until a signal arrives.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Listen for SIGHUP first: until a handler exists, SIGHUP's default action
    // kills the process, so a reload sent while the program loads would stop
    // the daemon. Signals that arrive before the reload task runs are queued.
    let hup = tokio::signal::unix::signal(SignalKind::hangup())
        .context("cannot listen for SIGHUP (config reloads)")?;
    let config = opts
        .config
        .as_deref()
        .map(Config::load)
        .transpose()
        .context("invalid configuration; nothing was loaded")?;
    let iface = Iface::lookup(&opts.iface)
        .with_context(|| format!("cannot use interface {}", opts.iface))?;
    if opts.replace && opts.pin_dir.is_none() {
        bail!("--replace swaps the program of a pinned data path; it needs pins (drop --no-pin)");
    }
    let pin = opts.pin_dir.as_deref().map(PinDir::prepare).transpose()?;
    let adopting = pin.as_ref().is_some_and(PinDir::has_link);
    let mut dp = Dataplane::load_with(&LoadOptions {
        flows: opts.datapath.flows,
        pin: pin.clone(),
    })
    .context(
        "loading the XDP program failed (run as root on a kernel with BPF and BTF; if the pinned \
         maps differ, keep the running daemon's --conntrack-size or `xlb teardown` first)",
    )?;
    let dp_config = datapath_config(&iface, &opts.datapath);
    dp.set_config(&dp_config)?;
    let mut state = if adopting {
        adopt_state(&opts.state_file, &opts.iface, &dp)?
    } else {
        State::new()
    };
    state.set_min_healthy(opts.min_healthy);
    tracing::info!(
        mtu = dp_config.mtu,
        flows = opts.datapath.flows,
        new_flow_limit = dp_config.new_flow_limit,
        adopting,
        "data path loaded"
    );
    let listener = bind_socket(&opts.socket, opts.socket_group.as_deref())?;
    let metrics = Metrics::new();
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner { dp, state }),
        changes: tokio::sync::Mutex::new(()),
        iface,
        resolve_timeout: opts.resolve_timeout,
        state_file: opts.state_file.clone(),
        config_path: opts.config.clone(),
        metrics,
        health: health::Engine::new(),
    });
    if let Some(config) = config {
        let changes = shared.apply(config.desired).await.map_err(|e| {
            anyhow::anyhow!(
                "applying {}: {e}",
                opts.config
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string())
            )
        })?;
        tracing::info!(
            writes = changes.writes,
            tables = changes.tables,
            "configuration applied"
        );
    } else {
        let inner = shared.lock();
        save_state(&shared.state_file, &shared.iface.name, &inner.state)?;
    }

    // Attach last: the first packet already meets the configured services.
    {
        let mut inner = shared.lock();
        let dp = &mut inner.dp;
        let attach_err = || {
            format!(
                "attaching XDP to {} failed (another XDP program attached? driver without native \
                 XDP? try --xdp-mode skb)",
                opts.iface
            )
        };
        match (&pin, adopting, opts.replace) {
            (Some(pin), true, true) => {
                dp.replace_pinned(prog_names::BALANCER, pin)
                    .context("replacing the program behind the pinned link failed")?;
                tracing::info!("program replaced in place; maps, flows and counters kept");
            }
            (Some(_), true, false) => {
                tracing::info!("adopted the running data path; maps, flows and counters kept");
            }
            (Some(pin), false, _) => {
                dp.attach_pinned(prog_names::BALANCER, &opts.iface, opts.mode, pin)
                    .with_context(attach_err)?;
            }
            (None, _, _) => {
                dp.attach(prog_names::BALANCER, &opts.iface, opts.mode)
                    .with_context(attach_err)?;
            }
        }
    }
    tracing::info!(
        iface = %opts.iface,
        mode = ?opts.mode,
        socket = %opts.socket.display(),
        pinned = pin.is_some(),
        "xlb serving"
    );

    shared.health.start(&shared);
    let log_task = {
        let logger = shared.lock().dp.logger();
        logger.and_then(|l| forward_ebpf_logs(l).ok())
    };
    let metrics_task = match opts.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, shared.clone()).await?),
        None => None,
    };
    let reload_task = tokio::spawn(reload_on_sighup(shared.clone(), hup));
    let refresh_task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAC_REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                shared.refresh_macs().await;
            }
        })
    };
    let served = axum::serve(listener, api::router(shared.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    reload_task.abort();
    refresh_task.abort();
    if let Some(t) = log_task {
        t.abort();
    }
    shared.health.stop();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    if pin.is_some() {
        tracing::info!(
            "xlb stopped; the data path keeps running from its pins (`xlb teardown` removes it)"
        );
    } else {
        // Dropping the dataplane detaches the program and frees the maps.
        drop(shared);
        let _ = std::fs::remove_file(&opts.state_file);
        tracing::info!("xlb detached and stopped");
    }
    served.context("the control API failed")
}

/// Copies the XDP program's aya-log lines (debug level) into the daemon's log.
fn forward_ebpf_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns its ring-buffer fd for its whole life and always
    // returns that same fd; the AsyncFd owns the logger.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Re-reads the configuration file on SIGHUP and applies it; a bad file is
/// logged and changes nothing.
async fn reload_on_sighup(shared: Arc<Shared>, mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        let Some(path) = shared.config_path.clone() else {
            tracing::warn!("SIGHUP received but the daemon was started without --config");
            continue;
        };
        match Config::load(&path) {
            Err(err) => tracing::error!(%err, "reload refused; the running state is unchanged"),
            Ok(config) => match shared.apply(config.desired).await {
                Ok(c) => tracing::info!(
                    file = %path.display(),
                    writes = c.writes,
                    tables = c.tables,
                    "configuration reloaded"
                ),
                Err(err) => tracing::error!(
                    file = %path.display(),
                    %err,
                    "reload failed; the running state is unchanged"
                ),
            },
        }
    }
}

/// Binds the control socket, refusing to steal one a live daemon still serves.
fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
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
    if let Some(name) = group {
        let g = nix::unistd::Group::from_name(name)
            .with_context(|| format!("looking up group {name}"))?
            .with_context(|| {
                format!("group {name} does not exist (create it, or drop --socket-group)")
            })?;
        nix::unistd::chown(path, None, Some(g.gid))
            .with_context(|| format!("giving {} to group {name}", path.display()))?;
    }
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
