//! Pinning: the program's link and maps live in a bpffs directory so the data
//! path outlives the daemon. A restarted (or upgraded) daemon adopts them; the
//! conntrack table, counters and tables survive; `xlb teardown` removes them.
//!
//! Layout: `PIN_DIR/v{LAYOUT_VERSION}/{map name}` and `.../link`. A daemon that
//! finds pins of another layout version refuses to touch them, and aya checks
//! every reused map's type, key and value sizes, size and flags against the
//! object (a mismatch is refused, never misread).

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use nix::{
    fcntl::{Flock, FlockArg},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Version of the balancer's map layout (bump when a map's key, value or
/// size changes). 4: the conntrack table of buckets (`XLB_FLOWS`,
/// `XLB_FLOW_KEYS`, `XLB_CT_PARAMS`).
pub const LAYOUT_VERSION: u32 = 4;

/// Version of the decapsulator's pin layout (`xlb decap`): its one pinned map
/// did not change with the balancer's layout 4, so real servers keep their
/// pins across that upgrade.
pub const DECAP_LAYOUT_VERSION: u32 = 3;

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Pinning failures.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory cannot be made a bpffs directory.
    #[error(
        "cannot use {dir} for pins: {why} (pick a directory on a bpffs, or one xlb may mount \
         bpffs on, with --pin-dir; or run without pins with --no-pin)"
    )]
    NotBpffs {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Pins of another layout version are present.
    #[error(
        "{dir} holds pins of map layout {found}; this xlb uses layout v{want}. Run the \
         xlb version that made them, or `xlb teardown --pin-dir {}` (drops tracked flows) first",
        dir.display()
    )]
    OtherLayout {
        /// The pin directory.
        dir: PathBuf,
        /// What was found.
        found: String,
        /// The layout this xlb uses there.
        want: u32,
    },
    /// An operation on a pin failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Attaching, pinning or replacing the link failed.
    #[error("{0}")]
    Link(String),
    /// A teardown found the pins in use (a running process holds the lock
    /// on the versioned directory).
    #[error(
        "a running {holder} uses the pins under {}: stop it first (`systemctl stop {}`), \
         or pass --force to detach {} anyway; nothing was removed",
        dir.display(),
        holder.unit(),
        holder.runs()
    )]
    InUse {
        /// The versioned pin directory whose lock is held.
        dir: PathBuf,
        /// What runs on pins of this kind.
        holder: Holder,
    },
    /// A start found the pins in use (another process holds the lock).
    #[error(
        "another {holder} is running on the pin directory {}; stop it first, or use another \
         --pin-dir",
        dir.display()
    )]
    Locked {
        /// The versioned pin directory whose lock is held.
        dir: PathBuf,
        /// What was starting.
        holder: Holder,
    },
}

/// What runs on a pin directory, holding its lock for as long as it runs:
/// the balancer's daemon or the decapsulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// `xlb run` (the `xlb` unit).
    Daemon,
    /// `xlb decap` (the `xlb-decap` unit).
    Decap,
}

impl Holder {
    /// Its systemd unit.
    fn unit(self) -> &'static str {
        match self {
            Self::Daemon => "xlb",
            Self::Decap => "xlb-decap",
        }
    }

    /// What a forced teardown detaches from under it.
    fn runs(self) -> &'static str {
        match self {
            Self::Daemon => "its data path",
            Self::Decap => "the decapsulator",
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Daemon => "xlb daemon",
            Self::Decap => "xlb decap",
        })
    }
}

/// The lock on a versioned pin directory: held while this value lives
/// (and by the kernel no longer than the process).
#[must_use = "the lock is released when this is dropped"]
#[derive(Debug)]
pub struct PinLock {
    _lock: Flock<File>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The versioned directory holding one instance's pins.
#[derive(Clone, Debug)]
pub struct PinDir {
    /// `PIN_DIR/v{version}`.
    pub path: PathBuf,
}

impl PinDir {
    /// Makes sure `dir` is on a bpffs (mounting one there when it is not),
    /// refuses pins of another layout than the balancer's
    /// ([`LAYOUT_VERSION`]), and returns the versioned directory.
    pub fn prepare(dir: &Path) -> Result<Self, PinError> {
        Self::prepare_layout(dir, LAYOUT_VERSION)
    }

