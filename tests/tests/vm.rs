//! VM-level tests: a real guest kernel under QEMU, the real agent and libcontainer.
//! Run with `make vm-test` (it builds the guest first).

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use vmbox_hypervisor::Vm;
use vmbox_protocol::agent::*;
use vmbox_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_check_and_shutdown_leave_nothing_behind() {
    let t = TestVm::boot("lifecycle").await.unwrap();
    let run_dir = t.config.state_dir.join("vm");
    let v = t.agent.get_version(ctx(), &GetVersionRequest::new()).await.unwrap();
    assert_eq!(v.protocol_version, vmbox_protocol::PROTOCOL_VERSION);
    assert!(v.kernel_release.starts_with("6.1"), "guest kernel {}", v.kernel_release);
    assert!(t.agent.check(ctx(), &CheckRequest::new()).await.unwrap().serving);
    let pids = t.vm.pids();
    assert_eq!(pids.len(), 3, "qemu, virtiofsd and vhost-device-vsock: {pids:?}");
    t.shutdown().await.unwrap();
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let left = processes_mentioning(&run_dir.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_report_output_exit_codes_and_signals() {
    let t = TestVm::boot("exits").await.unwrap();

    let (status, out, _) = t.run("echo", &["echo", "hello from the guest"]).await.unwrap();
    assert_eq!((status, out.as_slice()), (0, &b"hello from the guest\n"[..]));

    let (status, _, err) = t.run("exit3", &["sh", "-c", "echo oops >&2; exit 3"]).await.unwrap();
    assert_eq!((status, err.as_slice()), (3, &b"oops\n"[..]));

    // A process killed by SIGKILL reports the signal.
    let mut s = t.create("killed", &["sleep", "600"], false).await.unwrap();
    t.start("killed").await.unwrap();
    let req = SignalProcessRequest {
        container_id: "killed".into(),
        signal: 9,
        ..Default::default()
    };
    t.agent.signal_process(ctx(), &req).await.unwrap();
    let exit = t.wait("killed", "").await.unwrap();
    assert_eq!((exit.exit_status, exit.signal), (128 + 9, 9));
    assert!(exit.exited_at_ns > 0);
    s.read_output().await.unwrap();
    t.remove("killed").await.unwrap();

    t.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_tty_resize() {
    let t = TestVm::boot("exec").await.unwrap();
    let mut init = t.create("c1", &["sleep", "600"], false).await.unwrap();
    t.start("c1").await.unwrap();

    // A second process in the running container sees the same filesystem and pid namespace.
    let (out_id, mut out) = t.stream().await.unwrap();
    let req = ExecProcessRequest {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        process: serde_json::to_vec(&process(&["sh", "-c", "cat /proc/1/cmdline; echo; hostname"], false)).unwrap(),
        stdio: Some(Stdio {
            stdout: out_id,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    t.agent.exec_process(ctx(), &req).await.unwrap();
    let mut text = String::new();
    out.read_to_string(&mut text).await.unwrap();
    assert_eq!(text, "sleep\x00600\x00\nvmbox\n");
    assert_eq!(t.wait("c1", "e1").await.unwrap().exit_status, 0);

    // A tty process: resize, then `stty size` reports the new size.
    let (in_id, mut tin) = t.stream().await.unwrap();
    let (tout_id, mut tout) = t.stream().await.unwrap();
    let req = ExecProcessRequest {
        container_id: "c1".into(),
        exec_id: "tty".into(),
        process: serde_json::to_vec(&process(&["sh", "-c", "read line; stty size"], true)).unwrap(),
        stdio: Some(Stdio {
            stdin: in_id,
            stdout: tout_id,
            terminal: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    t.agent.exec_process(ctx(), &req).await.unwrap();
    let resize = ResizePtyRequest {
        container_id: "c1".into(),
        exec_id: "tty".into(),
        rows: 42,
        cols: 123,
        ..Default::default()
    };
    t.agent.resize_pty(ctx(), &resize).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tin, b"go\n").await.unwrap();
    let exit = t.wait("c1", "tty").await.unwrap();
    assert_eq!(exit.exit_status, 0);
    let mut screen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tout.read_to_end(&mut screen))
        .await
        .unwrap()
        .unwrap();
    let screen = String::from_utf8_lossy(&screen);
    assert!(screen.contains("42 123"), "tty output: {screen:?}");

    let req = SignalProcessRequest {
        container_id: "c1".into(),
        signal: 9,
        ..Default::default()
    };
    t.agent.signal_process(ctx(), &req).await.unwrap();
    t.wait("c1", "").await.unwrap();
    init.read_output().await.unwrap();
    t.remove("c1").await.unwrap();
    t.shutdown().await.unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_and_stdout_carry_every_byte() {
    let t = TestVm::boot("bulk").await.unwrap();

    // 10 MiB into sha256sum in the guest.
    let data = pattern(10 << 20);
    let mut s = t.create("sum", &["sha256sum"], true).await.unwrap();
    t.start("sum").await.unwrap();
    let stdin = s.stdin.take().unwrap();
    let (sent, output) = tokio::join!(send_and_close(stdin, &data), s.read_output());
    sent.unwrap();
    let (out, _) = output.unwrap();
    let want = format!("{:x}  -\n", Sha256::digest(&data));
    assert_eq!(String::from_utf8_lossy(&out), want);
    assert_eq!(t.wait("sum", "").await.unwrap().exit_status, 0);
    t.remove("sum").await.unwrap();

    // 100 MiB out of the guest, compared with the guest's own digest of the same bytes.
    let script = "head -c 104857600 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob";
    let (status, out, err) = t.run("blob", &["sh", "-c", script]).await.unwrap();
    assert_eq!(status, 0);
    assert_eq!(out.len(), 100 << 20);
    let guest_digest = String::from_utf8_lossy(&err)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(format!("{:x}", Sha256::digest(&out)), guest_digest);

    t.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kernel_path_fails_clearly_and_leaves_nothing() {
    let mut config = test_config("nokernel");
    config.vm.kernel = "/nonexistent/vmlinux".into();
    let spec = vmbox_hypervisor::VmSpec {
        name: "nokernel".into(),
        run_dir: config.state_dir.join("vm"),
        shared_dir: None,
        vcpus: 1,
        memory_mib: 128,
        hostname: None,
        cgroup: None,
        network: None,
    };
    let err = vmbox_hypervisor::qemu::QemuVm::start(&config, spec)
        .await
        .err()
        .expect("start must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/vmlinux") && msg.contains("make guest"),
        "{msg}"
    );
    assert!(!config.state_dir.join("vm").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_times_out_with_the_console_and_leaves_nothing() {
    // An initramfs whose /init is a shell that prints a marker and waits forever.
    let mut config = test_config("silent");
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let script = b"#!/bin/busybox sh\necho silent-guest-booted\nexec /bin/busybox sleep 100000\n";
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut img = Vec::new();
    vmbox_guest::write_cpio(
        &mut img,
        &[
            vmbox_guest::Entry::Dir {
                path: "bin",
                mode: 0o755,
            },
            vmbox_guest::Entry::File {
                path: "bin/busybox",
                mode: 0o755,
                data: &busybox,
            },
            vmbox_guest::Entry::Dir {
                path: "dev",
                mode: 0o755,
            },
            vmbox_guest::Entry::CharDev {
                path: "dev/console",
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            vmbox_guest::Entry::File {
                path: "init",
                mode: 0o755,
                data: script,
            },
        ],
    )
    .unwrap();
    config.vm.initramfs = config.state_dir.join("silent.img");
    std::fs::write(&config.vm.initramfs, img).unwrap();
    config.timeouts.boot_ms = 8_000;
    let run_dir = config.state_dir.join("vm");
    let spec = vmbox_hypervisor::VmSpec {
        name: "silent".into(),
        run_dir: run_dir.clone(),
        shared_dir: Some(config.state_dir.clone()),
        vcpus: 1,
        memory_mib: 128,
        hostname: None,
        cgroup: None,
        network: None,
    };
    let started = std::time::Instant::now();
    let err = vmbox_hypervisor::qemu::QemuVm::start(&config, spec)
        .await
        .err()
        .expect("start must fail");
    let msg = err.to_string();
    assert!(msg.contains("did not say hello within 8000 ms"), "{msg}");
    assert!(
        msg.contains("silent-guest-booted"),
        "the console tail is in the error: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let left = processes_mentioning(&run_dir.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
    std::fs::remove_dir_all(&config.state_dir).unwrap();
}

/// Creates container `id` from `spec` (JSON) with its stdout/stderr streams.
async fn create_with_spec(t: &TestVm, id: &str, spec: &serde_json::Value) -> Streams {
    let (out_id, stdout) = t.stream().await.unwrap();
    let (err_id, stderr) = t.stream().await.unwrap();
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(spec).unwrap(),
        rootfs: "rootfs".into(),
        stdio: Some(Stdio {
            stdout: out_id,
            stderr: err_id,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    t.agent.create_container(ctx(), &req).await.expect("CreateContainer");
    Streams {
        stdin: None,
        stdout,
        stderr,
    }
}

/// Runs `args` as exec `exec_id` of container `id` to its end: (guest pid, status, stdout).
async fn exec(t: &TestVm, id: &str, exec_id: &str, args: &[&str]) -> (u32, i32, String) {
    exec_process(t, id, exec_id, &process(args, false)).await
}

/// Runs the OCI `process` as exec `exec_id` of container `id`: (guest pid, status, stdout).
async fn exec_process(t: &TestVm, id: &str, exec_id: &str, process: &serde_json::Value) -> (u32, i32, String) {
    let (out_id, mut out) = t.stream().await.unwrap();
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process: serde_json::to_vec(process).unwrap(),
        stdio: Some(Stdio {
            stdout: out_id,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let pid = t.agent.exec_process(ctx(), &req).await.expect("ExecProcess").pid;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), out.read_to_string(&mut text))
        .await
        .expect("exec output within 60 s")
        .unwrap();
    let status = t.wait(id, exec_id).await.unwrap().exit_status;
    (pid, status, text)
}

/// The test spec, in the guest's own pid namespace with every capability and a writable
/// /proc/sys, so a test can steer the guest's pid allocation (ns_last_pid).
fn host_pid_spec(args: &[&str]) -> serde_json::Value {
    let mut s: serde_json::Value = serde_json::from_slice(&spec(args, false)).unwrap();
    s["process"] = privileged(args);
    s["linux"]["namespaces"] = serde_json::json!([{ "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]);
    s["linux"]["readonlyPaths"] = serde_json::json!([]);
    s
}

/// An OCI process with every capability.
fn privileged(args: &[&str]) -> serde_json::Value {
    let mut p = process(args, false);
    let caps: Vec<String> = CAP_NAMES.iter().map(|c| format!("CAP_{c}")).collect();
    p["capabilities"] = serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps});
    p
}

const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_survive_a_deterministic_pid_wrap() {
    let t = TestVm::boot("pidwrap").await.unwrap();
    let mut init = create_with_spec(&t, "w", &host_pid_spec(&["sleep", "600"])).await;
    t.start("w").await.unwrap();
    let (_, status, max) = exec(&t, "w", "max", &["cat", "/proc/sys/kernel/pid_max"]).await;
    assert_eq!(
        (status, max.trim()),
        (0, "32768"),
        "the guest's pid space is a host's default"
    );

    // Below pid 300 (the kernel's reserved range, never reused) nothing can be shown:
    // go past it first.
    let past = "while [ $(sh -c 'echo $$') -lt 300 ]; do :; done";
    assert_eq!(exec(&t, "w", "past", &["sh", "-c", past]).await.1, 0);
    // A region of pids whose exits the agent reaped and nobody claimed: every `true`
    // below is orphaned by its subshell and reaped by the agent (PID 1). Subshells of one
    // and of two `true`s alternate, so the unclaimed pids (3 of every 5) have both
    // parities, whatever the number of pids each exec takes.
    let script =
        "echo $$; i=0; while [ $i -lt 60 ]; do (true &); (true & true &); i=$((i+1)); done; sh -c 'echo $$'; true";
    let (_, status, region) = exec(&t, "w", "region", &["sh", "-c", script]).await;
    assert_eq!(status, 0);
    let bounds: Vec<u32> = region.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let [first, last] = bounds[..] else {
        panic!("region bounds: {region:?}")
    };
    // Wrap now: with pid_max just above the last pid handed out, the kernel allocates
    // from the bottom of the pid space again (301), which runs into the region.
    let wrap = "exec 2>&1; echo $(($$ + 1)) > /proc/sys/kernel/pid_max";
    let (_, status, out) = exec_process(&t, "w", "wrap", &privileged(&["sh", "-c", wrap])).await;
    assert_eq!(status, 0, "pid_max: {out}");

    let (mut inside, mut wrong) = (0, Vec::new());
    for n in 0..40 {
        let (pid, status, _) = exec(&t, "w", &format!("x{n}"), &["sh", "-c", "sleep 0.3; exit 7"]).await;
        if (first..=last).contains(&pid) {
            inside += 1;
        }
        if status != 7 {
            wrong.push((pid, status));
        }
    }
    assert!(
        wrong.is_empty(),
        "execs given another process's exit status (pid, status): {wrong:?}"
    );
    assert!(
        inside >= 20,
        "only {inside} of 40 execs reused a pid of the region {first}..={last}"
    );

    // The spec's pids limit is enforced by the container's cgroup.
    let script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 30 </dev/null >/dev/null 2>&1 & done; echo started";
    let mut limited: serde_json::Value = serde_json::from_slice(&spec(&["sh", "-c", script], false)).unwrap();
    limited["linux"]["resources"] = serde_json::json!({ "pids": { "limit": 6 } });
    let mut s = create_with_spec(&t, "limited", &limited).await;
    t.start("limited").await.unwrap();
    let (out, err) = s.read_output().await.unwrap();
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains("can't fork"),
        "forks beyond pids.limit must fail: {err} / {}",
        String::from_utf8_lossy(&out)
    );
    t.wait("limited", "").await.unwrap();
    t.remove("limited").await.unwrap();

    t.kill_and_remove("w", &mut init).await.unwrap();
    t.shutdown().await.unwrap();
}

/// A spec running `args` with a memory limit of `mib` MiB.
fn memory_limited(args: &[&str], mib: u64) -> serde_json::Value {
    let mut s: serde_json::Value = serde_json::from_slice(&spec(args, false)).unwrap();
    s["linux"]["resources"] = serde_json::json!({ "memory": { "limit": mib << 20 } });
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kills_wait_for_the_host_to_ask() {
    let t = TestVm::boot("oom").await.unwrap();
    let eat = ["sh", "-c", "x=a; while :; do x=$x$x; done"];
    // Two containers OOM-killed at about the same time, and removed at once, while no
    // GetOomEvent is in flight (a shim between two requests): nothing may be lost.
    let mut streams = Vec::new();
    for id in ["oom1", "oom2"] {
        streams.push(create_with_spec(&t, id, &memory_limited(&eat, 32)).await);
    }
    for id in ["oom1", "oom2"] {
        t.start(id).await.unwrap();
    }
    for (id, s) in ["oom1", "oom2"].into_iter().zip(streams.iter_mut()) {
        assert_eq!(t.wait(id, "").await.unwrap().exit_status, 137, "{id} OOM-killed");
        s.read_output().await.unwrap();
        t.remove(id).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), t.agent.get_oom_event(ctx(), &Empty::new()))
            .await
            .expect("an OOM event within 10 s")
            .unwrap();
        got.push(ev.container_id);
    }
    got.sort();
    assert_eq!(got, ["oom1", "oom2"]);
    // Nothing more: one event per kill.
    let more = tokio::time::timeout(Duration::from_secs(2), t.agent.get_oom_event(ctx(), &Empty::new())).await;
    assert!(more.is_err(), "unexpected event {more:?}");
    t.shutdown().await.unwrap();
}

fn code(e: &anyhow::Error) -> Option<ttrpc::Code> {
    match e.downcast_ref::<ttrpc::Error>() {
        Some(ttrpc::Error::RpcStatus(s)) => Some(s.code()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_without_its_cgroup_answers_kill_as_runc_and_is_removed() {
    let t = TestVm::boot("gonecg").await.unwrap();
    let mut s = t.create("gone", &["true"], false).await.unwrap();
    t.start("gone").await.unwrap();
    t.wait("gone", "").await.unwrap();
    s.read_output().await.unwrap();
    // Another, privileged, container removes the stopped container's cgroup, as happens
    // when its processes are gone and its cgroup was cleaned up first.
    let mut admin = host_pid_spec(&["sleep", "600"]);
    admin["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "destination": "/cg", "type": "cgroup2", "source": "cgroup2" }));
    let mut a = create_with_spec(&t, "admin", &admin).await;
    t.start("admin").await.unwrap();
    let (_, status, out) = exec_process(
        &t,
        "admin",
        "rm",
        &privileged(&["sh", "-c", "exec 2>&1; rmdir /cg/vmbox/gone"]),
    )
    .await;
    assert_eq!(status, 0, "rmdir: {out}");

    // Kill of the finished init, and kill --all with no processes and no cgroup: NotFound
    // ("process already finished"), never Internal or InvalidArgument; an unknown
    // container: NotFound.
    for (id, all) in [("gone", false), ("gone", true), ("nosuch", false)] {
        let req = SignalProcessRequest {
            container_id: id.into(),
            signal: 9,
            all,
            ..Default::default()
        };
        let e = t
            .agent
            .signal_process(ctx(), &req)
            .await
            .map_err(anyhow::Error::from)
            .unwrap_err();
        assert_eq!(code(&e), Some(ttrpc::Code::NOT_FOUND), "kill {id} all={all}: {e}");
    }
    // A second create of a live id: AlreadyExists.
    let e = t
        .create("admin", &["true"], false)
        .await
        .err()
        .expect("a duplicate create fails");
    assert_eq!(code(&e), Some(ttrpc::Code::ALREADY_EXISTS), "{e:#}");
    // Remove of the running container without force: FailedPrecondition.
    let req = RemoveContainerRequest {
        container_id: "admin".into(),
        force: false,
        ..Default::default()
    };
    let e = t
        .agent
        .remove_container(ctx(), &req)
        .await
        .map_err(anyhow::Error::from)
        .unwrap_err();
    assert_eq!(code(&e), Some(ttrpc::Code::FAILED_PRECONDITION), "{e}");

    // Remove of the stopped container always succeeds, and leaves the id free.
    t.remove("gone")
        .await
        .expect("remove of a stopped container without its cgroup");
    let (status, out, _) = t.run("gone", &["echo", "again"]).await.unwrap();
    assert_eq!((status, out.as_slice()), (0, &b"again\n"[..]));

    t.kill_and_remove("admin", &mut a).await.unwrap();
    t.shutdown().await.unwrap();
}

/// Issue 13: a guest that floods its serial console (a container writing to the guest's
/// /dev/ttyS0 as fast as it can for 30 s) costs the host a bounded amount: the console ring
/// holds at most CONSOLE_RING bytes, no file in the run directory grows, and the sandbox
/// keeps answering (execs run back to back throughout, each within its deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_its_console_costs_the_host_a_bounded_amount() {
    use vmbox_hypervisor::qemu::CONSOLE_RING;
    let t = TestVm::boot("flood").await.unwrap();
    let mut s: serde_json::Value = serde_json::from_slice(&spec(
        &["sh", "-c", "yes vmbox-console-flood-0123456789abcdef > /dev/ttyS0"],
        false,
    ))
    .unwrap();
    // The guest's first serial port (4:64), as `--device /dev/ttyS0` would give it.
    s["linux"]["devices"] = serde_json::json!([{ "path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64, "fileMode": 438, "uid": 0, "gid": 0 }]);
    s["linux"]["resources"] =
        serde_json::json!({ "devices": [{ "allow": true, "type": "c", "major": 4, "minor": 64, "access": "rwm" }] });
    let mut flood = create_with_spec(&t, "flood", &s).await;
    t.start("flood").await.unwrap();
    let (_, before) = t.vm.console_bytes();
    let t0 = std::time::Instant::now();
    let mut execs = 0;
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(30) {
        let t1 = std::time::Instant::now();
        let (_, status, out) = tokio::time::timeout(
            Duration::from_secs(30),
            exec(&t, "flood", &format!("probe{execs}"), &["echo", "alive"]),
        )
        .await
        .expect("an exec answers within 30 s while the guest floods its console");
        assert_eq!((status, out.as_str()), (0, "alive\n"));
        slowest = slowest.max(t1.elapsed());
        execs += 1;
        let (held, _) = t.vm.console_bytes();
        assert!(held <= CONSOLE_RING, "{held} bytes of console held");
    }
    let (held, total) = t.vm.console_bytes();
    let flooded = total - before;
    eprintln!("console flood: {flooded} bytes in 30 s, {held} held; {execs} execs, slowest {slowest:?}");
    assert!(
        flooded > 4 * CONSOLE_RING as u64,
        "the flood reached the host ({flooded} bytes): the bound was exercised"
    );
    assert!(held <= CONSOLE_RING, "{held} bytes of console held");
    let mut on_disk = 0;
    for e in walk(&t.config.state_dir.join("vm")) {
        on_disk += e;
    }
    assert!(on_disk < 1 << 20, "{on_disk} bytes in the run directory");
    t.kill_and_remove("flood", &mut flood).await.unwrap();
    t.shutdown().await.unwrap();
}

/// Sizes of the regular files below `dir`.
fn walk(dir: &std::path::Path) -> Vec<u64> {
    let mut sizes = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => sizes.extend(walk(&e.path())),
            Ok(t) if t.is_file() => sizes.push(e.metadata().map(|m| m.len()).unwrap_or(0)),
            _ => {}
        }
    }
    sizes
}
