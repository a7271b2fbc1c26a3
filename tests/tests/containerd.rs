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

    c.assert_exec_t_sees_its_terminal("default", id, "x3");

    // The shim reaps its children one by one, by pid: no SIGCHLD handler (containerd-shim's
    // waitpid(-1) reaper) that would steal QEMU's, a daemon's or a hook's exit status.
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.shim_pid(id))).unwrap();
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap();
    assert_eq!(
        caught & (1 << (nix::libc::SIGCHLD - 1)),
        0,
        "the shim catches SIGCHLD: {caught:x}"
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

/// `kubectl exec -it` in CRI terms: 64-hex container and exec ids, with a tty, in the
/// longest namespace containerd allows (76 characters) and under a long `state_dir`: every
/// socket vmbox makes fits `sun_path` whatever the ids.
#[test]
fn exec_t_works_with_kubernetes_ids_a_76_character_namespace_and_a_long_state_dir() {
    let c = containerd();
    let ns = format!("k8s{}", "x".repeat(73));
    assert_eq!(ns.len(), 76);
    let id = "0123456789abcdef".repeat(4);
    let exec_id = "fedcba9876543210".repeat(4);
    let state_dir = c
        .dir
        .join(format!("long-state-{}", "s".repeat(vmbox_config::MAX_STATE_DIR_LEN)));
    let state_dir: std::path::PathBuf = state_dir
        .display()
        .to_string()
        .chars()
        .take(vmbox_config::MAX_STATE_DIR_LEN)
        .collect::<String>()
        .into();
    let good = std::fs::read_to_string(&c.config_path).unwrap();
    std::fs::write(&c.config_path, vmbox_tests::containerd::good_config(&state_dir)).unwrap();
    let tar = c.dir.join("busybox.tar").display().to_string();
    ok(
        &c.ctr(&["-n", &ns, "image", "import", &tar]),
        "image import into the long namespace",
    );
    let run = c.ctr(&[
        "-n",
        &ns,
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sleep",
        "1000",
    ]);
    // The shim read its config when it started; later tests get the usual one.
    std::fs::write(&c.config_path, &good).unwrap();
    ok(&run, "ctr run -d with a 64-hex id in a 76-character namespace");

    c.assert_exec_t_sees_its_terminal(&ns, &id, &exec_id);
    let paths = vmbox_config::SandboxPaths::new(&state_dir, &ns, &id);
    // The VMM's sockets are in `vmm/` below the run directory.
    let sockets: Vec<String> = [paths.run_dir.clone(), paths.run_dir.join("vmm")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("the VM's run directory"))
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_type()
                .map(|t| std::os::unix::fs::FileTypeExt::is_socket(&t))
                .unwrap_or(false)
        })
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(sockets.len() >= 3, "{sockets:?}");
    for s in &sockets {
        assert!(s.len() <= 107, "{s}: {} bytes", s.len());
    }

    c.remove_in(&ns, &id, &paths);
    let _ = c.ctr(&["-n", &ns, "image", "rm", IMAGE]);
}

