//! The daemon's settings: one struct, filled from the config file's
//! `daemon:` section and from `xlb run`'s flags, flags winning, then defaults.
//!
//! Every field is optional so that the two layers can be merged
//! ([`Settings::over`]); the accessors give the value in force.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use aya::programs::XdpMode;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Deserializer};

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Group given the control socket when it exists and no other is named.
pub const DEFAULT_SOCKET_GROUP: &str = "xlb";
/// Default BIRD fragment (`--bird-routes`).
pub const DEFAULT_BIRD_ROUTES: &str = "/run/xlb/bird-vips.conf";
/// Default state file.
pub const DEFAULT_STATE_FILE: &str = "/run/xlb/state.json";

/// XDP attach modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native (driver) mode, the fast one.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Skb,
    /// Let the kernel choose.
    Auto,
}

impl Mode {
    /// aya's attach flags for this mode.
    pub fn xdp(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
            Self::Auto => XdpMode::Default,
        }
    }
}

/// How the daemon logs (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text lines; without timestamps and colours when stderr is not a
    /// terminal or under systemd (JOURNAL_STREAM), where journald adds its own.
    Plain,
    /// One JSON object a line (tracing-subscriber's JSON formatter).
    Json,
}

/// An address prefix, `192.0.2.0/24` or `2001:db8:ff::/96`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix<A> {
    /// The address.
    pub addr: A,
    /// The prefix length.
    pub len: u8,
}

/// Parses `ADDRESS/LENGTH` with a length of at most `max`.
pub fn parse_prefix<A: FromStr>(s: &str, max: u8) -> Result<Prefix<A>, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not ADDRESS/PREFIX-LENGTH"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an address of the right family"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length '{len}' is not 0-{max}"))?;
    Ok(Prefix { addr, len })
}

impl FromStr for Prefix<Ipv4Addr> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_prefix(s, 32)
    }
}

impl FromStr for Prefix<Ipv6Addr> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_prefix(s, 128)
    }
}

impl<'de, A> Deserialize<'de> for Prefix<A>
where
    Prefix<A>: FromStr<Err = String>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number between 0.0 and 1.0"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not between 0.0 and 1.0"));
    }
    Ok(v)
}

fn de_share<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = f64::deserialize(d)?;
    share(&v.to_string())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `s` as an integer from `LO` to `HI` (of type `T`); the error says the
/// range and the value given. The value parser of every ranged integer
/// setting's flag; [`de_ranged`] is its config key's.
fn ranged<T: TryFrom<u64>, const LO: u64, const HI: u64>(s: &str) -> Result<T, String> {
    // Wide enough for a negative number or one past u64 to be named as out
    // of range rather than as not a number.
    let v: i128 = s
        .parse()
        .map_err(|_| format!("'{s}' is not an integer between {LO} and {HI}"))?;
    match u64::try_from(v).ok().and_then(|v| T::try_from(v).ok()) {
        Some(t) if (i128::from(LO)..=i128::from(HI)).contains(&v) => Ok(t),
        _ => Err(format!("{v} is not between {LO} and {HI}")),
    }
}

/// [`ranged`] for a config file key.
fn de_ranged<'de, D, T, const LO: u64, const HI: u64>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let v = u64::deserialize(d)?;
    ranged::<T, LO, HI>(&v.to_string())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `s` as an IP address and port; the error shows the form and the value
/// given. The value parser of every address flag; [`de_socket_addr`] and
/// [`de_socket_addrs`] are their config keys'.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not ADDRESS:PORT, e.g. 192.0.2.1:9815 or [2001:db8::1]:9815")
    })
}

/// [`parse_socket_addr`] for a config file key (null: not set).
fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_socket_addr(&s))
        .transpose()
        .map_err(serde::de::Error::custom)
}

/// [`parse_socket_addr`] for a config file key that lists addresses.
fn de_socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_socket_addr(s))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// Fewest flows a conntrack table may hold (a smaller table would evict
/// tracked flows under any load).
pub const CONNTRACK_MIN: u64 = 1 << 10;
/// Most flows a conntrack table may hold (~13 GiB of kernel memory).
pub const CONNTRACK_MAX: u64 = 1 << 27;
/// Smallest MTU: the least every IPv6 link carries (RFC 8200).
pub const MTU_MIN: u64 = 1280;
/// Largest MTU: the largest IP packet.
pub const MTU_MAX: u64 = 65_535;
/// The largest `u32`, as a [`ranged`] bound.
const U32_MAX: u64 = u32::MAX as u64;
/// Longest wait for a real's ARP/NDP answer, in seconds (the API call or
/// the start that adds the real waits this long).
pub const RESOLVE_TIMEOUT_MAX: u64 = 60;
/// Longest UDP idle timeout, in seconds: a day.
pub const UDP_IDLE_MAX: u64 = 86_400;
/// Longest store lease, in seconds: a dead node's key lasts this long.
pub const STORE_LEASE_TTL_MAX: u64 = 3600;
/// Longest store interval and call timeout, in milliseconds.
pub const STORE_MS_MAX: u64 = 60_000;
/// Longest wait for a full flow copy at start, in milliseconds.
pub const SYNC_PULL_MS_MAX: u64 = 600_000;

