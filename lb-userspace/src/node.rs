//! The balancer's place in a cluster: which VIPs it announces to the routers
//! in front (through BIRD), `xlb drain` (stop attracting traffic, keep
//! forwarding what still arrives, say when stopping is safe), and the VRRP
//! role keepalived reports with `xlb role`; `xlb ready` (keepalived's
//! `vrrp_script`) reads the same status.
//!
//! # Announcing through BIRD
//!
//! xlb speaks no routing protocol: BIRD does (docs/cluster.md). xlb writes
//! the VIP addresses this balancer should attract as a BIRD configuration
//! fragment, two static protocols named `xlb_vips4` and `xlb_vips6`, which the
//! operator's `bird.conf` includes and exports over BGP; then it asks BIRD over
//! its control socket to re-read its configuration (`configure`), which adds
//! and withdraws routes without touching the BGP sessions.
//!
//! An address is announced while the data path is attached (the task starts
//! after the attach), its state applied, at least one service on the address
//! has a real that can serve (healthy and in the table) and the node is not
//! draining. A failed write or `configure` is retried every second and shown
//! in `xlb status` and the metrics; BIRD keeps announcing what it had.
//!
//! # Draining
//!
//! `xlb drain` withdraws every address (or, without BIRD, only makes `xlb
//! ready` fail, so that keepalived moves the VIPs away), keeps forwarding, and
//! watches the VIP packet counters: once the routes are withdrawn and no VIP
//! packet has arrived for the quiet period, the node is safe to stop. `xlb
//! drain --cancel` announces again; a restarted daemon is not draining.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::{mpsc, oneshot, watch},
};

use crate::{controller::Snapshot, counters::Reader};

/// How long one exchange with BIRD's control socket may take.
pub const BIRD_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a failed announcement is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the VIP counters are read while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long no VIP packet may arrive before a drained node is safe to stop,
/// unless `xlb drain --quiet` says otherwise.
pub const DEFAULT_QUIET: Duration = Duration::from_secs(2);
/// Longest quiet period `xlb drain --quiet` accepts.
pub const MAX_QUIET: Duration = Duration::from_secs(600);
/// The BIRD protocol holding the IPv4 VIPs.
pub const BIRD_PROTOCOL_V4: &str = "xlb_vips4";
/// The BIRD protocol holding the IPv6 VIPs.
pub const BIRD_PROTOCOL_V6: &str = "xlb_vips6";

/// Where BIRD is and where its fragment goes.
#[derive(Debug, Clone)]
pub struct Bird {
    /// BIRD's control socket (`bird -s`, Debian: /run/bird/bird.ctl).
    pub socket: PathBuf,
    /// The fragment xlb writes and BIRD's configuration includes.
    pub routes: PathBuf,
}

/// The VRRP state keepalived reports through its `notify_*` hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// This node holds the VIPs.
    Master,
    /// Standby: another node holds the VIPs.
    Backup,
    /// keepalived found this node unfit (a failed `vrrp_script`, a down link).
    Fault,
    /// keepalived stopped.
    Stop,
}

impl Role {
    /// Lower-case name, as in metrics and status.
    pub fn name(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Backup => "backup",
            Self::Fault => "fault",
            Self::Stop => "stop",
        }
    }

    /// Every role, for metrics.
    pub const ALL: [Role; 4] = [Self::Master, Self::Backup, Self::Fault, Self::Stop];
}

/// What the node task publishes (`GET /v1/node`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// VIP addresses with at least one service that has a real able to serve.
    pub serving: Vec<IpAddr>,
    /// Route announcement through BIRD; `None` when not configured.
    pub bird: Option<BirdStatus>,
    /// The drain in progress, if any.
    pub drain: Option<DrainStatus>,
    /// The last VRRP role reported by `xlb role`, if any.
    pub role: Option<RoleStatus>,
    /// Flow sync, when on.
    #[serde(default)]
    pub sync: Option<crate::flowsync::SyncStatus>,
}

