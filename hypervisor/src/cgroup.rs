//! A sandbox's host cgroup: the VMM and its daemons run in it, so the kubelet's pod
//! accounting and CRI's PodSandboxStats (which reads the pod's cgroup) see the VM's CPU
//! and memory, as they would see runc's containers. cgroup v1, hybrid and v2 hosts, through
//! Kata's cgroups-rs (v1: every mounted controller, the cpuset copied from the parent).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::fs::{hierarchies, Cgroup};

use crate::HypervisorError;

/// How long [`HostCgroup::remove`] waits for exiting processes to leave the cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// A cgroup vmbox created for a sandbox, by its path below each hierarchy's root.
pub struct HostCgroup {
    path: PathBuf,
    cg: Cgroup,
}

impl HostCgroup {
    /// Creates (or opens) the cgroup at `path` (relative, e.g. `kubepods/podX/<id>`).
    ///
    /// Errors: [`HypervisorError::Cgroup`] naming the path (no cgroup filesystem, no
    /// permission).
    pub fn create(path: &Path) -> Result<HostCgroup, HypervisorError> {
        let cg = Cgroup::new(hierarchies::auto(), path).map_err(|e| HypervisorError::Cgroup {
            path: path.to_path_buf(),
            detail: format!("create: {e}"),
        })?;
        Ok(HostCgroup {
            path: path.to_path_buf(),
            cg,
        })
    }

    /// Makes `cmd`'s child enter the cgroup before it executes: it writes `0` to each
    /// hierarchy's `cgroup.procs` between fork and exec, so nothing the program does (a
    /// daemon's first fork, QEMU loading the guest's kernel) is charged elsewhere.
    /// Errors at spawn name the file the child could not write.
    pub fn enter_on_exec(&self, cmd: &mut std::process::Command) -> Result<(), HypervisorError> {
        use std::os::unix::process::CommandExt;
        let mut files: Vec<std::ffi::CString> = Vec::new();
        for s in self.cg.subsystems() {
            let f = s.to_controller().path().join("cgroup.procs");
            let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).map_err(|e| HypervisorError::Cgroup {
                path: self.path.clone(),
                detail: format!("{}: {e}", f.display()),
            })?;
            if !files.contains(&c) {
                files.push(c);
            }
        }
        // SAFETY: only open, write and close between fork and exec (async-signal-safe), on
        // strings prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for f in &files {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Moves running processes in: each of `roots` and every descendant of theirs (a
    /// daemon's forked workers), whole thread groups. Blocking (a walk of /proc).
    ///
    /// Errors: [`HypervisorError::Cgroup`] naming the path and the pid that could not move
    /// (a process that exited meanwhile is skipped).
    pub fn adopt(&self, roots: &[u32]) -> Result<(), HypervisorError> {
        for pid in with_descendants(roots) {
            if let Err(e) = self.cg.add_task_by_tgid(cgroups_rs::CgroupPid::from(pid as u64)) {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(HypervisorError::Cgroup {
                        path: self.path.clone(),
                        detail: format!("move pid {pid} in: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The cgroup's path below each hierarchy's root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the cgroup once its processes are gone (waits up to [`REMOVE_WAIT`] for
    /// exiting ones). Blocking. A cgroup that is already gone is not an error.
    pub fn remove(&self) -> Result<(), HypervisorError> {
        remove(&self.cg, &self.path)
    }

    /// Removes the cgroup at `path` that an earlier shim created (see [`HostCgroup::remove`]).
    pub fn remove_path(path: &Path) -> Result<(), HypervisorError> {
        remove(&Cgroup::load(hierarchies::auto(), path), path)
    }
}

/// `roots` and all their descendants alive now, parents before children (from each
/// process's parent pid in /proc/<pid>/stat).
fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next()?.split_whitespace().nth(1)?.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let children: Vec<u32> = parent_of
            .iter()
            .filter(|(c, pp)| *pp == p && !out.contains(c))
            .map(|(c, _)| *c)
            .collect();
        out.extend(children);
        i += 1;
    }
    out
}

fn remove(cg: &Cgroup, path: &Path) -> Result<(), HypervisorError> {
    let deadline = Instant::now() + REMOVE_WAIT;
    let dirs: Vec<PathBuf> = cg
        .subsystems()
        .iter()
        .map(|s| s.to_controller().path().to_path_buf())
        .collect();
    for dir in dirs {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Processes still exiting (EBUSY): bounded wait.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(HypervisorError::Cgroup {
                        path: path.to_path_buf(),
                        detail: format!("remove {}: {e}", dir.display()),
                    })
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_below_their_roots() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::process::id();
        let all = with_descendants(&[me]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(all[0], me);
        assert!(all.contains(&child.id()), "{all:?} lacks {}", child.id());
        assert!(!all.contains(&1), "init is no descendant: {all:?}");
    }
}
