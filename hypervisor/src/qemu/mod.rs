//! The QEMU microvm backend.
//!
//! One VM = one run directory holding everything it creates (sockets, logs, pids.json),
//! plus three processes: virtiofsd (the shared directory), vhost-device-vsock (unless
//! the kernel's vhost-vsock is used) and QEMU. A start that fails half-way, `stop`,
//! and dropping the VM all remove every one of them.

mod cmdline;
mod console;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use vmbox_config::{Config, VsockBackend};
use vmbox_protocol::agent::Hello;

use crate::accel::{choose, Accel, HostFacts};
use crate::binaries::{resolve, QEMU_HINT, VIRTIOFSD_HINT, VSOCK_HINT};
use crate::process::Child;
use crate::vsock::{Conn, Dialer, HelloListener};
use crate::{qmp, BootTimes, Hypervisor, HypervisorError, NetworkNamespace, Vm, VmExit, VmSpec, MAX_RUN_DIR_LEN};
pub use cmdline::{kernel_append, qemu_args, valid_name, Nic, QemuArgs, VsockDevice, MMIO_SLOTS, SHARE_TAG};
pub use console::{Console, CONSOLE_RING};

const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The QEMU backend as a [`Hypervisor`]; each VM is started with the configuration its
/// sandbox uses (a shim's RuntimeClass may name its own).
#[derive(Debug, Default, Clone, Copy)]
pub struct Qemu;

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&self, config: &Config, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        Ok(Box::new(QemuVm::start(config, spec).await?))
    }

    fn cleanup(&self, run_dir: &Path) -> Result<(), HypervisorError> {
        cleanup_run_dir(run_dir)
    }
}

pub struct QemuVm {
    name: String,
    dir: PathBuf,
    accel: Accel,
    dialer: Dialer,
    hello: Hello,
    boot_times: BootTimes,
    qemu: Option<Child>,
    daemons: Vec<Child>,
    console: Option<Console>,
    stopped: Mutex<bool>,
    rpc_timeout: Duration,
    /// Set at start, or later by [`Vm::join_cgroup`] (a standby VM claimed by a sandbox).
    cgroup: std::sync::Mutex<Option<crate::cgroup::HostCgroup>>,
    /// The pod network carried in, and where: the namespace and its redirected links.
    network: vmbox_network::Network,
    netns: Option<NetnsRecord>,
    /// The namespace QEMU is started in (shared or private).
    netns_path: Option<PathBuf>,
    /// The VM's own uid when its VMM and vhost-device-vsock are confined.
    identity: Option<crate::confine::Identity>,
}

/// Below the run directory: the sockets QEMU and vhost-device-vsock use, the only part of
/// it they see (and may write) when confined. Names are short: the longest path below the
/// run directory, `/vmm/vsock_1024`, must fit the run directory's socket budget.
const VMM_DIR: &str = "vmm";
/// In the run directory: the confined VM's uid, so a cleanup after a dead shim kills
/// whatever still runs as it.
const UID_FILE: &str = "vmm-uid";

