//! The moving parts of the end-to-end tests and the demo: a [`Topology`] with the
//! pass-through program the balancer's switch port needs, `xlb-testsrv` on every real,
//! the `xlb run` daemon on the balancer, and the `xlb` CLI talking to it, all run the
//! way an operator would run them.
//!
//! Everything here panics with a message that says what failed (and quotes the daemon's
//! log when it is the daemon) and stops what it started when dropped, so a failing test
//! or an interrupted demo leaves no process and no namespace behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::XdpMode;
use lb_common::{FlowKey, FlowState, map_names, prog_names};
use lb_userspace::chain::Chain;
use lb_userspace::dataplane::Dataplane;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

use crate::netns::{Host, Netns, Topology, TopologySpec};

/// The VIP every end-to-end scenario serves.
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// The capability bounding set of the shipped `xlb.service`
/// (`CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_CHOWN
/// CAP_NET_RAW`), in setpriv's words: every test daemon runs under it.
pub const UNIT_BOUNDING_SET: &str = "-all,+bpf,+perfmon,+net_admin,+chown,+net_raw";

/// How long a starting server or daemon gets before it counts as broken.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a stopping process gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Set by the SIGINT/SIGTERM handler of [`trap_interrupts`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into a flag that every wait in this module (and the
/// caller's own loops, through [`interrupted`]) checks, so the process unwinds and its
/// guards tear everything down instead of dying with namespaces left behind.
pub fn trap_interrupts() {
    // No SA_RESTART: a blocking read returns EINTR, and std retries it, so loops see the
    // flag no later than their next timeout.
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal::sigaction(sig, &action) }
            .unwrap_or_else(|e| panic!("cannot install a {sig} handler: {e}"));
    }
}

/// Whether SIGINT or SIGTERM arrived since [`trap_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Panics (and so unwinds through every guard) if an interrupt arrived.
pub fn check_interrupted() {
    if interrupted() {
        panic!("interrupted");
    }
}

/// The `xlb` binary: `$XLB_BIN`, else next to the running executable.
pub fn xlb_bin() -> PathBuf {
    locate("XLB_BIN", "xlb")
}

/// The `xlb-testsrv` binary: `$XLB_TESTSRV_BIN`, else next to the running executable.
pub fn testsrv_bin() -> PathBuf {
    locate("XLB_TESTSRV_BIN", "xlb-testsrv")
}

/// `$var` if set, else `name` in the running executable's directory or its parent
/// (an integration test runs from `target/debug/deps`, binaries live in `target/debug`).
fn locate(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{var}={} is not a file; build it with `cargo build --workspace --bins`",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("the running executable's path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "cannot find {name} next to {}: set {var} or run `cargo build --workspace \
                 --bins` first (./x test and ./x demo do both)",
                exe.display()
            )
        })
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    what: String,
    child: Child,
}

impl Proc {
    /// Spawns `cmd`, naming it `what` in messages.
    pub fn spawn(what: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc {
            what: what.to_owned(),
            child,
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))
    }

    /// Its process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit i32"))
    }

    /// Sends `sig` to it; panics if it has already exited (a signal to a reaped pid
    /// could reach an unrelated process).
    pub fn signal(&mut self, sig: Signal) {
        if let Some(status) = self.exited() {
            panic!(
                "cannot send {sig} to {}: it already exited ({status})",
                self.what
            );
        }
        signal::kill(self.pid(), sig)
            .unwrap_or_else(|e| panic!("sending {sig} to {}: {e}", self.what));
    }

    /// Kills it with SIGKILL, no chance to clean up (a crash), and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Stops it: SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL. Returns how it
    /// ended (`None` if it could not even be reaped).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = signal::kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scratch directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// Creates `$TMPDIR/NAME` afresh (a leftover of that name is removed first).
    pub fn new(name: &str) -> RunDir {
        let path = std::env::temp_dir().join(name);
        // A leftover of a crashed run with the same (unique-prefix) name is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        RunDir(path)
    }
}

