//! The fake guest: its agent's answers and its processes' exits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use vmbox_hypervisor::VmExit;
use vmbox_protocol::agent::StatsContainerResponse;
use vmbox_protocol::Id;

use super::Gate;
use crate::agent::{GuestAgent, GuestContainer, GuestExit, ProcessRef, StreamIds};
use crate::error::ShimError;

/// One fake guest: what its agent was asked and what its processes do.
#[derive(Default)]
pub struct Guest {
    /// Container id -> started; removed by `remove`.
    pub containers: Mutex<HashMap<String, bool>>,
    pub execs: Mutex<HashSet<ProcessKey>>,
    exits: Mutex<HashMap<ProcessKey, watch::Sender<Option<u32>>>>,
    pub(super) dead: watch::Sender<bool>,
    /// The VMM's exit (the guest powering off ends it, as with QEMU's -no-reboot).
    pub(super) vm_exit: watch::Sender<Option<VmExit>>,
    pub fail_create: AtomicBool,
    pub creates: AtomicUsize,
    /// Containers removed by `remove` (not by the shutdown).
    pub removes: AtomicUsize,
    pub create_gate: Gate,
    pub start_gate: Gate,
    pub shutdown_gate: Gate,
    pub exec_gate: Gate,
    /// Execs exit with status 0 as soon as they start.
    pub execs_exit_at_once: AtomicBool,
    next_pid: AtomicU32,
    /// The network the host set up, and how many containers existed by then.
    pub network: Mutex<Option<(vmbox_network::Network, usize)>>,
    oom: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    oom_tx: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

/// (container id, exec id or "").
type ProcessKey = (String, String);

fn key(p: &ProcessRef) -> ProcessKey {
    (
        p.container.to_string(),
        p.exec.as_ref().map(|e| e.to_string()).unwrap_or_default(),
    )
}

impl Guest {
    pub fn new() -> Arc<Guest> {
        let g = Guest::default();
        g.next_pid.store(100, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        *g.oom.lock().unwrap() = Some(rx);
        *g.oom_tx.lock().unwrap() = Some(tx);
        Arc::new(g)
    }

    fn exit_tx(&self, p: &ProcessRef) -> watch::Sender<Option<u32>> {
        self.exits
            .lock()
            .unwrap()
            .entry(key(p))
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// The process exits with `status`.
    pub fn exit(&self, p: &ProcessRef, status: u32) {
        self.exit_tx(p).send_replace(Some(status));
    }

    /// The guest reports an OOM kill in `container`.
    pub fn oom(&self, container: &str) {
        if let Some(tx) = self.oom_tx.lock().unwrap().as_ref() {
            let _ = tx.send(container.to_string());
        }
    }

    pub fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    fn alive(&self) -> Result<(), ShimError> {
        match self.is_dead() {
            true => Err(ShimError::Agent("connection closed: the VM is gone".into())),
            false => Ok(()),
        }
    }

    fn pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::SeqCst)
    }
}

#[async_trait]
impl GuestAgent for Guest {
    async fn create(&self, c: GuestContainer) -> Result<u32, ShimError> {
        self.create_gate.pass().await;
        self.alive()?;
        self.creates.fetch_add(1, Ordering::SeqCst);
        self.containers.lock().unwrap().insert(c.id.to_string(), false);
        if self.fail_create.load(Ordering::SeqCst) {
            return Err(ShimError::Agent("injected: the reply was lost".into()));
        }
        Ok(self.pid())
    }

    async fn start(&self, container: &Id) -> Result<u32, ShimError> {
        self.start_gate.pass().await;
        self.alive()?;
        match self.containers.lock().unwrap().get_mut(container.as_str()) {
            Some(started) => *started = true,
            None => return Err(ShimError::NotFound(format!("container {container} not found"))),
        }
        Ok(self.pid())
    }

    async fn exec(&self, p: &ProcessRef, _process: Vec<u8>, _stdio: StreamIds) -> Result<u32, ShimError> {
        self.exec_gate.pass().await;
        self.alive()?;
        self.execs.lock().unwrap().insert(key(p));
        if self.execs_exit_at_once.load(Ordering::SeqCst) {
            self.exit(p, 0);
        }
        Ok(self.pid())
    }

    async fn signal(&self, p: &ProcessRef, signal: u32, _all: bool) -> Result<(), ShimError> {
        self.alive()?;
        self.exit(p, 128 + signal);
        Ok(())
    }

    async fn wait(&self, p: &ProcessRef) -> Result<GuestExit, ShimError> {
        let mut exit = self.exit_tx(p).subscribe();
        let mut dead = self.dead.subscribe();
        tokio::select! {
            r = exit.wait_for(|e| e.is_some()) => {
                let status = r.ok().and_then(|s| *s).unwrap_or(255);
                Ok(GuestExit { status, at_ns: 1 })
            }
            _ = dead.wait_for(|d| *d) => Err(ShimError::Agent("connection closed: the VM is gone".into())),
        }
    }

    async fn resize_pty(&self, _: &ProcessRef, _: u32, _: u32) -> Result<(), ShimError> {
        self.alive()
    }

    async fn pids(&self, _: &Id) -> Result<Vec<u32>, ShimError> {
        self.alive().map(|_| vec![1])
    }

    async fn stats(&self, _: &Id) -> Result<StatsContainerResponse, ShimError> {
        self.alive().map(|_| StatsContainerResponse::default())
    }

    async fn pause(&self, _: &Id) -> Result<(), ShimError> {
        self.alive()
    }

    async fn resume(&self, _: &Id) -> Result<(), ShimError> {
        self.alive()
    }

    async fn update(&self, _: &Id, _: Vec<u8>) -> Result<(), ShimError> {
        self.alive()
    }

    async fn listeners(&self) -> Result<Vec<u16>, ShimError> {
        self.alive()?;
        Ok(Vec::new())
    }

    async fn setup_network(&self, net: &vmbox_network::Network) -> Result<vmbox_network::Network, ShimError> {
        self.alive()?;
        let containers = self.containers.lock().unwrap().len();
        *self.network.lock().unwrap() = Some((net.clone(), containers));
        Ok(net.clone())
    }

    async fn remove(&self, container: &Id, _force: bool) -> Result<(), ShimError> {
        self.alive()?;
        self.removes.fetch_add(1, Ordering::SeqCst);
        self.containers.lock().unwrap().remove(container.as_str());
        self.execs.lock().unwrap().retain(|(c, _)| c != container.as_str());
        Ok(())
    }

    async fn next_oom(&self) -> Result<String, ShimError> {
        let rx = self.oom.lock().unwrap().take();
        let Some(mut rx) = rx else {
            return std::future::pending().await;
        };
        let mut dead = self.dead.subscribe();
        let r = tokio::select! {
            id = rx.recv() => id.ok_or_else(|| ShimError::Agent("closed".into())),
            _ = dead.wait_for(|d| *d) => Err(ShimError::Agent("closed".into())),
        };
        *self.oom.lock().unwrap() = Some(rx);
        r
    }

    async fn shutdown(&self, _grace: Duration, _total: Duration) -> Result<u32, ShimError> {
        self.shutdown_gate.pass().await;
        self.alive()?;
        self.containers.lock().unwrap().clear();
        self.dead.send_replace(true);
        self.vm_exit.send_replace(Some(VmExit::Exited(0)));
        Ok(0)
    }
}
