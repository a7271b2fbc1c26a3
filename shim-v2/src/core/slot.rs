//! The sandbox slot's transitions: boot on first use (in a task of its own, no lock held
//! across it), shutdown (graceful, or abandoning a boot), and "the last container is gone".

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmbox_config::Config;
use vmbox_oci::Annotations;
use vmbox_protocol::Id;

use super::sandbox::{blocking, Sandbox, Shape};
use super::seams::{self, Layout};
use super::{BootOutcome, Container, Core, Slot, State, RECENTLY_DELETED};
use crate::error::ShimError;
use crate::timing;

impl Core {
    /// The running sandbox, or one booted for `id` sized by its annotations.
    pub(super) async fn sandbox_for(
        &self,
        id: &Id,
        ann: &Annotations,
        shape: &Shape,
        config: &Config,
    ) -> Result<Arc<Sandbox>, ShimError> {
        loop {
            let mut wait_boot = None;
            let mut wait_shutdown = None;
            {
                let mut st = self.lock();
                if st.closing {
                    return Err(ShimError::FailedPrecondition("the shim is shutting down".into()));
                }
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
                        log::info!(
                            "sandbox {sid}: {} vCPUs, {} MiB, host cgroup {}",
                            shape.vcpus,
                            shape.memory_mib,
                            shape
                                .cgroup
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "(the shim's)".into())
                        );
                        let (tx, rx) = watch::channel(None);
                        let abandoned = Arc::new(AtomicBool::new(false));
                        let task = self.spawn_boot(
                            config.clone(),
                            sid,
                            layout.clone(),
                            shape.clone(),
                            tx,
                            abandoned.clone(),
                        );
                        st.slot = Slot::Booting {
                            ready: rx.clone(),
                            task,
                            layout,
                            abandoned,
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
                if done.wait_for(|d| *d).await.is_err() {
                    return Err(ShimError::FailedPrecondition(
                        "the sandbox's shutdown was abandoned".into(),
                    ));
                }
            }
        }
    }

    /// Boots the sandbox in a task of its own (a Create that gives up does not abandon a
    /// half-built VM) and installs it in the slot, unless a shutdown came first.
    pub(super) fn spawn_boot(
        &self,
        config: Config,
        id: Id,
        layout: Layout,
        shape: Shape,
        tx: watch::Sender<BootOutcome>,
        abandoned: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let me = self.me.clone();
        let seams = self.seams.clone();
        let namespace = self.namespace.clone();
        let (vcpus, memory_mib) = (shape.vcpus, shape.memory_mib);
        let task = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let standby = me.upgrade().and_then(|c| c.take_standby());
            let booted = timing::phase(&format!("sandbox={id}"), "boot", async {
                if let Some(sb) = standby {
                    match sb.misfit(&config, &shape) {
                        None => {
                            let cgroup = shape.cgroup.as_deref();
                            let adopted = sb
                                .sandbox
                                .adopt(seams.clone(), id.clone(), &layout, cgroup, abandoned.clone())
                                .await;
                            match adopted {
                                Ok(s) => return Ok(s),
                                Err(e) => {
                                    log::warn!("sandbox {id}: taking over the standby VM failed ({e}); booting one")
                                }
                            }
                        }
                        Some(why) => {
                            log::info!("sandbox {id}: not on the standby VM: {why}; booting one");
                            tokio::spawn(async move { sb.sandbox.stop_hard().await });
                        }
                    }
                }
                Sandbox::boot(seams, config, &namespace, id.clone(), layout, shape, abandoned.clone()).await
            })
            .await;
            let Some(core) = me.upgrade() else { return };
            let outcome = match booted {
                Ok(s) => {
                    let s = Arc::new(s);
                    let installed = {
                        let mut st = core.lock();
                        if ours(&st.slot, &abandoned) {
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
                        vcpus,
                        memory_mib,
                        s.vm.accel().name()
                    );
                    core.watch_vm(s.clone());
                    core.watch_oom(s.clone());
                    Ok(s)
                }
                Err(e) => {
                    let mut st = core.lock();
                    if ours(&st.slot, &abandoned) {
                        st.slot = Slot::Empty;
                    }
                    Err(Arc::new(e))
                }
            };
            let _ = tx.send(Some(outcome));
        });
        task
    }

    /// Stops the sandbox (graceful: containers stopped, filesystems flushed, then the VM
    /// stopped from the host), or abandons its boot. Returns once it is gone; concurrent calls wait for the first.
    /// With `close`, the shim is about to exit: no sandbox boots again.
    pub async fn shutdown_sandbox(&self, close: bool) {
        let job = {
            let mut st = self.lock();
            st.closing |= close;
            begin_shutdown(&mut st)
        };
        self.finish_shutdown(job).await;
    }

    /// containerd's Shutdown: if no container is left (Creates in flight count), closes
    /// the shim (no sandbox boots again) and stops the sandbox; whether it did.
    pub async fn shutdown_if_empty(&self) -> bool {
        let job = {
            let mut st = self.lock();
            if !st.containers.is_empty() {
                return false;
            }
            st.closing = true;
            begin_shutdown(&mut st)
        };
        self.finish_shutdown(job).await;
        true
    }

    pub(super) async fn finish_shutdown(&self, job: ShutdownJob) {
        let done = match job {
            ShutdownJob::Nothing => return,
            ShutdownJob::Wait(mut done) => {
                let _ = done.wait_for(|d| *d).await;
                return;
            }
            ShutdownJob::Stop { sandbox, done } => {
                sandbox.shutdown().await;
                done
            }
            ShutdownJob::Abandon {
                task,
                layout,
                abandoned,
                done,
            } => {
                log::info!("shutdown during the sandbox's boot: abandoning it");
                task.abort();
                // Returns at the boot's next await: whatever it did synchronously (a run
                // directory, daemons, which die with it) is done before the cleanup.
                let _ = task.await;
                let (hv, host) = (self.seams.hypervisor.clone(), self.seams.host.clone());
                let _ = blocking(move || {
                    // Aborting the boot cannot stop a host setup already on a blocking
                    // thread: wait for it, and keep one not started yet from running.
                    super::abandon_boot(&abandoned);
                    if let Err(e) = hv.cleanup(&layout.run_dir) {
                        log::warn!("{e}");
                    }
                    host.remove(&layout.dir);
                })
                .await;
                done
            }
        };
        self.lock().slot = Slot::Empty;
        let _ = done.send(true);
    }

    /// Whether `c` is the only container registered (Creates in flight count) in a
    /// running sandbox, i.e. whether forgetting it now would stop the sandbox.
    pub(super) fn is_last(&self, c: &Arc<Container>) -> bool {
        let st = self.lock();
        st.containers.len() == 1
            && st.containers.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, c))
            && matches!(st.slot, Slot::Running(_))
    }

    /// Forgets container `c` (if it is still the one registered under its id); when it was
    /// the last one of the running sandbox, the sandbox's shutdown begins in the same locked
    /// step, so a Create arriving later waits for it instead of using a dying VM. The caller
    /// runs the returned job ([`Core::finish_shutdown`]).
    pub(super) fn forget(&self, c: &Arc<Container>, deleted: bool) -> ShutdownJob {
        let mut st = self.lock();
        if st.containers.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, c)) {
            st.containers.remove(&c.id);
        }
        if deleted {
            st.deleted.push_back(c.id.clone());
            while st.deleted.len() > RECENTLY_DELETED {
                st.deleted.pop_front();
            }
        }
        if st.containers.is_empty() && matches!(st.slot, Slot::Running(_)) {
            begin_shutdown(&mut st)
        } else {
            ShutdownJob::Nothing
        }
    }
}

