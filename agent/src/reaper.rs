//! The agent's one reaper.
//!
//! As PID 1 the agent is the parent of every container init and exec process
//! (libcontainer clones them with CLONE_PARENT from the helper) and inherits every
//! orphan. Exactly one place calls `waitpid`: this loop, with `waitpid(-1)`. Nobody else
//! may wait on children: a second waiter steals statuses and turns them into ECHILD,
//! which is how runtimes end up reporting wrong exit codes.
//!
//! Exit statuses are handed out by pid, and pids are reused, so a status must only reach
//! the process it belongs to. A status that arrives before anyone asked for that pid (a
//! fast `true` exits before the helper even reports its pid) is kept as *unclaimed*; so
//! are the exits nobody will ever ask for (libcontainer's intermediate process, orphans).
//! [`Reaper::watch`] takes a [`Mark`] made before the request that created the process
//! and hands over an unclaimed status only if
//! - it was reaped after the mark (an earlier one belongs to an earlier holder of the
//!   pid), and
//! - no process holds the pid now (a live or zombie process with that pid is the one
//!   being watched: its own exit has not been reaped yet, so any kept status is stale).
//!
//! The reaper holds the table's lock across `waitpid` and the dispatch, so "no process
//! holds the pid and no status is kept" means the status is gone for good (expired):
//! the watcher then gets exit 255 at once instead of waiting for ever. What remains
//! possible is a second full cycle of the pid space between a process's reap and its
//! watch, i.e. `pid_max` (32768 in the guest) forks within one request.
//! Unclaimed statuses are dropped after [`UNCLAIMED_TTL`] or beyond [`MAX_UNCLAIMED`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The status given to a watcher whose process's exit can no longer be known.
pub const LOST: Exit = Exit {
    status: 255,
    signal: 0,
    at_ns: 0,
};

/// Unclaimed exits kept at most; oldest dropped first.
const MAX_UNCLAIMED: usize = 1024;
/// How long an unclaimed exit is kept: longer than any request that creates a process
/// (the helper's own deadline is 60 s), after which nobody can claim it.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(180);

/// A point in the reaper's history, taken before a request that may create processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

struct Unclaimed {
    exit: Exit,
    /// Reap sequence number, compared with a [`Mark`].
    seq: u64,
    at: Instant,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, Unclaimed>,
    /// Reap order of the unclaimed exits (pid, seq), for expiry.
    order: VecDeque<(i32, u64)>,
    /// Number of exits reaped so far.
    seq: u64,
}

/// Shared handle to the reaper's table.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
    /// Whether some process (zombies included) holds `pid`; replaced in unit tests.
    holds_pid: fn(i32) -> bool,
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper {
            table: Arc::default(),
            holds_pid: pid_in_use,
        }
    }
}

