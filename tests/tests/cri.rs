//! Kubernetes pods through containerd 1.6's CRI plugin, driven as the kubelet drives it,
//! with the project's own CRI client (vmbox_tests::cri). Each test makes its own pods
//! and removes them; a pod is one micro-VM.
//!
//! Run single-threaded (`--test-threads=1`): the tests share one containerd and the
//! machine's two cores.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use k8s_cri::v1 as cri;
use vmbox_config::SandboxPaths;
use vmbox_tests::cri::{Cri, Pod, PodSpec, K8S_NS};

/// What a pod's VM left on the host once it is removed (processes, mounts, files).
fn leftovers(c: &Cri, pod: &str) -> Vec<String> {
    let ctrd = c.containerd;
    ctrd.wait_clean_of(&SandboxPaths::new(&ctrd.state_dir, K8S_NS, pod), pod)
}

async fn remove_and_check(c: &mut Cri, pod: &Pod) -> Result<()> {
    c.stop_and_remove_pod(&pod.id).await?;
    let left = leftovers(c, &pod.id);
    if !left.is_empty() {
        return Err(anyhow!("pod {} left: {left:#?}", pod.id));
    }
    Ok(())
}

/// Sidecars of one pod share 127.0.0.1, IPC, the hostname and /dev/shm, as under runc.
#[tokio::test]
async fn containers_of_a_pod_share_localhost_ipc_hostname_and_shm() -> Result<()> {
    let mut c = Cri::connect().await?;
    let pod = c
        .run_pod(
            "share",
            PodSpec {
                hostname: "vmbox-pod".into(),
                ..Default::default()
            },
        )
        .await?;
    let server = c
        .run_container(&pod, "server", &["sh", "-c", "nc -ll -p 8080 -e echo pong"])
        .await?;
    let client = c.run_container(&pod, "client", &["sleep", "600"]).await?;
    // The server may still be starting to listen: bounded retries.
    let t = Instant::now();
    let reply = loop {
        let (code, out, err) = c.exec_sync(&client, &["nc", "127.0.0.1", "8080"]).await?;
        if code == 0 && out.contains("pong") {
            break out;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "client never reached the server on 127.0.0.1:8080: {code} {out} {err}"
            ));
        }
    };
    assert_eq!(reply.trim(), "pong");
    for ns in ["ipc", "uts"] {
        let link = format!("readlink /proc/self/ns/{ns}");
        let (a, b) = (c.sh(&server, &link).await?, c.sh(&client, &link).await?);
        assert_eq!(a, b, "{ns} namespace of the two containers");
    }
    assert_eq!(c.sh(&client, "hostname").await?, "vmbox-pod");
    assert_eq!(c.sh(&server, "cat /etc/hostname").await?, "vmbox-pod");
    c.sh(&server, "echo shared > /dev/shm/x").await?;
    assert_eq!(c.sh(&client, "cat /dev/shm/x").await?, "shared");
    assert!(
        c.sh(&client, "grep ' /dev/shm ' /proc/mounts")
            .await?
            .starts_with("shm /dev/shm tmpfs"),
        "/dev/shm is the pod's tmpfs in the guest"
    );
    // Containers keep their own PID namespace unless the pod asks (CONTAINER mode).
    let ps = c.sh(&client, "ps -o pid,args").await?;
    assert!(
        ps.contains("sleep 600"),
        "ps works and shows the client's own process: {ps}"
    );
    assert!(!ps.contains("nc -ll"), "the server's process is not visible: {ps}");
    remove_and_check(&mut c, &pod).await
}

/// CRI's POD mode: one PID namespace for the pod's containers.
#[tokio::test]
async fn a_pod_that_asks_shares_one_pid_namespace() -> Result<()> {
    let mut c = Cri::connect().await?;
    let pod = c
        .run_pod(
            "sharedpid",
            PodSpec {
                hostname: "sharedpid".into(),
                pid_mode: Some(cri::NamespaceMode::Pod),
                ..Default::default()
            },
        )
        .await?;
    let _a = c.run_container(&pod, "a", &["sleep", "4242"]).await?;
    let b = c.run_container(&pod, "b", &["sleep", "600"]).await?;
    let ps = c.sh(&b, "ps -o args").await?;
    assert!(ps.contains("sleep 4242"), "b sees a's process: {ps}");
    assert!(ps.contains("sleep 2147483647"), "b sees the pause process: {ps}");
    remove_and_check(&mut c, &pod).await
}

