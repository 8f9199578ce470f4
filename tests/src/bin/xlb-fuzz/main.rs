//! `xlb-fuzz`: the invariant fuzzer of the data path (issue 10), run by `./x fuzz`.
//!
//! Loads the balancer object with a realistic set of services (configured
//! through the daemon's `State::edit`, as the BPF_PROG_TEST_RUN fixtures do)
//! and the decapsulator with its local addresses, then runs generated frames
//! through both with BPF_PROG_TEST_RUN and checks invariants on every result:
//! the verdict is PASS, DROP or TX; a PASS leaves the bytes alone; a frame not
//! for a service or VIP address passes untouched; every TX is a DR frame to a
//! real of the service, a well-formed tunnel to one, an echo reply from a VIP
//! or an ICMP error to the sender, with valid checksums; the decapsulator
//! leaves a frame alone or yields exactly its inner packet.
//!
//! Frame `i` of seed `s` is generated from its own PRNG stream, so
//! `xlb-fuzz --seed s --replay i` shows one frame again.
//!
//! # Layout
//!
//! - [`world`]: the services, reals and addresses under test;
//! - [`generators`]: the generators and their weights;
//! - [`check`]: the invariants.

mod check;
mod generators;
mod world;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use clap::Parser;
use lb_common::{prog_names, stat};
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;

use crate::check::{Violation, XDP_TX, verdict_name};
use crate::generators::{GENERATORS, Gen, MAX_FRAME, MIN_FRAME, Target};
use crate::world::World;

#[derive(Debug, Parser)]
#[command(
    name = "xlb-fuzz",
    about = "invariant fuzzer of the xlb data path (run through ./x fuzz)"
)]
struct Cli {
    /// Frames to generate.
    #[arg(long, default_value_t = 10_000_000)]
    frames: u64,
    /// PRNG seed; a random one when not given (printed, to replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Run every frame and report all violations (default: stop after the
    /// batch in which the first one appeared).
    #[arg(long)]
    keep_going: bool,
    /// Also fail on the known open findings (see KNOWN in the source).
    #[arg(long)]
    strict: bool,
    /// Only generate, run and show frame INDEX of the seed.
    #[arg(long, value_name = "INDEX")]
    replay: Option<u64>,
}

/// Findings of this fuzzer that are open data-path bugs, by report key, with
/// what the data path does: counted and shown, but they fail a run only with
/// `--strict`. Remove an entry when its fix lands.
const KNOWN: &[(&str, &str)] = &[];

/// Frames generated before they are run and checked.
const BATCH: usize = 4096;

fn main() -> ExitCode {
    let cli = Cli::parse();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "xlb-fuzz loads XDP programs: run it as root (./x fuzz)"
    );
    let seed = cli.seed.unwrap_or_else(rand::random);
    let world = World::new();
    let (dp, _state) = world.load_balancer();
    let decap = world.load_decap();
    let balancer: &Xdp = dp
        .program(prog_names::BALANCER)
        .unwrap_or_else(|e| panic!("balancer program: {e}"));
    let decap_prog = decap
        .program()
        .unwrap_or_else(|e| panic!("decap program: {e}"));
    let mut fuzz = Fuzz {
        world: &world,
        balancer,
        decap: decap_prog,
        tally: Tally {
            strict: cli.strict,
            ..Tally::default()
        },
    };
    if let Some(index) = cli.replay {
        return fuzz.replay(seed, index);
    }
    eprintln!(
        "xlb-fuzz: {} frames, seed {seed} (replay a frame with --seed {seed} --replay INDEX)",
        cli.frames
    );
    let start = Instant::now();
    let mut last_note = Instant::now();
    let mut next = 0u64;
    while next < cli.frames {
        let n = (cli.frames - next).min(BATCH as u64);
        let batch: Vec<(u64, usize, Vec<u8>)> = (next..next + n)
            .map(|i| {
                let (g, f) = generate(&world, seed, i);
                (i, g, f)
            })
            .collect();
        for (i, g, f) in &batch {
            fuzz.one(*i, *g, f);
        }
        next += n;
        if last_note.elapsed() > Duration::from_secs(10) {
            last_note = Instant::now();
            eprintln!(
                "xlb-fuzz: {next} frames, {:.0} frames/s, {} violations",
                next as f64 / start.elapsed().as_secs_f64(),
                fuzz.tally.violations()
            );
        }
        if fuzz.tally.violations() > 0 && !cli.keep_going {
            break;
        }
    }
    let took = start.elapsed();
    fuzz.tally.report(next, took, &dp);
    if fuzz.tally.violations() > 0 {
        eprintln!(
            "xlb-fuzz: FAILED: {} violations of {} invariants; replay one with --seed {seed} --replay INDEX",
            fuzz.tally.violations(),
            fuzz.tally.broken.len()
        );
        ExitCode::FAILURE
    } else {
        eprintln!("xlb-fuzz: ok: {next} frames, seed {seed}, no invariant broken");
        ExitCode::SUCCESS
    }
}

