//! BPF_PROG_TEST_RUN fixtures: the real XDP objects, maps filled through the
//! daemon's own `State`/`Dataplane`, crafted packets in; verdict, full output
//! bytes (checksums included) and counters checked. Needs root.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6RawExtHeader,
};
use lb_common::{Config, FlowKey, RealDef, decap_stat, flow_hash, prog_names, stat};
use lb_userspace::chain::Chain;
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions},
    decap::{Decap, DecapSettings},
    desired::{Edit, VipOptions},
    model::{Forward, Vip, addr_bytes},
    state::{State, writer::PauseHook},
};
use xlb_tests::packet::{self, CLIENT_MAC, L2, L4, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x7, 0, 0, 0, 0, 7);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0xfe);
const VIP_DR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP_TUN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const VIP_4IN6: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const VIP6_DR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);
const VIP6_TUN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x11);
const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

/// Tunnel source prefixes configured in the fixture: 192.0.2.0/24, 2001:db8:ff::/96.
const TUN_SRC_V4: [u8; 4] = [192, 0, 2, 0];
const TUN_SRC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0);

/// The reals: (VIP, address, MAC of the next hop toward it).
fn reals() -> Vec<(&'static str, IpAddr, [u8; 6])> {
    let v4 = |d: u8| IpAddr::V4(Ipv4Addr::new(198, 51, 100, d));
    let v6 = |d: u8| {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x100,
            0,
            0,
            0,
            0,
            u16::from(d),
        ))
    };
    let mac = |d: u8| [0x02, 0, 0, 0, 1, d];
    let mut out = Vec::new();
    for vip in ["203.0.113.10:80/tcp", "203.0.113.10:53/udp"] {
        for d in [11, 12, 13] {
            out.push((vip, v4(d), mac(d)));
        }
    }
    for vip in ["[2001:db8:203::10]:80/tcp", "[2001:db8:203::10]:53/udp"] {
        for d in [0x11, 0x12, 0x13] {
            out.push((vip, v6(d), mac(d)));
        }
    }
    // Tunnel reals sit behind a router: the next hop MAC is the router's.
    out.push((
        "203.0.113.11:80/tcp",
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21)),
        mac(0xfe),
    ));
    out.push(("203.0.113.12:80/tcp", v6(0x21), mac(0xfe)));
    out.push(("[2001:db8:203::11]:80/tcp", v6(0x22), mac(0xfe)));
    out
}

fn base_config() -> Config {
    Config {
        iface_mac: LB_MAC,
        sync: 0,
        _pad: 0,
        mtu: 1500,
        new_flow_limit: 0,
        udp_idle_ns: 30_000_000_000,
        tun_src_v4: TUN_SRC_V4,
        tun_host_v4: 0xff,
        tun_src_v6: TUN_SRC_V6.octets(),
        tun_host_v6: u32::MAX,
        icmp_too_big_limit: 1000,
    }
}

/// The balancer object loaded, with DR, TUN and 4in6 VIPs configured through
/// the daemon's `State`.
struct Fixture {
    dp: Dataplane,
    state: State,
}

impl Fixture {
    fn new() -> Self {
        Self::with_config(base_config())
    }

    fn with_config(config: Config) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the BPF_PROG_TEST_RUN tests load XDP programs and must run as root"
        );
        let mut dp = Dataplane::load_with(&LoadOptions {
            flows: 4096,
            pin: None,
        })
        .expect("loading the XDP object");
        dp.set_config(&config).expect("writing the config map");
        let mut state = State::new(0.5);
        let vips = [
            ("203.0.113.10:80/tcp", Forward::Dr),
            ("203.0.113.10:53/udp", Forward::Dr),
            ("[2001:db8:203::10]:80/tcp", Forward::Dr),
            ("[2001:db8:203::10]:53/udp", Forward::Dr),
            ("203.0.113.11:80/tcp", Forward::Tun),
            ("203.0.113.12:80/tcp", Forward::Tun),
            ("[2001:db8:203::11]:80/tcp", Forward::Tun),
            ("203.0.113.20:80/tcp", Forward::Dr),
        ];
        for (vip, forward) in vips {
            let options = VipOptions {
                forward,
                ..VipOptions::default()
            };
            let vip = vip.parse().expect("valid VIP");
            let add = Edit::AddVip {
                vip,
                options,
                health: None,
            };
            state
                .edit(&mut dp, add, &BTreeMap::new(), PauseHook::default())
                .expect("adding a VIP");
        }
        for (vip, addr, mac) in reals() {
            let add = Edit::AddReal {
                vip: vip.parse().expect("valid VIP"),
                real: addr,
                weight: 1,
            };
            state
                .edit(
                    &mut dp,
                    add,
                    &BTreeMap::from([(addr, mac)]),
                    PauseHook::default(),
                )
                .expect("adding a real");
        }
        Self { dp, state }
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        run(
            self.dp
                .program(prog_names::BALANCER)
                .expect("balancer program"),
            input,
        )
    }

    /// Packets counted by every verdict and event counter, by index.
    fn counters(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .dp
            .verdicts()
            .expect("reading verdicts")
            .iter()
            .map(|c| c.packets)
            .collect();
        out.extend(
            self.dp
                .events()
                .expect("reading events")
                .iter()
                .map(|(_, n)| *n),
        );
        out
    }

    /// Applies one edit of the desired state, as the daemon's controller does.
    fn edit(&mut self, edit: Edit, macs: &[(IpAddr, [u8; 6])]) {
        let macs: BTreeMap<IpAddr, [u8; 6]> = macs.iter().copied().collect();
        self.state
            .edit(&mut self.dp, edit.clone(), &macs, PauseHook::default())
            .unwrap_or_else(|e| panic!("{edit:?}: {}", Chain(&e)));
    }

    /// Adds a service with the default options and no health check.
    fn add_vip(&mut self, vip: Vip) {
        self.edit(
            Edit::AddVip {
                vip,
                options: VipOptions::default(),
                health: None,
            },
            &[],
        );
    }

    fn vip(&self, vip: &str) -> Vip {
        let _ = self;
        vip.parse().expect("valid VIP")
    }

    /// The real the control plane's live table gives this flow, and its next-hop MAC.
    fn maglev(&self, vip: &str, src: IpAddr, sport: u16) -> (IpAddr, [u8; 6]) {
        let vip = self.vip(vip);
        let real = self
            .state
            .real_for(&self.dp, &vip, hash(src, sport, &vip))
            .expect("reading the ring")
            .expect("VIP has reals");
        let mac = reals()
            .into_iter()
            .find(|(_, a, _)| *a == real)
            .map_or_else(|| mac_of(real), |(_, _, m)| m);
        (real, mac)
    }
}

fn run(prog: &Xdp, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

fn hash(src: IpAddr, sport: u16, vip: &Vip) -> u32 {
    let (s, _) = addr_bytes(src);
    let (d, _) = addr_bytes(vip.addr);
    flow_hash(
        &s,
        &d,
        (u32::from(sport) << 16) | u32::from(vip.port),
        vip.proto.number(),
    )
}

/// The outer source the balancer derives for a flow: the prefix with host bits
/// from the flow hash.
fn tunnel_source(real: IpAddr, h: u32) -> IpAddr {
    match real {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::from_be_bytes(TUN_SRC_V4) | (h & 0xff))),
        IpAddr::V6(_) => {
            let mut b = TUN_SRC_V6.octets();
            b[12..].copy_from_slice(&h.to_be_bytes());
            IpAddr::V6(Ipv6Addr::from(b))
        }
    }
}

/// What a fixture expects.
enum Expect {
    /// XDP_TX with the MACs rewritten toward the Maglev real of (vip, src, sport).
    Dr(&'static str, IpAddr, u16),
    /// XDP_TX encapsulated toward the Maglev real of (vip, src, sport).
    Tun(&'static str, IpAddr, u16),
    /// XDP_TX with exactly these bytes.
    Bytes(Vec<u8>),
    /// This verdict with the packet unchanged.
    Unchanged(u32),
}

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    expect: Expect,
    /// The verdict counter that must grow by exactly one (all others stay).
    stat: u32,
}

fn truncated(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.truncate(len);
    p
}

fn tcp(sport: u16, dport: u16, syn: bool) -> L4<'static> {
    L4::Tcp {
        sport,
        dport,
        syn,
        payload: &[],
    }
}

