//! Typed values an operator names: virtual services, real servers, weights.
//!
//! Everything from the CLI, the API or a config file is parsed into these at the
//! edge; code past the edge never re-checks them.

use std::{fmt, net::IpAddr, str::FromStr};

use lb_common::{AddrKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a VIP, protocol or weight given by the operator was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The `/tcp` or `/udp` suffix is missing.
    #[error("invalid VIP '{0}': expected ADDRESS:PORT/PROTOCOL, e.g. 203.0.113.10:80/tcp")]
    VipShape(String),
    /// The protocol is not one xlb balances.
    #[error("invalid protocol '{0}': expected tcp or udp")]
    Protocol(String),
    /// The port is not a number in 1..=65535.
    #[error("invalid VIP '{vip}': port {port} is out of range (1-65535)")]
    Port {
        /// The whole VIP as given.
        vip: String,
        /// The port part as given.
        port: String,
    },
    /// The address part is not an IPv4 or IPv6 address.
    #[error("invalid address '{0}': expected an IPv4 or IPv6 address")]
    Address(String),
    /// An IPv6 address in a VIP must be written in brackets.
    #[error("invalid VIP '{0}': write IPv6 VIPs as [ADDRESS]:PORT/PROTOCOL")]
    V6Brackets(String),
    /// The forwarding mode is unknown.
    #[error("invalid forwarding mode '{0}': expected dr or tun")]
    Forward(String),
    /// The scheduler name is unknown.
    #[error("invalid scheduler '{0}': expected maglev or maglev-src")]
    Scheduler(String),
}

/// The transport protocol of a virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(ParseError::Protocol(s.to_owned())),
        }
    }
}

/// A virtual service: the address, port and protocol clients connect to.
///
/// Written `203.0.113.10:80/tcp` or `[2001:db8::10]:443/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    /// The virtual address.
    pub addr: IpAddr,
    /// The service port, 1..=65535.
    pub port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl Vip {
    /// The key the XDP program looks this service up by.
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr_bytes(self.addr);
        VipKey {
            addr,
            port_be: self.port.to_be(),
            proto: self.proto.number(),
            family,
        }
    }

    /// The key of the VIP-address map for this service's address.
    pub fn addr_key(&self) -> AddrKey {
        let (addr, family) = addr_bytes(self.addr);
        AddrKey {
            addr,
            family,
            _pad: [0; 3],
        }
    }

    /// The form used in API paths: `tcp/203.0.113.10/80`.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.proto, self.addr, self.port)
    }
}

/// An address as the 16 wire bytes the maps use (IPv4 in the first 4) and its family tag.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

impl FromStr for Vip {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| ParseError::VipShape(s.to_owned()))?;
        let proto: Proto = proto.parse()?;
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| ParseError::VipShape(s.to_owned()))?;
        let addr: IpAddr = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| ParseError::VipShape(s.to_owned()))?;
            inner
                .parse()
                .map_err(|_| ParseError::Address(inner.to_owned()))?
        } else if host.contains(':') {
            return Err(ParseError::V6Brackets(s.to_owned()));
        } else {
            host.parse()
                .map_err(|_| ParseError::Address(host.to_owned()))?
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(ParseError::Port {
                    vip: s.to_owned(),
                    port: port.to_owned(),
                });
            }
        };
        Ok(Self { addr, port, proto })
    }
}

impl Serialize for Vip {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Vip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a VIP spreads flows over its reals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Maglev over the 5-tuple hash (default).
    #[default]
    Maglev,
    /// Maglev over the source address only: a client sticks to one real (IPVS `sh`).
    MaglevSrc,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Maglev => "maglev",
            Self::MaglevSrc => "maglev-src",
        })
    }
}

impl FromStr for Scheduler {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "maglev" => Ok(Self::Maglev),
            "maglev-src" => Ok(Self::MaglevSrc),
            _ => Err(ParseError::Scheduler(s.to_owned())),
        }
    }
}

impl Serialize for Scheduler {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scheduler {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a VIP's packets reach its reals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forward {
    /// Direct routing: the frame is re-addressed to the real's MAC; the real must
    /// be on the balancer's L2 segment and of the VIP's family.
    #[default]
    Dr,
    /// Tunnelling: the packet is encapsulated (IPIP, IP6IP6 or IPv4-in-IPv6)
    /// toward the real's address, which may be anywhere routable.
    Tun,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dr => "dr",
            Self::Tun => "tun",
        })
    }
}

impl FromStr for Forward {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dr" => Ok(Self::Dr),
            "tun" => Ok(Self::Tun),
            _ => Err(ParseError::Forward(s.to_owned())),
        }
    }
}

impl Serialize for Forward {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Forward {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a real server's address (`198.51.100.11` or `2001:db8::11`).
pub fn parse_real(s: &str) -> Result<IpAddr, ParseError> {
    s.parse().map_err(|_| ParseError::Address(s.to_owned()))
}

/// Parses a client's address and port for a simulated flow
/// (`198.51.100.7:40000`, `[2001:db8::7]:40000`).
pub fn parse_source(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid source '{s}': expected IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_round_trips_v4_and_v6() {
        for s in ["203.0.113.10:80/tcp", "[2001:db8::10]:53/udp"] {
            let vip: Vip = s.parse().expect("valid VIP");
            assert_eq!(vip.to_string(), s);
        }
    }

    #[test]
    fn vip_port_out_of_range_names_the_port() {
        let err = "203.0.113.10:99999/tcp".parse::<Vip>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid VIP '203.0.113.10:99999/tcp': port 99999 is out of range (1-65535)"
        );
        assert!(matches!(
            "203.0.113.10:0/tcp".parse::<Vip>(),
            Err(ParseError::Port { .. })
        ));
    }

    #[test]
    fn vip_rejects_bad_shapes_with_the_reason() {
        let cases = [
            ("203.0.113.10:80", "expected ADDRESS:PORT/PROTOCOL"),
            ("203.0.113.10:80/sctp", "invalid protocol 'sctp'"),
            ("203.0.113.300:80/tcp", "invalid address '203.0.113.300'"),
            ("2001:db8::1:80/tcp", "write IPv6 VIPs as [ADDRESS]"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Vip>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn vip_key_holds_wire_bytes() {
        let vip: Vip = "203.0.113.10:80/tcp".parse().expect("valid VIP");
        let key = vip.key();
        assert_eq!(&key.addr[..4], &[203, 0, 113, 10]);
        assert_eq!(&key.addr[4..], &[0; 12]);
        assert_eq!(key.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!((key.proto, key.family), (PROTO_TCP, FAMILY_V4));
    }
}
