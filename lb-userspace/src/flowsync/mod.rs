//! Flow sync: every balancer tells its peers which real each of its
//! confirmed flows is pinned to, so that a peer that receives the flow's
//! packets (the routers moved it after a failure, a drain or an upgrade)
//! sends them to the same real even when its own Maglev choice differs.
//!
//! - The data path reports a flow once it is confirmed (its second packet)
//!   and again when the client ends it, through a ring buffer
//!   (`XLB_FLOW_EVENTS`); the reporter batches the reports (10 ms or one
//!   1,400-byte datagram, whichever comes first), names each real by its
//!   address (real ids are every node's own), and sends the batch by UDP to
//!   every peer.
//! - The receiver authenticates each message ([`wire`]: cluster id, HMAC tag,
//!   per-sender replay window), translates each real back into this node's
//!   slot and generation, and writes the flow into `XLB_PEER_FLOWS`, which
//!   the data path reads on a conntrack miss of a non-SYN packet (and
//!   promotes into its conntrack table). An ended flow is removed.
//! - A starting node pulls a full copy (every flow in a peer's conntrack and
//!   peer tables) over TCP on the same port before the node task announces
//!   its VIPs ([`SyncHandle::ready`]), so a restarted balancer never takes
//!   over flows it has not heard of.
//!
//! The peers are the configured ones (`--sync-peer`) and, with `--store`, the
//! sync addresses the other live nodes publish in their node keys, followed
//! through the store's watch ([`Peers`]): a node that joins is sent to and
//! admitted at once, one whose key is gone is dropped.
//!
//! With `--sync-multicast` each batch is sent once to a multicast group the
//! nodes join instead of once per peer; a sender is then admitted by the
//! cluster id and the tag alone (there is no address list), and a starting
//! node with no configured or stored peer pulls from the first node whose
//! hello (its TCP pull address, sent on the group every second) it hears.
//!
//! Messages from a source that is not a peer, of another cluster
//! or version, with a bad tag, replayed, or naming a VIP or real this node
//! does not have are dropped and counted (`xlb_sync_dropped_total{reason}`).

pub mod wire;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, MapData, RingBuf};
use lb_common::{
    FLOW_EVENT_END, FLOW_EVENT_NEW, FLOW_F_REPORTED, FlowEvent, FlowKey, FlowState, ct_generation,
    flow_hash,
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, unix::AsyncFd},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
    task::JoinHandle,
};
use wire::{Entry, Header, Key, Kind, Op, Window};

use crate::{controller::Snapshot, model::addr_bytes};

/// How long a batch waits for more reports before it is sent.
pub const BATCH_WAIT: Duration = Duration::from_millis(10);

/// Flow sync settings, checked.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where this node receives reports (UDP) and serves full copies (TCP).
    pub listen: SocketAddr,
    /// The address published in this node's store key and multicast hellos,
    /// with `--store` or `--sync-multicast`.
    pub advertise: Option<SocketAddr>,
    /// Multicast mode.
    pub multicast: Option<Multicast>,
    /// The other balancers' sync addresses, as configured.
    pub peers: Vec<SocketAddr>,
    /// The cluster's shared key.
    pub key: Key,
    /// The cluster id every message carries.
    pub cluster: u32,
    /// This node's name (its id on the wire is a hash of it).
    pub node_name: String,
    /// How long a starting node tries to pull a full copy before it
    /// announces its VIPs without one.
    pub pull_timeout: Duration,
}

impl Options {
    /// This node's id on the wire: FNV-1a of its name.
    pub fn node_id(&self) -> u64 {
        node_id(&self.node_name)
    }
}

/// The id on the wire of the node named `name` (FNV-1a of the name).
pub fn node_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Multicast mode's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multicast {
    /// The group and port.
    pub group: SocketAddr,
    /// The interface to join on and send from.
    pub iface: String,
    /// Its index.
    pub index: u32,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
}

impl Multicast {
    /// A UDP socket bound to the group's port, member of the group on the
    /// interface, sending there with the TTL and without looping its own
    /// messages back.
    fn socket(&self) -> io::Result<std::net::UdpSocket> {
        use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
        let port = self.group.port();
        let socket = match self.group.ip() {
            IpAddr::V4(group) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::from((group, port)).into())?;
                s.join_multicast_v4_n(&group, &InterfaceIndexOrAddress::Index(self.index))?;
                s.set_multicast_all_v4(false)?;
                s.set_multicast_loop_v4(false)?;
                s.set_multicast_ttl_v4(u32::from(self.ttl))?;
                s.set_multicast_if_v4(&self.ipv4()?)?;
                s
            }
            IpAddr::V6(group) => {
                let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
                s.set_only_v6(true)?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
                s.join_multicast_v6(&group, self.index)?;
                s.set_multicast_all_v6(false)?;
                s.set_multicast_loop_v6(false)?;
                s.set_multicast_hops_v6(u32::from(self.ttl))?;
                s.set_multicast_if_v6(self.index)?;
                s
            }
        };
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }

    /// The interface's first IPv4 address: what IPv4 multicast sends from.
    fn ipv4(&self) -> io::Result<std::net::Ipv4Addr> {
        nix::ifaddrs::getifaddrs()
            .map_err(io::Error::from)?
            .filter(|a| a.interface_name == self.iface)
            .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{} has no IPv4 address to send from", self.iface),
                )
            })
    }
}

