//! What the shim knows about containers and their processes (host side).

use std::collections::HashMap;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::error::ShimError;
use crate::io::{ProcessIo, StdioPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct ExitInfo {
    pub status: u32,
    pub at: Timestamp,
}

pub struct Proc {
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub io: Option<ProcessIo>,
    /// For execs: the OCI process (JSON) to start.
    pub spec: Option<Vec<u8>>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
}

impl Proc {
    pub fn new(pid: u32, stdio: StdioPaths, spec: Option<Vec<u8>>) -> Proc {
        Proc {
            pid,
            status: Status::Created,
            stdio,
            io: None,
            spec,
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit_tx.borrow().clone()
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit_tx.subscribe()
    }

    pub fn set_exited(&mut self, info: ExitInfo) {
        self.status = Status::Stopped;
        self.exit_tx.send_replace(Some(info));
    }
}

pub struct Container {
    pub id: String,
    pub bundle: String,
    pub init: Proc,
    pub execs: HashMap<String, Proc>,
}

impl Container {
    pub fn proc(&self, exec_id: &str) -> Result<&Proc, ShimError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {} not found", self.id)))
    }

    pub fn proc_mut(&mut self, exec_id: &str) -> Result<&mut Proc, ShimError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = self.id.clone();
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {id} not found")))
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
