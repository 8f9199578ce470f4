//! The configuration under test: the services, reals and addresses the
//! balancer and the decapsulator are loaded with, and what the generators and
//! the checker know about them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::Config;
use lb_userspace::chain::Chain;
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions},
    decap::{Decap, DecapSettings},
    desired::{Edit, VipOptions},
    model::{Forward, Scheduler, Vip},
    state::{State, writer::PauseHook},
};
use xlb_tests::packet::LB_MAC;

/// MAC of the router in front of the tunnel reals (their next hop).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0xfe];
/// IPv4 tunnel source prefix (a /24) and IPv6 tunnel source prefix (a /96).
pub const TUN_SRC_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
pub const TUN_SRC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0);
/// The interface MTU the balancer is configured with.
pub const MTU: u32 = 1500;

/// One virtual service and its reals (address, next-hop MAC).
pub struct Service {
    pub vip: Vip,
    pub forward: Forward,
    pub scheduler: Scheduler,
    pub reals: Vec<(IpAddr, [u8; 6])>,
}

/// Everything the generators aim at and the checker compares against.
pub struct World {
    pub services: Vec<Service>,
    /// Addresses that carry at least one service.
    pub vip_addrs: Vec<IpAddr>,
    /// Addresses near the VIPs that carry none.
    pub other_addrs: Vec<IpAddr>,
    /// Client addresses.
    pub clients: Vec<IpAddr>,
    /// The decapsulator's local tunnel endpoints.
    pub decap_addrs: Vec<IpAddr>,
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(net: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host))
}

fn dr_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, i]
}

impl World {
    /// Ten services: IPv4 and IPv6, TCP and UDP, DR and TUN (IPIP, IP6IP6,
    /// 4in6), maglev and maglev-src, and one VIP of each family without reals.
    pub fn new() -> Self {
        let svc = |vip: &str, forward, scheduler, reals: Vec<(IpAddr, [u8; 6])>| Service {
            vip: vip.parse().expect("valid VIP"),
            forward,
            scheduler,
            reals,
        };
        let dr4 = |ds: &[u8]| -> Vec<_> {
            ds.iter()
                .map(|d| (v4(198, 51, 100, *d), dr_mac(*d)))
                .collect()
        };
        let dr6 = |ds: &[u8]| -> Vec<_> {
            ds.iter()
                .map(|d| (v6(0x100, u16::from(*d)), dr_mac(0x80 | *d)))
                .collect()
        };
        let tun = |addrs: &[IpAddr]| -> Vec<_> { addrs.iter().map(|a| (*a, ROUTER_MAC)).collect() };
        use Forward::{Dr, Tun};
        use Scheduler::{Maglev, MaglevSrc};
        let services = vec![
            svc("203.0.113.10:80/tcp", Dr, Maglev, dr4(&[11, 12, 13])),
            svc("203.0.113.10:53/udp", Dr, MaglevSrc, dr4(&[11, 14])),
            svc(
                "[2001:db8:203::10]:80/tcp",
                Dr,
                Maglev,
                dr6(&[0x11, 0x12, 0x13]),
            ),
            svc("[2001:db8:203::10]:53/udp", Dr, MaglevSrc, dr6(&[0x14])),
            svc(
                "203.0.113.11:80/tcp",
                Tun,
                Maglev,
                tun(&[v4(192, 0, 2, 21), v4(192, 0, 2, 22)]),
            ),
            svc(
                "203.0.113.11:53/udp",
                Tun,
                MaglevSrc,
                tun(&[v4(192, 0, 2, 23)]),
            ),
            svc(
                "203.0.113.12:443/tcp",
                Tun,
                Maglev,
                tun(&[v6(0x100, 0x21), v6(0x100, 0x23)]),
            ),
            svc(
                "[2001:db8:203::11]:80/tcp",
                Tun,
                Maglev,
                tun(&[v6(0x100, 0x22)]),
            ),
            svc("203.0.113.20:80/tcp", Dr, Maglev, vec![]),
            svc("[2001:db8:203::20]:53/udp", Dr, Maglev, vec![]),
        ];
        let mut vip_addrs: Vec<IpAddr> = services.iter().map(|s| s.vip.addr).collect();
        vip_addrs.sort();
        vip_addrs.dedup();
        Self {
            services,
            vip_addrs,
            other_addrs: vec![
                v4(203, 0, 113, 99),
                v4(198, 51, 100, 11),
                v4(0, 0, 0, 0),
                v4(255, 255, 255, 255),
                v4(224, 0, 0, 1),
                v6(0x203, 0x99),
                v6(0x100, 0x11),
                "ff02::1".parse().expect("v6"),
                "::".parse().expect("v6"),
            ],
            clients: vec![
                v4(198, 51, 100, 7),
                v4(192, 0, 2, 200),
                v4(203, 0, 113, 10),
                v6(0x7, 7),
                v6(0x7, 0xbeef),
                v6(0x203, 0x10),
            ],
            decap_addrs: vec![v4(192, 0, 2, 21), v6(0x100, 0x21), v6(0x100, 0x22)],
        }
    }

