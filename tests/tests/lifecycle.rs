//! Lifecycle tests through a real containerd: no byte lost on stop or SIGTERM, exit codes
//! under many execs, shutdown with stdin held open, containerd restarts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmbox_tests::containerd::{containerd, ok, text, wait_for, Containerd, IMAGE, RUNTIME};

fn sha(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap_or_default()))
}

/// The file `name` in the container's writable snapshot layer on the host.
fn in_upperdir(c: &Containerd, name: &str) -> Option<PathBuf> {
    let snaps = c.dir.join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    std::fs::read_dir(snaps)
        .ok()?
        .flatten()
        .map(|e| e.path().join("fs").join(name))
        .find(|p| p.exists())
}

/// Starts a container that writes 64 MiB without fsync to a bind-mounted host directory
/// and to its rootfs, then idles. Returns the host directory once the writes are done.
fn start_writer(c: &Containerd, id: &str) -> PathBuf {
    let host = c.dir.join(format!("data-{id}"));
    let _ = std::fs::remove_dir_all(&host);
    std::fs::create_dir_all(&host).unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", host.display());
    let script = format!(
        "dd if=/dev/urandom of=/data/blob bs=1M count=64 2>/dev/null; cp /data/blob /rootfs-blob-{id}; \
         sha256sum /data/blob | cut -d' ' -f1 > /data/sum; touch /data/done; exec sleep 1000"
    );
    ok(
        &c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--mount",
            &mount,
            IMAGE,
            id,
            "sh",
            "-c",
            &script,
        ]),
        "run writer",
    );
    wait_for("the writer's 64 MiB", Duration::from_secs(120), || {
        host.join("done").exists()
    });
    host
}

fn check_no_loss(c: &Containerd, id: &str, host: &Path) {
    let want = std::fs::read_to_string(host.join("sum")).unwrap().trim().to_string();
    assert_eq!(std::fs::metadata(host.join("blob")).unwrap().len(), 64 << 20);
    assert_eq!(sha(&host.join("blob")), want, "bind-mounted file differs");
    let rootfs = in_upperdir(c, &format!("rootfs-blob-{id}")).expect("the rootfs copy in the snapshot");
    assert_eq!(sha(&rootfs), want, "rootfs file differs");
}

#[test]
fn zero_loss_on_stop_and_delete() {
    let c = containerd();
    let id = "lc-stop";
    let host = start_writer(c, id);
    ok(&c.ctr(&["task", "kill", "-s", "KILL", id]), "kill");
    wait_for("stop", Duration::from_secs(30), || {
        c.ctr(&["task", "delete", id]).status.success()
    });
    check_no_loss(c, id, &host);
    ok(&c.ctr(&["container", "rm", id]), "rm");
    assert!(c.wait_clean(id).is_empty());
}

#[test]
fn zero_loss_on_sigterm_to_the_shim() {
    let c = containerd();
    let id = "lc-sigterm";
    let host = start_writer(c, id);
    let pid = c.shim_pid(id);
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("shim exit after SIGTERM", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    eprintln!("shim gone {:?} after SIGTERM", t.elapsed());
    check_no_loss(c, id, &host);
    c.remove(id);
}

#[test]
fn many_execs_report_every_exit_code() {
    let c = containerd();
    let id = "lc-execs";
    c.run_detached(id, &[], &["sleep", "100000"]);
    let sequential: usize = std::env::var("VMBOX_TEST_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let t = Instant::now();
    for n in 0..sequential {
        let script = format!("exit $(({n} % 256))");
        let out = c.ctr(&["task", "exec", "--exec-id", &format!("s{n}"), id, "sh", "-c", &script]);
        assert_eq!(
            out.status.code(),
            Some((n % 256) as i32),
            "exec {n}: {}",
            text(&out.stderr)
        );
    }
    eprintln!("{sequential} sequential execs in {:?}", t.elapsed());
    let t = Instant::now();
    let children: Vec<_> = (0..100)
        .map(|n| {
            let script = format!("exit $(({n} % 256))");
            std::process::Command::new("timeout")
                .args([
                    "300",
                    "ctr",
                    "--address",
                    &c.address,
                    "task",
                    "exec",
                    "--exec-id",
                    &format!("p{n}"),
                    id,
                ])
                .args(["sh", "-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (n, ch) in children.into_iter().enumerate() {
        let out = ch.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(n as i32 % 256),
            "concurrent exec {n}: {}",
            text(&out.stderr)
        );
    }
    eprintln!("100 concurrent execs in {:?}", t.elapsed());
    c.remove(id);
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    assert!(!log.contains("ECHILD"), "ECHILD in containerd's log");
}

#[test]
fn shutdown_finishes_while_a_client_holds_stdin_open() {
    let c = containerd();
    let id = "lc-stdin";
    c.run_detached(id, &[], &["sleep", "100000"]);
    // `cat` reading a stdin that the client never closes.
    let mut holder = std::process::Command::new("ctr")
        .args(["--address", &c.address, "task", "exec", "--exec-id", "cat", id, "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("cat running", Duration::from_secs(60), || {
        ok(&c.ctr(&["task", "ps", id]), "ps").lines().count() >= 3
    });
    let pid = c.shim_pid(id);
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    // Bound: the config's shutdown timeout (15 s) plus the VM's stop.
    let took = wait_for("shim exit with stdin held open", Duration::from_secs(25), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    eprintln!(
        "shutdown with stdin held open took {took:?} ({:?} since SIGTERM)",
        t.elapsed()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    c.remove(id);
}

#[test]
fn sandboxes_survive_a_containerd_restart() {
    let c = containerd();
    let id = "lc-restart";
    c.run_detached(id, &[], &["sleep", "100000"]);
    c.restart();
    let out = c.ctr(&["task", "exec", "--exec-id", "after", id, "sh", "-c", "echo still here"]);
    assert_eq!(ok(&out, "exec after restart"), "still here\n");
    ok(&c.ctr(&["task", "kill", "-s", "KILL", id]), "kill after restart");
    c.remove(id);
}

#[test]
fn closing_stdin_ends_a_reading_process_with_eof() {
    let c = containerd();
    let id = "lc-eof";
    c.run_detached(id, &[], &["sleep", "100000"]);
    let mut child = std::process::Command::new("timeout")
        .args([
            "120",
            "ctr",
            "--address",
            &c.address,
            "task",
            "exec",
            "--exec-id",
            "cat",
            id,
            "sh",
            "-c",
            "cat; echo EOF-seen",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"line one\nline two\n").unwrap();
        // Dropping stdin closes it: ctr sends CloseIO, the process must see EOF.
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "line one\nline two\nEOF-seen\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(out.status.success());
    c.remove(id);
}
