//! The QEMU microvm backend.
//!
//! One VM = one run directory holding everything it creates (sockets, logs, pids.json),
//! plus three processes: virtiofsd (the shared directory), vhost-device-vsock (unless
//! the kernel's vhost-vsock is used) and QEMU. A start that fails half-way, `stop`,
//! and dropping the VM all remove every one of them.

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
use crate::{qmp, BootTimes, Hypervisor, HypervisorError, Vm, VmSpec};

/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "vmboxfs";
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qemu {
    config: Config,
}

impl Qemu {
    pub fn new(config: Config) -> Qemu {
        Qemu { config }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        Ok(Box::new(QemuVm::start(&self.config, spec).await?))
    }
}

pub struct QemuVm {
    id: String,
    dir: PathBuf,
    accel: Accel,
    dialer: Dialer,
    hello: Hello,
    boot_times: BootTimes,
    qemu: Option<Child>,
    daemons: Vec<Child>,
    stopped: Mutex<bool>,
    rpc_timeout: Duration,
}

/// Ids become file names and QEMU's `-name`: keep them to a safe alphabet.
fn check_id(id: &str) -> Result<(), HypervisorError> {
    let ok = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    match ok {
        true => Ok(()),
        false => Err(HypervisorError::Spec(format!(
            "sandbox id {id:?}: expected 1-128 of [A-Za-z0-9_.-]"
        ))),
    }
}