    /// [`PinDir::prepare`] for pins of layout `version` (the decapsulator's
    /// is [`DECAP_LAYOUT_VERSION`]).
    pub fn prepare_layout(dir: &Path, version: u32) -> Result<Self, PinError> {
        let not_bpffs = |why: String| PinError::NotBpffs {
            dir: dir.to_owned(),
            why,
        };
        if !dir.exists() {
            let parent_is_bpffs = dir.parent().is_some_and(is_bpffs);
            std::fs::create_dir_all(dir).map_err(|e| not_bpffs(format!("mkdir: {e}")))?;
            if !parent_is_bpffs {
                mount_bpffs(dir).map_err(not_bpffs)?;
            }
        } else if !is_bpffs(dir) {
            // Never mount over a directory that holds something: it would hide it.
            let empty = std::fs::read_dir(dir)
                .map_err(|e| not_bpffs(format!("cannot list it: {e}")))?
                .next()
                .is_none();
            if !dir.is_dir() || !empty {
                return Err(not_bpffs(
                    "it is neither a bpffs nor an empty directory xlb may mount one on".to_owned(),
                ));
            }
            mount_bpffs(dir).map_err(not_bpffs)?;
        }
        let mine = format!("v{version}");
        for entry in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let name = entry
                .map_err(io_err("listing", dir))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with('v') && name != mine {
                return Err(PinError::OtherLayout {
                    dir: dir.to_owned(),
                    found: name,
                    want: version,
                });
            }
        }
        let path = dir.join(mine);
        std::fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
        Ok(Self { path })
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where the XDP link is pinned.
    pub fn link(&self) -> PathBuf {
        self.path.join("link")
    }

    /// Whether a previous instance (or a start that failed) left maps pinned here.
    pub fn has_maps(&self) -> bool {
        self.map(lb_common::map_names::VIPS).exists()
    }

    /// Whether a previous instance left its link pinned here.
    pub fn has_link(&self) -> bool {
        self.link().exists()
    }

    /// Resolves once the link pinned here is gone, looked at every second:
    /// a forced teardown (`--force`) detached the program from under the
    /// process that runs on these pins, which then has nothing to serve.
    pub async fn link_removed(&self) {
        let link = self.link();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if !link.exists() {
                return;
            }
        }
    }

    /// Takes this directory's lock for `holder`, which keeps it for as long
    /// as it runs: a second process on these pins, and a teardown without
    /// `force`, are refused while it is held.
    pub fn lock(&self, holder: Holder) -> Result<PinLock, PinError> {
        self.try_lock()?.ok_or_else(|| PinError::Locked {
            dir: self.path.clone(),
            holder,
        })
    }

    /// Whether a running process holds this directory's lock.
    pub fn in_use(&self) -> Result<bool, PinError> {
        // A lock taken here is released when dropped, at once.
        Ok(self.try_lock()?.is_none())
    }

