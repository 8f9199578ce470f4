//! Probes through the forwarding path (`via: vip`): a TCP SYN to VIP:port
//! sent the way the data path forwards a client's packet, so that a passing
//! probe proves what a client needs, not only that the real's own address
//! answers.
//!
//! - TUN: the daemon encapsulates the SYN itself, exactly like the data path
//!   (IPIP, IP6IP6 or IPv4-in-IPv6; outer source from the tunnel source
//!   prefix, outer destination the real), and sends it on a raw socket
//!   (`IPPROTO_RAW`: send-only, the headers included). The real's `xlb decap`
//!   strips the outer header and the real's stack answers from the VIP
//!   straight to the inner source, the balancer's own address.
//! - DR: the same SYN in an Ethernet frame to the real's MAC, on a packet
//!   socket bound to the interface with protocol 0 (it receives nothing).
//!
//! Answers come back by normal routing. Two raw `IPPROTO_TCP` sockets (IPv4,
//! IPv6) receive them, each with a classic BPF filter that keeps only SYN-ACK
//! and RST segments (the host's other TCP traffic is dropped in the kernel);
//! one task reads both and hands an answer to the probe waiting on its exact
//! 4-tuple and acknowledgement number. A SYN-ACK passes, and the daemon
//! resets the half-open connection through the same path (the kernel's own
//! reset to the VIP would follow the routes toward the VIP, which lead back
//! to a balancer, not to the real); a RST fails ("refused through the
//! tunnel"); no answer within the check's timeout fails.
//!
//! The same sockets serve half-open probes of a real's own address
//! (`mode: syn`): a SYN from the balancer's address toward the real (the
//! source the routes pick, [`source_toward`]), written by hand into a reused
//! buffer and sent by [`Paths::send_syns`]: the SYNs of one wake-up of the
//! scheduler as Ethernet frames to the MAC the data path uses for each real,
//! in one `sendmmsg` on the packet socket (no route lookup, no IP output),
//! or on the raw socket for a real whose MAC is not known; a SYN-ACK passes
//! and the balancer's kernel resets the half-open connection itself (no
//! socket owns the port: its reset goes straight back to the real); a RST
//! fails. No socket, connect or close per probe. Those probes are not
//! futures: the scheduler keeps them in a table of its own, and the reader
//! hands it every answer no `via: vip` probe waits for, one batch per
//! wake-up ([`Paths::subscribe`]).
//!
//! Raw and packet sockets need `CAP_NET_RAW`, which the running daemon does
//! not keep: [`Paths::open`] runs at start-up, before the privileges are
//! dropped. Without it the daemon starts anyway and every `via: vip` and
//! `mode: syn` probe fails, saying so.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
    TcpHeader, TcpOptionElement,
};
use foldhash::HashMap;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, recvmsg, sendto, setsockopt, sockopt,
};
use rand::Rng as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot},
};

use crate::{
    model::{Forward, Vip},
    neighbor::Iface,
};

/// Hop limit of probes, inner and outer (the data path's).
const TTL: u8 = 64;

/// Window and MSS the SYN announces.
const WINDOW: u16 = 64240;
const MSS: u16 = 1360;

/// Largest answer read: an IPv4 header with options and a TCP header with options.
const ANSWER_MAX: usize = 256;

/// The balancer's side of a probe.
#[derive(Clone, Debug)]
pub struct Local {
    /// The interface's name, for messages.
    pub iface: String,
    /// Its index: DR frames leave by it.
    pub ifindex: u32,
    /// Its MAC: the source of DR frames.
    pub mac: [u8; 6],
    /// The balancer's own IPv4 address: the inner source of probes of IPv4
    /// VIPs, where their answers come back.
    pub v4: Option<Ipv4Addr>,
    /// The balancer's own IPv6 address (not link-local), likewise.
    pub v6: Option<Ipv6Addr>,
    /// The IPv4 tunnel source prefix as the data path uses it: the address
    /// with its host bits clear, and the host bits (random per probe).
    pub tun_v4: (Ipv4Addr, u32),
    /// The IPv6 tunnel source prefix: the address with the host bits of its
    /// last 32 bits clear, and those bits.
    pub tun_v6: (Ipv6Addr, u32),
}