/// Settings of `xlb run`. As flags; in the config file's `daemon:` section
/// under the names given in docs/config.md.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Interface that receives VIP traffic.
    #[arg(long)]
    #[serde(rename = "interface")]
    pub iface: Option<String>,
    /// XDP attach mode [default: native].
    #[arg(long, value_enum)]
    pub xdp_mode: Option<Mode>,
    /// Seconds to wait for a real's ARP/NDP answer before it is kept as
    /// unresolved (and retried), 1 to 60 [default: 3].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 1, RESOLVE_TIMEOUT_MAX>)]
    #[serde(
        default,
        deserialize_with = "de_ranged::<_, _, 1, RESOLVE_TIMEOUT_MAX>"
    )]
    pub resolve_timeout: Option<u64>,
    /// Connection-tracking table size (flows, all CPUs, rounded up to a power
    /// of two; 224 bytes each; 1024 to 134217728) [default: 1048576].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u32, CONNTRACK_MIN, CONNTRACK_MAX>)]
    #[serde(
        default,
        deserialize_with = "de_ranged::<_, _, CONNTRACK_MIN, CONNTRACK_MAX>"
    )]
    pub conntrack_size: Option<u32>,
    /// New flows each CPU may add to the conntrack table per second; above it
    /// flows are forwarded by Maglev alone (0: no limit) [default: enough for
    /// tracked flows to survive 60 s of any flood: conntrack size / (60 × CPUs),
    /// at least 1000].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u32, 0, U32_MAX>)]
    pub new_flow_limit: Option<u32>,
    /// ICMP "fragmentation needed" / "packet too big" replies each CPU may send
    /// per second for tunnel packets over the MTU (0: none, drop only) [default: 100].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u32, 0, U32_MAX>)]
    pub icmp_too_big_limit: Option<u32>,
    /// Seconds after which an idle UDP flow is forgotten, 1 to 86400 [default: 30].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 1, UDP_IDLE_MAX>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, 1, UDP_IDLE_MAX>")]
    pub udp_idle_timeout: Option<u64>,
    /// Largest IP packet after encapsulation, 1280 to 65535 (default: the
    /// interface's MTU).
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u32, MTU_MIN, MTU_MAX>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, MTU_MIN, MTU_MAX>")]
    pub mtu: Option<u32>,
    /// IPv4 prefix for tunnel sources, e.g. 192.0.2.0/24 (default: the interface's address).
    #[arg(long = "tunnel-src")]
    #[serde(rename = "tunnel_source")]
    pub tunnel_src: Option<Prefix<Ipv4Addr>>,
    /// IPv6 prefix for tunnel sources, e.g. 2001:db8:ff::/96 (default: the interface's address).
    #[arg(long = "tunnel-src6")]
    #[serde(rename = "tunnel_source6")]
    pub tunnel_src6: Option<Prefix<Ipv6Addr>>,
    /// bpffs directory for pins [default: /sys/fs/bpf/xlb].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Do not pin: the data path stops with the daemon.
    #[arg(long, conflicts_with_all = ["pin_dir", "replace"])]
    #[serde(skip)]
    pub no_pin: bool,
    /// Atomically replace the program of a running (pinned) data path with this
    /// binary's, keeping maps, flows and counters.
    #[arg(long)]
    #[serde(skip)]
    pub replace: bool,
    /// Where the daemon keeps its state for the next daemon [default: /run/xlb/state.json].
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9814.
    #[arg(long = "metrics-addr", value_parser = parse_socket_addr)]
    #[serde(
        rename = "metrics_address",
        default,
        deserialize_with = "de_socket_addr"
    )]
    pub metrics_addr: Option<SocketAddr>,
    /// Group allowed to use the control socket (default: `xlb` if that group exists, else root only).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Health checks never take a VIP below this share of the reals that can
    /// serve (0.0-1.0) [default: 0.5].
    #[arg(long, allow_negative_numbers = true, value_parser = share)]
    #[serde(default, deserialize_with = "de_share")]
    pub min_healthy: Option<f64>,
    /// Announce the VIPs through BIRD: its control socket, e.g.
    /// /run/bird/bird.ctl (docs/cluster.md).
    #[arg(long)]
    pub bird_socket: Option<PathBuf>,
    /// The BIRD configuration fragment xlb writes, which bird.conf includes
    /// [default: /run/xlb/bird-vips.conf].
    #[arg(long)]
    pub bird_routes: Option<PathBuf>,
    /// Log format: plain or json [default: plain].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Take the desired state from a fleet's store:
    /// etcd://HOST:PORT[,HOST:PORT]/PREFIX (docs/cluster.md).
    #[arg(long, value_parser = crate::store::parse_url)]
    pub store: Option<crate::store::StoreUrl>,
    /// CA certificate (PEM) of the etcd servers: talk TLS to them.
    #[arg(long)]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --store-key.
    #[arg(long)]
    pub store_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd, with --store-cert.
    #[arg(long)]
    pub store_key: Option<PathBuf>,
    /// etcd user name, with --store-password-file.
    #[arg(long)]
    pub store_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long)]
    pub store_password_file: Option<PathBuf>,
    /// This node's name in the fleet [default: the host name].
    #[arg(long)]
    pub node_name: Option<String>,
    /// Seconds the node's key outlives its last lease renewal, 2 to 3600 and
    /// at least twice --store-interval-ms [default: 10].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 2, STORE_LEASE_TTL_MAX>)]
    #[serde(
        default,
        deserialize_with = "de_ranged::<_, _, 2, STORE_LEASE_TTL_MAX>"
    )]
    pub store_lease_ttl: Option<u64>,
    /// Milliseconds between lease renewals, node reports, health views and
    /// watch progress checks, 1 to 60000 [default: 1000].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 1, STORE_MS_MAX>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, 1, STORE_MS_MAX>")]
    pub store_interval_ms: Option<u64>,
    /// Milliseconds any one etcd call may take, 1 to 60000 [default: 2000].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 1, STORE_MS_MAX>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, 1, STORE_MS_MAX>")]
    pub store_timeout_ms: Option<u64>,
    /// Accept VIPs on addresses of this host: a keepalived (VRRP) pair's
    /// master holds the VIP addresses on its interface (docs/cluster.md).
    #[arg(long)]
    #[serde(default)]
    pub allow_local_vips: bool,
    /// Flow sync: receive the peers' flows here (UDP) and serve full copies
    /// (TCP, same port), e.g. 192.0.2.11:9815. Turns flow sync on
    /// (docs/cluster.md); needs --sync-key-file.
    #[arg(long, value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "de_socket_addr")]
    pub sync_listen: Option<SocketAddr>,
    /// Flow sync: another balancer's --sync-listen address (repeat for each peer).
    /// With --store the other nodes' published addresses are peers too.
    #[arg(long = "sync-peer", value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "de_socket_addrs")]
    pub sync_peers: Vec<SocketAddr>,
    /// Flow sync with --store or --sync-multicast: the address this node
    /// publishes in its node key and hellos for the other balancers to reach
    /// its --sync-listen (required when --sync-listen is a wildcard address)
    /// [default: --sync-listen].
    #[arg(long, value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "de_socket_addr")]
    pub sync_advertise: Option<SocketAddr>,
    /// Flow sync: send each batch once to this multicast group (IPv4
    /// 224.0.0.0/4 or IPv6 ff00::/8) and receive there, e.g. 239.255.98.15:9815;
    /// needs --sync-interface (docs/cluster.md).
    #[arg(long, value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "de_socket_addr")]
    pub sync_multicast: Option<SocketAddr>,
    /// Flow sync with --sync-multicast: the interface to join the group on and
    /// send from.
    #[arg(long)]
    pub sync_interface: Option<String>,
    /// Flow sync with --sync-multicast: TTL (IPv4) or hop limit (IPv6) of the
    /// messages, 1-255 [default: 1: the local segment only].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u8, 1, 255>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, 1, 255>")]
    pub sync_multicast_ttl: Option<u8>,
    /// Flow sync: file holding the cluster's shared key (at least 16 bytes;
    /// readable by root only), which authenticates every message.
    #[arg(long)]
    pub sync_key_file: Option<PathBuf>,
    /// Flow sync: the cluster id every message carries; messages of other
    /// clusters are dropped [default: 1].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u32, 0, U32_MAX>)]
    pub sync_cluster_id: Option<u32>,
    /// Flow sync: milliseconds a starting node tries to pull a full flow copy
    /// from a peer before it announces its VIPs without one, 1 to 600000
    /// [default: 5000].
    #[arg(long, allow_negative_numbers = true, value_parser = ranged::<u64, 1, SYNC_PULL_MS_MAX>)]
    #[serde(default, deserialize_with = "de_ranged::<_, _, 1, SYNC_PULL_MS_MAX>")]
    pub sync_pull_timeout_ms: Option<u64>,
}

