//! Requests racing each other, the VM and its boot, lined up with the fakes' gates.

use std::sync::atomic::Ordering;

use super::*;

type Pending<T> = tokio::task::JoinHandle<Result<T, ShimError>>;

fn spawn_create(rig: &Rig, c: &str) -> Pending<u32> {
    let (core, req) = (rig.core.clone(), create_req(rig, c));
    tokio::spawn(async move { core.create(req).await })
}

fn spawn_start(rig: &Rig, p: ProcessRef) -> Pending<u32> {
    let core = rig.core.clone();
    tokio::spawn(async move { core.start(&p).await })
}

fn spawn_delete(rig: &Rig, p: ProcessRef) -> Pending<(u32, super::super::process::ExitInfo)> {
    let core = rig.core.clone();
    tokio::spawn(async move { core.delete(&p).await })
}

#[tokio::test]
async fn concurrent_starts_start_once() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    rig.guest().start_gate.close();
    let first = spawn_start(&rig, init("a"));
    rig.guest().start_gate.reached().await;
    let second = spawn_start(&rig, init("a"));
    rig.guest().start_gate.open();
    first.await.unwrap().unwrap();
    // The second waited for the first's transition, then found the container started.
    let e = second.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
}

#[tokio::test]
async fn delete_while_start_is_in_flight_waits_and_is_refused() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    rig.guest().start_gate.close();
    let start = spawn_start(&rig, init("a"));
    rig.guest().start_gate.reached().await;
    let delete = spawn_delete(&rig, init("a"));
    // Starting is visible to readers while the start is in flight.
    assert_eq!(rig.core.state(&init("a")).unwrap().status, Status::Starting);
    rig.guest().start_gate.open();
    start.await.unwrap().unwrap();
    let e = delete.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    assert_eq!(
        rig.guest().containers.lock().unwrap().get("a"),
        Some(&true),
        "the started container is intact"
    );
}

#[tokio::test]
async fn create_racing_the_last_delete_keeps_the_vm() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    rig.guest().create_gate.close();
    let b = spawn_create(&rig, "b");
    rig.guest().create_gate.reached().await;
    // "a" is the last *created* container, but "b" is in flight in the same VM.
    rig.core.delete(&init("a")).await.unwrap();
    assert!(
        !rig.hv.vm(0).stopped.load(Ordering::SeqCst),
        "a create in flight keeps the VM"
    );
    rig.guest().create_gate.open();
    b.await.unwrap().unwrap();
    assert_eq!(rig.hv.booted(), 1);
    assert!(rig.guest().containers.lock().unwrap().contains_key("b"));
}

