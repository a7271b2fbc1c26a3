//! The core against fakes (no VM, milliseconds each): every transition here, the races
//! between requests the core must survive in `races.rs`.

mod races;
mod standby;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmbox_protocol::Id;

use super::fakes::Rig;
use super::process::Status;
use super::CreateRequest;
use crate::agent::ProcessRef;
use crate::error::ShimError;
use crate::events::Event;
use crate::io::StdioPaths;

pub(super) fn id(s: &str) -> Id {
    Id::parse("id", s).unwrap()
}

pub(super) fn init(c: &str) -> ProcessRef {
    ProcessRef::init(id(c))
}

pub(super) fn exec(c: &str, e: &str) -> ProcessRef {
    ProcessRef {
        container: id(c),
        exec: Some(id(e)),
    }
}

pub(super) fn create_req(rig: &Rig, c: &str) -> CreateRequest {
    CreateRequest {
        id: id(c),
        bundle: rig.bundle.display().to_string(),
        rootfs: Vec::new(),
        stdio: StdioPaths::default(),
        checkpoint: String::new(),
        config_path: None,
    }
}

pub(super) const PROCESS: &[u8] = br#"{"cwd":"/","args":["true"],"user":{"uid":0,"gid":0}}"#;

pub(super) fn code(e: &ShimError) -> ttrpc::Code {
    e.code()
}

pub(super) fn is_exit(e: &Event) -> bool {
    matches!(e, Event::Exit { .. })
}

pub(super) async fn running(rig: &Rig, c: &str) {
    rig.core.create(create_req(rig, c)).await.unwrap();
    rig.core.start(&init(c)).await.unwrap();
}

