//! Confinement of the host processes a guest can reach: QEMU and vhost-device-vsock.
//!
//! A guest that escapes into one of them must find an unprivileged process: each VM's run as
//! a uid and gid of their own ([`Identity`], held by a lock file for the VM's life, so two
//! VMs never share one and an escaped VMM cannot signal or trace another VM's), with no
//! capabilities (bounding, permitted, effective, inheritable and ambient sets empty),
//! `no_new_privs`, in a mount namespace whose root is a small read-only tmpfs holding only
//! `/usr` (read-only), a few device nodes, the files they are given and their socket
//! directory ([`Jail`]). QEMU adds its own seccomp filter (`-sandbox`). The design follows
//! Firecracker's jailer (own uid per microVM, pivot_root, no capabilities), with a bind of
//! `/usr` instead of a static binary because QEMU links dozens of shared libraries.
//!
//! Everything is prepared in the parent; the child, between fork and exec, only makes
//! system calls on prepared C strings (no allocation, async-signal-safe), and reports the
//! step that failed through a pipe so the error can name it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HypervisorError;

/// A VM's own unprivileged uid and gid (the same number), reserved while this lives.
#[derive(Debug)]
pub struct Identity {
    /// The uid, also used as the gid.
    pub uid: u32,
    _lock: nix::fcntl::Flock<File>,
}

impl Identity {
    /// Reserves the lowest free id of `first..first + count`: each id has a lock file in `lock_dir` ([`UID_LOCK_DIR`] for VMs: one for the host, whatever
    /// the config's `state_dir`), held (flock) as long as the returned value lives. An id
    /// some process still runs as (a leftover of an earlier VM) is skipped.
    ///
    /// Errors: the lock directory cannot be made, or every id is taken.
    pub fn reserve(lock_dir: &Path, first: u32, count: u32) -> Result<Identity, HypervisorError> {
        std::fs::create_dir_all(lock_dir).map_err(HypervisorError::io("create", lock_dir))?;
        let count = count.max(1);
        let busy = uids_in_use();
        for i in 0..count {
            let Some(uid) = first.checked_add(i) else { break };
            if busy.contains(&uid) {
                continue;
            }
            let path = lock_dir.join(uid.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(HypervisorError::io("open", &path))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Identity { uid, _lock: lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(HypervisorError::io("lock", &path)(e.into())),
            }
        }
        Err(HypervisorError::Internal(format!(
            "no free uid for a confined VM in {first}..{} (confinement.first_uid, confinement.uids): every one is in use",
            u64::from(first) + u64::from(count)
        )))
    }
}

/// Where VMs' uid lock files live: one directory for the host, so sandboxes of different
/// configs (RuntimeClasses with their own `state_dir`) never take the same uid.
pub const UID_LOCK_DIR: &str = "/run/vmbox-uids";

/// The effective uids of the host's processes (the owners of `/proc/<pid>`).
fn uids_in_use() -> std::collections::HashSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
        .collect()
}

/// Kills every process running as `uid` (a confined VM's: whatever a hostile VMM may have
/// forked, under any name), from a short-lived child that takes that uid and signals all
/// it may (`kill(-1)`, which spares the caller). Blocking; returns once the child ended.
pub fn kill_all_of(uid: u32) -> std::io::Result<()> {
    if uid == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "never uid 0"));
    }
    let mut cmd = Command::new("/bin/true");
    // SAFETY: setgroups, setresgid, setresuid and kill are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setresgid(uid, uid, uid) < 0
                || libc::setresuid(uid, uid, uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        });
    }
    let status = cmd.status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("kill helper: {status}")));
    }
    Ok(())
}

/// What a [`Jail`] makes visible inside its root, at the same path as on the host.
#[derive(Debug, Clone)]
pub struct Visible {
    /// Host path (a file or a directory), bound read-only unless `writable`.
    pub path: PathBuf,
    pub writable: bool,
}