impl QemuVm {
    pub async fn start(cfg: &Config, spec: VmSpec) -> Result<QemuVm, HypervisorError> {
        check_id(&spec.id)?;
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
        log::info!("vm {}: accelerator {} ({why})", spec.id, accel.name());
        let kernel_vsock = match cfg.vm.vsock {
            VsockBackend::Kernel => true,
            VsockBackend::VhostUser => false,
            VsockBackend::Auto => Path::new("/dev/vhost-vsock").exists(),
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(HypervisorError::io("create run directory", &spec.run_dir))?;
        let dir = spec.run_dir.clone();
        let mut vm = QemuVm {
            id: spec.id.clone(),
            dir: dir.clone(),
            accel,
            dialer: if kernel_vsock {
                Dialer::Kernel { cid: pick_cid() }
            } else {
                Dialer::Hybrid {
                    uds: dir.join("vsock.sock"),
                }
            },
            hello: Hello::default(),
            boot_times: BootTimes::default(),
            qemu: None,
            daemons: Vec::new(),
            stopped: Mutex::new(false),
            rpc_timeout: Duration::from_millis(cfg.timeouts.rpc_ms),
        };
        // From here on, any error leaves through `fail`, which removes what was started.
        match vm.boot(cfg, &spec, &qemu_bin).await {
            Ok(()) => {
                log::info!(
                    "vm {}: agent {} ready in {} ms",
                    vm.id,
                    vm.hello.agent_version,
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

    async fn boot(&mut self, cfg: &Config, spec: &VmSpec, qemu_bin: &Path) -> Result<(), HypervisorError> {
        let dir = self.dir.clone();
        let t_daemons = Instant::now();
        let mut args: Vec<String> = Vec::new();
        // Both daemons start at once; their sockets are awaited together below.
        let mut sockets: Vec<(PathBuf, &'static str, PathBuf, usize)> = Vec::new();
        if let Some(shared) = &spec.shared_dir {
            let bin = resolve("virtiofsd", &cfg.binaries.virtiofsd, VIRTIOFSD_HINT)?;
            let sock = dir.join("fs.sock");
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", shared.display()))
                .args(["--cache=auto", "--sandbox=namespace", "--log-level=warn"]);
            self.daemons
                .push(Child::spawn("virtiofsd", cmd, &dir.join("virtiofsd.log"))?);
            sockets.push((
                sock.clone(),
                "virtiofsd",
                dir.join("virtiofsd.log"),
                self.daemons.len() - 1,
            ));
            // QEMU 7.1-8.0 crash when virtiofsd is given --tag: the tag lives on the device.
            args.extend(["-chardev".into(), format!("socket,id=fs,path={}", sock.display())]);
            args.extend([
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}"),
            ]);
        }
        let hello_port = match &self.dialer {
            Dialer::Hybrid { uds } => {
                let bin = resolve("vhost-device-vsock", &cfg.binaries.vhost_device_vsock, VSOCK_HINT)?;
                let sock = dir.join("vhost-vsock.sock");
                let mut cmd = Command::new(bin);
                cmd.arg("--vm").arg(format!(
                    "guest-cid=3,socket={},uds-path={}",
                    sock.display(),
                    uds.display()
                ));
                self.daemons
                    .push(Child::spawn("vhost-device-vsock", cmd, &dir.join("vsock.log"))?);
                sockets.push((
                    sock.clone(),
                    "vhost-device-vsock",
                    dir.join("vsock.log"),
                    self.daemons.len() - 1,
                ));
                args.extend(["-chardev".into(), format!("socket,id=vsk,path={}", sock.display())]);
                args.extend(["-device".into(), "vhost-user-vsock-device,chardev=vsk".into()]);
                vmbox_protocol::HELLO_PORT
            }
            Dialer::Kernel { cid } => {
                args.extend(["-device".into(), format!("vhost-vsock-device,guest-cid={cid}")]);
                // Kernel vsock ports are host-wide: one per VM.
                20_000 + (*cid % 40_000)
            }
        };
        for (sock, name, log, daemon) in &sockets {
            self.wait_for_socket(sock, name, log, *daemon).await?;
        }
        // Listen before the guest boots: the guest dials in, the host never dials a booting
        // guest (that can wedge vhost-user vsock devices).
        let listener = HelloListener::bind(&self.dialer, hello_port)?;
        let quiet = cfg.log_level != "trace";
        let agent_log = if cfg.log_level == "trace" {
            "debug"
        } else {
            cfg.log_level.as_str()
        };
        let mut append = format!(
            "console=ttyS0 reboot=t panic=-1 {}vmbox.log={agent_log} vmbox.hello_port={hello_port}",
            if quiet { "quiet " } else { "" }
        );
        if spec.shared_dir.is_some() {
            append.push_str(&format!(" vmbox.share={SHARE_TAG}"));
        }
        match spec.hostname.as_deref() {
            Some(h) if vmbox_protocol::valid_hostname(h) => append.push_str(&format!(" vmbox.hostname={h}")),
            Some(h) => log::warn!(
                "sandbox {}: hostname {h:?} is not a valid hostname; the guest gets none",
                spec.id
            ),
            None => {}
        }
        if !cfg.vm.kernel_params.is_empty() {
            append.push(' ');
            append.push_str(&cfg.vm.kernel_params);
        }
        let mem = spec.memory_mib;
        let (accel, cpu) = match (self.accel, cfg.vm.tcg_cache_mib) {
            (Accel::Tcg, 0) => ("tcg,thread=multi".to_string(), "max"),
            (Accel::Tcg, mib) => (format!("tcg,thread=multi,tb-size={mib}"), "max"),
            (Accel::Kvm, _) => ("kvm".to_string(), "host"),
        };
        let mut cmd = Command::new(qemu_bin);
        cmd.arg("-name")
            .arg(format!("vmbox-{},process=vmbox-{}", self.id, self.id))
            .args([
                "-M",
                "microvm,x-option-roms=off,isa-serial=on,acpi=off,memory-backend=mem",
            ])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-m", &format!("{mem}M"), "-smp", &spec.vcpus.to_string()])
            .args(["-accel", &accel, "-cpu", cpu])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            // Free page reporting: the guest hands memory it freed (the unpacked initramfs,
            // exited processes) back, and QEMU drops it from the host.
            .args(["-device", "virtio-balloon-device,free-page-reporting=on"])
            .arg("-kernel")
            .arg(&cfg.vm.kernel)
            .arg("-initrd")
            .arg(&cfg.vm.initramfs)
            .args(["-append", &append])
            .args([
                "-chardev",
                &format!("file,id=con,path={}", dir.join("console.log").display()),
                "-serial",
                "chardev:con",
            ])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
            ])
            .args(&args);
        log::debug!("vm {}: {:?}", self.id, cmd);
        self.boot_times.daemons = t_daemons.elapsed();
        // QEMU starts with its vCPUs stopped (-S) and is released once its monitor answers,
        // so the host's part (building the machine, loading kernel and initramfs) and the
        // guest's part of the boot are timed apart.
        cmd.arg("-S");
        let t_qemu = Instant::now();
        let qemu = Child::spawn("qemu", cmd, &dir.join("qemu.log"))?;
        self.write_pids(Some(qemu.pid))?;
        let qemu = &*self.qemu.insert(qemu);
        let timeout = Duration::from_millis(cfg.timeouts.boot_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let qmp_sock = dir.join("qmp.sock");
        let failed = |status: Option<String>| {
            let mut log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            log.truncate(4096);
            HypervisorError::BootFailed {
                status: format!(
                    "qemu {}; qemu.log: {}",
                    status.unwrap_or_else(|| "still running".into()),
                    log.trim()
                ),
                console: console_tail(&dir.join("console.log"), 20),
            }
        };
        let release = qmp::execute_when_up(&qmp_sock, "cont", timeout);
        tokio::select! {
            r = tokio::time::timeout_at(deadline, release) => match r {
                Ok(r) => r?,
                Err(_) => return Err(HypervisorError::BootTimeout { timeout_ms: cfg.timeouts.boot_ms, console: self.console_tail(20) }),
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
                Err(_) => Err(HypervisorError::BootTimeout { timeout_ms: cfg.timeouts.boot_ms, console: self.console_tail(20) }),
            },
            status = qemu.wait(timeout + Duration::from_secs(1)) => Err(failed(status)),
        };
        self.hello = result?;
        self.boot_times.guest = t_guest.elapsed();
        log::debug!(
            "timing: vm={} daemons_up_ms={} qemu_init_ms={} guest_boot_ms={} guest_clock_ms={}",
            self.id,
            self.boot_times.daemons.as_millis(),
            self.boot_times.vmm_init.as_millis(),
            self.boot_times.guest.as_millis(),
            self.hello.boot_time_us / 1000
        );
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
                let log = std::fs::read_to_string(log).unwrap_or_default();
                return Err(HypervisorError::EarlyExit {
                    name,
                    status,
                    log: log.chars().take(4096).collect(),
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
        console_tail(&self.dir.join("console.log"), n)
    }
}

fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A guest CID for the kernel's vhost-vsock (3 and up; collisions make QEMU fail).
fn pick_cid() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    3 + (t ^ std::process::id().wrapping_mul(2_654_435_761)) % 1_000_000
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
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

    fn run_dir(&self) -> &Path {
        &self.dir
    }

    async fn connect(&self, port: u32) -> Result<Conn, HypervisorError> {
        self.dialer.connect(port, self.rpc_timeout).await
    }

    async fn pause(&self) -> Result<(), HypervisorError> {
        qmp::execute(&self.dir.join("qmp.sock"), "stop", QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<(), HypervisorError> {
        qmp::execute(&self.dir.join("qmp.sock"), "cont", QMP_TIMEOUT)
            .await
            .map(|_| ())
    }

    fn exited(&self) -> Option<String> {
        self.qemu.as_ref().and_then(|q| q.exited())
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<String> {
        match &self.qemu {
            Some(q) => q.wait(timeout).await,
            None => Some("never started".into()),
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

    fn console_tail(&self, n: usize) -> String {
        QemuVm::console_tail(self, n)
    }

    async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return;
        }
        if let Some(q) = &self.qemu {
            if q.exited().is_none() {
                if let Err(e) = qmp::execute(&self.dir.join("qmp.sock"), "quit", Duration::from_secs(1)).await {
                    log::debug!("vm {}: {e}", self.id);
                }
                if q.wait(Duration::from_secs(2)).await.is_none() {
                    log::warn!("vm {}: QEMU did not quit: SIGKILL", self.id);
                    q.signal(Signal::SIGKILL);
                    q.wait(Duration::from_secs(5)).await;
                }
            }
        }
        for d in &self.daemons {
            // virtiofsd leaves by itself once QEMU is gone; the vsock daemon does not.
            d.stop(Duration::from_secs(1)).await;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("vm {}: remove {}: {e}", self.id, self.dir.display());
            }
        }
        *stopped = true;
        log::info!("vm {}: stopped", self.id);
    }
}

/// Stops whatever a VM whose owner died left in `dir` (per its pids.json) and removes
/// the directory. A pid is only killed if its command line still names `dir`, so a
/// recycled pid is never hit.
pub fn cleanup_run_dir(dir: &Path) -> Result<(), HypervisorError> {
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

    #[test]
    fn sandbox_ids_are_checked() {
        assert!(check_id("abc-1_2.3").is_ok());
        assert!(check_id("../x").is_err());
        assert!(check_id("a,b").is_err(), "a comma would inject QEMU options");
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("vmbox-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("console.log");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(console_tail(&f, 2), "c\nd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