#[tokio::test]
async fn create_start_exit_delete_report_their_events_in_order() {
    let mut rig = Rig::new();
    let pid = rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert!(matches!(rig.event().await, Event::Create { pid: p, .. } if p == pid));
    assert_eq!(rig.core.state(&init("a")).unwrap().status, Status::Created);
    rig.core.start(&init("a")).await.unwrap();
    assert!(matches!(rig.event().await, Event::Start { .. }));
    rig.guest().exit(&init("a"), 3);
    match rig.event().await {
        Event::Exit { status, id, .. } => assert_eq!((status, id.as_str()), (3, "a")),
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.core.wait(&init("a")).await.unwrap().status, 3);
    let (_, exit) = rig.core.delete(&init("a")).await.unwrap();
    assert_eq!(exit.status, 3);
    assert!(matches!(rig.event().await, Event::Delete { status: 3, .. }));
    assert!(
        rig.hv.vm(0).stopped.load(Ordering::SeqCst),
        "the last delete stops the VM"
    );
    assert!(rig.host.mounted.lock().unwrap().is_empty());
    assert!(rig.host.sandboxes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn only_a_container_whose_sandbox_stays_is_removed_in_the_guest() {
    let rig = Rig::new();
    running(&rig, "a").await;
    running(&rig, "b").await;
    for c in ["a", "b"] {
        rig.guest().exit(&init(c), 0);
        rig.core.wait(&init(c)).await.unwrap();
    }
    rig.core.delete(&init("a")).await.unwrap();
    assert_eq!(rig.guest().removes.load(Ordering::SeqCst), 1, "a: the sandbox stays");
    rig.core.delete(&init("b")).await.unwrap();
    assert_eq!(
        rig.guest().removes.load(Ordering::SeqCst),
        1,
        "b, the last one, is left to the sandbox's shutdown"
    );
    assert!(rig.hv.vm(0).stopped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn exec_before_start_is_a_failed_precondition() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    let e = rig
        .core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
}

#[tokio::test]
async fn a_double_start_is_a_failed_precondition() {
    let rig = Rig::new();
    running(&rig, "a").await;
    let e = rig.core.start(&init("a")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    rig.core.start(&exec("a", "e")).await.unwrap();
    let e = rig.core.start(&exec("a", "e")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
}

#[tokio::test]
async fn a_running_container_is_not_deleted() {
    let rig = Rig::new();
    running(&rig, "a").await;
    let e = rig.core.delete(&init("a")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    rig.core.start(&exec("a", "e")).await.unwrap();
    let e = rig.core.delete(&exec("a", "e")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
}

#[tokio::test]
async fn a_create_that_fails_after_the_guest_created_leaves_nothing() {
    let rig = Rig::new();
    running(&rig, "pause").await;
    rig.guest().fail_create.store(true, Ordering::SeqCst);
    let e = rig.core.create(create_req(&rig, "a")).await.unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(rig.guest().creates.load(Ordering::SeqCst), 2);
    assert!(
        !rig.guest().containers.lock().unwrap().contains_key("a"),
        "the guest's container was removed"
    );
    let mounted = rig.host.mounted.lock().unwrap().clone();
    assert!(
        mounted.iter().all(|m| !m.to_string_lossy().contains("/shared/a/")),
        "{mounted:?}"
    );
    assert!(rig.core.state(&init("a")).is_err());
    rig.core.create(create_req(&rig, "a")).await.expect_err("still failing");
    rig.guest().fail_create.store(false, Ordering::SeqCst);
    rig.core
        .create(create_req(&rig, "a"))
        .await
        .expect("the id is free again");
}

#[tokio::test]
async fn a_bad_log_uri_fails_before_the_guest_is_asked() {
    let rig = Rig::new();
    running(&rig, "pause").await;
    let mut req = create_req(&rig, "a");
    req.stdio.stdout = "file:///nonexistent-dir-vmbox/x.log".into();
    let e = rig.core.create(req).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent-dir-vmbox/x.log"), "{e}");
    assert_eq!(
        rig.guest().creates.load(Ordering::SeqCst),
        1,
        "only the pause container was created"
    );
    let mounted = rig.host.mounted.lock().unwrap().clone();
    assert_eq!(mounted.len(), 1, "{mounted:?}");
}

#[tokio::test]
async fn the_only_container_failing_to_create_stops_the_vm() {
    let rig = Rig::new();
    let mut req = create_req(&rig, "a");
    req.stdio.stdout = "file:///nonexistent-dir-vmbox/x.log".into();
    rig.core.create(req).await.unwrap_err();
    assert!(rig.hv.vm(0).stopped.load(Ordering::SeqCst));
    assert!(rig.host.sandboxes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn killing_a_finished_process_is_not_found() {
    let rig = Rig::new();
    running(&rig, "a").await;
    rig.guest().exit(&init("a"), 0);
    rig.core.wait(&init("a")).await.unwrap();
    let e = rig.core.kill(&init("a"), 9, false).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
    // As runc for a stopped container; what is left still gets the signal.
    let e = rig.core.kill(&init("a"), 9, true).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn unknown_containers_and_execs_are_not_found() {
    let rig = Rig::new();
    running(&rig, "a").await;
    for e in [
        rig.core.state(&init("zz")).unwrap_err(),
        rig.core.state(&exec("a", "zz")).unwrap_err(),
        rig.core.delete(&init("zz")).await.unwrap_err(),
        rig.core.start(&exec("a", "zz")).await.unwrap_err(),
        rig.core.kill(&exec("a", "zz"), 9, false).await.unwrap_err(),
    ] {
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
    }
}

#[tokio::test]
async fn pause_and_resume_follow_their_states() {
    let mut rig = Rig::new();
    running(&rig, "a").await;
    rig.core.pause(&id("a"), true).await.unwrap();
    assert_eq!(rig.core.state(&init("a")).unwrap().status, Status::Paused);
    let e = rig.core.pause(&id("a"), true).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
    rig.core.pause(&id("a"), false).await.unwrap();
    let e = rig.core.pause(&id("a"), false).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
    let events = rig.events_until(|e| matches!(e, Event::Resumed { .. })).await;
    assert!(events.iter().any(|e| matches!(e, Event::Paused { .. })));
}

#[tokio::test]
async fn oom_reports_name_only_containers_of_this_shim() {
    let mut rig = Rig::new();
    running(&rig, "a").await;
    rig.guest().oom("someone-else");
    rig.guest().oom("a");
    let events = rig.events_until(|e| matches!(e, Event::Oom { .. })).await;
    assert!(
        matches!(events.last(), Some(Event::Oom { container }) if container == "a"),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_exec_is_deleted_after_its_exit_and_its_id_reused() {
    let mut rig = Rig::new();
    running(&rig, "a").await;
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    let e = rig
        .core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS);
    rig.core.start(&exec("a", "e")).await.unwrap();
    rig.guest().exit(&exec("a", "e"), 7);
    assert_eq!(rig.core.wait(&exec("a", "e")).await.unwrap().status, 7);
    let (_, exit) = rig.core.delete(&exec("a", "e")).await.unwrap();
    assert_eq!(exit.status, 7);
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    let events = rig.events_until(is_exit).await;
    assert!(events.iter().any(|e| matches!(e, Event::ExecAdded { .. })));
}

#[tokio::test]
async fn a_bad_exec_spec_is_invalid_argument_naming_the_exec() {
    let rig = Rig::new();
    running(&rig, "a").await;
    let e = rig
        .core
        .exec(&exec("a", "e"), b"{not json".to_vec(), StdioPaths::default())
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    assert!(e.to_string().contains("exec e"), "{e}");
    let e = rig
        .core
        .update(&id("a"), br#"{"memory":5}"#.to_vec())
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
}

#[tokio::test]
async fn a_killed_created_container_reports_its_exit_after_its_create() {
    let mut rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    rig.core.kill(&init("a"), 9, false).await.unwrap();
    assert!(matches!(rig.event().await, Event::Create { .. }));
    assert!(matches!(rig.event().await, Event::Exit { status: 137, .. }));
    rig.core.delete(&init("a")).await.unwrap();
}

#[tokio::test]
async fn the_sandbox_is_named_by_the_cri_annotation() {
    let rig = Rig::new();
    let mut spec = oci_spec::runtime::Spec::default();
    let mut ann = std::collections::HashMap::new();
    ann.insert("io.kubernetes.cri.sandbox-id".to_string(), "f".repeat(64));
    spec.set_annotations(Some(ann));
    std::fs::write(rig.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    rig.core.create(create_req(&rig, &"c".repeat(64))).await.unwrap();
    let sandboxes = rig.host.sandboxes.lock().unwrap().clone();
    let dir = sandboxes.iter().next().unwrap();
    assert!(
        dir.ends_with(format!("default/{}", "f".repeat(64))),
        "{}",
        dir.display()
    );
    let name = vmbox_hypervisor::Vm::name(&*rig.hv.vm(0)).to_string();
    assert_eq!(name, format!("default-{}", "f".repeat(64)));
    let _ = Arc::strong_count(&rig.core);
}

/// A sandbox whose spec names a network namespace gives the guest that network before
/// its first container; one without a path (`ctr run`) or without the entry (host network)
/// boots with loopback only.
#[tokio::test]
async fn the_pod_network_reaches_the_guest_before_any_container() {
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    for (path, wanted) in [(Some("/var/run/netns/cni-x"), true), (None, false)] {
        let rig = Rig::new();
        let mut spec = oci_spec::runtime::Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let mut ns = LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .build()
            .unwrap();
        ns.set_path(path.map(std::path::PathBuf::from));
        linux.set_namespaces(Some(vec![ns]));
        spec.set_linux(Some(linux));
        std::fs::write(rig.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        rig.core.create(create_req(&rig, "a")).await.unwrap();
        let vm = rig.hv.vm(0);
        let got = vm.guest.network.lock().unwrap().clone();
        match got {
            Some((net, containers)) => {
                assert!(wanted, "no namespace path, yet a network was set up");
                assert_eq!(net, vm.network);
                assert_eq!(containers, 0, "the network came after a container");
            }
            None => assert!(!wanted, "the pod network never reached the guest"),
        }
    }
}

/// containerd treats task pids as host pids: every pid it gets (replies, events, state)
/// is the VMM's, never a guest pid (issue 11: `ctr task ls` showed 32).
#[tokio::test]
async fn every_pid_containerd_sees_is_the_vmms() {
    use super::fakes::FAKE_VMM_PID;
    let mut rig = Rig::new();
    let mut pids = vec![rig.core.create(create_req(&rig, "a")).await.unwrap()];
    pids.push(rig.core.start(&init("a")).await.unwrap());
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    pids.push(rig.core.start(&exec("a", "e")).await.unwrap());
    pids.push(rig.core.state(&init("a")).unwrap().pid);
    pids.push(rig.core.state(&exec("a", "e")).unwrap().pid);
    pids.extend(rig.core.pid(&id("a")));
    rig.guest().exit(&exec("a", "e"), 0);
    rig.guest().exit(&init("a"), 0);
    rig.core.wait(&init("a")).await.unwrap();
    pids.push(rig.core.delete(&exec("a", "e")).await.unwrap().0);
    pids.push(rig.core.delete(&init("a")).await.unwrap().0);
    for e in rig.events_until(|e| matches!(e, Event::Delete { .. })).await {
        match e {
            Event::Create { pid, .. }
            | Event::Start { pid, .. }
            | Event::ExecStarted { pid, .. }
            | Event::Exit { pid, .. }
            | Event::Delete { pid, .. } => pids.push(pid),
            _ => {}
        }
    }
    assert!(pids.len() >= 12, "{pids:?}");
    assert!(pids.iter().all(|p| *p == FAKE_VMM_PID), "{pids:?}");
}

/// Per-RuntimeClass configuration: the ConfigPath of containerd's runtime options is the
/// config of the shim's sandbox (here: its state_dir); a bad one is named.
#[tokio::test]
async fn the_config_path_of_the_runtime_options_is_used() {
    let rig = Rig::new();
    let class = rig.bundle.parent().unwrap().join("class-b");
    std::fs::create_dir_all(&class).unwrap();
    let file = class.join("vmbox.toml");
    std::fs::write(&file, format!("state_dir = \"{}\"\n", class.join("state").display())).unwrap();
    let mut req = create_req(&rig, "a");
    req.config_path = Some(file.clone());
    rig.core.create(req).await.unwrap();
    let sandboxes = rig.host.sandboxes.lock().unwrap().clone();
    assert!(
        sandboxes.iter().all(|d| d.starts_with(class.join("state"))) && !sandboxes.is_empty(),
        "{sandboxes:?}"
    );
    assert!(rig.bundle.join(crate::options::BUNDLE_CONFIG_PATH).exists());

    let other = Rig::new();
    let mut req = create_req(&other, "a");
    req.config_path = Some("/nonexistent/vmbox-class.toml".into());
    let e = other.core.create(req).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT, "{e}");
    assert!(e.to_string().contains("/nonexistent/vmbox-class.toml"), "{e}");
}