/// containerd's event stream around 20 `ctr run --rm true` and 20 execs: every TaskExit
/// comes after the TaskStart or TaskExecStarted of its process.
#[test]
fn every_task_exit_follows_its_start_in_containerds_event_stream() {
    use std::io::BufRead;
    let c = containerd();
    let mut events = std::process::Command::new("ctr")
        .args(["--address", &c.address, "events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    let stdout = events.stdout.take().expect("ctr events' stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let runs: Vec<String> = (0..20).map(|i| format!("e2e-order-{i}")).collect();
    for id in &runs {
        ok(
            &c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "true"]),
            "ctr run --rm true",
        );
    }
    let host = "e2e-order-execs";
    ok(
        &c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, host, "sleep", "1000"]),
        "ctr run -d",
    );
    let execs: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
    for e in &execs {
        ok(
            &c.ctr(&["task", "exec", "--exec-id", e, host, "true"]),
            "ctr task exec true",
        );
    }
    // Collect until every process's exit arrived (bounded).
    let mut lines = Vec::new();
    let exit_of = |l: &str, id: &str| l.contains("/tasks/exit") && l.contains(&format!("\"id\":\"{id}\""));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let all_exited = |lines: &[String]| {
        runs.iter()
            .chain(execs.iter())
            .all(|id| lines.iter().any(|l| exit_of(l, id)))
    };
    while !all_exited(&lines) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("not every exit arrived within 60 s; events:\n{}", lines.join("\n")),
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    let position = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    for id in &runs {
        let start = position(&|l| l.contains("/tasks/start") && l.contains(&format!("\"container_id\":\"{id}\"")));
        let exit = position(&|l| exit_of(l, id));
        assert!(
            matches!((start, exit), (Some(s), Some(x)) if s < x),
            "{id}: TaskStart at {start:?}, TaskExit at {exit:?}:\n{}",
            lines.join("\n")
        );
    }
    for e in &execs {
        let started = position(&|l| l.contains("/tasks/exec-started") && l.contains(&format!("\"exec_id\":\"{e}\"")));
        let exit = position(&|l| exit_of(l, e));
        assert!(
            matches!((started, exit), (Some(s), Some(x)) if s < x),
            "{e}: TaskExecStarted at {started:?}, TaskExit at {exit:?}:\n{}",
            lines.join("\n")
        );
    }
    c.remove(host);
}

/// `containerd-shim-vmbox-v2 check` names the accelerator, warns that TCG is no security
/// boundary when it is the one, and checks /dev/net/tun for pod networking.
#[test]
fn check_warns_that_tcg_is_no_security_boundary() {
    let dir = std::env::var_os("VMBOX_SHIM_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/local/bin".into());
    let out = std::process::Command::new(dir.join("containerd-shim-vmbox-v2"))
        .arg("check")
        .output()
        .expect("run the shim's check");
    let text = text(&out.stdout);
    let accel = text
        .lines()
        .find(|l| l.starts_with("ok   accelerator:"))
        .unwrap_or_else(|| panic!("{text}"));
    let warned = text
        .lines()
        .any(|l| l.starts_with("WARN accelerator:") && l.contains("not a security boundary"));
    assert_eq!(accel.contains(": tcg"), warned, "{text}");
    assert!(text.lines().any(|l| l.contains(" tun: ")), "{text}");
}