fn cases() -> Vec<Case> {
    let c4 = IpAddr::V4(CLIENT);
    let c6 = IpAddr::V6(CLIENT6);
    let no_l2 = L2::default();
    let vlan = L2 { vlan: Some(100) };
    let mut bad_ihl = packet::tcp(CLIENT, 40002, VIP_DR, 80, true, &[]);
    bad_ihl[14] = 0x43; // version 4, IHL 3 (12 bytes): impossible
    let mut bad_v6_version = packet::client(c6, VIP6_DR.into(), no_l2, tcp(40000, 80, true));
    bad_v6_version[14] = 0x40; // version 4 in an IPv6 ethertype frame
    let mut truncated_vlan = packet::client(c4, VIP_DR.into(), vlan, tcp(40000, 80, true));
    truncated_vlan.truncate(16);
    let big = [0u8; 1460];
    let big_v4 = packet::tcp(CLIENT, 40008, VIP_TUN, 80, false, &big);
    let big_v6 = packet::client(
        c6,
        VIP6_TUN.into(),
        no_l2,
        L4::Tcp {
            sport: 40008,
            dport: 80,
            syn: false,
            payload: &big,
        },
    );
    let mut other_mac = packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]);
    other_mac[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let mut broadcast = packet::udp(CLIENT, 5353, VIP_DR, 53, b"query");
    broadcast[0..6].copy_from_slice(&[0xff; 6]);
    // A first IPv6 fragment (offset 0, M set). etherparse 0.19 writes the M
    // flag as bit 7 of the header's fourth byte; RFC 8200 has it in bit 0.
    let mut first_frag6 =
        packet::client_v6_with(CLIENT6, VIP6_DR, tcp(40000, 80, true), |_, exts| {
            exts.fragment = Some(Ipv6FragmentHeader::new(
                IpNumber::TCP,
                IpFragOffset::ZERO,
                false,
                7,
            ));
        });
    first_frag6[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&[0x00, 0x01]);
    let mut multicast6 = packet::client(c6, VIP6_DR.into(), no_l2, tcp(40000, 80, true));
    multicast6[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    vec![
        // --- forwarded, DR ---
        Case {
            name: "tcp_syn_to_v4_vip_goes_to_maglev_choice",
            packet: packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]),
            expect: Expect::Dr("203.0.113.10:80/tcp", c4, 40000),
            stat: stat::TX_DR,
        },
        Case {
            name: "tcp_data_to_v4_vip_goes_to_maglev_choice",
            packet: packet::tcp(CLIENT, 40001, VIP_DR, 80, false, b"GET / HTTP/1.1\r\n\r\n"),
            expect: Expect::Dr("203.0.113.10:80/tcp", c4, 40001),
            stat: stat::TX_DR,
        },
        Case {
            name: "udp_to_v4_vip_goes_to_maglev_choice",
            packet: packet::udp(CLIENT, 5353, VIP_DR, 53, b"query"),
            expect: Expect::Dr("203.0.113.10:53/udp", c4, 5353),
            stat: stat::TX_DR,
        },
        Case {
            name: "udp_with_empty_payload_is_forwarded",
            packet: packet::udp(CLIENT, 5354, VIP_DR, 53, &[]),
            expect: Expect::Dr("203.0.113.10:53/udp", c4, 5354),
            stat: stat::TX_DR,
        },
        Case {
            name: "ipv4_options_are_forwarded_with_the_options",
            packet: packet::client_v4_with(CLIENT, VIP_DR, tcp(40003, 80, true), |ip| {
                ip.options = [1u8, 1, 1, 0][..].try_into().expect("valid options");
            }),
            expect: Expect::Dr("203.0.113.10:80/tcp", c4, 40003),
            stat: stat::TX_DR,
        },
        Case {
            name: "vlan_tagged_dr_keeps_its_tag",
            packet: packet::client(c4, VIP_DR.into(), vlan, tcp(40004, 80, true)),
            expect: Expect::Dr("203.0.113.10:80/tcp", c4, 40004),
            stat: stat::TX_DR,
        },
        Case {
            name: "tcp_syn_to_v6_vip_goes_to_maglev_choice",
            packet: packet::client(c6, VIP6_DR.into(), no_l2, tcp(40000, 80, true)),
            expect: Expect::Dr("[2001:db8:203::10]:80/tcp", c6, 40000),
            stat: stat::TX_DR,
        },
        Case {
            name: "udp_to_v6_vip_goes_to_maglev_choice",
            packet: packet::client(
                c6,
                VIP6_DR.into(),
                no_l2,
                L4::Udp {
                    sport: 5353,
                    dport: 53,
                    payload: b"q",
                },
            ),
            expect: Expect::Dr("[2001:db8:203::10]:53/udp", c6, 5353),
            stat: stat::TX_DR,
        },
        Case {
            name: "v6_hop_by_hop_and_dest_options_are_skipped",
            packet: packet::client_v6_with(CLIENT6, VIP6_DR, tcp(40005, 80, true), |_, exts| {
                exts.hop_by_hop_options =
                    Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0; 6]).expect("ext header"));
                exts.destination_options =
                    Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[0; 14]).expect("ext header"));
            }),
            expect: Expect::Dr("[2001:db8:203::10]:80/tcp", c6, 40005),
            stat: stat::TX_DR,
        },
        // --- forwarded, TUN ---
        Case {
            name: "v4_vip_in_tun_mode_is_ipip_encapsulated",
            packet: packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, &[]),
            expect: Expect::Tun("203.0.113.11:80/tcp", c4, 40000),
            stat: stat::TX_TUN,
        },
        Case {
            name: "tun_copies_tos_and_df_to_the_outer_header",
            packet: packet::client_v4_with(CLIENT, VIP_TUN, tcp(40006, 80, false), |ip| {
                ip.dscp = etherparse::IpDscp::try_new(46).expect("EF");
                ip.ecn = etherparse::IpEcn::try_new(1).expect("ECT(1)");
            }),
            expect: Expect::Tun("203.0.113.11:80/tcp", c4, 40006),
            stat: stat::TX_TUN,
        },
        Case {
            name: "v4_vip_with_v6_real_is_4in6_encapsulated",
            packet: packet::tcp(CLIENT, 40000, VIP_4IN6, 80, true, b"hello"),
            expect: Expect::Tun("203.0.113.12:80/tcp", c4, 40000),
            stat: stat::TX_TUN,
        },
        Case {
            name: "v6_vip_in_tun_mode_is_ip6ip6_encapsulated",
            packet: packet::client(c6, VIP6_TUN.into(), no_l2, tcp(40000, 80, true)),
            expect: Expect::Tun("[2001:db8:203::11]:80/tcp", c6, 40000),
            stat: stat::TX_TUN,
        },
        Case {
            name: "vlan_tagged_tun_keeps_its_tag_before_the_outer_header",
            packet: packet::client(c4, VIP_TUN.into(), vlan, tcp(40007, 80, true)),
            expect: Expect::Tun("203.0.113.11:80/tcp", c4, 40007),
            stat: stat::TX_TUN,
        },
        Case {
            name: "tun_packet_over_the_mtu_is_answered_with_frag_needed",
            expect: Expect::Bytes(too_big_reply(&big_v4, 1500 - 20)),
            packet: big_v4,
            stat: stat::TX_ICMP_TOO_BIG_REPLY,
        },
        Case {
            name: "ip6ip6_packet_over_the_mtu_is_answered_with_packet_too_big",
            expect: Expect::Bytes(too_big_reply(&big_v6, 1500 - 40)),
            packet: big_v6,
            stat: stat::TX_ICMP_TOO_BIG_REPLY,
        },
        // --- frames for other stations ---
        Case {
            name: "frame_for_another_mac_passes_untouched",
            packet: other_mac,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_OUR_MAC,
        },
        Case {
            name: "broadcast_frame_to_vip_passes_untouched",
            packet: broadcast,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_OUR_MAC,
        },
        Case {
            name: "multicast_frame_to_v6_vip_passes_untouched",
            packet: multicast6,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_OUR_MAC,
        },
        // --- ICMP ---
        Case {
            name: "icmp_echo_to_vip_is_answered",
            packet: packet::icmp_echo_v4(CLIENT_MAC, LB_MAC, CLIENT, VIP_DR, false),
            expect: Expect::Bytes({
                let mut r = packet::icmp_echo_v4(LB_MAC, CLIENT_MAC, VIP_DR, CLIENT, true);
                // The reply keeps the request's IP id/flags; only TTL is reset.
                r[22] = 64;
                r
            }),
            stat: stat::TX_ICMP_ECHO,
        },
        Case {
            name: "icmpv6_echo_to_vip_is_answered",
            packet: packet::icmp_echo_v6(CLIENT_MAC, LB_MAC, CLIENT6, VIP6_DR, false),
            expect: Expect::Bytes(packet::icmp_echo_v6(
                LB_MAC, CLIENT_MAC, VIP6_DR, CLIENT6, true,
            )),
            stat: stat::TX_ICMP_ECHO,
        },
        Case {
            name: "icmpv6_echo_with_extension_headers_is_answered_without_them",
            packet: icmp6_echo_with_hop_by_hop(),
            expect: Expect::Bytes(packet::icmp_echo_v6(
                LB_MAC, CLIENT_MAC, VIP6_DR, CLIENT6, true,
            )),
            stat: stat::TX_ICMP_ECHO,
        },
        Case {
            name: "icmp_error_quoting_a_later_fragment_is_not_steered",
            packet: packet::icmp_frag_needed_quoting(ROUTER, VIP_DR, &quoted_later_fragment()),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_ICMP,
        },
        Case {
            name: "icmp_frag_needed_goes_to_the_flows_real",
            packet: packet::icmp_frag_needed(ROUTER, VIP_DR, 80, CLIENT, 41000),
            expect: Expect::Dr("203.0.113.10:80/tcp", c4, 41000),
            stat: stat::TX_ICMP_TOO_BIG,
        },
        Case {
            name: "icmpv6_packet_too_big_goes_to_the_flows_real",
            packet: packet::icmp6_too_big(ROUTER6, VIP6_DR, 80, CLIENT6, 41000),
            expect: Expect::Dr("[2001:db8:203::10]:80/tcp", c6, 41000),
            stat: stat::TX_ICMP_TOO_BIG,
        },
        Case {
            name: "icmp_frag_needed_in_tun_mode_is_encapsulated",
            packet: packet::icmp_frag_needed(ROUTER, VIP_TUN, 80, CLIENT, 41001),
            expect: Expect::Tun("203.0.113.11:80/tcp", c4, 41001),
            stat: stat::TX_ICMP_TOO_BIG,
        },
        Case {
            name: "other_icmp_to_vip_passes_to_the_kernel",
            packet: packet::icmp_port_unreachable(ROUTER, VIP_DR, CLIENT),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_ICMP,
        },
        Case {
            name: "icmp_echo_to_other_address_passes_untouched",
            packet: packet::icmp_echo_v4(CLIENT_MAC, LB_MAC, CLIENT, OTHER, false),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "truncated_icmp_to_vip_is_dropped",
            packet: truncated(
                packet::icmp_echo_v4(CLIENT_MAC, LB_MAC, CLIENT, VIP_DR, false),
                14 + 20 + 2,
            ),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        // --- not ours: passed untouched ---
        Case {
            name: "unknown_address_passes_untouched",
            packet: packet::tcp(CLIENT, 40000, OTHER, 80, true, &[]),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "vip_address_on_another_port_passes_untouched",
            packet: packet::tcp(CLIENT, 40000, VIP_DR, 443, true, &[]),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "vip_port_with_other_protocol_passes_untouched",
            packet: packet::udp(CLIENT, 40000, VIP_DR, 80, b"x"),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "unknown_v6_address_passes_untouched",
            packet: packet::client(
                c6,
                "2001:db8:203::99".parse().expect("v6"),
                no_l2,
                tcp(1, 80, true),
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "arp_passes_untouched",
            packet: packet::arp_request(CLIENT, VIP_DR),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_IP,
        },
        // --- malformed: passed (not attributable) or dropped (ours) ---
        Case {
            name: "truncated_ipv4_header_passes_untouched",
            packet: truncated(packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]), 14 + 12),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "bad_ihl_passes_untouched",
            packet: bad_ihl,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "truncated_ipv6_header_passes_untouched",
            packet: truncated(
                packet::client(c6, VIP6_DR.into(), no_l2, tcp(1, 80, true)),
                14 + 30,
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "wrong_ip_version_passes_untouched",
            packet: bad_v6_version,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "truncated_vlan_tag_passes_untouched",
            packet: truncated_vlan,
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "truncated_tcp_header_to_vip_is_dropped",
            packet: truncated(
                packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]),
                14 + 20 + 12,
            ),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        Case {
            name: "truncated_udp_header_to_vip_is_dropped",
            packet: truncated(packet::udp(CLIENT, 5353, VIP_DR, 53, &[]), 14 + 20 + 4),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        Case {
            name: "truncated_tcp_to_a_vip_address_but_no_service_passes",
            packet: truncated(
                packet::tcp(CLIENT, 40000, VIP_DR, 22, true, &[]),
                14 + 20 + 12,
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "tcp_cut_inside_its_ports_passes_untouched",
            packet: truncated(
                packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]),
                14 + 20 + 3,
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_MALFORMED,
        },
        Case {
            name: "truncated_tcp_to_v6_vip_is_dropped",
            packet: truncated(
                packet::client(c6, VIP6_DR.into(), no_l2, tcp(1, 80, true)),
                14 + 40 + 10,
            ),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        // --- fragments ---
        Case {
            name: "first_ipv4_fragment_to_vip_is_dropped",
            packet: packet::client_v4_with(CLIENT, VIP_DR, tcp(40000, 80, true), |ip| {
                ip.more_fragments = true;
            }),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_FRAGMENT,
        },
        Case {
            name: "later_ipv4_fragment_to_vip_address_passes_to_the_kernel",
            packet: packet::client_v4_with(CLIENT, VIP_DR, tcp(40000, 80, true), |ip| {
                ip.fragment_offset = IpFragOffset::try_new(100).expect("offset");
            }),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_FRAGMENT,
        },
        Case {
            name: "first_udp_fragment_to_a_vip_address_but_no_service_passes",
            packet: packet::client_v4_with(
                CLIENT,
                VIP_TUN,
                L4::Udp {
                    sport: 53,
                    dport: 33000,
                    payload: b"a long DNS answer",
                },
                |ip| ip.more_fragments = true,
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "later_ipv6_fragment_to_vip_address_passes_to_the_kernel",
            packet: packet::client_v6_with(CLIENT6, VIP6_DR, tcp(40000, 80, true), |_, exts| {
                exts.fragment = Some(Ipv6FragmentHeader::new(
                    IpNumber::TCP,
                    IpFragOffset::try_new(100).expect("offset"),
                    false,
                    7,
                ));
            }),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_FRAGMENT,
        },
        Case {
            name: "first_ipv6_fragment_to_vip_is_dropped",
            packet: first_frag6,
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_FRAGMENT,
        },
        Case {
            name: "fragment_to_other_address_passes_untouched",
            packet: packet::client_v4_with(CLIENT, OTHER, tcp(40000, 80, true), |ip| {
                ip.more_fragments = true;
            }),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        // --- no real ---
        Case {
            name: "vip_without_reals_drops_and_counts",
            packet: packet::tcp(CLIENT, 40000, VIP_EMPTY, 80, true, &[]),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_NO_REAL,
        },
    ]
}

/// The ICMP error the balancer answers an over-MTU client packet (`frame`)
/// with: from the VIP to the client, announcing `mtu`, quoting as much of the
/// packet as RFC 1812 (IPv4, 576 bytes in all) or RFC 4443 (1280) allow,
/// rounded down to 4 bytes.
fn too_big_reply(frame: &[u8], mtu: u16) -> Vec<u8> {
    let ip = &frame[14..];
    let eth = etherparse::PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC);
    let mut out = Vec::new();
    if ip[0] >> 4 == 4 {
        let src: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
        let dst: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
        let mut h = Ipv4Header::new(0, 64, IpNumber::ICMP, dst, src).expect("header");
        h.dont_fragment = false;
        let quote = &ip[..(576 - 28).min(ip.len()) & !3];
        eth.ip(IpHeaders::Ipv4(h, Default::default()))
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu,
                },
            ))
            .write(&mut out, quote)
            .expect("building the reply");
    } else {
        let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
        let h = packet::ipv6_header(dst.into(), src.into(), IpNumber::IPV6_ICMP);
        let quote = &ip[..(1280 - 48).min(ip.len()) & !3];
        eth.ip(IpHeaders::Ipv6(h, Default::default()))
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig {
                mtu: u32::from(mtu),
            })
            .write(&mut out, quote)
            .expect("building the reply");
    }
    out
}

