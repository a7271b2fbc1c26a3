//! End-to-end tests through a real containerd 1.6 and `ctr`, with the real shim, QEMU,
//! guest kernel, agent and libcontainer. Run with `make e2e-test`.

use vmbox_tests::containerd::{containerd, ok, text, IMAGE, RUNTIME};

#[test]
fn ctr_run_prints_the_guest_kernel_and_returns_the_exit_code() {
    let c = containerd();
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "e2e-uname", "uname", "-r"]);
    let guest = ok(&out, "ctr run uname -r");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(guest.starts_with("6.1."), "guest kernel: {guest:?}");
    assert_ne!(guest.trim(), host.trim(), "uname -r ran on the host kernel");

    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "e2e-exit",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    for id in ["e2e-uname", "e2e-exit"] {
        let left = c.wait_clean(id);
        assert!(left.is_empty(), "{id} left: {left:#?}");
    }
}

#[test]
fn a_detached_container_supports_the_task_commands() {
    let c = containerd();
    let id = "e2e-detached";
    let script = "trap 'exit 143' TERM; sleep 1000 & wait";
    ok(
        &c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", script]),
        "ctr run -d",
    );

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        id,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 6",
    ]);
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(6), "out\n".into(), "err\n".into())
    );

    let tty = c.ctr_tty(
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "x3",
            id,
            "sh",
            "-c",
            "'stty size; tty'",
        ],
        21,
        77,
    );
    let screen = text(&tty.stdout);
    assert!(
        screen.contains("21 77") && screen.contains("/dev/pts/"),
        "exec -t output: {screen:?}"
    );

    let ps = ok(&c.ctr(&["task", "ps", id]), "ctr task ps");
    assert!(ps.lines().count() >= 3, "init shell and sleep expected: {ps}");

    ok(&c.ctr(&["task", "pause", id]), "pause");
    assert!(ok(&c.ctr(&["task", "ls"]), "ls")
        .lines()
        .any(|l| l.starts_with(id) && l.contains("PAUSED")));
    ok(&c.ctr(&["task", "resume", id]), "resume");
    assert!(ok(&c.ctr(&["task", "ls"]), "ls")
        .lines()
        .any(|l| l.starts_with(id) && l.contains("RUNNING")));

    let metrics = ok(&c.ctr(&["task", "metrics", id]), "metrics");
    let usage: u64 = metrics
        .lines()
        .find(|l| l.starts_with("memory.usage "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(usage > 0, "memory.usage in: {metrics}");

    ok(&c.ctr(&["task", "kill", "-s", "TERM", id]), "kill -s TERM");
    // `task delete` waits for nothing: wait for the exit through ctr itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ok(&c.ctr(&["task", "ls"]), "ls")
        .lines()
        .any(|l| l.starts_with(id) && l.contains("STOPPED"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "container did not stop after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    c.remove(id);
}

#[test]
fn ctr_run_t_is_interactive_with_the_terminal_size() {
    let c = containerd();
    let out = c.ctr_tty(
        &[
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "e2e-tty",
            "sh",
            "-c",
            "'stty size; exit 4'",
        ],
        33,
        99,
    );
    let screen = text(&out.stdout);
    assert!(screen.contains("33 99"), "screen: {screen:?}");
    assert_eq!(out.status.code(), Some(4));
    assert!(c.wait_clean("e2e-tty").is_empty());
}

fn fails_with(out: &std::process::Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got: {}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

#[test]
fn bad_input_fails_clearly_leaves_nothing_and_spares_the_sandbox() {
    let c = containerd();
    let run = |id: &str, extra: &[&str], rest: &[&str]| {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(rest);
        let _ = id;
        c.ctr(&args)
    };
    // Annotations out of range.
    let out = run(
        "e2e-vcpu",
        &["--annotation", "io.vmbox.vcpus=0"],
        &[IMAGE, "e2e-vcpu", "true"],
    );
    fails_with(&out, &["io.vmbox.vcpus", "\"0\""]);
    let out = run(
        "e2e-mem",
        &["--annotation", "io.vmbox.memory_mib=1048576"],
        &[IMAGE, "e2e-mem", "true"],
    );
    fails_with(&out, &["io.vmbox.memory_mib"]);
    // A rootfs that does not exist.
    let out = run(
        "e2e-norootfs",
        &["--rootfs"],
        &["/nonexistent/vmbox-rootfs", "e2e-norootfs", "true"],
    );
    fails_with(&out, &["/nonexistent/vmbox-rootfs"]);
    // An unknown key in the vmbox config.
    let good = std::fs::read_to_string(&c.config_path).unwrap();
    std::fs::write(&c.config_path, format!("bogus_key = 1\n{good}")).unwrap();
    let out = run("e2e-badcfg", &[], &[IMAGE, "e2e-badcfg", "true"]);
    std::fs::write(&c.config_path, &good).unwrap();
    fails_with(&out, &["bogus_key"]);
    for id in ["e2e-vcpu", "e2e-mem", "e2e-norootfs", "e2e-badcfg"] {
        let left = c.wait_clean(id);
        assert!(left.is_empty(), "{id} left: {left:#?}");
        let _ = c.ctr(&["container", "rm", id]);
    }

    // A pod: containers with the same sandbox id share one VM; a bad one fails alone.
    let pod = ["--annotation", "io.kubernetes.cri.sandbox-id=e2e-pod"];
    let member = ["--annotation", "io.kubernetes.cri.container-type=container"];
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(&pod);
    args.extend_from_slice(&[IMAGE, "e2e-pod", "sleep", "1000"]);
    ok(&c.ctr(&args), "pod sandbox container");
    let boot_id = |id: &str| {
        ok(
            &c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "b",
                id,
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ]),
            "boot_id",
        )
    };
    let sandbox_boot = boot_id("e2e-pod");

    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(&pod);
    args.extend_from_slice(&member);
    args.extend_from_slice(&[
        "--mount",
        "type=bind,src=/nonexistent/vmbox-bind,dst=/x,options=rbind",
        IMAGE,
        "e2e-pod-bad",
        "true",
    ]);
    fails_with(&c.ctr(&args), &["mounts[", "/nonexistent/vmbox-bind"]);
    let _ = c.ctr(&["container", "rm", "e2e-pod-bad"]);

    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(&pod);
    args.extend_from_slice(&member);
    args.extend_from_slice(&[
        "--mount",
        "type=bind,src=/etc,dst=/hostetc,options=rbind:ro",
        IMAGE,
        "e2e-pod-b",
        "sleep",
        "1000",
    ]);
    ok(&c.ctr(&args), "second pod container");
    assert_eq!(
        boot_id("e2e-pod-b"),
        sandbox_boot,
        "containers of one sandbox share one VM"
    );
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let seen = ok(
        &c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "h",
            "e2e-pod-b",
            "cat",
            "/hostetc/hostname",
        ]),
        "read bind",
    );
    assert_eq!(seen, hostname);
    let w = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        "e2e-pod-b",
        "touch",
        "/hostetc/vmbox-must-not-exist",
    ]);
    assert!(!w.status.success(), "a read-only bind mount was writable");
    assert!(
        boot_id("e2e-pod") == sandbox_boot,
        "the sandbox still serves its first container"
    );

    for id in ["e2e-pod-b", "e2e-pod"] {
        c.remove(id);
    }
    let left = c.wait_clean("e2e-pod");
    assert!(left.is_empty(), "pod left: {left:#?}");
}

