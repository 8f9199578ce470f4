//! Rebuild when the bpf-linker binary changes: the object depends on it, but
//! cargo cannot see that dependency.
//!
//! Also turns on LLVM's `allows-misaligned-mem-access` BPF feature for the
//! balancer and the decapsulator (bpf-linker does their code generation, so
//! it takes the feature as a link argument; aya-build's own rustflags stay as
//! they are). Unaligned packet fields are then read and written with one load
//! or store instead of a byte at a time. The verifier allows misaligned
//! packet accesses on x86-64 and arm64 but never misaligned stack accesses,
//! so the programs keep every stack value naturally aligned (see
//! docs/development.md, "Data-path code"). The bench floor (`lb-floor`) is
//! built without it: it is the yardstick of every per-packet figure.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo::warning=bpf-linker not found ({err}); run ./x setup"),
    }
    // Only for the BPF target: a host build of the workspace (clippy, tests)
    // links these binaries with the host's linker, which has no such flag.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        for bin in ["lb-ebpf", "lb-decap"] {
            println!(
                "cargo::rustc-link-arg-bin={bin}=--cpu-features=+allows-misaligned-mem-access"
            );
        }
    }
}