/// An ICMPv6 echo request to the v6 VIP carrying a hop-by-hop options header.
fn icmp6_echo_with_hop_by_hop() -> Vec<u8> {
    let exts = etherparse::Ipv6Extensions {
        hop_by_hop_options: Some(
            Ipv6RawExtHeader::new_raw(IpNumber::IPV6_ICMP, &[0; 6]).expect("ext header"),
        ),
        ..Default::default()
    };
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv6(
            packet::ipv6_header(CLIENT6, VIP6_DR, IpNumber::IPV6_ICMP),
            exts,
        ))
        .icmpv6_echo_request(0x1234, 7);
    let mut out = Vec::new();
    b.write(&mut out, b"xlb-ping")
        .expect("building the request");
    out
}

/// What an ICMP error quotes of a later fragment of the real's reply: the IP
/// header (offset 100), then payload bytes that would read as ports 80 → 40000.
fn quoted_later_fragment() -> Vec<u8> {
    let mut h =
        Ipv4Header::new(8, 64, IpNumber::TCP, VIP_DR.octets(), CLIENT.octets()).expect("header");
    h.fragment_offset = IpFragOffset::try_new(100).expect("offset");
    h.header_checksum = h.calc_header_checksum();
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(&[0, 80, 0x9c, 0x40, 0, 0, 0, 1]);
    out
}

#[test]
fn fixture_table_verdicts_bytes_and_counters() {
    let fx = Fixture::new();
    let mut failures = Vec::new();
    for case in cases() {
        let before = fx.counters();
        let (verdict, out) = fx.run(&case.packet);
        let after = fx.counters();
        let l3 = packet::l3_offset(&case.packet);
        let (want_verdict, want_out) = match case.expect {
            Expect::Dr(vip, src, sport) => {
                let (_, mac) = fx.maglev(vip, src, sport);
                let mut want = case.packet.clone();
                want[0..6].copy_from_slice(&mac);
                want[6..12].copy_from_slice(&LB_MAC);
                (XDP_TX, want)
            }
            Expect::Tun(vip, src, sport) => {
                let (real, mac) = fx.maglev(vip, src, sport);
                let h = hash(src, sport, &fx.vip(vip));
                let l2 = L2 {
                    vlan: (l3 == 18).then_some(100),
                };
                let want =
                    packet::tunnel(tunnel_source(real, h), real, l2, mac, h, &case.packet[l3..]);
                (XDP_TX, want)
            }
            Expect::Bytes(b) => (XDP_TX, b),
            Expect::Unchanged(v) => (v, case.packet.clone()),
        };
        if verdict != want_verdict {
            let counted: Vec<&str> = (0..stat::VERDICTS as usize)
                .filter(|&i| after[i] > before[i])
                .map(|i| stat::VERDICT_NAMES[i])
                .collect();
            failures.push(format!(
                "{}: verdict {verdict} ({counted:?}), want {want_verdict}",
                case.name
            ));
            continue;
        }
        if out != want_out {
            failures.push(format!(
                "{}: output bytes differ\n  got  {:02x?}\n  want {:02x?}",
                case.name, out, want_out
            ));
        }
        for i in 0..stat::VERDICTS as usize {
            let want = before[i] + u64::from(i as u32 == case.stat);
            if after[i] != want {
                failures.push(format!(
                    "{}: counter {} is {}, want {}",
                    case.name,
                    stat::VERDICT_NAMES[i],
                    after[i],
                    want
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fixture failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn flows_spread_over_every_real_and_stick() {
    let fx = Fixture::new();
    let mut seen: HashMap<[u8; 6], u32> = HashMap::new();
    for sport in 10000..10300u16 {
        let p = packet::tcp(CLIENT, sport, VIP_DR, 80, true, &[]);
        let (v1, o1) = fx.run(&p);
        let (v2, o2) = fx.run(&packet::tcp(CLIENT, sport, VIP_DR, 80, false, b"x"));
        assert_eq!((v1, v2), (XDP_TX, XDP_TX), "port {sport}");
        assert_eq!(
            o1[0..6],
            o2[0..6],
            "same 5-tuple, different real (port {sport})"
        );
        let mac: [u8; 6] = o1[0..6].try_into().expect("6 bytes");
        *seen.entry(mac).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "300 flows reached {} of 3 reals: {seen:?}",
        seen.len()
    );
    for (mac, n) in &seen {
        assert!(*n >= 60, "real {mac:02x?} got only {n} of 300 flows");
    }
    let applied = &fx.state.model().services[&fx.vip("203.0.113.10:80/tcp")];
    let counter = fx.dp.vip_counter(applied.id).expect("VIP counter");
    assert_eq!(counter.packets, 600, "per-VIP packet counter");
    assert_eq!(counter.flows, 300, "per-VIP new-flow counter");
    let real_packets: u64 = applied
        .slots
        .values()
        .map(|id| fx.dp.real_counter(*id).expect("real counter").packets)
        .sum();
    assert_eq!(real_packets, 600);
}

/// The MAC the fixtures give a DR real: its last address byte.
fn mac_of(addr: IpAddr) -> [u8; 6] {
    match addr {
        IpAddr::V4(a) => [0x02, 0, 0, 0, 1, a.octets()[3]],
        IpAddr::V6(a) => [0x02, 0, 0, 0, 1, a.octets()[15]],
    }
}

/// A source port whose Maglev choice for 203.0.113.10:80/tcp differs between
/// two table states, found by trying ports; `before` is the current choice.
fn port_that_moves(fx: &Fixture, before: &HashMap<u16, IpAddr>) -> u16 {
    (30000..31000u16)
        .find(|p| fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), *p).0 != before[p])
        .expect("some flow moves when the real set changes")
}

fn choices(fx: &Fixture) -> HashMap<u16, IpAddr> {
    (30000..31000u16)
        .map(|p| (p, fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), p).0))
        .collect()
}

#[test]
fn established_flow_keeps_its_real_when_a_real_is_added() {
    let mut fx = Fixture::new();
    let before = choices(&fx);
    // Track all candidate flows (their SYNs) before the change.
    for p in 30000..31000u16 {
        assert_eq!(
            fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, true, &[])).0,
            XDP_TX
        );
    }
    let vip = fx.vip("203.0.113.10:80/tcp");
    let new_real: IpAddr = Ipv4Addr::new(198, 51, 100, 14).into();
    fx.edit(
        Edit::AddReal {
            vip,
            real: new_real,
            weight: 1,
        },
        &[(new_real, mac_of(new_real))],
    );
    let port = port_that_moves(&fx, &before);
    let hits = fx.dp.events().expect("events")[0].1;
    // A data segment of the established flow stays on its original real.
    let (v, out) = fx.run(&packet::tcp(CLIENT, port, VIP_DR, 80, false, b"more"));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out[0..6],
        mac_of(before[&port]),
        "established flow moved to the new table's real"
    );
    assert_eq!(
        fx.dp.events().expect("events")[0].1,
        hits + 1,
        "conntrack_hit counted"
    );
    // A new SYN on the same 5-tuple takes the new Maglev choice and re-pins the flow.
    let (_, out) = fx.run(&packet::tcp(CLIENT, port, VIP_DR, 80, true, &[]));
    let now = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), port).0;
    assert_eq!(out[0..6], mac_of(now), "SYN did not re-hash");
    let key = flow_key(CLIENT.into(), port, &vip);
    let entry = fx
        .dp
        .flow(&key)
        .expect("reading conntrack")
        .expect("flow tracked");
    assert_eq!(fx.state.model().real_by_id(entry.real_id), Some(now));
}

