//! The containerd Task API (v2), mapped onto the sandbox's agent. Every call names its
//! container; the first Create of a sandbox boots its VM, the last Delete shuts it down.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status as ApiStatus, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::topics::*;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use tokio::sync::Mutex;
use vmbox_config::Config;
use vmbox_oci::{to_guest, valid_id, Annotations};
use vmbox_protocol::agent as pb;

use crate::container::{now, timestamp, Container, ExitInfo, Proc, Status};
use crate::error::ShimError;
use crate::io::{ProcessIo, StdioPaths};
use crate::metrics;
use crate::mounts;
use crate::sandbox::Sandbox;
use crate::timing;

/// Longest wait for a process's output to drain after it exited; longer means a
/// descendant still holds the pipe (a daemonized child), which must not stall the exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TaskService {
    inner: Arc<Inner>,
}

pub struct Inner {
    config: Result<Config, String>,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// The last [`RECENTLY_DELETED`] containers deleted: an OOM kill the guest found just
    /// before removing one is still forwarded.
    deleted: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Process starts in flight: beyond this they wait here instead of piling streams and
    /// requests onto a guest that handles a few at a time anyway.
    starts: tokio::sync::Semaphore,
}

const MAX_STARTS: usize = 8;
/// How many deleted container ids are remembered for late OOM events.
const RECENTLY_DELETED: usize = 64;

impl TaskService {
    pub fn new(
        config: Result<Config, String>,
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let inner = Inner {
            config,
            namespace: namespace.to_string(),
            publisher,
            exit,
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            deleted: Default::default(),
            starts: tokio::sync::Semaphore::new(MAX_STARTS),
        };
        TaskService { inner: Arc::new(inner) }
    }

    /// The graceful path for SIGTERM/SIGINT: stop everything, then let the shim exit.
    pub async fn shutdown_all(&self) {
        self.inner.shutdown_sandbox().await;
        self.inner.exit.signal();
    }

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

impl Inner {
    fn config(&self) -> Result<&Config, ShimError> {
        self.config.as_ref().map_err(|e| ShimError::Invalid(e.clone()))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self.publisher.publish(ctx, topic, &self.namespace, event).await {
            log::warn!("publish {topic}: {e}");
        }
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, ShimError> {
        self.sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| ShimError::NotFound("the sandbox is not running".into()))
    }

    /// The running sandbox, or a new one sized by the first container's annotations.
    async fn sandbox_for(self: &Arc<Self>, container_id: &str, ann: &Annotations) -> Result<Arc<Sandbox>, ShimError> {
        let mut slot = self.sandbox.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let config = self.config()?;
        let id = ann.sandbox_id.clone().unwrap_or_else(|| container_id.to_string());
        let vcpus = ann.vcpus.unwrap_or(config.vm.vcpus);
        let memory = ann.memory_mib.unwrap_or(config.vm.memory_mib);
        let t0 = std::time::Instant::now();
        let sandbox = Arc::new(
            timing::phase(
                &format!("sandbox={id}"),
                "boot",
                Sandbox::boot(config, &self.namespace, &id, vcpus, memory),
            )
            .await?,
        );
        log::info!(
            "sandbox {id}: VM up in {} ms ({} vCPU, {memory} MiB, {})",
            t0.elapsed().as_millis(),
            vcpus,
            vmbox_hypervisor::Vm::accel(&sandbox.vm).name()
        );
        self.watch_oom(sandbox.clone());
        self.watch_vm(sandbox.clone());
        *slot = Some(sandbox.clone());
        Ok(sandbox)
    }