impl Settings {
    /// `self` (flags) over `file` (the config file's section).
    pub fn over(self, file: Settings) -> Settings {
        Settings {
            iface: self.iface.or(file.iface),
            xdp_mode: self.xdp_mode.or(file.xdp_mode),
            resolve_timeout: self.resolve_timeout.or(file.resolve_timeout),
            conntrack_size: self.conntrack_size.or(file.conntrack_size),
            new_flow_limit: self.new_flow_limit.or(file.new_flow_limit),
            icmp_too_big_limit: self.icmp_too_big_limit.or(file.icmp_too_big_limit),
            udp_idle_timeout: self.udp_idle_timeout.or(file.udp_idle_timeout),
            mtu: self.mtu.or(file.mtu),
            tunnel_src: self.tunnel_src.or(file.tunnel_src),
            tunnel_src6: self.tunnel_src6.or(file.tunnel_src6),
            pin_dir: self.pin_dir.or(file.pin_dir),
            no_pin: self.no_pin,
            replace: self.replace,
            state_file: self.state_file.or(file.state_file),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            socket_group: self.socket_group.or(file.socket_group),
            min_healthy: self.min_healthy.or(file.min_healthy),
            bird_socket: self.bird_socket.or(file.bird_socket),
            bird_routes: self.bird_routes.or(file.bird_routes),
            log_format: self.log_format.or(file.log_format),
            store: self.store.or(file.store),
            store_ca: self.store_ca.or(file.store_ca),
            store_cert: self.store_cert.or(file.store_cert),
            store_key: self.store_key.or(file.store_key),
            store_user: self.store_user.or(file.store_user),
            store_password_file: self.store_password_file.or(file.store_password_file),
            node_name: self.node_name.or(file.node_name),
            store_lease_ttl: self.store_lease_ttl.or(file.store_lease_ttl),
            store_interval_ms: self.store_interval_ms.or(file.store_interval_ms),
            store_timeout_ms: self.store_timeout_ms.or(file.store_timeout_ms),
            allow_local_vips: self.allow_local_vips || file.allow_local_vips,
            sync_listen: self.sync_listen.or(file.sync_listen),
            sync_peers: if self.sync_peers.is_empty() {
                file.sync_peers
            } else {
                self.sync_peers
            },
            sync_advertise: self.sync_advertise.or(file.sync_advertise),
            sync_multicast: self.sync_multicast.or(file.sync_multicast),
            sync_interface: self.sync_interface.or(file.sync_interface),
            sync_multicast_ttl: self.sync_multicast_ttl.or(file.sync_multicast_ttl),
            sync_key_file: self.sync_key_file.or(file.sync_key_file),
            sync_cluster_id: self.sync_cluster_id.or(file.sync_cluster_id),
            sync_pull_timeout_ms: self.sync_pull_timeout_ms.or(file.sync_pull_timeout_ms),
        }
    }