#[tokio::test]
async fn the_vm_dying_mid_exec_ends_each_process_once_with_255() {
    let mut rig = Rig::new();
    running(&rig, "a").await;
    rig.core
        .exec(&exec("a", "e1"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    rig.core.start(&exec("a", "e1")).await.unwrap();
    rig.core
        .exec(&exec("a", "e2"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    rig.hv.vm(0).die();
    assert_eq!(rig.core.wait(&init("a")).await.unwrap().status, 255);
    assert_eq!(rig.core.wait(&exec("a", "e1")).await.unwrap().status, 255);
    // containerd's Delete(WithProcessKill), which CRI sends on the TaskExit, kills with
    // --all first and accepts only success or NotFound: an error here had CRI retry for
    // ever and the pod never went NOTREADY.
    for p in [init("a"), exec("a", "e1")] {
        let e = rig.core.kill(&p, 9, true).await.unwrap_err();
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
    }
    // e2 never started: no exit, and it cannot start now.
    assert!(rig.core.start(&exec("a", "e2")).await.is_err());
    rig.core.delete(&exec("a", "e2")).await.unwrap();
    rig.core.delete(&init("a")).await.unwrap();
    let events = rig.events_until(|e| matches!(e, Event::Delete { .. })).await;
    let exits: Vec<(String, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Exit { id, status, .. } => Some((id.clone(), *status)),
            _ => None,
        })
        .collect();
    let mut sorted = exits.clone();
    sorted.sort();
    assert_eq!(sorted, [("a".to_string(), 255), ("e1".to_string(), 255)], "{events:?}");
}

#[tokio::test]
async fn task_exit_never_precedes_task_start() {
    let mut rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert!(matches!(rig.event().await, Event::Create { .. }));
    rig.guest().start_gate.close();
    let start = spawn_start(&rig, init("a"));
    rig.guest().start_gate.reached().await;
    // The process exits while its start is still in flight (a fast `true`).
    rig.guest().exit(&init("a"), 0);
    rig.guest().start_gate.open();
    start.await.unwrap().unwrap();
    assert!(matches!(rig.event().await, Event::Start { .. }));
    assert!(matches!(rig.event().await, Event::Exit { .. }));
}

#[tokio::test]
async fn task_exit_of_an_exec_follows_its_exec_started() {
    let mut rig = Rig::new();
    running(&rig, "a").await;
    rig.guest().execs_exit_at_once.store(true, Ordering::SeqCst);
    for i in 0..20 {
        let e = format!("e{i}");
        rig.core
            .exec(&exec("a", &e), PROCESS.to_vec(), StdioPaths::default())
            .unwrap();
        rig.core.start(&exec("a", &e)).await.unwrap();
    }
    let mut started = std::collections::HashSet::new();
    let mut exited = 0;
    while exited < 20 {
        match rig.event().await {
            Event::ExecStarted { exec, .. } => {
                started.insert(exec);
            }
            Event::Exit { id, .. } => {
                assert!(started.contains(&id), "TaskExit of {id} before its TaskExecStarted");
                exited += 1;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_duplicate_id_is_refused_even_while_the_first_is_in_flight() {
    let rig = Rig::new();
    running(&rig, "pause").await;
    rig.guest().create_gate.close();
    let first = spawn_create(&rig, "a");
    rig.guest().create_gate.reached().await;
    let e = rig.core.create(create_req(&rig, "a")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS, "{e}");
    rig.guest().create_gate.open();
    first.await.unwrap().unwrap();
    let e = rig.core.create(create_req(&rig, "a")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS, "{e}");
}

#[tokio::test]
async fn a_shutdown_during_the_boot_does_not_wait_for_it() {
    let rig = Rig::new();
    rig.hv.boot_gate.close();
    let create = spawn_create(&rig, "a");
    rig.hv.boot_gate.reached().await;
    tokio::time::timeout(std::time::Duration::from_secs(2), rig.core.shutdown_sandbox(true))
        .await
        .expect("the shutdown waited for the boot");
    let e = create.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    assert_eq!(
        rig.hv.cleanups.lock().unwrap().len(),
        1,
        "the abandoned VM's run directory is cleaned"
    );
    assert!(rig.host.sandboxes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_boot_fails_every_waiting_create_and_the_next_create_boots_again() {
    let rig = Rig::new();
    rig.hv.fail_boot.store(true, Ordering::SeqCst);
    rig.hv.boot_gate.close();
    let mut creates = Vec::new();
    for c in ["a", "b", "c"] {
        creates.push(spawn_create(&rig, c));
    }
    rig.hv.boot_gate.reached().await;
    rig.hv.boot_gate.open();
    for c in creates {
        let e = c.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("injected boot failure"), "{e}");
    }
    assert!(rig.core.is_empty());
    rig.hv.fail_boot.store(false, Ordering::SeqCst);
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert_eq!(rig.hv.booted(), 1);
}

#[tokio::test]
async fn concurrent_creates_share_one_boot() {
    let rig = Rig::new();
    rig.hv.boot_gate.close();
    let mut creates = Vec::new();
    for c in ["a", "b", "c", "d"] {
        creates.push(spawn_create(&rig, c));
    }
    rig.hv.boot_gate.reached().await;
    // Requests are served during the boot (no lock is held across it).
    assert_eq!(rig.core.state(&init("a")).unwrap().status, Status::Creating);
    let e = rig.core.state(&init("zz")).unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    rig.hv.boot_gate.open();
    for c in creates {
        c.await.unwrap().unwrap();
    }
    assert_eq!(rig.hv.booted(), 1);
    assert_eq!(rig.guest().containers.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_create_after_the_last_delete_decided_waits_and_boots_a_new_vm() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    rig.guest().shutdown_gate.close();
    let delete = spawn_delete(&rig, init("a"));
    rig.guest().shutdown_gate.reached().await;
    // The old VM is shutting down: this Create must not land in it.
    let create = spawn_create(&rig, "b");
    rig.guest().shutdown_gate.open();
    delete.await.unwrap().unwrap();
    create.await.unwrap().unwrap();
    assert_eq!(rig.hv.booted(), 2);
    assert!(rig.hv.vm(0).stopped.load(Ordering::SeqCst));
    assert!(rig.hv.vm(1).guest.containers.lock().unwrap().contains_key("b"));
    assert_eq!(rig.core.state(&init("b")).unwrap().status, Status::Created);
}

#[tokio::test]
async fn a_delete_waiting_for_a_create_that_fails_finds_nothing() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "pause")).await.unwrap();
    rig.guest().fail_create.store(true, Ordering::SeqCst);
    rig.guest().create_gate.close();
    let create = spawn_create(&rig, "a");
    rig.guest().create_gate.reached().await;
    let delete = spawn_delete(&rig, init("a"));
    rig.guest().create_gate.open();
    create.await.unwrap().unwrap_err();
    let e = delete.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn an_exec_delete_waits_for_its_start() {
    let rig = Rig::new();
    running(&rig, "a").await;
    rig.core
        .exec(&exec("a", "e"), PROCESS.to_vec(), StdioPaths::default())
        .unwrap();
    rig.guest().exec_gate.close();
    let start = spawn_start(&rig, exec("a", "e"));
    rig.guest().exec_gate.reached().await;
    let delete = spawn_delete(&rig, exec("a", "e"));
    rig.guest().exec_gate.open();
    start.await.unwrap().unwrap();
    // It waited for the start, then found the exec running.
    let e = delete.await.unwrap().unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    assert!(e.to_string().contains("running"), "{e}");
}

#[tokio::test]
async fn requests_on_unknown_containers_during_a_boot_are_not_found() {
    let rig = Rig::new();
    rig.hv.boot_gate.close();
    let create = spawn_create(&rig, "a");
    rig.hv.boot_gate.reached().await;
    for e in [
        rig.core.kill(&init("zz"), 9, false).await.unwrap_err(),
        rig.core.pids(&id("zz")).await.unwrap_err(),
        rig.core.pause(&id("zz"), true).await.unwrap_err(),
    ] {
        assert_eq!(code(&e), ttrpc::Code::NOT_FOUND, "{e}");
    }
    rig.hv.boot_gate.open();
    create.await.unwrap().unwrap();
}

#[tokio::test]
async fn after_containerds_shutdown_no_sandbox_boots_again() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    assert!(!rig.core.shutdown_if_empty().await, "a container is left");
    rig.core.delete(&init("a")).await.unwrap();
    assert!(rig.core.shutdown_if_empty().await);
    let e = rig.core.create(create_req(&rig, "b")).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION, "{e}");
    assert_eq!(rig.hv.booted(), 1, "the shim is about to exit: no new VM");
}

#[tokio::test]
async fn waiting_on_a_created_container_ends_when_it_is_deleted() {
    let rig = Rig::new();
    rig.core.create(create_req(&rig, "a")).await.unwrap();
    let core = rig.core.clone();
    let wait = tokio::spawn(async move { core.wait(&init("a")).await });
    rig.core.delete(&init("a")).await.unwrap();
    let exit = tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .expect("the wait ended")
        .unwrap();
    assert!(
        matches!(exit, Ok(ref e) if e.status == 137) || exit.is_err(),
        "{exit:?}"
    );
}
