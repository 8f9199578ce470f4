//! `./x package`: the Debian package, and `./x test-package`: installing it here.
//!
//! The package is assembled with Debian's own tools: the staging tree is
//! `packaging/root` (units, conffiles) plus what the built binary generates (man
//! pages, completions), `dpkg-shlibdeps` computes the library dependencies and
//! `dpkg-deb` builds the archive.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{Steps, cargo, describe, ensure_debian_packages, is_root, target_dir};

/// The package's name, and the binary's.
const NAME: &str = "xlb";
/// Where the binary goes: the daemon and the data path need root, as for ipvsadm
/// and keepalived. Operators in group xlb call it by this path (/usr/sbin is not
/// on a non-root user's PATH on Debian).
const BIN_PATH: &str = "usr/sbin/xlb";
/// The Maintainer field (required by dpkg).
const MAINTAINER: &str = "The xlb developers <xlb@example.org>";
/// Packages needed beyond what dpkg-shlibdeps finds: adduser for the postinst's
/// addgroup, procps for kill(1) and pidof(1), which the documented reloads
/// (`kill -HUP $(pidof xlb)`) use (a minimal Debian has neither without it).
const EXTRA_DEPENDS: &str = "adduser, procps";
/// The systemd units the package ships (from packaging/root/lib/systemd/system).
const UNITS: [&str; 3] = ["xlb.service", "xlb-decap.service", "xlb-realserver.service"];
/// Docs shipped in /usr/share/doc/xlb, from the repository root.
const DOCS: [&str; 11] = [
    "README.md",
    "docs/operations.md",
    "docs/config.md",
    "docs/api.md",
    "docs/health.md",
    "docs/architecture.md",
    "docs/cluster.md",
    "docs/examples/xlb.yaml",
    "docs/examples/bird-balancer.conf",
    "docs/examples/bird-router.conf",
    "docs/examples/keepalived.conf",
];

/// The Grafana dashboard and Prometheus alert rules (and their unit tests),
/// shipped in /usr/share/xlb from packaging/monitoring (docs/operations.md,
/// Monitoring).
const MONITORING: [&str; 3] = [
    "xlb-alerts.test.yml",
    "xlb-alerts.yml",
    "xlb-dashboard.json",
];

