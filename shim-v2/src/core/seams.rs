//! What the core stands on, each behind a small trait so the core can be tested against
//! fakes: the VM backend ([`vmbox_hypervisor::Hypervisor`]), the guest agent
//! ([`GuestAgent`], reached through an [`AgentConnector`]), host mounts ([`HostFs`]) and
//! events ([`EventSink`]). Plus where a sandbox's files live on the host ([`Layout`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::protos::api::Mount;
use vmbox_config::{SandboxPaths, Timeouts, MAX_STATE_DIR_LEN};
use vmbox_hypervisor::{Conn, Hypervisor};
use vmbox_protocol::Id;

use crate::agent::GuestAgent;
use crate::error::ShimError;
use crate::events::EventSink;

/// Makes a [`GuestAgent`] of a connection to the agent's port.
pub trait AgentConnector: Send + Sync {
    fn connect(&self, conn: Conn, timeouts: &Timeouts) -> Arc<dyn GuestAgent>;
}

/// The agent's ttrpc service over the connection.
pub struct TtrpcConnector;

impl AgentConnector for TtrpcConnector {
    fn connect(&self, conn: Conn, timeouts: &Timeouts) -> Arc<dyn GuestAgent> {
        Arc::new(crate::agent::TtrpcAgent::new(
            vmbox_protocol::client(conn),
            timeouts.clone(),
        ))
    }
}

/// A container's host mounts: its rootfs at `target`, and the binds the guest reaches
/// through the shared directory.
#[derive(Debug, Clone)]
pub struct ContainerMounts {
    /// containerd's rootfs mounts (empty: bind `spec_root`).
    pub rootfs: Vec<Mount>,
    /// The spec's `root.path`, relative to `bundle` unless absolute.
    pub spec_root: PathBuf,
    pub bundle: PathBuf,
    pub target: PathBuf,
    /// (source, target, read-only).
    pub binds: Vec<(PathBuf, PathBuf, bool)>,
}

/// Host filesystem work. Every method blocks (mount, umount, directory walks): the core
/// calls them on blocking threads, never on the async workers.
pub trait HostFs: Send + Sync {
    /// Creates the sandbox's directories, makes `shared` a shared mount point, and records
    /// this process as the owner (`shim.pid`).
    fn prepare_sandbox(&self, layout: &Layout) -> Result<(), ShimError>;
    /// Mounts a container's rootfs and binds.
    fn mount_container(&self, m: &ContainerMounts) -> Result<(), ShimError>;
    /// Unmounts everything below `dir` and removes it (never recursing into a mount).
    fn remove(&self, dir: &Path);
}

/// The core's seams.
#[derive(Clone)]
pub struct Seams {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub agents: Arc<dyn AgentConnector>,
    pub host: Arc<dyn HostFs>,
    pub events: Arc<dyn EventSink>,
}

impl Seams {
    /// The real parts: QEMU, the agent over ttrpc, the host's mounts, and `events`.
    pub fn system(events: Arc<dyn EventSink>) -> Seams {
        Seams {
            hypervisor: Arc::new(vmbox_hypervisor::qemu::Qemu),
            agents: Arc::new(TtrpcConnector),
            host: Arc::new(crate::mounts::SystemFs),
            events,
        }
    }
}

/// Where a sandbox's files live on the host ([`vmbox_config::layout`]).
pub type Layout = SandboxPaths;

/// The layout of sandbox `id` in containerd namespace `namespace`. Fails, naming the field,
/// on a namespace that is not a single path component, or naming `state_dir` when its run
/// directory would be too long for its sockets.
pub fn layout(state_dir: &Path, namespace: &str, id: &Id) -> Result<Layout, ShimError> {
    let ns = Id::parse("namespace", namespace)?;
    let l = SandboxPaths::new(state_dir, ns.as_str(), id.as_str());
    if !l.fits() {
        return Err(ShimError::Invalid(format!(
            "state_dir {} is too long: the VM's sockets below it need it at most {MAX_STATE_DIR_LEN} bytes",
            state_dir.display()
        )));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse("id", s).unwrap()
    }

    #[test]
    fn a_state_dir_too_long_for_sockets_is_named() {
        let state = format!("/{}", "s".repeat(100));
        let e = layout(Path::new(&state), "default", &id("x")).unwrap_err();
        assert!(matches!(e, ShimError::Invalid(_)));
        assert!(e.to_string().contains("state_dir"), "{e}");
        assert!(layout(Path::new("/run"), "a/b", &id("x")).is_err(), "namespace checked");
        let l = layout(Path::new("/var/lib/vmbox-state"), &"n".repeat(76), &id(&"f".repeat(64))).unwrap();
        assert!(l.run_dir.join("vhost-vsock.sock").as_os_str().len() <= 107);
    }
}