/// The data path's maps flow sync uses.
pub struct Maps {
    /// Reports from the data path.
    pub events: RingBuf<MapData>,
    /// Flows from peers (written by the receiver and the pull).
    pub peer_flows: HashMap<MapData, FlowKey, FlowState>,
    /// A second handle on the peer flows, to read a full copy.
    pub peer_flows_read: HashMap<MapData, FlowKey, FlowState>,
    /// The conntrack table, to read a full copy.
    pub flows: Arc<crate::conntrack::Table>,
}

/// What flow sync counts (exported as `xlb_sync_*`).
#[derive(Clone)]
pub struct Stats {
    messages_sent: Counter,
    flows_sent: Counter,
    bytes_sent: Counter,
    send_errors: Counter,
    messages_received: Counter,
    flows_received: Counter,
    flows_ended: Counter,
    dropped: Family<Vec<(String, String)>, Counter>,
    lag: Histogram,
    pulled: Gauge,
    untranslated: Counter,
    peers: Family<Vec<(String, String)>, Gauge>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            messages_sent: Counter::default(),
            flows_sent: Counter::default(),
            bytes_sent: Counter::default(),
            send_errors: Counter::default(),
            messages_received: Counter::default(),
            flows_received: Counter::default(),
            flows_ended: Counter::default(),
            dropped: Family::default(),
            lag: Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            pulled: Gauge::default(),
            untranslated: Counter::default(),
            peers: Family::default(),
        }
    }
}

impl Stats {
    fn set_peers(&self, peers: &Peers) {
        for source in [Source::Config, Source::Store] {
            let n = peers.0.values().filter(|s| **s == source).count();
            self.peers
                .get_or_create(&vec![("source".to_owned(), source.name().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn drop_reason(&self, reason: &str) {
        self.dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Adds the metrics to `reg` (prefix `xlb_`).
    pub fn register(&self, reg: &mut Registry) {
        // Every reason exists from the start, so that alerts see a zero.
        for reason in DROP_REASONS {
            let _ = self
                .dropped
                .get_or_create(&vec![("reason".to_owned(), reason.to_owned())]);
        }
        reg.register(
            "sync_messages_sent",
            "Flow sync messages sent (one per peer and batch; multicast: one per batch)",
            self.messages_sent.clone(),
        );
        reg.register(
            "sync_flows_sent",
            "Flow reports (confirmed or ended flows) sent to the peers, counted once per batch",
            self.flows_sent.clone(),
        );
        reg.register(
            "sync_bytes_sent",
            "Bytes of flow sync messages sent (UDP payload, all peers)",
            self.bytes_sent.clone(),
        );
        reg.register(
            "sync_send_errors",
            "Flow sync messages the kernel refused to send",
            self.send_errors.clone(),
        );
        reg.register(
            "sync_messages_received",
            "Flow sync messages accepted from peers",
            self.messages_received.clone(),
        );
        reg.register(
            "sync_flows_received",
            "Peer flows written into the peer flow table (reports and full copies)",
            self.flows_received.clone(),
        );
        reg.register(
            "sync_flows_ended",
            "Peer flows removed because their client ended them",
            self.flows_ended.clone(),
        );
        reg.register(
            "sync_dropped",
            "Flow sync messages or entries dropped, by reason",
            self.dropped.clone(),
        );
        reg.register(
            "sync_lag_seconds",
            "From a peer's data path report to the write into this node's peer flow table",
            self.lag.clone(),
        );
        reg.register(
            "sync_pulled_flows",
            "Flows the last full copy at start-up brought",
            self.pulled.clone(),
        );
        reg.register(
            "sync_peers",
            "Flow sync peers in force, by source: config (--sync-peer) or store (node keys)",
            self.peers.clone(),
        );
        reg.register(
            "sync_reports_untranslated",
            "Data path reports not sent because their real left this node's tables first",
            self.untranslated.clone(),
        );
    }
}

/// The `reason` labels of `xlb_sync_dropped_total`.
pub const DROP_REASONS: [&str; 8] = [
    "malformed",
    "version",
    "foreign",
    "bad_tag",
    "replay",
    "unknown_peer",
    "unknown_real",
    "same_node_id",
];

/// Where a peer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `--sync-peer` (`daemon.sync_peers`).
    Config,
    /// Another live node's key in the store.
    Store,
}

impl Source {
    /// The name `xlb status` and the metric label use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Store => "store",
        }
    }
}

/// A peer as `xlb status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its sync address.
    pub address: SocketAddr,
    /// Where it comes from.
    pub source: Source,
}

/// The peers in force: the configured ones and the sync addresses of the
/// other live nodes in the store (an address both configured and listed
/// counts as configured). Every task reads the newest set from a watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers(BTreeMap<SocketAddr, Source>);

impl Peers {
    /// The configured peers of `opts` and `listed` (the store's), without
    /// this node's own addresses.
    pub fn of(opts: &Options, listed: impl IntoIterator<Item = SocketAddr>) -> Self {
        let own = |a: &SocketAddr| *a == opts.listen || Some(*a) == opts.advertise;
        let mut peers: BTreeMap<SocketAddr, Source> = listed
            .into_iter()
            .filter(|a| !own(a))
            .map(|a| (a, Source::Store))
            .collect();
        peers.extend(opts.peers.iter().map(|a| (*a, Source::Config)));
        Self(peers)
    }

    /// Whether a message from `ip` comes from a peer.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.keys().any(|p| canonical(p.ip()) == ip)
    }

    /// Their addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.keys().copied().collect()
    }

