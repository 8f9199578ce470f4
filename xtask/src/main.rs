//! `cargo xtask`: the workspace's orchestration, reached through `./x` (which first
//! makes sure the toolchains and tools are installed).
//!
//! - `test`: fmt check, clippy, build of every target, then every test, one at a time
//!   (the root tests of `xlb-tests`, BPF_PROG_TEST_RUN and netns end-to-end, must not
//!   run in parallel), with `XLB_BIN` and `XLB_TESTSRV_BIN` naming the binaries, then
//!   a short run of the data-path fuzzer (fixed seed) and last the package test.
//! - `lint`: fmt check and clippy only.
//! - `fuzz`: builds and runs `xlb-fuzz` as root, the invariant fuzzer of the
//!   data path (issue 10).
//! - `demo`: builds the binaries and runs `xlb-demo` as root.
//! - `bench`: installs wrk, HAProxy and nginx if missing, builds in release mode, runs
//!   `xlb-bench` as root and renders docs/benchmarks.md from its JSON (see issue 6).
//! - `package`: the Debian package of the release build (see package.rs).
//! - `test-package`: installs the debug build's package on this machine, checks it
//!   and purges it (see package.rs and docs/development.md).
//!
//! Nothing is built here by hand: every step is a plain cargo command, printed before it
//! runs, so any of them can be repeated alone.

use std::{
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod package;

/// The integration-test package: its tests need root and run one at a time.
const ROOT_TESTS_PACKAGE: &str = "xlb-tests";

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "xlb workspace tasks (usually run as ./x TASK)"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// fmt check, clippy, build, then every test (root tests one at a time), then the
    /// package test (skipped when a filter is given).
    Test {
        /// Only run tests whose name contains this (passed to the test binaries).
        filter: Option<String>,
    },
    /// fmt check and clippy with warnings denied.
    Lint,
    /// build the binaries and run the demo as root (arguments go to xlb-demo).
    Demo {
        /// Arguments for xlb-demo, e.g. `--requests 1000`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// run the invariant fuzzer of the data path as root (BPF_PROG_TEST_RUN).
    Fuzz {
        /// Frames to generate.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// PRNG seed (default: a random one, printed for replaying).
        #[arg(long)]
        seed: Option<u64>,
        /// Run every frame and report all violations instead of stopping after
        /// the batch with the first one.
        #[arg(long)]
        keep_going: bool,
        /// Also fail on the known open findings of the data path.
        #[arg(long)]
        strict: bool,
        /// Only run and show frame INDEX of --seed.
        #[arg(long, value_name = "INDEX")]
        replay: Option<u64>,
    },
    /// run the benchmarks as root and render docs/benchmarks.md (about 9 minutes).
    Bench {
        /// A fast smoke run; writes bench-results/quick.{json,md} and leaves docs/ alone.
        #[arg(long)]
        quick: bool,
        /// Only these sections (comma-separated: per-packet,live,e2e,control,sync,fleet;
        /// health or reconcile: that part of control alone); the others are kept
        /// from the last results file.
        #[arg(long)]
        only: Option<String>,
    },
    /// build the Debian package (release build) and print its path.
    Package {
        /// Package the debug build instead (what the package test installs).
        #[arg(long)]
        debug: bool,
    },
    /// build, install, check and purge the Debian package of the debug build (root).
    TestPackage,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("cannot enter the workspace root {}", root.display()))?;
    match cli.task {
        Task::Test { filter } => test(filter.as_deref()),
        Task::Lint => {
            let mut steps = Steps::default();
            lint(&mut steps)?;
            steps.summary("lint");
            Ok(())
        }
        Task::Demo { args } => demo(&args),
        Task::Bench { quick, only } => bench(quick, only.as_deref()),
        Task::Package { debug } => {
            let mut steps = Steps::default();
            let profile = if debug {
                build_all(&mut steps, false)?;
                package::Profile::Debug
            } else {
                package::Profile::Release
            };
            let deb = package::package(&mut steps, profile)?;
            steps.summary("package");
            println!("{}", deb.display());
            Ok(())
        }
        Task::TestPackage => {
            let mut steps = Steps::default();
            build_all(&mut steps, false)?;
            package::test_package(&mut steps)?;
            steps.summary("test-package");
            Ok(())
        }
        Task::Fuzz {
            frames,
            seed,
            keep_going,
            strict,
            replay,
        } => fuzz(frames, seed, keep_going, strict, replay),
    }
}

