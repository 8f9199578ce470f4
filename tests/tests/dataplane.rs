//! BPF_PROG_TEST_RUN fixtures: the real XDP object, maps filled through the
//! daemon's own `State`/`Dataplane`, crafted packets in, verdict + output bytes +
//! counters checked. Needs root (CAP_BPF, CAP_NET_ADMIN).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{Config, flow_hash, prog_names, stat};
use lb_userspace::{
    dataplane::Dataplane,
    model::{Vip, addr_bytes},
    state::{State, VipOptions},
};
use xlb_tests::packet::{self, LB_MAC};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const REALS: [(Ipv4Addr, [u8; 6]); 3] = [
    (Ipv4Addr::new(198, 51, 100, 11), [0x02, 0, 0, 0, 1, 0x11]),
    (Ipv4Addr::new(198, 51, 100, 12), [0x02, 0, 0, 0, 1, 0x12]),
    (Ipv4Addr::new(198, 51, 100, 13), [0x02, 0, 0, 0, 1, 0x13]),
];

/// The loaded object with three reals behind 203.0.113.10:80/tcp and :53/udp,
/// and an empty VIP 203.0.113.20:80/tcp.
struct Fixture {
    dp: Dataplane,
    state: State,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the BPF_PROG_TEST_RUN tests load XDP programs and must run as root"
        );
        let mut dp = Dataplane::load().expect("loading the XDP object");
        dp.set_config(&Config {
            iface_mac: LB_MAC,
            _pad: [0; 2],
        })
        .expect("writing the config map");
        let mut state = State::new();
        for vip in [
            "203.0.113.10:80/tcp",
            "203.0.113.10:53/udp",
            "203.0.113.20:80/tcp",
        ] {
            let vip: Vip = vip.parse().expect("valid VIP");
            state
                .add_vip(&mut dp, vip, VipOptions::default())
                .expect("adding a VIP");
            if vip.addr == IpAddr::V4(EMPTY_VIP) {
                continue;
            }
            for (addr, mac) in REALS {
                state
                    .add_real(&mut dp, &vip, IpAddr::V4(addr), mac, 1)
                    .expect("adding a real");
            }
        }
        Self { dp, state }
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog = self
            .dp
            .program(prog_names::BALANCER)
            .expect("balancer program");
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

    fn verdicts(&self) -> Vec<(u64, u64)> {
        self.dp
            .verdicts()
            .expect("reading counters")
            .iter()
            .map(|c| (c.packets, c.bytes))
            .collect()
    }

    /// The MAC of the real the control plane's table gives this flow.
    fn expected_mac(&self, vip: &str, src: Ipv4Addr, sport: u16) -> [u8; 6] {
        let vip: Vip = vip.parse().expect("valid VIP");
        let (s, _) = addr_bytes(IpAddr::V4(src));
        let (d, _) = addr_bytes(vip.addr);
        let hash = flow_hash(
            &s,
            &d,
            (u32::from(sport) << 16) | u32::from(vip.port),
            vip.proto.number(),
        );
        let real = self.state.real_for(&vip, hash).expect("VIP has reals");
        REALS
            .iter()
            .find(|(a, _)| IpAddr::V4(*a) == real)
            .map(|(_, m)| *m)
            .expect("known real")
    }
}

/// What a fixture expects.
enum Expect {
    /// XDP_TX toward the real the table names for (vip, src port).
    Tx(&'static str, u16),
    /// This verdict with the packet unchanged.
    Unchanged(u32),
}

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    expect: Expect,
    /// The `lb_common::stat` counter that must grow by exactly one.
    stat: u32,
}

fn truncated(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.truncate(len);
    p
}

