//! `xlb run`: start-up, the tasks of a running daemon, and shutdown.
//!
//! Start-up checks everything before it writes anything: the configuration,
//! the interface, the daemon lock (no second daemon on the same socket or
//! pins), the control socket and the metrics port are all settled before the
//! first map write. Then it loads the object (reusing pinned maps), adopts
//! whatever a previous daemon left (see [`crate::state::model::Model::adopt`]),
//! applies `--config` under the saved overrides, attaches, and hands the
//! state and the maps to the [controller](crate::controller).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use lb_common::{Config as DpConfig, prog_names};
use nix::fcntl::{Flock, FlockArg};
use tokio::{net::UnixListener, signal::unix::SignalKind};

use crate::{
    api::{self, Context},
    chain::Chain,
    cli::error::bad_input,
    config::Config,
    controller::{self, Controller, Handle},
    counters,
    dataplane::{Dataplane, LoadOptions},
    desired::Edit,
    metrics::Sources,
    neighbor::{self, Iface},
    pin::{Holder, PinDir, PinLock},
    settings::Settings,
    state::{persist, writer::PauseHook},
};

/// The config map's contents for `iface` and `settings`.
pub fn datapath_config(iface: &Iface, settings: &Settings) -> DpConfig {
    let mtu = settings.mtu.unwrap_or_else(|| iface_mtu(&iface.name));
    let (v4, v4_len) = settings.tunnel_src.map_or_else(
        || {
            let first = iface.nets.iter().find_map(|(a, _)| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            });
            (first.unwrap_or(Ipv4Addr::UNSPECIFIED), 32)
        },
        |p| (p.addr, p.len),
    );
    let (v6, v6_len) = settings.tunnel_src6.map_or_else(
        || {
            let first = iface.nets.iter().find_map(|(a, _)| match a {
                IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(*v6),
                _ => None,
            });
            (first.unwrap_or(Ipv6Addr::UNSPECIFIED), 128)
        },
        |p| (p.addr, p.len),
    );
    let host_v4 = u32::MAX.checked_shr(u32::from(v4_len.min(32))).unwrap_or(0);
    // Only the low 32 bits of an IPv6 source vary.
    let host_v6 = u32::MAX
        .checked_shr(u32::from(v6_len.clamp(96, 128) - 96))
        .unwrap_or(0);
    DpConfig {
        iface_mac: iface.mac,
        sync: u8::from(settings.sync_enabled()),
        _pad: 0,
        mtu,
        new_flow_limit: settings.new_flow_limit(),
        udp_idle_ns: u64::try_from(settings.udp_idle().as_nanos()).unwrap_or(u64::MAX),
        tun_src_v4: (u32::from(v4) & !host_v4).to_be_bytes(),
        tun_host_v4: host_v4,
        tun_src_v6: {
            let mut b = v6.octets();
            let low = u32::from_be_bytes([b[12], b[13], b[14], b[15]]) & !host_v6;
            b[12..].copy_from_slice(&low.to_be_bytes());
            b
        },
        tun_host_v6: host_v6,
        icmp_too_big_limit: settings.icmp_too_big_limit(),
    }
}

/// The interface's MTU from sysfs, or 1500 when it cannot be read.
fn iface_mtu(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

/// Exclusive locks held for the daemon's life: one next to the control
/// socket, one on the pin directory ([`PinDir::lock`]). A second `xlb run`
/// on either fails before touching anything.
struct Locks {
    _socket: Flock<File>,
    _pins: Option<PinLock>,
}

fn lock(path: &Path, open: impl FnOnce() -> std::io::Result<File>) -> anyhow::Result<Flock<File>> {
    let file = open().with_context(|| format!("opening the lock {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another xlb daemon is running on the socket {} (lock held: {e}); stop it first, or \
             use another --socket and --pin-dir",
            path.display()
        )
    })
}

impl Locks {
    /// The lock next to the control socket (a file `SOCKET.lock` holding the pid).
    fn take(socket: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
        let path = PathBuf::from(format!("{}.lock", socket.display()));
        let mut socket_lock = lock(&path, || {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })?;
        {
            use std::io::Write as _;
            let _ = socket_lock.set_len(0);
            let _ = writeln!(*socket_lock, "{}", std::process::id());
        }
        Ok(Self {
            _socket: socket_lock,
            _pins: None,
        })
    }

    /// The lock on the (versioned) pin directory.
    fn pins(&mut self, pin: &PinDir) -> anyhow::Result<()> {
        self._pins = Some(pin.lock(Holder::Daemon)?);
        Ok(())
    }
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it (newer
/// ones account them to the memory cgroup and ignore it).
fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(%err, "cannot raise RLIMIT_MEMLOCK (only kernels before 5.11 need it)");
    }
}