    /// A VMM that exits while the sandbox is in use (crash, kill, guest panic) ends every
    /// process of the sandbox: each gets exit status 255 and a TaskExit at once, instead
    /// of waits that would hang on a dead guest.
    fn watch_vm(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let status = loop {
                if let Some(s) = vmbox_hypervisor::Vm::wait_exit(&sandbox.vm, Duration::from_secs(3600)).await {
                    break s;
                }
            };
            let Some(this) = this.upgrade() else { return };
            let current = this
                .sandbox
                .lock()
                .await
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &sandbox));
            if !current {
                return; // an orderly shutdown
            }
            log::error!(
                "sandbox {}: the VM exited unexpectedly ({status}); guest console:\n{}",
                sandbox.id,
                vmbox_hypervisor::Vm::console_tail(&sandbox.vm, 20)
            );
            let at = now();
            let mut exits = Vec::new();
            {
                let mut map = this.containers.lock().await;
                for c in map.values_mut() {
                    let cid = c.id.clone();
                    for (exec_id, p) in std::iter::once((String::new(), &mut c.init))
                        .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)))
                    {
                        if p.exit().is_none() && (exec_id.is_empty() || p.status != Status::Created) {
                            if let Some(io) = p.io.as_mut() {
                                io.abort();
                            }
                            p.set_exited(ExitInfo {
                                status: 255,
                                at: at.clone(),
                            });
                            exits.push((cid.clone(), exec_id, p.pid));
                        }
                    }
                }
            }
            for (cid, exec_id, pid) in exits {
                let ev = TaskExit {
                    id: if exec_id.is_empty() { cid.clone() } else { exec_id },
                    container_id: cid,
                    pid,
                    exit_status: 255,
                    exited_at: Some(at.clone()).into(),
                    ..Default::default()
                };
                this.publish(TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
            }
            // Stop the daemons; the containers' files go with their Delete.
            vmbox_hypervisor::Vm::stop(&sandbox.vm).await;
        });
    }

    fn watch_oom(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let ctx = ttrpc::context::Context::default();
                let Ok(ev) = sandbox.agent.get_oom_event(ctx, &pb::Empty::new()).await else {
                    return;
                };
                let Some(this) = this.upgrade() else { return };
                // The guest names the container: forward only ids this shim serves or has
                // just deleted (the agent checks for a kill right before removing one).
                // Served first, then deleted: Delete records the id as deleted before it
                // removes it, so a container being deleted is found in one or the other.
                let served = this.containers.lock().await.contains_key(&ev.container_id);
                let recent = || {
                    this.deleted
                        .lock()
                        .map(|d| d.contains(&ev.container_id))
                        .unwrap_or(false)
                };
                if !served && !recent() {
                    log::warn!(
                        "guest reported an OOM kill in unknown container {:?}; ignored",
                        ev.container_id.chars().take(128).collect::<String>()
                    );
                    continue;
                }
                let e = TaskOOM {
                    container_id: ev.container_id,
                    ..Default::default()
                };
                this.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
            }
        });
    }

    pub async fn current_sandbox(&self) -> Option<Arc<Sandbox>> {
        self.sandbox.lock().await.clone()
    }

    pub async fn shutdown_sandbox(&self) {
        let sandbox = self.sandbox.lock().await.take();
        if let Some(s) = sandbox {
            for (_, mut c) in self.containers.lock().await.drain() {
                if let Some(io) = c.init.io.as_mut() {
                    io.abort();
                }
            }
            s.shutdown().await;
        }
    }

    /// Opens the streams for `paths`, returns the agent's view and the host ends.
    async fn open_stdio(
        &self,
        sandbox: &Sandbox,
        paths: &StdioPaths,
    ) -> Result<(pb::Stdio, [Option<vmbox_hypervisor::Conn>; 3]), ShimError> {
        let mut stdio = pb::Stdio {
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
                let (sid, c) = timing::guest(sandbox.stream()).await?;
                match i {
                    0 => stdio.stdin = sid,
                    1 => stdio.stdout = sid,
                    _ => stdio.stderr = sid,
                }
                conns[i] = Some(c);
            }
        }
        Ok((stdio, conns))
    }

    async fn create(self: &Arc<Self>, req: CreateTaskRequest) -> Result<CreateTaskResponse, ShimError> {
        if !valid_id(&req.id) {
            return Err(ShimError::Invalid(format!(
                "container id {:?}: expected 1-128 of [A-Za-z0-9_.-]",
                req.id
            )));
        }
        if self.containers.lock().await.contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!("container {} already exists", req.id)));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring from a checkpoint is not implemented".into(),
            ));
        }
        let bundle = Path::new(&req.bundle);
        let spec = vmbox_oci::load_spec(bundle)?;
        let ann = Annotations::parse(spec.annotations().as_ref())?;
        let guest = to_guest(&spec, &req.id)?;
        let sandbox = self.sandbox_for(&req.id, &ann).await?;
        let result = timing::phase(
            &format!("container={}", req.id),
            "create",
            self.create_in(&sandbox, &req, &spec, guest),
        )
        .await;
        if let Err(e) = &result {
            log::warn!("create {}: {e}", req.id);
            sandbox_cleanup_container(&sandbox, &req.id).await;
            if self.containers.lock().await.is_empty() {
                log::info!(
                    "sandbox {}: no containers left after a failed create; stopping it",
                    sandbox.id
                );
                self.shutdown_sandbox().await;
            }
        }
        result
    }

    async fn create_in(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        req: &CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        guest: vmbox_oci::GuestSpec,
    ) -> Result<CreateTaskResponse, ShimError> {
        let id = req.id.as_str();
        let cdir = sandbox.container_dir(id);
        let spec_root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| "rootfs".into());
        mounts::mount_rootfs(&req.rootfs, &spec_root, Path::new(&req.bundle), &cdir.join("rootfs"))?;
        for b in &guest.binds {
            mounts::bind(&b.source, &sandbox.shared.join(&b.share_rel), b.readonly)?;
        }
        let terminal = req.terminal || spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let paths = stdio_paths(&req.stdin, &req.stdout, &req.stderr, terminal);
        let (stdio, [sin, sout, serr]) = self.open_stdio(sandbox, &paths).await?;
        let oci_spec = serde_json::to_vec(&guest.spec).map_err(|e| ShimError::Invalid(e.to_string()))?;
        let creq = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec,
            rootfs: format!("{id}/rootfs"),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let pid = timing::guest(sandbox.agent.create_container(sandbox.create_ctx(), &creq))
            .await
            .map_err(ShimError::agent)?
            .pid;
        let mut init = Proc::new(pid, paths.clone(), None);
        init.io = Some(ProcessIo::start(&paths, sin, sout, serr, id, &self.namespace).await?);
        let container = Container {
            id: id.into(),
            bundle: req.bundle.clone(),
            init,
            execs: HashMap::new(),
        };
        self.containers.lock().await.insert(id.into(), container);
        self.watch_exit(sandbox.clone(), id.into(), String::new(), pid);
        let ev = TaskCreate {
            container_id: id.into(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(containerd_shim::protos::events::task::TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        };
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        log::info!("container {id} created (guest pid {pid})");
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Waits in the background for the process's exit, drains its output, records the
    /// exit and publishes TaskExit. A VM that dies ends the wait with an error: that is
    /// reported as exit status 255.
    fn watch_exit(self: &Arc<Self>, sandbox: Arc<Sandbox>, id: String, exec_id: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let req = pb::ProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let ctx = ttrpc::context::Context::default();
            let info = match sandbox.agent.wait_process(ctx, &req).await {
                Ok(w) => ExitInfo {
                    status: w.exit_status as u32,
                    at: timestamp(w.exited_at_ns),
                },
                Err(e) => {
                    log::warn!("container {id} {exec_id}: lost the process ({e}); reporting exit 255");
                    ExitInfo { status: 255, at: now() }
                }
            };
            let io = {
                let mut map = this.containers.lock().await;
                map.get_mut(&id)
                    .and_then(|c| c.proc_mut(&exec_id).ok())
                    .and_then(|p| p.io.take())
            };
            if let Some(mut io) = io {
                if tokio::time::timeout(DRAIN_TIMEOUT, io.wait_outputs()).await.is_err() {
                    log::warn!("container {id} {exec_id}: output still open {DRAIN_TIMEOUT:?} after exit; closing it");
                }
            }
            {
                let mut map = this.containers.lock().await;
                match map.get_mut(&id).and_then(|c| c.proc_mut(&exec_id).ok()) {
                    // Already reported (the VM died and watch_vm ended it).
                    Some(p) if p.exit().is_some() => return,
                    Some(p) => p.set_exited(info.clone()),
                    None => return,
                }
            }
            let ev = TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() {
                    id.clone()
                } else {
                    exec_id.clone()
                },
                pid,
                exit_status: info.status,
                exited_at: Some(info.at).into(),
                ..Default::default()
            };
            this.publish(TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
        });
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> Result<StartResponse, ShimError> {
        let subject = format!("container={} exec={}", req.id, req.exec_id);
        timing::phase(&subject, "start", self.start_inner(req)).await
    }

    async fn start_inner(self: &Arc<Self>, req: StartRequest) -> Result<StartResponse, ShimError> {
        let _slot = self
            .starts
            .acquire()
            .await
            .map_err(|e| ShimError::Agent(e.to_string()))?;
        let sandbox = self.sandbox().await?;
        if req.exec_id.is_empty() {
            let status = self.with(&req.id, |c| Ok(c.init.status)).await?;
            if status != Status::Created {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not in the created state",
                    req.id
                )));
            }
            let r = pb::ContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let pid = timing::guest(sandbox.agent.start_container(sandbox.create_ctx(), &r))
                .await
                .map_err(ShimError::agent)?
                .pid;
            self.with_mut(&req.id, |c| {
                if c.init.status == Status::Created {
                    c.init.status = Status::Running;
                }
                Ok(())
            })
            .await?;
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(TASK_START_EVENT_TOPIC, Box::new(ev)).await;
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let (paths, spec) = self
            .with(&req.id, |c| {
                let p = c.proc(&req.exec_id)?;
                match p.status {
                    Status::Created => Ok((p.stdio.clone(), p.spec.clone().unwrap_or_default())),
                    _ => Err(ShimError::FailedPrecondition(format!(
                        "exec {} was already started",
                        req.exec_id
                    ))),
                }
            })
            .await?;
        let (stdio, [sin, sout, serr]) = self.open_stdio(&sandbox, &paths).await?;
        let r = pb::ExecProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            process: spec,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let pid = timing::guest(sandbox.agent.exec_process(sandbox.create_ctx(), &r))
            .await
            .map_err(ShimError::agent)?
            .pid;
        let io = ProcessIo::start(&paths, sin, sout, serr, &req.id, &self.namespace).await?;
        self.with_mut(&req.id, |c| {
            let p = c.proc_mut(&req.exec_id)?;
            p.pid = pid;
            p.status = Status::Running;
            p.io = Some(io);
            Ok(())
        })
        .await?;
        self.watch_exit(sandbox, req.id.clone(), req.exec_id.clone(), pid);
        let ev = TaskExecStarted {
            container_id: req.id,
            exec_id: req.exec_id,
            pid,
            ..Default::default()
        };
        self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn with<T>(&self, id: &str, f: impl FnOnce(&Container) -> Result<T, ShimError>) -> Result<T, ShimError> {
        let map = self.containers.lock().await;
        f(map
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))?)
    }

    async fn with_mut<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, ShimError>,
    ) -> Result<T, ShimError> {
        let mut map = self.containers.lock().await;
        f(map
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))?)
    }

    async fn delete(self: &Arc<Self>, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        if !req.exec_id.is_empty() {
            return self.delete_inner(req).await;
        }
        let subject = format!("container={}", req.id);
        timing::phase(&subject, "teardown", self.delete_inner(req)).await
    }

    async fn delete_inner(self: &Arc<Self>, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        let sandbox = self.sandbox().await?;
        if !req.exec_id.is_empty() {
            let p = self
                .with_mut(&req.id, |c| {
                    let p = c.proc(&req.exec_id)?;
                    if p.status == Status::Running {
                        return Err(ShimError::FailedPrecondition(format!(
                            "exec {} is still running",
                            req.exec_id
                        )));
                    }
                    Ok(c.execs.remove(&req.exec_id))
                })
                .await?;
            let p = p.ok_or_else(|| ShimError::NotFound(format!("exec {} not found", req.exec_id)))?;
            let exit = p.exit().unwrap_or(ExitInfo { status: 0, at: now() });
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            });
        }
        let (pid, status) = self.with(&req.id, |c| Ok((c.init.pid, c.init.status))).await?;
        if matches!(status, Status::Running | Status::Paused) {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is still running",
                req.id
            )));
        }
        let r = pb::RemoveContainerRequest {
            container_id: req.id.clone(),
            force: true,
            ..Default::default()
        };
        if let Err(e) = timing::guest(sandbox.agent.remove_container(sandbox.ctx(), &r)).await {
            log::warn!("remove {} in the guest: {e}", req.id);
        }
        if let Ok(mut d) = self.deleted.lock() {
            d.push_back(req.id.clone());
            while d.len() > RECENTLY_DELETED {
                d.pop_front();
            }
        }
        let container = self.containers.lock().await.remove(&req.id);
        sandbox_cleanup_container(&sandbox, &req.id).await;
        let exit = container
            .as_ref()
            .and_then(|c| c.init.exit())
            .unwrap_or(ExitInfo { status: 137, at: now() });
        let ev = TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at.clone()).into(),
            id: req.id.clone(),
            ..Default::default()
        };
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
        if self.containers.lock().await.is_empty() {
            log::info!("sandbox {}: last container deleted; shutting the VM down", sandbox.id);
            self.shutdown_sandbox().await;
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }
}

