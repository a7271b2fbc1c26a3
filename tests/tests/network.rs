//! Pod networking end to end through containerd and `ctr`: the network namespaces, bridge
//! and addresses are the test's own (tests/src/netns.rs); nothing leaves the machine.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmbox_tests::containerd::{containerd, ok, text, Containerd, RUNTIME};
use vmbox_tests::netns::Netns;

/// Runs `cmd` in container `id` (`ctr task exec`) until it exits 0; its stdout. Fails
/// with the last output after `within` (the first packets wait for ARP/ND).
fn exec_until(c: &Containerd, id: &str, cmd: &[&str], within: Duration) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = Instant::now();
    loop {
        let exec_id = format!("x{}", N.fetch_add(1, Ordering::Relaxed));
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(cmd);
        let out = c.ctr(&args);
        if out.status.success() {
            return text(&out.stdout);
        }
        assert!(
            t.elapsed() < within,
            "{cmd:?} in {id} did not succeed within {within:?}: {:?}: {}{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cmd` in namespace `i` of `ns` until it exits 0; its stdout.
fn host_until(ns: &Netns, i: usize, cmd: &[&str], within: Duration) -> String {
    let t = Instant::now();
    loop {
        let out = ns.exec(i, cmd);
        if out.status.success() {
            return text(&out.stdout);
        }
        assert!(
            t.elapsed() < within,
            "{cmd:?} in {} did not succeed within {within:?}: {}{}",
            ns.name(i),
            text(&out.stdout),
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn two_vms_on_a_bridge_reach_each_other_and_the_node_over_v4_and_v6() {
    let c = containerd();
    let ns = Netns::new(&["node", "pod-a", "pod-b"]);
    ns.bridge("10.99.0.1/24", "fd00:99::1/64", 1400);
    ns.wire(1, "10.99.0.2/24", "fd00:99::2/64", "10.99.0.1", "fd00:99::1", 1400);
    ns.wire(2, "10.99.0.3/24", "fd00:99::3/64", "10.99.0.1", "fd00:99::1", 1400);
    let (a, b) = ("net-a", "net-b");
    let with_ns = |i: usize| format!("network:{}", ns.path(i).display());
    let serve = "mkdir -p /tmp/www && echo hello from a > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    c.run_detached(a, &["--with-ns", &with_ns(1)], &["sh", "-c", serve]);
    c.run_detached(b, &["--with-ns", &with_ns(2)], &["sleep", "1000"]);

    // The guest has the pod's interface: name, addresses, MTU, routes.
    let addr = exec_until(c, a, &["ip", "-o", "addr", "show", "dev", "eth0"], WAIT);
    for want in ["10.99.0.2/24", "fd00:99::2/64"] {
        assert!(addr.contains(want), "eth0 in the VM lacks {want}: {addr}");
    }
    let mtu = exec_until(c, a, &["cat", "/sys/class/net/eth0/mtu"], WAIT);
    assert_eq!(mtu.trim(), "1400");
    let routes = exec_until(c, a, &["ip", "route"], WAIT);
    assert!(routes.contains("default via 10.99.0.1 dev eth0"), "{routes}");
    let mac_host = ns.ip(1, &["-o", "link", "show", "eth0"]);
    let mac_guest = exec_until(c, a, &["cat", "/sys/class/net/eth0/address"], WAIT);
    assert!(
        mac_host.contains(mac_guest.trim()),
        "guest MAC {mac_guest} is not the pod veth's: {mac_host}"
    );

    // Both ways, both families, VM to VM; HTTP from the other VM and from the node.
    exec_until(c, b, &["ping", "-c", "1", "-W", "2", "10.99.0.2"], WAIT);
    exec_until(c, a, &["ping", "-c", "1", "-W", "2", "10.99.0.3"], WAIT);
    exec_until(c, b, &["ping", "-6", "-c", "1", "-W", "2", "fd00:99::2"], WAIT);
    exec_until(c, a, &["ping", "-6", "-c", "1", "-W", "2", "fd00:99::3"], WAIT);
    exec_until(c, a, &["ping", "-c", "1", "-W", "2", "10.99.0.1"], WAIT);
    let page = exec_until(c, b, &["wget", "-q", "-O", "-", "http://10.99.0.2:8080/"], WAIT);
    assert_eq!(page, "hello from a\n");
    let page = exec_until(c, b, &["wget", "-q", "-O", "-", "http://[fd00:99::2]:8080/"], WAIT);
    assert_eq!(page, "hello from a\n");
    let page = host_until(
        &ns,
        0,
        &["busybox", "wget", "-q", "-O", "-", "http://10.99.0.2:8080/"],
        WAIT,
    );
    assert_eq!(page, "hello from a\n");
    host_until(&ns, 0, &["busybox", "ping", "-c", "1", "-W", "2", "fd00:99::3"], WAIT);
    // Full-size frames at the pod's MTU pass without fragmentation.
    exec_until(c, b, &["ping", "-c", "1", "-W", "2", "-s", "1372", "10.99.0.2"], WAIT);

    // The VMM runs in the pod's namespace.
    let vmm = c.pid_of(&format!("vmbox-default-{a}")).expect("the VMM of net-a");
    let vmm_ns = std::fs::read_link(format!("/proc/{vmm}/ns/net")).unwrap();
    let pod_ns = ns.exec(1, &["readlink", "/proc/self/ns/net"]);
    assert_eq!(vmm_ns.display().to_string(), text(&pod_ns.stdout).trim());

    for (id, i) in [(a, 1), (b, 2)] {
        c.remove(id);
        let links = ns.ip(i, &["-o", "link", "show"]);
        assert!(!links.contains("_vmbox"), "a tap is left in {}: {links}", ns.name(i));
        let qdisc = text(&ns.exec(i, &["tc", "qdisc", "show", "dev", "eth0"]).stdout);
        assert!(!qdisc.contains("ingress"), "a redirect is left on eth0: {qdisc}");
    }
}

#[test]
fn without_a_namespace_path_or_with_the_host_network_the_guest_has_loopback_only() {
    let c = containerd();
    for (id, extra) in [("net-lo", vec![]), ("net-host", vec!["--net-host"])] {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(&extra);
        args.extend_from_slice(&[
            vmbox_tests::containerd::IMAGE,
            id,
            "sh",
            "-c",
            "ls /sys/class/net; ip -o link show lo",
        ]);
        let out = ok(&c.ctr(&args), id);
        let links: Vec<&str> = out.lines().take_while(|l| !l.contains(':')).collect();
        assert_eq!(links, ["lo"], "{id}: {out}");
        assert!(out.contains("UP"), "{id}: lo is down: {out}");
        let left = c.wait_clean(id);
        assert!(left.is_empty(), "{id} left: {left:#?}");
    }
}

/// A spec for `ctr run --config`: busybox at `root`, running `script`, with `hooks`.
fn hook_spec(c: &Containerd, root: &std::path::Path, script: &str, hooks: serde_json::Value) -> std::path::PathBuf {
    let out = c.ctr(&["oci", "spec"]);
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctr oci spec");
    spec["root"] = serde_json::json!({ "path": root });
    spec["process"]["args"] = serde_json::json!(["sh", "-c", script]);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    spec["hooks"] = hooks;
    let path = root.with_extension("json");
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    path
}

fn recorded(dir: &std::path::Path, stage: &str) -> serde_json::Value {
    let path = dir.join(format!("{stage}.json"));
    let text =
        std::fs::read(&path).unwrap_or_else(|e| panic!("the {stage} hook did not run ({}: {e})", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{stage}: {e}: {}", String::from_utf8_lossy(&text)))
}

/// OCI hooks as nerdctl uses them: createRuntime, prestart, poststart and poststop run on
/// the host with the OCI state on stdin; a createRuntime hook that puts an interface into
/// `/proc/<pid>/ns/net` (as nerdctl's CNI hook does) gives the VM that interface;
/// startContainer hooks run in the container; createContainer hooks are refused by name.
#[test]
fn oci_hooks_run_on_the_host_and_a_create_runtime_hook_can_wire_the_network() {
    let c = containerd();
    let ns = Netns::new(&["hook-peer"]);
    let dir = c.dir.join("hooks");
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("rootfs");
    vmbox_tests::busybox_rootfs(&root).unwrap();
    let env = serde_json::json!([
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        format!("OUT={}", dir.display()),
        format!("PEER={}", ns.name(0)),
    ]);
    let record = |stage: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > $OUT/{stage}.json")], "env": env});
    // What a CNI plugin run from nerdctl's hook does: a veth into the container's netns.
    let wire = r#"set -e; cat > $OUT/createRuntime.json
pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' $OUT/createRuntime.json)
ip link add vmbox-hk0 netns $PEER mtu 1400 type veth peer name eth0 netns $pid
ip -n $PEER addr add 10.98.0.1/24 dev vmbox-hk0; ip -n $PEER link set vmbox-hk0 up
nsenter --net=/proc/$pid/ns/net ip addr add 10.98.0.2/24 dev eth0
nsenter --net=/proc/$pid/ns/net ip link set eth0 up"#;
    let hooks = serde_json::json!({
        "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", wire], "env": env, "timeout": 30}],
        "prestart": [record("prestart")],
        "poststart": [record("poststart")],
        "poststop": [record("poststop")],
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo started > /tmp/started"]}],
    });
    let script = "cat /tmp/started; ip -o addr show dev eth0; ping -c 3 -W 2 10.98.0.1";
    let spec = hook_spec(c, &root, script, hooks);
    let spec_arg = spec.display().to_string();
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--config", &spec_arg, "hooks-1"]);
    let stdout = ok(&out, "ctr run --config with hooks");
    assert!(
        stdout.contains("started"),
        "the startContainer hook did not run in the container: {stdout}"
    );
    assert!(
        stdout.contains("10.98.0.2/24"),
        "the hook's interface is not in the VM: {stdout}"
    );
    let created = recorded(&dir, "createRuntime");
    assert_eq!(
        (created["id"].as_str(), created["status"].as_str()),
        (Some("hooks-1"), Some("creating"))
    );
    assert!(
        created["bundle"]
            .as_str()
            .is_some_and(|b| b.ends_with("/default/hooks-1")),
        "{created}"
    );
    assert_eq!(recorded(&dir, "prestart")["status"], "creating");
    let started = recorded(&dir, "poststart");
    assert_eq!(started["status"], "running");
    assert!(started["pid"].as_u64().is_some_and(|p| p > 0), "{started}");
    assert_eq!(recorded(&dir, "poststop")["status"], "stopped");
    let left = c.wait_clean("hooks-1");
    assert!(left.is_empty(), "hooks-1 left: {left:#?}");

    // A failing createRuntime hook fails the create, naming the hook; a createContainer
    // hook is refused by name. Neither leaves anything.
    for (id, hooks, needle) in [
        (
            "hooks-2",
            serde_json::json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no network for you >&2; exit 3"]}]}),
            "hooks.createRuntime[0]",
        ),
        (
            "hooks-3",
            serde_json::json!({"createContainer": [{"path": "/bin/true"}]}),
            "hooks.createContainer",
        ),
    ] {
        let spec = hook_spec(c, &root, "true", hooks);
        let spec_arg = spec.display().to_string();
        let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--config", &spec_arg, id]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{id}: {err}");
        let _ = c.ctr(&["container", "rm", id]);
        let left = c.wait_clean(id);
        assert!(left.is_empty(), "{id} left: {left:#?}");
    }
}
