//! Becoming PID 1: the mounts a container runtime needs, the kernel command line, and
//! the virtio-fs share.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::container::SHARED_MOUNT;
use crate::AgentError;

/// What the host tells the agent on the kernel command line (`vmbox.*` parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// virtio-fs tag of the sandbox's shared directory; empty for none.
    pub share: String,
    pub log_level: log::LevelFilter,
    /// Host vsock port to send the hello to.
    pub hello_port: u32,
    /// The guest's hostname (`vmbox.hostname`): the host's, so a container without a
    /// hostname of its own sees what it would under runc; empty leaves it unset.
    pub hostname: String,
}

impl Params {
    pub fn parse(cmdline: &str) -> Params {
        let mut p = Params {
            share: String::new(),
            log_level: log::LevelFilter::Info,
            hello_port: vmbox_protocol::HELLO_PORT,
            hostname: String::new(),
        };
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else { continue };
            match k {
                "vmbox.share" => p.share = v.to_string(),
                "vmbox.log" => p.log_level = v.parse().unwrap_or(log::LevelFilter::Info),
                "vmbox.hello_port" => p.hello_port = v.parse().unwrap_or(vmbox_protocol::HELLO_PORT),
                "vmbox.hostname" if vmbox_protocol::valid_hostname(v) => p.hostname = v.to_string(),
                _ => {}
            }
        }
        p
    }
}

fn mnt(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), AgentError> {
    std::fs::create_dir_all(target).map_err(|e| AgentError::io(Path::new(target), e))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| AgentError::Internal(format!("mount {fstype} on {target}: {e}")))
}

/// Moves the agent's root off the initramfs onto a fresh tmpfs.
///
/// The kernel's initial rootfs cannot be pivoted away from, and libcontainer (like runc)
/// pivot_roots into every container. Mount a tmpfs, move it over / and chroot into it.
/// The agent keeps running from its initramfs file, which the new root hides but which
/// stays reachable as `/proc/self/exe` (how the libcontainer helpers are started); no copy
/// of the binary and no re-exec (kernel start to agent hello, median of 10 boots under
/// TCG: 1558 ms with them, 1288-1504 ms without).
pub fn switch_root() -> Result<(), AgentError> {
    let new = "/newroot";
    mnt("rootfs", new, "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        let p = Path::new(new).join(d);
        std::fs::create_dir_all(&p).map_err(|e| AgentError::io(&p, e))?;
    }
    nix::unistd::chdir(new).map_err(AgentError::sys("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(AgentError::sys("move /newroot to /"))?;
    nix::unistd::chroot(".").map_err(AgentError::sys("chroot"))?;
    nix::unistd::chdir("/").map_err(AgentError::sys("chdir /"))?;
    Ok(())
}

/// The filesystems every guest needs before anything else.
pub fn mount_base() -> Result<(), AgentError> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mnt("proc", "/proc", "proc", nosuid_noexec_nodev, None)?;
    mnt("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None)?;
    mnt("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mnt(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec_nodev, None)?;
    Ok(())
}

/// The guest's pid space. tinyconfig's CONFIG_BASE_SMALL leaves `pid_max` at 4096, so
/// pids were reused within minutes of exec probes; a host's kernel default is 32768, the
/// most BASE_SMALL allows.
pub const PID_MAX: u32 = 32768;

/// The smallest free block, as a power of two of 4 KiB pages, the guest reports to the
/// host as unused (virtio-balloon free page reporting): 5 = 128 KiB. Linux 6.1 sets its
/// default, the 2 MiB pageblock, when the balloon driver registers, overriding the
/// kernel parameter; only the sysfs knob changes it afterwards. Idle guests keep their
/// free memory in blocks smaller than 2 MiB, which the host kept paying for.
pub const PAGE_REPORTING_ORDER: u32 = 5;

/// Sets the guest's `pid_max`, hostname and free page reporting order (best effort, logged).
pub fn tune(params: &Params) {
    let order = "/sys/module/page_reporting/parameters/page_reporting_order";
    if let Err(e) = std::fs::write(order, PAGE_REPORTING_ORDER.to_string()) {
        log::warn!("cannot set {order} to {PAGE_REPORTING_ORDER}: {e}");
    }
    if let Err(e) = std::fs::write("/proc/sys/kernel/pid_max", PID_MAX.to_string()) {
        log::warn!("cannot set kernel.pid_max to {PID_MAX}: {e}");
    }
    if !params.hostname.is_empty() {
        if let Err(e) = nix::unistd::sethostname(&params.hostname) {
            log::warn!("cannot set the hostname to {}: {e}", params.hostname);
        }
    }
    if let Err(e) = loopback_up() {
        log::warn!("cannot bring lo up: {e}");
    }
}

/// Brings the guest's `lo` up. Every container shares the guest's network namespace (a
/// pod's containers talk over 127.0.0.1, as Kubernetes promises); under runc that is the
/// CNI's loopback plugin's job in the pod's namespace.
pub fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives the calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Mounts the sandbox's shared directory.
pub fn mount_share(tag: &str) -> Result<(), AgentError> {
    mnt(tag, SHARED_MOUNT, "virtiofs", MsFlags::empty(), None)
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// CLOCK_BOOTTIME in microseconds: how long since the kernel started.
pub fn boot_time_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmbox_params_and_ignores_the_rest() {
        let p = Params::parse("console=ttyS0 vmbox.share=vmboxfs vmbox.log=debug vmbox.hello_port=5000 quiet");
        assert_eq!(p.hello_port, 5000);
        assert_eq!(p.share, "vmboxfs");
        assert_eq!(p.log_level, log::LevelFilter::Debug);
        let p = Params::parse("vmbox.log=bogus");
        assert_eq!(p.log_level, log::LevelFilter::Info);
        assert_eq!(p.share, "");
        assert_eq!(
            Params::parse("vmbox.hostname=node-1.example").hostname,
            "node-1.example"
        );
        assert_eq!(Params::parse("vmbox.hostname=bad/name").hostname, "");
    }
}