/// The workspace root: this crate's parent directory. `cargo run` names the
/// crate's directory at run time; the one compiled in is only the fallback,
/// because a binary built for another checkout that shares the target
/// directory (cargo does not rebuild it for a new path) would name that one.
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Timings of the steps run so far, for a one-line summary.
#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    /// Runs `cmd`, echoing it first, and fails naming the step if it fails.
    fn run(&mut self, name: &'static str, cmd: &mut Command) -> anyhow::Result<()> {
        eprintln!("xtask: {name}: {}", describe(cmd));
        let start = Instant::now();
        let status = cmd
            .status()
            .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
        if !status.success() {
            bail!("{name} failed ({status}): `{}`", describe(cmd));
        }
        self.done.push((name, start.elapsed()));
        Ok(())
    }

    fn summary(&self, task: &str) {
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(name, took)| format!("{name} {:.1}s", took.as_secs_f64()))
            .collect();
        let total: Duration = self.done.iter().map(|(_, took)| *took).sum();
        eprintln!(
            "xtask: {task} ok in {:.1}s ({})",
            total.as_secs_f64(),
            parts.join(", ")
        );
    }
}

/// The command line of `cmd`, with cargo's full path shortened to `cargo`.
fn describe(cmd: &Command) -> String {
    let program = if std::env::var_os("CARGO").as_deref() == Some(cmd.get_program()) {
        OsStr::new("cargo")
    } else {
        cmd.get_program()
    };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args);
    cmd
}

/// The nightly that builds the eBPF objects (as in lb-userspace/build.rs and ./x).
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn lint(steps: &mut Steps) -> anyhow::Result<()> {
    steps.run("fmt", &mut cargo(&["fmt", "--all", "--check"]))?;
    steps.run(
        "clippy",
        &mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    steps.run("clippy (XDP programs, bpfel target)", &mut ebpf_clippy())
}

/// clippy over the XDP programs as they are really built: for the BPF target,
/// with the eBPF toolchain (the host build of lb-ebpf is an empty stub).
fn ebpf_clippy() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        EBPF_TOOLCHAIN,
        "cargo",
        "clippy",
        "--package",
        "lb-ebpf",
        "--bins",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ]);
    // The outer cargo's toolchain must not leak into the nightly's build.
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds every target and returns the environment that points tests and the demo at
/// them.
///
/// `quiet` passes `--quiet`: cargo replays the eBPF build's output (aya-build reports
/// it as build-script warnings) on every build, which would bury the demo's report.
fn build_all(steps: &mut Steps, quiet: bool) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    // All targets, not only the bins: `cargo test --workspace` then has nothing left to
    // build, and the demo and the tests share one build (with --bins alone, cargo
    // resolves features without dev-dependencies and builds a second variant).
    let mut build = cargo(&["build", "--workspace", "--all-targets"]);
    if quiet {
        build.arg("--quiet");
        eprintln!("xtask: (a first build takes a few minutes; --quiet hides its progress)");
    }
    steps.run("build", &mut build)?;
    let bin_dir = target_dir()?.join("debug");
    let env = vec![
        ("XLB_BIN", bin_dir.join("xlb")),
        ("XLB_TESTSRV_BIN", bin_dir.join("xlb-testsrv")),
    ];
    for (var, path) in &env {
        if !path.is_file() {
            bail!("{var}: {} was not built", path.display());
        }
    }
    Ok(env)
}