/// Which build goes into the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build --release`: what `./x package` ships.
    Release,
    /// The debug build `./x test` has already made: what the package test installs.
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// Builds the package from the `profile` build of `xlb` (building it first for a
/// release) and returns the .deb's path.
pub fn package(steps: &mut Steps, profile: Profile) -> anyhow::Result<PathBuf> {
    if profile == Profile::Release {
        steps.run(
            "build",
            &mut cargo(&[
                "build",
                "--release",
                "--package",
                "lb-userspace",
                "--bin",
                NAME,
            ]),
        )?;
    }
    let target = target_dir()?;
    let bin = target.join(profile.dir()).join(NAME);
    ensure!(
        bin.is_file(),
        "{} was not built (run `cargo build` first)",
        bin.display()
    );
    let version = version()?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = match profile {
        Profile::Release => target.join("debian"),
        Profile::Debug => target.join("debian").join("debug"),
    };
    let stage = out_dir.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let start = Instant::now();
    stage_tree(&stage, &bin, &version)?;
    write_control(&stage, &version, &arch, &out_dir)?;
    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    // xz (dpkg's default) for a release; the test's package is built for one
    // install, where xz's half a minute on a debug-sized binary buys nothing.
    let compression = match profile {
        Profile::Release => "-Zxz",
        Profile::Debug => "-Zgzip",
    };
    steps.run(
        "dpkg-deb",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", compression, "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    eprintln!(
        "xtask: package: staged and built in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(deb)
}

/// The package version: lb-userspace's (the workspace's) version.
fn version() -> anyhow::Result<String> {
    let out = cargo(&["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "lb-userspace"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("cargo metadata has no lb-userspace version")
}

/// Runs `cmd` and returns its trimmed stdout, failing on a non-zero exit.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Copies `from` to `to` with `mode`, creating the parent directories.
fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

/// Writes `data` to `to` (mode 0644), creating the parent directories.
fn write(to: &Path, data: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", to.display()))
}

/// Copies the tree under `from` into `to`: files 0644, directories 0755.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            install(&entry.path(), &dest, 0o644)?;
        }
    }
    Ok(())
}

/// Every regular file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                walk(root, &entry.path(), out)?;
            } else {
                out.push(entry.path().strip_prefix(root)?.to_owned());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Fills the staging tree: the binary, what it generates, packaging/root, docs.
fn stage_tree(stage: &Path, bin: &Path, version: &str) -> anyhow::Result<()> {
    let sbin = stage.join(BIN_PATH);
    install(bin, &sbin, 0o755)?;
    // Debian ships binaries without debug information (as dh_strip strips them).
    output(
        Command::new("strip")
            .args([
                "--remove-section=.comment",
                "--remove-section=.note",
                "--strip-unneeded",
            ])
            .arg(&sbin),
    )?;

    // Man pages: generated by the staged binary itself, then gzip -9n (no name
    // or timestamp in the header: the same input gives the same package).
    let man_dir = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man_dir)?;
    // The pages' date is the last commit's, so a rebuild of one commit is identical.
    let date = output(Command::new("git").args(["log", "-1", "--format=%cs"])).unwrap_or_default();
    let pages = output(
        Command::new(&sbin)
            .args(["generate", "man"])
            .arg(&man_dir)
            .args(["--date", &date]),
    )?;
    ensure!(!pages.is_empty(), "`xlb generate man` wrote no pages");
    for page in pages.lines() {
        output(Command::new("gzip").args(["-9n", page]))?;
    }

    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/xlb"),
        ("zsh", "usr/share/zsh/vendor-completions/_xlb"),
        ("fish", "usr/share/fish/vendor_completions.d/xlb.fish"),
    ] {
        let script = Command::new(&sbin)
            .args(["generate", "completions", shell])
            .output()
            .context("running xlb generate completions")?;
        ensure!(
            script.status.success() && !script.stdout.is_empty(),
            "`xlb generate completions {shell}` failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
        write(&stage.join(path), &script.stdout)?;
    }

    copy_tree(Path::new("packaging/root"), stage)?;
    let doc = stage.join("usr/share/doc").join(NAME);
    // Debian policy wants a changelog in Debian's format; the history itself is
    // the repository's.
    let when = output(Command::new("git").args(["log", "-1", "--format=%aD"]))
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".to_owned());
    let changelog = format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  \
         * Release {version}; the changes are in the repository's history.\n\n \
         -- {MAINTAINER}  {when}\n"
    );
    write(&doc.join("changelog"), changelog.as_bytes())?;
    output(Command::new("gzip").arg("-9n").arg(doc.join("changelog")))?;
    install(
        Path::new("packaging/debian/copyright"),
        &doc.join("copyright"),
        0o644,
    )?;
    for file in DOCS {
        let name = file.strip_prefix("docs/").unwrap_or(file);
        install(Path::new(file), &doc.join(name), 0o644)?;
    }
    let share = stage.join("usr/share").join(NAME);
    for file in MONITORING {
        install(
            &Path::new("packaging/monitoring").join(file),
            &share.join(file),
            0o644,
        )?;
    }
    Ok(())
}

