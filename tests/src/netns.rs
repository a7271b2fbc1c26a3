//! Network namespaces made by a test (with `ip`), deleted when dropped: a "node" with a
//! bridge and "pods" wired to it by veth pairs. Nothing is routed off the machine: the
//! bridge lives in the node namespace, with no uplink and no masquerading.

use std::path::PathBuf;
use std::process::Command;

/// Named network namespaces, deleted on drop (with every link inside them).
pub struct Netns {
    names: Vec<String>,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Makes `vmbox-<name>-<pid>` for each name (removing a leftover of the same name).
    pub fn new(names: &[&str]) -> Netns {
        let ns = Netns {
            names: names
                .iter()
                .map(|n| format!("vmbox-{n}-{}", std::process::id()))
                .collect(),
        };
        for n in &ns.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The bind mount `ctr run --with-ns network:<path>` takes.
    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.names[i])
    }

    /// `ip -n <ns i> ARGS`, asserted to succeed; its stdout.
    pub fn ip(&self, i: usize, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name(i)];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// `ip netns exec <ns i> CMD...`: the output, whatever the status.
    pub fn exec(&self, i: usize, cmd: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", self.name(i)])
            .args(cmd)
            .output()
            .expect("run ip netns exec")
    }

    /// Namespace 0 becomes the node: bridge `br0` with `gw4`/`gw6` (CIDR), MTU `mtu`.
    pub fn bridge(&self, gw4: &str, gw6: &str, mtu: u32) {
        let mtu = mtu.to_string();
        self.ip(0, &["link", "add", "br0", "mtu", &mtu, "type", "bridge"]);
        self.ip(0, &["addr", "add", gw4, "dev", "br0"]);
        self.ip(0, &["addr", "add", gw6, "dev", "br0", "nodad"]);
        self.ip(0, &["link", "set", "br0", "up"]);
    }

    /// Wires namespace `pod` to the node's bridge: its `eth0` gets `addr4`/`addr6` (CIDR),
    /// MTU `mtu`, and default routes via `gw4`/`gw6`, as a CNI bridge plugin would.
    pub fn wire(&self, pod: usize, addr4: &str, addr6: &str, gw4: &str, gw6: &str, mtu: u32) {
        let mtu = mtu.to_string();
        let host_end = format!("veth{pod}");
        self.ip(
            0,
            &[
                "link",
                "add",
                &host_end,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.name(pod),
            ],
        );
        self.ip(0, &["link", "set", &host_end, "master", "br0", "up"]);
        self.ip(pod, &["link", "set", "eth0", "mtu", &mtu, "up"]);
        self.ip(pod, &["addr", "add", addr4, "dev", "eth0"]);
        self.ip(pod, &["addr", "add", addr6, "dev", "eth0", "nodad"]);
        self.ip(pod, &["route", "add", "default", "via", gw4, "dev", "eth0"]);
        self.ip(pod, &["-6", "route", "add", "default", "via", gw6, "dev", "eth0"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}