/// The steps the child takes, named in errors (index = the byte it reports).
const STEPS: &[&str] = &[
    "unshare the mount, IPC, UTS (and network) namespaces",
    "make the mounts private",
    "mount the root tmpfs",
    "create a directory in the root",
    "create a mount point in the root",
    "bind a path into the root",
    "make a bind read-only",
    "create a symbolic link in the root",
    "pivot_root into the root",
    "detach the old root",
    "make the root read-only",
    "set the supplementary groups",
    "set the gid",
    "drop the capability bounding set",
    "set the uid",
    "clear the inheritable capabilities",
    "set no_new_privs",
    "clear the ambient capabilities",
];

/// A prepared confinement for one child process.
pub struct Jail {
    uid: u32,
    /// unshare flags: mount, IPC, UTS and, for a process that needs none, network.
    unshare: libc::c_int,
    groups: Vec<libc::gid_t>,
    root: CString,
    dirs: Vec<CString>,
    files: Vec<CString>,
    binds: Vec<(CString, CString, libc::c_ulong)>,
    links: Vec<(CString, CString)>,
    report: (OwnedFd, Option<OwnedFd>),
}

fn cstr(p: &Path) -> Result<CString, HypervisorError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| HypervisorError::Spec(format!("path {} holds a NUL byte", p.display())))
}

/// Top-level names that merged-/usr systems make symbolic links (`/lib -> usr/lib`).
const USR_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Device nodes every jail gets.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

