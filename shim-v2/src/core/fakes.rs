//! Fakes for the core's unit tests: a guest (agent + VM sharing one state), a hypervisor
//! that boots it, host mounts kept in a set, and a channel event sink. Each can be told to
//! fail or to hold a request until released, to line up the races the core must survive.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Semaphore};
use vmbox_config::{Config, Timeouts};
use vmbox_hypervisor::{Accel, BootTimes, Conn, Hypervisor, HypervisorError, Vm, VmExit, VmSpec};
use vmbox_protocol::agent::{Hello, StatsContainerResponse};
use vmbox_protocol::Id;

use super::seams::{AgentConnector, ContainerMounts, HostFs, Layout, Seams};
use super::Core;
use crate::agent::{GuestAgent, GuestContainer, GuestExit, ProcessRef, StreamIds};
use crate::error::ShimError;
use crate::events::{Event, EventSink};

/// A gate a fake request waits at until the test opens it.
pub struct Gate {
    closed: AtomicBool,
    open: Semaphore,
    /// Requests waiting at the gate now.
    pub waiting: AtomicUsize,
    arrived: tokio::sync::Notify,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            open: Semaphore::new(0),
            waiting: AtomicUsize::new(0),
            arrived: tokio::sync::Notify::new(),
        }
    }
}

impl Gate {
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.open.add_permits(1000);
    }

    async fn pass(&self) {
        if self.closed.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.arrived.notify_waiters();
            let _ = self.open.acquire().await.map(|p| p.forget());
        }
    }

    /// Waits (bounded) until a request is held at the gate.
    pub async fn reached(&self) {
        let t = tokio::time::timeout(Duration::from_secs(5), async {
            while self.waiting.load(Ordering::SeqCst) == 0 {
                let n = self.arrived.notified();
                if self.waiting.load(Ordering::SeqCst) > 0 {
                    break;
                }
                n.await;
            }
        });
        t.await.expect("no request reached the gate within 5 s");
    }
}

/// One fake guest: what its agent was asked and what its processes do.
#[derive(Default)]
pub struct Guest {
    /// Container id -> started; removed by `remove`.
    pub containers: Mutex<HashMap<String, bool>>,
    pub execs: Mutex<HashSet<ProcessKey>>,
    exits: Mutex<HashMap<ProcessKey, watch::Sender<Option<u32>>>>,
    dead: watch::Sender<bool>,
    /// The VMM's exit (the guest powering off ends it, as with QEMU's -no-reboot).
    vm_exit: watch::Sender<Option<VmExit>>,
    pub fail_create: AtomicBool,
    pub creates: AtomicUsize,
    pub create_gate: Gate,
    pub start_gate: Gate,
    /// Execs exit with status 0 as soon as they start.
    pub execs_exit_at_once: AtomicBool,
    next_pid: AtomicU32,
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

    async fn remove(&self, container: &Id, _force: bool) -> Result<(), ShimError> {
        self.alive()?;
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
        self.alive()?;
        self.containers.lock().unwrap().clear();
        self.dead.send_replace(true);
        self.vm_exit.send_replace(Some(VmExit::Exited(0)));
        Ok(0)
    }
}

/// The fake guest's VM.
pub struct FakeVm {
    pub guest: Arc<Guest>,
    name: String,
    hello: Hello,
    pub stopped: Arc<AtomicBool>,
    peers: Mutex<Vec<tokio::net::UnixStream>>,
}

impl FakeVm {
    /// The VMM crashes.
    pub fn die(&self) {
        self.guest.dead.send_replace(true);
        self.guest.vm_exit.send_replace(Some(VmExit::Signaled(9)));
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn name(&self) -> &str {
        &self.name
    }
    fn hello(&self) -> &Hello {
        &self.hello
    }
    fn boot_times(&self) -> BootTimes {
        BootTimes::default()
    }
    fn accel(&self) -> Accel {
        Accel::Tcg
    }
    async fn connect(&self, port: u32) -> Result<Conn, HypervisorError> {
        if self.guest.is_dead() {
            return Err(HypervisorError::Vsock {
                port,
                detail: "the VM is gone".into(),
            });
        }
        let (a, b) = tokio::net::UnixStream::pair().map_err(|e| HypervisorError::Vsock {
            port,
            detail: e.to_string(),
        })?;
        self.peers.lock().unwrap().push(b);
        Ok(Conn::Unix(a))
    }
    async fn pause(&self) -> Result<(), HypervisorError> {
        Ok(())
    }
    async fn resume(&self) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn exited(&self) -> Option<VmExit> {
        self.guest.vm_exit.borrow().clone()
    }
    async fn wait_exit(&self, timeout: Duration) -> Option<VmExit> {
        let mut rx = self.guest.vm_exit.subscribe();
        let r = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
        r.ok().and_then(|r| r.ok().and_then(|e| e.clone()))
    }
    async fn wait(&self) -> VmExit {
        let mut rx = self.guest.vm_exit.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await;
        r.ok().and_then(|e| e.clone()).unwrap_or(VmExit::NeverStarted)
    }
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
    fn console_tail(&self, _: usize) -> String {
        "fake console".into()
    }
    async fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.guest.dead.send_replace(true);
        self.guest.vm_exit.send_replace(Some(VmExit::Exited(0)));
    }
}

/// Boots fake VMs, each with a fresh [`Guest`].
#[derive(Default)]
pub struct FakeHypervisor {
    pub vms: Mutex<Vec<Arc<FakeVm>>>,
    pub boot_gate: Gate,
    pub fail_boot: AtomicBool,
    pub cleanups: Mutex<Vec<PathBuf>>,
}