/// Cargo's target directory, as `cargo metadata` reports it (honours CARGO_TARGET_DIR
/// and build.target-dir).
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo(&["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    lint(&mut steps)?;
    let env = build_all(&mut steps, false)?;
    if !is_root() {
        eprintln!(
            "xtask: warning: not root; the XDP and netns tests of {ROOT_TESTS_PACKAGE} will fail"
        );
    }
    // The root tests of xlb-tests (XDP, namespaces) must run one at a time. The host
    // tests take well under a second, so one single-threaded run of the whole suite is
    // the simplest way, and reuses the build above as it is. --no-fail-fast: CI reports
    // every failing test binary, not only the first.
    let mut tests = cargo(&[
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]);
    tests.args(filter);
    let start = Instant::now();
    let (passed, failed, ok) = run_counting(tests.envs(env))?;
    steps.done.push(("tests", start.elapsed()));
    // After the tests passed: a short fuzz run with a fixed seed (the same
    // frames every time, so a failure is a regression and replays exactly),
    // then the package test, which installs the package the build above
    // makes, so it builds nothing new. Each counts as one more test.
    let mut extra: Vec<(&str, anyhow::Result<()>)> = Vec::new();
    if ok && failed == 0 {
        if filter.is_none_or(|f| "fuzz".contains(f)) {
            let fuzz = target_dir()?.join("debug").join("xlb-fuzz");
            let run = steps.run(
                "fuzz (short run)",
                Command::new(fuzz).args(["--frames", FUZZ_TEST_FRAMES, "--seed", FUZZ_TEST_SEED]),
            );
            extra.push(("fuzz (short run)", run));
        }
        if filter.is_none() {
            extra.push(("package test", package::test_package(&mut steps)));
        }
    }
    steps.summary("test");
    for (name, result) in &extra {
        match result {
            Ok(()) => println!("{name}: passed"),
            Err(err) => println!("{name}: FAILED: {err:#}"),
        }
    }
    let extra_failed = extra.iter().filter(|(_, r)| r.is_err()).count() as u64;
    let extra_passed = extra.len() as u64 - extra_failed;
    // One closing line over every test binary and the steps above (cargo
    // prints one per binary, the last of which is often an empty doc-test run).
    println!(
        "tests: {} passed, {} failed",
        passed + extra_passed,
        failed + extra_failed
    );
    if !ok || failed > 0 {
        bail!("tests failed: {failed} failed");
    }
    if extra_failed > 0 {
        bail!("{extra_failed} of the fuzz run and the package test failed");
    }
    Ok(())
}

/// The short fuzz run of `./x test`: well under a minute in a debug build.
const FUZZ_TEST_FRAMES: &str = "200000";
const FUZZ_TEST_SEED: &str = "10";

fn fuzz(
    frames: u64,
    seed: Option<u64>,
    keep_going: bool,
    strict: bool,
    replay: Option<u64>,
) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    steps.run(
        "build",
        &mut cargo(&[
            "build",
            "--release",
            "--package",
            ROOT_TESTS_PACKAGE,
            "--bin",
            "xlb-fuzz",
        ]),
    )?;
    let bin = target_dir()?.join("release").join("xlb-fuzz");
    let mut run = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: the fuzzer loads XDP programs: running it with sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg(&bin);
        sudo
    };
    run.arg("--frames").arg(frames.to_string());
    if let Some(seed) = seed {
        run.arg("--seed").arg(seed.to_string());
    }
    if keep_going {
        run.arg("--keep-going");
    }
    if strict {
        run.arg("--strict");
    }
    if let Some(index) = replay {
        run.arg("--replay").arg(index.to_string());
    }
    steps.run("fuzz", &mut run)?;
    steps.summary("fuzz");
    Ok(())
}