impl RunDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run directory for daemons that pin their data path and outlive each other: the
/// control socket, the state file and every daemon's log live in it, and `bpffs/` in it
/// is a bpffs mounted in the ROOT mount namespace, by this process.
///
/// `ip netns exec` gives its command a fresh /sys, so /sys/fs/bpf inside it is never the
/// host's bpffs and a bpffs the daemon mounted from inside would vanish with it; a bpffs
/// mounted here, outside /sys, before the daemon starts, is shared by every `ip netns
/// exec` (see docs/development.md). Dropping it unmounts the bpffs, which removes the
/// pins and so detaches a data path left running; drop it after the daemons.
#[derive(Debug)]
pub struct PinnedRun {
    bpffs: PathBuf,
    // Last: removed only after the bpffs is unmounted.
    dir: RunDir,
}

impl PinnedRun {
    /// Creates `$TMPDIR/xlb-pin-NAME` with a bpffs on its `bpffs/`.
    pub fn new(name: &str) -> PinnedRun {
        let path = std::env::temp_dir().join(format!("xlb-pin-{name}"));
        // A crashed run may have left its bpffs mounted: a mount point cannot be removed.
        let _ = nix::mount::umount2(&path.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
        let dir = RunDir::new(&format!("xlb-pin-{name}"));
        let bpffs = dir.path().join("bpffs");
        std::fs::create_dir(&bpffs)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", bpffs.display()));
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t bpf bpf {}: {e} (needs root)", bpffs.display()));
        PinnedRun { bpffs, dir }
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bpffs to give `xlb run --pin-dir` and `xlb teardown --pin-dir`.
    pub fn pin_dir(&self) -> &Path {
        &self.bpffs
    }

    /// The state file the daemons share (what [`Daemon::start_in`] passes).
    pub fn state_file(&self) -> PathBuf {
        self.dir().join("state.json")
    }

    /// Names of the pins under [`PinnedRun::pin_dir`], recursively, sorted; without the
    /// kernel's own `maps.debug` and `progs.debug` iterators of a fresh bpffs.
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bpffs, &self.bpffs, &mut out);
        out.retain(|p| !matches!(p.as_str(), "maps.debug" | "progs.debug"));
        out.sort();
        out
    }

    /// The pinned peer flow table (flow sync's `XLB_PEER_FLOWS`) of the
    /// daemon of this run.
    pub fn peer_flows(&self) -> HashMap<MapData, FlowKey, FlowState> {
        let layout = std::fs::read_dir(self.pin_dir())
            .expect("listing the pin directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.join(map_names::PEER_FLOWS).exists())
            .unwrap_or_else(|| {
                panic!(
                    "no pinned {} under {:?}",
                    map_names::PEER_FLOWS,
                    self.pin_dir()
                )
            });
        let data = MapData::from_pin(layout.join(map_names::PEER_FLOWS))
            .unwrap_or_else(|e| panic!("opening the pinned peer flows: {e}"));
        HashMap::try_from(Map::LruHashMap(data))
            .unwrap_or_else(|e| panic!("the pinned peer flows: {e}"))
    }
}

/// The flow key of a TCP connection from `client`:`port` to [`VIP`] port 80.
pub fn flow_key(client: IpAddr, port: u16) -> FlowKey {
    let (src, family) = lb_userspace::model::addr_bytes(client);
    let (dst, _) = lb_userspace::model::addr_bytes(IpAddr::V4(VIP));
    FlowKey {
        src,
        dst,
        ports: (u32::from(port) << 16) | 80,
        proto: 6,
        family,
        _pad: [0; 2],
    }
}

impl Drop for PinnedRun {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("umount {}: {e}", self.bpffs.display());
        }
    }
}

/// Builds a topology with `reals` real servers holding [`VIP`] and attaches the
/// pass-through XDP program to the balancer's switch port, without which the balancer's
/// XDP_TX frames never reach the bridge (see docs/development.md).
pub fn balanced_topology(prefix: &str, reals: usize) -> Topology {
    let mut topo = Topology::build(&TopologySpec {
        prefix: prefix.to_owned(),
        reals,
        vip_v4: VIP,
    });
    let port = topo.lb.switch_port.clone();
    pass_on_switch_port(&mut topo, &port);
    topo
}

