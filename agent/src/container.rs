//! Containers and their processes inside the guest: the state the agent keeps, and the
//! operations the service maps its requests onto.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use vmbox_protocol::agent::{PodShare, Stdio};

use crate::cgroup;
use crate::engine::{Engine, Request};
use crate::fdio::{pump, FdIo};
use crate::oom::OomEvents;
use crate::reaper::{Exit, Mark, Reaper};
use crate::streams::Streams;
use crate::AgentError;

/// Where the host's shared directory (virtio-fs) is mounted in the guest.
pub const SHARED_MOUNT: &str = vmbox_protocol::GUEST_SHARED_MOUNT;
const BUNDLES: &str = "/run/vmbox/bundles";
const CONSOLES: &str = "/run/vmbox/console";
/// Numbers console sockets (see `prepare_stdio`).
static CONSOLE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
/// How long a request waits for the stdio streams it names.
const STREAM_WAIT: Duration = Duration::from_secs(10);

pub struct Process {
    pub pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    pty_master: Option<Arc<OwnedFd>>,
    io: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts following process `pid` of container `id`, created by a request that began
    /// at `since`. Its exit is published only after the container's OOM kill count was
    /// checked, so an OOM kill is queued before the exit it caused.
    fn new(pid: i32, since: Mark, c: &Containers, id: &str, stdio: PreparedStdio) -> Process {
        let (tx, rx) = watch::channel(None);
        let exited = c.reaper.watch(pid, since);
        let (oom, id) = (c.oom.clone(), id.to_string());
        tokio::spawn(async move {
            if let Ok(exit) = exited.await {
                oom.check(&id);
                let _ = tx.send(Some(exit));
            }
        });
        Process {
            pid,
            exit: rx,
            pty_master: stdio.pty_master,
            io: stdio.io,
        }
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        for t in &self.io {
            t.abort();
        }
    }
}

pub struct Container {
    pub id: String,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<&Process, AgentError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| AgentError::NotFound(format!("exec {exec_id} of container {}", self.id)))
    }
}

/// Every container of the guest.
#[derive(Clone)]
pub struct Containers {
    pub map: Arc<Mutex<HashMap<String, Container>>>,
    pub reaper: Reaper,
    pub oom: OomEvents,
    engine: Engine,
    streams: Streams,
    /// Serialises "is the pod's /dev/shm mounted yet, else mount it".
    pod_shm: Arc<Mutex<()>>,
}

struct PreparedStdio {
    /// What the helper passes to libcontainer (stdin, stdout, stderr); empty for a tty.
    child_fds: Vec<OwnedFd>,
    console_socket: Option<PathBuf>,
    console: Option<JoinHandle<Result<OwnedFd, AgentError>>>,
    pty_master: Option<Arc<OwnedFd>>,
    io: Vec<JoinHandle<()>>,
    /// Streams held until the pty master arrives.
    tty_streams: [Option<tokio_vsock::VsockStream>; 2],
}