#[test]
fn log_uris_file_and_binary_receive_the_output() {
    let c = containerd();
    let dir = c.dir.join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file.log");
    let uri = format!("file://{}", file.display());
    let script = "echo to-stdout; echo to-stderr >&2";
    let run_logged = |uri: &str, id: &str| {
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--log-uri",
            uri,
            IMAGE,
            id,
            "sh",
            "-c",
            script,
        ];
        ok(&c.ctr(&args), &format!("ctr run --log-uri {uri}"));
    };
    run_logged(&uri, "e2e-logfile");
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(
        logged.contains("to-stdout\n") && logged.contains("to-stderr\n"),
        "file log: {logged:?}"
    );

    // A logging binary per containerd's protocol: stdout on fd 3, stderr on fd 4, fd 5
    // closed once ready.
    let logger = dir.join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\nexec 5>&-\ncat <&4 > \"${1#out=}.err\" &\ncat <&3 > \"${1#out=}\"\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join("binary.log");
    let uri = format!("binary://{}?out={}", logger.display(), out.display());
    run_logged(&uri, "e2e-logbin");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = (
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(dir.join("binary.log.err")).unwrap_or_default(),
        );
        if got == ("to-stdout\n".into(), "to-stderr\n".into()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "binary log got {got:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for id in ["e2e-logfile", "e2e-logbin"] {
        assert!(c.wait_clean(id).is_empty());
    }
}

fn wait_stopped(c: &vmbox_tests::containerd::Containerd, id: &str, within: std::time::Duration) -> std::time::Duration {
    let t = std::time::Instant::now();
    while !ok(&c.ctr(&["task", "ls"]), "ls")
        .lines()
        .any(|l| l.starts_with(id) && l.contains("STOPPED"))
    {
        assert!(t.elapsed() < within, "{id} not STOPPED within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    t.elapsed()
}

#[test]
fn a_killed_vmm_ends_the_tasks_and_delete_cleans_up() {
    let c = containerd();
    let id = "e2e-vmmkill";
    c.run_detached(id, &[], &["sleep", "1000"]);
    let qemu = vmbox_tests::processes_mentioning(&format!("-name vmbox-default-{id},"));
    let pid: i32 = qemu
        .first()
        .and_then(|p| p.split(':').next())
        .and_then(|p| p.parse().ok())
        .expect("qemu process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let took = wait_stopped(c, id, std::time::Duration::from_secs(10));
    eprintln!("TaskExit {took:?} after SIGKILL to QEMU");
    ok(&c.ctr(&["task", "delete", id]), "task delete");
    c.remove(id);
}

#[test]
fn a_killed_shim_is_cleaned_up_by_containerd() {
    let c = containerd();
    let id = "e2e-shimkill";
    c.run_detached(id, &[], &["sleep", "1000"]);
    let shim = vmbox_tests::processes_mentioning(&format!("-id {id} -address {}", c.address));
    let pid: i32 = shim
        .first()
        .and_then(|p| p.split(':').next())
        .and_then(|p| p.parse().ok())
        .expect("shim process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // containerd notices the shim is gone, runs `containerd-shim-vmbox-v2 delete` (which
    // stops the VM and daemons and removes the state) and drops the task.
    let t = std::time::Instant::now();
    while ok(&c.ctr(&["task", "ls"]), "ls")
        .lines()
        .any(|l| l.starts_with(id) && l.contains("RUNNING"))
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "task still RUNNING 30 s after the shim died"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.remove(id);
}