/// Attaches the pass-through XDP program to switch port `port` of `topo` (kept
/// until the topology is dropped), so a balancer behind it can send XDP_TX frames.
pub fn pass_on_switch_port(topo: &mut Topology, port: &str) {
    let pass = topo.sw.run_in(|| {
        let mut dp = Dataplane::load().unwrap_or_else(|e| {
            panic!(
                "loading the XDP object for the switch port: {} (needs root)",
                Chain(&e)
            )
        });
        dp.attach(prog_names::PASS, port, XdpMode::Driver)
            .unwrap_or_else(|e| {
                panic!(
                    "attaching {} to switch port {port}: {}",
                    prog_names::PASS,
                    Chain(&e)
                )
            });
        dp
    });
    topo.guards.push(Box::new(pass));
}

/// Starts `xlb-testsrv --name NAME ARGS...` in `ns` and waits until it says `ready`.
pub fn start_real(ns: &Netns, name: &str, args: &[&str]) -> Proc {
    let mut cmd = ns.command(path_str(&testsrv_bin()));
    cmd.args(["--name", name])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let what = format!("xlb-testsrv {name} in {}", ns.name());
    let mut proc = Proc::spawn(&what, &mut cmd);
    let stdout = proc.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let got = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(got);
    });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        check_interrupted();
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(line)) if line.trim() == "ready" => return proc,
            Ok(got) => panic!(
                "{what} did not say ready (got {got:?}, exit {:?})",
                proc.exited()
            ),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(e) => panic!("{what} not ready after {START_TIMEOUT:?}: {e}"),
        }
    }
}

/// Starts `xlb-testsrv` on every real of `topo`, named `rs1..rsN` like their namespaces.
pub fn start_reals(topo: &Topology, args: &[&str]) -> Vec<Proc> {
    topo.reals
        .iter()
        .enumerate()
        .map(|(i, real)| start_real(&real.ns, &real_name(i), args))
        .collect()
}

/// The name of the `i`th real (0-based): `rs1`, `rs2`, ...
pub fn real_name(i: usize) -> String {
    format!("rs{}", i + 1)
}

/// `xlb run` in the balancer's namespace, with its control socket and log in a scratch
/// directory; stopped with SIGTERM (its clean shutdown) when dropped.
#[derive(Debug)]
pub struct Daemon {
    proc: Proc,
    ns: String,
    socket: PathBuf,
    log: PathBuf,
    // Last: removed only after the daemon has stopped (`None`: the caller's directory).
    _dir: Option<RunDir>,
}

impl Daemon {
    /// Starts `xlb run --iface IFACE --no-pin` in `ns` (the data path stops
    /// with the daemon) and waits until its API answers.
    pub fn start(ns: &Netns, iface: &str) -> Daemon {
        Self::start_with(ns, iface, &["--no-pin"])
    }

    /// Starts `xlb run --iface IFACE --socket DIR/xlb.sock --state-file
    /// DIR/state.json EXTRA...` in `ns` and waits until its API answers; panics
    /// quoting its log if it exits or stays silent.
    pub fn start_with(ns: &Netns, iface: &str, extra: &[&str]) -> Daemon {
        let dir = RunDir::new(&format!("xlb-{}", ns.name()));
        let mut daemon = Self::spawn(ns, iface, dir.path(), extra, &[]);
        daemon._dir = Some(dir);
        daemon.wait_for_api();
        daemon
    }

    /// Like [`Daemon::start_with`] in a directory the caller owns (so that a later daemon
    /// finds the same socket and state file): `--socket DIR/xlb.sock --state-file
    /// DIR/state.json`, its log a new `DIR/xlb-N.log`.
    pub fn start_in(ns: &Netns, iface: &str, dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_in_env(ns, iface, dir, extra, &[])
    }

