//! The agent's one reaper.
//!
//! As PID 1 the agent is the parent of every container init and exec process
//! (libcontainer clones them with CLONE_PARENT from the helper) and inherits every
//! orphan. Exactly one place calls `waitpid`: this loop, with `waitpid(-1)`. Exit
//! statuses are handed out by pid; a status that arrives before anyone asked for that
//! pid (a fast `true` exits before its pid is even registered) is kept, bounded, until
//! claimed. Nobody else may wait on children: a second waiter steals statuses and turns
//! them into ECHILD, which is how runtimes end up reporting wrong exit codes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    /// The terminating signal, 0 for a normal exit.
    pub signal: u32,
    /// Wall-clock time of the reap, ns since the Unix epoch.
    pub at_ns: u64,
}

/// Exits nobody registered for yet; also the orphans PID 1 inherits. Oldest dropped first.
const MAX_UNCLAIMED: usize = 1024;

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

/// Shared handle to the reaper's table.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Starts the reaping loop on the current tokio runtime.
    pub fn start() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that gets `pid`'s exit, at once if it already happened.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(exit) = t.unclaimed.remove(&pid) {
            t.order.retain(|p| *p != pid);
            let _ = tx.send(exit);
        } else {
            t.waiting.insert(pid, tx);
        }
        rx
    }

    /// Reaps every child that has exited.
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.dispatch(pid.as_raw(), code, 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.dispatch(pid.as_raw(), 128 + sig as i32, sig as u32),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("reaper: waitpid(-1) failed: {e}");
                    return;
                }
            }
        }
    }

    fn dispatch(&self, pid: i32, status: i32, signal: u32) {
        let exit = Exit {
            status,
            signal,
            at_ns: now_ns(),
        };
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => {
                t.unclaimed.insert(pid, exit);
                t.order.push_back(pid);
                while t.order.len() > MAX_UNCLAIMED {
                    if let Some(old) = t.order.pop_front() {
                        t.unclaimed.remove(&old);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    fn dispatch_for_test(&self, pid: i32, status: i32) {
        self.dispatch(pid, status, 0)
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_before_watch_is_kept_for_the_watcher() {
        let r = Reaper::default();
        r.dispatch_for_test(42, 3);
        assert_eq!(r.watch(42).await.unwrap().status, 3);
    }

    #[tokio::test]
    async fn exit_after_watch_is_delivered() {
        let r = Reaper::default();
        let rx = r.watch(7);
        r.dispatch_for_test(7, 0);
        assert_eq!(rx.await.unwrap().status, 0);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            r.dispatch_for_test(pid, 0);
        }
        let t = r.table.lock().unwrap();
        assert_eq!(t.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!t.unclaimed.contains_key(&0));
    }
}
