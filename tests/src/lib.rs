//! Helpers for vmbox's VM-level tests and benchmarks: a configuration pointing at the
//! freshly built guest, a busybox rootfs, OCI specs, and a [`TestVm`] that boots a real
//! VM and talks to its real agent.

pub mod containerd;
pub mod cri;
pub mod netns;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmbox_config::Config;
use vmbox_hypervisor::qemu::QemuVm;
use vmbox_hypervisor::{Conn, Vm, VmSpec};
use vmbox_protocol::agent::*;
use vmbox_protocol::agent_ttrpc::AgentClient;

/// Where `make guest` put vmlinux and initramfs.img (`VMBOX_GUEST_DIR` overrides).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VMBOX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// A config for tests: the built guest, a private state directory, TCG unless KVM works.
pub fn test_config(name: &str) -> Config {
    let mut c = Config::default();
    c.vm.kernel = guest_dir().join("vmlinux");
    c.vm.initramfs = guest_dir().join("initramfs.img");
    c.state_dir = std::env::temp_dir().join(format!("vmbox-test-{}-{name}", std::process::id()));
    c.timeouts.boot_ms = 60_000;
    if let Ok(level) = std::env::var("VMBOX_TEST_LOG") {
        c.log_level = level;
    }
    // `off` measures the unconfined VMM (make bench-vm, docs/benchmarks.md).
    if std::env::var("VMBOX_TEST_CONFINEMENT").as_deref() == Ok("off") {
        c.confinement.enabled = false;
    }
    c
}

/// A deadline for RPCs in tests: generous (TCG is slow), never unbounded.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// Populates `dir` with busybox (from Debian's busybox-static) and its applet links.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox not found: apt-get install busybox-static")?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, bin.join("busybox"))?;
    let list = std::process::Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(())
}

/// An OCI process running `args`.
pub fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": { "uid": 0, "gid": 0 },
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER"],
            "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER"],
            "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER"]
        },
        "noNewPrivileges": true
    })
}

/// A minimal runtime spec like `runc spec` makes, running `args`.
pub fn spec(args: &[&str], terminal: bool) -> Vec<u8> {
    let v = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(args, terminal),
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "vmbox",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    serde_json::to_vec(&v).expect("static spec encodes")
}

/// A booted VM with its agent client and a shared directory.
pub struct TestVm {
    pub vm: QemuVm,
    pub agent: AgentClient,
    pub shared: PathBuf,
    pub config: Config,
    next_stream: std::sync::atomic::AtomicU64,
}

impl TestVm {
    /// Boots a VM whose shared directory holds a busybox rootfs at `rootfs/`.
    pub async fn boot(name: &str) -> Result<TestVm> {
        let config = test_config(name);
        let shared = config.state_dir.join("shared");
        busybox_rootfs(&shared.join("rootfs"))?;
        let spec = VmSpec {
            name: format!("test-{name}"),
            run_dir: config.state_dir.join("vm"),
            shared_dir: Some(shared.clone()),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            hostname: Some("vmbox-test-host".into()),
            cgroup: None,
            network: None,
        };
        let vm = QemuVm::start(&config, spec).await.context("boot")?;
        let conn = vm.connect(vmbox_protocol::AGENT_PORT).await?;
        let agent = vmbox_protocol::client(conn);
        Ok(TestVm {
            vm,
            agent,
            shared,
            config,
            next_stream: 1.into(),
        })
    }

    /// Opens a stdio stream and returns its id and connection.
    pub async fn stream(&self) -> Result<(u64, Conn)> {
        let id = self.next_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut c = self.vm.connect(vmbox_protocol::STDIO_PORT).await?;
        vmbox_protocol::stream::write_header(&mut c, id).await?;
        Ok((id, c))
    }