impl Jail {
    /// Prepares a jail for `identity` whose root is mounted on `root` (an empty directory
    /// the caller made; nothing appears there on the host) and shows `/usr`, the host's
    /// `/lib*` links or directories, [`DEVICES`], `devices` (such as `/dev/kvm`) and
    /// `visible`, each at its host path. `groups` are extra supplementary groups (the
    /// owner group of a device the process must open).
    ///
    /// The child also gets IPC and UTS namespaces of its own, and a network namespace of
    /// its own when `own_network` (only loopback: no host service or abstract unix socket
    /// reachable; QEMU with pod NICs keeps the pod's, joined before the jail).
    pub fn new(
        identity: &Identity,
        root: &Path,
        visible: &[Visible],
        devices: &[&Path],
        groups: &[u32],
        own_network: bool,
    ) -> Result<Jail, HypervisorError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut binds: Vec<(PathBuf, PathBuf, libc::c_ulong)> = Vec::new();
        let mut links = Vec::new();
        let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        let mut add = |host: &Path, flags: libc::c_ulong| -> Result<(), HypervisorError> {
            let meta = std::fs::metadata(host).map_err(HypervisorError::io("confine: look at", host))?;
            let inside = root.join(host.strip_prefix("/").unwrap_or(host));
            for anc in inside.ancestors().skip(1) {
                if anc == root {
                    break;
                }
                if !dirs.iter().any(|d| d == anc) {
                    dirs.push(anc.to_path_buf());
                }
            }
            if meta.is_dir() {
                dirs.push(inside.clone());
            } else {
                files.push(inside.clone());
            }
            binds.push((host.to_path_buf(), inside, flags));
            Ok(())
        };
        add(Path::new("/usr"), ro)?;
        for name in USR_LINKS {
            let host = Path::new("/").join(name);
            match std::fs::read_link(&host) {
                Ok(target) => links.push((cstr(&target)?, cstr(&root.join(name))?)),
                Err(_) if host.is_dir() => add(&host, ro)?,
                Err(_) => {}
            }
        }
        // The dynamic loader's cache: libraries are found without scanning.
        if Path::new("/etc/ld.so.cache").is_file() {
            add(Path::new("/etc/ld.so.cache"), ro)?;
        }
        for dev in DEVICES.iter().map(Path::new).chain(devices.iter().copied()) {
            add(dev, libc::MS_NOSUID)?;
        }
        for v in visible {
            let real = std::fs::canonicalize(&v.path).map_err(HypervisorError::io("confine: resolve", &v.path))?;
            if v.path.starts_with("/usr") && real.starts_with("/usr") && !v.writable {
                continue; // already there
            }
            let flags = if v.writable {
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
            } else {
                ro
            };
            add(&v.path, flags)?;
        }
        dirs.sort_by_key(|d| d.components().count());
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| HypervisorError::Internal(format!("confine: pipe: {e}")))?;
        nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| HypervisorError::Internal(format!("confine: pipe: {e}")))?;
        let mut g: Vec<libc::gid_t> = vec![identity.uid];
        g.extend(groups.iter().copied().filter(|&x| x != 0));
        Ok(Jail {
            uid: identity.uid,
            unshare: libc::CLONE_NEWNS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | if own_network { libc::CLONE_NEWNET } else { 0 },
            groups: g,
            root: cstr(root)?,
            dirs: dirs.iter().map(|d| cstr(d)).collect::<Result<_, _>>()?,
            files: files.iter().map(|d| cstr(d)).collect::<Result<_, _>>()?,
            binds: binds
                .iter()
                .map(|(h, i, f)| Ok((cstr(h)?, cstr(i)?, *f)))
                .collect::<Result<_, HypervisorError>>()?,
            links,
            report: (r, Some(w)),
        })
    }

    /// Makes `cmd`'s child enter the jail just before its exec (after the pre-exec steps
    /// registered before, such as joining a cgroup or a network namespace, which need the
    /// privileges this drops). Call [`Jail::failure`] if the spawn then fails.
    pub fn install(&mut self, cmd: &mut Command) {
        let uid = self.uid;
        let unshare = self.unshare;
        let groups = self.groups.clone();
        let root = self.root.clone();
        let dirs = self.dirs.clone();
        let files = self.files.clone();
        let binds = self.binds.clone();
        let links = self.links.clone();
        let report = self.report.1.as_ref().map(|w| w.as_raw_fd()).unwrap_or(-1);
        // SAFETY: the closure makes only system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fail = |step: u8| -> std::io::Error {
                    let e = std::io::Error::last_os_error();
                    libc::write(report, (&step as *const u8).cast(), 1);
                    e
                };
                let ok = |r: libc::c_int| r >= 0;
                if !ok(libc::unshare(unshare)) {
                    return Err(fail(0));
                }
                let none = std::ptr::null::<libc::c_char>();
                let slash = c"/".as_ptr();
                if !ok(libc::mount(
                    none,
                    slash,
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )) {
                    return Err(fail(1));
                }
                let opts = c"size=64k,nr_inodes=256,mode=0755".as_ptr();
                if !ok(libc::mount(
                    c"tmpfs".as_ptr(),
                    root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.cast(),
                )) {
                    return Err(fail(2));
                }
                for d in &dirs {
                    if !ok(libc::mkdir(d.as_ptr(), 0o755)) && *libc::__errno_location() != libc::EEXIST {
                        return Err(fail(3));
                    }
                }
                for f in &files {
                    let fd = libc::open(f.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                    if fd < 0 {
                        return Err(fail(4));
                    }
                    libc::close(fd);
                }
                for (host, inside, flags) in &binds {
                    if !ok(libc::mount(
                        host.as_ptr(),
                        inside.as_ptr(),
                        none,
                        libc::MS_BIND, // not recursive: mounts below a bound path stay out
                        std::ptr::null(),
                    )) {
                        return Err(fail(5));
                    }
                    if !ok(libc::mount(
                        none,
                        inside.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REMOUNT | flags,
                        std::ptr::null(),
                    )) {
                        return Err(fail(6));
                    }
                }
                for (target, at) in &links {
                    if !ok(libc::symlink(target.as_ptr(), at.as_ptr())) {
                        return Err(fail(7));
                    }
                }
                if !ok(libc::chdir(root.as_ptr()))
                    || !ok(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)
                {
                    return Err(fail(8));
                }
                if !ok(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)) || !ok(libc::chdir(slash)) {
                    return Err(fail(9));
                }
                if !ok(libc::mount(
                    none,
                    slash,
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                )) {
                    return Err(fail(10));
                }
                if !ok(libc::setgroups(groups.len(), groups.as_ptr())) {
                    return Err(fail(11));
                }
                if !ok(libc::setresgid(uid, uid, uid)) {
                    return Err(fail(12));
                }
                let mut cap = 0;
                loop {
                    if libc::prctl(
                        libc::PR_CAPBSET_DROP,
                        cap as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    ) < 0
                    {
                        if *libc::__errno_location() == libc::EINVAL && cap > 0 {
                            break; // past the kernel's last capability
                        }
                        return Err(fail(13));
                    }
                    cap += 1;
                }
                // Leaving uid 0 without SECBIT_KEEP_CAPS empties the permitted, effective
                // and ambient sets.
                if !ok(libc::setresuid(uid, uid, uid)) {
                    return Err(fail(14));
                }
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: libc::c_int,
                }
                #[repr(C)]
                struct Data {
                    effective: u32,
                    permitted: u32,
                    inheritable: u32,
                }
                let mut header = Header {
                    version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                    pid: 0,
                };
                let data = [
                    Data {
                        effective: 0,
                        permitted: 0,
                        inheritable: 0,
                    },
                    Data {
                        effective: 0,
                        permitted: 0,
                        inheritable: 0,
                    },
                ];
                if libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) < 0 {
                    return Err(fail(15));
                }
                if libc::prctl(
                    libc::PR_SET_NO_NEW_PRIVS,
                    1 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) < 0
                {
                    return Err(fail(16));
                }
                if libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) < 0
                {
                    return Err(fail(17));
                }
                Ok(())
            });
        }
    }

    /// After a spawn: closes the child's end of the report pipe and, if the child failed in
    /// the jail, names the step.
    pub fn failure(&mut self) -> Option<&'static str> {
        self.report.1 = None;
        let mut b = [0u8; 1];
        match nix::unistd::read(self.report.0.as_raw_fd(), &mut b) {
            Ok(1) => STEPS.get(usize::from(b[0])).copied(),
            _ => None,
        }
    }
}