    /// The interface settings.
    pub fn config() -> Config {
        Config {
            iface_mac: LB_MAC,
            sync: 0,
            _pad: 0,
            mtu: MTU,
            new_flow_limit: 0,
            udp_idle_ns: 30_000_000_000,
            tun_src_v4: TUN_SRC_V4.octets(),
            tun_host_v4: 0xff,
            tun_src_v6: TUN_SRC_V6.octets(),
            tun_host_v6: u32::MAX,
            icmp_too_big_limit: lb_common::ICMP_TOO_BIG_LIMIT_DEFAULT,
        }
    }

    /// The service at exactly (address, port, protocol number).
    pub fn service(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.vip.addr == addr && s.vip.port == port && s.vip.proto.number() == proto)
    }

    /// Whether any service listens on (address, protocol number).
    pub fn has_proto(&self, addr: IpAddr, proto: u8) -> bool {
        self.services
            .iter()
            .any(|s| s.vip.addr == addr && s.vip.proto.number() == proto)
    }

    pub fn is_vip_addr(&self, addr: IpAddr) -> bool {
        self.vip_addrs.contains(&addr)
    }

    /// Loads the balancer object and configures it through the daemon's own
    /// `State::edit`, as the BPF_PROG_TEST_RUN fixtures do.
    pub fn load_balancer(&self) -> (Dataplane, State) {
        let mut dp = Dataplane::load_with(&LoadOptions {
            flows: 1 << 16,
            pin: None,
        })
        .unwrap_or_else(|e| panic!("loading the balancer object: {} (needs root)", Chain(&e)));
        dp.set_config(&Self::config())
            .unwrap_or_else(|e| panic!("writing the config map: {}", Chain(&e)));
        let mut state = State::new(0.5);
        for s in &self.services {
            let options = VipOptions {
                scheduler: s.scheduler,
                forward: s.forward,
                // A small prime keeps loading quick; the size does not change the path.
                table_size: 4093,
            };
            let add = Edit::AddVip {
                vip: s.vip,
                options,
                health: None,
            };
            state
                .edit(&mut dp, add, &BTreeMap::new(), PauseHook::default())
                .unwrap_or_else(|e| panic!("adding {}: {}", s.vip, Chain(&e)));
            for (real, mac) in &s.reals {
                let add = Edit::AddReal {
                    vip: s.vip,
                    real: *real,
                    weight: 1,
                };
                state
                    .edit(
                        &mut dp,
                        add,
                        &BTreeMap::from([(*real, *mac)]),
                        PauseHook::default(),
                    )
                    .unwrap_or_else(|e| panic!("adding real {real} to {}: {}", s.vip, Chain(&e)));
            }
        }
        (dp, state)
    }

    /// Loads the decapsulator with this world's local tunnel endpoints,
    /// accepting tunnels from the balancer's tunnel source prefixes only (as
    /// `xlb decap --allow-src` does): a tunnel from elsewhere is dropped.
    pub fn load_decap(&self) -> Decap {
        let srcs = [
            (std::net::IpAddr::V4(TUN_SRC_V4), 24),
            (std::net::IpAddr::V6(TUN_SRC_V6), 96),
        ];
        let settings = DecapSettings::new(&self.decap_addrs, &srcs)
            .unwrap_or_else(|e| panic!("the decap endpoints and sources: {e}"));
        Decap::load(&settings).unwrap_or_else(|e| panic!("loading the decap object: {}", Chain(&e)))
    }
}
