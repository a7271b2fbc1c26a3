//! Starting, reaching and stopping a sandbox's micro-VM.
//!
//! The seam is [`Hypervisor`] (start a VM from a [`VmSpec`]) and [`Vm`] (reach its
//! ports, pause, stop). [`qemu`] is the backend: QEMU `-M microvm` with virtiofsd for
//! the shared directory and vsock through vhost-device-vsock or the kernel.
//!
//! Everything a VM creates lives in its run directory and dies with it: `stop`, a
//! failed start and drop all remove the processes; [`qemu::cleanup_run_dir`] does the
//! same for a VM whose owner died. The guest is untrusted: what it sends is size-bounded
//! and no host path is ever taken from it.

pub mod accel;
pub mod binaries;
pub mod cgroup;
pub mod confine;
mod error;
mod process;
pub mod qemu;
pub mod qmp;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
pub use error::HypervisorError;
use vmbox_protocol::agent::Hello;

pub use accel::Accel;
pub use process::ProcessExit;
pub use vsock::Conn;

/// What to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Names the VM in logs and `ps` (QEMU's `-name vmbox-<name>`): 1-256 of
    /// `[A-Za-z0-9_.-]` (for example `<namespace>-<sandbox id>`); checked by the backend.
    pub name: String,
    /// Created by the backend and removed by `stop`. Sockets are created in it, so it must be
    /// short: a path of at most [`MAX_RUN_DIR_LEN`] bytes.
    pub run_dir: PathBuf,
    /// Host directory shared into the guest over virtio-fs.
    pub shared_dir: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The guest's hostname (what a container without a hostname of its own sees);
    /// `None` leaves the guest's unset. Must pass [`vmbox_protocol::valid_hostname`].
    pub hostname: Option<String>,
    /// The host cgroup the VMM and its daemons run in, relative to each hierarchy's root
    /// (the sandbox's `linux.cgroupsPath`); created at start, removed by `stop`. `None`
    /// leaves them in the shim's.
    pub cgroup: Option<PathBuf>,
    /// The pod's network namespace: each link in it that carries an address becomes a
    /// guest NIC (a tap with tc redirects, [`vmbox_network::host::attach`]), and the VMM
    /// runs in it. `None`: the guest has only `lo`.
    pub network: Option<NetworkNamespace>,
}

/// The network namespace a VM is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkNamespace {
    /// One that outlives the VM (CRI's `/var/run/netns/cni-...`, `ctr run --with-ns
    /// network:<path>`): the redirects made in it are recorded in the run directory and
    /// removed when the VM stops (or by [`Hypervisor::cleanup`]).
    Shared(PathBuf),
    /// One only the VM holds once it runs (made for a container whose OCI hooks filled
    /// it), reached through this path during the start only: it goes, links and all, with
    /// the VMM, so nothing is recorded (the path may name another namespace later).
    Private(PathBuf),
}

pub use vmbox_config::MAX_RUN_DIR_LEN;

/// How the VMM process ended.
pub type VmExit = ProcessExit;

/// Where a VM's boot went: host-side steps, then the guest itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// The helper daemons (virtiofsd, vhost-device-vsock) started and listening.
    pub daemons: Duration,
    /// The VMM process started to its machine being built (QEMU's monitor answers).
    pub vmm_init: Duration,
    /// The guest released to the agent's hello: firmware, kernel, agent start.
    pub guest: Duration,
}

/// A VM backend.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Boots a VM as `config` says (kernel, binaries, accelerator, timeouts) and waits for
    /// its agent's hello (bounded by `timeouts.boot_ms`). On
    /// failure nothing of it is left (processes, run directory).
    async fn start(&self, config: &vmbox_config::Config, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;
    /// Stops whatever a VM whose owner died (or whose start was abandoned) left in
    /// `run_dir`, and removes the directory. Blocking; call it off the async workers.
    fn cleanup(&self, run_dir: &Path) -> Result<(), HypervisorError>;
}

/// A running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    /// [`VmSpec::name`].
    fn name(&self) -> &str;
    /// What the agent said when it came up.
    fn hello(&self) -> &Hello;
    fn boot_times(&self) -> BootTimes;
    fn accel(&self) -> Accel;
    /// Opens a stream to a guest vsock port (bounded by `timeouts.rpc_ms`).
    async fn connect(&self, port: u32) -> Result<Conn, HypervisorError>;
    /// Freezes / thaws the whole VM (vCPUs).
    async fn pause(&self) -> Result<(), HypervisorError>;
    async fn resume(&self) -> Result<(), HypervisorError>;
    /// The VMM's exit, once it exited.
    fn exited(&self) -> Option<VmExit>;
    /// Waits up to `timeout` for the VMM to exit (after the agent powered the guest off).
    async fn wait_exit(&self, timeout: Duration) -> Option<VmExit>;
    /// Waits for the VMM to exit, however long that takes (a watcher's wait).
    async fn wait(&self) -> VmExit;
    /// Live host processes of this VM (VMM and daemons).
    fn pids(&self) -> Vec<u32>;
    /// The VMM's host pid (stays the same after it exited; 0 if it never started). The
    /// pid containerd gets for every task of the sandbox: containerd and its CRI plugin
    /// treat task pids as host pids (`/proc/<pid>/ns/*`, signals), as Kata reports its
    /// hypervisor's.
    fn vmm_pid(&self) -> u32;
    /// The pod network carried into the VM (its NICs by MAC, addresses, routes,
    /// neighbours), for the agent's `SetupNetwork`; empty without one.
    fn network(&self) -> &vmbox_network::Network;
    /// Moves the VMM and its daemons (and whatever they forked) into the host cgroup at
    /// `path` (relative to each hierarchy's root; created if missing, removed by `stop`).
    /// For a VM started without one: a standby VM handed to a sandbox. Errors:
    /// [`HypervisorError::Cgroup`] naming the path (the VM already has a cgroup, a move
    /// the host refused).
    async fn join_cgroup(&self, path: &Path) -> Result<(), HypervisorError>;
    /// The last `lines` lines of the guest console (kept in a bounded buffer).
    fn console_tail(&self, lines: usize) -> String;
    /// Stops the VMM (QMP quit, then SIGKILL) and the daemons, removes the run directory.
    /// Idempotent. Graceful shutdown is the agent's `Shutdown` before this.
    async fn stop(&self);
}