    /// Like [`Daemon::start_in`] with environment variables `env` set for the daemon
    /// (e.g. the `XLB_TEST_PAUSE_AFTER_WRITES` hook).
    pub fn start_in_env(
        ns: &Netns,
        iface: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut daemon = Self::spawn(ns, iface, dir, extra, env);
        daemon.wait_for_api();
        daemon
    }

    /// Starts `xlb run` like [`Daemon::start_in`] without waiting for its API: for a
    /// daemon that is expected to fail. Returns it (use [`Daemon::wait_exit`]).
    pub fn spawn_in(ns: &Netns, iface: &str, dir: &Path, extra: &[&str]) -> Daemon {
        Self::spawn(ns, iface, dir, extra, &[])
    }

    /// Waits (up to the start timeout) for the daemon to exit; its status and log.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let what = format!("`xlb run` in {}", self.ns);
        wait_exit(&mut self.proc, &what, &self.log)
    }

    /// A pinned daemon of `run`: [`Daemon::start_in`] its directory with `--pin-dir` its
    /// bpffs, so the data path outlives the daemon and the next one adopts it.
    pub fn start_pinned(ns: &Netns, iface: &str, run: &PinnedRun, extra: &[&str]) -> Daemon {
        let mut args = vec!["--pin-dir", path_str(run.pin_dir())];
        args.extend_from_slice(extra);
        Self::start_in(ns, iface, run.dir(), &args)
    }

    /// Like [`Daemon::start_with`] under the capability bounding set
    /// `bounding_set` (setpriv's words) instead of the unit's: a daemon started
    /// with less than the unit gives.
    pub fn start_with_bounding_set(
        ns: &Netns,
        iface: &str,
        bounding_set: &str,
        extra: &[&str],
    ) -> Daemon {
        // A directory of its own: it may replace a daemon of `start_with` whose
        // directory goes when that one is dropped.
        let dir = RunDir::new(&format!("xlb-{}-bounded", ns.name()));
        let mut daemon = Self::spawn_bounded(ns, iface, dir.path(), extra, &[], bounding_set);
        daemon._dir = Some(dir);
        daemon.wait_for_api();
        daemon
    }

    fn spawn(ns: &Netns, iface: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::spawn_bounded(ns, iface, dir, extra, env, UNIT_BOUNDING_SET)
    }

    fn spawn_bounded(
        ns: &Netns,
        iface: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        bounding_set: &str,
    ) -> Daemon {
        static LOGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let state_file = dir.join("state.json");
        let socket = dir.join("xlb.sock");
        let log = dir.join(format!("xlb-{}.log", LOGS.fetch_add(1, Ordering::Relaxed)));
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        // Under the shipped unit's capability bounding set and no-new-privs, as
        // systemd runs it: every end-to-end test proves the daemon works there.
        let mut cmd = ns.command("setpriv");
        cmd.args(["--bounding-set", bounding_set, "--no-new-privs", "--"])
            .arg(xlb_bin())
            .arg("--socket")
            .arg(&socket)
            .args(["run", "--iface", iface])
            .arg("--state-file")
            .arg(&state_file)
            .args(extra)
            .envs(env.iter().copied())
            // The log is a file: no colour codes in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let proc = Proc::spawn(&format!("xlb run in {}", ns.name()), &mut cmd);
        Daemon {
            proc,
            ns: ns.name().to_owned(),
            socket,
            log,
            _dir: None,
        }
    }

    fn wait_for_api(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_interrupted();
            if let Some(status) = self.proc.exited() {
                panic!(
                    "`xlb run` in {} exited ({status}) before its API answered; its log:\n{}",
                    self.ns,
                    self.log()
                );
            }
            if api_answers(&self.socket) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`xlb run` in {} did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.ns,
                    self.socket.display(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Pid {
        self.proc.pid()
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// A command running `xlb ARGS` in the balancer's namespace against this daemon
    /// (through `XLB_SOCKET`, so the arguments read as an operator types them).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(xlb_bin())
            .args(args)
            .env("XLB_SOCKET", &self.socket)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `xlb ARGS` and returns its output, whatever its exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run xlb {}: {e}", args.join(" ")))
    }

    /// Runs `xlb ARGS` and returns its stdout; panics with its stderr (and the daemon's
    /// log) if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        if !out.status.success() {
            panic!(
                "`xlb {}` failed ({}): {}\ndaemon log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log()
            );
        }
        String::from_utf8(out.stdout).expect("xlb prints UTF-8")
    }

    /// Stops the daemon with SIGTERM (it detaches and removes its socket) and returns
    /// how it ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.stop()
    }

    /// Kills the daemon with SIGKILL (a crash: no cleanup at all) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.proc.kill()
    }

    /// Sends `sig` (e.g. SIGHUP) to the daemon.
    pub fn signal(&mut self, sig: Signal) {
        self.proc.signal(sig);
    }

    /// Waits (up to [`START_TIMEOUT`]) until the daemon's log contains `needle` and
    /// returns the log; panics quoting it otherwise.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_interrupted();
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if let Some(status) = self.proc.exited() {
                panic!("`xlb run` exited ({status}) before logging {needle:?}; its log:\n{log}");
            }
            if Instant::now() >= deadline {
                panic!(
                    "`xlb run` did not log {needle:?} within {START_TIMEOUT:?}; its log:\n{log}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `METHOD PATH` with `body` (JSON) on the control socket, as `curl --unix-socket`
    /// sends it: the status code and the body.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api_request(&self.socket, method, path, body)
    }
}

