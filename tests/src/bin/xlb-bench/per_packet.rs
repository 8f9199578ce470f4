//! Section 1, per-packet cost: BPF_PROG_TEST_RUN of the real balancer object, one
//! fresh packet per call (`repeat = 1`), against two floor programs measured
//! the same way in the same rounds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{Config, RING_SIZE_DEFAULT, prog_names};
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions},
    decap::Decap,
    desired::{Desired, Edit, RealSpec, ServiceSpec, VipOptions},
    model::{Forward, Scheduler, Vip},
    state::{State, writer::PauseHook},
};
use xlb_tests::packet::{self, L2, L4, LB_MAC};

use crate::report::{
    FLOOR_TX as FLOOR_TX_NAME, HOT_TRACKED, NON_VIP, PacketCase, PerPacket, Spread, median_sorted,
    percentile,
};

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// VIPs and reals of the configured state.
pub const VIPS: usize = 16;
pub const REALS_PER_VIP: usize = 100;
/// Flows the tracked cases cycle through.
const TRACKED_FLOWS: usize = 4096;
/// Conntrack entries: twice the default, so that the new-flow cases (5 × 100k
/// flows, all on one CPU's share of the per-CPU LRU lists) never evict.
pub const FLOWS: u32 = 2 << 20;

/// Program names in `lb-floor`.
pub const FLOOR_PASS: &str = "xlb_floor_pass";
pub const FLOOR_TX: &str = "xlb_floor_tx";
pub const FLOOR_DROP: &str = "xlb_floor_drop";
pub const LIVE_RESTORE: &str = "xlb_live_restore";

/// The interface settings the cases run with (tunnel sources from documentation ranges).
pub fn config() -> Config {
    Config {
        iface_mac: LB_MAC,
        _pad: [0; 2],
        mtu: 1500,
        new_flow_limit: 0,
        udp_idle_ns: 30_000_000_000,
        tun_src_v4: [192, 0, 2, 0],
        tun_host_v4: 0xff,
        tun_src_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0).octets(),
        tun_host_v6: u32::MAX,
        icmp_too_big_limit: lb_common::ICMP_TOO_BIG_LIMIT_DEFAULT,
    }
}

/// The 16 services: (VIP, mode).
fn services() -> Vec<(&'static str, Forward)> {
    vec![
        ("203.0.113.10:80/tcp", Forward::Dr),
        ("203.0.113.11:80/tcp", Forward::Dr),
        ("203.0.113.12:80/tcp", Forward::Dr),
        ("203.0.113.13:80/tcp", Forward::Dr),
        ("203.0.113.10:53/udp", Forward::Dr),
        ("203.0.113.11:53/udp", Forward::Dr),
        ("[2001:db8:203::10]:80/tcp", Forward::Dr),
        ("[2001:db8:203::11]:80/tcp", Forward::Dr),
        ("[2001:db8:203::10]:53/udp", Forward::Dr),
        ("203.0.113.20:80/tcp", Forward::Tun),
        ("203.0.113.21:80/tcp", Forward::Tun),
        ("203.0.113.22:80/tcp", Forward::Tun),
        ("203.0.113.23:80/tcp", Forward::Tun),
        ("[2001:db8:203::20]:80/tcp", Forward::Tun),
        ("[2001:db8:203::21]:80/tcp", Forward::Tun),
        ("[2001:db8:203::22]:80/tcp", Forward::Tun),
    ]
}

/// Real `i` of a family: 198.51.100.(i+1) or 2001:db8:100::(i+1).
fn real(v4: bool, i: usize) -> IpAddr {
    let i = u16::try_from(i + 1).expect("few reals");
    if v4 {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, u8::try_from(i).expect("< 256")))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, i))
    }
}

