//! Section 2, throughput with live frames: BPF_PROG_TEST_RUN in XDP live-frames mode,
//! ingress on a veth in a namespace of our own, XDP_TX frames leaving through
//! it to a peer that drops them in XDP.

use std::net::Ipv4Addr;
use std::sync::Barrier;
use std::time::Instant;

use aya::{
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, XdpMode},
};
use lb_common::{prog_names, stat};
use xlb_tests::netns::{Netns, unique_prefix};
use xlb_tests::packet;

use crate::per_packet::{
    self, FLOOR_DROP, FLOOR_TX, LIVE_RESTORE, XDP_TX, configured_balancer, load_floors, xdp,
};
use crate::report::{Live, LiveCase, Spread};

/// Frame length the restore program writes back (see lb-floor.rs).
const FRAME_LEN: usize = 64;
/// Frames per batch (the kernel's maximum is 256).
const BATCH: u32 = 64;

/// The ingress veth inside the namespace, and its peer.
const DEV: &str = "lv0";
const PEER: &str = "lv1";

/// `struct xdp_md` as BPF_PROG_TEST_RUN's ctx_in: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_md(ifindex: u32) -> [u8; 24] {
    let fields = [0u32, FRAME_LEN as u32, 0, ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, f) in out.as_chunks_mut::<4>().0.iter_mut().zip(fields) {
        chunk.copy_from_slice(&f.to_ne_bytes());
    }
    out
}

/// A 64-byte TCP segment (ACK, 10 payload bytes) of the tracked bench flow to `vip`.
fn frame_to(vip: Ipv4Addr, syn: bool) -> Vec<u8> {
    let f = packet::tcp(
        Ipv4Addr::new(192, 0, 2, 99),
        40_999,
        vip,
        80,
        syn,
        &[0u8; 10],
    );
    assert_eq!(f.len(), FRAME_LEN, "live frames are {FRAME_LEN} bytes");
    f
}

pub fn run(quick: bool, cpu: usize) -> Live {
    let (frames, runs) = if quick {
        (300_000u64, 1)
    } else {
        (3_000_000u64, 3)
    };
    let ns = Netns::new(&format!("{}-live", unique_prefix("bl")));
    ns.ip(&format!(
        "link add name {DEV} numtxqueues 2 numrxqueues 2 type veth peer name {PEER} \
         numtxqueues 2 numrxqueues 2"
    ));
    ns.ip(&format!("link set dev {DEV} up"));
    ns.ip(&format!("link set dev {PEER} up"));
    let cases = ns.run_in(|| measure(frames, runs, cpu));
    drop(ns);
    Live {
        frames_per_run: frames,
        batch: BATCH,
        runs,
        frame_bytes: FRAME_LEN,
        cases,
    }
}

/// One live run of `frames` frames on the calling thread; returns seconds.
fn live_run(prog: &aya::programs::Xdp, frame: &[u8], ctx: &[u8], frames: u64) -> f64 {
    let repeat = u32::try_from(frames).expect("frames fit u32");
    let start = Instant::now();
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(ctx),
        repeat,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..TestRunOptions::new()
    })
    .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN in live-frames mode: {e}"));
    start.elapsed().as_secs_f64()
}