/// The owner group of `dev` (for `/dev/kvm`, typically `kvm`), if it is not root's.
pub fn device_group(dev: &Path) -> Option<u32> {
    std::fs::metadata(dev).ok().map(|m| m.gid()).filter(|&g| g != 0)
}

/// Fails, naming `key`, when the confined process (`uid`, not its owner) cannot read `path`.
pub fn check_readable(key: &'static str, path: &Path, uid: u32) -> Result<(), HypervisorError> {
    let meta = std::fs::metadata(path).map_err(HypervisorError::io(key, path))?;
    if meta.uid() == uid || meta.mode() & 0o004 != 0 {
        return Ok(());
    }
    Err(HypervisorError::Spec(format!(
        "{key} {} is not readable by the confined VMM (mode {:o}): make it readable by all (0644), or set confinement.enabled = false",
        path.display(),
        meta.mode() & 0o7777
    )))
}

/// Connects to the unix socket at `path` in a directory a confined process can write: the
/// last component must be a socket (not a symbolic link a hostile VMM swapped in to point
/// the host at another socket), owned by `owner` when given (the confined VM's uid: a socket
/// that process made, never a host service's).
pub async fn connect_unix(path: &Path, owner: Option<u32>) -> std::io::Result<tokio::net::UnixStream> {
    use nix::fcntl::OFlag;
    let raw = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open returned a new fd that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a socket"));
    }
    if let Some(uid) = owner {
        if st.st_uid != uid {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("owned by uid {}, not the VM's {uid}", st.st_uid),
            ));
        }
    }
    tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await
}