fn flow_key(src: IpAddr, sport: u16, vip: &Vip) -> FlowKey {
    let (s, family) = addr_bytes(src);
    let (d, _) = addr_bytes(vip.addr);
    FlowKey {
        src: s,
        dst: d,
        ports: (u32::from(sport) << 16) | u32::from(vip.port),
        proto: vip.proto.number(),
        family,
        _pad: [0; 2],
    }
}

#[test]
fn drained_real_keeps_tracked_flows_and_gets_no_new_ones() {
    let mut fx = Fixture::new();
    let drained: IpAddr = Ipv4Addr::new(198, 51, 100, 12).into();
    let tracked: Vec<u16> = (32000..32300u16)
        .filter(|p| fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), *p).0 == drained)
        .collect();
    assert!(!tracked.is_empty());
    for p in &tracked {
        fx.run(&packet::tcp(CLIENT, *p, VIP_DR, 80, true, &[]));
    }
    let vip = fx.vip("203.0.113.10:80/tcp");
    fx.edit(
        Edit::SetReal {
            vip,
            real: drained,
            weight: Some(0),
            admin: None,
        },
        &[],
    );
    for p in &tracked {
        let (_, out) = fx.run(&packet::tcp(CLIENT, *p, VIP_DR, 80, false, b"x"));
        assert_eq!(
            out[0..6],
            mac_of(drained),
            "tracked flow left the drained real"
        );
    }
    for p in 33000..33300u16 {
        let (_, out) = fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, true, &[]));
        assert_ne!(
            out[0..6],
            mac_of(drained),
            "new flow sent to a drained real"
        );
    }
}

#[test]
fn removed_real_flows_are_rehashed_to_the_others() {
    let mut fx = Fixture::new();
    let gone: IpAddr = Ipv4Addr::new(198, 51, 100, 11).into();
    let ports: Vec<u16> = (34000..34300u16)
        .filter(|p| fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), *p).0 == gone)
        .collect();
    for p in &ports {
        fx.run(&packet::tcp(CLIENT, *p, VIP_DR, 80, true, &[]));
    }
    let vip = fx.vip("203.0.113.10:80/tcp");
    // The real also serves the UDP VIP; remove it from both so its slot is cleared.
    let udp = fx.vip("203.0.113.10:53/udp");
    fx.edit(Edit::DelReal { vip, real: gone }, &[]);
    fx.edit(
        Edit::DelReal {
            vip: udp,
            real: gone,
        },
        &[],
    );
    let stale_before = fx.dp.events().expect("events")[4].1;
    for p in &ports {
        let (v, out) = fx.run(&packet::tcp(CLIENT, *p, VIP_DR, 80, false, b"x"));
        assert_eq!(v, XDP_TX);
        assert_ne!(out[0..6], mac_of(gone), "flow still sent to a removed real");
    }
    let stale_after = fx.dp.events().expect("events")[4].1;
    assert_eq!(
        stale_after - stale_before,
        ports.len() as u64,
        "conntrack_stale count"
    );
}

#[test]
fn udp_flow_is_forgotten_after_its_idle_timeout() {
    let fx_config = Config {
        udp_idle_ns: 200_000_000,
        ..base_config()
    };
    let mut fx = Fixture::with_config(fx_config);
    let udp_choices = |fx: &Fixture| -> HashMap<u16, IpAddr> {
        (35000..35500u16)
            .map(|p| (p, fx.maglev("203.0.113.10:53/udp", CLIENT.into(), p).0))
            .collect()
    };
    let before = udp_choices(&fx);
    for p in 35000..35500u16 {
        fx.run(&packet::udp(CLIENT, p, VIP_DR, 53, b"a"));
    }
    let vip = fx.vip("203.0.113.10:53/udp");
    let new_real: IpAddr = Ipv4Addr::new(198, 51, 100, 14).into();
    fx.edit(
        Edit::AddReal {
            vip,
            real: new_real,
            weight: 1,
        },
        &[(new_real, mac_of(new_real))],
    );
    let after = udp_choices(&fx);
    let port = (35000..35500u16)
        .find(|p| before[p] != after[p])
        .expect("some UDP flow moves");
    let (_, out) = fx.run(&packet::udp(CLIENT, port, VIP_DR, 53, b"b"));
    assert_eq!(out[0..6], mac_of(before[&port]), "active UDP flow moved");
    std::thread::sleep(Duration::from_millis(400));
    let (_, out) = fx.run(&packet::udp(CLIENT, port, VIP_DR, 53, b"c"));
    assert_eq!(
        out[0..6],
        mac_of(after[&port]),
        "idle UDP flow was not re-hashed"
    );
}

#[test]
fn flood_guard_stops_tracking_above_the_limit_but_keeps_forwarding() {
    let fx = Fixture::with_config(Config {
        new_flow_limit: 5,
        ..base_config()
    });
    let events = |fx: &Fixture| fx.dp.events().expect("events");
    let before = events(&fx);
    for p in 36000..36020u16 {
        let (v, out) = fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, true, &[]));
        assert_eq!(v, XDP_TX, "flood-guarded SYN not forwarded");
        let (_, mac) = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), p);
        assert_eq!(
            out[0..6],
            mac,
            "flood-guarded flow not sent to its Maglev real"
        );
    }
    let after = events(&fx);
    let delta = |name: &str| {
        let i = after
            .iter()
            .position(|(n, _)| *n == name)
            .expect("event exists");
        after[i].1 - before[i].1
    };
    assert_eq!(delta("conntrack_new"), 5);
    assert_eq!(delta("flood_guard_bypass"), 15);
}

// --- the real-server decapsulator ---

/// The decapsulator for 192.0.2.21, 2001:db8:100::21 and 2001:db8:100::22,
/// accepting tunnels from `srcs` (every source when empty).
fn decap_from(srcs: &[(IpAddr, u8)]) -> Decap {
    assert!(nix::unistd::Uid::effective().is_root(), "must run as root");
    let addrs: Vec<IpAddr> = ["192.0.2.21", "2001:db8:100::21", "2001:db8:100::22"]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    let settings = DecapSettings::new(&addrs, srcs).expect("endpoints and sources");
    Decap::load(&settings).expect("loading the decap object")
}

fn decap() -> Decap {
    decap_from(&[])
}

