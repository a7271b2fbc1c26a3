//! The shim's core: containerd's task requests in vmbox's terms, as explicit state
//! machines over the seams in [`seams`].
//!
//! - The **sandbox slot** ([`Slot`]) is `Empty`, `Booting`, `Running` or `ShuttingDown`.
//!   No lock is held across a boot: the first Create starts it in a task of its own and
//!   every Create waits on the boot's outcome; a shutdown during a boot aborts it.
//! - Each **process** moves through [`process::Status`] by checked transitions.
//! - Each **container** has an operation lock, held for writing across each transition
//!   of the container (create, start, pause, resume, delete) and for reading across an
//!   exec's start and while an exit is recorded, so a TaskExit never overtakes the event
//!   of the start it follows, and a Delete waits for a Start in flight.
//! - The container map and the slot change together under one short lock: an id is
//!   reserved where it is checked, and "the last container is gone, stop the VM" sees a
//!   Create in flight (its reservation) and leaves the VM alone.
//!
//! [`exits`] holds the watchers: one per process, one per VM (its death ends every process
//! with exit status 255, once), one for the guest's OOM reports.

mod exits;
#[cfg(test)]
mod fakes;
pub mod process;
pub mod sandbox;
pub mod seams;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use containerd_shim::protos::api::Mount;
use tokio::sync::{watch, RwLock, Semaphore};
use tokio::task::AbortHandle;
use vmbox_config::Config;
use vmbox_oci::{to_guest, Annotations};
use vmbox_protocol::agent as pb;
use vmbox_protocol::Id;

use crate::agent::{GuestContainer, ProcessRef, StreamIds};
use crate::error::ShimError;
use crate::events::Event;
use crate::io::{HostStdio, StdioPaths};
use crate::timing;
use process::{now, ExitInfo, Process, Status, Transition};
use sandbox::{blocking, Sandbox, Size};
use seams::{ContainerMounts, Layout, Seams};

/// Process starts in flight at once: beyond this they wait here instead of piling streams
/// and requests onto a guest that handles a few at a time anyway.
const MAX_STARTS: usize = 8;
/// How many deleted container ids are remembered for late OOM reports.
const RECENTLY_DELETED: usize = 64;

type BootOutcome = Option<Result<Arc<Sandbox>, Arc<ShimError>>>;

/// The sandbox's life.
enum Slot {
    Empty,
    Booting {
        ready: watch::Receiver<BootOutcome>,
        abort: AbortHandle,
        layout: Layout,
    },
    Running(Arc<Sandbox>),
    ShuttingDown {
        sandbox: Option<Arc<Sandbox>>,
        done: watch::Receiver<bool>,
    },
}

/// A container's processes.
pub struct Procs {
    pub init: Process,
    pub execs: HashMap<Id, Process>,
    /// Set by Delete: exits found later are not reported.
    pub deleted: bool,
}

impl Procs {
    pub fn get(&mut self, p: &ProcessRef) -> Result<&mut Process, ShimError> {
        match &p.exec {
            None => Ok(&mut self.init),
            Some(e) => self
                .execs
                .get_mut(e)
                .ok_or_else(|| ShimError::NotFound(format!("{p} not found"))),
        }
    }
}

/// A container as the host tracks it.
pub struct Container {
    pub id: Id,
    pub bundle: String,
    ops: RwLock<()>,
    procs: Mutex<Procs>,
}

impl Container {
    /// Runs `f` on the processes under their (short, never awaited) lock.
    pub fn with<T>(&self, f: impl FnOnce(&mut Procs) -> T) -> T {
        let mut g = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

struct State {
    slot: Slot,
    containers: HashMap<Id, Arc<Container>>,
    deleted: VecDeque<Id>,
}

/// A Create, decoded.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: Id,
    pub bundle: String,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    pub checkpoint: String,
}

/// A process's state for containerd's State request.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub bundle: String,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<ExitInfo>,
}