/// Tells systemd (`Type=notify`) how the daemon is doing, when it runs under it.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(err) = sent {
        tracing::warn!(%err, "sd_notify failed");
    }
}

/// The daemon settings' checks that need nothing of the host (no interface, no
/// file they name): `xlb run` makes them at start and `xlb check` too. `config`
/// is the configuration file and its path, when there is one. Gives the store's
/// options in store mode.
pub fn check_settings(
    settings: &Settings,
    config: Option<(&Config, &Path)>,
) -> anyhow::Result<Option<crate::store::Options>> {
    if settings.bird_routes.is_some() && settings.bird_socket.is_none() {
        bail!("--bird-routes (daemon.bird_routes) needs --bird-socket (daemon.bird_socket)");
    }
    settings
        .check_sync()
        .map_err(anyhow::Error::msg)
        .context("invalid flow sync settings")?;
    let store_options = settings
        .store()
        .map_err(anyhow::Error::msg)
        .context("invalid store settings")?;
    if store_options.is_some()
        && let Some((config, path)) = config
        && (!config.desired.services.is_empty() || config.desired.hash_seed != 0)
    {
        let what = if config.desired.services.is_empty() {
            "a hash_seed is"
        } else {
            "services are"
        };
        bail!(
            "{}: {what} given, but with a store (daemon.store / --store) the desired state \
             comes from the store only; remove them from the file and load them with `xlb apply`",
            path.display()
        );
    }
    Ok(store_options)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(
    flags: Settings,
    config_path: Option<PathBuf>,
    socket: PathBuf,
) -> anyhow::Result<()> {
    // Listen for SIGHUP first: until a handler exists, SIGHUP's default action
    // kills the process, so a reload sent while the program loads would stop
    // the daemon. Signals that arrive before the reload task runs are queued.
    let hup = tokio::signal::unix::signal(SignalKind::hangup())
        .context("cannot listen for SIGHUP (config reloads)")?;
    let config = config_path
        .as_deref()
        .map(Config::load)
        .transpose()
        .map_err(|e| bad_input(format!("invalid configuration; nothing was loaded: {e:#}")))?;
    let settings = flags.over(
        config
            .as_ref()
            .map(|c| c.daemon.clone())
            .unwrap_or_default(),
    );
    let iface_name = settings.iface.clone().ok_or_else(|| {
        bad_input("no interface: give --iface or daemon.interface in the config file")
    })?;
    let store_options = check_settings(&settings, config.as_ref().zip(config_path.as_deref()))
        .map_err(|e| bad_input(format!("{e:#}")))?;
    let sync_options = settings
        .sync()
        .map_err(|e| bad_input(format!("invalid flow sync settings: {e}")))?;
    let store_options = store_options.map(|mut o| {
        o.sync = sync_options.as_ref().and_then(|s| s.advertise);
        o
    });
    if settings.replace && settings.pin_dir().is_none() {
        return Err(bad_input(
            "--replace swaps the program of a pinned data path; it needs pins (drop --no-pin)",
        ));
    }
    let mut iface =
        Iface::lookup(&iface_name).with_context(|| format!("cannot use interface {iface_name}"))?;
    iface.local_vips = settings.allow_local_vips;
    iface.tunnel_sources[0] |= settings
        .tunnel_src
        .is_some_and(|p| !p.addr.is_unspecified());
    iface.tunnel_sources[1] |= settings
        .tunnel_src6
        .is_some_and(|p| !p.addr.is_unspecified());
    if neighbor::strips_vlan_tags(&iface_name) == Some(true) {
        tracing::warn!(
            iface = %iface_name,
            "{iface_name} carries VLANs but strips their tags before XDP (rx-vlan offload): \
             the balancer would see and send untagged frames; turn it off with `ethtool -K \
             {iface_name} rxvlan off`"
        );
    }
    let mut locks = Locks::take(&socket)?;
    raise_memlock();
    let listener = bind_socket(&socket, settings.socket_group().as_deref())?;
    let metrics_listener = crate::metrics::bind(settings.metrics_addr).await?;
    let pin = settings
        .pin_dir()
        .as_deref()
        .map(PinDir::prepare)
        .transpose()?;
    if let Some(pin) = &pin {
        locks.pins(pin)?;
    }
    let reused = pin.as_ref().is_some_and(PinDir::has_maps);
    let had_link = pin.as_ref().is_some_and(PinDir::has_link);
    let state_file = settings.state_file();
    let saved = if reused {
        match persist::load(&state_file, &iface.name) {
            Ok(saved) => saved,
            Err(err @ persist::PersistError::OtherIface { .. }) => return Err(err.into()),
            Err(err) => {
                let err = Chain(&err);
                tracing::warn!(%err, "ignoring the state file: rebuilding the maps from the configuration");
                None
            }
        }
    } else {
        None
    };
    let mut state = saved.unwrap_or_default();
    state.set_min_healthy(settings.min_healthy());
    let mut spec = state.spec().clone();
    if let Some(config) = &config {
        let applying = || {
            format!(
                "applying {}",
                config_path
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string())
            )
        };
        // The file replaces the base; overrides set by hand stay.
        spec.apply(Edit::Replace(config.desired.clone()))
            .map_err(anyhow::Error::from)
            .with_context(applying)?;
        // Reals the adopted state already holds keep their place whatever
        // their route does now; new ones must route through the interface.
        controller::check_host(&iface, &spec.effective(), &state.desired())
            .await
            .with_context(applying)?;
    }
    // In a fleet, start from the store's document this node last applied:
    // forwarding goes on as before even while the store is down.
    let cached = match &store_options {
        Some(opts) => cached_document(opts, &mut spec, &iface),
        None => None,
    };
    let mut dp = Dataplane::load_with(&LoadOptions {
        flows: settings.conntrack_size(),
        pin: pin.clone(),
    })
    .context(
        "loading the XDP program failed (run as root on a kernel with BPF and BTF; if the pinned \
         maps differ, keep the running daemon's --conntrack-size or `xlb teardown` first)",
    )?;

    let sync_maps = sync_options
        .as_ref()
        .map(|_| dp.sync_maps())
        .transpose()
        .context("opening the flow sync maps failed")?;

    // Everything is checked: from here on the maps are written.
    let dp_config = datapath_config(&iface, &settings);
    dp.set_config(&dp_config)?;
    let resolution = neighbor::resolve_all(
        &iface,
        &spec.effective().reach(),
        settings.resolve_timeout(),
    )
    .await;
    for (real, err) in &resolution.failed {
        tracing::warn!(%real, %err, "real not resolved yet: kept out of the tables until it answers");
    }
    let changes = state
        .adopt(&mut dp, spec, &resolution.found)
        .context("writing the desired state into the maps failed")?;
    persist::save(&state_file, &iface.name, &state)?;
    tracing::info!(
        mtu = dp_config.mtu,
        flows = settings.conntrack_size(),
        new_flow_limit = dp_config.new_flow_limit,
        adopting = reused,
        writes = changes.writes,
        tables = changes.tables,
        "data path loaded and configured"
    );

    // Attach last: the first packet already meets the configured services.
    let attach_err = || {
        format!(
            "attaching XDP to {iface_name} failed (another XDP program attached? driver without \
             native XDP? try --xdp-mode skb)"
        )
    };
    let mode = settings.xdp_mode().xdp();
    match (&pin, had_link, settings.replace) {
        (Some(pin), true, true) => {
            dp.replace_pinned(prog_names::BALANCER, pin)
                .context("replacing the program behind the pinned link failed")?;
            tracing::info!("program replaced in place; maps, flows and counters kept");
        }
        (Some(_), true, false) => {
            tracing::info!("adopted the running data path; maps, flows and counters kept");
        }
        (Some(pin), false, _) => {
            dp.attach_pinned(prog_names::BALANCER, &iface_name, mode, pin)
                .with_context(attach_err)?;
        }
        (None, _, _) => {
            dp.attach(prog_names::BALANCER, &iface_name, mode)
                .with_context(attach_err)?;
        }
    }

    let reader = Arc::new(counters::Reader::of(&dp)?);
    let log_task = dp.logger().and_then(|l| forward_ebpf_logs(l).ok());
    // Health checks via the VIP send on raw and packet sockets: opened now,
    // while CAP_NET_RAW is still held.
    let paths =
        crate::health::path::Paths::open(crate::health::path::Local::new(&iface, &dp_config));
    // Everything that needs more than a running balancer is done.
    match crate::privileges::drop_to_runtime() {
        Ok(kept) => tracing::info!(
            kept = ?crate::privileges::names(kept),
            "dropped every other capability"
        ),
        Err(err) => tracing::error!(%err, "running with more capabilities than it needs"),
    }
    let activity = Arc::new(controller::Activity::new());
    activity.record_reload(
        config_path.as_ref().map_or_else(
            || "start-up (no --config)".to_owned(),
            |p| format!("start-up {}", p.display()),
        ),
        Ok(()),
    );
    let iface = Arc::new(iface);
    let (ctl, handle, events, board) = Controller::new(
        state,
        dp,
        (*iface).clone(),
        controller::Options {
            state_file: state_file.clone(),
            pause: PauseHook::from_env(),
        },
        activity.clone(),
        &resolution,
        paths,
    );
    let controller_task = tokio::spawn(ctl.run(events));
    let (store, store_task) = match store_options {
        Some(opts) => {
            let (sync, store) = crate::store::sync::Sync::new(
                opts,
                handle.clone(),
                iface.clone(),
                board.clone(),
                settings.resolve_timeout(),
                cached,
            );
            tracing::info!(store = %store.options.url, node = %store.options.node, "store mode: the desired state comes from the store");
            (Some(store), Some(tokio::spawn(sync.run())))
        }
        None => (None, None),
    };
    let flows = counters::FlowCounter::new(reader.clone(), settings.udp_idle());
    let flow_task = flows.spawn();
    let (sync, sync_tasks) = match (sync_options, sync_maps) {
        (Some(opts), Some(maps)) => {
            let view = store.as_ref().map(|s| s.view.clone());
            let (sync, tasks) =
                crate::flowsync::spawn(opts, maps, handle.subscribe(), view).await?;
            (Some(sync), tasks)
        }
        _ => (None, Vec::new()),
    };
    // Started after the attach and the first apply: nothing is announced
    // before the data path serves it (nor, with flow sync, before a full
    // copy of the peers' flows arrived).
    let (node, node_task) = crate::node::spawn(
        settings.bird(),
        handle.subscribe(),
        reader.clone(),
        sync.as_ref().map(crate::flowsync::SyncHandle::ready),
    );
    let sources = Sources {
        handle: handle.clone(),
        reader,
        flows,
        board,
        activity: activity.clone(),
        node: node.clone(),
        store: store.clone(),
        sync: sync.clone(),
    };
    let metrics_task = metrics_listener.map(|l| crate::metrics::serve(l, sources.clone()));
    let neigh_task = {
        let tx = handle.sender();
        neighbor::watch(&iface, move |addr, mac| {
            let _ = tx.try_send(controller::Event::Neighbour { addr, mac });
        })
        .map_err(|err| tracing::warn!(%err, "not following neighbour changes; MACs are re-read every 30 s"))
        .ok()
    };
    let reload_task = tokio::spawn(reload_on_sighup(
        handle.clone(),
        activity.clone(),
        iface.clone(),
        config_path.clone(),
        settings.resolve_timeout(),
        hup,
        store.is_some(),
    ));
    tracing::info!(
        iface = %iface_name,
        mode = ?mode,
        socket = %socket.display(),
        pinned = pin.is_some(),
        "xlb serving"
    );
    sd_notify("READY=1");
    let ctx = Context {
        sources,
        iface,
        resolve_timeout: settings.resolve_timeout(),
        baseline: api::zero::Baseline::default(),
        store,
    };
    // A forced teardown of the pins stops the daemon too: the data path it
    // would go on reporting and changing is gone.
    let stop = stop_signal(
        pin.clone(),
        "the data path was detached from under this daemon (its pins were removed: `xlb \
         teardown --force`); stopping",
    );
    let served = axum::serve(listener, api::router(ctx))
        .with_graceful_shutdown(stop)
        .await;
    sd_notify("STOPPING=1");
    let detached = pin.as_ref().is_some_and(|pin| !pin.has_link());
    if pin.is_none() || detached {
        // The program goes with this daemon: the routers must stop sending
        // VIP traffic here first.
        if let Err(err) = node.withdraw_all().await {
            tracing::error!(%err, "could not withdraw the VIPs before detaching");
        }
    }
    for task in sync_tasks {
        task.abort();
    }
    for task in [
        Some(reload_task),
        Some(flow_task),
        Some(node_task),
        neigh_task,
        metrics_task,
        log_task,
        store_task,
    ]
    .into_iter()
    .flatten()
    {
        task.abort();
    }
    drop(handle);
    // The controller owns the maps: stopping it drops them (and, without
    // pins, detaches the program).
    controller_task.abort();
    let _ = controller_task.await;
    let _ = std::fs::remove_file(&socket);
    if detached {
        // The teardown removed it; a change since must not bring it back.
        persist::remove(&state_file);
        tracing::info!("xlb stopped: its data path had been detached");
    } else if pin.is_some() {
        tracing::info!(
            "xlb stopped; the data path keeps running from its pins (`xlb teardown` removes it)"
        );
    } else {
        persist::remove(&state_file);
        tracing::info!("xlb detached and stopped");
    }
    served.context("the control API failed")
}

