//! `xlb generate` (hidden): man pages and shell completions made from the command
//! line's own definition, so they always match the binary. `./x package` runs it to
//! fill the Debian package.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Subcommand};
use clap_complete::Shell;

use crate::cli::Cli;

/// Manual section of every page: `xlb` is installed in /usr/sbin and its daemon,
/// data path and real-server setup need root (section 8, system administration).
pub const MAN_SECTION: &str = "8";

/// Arguments of `xlb generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to generate.
    #[command(subcommand)]
    pub what: Generate,
}

/// `xlb generate ...`.
#[derive(Debug, Subcommand)]
pub enum Generate {
    /// Write one man page per command into DIR: xlb.8, xlb-run.8, xlb-vip-add.8, ...
    Man {
        /// Existing directory to write the pages into.
        dir: PathBuf,
        /// The date in the pages' title line, e.g. the release's (2026-11-30).
        #[arg(long, default_value = "")]
        date: String,
    },
    /// Print the completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
}

/// Runs `xlb generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    match args.what {
        Generate::Man { dir, date } => {
            for path in man_pages(&dir, &date)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Generate::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut visible_command(), "xlb", &mut out);
            std::io::stdout()
                .write_all(&out)
                .context("writing the completion script")
        }
    }
}

/// `xlb` without its hidden subcommands (this one), which clap_complete would
/// otherwise offer.
fn visible_command() -> clap::Command {
    let full = Cli::command();
    clap::Command::new("xlb")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// Writes the man pages of `xlb` and of every visible subcommand into `dir` and
/// returns their paths (parents before their subcommands). `date` goes in the
/// title line.
pub fn man_pages(dir: &std::path::Path, date: &str) -> anyhow::Result<Vec<PathBuf>> {
    // Built once from the top so that every subcommand knows its full name
    // (`xlb-vip-add`), which is what its page and the SEE ALSO-style list use.
    // The top page's NAME line is `xlb - ABOUT`: the crate description that
    // `xlb --help` shows would read "xlb - xlb: the daemon, ...".
    let mut top = Cli::command()
        .about("XDP layer-4 load balancer (LVS-DR / LVS-TUN style, Maglev hashing)")
        .disable_help_subcommand(true);
    top.build();
    let mut pages = Vec::new();
    let mut todo = vec![top];
    while let Some(cmd) = todo.pop() {
        todo.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = clap_mangen::Man::new(cmd)
            .section(MAN_SECTION)
            .date(date)
            .source(concat!("xlb ", env!("CARGO_PKG_VERSION")))
            .manual("xlb manual");
        let path = man
            .generate_to(dir)
            .with_context(|| format!("writing {} into {}", man.get_filename(), dir.display()))?;
        pages.push(path);
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(shell: Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible_command(), "xlb", &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completions_offer_the_subcommands_but_not_generate() {
        let bash = completion(Shell::Bash);
        let top = bash
            .lines()
            .find(|l| l.trim_start().starts_with("opts=\"-h -V"))
            .expect("no top-level opts line");
        for sub in ["run", "vip", "real", "realserver", "decap", "--socket"] {
            assert!(top.contains(sub), "{sub} missing from {top}");
        }
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            assert!(
                !completion(shell).contains("generate"),
                "{shell} completion offers the hidden generate command"
            );
        }
    }

    #[test]
    fn every_visible_command_gets_a_section_8_page() {
        let dir = std::env::temp_dir().join(format!("xlb-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pages = man_pages(&dir, "2026-11-30").unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "xlb.8",
            "xlb-run.8",
            "xlb-vip-add.8",
            "xlb-realserver-setup.8",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.starts_with("xlb-generate")),
            "the hidden generate command got a page: {names:?}"
        );
        let run = std::fs::read_to_string(dir.join("xlb-run.8")).unwrap();
        let title = concat!(
            ".TH xlb-run 8 2026-11-30 \"xlb ",
            env!("CARGO_PKG_VERSION"),
            "\" \"xlb manual\""
        );
        assert!(
            run.lines().any(|l| l == title),
            "no title line {title:?} in:\n{run:.400}"
        );
        assert!(run.contains("\\-\\-replace"), "--replace is not documented");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