/// kill(pid, 0): ESRCH only when no process or zombie has that pid.
fn pid_in_use(pid: i32) -> bool {
    pid > 0
        && !matches!(
            nix::sys::signal::kill(Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current point in the reaper's history; take it before the request that
    /// creates the process you will [`watch`](Reaper::watch).
    pub fn mark(&self) -> Mark {
        Mark(self.lock().seq)
    }

    /// Returns a receiver that gets the exit of the process `pid` created after `since`:
    /// at once if it was already reaped (or is lost, as [`LOST`]), else when it is.
    pub fn watch(&self, pid: i32, since: Mark) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        let held = (self.holds_pid)(pid);
        match t.unclaimed.remove(&pid) {
            Some(u) if u.seq > since.0 && !held => {
                let _ = tx.send(u.exit);
                return rx;
            }
            Some(u) => log::debug!(
                "reaper: pid {pid}: dropping an exit of an earlier process (reap {} <= mark {}, pid held: {held})",
                u.seq,
                since.0
            ),
            None => {}
        }
        if !held {
            log::warn!(
                "reaper: pid {pid} is gone and its exit status expired; reporting {}",
                LOST.status
            );
            let _ = tx.send(LOST);
            return rx;
        }
        t.waiting.insert(pid, tx);
        rx
    }

    /// Reaps every child that has exited. The lock is held across each waitpid (WNOHANG,
    /// never blocks) and its dispatch, so a watcher never sees a pid that is reaped but not
    /// yet dispatched; it is released between children, so a burst of exits cannot keep
    /// watchers (on the runtime's worker threads) waiting.
    fn reap_all(&self) {
        loop {
            let mut t = self.lock();
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => dispatch(&mut t, pid.as_raw(), code, 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => dispatch(&mut t, pid.as_raw(), 128 + sig as i32, sig as u32),
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

    #[cfg(test)]
    fn with_pids(holds_pid: fn(i32) -> bool) -> Reaper {
        Reaper {
            table: Arc::default(),
            holds_pid,
        }
    }

    #[cfg(test)]
    fn dispatch_for_test(&self, pid: i32, status: i32) {
        dispatch(&mut self.lock(), pid, status, 0)
    }
}

fn dispatch(t: &mut Table, pid: i32, status: i32, signal: u32) {
    let exit = Exit {
        status,
        signal,
        at_ns: now_ns(),
    };
    t.seq += 1;
    if let Some(tx) = t.waiting.remove(&pid) {
        let _ = tx.send(exit);
        return;
    }
    let seq = t.seq;
    let now = Instant::now();
    t.unclaimed.insert(pid, Unclaimed { exit, seq, at: now });
    t.order.push_back((pid, seq));
    // Expire by count and by age; an order entry whose pid was claimed or reaped again
    // since is skipped.
    while let Some(&(old_pid, old_seq)) = t.order.front() {
        let current = t.unclaimed.get(&old_pid).filter(|u| u.seq == old_seq);
        let expired =
            t.order.len() > MAX_UNCLAIMED || current.is_some_and(|u| now.duration_since(u.at) > UNCLAIMED_TTL);
        if current.is_some() && !expired {
            break;
        }
        t.order.pop_front();
        if expired && current.is_some() {
            t.unclaimed.remove(&old_pid);
        }
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

    fn gone(_: i32) -> bool {
        false
    }
    fn held(_: i32) -> bool {
        true
    }

    #[tokio::test]
    async fn exit_before_watch_is_kept_for_the_watcher() {
        let r = Reaper::with_pids(gone);
        let m = r.mark();
        r.dispatch_for_test(42, 3);
        assert_eq!(r.watch(42, m).await.unwrap().status, 3);
    }

    #[tokio::test]
    async fn exit_after_watch_is_delivered() {
        let r = Reaper::with_pids(held);
        let rx = r.watch(7, r.mark());
        r.dispatch_for_test(7, 0);
        assert_eq!(rx.await.unwrap().status, 0);
    }

    #[tokio::test]
    async fn an_exit_reaped_before_the_mark_belongs_to_an_earlier_process() {
        // pid 42 exited (an intermediate process nobody claims), then the pid space
        // wrapped and a new process got 42: it must not get the old status.
        let r = Reaper::with_pids(held);
        r.dispatch_for_test(42, 0);
        let mut rx = r.watch(42, r.mark());
        assert!(rx.try_recv().is_err(), "a stale status was handed to a live process");
        r.dispatch_for_test(42, 7);
        assert_eq!(rx.await.unwrap().status, 7);
    }

    #[tokio::test]
    async fn a_kept_exit_is_stale_while_a_process_holds_the_pid() {
        // Reaped after the mark (another request's intermediate), but a process holds
        // the pid now: that process is the one watched, and it has not exited.
        let r = Reaper::with_pids(held);
        let m = r.mark();
        r.dispatch_for_test(9, 0);
        let mut rx = r.watch(9, m);
        assert!(rx.try_recv().is_err());
        r.dispatch_for_test(9, 3);
        assert_eq!(rx.await.unwrap().status, 3);
    }

    #[tokio::test]
    async fn a_lost_exit_is_reported_at_once_not_waited_for() {
        let r = Reaper::with_pids(gone);
        let rx = r.watch(5, r.mark());
        assert_eq!(rx.await.unwrap(), LOST);
        assert!(r.lock().waiting.is_empty());
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::with_pids(gone);
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            r.dispatch_for_test(pid, 0);
        }
        let t = r.lock();
        assert_eq!(t.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!t.unclaimed.contains_key(&0));
    }

    #[test]
    fn a_reused_pid_is_kept_once() {
        let r = Reaper::with_pids(gone);
        for _ in 0..3 * MAX_UNCLAIMED {
            r.dispatch_for_test(77, 0);
        }
        let t = r.lock();
        assert_eq!(t.unclaimed.len(), 1);
        assert!(t.order.len() <= MAX_UNCLAIMED + 1);
    }
}