#[test]
fn decap_strips_ipip_ip6ip6_and_4in6_for_local_addresses() {
    let d = decap();
    let prog = d.program().expect("decap program");
    let real4: IpAddr = "192.0.2.21".parse().expect("v4");
    let real6: IpAddr = "2001:db8:100::21".parse().expect("v6");
    let tun_src: IpAddr = "192.0.2.200".parse().expect("v4");
    let tun_src6: IpAddr = "2001:db8:ff::9".parse().expect("v6");
    let mac = [0x02, 0, 0, 0, 2, 0x21];
    let inner4 = packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, b"x");
    let inner6 = packet::client(
        CLIENT6.into(),
        VIP6_TUN.into(),
        L2::default(),
        tcp(40000, 80, true),
    );
    let vlan = L2 { vlan: Some(7) };
    let inner4_vlan = packet::client(CLIENT.into(), VIP_TUN.into(), vlan, tcp(40001, 80, true));
    // (name, tunnel frame, the inner frame it carries if decapsulated, counter)
    type DecapCase = (&'static str, Vec<u8>, Option<Vec<u8>>, u32);
    let cases: Vec<DecapCase> = vec![
        (
            "ipip_to_local_address",
            packet::tunnel(tun_src, real4, L2::default(), mac, 0, &inner4[14..]),
            Some(inner4.clone()),
            decap_stat::DECAP_IPIP,
        ),
        (
            "ip6ip6_to_local_address",
            packet::tunnel(tun_src6, real6, L2::default(), mac, 5, &inner6[14..]),
            Some(inner6.clone()),
            decap_stat::DECAP_IP6IP6,
        ),
        (
            "4in6_to_local_address",
            packet::tunnel(tun_src6, real6, L2::default(), mac, 5, &inner4[14..]),
            Some(inner4.clone()),
            decap_stat::DECAP_4IN6,
        ),
        (
            "vlan_tagged_ipip_keeps_its_tag",
            packet::tunnel(tun_src, real4, vlan, mac, 0, &inner4_vlan[18..]),
            Some(inner4_vlan.clone()),
            decap_stat::DECAP_IPIP,
        ),
        (
            "ipip_to_another_address_passes_untouched",
            packet::tunnel(
                tun_src,
                "192.0.2.99".parse().expect("v4"),
                L2::default(),
                mac,
                0,
                &inner4[14..],
            ),
            None,
            decap_stat::PASS_NOT_LOCAL,
        ),
        (
            "plain_tcp_passes_untouched",
            inner4.clone(),
            None,
            decap_stat::PASS_NOT_TUNNEL,
        ),
        (
            "ipip_with_cut_inner_header_passes_untouched",
            truncated(
                packet::tunnel(tun_src, real4, L2::default(), mac, 0, &inner4[14..]),
                14 + 20 + 10,
            ),
            None,
            decap_stat::PASS_MALFORMED,
        ),
    ];
    let mut failures = Vec::new();
    for (name, input, inner, stat) in cases {
        let before = d.counters().expect("counters");
        let (v, out) = run(prog, &input);
        let after = d.counters().expect("counters");
        if v != XDP_PASS {
            failures.push(format!("{name}: verdict {v}, want XDP_PASS"));
            continue;
        }
        // Decapsulated: the inner packet behind the tunnel frame's Ethernet header.
        let want = match inner {
            Some(inner) => {
                let l3 = packet::l3_offset(&input);
                let mut w = input[..l3].to_vec();
                let ethertype = if inner[packet::l3_offset(&inner)] >> 4 == 4 {
                    [0x08, 0x00]
                } else {
                    [0x86, 0xdd]
                };
                let n = w.len();
                w[n - 2..].copy_from_slice(&ethertype);
                w.extend_from_slice(&inner[packet::l3_offset(&inner)..]);
                w
            }
            None => input.clone(),
        };
        if out != want {
            failures.push(format!(
                "{name}: bytes differ\n  got  {out:02x?}\n  want {want:02x?}"
            ));
        }
        for (i, ((_, b), (_, a))) in before.iter().zip(&after).enumerate() {
            let want = b.packets + u64::from(i as u32 == stat);
            if a.packets != want {
                failures.push(format!(
                    "{name}: counter {} is {}, want {want}",
                    decap_stat::NAMES[i],
                    a.packets
                ));
            }
        }
    }
    // QinQ (an 802.1ad tag before the 802.1Q one): the Ethernet header and
    // both tags move to just before the inner header, where they overlap the
    // outer header they replace (22 bytes of L2 over a 20-byte IPv4 header).
    let qinq = |frame: &[u8]| {
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&[0x88, 0xa8, 0x00, 0x2a]);
        f.extend_from_slice(&frame[12..]);
        f
    };
    let inner6_vlan = packet::client(CLIENT6.into(), VIP6_TUN.into(), vlan, tcp(40002, 80, true));
    for (name, src, dst, class, inner) in [
        ("qinq_ipip", tun_src, real4, 0, &inner4_vlan),
        ("qinq_ip6ip6", tun_src6, real6, 5, &inner6_vlan),
        ("qinq_4in6", tun_src6, real6, 5, &inner4_vlan),
    ] {
        let input = qinq(&packet::tunnel(src, dst, vlan, mac, class, &inner[18..]));
        // The tunnel frame's addresses and tags, the inner packet's ethertype.
        let mut want = input[..20].to_vec();
        want.extend_from_slice(&inner[16..]);
        let (v, out) = run(prog, &input);
        if v != XDP_PASS || out != want {
            failures.push(format!(
                "{name}: verdict {v}\n  got  {out:02x?}\n  want {want:02x?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "decap failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn balancer_tunnel_output_decapsulates_to_the_original_packet() {
    let fx = Fixture::new();
    let d = decap();
    for (input, vip) in [
        (
            packet::tcp(CLIENT, 40000, VIP_4IN6, 80, true, b"hi"),
            "4in6",
        ),
        (
            packet::client(
                CLIENT6.into(),
                VIP6_TUN.into(),
                L2::default(),
                tcp(40000, 80, true),
            ),
            "ip6ip6",
        ),
    ] {
        let (v, tunnelled) = fx.run(&input);
        assert_eq!(v, XDP_TX, "{vip}");
        let (v, out) = run(d.program().expect("decap"), &tunnelled);
        assert_eq!(v, XDP_PASS, "{vip}");
        assert_eq!(
            out[14..],
            input[14..],
            "{vip}: inner packet changed on the way"
        );
    }
}

// --- hardening (issue 10) ---

/// Runs the rest of the test on CPU 0: per-CPU state (rate windows, per-CPU
/// lists) must see every packet of the test.
fn on_cpu0() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning to cpu 0");
}

fn event(fx: &Fixture, name: &str) -> u64 {
    fx.dp
        .events()
        .expect("events")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .expect("event exists")
}

fn verdict(fx: &Fixture, stat: u32) -> u64 {
    fx.counters()[stat as usize]
}

#[test]
fn conntrack_holds_its_configured_size_from_one_cpu() {
    on_cpu0();
    let fx = Fixture::new();
    assert_eq!(fx.dp.flow_capacity(), 4096, "capacity as loaded");
    // Every flow arrives on one CPU (one receive queue): the table must still
    // hold (nearly) all of them, not 1/possible-CPUs of them.
    for i in 0..4096u32 {
        let src = Ipv4Addr::from(u32::from(CLIENT) + (i >> 12));
        let sport = 10000 + (i & 0xfff) as u16;
        let (v, _) = fx.run(&packet::tcp(src, sport, VIP_DR, 80, true, &[]));
        assert_eq!(v, XDP_TX);
    }
    let held = fx.dp.flow_count();
    assert!(
        held >= 4096 * 9 / 10,
        "the 4096-entry table holds only {held} flows inserted from one CPU"
    );
}

/// A bucket holds four flows. When a fifth arrives, the bucket evicts a flow
/// that was never answered (a lone SYN) before any answered one, whatever
/// their age, and among answered flows the least recently seen.
#[test]
fn a_full_conntrack_bucket_evicts_unanswered_flows_first() {
    on_cpu0();
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:80/tcp");
    // Six client ports whose flows share one bucket (the table's seed is
    // random: the first bucket that six ports fall into).
    let mut by_bucket: std::collections::HashMap<usize, Vec<u16>> = Default::default();
    let ports = (41000..u16::MAX)
        .find_map(|p| {
            let bucket = fx.dp.flows().bucket_of(&flow_key(CLIENT.into(), p, &vip));
            let ports = by_bucket.entry(bucket).or_default();
            ports.push(p);
            (ports.len() == 6).then(|| ports.clone())
        })
        .expect("six flows of one bucket");
    let tracked = |p: u16| {
        fx.dp
            .flow(&flow_key(CLIENT.into(), p, &vip))
            .expect("conntrack")
            .is_some()
    };
    let syn = |p: u16| fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, true, &[])).0;
    let ack = |p: u16| fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, false, b"x")).0;
    // Three answered flows, the oldest first, then a lone SYN (the newest).
    for &p in &ports[..3] {
        assert_eq!(syn(p), XDP_TX);
        assert_eq!(ack(p), XDP_TX);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(syn(ports[3]), XDP_TX);
    // A fifth flow takes the lone SYN's way, not the oldest answered flow's.
    let new = event(&fx, "conntrack_new");
    assert_eq!(syn(ports[4]), XDP_TX);
    assert_eq!(
        event(&fx, "conntrack_new"),
        new + 1,
        "the fifth flow is tracked"
    );
    assert!(!tracked(ports[3]), "the unanswered flow stayed");
    assert!(
        ports[..3].iter().all(|&p| tracked(p)) && tracked(ports[4]),
        "an answered flow was evicted for a new one"
    );
    // Once every flow of the bucket was answered, the least recently seen
    // one goes.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(ack(ports[4]), XDP_TX);
    assert_eq!(syn(ports[5]), XDP_TX);
    assert!(!tracked(ports[0]), "the least recently seen flow stayed");
    assert!(
        ports[1..3].iter().all(|&p| tracked(p)) && tracked(ports[4]) && tracked(ports[5]),
        "a more recently seen flow was evicted"
    );
}

/// The real of `key` as the table lists it with its key (what flow sync's
/// full copy to a peer sends), if it does.
fn listed(fx: &Fixture, key: &lb_common::FlowKey) -> Option<u32> {
    let mut found = None;
    fx.dp.flows().for_each(|k, state| {
        if k == key {
            found = Some(state.real_id);
        }
    });
    found
}

/// A flow's key is recorded at its first answer: a lone SYN is tracked
/// (counted, pinned) but has no key to list, so a flood's SYNs write one
/// cache line each and a full copy to a peer carries confirmed flows only,
/// as flow sync's reports do. Its second packet records the key.
#[test]
fn a_flow_is_listed_with_its_key_from_its_first_answer() {
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:80/tcp");
    let key = flow_key(CLIENT.into(), 41500, &vip);
    assert_eq!(
        fx.run(&packet::tcp(CLIENT, 41500, VIP_DR, 80, true, &[])).0,
        XDP_TX
    );
    let entry = fx.dp.flow(&key).expect("conntrack").expect("tracked");
    assert_eq!(listed(&fx, &key), None, "a lone SYN's key was recorded");
    assert_eq!(
        fx.run(&packet::tcp(CLIENT, 41500, VIP_DR, 80, false, b"x"))
            .0,
        XDP_TX
    );
    assert_eq!(
        listed(&fx, &key),
        Some(entry.real_id),
        "the answered flow is not listed with its key"
    );
    // A retransmitted SYN re-pins the way and keeps its key.
    fx.run(&packet::tcp(CLIENT, 41500, VIP_DR, 80, true, &[]));
    assert_eq!(listed(&fx, &key), Some(entry.real_id));
}

#[test]
fn stale_flow_does_not_follow_a_reused_real_id() {
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:80/tcp");
    fx.run(&packet::tcp(CLIENT, 37000, VIP_DR, 80, true, &[]));
    let key = flow_key(CLIENT.into(), 37000, &vip);
    let entry = fx.dp.flow(&key).expect("conntrack").expect("tracked");
    // The allocator gives the flow's real slot to another real (of another
    // service), with a new generation.
    let mut dp = fx.dp;
    let other = RealDef {
        addr: {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[192, 0, 2, 99]);
            a
        },
        mac: [0x02, 0, 0, 0, 9, 9],
        family: lb_common::FAMILY_V4,
        flags: 0,
        generation: entry.generation.wrapping_add(1),
    };
    dp.put_real(entry.real_id, &other)
        .expect("reusing the slot");
    let fx = Fixture {
        dp,
        state: fx.state,
    };
    let stale = event(&fx, "conntrack_stale");
    let hits = event(&fx, "conntrack_hit");
    fx.run(&packet::tcp(CLIENT, 37000, VIP_DR, 80, false, b"x"));
    assert_eq!(
        event(&fx, "conntrack_hit"),
        hits,
        "stale entry used as a hit"
    );
    assert_eq!(event(&fx, "conntrack_stale"), stale + 1, "conntrack_stale");
    let now = fx.dp.flow(&key).expect("conntrack").expect("re-tracked");
    // Maglev may give the slot's new real: the entry then records its generation.
    let want = if now.real_id == entry.real_id {
        other.generation
    } else {
        0
    };
    assert_eq!(now.generation, want, "re-hashed entry's generation");
}