/// Loads the balancer and configures the 16 × 100 state through `State::reconcile`.
pub fn configured_balancer() -> (Dataplane, State) {
    let mut dp = Dataplane::load_with(&LoadOptions {
        flows: FLOWS,
        pin: None,
    })
    .unwrap_or_else(|e| panic!("loading the balancer object: {e} (needs root)"));
    dp.set_config(&config())
        .unwrap_or_else(|e| panic!("writing the config map: {e}"));
    let mut desired = Desired::default();
    let mut macs = BTreeMap::new();
    assert_eq!(services().len(), VIPS);
    for (vip, forward) in services() {
        let vip: Vip = vip.parse().expect("valid VIP");
        let v4 = vip.addr.is_ipv4();
        let reals = (0..REALS_PER_VIP)
            .map(|i| {
                let addr = real(v4, i);
                let b = u8::try_from(i).expect("< 256");
                macs.insert(addr, [0x02, 0, 0, 1, u8::from(v4), b]);
                (addr, RealSpec::default())
            })
            .collect();
        desired.services.insert(
            vip,
            ServiceSpec {
                options: VipOptions {
                    scheduler: Scheduler::Maglev,
                    forward,
                    table_size: RING_SIZE_DEFAULT,
                },
                health: None,
                reals,
            },
        );
    }
    let mut state = State::new(0.5);
    state
        .edit(&mut dp, Edit::Replace(desired), &macs, PauseHook::default())
        .unwrap_or_else(|e| panic!("configuring {VIPS} VIPs × {REALS_PER_VIP} reals: {e}"));
    (dp, state)
}

/// Loads the floor programs.
pub fn load_floors() -> Ebpf {
    let mut ebpf = Ebpf::load(lb_userspace::bench::FLOOR_OBJECT)
        .unwrap_or_else(|e| panic!("loading the floor object: {e}"));
    for name in [FLOOR_PASS, FLOOR_TX, FLOOR_DROP, LIVE_RESTORE] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name} in lb-floor"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not XDP: {e}"));
        prog.load()
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    }
    ebpf
}

/// A loaded XDP program of `ebpf`.
pub fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> &'a Xdp {
    ebpf.program(name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .try_into()
        .unwrap_or_else(|e| panic!("{name} is not XDP: {e}"))
}

/// One call: the action and the kernel-reported duration in ns.
pub fn run_once(prog: &Xdp, frame: &[u8]) -> (u32, u64) {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    let ns = u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX);
    (r.return_value, ns)
}

const CLIENT_NET: [u8; 3] = [192, 0, 2];

/// Client address and port of flow `n` (distinct for n < 250 × 60000).
fn client_v4(n: u64) -> (Ipv4Addr, u16) {
    let host = u8::try_from(n % 250 + 1).expect("< 251");
    let port = u16::try_from(1024 + (n / 250) % 60_000).expect("< 65535");
    (
        Ipv4Addr::new(CLIENT_NET[0], CLIENT_NET[1], CLIENT_NET[2], host),
        port,
    )
}

fn client_v6(n: u64) -> (Ipv6Addr, u16) {
    let hi = u16::try_from((n >> 16) & 0xffff).expect("16 bits");
    let lo = u16::try_from(n & 0xffff).expect("16 bits");
    let port = u16::try_from(1024 + n % 60_000).expect("< 65535");
    (Ipv6Addr::new(0x2001, 0xdb8, 0x7, 0, 0, 0, hi, lo), port)
}

/// What a case sends.
#[derive(Clone, Copy)]
enum Flow {
    Tcp { syn: bool },
    Udp,
}

/// Frame of flow `n` to `vip` (client addresses of the VIP's family).
fn frame(vip: &Vip, n: u64, flow: Flow) -> Vec<u8> {
    let (src, sport): (IpAddr, u16) = match vip.addr {
        IpAddr::V4(_) => {
            let (a, p) = client_v4(n);
            (a.into(), p)
        }
        IpAddr::V6(_) => {
            let (a, p) = client_v6(n);
            (a.into(), p)
        }
    };
    let l4 = match flow {
        Flow::Tcp { syn } => L4::Tcp {
            sport,
            dport: vip.port,
            syn,
            payload: &[],
        },
        Flow::Udp => L4::Udp {
            sport,
            dport: vip.port,
            payload: b"bench",
        },
    };
    packet::client(src, vip.addr, L2::default(), l4)
}