/// Copies the XDP program's aya-log lines (debug level) into the daemon's log.
/// The store's document this node saved last, loaded into `spec` (its
/// revision and contents, for the store task), if there is a usable one.
fn cached_document(
    opts: &crate::store::Options,
    spec: &mut crate::desired::Spec,
    iface: &Iface,
) -> Option<(i64, crate::desired::Spec)> {
    let (revision, text) = match persist::load_store(&opts.cache) {
        Ok(Some(saved)) => saved,
        Ok(None) => return None,
        Err(err) => {
            let err = Chain(&err);
            tracing::warn!(%err, "ignoring the saved store document");
            return None;
        }
    };
    let name = format!("{} (revision {revision})", opts.cache.display());
    let loaded = crate::store::document::parse(&name, &text)
        .map_err(anyhow::Error::from)
        .and_then(|doc| {
            controller::check_reach(iface, &doc.effective())?;
            Ok(doc)
        });
    match loaded {
        Ok(doc) => {
            tracing::info!(revision, file = %opts.cache.display(), "starting from the store's document saved last");
            *spec = doc.clone();
            Some((revision, doc))
        }
        Err(err) => {
            let err = Chain(err.as_ref());
            tracing::warn!(%err, "ignoring the saved store document");
            None
        }
    }
}

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

