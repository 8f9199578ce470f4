//! Rebuild when the bpf-linker binary changes: the object depends on it, but
//! cargo cannot see that dependency.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo::warning=bpf-linker not found ({err}); run ./x setup"),
    }
}
