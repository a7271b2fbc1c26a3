//! The sandbox slot's transitions: boot on first use (in a task of its own, no lock held
//! across it), shutdown (graceful, or abandoning a boot), and "the last container is gone".

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use vmbox_config::Config;
use vmbox_oci::Annotations;
use vmbox_protocol::Id;

use super::sandbox::{blocking, Sandbox, Size};
use super::seams::{self, Layout};
use super::{BootOutcome, Core, Slot, RECENTLY_DELETED};
use crate::error::ShimError;
use crate::timing;

impl Core {
    /// The running sandbox, or one booted for `id` sized by its annotations.
    pub(super) async fn sandbox_for(
        &self,
        id: &Id,
        ann: &Annotations,
        config: &Config,
    ) -> Result<Arc<Sandbox>, ShimError> {
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
    pub(super) fn spawn_boot(
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
    pub(super) fn remove_container(&self, id: &Id) -> bool {
        let mut st = self.lock();
        st.containers.remove(id);
        st.deleted.push_back(id.clone());
        while st.deleted.len() > RECENTLY_DELETED {
            st.deleted.pop_front();
        }
        st.containers.is_empty() && matches!(st.slot, Slot::Running(_))
    }
}
