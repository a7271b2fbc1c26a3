//! A private containerd for end-to-end tests (tests/containerd/containerd.sh), the
//! busybox image, and `ctr` with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub const IMAGE: &str = "docker.io/vmbox/busybox:latest";
pub const RUNTIME: &str = "io.containerd.vmbox.v2";

pub struct Containerd {
    pub dir: PathBuf,
    pub address: String,
    /// The vmbox config the shims read (VMBOX_CONFIG in containerd's environment).
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    /// With containerd's CRI plugin (and in a network namespace of its own).
    pub cri: bool,
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shim binary under test: `VMBOX_SHIM_DIR` or the workspace's release build.
fn shim_dir() -> PathBuf {
    std::env::var_os("VMBOX_SHIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release"))
}

/// The vmbox config of the tests: the freshly built guest, a private state directory.
pub fn good_config(state_dir: &Path) -> String {
    let g = crate::guest_dir();
    format!(
        "state_dir = \"{}\"\nlog_level = \"{}\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n[timeouts]\nboot_ms = 60000\n",
        state_dir.display(),
        std::env::var("VMBOX_TEST_LOG").unwrap_or_else(|_| "info".into()),
        g.join("vmlinux").display(),
        g.join("initramfs.img").display()
    )
}

/// The shared private containerd of this test run (started once, image imported).
pub fn containerd() -> &'static Containerd {
    static C: OnceLock<Containerd> = OnceLock::new();
    C.get_or_init(|| {
        let dir = std::env::var_os("VMBOX_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/vmbox-e2e"));
        let c = Containerd::start_at(&dir, false);
        let tar = c.dir.join("busybox.tar");
        let out = Command::new(repo().join("tests/containerd/build-image.sh"))
            .arg(&tar)
            .arg(IMAGE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "image build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = c.ctr(&["image", "import", &tar.display().to_string()]);
        assert!(
            out.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    })
}

/// The programs a test run starts (see `reset`).
fn known_programs() -> [&'static str; 7] {
    [
        "containerd",
        "containerd-shim-vmbox-v2",
        "containerd-shim-runc-v2",
        "qemu-system-x86_64",
        "virtiofsd",
        "vhost-device-vsock",
        "runsc",
    ]
}

