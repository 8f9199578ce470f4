//! Flow sync messages on the wire: a versioned header, fixed-size flow
//! entries, and an HMAC-SHA256 tag over both with the cluster's shared key.
//!
//! ```text
//! header (44 bytes, network order)
//!   magic "XLBS" | version u8 = 1 | kind u8 | count u16
//!   cluster id u32 | node id u64 | boot epoch u64 | sequence u64 | sent (Unix ns) u64
//! entry (64 bytes) × count
//!   op u8 (1 new, 2 end) | family u8 (4, 6) | protocol u8 | real's family u8
//!   client address [16] | VIP address [16] | client port u16 | VIP port u16
//!   real address [16] | event time (Unix ns) u64
//! tag (32 bytes): HMAC-SHA256(key, header ‖ entries)
//! ```
//!
//! A hello (multicast mode: "pull a full copy from me") is a message of kind
//! 4 with one entry whose real address is the sender's TCP pull address and
//! whose ports field holds its port ([`hello`], [`hello_addr`]).
//!
//! IPv4 addresses fill the first 4 of their 16 bytes (a real's family may
//! differ from the flow's: 4in6 tunnels). A datagram carries at
//! most [`MAX_ENTRIES`] entries so that it fits a 1,400-byte payload; a full
//! copy (pull, over TCP) is a stream of such messages, each preceded by its
//! length (u16).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey};
use ring::hmac;

/// First bytes of every message.
pub const MAGIC: [u8; 4] = *b"XLBS";
/// The format this build speaks.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 44;
/// Entry length.
pub const ENTRY_LEN: usize = 64;
/// Tag length.
pub const TAG_LEN: usize = 32;
/// Largest message (a UDP payload that crosses any 1,500-byte path).
pub const MAX_MESSAGE: usize = 1400;
/// Entries in one message.
pub const MAX_ENTRIES: usize = (MAX_MESSAGE - HEADER_LEN - TAG_LEN) / ENTRY_LEN;
/// Shortest shared key accepted (bytes).
pub const MIN_KEY_LEN: usize = 16;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flows confirmed or ended (datagram, or a chunk of a full copy).
    Flows = 1,
    /// A request for a full copy (first message on a pull connection).
    Pull = 2,
    /// The end of a full copy; `sequence` holds the number of entries sent.
    PullDone = 3,
    /// Multicast mode: the sender's TCP pull address, every second.
    Hello = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Flows),
            2 => Some(Self::Pull),
            3 => Some(Self::PullDone),
            4 => Some(Self::Hello),
            _ => None,
        }
    }
}

/// Who sent a message, and which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What it is.
    pub kind: Kind,
    /// The cluster it belongs to.
    pub cluster: u32,
    /// The sending node.
    pub node: u64,
    /// When the sending daemon started (Unix ns): a restart starts its
    /// sequence numbers again.
    pub epoch: u64,
    /// Message number within the epoch.
    pub seq: u64,
    /// When it was sent (Unix ns).
    pub sent_ns: u64,
}

/// A flow entry's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The flow is confirmed on the sender: keep it.
    New = 1,
    /// The client ended it: forget it.
    End = 2,
}

/// One flow as peers learn it: the real by address, since real ids are
/// each node's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// New or ended.
    pub op: Op,
    /// The flow (client, VIP, ports, protocol) as the conntrack table keys it.
    pub flow: FlowKey,
    /// The real the flow is pinned to.
    pub real: IpAddr,
    /// When the sender's data path reported it (Unix ns).
    pub at_ns: u64,
}

/// Why a message was refused. Each maps to a `reason` label of
/// `xlb_sync_dropped_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short, wrong magic, a length that does not add up, an unknown
    /// kind or a bad entry.
    #[error("malformed sync message: {0}")]
    Malformed(String),
    /// Another format version.
    #[error("sync message of version {0}; this xlb speaks version {VERSION}")]
    Version(u8),
    /// Another cluster's message.
    #[error("sync message for cluster {got}; this node is in cluster {ours}")]
    Foreign {
        /// The message's cluster id.
        got: u32,
        /// Ours.
        ours: u32,
    },
    /// The tag does not match: another key, or altered on the way.
    #[error("sync message with a bad authentication tag (another key, or altered)")]
    BadTag,
}

impl WireError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Version(_) => "version",
            Self::Foreign { .. } => "foreign",
            Self::BadTag => "bad_tag",
        }
    }
}

/// The cluster's shared key.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl Key {
    /// A key from the shared secret's bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_KEY_LEN {
            return Err(format!(
                "the sync key has {} bytes; it needs at least {MIN_KEY_LEN} (e.g. `head -c 32 \
                 /dev/urandom | base64`)",
                secret.len()
            ));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Encodes one message.