/// Unmounts the VMM's tmpfs (if there is one) and kills every process of the confined
/// VM's uid recorded in `dir`. Blocking.
fn release_confinement(dir: &Path) {
    let _ = nix::mount::umount2(&dir.join(VMM_DIR), nix::mount::MntFlags::MNT_DETACH);
    let uid = std::fs::read_to_string(dir.join(UID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(uid) = uid.filter(|&u| u != 0) {
        if let Err(e) = crate::confine::kill_all_of(uid) {
            log::warn!("kill the processes of confined uid {uid}: {e}");
        }
    }
}

/// Below the run directory: an empty directory each confined child mounts its root on
/// (in its own mount namespace; the host sees it empty).
const JAIL_DIR: &str = "jail";

/// In the run directory: the pod network namespace and the links redirected in it, so the
/// redirects go with the VM, also after a shim that died ([`cleanup_run_dir`]).
const NETNS_FILE: &str = "netns.json";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct NetnsRecord {
    path: PathBuf,
    /// (link name, whether its ingress qdisc is vmbox's).
    links: Vec<(String, bool)>,
}

impl NetnsRecord {
    /// Removes the redirects (blocking). A namespace already gone is fine.
    fn detach(&self) -> Result<(), HypervisorError> {
        let links: Vec<vmbox_network::host::Redirected> = self
            .links
            .iter()
            .map(|(name, own_qdisc)| vmbox_network::host::Redirected {
                name: name.clone(),
                own_qdisc: *own_qdisc,
            })
            .collect();
        Ok(vmbox_network::host::detach(&self.path, &links)?)
    }
}

/// Whether QEMU can use the kernel's vhost-net (absent here; present on most KVM hosts).
/// Opened here and handed to QEMU (`vhostfd=`), so a confined QEMU needs no access to
/// the device.
fn open_vhost_net() -> Option<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .ok()
        .map(OwnedFd::from)
}

/// Bytes of a daemon's log shown in an error.
const LOG_TAIL: u64 = 4096;

/// The last [`LOG_TAIL`] bytes of a log a (possibly guest-controlled) process wrote, as
/// printable text: read from the end, never whole.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .map(|l| vmbox_protocol::text::bounded(l, LOG_TAIL as usize))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A spawn's result, with the jail step that failed named.
fn confined(
    child: Result<Child, HypervisorError>,
    jail: Option<&mut crate::confine::Jail>,
) -> Result<Child, HypervisorError> {
    let step = jail.and_then(|j| j.failure());
    match (child, step) {
        (Err(HypervisorError::Spawn { name, source }), Some(step)) => {
            Err(HypervisorError::Confine { name, step, source })
        }
        (r, _) => r,
    }
}

/// In the run directory: the host cgroup's path, for a later shim's cleanup.
const CGROUP_FILE: &str = "cgroup";

fn check_spec(spec: &VmSpec) -> Result<(), HypervisorError> {
    if !valid_name(&spec.name) {
        return Err(HypervisorError::Spec(format!(
            "VM name {:?}: expected 1-256 of [A-Za-z0-9_.-]",
            spec.name
        )));
    }
    let len = spec.run_dir.as_os_str().len();
    if len > MAX_RUN_DIR_LEN {
        return Err(HypervisorError::Spec(format!(
            "run directory {} is {len} bytes; its sockets need it at most {MAX_RUN_DIR_LEN} (a shorter state_dir)",
            spec.run_dir.display()
        )));
    }
    Ok(())
}

/// `ioctl(VHOST_VSOCK_SET_GUEST_CID)`: `_IOW(VHOST_VIRTIO=0xAF, 0x60, __u64)`.
mod vhost {
    nix::ioctl_write_ptr!(set_guest_cid, 0xAF, 0x60, u64);
}

/// Reserves a guest CID with the kernel's vhost-vsock: opens `/dev/vhost-vsock` and claims
/// a random CID on it, retrying on EADDRINUSE (another VM holds it). QEMU gets the fd
/// (`vhostfd=`), so the CID stays reserved from here to the VM's end.
fn reserve_cid() -> Result<(OwnedFd, u32), HypervisorError> {
    let dev = Path::new("/dev/vhost-vsock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(HypervisorError::io("open", dev))?;
    let fd = OwnedFd::from(f);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
        ^ (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..64 {
        // xorshift: a spread of CIDs in [3, 2^32 - 2).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let cid = 3 + (seed % (u32::MAX as u64 - 4));
        // SAFETY: the ioctl reads one u64 from a valid pointer.
        match unsafe { vhost::set_guest_cid(fd.as_raw_fd(), &cid) } {
            Ok(_) => return Ok((fd, cid as u32)),
            Err(nix::errno::Errno::EADDRINUSE) => continue,
            Err(e) => {
                return Err(HypervisorError::Io {
                    what: "reserve a vsock CID on",
                    path: dev.into(),
                    source: e.into(),
                })
            }
        }
    }
    Err(HypervisorError::Io {
        what: "reserve a vsock CID (64 random CIDs tried) on",
        path: dev.into(),
        source: nix::errno::Errno::EADDRINUSE.into(),
    })
}

impl QemuVm {
    /// Makes a child started from `cmd` run in the sandbox's host cgroup from its exec
    /// on, if the sandbox has one.
    fn enter_cgroup(&self, cmd: &mut Command) -> Result<(), HypervisorError> {
        match &*self.cgroup.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(cg) => cg.enter_on_exec(cmd),
            None => Ok(()),
        }
    }

    pub async fn start(cfg: &Config, spec: VmSpec) -> Result<QemuVm, HypervisorError> {
        check_spec(&spec)?;
        let t0 = Instant::now();
        let qemu_bin = resolve("qemu-system-x86_64", &cfg.binaries.qemu, QEMU_HINT)?;
        for (what, p) in [
            ("guest kernel (vm.kernel)", &cfg.vm.kernel),
            ("guest initramfs (vm.initramfs)", &cfg.vm.initramfs),
        ] {
            if !p.is_file() {
                return Err(HypervisorError::Io {
                    what,
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "not found; build it with `make guest` and install it with `make install`",
                    ),
                });
            }
        }
        let (accel, why) = choose(cfg.vm.accelerator, &HostFacts::probe());
        log::info!("vm {}: accelerator {} ({why})", spec.name, accel.name());
        let kernel_vsock = match cfg.vm.vsock {
            VsockBackend::Kernel => true,
            VsockBackend::VhostUser => false,
            VsockBackend::Auto => Path::new("/dev/vhost-vsock").exists(),
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(HypervisorError::io("create run directory", &spec.run_dir))?;
        let dir = spec.run_dir.clone();
        let vmm_dir = dir.join(VMM_DIR);
        std::fs::create_dir_all(&vmm_dir).map_err(HypervisorError::io("create", &vmm_dir))?;
        let identity = if cfg.confinement.enabled {
            // The lowest free uid: the lock files number at most the VMs that ran at once.
            let id = crate::confine::Identity::reserve(
                Path::new(crate::confine::UID_LOCK_DIR),
                cfg.confinement.first_uid,
                cfg.confinement.uids,
            )?;
            crate::confine::check_readable("vm.kernel", &cfg.vm.kernel, id.uid)?;
            crate::confine::check_readable("vm.initramfs", &cfg.vm.initramfs, id.uid)?;
            let jail = dir.join(JAIL_DIR);
            std::fs::create_dir_all(&jail).map_err(HypervisorError::io("create", &jail))?;
            // Recorded before anything runs as it: stop and a later cleanup kill whatever
            // still runs as this uid.
            let record = dir.join(UID_FILE);
            std::fs::write(&record, id.uid.to_string()).map_err(HypervisorError::io("write", &record))?;
            log::info!("vm {}: VMM confined as uid {}", spec.name, id.uid);
            Some(id)
        } else {
            None
        };
        let (vhostfd, dialer) = if kernel_vsock {
            let (fd, cid) = reserve_cid()?;
            (Some(fd), Dialer::Kernel { cid })
        } else {
            let uds = vmm_dir.join("vsock");
            let owner = identity.as_ref().map(|i| i.uid);
            (None, Dialer::Hybrid { uds, owner })
        };
        let mut vm = QemuVm {
            name: spec.name.clone(),
            dir: dir.clone(),
            accel,
            dialer,
            hello: Hello::default(),
            boot_times: BootTimes::default(),
            qemu: None,
            daemons: Vec::new(),
            console: None,
            stopped: Mutex::new(false),
            rpc_timeout: Duration::from_millis(cfg.timeouts.rpc_ms),
            cgroup: std::sync::Mutex::new(None),
            network: vmbox_network::Network::default(),
            netns: None,
            netns_path: None,
            identity,
        };
        if let Some(path) = &spec.cgroup {
            // Recorded first, so a shim that dies right after still gets it removed.
            let file = dir.join(CGROUP_FILE);
            let made = std::fs::write(&file, path.as_os_str().as_encoded_bytes())
                .map_err(HypervisorError::io("write", &file))
                .and_then(|()| crate::cgroup::HostCgroup::create(path));
            match made {
                Ok(cg) => vm.cgroup = std::sync::Mutex::new(Some(cg)),
                Err(e) => {
                    // Nothing runs yet: the run directory and any part of the cgroup go.
                    if let Err(c) = cleanup_run_dir(&dir) {
                        log::warn!("vm {}: {c}", spec.name);
                    }
                    return Err(e);
                }
            }
        }
        let mut taps = Vec::new();
        if let Some(ns) = spec.network.clone() {
            let (path, shared) = match ns {
                NetworkNamespace::Shared(p) => (p, true),
                NetworkNamespace::Private(p) => (p, false),
            };
            vm.netns_path = Some(path.clone());
            // The record is written in the same blocking job as the redirects: an
            // abandoned start (the task aborted meanwhile) still leaves it for cleanup.
            let file = dir.join(NETNS_FILE);
            let attached = tokio::task::spawn_blocking({
                let path = path.clone();
                move || -> Result<(vmbox_network::host::Attachment, Option<NetnsRecord>), HypervisorError> {
                    let a = vmbox_network::host::attach(&path)?;
                    if !shared {
                        return Ok((a, None));
                    }
                    let record = NetnsRecord {
                        path: path.clone(),
                        links: a.taps.iter().map(|t| (t.link.name.clone(), t.link.own_qdisc)).collect(),
                    };
                    if let Err(e) = std::fs::write(&file, serde_json::to_vec(&record).unwrap_or_default()) {
                        let _ = record.detach();
                        return Err(HypervisorError::Io {
                            what: "write",
                            path: file,
                            source: e,
                        });
                    }
                    Ok((a, Some(record)))
                }
            })
            .await
            .map_err(|e| HypervisorError::Internal(format!("pod network thread: {e}")))
            .and_then(|r| r);
            match attached {
                Ok((a, record)) => {
                    log::info!(
                        "vm {}: pod network {}: {}",
                        spec.name,
                        path.display(),
                        if a.network.is_empty() {
                            "no addressed link (lo only)".to_string()
                        } else {
                            a.network.to_string().replace('\n', "; ")
                        }
                    );
                    vm.netns = record;
                    vm.network = a.network;
                    taps = a.taps;
                }
                Err(e) => {
                    vm.stop().await;
                    return Err(e);
                }
            }
        }
        // From here on, any error leaves through `stop`, which removes what was started.
        match vm.boot(cfg, &spec, &qemu_bin, vhostfd, taps).await {
            Ok(()) => {
                log::info!(
                    "vm {}: agent {} ready in {} ms",
                    vm.name,
                    vmbox_protocol::text::bounded(&vm.hello.agent_version, 128),
                    t0.elapsed().as_millis()
                );
                Ok(vm)
            }
            Err(e) => {
                vm.stop().await;
                Err(e)
            }
        }
    }

    async fn boot(
        &mut self,
        cfg: &Config,
        spec: &VmSpec,
        qemu_bin: &Path,
        vhostfd: Option<OwnedFd>,
        taps: Vec<vmbox_network::host::Tap>,
    ) -> Result<(), HypervisorError> {
        let dir = self.dir.clone();
        let vmm_dir = dir.join(VMM_DIR);
        if let Some(id) = &self.identity {
            // The only place the confined processes can write: a small tmpfs of their own
            // (a hostile VMM cannot fill /run), mode 0700, owned by the VM's uid; `stop`
            // unmounts it.
            let opts = format!("size=256k,nr_inodes=64,mode=0700,uid={0},gid={0}", id.uid);
            nix::mount::mount(
                Some("tmpfs"),
                &vmm_dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
                Some(opts.as_str()),
            )
            .map_err(|e| HypervisorError::io("mount a tmpfs on", &vmm_dir)(e.into()))?;
        }
        let t_daemons = Instant::now();
        // A TCG guest is told the host's TSC frequency; measuring it (once per process,
        // about 5 ms) overlaps the daemons' start.
        let tsc_khz = (self.accel == Accel::Tcg).then(|| tokio::task::spawn_blocking(crate::accel::host_tsc_khz));
        // Both daemons start at once; their sockets are awaited together below.
        let mut sockets: Vec<(PathBuf, &'static str, PathBuf, usize)> = Vec::new();
        let fs_sock = vmm_dir.join("fs.sock");
        if let Some(shared) = &spec.shared_dir {
            let bin = resolve("virtiofsd", &cfg.binaries.virtiofsd, VIRTIOFSD_HINT)?;
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--socket-path={}", fs_sock.display()))
                .arg(format!("--shared-dir={}", shared.display()))
                .args([
                    "--cache=auto",
                    "--sandbox=namespace",
                    "--seccomp=kill",
                    "--log-level=warn",
                ]);
            self.enter_cgroup(&mut cmd)?;
            self.daemons
                .push(Child::spawn("virtiofsd", cmd, &dir.join("virtiofsd.log"))?);
            sockets.push((
                fs_sock.clone(),
                "virtiofsd",
                dir.join("virtiofsd.log"),
                self.daemons.len() - 1,
            ));
        }
        let vsock_sock = vmm_dir.join("vhost.sock");
        let hello_port = match &self.dialer {
            Dialer::Hybrid { uds, .. } => {
                let bin = resolve("vhost-device-vsock", &cfg.binaries.vhost_device_vsock, VSOCK_HINT)?;
                let mut cmd = Command::new(&bin);
                cmd.arg("--vm").arg(format!(
                    "guest-cid=3,socket={},uds-path={}",
                    vsock_sock.display(),
                    uds.display()
                ));
                self.enter_cgroup(&mut cmd)?;
                let mut jail = self.jail(&bin, &[], &[], &[], true)?;
                let child = Child::spawn_with("vhost-device-vsock", cmd, &dir.join("vsock.log"), |cmd| {
                    if let Some(j) = jail.as_mut() {
                        j.install(cmd);
                    }
                    Ok(())
                });
                self.daemons.push(confined(child, jail.as_mut())?);
                sockets.push((
                    vsock_sock.clone(),
                    "vhost-device-vsock",
                    dir.join("vsock.log"),
                    self.daemons.len() - 1,
                ));
                Some(vmbox_protocol::HELLO_PORT)
            }
            // Kernel vsock ports are host-wide: the kernel picks a free one.
            Dialer::Kernel { .. } => None,
        };
        for (sock, name, log, daemon) in &sockets {
            self.wait_for_socket(sock, name, log, *daemon).await?;
        }
        // virtiofsd runs as root: its socket is handed to the confined QEMU's uid.
        if spec.shared_dir.is_some() {
            self.give_to_vmm(&fs_sock)?;
        }
        // Listen before the guest boots: the guest dials in, the host never dials a booting
        // guest (that can wedge vhost-user vsock devices).
        let listener = HelloListener::bind(&self.dialer, hello_port)?;
        if let Some(p) = listener.path() {
            self.give_to_vmm(p)?;
        }
        let hostname = match spec.hostname.as_deref() {
            Some(h) if vmbox_protocol::valid_hostname(h) => Some(h),
            Some(h) => {
                log::warn!(
                    "vm {}: hostname {h:?} is not a valid hostname; the guest gets none",
                    spec.name
                );
                None
            }
            None => None,
        };
        let host_tsc_khz = match tsc_khz {
            Some(measuring) => measuring.await.ok().flatten(),
            None => None,
        };
        let append = kernel_append(
            &cfg.log_level,
            listener.port(),
            spec.shared_dir.is_some(),
            hostname,
            self.accel,
            host_tsc_khz,
            &cfg.vm.kernel_params,
        );
        let console_sock = vmm_dir.join("con.sock");
        self.console = Some(Console::listen(&console_sock, &self.name)?);
        self.give_to_vmm(&console_sock)?;
        let qmp_sock = vmm_dir.join("qmp.sock");
        let vsock = match &self.dialer {
            Dialer::Hybrid { .. } => VsockDevice::VhostUser(&vsock_sock),
            Dialer::Kernel { cid } => VsockDevice::Kernel {
                cid: *cid,
                vhostfd: vhostfd.as_ref().map(|f| f.as_raw_fd()),
            },
        };
        let vhost_fds: Vec<Option<OwnedFd>> = taps.iter().map(|_| open_vhost_net()).collect();
        let nics: Vec<Nic> = taps
            .iter()
            .zip(&vhost_fds)
            .map(|(t, v)| Nic {
                fd: t.fd.as_raw_fd(),
                mac: t.mac,
                vhostfd: v.as_ref().map(|f| f.as_raw_fd()),
            })
            .collect();
        let qemu_args_in = QemuArgs {
            name: &self.name,
            kernel: &cfg.vm.kernel,
            initramfs: &cfg.vm.initramfs,
            append: &append,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            accel: self.accel,
            tcg_cache_mib: cfg.vm.tcg_cache_mib,
            console: &console_sock,
            qmp: &qmp_sock,
            fs: spec.shared_dir.as_ref().map(|_| fs_sock.as_path()),
            vsock,
            nics: &nics,
            sandbox: self.identity.as_ref().map(|_| cfg.confinement.qemu_sandbox.as_str()),
        };
        qemu_args_in.check_slots().map_err(HypervisorError::Spec)?;
        let args = qemu_args(&qemu_args_in);
        // QEMU lives in the pod's network namespace (where its taps are, and what
        // `/proc/<task pid>/ns/net` then names for containerd and `nsenter`).
        let netns = match &self.netns_path {
            Some(p) => Some(std::fs::File::open(p).map_err(HypervisorError::io("open network namespace", p))?),
            None => None,
        };
        let mut cmd = Command::new(qemu_bin);
        cmd.args(&args);
        log::debug!("vm {}: {:?}", self.name, cmd);
        self.boot_times.daemons = t_daemons.elapsed();
        // QEMU starts with its vCPUs stopped (-S) and is released once its monitor answers,
        // so the host's part (building the machine, loading kernel and initramfs) and the
        // guest's part of the boot are timed apart.
        let t_qemu = Instant::now();
        let inherit: Vec<i32> = vhostfd
            .iter()
            .map(|f| f.as_raw_fd())
            .chain(nics.iter().map(|n| n.fd))
            .chain(nics.iter().filter_map(|n| n.vhostfd))
            .collect();
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        let mut cmd = cmd;
        self.enter_cgroup(&mut cmd)?;
        let kvm = Path::new("/dev/kvm");
        let (devices, groups): (Vec<&Path>, Vec<u32>) = match self.accel {
            Accel::Kvm => (vec![kvm], crate::confine::device_group(kvm).into_iter().collect()),
            Accel::Tcg => (Vec::new(), Vec::new()),
        };
        // Without pod NICs QEMU needs no network: a namespace of its own, loopback only.
        let own_network = self.netns_path.is_none();
        let mut jail = self.jail(
            qemu_bin,
            &[&cfg.vm.kernel, &cfg.vm.initramfs],
            &devices,
            &groups,
            own_network,
        )?;
        let qemu = Child::spawn_with("qemu", cmd, &dir.join("qemu.log"), |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setns and fcntl between fork and exec, both async-signal-safe;
            // the fds stay open in the parent until the spawn returned.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(ns) = netns_fd {
                        if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for &fd in &inherit {
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            // Last: the jail drops the privileges the steps above need.
            if let Some(j) = jail.as_mut() {
                j.install(cmd);
            }
            Ok(())
        });
        let qemu = confined(qemu, jail.as_mut())?;
        // QEMU holds the CID's, the taps' and vhost-net's fds now.
        drop(vhostfd);
        drop(vhost_fds);
        drop(taps);
        drop(netns);
        self.write_pids(Some(qemu.pid))?;
        let vmm_uid = self.vmm_uid();
        let qemu = &*self.qemu.insert(qemu);
        let timeout = Duration::from_millis(cfg.timeouts.boot_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let console = self.console.as_ref();
        let console_tail = || console.map(|c| c.tail(20)).unwrap_or_default();
        let failed = |status: Option<VmExit>| {
            let log = log_tail(&dir.join("qemu.log"));
            HypervisorError::BootFailed {
                status: format!(
                    "qemu {}; qemu.log: {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "still running".into()),
                    log.trim()
                ),
                console: console_tail(),
            }
        };
        let release = qmp::execute_when_up(&qmp_sock, vmm_uid, "cont", timeout);
        tokio::select! {
            r = tokio::time::timeout_at(deadline, release) => match r {
                Ok(r) => r?,
                Err(_) => return Err(HypervisorError::BootTimeout { timeout_ms: cfg.timeouts.boot_ms, console: console_tail() }),
            },
            status = qemu.wait(timeout + Duration::from_secs(1)) => return Err(failed(status)),
        };
        self.boot_times.vmm_init = t_qemu.elapsed();
        let t_guest = Instant::now();
        let cid = match &self.dialer {
            Dialer::Kernel { cid } => Some(*cid),
            Dialer::Hybrid { .. } => None,
        };
        let hello = async {
            let mut conn = listener
                .accept(cid)
                .await
                .map_err(HypervisorError::io("accept hello on", dir.join("vsock.sock")))?;
            Ok::<_, HypervisorError>(vmbox_protocol::hello::read_hello(&mut conn).await?)
        };
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, hello) => match r {
                Ok(r) => r,
                Err(_) => Err(HypervisorError::BootTimeout { timeout_ms: cfg.timeouts.boot_ms, console: console_tail() }),
            },
            status = qemu.wait(timeout + Duration::from_secs(1)) => Err(failed(status)),
        };
        self.hello = result?;
        self.boot_times.guest = t_guest.elapsed();
        log::debug!(
            "timing: vm={} daemons_up_ms={} qemu_init_ms={} guest_boot_ms={} guest_clock_ms={}",
            self.name,
            self.boot_times.daemons.as_millis(),
            self.boot_times.vmm_init.as_millis(),
            self.boot_times.guest.as_millis(),
            self.hello.boot_time_us / 1000
        );
        Ok(())
    }

    /// The jail for a child of this VM (`None` when not confined): it sees `bin` and
    /// `files` read-only, the VM's socket directory writable, and `devices`.
    fn jail(
        &self,
        bin: &Path,
        files: &[&Path],
        devices: &[&Path],
        groups: &[u32],
        own_network: bool,
    ) -> Result<Option<crate::confine::Jail>, HypervisorError> {
        let Some(id) = &self.identity else {
            return Ok(None);
        };
        let mut visible = vec![crate::confine::Visible {
            path: self.dir.join(VMM_DIR),
            writable: true,
        }];
        for p in std::iter::once(bin).chain(files.iter().copied()) {
            // Bound at the path the child is given; the bind follows symbolic links.
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                std::fs::canonicalize(p).map_err(HypervisorError::io("resolve", p))?
            };
            visible.push(crate::confine::Visible { path, writable: false });
        }
        crate::confine::Jail::new(id, &self.dir.join(JAIL_DIR), &visible, devices, groups, own_network).map(Some)
    }

    /// QEMU's monitor socket.
    fn qmp_socket(&self) -> PathBuf {
        self.dir.join(VMM_DIR).join("qmp.sock")
    }

    /// The confined VM's uid, which owns the sockets QEMU and vhost-device-vsock make.
    fn vmm_uid(&self) -> Option<u32> {
        self.identity.as_ref().map(|i| i.uid)
    }

    /// Hands a socket the host made to the confined VM's uid (QEMU and vhost-device-vsock
    /// connect to it); nothing when not confined.
    fn give_to_vmm(&self, path: &Path) -> Result<(), HypervisorError> {
        if let Some(id) = &self.identity {
            crate::confine::give(path, id.uid).map_err(HypervisorError::io("chown", path))?;
        }
        Ok(())
    }

    /// Waits until a daemon created its socket (or died, or took too long).
    async fn wait_for_socket(
        &self,
        sock: &Path,
        name: &'static str,
        log: &Path,
        daemon: usize,
    ) -> Result<(), HypervisorError> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        let daemon = self.daemons.get(daemon);
        while !sock.exists() {
            if let Some(status) = daemon.and_then(|d| d.exited()) {
                return Err(HypervisorError::EarlyExit {
                    name,
                    status,
                    log: log_tail(log),
                });
            }
            if Instant::now() > deadline {
                return Err(HypervisorError::Timeout {
                    what: format!("{name}'s socket {}", sock.display()),
                    timeout_ms: SOCKET_TIMEOUT.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Records the pids so `cleanup_run_dir` can stop them after this process died.
    fn write_pids(&self, qemu: Option<u32>) -> Result<(), HypervisorError> {
        let mut pids: Vec<u32> = self.daemons.iter().map(|d| d.pid).collect();
        pids.extend(qemu);
        let path = self.dir.join("pids.json");
        std::fs::write(&path, serde_json::to_vec(&pids).unwrap_or_default())
            .map_err(HypervisorError::io("write", &path))
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        self.console.as_ref().map(|c| c.tail(n)).unwrap_or_default()
    }

    /// The guest console: (bytes held in the ring, bytes the guest printed in all).
    pub fn console_bytes(&self) -> (usize, u64) {
        self.console
            .as_ref()
            .map(|c| (c.held(), c.received()))
            .unwrap_or_default()
    }

    /// The uid the VMM and vhost-device-vsock run as, when confined.
    pub fn confined_uid(&self) -> Option<u32> {
        self.identity.as_ref().map(|i| i.uid)
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn hello(&self) -> &Hello {
        &self.hello
    }

    fn boot_times(&self) -> BootTimes {
        self.boot_times
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    async fn connect(&self, port: u32) -> Result<Conn, HypervisorError> {
        self.dialer.connect(port, self.rpc_timeout).await
    }

    async fn pause(&self) -> Result<(), HypervisorError> {
        qmp::execute(&self.qmp_socket(), self.vmm_uid(), "stop", QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<(), HypervisorError> {
        qmp::execute(&self.qmp_socket(), self.vmm_uid(), "cont", QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    fn exited(&self) -> Option<VmExit> {
        self.qemu.as_ref().and_then(|q| q.exited())
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<VmExit> {
        match &self.qemu {
            Some(q) => q.wait(timeout).await,
            None => Some(VmExit::NeverStarted),
        }
    }

    async fn wait(&self) -> VmExit {
        match &self.qemu {
            Some(q) => q.wait_forever().await,
            None => VmExit::NeverStarted,
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .chain(self.qemu.as_ref())
            .filter(|c| c.exited().is_none())
            .map(|c| c.pid)
            .collect()
    }

    fn vmm_pid(&self) -> u32 {
        self.qemu.as_ref().map(|c| c.pid).unwrap_or(0)
    }

    fn console_tail(&self, n: usize) -> String {
        QemuVm::console_tail(self, n)
    }

    fn network(&self) -> &vmbox_network::Network {
        &self.network
    }

    async fn join_cgroup(&self, path: &Path) -> Result<(), HypervisorError> {
        if self.cgroup.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Err(HypervisorError::Cgroup {
                path: path.to_path_buf(),
                detail: format!("vm {} already runs in a host cgroup", self.name),
            });
        }
        // Recorded first, as at start: a shim that dies right after still gets it removed.
        let file = self.dir.join(CGROUP_FILE);
        std::fs::write(&file, path.as_os_str().as_encoded_bytes()).map_err(HypervisorError::io("write", &file))?;
        let (p, pids) = (path.to_path_buf(), self.pids());
        let cg = tokio::task::spawn_blocking(move || {
            let cg = crate::cgroup::HostCgroup::create(&p)?;
            cg.adopt(&pids).map(|()| cg)
        })
        .await
        .map_err(|e| HypervisorError::Cgroup {
            path: path.to_path_buf(),
            detail: format!("move the VM in: {e}"),
        })??;
        *self.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = Some(cg);
        Ok(())
    }

    async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return;
        }
        if let Some(q) = &self.qemu {
            if q.exited().is_none() {
                if let Err(e) = qmp::execute(&self.qmp_socket(), self.vmm_uid(), "quit", Duration::from_secs(1)).await {
                    log::debug!("vm {}: {e}", self.name);
                }
                if q.wait(Duration::from_secs(2)).await.is_none() {
                    log::warn!("vm {}: QEMU did not quit: SIGKILL", self.name);
                    q.signal(Signal::SIGKILL);
                    q.wait(Duration::from_secs(5)).await;
                }
            }
        }
        for d in &self.daemons {
            // virtiofsd leaves by itself once QEMU is gone; the vsock daemon does not.
            d.stop(Duration::from_secs(1)).await;
        }
        if self.identity.is_some() {
            // Whatever a hostile VMM forked dies before its uid is free for another VM.
            let dir = self.dir.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || release_confinement(&dir)).await {
                log::warn!("vm {}: release the confinement: {e}", self.name);
            }
        }
        if let Some(record) = self.netns.clone() {
            match tokio::task::spawn_blocking(move || record.detach()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("vm {}: {e}", self.name),
                Err(e) => log::warn!("vm {}: remove the pod network redirects: {e}", self.name),
            }
        }
        let cgroup = self
            .cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.path().to_path_buf());
        if let Some(path) = cgroup {
            let removed = tokio::task::spawn_blocking(move || crate::cgroup::HostCgroup::remove_path(&path)).await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("vm {}: {e}", self.name),
                Err(e) => log::warn!("vm {}: remove the host cgroup: {e}", self.name),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("vm {}: remove {}: {e}", self.name, self.dir.display());
            }
        }
        *stopped = true;
        log::info!("vm {}: stopped", self.name);
    }
}

/// Stops whatever a VM whose owner died left in `dir` (per its pids.json) and removes
/// the directory. A pid is only killed if its command line still names `dir`, so a
/// recycled pid is never hit.
pub fn cleanup_run_dir(dir: &Path) -> Result<(), HypervisorError> {
    // A run directory reached through a symbolic link (a standby VM's, taken over by a
    // sandbox): the processes name the target; the link goes last.
    if dir.is_symlink() {
        let target = dir.canonicalize();
        let cleaned = match target {
            Ok(t) => cleanup_run_dir(&t),
            Err(_) => Ok(()),
        };
        let _ = std::fs::remove_file(dir);
        return cleaned;
    }
    let pids: Vec<u32> = std::fs::read(dir.join("pids.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let marker = dir.display().to_string();
    let ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&marker))
            .unwrap_or(false)
    };
    let live: Vec<u32> = pids.into_iter().filter(|p| ours(*p)).collect();
    for pid in &live {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while live.iter().any(|p| ours(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The confined uid's processes, whatever their command line says.
    release_confinement(dir);
    if let Some(record) = std::fs::read(dir.join(NETNS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<NetnsRecord>(&b).ok())
    {
        if let Err(e) = record.detach() {
            log::warn!("cleanup of {}: {e}", dir.display());
        }
    }
    if let Ok(cg) = std::fs::read(dir.join(CGROUP_FILE)) {
        let path = PathBuf::from(String::from_utf8_lossy(&cg).into_owned());
        // Only a path below the roots (it was validated when written).
        if path.is_relative() && path.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            if let Err(e) = crate::cgroup::HostCgroup::remove_path(&path) {
                log::warn!("cleanup of {}: {e}", dir.display());
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HypervisorError::Io {
            what: "remove run directory",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, run_dir: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            run_dir: run_dir.into(),
            shared_dir: None,
            vcpus: 1,
            memory_mib: 128,
            hostname: None,
            cgroup: None,
            network: None,
        }
    }

    #[test]
    fn a_log_is_shown_by_its_tail_whatever_its_size_and_bytes() {
        let p = std::env::temp_dir().join(format!("vmbox-logtail-{}", std::process::id()));
        let mut text = "é".repeat(3000).into_bytes(); // byte 4096 inside a character
        text.extend(b"\x1b[2Jforged\n");
        text.extend(std::iter::repeat_n(b'x', 10 << 20));
        text.extend(b"\nthe end\n");
        std::fs::write(&p, &text).unwrap();
        let tail = log_tail(&p);
        assert!(tail.len() <= 2 * LOG_TAIL as usize, "{}", tail.len());
        assert!(tail.ends_with("the end"), "{}", &tail[tail.len() - 20..]);
        // Byte 4096 from the end falls inside a character; a control sequence follows.
        let mut short = "é".repeat(2500).into_bytes();
        short.extend(b"\n\x1b[2Jforged\n");
        std::fs::write(&p, &short).unwrap();
        let tail = log_tail(&p);
        assert!(tail.contains("\\u{1b}[2Jforged") && !tail.contains('\x1b'), "{tail}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn specs_are_checked() {
        assert!(check_spec(&spec("abc-1_2.3", "/run/vmbox/vm/0123456789abcdef")).is_ok());
        assert!(check_spec(&spec("../x", "/r")).is_err());
        assert!(
            check_spec(&spec("a,b", "/r")).is_err(),
            "a comma would inject QEMU options"
        );
        let long = format!("/{}", "d".repeat(MAX_RUN_DIR_LEN));
        let e = check_spec(&spec("a", &long)).unwrap_err().to_string();
        assert!(e.contains("state_dir"), "{e}");
    }
}