impl Local {
    /// What `iface` and the data path's configuration say.
    pub fn new(iface: &Iface, config: &lb_common::Config) -> Self {
        let v4 = iface.nets.iter().find_map(|(a, _)| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let v6 = iface.nets.iter().find_map(|(a, _)| match a {
            IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(*v6),
            _ => None,
        });
        Self {
            iface: iface.name.clone(),
            ifindex: iface.index,
            mac: iface.mac,
            v4,
            v6,
            tun_v4: (Ipv4Addr::from(config.tun_src_v4), config.tun_host_v4),
            tun_v6: (Ipv6Addr::from(config.tun_src_v6), config.tun_host_v6),
        }
    }

    /// The inner source of a probe of `vip`: the balancer's own address of its family.
    fn source(&self, vip: IpAddr) -> Result<IpAddr, String> {
        match vip {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
        .ok_or_else(|| {
            let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
            format!(
                "no {family} address on {} to probe {vip} from (answers come back to it)",
                self.iface
            )
        })
    }

    /// The outer source of a tunnel to `real`, as the data path picks it:
    /// the prefix with random host bits.
    fn tunnel_source(&self, real: IpAddr) -> Result<IpAddr, String> {
        let host: u32 = rand::rng().random();
        match real {
            IpAddr::V4(_) => {
                let (base, mask) = self.tun_v4;
                if base.is_unspecified() {
                    return Err("no IPv4 tunnel source (give --tunnel-src)".to_owned());
                }
                Ok(IpAddr::V4(Ipv4Addr::from(u32::from(base) | (host & mask))))
            }
            IpAddr::V6(_) => {
                let (base, mask) = self.tun_v6;
                if base.is_unspecified() {
                    return Err("no IPv6 tunnel source (give --tunnel-src6)".to_owned());
                }
                let mut b = base.octets();
                let low = u32::from_be_bytes([b[12], b[13], b[14], b[15]]) | (host & mask);
                b[12..].copy_from_slice(&low.to_be_bytes());
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
        }
    }
}

/// Classic BPF (linux/filter.h): instruction classes, sizes, modes, operations.
mod cbpf {
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const B: u16 = 0x10;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MSH: u16 = 0xa0;
    pub const JEQ: u16 = 0x10;
    pub const JSET: u16 = 0x40;
    pub const AND: u16 = 0x50;
    pub const K: u16 = 0x00;

    pub const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
}

/// TCP flags byte: RST and SYN|ACK.
const RST: u32 = 0x04;
const SYN_ACK: u32 = 0x12;

/// Keeps SYN-ACK and RST segments of an IPv4 raw socket (the packet starts
/// at the IP header).
const FILTER_V4: [libc::sock_filter; 7] = [
    // X = IP header length.
    cbpf::op(cbpf::LDX | cbpf::B | cbpf::MSH, 0, 0, 0),
    // A = the TCP flags.
    cbpf::op(cbpf::LD | cbpf::B | cbpf::IND, 0, 0, 13),
    cbpf::op(cbpf::JMP | cbpf::JSET | cbpf::K, 3, 0, RST),
    cbpf::op(cbpf::ALU | cbpf::AND | cbpf::K, 0, 0, SYN_ACK),
    cbpf::op(cbpf::JMP | cbpf::JEQ | cbpf::K, 1, 0, SYN_ACK),
    cbpf::op(cbpf::RET | cbpf::K, 0, 0, 0),
    cbpf::op(cbpf::RET | cbpf::K, 0, 0, ANSWER_MAX as u32),
];

/// The same for an IPv6 raw socket (the packet starts at the TCP header).
const FILTER_V6: [libc::sock_filter; 6] = [
    cbpf::op(cbpf::LD | cbpf::B | cbpf::ABS, 0, 0, 13),
    cbpf::op(cbpf::JMP | cbpf::JSET | cbpf::K, 3, 0, RST),
    cbpf::op(cbpf::ALU | cbpf::AND | cbpf::K, 0, 0, SYN_ACK),
    cbpf::op(cbpf::JMP | cbpf::JEQ | cbpf::K, 1, 0, SYN_ACK),
    cbpf::op(cbpf::RET | cbpf::K, 0, 0, 0),
    cbpf::op(cbpf::RET | cbpf::K, 0, 0, ANSWER_MAX as u32),
];

/// A non-blocking, close-on-exec raw socket.
fn socket(domain: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches a classic BPF filter to `fd`.
fn attach_filter(fd: &OwnedFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A packet socket on `ifindex` that receives nothing (protocol 0).
fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_PACKET, 0)?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: binds to a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The sockets of every `via: vip` probe.
struct Sockets {
    send4: OwnedFd,
    send6: OwnedFd,
    packet: OwnedFd,
    recv4: AsyncFd<OwnedFd>,
    recv6: AsyncFd<OwnedFd>,
}

impl Sockets {
    /// Sends `packet`, a whole IP packet, to `to` on the raw socket of its
    /// family (the kernel routes it; the packet's own header is sent as is).
    fn send_ip(&self, to: IpAddr, packet: &[u8]) -> nix::Result<usize> {
        match to {
            IpAddr::V4(to) => sendto(
                self.send4.as_raw_fd(),
                packet,
                &SockaddrIn::from(SocketAddrV4::new(to, 0)),
                MsgFlags::empty(),
            ),
            IpAddr::V6(to) => sendto(
                self.send6.as_raw_fd(),
                packet,
                &SockaddrIn6::from(SocketAddrV6::new(to, 0, 0, 0)),
                MsgFlags::empty(),
            ),
        }
    }

    /// Opens them (needs `CAP_NET_RAW` and a tokio runtime).
    fn open(ifindex: u32) -> io::Result<Self> {
        let send4 = socket(libc::AF_INET, libc::IPPROTO_RAW)?;
        let send6 = socket(libc::AF_INET6, libc::IPPROTO_RAW)?;
        let packet = packet_socket(ifindex)?;
        let recv4 = socket(libc::AF_INET, libc::IPPROTO_TCP)?;
        attach_filter(&recv4, &FILTER_V4)?;
        let recv6 = socket(libc::AF_INET6, libc::IPPROTO_TCP)?;
        attach_filter(&recv6, &FILTER_V6)?;
        setsockopt(&recv6, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
        let register = |fd: OwnedFd| {
            // SAFETY: the AsyncFd owns the descriptor, which stays open as
            // long as it does.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(io::Error::from)
        };
        Ok(Self {
            send4,
            send6,
            packet,
            recv4: register(recv4)?,
            recv6: register(recv6)?,
        })
    }
}

/// What came back for a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A SYN-ACK: something listens on VIP:port on the real.
    Accepted,
    /// A RST: the real's stack got the SYN, nothing listens.
    Refused,
}

/// A probe's connection: (balancer address and port, VIP and port).
pub type Flow = (SocketAddr, SocketAddr);

/// An answer no `via: vip` probe waits for, handed to the scheduler (its
/// `mode: syn` probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The connection it came on.
    pub flow: Flow,
    /// Its acknowledgement number (the SYN's sequence + 1 if it answers it).
    pub ack: u32,
    /// A SYN-ACK or a RST.
    pub answer: Answer,
}

/// A probe waiting for its answer.
struct Waiter {
    /// The acknowledgement number an answer carries: the SYN's sequence + 1.
    ack: u32,
    tx: oneshot::Sender<Answer>,
}

/// Probes through the forwarding path; one per daemon, shared by the
/// scheduler's probes.
pub struct Paths {
    local: Local,
    /// The sockets, or why they could not be opened.
    sockets: Result<Sockets, String>,
    waiting: Mutex<HashMap<Flow, Waiter>>,
    /// The MAC of each real (DR), as the controller last published them:
    /// looked up for every SYN of a half-open probe (a search of a
    /// `BTreeMap` of 5,000 reals, cold in the cache, was 7% of the daemon's
    /// time at 5,000 probes/s).
    macs: RwLock<HashMap<IpAddr, [u8; 6]>>,
    /// The same, as the controller publishes them: compared in order with
    /// each publication, so `macs` is rebuilt only when they change, and
    /// its lock is held only to swap it.
    published: Mutex<BTreeMap<IpAddr, [u8; 6]>>,
    /// Where answers no `via: vip` probe waits for go (the scheduler).
    replies: Mutex<Option<mpsc::UnboundedSender<Vec<Reply>>>>,
}

/// Takes a waiter out of [`Paths::waiting`] when its probe ends, however it ends.
struct Registration<'a> {
    paths: &'a Paths,
    flow: Flow,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.paths.lock().remove(&self.flow);
    }
}

impl Paths {
    /// Opens the sockets and starts the task that reads answers. Without
    /// `CAP_NET_RAW` it logs once and returns a prober whose every probe
    /// fails with the reason. Needs a tokio runtime.
    pub fn open(local: Local) -> Arc<Self> {
        let sockets = Sockets::open(local.ifindex).map_err(|e| {
            let reason = if e.kind() == io::ErrorKind::PermissionDenied {
                "CAP_NET_RAW was missing at start-up".to_owned()
            } else {
                format!("opening its raw sockets failed at start-up: {e}")
            };
            tracing::warn!(
                %reason,
                "health checks with via: vip or mode: syn cannot run and will report their reals down"
            );
            reason
        });
        let paths = Arc::new(Self {
            local,
            sockets,
            waiting: Mutex::default(),
            macs: RwLock::default(),
            published: Mutex::default(),
            replies: Mutex::default(),
        });
        if paths.sockets.is_ok() {
            tokio::spawn(Self::receive(Arc::downgrade(&paths)));
        }
        paths
    }

