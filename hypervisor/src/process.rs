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

pub struct Child {
    pub name: &'static str,
    pub pid: u32,
    exit: watch::Receiver<Option<String>>,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Child, HypervisorError> {
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
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                let _ = tx.send(Some(status));
            })
            .map_err(|source| HypervisorError::Spawn { name, source })?;
        log::debug!("started {name}, pid {pid}");
        Ok(Child { name, pid, exit: rx })
    }

    /// The exit status, once it exited.
    pub fn exited(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Waits up to `timeout` for the exit.
    pub async fn wait(&self, timeout: Duration) -> Option<String> {
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