/// Serializes a boot's host setup with the cleanup of an abandoned boot: aborting the boot
/// cannot stop a setup already running on a blocking thread.
pub(super) static HOST_SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a shutdown has to do once the slot says `ShuttingDown`.
pub(super) enum ShutdownJob {
    Nothing,
    /// Another shutdown is under way: wait for it.
    Wait(watch::Receiver<bool>),
    Stop {
        sandbox: Arc<Sandbox>,
        done: watch::Sender<bool>,
    },
    Abandon {
        task: JoinHandle<()>,
        layout: Layout,
        abandoned: Arc<AtomicBool>,
        done: watch::Sender<bool>,
    },
}

/// Moves the slot to `ShuttingDown` (under the caller's lock) and says what is left to do.
/// The containers' stdio loops are stopped and the containers forgotten.
pub(super) fn begin_shutdown(st: &mut State) -> ShutdownJob {
    match &st.slot {
        Slot::Empty => return ShutdownJob::Nothing,
        Slot::ShuttingDown { done, .. } => return ShutdownJob::Wait(done.clone()),
        Slot::Running(_) | Slot::Booting { .. } => {}
    }
    let (tx, rx) = watch::channel(false);
    let sandbox = match &st.slot {
        Slot::Running(s) => Some(s.clone()),
        _ => None,
    };
    let previous = std::mem::replace(&mut st.slot, Slot::ShuttingDown { sandbox, done: rx });
    for (_, c) in st.containers.drain() {
        c.with(|p| {
            for proc in std::iter::once(&mut p.init).chain(p.execs.values_mut()) {
                if let Some(io) = proc.io.as_mut() {
                    io.abort();
                }
            }
        });
    }
    match previous {
        Slot::Running(sandbox) => ShutdownJob::Stop { sandbox, done: tx },
        Slot::Booting {
            task,
            layout,
            abandoned,
            ..
        } => ShutdownJob::Abandon {
            task,
            layout,
            abandoned,
            done: tx,
        },
        Slot::Empty | Slot::ShuttingDown { .. } => ShutdownJob::Nothing,
    }
}

/// Whether `slot` is the boot that owns `abandoned` (not a later one).
fn ours(slot: &Slot, abandoned: &Arc<AtomicBool>) -> bool {
    matches!(slot, Slot::Booting { abandoned: a, .. } if Arc::ptr_eq(a, abandoned))
}
