//! The balancer's interface and its neighbours: where DR frames are sent.
//!
//! A real's MAC comes from the kernel's neighbour table (read over rtnetlink).
//! When the real is not in it yet, the daemon makes the kernel resolve it by
//! sending one UDP datagram to the real's discard port, then reads the table;
//! it also follows the table's changes (RTM_NEWNEIGH), so a real that comes up
//! later, or whose MAC changes, is picked up as soon as the kernel learns it,
//! and asks the kernel to confirm stale entries of reals ([`confirm_stale`]),
//! so that a MAC changed without announcing itself is learnt too.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::packet_core::NetlinkPayload;

use crate::model::Forward;
use nix::ifaddrs::getifaddrs;

/// Failures finding the interface or a real's MAC.
#[derive(Debug, thiserror::Error)]
pub enum NeighborError {
    /// No interface of that name in this network namespace.
    #[error("interface {0} not found")]
    NoIface(String),
    /// The interface has no MAC (not an Ethernet device).
    #[error("interface {0} has no Ethernet address")]
    NoMac(String),
    /// The real is not on a subnet of the interface: DR cannot reach it.
    #[error(
        "real {real} is not on a subnet of {iface} ({nets}); direct return (DR) needs the real \
         on the balancer's L2 segment"
    )]
    NotOnLink {
        /// The real.
        real: IpAddr,
        /// The interface.
        iface: String,
        /// The interface's subnets.
        nets: String,
    },
    /// Nobody answered ARP/NDP for the real in time.
    #[error(
        "no ARP/NDP answer from {real} on {iface} within {timeout:?}; is the real up and on this segment?"
    )]
    Unresolved {
        /// The real.
        real: IpAddr,
        /// The interface.
        iface: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A tunnel VIP has reals of a family the balancer has no tunnel source for.
    #[error(
        "{vip} tunnels to {real} over {family}, but {iface} has no {family} address to send \
         tunnels from; add one, or give --tunnel-src{flag} / daemon.tunnel_source{flag}"
    )]
    NoTunnelSource {
        /// The VIP.
        vip: String,
        /// The real.
        real: IpAddr,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// `` or `6`.
        flag: &'static str,
        /// The interface.
        iface: String,
    },
    /// The address belongs to this host.
    #[error(
        "{what} is an address of this host ({addr}): a VIP there would take the port from the \
         host's own services, a real there is the balancer itself (where keepalived holds the \
         VIP addresses on the master, run xlb with --allow-local-vips)"
    )]
    OwnAddress {
        /// What was refused.
        what: String,
        /// The address.
        addr: IpAddr,
    },
    /// The address is the broadcast address of one of the interface's subnets.
    #[error(
        "{what} is the broadcast address of {net} on {iface}: it reaches every host of the \
         subnet, not one server"
    )]
    Broadcast {
        /// What was refused.
        what: String,
        /// The subnet.
        net: String,
        /// The interface.
        iface: String,
    },
    /// The neighbour answered with a multicast or broadcast MAC.
    #[error("{hop} answered with the group MAC {mac}; a real needs a unicast MAC")]
    GroupMac {
        /// The address asked for.
        hop: IpAddr,
        /// The MAC.
        mac: String,
    },
    /// The next hop was asked again and has not answered yet.
    #[error("no ARP/NDP answer from {hop} on {iface} yet; asking again every second")]
    NoAnswer {
        /// The address asked for.
        hop: IpAddr,
        /// The interface.
        iface: String,
    },
    /// No route to the real.
    #[error("no route to {0}")]
    NoRoute(IpAddr),
    /// The route to the real leaves through another interface: the balancer
    /// could not send the packets the kernel would.
    #[error(
        "the kernel's route to TUN real {real} leaves through {oif}, not {iface}; the balancer \
         sends tunnels out of {iface} only: route the real through it"
    )]
    OtherIface {
        /// The real.
        real: IpAddr,
        /// The interface the route uses (its name, or its index).
        oif: String,
        /// The balancer's interface.
        iface: String,
    },
    /// Talking to the kernel failed.
    #[error("netlink: {0}")]
    Netlink(String),
}

