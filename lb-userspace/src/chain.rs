//! An error with its causes on one line, each said once.
//!
//! Our own error types follow one rule: an error that wraps another returns it
//! from `source()` and does not repeat it in its message. Errors of other
//! crates do not all follow it (aya's `EbpfError::MapError` prints the
//! `MapError` and returns it as its source), so printing a chain skips a cause
//! whose text the line already ends with.

use std::{error::Error, fmt};

/// `err` and its causes, `: `-separated, each once (`{}` on this).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let causes = std::iter::successors(Some(self.0), |&e| e.source());
        f.write_str(&line(causes))
    }
}

/// The texts of `errors` (an error, then its causes in order) on one line.
pub fn line<'a>(errors: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut said = String::new();
    for err in errors {
        let text = err.to_string();
        if text.is_empty() || said.ends_with(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause that repeats its source in its own message, as aya's do.
    #[derive(Debug, thiserror::Error)]
    #[error("map error: {0}")]
    struct Repeats(#[from] std::io::Error);

    /// One of ours: names what it was doing, the cause in `source()` only.
    #[derive(Debug, thiserror::Error)]
    #[error("map XLB_FLOWS")]
    struct Ours(#[source] Repeats);

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let err = Ours(Repeats(io));
        assert_eq!(
            Chain(&err).to_string(),
            "map XLB_FLOWS: map error: No such file or directory (os error 2)"
        );
        let err = anyhow::Error::new(err).context("cannot read the counters");
        assert_eq!(
            line(err.chain()),
            "cannot read the counters: map XLB_FLOWS: map error: No such file or directory (os \
             error 2)"
        );
    }
}