    /// A prober without sockets (tests of what uses one).
    pub fn without_sockets(local: Local, reason: &str) -> Arc<Self> {
        Arc::new(Self {
            local,
            sockets: Err(reason.to_owned()),
            waiting: Mutex::default(),
            macs: RwLock::default(),
            published: Mutex::default(),
            replies: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Flow, Waiter>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the MACs the controller knows (DR probes go to them).
    pub fn set_macs(&self, macs: &BTreeMap<IpAddr, [u8; 6]>) {
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *published == *macs {
            return;
        }
        published.clone_from(macs);
        let by_real = macs.iter().map(|(r, m)| (*r, *m)).collect();
        *self
            .macs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = by_real;
    }

    fn mac(&self, real: IpAddr) -> Option<[u8; 6]> {
        self.macs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&real)
            .copied()
    }

    /// One probe of `real` for `vip` on `port`, forwarded as `forward`
    /// forwards. The caller bounds it with the check's timeout (see
    /// [`timeout_reason`]).
    pub async fn probe(
        &self,
        vip: Vip,
        real: IpAddr,
        port: u16,
        forward: Forward,
    ) -> Result<(), String> {
        let sockets = self
            .sockets
            .as_ref()
            .map_err(|r| format!("via: vip needs raw sockets: {r}"))?;
        let to = SocketAddr::new(vip.addr, port);
        let from_addr = self.local.source(vip.addr)?;
        let isn: u32 = rand::rng().random();
        let (from, rx, _registration) = self.register(from_addr, to, isn);
        let syn = segment(from, to, isn, Segment::Syn)?;
        self.send(sockets, forward, real, &syn)?;
        match rx.await {
            Ok(Answer::Accepted) => {
                // Close the half-open connection on the real at once.
                let rst = segment(from, to, isn.wrapping_add(1), Segment::Rst)?;
                if let Err(err) = self.send(sockets, forward, real, &rst) {
                    tracing::debug!(%real, %err, "health: resetting a probe's connection failed");
                }
                Ok(())
            }
            Ok(Answer::Refused) => Err(match forward {
                Forward::Tun => {
                    format!("connection refused through the tunnel by {real} for {to}")
                }
                Forward::Dr => format!("connection refused by {real} for {to} (sent to its MAC)"),
            }),
            Err(_) => Err("the answer reader stopped".to_owned()),
        }
    }

    /// From now on, answers no `via: vip` probe waits for go to the
    /// receiver returned, one batch per wake-up of the reader (the
    /// scheduler's `mode: syn` probes match them).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<Reply>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self
            .replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Whether half-open probes (`mode: syn`) can run: why not, if not.
    pub fn syn_ready(&self) -> Result<(), String> {
        self.syn_sockets().map(drop)
    }

    fn syn_sockets(&self) -> Result<&Sockets, String> {
        self.sockets
            .as_ref()
            .map_err(|r| format!("mode: syn needs raw sockets: {r}"))
    }

    /// Sends the SYNs of half-open probes (`mode: syn`) due in one wake-up
    /// of the scheduler, and puts the result of each, in order, in
    /// `results`. A SYN to a real whose next hop's MAC is known (the MACs
    /// the controller publishes: the real's own for DR, its router's for
    /// TUN) goes as a whole Ethernet frame on the packet socket, all of them
    /// in one `sendmmsg` (no route lookup, no IP output path); one to a real
    /// with no known MAC goes on the raw socket of its family, routed by the
    /// kernel. `buf` holds the frames (reused from batch to batch). A frame
    /// that finds the interface's queue full is [`SynSent::Busy`].
    pub fn send_syns(&self, syns: &[SynOut], buf: &mut SynBuf, results: &mut Vec<SynSent>) {
        results.clear();
        let sockets = match self.syn_sockets() {
            Ok(sockets) => sockets,
            Err(err) => {
                results.extend(syns.iter().map(|_| SynSent::Failed(err.clone())));
                return;
            }
        };
        buf.clear();
        {
            let macs = self
                .macs
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (i, syn) in syns.iter().enumerate() {
                let result = match macs.get(&syn.to.ip()) {
                    Some(mac) => buf.push_frame(i, self.local.mac, *mac, syn),
                    None => {
                        buf.ip.clear();
                        syn_into(&mut buf.ip, syn.from, syn.to, syn.isn).and_then(|()| {
                            sockets
                                .send_ip(syn.to.ip(), &buf.ip)
                                .map(drop)
                                .map_err(|e| format!("sending a SYN to {}: {e}", syn.to))
                        })
                    }
                };
                results.push(result.map_or_else(SynSent::Failed, |()| SynSent::Sent));
            }
        }
        send_frames(&sockets.packet, self.local.ifindex, buf, |i, err| {
            results[i] = match err.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN) => SynSent::Busy,
                _ => SynSent::Failed(format!(
                    "sending a SYN to {} on {}: {err}",
                    syns[i].to, self.local.iface
                )),
            };
        });
    }