/// The interface the balancer is attached to.
#[derive(Clone, Debug)]
pub struct Iface {
    /// Its name.
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its MAC: the source of forwarded frames.
    pub mac: [u8; 6],
    /// Its addresses with prefix lengths.
    pub nets: Vec<(IpAddr, u8)>,
    /// Whether tunnels of each family (IPv4, IPv6) have an outer source: an
    /// address of that family on the interface, or a configured prefix.
    pub tunnel_sources: [bool; 2],
    /// VIPs may be addresses of this host (`--allow-local-vips`): a keepalived
    /// pair's master holds them on its interface.
    pub local_vips: bool,
}

/// An interface's addresses with their prefix lengths.
type Nets = Vec<(IpAddr, u8)>;

/// `name`'s MAC and its addresses with their prefix lengths.
fn read_addrs(name: &str) -> Result<(Option<[u8; 6]>, Nets), NeighborError> {
    let mut mac = None;
    let mut nets = Vec::new();
    let addrs = getifaddrs().map_err(|e| NeighborError::Netlink(e.to_string()))?;
    for ifa in addrs.filter(|a| a.interface_name == name) {
        let Some(addr) = ifa.address else { continue };
        if let Some(link) = addr.as_link_addr() {
            mac = link.addr();
        } else if let Some(v4) = addr.as_sockaddr_in() {
            let prefix = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones()))
                .unwrap_or(32);
            nets.push((IpAddr::V4(v4.ip()), prefix as u8));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let prefix = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                .unwrap_or(128);
            nets.push((IpAddr::V6(v6.ip()), prefix as u8));
        }
    }
    Ok((mac, nets))
}

impl Iface {
    /// Reads `name`'s index, MAC and addresses in the current network namespace.
    pub fn lookup(name: &str) -> Result<Self, NeighborError> {
        let index = nix::net::if_::if_nametoindex(name)
            .map_err(|_| NeighborError::NoIface(name.to_owned()))?;
        let (mac, nets) = read_addrs(name)?;
        let mac = mac
            .filter(|m| *m != [0; 6])
            .ok_or_else(|| NeighborError::NoMac(name.to_owned()))?;
        let tunnel_sources = [
            nets.iter().any(|(a, _)| a.is_ipv4()),
            nets.iter().any(|(a, _)| match a {
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                IpAddr::V4(_) => false,
            }),
        ];
        Ok(Self {
            name: name.to_owned(),
            index,
            mac,
            nets,
            tunnel_sources,
            local_vips: false,
        })
    }

    /// A copy with the interface's addresses read again, so that the checks
    /// of a change see the subnets the interface has now (one added after
    /// the daemon started, one taken away); the old ones when they cannot be
    /// read.
    ///
    /// Only the subnets are read again, not `tunnel_sources`, on purpose: the
    /// data path's tunnel source addresses are written once at start, so an
    /// address family the interface gained later has no tunnel source in the
    /// data path, and a TUN real of that family must still be refused
    /// (`NoTunnelSource`) until the daemon restarts.
    pub fn refreshed(&self) -> Self {
        let mut fresh = self.clone();
        match read_addrs(&self.name) {
            Ok((_, nets)) => fresh.nets = nets,
            Err(err) => {
                tracing::debug!(%err, iface = %self.name, "cannot read its addresses again")
            }
        }
        fresh
    }

    /// Whether `addr` is inside one of the interface's subnets.
    pub fn on_link(&self, addr: IpAddr) -> bool {
        self.nets
            .iter()
            .any(|(net, prefix)| in_prefix(*net, *prefix, addr))
    }

    /// Refuses `addr` unless it is on one of the interface's subnets (direct
    /// return needs the real on the balancer's L2 segment).
    pub fn check_on_link(&self, addr: IpAddr) -> Result<(), NeighborError> {
        if self.on_link(addr) {
            return Ok(());
        }
        Err(NeighborError::NotOnLink {
            real: addr,
            iface: self.name.clone(),
            nets: self.nets_text(),
        })
    }

