//! Least privilege: once the daemon has loaded, pinned and attached its
//! program, bound its sockets and mounted what it mounts, it keeps only the
//! capabilities a running balancer uses, in its effective, permitted,
//! inheritable and ambient sets (and the bounding set, when it holds
//! `CAP_SETPCAP` to shrink it: root started by hand does, the shipped unit
//! does not need to, its `CapabilityBoundingSet` already bounds it), in every
//! thread:
//!
//! - `CAP_BPF`: map reads and writes (reconcile, counters, the conntrack count);
//! - `CAP_NET_ADMIN`: the data path's link, netlink;
//! - `CAP_PERFMON`: what the kernel asks of BPF users beyond `CAP_BPF`.
//!
//! Capabilities belong to threads, and the runtime's worker threads already
//! run: the calling thread signals every other thread of the process, whose
//! handler drops its own with the raw system calls (async-signal-safe), then
//! checks `/proc/self/task/*/status` until every thread shows the reduced set.
//! Under systemd the unit's `CapabilityBoundingSet` (docs/operations.md)
//! bounds what the daemon starts with; this is the second step.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// `CAP_NET_ADMIN`, `CAP_PERFMON`, `CAP_BPF` (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities a running daemon keeps, by number.
pub const RUNTIME: [u32; 3] = [CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF];

/// Highest capability number the handler tries to drop from the bounding set.
const CAP_MAX: u32 = 63;

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
#[error("dropping capabilities: {0}")]
pub struct PrivilegeError(String);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The kept set (bit per capability), read by the signal handler.
static KEEP: AtomicU64 = AtomicU64::new(0);
/// Threads that ran the handler.
static DROPPED: AtomicUsize = AtomicUsize::new(0);
/// The last error number a handler met (0: none).
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Drops this thread's capabilities to `KEEP` (async-signal-safe: raw
/// system calls on stack data only).
fn drop_here() {
    let keep = KEEP.load(Ordering::SeqCst);
    for cap in 0..=CAP_MAX {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL for capabilities
            // this kernel does not know is expected and ignored.
            unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0);
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget fills two CapData for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        FAILED.store(1, Ordering::SeqCst);
        return;
    }
    for (i, d) in data.iter_mut().enumerate() {
        let word = (keep >> (32 * i)) as u32;
        d.permitted &= word;
        d.effective = d.permitted;
        d.inheritable = 0;
    }
    header.pid = 0;
    // SAFETY: capset reads two CapData for version 3.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        FAILED.store(2, Ordering::SeqCst);
        return;
    }
    DROPPED.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_signal(_: libc::c_int) {
    drop_here();
}

/// `CapEff` of every thread of this process.
fn thread_caps() -> Vec<(i32, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| {
            let tid: i32 = t.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
            Some((tid, eff))
        })
        .collect()
}

/// Drops every capability but [`RUNTIME`] from every set of every thread.
/// Returns the effective set every thread ends with.
pub fn drop_to_runtime() -> Result<u64, PrivilegeError> {
    let keep = RUNTIME.iter().fold(0u64, |m, c| m | (1 << c));
    KEEP.store(keep, Ordering::SeqCst);
    let signal = libc::SIGRTMIN() + 4;
    // SAFETY: installing a handler that only makes raw system calls and
    // touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError(format!(
                "installing the signal handler: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    // SAFETY: plain system calls.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        drop_here();
        let pending: Vec<i32> = thread_caps()
            .into_iter()
            .filter(|(_, eff)| eff & !keep != 0)
            .map(|(tid, _)| tid)
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(PrivilegeError(format!(
                "threads {pending:?} still hold other capabilities (error {})",
                FAILED.load(Ordering::SeqCst)
            )));
        }
        for tid in pending {
            if tid != me {
                // SAFETY: signals a thread of this process.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, pid, tid, signal);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(thread_caps().into_iter().fold(0, |acc, (_, eff)| acc | eff))
}

/// Names of the capabilities in `mask`, for the log.
pub fn names(mask: u64) -> Vec<&'static str> {
    [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_BPF, "CAP_BPF"),
    ]
    .iter()
    .filter(|(c, _)| mask & (1 << c) != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// Run in a child between `fork` and `exec` (health-check commands, notify
/// hooks): sets `no_new_privs` and drops every capability of every set, so
/// the command runs with none, whatever the daemon keeps and whatever the
/// program file grants (`no_new_privs` keeps `exec` from adding any back).
/// Async-signal-safe: raw system calls on stack data only.
pub fn shed_for_exec() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; clearing the ambient set needs no capability.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let none = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads two CapData for version 3; dropping is always allowed.
    if unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
