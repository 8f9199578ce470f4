//! Commands the health checker runs: `exec` probes and the `notify_up` /
//! `notify_down` hooks. No shell: the first word is the program (an absolute
//! path), the others its arguments, passed as they are. Each command runs
//!
//! - with no capabilities and `no_new_privs` ([`crate::privileges::shed_for_exec`]),
//!   as the daemon's user;
//! - with an environment of `PATH` and the `XLB_*` variables only;
//! - stdin from `/dev/null`, stdout discarded, the start of stderr kept for
//!   the reason of a failure;
//! - in a process group of its own, killed as a whole (`SIGKILL`) when its
//!   time is up, when the probe that started it is dropped, and when it
//!   ends (a check leaves nothing running behind it).

use std::{process::Stdio, time::Duration};

use tokio::io::AsyncReadExt as _;

/// `PATH` of the commands (the environment is not inherited).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bytes of stderr kept for the reason of a failure.
const STDERR_MAX: u64 = 4096;

/// Kills a process group when dropped while armed.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: signals the process group this runner created.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `argv` with `env` added to the environment. `Ok` on exit code 0;
/// otherwise the exit code (or signal) and the first line of its stderr.
/// With `limit`, a command still running after it is killed with its
/// group (`timeout after N ms`); without, the caller bounds it by dropping
/// the future, which kills the group too.
pub async fn run(
    argv: &[String],
    env: &[(&str, String)],
    limit: Option<Duration>,
) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("no command")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: `shed_for_exec` only makes raw system calls (async-signal-safe).
    unsafe {
        cmd.pre_exec(crate::privileges::shed_for_exec);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let group = GroupKill(child.id().and_then(|p| i32::try_from(p).ok()));
    let mut stderr = child.stderr.take();
    let work = async {
        let mut text = Vec::new();
        if let Some(err) = stderr.as_mut() {
            let _ = err.take(STDERR_MAX).read_to_end(&mut text).await;
        }
        (child.wait().await, text)
    };
    let (status, text) = match limit {
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .map_err(|_| format!("timeout after {} ms", limit.as_millis()))?,
        None => work.await,
    };
    let status = status.map_err(|e| format!("waiting for {program}: {e}"))?;
    // The leader is done: what it left running in its group goes too.
    drop(group);
    if status.success() {
        return Ok(());
    }
    let how = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    };
    let text = String::from_utf8_lossy(&text);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => Err(format!("{how}: {line:.200}")),
        None => Err(how),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[tokio::test]
    async fn exit_code_decides_and_stderr_is_the_reason() {
        let env = [("XLB_REAL_PORT", "8080".to_owned())];
        let ok = argv(&["/bin/sh", "-c", "test \"$XLB_REAL_PORT\" = 8080"]);
        assert_eq!(run(&ok, &env, None).await, Ok(()));
        let bad = argv(&["/bin/sh", "-c", "echo '  not ready' >&2; exit 3"]);
        assert_eq!(
            run(&bad, &env, None).await,
            Err("exit code 3: not ready".to_owned())
        );
        assert!(
            run(&argv(&["/nonexistent/check"]), &env, None)
                .await
                .expect_err("no such program")
                .starts_with("cannot run /nonexistent/check"),
        );
    }

    #[tokio::test]
    async fn a_command_past_its_time_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("xlb-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pidfile = dir.join("child.pid");
        // The shell starts a background sleeper, notes its pid and waits.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let r = run(
            &argv(&["/bin/sh", "-c", &script]),
            &[],
            Some(Duration::from_millis(300)),
        )
        .await;
        assert_eq!(r, Err("timeout after 300 ms".to_owned()));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // The grandchild got SIGKILL with the group: reaped by init, so give
        // it a moment, then it must be gone (or a zombie).
        let mut gone = false;
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "the background sleep {pid} survived the timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