/// A `Box<dyn Vm>` sharing a [`FakeVm`] the test keeps.
struct SharedVm(Arc<FakeVm>);

#[async_trait]
impl Vm for SharedVm {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn hello(&self) -> &Hello {
        self.0.hello()
    }
    fn boot_times(&self) -> BootTimes {
        self.0.boot_times()
    }
    fn accel(&self) -> Accel {
        self.0.accel()
    }
    async fn connect(&self, port: u32) -> Result<Conn, HypervisorError> {
        self.0.connect(port).await
    }
    async fn pause(&self) -> Result<(), HypervisorError> {
        self.0.pause().await
    }
    async fn resume(&self) -> Result<(), HypervisorError> {
        self.0.resume().await
    }
    fn exited(&self) -> Option<VmExit> {
        self.0.exited()
    }
    async fn wait_exit(&self, timeout: Duration) -> Option<VmExit> {
        self.0.wait_exit(timeout).await
    }
    async fn wait(&self) -> VmExit {
        self.0.wait().await
    }
    fn pids(&self) -> Vec<u32> {
        self.0.pids()
    }
    fn console_tail(&self, n: usize) -> String {
        self.0.console_tail(n)
    }
    async fn stop(&self) {
        self.0.stop().await
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        self.boot_gate.pass().await;
        if self.fail_boot.load(Ordering::SeqCst) {
            return Err(HypervisorError::Spec("injected boot failure".into()));
        }
        let vm = Arc::new(FakeVm {
            guest: Guest::new(),
            name: spec.name,
            hello: Hello::default(),
            stopped: Arc::new(AtomicBool::new(false)),
            peers: Mutex::new(Vec::new()),
        });
        self.vms.lock().unwrap().push(vm.clone());
        Ok(Box::new(SharedVm(vm)))
    }

    fn cleanup(&self, run_dir: &Path) -> Result<(), HypervisorError> {
        self.cleanups.lock().unwrap().push(run_dir.to_path_buf());
        Ok(())
    }
}

impl FakeHypervisor {
    pub fn vm(&self, i: usize) -> Arc<FakeVm> {
        self.vms.lock().unwrap()[i].clone()
    }

    pub fn booted(&self) -> usize {
        self.vms.lock().unwrap().len()
    }
}

/// Hands out the VM's guest as its agent.
pub struct FakeConnector(pub Arc<FakeHypervisor>);

impl AgentConnector for FakeConnector {
    fn connect(&self, _conn: Conn, _: &Timeouts) -> Arc<dyn GuestAgent> {
        let vms = self.0.vms.lock().unwrap();
        let vm = vms.last().expect("a VM was booted before its agent is connected");
        vm.guest.clone()
    }
}

/// Host mounts as a set of targets.
#[derive(Default)]
pub struct FakeHost {
    pub mounted: Mutex<HashSet<PathBuf>>,
    pub sandboxes: Mutex<HashSet<PathBuf>>,
}

impl HostFs for FakeHost {
    fn prepare_sandbox(&self, layout: &Layout) -> Result<(), ShimError> {
        self.sandboxes.lock().unwrap().insert(layout.dir.clone());
        Ok(())
    }
    fn mount_container(&self, m: &ContainerMounts) -> Result<(), ShimError> {
        self.mounted.lock().unwrap().insert(m.target.clone());
        Ok(())
    }
    fn remove(&self, dir: &Path) {
        self.mounted.lock().unwrap().retain(|m| !m.starts_with(dir));
        self.sandboxes.lock().unwrap().retain(|m| !m.starts_with(dir));
    }
}

/// Events into a channel the test reads.
pub struct ChannelSink(pub mpsc::UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn publish(&self, event: Event) {
        let _ = self.0.send(event);
    }
}

/// A core on fakes, with the handles to drive and inspect them.
pub struct Rig {
    pub core: Arc<Core>,
    pub hv: Arc<FakeHypervisor>,
    pub host: Arc<FakeHost>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub bundle: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static RIGS: AtomicUsize = AtomicUsize::new(0);

impl Rig {
    pub fn new() -> Rig {
        let dir = std::env::temp_dir().join(format!(
            "vmbox-core-{}-{}",
            std::process::id(),
            RIGS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        let spec = oci_spec::runtime::Spec::default();
        std::fs::write(dir.join("bundle/config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let config = Config {
            state_dir: dir.join("state"),
            ..Config::default()
        };
        let hv = Arc::new(FakeHypervisor::default());
        let host = Arc::new(FakeHost::default());
        let (tx, events) = mpsc::unbounded_channel();
        let seams = Seams {
            hypervisor: hv.clone(),
            agents: Arc::new(FakeConnector(hv.clone())),
            host: host.clone(),
            events: Arc::new(ChannelSink(tx)),
        };
        Rig {
            core: Core::new(Ok(config), "default", seams),
            hv,
            host,
            events,
            bundle: dir.join("bundle"),
            _dir: TempDir(dir),
        }
    }

    /// The next event (bounded wait).
    pub async fn event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("no event within 5 s")
            .expect("event channel closed")
    }

    /// Events until (and including) the first that `stop` matches.
    pub async fn events_until(&mut self, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            let e = self.event().await;
            let done = stop(&e);
            out.push(e);
            if done {
                return out;
            }
        }
    }

    pub fn guest(&self) -> Arc<Guest> {
        self.hv.vm(0).guest.clone()
    }
}
