//! How a failed command ends: one exit code per kind of failure, the same for
//! every command, and with `--json` one error document on stdout. The codes
//! are listed in `xlb --help` ([`super::args::EXIT_CODES`]) and docs/operations.md.

use std::process::ExitCode;

use serde::Serialize;

/// The kinds of failure a script can tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// An argument, flag or file is invalid (exit 2, like clap's usage errors).
    BadInput,
    /// The daemon could not be reached or did not answer (exit 3).
    Unreachable,
    /// The daemon refused a request that is valid on paper (exit 4).
    Refused,
    /// Anything else (exit 1).
    Other,
}

impl ErrorKind {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Other => 1,
            Self::BadInput => 2,
            Self::Unreachable => 3,
            Self::Refused => 4,
        }
    }
}

/// A failure of a known kind; anywhere in an `anyhow` chain it sets the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What went wrong, for the operator.
    pub message: String,
}

impl CliError {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A bad-input error as an `anyhow::Error`.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    CliError::new(ErrorKind::BadInput, message).into()
}

/// The kind of `err`: the first [`CliError`] in its chain, else `Other`.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    err.chain()
        .find_map(|e| e.downcast_ref::<CliError>())
        .map_or(ErrorKind::Other, |e| e.kind)
}

#[derive(Serialize)]
struct ErrorDoc<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    kind: ErrorKind,
    message: &'a str,
}

/// Prints a failure (`error: MESSAGE` on stderr, or with `json` the error
/// document on stdout) and returns its exit code.
pub fn report(kind: ErrorKind, message: &str, json: bool) -> ExitCode {
    if json {
        let doc = ErrorDoc {
            error: ErrorFields { kind, message },
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(_) => eprintln!("error: {message}"),
        }
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(kind.code())
}

/// Prints `err` with its causes, each once (see [`report`]), and returns its exit code.
pub fn exit(err: &anyhow::Error, json: bool) -> ExitCode {
    report(kind_of(err), &crate::chain::line(err.chain()), json)
}

/// Ends on a command-line usage error found by clap: exit 2 (clap's own code),
/// as the JSON error document when `--json` was among the arguments. Help and
/// version requests print as clap prints them.
pub fn usage(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    let json = std::env::args_os().any(|a| a == "--json");
    if matches!(err.kind(), K::DisplayHelp | K::DisplayVersion) || !json {
        err.exit();
    }
    let text = err.render().to_string();
    // The first paragraph: the rest points at --help.
    let first = text.split("\n\n").next().unwrap_or(&text);
    let message = first.trim().trim_start_matches("error: ");
    report(ErrorKind::BadInput, message, true)
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn the_kind_is_found_under_added_context() {
        let err = Err::<(), _>(CliError::new(ErrorKind::Refused, "unknown VIP"))
            .context("simulate failed")
            .expect_err("an error");
        assert_eq!(kind_of(&err), ErrorKind::Refused);
        assert_eq!(kind_of(&anyhow::anyhow!("plain")), ErrorKind::Other);
        let codes: Vec<u8> = [
            ErrorKind::Other,
            ErrorKind::BadInput,
            ErrorKind::Unreachable,
            ErrorKind::Refused,
        ]
        .iter()
        .map(|k| k.code())
        .collect();
        assert_eq!(codes, [1, 2, 3, 4]);
    }
}
