//! Section 1, per-packet cost: BPF_PROG_TEST_RUN of the real balancer object, one
//! fresh packet per call (`repeat = 1`), against two floor programs measured
//! the same way in the same rounds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::MapData;
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{Config, FlowKey, FlowState, RING_SIZE_DEFAULT, prog_names};
use lb_userspace::chain::Chain;
use lb_userspace::conntrack::Table;
use lb_userspace::{
    dataplane::{Dataplane, LoadOptions},
    decap::{Decap, DecapSettings},
    desired::{Desired, Edit, RealSpec, ServiceSpec, VipOptions},
    model::{Forward, Scheduler, Vip, addr_bytes},
    state::{State, writer::PauseHook},
};
use xlb_tests::packet::{self, L2, L4, LB_MAC};

use crate::report::{
    DECAP_IP6IP6, DECAP_IPIP, FLOOR_TX as FLOOR_TX_NAME, FULL_TABLE_SYN, HOT_TRACKED, NON_VIP,
    PacketCase, PerPacket, Spread, TUN_ONE_SOURCE, median_sorted, percentile,
};
use crate::sync::{FIRST_HIT_OFF, FIRST_HIT_ON, MISS_OFF, MISS_ON, MISS_PEER, SYN_ON, TRACKED_ON};

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// A configuration the per-packet cases run against.
#[derive(Clone, Copy)]
pub struct Scale {
    /// Short name in the report.
    pub name: &'static str,
    pub vips: usize,
    pub reals_per_vip: usize,
    /// Maglev table size of every VIP.
    pub table_size: u32,
}

/// The heavy configuration: 16 VIPs × 100 reals, 65,537-slot tables.
pub const HEAVY: Scale = Scale {
    name: "16 VIPs × 100 reals",
    vips: 16,
    reals_per_vip: 100,
    table_size: RING_SIZE_DEFAULT,
};

/// Many VIPs: 1,000 VIPs × 10 reals, 8,191-slot tables (the ring pool holds
/// 1,000 VIPs at that size, two ranges each).
pub const MANY: Scale = Scale {
    name: "1,000 VIPs × 10 reals",
    vips: 1000,
    reals_per_vip: 10,
    table_size: 8191,
};

/// VIPs of each kind in [`MANY`] (TCP DR, UDP DR, IPv6 TCP DR, TCP TUN, IPv6
/// TCP TUN), 1,000 in all.
const MANY_KINDS: [usize; 5] = [400, 150, 150, 150, 150];
const _: () =
    assert!(MANY_KINDS[0] + MANY_KINDS[1] + MANY_KINDS[2] + MANY_KINDS[3] + MANY_KINDS[4] == 1000);
/// Flows the tracked cases cycle through.
const TRACKED_FLOWS: usize = 4096;
/// Conntrack size: twice the default (the full-table cases fill it to this
/// many flows).
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
        sync: 0,
        _pad: 0,
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

/// The VIPs of each kind a configuration's cases send to: tracked flows and
/// new flows go to these, flow `n` to VIP `n % len`.
#[derive(Clone, Default)]
struct Kinds {
    tcp: Vec<Vip>,
    udp: Vec<Vip>,
    tcp6: Vec<Vip>,
    tun: Vec<Vip>,
    tun6: Vec<Vip>,
}

