//! A sandbox: one micro-VM, its agent client and its shared directory, holding the
//! containers of one pod (or one lone container).
//!
//! Host layout: `<state_dir>/<namespace>-<sandbox id>/` with `vm/` (the hypervisor's
//! run directory) and `shared/` (a shared-propagation mount point exported over
//! virtio-fs; containers' rootfs and binds are mounted below `shared/<container id>/`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmbox_config::Config;
use vmbox_hypervisor::qemu::QemuVm;
use vmbox_hypervisor::{Conn, Vm, VmSpec};
use vmbox_protocol::agent::ShutdownRequest;
use vmbox_protocol::agent_ttrpc::AgentClient;

use crate::error::ShimError;
use crate::mounts;
use crate::timing;

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub shared: PathBuf,
    pub vm: QemuVm,
    pub agent: AgentClient,
    config: Config,
    next_stream: AtomicU64,
}

/// The sandbox directory of `id` in `namespace`.
pub fn sandbox_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    config.state_dir.join(format!("{namespace}-{id}"))
}

impl Sandbox {
    /// Boots the VM. On failure nothing of it is left.
    pub async fn boot(
        config: &Config,
        namespace: &str,
        id: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Sandbox, ShimError> {
        let dir = sandbox_dir(config, namespace, id);
        let shared = dir.join("shared");
        let booted = async {
            mounts::make_shared_mountpoint(&shared)?;
            let owner = dir.join("shim.pid");
            std::fs::write(&owner, std::process::id().to_string())
                .map_err(ShimError::io(format!("write {}", owner.display())))?;
            let spec = VmSpec {
                id: format!("{namespace}-{id}"),
                run_dir: dir.join("vm"),
                shared_dir: Some(shared.clone()),
                vcpus,
                memory_mib,
                // runc parity: a container whose spec sets no hostname keeps the host's.
                hostname: nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()),
            };
            let vm = QemuVm::start(config, spec).await?;
            // QEMU's vCPUs released to the agent's hello: firmware, kernel and agent start.
            timing::add_guest(vm.boot_times().guest);
            let conn = timing::guest(vm.connect(vmbox_protocol::AGENT_PORT)).await;
            match conn {
                Ok(c) => Ok((vm, vmbox_protocol::client(c))),
                Err(e) => {
                    vm.stop().await;
                    Err(ShimError::from(e))
                }
            }
        };
        match booted.await {
            Ok((vm, agent)) => Ok(Sandbox {
                id: id.to_string(),
                dir,
                shared,
                vm,
                agent,
                config: config.clone(),
                next_stream: AtomicU64::new(1),
            }),
            Err(e) => {
                mounts::unmount_and_remove(&dir);
                Err(e)
            }
        }
    }

    /// An RPC context with the configured deadline.
    pub fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(Duration::from_millis(self.config.timeouts.rpc_ms).as_nanos() as i64)
    }

    /// An RPC context for creating or starting processes, which may queue.
    pub fn create_ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(Duration::from_millis(self.config.timeouts.create_ms).as_nanos() as i64)
    }

    /// Opens a new stdio stream to the agent; returns its id.
    pub async fn stream(&self) -> Result<(u64, Conn), ShimError> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        // A burst of process starts can overflow the guest's listen backlog; the vsock
        // device then refuses the connection. Retry a few times, backing off.
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0;
        let mut c = loop {
            match self.vm.connect(vmbox_protocol::STDIO_PORT).await {
                Ok(c) => break c,
                Err(e) if attempt < 6 && self.vm.exited().is_none() => {
                    log::debug!("stdio stream {id}: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        vmbox_protocol::stream::write_header(&mut c, id)
            .await
            .map_err(|e| ShimError::Agent(format!("stdio stream: {e}")))?;
        Ok((id, c))
    }

    /// Where container `id`'s files go on the host, and its path relative to the share.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.shared.join(id)
    }

    /// Graceful stop: the agent stops the containers and flushes, the VM powers off;
    /// each step bounded, then everything on the host is removed.
    pub async fn shutdown(&self) {
        let t = &self.config.timeouts;
        let total = Duration::from_millis(t.shutdown_ms);
        let req = ShutdownRequest {
            grace_period_ms: t.grace_period_ms as u32,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout(total.as_nanos() as i64);
        match timing::guest(tokio::time::timeout(total, self.agent.shutdown(ctx, &req))).await {
            Ok(Ok(r)) => {
                log::info!(
                    "sandbox {}: guest shut down ({} processes needed SIGKILL)",
                    self.id,
                    r.killed
                );
                // The guest syncs, unmounts and powers off.
                if timing::guest(self.vm.wait_exit(Duration::from_secs(5))).await.is_none() {
                    log::warn!(
                        "sandbox {}: VM still running 5 s after the guest shut down; stopping it",
                        self.id
                    );
                }
            }
            Ok(Err(e)) => log::warn!("sandbox {}: agent shutdown failed ({e}); stopping the VM hard", self.id),
            Err(_) => log::warn!(
                "sandbox {}: agent shutdown took over {total:?}; stopping the VM hard",
                self.id
            ),
        }
        self.vm.stop().await;
        mounts::unmount_and_remove(&self.dir);
    }
}

impl Sandbox {
    /// Stops the VM without asking the guest (second signal, unresponsive agent).
    pub async fn stop_hard(&self) {
        self.vm.stop().await;
        mounts::unmount_and_remove(&self.dir);
    }
}

/// The pid of the live shim that owns sandbox directory `dir`, if any (never this process).
pub fn live_owner(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("shim.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (pid != std::process::id() && String::from_utf8_lossy(&cmd).contains("containerd-shim-vmbox-v2")).then_some(pid)
}

/// Cleans up a sandbox whose shim died: stops its VM and daemons, unmounts, removes.
pub fn cleanup_dead(dir: &Path) {
    if let Err(e) = vmbox_hypervisor::qemu::cleanup_run_dir(&dir.join("vm")) {
        log::warn!("{e}");
    }
    mounts::unmount_and_remove(dir);
}