impl Containers {
    /// `zygote` forks the container-setup helpers (engine.rs); `None`: they are executed.
    pub fn new(reaper: Reaper, streams: Streams, zygote: Option<Arc<crate::zygote::Zygote>>) -> Containers {
        Containers {
            map: Arc::default(),
            engine: Engine::new(reaper.clone(), zygote),
            reaper,
            oom: OomEvents::default(),
            streams,
            pod_shm: Arc::default(),
        }
    }

    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        stdio: &Stdio,
        pod: Option<&PodShare>,
    ) -> Result<i32, AgentError> {
        check_id("container_id", id)?;
        if self.map.lock().await.contains_key(id) {
            return Err(AgentError::AlreadyExists(format!("container {id} already exists")));
        }
        let rootfs = shared_path(rootfs)?;
        if !rootfs.is_dir() {
            return Err(AgentError::Invalid(format!(
                "rootfs {} is not a directory in the guest",
                rootfs.display()
            )));
        }
        let mut spec: oci_spec::runtime::Spec =
            serde_json::from_slice(spec_json).map_err(|e| AgentError::Invalid(format!("oci_spec: {e}")))?;
        prepare_spec(&mut spec, id, &rootfs, stdio.terminal)?;
        if let Some(pod) = pod {
            self.join_pod(&mut spec, id, pod).await?;
        }
        if let Some(p) = spec.process() {
            check_env(p.env().as_deref().unwrap_or_default())?;
            let (cwd, mounts, root) = (
                p.cwd().clone(),
                spec.mounts().clone().unwrap_or_default(),
                rootfs.clone(),
            );
            off_runtime("create the working directory", move || create_cwd(&root, &cwd, &mounts)).await?;
        }
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle).map_err(|e| AgentError::io(&bundle, e))?;
        let config = bundle.join("config.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&spec).map_err(|e| AgentError::Internal(e.to_string()))?,
        )
        .map_err(|e| AgentError::io(&config, e))?;

        let mut prepared = self.prepare_stdio(stdio, id, "init").await?;
        let req = Request::Create {
            id: id.to_string(),
            bundle: bundle.clone(),
            console_socket: prepared.console_socket.clone(),
            stdio: [!prepared.child_fds.is_empty(); 3],
        };
        let fds = std::mem::take(&mut prepared.child_fds);
        let since = self.reaper.mark();
        let pid = match self.engine.run(req, fds).await {
            Ok(Some(pid)) => pid,
            Ok(None) => return Err(AgentError::Internal("libcontainer reported no pid".into())),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e.into());
            }
        };
        let prepared = finish_tty(prepared, &format!("{id} init")).await?;
        self.oom.track(id);
        let init = Process::new(pid, since, self, id, prepared);
        log::info!("container {id} created, init pid {pid}");
        self.map.lock().await.insert(
            id.to_string(),
            Container {
                id: id.to_string(),
                init,
                execs: HashMap::new(),
            },
        );
        Ok(pid)
    }

    /// Points the spec's IPC/UTS/PID entries that `pod` lists at the sandbox container's
    /// namespaces, and makes the pod's /dev/shm tmpfs if it does not exist yet.
    async fn join_pod(&self, spec: &mut oci_spec::runtime::Spec, id: &str, pod: &PodShare) -> Result<(), AgentError> {
        use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType as T};
        check_id("pod.sandbox_id", &pod.sandbox_id)?;
        if pod.shm_bytes > 0 {
            let dir = pod_shm(&pod.sandbox_id);
            let size = pod.shm_bytes;
            let _one = self.pod_shm.lock().await;
            off_runtime("mount the pod's /dev/shm", move || mount_pod_shm(&dir, size)).await?;
        }
        if pod.namespaces.is_empty() {
            return Ok(());
        }
        if pod.sandbox_id == id {
            return Err(AgentError::Invalid(format!(
                "pod.namespaces: sandbox container {id} cannot join its own namespaces"
            )));
        }
        let sandbox = &pod.sandbox_id;
        let pid = self
            .with(sandbox, |c| match c.init.exited() {
                None => Ok(c.init.pid),
                Some(_) => Err(AgentError::FailedPrecondition(format!(
                    "the pod's sandbox container {sandbox} has exited: its namespaces are gone"
                ))),
            })
            .await
            .map_err(|e| match e {
                AgentError::NotFound(_) => AgentError::FailedPrecondition(format!(
                    "the pod's sandbox container {sandbox} does not exist in this VM"
                )),
                e => e,
            })?;
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        for name in &pod.namespaces {
            let typ = match name.as_str() {
                "ipc" => T::Ipc,
                "uts" => T::Uts,
                "pid" => T::Pid,
                other => {
                    return Err(AgentError::Invalid(format!(
                        "pod.namespaces: {other:?} is not one of ipc, uts, pid"
                    )))
                }
            };
            let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
            match ns.iter_mut().find(|n| n.typ() == typ) {
                Some(n) => {
                    n.set_path(Some(path));
                }
                None => ns.push(
                    LinuxNamespaceBuilder::default()
                        .typ(typ)
                        .path(path)
                        .build()
                        .map_err(|e| AgentError::Internal(e.to_string()))?,
                ),
            }
        }
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        log::info!(
            "container {id} joins {:?} of sandbox {sandbox} (pid {pid})",
            pod.namespaces
        );
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<i32, AgentError> {
        let pid = self.with(id, |c| Ok(c.init.pid)).await?;
        self.engine.run(Request::Start { id: id.to_string() }, vec![]).await?;
        Ok(pid)
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdio: &Stdio) -> Result<i32, AgentError> {
        check_id("exec_id", exec_id)?;
        self.with(id, |c| match c.execs.get(exec_id).map(|p| p.exited().is_some()) {
            Some(false) => Err(AgentError::AlreadyExists(format!(
                "exec {exec_id} already exists in {id}"
            ))),
            _ => Ok(()),
        })
        .await?;
        let mut process: oci_spec::runtime::Process =
            serde_json::from_slice(process_json).map_err(|e| AgentError::Invalid(format!("process: {e}")))?;
        process.set_terminal(Some(stdio.terminal));
        // runc does not create an exec's working directory, and libcontainer's error for a
        // missing one names neither the path nor the errno: check it here, inside the
        // container's root as its init sees it (its mounts included).
        let (init_pid, init_exited) = self.with(id, |c| Ok((c.init.pid, c.init.exited().is_some()))).await?;
        if init_exited {
            return Err(AgentError::FailedPrecondition(format!(
                "cannot exec in container {id}: it has stopped"
            )));
        }
        check_env(process.env().as_deref().unwrap_or_default())?;
        let (cwd, what) = (process.cwd().clone(), format!("exec {exec_id}"));
        off_runtime("check the working directory", move || {
            check_exec_cwd(init_pid, &cwd).map_err(|(m, e)| path_error(format!("{what}: {m}"), e))
        })
        .await?;
        let file = Path::new(BUNDLES).join(id).join(format!("exec-{exec_id}.json"));
        std::fs::write(
            &file,
            serde_json::to_vec(&process).map_err(|e| AgentError::Internal(e.to_string()))?,
        )
        .map_err(|e| AgentError::io(&file, e))?;
        let mut prepared = self.prepare_stdio(stdio, id, exec_id).await?;
        let req = Request::Exec {
            id: id.to_string(),
            process: file.clone(),
            console_socket: prepared.console_socket.clone(),
            stdio: [!prepared.child_fds.is_empty(); 3],
        };
        let fds = std::mem::take(&mut prepared.child_fds);
        let since = self.reaper.mark();
        let result = self.engine.run(req, fds).await;
        let _ = std::fs::remove_file(&file);
        let pid = result?.ok_or_else(|| AgentError::Internal("libcontainer reported no pid".into()))?;
        let prepared = finish_tty(prepared, &format!("{id} exec {exec_id}")).await?;
        let proc = Process::new(pid, since, self, id, prepared);
        let mut map = self.map.lock().await;
        let c = map
            .get_mut(id)
            .ok_or_else(|| AgentError::NotFound(format!("container {id}")))?;
        c.execs.insert(exec_id.to_string(), proc);
        Ok(pid)
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let sig = Signal::try_from(signal as i32).map_err(|_| AgentError::Invalid(format!("signal {signal}")))?;
        if all {
            // Every process in the container's cgroup. With none left (the container has
            // stopped and its cgroup may be gone), answer as runc does for a stopped
            // container: "process already finished", which containerd takes as done.
            let init_exited = self.with(id, |c| Ok(c.init.exited().is_some())).await?;
            let pids = cgroup::pids(id)?;
            if pids.is_empty() && init_exited {
                return Err(AgentError::NotFound(format!(
                    "container {id}: process already finished"
                )));
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        let (pid, exited) = self
            .with(id, |c| c.process(exec_id).map(|p| (p.pid, p.exited().is_some())))
            .await?;
        if exited {
            return Err(AgentError::NotFound(format!("process {pid} has already exited")));
        }
        kill(Pid::from_raw(pid), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => AgentError::NotFound(format!("process {pid} already finished")),
            e => AgentError::Internal(format!("kill {pid}: {e}")),
        })
    }

    /// Waits for the exit. An exec is forgotten once its exit was handed out (the host
    /// waits once per exec), so thousands of execs do not pile up, and its id can be reused.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, AgentError> {
        let mut rx = self.with(id, |c| c.process(exec_id).map(|p| p.exit.clone())).await?;
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| AgentError::NotFound("exit status lost".into()))?
            .unwrap_or(Exit {
                status: 255,
                signal: 0,
                at_ns: 0,
            });
        if !exec_id.is_empty() {
            if let Some(c) = self.map.lock().await.get_mut(id) {
                c.execs.remove(exec_id);
            }
        }
        Ok(exit)
    }

    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), AgentError> {
        let master = self
            .with(id, |c| c.process(exec_id).map(|p| p.pty_master.clone()))
            .await?;
        // As runc's shim: resizing a process without a terminal does nothing.
        let Some(master) = master else { return Ok(()) };
        let ws = libc::winsize {
            ws_row: rows as u16,
            ws_col: cols as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on a pty master fd we own.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(AgentError::Internal(format!(
                "TIOCSWINSZ: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), AgentError> {
        self.with(id, |_| Ok(())).await?;
        let req = if pause {
            Request::Pause { id: id.into() }
        } else {
            Request::Resume { id: id.into() }
        };
        self.engine.run(req, vec![]).await?;
        Ok(())
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let running = self.with(id, |c| Ok(c.init.exited().is_none())).await?;
        if running && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is still running"
            )));
        }
        self.oom.check(id);
        // A stopped container is always removed: if libcontainer cannot delete it (its
        // cgroup or state already gone), what is left of it is cleaned up here.
        if let Err(e) = self.engine.run(Request::Delete { id: id.into(), force }, vec![]).await {
            log::warn!("container {id}: libcontainer delete: {e}; cleaning up its state directly");
            for pid in cgroup::pids(id).unwrap_or_default() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let state = Path::new(crate::engine::STATE_ROOT).join(id);
            if let Err(e) = std::fs::remove_dir_all(&state) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("container {id}: remove {}: {e}", state.display());
                }
            }
            // The cgroup can be removed once the kernel has let the killed processes go.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !cgroup::pids(id).unwrap_or_default().is_empty() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Err(e) = cgroup::remove(id) {
                log::warn!("container {id}: {e}");
            }
        }
        self.map.lock().await.remove(id);
        self.oom.forget(id);
        // A pod's sandbox container goes last (CRI removes it after the others): its
        // /dev/shm goes with it.
        let shm = pod_shm(id);
        if shm.exists() {
            if let Err(e) = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH) {
                log::warn!("container {id}: unmount {}: {e}", shm.display());
            }
            let _ = std::fs::remove_dir(&shm);
        }
        let bundle = Path::new(BUNDLES).join(id);
        let _ = std::fs::remove_dir_all(&bundle);
        log::info!("container {id} removed");
        Ok(())
    }

    /// Runs `f` on container `id` under the lock.
    pub async fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Container) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let map = self.map.lock().await;
        let c = map
            .get(id)
            .ok_or_else(|| AgentError::NotFound(format!("container {id}")))?;
        f(c)
    }

    async fn prepare_stdio(&self, stdio: &Stdio, id: &str, proc_name: &str) -> Result<PreparedStdio, AgentError> {
        let mut streams = [None, None, None];
        for (i, sid) in [stdio.stdin, stdio.stdout, stdio.stderr].into_iter().enumerate() {
            if sid != 0 {
                let s = self.streams.take(sid, STREAM_WAIT).await.ok_or_else(|| {
                    AgentError::Internal(format!("stdio stream {sid} did not arrive within {STREAM_WAIT:?}"))
                })?;
                streams[i] = Some(s);
            }
        }
        let [sin, sout, serr] = streams;
        let what = |s: &str| format!("{id} {proc_name} {s}");
        if stdio.terminal {
            std::fs::create_dir_all(CONSOLES).map_err(|e| AgentError::io(Path::new(CONSOLES), e))?;
            // Named by a counter, not by the ids: two 64-hex ids (Kubernetes) would pass
            // sun_path's 107 bytes.
            let n = CONSOLE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = Path::new(CONSOLES).join(format!("c{n}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).map_err(|e| AgentError::io(&path, e))?;
            let p = path.clone();
            let console = tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(30), receive_pty_master(&listener)).await;
                let _ = std::fs::remove_file(&p);
                r.map_err(|_| AgentError::Internal("no pty master from the container".into()))?
            });
            return Ok(PreparedStdio {
                child_fds: vec![],
                console_socket: Some(path),
                console: Some(console),
                pty_master: None,
                io: vec![],
                tty_streams: [sin, sout],
            });
        }
        let null = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| AgentError::io(Path::new("/dev/null"), e))
        };
        let mut child_fds = Vec::new();
        let mut io = Vec::new();
        match sin {
            Some(s) => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(AgentError::sys("pipe"))?;
                child_fds.push(r);
                io.push(tokio::spawn(pump(
                    what("stdin"),
                    s,
                    FdIo::new(w).map_err(AgentError::sys_io("stdin"))?,
                )));
            }
            None => child_fds.push(null()?),
        }
        for (s, name) in [(sout, "stdout"), (serr, "stderr")] {
            match s {
                Some(s) => {
                    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(AgentError::sys("pipe"))?;
                    child_fds.push(w);
                    io.push(tokio::spawn(pump(
                        what(name),
                        FdIo::new(r).map_err(AgentError::sys_io(name))?,
                        s,
                    )));
                }
                None => child_fds.push(null()?),
            }
        }
        Ok(PreparedStdio {
            child_fds,
            console_socket: None,
            console: None,
            pty_master: None,
            io,
            tty_streams: [None, None],
        })
    }
}