    /// Refuses `addr` when it is the broadcast address of one of the
    /// interface's IPv4 subnets (of 30 bits or fewer: /31 and /32 have none);
    /// `what` names it in the message.
    pub fn check_not_broadcast(&self, addr: IpAddr, what: &str) -> Result<(), NeighborError> {
        let IpAddr::V4(a) = addr else {
            return Ok(());
        };
        for (net, prefix) in &self.nets {
            let IpAddr::V4(n) = net else { continue };
            if *prefix > 30 {
                continue;
            }
            let host_bits = u32::MAX >> prefix;
            if u32::from(*n) | host_bits == u32::from(a) {
                let base = Ipv4Addr::from(u32::from(*n) & !host_bits);
                return Err(NeighborError::Broadcast {
                    what: what.to_owned(),
                    net: format!("{base}/{prefix}"),
                    iface: self.name.clone(),
                });
            }
        }
        Ok(())
    }

    fn nets_text(&self) -> String {
        if self.nets.is_empty() {
            return "no addresses".to_owned();
        }
        self.nets
            .iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn in_prefix(net: IpAddr, prefix: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Whether `iface` strips VLAN tags before XDP sees the frames (rx-vlan
/// offload on) while it carries VLANs (VLAN devices on top of it): then XDP
/// sees untagged frames and would send its answers untagged. `None` when the
/// driver does not say.
pub fn strips_vlan_tags(iface: &str) -> Option<bool> {
    let has_vlans = std::fs::read_dir(format!("/sys/class/net/{iface}"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("upper_")
                .map(str::to_owned)
        })
        .any(|upper| {
            std::path::Path::new(&format!("/proc/net/vlan/{upper}")).exists()
                || upper.starts_with(&format!("{iface}."))
        });
    if !has_vlans {
        return Some(false);
    }
    // SIOCETHTOOL with ETHTOOL_GFLAGS: the legacy offload flags.
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GFLAGS,
        data: 0,
    };
    // SAFETY: a zeroed ifreq with the name and a pointer to `value`, which
    // outlives the ioctl; the socket is closed on drop.
    unsafe {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        if libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) != 0 {
            return None;
        }
    }
    Some(value.data & ETH_FLAG_RXVLAN != 0)
}

/// Whether `mac` is a multicast or broadcast (group) address.
pub fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// Every address of every interface of this host (this network namespace).
pub fn host_addrs() -> std::collections::BTreeSet<IpAddr> {
    let Ok(addrs) = getifaddrs() else {
        return Default::default();
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// The destination and MAC of a neighbour entry, when it holds a usable MAC.
fn usable(msg: &NeighbourMessage) -> Option<(IpAddr, [u8; 6])> {
    let ok = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !ok {
        return None;
    }
    let lladdr = msg.attributes.iter().find_map(|attr| match attr {
        NeighbourAttribute::LinkLocalAddress(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    });
    Some((destination(msg)?, lladdr.filter(|m| *m != [0; 6])?))
}

/// Asks the kernel to confirm the entries of `hops` on `iface` it no longer
/// knows to be current: STALE (not confirmed for a reachable time) and FAILED
/// (a confirmation went unanswered). Each gets NTF_USE, as if traffic went
/// to it: the kernel probes a STALE entry's MAC by unicast and, once that
/// goes unanswered, resolves it again by broadcast, so a real whose MAC
/// changed without announcing itself is learnt again and the change arrives
/// as an RTM_NEWNEIGH event. Returns how many entries were asked about.
pub async fn confirm_stale(
    iface: &Iface,
    hops: &std::collections::BTreeSet<IpAddr>,
) -> Result<usize, NeighborError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NeighborError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let asked = async {
        let mut due = Vec::new();
        let mut entries = handle.neighbours().get().execute();
        while let Some(msg) = entries.try_next().await? {
            let old = matches!(
                msg.header.state,
                NeighbourState::Stale | NeighbourState::Failed
            );
            if msg.header.ifindex == iface.index
                && old
                && let Some(dst) = destination(&msg)
                && hops.contains(&dst)
            {
                due.push(dst);
            }
        }
        for hop in &due {
            handle
                .neighbours()
                .add(iface.index, *hop)
                .flags(NeighbourFlags::Use)
                .replace()
                .execute()
                .await?;
        }
        Ok::<_, rtnetlink::Error>(due.len())
    }
    .await;
    task.abort();
    asked.map_err(|e| NeighborError::Netlink(e.to_string()))
}

/// The address a neighbour entry is for.
fn destination(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|attr| match attr {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// The usable entries (with a MAC) of the kernel's neighbour table on `iface`.
pub async fn table(iface: &Iface) -> Result<BTreeMap<IpAddr, [u8; 6]>, NeighborError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NeighborError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let mut found = BTreeMap::new();
    let mut entries = handle.neighbours().get().execute();
    while let Some(msg) = entries
        .try_next()
        .await
        .map_err(|e| NeighborError::Netlink(e.to_string()))?
    {
        if msg.header.ifindex != iface.index {
            continue;
        }
        if let Some((dst, mac)) = usable(&msg) {
            found.insert(dst, mac);
        }
    }
    task.abort();
    Ok(found)
}

/// Follows the kernel's neighbour table (RTM_NEWNEIGH events): calls `seen`
/// with every entry on `iface` that holds a usable MAC, as it appears or changes.
pub fn watch(
    iface: &Iface,
    seen: impl Fn(IpAddr, [u8; 6]) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, NeighborError> {
    use futures::StreamExt as _;
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(|e| NeighborError::Netlink(e.to_string()))?;
    let groups = rtnetlink::sys::SocketAddr::new(0, rtnetlink::constants::RTMGRP_NEIGH);
    use rtnetlink::sys::AsyncSocket as _;
    conn.socket_mut()
        .socket_mut()
        .bind(&groups)
        .map_err(|e| NeighborError::Netlink(format!("joining the neighbour group: {e}")))?;
    let conn = tokio::spawn(conn);
    let index = iface.index;
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = msg.payload
                && n.header.ifindex == index
                && let Some((dst, mac)) = usable(&n)
            {
                seen(dst, mac);
            }
        }
        conn.abort();
    }))
}

/// The address whose MAC frames toward `addr` carry: the gateway of the
/// kernel's route to it, or `addr` itself when the route is direct.
pub async fn next_hop(iface: &Iface, addr: IpAddr) -> Result<IpAddr, NeighborError> {
    Ok(route_gateway(iface, addr).await?.unwrap_or(addr))
}

/// Makes the kernel resolve `addr` by sending it one datagram (discard port 9)
/// out of `iface`.
fn provoke(iface: &Iface, addr: IpAddr) {
    let bind: SocketAddr = match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(sock) = UdpSocket::bind(bind) else {
        return;
    };
    // Pin the datagram to the interface so the kernel asks on the right segment.
    let _ = nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(&iface.name),
    );
    let _ = sock.send_to(&[], SocketAddr::new(addr, 9));
}

/// The outcome of resolving a set of reals.
#[derive(Debug, Default)]
pub struct Resolution {
    /// MAC of each resolved real (of its next hop in TUN mode).
    pub found: BTreeMap<IpAddr, [u8; 6]>,
    /// Why each other real is not resolved.
    pub failed: BTreeMap<IpAddr, NeighborError>,
    /// The next hop of each real whose hop is known (itself in DR mode).
    pub hops: BTreeMap<IpAddr, IpAddr>,
}

/// The address whose MAC frames toward `real` carry when reached by `mode`:
/// the real itself in DR mode (it must be on one of the interface's
/// subnets), else the gateway of the kernel's route to it (or the real when
/// the route is direct), which must leave through `iface`.
pub async fn hop(iface: &Iface, real: IpAddr, mode: Forward) -> Result<IpAddr, NeighborError> {
    match mode {
        Forward::Dr => {
            iface.check_on_link(real)?;
            Ok(real)
        }
        Forward::Tun => next_hop(iface, real).await,
    }
}

/// Resolves every real of `reals` at once: finds each one's next hop, asks
/// the kernel to resolve the hops it does not know (one datagram each, again
/// every second), and reads the neighbour table until all are known or
/// `timeout` passed. Never fails as a whole: each real is found or has a reason.
pub async fn resolve_all(
    iface: &Iface,
    reals: &BTreeMap<IpAddr, Forward>,
    timeout: Duration,
) -> Resolution {
    let mut out = Resolution::default();
    let mut hops: BTreeMap<IpAddr, Vec<IpAddr>> = BTreeMap::new();
    for (real, mode) in reals {
        match hop(iface, *real, *mode).await {
            Ok(h) => {
                out.hops.insert(*real, h);
                hops.entry(h).or_default().push(*real);
            }
            Err(e) => {
                out.failed.insert(*real, e);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut provoked_at: Option<tokio::time::Instant> = None;
    while !hops.is_empty() {
        match table(iface).await {
            Ok(known) => hops.retain(|h, reals| match known.get(h) {
                Some(mac) if is_group(mac) => {
                    for r in reals.iter() {
                        out.failed.insert(
                            *r,
                            NeighborError::GroupMac {
                                hop: *h,
                                mac: crate::state::fmt_mac(mac),
                            },
                        );
                    }
                    false
                }
                Some(mac) => {
                    for r in reals.iter() {
                        out.found.insert(*r, *mac);
                    }
                    false
                }
                None => true,
            }),
            Err(e) => {
                for r in hops.into_values().flatten() {
                    out.failed.insert(r, NeighborError::Netlink(e.to_string()));
                }
                return out;
            }
        }
        let now = tokio::time::Instant::now();
        if hops.is_empty() || now >= deadline {
            break;
        }
        // Ask again every second: a FAILED entry is retried on the next packet.
        if provoked_at.is_none_or(|t| now - t >= Duration::from_secs(1)) {
            for h in hops.keys() {
                provoke(iface, *h);
            }
            provoked_at = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (h, reals) in hops {
        for r in reals {
            out.failed.insert(
                r,
                NeighborError::Unresolved {
                    real: h,
                    iface: iface.name.clone(),
                    timeout,
                },
            );
        }
    }
    out
}

/// Asks the kernel to resolve `hop` once, without waiting (a retry).
pub fn nudge(iface: &Iface, hop: IpAddr) {
    provoke(iface, hop);
}

/// Asks the kernel for its route to `addr`: the gateway, if any.
async fn route_gateway(iface: &Iface, addr: IpAddr) -> Result<Option<IpAddr>, NeighborError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NeighborError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    let msg = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, prefix)
        .map_err(|e| NeighborError::Netlink(e.to_string()))?
        .build();
    let mut routes = handle.route().get(msg).execute();
    let route = routes.try_next().await;
    task.abort();
    let route = route
        .map_err(|_| NeighborError::NoRoute(addr))?
        .ok_or(NeighborError::NoRoute(addr))?;
    let mut gateway = None;
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    match oif {
        Some(oif) if oif != iface.index => Err(NeighborError::OtherIface {
            real: addr,
            oif: nix::net::if_::if_indextoname(oif)
                .ok()
                .and_then(|n| n.into_string().ok())
                .unwrap_or_else(|| format!("interface index {oif}")),
            iface: iface.name.clone(),
        }),
        _ => Ok(gateway),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_membership() {
        let net: IpAddr = "198.51.100.1".parse().expect("addr");
        assert!(in_prefix(net, 24, "198.51.100.200".parse().expect("addr")));
        assert!(!in_prefix(net, 24, "198.51.101.1".parse().expect("addr")));
        assert!(in_prefix(net, 0, "203.0.113.1".parse().expect("addr")));
        let net6: IpAddr = "2001:db8:100::1".parse().expect("addr");
        assert!(in_prefix(
            net6,
            64,
            "2001:db8:100::11".parse().expect("addr")
        ));
        assert!(!in_prefix(
            net6,
            64,
            "2001:db8:101::11".parse().expect("addr")
        ));
        assert!(!in_prefix(net, 24, net6));
    }

    #[test]
    fn a_subnet_s_broadcast_address_is_refused() {
        let iface = Iface {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            nets: vec![
                ("198.51.100.1".parse().expect("addr"), 24),
                ("192.0.2.1".parse().expect("addr"), 31),
                ("2001:db8:100::1".parse().expect("addr"), 64),
            ],
            tunnel_sources: [true, true],
            local_vips: false,
        };
        let check = |a: &str| iface.check_not_broadcast(a.parse().expect("addr"), "real X");
        assert_eq!(
            check("198.51.100.255").expect_err("broadcast").to_string(),
            "real X is the broadcast address of 198.51.100.0/24 on eth0: it reaches every host \
             of the subnet, not one server"
        );
        for ok in [
            "198.51.100.254",
            "198.51.101.255",
            "192.0.2.0",
            "2001:db8:100::ffff",
        ] {
            check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