fn cases() -> Vec<Case> {
    let other = Ipv4Addr::new(203, 0, 113, 99);
    let mut bad_ihl = packet::tcp(CLIENT, 40002, VIP, 80, true, &[]);
    bad_ihl[14] = 0x43; // version 4, IHL 3 (12 bytes): impossible
    vec![
        Case {
            name: "tcp_syn_to_vip_goes_to_maglev_choice",
            packet: packet::tcp(CLIENT, 40000, VIP, 80, true, &[]),
            expect: Expect::Tx("203.0.113.10:80/tcp", 40000),
            stat: stat::TX,
        },
        Case {
            name: "tcp_data_to_vip_goes_to_maglev_choice",
            packet: packet::tcp(CLIENT, 40000, VIP, 80, false, b"GET / HTTP/1.1\r\n\r\n"),
            expect: Expect::Tx("203.0.113.10:80/tcp", 40000),
            stat: stat::TX,
        },
        Case {
            name: "udp_to_vip_goes_to_maglev_choice",
            packet: packet::udp(CLIENT, 5353, VIP, 53, b"query"),
            expect: Expect::Tx("203.0.113.10:53/udp", 5353),
            stat: stat::TX,
        },
        Case {
            name: "udp_with_empty_payload_is_forwarded",
            packet: packet::udp(CLIENT, 5354, VIP, 53, &[]),
            expect: Expect::Tx("203.0.113.10:53/udp", 5354),
            stat: stat::TX,
        },
        Case {
            name: "ipv4_options_to_vip_are_forwarded_with_options",
            packet: packet::tcp_with_ip(CLIENT, 40001, VIP, 80, |ip| {
                ip.options = [1u8, 1, 1, 0][..].try_into().expect("valid options");
            }),
            expect: Expect::Tx("203.0.113.10:80/tcp", 40001),
            stat: stat::TX,
        },
        Case {
            name: "unknown_address_passes_untouched",
            packet: packet::tcp(CLIENT, 40000, other, 80, true, &[]),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "vip_address_on_another_port_passes_untouched",
            packet: packet::tcp(CLIENT, 40000, VIP, 443, true, &[]),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "vip_port_with_other_protocol_passes_untouched",
            packet: packet::udp(CLIENT, 40000, VIP, 80, b"x"),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "arp_passes_untouched",
            packet: packet::arp_request(CLIENT, VIP),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_IP,
        },
        Case {
            name: "ipv6_passes_untouched",
            packet: packet::udp6(
                "2001:db8::7"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("v6")
                    .octets(),
                5353,
                "2001:db8::10"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("v6")
                    .octets(),
                53,
            ),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_IP,
        },
        // (A frame shorter than an Ethernet header cannot be fed to
        // BPF_PROG_TEST_RUN, which requires 14 bytes, nor arrive from a NIC.)
        Case {
            name: "truncated_ipv4_header_passes_untouched",
            packet: truncated(packet::tcp(CLIENT, 40000, VIP, 80, true, &[]), 14 + 12),
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
            name: "truncated_tcp_header_to_vip_is_dropped",
            packet: truncated(packet::tcp(CLIENT, 40000, VIP, 80, true, &[]), 14 + 20 + 12),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        Case {
            name: "truncated_udp_header_to_vip_is_dropped",
            packet: truncated(packet::udp(CLIENT, 5353, VIP, 53, &[]), 14 + 20 + 4),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_MALFORMED,
        },
        Case {
            name: "first_fragment_to_vip_is_dropped",
            packet: packet::tcp_with_ip(CLIENT, 40000, VIP, 80, |ip| ip.more_fragments = true),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_FRAGMENT,
        },
        Case {
            name: "later_fragment_to_vip_is_dropped",
            packet: packet::tcp_with_ip(CLIENT, 40000, VIP, 80, |ip| {
                ip.fragment_offset = etherparse::IpFragOffset::try_new(100).expect("offset");
            }),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_FRAGMENT,
        },
        Case {
            name: "fragment_to_other_address_passes_untouched",
            packet: packet::tcp_with_ip(CLIENT, 40000, Ipv4Addr::new(203, 0, 113, 99), 80, |ip| {
                ip.more_fragments = true;
            }),
            expect: Expect::Unchanged(XDP_PASS),
            stat: stat::PASS_NOT_VIP,
        },
        Case {
            name: "vip_without_reals_drops_and_counts",
            packet: packet::tcp(CLIENT, 40000, EMPTY_VIP, 80, true, &[]),
            expect: Expect::Unchanged(XDP_DROP),
            stat: stat::DROP_NO_REAL,
        },
    ]
}

#[test]
fn fixture_table_verdicts_bytes_and_counters() {
    let fx = Fixture::new();
    let mut failures = Vec::new();
    for case in cases() {
        let before = fx.verdicts();
        let (verdict, out) = fx.run(&case.packet);
        let after = fx.verdicts();
        let (want_verdict, want_out) = match case.expect {
            Expect::Tx(vip, sport) => {
                let src = Ipv4Addr::new(
                    case.packet[26],
                    case.packet[27],
                    case.packet[28],
                    case.packet[29],
                );
                let mut want = case.packet.clone();
                want[0..6].copy_from_slice(&fx.expected_mac(vip, src, sport));
                want[6..12].copy_from_slice(&LB_MAC);
                (XDP_TX, want)
            }
            Expect::Unchanged(v) => (v, case.packet.clone()),
        };
        if verdict != want_verdict {
            failures.push(format!(
                "{}: verdict {verdict}, want {want_verdict}",
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
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let want = if i as u32 == case.stat {
                (b.0 + 1, b.1 + case.packet.len() as u64)
            } else {
                *b
            };
            if *a != want {
                failures.push(format!(
                    "{}: counter {} is {:?}, want {:?}",
                    case.name,
                    stat::NAMES[i],
                    a,
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
    assert_ne!(XDP_ABORTED, XDP_PASS);
}

#[test]
fn flows_spread_over_every_real_and_stick() {
    let fx = Fixture::new();
    let mut seen: HashMap<[u8; 6], u32> = HashMap::new();
    for sport in 10000..10300u16 {
        let p = packet::tcp(CLIENT, sport, VIP, 80, true, &[]);
        let (v1, o1) = fx.run(&p);
        let (v2, o2) = fx.run(&p);
        assert_eq!((v1, v2), (XDP_TX, XDP_TX), "port {sport}");
        assert_eq!(o1, o2, "same 5-tuple, different real (port {sport})");
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
    // The per-VIP and per-real counters saw every forwarded packet.
    let views = fx.state.view(&fx.dp).expect("view");
    let vip = views
        .iter()
        .find(|v| v.vip.to_string() == "203.0.113.10:80/tcp")
        .expect("VIP listed");
    assert_eq!(vip.packets, 600);
    assert_eq!(vip.reals.iter().map(|r| r.packets).sum::<u64>(), 600);
}

#[test]
fn removing_a_real_moves_only_its_flows() {
    let mut fx = Fixture::new();
    let before: Vec<Vec<u8>> = (20000..20300u16)
        .map(|sport| fx.run(&packet::tcp(CLIENT, sport, VIP, 80, true, &[])).1)
        .collect();
    let vip: Vip = "203.0.113.10:80/tcp".parse().expect("valid VIP");
    let (gone, gone_mac) = REALS[1];
    let Fixture { dp, state } = &mut fx;
    state
        .del_real(dp, &vip, IpAddr::V4(gone))
        .expect("removing a real");
    for (i, sport) in (20000..20300u16).enumerate() {
        let (v, out) = fx.run(&packet::tcp(CLIENT, sport, VIP, 80, true, &[]));
        assert_eq!(v, XDP_TX);
        assert_ne!(out[0..6], gone_mac, "flow still sent to the removed real");
        if before[i][0..6] != gone_mac {
            assert_eq!(
                out[0..6],
                before[i][0..6],
                "a flow of a remaining real moved (port {sport})"
            );
        }
    }
}