    /// Whether flow sync is on (the data path reports flows).
    pub fn sync_enabled(&self) -> bool {
        self.sync_listen.is_some()
    }

    /// The checks of flow sync's settings that need nothing of the host (no
    /// key file read, no interface looked up): the settings that go together,
    /// the group, the TTL, the published address. `xlb check` makes them, and
    /// [`Self::sync`] makes them first.
    pub fn check_sync(&self) -> Result<(), String> {
        let Some(listen) = self.sync_listen else {
            if !self.sync_peers.is_empty()
                || self.sync_key_file.is_some()
                || self.sync_advertise.is_some()
                || self.sync_multicast.is_some()
                || self.sync_interface.is_some()
                || self.sync_multicast_ttl.is_some()
            {
                return Err(
                    "--sync-peer, --sync-advertise, --sync-multicast, --sync-interface, \
                     --sync-multicast-ttl and --sync-key-file need --sync-listen \
                     (daemon.sync_listen), which turns flow sync on"
                        .to_owned(),
                );
            }
            return Ok(());
        };
        if self.sync_key_file.is_none() {
            return Err(
                "--sync-listen needs --sync-key-file (daemon.sync_key_file): the cluster's \
                 shared key"
                    .to_owned(),
            );
        }
        if let Some(p) = self.sync_peers.iter().find(|p| **p == listen) {
            return Err(format!(
                "--sync-peer {p} is this node's own --sync-listen address"
            ));
        }
        let group = self.sync_group()?;
        self.sync_advertise(listen, group.is_some())?;
        Ok(())
    }

    /// Flow sync's options (`None`: off), or what is missing or wrong; reads
    /// the key file.
    pub fn sync(&self) -> Result<Option<crate::flowsync::Options>, String> {
        self.check_sync()?;
        let (Some(listen), Some(path)) = (self.sync_listen, &self.sync_key_file) else {
            return Ok(None);
        };
        let secret = std::fs::read(path)
            .map_err(|e| format!("cannot read the sync key file {}: {e}", path.display()))?;
        let trimmed = secret.trim_ascii();
        let key = crate::flowsync::wire::Key::new(trimmed)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let multicast = match self.sync_group()? {
            None => None,
            Some((group, iface, ttl)) => {
                let index = nix::net::if_::if_nametoindex(iface.as_str()).map_err(|e| {
                    format!(
                        "--sync-interface {iface} (daemon.sync_interface): no such interface \
                         ({e})"
                    )
                })?;
                Some(crate::flowsync::Multicast {
                    group,
                    iface,
                    index,
                    ttl,
                })
            }
        };
        let advertise = self.sync_advertise(listen, multicast.is_some())?;
        let pull = self.sync_pull_timeout_ms.unwrap_or(5000);
        Ok(Some(crate::flowsync::Options {
            listen,
            advertise,
            multicast,
            peers: self.sync_peers.clone(),
            key,
            cluster: self.sync_cluster_id.unwrap_or(1),
            node_name: self
                .node_name
                .clone()
                .unwrap_or_else(crate::store::hostname),
            pull_timeout: Duration::from_millis(pull),
        }))
    }