/// Unmounts and removes a container's files in the shared directory.
async fn sandbox_cleanup_container(sandbox: &Sandbox, id: &str) {
    let dir = sandbox.container_dir(id);
    let _ = tokio::task::spawn_blocking(move || mounts::unmount_and_remove(&dir)).await;
}

fn status_of(s: Status) -> ApiStatus {
    match s {
        Status::Created => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped => ApiStatus::STOPPED,
    }
}

fn reply<T>(what: &str, r: Result<T, ShimError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        match &e {
            ShimError::NotFound(_) | ShimError::FailedPrecondition(_) => log::debug!("{what}: {e}"),
            _ => log::warn!("{what}: {e}"),
        }
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let r = self
            .inner
            .with(&req.id, |c| {
                let p = c.proc(&req.exec_id)?;
                let exit = p.exit();
                Ok(StateResponse {
                    id: if req.exec_id.is_empty() {
                        c.id.clone()
                    } else {
                        req.exec_id.clone()
                    },
                    bundle: c.bundle.clone(),
                    pid: p.pid,
                    status: status_of(p.status).into(),
                    stdin: p.stdio.stdin.clone(),
                    stdout: p.stdio.stdout.clone(),
                    stderr: p.stdio.stderr.clone(),
                    terminal: p.stdio.terminal,
                    exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
                    exited_at: exit.map(|e| e.at).into(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                })
            })
            .await;
        reply("state", r)
    }

    async fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        let id = req.id.clone();
        reply(&format!("create {id}"), self.inner.create(req).await)
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let what = format!("start {} {}", req.id, req.exec_id);
        reply(&what, self.inner.start(req).await)
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let what = format!("delete {} {}", req.id, req.exec_id);
        reply(&what, self.inner.delete(req).await)
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let r = async {
            let sandbox = self.inner.sandbox().await?;
            let r = pb::ContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let l = sandbox
                .agent
                .list_processes(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
            let processes = l
                .pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect();
            Ok(PidsResponse {
                processes,
                ..Default::default()
            })
        };
        reply("pids", r.await)
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        reply("pause", self.inner.pause(&req.id, true).await)
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        reply("resume", self.inner.pause(&req.id, false).await)
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: containerd_shim::api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        reply(
            "checkpoint",
            Err(ShimError::Unimplemented(
                "checkpoint is not implemented by vmbox".into(),
            )),
        )
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let r = async {
            let sandbox = self.inner.sandbox().await?;
            let exited = self
                .inner
                .with(&req.id, |c| Ok(c.proc(&req.exec_id)?.exit().is_some()))
                .await?;
            if exited && !req.all {
                return Err(ShimError::NotFound("process already finished".into()));
            }
            let r = pb::SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
                ..Default::default()
            };
            sandbox
                .agent
                .signal_process(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
            Ok(Empty::new())
        };
        reply("kill", r.await)
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let r = async {
            if !valid_id(&req.exec_id) {
                return Err(ShimError::Invalid(format!(
                    "exec id {:?}: expected 1-128 of [A-Za-z0-9_.-]",
                    req.exec_id
                )));
            }
            let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
            serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
                .map_err(|e| ShimError::Invalid(format!("exec {} process spec: {e}", req.exec_id)))?;
            let paths = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            self.inner
                .with_mut(&req.id, |c| {
                    if c.execs.contains_key(&req.exec_id) {
                        return Err(ShimError::AlreadyExists(format!("exec {} already exists", req.exec_id)));
                    }
                    if c.init.status != Status::Running {
                        return Err(ShimError::FailedPrecondition(format!(
                            "container {} is not running",
                            c.id
                        )));
                    }
                    c.execs.insert(req.exec_id.clone(), Proc::new(0, paths, Some(spec)));
                    Ok(())
                })
                .await?;
            let ev = TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            };
            self.inner.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev)).await;
            Ok(Empty::new())
        };
        reply("exec", r.await)
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let r = async {
            let sandbox = self.inner.sandbox().await?;
            let r = pb::ResizePtyRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                rows: req.height,
                cols: req.width,
                ..Default::default()
            };
            sandbox
                .agent
                .resize_pty(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
            Ok(Empty::new())
        };
        reply("resize_pty", r.await)
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let r = self
            .inner
            .with(&req.id, |c| {
                if req.stdin {
                    if let Some(io) = &c.proc(&req.exec_id)?.io {
                        io.close_stdin();
                    }
                }
                Ok(Empty::new())
            })
            .await;
        reply("close_io", r)
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let r = async {
            let sandbox = self.inner.sandbox().await?;
            let resources = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
                .map_err(|e| ShimError::Invalid(format!("update {}: resources: {e}", req.id)))?;
            let r = pb::UpdateContainerRequest {
                container_id: req.id.clone(),
                resources,
                ..Default::default()
            };
            sandbox
                .agent
                .update_container(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
            Ok(Empty::new())
        };
        reply("update", r.await)
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let r = async {
            let mut rx = self
                .inner
                .with(&req.id, |c| Ok(c.proc(&req.exec_id)?.exit_watch()))
                .await?;
            let exit = rx
                .wait_for(|e| e.is_some())
                .await
                .map_err(|_| ShimError::NotFound(format!("{} {} was deleted", req.id, req.exec_id)))?
                .clone()
                .unwrap_or(ExitInfo { status: 255, at: now() });
            Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            })
        };
        reply("wait", r.await)
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let r = async {
            let sandbox = self.inner.sandbox().await?;
            let r = pb::ContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let s = sandbox
                .agent
                .stats_container(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
            let m = metrics::to_cgroup_v2(&s);
            let value = m.write_to_bytes().map_err(|e| ShimError::Agent(e.to_string()))?;
            let any = Any {
                type_url: metrics::TYPE_URL.into(),
                value,
                ..Default::default()
            };
            Ok(StatsResponse {
                stats: Some(any).into(),
                ..Default::default()
            })
        };
        reply("stats", r.await)
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let pid = self.inner.with(&req.id, |c| Ok(c.init.pid)).await.unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> TtrpcResult<Empty> {
        if !self.inner.containers.lock().await.is_empty() {
            return Ok(Empty::new());
        }
        self.shutdown_all().await;
        Ok(Empty::new())
    }
}

impl Inner {
    async fn pause(&self, id: &str, pause: bool) -> Result<Empty, ShimError> {
        let sandbox = self.sandbox().await?;
        let r = pb::ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        if pause {
            sandbox
                .agent
                .pause_container(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
        } else {
            sandbox
                .agent
                .resume_container(sandbox.ctx(), &r)
                .await
                .map_err(ShimError::agent)?;
        }
        self.with_mut(id, |c| {
            if c.init.status != Status::Stopped {
                c.init.status = if pause { Status::Paused } else { Status::Running };
            }
            Ok(())
        })
        .await?;
        if pause {
            self.publish(
                TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.into(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            let ev = TaskResumed {
                container_id: id.into(),
                ..Default::default()
            };
            self.publish(TASK_RESUMED_EVENT_TOPIC, Box::new(ev)).await;
        }
        Ok(Empty::new())
    }
}