/// For a tty process, waits for libcontainer to hand over the pty master and starts the
/// copy loops between it and the streams.
async fn finish_tty(mut p: PreparedStdio, what: &str) -> Result<PreparedStdio, AgentError> {
    let Some(console) = p.console.take() else { return Ok(p) };
    let master = console
        .await
        .map_err(|e| AgentError::Internal(format!("console: {e}")))??;
    let master = Arc::new(master);
    let [sin, sout] = std::mem::take(&mut p.tty_streams);
    let dup = |m: &OwnedFd| m.try_clone().map_err(AgentError::sys_io("dup pty master"));
    if let Some(s) = sin {
        p.io.push(tokio::spawn(pump(
            format!("{what} tty in"),
            s,
            FdIo::new(dup(&master)?).map_err(AgentError::sys_io("pty"))?,
        )));
    }
    if let Some(s) = sout {
        p.io.push(tokio::spawn(pump(
            format!("{what} tty out"),
            FdIo::new(dup(&master)?).map_err(AgentError::sys_io("pty"))?,
            s,
        )));
    }
    p.pty_master = Some(master);
    Ok(p)
}

async fn receive_pty_master(listener: &tokio::net::UnixListener) -> Result<OwnedFd, AgentError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let (conn, _) = listener.accept().await.map_err(AgentError::sys_io("console accept"))?;
    loop {
        conn.readable().await.map_err(AgentError::sys_io("console"))?;
        let r = conn.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; 4096];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    if let Some(fd) = fds.first() {
                        // SAFETY: a descriptor just received over SCM_RIGHTS; we own it.
                        return Ok(Some(unsafe { OwnedFd::from_raw_fd(*fd) }));
                    }
                }
            }
            Ok(None)
        });
        match r {
            Ok(Some(fd)) => return Ok(fd),
            Ok(None) => return Err(AgentError::Internal("console socket closed without a pty".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(AgentError::sys_io("console recvmsg")(e)),
        }
    }
}

