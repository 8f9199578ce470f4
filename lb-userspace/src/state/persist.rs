//! The state file: what a restarted daemon needs to adopt the pinned maps —
//! the desired state with its overrides, the verdicts, the MACs and the model
//! of the maps. Written atomically (temporary file + rename) after every
//! change that reached the maps.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::State;
use crate::pin::LAYOUT_VERSION;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing failed (the cause is its source: print it with
    /// [`crate::chain::Chain`]).
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a state file this xlb can read.
    #[error("{path} is not an xlb state file of map layout v{LAYOUT_VERSION}: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The store's saved document is unreadable.
    #[error("{path} is not a saved store document: {why}")]
    StoreFormat {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The saved data path is attached to another interface.
    #[error(
        "the pinned data path serves {saved}, not {iface}; use --iface {saved}, or `xlb \
         teardown` first"
    )]
    OtherIface {
        /// The interface in the file.
        saved: String,
        /// The interface asked for.
        iface: String,
    },
}

/// The state file: written from a borrowed state (`S = &State`, not
/// copied at each change), read into an owned one.
#[derive(Serialize, Deserialize)]
struct StateFile<S> {
    layout: u32,
    iface: String,
    state: S,
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let io = |what| {
        let path = path.display().to_string();
        move |source| PersistError::Io { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io("writing"))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into"))?;
    Ok(())
}

/// The text of `path`; `None` when there is no such file.
fn read_optional(path: &Path) -> Result<Option<String>, PersistError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PersistError::Io {
            what: "reading",
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Writes `state` for interface `iface` to `path`.
pub fn save(path: &Path, iface: &str, state: &State) -> Result<(), PersistError> {
    let file = StateFile {
        layout: LAYOUT_VERSION,
        iface: iface.to_owned(),
        state,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| PersistError::Format {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Reads the state saved at `path` for interface `iface`; `None` when there is none.
pub fn load(path: &Path, iface: &str) -> Result<Option<State>, PersistError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let format = |why: String| PersistError::Format {
        path: path.display().to_string(),
        why,
    };
    let file: StateFile<State> = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    if file.layout != LAYOUT_VERSION {
        return Err(format(format!("written for layout v{}", file.layout)));
    }
    if file.iface != iface {
        return Err(PersistError::OtherIface {
            saved: file.iface,
            iface: iface.to_owned(),
        });
    }
    Ok(Some(file.state))
}

/// Removes the state file (after `xlb teardown`, or when the data path stops with the daemon).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The store's document last applied, kept for a restart while the store is
/// down (store mode).
/// Written from a borrowed document (`D = &str`, not copied at each change).
#[derive(Serialize, Deserialize)]
struct StoreFile<D> {
    revision: i64,
    document: D,
}

/// Saves revision `revision`'s `document` to `path` (atomically).
pub fn save_store(path: &Path, revision: i64, document: &str) -> Result<(), PersistError> {
    let bytes = serde_json::to_vec(&StoreFile { revision, document }).map_err(|e| {
        PersistError::StoreFormat {
            path: path.display().to_string(),
            why: e.to_string(),
        }
    })?;
    write_atomic(path, &bytes)
}

/// The revision and document saved at `path`; `None` when there is none.
pub fn load_store(path: &Path) -> Result<Option<(i64, String)>, PersistError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let file: StoreFile<String> =
        serde_json::from_str(&text).map_err(|e| PersistError::StoreFormat {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    Ok(Some((file.revision, file.document)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_says_its_cause_once_however_it_is_printed() {
        let path = Path::new("/dev/null/xlb/state.json");
        let err = save(path, "eth0", &State::default()).expect_err("/dev/null is no directory");
        assert_eq!(
            err.to_string(),
            "creating the directory of /dev/null/xlb/state.json"
        );
        let whole =
            "creating the directory of /dev/null/xlb/state.json: Not a directory (os error 20)";
        assert_eq!(crate::chain::Chain(&err).to_string(), whole);
        assert_eq!(format!("{:#}", anyhow::Error::from(err)), whole);
    }
}
