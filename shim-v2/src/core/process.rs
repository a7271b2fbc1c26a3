//! One process's state on the host (a container's init or an exec) and the transitions
//! between states. The transitions are pure: each checks the current state and either moves
//! to the next or refuses with FailedPrecondition, so every request sees a state that no
//! other request is half-way through changing.
//!
//! ```text
//!  Creating --created--> Created --start--> Starting --started--> Running <--> Paused
//!     |                  |   ^                |                     |
//!   failed             delete '--start failed-'                   exited
//!     v                  v                                          v
//!  (removed)          Deleting <------------------- delete ------ Stopped
//! ```
//! An exit can end a process in any state but Stopped and Deleting (a created init can be
//! killed); it is recorded once, so a VM death and the process's own watcher never report
//! the same exit twice.

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::error::ShimError;
use crate::io::{ProcessIo, StdioPaths};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Its container is being created in the guest (init only).
    Creating,
    Created,
    /// A Start request is in flight.
    Starting,
    Running,
    Paused,
    Stopped,
    /// A Delete request is in flight.
    Deleting,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Creating => "being created",
            Status::Created => "created",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Deleting => "being deleted",
        }
    }
}

/// A request that changes a process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Created,
    Start,
    Started,
    StartFailed,
    Pause,
    Resume,
    Delete,
}

/// The next state of `from` under `t`, or why not.
pub fn next(from: Status, t: Transition) -> Result<Status, &'static str> {
    use Status as S;
    use Transition as T;
    match (from, t) {
        (S::Creating, T::Created) => Ok(S::Created),
        (S::Created, T::Start) => Ok(S::Starting),
        (S::Starting, T::Started) => Ok(S::Running),
        (S::Starting, T::StartFailed) => Ok(S::Created),
        (S::Running, T::Pause) => Ok(S::Paused),
        (S::Paused, T::Resume) => Ok(S::Running),
        (S::Created | S::Stopped, T::Delete) => Ok(S::Deleting),
        (S::Running | S::Paused, T::Delete) => Err("still running"),
        (S::Starting, T::Start) | (S::Running | S::Paused | S::Stopped, T::Start) => Err("already started"),
        (S::Paused, T::Pause) => Err("already paused"),
        (S::Created | S::Starting | S::Running | S::Stopped, T::Resume) => Err("not paused"),
        (S::Created | S::Starting | S::Stopped, T::Pause) => Err("not running"),
        _ => Err("in the wrong state"),
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: Timestamp,
}

/// A process as the host tracks it.
pub struct Process {
    /// What [`crate::core`] reports as its pid (0 until it exists).
    pub pid: u32,
    status: Status,
    pub stdio: StdioPaths,
    /// The copy loops of its stdio, while it runs.
    pub io: Option<ProcessIo>,
    /// For execs: the OCI process (JSON) to start.
    pub spec: Option<Vec<u8>>,
    /// Held across an exec's Start and its Delete (the container's lock orders the init's).
    pub op: std::sync::Arc<tokio::sync::Mutex<()>>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
}

impl Process {
    pub fn new(status: Status, stdio: StdioPaths, spec: Option<Vec<u8>>) -> Process {
        Process {
            pid: 0,
            status,
            stdio,
            io: None,
            spec,
            op: Default::default(),
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Applies `t`, or fails with FailedPrecondition naming `what` and the current state.
    pub fn apply(&mut self, t: Transition, what: &dyn std::fmt::Display) -> Result<Status, ShimError> {
        match next(self.status, t) {
            Ok(s) => {
                self.status = s;
                Ok(s)
            }
            Err(why) => Err(ShimError::FailedPrecondition(format!(
                "{what} is {} ({why})",
                self.status.name()
            ))),
        }
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit_tx.borrow().clone()
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit_tx.subscribe()
    }

    /// Records the exit; false (and no change) if one was recorded already.
    pub fn set_exited(&mut self, info: ExitInfo) -> bool {
        if self.exit().is_some() {
            return false;
        }
        if self.status != Status::Deleting {
            self.status = Status::Stopped;
        }
        self.exit_tx.send_replace(Some(info));
        true
    }
}

/// A protobuf timestamp from nanoseconds since the epoch.
pub fn timestamp(ns: u64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = (ns / 1_000_000_000) as i64;
    t.nanos = (ns % 1_000_000_000) as i32;
    t
}

pub fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    timestamp(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_happy_path() {
        let mut s = Status::Creating;
        for (t, want) in [
            (Transition::Created, Status::Created),
            (Transition::Start, Status::Starting),
            (Transition::Started, Status::Running),
            (Transition::Pause, Status::Paused),
            (Transition::Resume, Status::Running),
        ] {
            s = next(s, t).unwrap();
            assert_eq!(s, want);
        }
    }

    #[test]
    fn illegal_transitions_are_failed_preconditions() {
        let mut p = Process::new(Status::Running, StdioPaths::default(), None);
        let e = p.apply(Transition::Start, &"container c").unwrap_err();
        assert!(matches!(e, ShimError::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("container c is running"), "{e}");
        assert!(
            p.apply(Transition::Delete, &"c").is_err(),
            "a running process is not deleted"
        );
        let mut p = Process::new(Status::Starting, StdioPaths::default(), None);
        assert!(p.apply(Transition::Delete, &"c").is_err(), "delete waits for start");
        assert!(p.apply(Transition::Start, &"c").is_err(), "double start");
        assert!(next(Status::Deleting, Transition::Delete).is_err());
        assert!(next(Status::Creating, Transition::Start).is_err());
    }

    #[test]
    fn an_exit_is_recorded_once() {
        let mut p = Process::new(Status::Running, StdioPaths::default(), None);
        let e = |status| ExitInfo { status, at: now() };
        assert!(p.set_exited(e(1)));
        assert!(!p.set_exited(e(255)));
        assert_eq!(p.exit().map(|e| e.status), Some(1));
        assert_eq!(p.status(), Status::Stopped);
    }
}