#[test]
fn tunnel_without_a_source_of_its_family_is_dropped() {
    let fx = Fixture::with_config(Config {
        tun_src_v4: [0; 4],
        tun_src_v6: [0; 16],
        ..base_config()
    });
    for (name, p) in [
        ("ipip", packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, &[])),
        ("4in6", packet::tcp(CLIENT, 40000, VIP_4IN6, 80, true, &[])),
        (
            "ip6ip6",
            packet::client(
                CLIENT6.into(),
                VIP6_TUN.into(),
                L2::default(),
                tcp(40000, 80, true),
            ),
        ),
    ] {
        let before = verdict(&fx, stat::DROP_NO_TUNNEL_SOURCE);
        let (v, out) = fx.run(&p);
        assert_eq!(v, XDP_DROP, "{name}: verdict");
        assert_eq!(out, p, "{name}: dropped frame changed");
        assert_eq!(
            verdict(&fx, stat::DROP_NO_TUNNEL_SOURCE),
            before + 1,
            "{name}: drop_no_tunnel_source"
        );
    }
}

#[test]
fn too_big_replies_are_rate_limited_per_cpu() {
    on_cpu0();
    let fx = Fixture::with_config(Config {
        icmp_too_big_limit: 3,
        ..base_config()
    });
    let big = [0u8; 1460];
    let (sent, dropped) = (
        verdict(&fx, stat::TX_ICMP_TOO_BIG_REPLY),
        verdict(&fx, stat::DROP_TOO_BIG),
    );
    let mut replies = 0;
    for p in 0..8u16 {
        let (v, _) = fx.run(&packet::tcp(CLIENT, 41000 + p, VIP_TUN, 80, false, &big));
        assert!(v == XDP_TX || v == XDP_DROP, "verdict {v}");
        replies += u64::from(v == XDP_TX);
    }
    // One window normally; a second one may start during the loop.
    assert!(
        (3..=6).contains(&replies),
        "{replies} replies with a limit of 3/s"
    );
    assert_eq!(verdict(&fx, stat::TX_ICMP_TOO_BIG_REPLY) - sent, replies);
    assert_eq!(verdict(&fx, stat::DROP_TOO_BIG) - dropped, 8 - replies);
    let off = Fixture::with_config(Config {
        icmp_too_big_limit: 0,
        ..base_config()
    });
    let (v, _) = off.run(&packet::tcp(CLIENT, 41000, VIP_TUN, 80, false, &big));
    assert_eq!(v, XDP_DROP, "limit 0 sends no reply");
}

#[test]
fn flows_counters_count_only_new_conntrack_entries() {
    on_cpu0();
    let fx = Fixture::with_config(Config {
        new_flow_limit: 1,
        ..base_config()
    });
    let flows = |fx: &Fixture| {
        let id = fx.state.model().services[&fx.vip("203.0.113.10:80/tcp")].id;
        fx.dp.vip_counter(id).expect("VIP counter").flows
    };
    let before = flows(&fx);
    // A SYN, its retransmit, then data: one flow.
    fx.run(&packet::tcp(CLIENT, 38000, VIP_DR, 80, true, &[]));
    fx.run(&packet::tcp(CLIENT, 38000, VIP_DR, 80, true, &[]));
    fx.run(&packet::tcp(CLIENT, 38000, VIP_DR, 80, false, b"x"));
    // Over the flood guard's limit (1/s): forwarded untracked, no new flow.
    fx.run(&packet::tcp(CLIENT, 38001, VIP_DR, 80, true, &[]));
    fx.run(&packet::tcp(CLIENT, 38001, VIP_DR, 80, false, b"y"));
    assert_eq!(flows(&fx) - before, 1, "per-VIP new flows");
}

#[test]
fn icmp_error_does_not_refresh_or_count_the_flow() {
    let fx = Fixture::new();
    fx.run(&packet::udp(CLIENT, 35900, VIP_DR, 53, b"q"));
    let vip = fx.vip("203.0.113.10:53/udp");
    let key = flow_key(CLIENT.into(), 35900, &vip);
    let stamp = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    std::thread::sleep(Duration::from_millis(5));
    // The real's UDP answer, quoted by a router's "fragmentation needed".
    let mut reply = Vec::new();
    etherparse::PacketBuilder::ip(IpHeaders::Ipv4(
        packet::ipv4_header(VIP_DR, CLIENT, IpNumber::UDP),
        Default::default(),
    ))
    .udp(53, 35900)
    .write(&mut reply, &[0u8; 64])
    .expect("reply");
    let events = fx.dp.events().expect("events");
    let (v, _) = fx.run(&packet::icmp_frag_needed_quoting(
        ROUTER,
        VIP_DR,
        &reply[..28],
    ));
    assert_eq!(v, XDP_TX, "steered to the flow's real");
    assert_eq!(
        fx.dp.events().expect("events"),
        events,
        "conntrack events counted"
    );
    assert_eq!(
        fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns,
        stamp,
        "an ICMP error refreshed the UDP flow"
    );
}

#[test]
fn tcp_flow_records_last_seen_coarsely() {
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:80/tcp");
    let key = flow_key(CLIENT.into(), 39000, &vip);
    fx.run(&packet::tcp(CLIENT, 39000, VIP_DR, 80, true, &[]));
    let first = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert_ne!(first, 0, "a TCP entry has a last-seen time");
    std::thread::sleep(Duration::from_millis(20));
    fx.run(&packet::tcp(CLIENT, 39000, VIP_DR, 80, false, b"x"));
    let second = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert_eq!(second, first, "refreshed within the 1 s grain");
    std::thread::sleep(Duration::from_millis(1100));
    fx.run(&packet::tcp(CLIENT, 39000, VIP_DR, 80, false, b"y"));
    let third = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert!(
        third > first + 1_000_000_000,
        "not refreshed after the grain"
    );
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of the data path's stamps.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    u64::try_from(t.tv_sec()).expect("seconds") * 1_000_000_000
        + u64::try_from(t.tv_nsec()).expect("nanoseconds")
}

#[test]
fn conntrack_stamps_follow_the_monotonic_clock_at_tick_resolution() {
    // The data path reads the coarse clock once per tick and CPU and keeps
    // it (conntrack::now): each entry, written in a tick of its own, carries
    // CLOCK_MONOTONIC as of its packet, never ahead of it and at most a few
    // ticks behind (50 ms: five ticks at HZ 100), not a time kept from an
    // earlier tick.
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:80/tcp");
    for p in 39300..39340u16 {
        let before = monotonic_ns();
        let (v, _) = fx.run(&packet::tcp(CLIENT, p, VIP_DR, 80, true, &[]));
        let after = monotonic_ns();
        assert_eq!(v, XDP_TX, "SYN forwarded");
        let stamp = fx
            .dp
            .flow(&flow_key(CLIENT.into(), p, &vip))
            .expect("ct")
            .expect("tracked")
            .last_seen_ns;
        assert!(
            stamp <= after && stamp + 50_000_000 >= before,
            "port {p}: stamped {stamp} ns for a packet run between {before} and {after} ns"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn udp_flow_records_last_seen_coarsely() {
    // The default 30 s idle timeout: a grain of 1 s.
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.10:53/udp");
    let key = flow_key(CLIENT.into(), 39100, &vip);
    fx.run(&packet::udp(CLIENT, 39100, VIP_DR, 53, b"a"));
    let first = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert_ne!(first, 0, "a UDP entry has a last-seen time");
    std::thread::sleep(Duration::from_millis(20));
    let (v, _) = fx.run(&packet::udp(CLIENT, 39100, VIP_DR, 53, b"b"));
    assert_eq!(v, XDP_TX, "the tracked datagram is forwarded");
    let second = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert_eq!(second, first, "refreshed within the 1 s grain");
    std::thread::sleep(Duration::from_millis(1100));
    fx.run(&packet::udp(CLIENT, 39100, VIP_DR, 53, b"c"));
    let third = fx.dp.flow(&key).expect("ct").expect("tracked").last_seen_ns;
    assert!(
        third > first + 1_000_000_000,
        "not refreshed after the grain"
    );
}

/// A tracked tunnel packet (a conntrack hit, which computes the flow hash
/// again: the way has no room for it) leaves with the outer source its SYN
/// had, taken from the flow hash.
#[test]
fn tracked_tunnel_packet_keeps_the_outer_source_of_its_syn() {
    let fx = Fixture::new();
    let vip = fx.vip("203.0.113.11:80/tcp");
    let (real, _) = fx.maglev("203.0.113.11:80/tcp", CLIENT.into(), 39200);
    let h = hash(CLIENT.into(), 39200, &vip);
    let (v, syn_out) = fx.run(&packet::tcp(CLIENT, 39200, VIP_TUN, 80, true, &[]));
    assert_eq!(v, XDP_TX, "SYN tunnelled");
    let entry = fx
        .dp
        .flow(&flow_key(CLIENT.into(), 39200, &vip))
        .expect("ct")
        .expect("tracked");
    assert_eq!(entry.hash, h, "the entry's flow hash");
    let hits = event(&fx, "conntrack_hit");
    let (v, out) = fx.run(&packet::tcp(CLIENT, 39200, VIP_TUN, 80, false, b"x"));
    assert_eq!(v, XDP_TX, "tracked segment tunnelled");
    assert_eq!(event(&fx, "conntrack_hit"), hits + 1, "a conntrack hit");
    let outer_src =
        |frame: &[u8]| IpAddr::V4(Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]));
    let outer_dst =
        |frame: &[u8]| IpAddr::V4(Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]));
    assert_eq!(outer_dst(&out), real, "to the flow's real");
    assert_eq!(
        outer_src(&out),
        tunnel_source(real, h),
        "outer source from the flow hash"
    );
    assert_eq!(
        outer_src(&out),
        outer_src(&syn_out),
        "same source as the SYN's"
    );
}

/// With one IPv4 tunnel source (a /32, the default: no host bits), an IPIP
/// packet leaves from that address, SYN and tracked segment alike (a hit
/// computes no flow hash for it); an IPv6 outer header, 4in6 and IP6IP6,
/// still carries the flow hash in its flow label and source on a hit.
#[test]
fn tracked_tunnel_packets_with_one_ipv4_tunnel_source() {
    let one = Ipv4Addr::new(192, 0, 2, 9);
    let fx = Fixture::with_config(Config {
        tun_src_v4: one.octets(),
        tun_host_v4: 0,
        ..base_config()
    });
    let services = [
        (
            "203.0.113.11:80/tcp",
            IpAddr::V4(CLIENT),
            IpAddr::V4(VIP_TUN),
        ),
        (
            "203.0.113.12:80/tcp",
            IpAddr::V4(CLIENT),
            IpAddr::V4(VIP_4IN6),
        ),
        (
            "[2001:db8:203::11]:80/tcp",
            IpAddr::V6(CLIENT6),
            IpAddr::V6(VIP6_TUN),
        ),
    ];
    let sport = 39300;
    for (name, client, vip) in services {
        let (real, mac) = fx.maglev(name, client, sport);
        let h = hash(client, sport, &fx.vip(name));
        let outer_src = match real {
            IpAddr::V4(_) => IpAddr::V4(one),
            IpAddr::V6(_) => tunnel_source(real, h),
        };
        for syn in [true, false] {
            let inner = packet::client(client, vip, L2::default(), tcp(sport, 80, syn));
            let hits = event(&fx, "conntrack_hit");
            let (v, out) = fx.run(&inner);
            let what = if syn { "SYN" } else { "tracked segment" };
            assert_eq!(v, XDP_TX, "{name}: {what} tunnelled");
            assert_eq!(
                out,
                packet::tunnel(outer_src, real, L2::default(), mac, h, &inner[14..]),
                "{name}: the {what}'s tunnel frame (outer source {outer_src}, flow label {:#x})",
                h & 0xf_ffff
            );
            let want_hits = hits + u64::from(!syn);
            assert_eq!(
                event(&fx, "conntrack_hit"),
                want_hits,
                "{name}: the {what} is a conntrack hit only after the SYN"
            );
        }
    }
}