impl NodeStatus {
    /// Why the node cannot take traffic (`xlb ready`), or `None` when it can.
    pub fn not_ready(&self, vips: &[IpAddr]) -> Option<String> {
        if self.drain.is_some() {
            return Some("the node is draining (`xlb drain --cancel` ends it)".into());
        }
        if self.sync.as_ref().is_some_and(|s| !s.ready) {
            return Some(
                "flow sync is pulling the peers' flows before the node takes traffic".into(),
            );
        }
        if vips.is_empty() {
            return self
                .serving
                .is_empty()
                .then(|| "no VIP has a real that can serve".into());
        }
        let missing: Vec<String> = vips
            .iter()
            .filter(|v| !self.serving.contains(v))
            .map(ToString::to_string)
            .collect();
        (!missing.is_empty()).then(|| format!("no real can serve {}", missing.join(", ")))
    }
}

/// Route announcement as it stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BirdStatus {
    /// BIRD's control socket.
    pub socket: String,
    /// The fragment xlb writes.
    pub routes_file: String,
    /// The addresses BIRD was last told to announce (and accepted).
    pub announced: Vec<IpAddr>,
    /// Whether BIRD has the addresses xlb wants announced right now.
    pub in_sync: bool,
    /// The last failure, when not in sync.
    pub error: Option<String>,
    /// Since when announcing fails (Unix seconds).
    pub error_since: Option<u64>,
    /// When BIRD last accepted a configuration from xlb (Unix seconds).
    pub configured_at: Option<u64>,
}

/// A drain as it stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// When `xlb drain` started it (Unix seconds).
    pub since: u64,
    /// How long no VIP packet must arrive (ms).
    pub quiet_ms: u64,
    /// Whether the routes are withdrawn (always true without BIRD).
    pub withdrawn: bool,
    /// Milliseconds since the last VIP packet arrived (or since the drain
    /// started, if none arrived since).
    pub idle_ms: u64,
    /// VIP packets per second over the last poll.
    pub packets_per_second: u64,
    /// Withdrawn and quiet: stopping the daemon breaks nothing.
    pub safe_to_stop: bool,
}

/// The VRRP role and since when.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoleStatus {
    /// The role.
    pub role: Role,
    /// When `xlb role` reported it (Unix seconds).
    pub since: u64,
}

/// What went wrong talking to BIRD.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    /// The fragment could not be written.
    #[error("cannot write {path}: {err}")]
    Write {
        /// The fragment.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The control socket could not be reached or broke.
    #[error("BIRD's control socket {path}: {err}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// BIRD did not answer in time.
    #[error("BIRD did not answer on {path} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// BIRD refused the configuration.
    #[error("BIRD refused to reconfigure: {0}")]
    Refused(String),
}

/// Commands to the node task.
enum Command {
    Drain {
        quiet: Duration,
        reply: oneshot::Sender<NodeStatus>,
    },
    Cancel {
        reply: oneshot::Sender<bool>,
    },
    Role {
        role: Role,
        reply: oneshot::Sender<()>,
    },
    Withdraw {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The node task's handle: commands in, status out.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<NodeStatus>,
}

impl NodeHandle {
    /// The last published status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(command(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Starts draining (or changes the quiet period of a drain under way).
    pub async fn drain(&self, quiet: Duration) -> Option<NodeStatus> {
        self.ask(|reply| Command::Drain { quiet, reply }).await
    }

    /// Ends a drain: announces again. False if none was under way.
    pub async fn cancel_drain(&self) -> Option<bool> {
        self.ask(|reply| Command::Cancel { reply }).await
    }

    /// Records the VRRP role.
    pub async fn set_role(&self, role: Role) -> Option<()> {
        self.ask(|reply| Command::Role { role, reply }).await
    }