/// One HTTP/1.1 request on a Unix socket (`Connection: close`): the status code and the
/// body. Panics if the socket does not answer HTTP.
pub fn api_request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    let timeout = Some(Duration::from_secs(30));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .expect("socket timeouts");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("sending {method} {path}: {e}"));
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("reading the answer to {method} {path}: {e}"));
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer head to {method} {path}: {answer:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in the answer to {method} {path}: {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

/// Decodes a chunked HTTP body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// Whether a daemon answers `GET /v1/vips` on `socket` (a connect alone succeeds as
/// soon as the socket is bound, before the program is attached).
fn api_answers(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    let request = b"GET /v1/vips HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    stream.write_all(request).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

/// A topology with the daemon on the balancer and `xlb-testsrv` on every real: the
/// starting point of every end-to-end test. Fields drop in order: daemon, servers,
/// then the namespaces.
pub struct Lab {
    /// `xlb run` on the balancer's `eth0`.
    pub daemon: Daemon,
    /// `xlb-testsrv` on each real, in order.
    pub servers: Vec<Proc>,
    /// The namespaces.
    pub topo: Topology,
}

impl Lab {
    /// Builds the topology (namespace prefix from `tag`, see
    /// [`crate::netns::unique_prefix`]), starts the servers with `server_args` and the
    /// daemon, with nothing configured yet.
    pub fn start(tag: &str, reals: usize, server_args: &[&str]) -> Lab {
        Self::start_with(tag, reals, server_args, &["--no-pin"])
    }

    /// Like [`Lab::start`] with `xlb run` given `daemon_args` (see [`Daemon::start_with`]).
    pub fn start_with(tag: &str, reals: usize, server_args: &[&str], daemon_args: &[&str]) -> Lab {
        let topo = balanced_topology(&crate::netns::unique_prefix(tag), reals);
        let servers = start_reals(&topo, server_args);
        let daemon = Daemon::start_with(&topo.lb.ns, "eth0", daemon_args);
        Lab {
            daemon,
            servers,
            topo,
        }
    }

    /// The real whose address is `addr`, as `(index, host)`.
    pub fn real_by_addr(&self, addr: Ipv4Addr) -> Option<(usize, &Host)> {
        self.topo
            .reals
            .iter()
            .enumerate()
            .find(|(_, h)| h.ipv4 == addr)
    }
}

/// How long a bounded wait for the daemon or a load may take before a test fails
/// (never a measure of speed: a healthy run is far below it).
pub const WAIT: Duration = Duration::from_secs(30);

/// The text of the log file `path` so far.
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// Waits (up to the start timeout) for `proc`, which is `what`, to exit on its
/// own; its status and its log (the file `log`). Panics with the log if it
/// still runs.
fn wait_exit(proc: &mut Proc, what: &str, log: &Path) -> (ExitStatus, String) {
    let read = || read_log(log);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        check_interrupted();
        if let Some(status) = proc.exited() {
            return (status, read());
        }
        assert!(
            Instant::now() < deadline,
            "{what} still runs after {START_TIMEOUT:?}; its log:\n{}",
            read()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after [`WAIT`].
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        check_interrupted();
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `text` as JSON; panics naming `what` (the command that printed it) if it is not.
pub fn json(text: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what} printed invalid JSON ({e}): {text}"))
}

/// Packet and byte counters of a host's `eth0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

impl LinkCounters {
    /// Reads `host`'s `eth0` counters (`ip -s link`).
    pub fn read(host: &Host) -> LinkCounters {
        let out = host.ns.ip("-j -s link show eth0");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("`ip -j -s link` printed invalid JSON: {e}"));
        let stats = &json[0]["stats64"];
        let get = |dir: &str, what: &str| {
            stats[dir][what]
                .as_u64()
                .unwrap_or_else(|| panic!("no stats64.{dir}.{what} in {}: {json}", host.ns.name()))
        };
        LinkCounters {
            rx_packets: get("rx", "packets"),
            rx_bytes: get("rx", "bytes"),
            tx_packets: get("tx", "packets"),
            tx_bytes: get("tx", "bytes"),
        }
    }

    /// What changed since `before`.
    pub fn since(&self, before: &LinkCounters) -> LinkCounters {
        LinkCounters {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
        }
    }
}

/// One answered HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The real that answered (its `X-Real` header).
    pub real: String,
    /// The connection's local (client) port: with the addresses and protocol, the flow's
    /// 5-tuple.
    pub local_port: u16,
    /// Body length.
    pub body_bytes: usize,
}

/// One kept-alive HTTP/1.1 connection: several `GET /` on the same TCP connection (one
/// 5-tuple), as a long-lived client does.
#[derive(Debug)]
pub struct KeepAlive {
    to: SocketAddr,
    local_port: u16,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects to `to`. Call it inside the client's namespace (`Netns::run_in`); the
    /// connection can then be used from any thread.
    pub fn connect(to: SocketAddr, timeout: Duration) -> Result<KeepAlive, String> {
        let stream =
            TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let local_port = stream
            .local_addr()
            .map_err(|e| format!("local address: {e}"))?
            .port();
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| format!("cloning the socket: {e}"))?,
        );
        Ok(KeepAlive {
            to,
            local_port,
            stream,
            reader,
        })
    }

    /// `GET /` on the open connection, reading exactly one answer (by its
    /// Content-Length) and leaving the connection open.
    pub fn get(&mut self) -> Result<HttpAnswer, String> {
        let to = self.to;
        let request = format!("GET / HTTP/1.1\r\nHost: {to}\r\n\r\n");
        self.stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("send to {to}: {e}"))?;
        let mut status = String::new();
        self.reader
            .read_line(&mut status)
            .map_err(|e| format!("read from {to}: {e}"))?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("unexpected status from {to}: {status:?}"));
        }
        let (mut real, mut length) = (None, None);
        loop {
            let mut line = String::new();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("read from {to}: {e}"))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("x-real") {
                    real = Some(v.trim().to_owned());
                } else if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| format!("no Content-Length from {to}"))?;
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body from {to}: {e}"))?;
        Ok(HttpAnswer {
            real: real.ok_or_else(|| format!("no X-Real header from {to}"))?,
            local_port: self.local_port,
            body_bytes: length,
        })
    }
}