/// A tunnel frame from `src` to the decap fixture's 192.0.2.21 carrying
/// `inner` (a frame), with the outer ECN field set to `outer_ecn`.
fn tunnel_with_ecn(src: IpAddr, dst: IpAddr, inner: &[u8], outer_ecn: u8) -> Vec<u8> {
    let mut t = packet::tunnel(
        src,
        dst,
        L2::default(),
        [0x02, 0, 0, 0, 2, 0x21],
        5,
        &inner[14..],
    );
    if src.is_ipv4() {
        let (mut h, _) = Ipv4Header::from_slice(&t[14..]).expect("outer header");
        h.ecn = etherparse::IpEcn::try_new(outer_ecn).expect("2 bits");
        h.header_checksum = h.calc_header_checksum();
        t[14..34].copy_from_slice(&h.to_bytes());
    } else {
        t[15] = (t[15] & 0xcf) | (outer_ecn << 4);
    }
    t
}

#[test]
fn decap_accepts_only_allowed_sources_and_keeps_ce() {
    let d = decap_from(&[
        ("192.0.2.0".parse().expect("v4"), 24),
        ("2001:db8:ff::".parse().expect("v6"), 96),
    ]);
    let prog = d.program().expect("decap program");
    let real4: IpAddr = "192.0.2.21".parse().expect("v4");
    let real6: IpAddr = "2001:db8:100::21".parse().expect("v6");
    let ect0 = |e: u8| {
        packet::client_v4_with(CLIENT, VIP_TUN, tcp(40000, 80, true), move |ip| {
            ip.ecn = etherparse::IpEcn::try_new(e).expect("2 bits");
        })
    };
    let ect6 = |e: u8| {
        packet::client_v6_with(CLIENT6, VIP6_TUN, tcp(40000, 80, true), move |ip, _| {
            ip.traffic_class = e;
        })
    };
    let allowed4: IpAddr = "192.0.2.200".parse().expect("v4");
    let allowed6: IpAddr = "2001:db8:ff::9".parse().expect("v6");
    // (name, frame, inner frame expected after decapsulation or None for a drop)
    type SrcCase = (&'static str, Vec<u8>, Option<Vec<u8>>);
    let cases: Vec<SrcCase> = vec![
        (
            "v4 source outside the allowed prefixes",
            tunnel_with_ecn("198.51.100.99".parse().expect("v4"), real4, &ect0(0), 0),
            None,
        ),
        (
            "v6 source outside the allowed prefixes",
            tunnel_with_ecn("2001:db8:7::1".parse().expect("v6"), real6, &ect6(0), 0),
            None,
        ),
        (
            "outer CE on an ECT(0) IPv4 inner",
            tunnel_with_ecn(allowed4, real4, &ect0(2), 3),
            Some(ect0(3)),
        ),
        (
            "outer CE on a not-ECT IPv4 inner is left",
            tunnel_with_ecn(allowed4, real4, &ect0(0), 3),
            Some(ect0(0)),
        ),
        (
            "outer CE on an ECT(1) IPv6 inner",
            tunnel_with_ecn(allowed6, real6, &ect6(1), 3),
            Some(ect6(3)),
        ),
    ];
    for (name, input, inner) in cases {
        let before = d.counters().expect("counters");
        let (v, out) = run(prog, &input);
        let after = d.counters().expect("counters");
        match inner {
            None => {
                assert_eq!(v, XDP_DROP, "{name}: verdict");
                let i = decap_stat::DROP_NOT_ALLOWED_SRC as usize;
                assert_eq!(
                    after[i].1.packets,
                    before[i].1.packets + 1,
                    "{name}: counter"
                );
            }
            Some(inner) => {
                assert_eq!(v, XDP_PASS, "{name}: verdict");
                assert_eq!(out[14..], inner[14..], "{name}: inner packet");
            }
        }
    }
}

#[test]
fn decap_stats_are_read_from_the_pins() {
    let dir = std::env::temp_dir().join(format!("xlb-decap-pins-{}", std::process::id()));
    let pin =
        lb_userspace::pin::PinDir::prepare_layout(&dir, lb_userspace::pin::DECAP_LAYOUT_VERSION)
            .expect("bpffs pin dir");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = lb_userspace::pin::teardown(&self.0, true, lb_userspace::pin::Holder::Decap);
            let _ = nix::mount::umount(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _guard = Unmount(dir.clone());
    let settings =
        DecapSettings::new(&["192.0.2.21".parse().expect("v4")], &[]).expect("endpoints");
    let d = Decap::load_with(&settings, Some(&pin)).expect("loading pinned");
    let inner = packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, b"x");
    let frame = packet::tunnel(
        "192.0.2.200".parse().expect("v4"),
        "192.0.2.21".parse().expect("v4"),
        L2::default(),
        [0x02, 0, 0, 0, 2, 0x21],
        0,
        &inner[14..],
    );
    assert_eq!(run(d.program().expect("decap"), &frame).0, XDP_PASS);
    let pinned = lb_userspace::decap::pinned_counters(&dir).expect("reading the pins");
    let ipip = pinned
        .iter()
        .find(|(n, _)| *n == "decap_ipip")
        .expect("decap_ipip counter");
    assert_eq!(ipip.1.packets, 1, "pinned decap_ipip");
}

/// A TCP segment of an established flow from CLIENT:`sport` to the DR VIP with ACK
/// and `flags` (FIN 0x01, RST 0x04) set.
fn tcp_ending(sport: u16, flags: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let t = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT.octets(), VIP_DR.octets(), 64)
        .tcp(sport, 80, 1000, 64240)
        .ack(1);
    let t = if flags & 0x01 != 0 { t.fin() } else { t };
    let t = if flags & 0x04 != 0 { t.rst() } else { t };
    t.write(&mut out, &[]).expect("building a TCP packet");
    out
}

/// The data path's flow sync reports waiting in the ring.
fn reports(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<lb_common::FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<lb_common::FlowEvent>(), "report size");
        // SAFETY: the length is checked and FlowEvent is plain integers.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

#[test]
fn sync_reports_a_flow_once_confirmed_and_once_ended_never_a_lone_syn() {
    let mut fx = Fixture::with_config(Config {
        sync: 1,
        ..base_config()
    });
    let mut maps = fx.dp.sync_maps().expect("the flow sync maps");
    let vip = fx.vip("203.0.113.10:80/tcp");
    let real = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), 40001).0;
    // The SYN creates the entry and reports nothing: a SYN flood is no sync traffic.
    assert_eq!(
        fx.run(&packet::tcp(CLIENT, 40001, VIP_DR, 80, true, &[])).0,
        XDP_TX
    );
    assert_eq!(reports(&mut maps.events), []);
    // The handshake's ACK confirms it: one report, with the flow and its real.
    assert_eq!(
        fx.run(&packet::tcp(CLIENT, 40001, VIP_DR, 80, false, &[]))
            .0,
        XDP_TX
    );
    let got = reports(&mut maps.events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].kind, lb_common::FLOW_EVENT_NEW);
    assert_eq!(got[0].flow, flow_key(CLIENT.into(), 40001, &vip));
    assert_eq!(fx.state.model().real_by_id(got[0].real_id), Some(real));
    // Later packets report nothing; the client's FIN reports the end, once.
    fx.run(&packet::tcp(CLIENT, 40001, VIP_DR, 80, false, b"data"));
    assert_eq!(reports(&mut maps.events), []);
    assert_eq!(fx.run(&tcp_ending(40001, 0x01)).0, XDP_TX);
    let got = reports(&mut maps.events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].kind, lb_common::FLOW_EVENT_END);
    fx.run(&tcp_ending(40001, 0x01));
    assert_eq!(reports(&mut maps.events), []);
    // A handshake answered by a reset (a spoofed SYN's real client) is never reported.
    fx.run(&packet::tcp(CLIENT, 40002, VIP_DR, 80, true, &[]));
    fx.run(&tcp_ending(40002, 0x04));
    fx.run(&packet::tcp(CLIENT, 40002, VIP_DR, 80, false, &[]));
    assert_eq!(reports(&mut maps.events), []);
    // Sync off: nothing is ever reported.
    let mut fx = Fixture::new();
    let mut maps = fx.dp.sync_maps().expect("the flow sync maps");
    fx.run(&packet::tcp(CLIENT, 40003, VIP_DR, 80, true, &[]));
    fx.run(&packet::tcp(CLIENT, 40003, VIP_DR, 80, false, &[]));
    assert_eq!(reports(&mut maps.events), []);
}

