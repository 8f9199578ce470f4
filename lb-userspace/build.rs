//! Builds the XDP object (`lb-ebpf`) with the pinned nightly and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The nightly whose LLVM matches bpf-linker's (see docs/development.md and ./x).
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    commit();
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the XDP object failed; run ./x setup to install the eBPF toolchain")
}

/// Sets `XLB_COMMIT` for `xlb --version` and `xlb_build_info`: the variable
/// itself when the build sets it (a build from a tarball), else the commit of
/// the git checkout, else `unknown`. Reruns when the checkout's HEAD moves.
fn commit() {
    println!("cargo:rerun-if-env-changed=XLB_COMMIT");
    let commit = std::env::var("XLB_COMMIT").ok().or_else(|| {
        let head = git(&["rev-parse", "--short=12", "HEAD"])?;
        // HEAD names a branch whose ref file (or packed-refs) moves with
        // each commit; a detached HEAD moves itself.
        let mut watch = vec!["HEAD".to_owned()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(branch);
        }
        watch.push("packed-refs".to_owned());
        for name in &watch {
            if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name])
                && std::path::Path::new(&path).exists()
            {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        Some(head)
    });
    let commit = commit.unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=XLB_COMMIT={commit}");
}

/// `git ARGS`' first line of output, run in this crate's directory.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.lines().next()?.trim().to_owned()).filter(|l| !l.is_empty())
}
