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
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(HypervisorError::io("open log", log))?;
        let err = out.try_clone().map_err(HypervisorError::io("open log", log))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let mut child = cmd.spawn().map_err(|source| HypervisorError::Spawn { name, source })?;
        let pid = child.id();
        let (tx, rx) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                let status = match child.wait() {
                    Ok(s) => ProcessExit::from(s),
                    Err(e) => ProcessExit::WaitFailed(e.to_string()),
                };
                let _ = tx.send(Some(status));
            })
            .map_err(|source| HypervisorError::Spawn { name, source })?;
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
