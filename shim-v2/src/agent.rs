//! The guest agent as the shim core sees it: a small trait over domain types
//! ([`GuestAgent`]) and its implementation over the agent's ttrpc API ([`TtrpcAgent`]).
//!
//! This is the one place that chooses each request's deadline (`timeouts.rpc_ms` for quick
//! requests, `timeouts.create_ms` for creating and starting processes, none for the waits
//! that last as long as a process or a sandbox), maps the agent's status codes onto
//! [`ShimError`], and counts the time spent waiting as guest time ([`crate::timing`]).

use std::time::Duration;

use async_trait::async_trait;
use vmbox_config::Timeouts;
use vmbox_protocol::agent as pb;
use vmbox_protocol::agent_ttrpc::AgentClient;
use vmbox_protocol::Id;

use crate::error::ShimError;
use crate::timing;

/// A process of a container: its init (`exec: None`) or one of its execs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessRef {
    pub container: Id,
    pub exec: Option<Id>,
}

impl ProcessRef {
    pub fn init(container: Id) -> ProcessRef {
        ProcessRef { container, exec: None }
    }

    /// The id containerd uses for this process in events (the exec id, or the container's).
    pub fn event_id(&self) -> String {
        self.exec.as_ref().unwrap_or(&self.container).to_string()
    }

    fn exec_str(&self) -> String {
        self.exec.as_ref().map(|e| e.to_string()).unwrap_or_default()
    }
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.exec {
            None => write!(f, "container {}", self.container),
            Some(e) => write!(f, "exec {e} of container {}", self.container),
        }
    }
}

/// The stdio streams already opened to the guest for a process (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamIds {
    pub stdin: u64,
    pub stdout: u64,
    pub stderr: u64,
    pub terminal: bool,
}

/// How a process ended, as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    pub status: u32,
    /// Nanoseconds since the Unix epoch (guest clock).
    pub at_ns: u64,
}

/// A container to create in the guest.
#[derive(Debug, Clone)]
pub struct GuestContainer {
    pub id: Id,
    /// The OCI spec translated for the guest (`config.json` bytes).
    pub oci_spec: Vec<u8>,
    /// The rootfs, relative to the shared directory.
    pub rootfs: String,
    pub stdio: StreamIds,
    /// What it shares with its pod; `None` for a lone container.
    pub pod: Option<vmbox_oci::GuestPod>,
}

/// What the shim core needs from the guest agent. Errors carry the agent's code
/// (NotFound, FailedPrecondition, AlreadyExists, InvalidArgument) or are Internal.
#[async_trait]
pub trait GuestAgent: Send + Sync {
    /// Creates a container (its init process waits for `start`); returns the guest pid.
    async fn create(&self, c: GuestContainer) -> Result<u32, ShimError>;
    /// Starts a created container's init; returns its guest pid.
    async fn start(&self, container: &Id) -> Result<u32, ShimError>;
    /// Starts an exec (`process`: an OCI process, JSON); returns its guest pid.
    async fn exec(&self, p: &ProcessRef, process: Vec<u8>, stdio: StreamIds) -> Result<u32, ShimError>;
    /// Sends `signal`, to every process of the container with `all`.
    async fn signal(&self, p: &ProcessRef, signal: u32, all: bool) -> Result<(), ShimError>;
    /// Waits, without a deadline, until the process exits.
    async fn wait(&self, p: &ProcessRef) -> Result<GuestExit, ShimError>;
    async fn resize_pty(&self, p: &ProcessRef, rows: u32, cols: u32) -> Result<(), ShimError>;
    /// Guest pids of the container's processes.
    async fn pids(&self, container: &Id) -> Result<Vec<u32>, ShimError>;
    /// The container's cgroup statistics.
    async fn stats(&self, container: &Id) -> Result<pb::StatsContainerResponse, ShimError>;
    async fn pause(&self, container: &Id) -> Result<(), ShimError>;
    async fn resume(&self, container: &Id) -> Result<(), ShimError>;
    /// Applies OCI `LinuxResources` (JSON).
    async fn update(&self, container: &Id, resources: Vec<u8>) -> Result<(), ShimError>;
    /// Removes the container (killing what is left with `force`).
    async fn remove(&self, container: &Id, force: bool) -> Result<(), ShimError>;
    /// Waits, without a deadline, for the next OOM kill; returns the container id as the
    /// guest sent it (unchecked: the caller decides whether it names one of its own).
    async fn next_oom(&self) -> Result<String, ShimError>;
    /// Stops every container (SIGKILL after `grace`), syncs, unmounts and powers the guest
    /// off; returns how many processes needed SIGKILL. Bounded by `total`.
    async fn shutdown(&self, grace: Duration, total: Duration) -> Result<u32, ShimError>;
    /// Gives the guest the pod's network (NICs found by MAC); returns the guest's view
    /// afterwards, checked ([`vmbox_network::proto::decode`]). Idempotent.
    async fn setup_network(&self, net: &vmbox_network::Network) -> Result<vmbox_network::Network, ShimError>;
    /// The TCP ports the guest listens on (wildcard or loopback), at most 1024.
    async fn listeners(&self) -> Result<Vec<u16>, ShimError>;
}