    /// Flow sync's multicast group, interface and TTL, checked (`None`:
    /// unicast); the interface is not looked up.
    fn sync_group(&self) -> Result<Option<(SocketAddr, String, u8)>, String> {
        let Some(group) = self.sync_multicast else {
            if let Some(i) = &self.sync_interface {
                return Err(format!(
                    "--sync-interface {i} (daemon.sync_interface) is the interface of \
                     --sync-multicast, which is not given"
                ));
            }
            if self.sync_multicast_ttl.is_some() {
                return Err("--sync-multicast-ttl needs --sync-multicast".to_owned());
            }
            return Ok(None);
        };
        if !group.ip().is_multicast() {
            return Err(format!(
                "--sync-multicast {group} (daemon.sync_multicast): {} is not a multicast \
                 address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
                group.ip()
            ));
        }
        if group.port() == 0 {
            return Err(format!(
                "--sync-multicast {group} (daemon.sync_multicast) needs a port"
            ));
        }
        let Some(iface) = self.sync_interface.clone() else {
            return Err(format!(
                "--sync-multicast {group} needs --sync-interface IFACE (daemon.sync_interface): \
                 the interface to join the group on and send from"
            ));
        };
        // At least 1: the flag's and the key's parser refuse 0, which would
        // keep every message on this host.
        let ttl = self.sync_multicast_ttl.unwrap_or(1);
        Ok(Some((group, iface, ttl)))
    }

    /// The sync address this node publishes in the store or in its
    /// multicast hellos (`None`: neither), or why there is none that peers
    /// could reach.
    fn sync_advertise(
        &self,
        listen: SocketAddr,
        multicast: bool,
    ) -> Result<Option<SocketAddr>, String> {
        if self.store.is_none() && !multicast {
            return match self.sync_advertise {
                Some(a) => Err(format!(
                    "--sync-advertise {a} (daemon.sync_advertise) is the sync address published \
                     in the store or the multicast hellos: it needs --store or --sync-multicast"
                )),
                None => Ok(None),
            };
        }
        match self.sync_advertise {
            Some(a) if a.ip().is_unspecified() || a.port() == 0 => Err(format!(
                "--sync-advertise {a} (daemon.sync_advertise) must be an address and port the \
                 other balancers can reach, not a wildcard or port 0"
            )),
            Some(a) => Ok(Some(a)),
            None if listen.ip().is_unspecified() => Err(format!(
                "--sync-listen {listen} is a wildcard address, which the other balancers \
                 cannot reach: with --store or --sync-multicast give --sync-advertise \
                 ADDR:PORT (daemon.sync_advertise), the address this node publishes for them"
            )),
            None => Ok(Some(listen)),
        }
    }

    /// The XDP attach mode.
    pub fn xdp_mode(&self) -> Mode {
        self.xdp_mode.unwrap_or(Mode::Native)
    }

    /// How long to wait for a real's ARP/NDP answer.
    pub fn resolve_timeout(&self) -> Duration {
        Duration::from_secs(self.resolve_timeout.unwrap_or(3))
    }

    /// Conntrack table size.
    pub fn conntrack_size(&self) -> u32 {
        self.conntrack_size.unwrap_or(lb_common::FLOWS_DEFAULT)
    }