    /// Registers a new flow from `from` (a free random port) to `to`.
    fn register(
        &self,
        from: IpAddr,
        to: SocketAddr,
        isn: u32,
    ) -> (SocketAddr, oneshot::Receiver<Answer>, Registration<'_>) {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        let mut rng = rand::rng();
        let from = loop {
            let from = SocketAddr::new(from, rng.random_range(1024..=u16::MAX));
            if !waiting.contains_key(&(from, to)) {
                break from;
            }
        };
        waiting.insert(
            (from, to),
            Waiter {
                ack: isn.wrapping_add(1),
                tx,
            },
        );
        (
            from,
            rx,
            Registration {
                paths: self,
                flow: (from, to),
            },
        )
    }

    /// Sends `packet` (an IP packet from the balancer to the VIP) to `real`
    /// the way the data path forwards to it.
    fn send(
        &self,
        sockets: &Sockets,
        forward: Forward,
        real: IpAddr,
        packet: &[u8],
    ) -> Result<(), String> {
        match forward {
            Forward::Tun => {
                let outer_src = self.local.tunnel_source(real)?;
                let label: u32 = rand::rng().random();
                let wire = encapsulate(packet, outer_src, real, label)?;
                sockets
                    .send_ip(real, &wire)
                    .map(drop)
                    .map_err(|e| format!("sending through the tunnel to {real}: {e}"))
            }
            Forward::Dr => {
                let mac = self
                    .mac(real)
                    .ok_or_else(|| format!("{real}'s MAC is not known yet"))?;
                let frame = frame(self.local.mac, mac, packet);
                send_frame(&sockets.packet, self.local.ifindex, mac, &frame)
                    .map_err(|e| format!("sending to {real}'s MAC on {}: {e}", self.local.iface))
            }
        }
    }

    /// Reads answers until the prober is dropped: every answer a socket
    /// holds when it turns readable (up to [`BATCH`]), handed over under
    /// one lock.
    async fn receive(paths: std::sync::Weak<Self>) {
        let mut buf = [0u8; ANSWER_MAX];
        let mut batch = Vec::with_capacity(BATCH);
        // Checks the prober is still wanted now and then.
        let mut wanted = tokio::time::interval(Duration::from_secs(5));
        wanted.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(p) = paths.upgrade() else { return };
            let Ok(sockets) = &p.sockets else { return };
            let read = tokio::select! {
                r = sockets.recv4.readable() => {
                    r.map(|mut g| drain(&mut g, recv_v4, &mut buf, &mut batch))
                }
                r = sockets.recv6.readable() => {
                    r.map(|mut g| drain(&mut g, recv_v6, &mut buf, &mut batch))
                }
                _ = wanted.tick() => Ok(()),
            };
            if let Err(err) = read {
                tracing::error!(%err, "health: reading probe answers failed; stopped");
                return;
            }
            if !batch.is_empty() {
                let mut unclaimed = Vec::new();
                {
                    let mut waiting = p.lock();
                    for (flow, tcp) in batch.drain(..) {
                        if waiting.contains_key(&flow) {
                            answer(&mut waiting, flow, &tcp);
                        } else if let Some(reply) = reply(flow, &tcp) {
                            unclaimed.push(reply);
                        }
                    }
                }
                if !unclaimed.is_empty() {
                    let replies = p
                        .replies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(tx) = replies.as_ref() {
                        let _ = tx.send(unclaimed);
                    }
                }
            }
        }
    }

    /// Hands `tcp`, received on `flow`, to the probe waiting for it.
    #[cfg(test)]
    fn answer(&self, flow: Flow, tcp: &TcpHeader) {
        answer(&mut self.lock(), flow, tcp);
    }
}

/// Answers read from one socket in one turn, at most.
const BATCH: usize = 64;

/// A function reading one answer from a raw socket.
type Read = fn(&OwnedFd, &mut [u8]) -> io::Result<Option<(Flow, TcpHeader)>>;

/// Reads what a readable socket holds into `batch` (up to [`BATCH`]
/// answers); a read error other than "nothing more" drops that packet.
fn drain(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    read: Read,
    buf: &mut [u8],
    batch: &mut Vec<(Flow, TcpHeader)>,
) {
    for _ in 0..BATCH {
        match guard.try_io(|fd| read(fd.get_ref(), buf)) {
            Ok(Ok(Some(answer))) => batch.push(answer),
            Ok(Ok(None) | Err(_)) => {}
            // Would block: the socket is empty and its readiness cleared.
            Err(_) => return,
        }
    }
}

/// Hands `tcp`, received on `flow`, to the probe waiting for it in `waiting`.
fn answer(waiting: &mut HashMap<Flow, Waiter>, flow: Flow, tcp: &TcpHeader) {
    let Some(w) = waiting.get(&flow) else { return };
    let Some(reply) = reply(flow, tcp).filter(|r| r.ack == w.ack) else {
        return;
    };
    if let Some(w) = waiting.remove(&flow) {
        let _ = w.tx.send(reply.answer);
    }
}

/// What `tcp`, received on `flow`, answers: a SYN-ACK or a RST with an
/// acknowledgement number; anything else answers no probe.
fn reply(flow: Flow, tcp: &TcpHeader) -> Option<Reply> {
    if !tcp.ack {
        return None;
    }
    let answer = if tcp.rst {
        Answer::Refused
    } else if tcp.syn {
        Answer::Accepted
    } else {
        return None;
    };
    Some(Reply {
        flow,
        ack: tcp.acknowledgment_number,
        answer,
    })
}