/// Opens `n` kept-alive connections from the client of `topo` to `to`, each
/// with the real that answered its first request; panics naming the one that
/// failed.
pub fn keep_alive(
    topo: &crate::netns::Topology,
    to: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Vec<(KeepAlive, String)> {
    keep_alive_from(&topo.client.ns, to, n, timeout)
}

/// Like [`keep_alive`] from namespace `ns`.
pub fn keep_alive_from(
    ns: &crate::netns::Netns,
    to: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Vec<(KeepAlive, String)> {
    ns.run_in(|| {
        (0..n)
            .map(|i| {
                let mut c = KeepAlive::connect(to, timeout)
                    .unwrap_or_else(|e| panic!("kept-alive connection {i}: {e}"));
                let real = c
                    .get()
                    .unwrap_or_else(|e| panic!("kept-alive connection {i}: first request: {e}"))
                    .real;
                (c, real)
            })
            .collect()
    })
}

/// `GET /` to `to` on a fresh connection (`Connection: close`), reading the whole
/// answer. Call it inside the client's namespace (`Netns::run_in`).
pub fn http_get(to: SocketAddr, timeout: Duration) -> Result<HttpAnswer, String> {
    let mut stream =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let local_port = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?
        .port();
    let request = format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read from {to}: {e}"))?;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete answer head from {to} ({} bytes)", answer.len()))?;
    let head = String::from_utf8_lossy(&answer[..head_end]);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "unexpected status from {to}: {:?}",
            head.lines().next()
        ));
    }
    let real = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-real"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .ok_or_else(|| format!("no X-Real header from {to}"))?;
    Ok(HttpAnswer {
        real,
        local_port,
        body_bytes: answer.len() - head_end - 4,
    })
}

