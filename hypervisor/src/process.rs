//! Host child processes (QEMU and its daemons). Each is waited on by its own thread,
//! which waits for that pid only: the host side never calls waitpid(-1), so it cannot
//! steal another component's exit status.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::HypervisorError;

/// How a host child process (the VMM, a daemon) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this status.
    Exited(i32),
    /// A signal (number) ended it.
    Signaled(i32),
    /// waitpid itself failed (the status is unknown).
    WaitFailed(String),
    /// It was never started.
    NeverStarted,
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Exited(c) => write!(f, "exit status {c}"),
            ProcessExit::Signaled(s) => write!(f, "killed by signal {s}"),
            ProcessExit::WaitFailed(e) => write!(f, "wait failed: {e}"),
            ProcessExit::NeverStarted => f.write_str("never started"),
        }
    }
}

impl From<std::process::ExitStatus> for ProcessExit {
    fn from(s: std::process::ExitStatus) -> ProcessExit {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => ProcessExit::Exited(c),
            (None, Some(sig)) => ProcessExit::Signaled(sig),
            (None, None) => ProcessExit::WaitFailed(format!("{s}")),
        }
    }
}

/// Bytes of a host child's output kept in its log file; the rest is read and dropped.
pub const MAX_LOG: u64 = 1 << 20;

/// Copies `from` into `to` until EOF, keeping at most `max` bytes and noting the rest.
fn copy_bounded(mut from: impl std::io::Read, mut to: std::fs::File, max: u64) {
    use std::io::Write;
    let mut kept = to.metadata().map(|m| m.len()).unwrap_or(0);
    let mut dropped = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = max.saturating_sub(kept).min(n as u64) as usize;
        if room > 0 && to.write_all(&buf[..room]).is_ok() {
            kept += room as u64;
        }
        dropped += (n - room) as u64;
    }
    if dropped > 0 {
        let _ = writeln!(
            to,
            "\n[vmbox: {dropped} more bytes of output dropped: the log holds at most {max}]"
        );
    }
}

pub struct Child {
    pub name: &'static str,
    pub pid: u32,
    exit: watch::Receiver<Option<ProcessExit>>,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, cmd: Command, log: &Path) -> Result<Child, HypervisorError> {
        Child::spawn_with(name, cmd, log, |_| Ok(()))
    }

    /// [`Child::spawn`], running `prepare` on the command first (to hand fds over).
    pub fn spawn_with(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
        prepare: impl FnOnce(&mut Command) -> std::io::Result<()>,
    ) -> Result<Child, HypervisorError> {
        prepare(&mut cmd).map_err(|source| HypervisorError::Spawn { name, source })?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(HypervisorError::io("open log", log))?;
        // The child writes into a pipe; a thread copies at most MAX_LOG bytes of it into
        // the log and drops the rest (a guest that makes QEMU print must not fill /run).
        let (r, w) = std::io::pipe().map_err(HypervisorError::io("create a pipe for", log))?;
        let w2 = w.try_clone().map_err(HypervisorError::io("create a pipe for", log))?;
        cmd.stdin(Stdio::null()).stdout(w).stderr(w2);
        let spawned = cmd.spawn();
        // The parent's write ends go with `cmd`'s, so the copy sees EOF when the child ends.
        drop(cmd);
        let mut child = spawned.map_err(|source| HypervisorError::Spawn { name, source })?;
        // The exit is published once the log has everything the child wrote (its last
        // lines are usually the error), or 1 s after the exit if a grandchild keeps the
        // pipe open.
        let (copied_tx, copied) = std::sync::mpsc::channel::<()>();
        let copier = std::thread::Builder::new().name(format!("log-{name}")).spawn(move || {
            copy_bounded(r, file, MAX_LOG);
            let _ = copied_tx.send(());
        });
        if let Err(source) = copier {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HypervisorError::Spawn { name, source });
        }
        let pid = child.id();
        let (tx, rx) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                let status = match child.wait() {
                    Ok(s) => ProcessExit::from(s),
                    Err(e) => ProcessExit::WaitFailed(e.to_string()),
                };
                let _ = copied.recv_timeout(Duration::from_secs(1));
                let _ = tx.send(Some(status));
            })
            .map_err(|source| {
                // Nothing would wait for it: it must not outlive the error.
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                HypervisorError::Spawn { name, source }
            })?;
        log::debug!("started {name}, pid {pid}");
        Ok(Child { name, pid, exit: rx })
    }

    /// The exit status, once it exited.
    pub fn exited(&self) -> Option<ProcessExit> {
        self.exit.borrow().clone()
    }

    /// Waits up to `timeout` for the exit.
    pub async fn wait(&self, timeout: Duration) -> Option<ProcessExit> {
        let mut rx = self.exit.clone();
        let r = match tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await {
            Ok(Ok(s)) => s.clone(),
            _ => None,
        };
        r
    }

    pub fn signal(&self, sig: Signal) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// Waits for the exit, however long it takes.
    pub async fn wait_forever(&self) -> ProcessExit {
        let mut rx = self.exit.clone();
        let r = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().unwrap_or(ProcessExit::NeverStarted),
            Err(_) => ProcessExit::WaitFailed("the wait thread is gone".into()),
        };
        r
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone (or 5 s later).
    pub async fn stop(&self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        self.signal(Signal::SIGTERM);
        if self.wait(grace).await.is_none() {
            log::warn!(
                "{} (pid {}) ignored SIGTERM for {grace:?}: SIGKILL",
                self.name,
                self.pid
            );
            self.signal(Signal::SIGKILL);
            if self.wait(Duration::from_secs(5)).await.is_none() {
                log::error!("{} (pid {}) survived SIGKILL", self.name, self.pid);
            }
        }
    }
}

impl Drop for Child {
    /// A VM object dropped without `stop` (a panic, an early return) still leaves nothing.
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_prints_for_ever_fills_its_log_only_to_the_bound() {
        let dir = std::env::temp_dir().join(format!("vmbox-childlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "head -c 3000000 /dev/zero; echo done >&2"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = Child::spawn("flood", cmd, &log).unwrap();
            assert_eq!(c.wait(Duration::from_secs(30)).await, Some(ProcessExit::Exited(0)));
        });
        // The copy thread ends at EOF, right after the child.
        let t = std::time::Instant::now();
        while !std::fs::read(&log).unwrap().ends_with(b"]\n") {
            assert!(t.elapsed() < Duration::from_secs(10), "the log was never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        let len = std::fs::metadata(&log).unwrap().len();
        assert!((MAX_LOG..MAX_LOG + 200).contains(&len), "{len}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