/// The balancer's address that routes pick toward `real` (a connected UDP
/// socket's local address: no packet is sent). The scheduler keeps it per
/// real and asks again after a probe that got no answer, so a changed
/// route is followed.
pub fn source_toward(real: IpAddr) -> Result<IpAddr, String> {
    let unspecified: IpAddr = match real {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    std::net::UdpSocket::bind((unspecified, 0))
        .and_then(|s| {
            s.connect((real, 9))?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .map_err(|e| format!("no route to {real}: {e}"))
}

/// What the daemon says when a `via: vip` probe of `real` for `to` got no
/// answer within `timeout`.
pub fn timeout_reason(forward: Forward, real: IpAddr, to: SocketAddr, timeout: Duration) -> String {
    let ms = timeout.as_millis();
    match forward {
        Forward::Tun => format!("no answer through the tunnel from {real} for {to} within {ms} ms"),
        Forward::Dr => format!("no answer from {real} for {to} sent to its MAC within {ms} ms"),
    }
}

/// Reads one IPv4 answer: its flow (local, remote) and TCP header. `Ok(None)`:
/// not a TCP segment this prober can read.
fn recv_v4(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(Flow, TcpHeader)>> {
    let n = nix::sys::socket::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let Ok((ip, rest)) = Ipv4Header::from_slice(&buf[..n]) else {
        return Ok(None);
    };
    if ip.protocol != IpNumber::TCP || ip.is_fragmenting_payload() {
        return Ok(None);
    }
    let Ok((tcp, _)) = TcpHeader::from_slice(rest) else {
        return Ok(None);
    };
    let local = SocketAddr::from((ip.destination, tcp.destination_port));
    let remote = SocketAddr::from((ip.source, tcp.source_port));
    Ok(Some(((local, remote), tcp)))
}

/// Reads one IPv6 answer (the kernel gives the TCP segment; the addresses
/// come from the source address and the packet information).
fn recv_v6(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(Flow, TcpHeader)>> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let (n, src, dst) = {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrIn6>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        let src = msg.address.map(|a| a.ip());
        let mut dst = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::Ipv6PacketInfo(info) = c {
                dst = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
            }
        }
        (msg.bytes, src, dst)
    };
    let (Some(src), Some(dst)) = (src, dst) else {
        return Ok(None);
    };
    let Ok((tcp, _)) = TcpHeader::from_slice(&buf[..n]) else {
        return Ok(None);
    };
    let local = SocketAddr::from((dst, tcp.destination_port));
    let remote = SocketAddr::from((src, tcp.source_port));
    Ok(Some(((local, remote), tcp)))
}

/// The segments a probe sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    /// Opens the connection (announcing an MSS).
    Syn,
    /// Closes the half-open connection after a SYN-ACK.
    Rst,
}

/// An IP packet holding one TCP segment from `from` to `to` with sequence
/// number `seq`, checksums filled in.
fn segment(from: SocketAddr, to: SocketAddr, seq: u32, kind: Segment) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(80);
    segment_into(&mut out, from, to, seq, kind)?;
    Ok(out)
}

/// [`segment`] written into `out` (cleared first).
fn segment_into(
    out: &mut Vec<u8>,
    from: SocketAddr,
    to: SocketAddr,
    seq: u32,
    kind: Segment,
) -> Result<(), String> {
    out.clear();
    let ip = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), TTL),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), TTL),
        _ => return Err(format!("{from} cannot reach {to}: not one address family")),
    };
    let tcp = ip.tcp(from.port(), to.port(), seq, WINDOW);
    let built = match kind {
        Segment::Syn => tcp
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(MSS)])
            .map_err(|e| format!("TCP options: {e}"))?
            .write(out, &[]),
        Segment::Rst => tcp.rst().write(out, &[]),
    };
    built.map_err(|e| format!("building the probe: {e}"))
}

/// The SYN [`segment`] builds, written by hand at the end of `out`: the
/// packet builder copies its headers by value from step to step, which was a
/// tenth of the daemon's time at 5,000 half-open probes a second.
fn syn_into(out: &mut Vec<u8>, from: SocketAddr, to: SocketAddr, isn: u32) -> Result<(), String> {
    /// A TCP header with the MSS option.
    const TCP_LEN: u16 = 24;
    // The checksum's pseudo-header: addresses, protocol and TCP length.
    let mut sum: u32 = u32::from(u8::from(IpNumber::TCP)) + u32::from(TCP_LEN);
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + TCP_LEN).to_be_bytes());
            // Don't fragment, as the packet builder sets it.
            ip[6] = 0x40;
            ip[8] = TTL;
            ip[9] = IpNumber::TCP.into();
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let check = checksum(ip.chunks(2).map(|p| u16::from_be_bytes([p[0], p[1]])));
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&TCP_LEN.to_be_bytes());
            out.extend_from_slice(&[IpNumber::TCP.into(), TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => return Err(format!("{from} cannot reach {to}: not one address family")),
    }
    let mut tcp = [0u8; TCP_LEN as usize];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&isn.to_be_bytes());
    // Data offset in 32-bit words; flags: SYN.
    tcp[12] = ((TCP_LEN / 4) as u8) << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&WINDOW.to_be_bytes());
    // The MSS option: kind 2, length 4.
    tcp[20..22].copy_from_slice(&[2, 4]);
    tcp[22..24].copy_from_slice(&MSS.to_be_bytes());
    add(&tcp);
    let check = checksum(std::iter::once(0).chain(std::iter::once(fold(sum))));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&tcp);
    Ok(())
}

/// A SYN of a half-open probe: from the balancer's address and port to the
/// real's, with its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynOut {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub isn: u32,
}

/// What became of a SYN handed to [`Paths::send_syns`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SynSent {
    /// It left.
    Sent,
    /// The interface's queue was full: it did not leave, and may be sent
    /// again a little later (nothing is wrong with the real).
    Busy,
    /// It cannot be sent: why.
    Failed(String),
}

/// The longest SYN frame: Ethernet, IPv6 and TCP with the MSS option.
const SYN_FRAME_MAX: usize = 14 + 40 + 24;

/// Frames sent in one `sendmmsg`, at most.
const SEND_BATCH: usize = 64;