/// The services of `scale` (VIP, mode), the VIPs the tracked cases use and
/// those the new-flow cases use.
fn services(scale: Scale) -> (Vec<(Vip, Forward)>, Kinds, Kinds) {
    let vip = |s: &str| -> Vip { s.parse().expect("valid VIP") };
    if scale.vips == HEAVY.vips {
        let list: Vec<(Vip, Forward)> = [
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
        .into_iter()
        .map(|(v, f)| (vip(v), f))
        .collect();
        let kinds = |last: u8| Kinds {
            tcp: vec![vip(&format!("203.0.113.1{last}:80/tcp"))],
            udp: vec![vip(&format!("203.0.113.1{last}:53/udp"))],
            tcp6: vec![vip(&format!("[2001:db8:203::1{last}]:80/tcp"))],
            tun: vec![vip(&format!("203.0.113.2{last}:80/tcp"))],
            tun6: vec![vip(&format!("[2001:db8:203::2{last}]:80/tcp"))],
        };
        return (list, kinds(0), kinds(1));
    }
    // Many VIPs: IPv4 ones on 250 addresses, several ports each; IPv6 ones
    // one address each.
    let mut list = Vec::new();
    let mut kinds = Kinds::default();
    for (k, &count) in MANY_KINDS.iter().enumerate() {
        for j in 0..count {
            let host = j % 250 + 1;
            let port = 10_000 + k * 100 + j / 250;
            let (text, forward, bucket) = match k {
                0 => (
                    format!("203.0.113.{host}:{port}/tcp"),
                    Forward::Dr,
                    &mut kinds.tcp,
                ),
                1 => (
                    format!("203.0.113.{host}:{port}/udp"),
                    Forward::Dr,
                    &mut kinds.udp,
                ),
                2 => (
                    format!("[2001:db8:203::{:x}]:80/tcp", k * 1000 + j),
                    Forward::Dr,
                    &mut kinds.tcp6,
                ),
                3 => (
                    format!("203.0.113.{host}:{port}/tcp"),
                    Forward::Tun,
                    &mut kinds.tun,
                ),
                _ => (
                    format!("[2001:db8:203::{:x}]:80/tcp", k * 1000 + j),
                    Forward::Tun,
                    &mut kinds.tun6,
                ),
            };
            let v = vip(&text);
            bucket.push(v);
            list.push((v, forward));
        }
    }
    (list, kinds.clone(), kinds)
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

/// Loads the balancer and configures the heavy 16 × 100 state through `State::edit`.
pub fn configured_balancer() -> (Dataplane, State) {
    let (dp, state, _, _) = configured(HEAVY);
    (dp, state)
}

/// Loads the balancer and configures `scale` through `State::edit`; also
/// returns the VIPs of the tracked and of the new-flow cases.
fn configured(scale: Scale) -> (Dataplane, State, Kinds, Kinds) {
    let mut dp = Dataplane::load_with(&LoadOptions {
        flows: FLOWS,
        pin: None,
    })
    .unwrap_or_else(|e| panic!("loading the balancer object: {} (needs root)", Chain(&e)));
    dp.set_config(&config())
        .unwrap_or_else(|e| panic!("writing the config map: {}", Chain(&e)));
    let mut desired = Desired::default();
    let mut macs = BTreeMap::new();
    let (list, tracked, new) = services(scale);
    assert_eq!(list.len(), scale.vips);
    for (vip, forward) in list {
        let v4 = vip.addr.is_ipv4();
        let reals = (0..scale.reals_per_vip)
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
                    table_size: scale.table_size,
                },
                health: None,
                reals,
            },
        );
    }
    let mut state = State::new(0.5);
    state
        .edit(&mut dp, Edit::Replace(desired), &macs, PauseHook::default())
        .unwrap_or_else(|e| panic!("configuring {}: {}", scale.name, Chain(&e)));
    (dp, state, tracked, new)
}

/// Loads the floor programs.
pub fn load_floors() -> Ebpf {
    let mut ebpf = Ebpf::load(lb_userspace::bench::FLOOR_OBJECT)
        .unwrap_or_else(|e| panic!("loading the floor object: {}", Chain(&e)));
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
    /// A new flow per call: frame(vips[k % len], base + k) for the k-th call.
    New {
        vips: Vec<Vip>,
        flow: Flow,
        next: u64,
    },
    /// Cycles through `frames`.
    Cycle(Vec<Vec<u8>>),
}