    /// New flows per CPU per second before the flood guard: as set, else
    /// what keeps a full table's idle flows for 60 s whatever arrives.
    pub fn new_flow_limit(&self) -> u32 {
        self.new_flow_limit.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            (self.conntrack_size() / (60 * cpus)).max(1000)
        })
    }

    /// ICMP too-big replies per CPU per second.
    pub fn icmp_too_big_limit(&self) -> u32 {
        self.icmp_too_big_limit
            .unwrap_or(lb_common::ICMP_TOO_BIG_LIMIT_DEFAULT)
    }

    /// Idle time after which a UDP flow is forgotten.
    pub fn udp_idle(&self) -> Duration {
        Duration::from_secs(self.udp_idle_timeout.unwrap_or(30))
    }

    /// The pin directory, `None` without pins.
    pub fn pin_dir(&self) -> Option<PathBuf> {
        (!self.no_pin).then(|| {
            self.pin_dir
                .clone()
                .unwrap_or_else(|| crate::pin::DEFAULT_PIN_DIR.into())
        })
    }

    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.state_file
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_FILE.into())
    }

    /// The group of the control socket: the one named, else `xlb` when it
    /// exists, else none (root only).
    pub fn socket_group(&self) -> Option<String> {
        self.socket_group.clone().or_else(|| {
            nix::unistd::Group::from_name(DEFAULT_SOCKET_GROUP)
                .ok()
                .flatten()
                .map(|_| DEFAULT_SOCKET_GROUP.to_owned())
        })
    }

    /// Where BIRD is, when the VIPs are announced through it.
    pub fn bird(&self) -> Option<crate::node::Bird> {
        self.bird_socket.clone().map(|socket| crate::node::Bird {
            socket,
            routes: self
                .bird_routes
                .clone()
                .unwrap_or_else(|| DEFAULT_BIRD_ROUTES.into()),
        })
    }

    /// Store mode's options (`None`: no store), or what is missing or wrong.
    pub fn store(&self) -> Result<Option<crate::store::Options>, String> {
        let Some(url) = self.store.clone() else {
            return Ok(None);
        };
        let cert_key = match (&self.store_cert, &self.store_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err("--store-cert and --store-key go together".to_owned()),
        };
        let user = match (&self.store_user, &self.store_password_file) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => return Err("--store-user and --store-password-file go together".to_owned()),
        };
        let node = self
            .node_name
            .clone()
            .unwrap_or_else(crate::store::hostname);
        if node.is_empty() || node.contains('/') || node.chars().any(char::is_control) {
            return Err(format!(
                "invalid node name '{node}': it must be non-empty, without '/' or control characters"
            ));
        }
        let ttl = self.store_lease_ttl.unwrap_or(10);
        let interval = Duration::from_millis(self.store_interval_ms.unwrap_or(1000));
        let timeout = Duration::from_millis(self.store_timeout_ms.unwrap_or(2000));
        // Each in its range already (the flags' and keys' parsers).
        if interval * 2 > Duration::from_secs(ttl) {
            return Err(format!(
                "--store-lease-ttl ({ttl} s) must be at least 2 s and twice --store-interval-ms \
                 ({} ms) or more, so the lease is renewed in time",
                interval.as_millis()
            ));
        }
        Ok(Some(crate::store::Options {
            url,
            node,
            ca: self.store_ca.clone(),
            cert_key,
            user,
            lease_ttl: Duration::from_secs(ttl),
            interval,
            timeout,
            cache: self.state_file().with_file_name("store.json"),
            sync: None,
        }))
    }

    /// The avalanche guard's threshold.
    pub fn min_healthy(&self) -> f64 {
        self.min_healthy.unwrap_or(0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_sync_settings_are_checked_whole() {
        let dir = std::env::temp_dir().join(format!("xlb-sync-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short.key");
        std::fs::write(&short, "too short\n").unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, "  a key of the cluster, 32 bytes  \n").unwrap();
        let listen: SocketAddr = "192.0.2.1:9815".parse().unwrap();
        let with = |s: Settings| s.sync().map(|o| o.map(|o| (o.listen, o.peers, o.cluster)));
        assert_eq!(with(Settings::default()), Ok(None));
        let err = with(Settings {
            sync_peers: vec!["192.0.2.2:9815".parse().unwrap()],
            ..Settings::default()
        })
        .unwrap_err();
        assert!(err.contains("need --sync-listen"), "{err}");
        // The multicast interface and TTL alone would be ignored: refused too.
        for alone in [
            Settings {
                sync_interface: Some("eth0".into()),
                ..Settings::default()
            },
            Settings {
                sync_multicast_ttl: Some(2),
                ..Settings::default()
            },
        ] {
            let err = with(alone).unwrap_err();
            assert!(err.contains("need --sync-listen"), "{err}");
        }
        let err = with(Settings {
            sync_listen: Some(listen),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(err.contains("needs --sync-key-file"), "{err}");
        let err = with(Settings {
            sync_listen: Some(listen),
            sync_key_file: Some(short.clone()),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(
            err.contains("short.key") && err.contains("at least 16"),
            "{err}"
        );
        let err = with(Settings {
            sync_listen: Some(listen),
            sync_key_file: Some(dir.join("missing.key")),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(err.contains("cannot read the sync key file"), "{err}");
        let err = with(Settings {
            sync_listen: Some(listen),
            sync_key_file: Some(good.clone()),
            sync_peers: vec![listen],
            ..Settings::default()
        })
        .unwrap_err();
        assert!(err.contains("own --sync-listen"), "{err}");
        let peer: SocketAddr = "192.0.2.2:9815".parse().unwrap();
        assert_eq!(
            with(Settings {
                sync_listen: Some(listen),
                sync_key_file: Some(good),
                sync_peers: vec![peer],
                ..Settings::default()
            }),
            Ok(Some((listen, vec![peer], 1)))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn with_a_store_the_published_sync_address_must_be_reachable() {
        let dir = std::env::temp_dir().join(format!("xlb-sync-advertise-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("sync.key");
        std::fs::write(&key, "a key of the cluster, 32 bytes..\n").unwrap();
        let store = Some("etcd://192.0.2.5:2379/xlb".parse().unwrap());
        let wildcard: SocketAddr = "0.0.0.0:9815".parse().unwrap();
        let specific: SocketAddr = "192.0.2.1:9815".parse().unwrap();
        let with = |listen, store: &Option<crate::store::StoreUrl>, advertise| {
            Settings {
                sync_listen: Some(listen),
                sync_key_file: Some(key.clone()),
                sync_advertise: advertise,
                store: store.clone(),
                ..Settings::default()
            }
            .sync()
            .map(|o| o.and_then(|o| o.advertise))
        };
        // Without a store nothing is published; with one, the listen address.
        assert_eq!(with(wildcard, &None, None), Ok(None));
        assert_eq!(with(specific, &store, None), Ok(Some(specific)));
        let err = with(wildcard, &store, None).unwrap_err();
        assert!(
            err.contains("--sync-listen 0.0.0.0:9815 is a wildcard")
                && err.contains("--sync-advertise ADDR:PORT"),
            "{err}"
        );
        let public: SocketAddr = "198.51.100.1:9815".parse().unwrap();
        assert_eq!(with(wildcard, &store, Some(public)), Ok(Some(public)));
        let err = with(wildcard, &store, Some("[::]:9815".parse().unwrap())).unwrap_err();
        assert!(err.contains("--sync-advertise [::]:9815"), "{err}");
        let err = with(specific, &None, Some(public)).unwrap_err();
        assert!(
            err.contains("it needs --store or --sync-multicast"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn multicast_settings_name_the_flag_that_is_wrong() {
        let dir = std::env::temp_dir().join(format!("xlb-sync-multicast-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("sync.key");
        std::fs::write(&key, "a key of the cluster, 32 bytes..\n").unwrap();
        let with = |listen: &str, group: Option<&str>, iface: Option<&str>, ttl| {
            Settings {
                sync_listen: Some(listen.parse().unwrap()),
                sync_key_file: Some(key.clone()),
                sync_multicast: group.map(|g| g.parse().unwrap()),
                sync_interface: iface.map(str::to_owned),
                sync_multicast_ttl: ttl,
                ..Settings::default()
            }
            .sync()
            .map(|o| o.and_then(|o| o.multicast.map(|m| (m.group, m.iface, m.ttl))))
        };
        let l = "192.0.2.1:9815";
        let ok = with(l, Some("239.255.98.15:9815"), Some("lo"), None);
        assert_eq!(
            ok,
            Ok(Some((
                "239.255.98.15:9815".parse().unwrap(),
                "lo".to_owned(),
                1
            )))
        );
        assert!(
            with(l, Some("[ff02::98:15]:9815"), Some("lo"), Some(4))
                .is_ok_and(|m| m.is_some_and(|m| m.2 == 4))
        );
        for (group, iface, ttl, want) in [
            (
                Some("192.0.2.9:9815"),
                Some("lo"),
                None,
                "--sync-multicast 192.0.2.9:9815 (daemon.sync_multicast): 192.0.2.9 is not a multicast",
            ),
            (
                Some("239.255.98.15:9815"),
                None,
                None,
                "needs --sync-interface IFACE",
            ),
            (
                Some("239.255.98.15:9815"),
                Some("nosuch0"),
                None,
                "--sync-interface nosuch0 (daemon.sync_interface): no such interface",
            ),
            (Some("239.255.98.15:0"), Some("lo"), None, "needs a port"),
            (
                None,
                Some("lo"),
                None,
                "--sync-interface lo (daemon.sync_interface) is the interface of --sync-multicast",
            ),
            (
                None,
                None,
                Some(2),
                "--sync-multicast-ttl needs --sync-multicast",
            ),
        ] {
            let err = with(l, group, iface, ttl).unwrap_err();
            assert!(err.contains(want), "{group:?} {iface:?}: {err}");
        }
        // A wildcard listen address: the hellos need one the peers reach.
        let err = with("0.0.0.0:9815", Some("239.255.98.15:9815"), Some("lo"), None).unwrap_err();
        assert!(err.contains("--sync-advertise"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sync_peers_of_the_flags_replace_the_file_s() {
        let file = Settings {
            sync_peers: vec!["192.0.2.2:1".parse().unwrap()],
            allow_local_vips: true,
            ..Settings::default()
        };
        let flags = Settings {
            sync_peers: vec!["192.0.2.3:1".parse().unwrap()],
            ..Settings::default()
        };
        let merged = flags.over(file.clone());
        assert_eq!(merged.sync_peers, vec!["192.0.2.3:1".parse().unwrap()]);
        assert!(merged.allow_local_vips);
        assert_eq!(Settings::default().over(file).sync_peers.len(), 1);
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_in() {
        let file = Settings {
            iface: Some("eth0".into()),
            conntrack_size: Some(1000),
            min_healthy: Some(0.25),
            ..Settings::default()
        };
        let flags = Settings {
            conntrack_size: Some(2000),
            ..Settings::default()
        };
        let s = flags.over(file);
        assert_eq!(s.iface.as_deref(), Some("eth0"));
        assert_eq!(s.conntrack_size(), 2000);
        assert_eq!(s.min_healthy(), 0.25);
        assert_eq!(s.udp_idle(), Duration::from_secs(30));
        assert_eq!(s.xdp_mode(), Mode::Native);
    }

    #[test]
    fn prefixes_name_what_is_wrong() {
        assert_eq!(
            "192.0.2.0/33".parse::<Prefix<Ipv4Addr>>(),
            Err("prefix length '33' is not 0-32".to_owned())
        );
        assert!("2001:db8::/96".parse::<Prefix<Ipv6Addr>>().is_ok());
        assert!(share("1.5").unwrap_err().contains("between 0.0 and 1.0"));
    }

    #[test]
    fn conntrack_size_and_mtu_outside_their_range_are_refused_naming_it() {
        assert_eq!(
            ranged::<u32, CONNTRACK_MIN, CONNTRACK_MAX>("0").unwrap_err(),
            "0 is not between 1024 and 134217728"
        );
        assert_eq!(
            ranged::<u32, CONNTRACK_MIN, CONNTRACK_MAX>("1024"),
            Ok(1024)
        );
        assert_eq!(
            ranged::<u32, CONNTRACK_MIN, CONNTRACK_MAX>("5000000000").unwrap_err(),
            "5000000000 is not between 1024 and 134217728"
        );
        assert_eq!(
            ranged::<u32, CONNTRACK_MIN, CONNTRACK_MAX>("many").unwrap_err(),
            "'many' is not an integer between 1024 and 134217728"
        );
        assert_eq!(
            ranged::<u32, MTU_MIN, MTU_MAX>("10").unwrap_err(),
            "10 is not between 1280 and 65535"
        );
        assert_eq!(
            ranged::<u32, MTU_MIN, MTU_MAX>("65536").unwrap_err(),
            "65536 is not between 1280 and 65535"
        );
        assert_eq!(ranged::<u32, MTU_MIN, MTU_MAX>("1280"), Ok(1280));

        // As flags: clap's usage error (exit 2), naming the flag and the range.
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            settings: Settings,
        }
        use clap::Parser as _;
        let err = Run::try_parse_from(["xlb", "--conntrack-size", "0"])
            .err()
            .expect("--conntrack-size 0 is refused");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains(
                "invalid value '0' for '--conntrack-size <CONNTRACK_SIZE>': 0 is not between \
                 1024 and 134217728"
            ),
            "{err}"
        );
        let err = Run::try_parse_from(["xlb", "--mtu", "10"])
            .err()
            .expect("--mtu 10 is refused");
        assert!(
            err.to_string()
                .contains("invalid value '10' for '--mtu <MTU>': 10 is not between 1280 and 65535"),
            "{err}"
        );
        let run = Run::try_parse_from(["xlb", "--mtu", "9000", "--conntrack-size", "4096"])
            .expect("values in range");
        assert_eq!(run.settings.mtu, Some(9000));
        assert_eq!(run.settings.conntrack_size(), 4096);
    }

    #[test]
    fn zero_and_oversized_durations_are_refused_naming_the_flag_range_and_value() {
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            settings: Settings,
        }
        use clap::Parser as _;
        let refused = |flag: &str, value: &str| {
            let err = Run::try_parse_from(["xlb", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was accepted"));
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            text.lines().next().unwrap_or_default().to_owned()
        };
        for (flag, value, placeholder, range) in [
            ("--resolve-timeout", "0", "RESOLVE_TIMEOUT", "1 and 60"),
            ("--resolve-timeout", "61", "RESOLVE_TIMEOUT", "1 and 60"),
            ("--udp-idle-timeout", "0", "UDP_IDLE_TIMEOUT", "1 and 86400"),
            (
                "--udp-idle-timeout",
                "86401",
                "UDP_IDLE_TIMEOUT",
                "1 and 86400",
            ),
            ("--store-lease-ttl", "1", "STORE_LEASE_TTL", "2 and 3600"),
            (
                "--store-interval-ms",
                "0",
                "STORE_INTERVAL_MS",
                "1 and 60000",
            ),
            ("--store-timeout-ms", "0", "STORE_TIMEOUT_MS", "1 and 60000"),
            (
                "--sync-pull-timeout-ms",
                "0",
                "SYNC_PULL_TIMEOUT_MS",
                "1 and 600000",
            ),
            (
                "--sync-multicast-ttl",
                "0",
                "SYNC_MULTICAST_TTL",
                "1 and 255",
            ),
            (
                "--sync-multicast-ttl",
                "256",
                "SYNC_MULTICAST_TTL",
                "1 and 255",
            ),
        ] {
            assert_eq!(
                refused(flag, value),
                format!(
                    "error: invalid value '{value}' for '{flag} <{placeholder}>': {value} is not \
                     between {range}"
                )
            );
        }
        // The ends of each range are accepted.
        let run = Run::try_parse_from([
            "xlb",
            "--resolve-timeout",
            "60",
            "--udp-idle-timeout",
            "1",
            "--store-lease-ttl",
            "3600",
            "--store-interval-ms",
            "60000",
            "--sync-pull-timeout-ms",
            "600000",
            "--sync-multicast-ttl",
            "255",
        ])
        .expect("values in range");
        assert_eq!(run.settings.resolve_timeout(), Duration::from_secs(60));
        assert_eq!(run.settings.udp_idle(), Duration::from_secs(1));
        assert_eq!(run.settings.store_lease_ttl, Some(3600));
        assert_eq!(run.settings.sync_multicast_ttl, Some(255));
        // The longest interval with the default lease: refused naming both.
        let s = Settings {
            store: Some(crate::store::parse_url("etcd://192.0.2.1:2379/xlb").expect("url")),
            store_interval_ms: Some(STORE_MS_MAX),
            ..Settings::default()
        };
        assert_eq!(
            s.store().err().as_deref(),
            Some(
                "--store-lease-ttl (10 s) must be at least 2 s and twice --store-interval-ms \
                 (60000 ms) or more, so the lease is renewed in time"
            )
        );
    }
}
