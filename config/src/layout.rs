//! Where a sandbox's files live on the host, below `state_dir`.
//!
//! - `<state_dir>/sandbox/<namespace>/<sandbox id>/`: the shim's `shim.pid` and `shared/` (the
//!   containers' rootfs and binds, exported over virtio-fs). Namespace and id are path
//!   components of their own, so no two pairs share a directory (`a-b`/`c` vs `a`/`b-c`),
//!   and no namespace can reach the VMs' directories.
//! - `<state_dir>/vm/<16 hex digits>/`: the VM's run directory, holding its sockets. It is
//!   named by a hash of namespace and id, so its length does not grow with them: socket
//!   paths must fit `sun_path` (107 bytes) with 64-hex ids and 76-character namespaces.
//!
//! The caller checks that namespace and id are single path components (vmbox-protocol's
//! id rule); [`SandboxPaths::fits`] says whether `state_dir` leaves room for the sockets.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The sockets below a run directory (the VMM's, in `vmm/`), for the length budget.
pub const RUN_DIR_SOCKETS: &[&str] = &[
    "vmm/qmp.sock",
    "vmm/con.sock",
    "vmm/fs.sock",
    "vmm/vhost.sock",
    "vmm/vsock",
    "vmm/vsock_1024",
];

/// Longest run directory, in bytes: 17 bytes are kept for the socket names below it (at
/// most `/vmm/vsock_1024` today, see [`RUN_DIR_SOCKETS`]), so paths fit `sun_path` (107
/// bytes plus the NUL).
pub const MAX_RUN_DIR_LEN: usize = 107 - 17;

/// Longest `state_dir` whose run directories fit [`MAX_RUN_DIR_LEN`].
pub const MAX_STATE_DIR_LEN: usize = MAX_RUN_DIR_LEN - "/vm/0123456789abcdef".len();

/// The host paths of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    /// `<state_dir>/sandbox/<namespace>/<sandbox id>`.
    pub dir: PathBuf,
    /// `<dir>/shared`: exported to the guest.
    pub shared: PathBuf,
    /// `<state_dir>/vm/<key>`: the VM's sockets, logs and pids.
    pub run_dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(state_dir: &Path, namespace: &str, sandbox_id: &str) -> SandboxPaths {
        let dir = state_dir.join("sandbox").join(namespace).join(sandbox_id);
        let mut h = Sha256::new();
        h.update(namespace.as_bytes());
        h.update(b"\0");
        h.update(sandbox_id.as_bytes());
        let key: String = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
        SandboxPaths {
            shared: dir.join("shared"),
            dir,
            run_dir: state_dir.join("vm").join(key),
        }
    }

    /// Whether the run directory leaves room for its sockets.
    pub fn fits(&self) -> bool {
        self.run_dir.as_os_str().len() <= MAX_RUN_DIR_LEN
    }

    /// Where container `id`'s files go.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.shared.join(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_directories_are_unambiguous() {
        let a = SandboxPaths::new(Path::new("/run/vmbox"), "a-b", "c");
        let b = SandboxPaths::new(Path::new("/run/vmbox"), "a", "b-c");
        assert_ne!(a.dir, b.dir);
        assert_ne!(a.run_dir, b.run_dir);
        assert_eq!(a.dir, Path::new("/run/vmbox/sandbox/a-b/c"));
        let vm = SandboxPaths::new(Path::new("/run/vmbox"), "vm", "0123456789abcdef");
        assert!(
            !vm.dir.starts_with("/run/vmbox/vm"),
            "a namespace named vm stays out of the VMs' directories"
        );
    }

    #[test]
    fn socket_directories_stay_short_whatever_the_ids() {
        let state = format!("/{}", "s".repeat(MAX_STATE_DIR_LEN - 1));
        let l = SandboxPaths::new(Path::new(&state), &"n".repeat(76), &"f".repeat(128));
        assert!(l.fits(), "{}", l.run_dir.display());
        for sock in RUN_DIR_SOCKETS {
            assert!(l.run_dir.join(sock).as_os_str().len() <= 107, "{sock}");
        }
        let l = SandboxPaths::new(Path::new(&format!("{state}xx")), "n", "f");
        assert!(!l.fits());
    }
}