impl Gen {
    fn next(&mut self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Gen::Fixed(f) => std::borrow::Cow::Borrowed(f),
            Gen::New { vips, flow, next } => {
                *next += 1;
                let vip = &vips[(*next % vips.len() as u64) as usize];
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
    /// The balancer of a second data path whose conntrack table is full.
    BalancerFull,
    Decap,
}

/// What happens before each call of a case (not timed).
enum Setup {
    Nothing,
    /// Writes this conntrack entry, not yet reported to flow sync and
    /// stamped now (so the call refreshes no stamp).
    Reset(FlowKey, FlowState),
    /// Deletes this conntrack entry (the call misses).
    Delete(FlowKey),
}

struct Case {
    name: String,
    kind: &'static str,
    prog: Prog,
    action: u32,
    frames: Gen,
    /// `Config::sync` the case runs with.
    sync: bool,
    /// One IPv4 tunnel source address instead of the prefix (see [`set_config`]).
    one_source: bool,
    setup: Setup,
    frame_bytes: usize,
    samples: Vec<u64>,
    round_medians: Vec<f64>,
    round_means: Vec<f64>,
}

impl Case {
    fn new(name: &str, kind: &'static str, prog: Prog, action: u32, frames: Gen) -> Case {
        let mut frames = frames;
        let frame_bytes = match &mut frames {
            Gen::New { vips, flow, .. } => frame(&vips[0], 0, *flow).len(),
            other => other.next(0).len(),
        };
        Case {
            name: name.to_owned(),
            kind,
            prog,
            action,
            frames,
            sync: false,
            one_source: false,
            setup: Setup::Nothing,
            frame_bytes,
            samples: Vec::new(),
            round_medians: Vec::new(),
            round_means: Vec::new(),
        }
    }
}

/// Runs the first two packets of each of `TRACKED_FLOWS` flows (flow `n` to
/// `vips[n % len]`; a SYN, or the first datagram, then the next packet: the
/// first hit, which marks the flow answered and records its key) so the
/// program tracks them as established flows, and returns the frames of the
/// flows' next packets (the measured calls: hits that write nothing but a
/// stamp).
fn warm(dp: &Dataplane, vips: &[Vip], udp: bool, base: u64) -> Vec<Vec<u8>> {
    let prog = dp.program(prog_names::BALANCER).expect("balancer program");
    let (first, next) = if udp {
        (Flow::Udp, Flow::Udp)
    } else {
        (Flow::Tcp { syn: true }, Flow::Tcp { syn: false })
    };
    (0..TRACKED_FLOWS as u64)
        .map(|n| {
            let vip = &vips[(n % vips.len() as u64) as usize];
            let (action, _) = run_once(prog, &frame(vip, base + n, first));
            assert_eq!(
                action, XDP_TX,
                "warming flow {n} of {vip}: the first packet was not forwarded"
            );
            let next = frame(vip, base + n, next);
            let (action, _) = run_once(prog, &next);
            assert_eq!(
                action, XDP_TX,
                "warming flow {n} of {vip}: the second packet was not forwarded"
            );
            next
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

/// Measures every case in the heavy configuration (with the decap cases),
/// then the balancer cases again with many VIPs.
pub fn run(quick: bool, cpu: usize) -> Vec<PerPacket> {
    let (rounds, per_round) = if quick { (2, 2_000) } else { (5, 20_000) };
    // The whole section runs on one thread pinned to one CPU: the per-CPU
    // clock cache, rate windows and counters all stay on it too.
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::pin_to_cpu(cpu);
            [HEAVY, MANY]
                .into_iter()
                .map(|scale| measure(scale, rounds, per_round, cpu))
                .collect()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Flow `n`'s conntrack key (an IPv4 client of [`frame`]) to `vip`.
fn flow_key(vip: &Vip, n: u64) -> FlowKey {
    let (client, port) = client_v4(n);
    let (src, family) = addr_bytes(client.into());
    let (dst, _) = addr_bytes(vip.addr);
    FlowKey {
        src,
        dst,
        ports: (u32::from(port) << 16) | u32::from(vip.port),
        proto: vip.proto.number(),
        family,
        _pad: [0; 2],
    }
}

/// CLOCK_MONOTONIC_COARSE, the clock of `bpf_ktime_get_coarse_ns`.
fn coarse_now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .unwrap_or_else(|e| panic!("clock_gettime: {e}"));
    u64::try_from(t.tv_sec()).expect("after boot") * 1_000_000_000
        + u64::try_from(t.tv_nsec()).expect("below a second")
}

/// Fills `dp`'s conntrack table with [`FLOWS`] flows to an address no case
/// sends to, stamped now.
fn fill(dp: &Dataplane) {
    let started = std::time::Instant::now();
    let flows = dp.flows();
    let vip: Vip = "192.0.2.99:80/tcp".parse().expect("VIP");
    let state = FlowState {
        real_id: 1,
        generation: 0,
        last_seen_ns: coarse_now_ns(),
        hash: 0,
        flags: 0,
    };
    for n in 0..u64::from(FLOWS) {
        flows.insert(&flow_key(&vip, n), &state);
    }
    eprintln!(
        "xlb-bench:   conntrack table of the full-table case filled ({FLOWS} entries, {:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Runs a case's setup before a call.
fn prepare(flows: &Table, setup: &Setup) {
    match setup {
        Setup::Nothing => {}
        Setup::Reset(key, state) => {
            let state = FlowState {
                last_seen_ns: coarse_now_ns(),
                ..*state
            };
            flows.insert(key, &state);
        }
        Setup::Delete(key) => {
            // Absent before the first call. A delete that failed otherwise
            // would make the call a conntrack hit, which the check of the
            // hits after the rounds catches.
            flows.remove(key);
        }
    }
}

/// Writes the config with `Config::sync` on or off and, with `one_source`,
/// one IPv4 tunnel source address (a /32, the daemon's default) instead of
/// the /24 whose host bits the other cases' IPIP flows spread over.
fn set_config(dp: &mut Dataplane, sync: bool, one_source: bool) {
    let base = config();
    let (tun_src_v4, tun_host_v4) = if one_source {
        ([192, 0, 2, 1], 0)
    } else {
        (base.tun_src_v4, base.tun_host_v4)
    };
    dp.set_config(&Config {
        sync: u8::from(sync),
        tun_src_v4,
        tun_host_v4,
        ..base
    })
    .unwrap_or_else(|e| panic!("writing the config map: {}", Chain(&e)));
}

/// Empties flow sync's report ring; returns how many reports it held.
fn drain(ring: &mut aya::maps::RingBuf<MapData>) -> u64 {
    let mut n = 0;
    while let Some(item) = ring.next() {
        drop(item);
        n += 1;
    }
    n
}

/// The flow sync cases, each beside the same path with `Config::sync = 0`
/// (the sync-off tracked and SYN cases are the table's own): flows to `vip`,
/// new flows to `new_vips` from client `base` on. Returns them with flow
/// sync's maps, which the cases' setup writes and the run drains.
fn sync_cases(
    dp: &mut Dataplane,
    vip: &Vip,
    tracked: Vec<Vec<u8>>,
    new_vips: &[Vip],
    base: u64,
) -> (Vec<Case>, lb_userspace::flowsync::Maps) {
    let mut maps = dp
        .sync_maps()
        .unwrap_or_else(|e| panic!("flow sync's maps: {e}"));
    // Every tracked flow reports its confirmation once, here: the measured
    // calls see flows already reported, as a long flow's packets do.
    set_config(dp, true, false);
    let prog = dp.program(prog_names::BALANCER).expect("balancer program");
    for f in &tracked {
        assert_eq!(run_once(prog, f).0, XDP_TX, "a tracked flow's packet");
    }
    set_config(dp, false, false);
    let reported = drain(&mut maps.events);
    assert_eq!(
        reported, TRACKED_FLOWS as u64,
        "the tracked flows' first hits reported {reported} flows"
    );
    // Flows of their own: one whose entry is reset before each call (its first
    // hit, the reporting packet), one whose entry is deleted (a plain miss),
    // one deleted but in the peer flows (the promotion path).
    let prog = dp.program(prog_names::BALANCER).expect("balancer program");
    let track = |n: u64| {
        let (action, _) = run_once(prog, &frame(vip, n, Flow::Tcp { syn: true }));
        assert_eq!(action, XDP_TX, "the SYN of flow {n} to {vip}");
        let key = flow_key(vip, n);
        let state = dp
            .flow(&key)
            .unwrap_or_else(|e| panic!("reading conntrack: {e}"))
            .unwrap_or_else(|| panic!("flow {n} to {vip} is not tracked after its SYN"));
        (key, state)
    };
    let (first_key, first_state) = track(base);
    let first = FlowState {
        flags: 0,
        ..first_state
    };
    let miss_key = flow_key(vip, base + 1);
    let (peer_key, mut peer_state) = track(base + 2);
    // A peer flow names the real's whole generation (the conntrack entry
    // keeps only its low bits).
    peer_state.generation = dp
        .live_reals()
        .unwrap_or_else(|e| panic!("reading the reals: {e}"))
        .into_iter()
        .find(|(id, _)| *id == peer_state.real_id)
        .map(|(_, def)| def.generation)
        .unwrap_or_else(|| panic!("the peer flow's real {} is gone", peer_state.real_id));
    maps.peer_flows
        .insert(&peer_key, &peer_state, 0)
        .unwrap_or_else(|e| panic!("writing a peer flow: {e}"));
    let next = |n: u64| Gen::Fixed(frame(vip, n, Flow::Tcp { syn: false }));
    let case = |name: &str, sync: bool, frames: Gen, setup: Setup| Case {
        sync,
        setup,
        ..Case::new(name, "sync", Prog::Balancer, XDP_TX, frames)
    };
    let cases = vec![
        case(TRACKED_ON, true, Gen::Cycle(tracked), Setup::Nothing),
        case(
            SYN_ON,
            true,
            Gen::New {
                vips: new_vips.to_vec(),
                flow: Flow::Tcp { syn: true },
                next: base + (1 << 19),
            },
            Setup::Nothing,
        ),
        case(
            FIRST_HIT_OFF,
            false,
            next(base),
            Setup::Reset(first_key, first),
        ),
        case(
            FIRST_HIT_ON,
            true,
            next(base),
            Setup::Reset(first_key, first),
        ),
        case(MISS_OFF, false, next(base + 1), Setup::Delete(miss_key)),
        case(MISS_ON, true, next(base + 1), Setup::Delete(miss_key)),
        case(MISS_PEER, true, next(base + 2), Setup::Delete(peer_key)),
    ];
    (cases, maps)
}

fn measure(scale: Scale, rounds: usize, per_round: usize, cpu: usize) -> PerPacket {
    eprintln!("xlb-bench:   configuration {}", scale.name);
    let (mut dp, _state, tracked, new_vips) = configured(scale);
    // A second data path configured alike, whose conntrack table is full (as
    // a busy balancer's is): every new flow's insert there first evicts the
    // least recently used entry.
    let (full_dp, _full_state, _, _) = configured(scale);
    fill(&full_dp);
    let floors = load_floors();
    let with_decap = scale.vips == HEAVY.vips;
    let real4 = real(true, 10);
    let real6 = real(false, 10);
    // The balancers' tunnel sources, as a deployment gives them (--allow-src).
    let settings = DecapSettings::new(
        &[real4, real6],
        &[
            (Ipv4Addr::new(192, 0, 2, 0).into(), 24),
            (Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0).into(), 96),
        ],
    )
    .unwrap_or_else(|e| panic!("decap endpoints and sources: {e}"));
    let decap = Decap::load(&settings).unwrap_or_else(|e| panic!("loading the decap object: {e}"));
    let new = |vips: &[Vip], flow: Flow, base: u64| Gen::New {
        vips: vips.to_vec(),
        flow,
        next: base,
    };
    let syn = Flow::Tcp { syn: true };
    // Tracked flows and new flows use disjoint client ranges (new ones start high).
    let tracked_tcp = warm(&dp, &tracked.tcp, false, 0);
    let tracked_tcp_sync = tracked_tcp.clone();
    let tracked_udp = warm(&dp, &tracked.udp, true, 0);
    let tracked_v6 = warm(&dp, &tracked.tcp6, false, 0);
    let tracked_tun = warm(&dp, &tracked.tun, false, 0);
    let tracked_tun6 = warm(&dp, &tracked.tun6, false, 0);
    // Flows of their own (clients above the others' tracked ones), so that
    // the case before does not warm their lines.
    let tracked_tun_one = warm(&dp, &tracked.tun, false, 1 << 21);
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
    let balancer_case = |name: &str, action: u32, frames: Gen| {
        Case::new(name, "balancer", Prog::Balancer, action, frames)
    };
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
        balancer_case(
            "TCP SYN, new flow (DR)",
            XDP_TX,
            new(&new_vips.tcp, syn, base),
        ),
        balancer_case("TCP, tracked flow (DR)", XDP_TX, Gen::Cycle(tracked_tcp)),
        balancer_case(HOT_TRACKED, XDP_TX, Gen::Fixed(hot_frame)),
        balancer_case(
            "UDP, new flow (DR)",
            XDP_TX,
            new(&new_vips.udp, Flow::Udp, base),
        ),
        balancer_case("UDP, tracked flow (DR)", XDP_TX, Gen::Cycle(tracked_udp)),
        balancer_case(
            "IPv6 TCP SYN, new flow (DR)",
            XDP_TX,
            new(&new_vips.tcp6, syn, base),
        ),
        balancer_case(
            "IPv6 TCP, tracked flow (DR)",
            XDP_TX,
            Gen::Cycle(tracked_v6),
        ),
        balancer_case(
            "TCP SYN, new flow (TUN, IPIP)",
            XDP_TX,
            new(&new_vips.tun, syn, base),
        ),
        balancer_case(
            "TCP, tracked flow (TUN, IPIP)",
            XDP_TX,
            Gen::Cycle(tracked_tun),
        ),
        Case {
            one_source: true,
            ..balancer_case(TUN_ONE_SOURCE, XDP_TX, Gen::Cycle(tracked_tun_one))
        },
        balancer_case(
            "IPv6 TCP SYN, new flow (TUN, IP6IP6)",
            XDP_TX,
            new(&new_vips.tun6, syn, base),
        ),
        balancer_case(
            "IPv6 TCP, tracked flow (TUN, IP6IP6)",
            XDP_TX,
            Gen::Cycle(tracked_tun6),
        ),
        balancer_case(NON_VIP, XDP_PASS, Gen::Fixed(non_vip)),
        Case::new(
            FULL_TABLE_SYN,
            "balancer",
            Prog::BalancerFull,
            XDP_TX,
            new(&new_vips.tcp, syn, base),
        ),
    ];
    if with_decap {
        cases.push(Case::new(
            DECAP_IPIP,
            "decap",
            Prog::Decap,
            XDP_PASS,
            Gen::Fixed(tunnelled("203.0.113.20:80/tcp", real4)),
        ));
        cases.push(Case::new(
            DECAP_IP6IP6,
            "decap",
            Prog::Decap,
            XDP_PASS,
            Gen::Fixed(tunnelled("[2001:db8:203::20]:80/tcp", real6)),
        ));
    }
    // Flow sync's cases, in the heavy configuration only.
    let mut sync_maps = with_decap.then(|| {
        let (sync_cases, maps) = sync_cases(
            &mut dp,
            &tracked.tcp[0],
            tracked_tcp_sync,
            &new_vips.tcp,
            base + (1 << 20),
        );
        cases.extend(sync_cases);
        maps
    });
    let mut reports = 0u64;
    let mut settings_now = (false, false);
    let decap_prog = decap.program().expect("decap program");
    let pass = xdp(&floors, FLOOR_PASS);
    let tx = xdp(&floors, FLOOR_TX);
    let decap_before = decap.counters().expect("decap counters");
    let events_before = events(&dp);
    let full_before = events(&full_dp);
    for round in 0..rounds {
        xlb_tests::harness::check_interrupted();
        for case in &mut cases {
            if (case.sync, case.one_source) != settings_now {
                set_config(&mut dp, case.sync, case.one_source);
                settings_now = (case.sync, case.one_source);
            }
            let prog = match case.prog {
                Prog::FloorPass => pass,
                Prog::FloorTx => tx,
                Prog::Balancer => dp.program(prog_names::BALANCER).expect("balancer program"),
                Prog::BalancerFull => full_dp
                    .program(prog_names::BALANCER)
                    .expect("balancer program"),
                Prog::Decap => decap_prog,
            };
            let mut round_samples = Vec::with_capacity(per_round);
            for i in 0..per_round {
                if let Some(maps) = &mut sync_maps {
                    prepare(&maps.flows, &case.setup);
                    // Drained well before the ring (8,192 reports) fills.
                    if case.sync && i % 1024 == 0 {
                        reports += drain(&mut maps.events);
                    }
                }
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
            case.round_means
                .push(m.iter().sum::<f64>() / m.len().max(1) as f64);
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
    // Every SYN into the full table was a new flow, inserted (over an
    // evicted entry).
    let full_after = events(&full_dp);
    let full_calls = cases
        .iter()
        .find(|c| c.prog == Prog::BalancerFull)
        .map_or(0, |c| c.samples.len() as u64);
    assert_eq!(
        (
            full_after["conntrack_new"] - full_before["conntrack_new"],
            full_after["conntrack_insert_failed"] - full_before["conntrack_insert_failed"]
        ),
        (full_calls, 0),
        "the full table's SYNs were not all inserted as new flows (events: {full_after:?})"
    );
    // Flow sync's cases: the reporting case reported on every call and only
    // it did, no report was lost, and the promotion case took its real
    // from the peer flows every time.
    if let Some(maps) = &mut sync_maps {
        reports += drain(&mut maps.events);
        let calls = |name: &str| {
            cases
                .iter()
                .find(|c| c.name == name)
                .map_or(0, |c| c.samples.len() as u64)
        };
        assert_eq!(
            reports,
            calls(FIRST_HIT_ON),
            "the ring carried {reports} reports for {} calls of the reporting case",
            calls(FIRST_HIT_ON)
        );
        assert_eq!(
            delta("sync_report_lost"),
            0,
            "reports were lost to a full ring (events: {events_after:?})"
        );
        assert_eq!(
            delta("conntrack_peer_hit"),
            calls(MISS_PEER),
            "the promotion case did not take every flow from the peer flows (events: \
             {events_after:?})"
        );
    }
    // The decap cases really decapsulated (not passed as "not local").
    if with_decap {
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
    }
    let floor_of = |prog: Prog| {
        let c = cases
            .iter()
            .find(|c| c.prog == prog)
            .expect("the floors run in every configuration");
        (c.round_medians.clone(), c.round_means.clone())
    };
    let (tx_medians, tx_means) = floor_of(Prog::FloorTx);
    let (pass_medians, _) = floor_of(Prog::FloorPass);
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
                ratio_tx_floor_mean: ratio(&c.round_means, &tx_means),
                ratio_pass_floor: ratio(&c.round_medians, &pass_medians),
                round_medians_ns: c.round_medians,
                round_means_ns: c.round_means,
            }
        })
        .collect();
    PerPacket {
        config: scale.name.to_owned(),
        vips: scale.vips,
        reals_per_vip: scale.reals_per_vip,
        table_size: scale.table_size,
        conntrack: FLOWS,
        tracked_flows: TRACKED_FLOWS,
        rounds,
        calls_per_round: per_round,
        cpu,
        cases: out,
    }
}