/// Writes DEBIAN/: control, conffiles, md5sums and the maintainer scripts.
fn write_control(stage: &Path, version: &str, arch: &str, out_dir: &Path) -> anyhow::Result<()> {
    let files = files_under(stage)?;
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &Path::new("packaging/debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }

    // Everything under /etc is a conffile: dpkg keeps the operator's edits on
    // upgrade and removes the files only on purge.
    let conffiles: String = files
        .iter()
        .filter(|f| f.starts_with("etc"))
        .map(|f| format!("/{}\n", f.display()))
        .collect();
    write(&debian.join("conffiles"), conffiles.as_bytes())?;

    let mut md5sums = String::new();
    for f in &files {
        let sum = output(Command::new("md5sum").arg(f).current_dir(stage))?;
        md5sums.push_str(&sum);
        md5sums.push('\n');
    }
    write(&debian.join("md5sums"), md5sums.as_bytes())?;

    // dpkg-shlibdeps wants to run in a source tree: give it an empty one.
    let shlib_dir = out_dir.join("shlibdeps");
    fs::create_dir_all(shlib_dir.join("debian"))?;
    write(
        &shlib_dir.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n").as_bytes(),
    )?;
    let shlibs = output(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "-e"])
            .arg(stage.join(BIN_PATH))
            .current_dir(&shlib_dir),
    )?;
    let libs = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;

    let kib: u64 = files
        .iter()
        .map(|f| fs::metadata(stage.join(f)).map_or(0, |m| m.size().div_ceil(1024)))
        .sum();
    let control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {kib}\n\
         Depends: {EXTRA_DEPENDS}, {libs}\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP layer-4 load balancer (LVS-DR / LVS-TUN style)\n \
         An XDP program on the edge host's NIC sends packets for virtual services\n \
         to real servers chosen by Maglev hashing with connection tracking, by MAC\n \
         rewrite (direct return) or IPIP / IPv6 tunnels; the real servers answer\n \
         the clients directly.\n \
         .\n \
         One binary: the daemon (xlb.service) with hitless restarts and upgrades,\n \
         health checks, Prometheus metrics and an ipvsadm-like CLI, and the\n \
         real-server side (xlb-realserver.service, xlb-decap.service).\n"
    );
    write(&debian.join("control"), control.as_bytes())
}

// ---------------------------------------------------------------------------
// The package test.

/// Debian packages the package test uses: man-db renders the pages, systemd
/// brings systemd-analyze, zsh and fish load their completion files.
const TEST_PACKAGES: [&str; 4] = ["man-db", "systemd", "zsh", "fish"];

/// Held across the whole test: two package tests on one machine take turns.
const LOCK_FILE: &str = "/run/lock/xlb-package-test.lock";

/// Installs the debug build's package here, checks what an operator gets, and
/// purges it again (see docs/development.md).
pub fn test_package(steps: &mut Steps) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the package test installs a package (dpkg -i) and starts the daemon in a \
         namespace: run it as root"
    );
    let _lock = Lock::take(Path::new(LOCK_FILE))?;
    ensure!(
        !dpkg_known(NAME),
        "an xlb package is installed on this machine; the package test installs and \
         purges its own: remove it first (dpkg --purge xlb)"
    );
    ensure_debian_packages(steps, &TEST_PACKAGES, "the package test")?;
    let deb = package(steps, Profile::Debug)?;
    let start = Instant::now();
    let mut t = Tester::default();
    // The group outlives a purge by design; the test removes it again when it
    // made it, so that the machine is left as it was (the daemon gives its
    // socket to group xlb whenever that group exists, which other tests see).
    let _group = GroupRestore {
        existed: group_entry().is_some(),
    };
    let installed = Installed;
    check_archive(&mut t, &deb)?;
    check_install(&mut t, &deb)?;
    check_units(&mut t)?;
    check_man(&mut t)?;
    check_completions(&mut t)?;
    check_daemon(&mut t)?;
    check_remove_and_purge(&mut t)?;
    std::mem::forget(installed);
    steps.done.push(("package test", start.elapsed()));
    eprintln!("xtask: package test: {} checks passed", t.passed);
    Ok(())
}

/// Whether dpkg knows the package at all (installed, or removed with its conffiles).
fn dpkg_known(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.starts_with(b"un"))
}

/// Counts passed checks and names the failing one.
#[derive(Default)]
struct Tester {
    passed: usize,
}

impl Tester {
    fn check(
        &mut self,
        ok: bool,
        what: &str,
        detail: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if !ok {
            bail!("package test: {what}: {}", detail());
        }
        self.passed += 1;
        eprintln!("xtask: package test: ok: {what}");
        Ok(())
    }
}

/// Runs `cmd`, returning (success, stdout, stderr).
fn run(cmd: &mut Command) -> anyhow::Result<(bool, String, String)> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

/// Purges the package if the test stops half-way, so the machine stays clean.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        eprintln!("xtask: package test: purging the test's package");
        let _ = Command::new("dpkg").args(["--purge", NAME]).status();
    }
}

/// Deletes the xlb group when dropped, unless it existed before the test.
struct GroupRestore {
    existed: bool,
}

