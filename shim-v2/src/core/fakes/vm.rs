//! The fake VM and the hypervisor that boots it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use vmbox_config::Timeouts;
use vmbox_hypervisor::{Accel, BootTimes, Conn, Hypervisor, HypervisorError, Vm, VmExit, VmSpec};
use vmbox_protocol::agent::Hello;

use super::{Gate, Guest};

/// The host pid every fake VM reports for its VMM.
pub const FAKE_VMM_PID: u32 = 4242;
use crate::agent::GuestAgent;
use crate::core::seams::AgentConnector;

/// The fake guest's VM.
pub struct FakeVm {
    pub guest: Arc<Guest>,
    name: String,
    hello: Hello,
    pub stopped: Arc<AtomicBool>,
    peers: Mutex<Vec<tokio::net::UnixStream>>,
    /// One `eth0` when the spec named a network namespace, as QEMU's attach would find.
    pub network: vmbox_network::Network,
    /// The host cgroup it was moved into by `join_cgroup`.
    pub joined: Mutex<Option<PathBuf>>,
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
    fn vmm_pid(&self) -> u32 {
        FAKE_VMM_PID
    }
    fn console_tail(&self, _: usize) -> String {
        "fake console".into()
    }
    fn network(&self) -> &vmbox_network::Network {
        &self.network
    }
    async fn join_cgroup(&self, path: &Path) -> Result<(), HypervisorError> {
        *self.joined.lock().unwrap() = Some(path.to_path_buf());
        Ok(())
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
    fn vmm_pid(&self) -> u32 {
        self.0.vmm_pid()
    }
    fn console_tail(&self, n: usize) -> String {
        self.0.console_tail(n)
    }
    fn network(&self) -> &vmbox_network::Network {
        self.0.network()
    }
    async fn join_cgroup(&self, path: &Path) -> Result<(), HypervisorError> {
        self.0.join_cgroup(path).await
    }
    async fn stop(&self) {
        self.0.stop().await
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn start(&self, _: &vmbox_config::Config, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
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
            network: match spec.network {
                Some(_) => vmbox_network::Network {
                    interfaces: vec![vmbox_network::Interface {
                        name: "eth0".into(),
                        mac: vmbox_network::Mac([2, 0x42, 10, 88, 0, 2]),
                        mtu: 1400,
                        noarp: false,
                        addresses: vec![vmbox_network::IpNetwork::V4(
                            ipnetwork::Ipv4Network::new([10, 88, 0, 2].into(), 16).expect("a valid prefix"),
                        )],
                    }],
                    ..Default::default()
                },
                None => vmbox_network::Network::default(),
            },
            joined: Mutex::new(None),
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
