//! `xlb-bench`: the benchmarks behind `./x bench` (issue 6) and the renderer of
//! docs/benchmarks.md.
//!
//! - `xlb-bench run [--quick] [--only LIST] --out FILE` measures, as root, and
//!   writes the raw figures as JSON;
//! - `xlb-bench render --input FILE --markdown FILE --svg-dir DIR` turns that
//!   JSON into the Markdown report and its SVG plots (no root needed).
//!
//! # Layout
//!
//! - [`per_packet`]: BPF_PROG_TEST_RUN cost of every path, against floor programs;
//! - [`live`]: XDP live-frames throughput out of a veth, one and two cores;
//! - [`e2e`]: wrk through xlb (DR, TUN), HAProxy and nginx in namespaces;
//! - [`control`]: Maglev builds, reconcile at scale, health-check cost;
//! - [`sync`]: flow sync between two daemons (lag, messages per flow);
//! - [`fleet`]: propagation of a change through etcd to three daemons;
//! - [`report`]: the JSON model, statistics helpers, Markdown and SVG rendering.
//!
//! No benchmark is a test: nothing here asserts a time. A run panics only when
//! a measurement would be wrong (a packet took another path than the case
//! names, a tool is missing), and every namespace and process it started is
//! removed by Drop guards, also on panic or Ctrl-C.

mod control;
mod e2e;
mod fleet;
mod live;
mod per_packet;
mod report;
mod sync;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};

use report::{Meta, Report};

#[derive(Debug, Parser)]
#[command(name = "xlb-bench", about = "xlb benchmarks (run through ./x bench)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure (as root) and write the raw figures as JSON.
    Run {
        /// A fast smoke run: fewer calls, shorter and fewer wrk runs.
        #[arg(long)]
        quick: bool,
        /// Only these sections (comma-separated: per-packet,live,e2e,control,sync,fleet;
        /// health: the health-checking part of control alone; reconcile: its
        /// reconcile part alone); the others are kept from an existing --out file.
        #[arg(long, value_delimiter = ',')]
        only: Vec<Section>,
        /// The JSON file to write.
        #[arg(long)]
        out: PathBuf,
        /// CPU the single-core measurements are pinned to.
        #[arg(long, default_value_t = 0)]
        cpu: usize,
    },
    /// Render the Markdown report and the SVG plots from a JSON file.
    Render {
        /// The JSON file `run` wrote.
        #[arg(long)]
        input: PathBuf,
        /// The Markdown file to write.
        #[arg(long)]
        markdown: PathBuf,
        /// Directory for the SVG plots (linked from the Markdown by file name).
        #[arg(long)]
        svg_dir: PathBuf,
    },
}

/// The benchmark sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    PerPacket,
    Live,
    E2e,
    Control,
    /// The health-checking part of `control` alone (the rest of it kept).
    Health,
    /// The reconcile part of `control` alone (the rest of it kept).
    Reconcile,
    Sync,
    Fleet,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            quick,
            only,
            out,
            cpu,
        } => run(quick, &only, &out, cpu),
        Command::Render {
            input,
            markdown,
            svg_dir,
        } => {
            let text = std::fs::read_to_string(&input)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", input.display()));
            let report: Report = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not a benchmark report: {e}", input.display()));
            report::render(&report, &markdown, &svg_dir);
        }
    }
}

fn run(quick: bool, only: &[Section], out: &std::path::Path, cpu: usize) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "xlb-bench run loads XDP programs and creates namespaces: run it as root (./x bench)"
    );
    xlb_tests::harness::trap_interrupts();
    let wanted = |s: Section| only.is_empty() || only.contains(&s);
    // With --only, keep the other sections of an earlier run.
    let mut report = if only.is_empty() {
        Report::default()
    } else {
        std::fs::read_to_string(out)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let start = Instant::now();
    let load_before = report::load_average();
    if wanted(Section::PerPacket) {
        eprintln!("xlb-bench: 1/5 per-packet cost (BPF_PROG_TEST_RUN)");
        report.per_packet = per_packet::run(quick, cpu);
        save(&report, out);
    }
    if wanted(Section::Live) {
        eprintln!("xlb-bench: 2/5 live-frames throughput");
        report.live = Some(live::run(quick, cpu));
        save(&report, out);
    }
    if wanted(Section::E2e) {
        eprintln!("xlb-bench: 3/5 end to end (wrk through xlb, HAProxy, nginx)");
        report.e2e = Some(e2e::run(quick));
        save(&report, out);
    }
    if wanted(Section::Control) {
        eprintln!("xlb-bench: 4/5 control plane");
        report.control = Some(control::run(quick));
        save(&report, out);
    } else if only.contains(&Section::Health) {
        eprintln!("xlb-bench: health-checking cost (part of the control plane)");
        let c = report.control.get_or_insert_default();
        control::health_cases(quick, c);
        save(&report, out);
    }
    if !wanted(Section::Control) && only.contains(&Section::Reconcile) {
        eprintln!("xlb-bench: reconcile at 1,000 VIPs (part of the control plane)");
        report.control.get_or_insert_default().reconcile = Some(control::reconcile(quick));
        save(&report, out);
    }
    if wanted(Section::Sync) {
        eprintln!("xlb-bench: flow sync between two balancers");
        report.sync = Some(sync::run(quick));
    }
    if wanted(Section::Fleet) {
        eprintln!("xlb-bench: fleet propagation (etcd, three daemons)");
        report.fleet = Some(fleet::run(quick));
    }
    report.meta = Meta::collect(quick, start.elapsed().as_secs_f64(), load_before);
    save(&report, out);
    eprintln!(
        "xlb-bench: done in {:.0} s; figures in {}",
        start.elapsed().as_secs_f64(),
        out.display()
    );
}

/// Writes the report so far (a later section failing keeps the earlier ones).
fn save(report: &Report, out: &std::path::Path) {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    }
    let text = serde_json::to_string_pretty(report).expect("the report serializes");
    std::fs::write(out, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)
        .unwrap_or_else(|e| panic!("CPU {cpu} is out of range: {e}"));
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .unwrap_or_else(|e| panic!("cannot pin this thread to CPU {cpu}: {e}"));
}