#[test]
fn a_conntrack_miss_takes_the_real_a_peer_reported_and_promotes_it() {
    let mut fx = Fixture::with_config(Config {
        sync: 1,
        ..base_config()
    });
    let mut maps = fx.dp.sync_maps().expect("the flow sync maps");
    let vip = fx.vip("203.0.113.10:80/tcp");
    let port = 40100;
    let maglev = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), port).0;
    // The peer pinned the flow to another real than this node's table gives.
    let model = fx.state.model();
    let (peer_id, peer_addr) = model.services[&vip]
        .slots
        .iter()
        .find(|(addr, _)| **addr != maglev)
        .map(|(addr, id)| (*id, *addr))
        .expect("another real of the VIP");
    let (peer_mac, peer_generation) = (model.slots[&peer_id].mac, model.slots[&peer_id].generation);
    let key = flow_key(CLIENT.into(), port, &vip);
    let reported = lb_common::FlowState {
        real_id: peer_id,
        generation: peer_generation,
        last_seen_ns: 0,
        hash: hash(CLIENT.into(), port, &vip),
        flags: lb_common::FLOW_F_REPORTED,
    };
    maps.peer_flows
        .insert(&key, &reported, 0)
        .expect("writing a peer flow");
    let hits = event(&fx, "conntrack_peer_hit");
    let (v, out) = fx.run(&packet::tcp(CLIENT, port, VIP_DR, 80, false, b"more"));
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out[0..6],
        peer_mac,
        "not sent to the peer's real ({peer_addr})"
    );
    assert_eq!(event(&fx, "conntrack_peer_hit"), hits + 1);
    // Promoted: the conntrack entry now pins it there, already known to the peers.
    let entry = fx.dp.flow(&key).expect("conntrack").expect("promoted");
    assert_eq!(entry.real_id, peer_id);
    assert_eq!(
        listed(&fx, &key),
        Some(peer_id),
        "a promoted flow (answered already) is not in the full copy"
    );
    assert_eq!(
        entry.flags & lb_common::FLOW_F_REPORTED,
        lb_common::FLOW_F_REPORTED
    );
    fx.run(&packet::tcp(CLIENT, port, VIP_DR, 80, false, b"more"));
    assert_eq!(
        reports(&mut maps.events),
        [],
        "a promoted flow was reported again"
    );
    // A report for a slot since given another generation is ignored: Maglev decides.
    let port = 40101;
    let key = flow_key(CLIENT.into(), port, &vip);
    maps.peer_flows
        .insert(
            &key,
            &lb_common::FlowState {
                generation: peer_generation + 1000,
                ..reported
            },
            0,
        )
        .expect("writing a peer flow");
    let now = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), port);
    let (_, out) = fx.run(&packet::tcp(CLIENT, port, VIP_DR, 80, false, b"x"));
    assert_eq!(out[0..6], now.1, "a stale peer report was followed");
}

#[test]
fn vip_filter_bit_stays_while_another_service_holds_it() {
    let mut fx = Fixture::new();
    // A service whose filter bit is the one 203.0.113.10:80/tcp has.
    let slot = |addr: Ipv4Addr, port: u16| {
        lb_common::vip_filter_slot(&addr_bytes(addr.into()).0, port.to_be(), 6)
    };
    let held = slot(VIP_DR, 80);
    let (addr, port) = (100..=254u8)
        .flat_map(|d| (1..=u16::MAX).map(move |p| (Ipv4Addr::new(203, 0, 113, d), p)))
        .find(|&(a, p)| slot(a, p) == held)
        .expect("a service sharing the bit");
    let other: Vip = format!("{addr}:{port}/tcp").parse().expect("valid VIP");
    fx.add_vip(other);
    let to_other = packet::tcp(CLIENT, 40000, addr, port, true, &[]);
    assert_eq!(fx.run(&to_other).0, XDP_DROP, "{other} (no reals) is ours");
    fx.edit(Edit::DelVip(other), &[]);
    let not_vip = verdict(&fx, stat::PASS_NOT_VIP);
    assert_eq!(fx.run(&to_other).0, XDP_PASS, "{other} is gone");
    assert_eq!(verdict(&fx, stat::PASS_NOT_VIP), not_vip + 1);
    // The bit is still 203.0.113.10:80/tcp's: its packets are still forwarded.
    let (v, out) = fx.run(&packet::tcp(CLIENT, 40001, VIP_DR, 80, true, &[]));
    assert_eq!(v, XDP_TX, "203.0.113.10:80/tcp after {other} left its bit");
    let (real, mac) = fx.maglev("203.0.113.10:80/tcp", CLIENT.into(), 40001);
    assert_eq!(out[0..6], mac, "sent to {real}");
}

/// `XLB_VIP_SLOTS`, which gives a packet its VIP's meta without the hash
/// lookup, follows every change of the VIP holding a slot, and hands the
/// slot to a service sharing it when the holder leaves: every packet gets
/// its own VIP's meta, whichever way it finds it. The two services share
/// port, protocol and family, so only their addresses tell them apart.
#[test]
fn a_vip_slot_follows_its_vip_and_passes_to_the_next_service_on_it() {
    let mut fx = Fixture::new();
    let holder = fx.vip("[2001:db8:203::10]:80/tcp");
    let slot = |addr: Ipv6Addr| lb_common::vip_filter_slot(&addr.octets(), 80u16.to_be(), 6);
    let addr = (0x100..=0xf_ffffu32)
        .map(|n| Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, (n >> 16) as u16, n as u16))
        .find(|&a| slot(a) == slot(VIP6_DR))
        .expect("a service sharing the slot");
    let other: Vip = format!("[{addr}]:80/tcp").parse().expect("valid VIP");
    let in_slot = |fx: &Fixture, vip: &Vip| fx.dp.vip_slot(&vip.key()).map(|(k, _)| k);
    fx.add_vip(other);
    for d in [0x31, 0x32] {
        let real = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, d));
        fx.edit(
            Edit::AddReal {
                vip: other,
                real,
                weight: 1,
            },
            &[(real, mac_of(real))],
        );
    }
    assert_eq!(
        in_slot(&fx, &other),
        Some(holder.key()),
        "the first service on the slot holds it"
    );
    // Every new flow of either service goes to the real its own table gives.
    let check = |fx: &Fixture, vip: &Vip, base: u16| {
        for sport in base..base + 64 {
            let syn = packet::client(
                CLIENT6.into(),
                vip.addr,
                packet::L2::default(),
                packet::L4::Tcp {
                    sport,
                    dport: 80,
                    syn: true,
                    payload: &[],
                },
            );
            let (v, out) = fx.run(&syn);
            assert_eq!(v, XDP_TX, "{vip} from port {sport}");
            let (real, mac) = fx.maglev(&vip.to_string(), CLIENT6.into(), sport);
            assert_eq!(out[0..6], mac, "{vip} from port {sport}: sent to {real}");
        }
    };
    check(&fx, &holder, 41000);
    check(&fx, &other, 42000);
    // The holder's table changes size: its entry follows (a stale one would
    // pick from the old table with the old size).
    fx.edit(
        Edit::SetVip {
            vip: holder,
            scheduler: None,
            table_size: Some(1021),
            health: None,
        },
        &[],
    );
    assert_eq!(
        fx.dp.vip_slot(&holder.key()),
        fx.dp
            .get_vip(&holder.key())
            .expect("reading XLB_VIPS")
            .map(|meta| (holder.key(), meta)),
        "the slot holds the holder's new meta"
    );
    check(&fx, &holder, 43000);
    // The holder leaves: its packets are no service's, the other service
    // takes the slot over and keeps its flows' reals.
    fx.edit(Edit::DelVip(holder), &[]);
    let gone = packet::client(
        CLIENT6.into(),
        VIP6_DR.into(),
        packet::L2::default(),
        packet::L4::Tcp {
            sport: 44000,
            dport: 80,
            syn: true,
            payload: &[],
        },
    );
    let not_vip = verdict(&fx, stat::PASS_NOT_VIP);
    assert_eq!(fx.run(&gone).0, XDP_PASS, "{holder} is gone");
    assert_eq!(verdict(&fx, stat::PASS_NOT_VIP), not_vip + 1);
    assert_eq!(
        in_slot(&fx, &other),
        Some(other.key()),
        "{other} took the slot over"
    );
    check(&fx, &other, 45000);
    // And leaves it empty when it goes too.
    fx.edit(Edit::DelVip(other), &[]);
    assert_eq!(in_slot(&fx, &other), None, "nobody holds the slot");
}

/// Why the verifier refused a program, in one line an engineer can act on:
/// the reason line of its log and, for the refusals a data-path edit can
/// cause, what to do about them.
fn verifier_refusal(object: &str, program: &str, err: &aya::programs::ProgramError) -> String {
    let aya::programs::ProgramError::LoadError { verifier_log, .. } = err else {
        return format!("{object}: program {program} could not be loaded: {err}");
    };
    let log = verifier_log.to_string();
    let reason = log
        .lines()
        .find(|l| l.contains("misaligned stack access") || l.contains("combined stack size"))
        .or_else(|| {
            log.lines()
                .rev()
                .find(|l| !l.is_empty() && !l.starts_with("verification time"))
        })
        .unwrap_or("(empty verifier log)");
    let hint = if reason.contains("misaligned stack access") {
        "a value on the stack is not naturally aligned, or LLVM merged stores into a wider \
         misaligned one: the objects are built with allows-misaligned-mem-access \
         (lb-ebpf/build.rs), which the verifier never allows on the stack; keep stack values \
         in 8-aligned holders built from 8-byte words (docs/development.md, \"Data-path code\")"
    } else if reason.contains("combined stack size") {
        "the frames of the balancer and the functions it calls exceed the verifier's 512 bytes"
    } else {
        "see the verifier log of the program"
    };
    format!("{object}: the verifier refused program {program}: `{reason}`: {hint}")
}

/// Every XDP program of the three objects (balancer, decapsulator, bench
/// floor) loads: the verifier accepts it as built. The objects use LLVM's
/// `allows-misaligned-mem-access`, so a data-path edit that leaves a stack
/// value misaligned stops a program loading; this names the program and the
/// verifier's reason instead of a whole log.
#[test]
fn every_xdp_program_passes_the_verifier() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "loading XDP programs needs root"
    );
    let objects = [
        ("lb-ebpf", lb_userspace::dataplane::EBPF_OBJECT),
        ("lb-decap", lb_userspace::decap::DECAP_OBJECT),
        ("lb-floor", lb_userspace::bench::FLOOR_OBJECT),
    ];
    for (object, bytes) in objects {
        let mut loader = aya::EbpfLoader::new();
        // Sized at load by the daemon; any size verifies the same code.
        loader.map_max_entries(lb_common::map_names::FLOWS, 1024);
        loader.map_max_entries(lb_common::map_names::PEER_FLOWS, 1024);
        let mut ebpf = loader
            .load(bytes)
            .unwrap_or_else(|e| panic!("{object}: creating its maps: {e}"));
        let mut loaded = Vec::new();
        for (name, program) in ebpf.programs_mut() {
            let xdp: &mut Xdp = program
                .try_into()
                .unwrap_or_else(|e| panic!("{object}: program {name} is not XDP: {e}"));
            if let Err(err) = xdp.load() {
                panic!("{}", verifier_refusal(object, name, &err));
            }
            loaded.push(name.to_owned());
        }
        assert!(
            !loaded.is_empty(),
            "{object} holds no XDP program: {loaded:?}"
        );
    }
}
