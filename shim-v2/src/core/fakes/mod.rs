//! Fakes for the core's unit tests: a guest (agent + VM sharing one state), a hypervisor
//! that boots it, host mounts kept in a set, and a channel event sink. Each can be told to
//! fail or to hold a request until released, to line up the races the core must survive.

mod guest;
mod vm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use vmbox_config::Config;

pub use guest::Guest;
pub use vm::{FakeConnector, FakeHypervisor, FAKE_VMM_PID};

use super::seams::{ContainerMounts, HostFs, Layout, Seams};
use super::Core;
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
