//! Benchmark support for `./x bench`: the object holding the floor programs
//! (`lb-ebpf/src/bin/lb-floor.rs`) every per-packet figure is compared with.
//! The daemon never loads it.

/// The compiled benchmark object, built by build.rs with aya-build.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));
