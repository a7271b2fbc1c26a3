//! A standby VM (the warm pool, docs/lifecycle.md) taken over by a fitting sandbox, and
//! stopped, with a VM booted instead, for one that does not fit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use vmbox_config::Config;

use super::{create_req, id, init, running};
use crate::core::fakes::{ChannelSink, FakeConnector, Rig};
use crate::core::sandbox::{Sandbox, Shape, Standby};
use crate::core::seams::{layout, Seams};

/// Boots a standby on the rig's fake hypervisor, as `containerd-shim-vmbox-v2 standby`
/// does, with `vcpus` vCPUs.
async fn standby(rig: &Rig, vcpus: u32) -> (Standby, std::path::PathBuf) {
    let state = rig.bundle.parent().unwrap().join("state");
    let config = Config {
        state_dir: state.clone(),
        ..Config::default()
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let seams = Seams {
        hypervisor: rig.hv.clone(),
        agents: Arc::new(FakeConnector(rig.hv.clone())),
        host: rig.host.clone(),
        events: Arc::new(ChannelSink(tx)),
    };
    let sid = id("s1");
    let l = layout(&state, crate::pool::NAMESPACE, &sid).unwrap();
    let shape = Shape {
        vcpus,
        memory_mib: config.vm.memory_mib,
        cgroup: None,
        network: vmbox_oci::PodNetwork::Loopback,
        hooks: Default::default(),
    };
    let sandbox = Sandbox::boot(
        seams,
        config.clone(),
        crate::pool::NAMESPACE,
        sid,
        l,
        shape,
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .unwrap();
    let s = Standby {
        sandbox,
        config,
        vcpus,
        memory_mib: Config::default().vm.memory_mib,
    };
    (s, state)
}

#[tokio::test]
async fn a_fitting_sandbox_takes_over_the_standby_vm_and_its_cgroup() {
    let rig = Rig::new();
    let mut spec = oci_spec::runtime::Spec::default();
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some("/default/a".into()));
    spec.set_linux(Some(linux));
    std::fs::write(rig.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let (s, state) = standby(&rig, Config::default().vm.vcpus).await;
    rig.core.offer_standby(s);
    running(&rig, "a").await;
    assert_eq!(rig.hv.booted(), 1, "no VM booted besides the standby");
    assert_eq!(
        rig.hv.vm(0).joined.lock().unwrap().as_deref(),
        Some(std::path::Path::new("default/a")),
        "the VM joins the sandbox's host cgroup"
    );
    let own = layout(&state, "default", &id("a")).unwrap();
    assert!(
        own.dir.is_symlink() && own.run_dir.is_symlink(),
        "a dead shim's delete finds the VM"
    );
    rig.guest().exit(&init("a"), 0);
    rig.core.wait(&init("a")).await.unwrap();
    rig.core.delete(&init("a")).await.unwrap();
    assert!(rig.hv.vm(0).stopped.load(Ordering::SeqCst));
    assert!(
        !own.dir.is_symlink() && !own.run_dir.is_symlink(),
        "the links go with the sandbox"
    );
}

#[tokio::test]
async fn a_sandbox_that_does_not_fit_the_standby_boots_its_own_and_the_standby_stops() {
    let rig = Rig::new();
    let (s, _) = standby(&rig, 3).await;
    rig.core.offer_standby(s);
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert_eq!(rig.hv.booted(), 2, "a VM of the sandbox's own size");
    let standby = rig.hv.vm(0);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !standby.stopped.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the standby VM is stopped within 5 s");
    assert!(!rig.hv.vm(1).stopped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn an_unused_standby_is_stopped_when_the_shim_exits() {
    let rig = Rig::new();
    let (s, _) = standby(&rig, 1).await;
    rig.core.offer_standby(s);
    rig.core.discard_standby().await;
    assert!(rig.hv.vm(0).stopped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_standby_whose_vm_died_is_not_taken_over() {
    let rig = Rig::new();
    let (s, _) = standby(&rig, Config::default().vm.vcpus).await;
    rig.hv.vm(0).die();
    rig.core.offer_standby(s);
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert_eq!(rig.hv.booted(), 2, "a VM of its own instead of the dead standby's");
}

#[tokio::test]
async fn a_config_that_differs_only_in_its_pool_still_fits() {
    let rig = Rig::new();
    let (mut s, _) = standby(&rig, Config::default().vm.vcpus).await;
    s.config.pool.size = 5;
    rig.core.offer_standby(s);
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert_eq!(rig.hv.booted(), 1, "the standby was not taken over");
}
