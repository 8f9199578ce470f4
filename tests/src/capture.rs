//! Who really sent a host's frames: an AF_PACKET tap on a host's `eth0`.
//!
//! Direct server return means the replies to a VIP come from the real servers' MACs and
//! never from the balancer's. A [`FrameTap`] on the client counts, while traffic runs,
//! the frames it receives from an address by source MAC, and the frames it sends to that
//! address; the end-to-end tests assert on them and the demo prints them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use etherparse::{EtherType, Ethernet2HeaderSlice, Ipv4HeaderSlice};
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, LinkAddr, SockFlag, SockProtocol, SockType, setsockopt, sockopt,
};
use nix::sys::time::TimeVal;

use crate::netns::Host;

/// `sll_pkttype` of a frame the host itself sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

/// Enough of a frame for the Ethernet header and the longest IPv4 header; a packet
/// socket truncates longer frames to this, which is all the tap reads.
const SNAP_BYTES: usize = 14 + 60;

/// Receive buffer forced onto the socket, so a burst of replies (a 64 KiB body is ~45
/// frames) never outruns the tap's thread.
const RCVBUF_BYTES: usize = 16 << 20;

/// How often the tap's thread looks at its stop flag when no frame arrives.
const POLL: Duration = Duration::from_millis(50);

/// What a [`FrameTap`] counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frames {
    /// IPv4 frames received from the peer address, by Ethernet source MAC.
    pub from_peer: BTreeMap<[u8; 6], u64>,
    /// IPv4 frames sent to the peer address.
    pub to_peer: u64,
}

impl Frames {
    /// All frames received from the peer address, whatever their source MAC.
    pub fn from_peer_total(&self) -> u64 {
        self.from_peer.values().sum()
    }

    /// Frames received from the peer address with source MAC `mac`.
    pub fn from_peer_via(&self, mac: &[u8; 6]) -> u64 {
        self.from_peer.get(mac).copied().unwrap_or(0)
    }
}

/// Counts `host`'s IPv4 frames to and from one peer address until [`FrameTap::finish`].
#[derive(Debug)]
pub struct FrameTap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Frames>>,
}

impl FrameTap {
    /// Opens a packet socket in `host`'s namespace, bound by filter to its `eth0`, and
    /// starts counting at once: every frame after this call returns is seen.
    pub fn start(host: &Host, peer: Ipv4Addr) -> FrameTap {
        let (fd, ifindex) = host.ns.run_in(|| {
            let fd = socket::socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .unwrap_or_else(|e| panic!("AF_PACKET socket: {e} (needs root)"));
            let ifindex = nix::net::if_::if_nametoindex("eth0")
                .unwrap_or_else(|e| panic!("no eth0 in {}: {e}", host.ns.name()));
            (fd, ifindex)
        });
        setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF_BYTES)
            .unwrap_or_else(|e| panic!("SO_RCVBUFFORCE on the tap: {e}"));
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(0, i64::try_from(POLL.as_micros()).expect("short poll")),
        )
        .unwrap_or_else(|e| panic!("SO_RCVTIMEO on the tap: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let ifindex = usize::try_from(ifindex).expect("ifindex fits usize");
            thread::spawn(move || count_frames(&fd, ifindex, peer, &stop))
        };
        FrameTap {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops counting, after taking in what is already queued, and returns the counts.
    pub fn finish(mut self) -> Frames {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Frames {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload)),
            None => Frames::default(),
        }
    }
}

impl Drop for FrameTap {
    fn drop(&mut self) {
        if self.thread.is_some() && !thread::panicking() {
            self.stop_thread();
        } else if let Some(thread) = self.thread.take() {
            // Unwinding already: stop the thread but never raise a second panic.
            self.stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

/// The tap's loop: reads until asked to stop and the socket has gone quiet.
fn count_frames(fd: &OwnedFd, ifindex: usize, peer: Ipv4Addr, stop: &AtomicBool) -> Frames {
    let mut frames = Frames::default();
    let mut buf = [0u8; SNAP_BYTES];
    loop {
        match socket::recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok((len, Some(from))) if from.ifindex() == ifindex => {
                tally(&mut frames, &buf[..len], from.pkttype(), peer);
            }
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EINTR) => {
                // Nothing queued: the last frames before the stop request are in.
                if stop.load(Ordering::Relaxed) {
                    return frames;
                }
            }
            Err(e) => panic!("reading the frame tap: {e}"),
        }
    }
}

/// Counts one (possibly truncated) frame.
fn tally(frames: &mut Frames, frame: &[u8], pkttype: u8, peer: Ipv4Addr) {
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(frame) else {
        return;
    };
    if eth.ether_type() != EtherType::IPV4 {
        return;
    }
    let Ok(ip) = Ipv4HeaderSlice::from_slice(&frame[eth.slice().len()..]) else {
        return;
    };
    if pkttype == PACKET_OUTGOING {
        if ip.destination_addr() == peer {
            frames.to_peer += 1;
        }
    } else if ip.source_addr() == peer {
        *frames.from_peer.entry(eth.source()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const REAL_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x11];
    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    fn udp(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(src_mac, CLIENT_MAC)
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(9000, 40000);
        let mut out = Vec::new();
        b.write(&mut out, b"rs1 hello")
            .expect("building a UDP packet");
        out
    }

    #[test]
    fn frames_from_the_peer_count_by_source_mac_and_sent_ones_apart() {
        let mut frames = Frames::default();
        let from_real = udp(REAL_MAC, VIP, CLIENT);
        tally(&mut frames, &from_real, 0, VIP);
        tally(
            &mut frames,
            &from_real[..SNAP_BYTES.min(from_real.len())],
            0,
            VIP,
        );
        tally(
            &mut frames,
            &udp(CLIENT_MAC, CLIENT, VIP),
            PACKET_OUTGOING,
            VIP,
        );
        tally(&mut frames, &udp(REAL_MAC, CLIENT, CLIENT), 0, VIP);
        tally(&mut frames, &from_real[..20], 0, VIP);
        assert_eq!(frames.from_peer_via(&REAL_MAC), 2);
        assert_eq!(frames.from_peer_total(), 2);
        assert_eq!(frames.to_peer, 1);
    }
}