    /// Withdraws every route before the data path goes away (a daemon
    /// stopping without pins); `Ok` without BIRD.
    pub async fn withdraw_all(&self) -> Result<(), String> {
        self.ask(|reply| Command::Withdraw { reply })
            .await
            .unwrap_or_else(|| Err("the node task stopped".into()))
    }
}

/// Starts the node task: it follows the controller's snapshots and, while
/// draining, the VIP counters of `reader`.
pub fn spawn(
    bird: Option<Bird>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    reader: Arc<Reader>,
    sync: Option<watch::Receiver<crate::flowsync::SyncStatus>>,
) -> (NodeHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(NodeStatus::default());
    let task = Node {
        bird: bird.map(|b| BirdState {
            status: BirdStatus {
                socket: b.socket.display().to_string(),
                routes_file: b.routes.display().to_string(),
                ..BirdStatus::default()
            },
            conf: b,
            retry_at: None,
        }),
        snapshots,
        reader,
        sync,
        sync_done: false,
        status: status_tx,
        drain: None,
        role: None,
        stopped_announcing: false,
    };
    (NodeHandle { tx, status }, tokio::spawn(task.run(rx)))
}

struct BirdState {
    conf: Bird,
    status: BirdStatus,
    /// When to try again after a failure.
    retry_at: Option<Instant>,
}

struct Drain {
    since: SystemTime,
    quiet: Duration,
    /// The VIP packet total at the last poll.
    packets: Option<u64>,
    last_poll: Instant,
    /// When a VIP packet last arrived (or the drain started).
    last_packet: Instant,
    rate: u64,
}

struct Node {
    bird: Option<BirdState>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    reader: Arc<Reader>,
    /// Flow sync's status: nothing is announced before its start-up pull is over.
    sync: Option<watch::Receiver<crate::flowsync::SyncStatus>>,
    /// Flow sync's status will not change again.
    sync_done: bool,
    status: watch::Sender<NodeStatus>,
    drain: Option<Drain>,
    role: Option<RoleStatus>,
    /// Set once everything was withdrawn for a stop: nothing is announced again.
    stopped_announcing: bool,
}

/// Waits for flow sync's status to change (forever when sync is off or
/// its status can no longer change).
async fn sync_changed(
    sync: &mut Option<watch::Receiver<crate::flowsync::SyncStatus>>,
    done: bool,
) -> Result<(), watch::error::RecvError> {
    match sync {
        Some(rx) if !done => rx.changed().await,
        _ => std::future::pending().await,
    }
}

impl Node {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let serving = serving(&self.snapshots.borrow_and_update());
            let pulling = self.sync.as_ref().is_some_and(|s| !s.borrow().ready);
            let wanted: BTreeSet<IpAddr> =
                if self.drain.is_some() || self.stopped_announcing || pulling {
                    BTreeSet::new()
                } else {
                    serving.clone()
                };
            self.announce(&wanted).await;
            self.poll_drain();
            self.publish(&serving);
            let tick = if self.drain.is_some() {
                DRAIN_POLL
            } else if self.bird.as_ref().is_some_and(|b| b.retry_at.is_some()) {
                RETRY
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                command = rx.recv() => match command {
                    None => return,
                    Some(command) => self.handle(command).await,
                },
                changed = sync_changed(&mut self.sync, self.sync_done) => {
                    // The start-up pull is over: its last status stays.
                    self.sync_done |= changed.is_err();
                }
                () = tokio::time::sleep(tick) => {}
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Drain { quiet, reply } => {
                match &mut self.drain {
                    Some(d) => d.quiet = quiet,
                    None => {
                        tracing::warn!(
                            quiet_ms = quiet.as_millis() as u64,
                            "draining: withdrawing every VIP, forwarding what still arrives"
                        );
                        let now = Instant::now();
                        self.drain = Some(Drain {
                            since: SystemTime::now(),
                            quiet,
                            packets: None,
                            last_poll: now,
                            last_packet: now,
                            rate: 0,
                        });
                    }
                }
                // Withdraw before answering, so the answer says whether BIRD
                // took it.
                self.announce(&BTreeSet::new()).await;
                self.poll_drain();
                self.publish(&serving(&self.snapshots.borrow()));
                let _ = reply.send(self.status.borrow().clone());
            }
            Command::Cancel { reply } => {
                let was = self.drain.take().is_some();
                if was {
                    tracing::warn!("drain cancelled: announcing the VIPs again");
                }
                let _ = reply.send(was);
            }
            Command::Role { role, reply } => {
                if self.role.map(|r| r.role) != Some(role) {
                    tracing::warn!(role = role.name(), "VRRP role changed");
                    self.role = Some(RoleStatus {
                        role,
                        since: unix(SystemTime::now()),
                    });
                }
                self.publish(&serving(&self.snapshots.borrow()));
                let _ = reply.send(());
            }
            Command::Withdraw { reply } => {
                self.stopped_announcing = true;
                self.announce(&BTreeSet::new()).await;
                let result = match &self.bird {
                    Some(b) if !b.status.in_sync => Err(b.status.error.clone().unwrap_or_default()),
                    _ => Ok(()),
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Tells BIRD to announce `wanted`, unless it already does or a retry
    /// is not due yet.
    async fn announce(&mut self, wanted: &BTreeSet<IpAddr>) {
        let Some(bird) = &mut self.bird else {
            return;
        };
        let current: BTreeSet<IpAddr> = bird.status.announced.iter().copied().collect();
        let configured = bird.status.configured_at.is_some();
        if configured && bird.status.in_sync && current == *wanted {
            return;
        }
        if bird.retry_at.is_some_and(|at| Instant::now() < at) {
            // Failed recently: wait for the retry (a new wish is tried then).
            return;
        }
        match apply(&bird.conf, wanted).await {
            Ok(()) => {
                if bird.status.error.is_some() {
                    tracing::info!("BIRD accepts xlb's routes again");
                }
                tracing::info!(announced = ?wanted, "BIRD reconfigured");
                bird.status.announced = wanted.iter().copied().collect();
                bird.status.in_sync = true;
                bird.status.error = None;
                bird.status.error_since = None;
                bird.status.configured_at = Some(unix(SystemTime::now()));
                bird.retry_at = None;
            }
            Err(err) => {
                let message = err.to_string();
                if bird.status.error.is_none() {
                    tracing::error!(%err, "announcing the VIPs failed; retrying every second");
                    bird.status.error_since = Some(unix(SystemTime::now()));
                }
                bird.status.in_sync = false;
                bird.status.error = Some(message);
                bird.retry_at = Some(Instant::now() + RETRY);
            }
        }
    }

    /// Reads the VIP counters while draining.
    fn poll_drain(&mut self) {
        let Some(drain) = &mut self.drain else {
            return;
        };
        let snapshot = self.snapshots.borrow();
        let total = snapshot
            .vips
            .iter()
            .filter_map(|v| self.reader.vip_counter(v.id).ok())
            .map(|c| c.packets)
            .sum::<u64>();
        let now = Instant::now();
        if let Some(before) = drain.packets {
            let elapsed = now.duration_since(drain.last_poll).as_secs_f64();
            if total != before {
                drain.last_packet = now;
            }
            if elapsed > 0.0 {
                drain.rate = (total.saturating_sub(before) as f64 / elapsed).round() as u64;
            }
        }
        drain.packets = Some(total);
        drain.last_poll = now;
    }

    fn publish(&self, serving: &BTreeSet<IpAddr>) {
        let withdrawn = self.bird.as_ref().is_none_or(|b| {
            b.status.in_sync && b.status.announced.is_empty() && b.status.configured_at.is_some()
        });
        let drain = self.drain.as_ref().map(|d| {
            let idle = d.last_packet.elapsed();
            DrainStatus {
                since: unix(d.since),
                quiet_ms: d.quiet.as_millis() as u64,
                withdrawn,
                idle_ms: idle.as_millis() as u64,
                packets_per_second: d.rate,
                safe_to_stop: withdrawn && d.packets.is_some() && idle >= d.quiet,
            }
        });
        let status = NodeStatus {
            serving: serving.iter().copied().collect(),
            bird: self.bird.as_ref().map(|b| b.status.clone()),
            drain,
            role: self.role,
            sync: self.sync.as_ref().map(|s| s.borrow().clone()),
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }
}

/// Adds the node's metrics to `reg`: announcement, drain and VRRP role.
pub fn register_metrics(reg: &mut prometheus_client::registry::Registry, status: &NodeStatus) {
    use prometheus_client::metrics::{family::Family, gauge::Gauge};
    type Labels = Vec<(String, String)>;
    let draining = Gauge::<i64>::default();
    draining.set(i64::from(status.drain.is_some()));
    reg.register(
        "node_draining",
        "1 while `xlb drain` keeps the node out of the routers' choice",
        draining,
    );
    let safe = Gauge::<i64>::default();
    safe.set(i64::from(
        status.drain.as_ref().is_some_and(|d| d.safe_to_stop),
    ));
    reg.register(
        "node_safe_to_stop",
        "1 once a drained node's routes are withdrawn and no VIP packet arrives",
        safe,
    );
    if let Some(bird) = &status.bird {
        let announced = Family::<Labels, Gauge>::default();
        let addrs: BTreeSet<IpAddr> = status
            .serving
            .iter()
            .chain(&bird.announced)
            .copied()
            .collect();
        for addr in addrs {
            announced
                .get_or_create(&vec![("address".to_owned(), addr.to_string())])
                .set(i64::from(bird.announced.contains(&addr)));
        }
        reg.register(
            "vip_announced",
            "1 while BIRD announces the VIP address for this balancer",
            announced,
        );
        let in_sync = Gauge::<i64>::default();
        in_sync.set(i64::from(bird.in_sync));
        reg.register(
            "bird_in_sync",
            "1 when BIRD announces what xlb wants; 0 while writing or `configure` fails",
            in_sync,
        );
    }
    if let Some(current) = status.role {
        let role = Family::<Labels, Gauge>::default();
        for r in Role::ALL {
            role.get_or_create(&vec![("role".to_owned(), r.name().to_owned())])
                .set(i64::from(r == current.role));
        }
        reg.register(
            "vrrp_role",
            "1 for the VRRP role keepalived last reported with `xlb role`",
            role,
        );
    }
}

/// Addresses with at least one service whose table has a healthy real.
fn serving(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    snapshot
        .vips
        .iter()
        .filter(|v| v.reals.iter().any(|r| r.healthy && r.serving()))
        .map(|v| v.vip.addr)
        .collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The BIRD fragment announcing `addrs`.
pub fn fragment(addrs: &BTreeSet<IpAddr>) -> String {
    let mut out = String::from(
        "# Written by xlb: the VIPs this balancer announces. Do not edit: xlb rewrites it\n\
         # whenever the set changes, then asks BIRD to `configure` (docs/cluster.md).\n",
    );
    for (proto, channel, v4) in [
        (BIRD_PROTOCOL_V4, "ipv4", true),
        (BIRD_PROTOCOL_V6, "ipv6", false),
    ] {
        out.push_str(&format!("protocol static {proto} {{\n  {channel};\n"));
        for addr in addrs.iter().filter(|a| a.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            out.push_str(&format!("  route {addr}/{len} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Writes the fragment for `addrs` (atomically, readable by BIRD's user)
/// and has BIRD re-read its configuration.
pub async fn apply(bird: &Bird, addrs: &BTreeSet<IpAddr>) -> Result<(), BirdError> {
    write_fragment(&bird.routes, &fragment(addrs)).map_err(|err| BirdError::Write {
        path: bird.routes.clone(),
        err,
    })?;
    match tokio::time::timeout(BIRD_TIMEOUT, configure(&bird.socket)).await {
        Ok(result) => result,
        Err(_) => Err(BirdError::Timeout {
            path: bird.socket.clone(),
            timeout: BIRD_TIMEOUT,
        }),
    }
}

fn write_fragment(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    // BIRD runs as its own user: the file must be readable whatever the
    // daemon's umask (the unit's is 0077).
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Sends `configure` on BIRD's control socket and reads the answer.
///
/// BIRD's replies are lines of a four-digit code, then `-` (more lines
/// follow) or a space (the last line), then text; codes from 8000 are
/// errors (BIRD's doc/reply_codes).
async fn configure(socket: &Path) -> Result<(), BirdError> {
    let sock_err = |err| BirdError::Socket {
        path: socket.to_owned(),
        err,
    };
    let stream = UnixStream::connect(socket).await.map_err(sock_err)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting: "0001 BIRD 2.0.12 ready."
    read_reply(&mut lines).await.map_err(sock_err)?;
    write.write_all(b"configure\n").await.map_err(sock_err)?;
    let (code, text) = read_reply(&mut lines).await.map_err(sock_err)?;
    match code {
        // Reconfigured; in progress; queued; nothing to do.
        3 | 4 | 5 | 17 | 19 => Ok(()),
        _ => Err(BirdError::Refused(format!(
            "{code:04} {}",
            text.join(" / ")
        ))),
    }
}

/// Reads one reply: its final code and every line's text.
async fn read_reply(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> std::io::Result<(u16, Vec<String>)> {
    let mut texts = Vec::new();
    loop {
        let Some(line) = lines.next_line().await? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the connection",
            ));
        };
        // " text": continuation of the previous code.
        if let Some(rest) = line.strip_prefix(' ') {
            texts.push(rest.to_owned());
            continue;
        }
        let code = line.get(..4).and_then(|c| c.parse::<u16>().ok());
        let sep = line.as_bytes().get(4).copied();
        match (code, sep) {
            (Some(code), Some(b' ') | None) => {
                texts.push(line.get(5..).unwrap_or_default().to_owned());
                return Ok((code, texts));
            }
            (Some(_), Some(b'-')) => texts.push(line[5..].to_owned()),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not a BIRD reply line: {line:?}"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_splits_families_and_is_valid_with_nothing_to_announce() {
        let addrs: BTreeSet<IpAddr> = ["203.0.113.10", "2001:db8:203::10", "203.0.113.11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let text = fragment(&addrs);
        let v4 = text.split("protocol static xlb_vips6").next().unwrap();
        assert!(v4.contains("route 203.0.113.10/32 blackhole;"));
        assert!(v4.contains("route 203.0.113.11/32 blackhole;"));
        assert!(!v4.contains("2001:db8"));
        assert!(text.contains("  ipv6;\n  route 2001:db8:203::10/128 blackhole;\n}"));
        let empty = fragment(&BTreeSet::new());
        assert!(empty.contains("protocol static xlb_vips4 {\n  ipv4;\n}\n"));
        assert!(empty.contains("protocol static xlb_vips6 {\n  ipv6;\n}\n"));
    }

    #[test]
    fn ready_names_what_is_missing() {
        let vip: IpAddr = "203.0.113.10".parse().unwrap();
        let other: IpAddr = "203.0.113.11".parse().unwrap();
        let mut s = NodeStatus::default();
        assert_eq!(
            s.not_ready(&[]).as_deref(),
            Some("no VIP has a real that can serve")
        );
        s.serving = vec![vip];
        assert_eq!(s.not_ready(&[]), None);
        assert_eq!(s.not_ready(&[vip]), None);
        assert_eq!(
            s.not_ready(&[vip, other]).as_deref(),
            Some("no real can serve 203.0.113.11")
        );
        s.drain = Some(DrainStatus::default());
        assert!(s.not_ready(&[]).unwrap().contains("draining"));
    }
}