pub fn encode(key: &Key, header: &Header, entries: &[Entry]) -> Vec<u8> {
    debug_assert!(entries.len() <= MAX_ENTRIES);
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.kind as u8);
    out.extend_from_slice(
        &u16::try_from(entries.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&header.cluster.to_be_bytes());
    out.extend_from_slice(&header.node.to_be_bytes());
    out.extend_from_slice(&header.epoch.to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.sent_ns.to_be_bytes());
    for e in entries {
        out.push(e.op as u8);
        out.push(e.flow.family);
        out.push(e.flow.proto);
        out.push(if e.real.is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        });
        out.extend_from_slice(&e.flow.src);
        out.extend_from_slice(&e.flow.dst);
        out.extend_from_slice(&e.flow.ports.to_be_bytes());
        out.extend_from_slice(&addr16(e.real));
        out.extend_from_slice(&e.at_ns.to_be_bytes());
    }
    let tag = hmac::sign(&key.0, &out);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Decodes and authenticates one message of `cluster`.
pub fn decode(key: &Key, cluster: u32, msg: &[u8]) -> Result<(Header, Vec<Entry>), WireError> {
    let malformed = |why: &str| WireError::Malformed(why.to_owned());
    if msg.len() < HEADER_LEN + TAG_LEN {
        return Err(malformed(&format!(
            "{} bytes, shorter than a header and tag",
            msg.len()
        )));
    }
    if msg[..4] != MAGIC {
        return Err(malformed("no XLBS magic"));
    }
    if msg[4] != VERSION {
        return Err(WireError::Version(msg[4]));
    }
    let count = usize::from(u16::from_be_bytes([msg[6], msg[7]]));
    let want = HEADER_LEN + count * ENTRY_LEN + TAG_LEN;
    if msg.len() != want {
        return Err(malformed(&format!(
            "{} bytes for {count} entries (expected {want})",
            msg.len()
        )));
    }
    let got = be32(&msg[8..12]);
    if got != cluster {
        return Err(WireError::Foreign { got, ours: cluster });
    }
    let (body, tag) = msg.split_at(msg.len() - TAG_LEN);
    hmac::verify(&key.0, body, tag).map_err(|_| WireError::BadTag)?;
    // Authenticated from here: a peer with the key sent it.
    let kind = Kind::from_u8(msg[5]).ok_or_else(|| malformed(&format!("kind {}", msg[5])))?;
    let header = Header {
        kind,
        cluster: got,
        node: be64(&msg[12..20]),
        epoch: be64(&msg[20..28]),
        seq: be64(&msg[28..36]),
        sent_ns: be64(&msg[36..44]),
    };
    let (chunks, _) = body[HEADER_LEN..].as_chunks::<ENTRY_LEN>();
    let entries = chunks
        .iter()
        .enumerate()
        .map(|(i, e)| entry(e).map_err(|why| malformed(&format!("entry {i}: {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((header, entries))
}

fn entry(e: &[u8]) -> Result<Entry, String> {
    let op = match e[0] {
        1 => Op::New,
        2 => Op::End,
        other => return Err(format!("operation {other}")),
    };
    let family = e[1];
    if family != FAMILY_V4 && family != FAMILY_V6 {
        return Err(format!("address family {family}"));
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&e[4..20]);
    dst.copy_from_slice(&e[20..36]);
    let mut real = [0u8; 16];
    real.copy_from_slice(&e[40..56]);
    let real = match e[3] {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(real[0], real[1], real[2], real[3])),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(real)),
        other => return Err(format!("real's address family {other}")),
    };
    Ok(Entry {
        op,
        flow: FlowKey {
            src,
            dst,
            ports: be32(&e[36..40]),
            proto: e[2],
            family,
            _pad: [0; 2],
        },
        real,
        at_ns: be64(&e[56..64]),
    })
}

fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The one entry of a hello: `pull` as the real, its port in the ports.
pub fn hello(pull: SocketAddr) -> Entry {
    let family = if pull.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
    Entry {
        op: Op::New,
        flow: FlowKey {
            src: [0; 16],
            dst: [0; 16],
            ports: u32::from(pull.port()),
            proto: 0,
            family,
            _pad: [0; 2],
        },
        real: pull.ip(),
        at_ns: 0,
    }
}

/// The TCP pull address a hello's entry names.
pub fn hello_addr(e: &Entry) -> SocketAddr {
    SocketAddr::new(e.real, (e.flow.ports & 0xffff) as u16)
}

/// Replay protection for one sender: the newest sequence number of its
/// newest epoch and a 64-message window below it (datagrams may arrive out
/// of order, never twice).
#[derive(Debug, Default, Clone, Copy)]
pub struct Window {
    epoch: u64,
    top: u64,
    seen: u64,
}

impl Window {
    /// Whether `(epoch, seq)` is new; records it when it is.
    pub fn accept(&mut self, epoch: u64, seq: u64) -> bool {
        if epoch < self.epoch {
            return false;
        }
        if epoch > self.epoch {
            *self = Self {
                epoch,
                top: seq,
                seen: 1,
            };
            return true;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift } | 1;
            self.top = seq;
            return true;
        }
        let back = self.top - seq;
        if back >= 64 || self.seen & (1 << back) != 0 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(b"0123456789abcdef-test").unwrap()
    }

    fn header() -> Header {
        Header {
            kind: Kind::Flows,
            cluster: 7,
            node: 42,
            epoch: 1_700_000_000_000_000_000,
            seq: 3,
            sent_ns: 1_700_000_000_500_000_000,
        }
    }

    fn flow(n: u8) -> Entry {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[198, 51, 100, n]);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[192, 0, 2, 1]);
        Entry {
            op: if n.is_multiple_of(2) {
                Op::New
            } else {
                Op::End
            },
            flow: FlowKey {
                src,
                dst,
                ports: (40000 + u32::from(n)) << 16 | 80,
                proto: 6,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
            real: IpAddr::V4(Ipv4Addr::new(203, 0, 113, n)),
            at_ns: 1_700_000_000_400_000_000 + u64::from(n),
        }
    }

    #[test]
    fn a_full_message_round_trips_and_fits_a_datagram() {
        let entries: Vec<Entry> = (0..MAX_ENTRIES as u8).map(flow).collect();
        let msg = encode(&key(), &header(), &entries);
        assert!(msg.len() <= MAX_MESSAGE, "{} bytes", msg.len());
        assert_eq!(MAX_ENTRIES, 20);
        assert_eq!(decode(&key(), 7, &msg), Ok((header(), entries)));
    }

    #[test]
    fn reals_of_either_family_round_trip() {
        let mut e = flow(2);
        e.flow.family = FAMILY_V6;
        e.flow.src = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        e.flow.dst = "2001:db8:1::1".parse::<Ipv6Addr>().unwrap().octets();
        for real in ["2001:db8:2::5", "203.0.113.9", "::ffff:203.0.113.9"] {
            e.real = real.parse().unwrap();
            let msg = encode(&key(), &header(), &[e]);
            let (_, got) = decode(&key(), 7, &msg).unwrap();
            assert_eq!(got[0].real, e.real, "{real}");
        }
    }

    #[test]
    fn a_bad_tag_another_key_or_cluster_is_refused() {
        let msg = encode(&key(), &header(), &[flow(1)]);
        let mut altered = msg.clone();
        altered[HEADER_LEN + 5] ^= 1;
        assert_eq!(decode(&key(), 7, &altered), Err(WireError::BadTag));
        let other = Key::new(b"another key of the same length").unwrap();
        assert_eq!(decode(&other, 7, &msg), Err(WireError::BadTag));
        assert_eq!(
            decode(&key(), 8, &msg),
            Err(WireError::Foreign { got: 7, ours: 8 })
        );
    }

    #[test]
    fn malformed_messages_name_what_is_wrong() {
        let msg = encode(&key(), &header(), &[flow(1)]);
        let err = decode(&key(), 7, &msg[..msg.len() - 1]).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        assert!(err.to_string().contains("for 1 entries"), "{err}");
        assert_eq!(
            decode(&key(), 7, b"short").unwrap_err().reason(),
            "malformed"
        );
        let mut v2 = msg.clone();
        v2[4] = 2;
        assert_eq!(decode(&key(), 7, &v2), Err(WireError::Version(2)));
        // A bad entry under a good tag (a peer's bug) is still refused whole.
        let mut bad = flow(1);
        bad.flow.family = 9;
        let err = decode(&key(), 7, &encode(&key(), &header(), &[flow(2), bad])).unwrap_err();
        assert!(
            err.to_string().contains("entry 1: address family 9"),
            "{err}"
        );
    }

    #[test]
    fn a_hello_carries_the_pull_address() {
        for pull in ["198.51.100.1:9815", "[2001:db8::1]:19815"] {
            let pull: SocketAddr = pull.parse().unwrap();
            let h = Header {
                kind: Kind::Hello,
                ..header()
            };
            let (got, entries) = decode(&key(), 7, &encode(&key(), &h, &[hello(pull)])).unwrap();
            assert_eq!((got.kind, entries.len()), (Kind::Hello, 1));
            assert_eq!(hello_addr(&entries[0]), pull);
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::new(b"short").unwrap_err().contains("at least 16"));
    }

    #[test]
    fn the_window_takes_each_message_once_in_any_order() {
        let mut w = Window::default();
        assert!(w.accept(5, 10));
        assert!(!w.accept(5, 10), "a replay");
        assert!(w.accept(5, 12));
        assert!(w.accept(5, 11), "late but new");
        assert!(!w.accept(5, 11));
        assert!(w.accept(5, 100));
        assert!(!w.accept(5, 12), "too old for the window");
        assert!(!w.accept(4, 1000), "an older epoch");
        assert!(w.accept(6, 1), "a restarted sender");
    }
}