/// `xlb decap --iface eth0` on a real server, in the foreground as an operator (or a
/// systemd unit) runs it, with its log in a scratch directory; stopped with SIGTERM,
/// which makes it log its counters, when [`DecapProc::stop`] is called or it is dropped.
#[derive(Debug)]
pub struct DecapProc {
    proc: Proc,
    ns: String,
    log: PathBuf,
    // Last: removed only after the process has stopped.
    _dir: RunDir,
}

impl DecapProc {
    /// Starts `xlb decap --iface eth0 EXTRA...` in `host`'s namespace and waits until it
    /// says the program is attached; panics quoting its log if it exits first.
    pub fn start(host: &Host, extra: &[&str]) -> DecapProc {
        let ns = host.ns.name().to_owned();
        let dir = RunDir::new(&format!("xlb-decap-{ns}"));
        let log = dir.path().join("decap.log");
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut cmd = host.ns.command(path_str(&xlb_bin()));
        cmd.args(["decap", "--iface", "eth0"]);
        // No pins unless the test gives a pin directory: inside `ip netns exec`
        // /sys/fs/bpf is not the host's bpffs.
        if !extra.contains(&"--pin-dir") {
            cmd.arg("--no-pin");
        }
        cmd.args(extra)
            .env("NO_COLOR", "1")
            // No XLB_LOG: the counter report must show at the default level.
            .env_remove("XLB_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut decap = DecapProc {
            proc: Proc::spawn(&format!("xlb decap in {ns}"), &mut cmd),
            ns,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !decap.log().contains("decapsulating tunnels") {
            check_interrupted();
            if let Some(status) = decap.proc.exited() {
                panic!(
                    "`xlb decap` in {} exited ({status}) before attaching; its log:\n{}",
                    decap.ns,
                    decap.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`xlb decap` in {} did not attach within {START_TIMEOUT:?}; its log:\n{}",
                decap.ns,
                decap.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        decap
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits (up to the start timeout) for it to exit; its status and log.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let what = format!("`xlb decap` in {}", self.ns);
        wait_exit(&mut self.proc, &what, &self.log)
    }

    /// Stops it with SIGTERM and returns the packet counters of the report it logs on
    /// the way out (`decap counters: NAME=PACKETS ...`), by name.
    pub fn stop(&mut self) -> BTreeMap<String, u64> {
        let status = self.proc.stop();
        let log = self.log();
        assert!(
            status.is_some_and(|s| s.success()),
            "`xlb decap` in {} ended with {status:?}; its log:\n{log}",
            self.ns
        );
        parse_decap_counters(&log).unwrap_or_else(|| {
            panic!(
                "`xlb decap` in {} logged no counters on exit; its log:\n{log}",
                self.ns
            )
        })
    }
}

/// The last `decap counters: NAME=N ...` report in an `xlb decap` log.
fn parse_decap_counters(log: &str) -> Option<BTreeMap<String, u64>> {
    let line = log.lines().rev().find(|l| l.contains("decap counters:"))?;
    let (_, report) = line.split_once("decap counters:")?;
    report
        .split_whitespace()
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Panics unless the test runs as root: the netns end-to-end tests create
/// namespaces, mount bpffs and attach XDP programs.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the netns end-to-end tests create namespaces, mount bpffs and attach XDP: run them as \
         root"
    );
}

/// `xlb stats --json` of the lab's daemon.
pub fn stats(lab: &Lab) -> serde_json::Value {
    let out = lab.daemon.cli_ok(&["stats", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("xlb stats --json: {e}: {out}"))
}

/// `GET /metrics` at `addr` from inside `host`'s namespace (the daemon's `--metrics-addr`,
/// or `xlb decap --metrics-addr` on a real): the body of a `200` answer that is an
/// OpenMetrics exposition, not chunked.
pub fn scrape_metrics(host: &Host, addr: SocketAddr) -> String {
    const TIMEOUT: Duration = Duration::from_secs(3);
    host.ns.run_in(|| {
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to the metrics address {addr}: {e}"));
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .expect("send the scrape");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the scrape");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer from {addr}: {answer:?}"));
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 200"),
            "/metrics answered {head:?}"
        );
        assert!(
            !head.contains("chunked"),
            "unexpected chunked /metrics answer"
        );
        assert!(
            head.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "/metrics answered {head:?}"
        );
        assert!(body.ends_with("# EOF\n"), "unterminated exposition: {body}");
        body.to_owned()
    })
}

/// The samples of a metrics exposition: `name{labels}` to value.
pub fn metric_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("odd metrics line {l:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("odd metrics value in {l:?}"));
            (series.to_owned(), value)
        })
        .collect()
}