/// Ids become path components: the protocol's one rule ([`vmbox_protocol::id`]).
pub fn check_id(field: &'static str, id: &str) -> Result<(), AgentError> {
    vmbox_protocol::Id::parse(field, id)
        .map(|_| ())
        .map_err(|e| AgentError::Invalid(e.to_string()))
}

/// The guest directory of pod `sandbox_id`'s /dev/shm (an id checked by the caller).
fn pod_shm(sandbox_id: &str) -> PathBuf {
    Path::new(vmbox_protocol::POD_SHM_DIR).join(sandbox_id)
}

/// Mounts a tmpfs of `bytes` at `dir` (mode 1777, as /dev/shm) unless one is there.
fn mount_pod_shm(dir: &Path, bytes: u64) -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).map_err(|e| AgentError::io(p, e));
    if dev(dir)? != dev(parent)? {
        return Ok(());
    }
    let data = format!("size={bytes},mode=1777");
    mount(
        Some("shm"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|e| AgentError::io(dir, std::io::Error::from(e)))
}

/// Resolves a path relative to the shared mount, refusing anything that could leave it.
pub fn shared_path(rel: &str) -> Result<PathBuf, AgentError> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(AgentError::Invalid(format!(
            "rootfs {rel:?}: expected a relative path without '..'"
        )));
    }
    Ok(Path::new(SHARED_MOUNT).join(p))
}