/// Frame `index` of `seed`: its generator and bytes.
fn generate(world: &World, seed: u64, index: u64) -> (usize, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let g = generators::pick(&mut rng);
    let mut cx = Gen {
        rng: &mut rng,
        world,
    };
    let mut f = (GENERATORS[g].make)(&mut cx);
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
    f.truncate(MAX_FRAME);
    (g, f)
}

/// One BPF_PROG_TEST_RUN: the verdict and the output frame.
fn run(prog: &Xdp, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of a {} byte frame: {e}", input.len()));
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

struct Fuzz<'a> {
    world: &'a World,
    balancer: &'a Xdp,
    decap: &'a Xdp,
    tally: Tally,
}

/// One run's result, for the report.
struct Seen {
    program: &'static str,
    index: u64,
    generator: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    violation: Violation,
}

impl Fuzz<'_> {
    /// Runs frame `index` through its programs and checks every invariant.
    fn one(&mut self, index: u64, g: usize, f: &[u8]) -> Vec<Seen> {
        let generator = &GENERATORS[g];
        let mut seen = Vec::new();
        self.tally.per_generator[g] += 1;
        let (v, out) = run(self.balancer, f);
        self.tally.count("balancer", v);
        let mut record = |program, verdict, output: &[u8], res: Result<(), Violation>| {
            if let Err(violation) = res {
                seen.push(Seen {
                    program,
                    index,
                    generator: generator.name,
                    input: f.to_vec(),
                    verdict,
                    output: output.to_vec(),
                    violation,
                });
            }
        };
        record("balancer", v, &out, check::balancer(self.world, f, v, &out));
        // A tunnel to a real the decapsulator serves must come back out whole.
        if v == XDP_TX
            && out.len() > f.len()
            && let Some(o) =
                check::l3_offset(&out).and_then(|(off, et)| check::ip_at(&out, off, et == 0x86dd))
            && self.world.decap_addrs.contains(&o.dst)
        {
            let (dv, dout) = run(self.decap, &out);
            self.tally.count("decap (round trip)", dv);
            record("decap", dv, &dout, check::roundtrip(f, &out, dv, &dout));
        }
        if generator.target == Target::Both {
            let (dv, dout) = run(self.decap, f);
            self.tally.count("decap", dv);
            record("decap", dv, &dout, check::decap(self.world, f, dv, &dout));
        }
        for s in &seen {
            self.tally.add(s);
        }
        seen
    }

    fn replay(&mut self, seed: u64, index: u64) -> ExitCode {
        let (g, f) = generate(self.world, seed, index);
        println!(
            "frame {index} of seed {seed}, generator {}",
            GENERATORS[g].name
        );
        println!("input    {}", hex(&f));
        let (v, out) = run(self.balancer, &f);
        println!("balancer {} {}", verdict_name(v), hex(&out));
        if GENERATORS[g].target == Target::Both {
            let (dv, dout) = run(self.decap, &f);
            println!("decap    {} {}", verdict_name(dv), hex(&dout));
        }
        let seen = self.one(index, g, &f);
        for s in &seen {
            println!(
                "{} broke {}: {}",
                s.program, s.violation.invariant, s.violation.detail
            );
        }
        if seen.is_empty() {
            println!("no invariant broken");
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Counts for the report, and the first example of each broken invariant.
#[derive(Default)]
struct Tally {
    /// Known findings count as violations.
    strict: bool,
    /// (program, verdict) -> runs.
    verdicts: BTreeMap<(&'static str, u32), u64>,
    per_generator: [u64; GENERATORS.len()],
    /// invariant (and case) -> (count, first example).
    broken: BTreeMap<String, (u64, Seen)>,
    /// The same for the known open findings (unless strict).
    known: BTreeMap<String, (u64, Seen)>,
    /// generator -> violations.
    broken_by_generator: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn count(&mut self, program: &'static str, verdict: u32) {
        *self.verdicts.entry((program, verdict)).or_default() += 1;
    }

    fn violations(&self) -> u64 {
        self.broken.values().map(|(n, _)| n).sum()
    }

    fn add(&mut self, s: &Seen) {
        *self.broken_by_generator.entry(s.generator).or_default() += 1;
        let key = s.violation.key();
        let groups = if !self.strict && KNOWN.iter().any(|(k, _)| *k == key) {
            &mut self.known
        } else {
            &mut self.broken
        };
        match groups.get_mut(&key) {
            Some((n, _)) => *n += 1,
            None => {
                let example = Seen {
                    program: s.program,
                    index: s.index,
                    generator: s.generator,
                    input: s.input.clone(),
                    verdict: s.verdict,
                    output: s.output.clone(),
                    violation: Violation {
                        invariant: s.violation.invariant,
                        case: s.violation.case,
                        detail: s.violation.detail.clone(),
                    },
                };
                groups.insert(key, (1, example));
            }
        }
    }

    fn report(&self, frames: u64, took: Duration, dp: &lb_userspace::dataplane::Dataplane) {
        let runs: u64 = self.verdicts.values().sum();
        let secs = took.as_secs_f64().max(1e-9);
        println!(
            "frames: {frames} in {secs:.1} s: {:.0} frames/s ({runs} program runs, {:.0} runs/s)",
            frames as f64 / secs,
            runs as f64 / secs
        );
        println!("verdicts:");
        for ((program, verdict), n) in &self.verdicts {
            println!("  {program:<20} {:<8} {n}", verdict_name(*verdict));
        }
        println!("generators:");
        for (g, n) in GENERATORS.iter().zip(self.per_generator) {
            let bad = self.broken_by_generator.get(g.name).copied().unwrap_or(0);
            println!("  {:<16} {n:>10} frames {bad:>8} findings", g.name);
        }
        if let Ok(counters) = dp.verdicts() {
            println!("balancer counters:");
            for (i, c) in counters.iter().enumerate().take(stat::VERDICTS as usize) {
                if c.packets > 0 {
                    println!("  {:<20} {}", stat::VERDICT_NAMES[i], c.packets);
                }
            }
        }
        if !self.known.is_empty() {
            println!("known open findings (not failing the run; --strict makes them fail):");
            for (key, (n, s)) in &self.known {
                let why = KNOWN.iter().find(|(k, _)| k == key).map_or("", |(_, w)| w);
                println!(
                    "- {key}: {n} (first: {} frame {} from {})",
                    s.program, s.index, s.generator
                );
                println!("    {why}");
                println!("    {}", s.violation.detail);
                println!("    input  {}", hex(&s.input));
                println!("    {:<6} {}", verdict_name(s.verdict), hex(&s.output));
            }
        }
        if self.broken.is_empty() {
            return;
        }
        println!("violations, by invariant:");
        for (inv, (n, s)) in &self.broken {
            println!(
                "- {inv}: {n} (first: {} frame {} from {})",
                s.program, s.index, s.generator
            );
            println!("    {}", s.violation.detail);
            println!("    input  {}", hex(&s.input));
            println!("    {:<6} {}", verdict_name(s.verdict), hex(&s.output));
        }
    }
}