/// `chown` that never follows a symbolic link (a confined process may have swapped one in).
pub fn give(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this test runs as root; says it is skipped otherwise.
    fn root_or_skip() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmbox-confine-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn identities_are_never_shared_and_come_back_when_dropped() {
        let d = tmp("ids");
        let a = Identity::reserve(&d, 5000, 2).unwrap();
        let b = Identity::reserve(&d, 5000, 2).unwrap();
        assert_ne!(a.uid, b.uid);
        let e = Identity::reserve(&d, 5000, 2).unwrap_err().to_string();
        assert!(e.contains("confinement.first_uid") && e.contains("5000..5002"), "{e}");
        let freed = a.uid;
        drop(a);
        assert_eq!(Identity::reserve(&d, 5000, 2).unwrap().uid, freed);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Needs root (as every VM-level test): the child is really confined.
    #[test]
    fn a_jailed_child_has_no_privilege_and_sees_only_what_it_was_given() {
        if !root_or_skip() {
            return;
        }
        let d = tmp("jail");
        let id = Identity::reserve(&d.join("ids"), 1_950_000_000, 16).unwrap();
        let given = d.join("given");
        std::fs::write(&given, "visible\n").unwrap();
        std::fs::create_dir_all(d.join("root")).unwrap();
        let visible = [Visible {
            path: given.clone(),
            writable: false,
        }];
        let mut jail = Jail::new(&id, &d.join("root"), &visible, &[], &[], true).unwrap();
        let mut cmd = Command::new("/bin/sh");
        let script = format!(
            "id -u; id -G; ls /; cat {}; echo x > {} || echo ro",
            given.display(),
            given.display()
        );
        cmd.args(["-c", &script]);
        jail.install(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(jail.failure(), None);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Capabilities and no_new_privs are read from outside by the e2e test (there is
        // no /proc inside); here the ids and the root's contents.
        let listed: Vec<&str> = text.lines().collect();
        assert_eq!(listed.first().copied(), Some(id.uid.to_string().as_str()), "{text}");
        assert_eq!(
            listed.get(1).copied(),
            Some(id.uid.to_string().as_str()),
            "one group only: {text}"
        );
        assert!(listed.contains(&"usr") && listed.contains(&"dev"), "{text}");
        for hidden in ["proc", "sys", "home", "root", "var"] {
            assert!(!listed.contains(&hidden), "/{hidden} visible: {text}");
        }
        assert!(text.contains("visible\n"), "{text}");
        assert!(text.trim_end().ends_with("ro"), "the given file is read-only: {text}");
        assert!(
            !d.join("root").join("usr").exists(),
            "the jail's mounts stay out of the host's view"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failing_step_is_named() {
        if !root_or_skip() {
            return;
        }
        let d = tmp("fail");
        let id = Identity::reserve(&d.join("ids"), 1_950_000_100, 16).unwrap();
        // The root mount point does not exist.
        let mut jail = Jail::new(&id, &d.join("missing"), &[], &[], &[], true).unwrap();
        let mut cmd = Command::new("/bin/true");
        jail.install(&mut cmd);
        assert!(cmd.status().is_err());
        assert_eq!(jail.failure(), Some("mount the root tmpfs"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn sockets_are_reached_only_directly_and_from_their_owner() {
        if !root_or_skip() {
            return;
        }
        let d = tmp("connect");
        let real = d.join("real.sock");
        let _l = std::os::unix::net::UnixListener::bind(&real).unwrap();
        connect_unix(&real, None).await.expect("a socket connects");
        connect_unix(&real, Some(0)).await.expect("owned by root");
        let e = connect_unix(&real, Some(4242)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        let link = d.join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // O_PATH|O_NOFOLLOW opens the link itself, which is no socket.
        let e = connect_unix(&link, None).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        let file = d.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(connect_unix(&file, None).await.is_err());
        // give() changes the link, never its target.
        give(&link, 4242).unwrap();
        assert_eq!(std::fs::metadata(&real).unwrap().uid(), 0);
        assert_eq!(std::fs::symlink_metadata(&link).unwrap().uid(), 4242);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_leftover_process_of_a_vm_uid_is_killed_and_its_uid_not_reused_meanwhile() {
        if !root_or_skip() {
            return;
        }
        let d = tmp("leftover");
        let uid = 1_950_000_200;
        // A process of that uid that no lock file knows (a VMM's forked leftover).
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("600");
        // SAFETY: setresgid and setresuid only.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setresgid(uid, uid, uid) < 0 || libc::setresuid(uid, uid, uid) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let id = Identity::reserve(&d.join("ids"), uid, 4).unwrap();
        assert_ne!(id.uid, uid, "a uid a process still runs as is skipped");
        kill_all_of(uid).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert_eq!(Identity::reserve(&d.join("ids"), uid, 4).unwrap().uid, uid);
        assert!(kill_all_of(0).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
