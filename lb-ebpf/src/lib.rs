//! The xlb XDP programs live in the `lb-ebpf` binary target (`src/main.rs`).
//!
//! This empty library exists so `lb-userspace` can declare a build-dependency on
//! this crate and be rebuilt when it changes (the aya-build pattern).
#![no_std]