/// Check flags quick enough for a test: a probe every 200 ms, a verdict after two.
pub const QUICK_CHECK: [&str; 8] = [
    "--check-interval",
    "200",
    "--check-timeout",
    "150",
    "--check-rise",
    "2",
    "--check-fall",
    "2",
];

/// Whether a [`real_health`] entry shows the real up after a few probes that never
/// failed.
pub fn proven_up(h: &serde_json::Value) -> bool {
    h["status"]["up"] == true
        && h["status"]["probes"].as_u64().is_some_and(|n| n >= 3)
        && h["status"]["last_error"].is_null()
}

/// The health entry of real `addr` of `service` in `xlb status --json`: `check`,
/// `via`, and `status` (`up`, `probes`, `last_error`, ...) once probed.
pub fn real_health(daemon: &Daemon, service: &str, addr: IpAddr) -> serde_json::Value {
    let status = json(&daemon.cli_ok(&["status", "--json"]), "xlb status --json");
    status["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == service))
        .and_then(|v| v["health"].as_array())
        .and_then(|h| h.iter().find(|r| r["addr"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no health of {addr} in {service}: {status}"))
}

/// Polls [`real_health`] until `ok` holds for it (up to [`WAIT`]); returns it. Panics
/// naming `what`, with the last entry and the daemon's log.
pub fn wait_health(
    daemon: &Daemon,
    service: &str,
    addr: IpAddr,
    what: &str,
    mut ok: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        check_interrupted();
        let h = real_health(daemon, service, addr);
        if ok(&h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; last: {h}\ndaemon log:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Real `addr` of `service` in `xlb real list SERVICE --json`.
pub fn real_listed(daemon: &Daemon, service: &str, addr: IpAddr) -> serde_json::Value {
    let list = json(
        &daemon.cli_ok(&["real", "list", service, "--json"]),
        "xlb real list --json",
    );
    list.as_array()
        .and_then(|l| l.iter().find(|r| r["addr"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no real {addr} in `xlb real list {service}`: {list}"))
}