/// [`GuestAgent`] over the agent's ttrpc service.
pub struct TtrpcAgent {
    client: AgentClient,
    timeouts: Timeouts,
}

/// Pids a ListProcesses reply may hold: the guest's `pid_max` (vmbox's guest kernel).
pub const MAX_PIDS: usize = 32768;
/// Listening ports of the guest the shim forwards at most (ListListeners).
pub const MAX_LISTENERS: usize = 1024;
/// Block devices in a stats reply at most (`io` entries).
pub const MAX_IO_ENTRIES: usize = 256;
/// Keys of a stats reply's `memory.stat` map at most (cgroup v2 has about 50).
pub const MAX_MEMORY_STAT_KEYS: usize = 256;

/// A ListProcesses reply's pids, refused beyond [`MAX_PIDS`].
pub fn check_pids(pids: Vec<u32>) -> Result<Vec<u32>, ShimError> {
    if pids.len() > MAX_PIDS {
        return Err(ShimError::Agent(format!(
            "ListProcesses reply of {} pids: more than the guest's pid_max ({MAX_PIDS})",
            pids.len()
        )));
    }
    Ok(pids)
}

/// The guest's listening ports as the shim forwards them: the first [`MAX_LISTENERS`], real
/// TCP ports only (1-65535).
pub fn listening_ports(ports: Vec<u32>) -> Vec<u16> {
    ports
        .into_iter()
        .take(MAX_LISTENERS)
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .collect()
}

/// Refuses a stats reply larger than an honest guest sends (the shim copies it into
/// containerd's metrics).
pub fn check_stats(s: &pb::StatsContainerResponse) -> Result<(), ShimError> {
    let keys = s.memory.as_ref().map(|m| m.stat.len()).unwrap_or(0);
    if s.io.len() > MAX_IO_ENTRIES || keys > MAX_MEMORY_STAT_KEYS {
        return Err(ShimError::Agent(format!(
            "StatsContainer reply with {} io entries and {keys} memory.stat keys: at most {MAX_IO_ENTRIES} and {MAX_MEMORY_STAT_KEYS}",
            s.io.len()
        )));
    }
    Ok(())
}

fn ctx(d: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(d.as_nanos() as i64)
}

impl TtrpcAgent {
    pub fn new(client: AgentClient, timeouts: Timeouts) -> TtrpcAgent {
        TtrpcAgent { client, timeouts }
    }

    fn quick(&self) -> ttrpc::context::Context {
        ctx(Duration::from_millis(self.timeouts.rpc_ms))
    }

    /// For creating or starting processes, which may queue in the guest.
    fn slow(&self) -> ttrpc::context::Context {
        ctx(Duration::from_millis(self.timeouts.create_ms))
    }