    /// As `xlb status` lists them.
    pub fn list(&self) -> Vec<Peer> {
        self.0
            .iter()
            .map(|(address, source)| Peer {
                address: *address,
                source: *source,
            })
            .collect()
    }
}

/// Flow sync as `xlb status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Where this node listens.
    pub listen: String,
    /// Multicast mode: `GROUP on IFACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<String>,
    /// The peers in force, with where each comes from.
    pub peers: Vec<Peer>,
    /// Whether the start-up pull is over (the VIPs may be announced).
    pub ready: bool,
    /// The peer the full copy came from, if one answered.
    pub pulled_from: Option<String>,
    /// Flows it brought.
    pub pulled_flows: u64,
    /// Why no peer gave a full copy, when none did.
    pub pull_error: Option<String>,
    /// No other node in the store publishes a sync address: a first node
    /// has nothing to pull.
    #[serde(default)]
    pub first_in_fleet: bool,
}

/// The running flow sync.
#[derive(Clone)]
pub struct SyncHandle {
    /// Counters.
    pub stats: Stats,
    /// Status.
    pub status: watch::Receiver<SyncStatus>,
}

impl SyncHandle {
    /// Becomes true once the start-up pull is over.
    pub fn ready(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }
}

/// A real as the peers name it ↔ its slot on this node.
#[derive(Default)]
struct Translation {
    /// Slot id → (real, generation).
    by_slot: StdHashMap<u32, (IpAddr, u32)>,
    /// (VIP address bytes, port, protocol, real) → (slot, generation).
    by_real: StdHashMap<RealOfVip, (u32, u32)>,
}

/// A real of a VIP: the VIP's address bytes, port and protocol, the real.
type RealOfVip = ([u8; 16], u16, u8, IpAddr);

impl Translation {
    fn of(snapshot: &Snapshot) -> Self {
        let mut t = Self::default();
        for v in &snapshot.vips {
            let (addr, _) = addr_bytes(v.vip.addr);
            for r in &v.reals {
                if let Some((slot, generation)) = r.slot {
                    t.by_slot.insert(slot, (r.addr, generation));
                    t.by_real.insert(
                        (addr, v.vip.port, v.vip.proto.number(), r.addr),
                        (slot, generation),
                    );
                }
            }
        }
        t
    }

    fn local(&self, flow: &FlowKey, real: IpAddr) -> Option<(u32, u32)> {
        self.by_real
            .get(&(flow.dst, flow.ports as u16, flow.proto, real))
            .copied()
    }
}

type Shared = Arc<Mutex<Translation>>;