impl Drop for GroupRestore {
    fn drop(&mut self) {
        if !self.existed && group_entry().is_some() {
            eprintln!("xtask: package test: removing the xlb group it created");
            let _ = Command::new("groupdel").arg(NAME).status();
        }
    }
}

/// An exclusive flock on a file, released when dropped.
struct Lock {
    /// Holds the flock until dropped.
    _file: fs::File,
}

impl Lock {
    fn take(path: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let file =
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on an open descriptor has no other preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "xtask: package test: another package test runs; waiting for {}",
                path.display()
            );
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!("cannot lock {}", path.display());
            }
        }
        Ok(Self { _file: file })
    }
}

/// The files the package must contain (paths without the leading /), besides the
/// man pages, which are checked by name below.
const EXPECTED_FILES: [&str; 28] = [
    "etc/default/xlb-decap",
    "etc/default/xlb-realserver",
    "etc/xlb/xlb.yaml",
    "lib/systemd/system/xlb-decap.service",
    "lib/systemd/system/xlb-realserver.service",
    "lib/systemd/system/xlb.service",
    "usr/lib/tmpfiles.d/xlb.conf",
    "usr/sbin/xlb",
    "usr/share/bash-completion/completions/xlb",
    "usr/share/doc/xlb/README.md",
    "usr/share/doc/xlb/api.md",
    "usr/share/doc/xlb/architecture.md",
    "usr/share/doc/xlb/changelog.gz",
    "usr/share/doc/xlb/cluster.md",
    "usr/share/doc/xlb/config.md",
    "usr/share/doc/xlb/copyright",
    "usr/share/doc/xlb/examples/bird-balancer.conf",
    "usr/share/doc/xlb/examples/bird-router.conf",
    "usr/share/doc/xlb/examples/keepalived.conf",
    "usr/share/doc/xlb/examples/xlb.yaml",
    "usr/share/doc/xlb/health.md",
    "usr/share/doc/xlb/operations.md",
    "usr/share/fish/vendor_completions.d/xlb.fish",
    "usr/share/lintian/overrides/xlb",
    "usr/share/xlb/xlb-alerts.test.yml",
    "usr/share/xlb/xlb-alerts.yml",
    "usr/share/xlb/xlb-dashboard.json",
    "usr/share/zsh/vendor-completions/_xlb",
];

/// The package's file paths (from `dpkg-deb --contents`), without directories.
fn package_files(deb: &Path) -> anyhow::Result<Vec<String>> {
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    // "-rw-r--r-- root/root   1234 2026-11-30 04:00 ./etc/xlb/xlb.yaml"
    Ok(listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches("./").to_owned())
        .collect())
}

fn check_archive(t: &mut Tester, deb: &Path) -> anyhow::Result<()> {
    let files = package_files(deb)?;
    let (man, other): (Vec<&String>, Vec<&String>) = files
        .iter()
        .partition(|f| f.starts_with("usr/share/man/man8/"));
    let mut other: Vec<&str> = other.iter().map(|s| s.as_str()).collect();
    other.sort_unstable();
    t.check(
        other == EXPECTED_FILES,
        "the package holds the expected files",
        || format!("got {other:#?}"),
    )?;
    for page in [
        "xlb.8.gz",
        "xlb-run.8.gz",
        "xlb-vip-add.8.gz",
        "xlb-decap.8.gz",
        "xlb-realserver-setup.8.gz",
    ] {
        t.check(
            man.iter().any(|m| m.ends_with(&format!("/{page}"))),
            &format!("man page {page} is in the package"),
            || format!("man pages: {man:?}"),
        )?;
    }
    let conffiles = output(&mut sh(&format!(
        "dpkg-deb --ctrl-tarfile '{}' | tar -xO ./conffiles",
        deb.display()
    )))?;
    t.check(
        conffiles.lines().collect::<Vec<_>>()
            == [
                "/etc/default/xlb-decap",
                "/etc/default/xlb-realserver",
                "/etc/xlb/xlb.yaml",
            ],
        "everything under /etc is a conffile",
        || format!("conffiles: {conffiles:?}"),
    )?;
    let depends = output(
        Command::new("dpkg-deb")
            .args(["--field"])
            .arg(deb)
            .arg("Depends"),
    )?;
    t.check(
        ["adduser,", "procps,", "libc6 (>="]
            .iter()
            .all(|d| depends.contains(d)),
        "Depends names adduser, procps and libc6",
        || format!("Depends: {depends}"),
    )
}

