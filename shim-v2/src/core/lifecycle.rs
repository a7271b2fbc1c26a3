//! Creating, starting and deleting processes: the transitions that talk to the guest.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::RwLock;
use vmbox_oci::{to_guest, Annotations};
use vmbox_protocol::Id;

use super::process::{now, ExitInfo, Process, Status, Transition};
use super::sandbox::{blocking, Sandbox, Shape};
use super::seams::ContainerMounts;
use super::slot::ShutdownJob;
use super::{Container, Core, CreateRequest, Procs};
use crate::agent::{GuestContainer, ProcessRef, StreamIds};
use crate::error::ShimError;
use crate::events::Event;
use crate::io::{HostStdio, StdioPaths};
use crate::timing;

impl Core {
    pub async fn create(&self, req: CreateRequest) -> Result<u32, ShimError> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring from a checkpoint is not implemented".into(),
            ));
        }
        let (config, config_path) = self.config_for(req.config_path.as_deref())?;
        if let Some(p) = &config_path {
            // For `delete` after this shim died: it finds the sandbox's state_dir there.
            let file = std::path::Path::new(&req.bundle).join(crate::options::BUNDLE_CONFIG_PATH);
            if let Err(e) = std::fs::write(&file, p.as_os_str().as_encoded_bytes()) {
                log::warn!("record the config path in {}: {e}", file.display());
            }
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = vmbox_oci::load_spec(&bundle)?;
        let ann = Annotations::parse(spec.annotations().as_ref())?;
        let guest = to_guest(&spec, req.id.as_str(), &ann)?;
        let (shape, why) = Shape::of(&spec, &ann, &config, req.id.as_str(), &bundle)?;
        if ann.container_type == vmbox_oci::ContainerType::Sandbox {
            log::info!("sandbox of {}: {why}", req.id);
        }
        let terminal = req.stdio.terminal || spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let stdio = StdioPaths {
            terminal,
            ..req.stdio.clone()
        };
        let id = req.id.clone();
        let container = Arc::new(Container {
            id: id.clone(),
            bundle: req.bundle.clone(),
            hooks: shape.hooks.clone(),
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
            let sandbox = self.sandbox_for(&id, &ann, &shape, &config).await?;
            // The booting container's createRuntime/prestart hooks ran before the boot;
            // a later container's run now, with the VMM (in the pod's namespace) as pid.
            if sandbox.id != id && container.hooks.before_create() {
                let (hooks, pid) = (container.hooks.clone(), sandbox.host_pid());
                blocking(move || hooks.run_before_create(pid)).await??;
            }
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
        // A SIGTERM during the create stopped the sandbox and forgot the container.
        let created = created.and_then(|ok| self.still_registered(&container).map(|_| ok));
        match created {
            Ok((sandbox, pid)) => {
                self.publish(Event::Create {
                    container: id.to_string(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    stdio,
                    pid,
                });
                log::info!("container {id} created (task pid {pid}, the VMM)");
                self.watch_exit(sandbox, container.clone(), ProcessRef::init(id), pid);
                Ok(pid)
            }
            Err(e) => {
                log::warn!("create {id}: {e}");
                let job = self.forget(&container, false);
                if !matches!(job, ShutdownJob::Nothing) {
                    log::info!("no containers left after a failed create; stopping the sandbox");
                }
                self.finish_shutdown(job).await;
                Err(e)
            }
        }
    }

    /// Opens the host's ends of a process's stdio, then its streams to the guest.
    pub(super) async fn open_stdio(
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

    pub(super) async fn create_in(
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
                pod: guest.pod.clone(),
            };
            match sandbox.agent.create(c).await {
                Ok(guest_pid) => {
                    log::info!("container {id}: init is pid {guest_pid} in the guest");
                    Ok((sandbox.host_pid(), host_stdio.connect(sin, sout, serr)))
                }
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
        let started = timing::phase(&subject, "start", async {
            let _slot = self
                .starts
                .acquire()
                .await
                .map_err(|e| ShimError::Internal(format!("start queue: {e}")))?;
            let c = self.container(&p.container)?;
            let sandbox = self.sandbox()?;
            let pid = match &p.exec {
                None => self.start_init(&sandbox, &c, p).await,
                Some(_) => self.start_exec(&sandbox, &c, p).await,
            }?;
            Ok::<_, ShimError>((pid, c))
        })
        .await;
        let (pid, c) = started?;
        // poststart hooks before Start answers, as runc, but with no lock held: the
        // container's exit, execs and delete do not wait for them.
        if p.exec.is_none() && !c.hooks.poststart.is_empty() {
            let hooks = c.hooks.clone();
            let _ = blocking(move || hooks.run_after(crate::hooks::Stage::Poststart, pid)).await;
        }
        Ok(pid)
    }

    pub(super) async fn start_init(
        &self,
        sandbox: &Sandbox,
        c: &Arc<Container>,
        p: &ProcessRef,
    ) -> Result<u32, ShimError> {
        let _op = c.ops.write().await;
        self.still_registered(c)?;
        c.with(|procs| procs.init.apply(Transition::Start, p))?;
        match sandbox.agent.start(&c.id).await {
            Ok(_guest_pid) => {
                let pid = sandbox.host_pid();
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

    pub(super) async fn start_exec(
        &self,
        sandbox: &Arc<Sandbox>,
        c: &Arc<Container>,
        p: &ProcessRef,
    ) -> Result<u32, ShimError> {
        let _op = c.ops.read().await;
        // An exec's own lock orders its Start and its Delete.
        let _exec = c.with(|procs| procs.get(p).map(|e| e.op.clone()))?.lock_owned().await;
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
            let guest_pid = sandbox.agent.exec(p, spec, ids).await?;
            log::info!("{p}: pid {guest_pid} in the guest");
            Ok::<_, ShimError>((sandbox.host_pid(), host.connect(sin, sout, serr)))
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
        let c = self.container(&p.container)?;
        let exited = c.with(|procs| procs.get(p).map(|e| e.exit().is_some()))?;
        // The process is gone with its VM even before the VM's watcher recorded it.
        let sandbox = self.sandbox().ok().filter(|s| s.vm.exited().is_none());
        let Some(sandbox) = sandbox else {
            return Err(ShimError::NotFound(format!(
                "{p}: process already finished (its VM is gone)"
            )));
        };
        if exited {
            // What is left of the container (`all`) still gets the signal; the answer is
            // runc's for a stopped container, NotFound, which containerd's
            // `Delete(WithProcessKill)` accepts. An error here (the VM is gone) would make
            // CRI retry its TaskExit handling for ever and never mark the pod NOTREADY.
            if all {
                if let Err(e) = sandbox.agent.signal(p, signal, all).await {
                    log::debug!("kill --all of stopped {p}: {e}");
                }
            }
            return Err(ShimError::NotFound(format!("{p}: process already finished")));
        }
        sandbox.agent.signal(p, signal, all).await
    }

    /// Deletes a process; returns its pid and exit.
    pub async fn delete(&self, p: &ProcessRef) -> Result<(u32, ExitInfo), ShimError> {
        let c = self.container(&p.container)?;
        if p.exec.is_some() {
            let _op = c.ops.read().await;
            let _exec = c.with(|procs| procs.get(p).map(|e| e.op.clone()))?.lock_owned().await;
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

    pub(super) async fn delete_init(&self, c: &Arc<Container>, p: &ProcessRef) -> Result<(u32, ExitInfo), ShimError> {
        let _op = c.ops.write().await;
        self.still_registered(c)?;
        let pid = c.with(|procs| procs.init.apply(Transition::Delete, p).map(|_| procs.init.pid))?;
        let sandbox = self.sandbox();
        // The last container is not removed in the guest: the sandbox's shutdown right
        // after stops, syncs and unmounts everything, and the VM goes with its state (a
        // libcontainer delete there cost about 40 ms of every `ctr run --rm` under TCG).
        let last = self.is_last(c);
        if let (Ok(s), false) = (&sandbox, last) {
            remove_in_guest(s, &c.id).await;
        }
        let exit = c.with(|procs| {
            procs.deleted = true;
            // Waiters of processes that never reported an exit (a created init, an exec
            // never started) get one now, without an event.
            let gone = ExitInfo { status: 137, at: now() };
            for e in std::iter::once(&mut procs.init).chain(procs.execs.values_mut()) {
                e.set_exited(gone.clone());
            }
            procs.init.exit()
        });
        let shutdown = self.forget(c, true);
        if let (Ok(s), true, ShutdownJob::Nothing) = (&sandbox, last, &shutdown) {
            // A Create came in since: the sandbox stays, so the guest removes this one.
            remove_in_guest(s, &c.id).await;
        }
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
        if !matches!(shutdown, ShutdownJob::Nothing) {
            log::info!("last container deleted; shutting the sandbox down");
        }
        self.finish_shutdown(shutdown).await;
        // After the container (and, for the last one, the sandbox) is gone, as runc.
        if !c.hooks.poststop.is_empty() {
            let hooks = c.hooks.clone();
            let _ = blocking(move || hooks.run_after(crate::hooks::Stage::Poststop, pid)).await;
        }
        Ok((pid, exit))
    }
}

/// Removes container `id` in the guest (forced); a failure is logged, as the host's side
/// of the delete goes on regardless.
async fn remove_in_guest(s: &Sandbox, id: &Id) {
    if let Err(e) = s.agent.remove(id, true).await {
        log::warn!("remove {id} in the guest: {e}");
    }
}
