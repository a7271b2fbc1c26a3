//! runc parity through a real containerd 1.6 and `ctr`: the same command under
//! `io.containerd.runc.v2` and under vmbox, compared. Each test is a behaviour once found
//! different (issue 9): signal state, a missing working directory, a spec without PATH,
//! OOM events, a shim whose clients vanished, kill and delete of a stopped container in
//! a pod, the hostname, non-bind mounts from the spec.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmbox_tests::containerd::{containerd, ok, text, wait_for, Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";

/// `ctr run --rm` of `cmd` with `extra` flags under `runtime`: (exit code, stdout, stderr).
fn run(c: &Containerd, runtime: &str, id: &str, extra: &[&str], cmd: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.push(IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    let out = c.ctr(&args);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Runs `cmd` under runc and under vmbox and asserts the same exit code and stdout;
/// returns vmbox's stdout.
fn same_as_runc(c: &Containerd, id: &str, extra: &[&str], cmd: &[&str]) -> String {
    let want = run(c, RUNC, &format!("{id}-runc"), extra, cmd);
    let got = run(c, RUNTIME, id, extra, cmd);
    assert_eq!(
        (got.0, &got.1),
        (want.0, &want.1),
        "vmbox differs from runc for {cmd:?} {extra:?}\nvmbox stderr: {}\nrunc stderr: {}",
        got.2,
        want.2
    );
    let left = c.wait_clean(id);
    assert!(left.is_empty(), "{id} left: {left:#?}");
    got.1
}

const SIGNAL_STATE: &str = "grep -E '^Sig(Blk|Ign)' /proc/self/status | cat";
const DEFAULT_SIGNALS: &str = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n";

#[test]
fn processes_start_with_default_signals_and_pipelines_end() {
    let c = containerd();
    // Container init: nothing ignored, nothing blocked. (runc's containers on this host
    // show signal 32 ignored, which they inherit from the Go shim that starts runc; runc
    // itself resets everything else, and SIGPIPE above all.)
    let (code, out, err) = run(c, RUNTIME, "e2e-sig-init", &[], &["sh", "-c", SIGNAL_STATE]);
    assert_eq!((code, out.as_str()), (Some(0), DEFAULT_SIGNALS), "{err}");
    let (_, runc, _) = run(c, RUNC, "e2e-sig-init-runc", &[], &["sh", "-c", SIGNAL_STATE]);
    let ignored = runc
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:\t"))
        .unwrap_or_default();
    let mask = u64::from_str_radix(ignored.trim(), 16).expect("runc's SigIgn");
    assert_eq!(mask & (1 << (13 - 1)), 0, "runc leaves SIGPIPE at its default: {runc}");
    // With SIGPIPE ignored, `yes` never noticed its reader had gone and ran for ever.
    let out = same_as_runc(
        c,
        "e2e-sig-pipe",
        &[],
        &["sh", "-c", "yes 0123456789abcdef | head -c 1048576 | wc -c"],
    );
    assert_eq!(out.trim(), "1048576");
    // With a terminal.
    let tty = c.ctr_tty(
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            RUNTIME,
            IMAGE,
            "e2e-sig-tty",
            "sh",
            "-c",
            &format!("\"{SIGNAL_STATE}\""),
        ],
        24,
        80,
    );
    assert_eq!(text(&tty.stdout).replace("^@", ""), DEFAULT_SIGNALS, "init with a tty");
    // Execs, with and without a terminal.
    let id = "e2e-sig-exec";
    c.run_detached(id, &[], &["sleep", "1000"]);
    let out = c.ctr(&["task", "exec", "--exec-id", "s1", id, "sh", "-c", SIGNAL_STATE]);
    assert_eq!(ok(&out, "exec"), DEFAULT_SIGNALS, "exec");
    let tty = c.ctr_tty(
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "s2",
            id,
            "sh",
            "-c",
            &format!("\"{SIGNAL_STATE}\""),
        ],
        24,
        80,
    );
    assert_eq!(text(&tty.stdout).replace("^@", ""), DEFAULT_SIGNALS, "exec with a tty");
    c.remove(id);
}