/// Re-reads the configuration file on SIGHUP and sends its services to the
/// controller (overrides set by hand stay); a bad file is logged, recorded as
/// a failed reload and changes nothing.
async fn reload_on_sighup(
    handle: Handle,
    activity: Arc<controller::Activity>,
    iface: Arc<Iface>,
    config: Option<PathBuf>,
    resolve_timeout: std::time::Duration,
    mut hup: tokio::signal::unix::Signal,
    store_mode: bool,
) {
    while hup.recv().await.is_some() {
        if store_mode {
            tracing::warn!(
                "SIGHUP received: in store mode the desired state comes from the store; nothing \
                 to reload (daemon settings need a restart)"
            );
            continue;
        }
        let Some(path) = config.clone() else {
            tracing::warn!("SIGHUP received but the daemon was started without --config");
            continue;
        };
        let source = format!("SIGHUP {}", path.display());
        let config = match Config::load(&path) {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(%err, "reload refused; the running state is unchanged");
                activity.record_reload(source, Err(err.to_string()));
                continue;
            }
        };
        let current = handle.snapshot();
        // What only this host can refuse is a file it cannot apply, logged
        // as the controller's own refusals are.
        if let Err(err) = controller::check_host(&iface, &config.desired, current.desired()).await {
            activity.record_reload(source, Err(format!("{}: {err}", path.display())));
            tracing::error!(
                file = %path.display(),
                %err,
                "reload failed; the running state is unchanged"
            );
            continue;
        }
        let known = current.macs.clone();
        let mut unknown = config.desired.reach();
        unknown.retain(|r, _| !known.contains_key(r));
        let resolution = if unknown.is_empty() {
            neighbor::Resolution::default()
        } else {
            neighbor::resolve_all(&iface, &unknown, resolve_timeout).await
        };
        match handle.edit(Edit::Replace(config.desired), resolution).await {
            Ok(c) => {
                activity.record_reload(source, Ok(()));
                tracing::info!(
                    file = %path.display(),
                    writes = c.writes,
                    tables = c.tables,
                    "configuration reloaded"
                );
            }
            Err(err) => {
                let err = Chain(&err);
                activity.record_reload(source, Err(format!("{}: {err}", path.display())));
                tracing::error!(
                    file = %path.display(),
                    %err,
                    "reload failed; the running state is unchanged"
                );
            }
        }
    }
}

/// Binds the control socket (the daemon lock is held: a socket file left
/// there is stale), root:GROUP 0660.
fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Created with no access for others from the start (umask), then opened to the group.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener =
        bound.with_context(|| format!("binding the control socket {}", path.display()))?;
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

/// Resolves at SIGINT or SIGTERM ([`shutdown_signal`]) or, for a process
/// running on the pins `pin`, once a forced teardown removed its link
/// ([`PinDir::link_removed`]), logging `detached` at ERROR. The caller tells
/// the two apart by whether the link is still there.
pub async fn stop_signal(pin: Option<PinDir>, detached: &'static str) {
    let Some(pin) = pin else {
        return shutdown_signal().await;
    };
    tokio::select! {
        () = shutdown_signal() => {}
        () = pin.link_removed() => tracing::error!(pins = %pin.path.display(), "{detached}"),
    }
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