fn group_entry() -> Option<String> {
    let out = Command::new("getent").args(["group", NAME]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn check_install(t: &mut Tester, deb: &Path) -> anyhow::Result<()> {
    // Twice: the second configure finds the group already there.
    for round in ["install", "reinstall"] {
        let (ok, out, err) = run(Command::new("dpkg").arg("-i").arg(deb))?;
        t.check(ok, &format!("dpkg -i ({round})"), || format!("{out}{err}"))?;
    }
    let group = group_entry();
    let gid: Option<u32> = group
        .as_deref()
        .and_then(|g| g.split(':').nth(2))
        .and_then(|g| g.parse().ok());
    t.check(
        gid.is_some_and(|g| g < 1000),
        "postinst created the system group xlb",
        || format!("getent group xlb: {group:?}"),
    )?;
    let (ok, out, err) = run(Command::new("/usr/sbin/xlb").arg("--version"))?;
    let want = format!("xlb {} (commit ", version()?);
    t.check(
        ok && out.trim().starts_with(&want),
        "/usr/sbin/xlb --version",
        || format!("wanted {want:?}, got {out:?} {err:?}"),
    )
}

fn check_units(t: &mut Tester) -> anyhow::Result<()> {
    let units: Vec<String> = UNITS
        .iter()
        .map(|u| format!("/lib/systemd/system/{u}"))
        .collect();
    let (ok, out, err) = run(Command::new("systemd-analyze").arg("verify").args(&units))?;
    // systemd-analyze exits 0 on unknown keys and bad values (it only warns):
    // any output is a failure.
    t.check(
        ok && out.trim().is_empty() && err.trim().is_empty(),
        "systemd-analyze verify passes the three units without a warning",
        || format!("{out}{err}"),
    )
}

fn check_man(t: &mut Tester) -> anyhow::Result<()> {
    // man-db's dpkg trigger has indexed the pages: find them by name.
    for (page, want) in [("xlb", "xlb-vip(8)"), ("xlb-run", "--replace")] {
        let (ok, out, err) = run(Command::new("man")
            .args(["8", page])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8"))?;
        t.check(
            ok && out.contains(want) && out.contains("NAME") && !err.contains("warning"),
            &format!("man 8 {page} renders and mentions {want}"),
            || format!("status ok={ok}\n{out}\n{err}"),
        )?;
    }
    Ok(())
}

fn check_completions(t: &mut Tester) -> anyhow::Result<()> {
    // bash: the file registers the completion, and completing `xlb vi` offers `vip`.
    let (ok, out, err) = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/xlb && complete -p xlb && \
         COMP_WORDS=(xlb vi) COMP_CWORD=1 COMP_LINE='xlb vi' COMP_POINT=6 && \
         _xlb xlb vi xlb && printf 'reply: %s\\n' \"${COMPREPLY[@]}\"",
    ]))?;
    t.check(
        ok && out
            .lines()
            .any(|l| l.starts_with("complete ") && l.ends_with(" -F _xlb xlb"))
            && out.lines().any(|l| l == "reply: vip"),
        "bash completes `xlb vi` to vip",
        || format!("{out}{err}"),
    )?;
    // zsh: compinit finds _xlb through the vendor-completions directory.
    let (ok, out, err) = run(Command::new("zsh").args([
        "-f",
        "-c",
        "autoload -U compinit && compinit -u -D && print -r -- \"${_comps[xlb]}\"",
    ]))?;
    t.check(
        ok && out.trim() == "_xlb",
        "zsh's compinit finds _xlb for xlb",
        || format!("{out}{err}"),
    )?;
    let (ok, out, err) =
        run(Command::new("zsh").args(["-n", "/usr/share/zsh/vendor-completions/_xlb"]))?;
    t.check(ok, "zsh parses _xlb", || format!("{out}{err}"))?;
    // fish: loads the vendor completion by command name and completes `xlb vi`.
    let (ok, out, err) = run(Command::new("fish").args(["-c", "complete -C'xlb vi'"]))?;
    t.check(
        ok && out.lines().any(|l| l.split('\t').next() == Some("vip")),
        "fish completes `xlb vi` to vip",
        || format!("{out}{err}"),
    )
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A directory, removed with its contents when dropped.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A bpffs mounted in the root mount namespace, unmounted (pins and all) when dropped.
struct Bpffs(PathBuf);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A child process, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The capability names of the installed unit's CapabilityBoundingSet, as
/// setpriv wants them (`+bpf,+net_admin`).
fn unit_caps(unit: &str) -> anyhow::Result<String> {
    let text = fs::read_to_string(format!("/lib/systemd/system/{unit}"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .with_context(|| format!("{unit} has no CapabilityBoundingSet"))?;
    Ok(line
        .split_whitespace()
        .map(|c| format!("+{}", c.to_lowercase().trim_start_matches("cap_")))
        .collect::<Vec<_>>()
        .join(","))
}

/// Where one daemon of the test runs.
struct DaemonRun<'a> {
    ns: &'a str,
    dir: &'a Path,
    caps: &'a str,
}

impl DaemonRun<'_> {
    fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Starts `xlb run` as xlb.service does (its ExecStart, with no more
    /// capabilities than the unit's bounding set and no new privileges) and
    /// returns it with `xlb status`'s output once it answers (None: it never did).
    fn start(&self) -> anyhow::Result<(Daemon, Option<String>)> {
        let log = fs::File::create(self.dir.join("daemon.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns, "setpriv", "--no-new-privs"])
            .arg("--bounding-set")
            .arg(format!("-all,{}", self.caps))
            .args(["/usr/sbin/xlb", "run", "--config", "/etc/xlb/xlb.yaml"])
            .arg("--replace")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-file")
            .arg(self.dir.join("state.json"))
            // The host's /sys/fs/bpf under systemd; here a bpffs of the root
            // namespace (inside `ip netns exec` /sys is private).
            .arg("--pin-dir")
            .arg(self.dir.join("bpf/xlb"))
            .stderr(log.try_clone()?)
            .stdout(log);
        eprintln!("xtask: package test: {}", describe(&cmd));
        let mut daemon = Daemon(cmd.spawn().context("starting the daemon")?);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (ok, out, _) = run(Command::new("/usr/sbin/xlb")
                .arg("status")
                .arg("--socket")
                .arg(self.socket()))?;
            if ok {
                return Ok((daemon, Some(out)));
            }
            if Instant::now() > deadline || daemon.0.try_wait()?.is_some() {
                return Ok((daemon, None));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status (None: still running after 10 s).
    fn stop(&self, mut daemon: Daemon) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let pid = i32::try_from(daemon.0.id()).context("pid out of range")?;
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = daemon.0.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }
}

/// The shipped config starts the daemon (in a namespace, on a veth named eth0)
/// with only the unit's capabilities; the socket goes to group xlb; the data path
/// stays pinned when it stops and the next start swaps the program in place.
fn check_daemon(t: &mut Tester) -> anyhow::Result<()> {
    let ns = Netns(format!("xlbpkg-{}", std::process::id()));
    output(Command::new("ip").args(["netns", "add", &ns.0]))?;
    output(Command::new("ip").args([
        "-n", &ns.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]))?;
    for link in ["eth0", "eth1", "lo"] {
        output(Command::new("ip").args(["-n", &ns.0, "link", "set", link, "up"]))?;
    }
    // Declared before the bpffs in it, so dropped after it is unmounted.
    let run_dir = RunDir(std::env::temp_dir().join(&ns.0));
    let dir = run_dir.0.clone();
    fs::create_dir_all(dir.join("bpf"))?;
    output(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.join("bpf")),
    )?;
    let bpffs = Bpffs(dir.join("bpf"));
    let caps = unit_caps("xlb.service")?;
    let run = DaemonRun {
        ns: &ns.0,
        dir: &dir,
        caps: &caps,
    };

    let (daemon, status) = run.start()?;
    t.check(
        status
            .as_deref()
            .is_some_and(|s| s.contains("interface eth0") && s.contains("no virtual services")),
        &format!("the shipped xlb.yaml starts the daemon with only {caps}"),
        || format!("status: {status:?}\ndaemon log:\n{}", run.log()),
    )?;
    let meta = fs::metadata(run.socket())?;
    let gid = group_entry().and_then(|g| g.split(':').nth(2).and_then(|g| g.parse::<u32>().ok()));
    t.check(
        Some(meta.gid()) == gid && meta.mode() & 0o777 == 0o660,
        "the control socket is root:xlb 0660",
        || {
            format!(
                "gid {} (xlb is {gid:?}), mode {:o}",
                meta.gid(),
                meta.mode() & 0o777
            )
        },
    )?;
    let exit = run.stop(daemon)?;
    t.check(
        exit.is_some_and(|s| s.success()),
        "the daemon stops on SIGTERM with status 0",
        || format!("exit: {exit:?}\ndaemon log:\n{}", run.log()),
    )?;
    let links = fs::read_dir(dir.join("bpf/xlb"))
        .map(|d| {
            d.flatten()
                .filter(|v| v.path().join("link").exists())
                .count()
        })
        .unwrap_or(0);
    t.check(
        links == 1,
        "the stopped daemon left its data path pinned",
        || {
            format!(
                "{links} pinned links under {}",
                dir.join("bpf/xlb").display()
            )
        },
    )?;

    // A restart, as systemd does it: the same ExecStart adopts the pins and swaps
    // the program in place (--replace).
    let (daemon, status) = run.start()?;
    let log = run.log();
    t.check(
        status.is_some() && log.contains("program replaced in place"),
        "a restart adopts the pinned data path and replaces the program",
        || format!("status: {status:?}\ndaemon log:\n{log}"),
    )?;
    let exit = run.stop(daemon)?;
    t.check(
        exit.is_some_and(|s| s.success()),
        "the restarted daemon stops",
        || format!("exit: {exit:?}"),
    )?;
    drop(bpffs);
    drop(run_dir);
    drop(ns);
    Ok(())
}

fn check_remove_and_purge(t: &mut Tester) -> anyhow::Result<()> {
    // An operator's edit of a conffile survives removal (not purge).
    let conf = Path::new("/etc/xlb/xlb.yaml");
    let mut text = fs::read_to_string(conf)?;
    text.push_str("# edited by the package test\n");
    fs::write(conf, &text)?;
    let (ok, out, err) = run(Command::new("dpkg").args(["-r", NAME]))?;
    t.check(ok, "dpkg -r", || format!("{out}{err}"))?;
    let left: Vec<&str> = EXPECTED_FILES
        .iter()
        .copied()
        .filter(|f| Path::new("/").join(f).exists() && !f.starts_with("etc/"))
        .collect();
    t.check(
        left.is_empty(),
        "dpkg -r removes every file but the conffiles",
        || format!("left: {left:?}"),
    )?;
    t.check(
        fs::read_to_string(conf).is_ok_and(|s| s == text),
        "dpkg -r keeps the edited /etc/xlb/xlb.yaml",
        || "it is gone or changed".to_owned(),
    )?;

    let (ok, out, err) = run(Command::new("dpkg").args(["--purge", NAME]))?;
    t.check(ok, "dpkg --purge", || format!("{out}{err}"))?;
    t.check(!dpkg_known(NAME), "dpkg forgets xlb after purge", || {
        "dpkg-query still knows it".to_owned()
    })?;
    let (_, leftovers, _) = run(&mut sh(
        "find /etc /lib/systemd /usr/sbin /usr/share /var/lib/systemd /var/lib/dpkg/info \
         \\( -name 'xlb' -o -name 'xlb.*' -o -name 'xlb-*' -o -name '_xlb' -o -name 'xlb_*' \\) \
         -not -path '/usr/share/man/*/index.db' 2>/dev/null",
    ))?;
    t.check(
        leftovers.trim().is_empty(),
        "nothing named xlb is left under /etc, /lib/systemd, /usr, /var/lib",
        || leftovers.clone(),
    )?;
    t.check(
        group_entry().is_some(),
        "the xlb group stays after purge",
        || "getent group xlb finds nothing".to_owned(),
    )
}