/// Makes the host's spec runnable here: rootfs in the share, vmbox's cgroup, no paths
/// into the host's namespaces.
fn prepare_spec(spec: &mut oci_spec::runtime::Spec, id: &str, rootfs: &Path, terminal: bool) -> Result<(), AgentError> {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(terminal));
    } else {
        return Err(AgentError::Invalid("oci_spec: no process".into()));
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(cgroup::path(id)));
    if let Some(ns) = linux.namespaces_mut() {
        for n in ns.iter_mut() {
            n.set_path(None);
        }
    }
    spec.set_linux(Some(linux));
    Ok(())
}

/// Creates a container's working directory `cwd` where the container will see it.
fn create_cwd(rootfs: &Path, cwd: &Path, mounts: &[oci_spec::runtime::Mount]) -> Result<(), AgentError> {
    match cwd_base(cwd, mounts) {
        CwdBase::Rootfs => ensure_cwd(rootfs, cwd, cwd),
        // Below a bind mount (a Kubernetes workingDir in a volume): in its source, which
        // is what the container sees there (runc creates it after mounting).
        CwdBase::Bind { source, rest } => ensure_cwd(&source, &rest, cwd),
        // Below a filesystem made at mount time (tmpfs): nothing to create it in
        // beforehand; libcontainer's chdir fails with an error naming it.
        CwdBase::Fresh => Ok(()),
    }
}