    /// Creates container `id` running `args` with stdout (and optionally stdin) streams.
    pub async fn create(&self, id: &str, args: &[&str], with_stdin: bool) -> Result<Streams> {
        let (out_id, out) = self.stream().await?;
        let (err_id, err) = self.stream().await?;
        let mut stdin = None;
        let mut stdio = Stdio {
            stdout: out_id,
            stderr: err_id,
            ..Default::default()
        };
        if with_stdin {
            let (in_id, s) = self.stream().await?;
            stdio.stdin = in_id;
            stdin = Some(s);
        }
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec(args, false),
            rootfs: "rootfs".into(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.agent
            .create_container(ctx(), &req)
            .await
            .context("CreateContainer")?;
        Ok(Streams {
            stdin,
            stdout: out,
            stderr: err,
        })
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let r = self
            .agent
            .start_container(
                ctx(),
                &ContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .context("StartContainer")?;
        Ok(r.pid)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.agent.wait_process(ctx(), &req).await.context("WaitProcess")
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            force: true,
            ..Default::default()
        };
        self.agent
            .remove_container(ctx(), &req)
            .await
            .context("RemoveContainer")?;
        Ok(())
    }

    /// SIGKILL to every process of container `id`; then waits for its init, drains its
    /// output and removes it.
    pub async fn kill_and_remove(&self, id: &str, streams: &mut Streams) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            signal: 9,
            all: true,
            ..Default::default()
        };
        self.agent.signal_process(ctx(), &req).await.context("SignalProcess")?;
        self.wait(id, "").await?;
        streams.read_output().await?;
        self.remove(id).await
    }

    /// Runs `args` as container `id` to completion: (exit status, stdout, stderr).
    pub async fn run(&self, id: &str, args: &[&str]) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let mut s = self.create(id, args, false).await?;
        self.start(id).await?;
        let (out, err) = s.read_output().await?;
        let exit = self.wait(id, "").await?;
        self.remove(id).await?;
        Ok((exit.exit_status, out, err))
    }

    /// Graceful shutdown through the agent, then the host side's stop.
    pub async fn shutdown(self) -> Result<ShutdownResponse> {
        let r = self
            .agent
            .shutdown(
                ctx(),
                &ShutdownRequest {
                    grace_period_ms: 2000,
                    ..Default::default()
                },
            )
            .await
            .context("Shutdown")?;
        if self.vm.wait_exit(Duration::from_secs(20)).await.is_none() {
            self.vm.stop().await;
            bail!("QEMU did not exit after the agent's Shutdown");
        }
        self.vm.stop().await;
        let _ = std::fs::remove_dir_all(&self.config.state_dir);
        Ok(r)
    }
}

/// The host ends of a process's stdio streams.
pub struct Streams {
    pub stdin: Option<Conn>,
    pub stdout: Conn,
    pub stderr: Conn,
}

impl Streams {
    /// Reads stdout and stderr to their ends (bounded: 2 minutes).
    pub async fn read_output(&mut self) -> Result<(Vec<u8>, Vec<u8>)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let both = async {
            tokio::try_join!(self.stdout.read_to_end(&mut out), self.stderr.read_to_end(&mut err))?;
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(120), both)
            .await
            .context("stdio did not end within 120 s")??;
        Ok((out, err))
    }
}

/// Sends `data` on a stdin stream, then closes it (the process sees EOF).
pub async fn send_and_close(mut s: Conn, data: &[u8]) -> Result<()> {
    s.write_all(data).await?;
    s.shutdown().await?;
    Ok(())
}

/// Host processes whose command line mentions `needle` (for leak checks).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.chars().all(|c| c.is_ascii_digit())) else {
            continue;
        };
        if pid == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

/// What `/proc/<pid>/status` and `/proc/<pid>/ns/mnt` say of a host process's privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub pid: i32,
    /// `/proc/<pid>/comm`.
    pub name: String,
    /// Real, effective, saved and filesystem uids.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb (bit masks).
    pub caps: [u64; 5],
    pub no_new_privs: bool,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// The `mnt:[inode]` link.
    pub mount_ns: String,
}

impl Privileges {
    /// Reads them; `None` if the process is gone.
    pub fn of(pid: i32) -> Option<Privileges> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let ids = |k: &str| {
            field(k)
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<u32>>()
        };
        let cap = |k: &str| u64::from_str_radix(&field(k), 16).unwrap_or(u64::MAX);
        Some(Privileges {
            pid,
            name: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()?
                .trim()
                .to_string(),
            uids: ids("Uid"),
            gids: ids("Gid"),
            caps: [
                cap("CapInh"),
                cap("CapPrm"),
                cap("CapEff"),
                cap("CapBnd"),
                cap("CapAmb"),
            ],
            no_new_privs: field("NoNewPrivs") == "1",
            seccomp: field("Seccomp").parse().unwrap_or(99),
            mount_ns: std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .ok()?
                .to_string_lossy()
                .into_owned(),
        })
    }
}

/// Every descendant of `pid` (children, their children, ...), from `/proc/*/stat`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<i32>().ok())
        {
            parent_of.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}