/// Where a batch of SYN frames is written (reused from batch to batch).
#[derive(Default)]
pub struct SynBuf {
    /// The frames, one every [`SYN_FRAME_MAX`] bytes.
    frames: Vec<u8>,
    /// Each frame's length, its place in the batch and its destination.
    sent: Vec<(usize, usize, libc::sockaddr_ll)>,
    /// An IP packet for the raw socket.
    ip: Vec<u8>,
}

// `libc::sockaddr_ll` is plain data; `Debug` is not derived for it.
impl std::fmt::Debug for SynBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynBuf")
            .field("frames", &self.sent.len())
            .finish()
    }
}

impl SynBuf {
    fn clear(&mut self) {
        self.frames.clear();
        self.sent.clear();
    }

    /// Writes `syn` in an Ethernet frame from `src` to `dst`, the `i`th of
    /// its batch.
    fn push_frame(
        &mut self,
        i: usize,
        src: [u8; 6],
        dst: [u8; 6],
        syn: &SynOut,
    ) -> Result<(), String> {
        let start = self.frames.len();
        let ether_type = if syn.to.is_ipv6() {
            EtherType::IPV6
        } else {
            EtherType::IPV4
        };
        self.frames.extend_from_slice(&dst);
        self.frames.extend_from_slice(&src);
        self.frames.extend_from_slice(&ether_type.0.to_be_bytes());
        if let Err(err) = syn_into(&mut self.frames, syn.from, syn.to, syn.isn) {
            self.frames.truncate(start);
            return Err(err);
        }
        let len = self.frames.len() - start;
        self.frames.resize(start + SYN_FRAME_MAX, 0);
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ether_type.0.to_be();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
        self.sent.push((len, i, addr));
        Ok(())
    }
}

/// Sends the frames of `buf` on the packet socket `fd` out of interface
/// `ifindex`, [`SEND_BATCH`] per `sendmmsg`; `failed` hears of each frame
/// not sent (its place in the batch and why). Once the interface's queue is
/// full (`ENOBUFS`), the frames left are not tried: each fails with it.
fn send_frames(
    fd: &OwnedFd,
    ifindex: u32,
    buf: &mut SynBuf,
    mut failed: impl FnMut(usize, io::Error),
) {
    let Ok(ifindex) = i32::try_from(ifindex) else {
        for (_, i, _) in &buf.sent {
            failed(*i, io::ErrorKind::InvalidInput.into());
        }
        return;
    };
    let mut done = 0;
    while done < buf.sent.len() {
        let chunk = (buf.sent.len() - done).min(SEND_BATCH);
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths).
        let mut iov: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: likewise.
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..chunk {
            let (len, _, addr) = &mut buf.sent[done + k];
            addr.sll_ifindex = ifindex;
            iov[k] = libc::iovec {
                iov_base: buf.frames[(done + k) * SYN_FRAME_MAX..].as_mut_ptr().cast(),
                iov_len: *len,
            };
            hdrs[k].msg_hdr.msg_name = (addr as *mut libc::sockaddr_ll).cast();
            hdrs[k].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            hdrs[k].msg_hdr.msg_iov = &raw mut iov[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live address and buffer of the
        // lengths given, which outlive the call.
        let n =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), chunk as libc::c_uint, 0) };
        if n > 0 {
            // A frame after those sent failed: the next call says why.
            done += n as usize;
        } else {
            let err = io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                // The queue is full: none of the rest would go either.
                for (_, i, _) in &buf.sent[done..] {
                    failed(*i, io::Error::from_raw_os_error(libc::ENOBUFS));
                }
                return;
            }
            // This frame cannot go: say why, go on with the next.
            failed(buf.sent[done].1, err);
            done += 1;
        }
    }
}

/// A 32-bit one's-complement sum folded to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves 16 bits.
    sum as u16
}

/// The Internet checksum of 16-bit words.
fn checksum(words: impl Iterator<Item = u16>) -> u16 {
    !fold(words.map(u32::from).sum())
}

/// `inner` (an IP packet) encapsulated from `src` to `real` as the data path
/// does it: IPIP, IP6IP6 or IPv4-in-IPv6, TTL 64, DF copied from an IPv4
/// inner header, the IPv6 flow label from `label`.
fn encapsulate(inner: &[u8], src: IpAddr, real: IpAddr, label: u32) -> Result<Vec<u8>, String> {
    let inner_v4 = inner.first().is_some_and(|b| b >> 4 == 4);
    let len = u16::try_from(inner.len()).map_err(|_| "probe too big".to_owned())?;
    let mut out = Vec::with_capacity(inner.len() + Ipv6Header::LEN);
    match (src, real) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            if !inner_v4 {
                return Err("IPv6 inside IPv4 is not a mode xlb offers".to_owned());
            }
            let mut h = Ipv4Header::new(len, TTL, IpNumber::IPV4, s.octets(), d.octets())
                .map_err(|e| e.to_string())?;
            h.dont_fragment = inner.get(6).is_some_and(|b| b & 0x40 != 0);
            h.header_checksum = h.calc_header_checksum();
            out.extend_from_slice(&h.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::try_new(label & 0x000f_ffff)
                    .map_err(|e| e.to_string())?,
                payload_length: len,
                next_header: if inner_v4 {
                    IpNumber::IPV4
                } else {
                    IpNumber::IPV6
                },
                hop_limit: TTL,
                source: s.octets(),
                destination: d.octets(),
            };
            out.extend_from_slice(&h.to_bytes());
        }
        _ => return Err(format!("no tunnel source of {real}'s family")),
    }
    out.extend_from_slice(inner);
    Ok(out)
}

/// `packet` in an Ethernet frame from `src` to `dst`.
fn frame(src: [u8; 6], dst: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let ether_type = if packet.first().is_some_and(|b| b >> 4 == 6) {
        EtherType::IPV6
    } else {
        EtherType::IPV4
    };
    let eth = Ethernet2Header {
        source: src,
        destination: dst,
        ether_type,
    };
    let mut out = Vec::with_capacity(Ethernet2Header::LEN + packet.len());
    out.extend_from_slice(&eth.to_bytes());
    out.extend_from_slice(packet);
    out
}