/// Runs `cmd` (a `cargo test`), echoing its output, and adds up the
/// `test result:` lines: (passed, failed, exit status success).
fn run_counting(cmd: &mut Command) -> anyhow::Result<(u64, u64, bool)> {
    use std::io::{BufRead as _, Write as _};
    eprintln!("xtask: tests: {}", describe(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let stdout = child.stdout.take().context("test output")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading the test output")?;
        writeln!(out, "{line}").context("echoing the test output")?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 9 passed; 0 failed; ..." or "FAILED. 8 passed; 1 failed; ..."
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.trim_start_matches("ok.").parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((passed, failed, status.success()))
}

fn demo(args: &[OsString]) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    let env = build_all(&mut steps, true)?;
    let demo = target_dir()?.join("debug").join("xlb-demo");
    let mut cmd = if is_root() {
        Command::new(&demo)
    } else {
        eprintln!("xtask: the demo creates namespaces and loads XDP: running it with sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env=XLB_BIN,XLB_TESTSRV_BIN")
            .arg(&demo);
        sudo
    };
    cmd.args(args).envs(env);
    eprintln!("xtask: demo: {}", describe(&cmd));
    // Replace this process: Ctrl-C then reaches the demo alone, which tears down.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", demo.display()))
}

/// Debian packages the end-to-end benchmark runs (nginx's stream module is separate).
const BENCH_PACKAGES: [&str; 4] = ["wrk", "haproxy", "nginx", "libnginx-mod-stream"];

/// Whether dpkg has `pkg` installed and configured.
fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", pkg])
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"ii "))
}

/// Installs those of `packages` that are missing (idempotent); `user` says who
/// needs them.
///
/// Package installs normally start the service (nginx, HAProxy) in the root
/// namespace; a policy-rc.d that refuses is put in place for the install when the
/// machine has none, since the bench starts its own instances in namespaces.
fn ensure_debian_packages(steps: &mut Steps, packages: &[&str], user: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{user} needs {}: install them as root (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# xtask bench: no service starts during install\nexit 101\n",
        )
        .context("cannot write /usr/sbin/policy-rc.d")?;
        let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(policy, mode).context("cannot make policy-rc.d executable")?;
    }
    let result = (|| {
        let mut update = Command::new("apt-get");
        update
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        steps.run("apt-get update", &mut update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        steps.run("apt-get install", &mut install)
    })();
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn bench(quick: bool, only: Option<&str>) -> anyhow::Result<()> {
    let mut steps = Steps::default();
    ensure_debian_packages(&mut steps, &BENCH_PACKAGES, "the benchmark")?;
    steps.run(
        "build",
        // xlb-testsrv: the reals of the flow sync benchmark.
        &mut cargo(&[
            "build",
            "--release",
            "--bin",
            "xlb",
            "--bin",
            "xlb-bench",
            "--bin",
            "xlb-testsrv",
        ]),
    )?;
    let bin_dir = target_dir()?.join("release");
    let xlb = bin_dir.join("xlb");
    let bench_bin = bin_dir.join("xlb-bench");
    let results = Path::new("bench-results");
    let json = results.join(if quick { "quick.json" } else { "latest.json" });
    let mut run = if is_root() {
        Command::new(&bench_bin)
    } else {
        eprintln!("xtask: the benchmarks create namespaces and load XDP: running them with sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env=XLB_BIN").arg(&bench_bin);
        sudo
    };
    run.arg("run").arg("--out").arg(&json).env("XLB_BIN", &xlb);
    if quick {
        run.arg("--quick");
    }
    if let Some(only) = only {
        run.args(["--only", only]);
    }
    steps.run("bench", &mut run)?;
    let (markdown, svg_dir) = if quick {
        (results.join("quick.md"), results.to_owned())
    } else {
        (PathBuf::from("docs/benchmarks.md"), PathBuf::from("docs"))
    };
    steps.run(
        "render",
        Command::new(&bench_bin)
            .arg("render")
            .arg("--input")
            .arg(&json)
            .arg("--markdown")
            .arg(&markdown)
            .arg("--svg-dir")
            .arg(&svg_dir),
    )?;
    steps.summary("bench");
    eprintln!(
        "xtask: figures in {}, report in {}",
        json.display(),
        markdown.display()
    );
    Ok(())
}