/// How a case makes its n-th frame.
enum Gen {
    /// The same frame every call.
    Fixed(Vec<u8>),
    /// A new flow per call: frame(vip, base + n).
    New { vip: Vip, flow: Flow, next: u64 },
    /// Cycles through `frames`.
    Cycle(Vec<Vec<u8>>),
}

impl Gen {
    fn next(&mut self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Gen::Fixed(f) => std::borrow::Cow::Borrowed(f),
            Gen::New { vip, flow, next } => {
                *next += 1;
                std::borrow::Cow::Owned(frame(vip, *next, *flow))
            }
            Gen::Cycle(frames) => std::borrow::Cow::Borrowed(&frames[i % frames.len()]),
        }
    }
}

/// Which loaded program a case runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    FloorPass,
    FloorTx,
    Balancer,
    Decap,
}

struct Case {
    name: String,
    kind: &'static str,
    prog: Prog,
    action: u32,
    frames: Gen,
    frame_bytes: usize,
    samples: Vec<u64>,
    round_medians: Vec<f64>,
}

impl Case {
    fn new(name: &str, kind: &'static str, prog: Prog, action: u32, frames: Gen) -> Case {
        let mut frames = frames;
        let frame_bytes = match &mut frames {
            Gen::New { vip, flow, .. } => frame(vip, 0, *flow).len(),
            other => other.next(0).len(),
        };
        Case {
            name: name.to_owned(),
            kind,
            prog,
            action,
            frames,
            frame_bytes,
            samples: Vec::new(),
            round_medians: Vec::new(),
        }
    }
}

/// Runs the first packet of each of `TRACKED_FLOWS` flows to `vip` (a SYN, or
/// the first datagram) so the program tracks them, and returns the frames of
/// the flows' next packets.
fn warm(dp: &Dataplane, vip: &str, udp: bool, base: u64) -> Vec<Vec<u8>> {
    let vip: Vip = vip.parse().expect("valid VIP");
    let prog = dp.program(prog_names::BALANCER).expect("balancer program");
    let (first, next) = if udp {
        (Flow::Udp, Flow::Udp)
    } else {
        (Flow::Tcp { syn: true }, Flow::Tcp { syn: false })
    };
    (0..TRACKED_FLOWS as u64)
        .map(|n| {
            let (action, _) = run_once(prog, &frame(&vip, base + n, first));
            assert_eq!(
                action, XDP_TX,
                "warming flow {n} of {vip}: the first packet was not forwarded"
            );
            frame(&vip, base + n, next)
        })
        .collect()
}

/// The event counters by name.
fn events(dp: &Dataplane) -> BTreeMap<&'static str, u64> {
    dp.events().expect("reading events").into_iter().collect()
}

fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    }
}

/// The tunnelled form of a client's TCP segment to `vip`, addressed to `real`.
fn tunnelled(vip: &str, real: IpAddr) -> Vec<u8> {
    let vip: Vip = vip.parse().expect("valid VIP");
    let inner = frame(&vip, 7, Flow::Tcp { syn: false });
    let src: IpAddr = match real {
        IpAddr::V4(_) => Ipv4Addr::new(192, 0, 2, 1).into(),
        IpAddr::V6(_) => Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1).into(),
    };
    packet::tunnel(
        src,
        real,
        L2::default(),
        [0x02, 0, 0, 0, 0, 0x11],
        0x12345,
        &inner[14..],
    )
}