/// Removes whatever an earlier, interrupted run left in `dir`: its containerd, shims,
/// VMs, mounts and files.
fn reset(dir: &Path, cri: bool) {
    let _ = Command::new(repo().join("tests/containerd/containerd.sh"))
        .arg("stop")
        .env("VMBOX_CTR_CRI", if cri { "1" } else { "0" })
        .env("VMBOX_CTR_DIR", dir)
        .env("VMBOX_SHIM_DIR", shim_dir())
        // Its standby VMs, if an earlier run's config had a pool (none: nothing to stop).
        .env("VMBOX_CONFIG", dir.join("vmbox.toml"))
        .output();
    let needle = dir.display().to_string();
    // Only the programs such a run starts: never, say, the `make` whose command line
    // happens to name the directory.
    let ours = || -> Vec<i32> {
        crate::processes_mentioning(&needle)
            .iter()
            .filter_map(|p| {
                let (pid, cmd) = p.split_once(": ")?;
                let prog = cmd.split_whitespace().next()?.rsplit('/').next()?;
                let known = known_programs().contains(&prog);
                known.then(|| pid.parse().ok()).flatten()
            })
            .collect()
    };
    for pid in ours() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ours().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&needle))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Containerd {
    /// Starts a private containerd in `dir` (after removing what an earlier run left
    /// there), with the CRI plugin if `cri`.
    pub fn start_at(dir: &Path, cri: bool) -> Containerd {
        reset(dir, cri);
        let state_dir = dir.join("vmbox");
        std::fs::create_dir_all(dir).expect("create the test containerd directory");
        let config_path = dir.join("vmbox.toml");
        std::fs::write(&config_path, good_config(&state_dir)).expect("write the test vmbox config");
        let shim = shim_dir().join("containerd-shim-vmbox-v2");
        assert!(
            shim.exists(),
            "{} missing: cargo build --release -p containerd-shim-vmbox-v2",
            shim.display()
        );
        let c = Containerd {
            address: dir.join("containerd.sock").display().to_string(),
            dir: dir.to_path_buf(),
            config_path,
            state_dir,
            cri,
        };
        c.control("start");
        c
    }

    fn control(&self, action: &str) {
        self.control_with(action, &[])
    }

    fn control_with(&self, action: &str, env: &[(&str, &str)]) {
        let out = Command::new(repo().join("tests/containerd/containerd.sh"))
            .arg(action)
            .envs(env.iter().copied())
            .env("VMBOX_CTR_CRI", if self.cri { "1" } else { "0" })
            .env("VMBOX_CTR_DIR", &self.dir)
            .env("VMBOX_SHIM_DIR", shim_dir())
            .env("VMBOX_CONFIG", &self.config_path)
            .output()
            .expect("run containerd.sh");
        assert!(
            out.status.success(),
            "containerd {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops containerd (its shims keep running) and the warm pool's standby VMs.
    pub fn stop(&self) {
        self.control("stop");
    }

    /// Stops containerd (its shims keep running) and starts it again.
    pub fn restart(&self) {
        self.control_with("stop", &[("VMBOX_CTR_KEEP_NETNS", "1")]);
        self.control("start");
    }

    /// `ctr ARGS` against this containerd, killed after 3 minutes.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_stdin(args, Stdio::null())
    }

    pub fn ctr_with_stdin(&self, args: &[&str], stdin: Stdio) -> Output {
        Command::new("timeout")
            .args(["180", "ctr", "--address", &self.address])
            .args(args)
            .stdin(stdin)
            .output()
            .expect("run ctr")
    }

    /// Runs `ctr` under `script` so it has a terminal of `rows` x `cols`; `input` is typed in.
    pub fn ctr_tty(&self, args: &[&str], rows: u32, cols: u32) -> Output {
        let cmd = format!(
            "stty rows {rows} cols {cols}; ctr --address {} {}",
            self.address,
            args.join(" ")
        );
        Command::new("timeout")
            .args(["180", "script", "-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("run script")
    }

    /// Leaks of sandbox `id`: live processes, mounts or files that mention its directory.
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        self.leftovers_of(&vmbox_config::SandboxPaths::new(&self.state_dir, "default", id), id)
    }

    /// Leaks of the sandbox at `paths` (any namespace or state_dir) whose shim serves `id`.
    pub fn leftovers_of(&self, paths: &vmbox_config::SandboxPaths, id: &str) -> Vec<String> {
        let mut left = Vec::new();
        for dir in [&paths.dir, &paths.run_dir] {
            let needle = dir.display().to_string();
            left.extend(crate::processes_mentioning(&needle));
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            left.extend(
                mounts
                    .lines()
                    .filter(|l| l.contains(&needle))
                    .map(|l| format!("mount: {l}")),
            );
            if dir.exists() {
                left.push(format!("directory {needle}"));
            }
        }
        let shim = format!("-id {id} -address {}", self.address);
        left.extend(crate::processes_mentioning(&shim));
        left
    }

    /// Waits (bounded) until sandbox `id` left nothing behind; returns what is left.
    pub fn wait_clean(&self, id: &str) -> Vec<String> {
        self.wait_clean_of(&vmbox_config::SandboxPaths::new(&self.state_dir, "default", id), id)
    }

    /// [`Containerd::wait_clean`] for the sandbox at `paths`.
    pub fn wait_clean_of(&self, paths: &vmbox_config::SandboxPaths, id: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.leftovers_of(paths, id);
            if left.is_empty() || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace('\r', "")
}

/// Asserts that `out` succeeded and returns its stdout.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Polls `done` until it holds; fails naming `what` after `within`. Returns the time taken.
pub fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

impl Containerd {
    /// `ctr run -d` with vmbox and `extra` flags.
    pub fn run_detached(&self, id: &str, extra: &[&str], cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        ok(&self.ctr(&args), &format!("ctr run -d {id}"));
    }

    /// `ctr ARGS` with its output discarded; whether it succeeded.
    pub fn quiet(&self, args: &[&str]) -> bool {
        Command::new("timeout")
            .args(["300", "ctr", "--address", &self.address])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The pid of the first host process whose command line contains `needle`.
    pub fn pid_of(&self, needle: &str) -> Option<i32> {
        crate::processes_mentioning(needle)
            .first()
            .and_then(|p| p.split(':').next())
            .and_then(|p| p.parse().ok())
    }

    /// The shim serving container `id` of this containerd.
    pub fn shim_pid(&self, id: &str) -> i32 {
        self.pid_of(&format!("-id {id} -address {}", self.address))
            .expect("shim process")
    }

    /// The ttrpc socket of the shim serving container `id`, while that shim runs.
    pub fn shim_socket(&self, id: &str) -> Option<String> {
        let shim = crate::processes_mentioning(&format!("-id {id} -address {}", self.address));
        let cmd = shim.first()?;
        let at = cmd.find("-socket unix://")? + "-socket unix://".len();
        cmd[at..].split_whitespace().next().map(str::to_string)
    }

    /// Kills, deletes and removes container `id`, then asserts nothing of it is left
    /// (processes, mounts, state, and the shim's socket once the shim is gone).
    pub fn remove(&self, id: &str) {
        let paths = vmbox_config::SandboxPaths::new(&self.state_dir, "default", id);
        self.remove_in("default", id, &paths)
    }

    /// [`Containerd::remove`] in namespace `ns`, for the sandbox at `paths`.
    pub fn remove_in(&self, ns: &str, id: &str, paths: &vmbox_config::SandboxPaths) {
        let socket = self.shim_socket(id);
        let _ = self.ctr(&["-n", ns, "task", "kill", "-s", "KILL", id]);
        wait_for(&format!("task delete {id}"), Duration::from_secs(30), || {
            let out = self.ctr(&["-n", ns, "task", "delete", id]);
            out.status.success() || text(&out.stderr).contains("not found")
        });
        ok(
            &self.ctr(&["-n", ns, "container", "rm", id]),
            &format!("container rm {id}"),
        );
        let left = self.wait_clean_of(paths, id);
        assert!(left.is_empty(), "{id} left: {left:#?}");
        if let Some(socket) = socket {
            if crate::processes_mentioning(&socket).is_empty() {
                assert!(!Path::new(&socket).exists(), "shim socket {socket} left behind");
            }
        }
    }

    /// Runs `sh -c 'stty size; tty'` as exec `exec_id` of `id` (in namespace `ns`) with a
    /// 21x77 terminal and asserts the process saw that terminal.
    pub fn assert_exec_t_sees_its_terminal(&self, ns: &str, id: &str, exec_id: &str) {
        let args = [
            "-n",
            ns,
            "task",
            "exec",
            "-t",
            "--exec-id",
            exec_id,
            id,
            "sh",
            "-c",
            "'stty size; tty'",
        ];
        let tty = self.ctr_tty(&args, 21, 77);
        let screen = text(&tty.stdout);
        assert!(
            screen.contains("21 77") && screen.contains("/dev/pts/"),
            "exec -t output: {screen:?}; stderr: {}",
            text(&tty.stderr)
        );
    }
}