/// containerd treats the task pid as a host pid: it is the VMM's, and killing it is a
/// VM crash that the pod survives only as NOTREADY, still stoppable and removable.
#[tokio::test]
async fn the_sandbox_pid_is_the_vmm_and_killing_it_stops_the_pod() -> Result<()> {
    let mut c = Cri::connect().await?;
    let pod = c.run_pod("vmmkill", PodSpec::default()).await?;
    let app = c.run_container(&pod, "app", &["sleep", "600"]).await?;
    let pid = c.sandbox_pid(&pod.id).await?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    assert!(
        exe.ends_with("qemu-system-x86_64"),
        "the sandbox pid {pid} is the VMM, not {}",
        exe.display()
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let t = Instant::now();
    while c.pod_ready(&pod.id).await? {
        if t.elapsed() > Duration::from_secs(2) {
            return Err(anyhow!("pod still READY 2 s after its VMM was killed"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("pod NOTREADY {:?} after its VMM was killed", t.elapsed());
    let t = Instant::now();
    while c.container_state(&app).await? != cri::ContainerState::ContainerExited {
        if t.elapsed() > Duration::from_secs(5) {
            return Err(anyhow!("the app container did not exit with its VM"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    remove_and_check(&mut c, &pod).await
}

/// A v1 or v2 cgroup directory of `path` exists on this host.
fn cgroup_exists(path: &str) -> bool {
    ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"]
        .iter()
        .any(|root| std::path::Path::new(root).join(path.trim_start_matches('/')).is_dir())
}

/// The VM is sized from what the pod asks (plus the configured 1 vCPU / 256 MiB), its VMM
/// runs in the pod's host cgroup so PodSandboxStats has figures, and every container's
/// stats come from the guest.
#[tokio::test]
async fn a_pod_is_sized_from_its_resources_and_reports_stats() -> Result<()> {
    let mut c = Cri::connect().await?;
    let parent = "/vmbox-cri-test/podstats";
    let pod = c
        .run_pod(
            "stats",
            PodSpec {
                cgroup_parent: parent.into(),
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 100_000,
                    memory_limit_in_bytes: 256 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await?;
    let pid = c.sandbox_pid(&pod.id).await?;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        cg.contains(&format!("{parent}/{}", pod.id)),
        "the VMM runs in the sandbox's cgroup: {cg}"
    );
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        // Each burns a little CPU and holds some memory, then sleeps.
        let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; x=$(seq 1 20000); sleep 600";
        ids.push(c.run_container(&pod, name, &["sh", "-c", script]).await?);
    }
    assert_eq!(c.sh(&ids[0], "nproc").await?, "2", "1 configured + 1 asked");
    let mem_kib: u64 = c
        .sh(&ids[0], "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .await?
        .parse()?;
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_kib),
        "256 configured + 256 asked MiB, less the kernel's own: {mem_kib} KiB"
    );
    // Stats: every container's CPU and memory from the guest (bounded wait for the CPU
    // counters to move past 0 under a slow TCG guest).
    let t = Instant::now();
    loop {
        let all = c.list_container_stats(&pod.id).await?;
        let busy = all
            .iter()
            .filter(|s| {
                s.cpu
                    .as_ref()
                    .and_then(|c| c.usage_core_nano_seconds.as_ref())
                    .map(|v| v.value)
                    > Some(0)
                    && s.memory
                        .as_ref()
                        .and_then(|m| m.working_set_bytes.as_ref())
                        .map(|v| v.value)
                        > Some(0)
            })
            .count();
        if all.len() == 3 && busy == 3 {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "ListContainerStats: {} of {} with figures: {all:?}",
                busy,
                all.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let one = c.container_stats(&ids[0]).await?;
    assert!(one.memory.and_then(|m| m.working_set_bytes).map(|v| v.value) > Some(0));
    // UpdateContainerResources reaches the container's cgroup in the guest.
    c.update_resources(
        &ids[1],
        cri::LinuxContainerResources {
            memory_limit_in_bytes: 300 << 20,
            ..Default::default()
        },
    )
    .await?;
    let limit = c
        .sh(
            &ids[1],
            "cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/memory.max",
        )
        .await?;
    assert_eq!(limit, (300u64 << 20).to_string(), "the new limit in the guest");
    let ps = c.pod_stats(&pod.id).await?;
    let linux = ps.linux.ok_or_else(|| anyhow!("PodSandboxStats: no linux stats"))?;
    let cpu = linux.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value);
    let mem = linux.memory.and_then(|m| m.working_set_bytes).map(|v| v.value);
    assert!(
        cpu > Some(0) && mem > Some(0),
        "PodSandboxStats: cpu {cpu:?}, memory {mem:?}"
    );
    remove_and_check(&mut c, &pod).await?;
    assert!(
        !cgroup_exists(&format!("{parent}/{}", pod.id)),
        "the sandbox's host cgroup is removed with it"
    );
    remove_cgroup_parents(&["vmbox-cri-test/podstats", "vmbox-cri-test"]);
    Ok(())
}

/// Removes the (empty) pod-level cgroups a test used as cgroup parents, as the kubelet
/// would, in every hierarchy.
fn remove_cgroup_parents(paths: &[&str]) {
    let roots: Vec<std::path::PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    for p in paths {
        for root in roots
            .iter()
            .chain(std::iter::once(&std::path::PathBuf::from("/sys/fs/cgroup")))
        {
            let _ = std::fs::remove_dir(root.join(p));
        }
    }
}

/// Two RuntimeClass handlers, one shim binary: "vmbox-small" names its own vmbox config
/// in containerd's runtime options (ConfigPath), and its pods boot with that config.
#[tokio::test]
async fn a_runtime_handler_with_a_config_path_boots_its_own_vm_size() -> Result<()> {
    let mut c = Cri::connect().await?;
    let pod = c
        .run_pod(
            "small",
            PodSpec {
                handler: "vmbox-small".into(),
                ..Default::default()
            },
        )
        .await?;
    let app = c.run_container(&pod, "app", &["sleep", "600"]).await?;
    let mem_kib: u64 = c.sh(&app, "awk '/MemTotal/ {print $2}' /proc/meminfo").await?.parse()?;
    let small = vmbox_tests::cri::SMALL_MEMORY_MIB as u64 * 1024;
    assert!(
        (small - 64 * 1024..=small).contains(&mem_kib),
        "vmbox-small's {small} KiB, less the kernel's own: {mem_kib} KiB"
    );
    remove_and_check(&mut c, &pod).await
}

/// A container that exits is followed by a new attempt in the same pod (the kubelet's
/// restart); a container whose start fails is removed and created again
/// (containerd's TestContainerRestart and TestFailedContainerRestart).
#[tokio::test]
async fn containers_restart_in_their_pod_after_an_exit_or_a_failed_start() -> Result<()> {
    let mut c = Cri::connect().await?;
    let pod = c.run_pod("restart", PodSpec::default()).await?;
    let first = c.run_container(&pod, "app", &["sh", "-c", "exit 3"]).await?;
    let t = Instant::now();
    while c.container_state(&first).await? != cri::ContainerState::ContainerExited {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!("`exit 3` did not exit"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.remove_container(&first).await?;
    let again = c
        .create_container(&pod, "app", &["sleep", "600"], |cfg| {
            if let Some(m) = cfg.metadata.as_mut() {
                m.attempt = 1;
            }
        })
        .await?;
    c.start_container(&again).await?;
    assert_eq!(c.sh(&again, "echo up").await?, "up");
    c.stop_container(&again, 2).await?;
    c.remove_container(&again).await?;

    let bad = c.create_container(&pod, "bad", &["/no/such/program"], |_| {}).await?;
    let e = c
        .start_container(&bad)
        .await
        .expect_err("a missing program cannot start");
    assert!(e.to_string().contains("/no/such/program"), "{e}");
    c.remove_container(&bad).await?;
    let good = c.create_container(&pod, "bad", &["sleep", "600"], |_| {}).await?;
    c.start_container(&good).await?;
    assert_eq!(c.sh(&good, "echo fixed").await?, "fixed");
    assert!(c.pod_ready(&pod.id).await?, "the pod survives its containers' failures");
    remove_and_check(&mut c, &pod).await
}

/// containerd restarts while one pod is ready and one is not (its VM was killed): both are
/// recovered, the ready one still serves ExecSync, and both stop and go.
#[tokio::test]
async fn pods_survive_a_containerd_restart_ready_or_not() -> Result<()> {
    let mut c = Cri::connect().await?;
    let ready = c.run_pod("restart-ready", PodSpec::default()).await?;
    let app = c.run_container(&ready, "app", &["sleep", "600"]).await?;
    let dead = c.run_pod("restart-dead", PodSpec::default()).await?;
    let pid = c.sandbox_pid(&dead.id).await?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    assert!(
        exe.ends_with("qemu-system-x86_64"),
        "pid {pid} is {}, not the VMM",
        exe.display()
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let t = Instant::now();
    while c.pod_ready(&dead.id).await? {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(anyhow!("killed pod still READY"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.containerd.restart();
    c.reconnect().await?;
    let t = Instant::now();
    loop {
        match c.pod_ready(&ready.id).await {
            Ok(true) => break,
            Ok(false) => return Err(anyhow!("the ready pod is NOTREADY after containerd's restart")),
            Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e.context("CRI after restart")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(!c.pod_ready(&dead.id).await?, "the dead pod stays NOTREADY");
    assert_eq!(c.sh(&app, "echo still").await?, "still");
    remove_and_check(&mut c, &dead).await?;
    remove_and_check(&mut c, &ready).await
}

/// `kubectl exec -it`: CRI Exec with a tty and stdin through containerd's streaming
/// server, with Kubernetes' 64-hex container and exec ids, a resize, typed input.
#[tokio::test]
async fn exec_with_a_tty_and_64_hex_ids_works_like_kubectl_exec_it() -> Result<()> {
    use vmbox_tests::cri::channel;
    let mut c = Cri::connect().await?;
    let pod = c.run_pod("exectty", PodSpec::default()).await?;
    let app = c.run_container(&pod, "app", &["sleep", "600"]).await?;
    assert_eq!(app.len(), 64, "CRI's container ids are 64 hex digits: {app}");
    let mut s = c.exec(&app, &["sh"], true, true).await?;
    s.resize(101, 33).await?;
    s.send(channel::STDIN, b"tty; stty size; echo typed-$((40+2)); exit 7\n")
        .await?;
    let out = s.finish(Duration::from_secs(60)).await?;
    assert!(out.contains("/dev/pts/"), "a terminal: {out:?}");
    assert!(out.contains("33 101"), "the resize reached it: {out:?}");
    assert!(out.contains("typed-42"), "typed input ran: {out:?}");
    // The v4 status: Failure, with the exit code as a cause (as `kubectl exec` reports it).
    let status: serde_json::Value = serde_json::from_str(s.status.as_deref().unwrap_or("{}"))?;
    let code = status["details"]["causes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
        .and_then(|c| c["message"].as_str());
    assert_eq!(code, Some("7"), "exit 7 in the final status: {status}");
    remove_and_check(&mut c, &pod).await
}

/// Attach to a container started with stdin and a tty (`kubectl attach -it`), and the
/// container's log in CRI's format at its log path.
#[tokio::test]
async fn attach_reaches_the_containers_terminal_and_logs_are_written() -> Result<()> {
    use vmbox_tests::cri::channel;
    let mut c = Cri::connect().await?;
    let pod = c.run_pod("attachlog", PodSpec::default()).await?;
    let shell = c
        .create_container(&pod, "shell", &["sh"], |cfg| {
            cfg.stdin = true;
            cfg.tty = true;
        })
        .await?;
    c.start_container(&shell).await?;
    let mut s = c.attach(&shell, true).await?;
    s.send(channel::STDIN, b"echo attached-$((6*7))\n").await?;
    assert!(s.read_until("attached-42", Duration::from_secs(60)).await?);
    drop(s);
    let logger = c
        .run_container(
            &pod,
            "logger",
            &["sh", "-c", "echo line-one; echo line-two >&2; sleep 600"],
        )
        .await?;
    let log = std::path::PathBuf::from(&pod.config.log_directory).join("logger.log");
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("line-two") || t.elapsed() > Duration::from_secs(30) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.lines().any(|l| l.contains(" stdout F line-one"))
            && text.lines().any(|l| l.contains(" stderr F line-two")),
        "CRI log format at {}: {text:?}",
        log.display()
    );
    let _ = logger;
    remove_and_check(&mut c, &pod).await
}

/// `script` in container `id` until it exits 0 (the first packets wait for ARP/ND, a
/// server for its listen); its stdout. Fails with the last output after `within`.
async fn sh_until(c: &mut Cri, id: &str, script: &str, within: Duration) -> Result<String> {
    let t = Instant::now();
    loop {
        let (code, out, err) = c.exec_sync(id, &["sh", "-c", script]).await?;
        if code == 0 {
            return Ok(out);
        }
        if t.elapsed() > within {
            return Err(anyhow!("{script:?} in {id}: exit {code} after {within:?}: {out}{err}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `cmd` in containerd's node network namespace (where the CNI bridge is) until it exits
/// 0; its stdout.
fn node_until(cmd: &[&str], within: Duration) -> Result<String> {
    let netns = std::env::var("VMBOX_CTR_NETNS").unwrap_or_else(|_| "vmbox-cri-node".into());
    let t = Instant::now();
    loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(cmd)
            .output()?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if t.elapsed() > within {
            return Err(anyhow!(
                "{cmd:?} in {netns}: {} after {within:?}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PodSandboxStatus' IPs of `pod` (the CNI result containerd cached), v4 first.
async fn pod_ips(c: &mut Cri, pod: &str) -> Result<Vec<String>> {
    let st = c.pod_status(pod).await?;
    let net = st
        .status
        .and_then(|s| s.network)
        .ok_or_else(|| anyhow!("pod {pod}: no network status"))?;
    let mut ips = vec![net.ip];
    ips.extend(net.additional_ips.into_iter().map(|i| i.ip));
    Ok(ips)
}

/// Pod networking through CRI with Debian's CNI bridge and host-local (dual stack, MTU
/// 1400, no masquerading; containerd in a node namespace of its own): two vmbox pods and
/// a runc pod reach each other; the pod's addresses in the VM are PodSandboxStatus'; DNS
/// and hostname as configured; the veth's counters move; nothing is left after removal.
#[tokio::test]
async fn pods_on_the_cni_bridge_reach_each_other_a_runc_pod_and_the_node() -> Result<()> {
    const WAIT: Duration = Duration::from_secs(30);
    let mut c = Cri::connect().await?;
    let dns = cri::DnsConfig {
        servers: vec!["10.88.0.53".into()],
        searches: vec!["vmbox.test".into()],
        options: vec!["ndots:2".into()],
    };
    let a = c
        .run_pod(
            "net-a",
            PodSpec {
                hostname: "pod-a".into(),
                dns: Some(dns),
                // PodSandboxStats needs one.
                cgroup_parent: "/vmbox-cri-test/net-a".into(),
                ..Default::default()
            },
        )
        .await?;
    let b = c.run_pod("net-b", PodSpec::default()).await?;
    let r = c
        .run_pod(
            "net-runc",
            PodSpec {
                handler: "runc".into(),
                ..Default::default()
            },
        )
        .await?;
    let serve = "mkdir -p /tmp/www && echo hello from a > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    let web = c.run_container(&a, "web", &["sh", "-c", serve]).await?;
    let cb = c.run_container(&b, "client", &["sleep", "600"]).await?;
    let cr = c.run_container(&r, "client", &["sleep", "600"]).await?;

    // In the VM, eth0 carries exactly what CRI reports (TestPodDualStack's rule).
    let ips_a = pod_ips(&mut c, &a.id).await?;
    assert_eq!(ips_a.len(), 2, "a v4 and a v6 address: {ips_a:?}");
    let shown = c.sh(&web, "ip -o addr show dev eth0 scope global").await?;
    let mut in_vm: Vec<String> = shown
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next().map(str::to_string))
        .collect();
    in_vm.sort();
    let mut want = ips_a.clone();
    want.sort();
    assert_eq!(in_vm, want, "addresses in the VM vs PodSandboxStatus: {shown}");
    assert_eq!(c.sh(&web, "cat /sys/class/net/eth0/mtu").await?, "1400");
    assert!(c.sh(&web, "ip route").await?.contains("default via 10.88.0.1 dev eth0"));
    let resolv = c.sh(&web, "cat /etc/resolv.conf").await?;
    for line in ["nameserver 10.88.0.53", "search vmbox.test", "options ndots:2"] {
        assert!(resolv.contains(line), "resolv.conf lacks {line:?}: {resolv}");
    }
    assert_eq!(c.sh(&web, "hostname").await?, "pod-a");

    let (a4, a6) = (&ips_a[0], &ips_a[1]);
    let ips_b = pod_ips(&mut c, &b.id).await?;
    let ips_r = pod_ips(&mut c, &r.id).await?;
    let page = "hello from a";
    for (who, id) in [("vmbox pod", &cb), ("runc pod", &cr)] {
        sh_until(&mut c, id, &format!("ping -c 1 -W 2 {a4}"), WAIT).await?;
        sh_until(&mut c, id, &format!("ping -6 -c 1 -W 2 {a6}"), WAIT).await?;
        let got = sh_until(&mut c, id, &format!("wget -q -O - http://{a4}:8080/"), WAIT).await?;
        assert_eq!(got.trim(), page, "from the {who}");
        let got = sh_until(&mut c, id, &format!("wget -q -O - 'http://[{a6}]:8080/'"), WAIT).await?;
        assert_eq!(got.trim(), page, "from the {who} over v6");
    }
    // From the VM to the others, and from the node.
    for ip in [&ips_b[0], &ips_r[0], &ips_b[1], &ips_r[1]] {
        let v6 = if ip.contains(':') { "-6" } else { "" };
        sh_until(&mut c, &web, &format!("ping {v6} -c 1 -W 2 {ip}"), WAIT).await?;
    }
    let got = node_until(
        &["busybox", "wget", "-q", "-O", "-", &format!("http://{a4}:8080/")],
        WAIT,
    )?;
    assert_eq!(got.trim(), page, "from the node");

    // kubectl port-forward: containerd dials localhost:8080 in the pod's netns.
    let t = Instant::now();
    loop {
        let mut fwd = c.port_forward(&a.id, 8080).await?;
        fwd.send(0, b"GET / HTTP/1.0\r\n\r\n").await?;
        // The session stays open after the server's answer, as with runc.
        if fwd.read_until(page, Duration::from_secs(20)).await? {
            break;
        }
        let got = String::from_utf8_lossy(&fwd.output).into_owned();
        // The shim relays the ports it has seen the guest listen on (polled every second).
        if t.elapsed() > WAIT {
            return Err(anyhow!(
                "port-forward to 8080 never reached httpd: {got:?} {:?}",
                fwd.status
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The veth's counters (PodSandboxStats) saw the traffic.
    let stats = c.pod_stats(&a.id).await?;
    let iface = stats
        .linux
        .and_then(|l| l.network)
        .and_then(|n| n.default_interface)
        .ok_or_else(|| anyhow!("PodSandboxStats has no network interface"))?;
    let rx = iface.rx_bytes.map(|v| v.value).unwrap_or(0);
    let tx = iface.tx_bytes.map(|v| v.value).unwrap_or(0);
    assert!(rx > 0 && tx > 0, "{}: rx {rx} tx {tx}", iface.name);

    // Removal releases the addresses (host-local's leases) and leaves nothing.
    let leases = std::path::Path::new("/var/lib/cni/networks/vmbox-cri");
    for ip in &ips_a {
        assert!(leases.join(ip).exists(), "no lease for {ip} while the pod runs");
    }
    for pod in [&a, &b, &r] {
        if pod.id == r.id {
            c.stop_and_remove_pod(&pod.id).await?;
        } else {
            remove_and_check(&mut c, pod).await?;
        }
    }
    remove_cgroup_parents(&["vmbox-cri-test/net-a", "vmbox-cri-test"]);
    for ip in ips_a.iter().chain(&ips_b) {
        assert!(!leases.join(ip).exists(), "the lease of {ip} outlived its pod");
    }
    Ok(())
}