    fn container_req(id: &Id) -> pb::ContainerRequest {
        pb::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        }
    }
}

fn stdio(s: StreamIds) -> pb::Stdio {
    pb::Stdio {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
        ..Default::default()
    }
}

#[async_trait]
impl GuestAgent for TtrpcAgent {
    async fn create(&self, c: GuestContainer) -> Result<u32, ShimError> {
        let req = pb::CreateContainerRequest {
            container_id: c.id.to_string(),
            oci_spec: c.oci_spec,
            rootfs: c.rootfs,
            stdio: Some(stdio(c.stdio)).into(),
            pod: c
                .pod
                .map(|p| pb::PodShare {
                    sandbox_id: p.sandbox_id,
                    namespaces: p.namespaces,
                    shm_bytes: p.shm_bytes,
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        };
        let r = timing::guest(self.client.create_container(self.slow(), &req)).await;
        Ok(r.map_err(ShimError::agent)?.pid)
    }

    async fn start(&self, container: &Id) -> Result<u32, ShimError> {
        let req = Self::container_req(container);
        let r = timing::guest(self.client.start_container(self.slow(), &req)).await;
        Ok(r.map_err(ShimError::agent)?.pid)
    }

    async fn exec(&self, p: &ProcessRef, process: Vec<u8>, s: StreamIds) -> Result<u32, ShimError> {
        let req = pb::ExecProcessRequest {
            container_id: p.container.to_string(),
            exec_id: p.exec_str(),
            process,
            stdio: Some(stdio(s)).into(),
            ..Default::default()
        };
        let r = timing::guest(self.client.exec_process(self.slow(), &req)).await;
        Ok(r.map_err(ShimError::agent)?.pid)
    }

    async fn signal(&self, p: &ProcessRef, signal: u32, all: bool) -> Result<(), ShimError> {
        let req = pb::SignalProcessRequest {
            container_id: p.container.to_string(),
            exec_id: p.exec_str(),
            signal,
            all,
            ..Default::default()
        };
        let r = timing::guest(self.client.signal_process(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn wait(&self, p: &ProcessRef) -> Result<GuestExit, ShimError> {
        let req = pb::ProcessRequest {
            container_id: p.container.to_string(),
            exec_id: p.exec_str(),
            ..Default::default()
        };
        let w = self
            .client
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map_err(ShimError::agent)?;
        Ok(GuestExit {
            status: w.exit_status as u32,
            at_ns: w.exited_at_ns,
        })
    }

    async fn resize_pty(&self, p: &ProcessRef, rows: u32, cols: u32) -> Result<(), ShimError> {
        let req = pb::ResizePtyRequest {
            container_id: p.container.to_string(),
            exec_id: p.exec_str(),
            rows,
            cols,
            ..Default::default()
        };
        let r = timing::guest(self.client.resize_pty(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn pids(&self, container: &Id) -> Result<Vec<u32>, ShimError> {
        let req = Self::container_req(container);
        let r = timing::guest(self.client.list_processes(self.quick(), &req)).await;
        check_pids(r.map_err(ShimError::agent)?.pids)
    }

    async fn stats(&self, container: &Id) -> Result<pb::StatsContainerResponse, ShimError> {
        let req = Self::container_req(container);
        let stats = timing::guest(self.client.stats_container(self.quick(), &req))
            .await
            .map_err(ShimError::agent)?;
        check_stats(&stats)?;
        Ok(stats)
    }

    async fn pause(&self, container: &Id) -> Result<(), ShimError> {
        let req = Self::container_req(container);
        let r = timing::guest(self.client.pause_container(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn resume(&self, container: &Id) -> Result<(), ShimError> {
        let req = Self::container_req(container);
        let r = timing::guest(self.client.resume_container(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn setup_network(&self, net: &vmbox_network::Network) -> Result<vmbox_network::Network, ShimError> {
        let req = vmbox_network::proto::encode(net);
        let r = timing::guest(self.client.setup_network(self.slow(), &req)).await;
        let view = r.map_err(ShimError::agent)?;
        vmbox_network::proto::decode(&view).map_err(|e| {
            let e = vmbox_protocol::text::bounded(&e.to_string(), vmbox_protocol::text::MAX_GUEST_TEXT);
            ShimError::Agent(format!("SetupNetwork reply: {e}"))
        })
    }

    async fn listeners(&self) -> Result<Vec<u16>, ShimError> {
        let r = timing::guest(self.client.list_listeners(self.quick(), &pb::Empty::new())).await;
        Ok(listening_ports(r.map_err(ShimError::agent)?.ports))
    }

    async fn update(&self, container: &Id, resources: Vec<u8>) -> Result<(), ShimError> {
        let req = pb::UpdateContainerRequest {
            container_id: container.to_string(),
            resources,
            ..Default::default()
        };
        let r = timing::guest(self.client.update_container(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn remove(&self, container: &Id, force: bool) -> Result<(), ShimError> {
        let req = pb::RemoveContainerRequest {
            container_id: container.to_string(),
            force,
            ..Default::default()
        };
        let r = timing::guest(self.client.remove_container(self.quick(), &req)).await;
        r.map(|_| ()).map_err(ShimError::agent)
    }

    async fn next_oom(&self) -> Result<String, ShimError> {
        let ev = self
            .client
            .get_oom_event(ttrpc::context::Context::default(), &pb::Empty::new())
            .await
            .map_err(ShimError::agent)?;
        if ev.container_id.len() > vmbox_protocol::id::MAX_ID_LEN {
            return Err(ShimError::Agent(format!(
                "OomEvent container id of {} bytes: ids have at most {}",
                ev.container_id.len(),
                vmbox_protocol::id::MAX_ID_LEN
            )));
        }
        Ok(ev.container_id)
    }

    async fn shutdown(&self, grace: Duration, total: Duration) -> Result<u32, ShimError> {
        let req = pb::ShutdownRequest {
            grace_period_ms: grace.as_millis().min(u32::MAX as u128) as u32,
            ..Default::default()
        };
        let call = self.client.shutdown(ctx(total), &req);
        match timing::guest(tokio::time::timeout(total, call)).await {
            Ok(r) => Ok(r.map_err(ShimError::agent)?.killed),
            Err(_) => Err(ShimError::Timeout {
                what: "the guest's shutdown".into(),
                after: total,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_and_port_lists_from_the_guest_are_bounded() {
        assert_eq!(check_pids(vec![1, 2]).unwrap(), [1, 2]);
        assert!(check_pids(vec![7; MAX_PIDS]).is_ok());
        let e = check_pids(vec![7; MAX_PIDS + 1]).unwrap_err().to_string();
        assert!(e.contains("pid_max"), "{e}");
        assert_eq!(listening_ports(vec![0, 80, 70000, 443]), [80, 443]);
        assert_eq!(listening_ports((1..=5000).collect()).len(), MAX_LISTENERS);
    }

    #[test]
    fn a_stats_reply_larger_than_an_honest_guest_sends_is_refused() {
        let mut s = pb::StatsContainerResponse::new();
        assert!(check_stats(&s).is_ok());
        s.io = vec![pb::IoEntry::new(); MAX_IO_ENTRIES];
        assert!(check_stats(&s).is_ok());
        s.io.push(pb::IoEntry::new());
        let e = check_stats(&s).unwrap_err().to_string();
        assert!(e.contains("io entries"), "{e}");
        s.io.clear();
        let mut m = pb::MemoryStats::new();
        for i in 0..=MAX_MEMORY_STAT_KEYS {
            m.stat.insert(format!("k{i}"), 1);
        }
        s.memory = Some(m).into();
        assert!(check_stats(&s).is_err());
    }
}