/// Runs inside the namespace.
fn measure(frames: u64, runs: usize, cpu: usize) -> Vec<LiveCase> {
    let (dp, _state) = configured_balancer();
    let mut floors = load_floors();
    {
        let drop_prog: &mut aya::programs::Xdp = floors
            .program_mut(FLOOR_DROP)
            .expect("drop program")
            .try_into()
            .expect("XDP");
        drop_prog
            .attach(c"lv1", XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching {FLOOR_DROP} to {PEER}: {e}"));
    }
    let ifindex =
        nix::net::if_::if_nametoindex(DEV).unwrap_or_else(|e| panic!("ifindex of {DEV}: {e}"));
    let ctx = xdp_md(ifindex);
    let balancer = dp.program(prog_names::BALANCER).expect("balancer program");
    // Track the flows (a SYN each) and check the segments are forwarded.
    let dr_vip = Ipv4Addr::new(203, 0, 113, 10);
    let tun_vip = Ipv4Addr::new(203, 0, 113, 20);
    for vip in [dr_vip, tun_vip] {
        let (a, _) = per_packet::run_once(balancer, &frame_to(vip, true));
        assert_eq!(a, XDP_TX, "the SYN to {vip} was not forwarded");
        let (a, _) = per_packet::run_once(balancer, &frame_to(vip, false));
        assert_eq!(a, XDP_TX, "the tracked segment to {vip} was not forwarded");
    }
    let balancer_fd = balancer
        .fd()
        .expect("balancer fd")
        .try_clone()
        .expect("dup fd");
    let floor_fd = xdp(&floors, FLOOR_TX)
        .fd()
        .expect("floor fd")
        .try_clone()
        .expect("dup fd");
    let mut next: ProgramArray<_> = ProgramArray::try_from(
        floors
            .take_map("XLB_BENCH_NEXT")
            .expect("XLB_BENCH_NEXT map"),
    )
    .expect("a program array");
    let mut frame_map: Array<_, [u64; FRAME_LEN / 8]> = Array::try_from(
        floors
            .take_map("XLB_BENCH_FRAME")
            .expect("XLB_BENCH_FRAME map"),
    )
    .expect("an array");
    let restore = xdp(&floors, LIVE_RESTORE);
    let cases: [(&str, Ipv4Addr, bool, u32); 3] = [
        (crate::report::FLOOR_TX, dr_vip, true, stat::TX_DR),
        ("TCP, tracked flow (DR)", dr_vip, false, stat::TX_DR),
        (
            "TCP, tracked flow (TUN, IPIP)",
            tun_vip,
            false,
            stat::TX_TUN,
        ),
    ];
    let mut out = Vec::new();
    for cores in [1usize, 2] {
        let mut mpps: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut shares: Vec<Option<f64>> = vec![None; cases.len()];
        for _ in 0..runs {
            for (i, (name, vip, floor, verdict)) in cases.iter().enumerate() {
                xlb_tests::harness::check_interrupted();
                let frame = frame_to(*vip, false);
                let mut words = [0u64; FRAME_LEN / 8];
                for (w, c) in words.iter_mut().zip(frame.as_chunks::<8>().0) {
                    *w = u64::from_ne_bytes(*c);
                }
                frame_map.set(0, &words, 0).expect("writing the frame");
                let fd = if *floor { &floor_fd } else { &balancer_fd };
                next.set(0, fd, 0).expect("setting the tail call");
                let before = dp.verdicts().expect("verdicts")[*verdict as usize].packets;
                let secs = if cores == 1 {
                    let mut secs = 0.0;
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            crate::pin_to_cpu(cpu);
                            secs = live_run(restore, &frame, &ctx, frames);
                        });
                    });
                    secs
                } else {
                    let barrier = Barrier::new(2);
                    let start = std::sync::Mutex::new(None::<Instant>);
                    std::thread::scope(|s| {
                        for c in 0..2 {
                            let (barrier, frame, ctx, start) = (&barrier, &frame, &ctx, &start);
                            s.spawn(move || {
                                crate::pin_to_cpu(c);
                                if barrier.wait().is_leader() {
                                    *start.lock().expect("lock") = Some(Instant::now());
                                }
                                live_run(restore, frame, ctx, frames);
                            });
                        }
                    });
                    let t0 = start.lock().expect("lock").expect("a start time");
                    t0.elapsed().as_secs_f64()
                };
                let total = frames * cores as u64;
                if !*floor {
                    let after = dp.verdicts().expect("verdicts")[*verdict as usize].packets;
                    shares[i] = Some((after - before) as f64 / total as f64);
                }
                mpps[i].push(total as f64 / secs / 1e6);
                eprintln!(
                    "xlb-bench:   {name}, {cores} core(s): {:.2} Mpps",
                    total as f64 / secs / 1e6
                );
            }
        }
        for (i, (name, ..)) in cases.iter().enumerate() {
            let ratios: Vec<f64> = mpps[i].iter().zip(&mpps[0]).map(|(a, b)| a / b).collect();
            out.push(LiveCase {
                name: (*name).to_owned(),
                cores,
                mpps: Spread::of(&mpps[i]),
                ratio_floor: Spread::of(&ratios),
                runs_mpps: mpps[i].clone(),
                tx_share: shares[i],
            });
        }
    }
    drop(next);
    out
}
