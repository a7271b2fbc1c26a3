//! Host-side mounts that make a container's files visible to the guest: its rootfs and
//! bind mounts go below the sandbox's shared directory, which virtiofsd exports.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::core::seams::{ContainerMounts, HostFs, Layout};
use crate::error::ShimError;

/// [`HostFs`] on this host's mount table.
pub struct SystemFs;

impl HostFs for SystemFs {
    fn prepare_sandbox(&self, layout: &Layout) -> Result<(), ShimError> {
        make_shared_mountpoint(&layout.shared)?;
        let owner = layout.dir.join("shim.pid");
        std::fs::write(&owner, std::process::id().to_string())
            .map_err(ShimError::io(format!("write {}", owner.display())))
    }

    fn mount_container(&self, m: &ContainerMounts) -> Result<(), ShimError> {
        mount_rootfs(&m.rootfs, &m.spec_root, &m.bundle, &m.target)?;
        for (src, target, ro) in &m.binds {
            bind(src, target, *ro)?;
        }
        Ok(())
    }

    fn remove(&self, dir: &Path) {
        // The namespace's directory stays: removing it could race another shim creating
        // its sandbox in the same namespace.
        unmount_and_remove(dir);
    }
}

/// Makes `dir` a mount point with shared propagation, so rootfs mounts made below it
/// after virtiofsd started (in its own mount namespace) still reach virtiofsd.
pub fn make_shared_mountpoint(dir: &Path) -> Result<(), ShimError> {
    std::fs::create_dir_all(dir).map_err(ShimError::io(format!("create {}", dir.display())))?;
    let err = |what: &str| {
        let what = format!("{what} {}", dir.display());
        move |e: nix::errno::Errno| ShimError::Io { what, source: e.into() }
    };
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err("bind-mount"))?;
    mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>).map_err(err("make shared"))?;
    Ok(())
}

/// Mounts the container's rootfs at `target`: containerd's mounts when it gave any,
/// else the spec's root path (relative to the bundle) bound in.
pub fn mount_rootfs(mounts: &[Mount], spec_root: &Path, bundle: &Path, target: &Path) -> Result<(), ShimError> {
    std::fs::create_dir_all(target).map_err(ShimError::io(format!("create {}", target.display())))?;
    if mounts.is_empty() {
        let src = if spec_root.is_absolute() {
            spec_root.to_path_buf()
        } else {
            bundle.join(spec_root)
        };
        if !src.is_dir() {
            return Err(ShimError::Invalid(format!(
                "rootfs {} does not exist (root.path in config.json)",
                src.display()
            )));
        }
        return bind(&src, target, false);
    }
    for m in mounts {
        let src = Path::new(&m.source);
        if m.type_ != "overlay" && m.type_ != "tmpfs" && !src.exists() {
            return Err(ShimError::Invalid(format!(
                "rootfs mount source {} does not exist",
                m.source
            )));
        }
        containerd_shim::mount::mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, target)
            .map_err(|e| ShimError::Internal(format!("mount rootfs ({} {}): {e}", m.type_, m.source)))?;
    }
    Ok(())
}

/// Bind-mounts `src` (file or directory) at `target`, read-only if asked.
pub fn bind(src: &Path, target: &Path, readonly: bool) -> Result<(), ShimError> {
    if src.is_dir() {
        std::fs::create_dir_all(target).map_err(ShimError::io(format!("create {}", target.display())))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(ShimError::io(format!("create {}", parent.display())))?;
        }
        std::fs::write(target, b"").map_err(ShimError::io(format!("create {}", target.display())))?;
    }
    let err = |what: &'static str| {
        let what = format!("{what} {} on {}", src.display(), target.display());
        move |e: nix::errno::Errno| ShimError::Io { what, source: e.into() }
    };
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind"))?;
    if readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(err("read-only remount"))?;
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// A mountinfo path field: the kernel writes space, tab, newline and backslash as octal
/// escapes (`\040`, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = (d[0] - b'0') as u32 * 64 + (d[1] - b'0') as u32 * 8 + (d[2] - b'0') as u32;
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Unmounts everything at or below `dir`, then removes it. Errors are logged: cleanup
/// goes as far as it can.
pub fn unmount_and_remove(dir: &Path) {
    // A sandbox that took over a standby VM names the standby's directory through a
    // symbolic link (docs/lifecycle.md, "Warm pool"): what is below the target goes, then
    // the link.
    if dir.is_symlink() {
        if let Ok(target) = dir.canonicalize() {
            unmount_and_remove(&target);
        }
        if let Err(e) = std::fs::remove_file(dir) {
            log::warn!("remove {}: {e}", dir.display());
        }
        return;
    }
    for m in mounts_below(dir) {
        if let Err(e) = umount2(&m, MntFlags::empty()) {
            log::debug!("umount {}: {e}; detaching", m.display());
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                log::warn!("umount {}: {e}", m.display());
            }
        }
    }
    // Never recurse into something still mounted: that would delete the host's files.
    let left = mounts_below(dir);
    if !left.is_empty() {
        log::error!("not removing {}: still mounted: {left:?}", dir.display());
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_to_a_directory_goes_with_what_it_names() {
        let base = std::env::temp_dir().join(format!("vmbox-unlink-{}", std::process::id()));
        let (real, link) = (base.join("real"), base.join("link"));
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::fs::write(real.join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        unmount_and_remove(&link);
        let gone = (!link.is_symlink(), !real.exists());
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(gone, (true, true));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), Path::new("/a b"));
        assert_eq!(unescape_mountinfo("/t\\011n\\012s\\134x"), Path::new("/t\tn\ns\\x"));
        assert_eq!(unescape_mountinfo("/plain\\9"), Path::new("/plain\\9"));
    }
}