/// Starts flow sync: binds the UDP and TCP sockets (an error names the
/// address), then runs the reporter, the receiver, the pull server, the
/// start-up pull and, with a store (its published view), the task that
/// follows the other nodes' sync addresses.
pub async fn spawn(
    opts: Options,
    maps: Maps,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    store: Option<watch::Receiver<crate::store::View>>,
) -> anyhow::Result<(SyncHandle, Vec<JoinHandle<()>>)> {
    use anyhow::Context as _;
    let udp = match &opts.multicast {
        Some(m) => m.socket().and_then(UdpSocket::from_std).with_context(|| {
            format!(
                "flow sync cannot join --sync-multicast {} on --sync-interface {}",
                m.group, m.iface
            )
        })?,
        None => UdpSocket::bind(opts.listen)
            .await
            .with_context(|| format!("flow sync cannot listen on udp {}", opts.listen))?,
    };
    let udp = Arc::new(udp);
    let tcp = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("flow sync cannot listen on tcp {}", opts.listen))?;
    let translation: Shared = Arc::new(Mutex::new(Translation::of(&snapshots.borrow())));
    let stats = Stats::default();
    let configured = Peers::of(&opts, []);
    stats.set_peers(&configured);
    let pulls = !opts.peers.is_empty() || store.is_some() || opts.multicast.is_some();
    let (status_tx, status) = watch::channel(SyncStatus {
        listen: opts.listen.to_string(),
        multicast: opts
            .multicast
            .as_ref()
            .map(|m| format!("{} on {}", m.group, m.iface)),
        peers: configured.list(),
        ready: !pulls,
        ..SyncStatus::default()
    });
    let (peers_tx, peers) = watch::channel(configured);
    let opts = Arc::new(opts);
    let epoch = unix_ns();
    let Maps {
        events,
        peer_flows,
        peer_flows_read,
        flows,
    } = maps;
    let peer_flows = Arc::new(Mutex::new(peer_flows));
    let mut tasks = Vec::new();
    if let Some(view) = &store {
        tasks.push(tokio::spawn(follow_store(
            opts.clone(),
            view.clone(),
            peers_tx,
            status_tx.clone(),
            stats.clone(),
        )));
    }
    let pull_snapshots = snapshots.clone();
    {
        let translation = translation.clone();
        tasks.push(tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let t = Translation::of(&snapshots.borrow_and_update());
                *translation.lock().unwrap_or_else(|e| e.into_inner()) = t;
            }
        }));
    }
    // SAFETY: the ring's descriptor is owned by `events`, which the AsyncFd
    // owns until it is dropped: it stays open and the same.
    let events = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("flow sync cannot poll the data path's reports")?;
    tasks.push(tokio::spawn(report(
        opts.clone(),
        epoch,
        events,
        peers.clone(),
        udp.clone(),
        translation.clone(),
        stats.clone(),
    )));
    let (heard_tx, heard) = watch::channel(BTreeMap::new());
    if let (Some(_), Some(pull)) = (&opts.multicast, opts.advertise) {
        tasks.push(tokio::spawn(hello(
            opts.clone(),
            epoch,
            pull,
            udp.clone(),
            stats.clone(),
        )));
    }
    tasks.push(tokio::spawn(receive(
        opts.clone(),
        epoch,
        peers.clone(),
        heard_tx,
        udp,
        peer_flows.clone(),
        translation.clone(),
        stats.clone(),
    )));
    let dump = Arc::new(Mutex::new((flows, peer_flows_read)));
    tasks.push(tokio::spawn(serve_pulls(
        opts.clone(),
        epoch,
        peers.clone(),
        tcp,
        dump,
        translation.clone(),
    )));
    if pulls {
        tasks.push(tokio::spawn(pull_at_start(
            opts.clone(),
            epoch,
            Start {
                store,
                heard,
                snapshots: pull_snapshots,
            },
            peer_flows,
            translation,
            stats.clone(),
            status_tx,
        )));
    }
    tracing::info!(
        listen = %opts.listen,
        peers = ?opts.peers,
        advertise = ?opts.advertise,
        cluster = opts.cluster,
        "flow sync on"
    );
    Ok((SyncHandle { stats, status }, tasks))
}

/// Keeps the peer set equal to the configured peers and the sync addresses
/// of the other live node keys, as the store task last read them (while the
/// store is unreachable, the last ones read stay).
async fn follow_store(
    opts: Arc<Options>,
    mut view: watch::Receiver<crate::store::View>,
    peers: watch::Sender<Peers>,
    status: watch::Sender<SyncStatus>,
    stats: Stats,
) {
    loop {
        let next = {
            let v = view.borrow_and_update();
            let listed = crate::store::node::sync_peers(&v.nodes, &opts.node_name);
            Peers::of(&opts, listed.into_values())
        };
        let before = peers.borrow().clone();
        if before != next {
            for (addr, source) in &next.0 {
                if before.0.get(addr) != Some(source) {
                    tracing::info!(peer = %addr, source = source.name(), "flow sync peer added");
                }
            }
            for addr in before.0.keys().filter(|a| !next.0.contains_key(a)) {
                tracing::info!(peer = %addr, "flow sync peer gone from the store: dropped");
            }
            stats.set_peers(&next);
            status.send_modify(|s| s.peers = next.list());
            peers.send_replace(next);
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Unix time minus CLOCK_MONOTONIC, to date the data path's reports.
fn monotonic_offset_ns() -> u64 {
    unix_ns().saturating_sub(crate::conntrack::monotonic_ns())
}

/// Reads the data path's reports, batches them and sends each batch to
/// every peer.
async fn report(
    opts: Arc<Options>,
    epoch: u64,
    mut events: AsyncFd<RingBuf<MapData>>,
    peers: watch::Receiver<Peers>,
    udp: Arc<UdpSocket>,
    translation: Shared,
    stats: Stats,
) {
    let node = opts.node_id();
    let mut seq = 0u64;
    let mut batch: Vec<Entry> = Vec::with_capacity(wire::MAX_ENTRIES);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let readable = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, events.readable_mut())
                    .await
                    .ok(),
                None => Some(events.readable_mut().await),
            }
        };
        match readable.await {
            Some(Ok(mut guard)) => {
                // Cleared before draining: the kernel wakes a reader that
                // caught up, so a report submitted after the drain below
                // marks the ring readable again (clearing after the drain
                // would lose that wake-up and stall the reader).
                guard.clear_ready();
                let offset = monotonic_offset_ns();
                let ring = guard.get_inner_mut();
                let mut full = Vec::new();
                {
                    let t = translation.lock().unwrap_or_else(|e| e.into_inner());
                    while let Some(item) = ring.next() {
                        let Some(ev) = parse_event(&item) else {
                            continue;
                        };
                        let Some(&(real, generation)) = t.by_slot.get(&ev.real_id) else {
                            stats.untranslated.inc();
                            continue;
                        };
                        // The data path reports the generation bits its
                        // entries keep.
                        if ct_generation(generation) != ev.generation {
                            stats.untranslated.inc();
                            continue;
                        }
                        batch.push(Entry {
                            op: if ev.kind == FLOW_EVENT_END {
                                Op::End
                            } else {
                                Op::New
                            },
                            flow: ev.flow,
                            real,
                            at_ns: ev.at_ns.saturating_add(offset),
                        });
                        if batch.len() == wire::MAX_ENTRIES {
                            full.push(std::mem::take(&mut batch));
                        }
                    }
                }
                for b in full {
                    send(&opts, &peers, &udp, &stats, node, epoch, &mut seq, &b).await;
                }
                if !batch.is_empty() && deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + BATCH_WAIT);
                }
            }
            Some(Err(err)) => {
                tracing::error!(%err, "flow sync stopped reading the data path's reports");
                return;
            }
            None => {
                send(&opts, &peers, &udp, &stats, node, epoch, &mut seq, &batch).await;
                batch.clear();
                deadline = None;
            }
        }
    }
}

fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain integers and byte arrays (any bit pattern
    // is valid); the length was checked; read_unaligned copes with any alignment.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) };
    (ev.kind == FLOW_EVENT_NEW || ev.kind == FLOW_EVENT_END).then_some(ev)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the reporter's state, passed down to one call site"
)]
async fn send(
    opts: &Options,
    peers: &watch::Receiver<Peers>,
    udp: &UdpSocket,
    stats: &Stats,
    node: u64,
    epoch: u64,
    seq: &mut u64,
    batch: &[Entry],
) {
    if batch.is_empty() {
        return;
    }
    *seq += 1;
    let header = Header {
        kind: Kind::Flows,
        cluster: opts.cluster,
        node,
        epoch,
        seq: *seq,
        sent_ns: unix_ns(),
    };
    let msg = wire::encode(&opts.key, &header, batch);
    stats.flows_sent.inc_by(batch.len() as u64);
    let to = match &opts.multicast {
        Some(m) => vec![m.group],
        None => peers.borrow().addrs(),
    };
    for peer in &to {
        match udp.send_to(&msg, peer).await {
            Ok(n) => {
                stats.messages_sent.inc();
                stats.bytes_sent.inc_by(n as u64);
            }
            Err(err) => {
                stats.send_errors.inc();
                tracing::debug!(%peer, %err, "flow sync message not sent");
            }
        }
    }
}

/// Multicast mode: tells the group every second where this node serves
/// full copies.
async fn hello(
    opts: Arc<Options>,
    epoch: u64,
    pull: SocketAddr,
    udp: Arc<UdpSocket>,
    stats: Stats,
) {
    let Some(group) = opts.multicast.as_ref().map(|m| m.group) else {
        return;
    };
    let mut tick = tokio::time::interval(HELLO_EVERY);
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        seq += 1;
        let header = Header {
            kind: Kind::Hello,
            cluster: opts.cluster,
            node: opts.node_id(),
            epoch,
            seq,
            sent_ns: unix_ns(),
        };
        let msg = wire::encode(&opts.key, &header, &[wire::hello(pull)]);
        if let Err(err) = udp.send_to(&msg, group).await {
            stats.send_errors.inc();
            tracing::debug!(%group, %err, "flow sync hello not sent");
        }
    }
}

/// How often a multicast node says hello.
pub const HELLO_EVERY: Duration = Duration::from_secs(1);

/// The pull addresses heard in hellos, with when.
type Heard = BTreeMap<SocketAddr, Instant>;

