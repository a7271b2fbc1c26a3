//! The watchers: one per process (its exit), one per VM (its death), one per sandbox (the
//! guest's OOM reports). Each records what it saw through the process state machine, which
//! keeps one exit per process, and reports it through the event sink.

use std::sync::Arc;
use std::time::Duration;

/// OOM reports of the guest passed on per second at most (a burst of as many).
pub(crate) const OOM_EVENTS_PER_SEC: u32 = 20;

use vmbox_protocol::Id;

use super::process::{now, timestamp, ExitInfo, Status};
use super::sandbox::Sandbox;
use super::{Container, Core, Slot};
use crate::agent::ProcessRef;
use crate::events::Event;

/// Longest wait for a process's output to drain after it exited; longer means a descendant
/// still holds the pipe (a daemonized child), which must not stall the exit.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status reported for a process whose VM died under it.
pub const LOST: u32 = 255;

impl Core {
    /// Waits in the background for the process's exit, drains its output, records the exit
    /// and publishes TaskExit. A wait that fails (the VM died) reports exit status 255.
    pub(super) fn watch_exit(&self, sandbox: Arc<Sandbox>, c: Arc<Container>, p: ProcessRef, pid: u32) {
        let me = self.me.clone();
        tokio::spawn(async move {
            let info = match sandbox.agent.wait(&p).await {
                Ok(e) => ExitInfo {
                    status: e.status,
                    at: timestamp(e.at_ns),
                },
                Err(e) => {
                    log::warn!("{p}: lost the process ({e}); reporting exit {LOST}");
                    ExitInfo {
                        status: LOST,
                        at: now(),
                    }
                }
            };
            let io = c.with(|procs| procs.get(&p).ok().and_then(|e| e.io.take()));
            if let Some(mut io) = io {
                if tokio::time::timeout(DRAIN_TIMEOUT, io.wait_outputs()).await.is_err() {
                    log::warn!("{p}: output still open {DRAIN_TIMEOUT:?} after exit; closing it");
                }
            }
            let Some(core) = me.upgrade() else { return };
            // After the start event of this process (its start holds the lock for writing).
            let _op = c.ops.read().await;
            c.with(|procs| {
                if procs.deleted {
                    return;
                }
                if let Ok(e) = procs.get(&p) {
                    if e.set_exited(info.clone()) {
                        core.publish(Event::Exit {
                            container: p.container.to_string(),
                            id: p.event_id(),
                            pid,
                            status: info.status,
                            at: info.at,
                        });
                    }
                }
            });
        });
    }

    /// A VMM that exits while the sandbox is in use (crash, kill, guest panic) ends every
    /// process of the sandbox: each gets exit status 255 and a TaskExit at once, instead of
    /// waits that would hang on a dead guest.
    pub(super) fn watch_vm(&self, sandbox: Arc<Sandbox>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            let status = sandbox.vm.wait().await;
            let Some(core) = me.upgrade() else { return };
            let containers: Vec<Arc<Container>> = {
                let st = core.lock();
                match &st.slot {
                    Slot::Running(s) if Arc::ptr_eq(s, &sandbox) => st.containers.values().cloned().collect(),
                    _ => return, // an orderly shutdown
                }
            };
            log::error!(
                "sandbox {}: the VM exited unexpectedly ({status}); guest console:\n{}",
                sandbox.id,
                sandbox.vm.console_tail(20)
            );
            let at = now();
            for c in containers {
                let _op = c.ops.read().await;
                c.with(|procs| {
                    if procs.deleted {
                        return;
                    }
                    let cid = c.id.clone();
                    let init = std::iter::once((None::<Id>, &mut procs.init));
                    let execs = procs.execs.iter_mut().map(|(k, v)| (Some(k.clone()), v));
                    for (exec, e) in init.chain(execs) {
                        let ended = match exec {
                            None => e.status() != Status::Creating,
                            Some(_) => matches!(e.status(), Status::Running | Status::Paused),
                        };
                        if !ended {
                            continue;
                        }
                        if let Some(io) = e.io.as_mut() {
                            io.abort();
                        }
                        if e.set_exited(ExitInfo {
                            status: LOST,
                            at: at.clone(),
                        }) {
                            let p = ProcessRef {
                                container: cid.clone(),
                                exec,
                            };
                            core.publish(Event::Exit {
                                container: cid.to_string(),
                                id: p.event_id(),
                                pid: e.pid,
                                status: LOST,
                                at: at.clone(),
                            });
                        }
                    }
                });
            }
            // Stop the daemons; the containers' files go with their Delete.
            sandbox.vm.stop().await;
        });
    }

    /// Forwards the guest's OOM reports for containers this shim serves (or deleted lately:
    /// the agent checks for a kill right before it removes one).
    pub(super) fn watch_oom(&self, sandbox: Arc<Sandbox>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            // The guest decides how often it reports: at most OOM_EVENTS_PER_SEC reach
            // containerd (and the log), the rest are dropped and counted.
            let mut limit = vmbox_protocol::rate::RateLimiter::new(OOM_EVENTS_PER_SEC);
            loop {
                let Ok(id) = sandbox.agent.next_oom().await else { return };
                let Some(suppressed) = limit.allow(std::time::Instant::now()) else {
                    continue;
                };
                if suppressed > 0 {
                    log::warn!(
                        "{suppressed} OOM reports of the guest dropped: more than {OOM_EVENTS_PER_SEC} a second"
                    );
                }
                let Some(core) = me.upgrade() else { return };
                let known = {
                    let st = core.lock();
                    st.containers.keys().any(|k| k.as_str() == id) || st.deleted.iter().any(|k| k.as_str() == id)
                };
                if !known {
                    log::warn!(
                        "guest reported an OOM kill in unknown container {}; ignored",
                        vmbox_protocol::text::bounded(&id, 128)
                    );
                    continue;
                }
                core.publish(Event::Oom { container: id });
            }
        });
    }
}