/// How long a filesystem walk on the request path may take: a FUSE or virtio-fs server
/// that stops answering must not hold one of the agent's two runtime threads.
const FS_DEADLINE: Duration = Duration::from_secs(10);

/// Runs blocking filesystem work `f` on the blocking pool, bounded by [`FS_DEADLINE`].
async fn off_runtime<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    match tokio::time::timeout(FS_DEADLINE, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(AgentError::Internal(format!("{what}: {e}"))),
        Err(_) => Err(AgentError::Internal(format!(
            "{what}: no answer within {FS_DEADLINE:?}"
        ))),
    }
}

/// Refuses `process.env` entries runc refuses (no `=`, an empty name, a NUL byte), naming
/// the variable but never its value.
fn check_env(env: &[String]) -> Result<(), AgentError> {
    for (i, e) in env.iter().enumerate() {
        let name = e.split('=').next().unwrap_or_default();
        if !e.contains('=') || name.is_empty() || e.contains('\0') {
            return Err(AgentError::Invalid(format!(
                "process.env[{i}] ({:?}): expected NAME=VALUE without NUL bytes",
                name.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Whether an errno from walking a spec's path is the spec's fault (InvalidArgument) or
/// the system's (Internal).
fn path_error(msg: String, e: nix::errno::Errno) -> AgentError {
    use nix::errno::Errno::*;
    match e {
        ENOENT | ENOTDIR | ELOOP | EXDEV | ENAMETOOLONG | EEXIST => AgentError::Invalid(msg),
        _ => AgentError::Internal(msg),
    }
}

/// Where a container's working directory lives.
#[derive(Debug, PartialEq, Eq)]
enum CwdBase {
    /// In the rootfs.
    Rootfs,
    /// Below a bind mount: `rest` inside the bind's guest `source`.
    Bind { source: PathBuf, rest: PathBuf },
    /// Below a mount the kernel makes at mount time (tmpfs and the like).
    Fresh,
}

/// The innermost mount of the spec that `cwd` is at or below (component-wise), as the
/// place to create it in.
fn cwd_base(cwd: &Path, mounts: &[oci_spec::runtime::Mount]) -> CwdBase {
    // Matching is by name: a `..` could point out of the mount it seems to be in.
    if cwd.components().any(|c| c == Component::ParentDir) {
        return CwdBase::Rootfs;
    }
    let inner = mounts
        .iter()
        .filter(|m| cwd.starts_with(m.destination()))
        .max_by_key(|m| m.destination().components().count());
    let Some(m) = inner else { return CwdBase::Rootfs };
    let bind = m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
    match (bind, m.source()) {
        // Only binds of the sandbox's share: the host put them there for this container.
        (true, Some(source)) if source.starts_with(SHARED_MOUNT) && source.is_dir() => CwdBase::Bind {
            source: source.clone(),
            rest: cwd.strip_prefix(m.destination()).unwrap_or(Path::new("")).to_path_buf(),
        },
        (true, _) => CwdBase::Rootfs,
        (false, _) => CwdBase::Fresh,
    }
}

/// Creates the working directory `rel` (named `cwd` in errors) below `base` when it is
/// missing, as runc does before the container starts (owned by root, mode 0755, whatever
/// the process's user); libcontainer would fail on it. Every component is resolved inside
/// `base` (openat2 RESOLVE_IN_ROOT), so a symlink in the image cannot lead the agent out.
pub fn ensure_cwd(base: &Path, rel: &Path, cwd: &Path) -> Result<(), AgentError> {
    let root = std::fs::File::open(base).map_err(|e| AgentError::io(base, e))?;
    let open_in_root = |rel: &Path| dir_in_root(&root, rel);
    let fail = |what: &str, e: nix::errno::Errno| {
        path_error(
            format!("process.cwd {}: {what}: {}", cwd.display(), std::io::Error::from(e)),
            e,
        )
    };
    let mut so_far = PathBuf::new();
    for comp in rel.components() {
        let name = match comp {
            Component::Normal(n) => n,
            Component::ParentDir => {
                so_far.push("..");
                continue;
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
        };
        let next = so_far.join(name);
        match open_in_root(&next) {
            Ok(_) => {}
            Err(nix::errno::Errno::ENOENT) => {
                let parent = open_in_root(&so_far).map_err(|e| fail(&format!("open {}", so_far.display()), e))?;
                match crate::engine::retry_eintr(|| {
                    nix::sys::stat::mkdirat(
                        Some(parent.as_raw_fd()),
                        name,
                        nix::sys::stat::Mode::from_bits_truncate(0o755),
                    )
                }) {
                    Ok(()) => {}
                    // Created meanwhile, or a dangling symlink: whichever, it must open now.
                    Err(nix::errno::Errno::EEXIST) => {
                        open_in_root(&next).map_err(|e| fail(&format!("open {}", next.display()), e))?;
                    }
                    Err(e) => return Err(fail(&format!("create {}", next.display()), e)),
                }
            }
            Err(e) => return Err(fail(&format!("open {}", next.display()), e)),
        }
        so_far = next;
    }
    Ok(())
}

/// Whether `cwd` is a directory inside the root of process `pid` (`/proc/<pid>/root`,
/// the container's root with its mounts), resolved without leaving it.
fn check_exec_cwd(pid: i32, cwd: &Path) -> Result<(), (String, nix::errno::Errno)> {
    let Ok(root) = std::fs::File::open(format!("/proc/{pid}/root")) else {
        // The init is gone: the exec fails in libcontainer with its own error.
        return Ok(());
    };
    match dir_in_root(&root, cwd) {
        Ok(_) => Ok(()),
        Err(e) => Err((format!("process.cwd {}: {}", cwd.display(), std::io::Error::from(e)), e)),
    }
}

/// Opens directory `path` (absolute or relative) as an O_PATH descriptor, resolving every
/// component, symlinks and `..` included, inside `root` (openat2 RESOLVE_IN_ROOT).
fn dir_in_root(root: &std::fs::File, path: &Path) -> nix::Result<OwnedFd> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::FromRawFd;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    crate::engine::retry_eintr(|| openat2(root.as_raw_fd(), rel, how)).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cwd_is_created_inside_the_rootfs() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("vmbox-cwd-{}", std::process::id()));
        let outside = std::env::temp_dir().join(format!("vmbox-cwd-out-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        ensure_cwd(&root, Path::new("/a/b/c"), Path::new("/a/b/c")).unwrap();
        let m = std::fs::metadata(root.join("a/b/c")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o755);
        ensure_cwd(&root, Path::new("/a/b/c"), Path::new("/a/b/c")).unwrap();
        // An absolute symlink in the image resolves inside the rootfs, not on the agent's
        // root: one pointing at a directory outside is dangling in there (an error).
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        assert!(ensure_cwd(&root, Path::new("/link/x"), Path::new("/link/x")).is_err());
        assert!(!outside.join("x").exists(), "created outside the rootfs");
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("link2")).unwrap();
        ensure_cwd(&root, Path::new("/link2/y"), Path::new("/link2/y")).unwrap();
        assert!(root.join("real/y").is_dir());
        // A file in the way is an error naming the cwd.
        std::fs::write(root.join("file"), b"").unwrap();
        let e = ensure_cwd(&root, Path::new("/file/x"), Path::new("/file/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/file/x"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn a_cwd_in_a_volume_is_created_in_the_volume() {
        let m = |dst: &str, typ: &str, src: &str| {
            oci_spec::runtime::MountBuilder::default()
                .destination(dst)
                .typ(typ)
                .source(src)
                .build()
                .unwrap()
        };
        let mounts = vec![m("/data", "tmpfs", "tmpfs"), m("/d", "proc", "proc")];
        assert_eq!(cwd_base(Path::new("/work/x"), &mounts), CwdBase::Rootfs);
        assert_eq!(cwd_base(Path::new("/data/../etc"), &mounts), CwdBase::Rootfs, "`..`");
        assert_eq!(cwd_base(Path::new("/data/x"), &mounts), CwdBase::Fresh);
        assert_eq!(
            cwd_base(Path::new("/dat/x"), &mounts),
            CwdBase::Rootfs,
            "component-wise"
        );
        // A bind whose source is outside the share (not made by the host for us).
        let mounts = vec![m("/data", "bind", "/etc")];
        assert_eq!(cwd_base(Path::new("/data/x"), &mounts), CwdBase::Rootfs);
    }

    #[test]
    fn env_entries_runc_refuses_are_refused_by_name() {
        assert!(check_env(&["A=1".into(), "B=".into(), "C=x=y".into()]).is_ok());
        for bad in ["NOEQUALS", "=value", "A=x\0y"] {
            let e = check_env(&["OK=1".into(), bad.into()]).unwrap_err().to_string();
            assert!(e.contains("process.env[1]"), "{e}");
            assert!(!e.contains("value") && !e.contains("x\0y"), "the value leaked: {e}");
        }
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("id", "abc-1.2_3").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_paths_stay_inside_the_share() {
        assert_eq!(
            shared_path("c1/rootfs").unwrap(),
            Path::new("/run/vmbox/shared/c1/rootfs")
        );
        for bad in ["", "/etc", "../x", "c1/../../x", "./x"] {
            assert!(shared_path(bad).is_err(), "{bad}");
        }
    }
}