/// Receives the peers' reports into the peer flow table (and, in multicast
/// mode, the hellos).
#[expect(
    clippy::too_many_arguments,
    reason = "the receiver's state, passed down from one call site"
)]
async fn receive(
    opts: Arc<Options>,
    epoch: u64,
    peers: watch::Receiver<Peers>,
    heard: watch::Sender<Heard>,
    udp: Arc<UdpSocket>,
    peer_flows: Arc<Mutex<HashMap<MapData, FlowKey, FlowState>>>,
    translation: Shared,
    stats: Stats,
) {
    let mut windows: StdHashMap<(u64, IpAddr), Window> = StdHashMap::new();
    let own = opts.node_id();
    let mut buf = vec![0u8; 65536];
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(err) => {
                tracing::warn!(%err, "flow sync receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let from_ip = canonical(from.ip());
        // In multicast mode there is no address list: the cluster id and the
        // tag decide.
        if opts.multicast.is_none() && !peers.borrow().admits(from_ip) {
            stats.drop_reason("unknown_peer");
            if logged.elapsed() > Duration::from_secs(60) {
                logged = Instant::now();
                tracing::warn!(%from, "flow sync message from a source that is no peer: dropped (logged once a minute)");
            }
            continue;
        }
        let (header, entries) = match wire::decode(&opts.key, opts.cluster, &buf[..n]) {
            Ok(m) => m,
            Err(err) => {
                stats.drop_reason(err.reason());
                if logged.elapsed() > Duration::from_secs(60) {
                    logged = Instant::now();
                    tracing::warn!(%from, %err, "flow sync message dropped (logged once a minute)");
                }
                continue;
            }
        };
        if header.node == own {
            // Our own message, looped back (loop is off; a second socket
            // on the group would still see it).
            if header.epoch == epoch {
                continue;
            }
            // Another node with this node's name (the default is the host
            // name, which two hosts or containers can share): its flows
            // would be taken for ours and never used.
            stats.drop_reason("same_node_id");
            if logged.elapsed() > Duration::from_secs(60) {
                logged = Instant::now();
                tracing::warn!(
                    %from,
                    node_name = %opts.node_name,
                    "flow sync message from another node with this node's name: dropped; give every node its own --node-name (logged once a minute)"
                );
            }
            continue;
        }
        if header.kind == Kind::Hello {
            match entries.first() {
                Some(e) if unix_ns().abs_diff(header.sent_ns) <= 60_000_000_000 => {
                    heard.send_modify(|h| {
                        h.insert(wire::hello_addr(e), Instant::now());
                    });
                }
                Some(_) => stats.drop_reason("replay"),
                None => stats.drop_reason("malformed"),
            }
            continue;
        }
        if header.kind != Kind::Flows {
            stats.drop_reason("malformed");
            continue;
        }
        if !windows
            .entry((header.node, from_ip))
            .or_default()
            .accept(header.epoch, header.seq)
        {
            stats.drop_reason("replay");
            continue;
        }
        stats.messages_received.inc();
        let now = unix_ns();
        store(&peer_flows, &translation, &stats, &entries);
        for e in &entries {
            stats
                .lag
                .observe(now.saturating_sub(e.at_ns) as f64 / 1_000_000_000.0);
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Writes peer entries into the peer flow table, in this node's slots.
fn store(
    peer_flows: &Mutex<HashMap<MapData, FlowKey, FlowState>>,
    translation: &Shared,
    stats: &Stats,
    entries: &[Entry],
) -> u64 {
    let t = translation.lock().unwrap_or_else(|e| e.into_inner());
    let mut map = peer_flows.lock().unwrap_or_else(|e| e.into_inner());
    let mut stored = 0;
    for e in entries {
        match e.op {
            Op::End => {
                if map.remove(&e.flow).is_ok() {
                    stats.flows_ended.inc();
                }
            }
            Op::New => {
                let Some((real_id, generation)) = t.local(&e.flow, e.real) else {
                    stats.drop_reason("unknown_real");
                    continue;
                };
                let state = FlowState {
                    real_id,
                    generation,
                    last_seen_ns: 0,
                    hash: flow_hash(&e.flow.src, &e.flow.dst, e.flow.ports, e.flow.proto),
                    flags: FLOW_F_REPORTED,
                };
                match map.insert(&e.flow, &state, 0) {
                    Ok(()) => {
                        stats.flows_received.inc();
                        stored += 1;
                    }
                    Err(err) => tracing::debug!(%err, "peer flow not stored"),
                }
            }
        }
    }
    stored
}

type Dump = Arc<
    Mutex<(
        Arc<crate::conntrack::Table>,
        HashMap<MapData, FlowKey, FlowState>,
    )>,
>;

/// Serves full copies to starting peers.
async fn serve_pulls(
    opts: Arc<Options>,
    epoch: u64,
    peers: watch::Receiver<Peers>,
    tcp: TcpListener,
    dump: Dump,
    translation: Shared,
) {
    loop {
        let Ok((stream, from)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (opts, dump, translation) = (opts.clone(), dump.clone(), translation.clone());
        let admitted = opts.multicast.is_some() || peers.borrow().admits(from.ip());
        tokio::spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(60),
                serve_pull(&opts, epoch, admitted, stream, from, dump, translation),
            )
            .await
            {
                Ok(Ok(n)) => tracing::info!(peer = %from, flows = n, "sent a full flow copy"),
                Ok(Err(err)) => tracing::warn!(peer = %from, %err, "full flow copy refused or cut"),
                Err(_) => tracing::warn!(peer = %from, "full flow copy took over 60 s: cut"),
            }
        });
    }
}

async fn serve_pull(
    opts: &Options,
    epoch: u64,
    admitted: bool,
    mut stream: TcpStream,
    from: SocketAddr,
    dump: Dump,
    translation: Shared,
) -> io::Result<u64> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if !admitted {
        return Err(invalid(format!(
            "{from} is not a peer (configured or in the store)"
        )));
    }
    let request = read_message(&mut stream).await?;
    let (header, _) =
        wire::decode(&opts.key, opts.cluster, &request).map_err(|e| invalid(e.to_string()))?;
    // A pull request is only good for a minute: a recorded one replayed later
    // gets nothing.
    if header.kind != Kind::Pull || unix_ns().abs_diff(header.sent_ns) > 60_000_000_000 {
        return Err(invalid("not a fresh pull request".to_owned()));
    }
    let entries = tokio::task::spawn_blocking(move || {
        let t = translation.lock().unwrap_or_else(|e| e.into_inner());
        let maps = dump.lock().unwrap_or_else(|e| e.into_inner());
        let now = unix_ns();
        let mut out = Vec::new();
        // This node's flows (entries keep the generation's low bits), then
        // those peers reported (with whole generations).
        maps.0.for_each(|flow, state| {
            if let Some(&(real, generation)) = t.by_slot.get(&state.real_id)
                && ct_generation(generation) == state.generation
            {
                out.push(Entry {
                    op: Op::New,
                    flow: *flow,
                    real,
                    at_ns: now,
                });
            }
        });
        for (flow, state) in maps.1.iter().flatten() {
            if let Some(&(real, generation)) = t.by_slot.get(&state.real_id)
                && generation == state.generation
            {
                out.push(Entry {
                    op: Op::New,
                    flow,
                    real,
                    at_ns: now,
                });
            }
        }
        out
    })
    .await
    .map_err(io::Error::other)?;
    let node = opts.node_id();
    for (seq, chunk) in (1..).zip(entries.chunks(wire::MAX_ENTRIES)) {
        let header = Header {
            kind: Kind::Flows,
            cluster: opts.cluster,
            node,
            epoch,
            seq,
            sent_ns: unix_ns(),
        };
        write_message(&mut stream, &wire::encode(&opts.key, &header, chunk)).await?;
    }
    let done = Header {
        kind: Kind::PullDone,
        cluster: opts.cluster,
        node,
        epoch,
        seq: entries.len() as u64,
        sent_ns: unix_ns(),
    };
    write_message(&mut stream, &wire::encode(&opts.key, &done, &[])).await?;
    stream.shutdown().await?;
    Ok(entries.len() as u64)
}

async fn read_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = usize::from(stream.read_u16().await?);
    if len > wire::MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte message (at most {})", wire::MAX_MESSAGE),
        ));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_message(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    stream
        .write_u16(u16::try_from(msg.len()).unwrap_or(u16::MAX))
        .await?;
    stream.write_all(msg).await
}

