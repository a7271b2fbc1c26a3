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
mod lifecycle;
pub mod process;
pub mod sandbox;
pub mod seams;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use containerd_shim::protos::api::Mount;
use tokio::sync::{watch, RwLock, Semaphore};
use tokio::task::JoinHandle;
use vmbox_config::Config;
use vmbox_protocol::agent as pb;
use vmbox_protocol::Id;

use crate::agent::ProcessRef;
use crate::error::ShimError;
use crate::events::Event;
use crate::io::StdioPaths;
use process::{now, ExitInfo, Process, Status, Transition};
use sandbox::Sandbox;
use seams::{Layout, Seams};

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
        task: JoinHandle<()>,
        layout: Layout,
        /// Set (under [`slot::HOST_SETUP`]) when the boot is abandoned: a host setup that
        /// has not run yet then does nothing.
        abandoned: Arc<std::sync::atomic::AtomicBool>,
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
    /// Its OCI hooks that run on the host.
    pub hooks: crate::hooks::HostHooks,
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
    /// The shim is about to exit (SIGTERM, containerd's Shutdown): no new boots.
    closing: bool,
    containers: HashMap<Id, Arc<Container>>,
    deleted: VecDeque<Id>,
}

/// Marks a boot made by [`sandbox::Sandbox::boot`] with `abandoned` as abandoned once no
/// host setup of it is running: a setup that has not started yet then does nothing.
/// Blocking (waits for a running setup).
pub fn abandon_boot(abandoned: &std::sync::atomic::AtomicBool) {
    let _setup = slot::HOST_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// A Create, decoded.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: Id,
    pub bundle: String,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    pub checkpoint: String,
    /// The vmbox config file containerd's runtime options name (`ConfigPath`), if any.
    pub config_path: Option<std::path::PathBuf>,
}

/// The config in use and the file it came from (`None`: the environment's).
struct ChosenConfig {
    config: Result<Config, String>,
    path: Option<std::path::PathBuf>,
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
    /// The environment's config (`VMBOX_CONFIG` or the default file) until a Create names
    /// one in containerd's runtime options; see [`Core::config_for`].
    config: Mutex<ChosenConfig>,
    namespace: String,
    seams: Seams,
    state: Mutex<State>,
    starts: Semaphore,
    /// A VM booted before this shim served containerd (a claimed standby shim's); the
    /// first boot takes it over if the sandbox fits it, else it is stopped.
    standby: Mutex<Option<sandbox::Standby>>,
    me: Weak<Core>,
}

impl Core {
    pub fn new(config: Result<Config, String>, namespace: &str, seams: Seams) -> Arc<Core> {
        Arc::new_cyclic(|me| Core {
            config: Mutex::new(ChosenConfig { config, path: None }),
            namespace: namespace.to_string(),
            seams,
            state: Mutex::new(State {
                slot: Slot::Empty,
                closing: false,
                containers: HashMap::new(),
                deleted: VecDeque::new(),
            }),
            starts: Semaphore::new(MAX_STARTS),
            standby: Mutex::new(None),
            me: me.clone(),
        })
    }

    /// Hands the core a standby sandbox for its first boot ([`sandbox::Standby`]).
    pub fn offer_standby(&self, s: sandbox::Standby) {
        *self.standby.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    fn take_standby(&self) -> Option<sandbox::Standby> {
        self.standby.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Stops a standby sandbox no boot took over (the shim is exiting).
    pub async fn discard_standby(&self) {
        if let Some(s) = self.take_standby() {
            log::info!("stopping the standby VM no sandbox took over");
            s.sandbox.stop_hard().await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The config a Create uses. `path` (containerd's runtime options, per RuntimeClass)
    /// is adopted by the shim's first sandbox; afterwards the shim's sandbox keeps the
    /// config it booted with, and a different path is ignored with a warning.
    ///
    /// Errors: the environment's config or the named file is invalid (InvalidArgument,
    /// naming the file and key).
    ///
    /// Returns the config and the file it came from (`None`: the environment's).
    pub(super) fn config_for(
        &self,
        path: Option<&std::path::Path>,
    ) -> Result<(Config, Option<std::path::PathBuf>), ShimError> {
        // Lock order: state, then config; the choice is made while no sandbox can appear.
        let st = self.lock();
        let first = matches!(st.slot, Slot::Empty) && st.containers.is_empty();
        let mut chosen = self.config.lock().unwrap_or_else(|p| p.into_inner());
        match path {
            Some(p) if chosen.path.as_deref() != Some(p) => {
                if first {
                    // A file that does not load is not adopted: the next Create tries again.
                    let config = Config::from_file(p).map_err(|e| ShimError::Invalid(e.to_string()))?;
                    chosen.config = Ok(config);
                    chosen.path = Some(p.to_path_buf());
                    log::info!("config from the runtime options: {}", p.display());
                } else {
                    log::warn!(
                        "runtime options name config {} but this shim's sandbox runs with {}: kept",
                        p.display(),
                        chosen
                            .path
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "the default".into())
                    );
                }
            }
            _ => {}
        }
        drop(st);
        let config = chosen.config.clone().map_err(ShimError::Invalid)?;
        Ok((config, chosen.path.clone()))
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

    /// NotFound unless `c` is still the container registered under its id (a request that
    /// waited for its lock may find it gone: a failed create, a shutdown).
    fn still_registered(&self, c: &Arc<Container>) -> Result<(), ShimError> {
        match self.lock().containers.get(&c.id) {
            Some(x) if Arc::ptr_eq(x, c) => Ok(()),
            _ => Err(ShimError::NotFound(format!("container {} not found", c.id))),
        }
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
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.lock().containers.is_empty()
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
        let c = self.container(id)?;
        let sandbox = self.sandbox()?;
        let _op = c.ops.write().await;
        self.still_registered(&c)?;
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
        self.container(id)?;
        let sandbox = self.sandbox()?;
        sandbox.agent.pids(id).await
    }

    pub async fn stats(&self, id: &Id) -> Result<pb::StatsContainerResponse, ShimError> {
        self.container(id)?;
        let sandbox = self.sandbox()?;
        sandbox.agent.stats(id).await
    }

    pub async fn update(&self, id: &Id, resources: Vec<u8>) -> Result<(), ShimError> {
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| ShimError::Invalid(format!("update {id}: resources: {e}")))?;
        self.container(id)?;
        let sandbox = self.sandbox()?;
        sandbox.agent.update(id, resources).await
    }

    pub async fn resize_pty(&self, p: &ProcessRef, rows: u32, cols: u32) -> Result<(), ShimError> {
        let c = self.container(&p.container)?;
        c.with(|procs| procs.get(p).map(|_| ()))?;
        let sandbox = self.sandbox()?;
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