/// Issue 13: every host process of a running sandbox, with its uid, capabilities,
/// `no_new_privs`, seccomp mode and mount namespace (docs/security.md has the table this
/// checks). QEMU and vhost-device-vsock: the VM's own unprivileged uid/gid (another VM has
/// another), no capability in any set, `no_new_privs`, a mount namespace of their own whose
/// root holds no /proc, /sys, /home, /root or /etc/shadow; QEMU in seccomp filter mode.
/// virtiofsd: its own sandbox (namespace and seccomp filter). The shim: root, trusted.
#[test]
fn every_host_process_of_a_sandbox_is_confined_as_documented() {
    use vmbox_tests::{descendants, Privileges};
    let c = containerd();
    let ids = ["e2e-confined-a", "e2e-confined-b"];
    let mut vm_uids = Vec::new();
    for id in ids {
        c.run_detached(id, &[], &["sleep", "1000"]);
        let shim = c.shim_pid(id);
        let shim_p = Privileges::of(shim).expect("shim status");
        assert_eq!(shim_p.uids, [0, 0, 0, 0], "the shim runs as root: {shim_p:?}");
        let mut seen = std::collections::BTreeMap::<&str, Vec<Privileges>>::new();
        for pid in descendants(shim) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv0 = String::from_utf8_lossy(cmd.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
            let kind = ["qemu-system", "virtiofsd", "vhost-device-vsock"]
                .into_iter()
                .find(|k| argv0.contains(k))
                .unwrap_or_else(|| panic!("unexpected host process {pid} of the sandbox: {argv0}"));
            if let Some(p) = Privileges::of(pid) {
                seen.entry(kind).or_default().push(p);
            }
        }
        eprintln!("{id}: {seen:#?}");
        let qemu = &seen.get("qemu-system").expect("a QEMU process")[..];
        let vsock = &seen.get("vhost-device-vsock").expect("a vhost-device-vsock process")[..];
        let uid = qemu[0].uids[0];
        assert!(uid >= vmbox_config::DEFAULT_FIRST_UID, "QEMU's uid {uid}");
        let net_ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        for p in qemu.iter().chain(vsock) {
            assert_ne!(
                net_ns(p.pid),
                net_ns(shim),
                "not in the host's network namespace: {p:?}"
            );
            assert_eq!(p.uids, [uid; 4], "{p:?}");
            assert_eq!(p.gids, [uid; 4], "{p:?}");
            assert_eq!(p.caps, [0; 5], "no capability in any set: {p:?}");
            assert!(p.no_new_privs, "{p:?}");
            assert_ne!(p.mount_ns, shim_p.mount_ns, "own mount namespace: {p:?}");
        }
        for p in qemu {
            assert_eq!(p.seccomp, 2, "QEMU's -sandbox filter: {p:?}");
            let root = format!("/proc/{}/root", p.pid);
            for hidden in [
                "proc",
                "sys",
                "home",
                "root",
                "etc/shadow",
                "etc/passwd",
                "var/lib/containerd",
            ] {
                assert!(
                    !std::path::Path::new(&root).join(hidden).exists(),
                    "/{hidden} is visible to QEMU"
                );
            }
            let devices: Vec<String> = std::fs::read_dir(format!("{root}/dev"))
                .expect("QEMU's /dev")
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                devices
                    .iter()
                    .all(|d| ["null", "zero", "urandom", "random", "kvm"].contains(&d.as_str())),
                "QEMU's /dev: {devices:?}"
            );
        }
        // virtiofsd needs root to serve files as their owners: it confines itself.
        let fs = &seen.get("virtiofsd").expect("a virtiofsd process")[..];
        assert!(
            fs.iter().any(|p| p.seccomp == 2 && p.mount_ns != shim_p.mount_ns),
            "virtiofsd serves from its own sandbox: {fs:?}"
        );
        vm_uids.push(uid);
        // The confined VM still works: an exec answers.
        assert_eq!(
            ok(
                &c.ctr(&["task", "exec", "--exec-id", "probe", id, "cat", "/proc/self/status"]),
                "exec"
            )
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string()),
            Some("0".to_string()),
            "the container's own uid is untouched"
        );
    }
    assert_ne!(vm_uids[0], vm_uids[1], "two sandboxes never share a uid");
    for id in ids {
        c.remove(id);
    }
    // Nothing runs as the VMs' uids once they are gone.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            use std::os::unix::fs::MetadataExt;
            e.metadata().map(|m| vm_uids.contains(&m.uid())).unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "processes of the VMs' uids left: {left:?}");
}