pub struct Core {
    config: Result<Config, String>,
    namespace: String,
    seams: Seams,
    state: Mutex<State>,
    starts: Semaphore,
    me: Weak<Core>,
}

impl Core {
    pub fn new(config: Result<Config, String>, namespace: &str, seams: Seams) -> Arc<Core> {
        Arc::new_cyclic(|me| Core {
            config,
            namespace: namespace.to_string(),
            seams,
            state: Mutex::new(State {
                slot: Slot::Empty,
                containers: HashMap::new(),
                deleted: VecDeque::new(),
            }),
            starts: Semaphore::new(MAX_STARTS),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self) -> Result<&Config, ShimError> {
        self.config.as_ref().map_err(|e| ShimError::Invalid(e.clone()))
    }

    fn publish(&self, e: Event) {
        self.seams.events.publish(e);
    }

    /// The running sandbox.
    fn sandbox(&self) -> Result<Arc<Sandbox>, ShimError> {
        match &self.lock().slot {
            Slot::Running(s) => Ok(s.clone()),
            Slot::Booting { .. } => Err(ShimError::FailedPrecondition("the sandbox is still booting".into())),
            Slot::ShuttingDown { .. } => Err(ShimError::FailedPrecondition("the sandbox is shutting down".into())),
            Slot::Empty => Err(ShimError::NotFound("the sandbox is not running".into())),
        }
    }

    fn container(&self, id: &Id) -> Result<Arc<Container>, ShimError> {
        self.lock()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    /// The sandbox running now or being shut down (for a hard stop).
    pub fn current_sandbox(&self) -> Option<Arc<Sandbox>> {
        match &self.lock().slot {
            Slot::Running(s) => Some(s.clone()),
            Slot::ShuttingDown { sandbox, .. } => sandbox.clone(),
            _ => None,
        }
    }

    /// Whether no container is left (Create reservations count).
    pub fn is_empty(&self) -> bool {
        self.lock().containers.is_empty()
    }

    /// The running sandbox, or one booted for `id` sized by its annotations.
    async fn sandbox_for(&self, id: &Id, ann: &Annotations, config: &Config) -> Result<Arc<Sandbox>, ShimError> {
        loop {
            let mut wait_boot = None;
            let mut wait_shutdown = None;
            {
                let mut st = self.lock();
                match &st.slot {
                    Slot::Running(s) => return Ok(s.clone()),
                    Slot::Booting { ready, .. } => wait_boot = Some(ready.clone()),
                    Slot::ShuttingDown { done, .. } => wait_shutdown = Some(done.clone()),
                    Slot::Empty => {
                        let sid = match &ann.sandbox_id {
                            Some(s) => Id::parse("annotation io.kubernetes.cri.sandbox-id", s)?,
                            None => id.clone(),
                        };
                        let layout = seams::layout(&config.state_dir, &self.namespace, &sid)?;
                        let size = Size {
                            vcpus: ann.vcpus.unwrap_or(config.vm.vcpus),
                            memory_mib: ann.memory_mib.unwrap_or(config.vm.memory_mib),
                        };
                        let (tx, rx) = watch::channel(None);
                        let abort = self.spawn_boot(config.clone(), sid, layout.clone(), size, tx);
                        st.slot = Slot::Booting {
                            ready: rx.clone(),
                            abort,
                            layout,
                        };
                        wait_boot = Some(rx);
                    }
                }
            }
            if let Some(mut rx) = wait_boot {
                let outcome = rx.wait_for(|o| o.is_some()).await.map(|o| o.clone());
                return match outcome {
                    Ok(Some(Ok(s))) => Ok(s),
                    Ok(Some(Err(e))) => Err(ShimError::Shared(e)),
                    _ => Err(ShimError::FailedPrecondition(
                        "the sandbox's boot was abandoned: the shim is shutting down".into(),
                    )),
                };
            }
            if let Some(mut done) = wait_shutdown {
                let _ = done.wait_for(|d| *d).await;
            }
        }
    }

    /// Boots the sandbox in a task of its own (a Create that gives up does not abandon a
    /// half-built VM) and installs it in the slot, unless a shutdown came first.
    fn spawn_boot(
        &self,
        config: Config,
        id: Id,
        layout: Layout,
        size: Size,
        tx: watch::Sender<BootOutcome>,
    ) -> AbortHandle {
        let me = self.me.clone();
        let seams = self.seams.clone();
        let namespace = self.namespace.clone();
        let task = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let booted = timing::phase(
                &format!("sandbox={id}"),
                "boot",
                Sandbox::boot(seams, config, &namespace, id.clone(), layout, size),
            )
            .await;
            let Some(core) = me.upgrade() else { return };
            let outcome = match booted {
                Ok(s) => {
                    let s = Arc::new(s);
                    let installed = {
                        let mut st = core.lock();
                        if matches!(st.slot, Slot::Booting { .. }) {
                            st.slot = Slot::Running(s.clone());
                            true
                        } else {
                            false
                        }
                    };
                    if !installed {
                        // A shutdown came during the boot.
                        s.stop_hard().await;
                        return;
                    }
                    log::info!(
                        "sandbox {id}: VM up in {} ms ({} vCPU, {} MiB, {})",
                        t0.elapsed().as_millis(),
                        size.vcpus,
                        size.memory_mib,
                        s.vm.accel().name()
                    );
                    core.watch_vm(s.clone());
                    core.watch_oom(s.clone());
                    Ok(s)
                }
                Err(e) => {
                    let mut st = core.lock();
                    if matches!(st.slot, Slot::Booting { .. }) {
                        st.slot = Slot::Empty;
                    }
                    Err(Arc::new(e))
                }
            };
            let _ = tx.send(Some(outcome));
        });
        task.abort_handle()
    }

    /// Stops the sandbox (graceful: containers stopped, filesystems flushed, VM powered
    /// off), or abandons its boot. Returns once it is gone; concurrent calls wait for the first.
    pub async fn shutdown_sandbox(&self) {
        let (done_tx, done_rx) = watch::channel(false);
        let previous = {
            let mut st = self.lock();
            let current = match &st.slot {
                Slot::Running(s) => Some(s.clone()),
                _ => None,
            };
            let previous = std::mem::replace(
                &mut st.slot,
                Slot::ShuttingDown {
                    sandbox: current,
                    done: done_rx,
                },
            );
            if let Slot::Running(_) | Slot::Booting { .. } = previous {
                for (_, c) in st.containers.drain() {
                    c.with(|p| {
                        for proc in std::iter::once(&mut p.init).chain(p.execs.values_mut()) {
                            if let Some(io) = proc.io.as_mut() {
                                io.abort();
                            }
                        }
                    });
                }
            }
            previous
        };
        match previous {
            Slot::Running(s) => s.shutdown().await,
            Slot::Booting { abort, layout, .. } => {
                log::info!("shutdown during the sandbox's boot: abandoning it");
                abort.abort();
                let (hv, host) = (self.seams.hypervisor.clone(), self.seams.host.clone());
                let _ = blocking(move || {
                    if let Err(e) = hv.cleanup(&layout.run_dir) {
                        log::warn!("{e}");
                    }
                    host.remove(&layout.dir);
                })
                .await;
            }
            Slot::ShuttingDown { done, .. } => {
                // Someone else is at it: put their state back and wait for them.
                let mut done2 = done.clone();
                self.lock().slot = Slot::ShuttingDown { sandbox: None, done };
                let _ = done2.wait_for(|d| *d).await;
                return;
            }
            Slot::Empty => {}
        }
        self.lock().slot = Slot::Empty;
        let _ = done_tx.send(true);
    }

    /// Starts a shutdown of the sandbox if `id` was its last container and it is still the
    /// running one; the caller runs it ([`Core::shutdown_sandbox`]).
    fn remove_container(&self, id: &Id) -> bool {
        let mut st = self.lock();
        st.containers.remove(id);
        st.deleted.push_back(id.clone());
        while st.deleted.len() > RECENTLY_DELETED {
            st.deleted.pop_front();
        }
        st.containers.is_empty() && matches!(st.slot, Slot::Running(_))
    }

    pub async fn create(&self, req: CreateRequest) -> Result<u32, ShimError> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring from a checkpoint is not implemented".into(),
            ));
        }
        let config = self.config()?.clone();
        let bundle = PathBuf::from(&req.bundle);
        let spec = vmbox_oci::load_spec(&bundle)?;
        let ann = Annotations::parse(spec.annotations().as_ref())?;
        let guest = to_guest(&spec, req.id.as_str())?;
        let terminal = req.stdio.terminal || spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let stdio = StdioPaths {
            terminal,
            ..req.stdio.clone()
        };
        let id = req.id.clone();
        let container = Arc::new(Container {
            id: id.clone(),
            bundle: req.bundle.clone(),
            ops: RwLock::new(()),
            procs: Mutex::new(Procs {
                init: Process::new(Status::Creating, stdio.clone(), None),
                execs: HashMap::new(),
                deleted: false,
            }),
        });
        // Held from before the id is visible until the container is created.
        let _op = container
            .ops
            .try_write()
            .map_err(|_| ShimError::Internal("a new container's lock is taken".into()))?;
        {
            let mut st = self.lock();
            if st.containers.contains_key(&id) {
                return Err(ShimError::AlreadyExists(format!("container {id} already exists")));
            }
            st.containers.insert(id.clone(), container.clone());
        }
        let created = async {
            let sandbox = self.sandbox_for(&id, &ann, &config).await?;
            let subject = format!("container={id}");
            let pid = timing::phase(
                &subject,
                "create",
                self.create_in(&sandbox, &container, &req, &spec, guest, &stdio),
            )
            .await?;
            Ok::<_, ShimError>((sandbox, pid))
        }
        .await;
        match created {
            Ok((sandbox, pid)) => {
                self.publish(Event::Create {
                    container: id.to_string(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    stdio,
                    pid,
                });
                log::info!("container {id} created (guest pid {pid})");
                self.watch_exit(sandbox, container.clone(), ProcessRef::init(id), pid);
                Ok(pid)
            }
            Err(e) => {
                log::warn!("create {id}: {e}");
                let last = {
                    let mut st = self.lock();
                    st.containers.remove(&id);
                    st.containers.is_empty() && matches!(st.slot, Slot::Running(_))
                };
                if last {
                    log::info!("no containers left after a failed create; stopping the sandbox");
                    self.shutdown_sandbox().await;
                }
                Err(e)
            }
        }
    }

    /// Opens the host's ends of a process's stdio, then its streams to the guest.
    async fn open_stdio(
        &self,
        sandbox: &Sandbox,
        container: &Id,
        paths: &StdioPaths,
    ) -> Result<(HostStdio, StreamIds, [Option<vmbox_hypervisor::Conn>; 3]), ShimError> {
        // The host's sinks first: a bad log URI fails before the guest does anything.
        let host = HostStdio::open(paths, container.as_str(), &self.namespace).await?;
        let mut ids = StreamIds {
            terminal: paths.terminal,
            ..Default::default()
        };
        let mut conns = [None, None, None];
        let wanted = [
            !paths.stdin.is_empty(),
            !paths.stdout.is_empty(),
            !paths.stderr.is_empty() && !paths.terminal,
        ];
        for (i, want) in wanted.into_iter().enumerate() {
            if want {
                let (sid, c) = sandbox.stream().await?;
                *[&mut ids.stdin, &mut ids.stdout, &mut ids.stderr][i] = sid;
                conns[i] = Some(c);
            }
        }
        Ok((host, ids, conns))
    }

    async fn create_in(
        &self,
        sandbox: &Arc<Sandbox>,
        container: &Container,
        req: &CreateRequest,
        spec: &oci_spec::runtime::Spec,
        guest: vmbox_oci::GuestSpec,
        stdio: &StdioPaths,
    ) -> Result<u32, ShimError> {
        let id = &container.id;
        let mounts = ContainerMounts {
            rootfs: req.rootfs.clone(),
            spec_root: spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| "rootfs".into()),
            bundle: PathBuf::from(&req.bundle),
            target: sandbox.layout.container_dir(id.as_str()).join("rootfs"),
            binds: guest
                .binds
                .iter()
                .map(|b| (b.source.clone(), sandbox.layout.shared.join(&b.share_rel), b.readonly))
                .collect(),
        };
        let host = self.seams.host.clone();
        let mounted = blocking(move || host.mount_container(&mounts)).await.and_then(|r| r);
        let result = async {
            mounted?;
            let (host_stdio, ids, [sin, sout, serr]) = self.open_stdio(sandbox, id, stdio).await?;
            let oci_spec = serde_json::to_vec(&guest.spec)
                .map_err(|e| ShimError::Internal(format!("encode the guest's spec: {e}")))?;
            let c = GuestContainer {
                id: id.clone(),
                oci_spec,
                rootfs: format!("{id}/rootfs"),
                stdio: ids,
            };
            match sandbox.agent.create(c).await {
                Ok(pid) => Ok((pid, host_stdio.connect(sin, sout, serr))),
                Err(e) => {
                    // The guest may have created it all the same (a reply lost to a
                    // deadline): remove it before its files go.
                    if let Err(r) = sandbox.agent.remove(id, true).await {
                        log::debug!("remove {id} after its failed create: {r}");
                    }
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((pid, io)) => container.with(|p| {
                p.init.pid = pid;
                p.init.io = Some(io);
                p.init.apply(Transition::Created, &format!("container {id}"))?;
                Ok(pid)
            }),
            Err(e) => {
                sandbox.remove_container_files(id).await;
                Err(e)
            }
        }
    }

    pub async fn start(&self, p: &ProcessRef) -> Result<u32, ShimError> {
        let subject = format!(
            "container={} exec={}",
            p.container,
            p.exec.as_ref().map(|e| e.as_str()).unwrap_or("")
        );
        timing::phase(&subject, "start", async {
            let _slot = self
                .starts
                .acquire()
                .await
                .map_err(|e| ShimError::Internal(format!("start queue: {e}")))?;
            let sandbox = self.sandbox()?;
            let c = self.container(&p.container)?;
            match &p.exec {
                None => self.start_init(&sandbox, &c, p).await,
                Some(_) => self.start_exec(&sandbox, &c, p).await,
            }
        })
        .await
    }

    async fn start_init(&self, sandbox: &Sandbox, c: &Container, p: &ProcessRef) -> Result<u32, ShimError> {
        let _op = c.ops.write().await;
        c.with(|procs| procs.init.apply(Transition::Start, p))?;
        match sandbox.agent.start(&c.id).await {
            Ok(pid) => {
                c.with(|procs| {
                    procs.init.pid = pid;
                    // An exit cannot be recorded while the lock is held.
                    let _ = procs.init.apply(Transition::Started, p);
                });
                self.publish(Event::Start {
                    container: c.id.to_string(),
                    pid,
                });
                Ok(pid)
            }
            Err(e) => {
                c.with(|procs| {
                    let _ = procs.init.apply(Transition::StartFailed, p);
                });
                Err(e)
            }
        }
    }

    async fn start_exec(&self, sandbox: &Arc<Sandbox>, c: &Arc<Container>, p: &ProcessRef) -> Result<u32, ShimError> {
        let _op = c.ops.read().await;
        let (paths, spec) = c.with(|procs| {
            let init_running = procs.init.status() == Status::Running;
            let e = procs.get(p)?;
            if !init_running {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not running",
                    p.container
                )));
            }
            e.apply(Transition::Start, p)?;
            Ok((e.stdio.clone(), e.spec.clone().unwrap_or_default()))
        })?;
        let started = async {
            let (host, ids, [sin, sout, serr]) = self.open_stdio(sandbox, &p.container, &paths).await?;
            let pid = sandbox.agent.exec(p, spec, ids).await?;
            Ok::<_, ShimError>((pid, host.connect(sin, sout, serr)))
        }
        .await;
        match started {
            Ok((pid, io)) => {
                c.with(|procs| {
                    if let Ok(e) = procs.get(p) {
                        e.pid = pid;
                        e.io = Some(io);
                        let _ = e.apply(Transition::Started, p);
                    }
                });
                self.publish(Event::ExecStarted {
                    container: p.container.to_string(),
                    exec: p.event_id(),
                    pid,
                });
                self.watch_exit(sandbox.clone(), c.clone(), p.clone(), pid);
                Ok(pid)
            }
            Err(e) => {
                c.with(|procs| {
                    if let Ok(e) = procs.get(p) {
                        let _ = e.apply(Transition::StartFailed, p);
                    }
                });
                Err(e)
            }
        }
    }

    /// Registers an exec (`process`: its OCI process, JSON); started by [`Core::start`].
    pub fn exec(&self, p: &ProcessRef, process: Vec<u8>, stdio: StdioPaths) -> Result<(), ShimError> {
        let Some(exec) = &p.exec else {
            return Err(ShimError::Invalid("exec_id: empty".into()));
        };
        serde_json::from_slice::<oci_spec::runtime::Process>(&process)
            .map_err(|e| ShimError::Invalid(format!("exec {exec} process spec: {e}")))?;
        let c = self.container(&p.container)?;
        c.with(|procs| {
            if procs.execs.contains_key(exec) {
                return Err(ShimError::AlreadyExists(format!("{p} already exists")));
            }
            if procs.init.status() != Status::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not running",
                    p.container
                )));
            }
            procs
                .execs
                .insert(exec.clone(), Process::new(Status::Created, stdio, Some(process)));
            Ok(())
        })?;
        self.publish(Event::ExecAdded {
            container: p.container.to_string(),
            exec: exec.to_string(),
        });
        Ok(())
    }

    pub async fn kill(&self, p: &ProcessRef, signal: u32, all: bool) -> Result<(), ShimError> {
        let sandbox = self.sandbox()?;
        let c = self.container(&p.container)?;
        let exited = c.with(|procs| procs.get(p).map(|e| e.exit().is_some()))?;
        if exited && !all {
            return Err(ShimError::NotFound("process already finished".into()));
        }
        sandbox.agent.signal(p, signal, all).await
    }

    /// Deletes a process; returns its pid and exit.
    pub async fn delete(&self, p: &ProcessRef) -> Result<(u32, ExitInfo), ShimError> {
        let c = self.container(&p.container)?;
        if p.exec.is_some() {
            let _op = c.ops.read().await;
            let gone = c.with(|procs| {
                procs.get(p)?.apply(Transition::Delete, p)?;
                Ok::<_, ShimError>(p.exec.as_ref().and_then(|e| procs.execs.remove(e)))
            })?;
            let gone = gone.ok_or_else(|| ShimError::NotFound(format!("{p} not found")))?;
            let exit = gone.exit().unwrap_or(ExitInfo { status: 0, at: now() });
            return Ok((gone.pid, exit));
        }
        timing::phase(
            &format!("container={}", p.container),
            "teardown",
            self.delete_init(&c, p),
        )
        .await
    }

    async fn delete_init(&self, c: &Container, p: &ProcessRef) -> Result<(u32, ExitInfo), ShimError> {
        let _op = c.ops.write().await;
        let pid = c.with(|procs| procs.init.apply(Transition::Delete, p).map(|_| procs.init.pid))?;
        let sandbox = self.sandbox();
        if let Ok(s) = &sandbox {
            if let Err(e) = s.agent.remove(&c.id, true).await {
                log::warn!("remove {} in the guest: {e}", c.id);
            }
        }
        let exit = c.with(|procs| {
            procs.deleted = true;
            procs.init.exit()
        });
        let last = self.remove_container(&c.id);
        if let Ok(s) = &sandbox {
            s.remove_container_files(&c.id).await;
        }
        let exit = exit.unwrap_or(ExitInfo { status: 137, at: now() });
        self.publish(Event::Delete {
            container: c.id.to_string(),
            pid,
            status: exit.status,
            at: exit.at.clone(),
        });
        if last {
            log::info!("last container deleted; shutting the sandbox down");
            self.shutdown_sandbox().await;
        }
        Ok((pid, exit))
    }

    pub fn state(&self, p: &ProcessRef) -> Result<ProcessState, ShimError> {
        let c = self.container(&p.container)?;
        c.with(|procs| {
            let e = procs.get(p)?;
            Ok(ProcessState {
                bundle: c.bundle.clone(),
                pid: e.pid,
                status: e.status(),
                stdio: e.stdio.clone(),
                exit: e.exit(),
            })
        })
    }

    /// Waits for the process's exit.
    pub async fn wait(&self, p: &ProcessRef) -> Result<ExitInfo, ShimError> {
        let c = self.container(&p.container)?;
        let mut rx = c.with(|procs| procs.get(p).map(|e| e.exit_watch()))?;
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| ShimError::NotFound(format!("{p} was deleted")))?
            .clone();
        Ok(exit.unwrap_or(ExitInfo { status: 255, at: now() }))
    }

    pub async fn pause(&self, id: &Id, pause: bool) -> Result<(), ShimError> {
        let sandbox = self.sandbox()?;
        let c = self.container(id)?;
        let _op = c.ops.write().await;
        let t = if pause { Transition::Pause } else { Transition::Resume };
        let p = ProcessRef::init(id.clone());
        // Checked first, applied once the guest did it (nothing else moves while the lock is held).
        c.with(|procs| {
            process::next(procs.init.status(), t).map_err(|why| ShimError::FailedPrecondition(format!("{p}: {why}")))
        })?;
        match pause {
            true => sandbox.agent.pause(id).await?,
            false => sandbox.agent.resume(id).await?,
        }
        c.with(|procs| procs.init.apply(t, &p))?;
        self.publish(match pause {
            true => Event::Paused {
                container: id.to_string(),
            },
            false => Event::Resumed {
                container: id.to_string(),
            },
        });
        Ok(())
    }

    pub async fn pids(&self, id: &Id) -> Result<Vec<u32>, ShimError> {
        let sandbox = self.sandbox()?;
        self.container(id)?;
        sandbox.agent.pids(id).await
    }

    pub async fn stats(&self, id: &Id) -> Result<pb::StatsContainerResponse, ShimError> {
        let sandbox = self.sandbox()?;
        self.container(id)?;
        sandbox.agent.stats(id).await
    }

    pub async fn update(&self, id: &Id, resources: Vec<u8>) -> Result<(), ShimError> {
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| ShimError::Invalid(format!("update {id}: resources: {e}")))?;
        let sandbox = self.sandbox()?;
        self.container(id)?;
        sandbox.agent.update(id, resources).await
    }

    pub async fn resize_pty(&self, p: &ProcessRef, rows: u32, cols: u32) -> Result<(), ShimError> {
        let sandbox = self.sandbox()?;
        let c = self.container(&p.container)?;
        c.with(|procs| procs.get(p).map(|_| ()))?;
        sandbox.agent.resize_pty(p, rows, cols).await
    }

    pub fn close_io(&self, p: &ProcessRef) -> Result<(), ShimError> {
        let c = self.container(&p.container)?;
        c.with(|procs| {
            if let Some(io) = &procs.get(p)?.io {
                io.close_stdin();
            }
            Ok(())
        })
    }

    /// The init's pid, if the container exists.
    pub fn pid(&self, id: &Id) -> Option<u32> {
        self.container(id).ok().map(|c| c.with(|p| p.init.pid))
    }
}