    /// The lock, or `None` when another process holds it.
    fn try_lock(&self) -> Result<Option<PinLock>, PinError> {
        let file = File::open(&self.path).map_err(io_err("opening", &self.path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(PinLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(PinError::Io {
                what: "locking",
                path: self.path.clone(),
                source: errno.into(),
            }),
        }
    }
}

fn mount_bpffs(dir: &Path) -> Result<(), String> {
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mounting bpffs failed: {e}"))
}

/// Turns a freshly made XDP link into a pinned one at `path`.
pub fn pin_link(link: aya::programs::xdp::XdpLink, path: &Path) -> Result<(), PinError> {
    let fd = FdLink::try_from(link).map_err(|e| {
        PinError::Link(format!(
            "the kernel attached XDP without a bpf_link ({e}); pinning needs kernel >= 5.9"
        ))
    })?;
    fd.pin(path)
        .map_err(|e| PinError::Link(format!("pinning the link at {}: {e}", path.display())))?;
    Ok(())
}

/// Opens the pinned link at `path` as an XDP link (to replace its program).
pub fn open_link(path: &Path) -> Result<aya::programs::xdp::XdpLink, PinError> {
    let pinned = PinnedLink::from_pin(path)
        .map_err(|e| PinError::Link(format!("opening the pinned link {}: {e}", path.display())))?;
    let fd: FdLink = pinned.into();
    aya::programs::xdp::XdpLink::try_from(fd)
        .map_err(|e| PinError::Link(format!("the pinned link is not an XDP link: {e}")))
}

/// Whether `name` is a pin xlb makes: a link, or a map of the balancer or
/// of the decapsulator (including those an earlier version pinned).
fn is_our_pin(name: &str) -> bool {
    name == "link"
        || crate::dataplane::BALANCER_MAPS.contains(&name)
        || crate::decap::DECAP_MAPS.contains(&name)
        || crate::decap::LEGACY_DECAP_MAPS.contains(&name)
}

/// The layout version directories (`vN/`) under `dir`.
fn version_dirs(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let sub = entry.map_err(io_err("listing", dir))?.path();
        let versioned = sub
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        if sub.is_dir() && versioned {
            dirs.push(sub);
        }
    }
    Ok(dirs)
}

/// Removes xlb's pins from `dir` (every layout version `vN/`): the link first,
/// which detaches the program, then the maps, then the emptied version
/// directories. Anything else is left alone, and a `dir` that is not a bpffs
/// is refused. So is a `dir` a running `holder` uses (it holds a versioned
/// directory's lock, [`PinDir::lock`]), before anything is removed, unless
/// `force`.
pub fn teardown(dir: &Path, force: bool, holder: Holder) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    if !is_bpffs(dir) {
        return Err(PinError::NotBpffs {
            dir: dir.to_owned(),
            why: "it is not a bpffs, so it holds no xlb pins; nothing was removed".to_owned(),
        });
    }
    let subs = version_dirs(dir)?;
    if !force {
        for sub in &subs {
            let sub = PinDir { path: sub.clone() };
            if sub.in_use()? {
                return Err(PinError::InUse {
                    dir: sub.path,
                    holder,
                });
            }
        }
    }
    for sub in subs {
        let link = sub.join("link");
        if link.exists() {
            std::fs::remove_file(&link).map_err(io_err("removing", &link))?;
            removed.push(link);
        }
        let mut others = false;
        for pin in std::fs::read_dir(&sub).map_err(io_err("listing", &sub))? {
            let pin = pin.map_err(io_err("listing", &sub))?.path();
            let ours = pin
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_our_pin);
            if ours && pin.is_file() {
                std::fs::remove_file(&pin).map_err(io_err("removing", &pin))?;
                removed.push(pin);
            } else {
                others = true;
            }
        }
        if !others {
            std::fs::remove_dir(&sub).map_err(io_err("removing", &sub))?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_makes_the_directory_in_use_until_dropped() {
        let path = std::env::temp_dir().join(format!("xlb-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("mkdir");
        let dir = PinDir { path: path.clone() };
        assert!(!dir.in_use().expect("free"), "in use before any lock");
        let held = dir.lock(Holder::Decap).expect("first lock");
        assert!(dir.in_use().expect("held"), "not in use under a lock");
        let err = dir.lock(Holder::Decap).expect_err("a second lock");
        assert_eq!(
            err.to_string(),
            format!(
                "another xlb decap is running on the pin directory {}; stop it first, or use \
                 another --pin-dir",
                path.display()
            )
        );
        drop(held);
        assert!(!dir.in_use().expect("released"), "in use after the drop");
        std::fs::remove_dir(&path).expect("rmdir");
    }
}