/// The warm pool (docs/lifecycle.md): a standby VM is booted after the first start, a
/// fitting sandbox takes it over (its directories become links to the standby's), a dead
/// claimed shim's VM is removed by containerd's `delete`, one that does not fit boots its
/// own and leaves the standby alone, and a standby nobody claims stops itself after
/// `pool.idle_timeout_s`. Nothing is left behind.
#[test]
fn a_warm_pool_hands_a_fitting_sandbox_a_booted_vm_and_leaves_nothing() {
    use std::time::Duration;
    use vmbox_tests::containerd::{wait_for, Containerd};
    let tar = containerd().dir.join("busybox.tar");
    let c = Containerd::start_at(std::path::Path::new("/run/vmbox-pool-e2e"), false);
    let mut config = std::fs::read_to_string(&c.config_path).unwrap();
    config.push_str("[pool]\nsize = 1\nidle_timeout_s = 10\n");
    std::fs::write(&c.config_path, config).unwrap();
    ok(&c.ctr(&["image", "import", &tar.display().to_string()]), "image import");
    let pool = c.state_dir.join("pool");
    let ready = || -> Vec<String> {
        std::fs::read_dir(&pool)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".sock"))
                    .collect()
            })
            .unwrap_or_default()
    };

    // No standby yet: the first sandbox boots its own VM, and its start fills the pool.
    ok(
        &c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "pool-first", "true"]),
        "first run",
    );
    wait_for("a ready standby VM", Duration::from_secs(120), || ready().len() == 1);

    // A fitting sandbox takes the standby VM over.
    c.run_detached("pool-taken", &[], &["sleep", "100000"]);
    let own = vmbox_config::SandboxPaths::new(&c.state_dir, "default", "pool-taken");
    assert!(own.dir.is_symlink(), "pool-taken does not run on the standby VM");
    let standby = own.dir.canonicalize().unwrap();
    let out = c.ctr(&["task", "exec", "--exec-id", "e", "pool-taken", "echo", "on the standby"]);
    assert_eq!(ok(&out, "exec in the taken-over sandbox"), "on the standby\n");
    ok(&c.ctr(&["task", "kill", "-s", "KILL", "pool-taken"]), "kill");
    wait_for("task delete pool-taken", Duration::from_secs(30), || {
        c.ctr(&["task", "delete", "pool-taken"]).status.success()
    });
    ok(&c.ctr(&["container", "rm", "pool-taken"]), "container rm");
    // The sandbox's links, the standby's directories and every process that names them.
    let gone = |own: &vmbox_config::SandboxPaths, standby: &std::path::Path| {
        !own.dir.is_symlink()
            && !own.run_dir.is_symlink()
            && !standby.exists()
            && vmbox_tests::processes_mentioning(&standby.display().to_string()).is_empty()
    };
    wait_for("the taken-over VM's end", Duration::from_secs(30), || {
        gone(&own, &standby)
    });

    // A claimed standby's shim that dies: containerd's `delete` finds the VM through the
    // sandbox's links and removes it; the next refill removes the claim's record.
    wait_for("the pool refilled", Duration::from_secs(120), || ready().len() == 1);
    c.run_detached("pool-killed", &[], &["sleep", "100000"]);
    let own = vmbox_config::SandboxPaths::new(&c.state_dir, "default", "pool-killed");
    let standby = own.dir.canonicalize().expect("pool-killed runs on the standby VM");
    let sid = standby.file_name().unwrap().to_string_lossy().into_owned();
    let shim: i32 = std::fs::read_to_string(pool.join(format!("{sid}.claimed")))
        .expect("the claimed standby's record")
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("task delete pool-killed", Duration::from_secs(30), || {
        c.ctr(&["task", "delete", "pool-killed"]).status.success()
            || text(&c.ctr(&["task", "ls"]).stdout)
                .lines()
                .all(|l| !l.starts_with("pool-killed"))
    });
    ok(&c.ctr(&["container", "rm", "pool-killed"]), "container rm");
    wait_for("the dead shim's VM removed", Duration::from_secs(30), || {
        gone(&own, &standby)
    });

    // One that does not fit (more memory than the standby has) boots its own VM.
    wait_for("the pool refilled", Duration::from_secs(120), || ready().len() == 1);
    let waiting = ready();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "536870912",
        "--runtime",
        RUNTIME,
        IMAGE,
        "pool-big",
        "true",
    ]);
    ok(&out, "a run that does not fit the standby");
    assert_eq!(
        ready(),
        waiting,
        "the standby was used by a sandbox that does not fit it"
    );

    // Unclaimed, it stops itself; nothing of any VM is left.
    let vms = c.state_dir.join("vm");
    wait_for("the idle standby's exit", Duration::from_secs(60), || {
        let pool_empty = std::fs::read_dir(&pool)
            .map(|d| d.flatten().all(|e| e.file_name() == "refill.lock"))
            .unwrap_or(true);
        pool_empty
            && std::fs::read_dir(&vms).map(|mut d| d.next().is_none()).unwrap_or(true)
            && vmbox_tests::processes_mentioning(&c.state_dir.display().to_string()).is_empty()
    });
    c.stop();
}
