//! Finding the external programs vmbox runs.

use std::path::{Path, PathBuf};

use crate::HypervisorError;

/// Resolves `path` (a bare name is looked up in PATH, then in /usr/local/bin and
/// /usr/libexec, which containerd's PATH may lack); `hint` says how to install it.
pub fn resolve(name: &'static str, path: &Path, hint: &'static str) -> Result<PathBuf, HypervisorError> {
    if path.components().count() > 1 {
        return match is_executable(path) {
            true => Ok(path.to_path_buf()),
            false => Err(HypervisorError::MissingBinary {
                name,
                path: path.to_path_buf(),
                hint,
            }),
        };
    }
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = dirs
        .iter()
        .map(PathBuf::as_path)
        .chain([
            Path::new("/usr/local/bin"),
            Path::new("/usr/libexec"),
            Path::new("/usr/bin"),
        ])
        .map(|d| d.join(path))
        .find(|p| is_executable(p));
    found.ok_or_else(|| HypervisorError::MissingBinary {
        name,
        path: path.to_path_buf(),
        hint,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub const QEMU_HINT: &str = "install it with `apt-get install qemu-system-x86` or set binaries.qemu";
pub const VIRTIOFSD_HINT: &str =
    "install it with `cargo install --locked --root /usr/local virtiofsd` (needs libseccomp-dev libcap-ng-dev) or set binaries.virtiofsd";
pub const VSOCK_HINT: &str =
    "install it with `cargo install --locked --root /usr/local vhost-device-vsock` or set binaries.vhost_device_vsock";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_names_it_and_says_how_to_install() {
        let err = resolve("virtiofsd", Path::new("no-such-virtiofsd"), VIRTIOFSD_HINT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("virtiofsd") && err.contains("cargo install"), "{err}");
        let err = resolve("qemu", Path::new("/nonexistent/qemu"), QEMU_HINT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/qemu"), "{err}");
    }

    #[test]
    fn finds_programs_in_path() {
        assert!(resolve("sh", Path::new("sh"), "").is_ok());
    }
}