/// Sends `frame` on the packet socket `fd` out of interface `ifindex`.
fn send_frame(fd: &OwnedFd, ifindex: u32, dst: [u8; 6], frame: &[u8]) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    // SAFETY: sends from a live buffer to a sockaddr_ll of the size given.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_tunnelled_syn_is_ipip_to_the_real_with_the_vip_inside() {
        let syn = segment(
            addr("198.51.100.1:40000"),
            addr("203.0.113.10:80"),
            7,
            Segment::Syn,
        )
        .expect("syn");
        let real = IpAddr::from([198, 51, 100, 11]);
        let wire = encapsulate(&syn, IpAddr::from([192, 0, 2, 9]), real, 0).expect("encap");
        let (outer, inner) = Ipv4Header::from_slice(&wire).expect("outer header");
        assert_eq!(outer.protocol, IpNumber::IPV4);
        assert_eq!(outer.source, [192, 0, 2, 9]);
        assert_eq!(outer.destination, [198, 51, 100, 11]);
        assert_eq!(outer.time_to_live, TTL);
        assert!(outer.dont_fragment, "DF is copied from the inner SYN");
        assert_eq!(outer.header_checksum, outer.calc_header_checksum());
        assert_eq!(usize::from(outer.total_len), wire.len());
        let p = SlicedPacket::from_ip(inner).expect("inner packet");
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("inner is not IPv4: {p:?}")
        };
        assert_eq!(ip.header().source(), [198, 51, 100, 1]);
        assert_eq!(ip.header().destination(), [203, 0, 113, 10]);
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            panic!("no TCP: {p:?}")
        };
        assert!(tcp.syn() && !tcp.ack() && !tcp.rst());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (40000, 80));
        assert_eq!(tcp.sequence_number(), 7);
        let expected = tcp
            .to_header()
            .calc_checksum_ipv4_raw(
                ip.header().source(),
                ip.header().destination(),
                tcp.payload(),
            )
            .expect("checksum");
        assert_eq!(tcp.checksum(), expected, "inner TCP checksum");
    }

    #[test]
    fn ipv4_vips_go_to_ipv6_reals_in_4in6_and_ipv6_vips_in_ip6ip6() {
        let real = IpAddr::from("2001:db8:100::11".parse::<Ipv6Addr>().expect("v6"));
        let src = IpAddr::from("2001:db8:ff::7".parse::<Ipv6Addr>().expect("v6"));
        let syn4 = segment(
            addr("198.51.100.1:40000"),
            addr("203.0.113.10:80"),
            1,
            Segment::Syn,
        )
        .expect("syn");
        let syn6 = segment(
            addr("[2001:db8:100::1]:40000"),
            addr("[2001:db8:203::10]:80"),
            1,
            Segment::Syn,
        )
        .expect("syn");
        for (inner, next) in [(&syn4, IpNumber::IPV4), (&syn6, IpNumber::IPV6)] {
            let wire = encapsulate(inner, src, real, 0x1234_5678).expect("encap");
            let (h, rest) = Ipv6Header::from_slice(&wire).expect("outer");
            assert_eq!(h.next_header, next);
            assert_eq!(IpAddr::from(h.source), src);
            assert_eq!(IpAddr::from(h.destination), real);
            assert_eq!(h.flow_label.value(), 0x0004_5678);
            assert_eq!(usize::from(h.payload_length), inner.len());
            assert_eq!(rest, &inner[..]);
        }
        let refused = encapsulate(
            &syn6,
            IpAddr::from([192, 0, 2, 9]),
            IpAddr::from([198, 51, 100, 11]),
            0,
        )
        .expect_err("6in4");
        assert!(refused.contains("IPv6 inside IPv4"), "{refused}");
    }

    #[test]
    fn a_dr_frame_goes_to_the_real_s_mac_with_the_vip_as_destination() {
        let syn = segment(
            addr("198.51.100.1:40000"),
            addr("203.0.113.10:80"),
            7,
            Segment::Syn,
        )
        .expect("syn");
        let f = frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 11], &syn);
        let p = SlicedPacket::from_ethernet(&f).expect("frame");
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("not Ethernet: {p:?}")
        };
        assert_eq!(eth.destination(), [2, 0, 0, 0, 0, 11]);
        assert_eq!(eth.source(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(eth.ether_type(), EtherType::IPV4);
        assert_eq!(&f[Ethernet2Header::LEN..], &syn[..]);
    }

    #[test]
    fn the_tunnel_source_follows_the_data_path_s_prefix() {
        let local = Local {
            iface: "eth0".to_owned(),
            ifindex: 1,
            mac: [0; 6],
            v4: Some(Ipv4Addr::new(198, 51, 100, 1)),
            v6: None,
            tun_v4: (Ipv4Addr::new(192, 0, 2, 0), 0xff),
            tun_v6: (Ipv6Addr::UNSPECIFIED, 0),
        };
        for _ in 0..100 {
            let IpAddr::V4(s) = local
                .tunnel_source(IpAddr::from([198, 51, 100, 11]))
                .expect("v4 source")
            else {
                panic!("not IPv4")
            };
            assert_eq!(s.octets()[..3], [192, 0, 2]);
        }
        let err = local
            .tunnel_source(IpAddr::from(
                "2001:db8::11".parse::<Ipv6Addr>().expect("v6"),
            ))
            .expect_err("no v6 source");
        assert!(err.contains("--tunnel-src6"), "{err}");
        let err = local
            .source(IpAddr::from(
                "2001:db8:203::10".parse::<Ipv6Addr>().expect("v6"),
            ))
            .expect_err("no v6 address");
        assert_eq!(
            err,
            "no IPv6 address on eth0 to probe 2001:db8:203::10 from (answers come back to it)"
        );
    }

    #[test]
    fn a_syn_written_by_hand_is_the_one_the_packet_builder_makes() {
        let mut buf = Vec::new();
        let pairs = [
            ("198.51.100.1:40000", "203.0.113.7:8080"),
            ("198.51.100.255:1024", "203.0.113.255:65535"),
            ("[2001:db8:100::1]:65535", "[2001:db8:300::abcd]:80"),
            ("[2001:db8::ffff]:1234", "[2001:db8:ffff::1]:443"),
        ];
        for (from, to) in pairs {
            for isn in [0, 1, 0x8000_0000, u32::MAX, 0x1234_5678] {
                let (from, to) = (addr(from), addr(to));
                buf.clear();
                syn_into(&mut buf, from, to, isn).expect("syn");
                let built = segment(from, to, isn, Segment::Syn).expect("segment");
                assert_eq!(buf, built, "{from} -> {to} isn {isn}");
            }
        }
        let err = syn_into(&mut buf, addr("198.51.100.1:1"), addr("[2001:db8::1]:2"), 0)
            .expect_err("two families");
        assert!(err.contains("not one address family"), "{err}");
    }

    #[test]
    fn a_batch_of_syn_frames_holds_the_packet_builder_s_syns_to_each_mac() {
        let src = [0x02, 0, 0, 0, 0, 1];
        let syns = [
            (
                "198.51.100.1:40000",
                "203.0.113.7:8080",
                7,
                [0x02, 0, 0, 0, 0, 0x10],
            ),
            (
                "[2001:db8:100::1]:65535",
                "[2001:db8:300::abcd]:80",
                u32::MAX,
                [0x02, 0, 0, 0, 0, 0x11],
            ),
            (
                "[2001:db8::ffff]:1234",
                "[2001:db8:ffff::1]:443",
                0x1234_5678,
                [0x02, 0xff, 0, 0, 0, 0x12],
            ),
        ];
        let mut buf = SynBuf::default();
        // Twice: a reused buffer holds only the new batch.
        for _ in 0..2 {
            buf.clear();
            for (i, (from, to, isn, mac)) in syns.iter().enumerate() {
                let syn = SynOut {
                    from: addr(from),
                    to: addr(to),
                    isn: *isn,
                };
                buf.push_frame(i, src, *mac, &syn).expect("frame");
            }
            let bad = SynOut {
                from: addr("198.51.100.1:1"),
                to: addr("[2001:db8::1]:2"),
                isn: 0,
            };
            let err = buf
                .push_frame(3, src, [0; 6], &bad)
                .expect_err("two families");
            assert!(err.contains("not one address family"), "{err}");
            assert_eq!(buf.sent.len(), syns.len(), "the bad SYN left a frame");
            for (k, (from, to, isn, mac)) in syns.iter().enumerate() {
                let (from, to) = (addr(from), addr(to));
                let reference = frame(
                    src,
                    *mac,
                    &segment(from, to, *isn, Segment::Syn).expect("segment"),
                );
                let (len, i, dst) = &buf.sent[k];
                let at = k * SYN_FRAME_MAX;
                assert_eq!(
                    &buf.frames[at..at + len],
                    reference.as_slice(),
                    "{from} -> {to}"
                );
                assert_eq!(*i, k);
                assert_eq!(dst.sll_addr[..6], mac[..]);
                assert_eq!(
                    u16::from_be(dst.sll_protocol),
                    u16::from_be_bytes([reference[12], reference[13]])
                );
            }
        }
    }

    /// The balancer's side with no address of its own.
    fn no_addresses() -> Local {
        Local {
            iface: "eth0".to_owned(),
            ifindex: 1,
            mac: [0; 6],
            v4: None,
            v6: None,
            tun_v4: (Ipv4Addr::UNSPECIFIED, 0),
            tun_v6: (Ipv6Addr::UNSPECIFIED, 0),
        }
    }

    #[test]
    fn the_macs_published_last_are_the_ones_probes_go_to() {
        let paths = Paths::without_sockets(no_addresses(), "test");
        let (a, b, c) = (
            IpAddr::from([198, 51, 100, 11]),
            IpAddr::from([198, 51, 100, 12]),
            IpAddr::from([198, 51, 100, 13]),
        );
        let mut macs = BTreeMap::from([(a, [2, 0, 0, 0, 0, 11]), (b, [2, 0, 0, 0, 0, 12])]);
        paths.set_macs(&macs);
        assert_eq!(paths.mac(a), Some([2, 0, 0, 0, 0, 11]));
        assert_eq!(paths.mac(c), None);
        // A changed MAC, a real gone and one new, as many entries as before.
        macs.insert(a, [2, 0, 0, 0, 0, 0x21]);
        macs.remove(&b);
        macs.insert(c, [2, 0, 0, 0, 0, 13]);
        paths.set_macs(&macs);
        assert_eq!(paths.mac(a), Some([2, 0, 0, 0, 0, 0x21]));
        assert_eq!(paths.mac(b), None, "a real no longer published");
        assert_eq!(paths.mac(c), Some([2, 0, 0, 0, 0, 13]));
        paths.set_macs(&BTreeMap::new());
        assert_eq!(paths.mac(a), None);
    }

    #[test]
    fn only_the_awaited_answer_reaches_a_probe() {
        let paths = Paths::without_sockets(no_addresses(), "test");
        let to = addr("203.0.113.10:80");
        let (from, mut rx, reg) = paths.register(IpAddr::from([198, 51, 100, 1]), to, 99);
        let mut tcp = TcpHeader::new(80, from.port(), 5, 100);
        tcp.syn = true;
        tcp.ack = true;
        // A wrong acknowledgement number, or another flow: ignored.
        tcp.acknowledgment_number = 99;
        paths.answer((from, to), &tcp);
        tcp.acknowledgment_number = 100;
        paths.answer((from, addr("203.0.113.10:81")), &tcp);
        assert!(rx.try_recv().is_err(), "an answer that is not the probe's");
        paths.answer((from, to), &tcp);
        assert_eq!(rx.try_recv(), Ok(Answer::Accepted));
        drop(reg);
        assert!(paths.lock().is_empty(), "the probe's flow was forgotten");

        let (from, mut rx, _reg) = paths.register(IpAddr::from([198, 51, 100, 1]), to, 7);
        let mut rst = TcpHeader::new(80, from.port(), 0, 0);
        rst.rst = true;
        rst.ack = true;
        rst.acknowledgment_number = 8;
        paths.answer((from, to), &rst);
        assert_eq!(rx.try_recv(), Ok(Answer::Refused));
    }
}