/// What the start-up pull follows.
struct Start {
    /// The store's view, with a store: the node keys and the desired state
    /// are read before anything is pulled.
    store: Option<watch::Receiver<crate::store::View>>,
    /// Multicast mode: the pull addresses heard in hellos.
    heard: watch::Receiver<Heard>,
    /// The controller's snapshots, for the reals the copy names.
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

/// At start-up: a full copy from the first peer that gives one, within the
/// pull timeout; then the node may announce. With a store it first waits
/// for the store's first listing (the other nodes' keys, and the desired
/// state without which every pulled flow would name an unknown real); a
/// node that finds no other node publishing a sync address is the first of
/// its fleet and has nothing to pull.
async fn pull_at_start(
    opts: Arc<Options>,
    epoch: u64,
    mut start: Start,
    peer_flows: Arc<Mutex<HashMap<MapData, FlowKey, FlowState>>>,
    translation: Shared,
    stats: Stats,
    status: watch::Sender<SyncStatus>,
) {
    let started = Instant::now();
    let mut errors = Vec::new();
    'rounds: while started.elapsed() < opts.pull_timeout {
        if let Some(view) = &mut start.store
            && !view.borrow().listed
        {
            let left = opts.pull_timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, view.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    errors.push("the store was not read (no node keys)".to_owned());
                    break;
                }
            }
        }
        // The desired state may have arrived from the store just now.
        *translation.lock().unwrap_or_else(|e| e.into_inner()) =
            Translation::of(&start.snapshots.borrow());
        // Read from the view itself: the task that follows it may not have
        // seen the listing yet.
        let mut peers = match &start.store {
            Some(view) => {
                let listed = crate::store::node::sync_peers(&view.borrow().nodes, &opts.node_name);
                Peers::of(&opts, listed.into_values()).addrs()
            }
            None => Peers::of(&opts, []).addrs(),
        };
        if peers.is_empty() && start.store.is_none() {
            // Multicast mode without configured peers: whoever said hello
            // lately, newest first.
            let mut heard: Vec<(SocketAddr, Instant)> = start
                .heard
                .borrow()
                .iter()
                .filter(|(a, at)| at.elapsed() < 3 * HELLO_EVERY && Some(**a) != opts.advertise)
                .map(|(a, at)| (*a, *at))
                .collect();
            heard.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
            peers = heard.into_iter().map(|(a, _)| a).collect();
            if peers.is_empty() {
                let left = opts.pull_timeout.saturating_sub(started.elapsed());
                let _ = tokio::time::timeout(left, start.heard.changed()).await;
                if errors.is_empty() {
                    errors.push("no hello heard on the multicast group".to_owned());
                }
                continue;
            }
        }
        if peers.is_empty() {
            tracing::info!(
                "flow sync: no other node in the store publishes a sync address: the first \
                 node of the fleet has no flows to pull"
            );
            status.send_modify(|s| {
                s.ready = true;
                s.first_in_fleet = true;
            });
            return;
        }
        for peer in &peers {
            let left = opts.pull_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                break 'rounds;
            }
            let pulled = tokio::time::timeout(
                left,
                pull(&opts, epoch, *peer, &peer_flows, &translation, &stats),
            )
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
            match pulled {
                Ok(n) => {
                    tracing::info!(%peer, flows = n, "pulled a full flow copy");
                    stats.pulled.set(i64::try_from(n).unwrap_or(i64::MAX));
                    status.send_modify(|s| {
                        s.ready = true;
                        s.pulled_from = Some(peer.to_string());
                        s.pulled_flows = n;
                        s.pull_error = None;
                    });
                    return;
                }
                Err(err) => errors.push(format!("{peer}: {err}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    errors.dedup();
    let why = format!(
        "no peer gave a full flow copy within {} ms ({})",
        opts.pull_timeout.as_millis(),
        errors.last().map_or("no attempt", String::as_str)
    );
    tracing::warn!("{why}: announcing without one (a first node, or every peer down)");
    status.send_modify(|s| {
        s.ready = true;
        s.pull_error = Some(why);
    });
}

async fn pull(
    opts: &Options,
    epoch: u64,
    peer: SocketAddr,
    peer_flows: &Mutex<HashMap<MapData, FlowKey, FlowState>>,
    translation: &Shared,
    stats: &Stats,
) -> io::Result<u64> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut stream = TcpStream::connect(peer).await?;
    let request = Header {
        kind: Kind::Pull,
        cluster: opts.cluster,
        node: opts.node_id(),
        epoch,
        seq: 0,
        sent_ns: unix_ns(),
    };
    write_message(&mut stream, &wire::encode(&opts.key, &request, &[])).await?;
    let mut stored = 0;
    let mut received = 0u64;
    loop {
        let msg = read_message(&mut stream).await?;
        let (header, entries) = wire::decode(&opts.key, opts.cluster, &msg).map_err(|e| {
            stats.drop_reason(e.reason());
            invalid(e.to_string())
        })?;
        match header.kind {
            Kind::Flows => {
                received += entries.len() as u64;
                stored += store(peer_flows, translation, stats, &entries);
            }
            Kind::PullDone if header.seq == received => return Ok(stored),
            Kind::PullDone => {
                return Err(invalid(format!(
                    "the copy announced {} flows, {received} arrived",
                    header.seq
                )));
            }
            Kind::Pull | Kind::Hello => {
                return Err(invalid(format!("a {:?} message in a copy", header.kind)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_peers_join_the_configured_ones_without_this_node() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let opts = Options {
            listen: a("0.0.0.0:9815"),
            advertise: Some(a("192.0.2.1:9815")),
            multicast: None,
            peers: vec![a("192.0.2.2:9815")],
            key: Key::new(b"a key of the cluster, 32 bytes..").unwrap(),
            cluster: 1,
            node_name: "a".to_owned(),
            pull_timeout: Duration::from_secs(1),
        };
        // Its own published address (a stale key under another name) is no
        // peer; an address both configured and listed counts as configured.
        let peers = Peers::of(
            &opts,
            [
                a("192.0.2.1:9815"),
                a("192.0.2.2:9815"),
                a("192.0.2.3:9815"),
            ],
        );
        assert_eq!(
            peers.list(),
            [
                Peer {
                    address: a("192.0.2.2:9815"),
                    source: Source::Config
                },
                Peer {
                    address: a("192.0.2.3:9815"),
                    source: Source::Store
                },
            ]
        );
        assert!(peers.admits("::ffff:192.0.2.3".parse().unwrap()));
        assert!(!peers.admits("192.0.2.1".parse().unwrap()));
        assert_eq!(Peers::of(&opts, []).addrs(), [a("192.0.2.2:9815")]);
    }
}