#[test]
fn a_missing_working_directory_is_created_as_runc_creates_it() {
    let c = containerd();
    let out = same_as_runc(
        c,
        "e2e-cwd",
        &["--cwd", "/no/such/dir"],
        &["sh", "-c", "pwd; stat -c '%u:%g %a' /no /no/such /no/such/dir"],
    );
    assert_eq!(out, "/no/such/dir\n0:0 755\n0:0 755\n0:0 755\n");
    // In a volume (a Kubernetes workingDir in an emptyDir): created in the volume.
    let mut outs = Vec::new();
    for (runtime, id) in [(RUNC, "e2e-cwd-vol-runc"), (RUNTIME, "e2e-cwd-vol")] {
        let vol = c.dir.join(format!("vol-{id}"));
        let _ = std::fs::remove_dir_all(&vol);
        std::fs::create_dir_all(&vol).unwrap();
        let mount = format!("type=bind,src={},dst=/vol,options=rbind", vol.display());
        let out = run(
            c,
            runtime,
            id,
            &["--mount", &mount, "--cwd", "/vol/a/b"],
            &["sh", "-c", "pwd; stat -c '%u:%g %a' ."],
        );
        assert!(vol.join("a/b").is_dir(), "{runtime}: /vol/a/b not in the volume");
        outs.push(out);
    }
    assert_eq!(outs[1], outs[0], "vmbox, then runc");
    assert_eq!(outs[1].1, "/vol/a/b\n0:0 755\n");
    // runc does not create an exec's working directory either; the failure names the
    // directory and the errno instead of libcontainer's bare "failed to unix syscall".
    let id = "e2e-cwd-exec";
    c.run_detached(id, &[], &["sleep", "1000"]);
    let out = c.ctr(&["task", "exec", "--exec-id", "c1", "--cwd", "/missing/dir", id, "pwd"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("/missing/dir") && err.contains("No such file or directory"),
        "{err}"
    );
    c.remove(id);
}

/// A busybox root directory for `ctr run --rootfs`: no image, so no environment at all.
fn rootfs_dir(c: &Containerd, name: &str) -> PathBuf {
    let dir = c.dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    vmbox_tests::busybox_rootfs(&dir).expect("busybox rootfs");
    dir
}

#[test]
fn a_spec_without_path_runs_absolute_programs_and_adds_nothing() {
    let c = containerd();
    let root = rootfs_dir(c, "rootfs-nopath");
    let root = root.to_string_lossy().to_string();
    let run_rootfs = |runtime: &str, id: &str, cmd: &[&str]| {
        let mut args = vec!["run", "--rm", "--runtime", runtime, "--rootfs", &root, id];
        args.extend_from_slice(cmd);
        let out = c.ctr(&args);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    // The environment the program sees is the spec's, under both runtimes.
    let cmd = ["/bin/sh", "-c", "echo ok; env | sort"];
    let want = run_rootfs(RUNC, "e2e-nopath-runc", &cmd);
    let got = run_rootfs(RUNTIME, "e2e-nopath", &cmd);
    assert_eq!(want.0, Some(0), "runc: {}", want.2);
    assert_eq!((got.0, &got.1), (want.0, &want.1), "vmbox stderr: {}", got.2);
    assert!(got.1.starts_with("ok\n"));
    // A bare name without PATH fails as under runc.
    let got = run_rootfs(RUNTIME, "e2e-nopath-bare", &["sh", "-c", "echo ok"]);
    assert_ne!(got.0, Some(0));
    assert!(got.2.contains("executable file not found in $PATH"), "{}", got.2);
    for id in ["e2e-nopath", "e2e-nopath-bare"] {
        assert!(c.wait_clean(id).is_empty());
    }
}

#[test]
fn the_hostname_is_the_hosts_unless_the_spec_sets_one() {
    let c = containerd();
    let out = same_as_runc(c, "e2e-hostname", &[], &["hostname"]);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(out.trim(), host.trim());
}

#[test]
fn non_bind_mounts_and_binds_of_files_and_directories_behave_as_under_runc() {
    let c = containerd();
    let dir = c.dir.join("mount-src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in-dir"), "dir content\n").unwrap();
    let file = c.dir.join("mount-file");
    std::fs::write(&file, "file content\n").unwrap();
    let mounts = [
        "type=tmpfs,dst=/t1,options=size=1m".to_string(),
        "type=tmpfs,src=tmpfs,dst=/t2".to_string(),
        "type=proc,dst=/p2".to_string(),
        "type=sysfs,dst=/s2,options=ro".to_string(),
        "type=mqueue,dst=/mq".to_string(),
        "type=devpts,dst=/pts2,options=newinstance".to_string(),
        format!("type=bind,src={},dst=/f,options=rbind:ro", file.display()),
        format!("type=bind,src={},dst=/d,options=rbind", dir.display()),
    ];
    let mut extra = Vec::new();
    for m in &mounts {
        extra.push("--mount");
        extra.push(m.as_str());
    }
    let script = "for d in /t1 /t2 /p2 /s2 /mq /pts2; do grep \" $d \" /proc/mounts | cut -d' ' -f2,3; done; \
                  grep ' /t1 ' /proc/mounts | grep -o 'size=[0-9a-z]*'; cat /f /d/in-dir; \
                  touch /f 2>/dev/null || echo read-only";
    let out = same_as_runc(c, "e2e-mounts", &extra, &["sh", "-c", script]);
    assert_eq!(
        out,
        "/t1 tmpfs\n/t2 tmpfs\n/p2 proc\n/s2 sysfs\n/mq mqueue\n/pts2 devpts\nsize=1024k\n\
         file content\ndir content\nread-only\n"
    );
    // cgroup: the guest's is cgroup v2 (this host's may be v1, so runc's differs).
    let (code, out, err) = run(
        c,
        RUNTIME,
        "e2e-mount-cgroup",
        &["--mount", "type=cgroup,dst=/cg"],
        &["sh", "-c", "grep ' /cg ' /proc/mounts | cut -d' ' -f3"],
    );
    assert_eq!((code, out.as_str()), (Some(0), "cgroup2\n"), "{err}");
    // A filesystem on a host device cannot be made in the guest: the error names it.
    let (code, _, err) = run(
        c,
        RUNTIME,
        "e2e-mount-ext4",
        &["--mount", "type=ext4,src=/dev/vda,dst=/x"],
        &["true"],
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("mounts[") && err.contains("ext4") && err.contains("/x"),
        "{err}"
    );
    for id in ["e2e-mount-cgroup", "e2e-mount-ext4"] {
        assert!(c.wait_clean(id).is_empty());
    }
}

/// `ctr events`, read in the background; the lines seen so far.
struct Events {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Events {
    fn start(c: &Containerd) -> Events {
        let mut child = Command::new("ctr")
            .args(["--address", &c.address, "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let mut out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Events { child, lines }
    }

    /// How many `/tasks/oom` events name `id` (the event body holds the container id).
    fn ooms(&self, id: &str) -> usize {
        let quoted = format!("\"{id}\"");
        self.lines
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains("/tasks/oom") && l.contains(&quoted))
            .count()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const EAT_MEMORY: &str = "x=a; while :; do x=$x$x; done";

#[test]
fn every_oom_kill_reaches_containerd_as_a_task_oom() {
    let c = containerd();
    let events = Events::start(c);
    // ctr events subscribes asynchronously: wait until it sees an event of ours.
    let (code, _, err) = run(c, RUNTIME, "e2e-oom-ready", &[], &["true"]);
    assert_eq!(code, Some(0), "{err}");
    wait_for("ctr events to run", Duration::from_secs(30), || {
        events.lines.lock().unwrap().contains("e2e-oom-ready")
    });
    // A lone container whose init is killed (runc publishes /tasks/oom; the CRI plugin
    // turns it into the OOMKilled reason).
    let limit = ["--memory-limit", "67108864"];
    let (code, _, err) = run(c, RUNTIME, "e2e-oom", &limit, &["sh", "-c", EAT_MEMORY]);
    assert_eq!(code, Some(137), "{err}");
    wait_for("TaskOOM of e2e-oom", Duration::from_secs(10), || {
        events.ooms("e2e-oom") >= 1
    });

    // A pod whose two containers are OOM-killed at the same moment, and a kill of a
    // process that is not the container's init (the container lives on).
    let pod = "e2e-oompod";
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
    ];
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
    ];
    let pod_ann = format!("io.kubernetes.cri.sandbox-id={pod}");
    let with = |base: &[&'static str; 3], more: &[&'static str]| {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        v.push(pod_ann.clone());
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let sb = with(&sandbox, &[]);
    c.run_detached(
        pod,
        &sb.iter().map(String::as_str).collect::<Vec<_>>(),
        &["sleep", "1000"],
    );
    let app = with(&member, &limit);
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    // Both start allocating about a second after they are created.
    let script = format!("sleep 1; {EAT_MEMORY}");
    for a in ["e2e-oompod-a", "e2e-oompod-b"] {
        c.run_detached(a, &app, &["sh", "-c", &script]);
    }
    for a in ["e2e-oompod-a", "e2e-oompod-b"] {
        wait_for(&format!("TaskOOM of {a}"), Duration::from_secs(30), || {
            events.ooms(a) >= 1
        });
    }
    let child = "e2e-oompod-child";
    let script = format!("({EAT_MEMORY}); echo survived; exec sleep 1000");
    c.run_detached(child, &app, &["sh", "-c", &script]);
    wait_for("TaskOOM of a non-init process", Duration::from_secs(30), || {
        events.ooms(child) >= 1
    });
    let out = c.ctr(&["task", "ls"]);
    assert!(
        ok(&out, "task ls")
            .lines()
            .any(|l| l.starts_with(child) && l.contains("RUNNING")),
        "the container whose child was OOM-killed lives on"
    );
    for id in ["e2e-oompod-a", "e2e-oompod-b", child, pod] {
        c.remove(id);
    }
    assert_eq!(events.ooms(pod), 0, "no OOM event for a container that had none");
}

#[test]
fn kill_and_delete_of_a_stopped_container_in_a_pod_answer_as_runc() {
    let c = containerd();
    let pod = "e2e-killpod";
    let app = "e2e-killpod-app";
    let ann = format!("io.kubernetes.cri.sandbox-id={pod}");
    c.run_detached(
        pod,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &ann,
        ],
        &["sleep", "1000"],
    );
    c.run_detached(
        app,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            &ann,
        ],
        &["sleep", "1000"],
    );
    ok(&c.ctr(&["task", "kill", "--all", "-s", "KILL", pod]), "kill --all");
    wait_for(&format!("{pod} STOPPED"), Duration::from_secs(30), || {
        ok(&c.ctr(&["task", "ls"]), "ls")
            .lines()
            .any(|l| l.starts_with(&format!("{pod} ")) && l.contains("STOPPED"))
    });
    // As runc: the process has finished (NotFound), never a guest file error.
    for args in [
        vec!["task", "kill", "-s", "KILL", pod],
        vec!["task", "kill", "--all", "-s", "KILL", pod],
    ] {
        let out = c.ctr(&args);
        let err = text(&out.stderr);
        assert!(
            out.status.success() || (err.contains("process already finished") && err.contains("not found")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("cgroup"), "{args:?}: {err}");
    }
    ok(
        &c.ctr(&["task", "delete", "-f", pod]),
        "task delete -f of the stopped sandbox container",
    );
    // The pod's other container is untouched.
    let out = c.ctr(&["task", "exec", "--exec-id", "k1", app, "true"]);
    ok(&out, "exec in the pod's app container");
    c.remove(app);
    ok(&c.ctr(&["container", "rm", pod]), "container rm");
    assert!(c.wait_clean(pod).is_empty());
}

/// A ttrpc client of the shim serving `id`, the way containerd talks to it.
async fn shim_client(c: &Containerd, id: &str) -> containerd_shim::protos::shim_async::TaskClient {
    let socket = c.shim_socket(id).expect("shim socket");
    let client = ttrpc::asynchronous::Client::connect(&format!("unix://{socket}"))
        .await
        .expect("connect to the shim");
    containerd_shim::protos::shim_async::TaskClient::new(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_whose_clients_vanished_before_opening_their_fifos_still_exits() {
    use containerd_shim::protos::api::{ExecProcessRequest, StartRequest};
    let c = containerd();
    let id = "e2e-vanished";
    c.run_detached(id, &[], &["sleep", "1000"]);
    let shim = c.shim_pid(id);
    // Execs as `ctr task exec` makes them, whose client is killed before it opens its
    // FIFOs: the FIFOs exist, nobody ever opens their other ends.
    let fifos = c.dir.join("vanished-fifos");
    let _ = std::fs::remove_dir_all(&fifos);
    std::fs::create_dir_all(&fifos).unwrap();
    let task = shim_client(c, id).await;
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);
    for (n, with_stdin) in [(1, true), (2, false), (3, true)] {
        let mut paths = vec![];
        for name in ["stdin", "stdout", "stderr"] {
            let p = fifos.join(format!("x{n}-{name}"));
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            paths.push(p.to_string_lossy().to_string());
        }
        let process = serde_json::json!({
            "args": ["sleep", "1000"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin"], "terminal": false
        });
        let req = ExecProcessRequest {
            id: id.into(),
            exec_id: format!("x{n}"),
            stdin: if with_stdin { paths[0].clone() } else { String::new() },
            stdout: paths[1].clone(),
            stderr: paths[2].clone(),
            spec: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: serde_json::to_vec(&process).unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        };
        task.exec(ctx(), &req).await.expect("Exec");
        let start = StartRequest {
            id: id.into(),
            exec_id: format!("x{n}"),
            ..Default::default()
        };
        task.start(ctx(), &start).await.expect("Start");
    }
    drop(task);
    // No thread of the shim sits in a FIFO open waiting for a writer (the kernel's
    // wait_for_partner): such threads kept shims alive for ever.
    let wchans: Vec<String> = std::fs::read_dir(format!("/proc/{shim}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("wchan")).ok())
        .collect();
    // Where the kernel hides its symbols every wchan reads 0 and this check means nothing.
    assert!(
        wchans.iter().any(|w| w.chars().any(|c| c.is_ascii_alphabetic())),
        "no kernel symbols in wchan: {wchans:?}"
    );
    let blocked: Vec<&String> = wchans.iter().filter(|w| w.contains("wait_for_partner")).collect();
    assert!(blocked.is_empty(), "shim threads blocked opening FIFOs: {blocked:?}");
    // containerd deletes the container and calls Shutdown: the shim must be gone soon.
    let c2 = c;
    tokio::task::spawn_blocking(move || c2.remove(id)).await.unwrap();
    // remove() waited for the shim's command line to disappear; a zombie waiting for the
    // host's init to reap it is gone too.
    let running = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .map(|s| s != "Z")
            })
            .unwrap_or(false)
    };
    wait_for("the shim to exit (not a zombie)", Duration::from_secs(5), || {
        !running(shim)
    });
    let _ = std::fs::remove_dir_all(&fifos);
}

#[test]
fn rlimits_capabilities_seccomp_masked_paths_and_a_large_environment_stay_as_under_runc() {
    let c = containerd();
    // 100 KB in one variable: the environment goes through vmbox's executor.
    let big = format!("BIG={}", "x".repeat(100_000));
    let script = "ulimit -n; ulimit -Hn; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|Seccomp|NoNewPrivs):' /proc/self/status; \
                  stat -c %F /proc/timer_list /proc/keys; ls -A /sys/firmware | wc -l; echo ${#BIG}";
    let out = same_as_runc(c, "e2e-holdout", &["--seccomp", "--env", &big], &["sh", "-c", script]);
    assert!(out.contains("Seccomp:\t2\n"), "seccomp filter on: {out}");
    assert!(
        out.ends_with("character special file\ncharacter special file\n0\n100000\n"),
        "masked paths (/dev/null over files, an empty directory) and BIG intact: {out}"
    );
}