pub fn run(quick: bool, cpu: usize) -> PerPacket {
    let (rounds, per_round) = if quick { (2, 2_000) } else { (5, 20_000) };
    // The whole section runs on one thread pinned to one CPU: the per-CPU LRU
    // lists of conntrack and the counters all stay on it too.
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::pin_to_cpu(cpu);
            measure(rounds, per_round, cpu)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn measure(rounds: usize, per_round: usize, cpu: usize) -> PerPacket {
    let (dp, _state) = configured_balancer();
    let floors = load_floors();
    let mut decap = Decap::load().unwrap_or_else(|e| panic!("loading the decap object: {e}"));
    let real4 = real(true, 10);
    let real6 = real(false, 10);
    for a in [real4, real6] {
        decap
            .add_addr(a)
            .unwrap_or_else(|e| panic!("decap address {a}: {e}"));
    }
    let vip = |s: &str| -> Vip { s.parse().expect("valid VIP") };
    let new = |v: &str, flow: Flow, base: u64| Gen::New {
        vip: vip(v),
        flow,
        next: base,
    };
    let syn = Flow::Tcp { syn: true };
    // Tracked flows and new flows use disjoint client ranges (new ones start high).
    let tracked_tcp = warm(&dp, "203.0.113.10:80/tcp", false, 0);
    let tracked_udp = warm(&dp, "203.0.113.10:53/udp", true, 0);
    let tracked_v6 = warm(&dp, "[2001:db8:203::10]:80/tcp", false, 0);
    let tracked_tun = warm(&dp, "203.0.113.20:80/tcp", false, 0);
    let tracked_tun6 = warm(&dp, "[2001:db8:203::20]:80/tcp", false, 0);
    let first_frame = tracked_tcp[0].clone();
    let hot_frame = tracked_tcp[0].clone();
    let non_vip = packet::tcp(
        Ipv4Addr::new(192, 0, 2, 1),
        40000,
        Ipv4Addr::new(198, 51, 100, 200),
        80,
        false,
        &[],
    );
    let base = 1 << 22;
    let mut cases = vec![
        Case::new(
            "floor: XDP_PASS",
            "floor",
            Prog::FloorPass,
            XDP_PASS,
            Gen::Fixed(first_frame.clone()),
        ),
        Case::new(
            FLOOR_TX_NAME,
            "floor",
            Prog::FloorTx,
            XDP_TX,
            Gen::Fixed(first_frame),
        ),
        Case::new(
            "TCP SYN, new flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            new("203.0.113.11:80/tcp", syn, base),
        ),
        Case::new(
            "TCP, tracked flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Cycle(tracked_tcp),
        ),
        Case::new(
            HOT_TRACKED,
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Fixed(hot_frame),
        ),
        Case::new(
            "UDP, new flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            new("203.0.113.11:53/udp", Flow::Udp, base),
        ),
        Case::new(
            "UDP, tracked flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Cycle(tracked_udp),
        ),
        Case::new(
            "IPv6 TCP SYN, new flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            new("[2001:db8:203::11]:80/tcp", syn, base),
        ),
        Case::new(
            "IPv6 TCP, tracked flow (DR)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Cycle(tracked_v6),
        ),
        Case::new(
            "TCP SYN, new flow (TUN, IPIP)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            new("203.0.113.21:80/tcp", syn, base),
        ),
        Case::new(
            "TCP, tracked flow (TUN, IPIP)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Cycle(tracked_tun),
        ),
        Case::new(
            "IPv6 TCP SYN, new flow (TUN, IP6IP6)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            new("[2001:db8:203::21]:80/tcp", syn, base),
        ),
        Case::new(
            "IPv6 TCP, tracked flow (TUN, IP6IP6)",
            "balancer",
            Prog::Balancer,
            XDP_TX,
            Gen::Cycle(tracked_tun6),
        ),
        Case::new(
            NON_VIP,
            "balancer",
            Prog::Balancer,
            XDP_PASS,
            Gen::Fixed(non_vip),
        ),
        Case::new(
            "decap IPIP (real server)",
            "decap",
            Prog::Decap,
            XDP_PASS,
            Gen::Fixed(tunnelled("203.0.113.20:80/tcp", real4)),
        ),
        Case::new(
            "decap IP6IP6 (real server)",
            "decap",
            Prog::Decap,
            XDP_PASS,
            Gen::Fixed(tunnelled("[2001:db8:203::20]:80/tcp", real6)),
        ),
    ];
    let balancer = dp.program(prog_names::BALANCER).expect("balancer program");
    let decap_prog = decap.program().expect("decap program");
    let pass = xdp(&floors, FLOOR_PASS);
    let tx = xdp(&floors, FLOOR_TX);
    let decap_before = decap.counters().expect("decap counters");
    let events_before = events(&dp);
    for round in 0..rounds {
        xlb_tests::harness::check_interrupted();
        for case in &mut cases {
            let prog = match case.prog {
                Prog::FloorPass => pass,
                Prog::FloorTx => tx,
                Prog::Balancer => balancer,
                Prog::Decap => decap_prog,
            };
            let mut round_samples = Vec::with_capacity(per_round);
            for i in 0..per_round {
                let frame = case.frames.next(round * per_round + i);
                let (action, ns) = run_once(prog, &frame);
                assert_eq!(
                    action,
                    case.action,
                    "{}: call {i} of round {round} returned {} instead of {}: the case measures \
                     the wrong path",
                    case.name,
                    action_name(action),
                    action_name(case.action)
                );
                round_samples.push(ns);
            }
            round_samples.sort_unstable();
            let m: Vec<f64> = round_samples.iter().map(|&n| n as f64).collect();
            case.round_medians.push(median_sorted(&m));
            case.samples.extend_from_slice(&round_samples);
        }
        eprintln!("xlb-bench:   round {} of {rounds} done", round + 1);
    }
    // The tracked cases really hit conntrack on every call (nothing evicted),
    // and every new flow was inserted.
    let events_after = events(&dp);
    let delta = |name: &str| events_after[name] - events_before[name];
    let tracked_calls = cases
        .iter()
        .filter(|c| c.name.contains("tracked"))
        .map(|c| c.samples.len() as u64)
        .sum::<u64>();
    assert_eq!(
        delta("conntrack_hit"),
        tracked_calls,
        "conntrack hits differ from the tracked cases' calls: a tracked case measured another \
         path (events: {events_after:?})"
    );
    assert_eq!(
        delta("conntrack_insert_failed"),
        0,
        "conntrack inserts failed during the run (events: {events_after:?})"
    );
    // The decap cases really decapsulated (not passed as "not local").
    let decap_after = decap.counters().expect("decap counters");
    for name in ["decap_ipip", "decap_ip6ip6"] {
        let count = |v: &[(&str, lb_common::Counter)]| {
            v.iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, c)| c.packets)
        };
        let done = count(&decap_after) - count(&decap_before);
        assert!(
            done >= (rounds * per_round) as u64,
            "the decap program counted {done} {name} packets, expected {}: decap_cases \
             measure the wrong path (counters: {decap_after:?})",
            rounds * per_round
        );
    }
    let tx_medians = cases
        .iter()
        .find(|c| c.prog == Prog::FloorTx)
        .map(|c| c.round_medians.clone())
        .expect("the XDP_TX floor");
    let pass_medians = cases
        .iter()
        .find(|c| c.prog == Prog::FloorPass)
        .map(|c| c.round_medians.clone())
        .expect("the XDP_PASS floor");
    let ratio = |m: &[f64], floor: &[f64]| {
        Spread::of(
            &m.iter()
                .zip(floor)
                .map(|(a, b)| a / b)
                .collect::<Vec<f64>>(),
        )
    };
    let out = cases
        .into_iter()
        .map(|mut c| {
            c.samples.sort_unstable();
            let n = c.samples.len();
            let mean = c.samples.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
            PacketCase {
                name: c.name,
                kind: c.kind.to_owned(),
                action: action_name(c.action).to_owned(),
                frame_bytes: c.frame_bytes,
                calls: n,
                mean_ns: mean,
                median_ns: percentile(&c.samples, 50.0),
                p99_ns: percentile(&c.samples, 99.0),
                ratio_tx_floor: ratio(&c.round_medians, &tx_medians),
                ratio_pass_floor: ratio(&c.round_medians, &pass_medians),
                round_medians_ns: c.round_medians,
            }
        })
        .collect();
    PerPacket {
        vips: VIPS,
        reals_per_vip: REALS_PER_VIP,
        table_size: RING_SIZE_DEFAULT,
        conntrack: FLOWS,
        tracked_flows: TRACKED_FLOWS,
        rounds,
        calls_per_round: per_round,
        cpu,
        cases: out,
    }
}
