//! Host plumbing and the guest-side apply, without a VM, in network namespaces made by the
//! test (root needed; nothing leaves them). Frames written into the tap prove the redirect.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use vmbox_network::{guest, host, netns, scan, Interface, IpNetwork, Mac, Neighbour, Network, Route};

/// Named network namespaces, deleted on drop.
struct Netns(Vec<String>);

impl Netns {
    fn new(names: &[&str]) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let ns = Netns(names.iter().map(|n| format!("vmbox-nt-{n}-{tag}")).collect());
        for n in &ns.0 {
            ip(&["netns", "add", n]);
        }
        ns
    }
    fn name(&self, i: usize) -> &str {
        &self.0[i]
    }
    fn path(&self, i: usize) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0[i])
    }
    fn ip(&self, i: usize, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name(i)];
        v.extend_from_slice(args);
        ip(&v)
    }
    fn tc(&self, i: usize, args: &[&str]) -> String {
        run("ip", &[&["netns", "exec", self.name(i), "tc"], args].concat())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

const POD_MAC: &str = "02:42:0a:63:00:02";
const NEIGH_MAC: &str = "02:42:0a:63:00:09";

/// `peer` (10.99.0.1, fd00:99::1) and `pod` (10.99.0.2, fd00:99::2, MTU 1400, a static
/// neighbour, a default route per family and one extra route) joined by a veth.
fn pod_and_peer() -> Netns {
    let ns = Netns::new(&["peer", "pod"]);
    ns.ip(
        0,
        &[
            "link",
            "add",
            "veth-peer",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(1),
        ],
    );
    ns.ip(0, &["link", "set", "veth-peer", "mtu", "1400", "up"]);
    ns.ip(0, &["addr", "add", "10.99.0.1/24", "dev", "veth-peer"]);
    ns.ip(0, &["addr", "add", "fd00:99::1/64", "dev", "veth-peer", "nodad"]);
    ns.ip(1, &["link", "set", "eth0", "address", POD_MAC, "mtu", "1400", "up"]);
    ns.ip(1, &["link", "set", "lo", "up"]);
    ns.ip(1, &["addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    ns.ip(1, &["addr", "add", "fd00:99::2/64", "dev", "eth0", "nodad"]);
    ns.ip(1, &["route", "add", "default", "via", "10.99.0.1", "dev", "eth0"]);
    ns.ip(1, &["route", "add", "10.100.0.0/16", "via", "10.99.0.1", "dev", "eth0"]);
    ns.ip(
        1,
        &["-6", "route", "add", "default", "via", "fd00:99::1", "dev", "eth0"],
    );
    ns.ip(
        1,
        &[
            "neigh",
            "add",
            "10.99.0.9",
            "lladdr",
            NEIGH_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    ns
}

fn mac(s: &str) -> Mac {
    let b: Vec<u8> = s.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
    Mac::from_bytes(&b).unwrap()
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn route(dst: &str, gw: &str, metric: u32) -> Route {
    Route {
        destination: net(dst),
        gateway: Some(gw.parse().unwrap()),
        source: None,
        device: "eth0".into(),
        scope: 0,
        onlink: false,
        metric,
    }
}

fn expected() -> Network {
    let mut n = Network {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: mac(POD_MAC),
            mtu: 1400,
            noarp: false,
            addresses: vec![net("10.99.0.2/24"), net("fd00:99::2/64")],
        }],
        routes: vec![
            route("0.0.0.0/0", "10.99.0.1", 0),
            route("10.100.0.0/16", "10.99.0.1", 0),
            route("::/0", "fd00:99::1", 1024),
        ],
        neighbours: vec![Neighbour {
            ip: "10.99.0.9".parse().unwrap(),
            mac: mac(NEIGH_MAC),
            device: "eth0".into(),
        }],
    };
    n.normalize();
    n
}

#[test]
fn the_scan_returns_every_field() {
    let ns = pod_and_peer();
    let got = netns::run_in(Some(&ns.path(1)), |h| async move { Ok(scan::scan(&h).await?.0) }).unwrap();
    assert_eq!(got, expected(), "\n{got}");
}

#[test]
fn an_empty_namespace_gives_no_interface_and_a_vanished_one_detaches_quietly() {
    let ns = Netns::new(&["empty"]);
    let a = host::attach(&ns.path(0)).unwrap();
    assert!(a.network.is_empty() && a.taps.is_empty(), "{a:?}");
    let gone = PathBuf::from("/var/run/netns/vmbox-nt-never-made");
    host::detach(&gone, &[eth0(true)]).unwrap();
    let e = host::attach(&gone).unwrap_err();
    assert!(e.to_string().contains("vmbox-nt-never-made"), "{e}");
}

/// Ethernet + ARP request for `target` from `src_mac`/`src_ip`, behind a zeroed 10-byte
/// virtio-net header.
fn arp_request(src_mac: Mac, src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMPv4 echo request with id 0x7662 behind a zeroed virtio-net header.
fn echo_request(src: (Mac, Ipv4Addr), dst: (Mac, Ipv4Addr)) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x76, 0x62, 0, 1];
    icmp.extend_from_slice(b"vmbox redirect");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut iph = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    iph[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    iph.extend_from_slice(&src.1.octets());
    iph.extend_from_slice(&dst.1.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; 10];
    f.extend_from_slice(&dst.0 .0);
    f.extend_from_slice(&src.0 .0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

/// Reads frames from the tap until `want` accepts one (its Ethernet frame, header
/// stripped), for at most 5 s.
fn read_until(tap: &mut std::fs::File, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} came back from the tap within 5 s");
        let mut pfd = [nix::poll::PollFd::new(tap.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut pfd, ms).unwrap() == 0 {
            continue;
        }
        let n = tap.read(&mut buf).unwrap();
        let frame = &buf[10.min(n)..n];
        if want(frame) {
            return frame.to_vec();
        }
    }
}

#[test]
fn frames_written_into_the_tap_leave_through_the_veth_and_replies_come_back() {
    let ns = pod_and_peer();
    let a = host::attach(&ns.path(1)).unwrap();
    assert_eq!(a.network, expected());
    assert_eq!(a.taps.len(), 1);
    let tap = &a.taps[0];
    assert_eq!(
        (tap.name.as_str(), &tap.link, tap.mac),
        ("tap0_vmbox", &eth0(true), mac(POD_MAC))
    );
    // Both ingress qdiscs with their redirect filters, and the tap up with the veth's MTU.
    for (dev, to) in [("eth0", "tap0_vmbox"), ("tap0_vmbox", "eth0")] {
        assert!(ns.tc(1, &["qdisc", "show", "dev", dev]).contains("ingress"), "{dev}");
        let f = ns.tc(1, &["filter", "show", "dev", dev, "ingress"]);
        assert!(
            f.contains("protocol all") && f.contains(&format!("Redirect to device {to}")),
            "{dev}: {f}"
        );
    }
    assert!(ns.ip(1, &["link", "show", "tap0_vmbox"]).contains("mtu 1400"));

    // What the VM would send: an ARP request for the peer, then a ping.
    let fd = tap.fd.try_clone().unwrap();
    let mut file = std::fs::File::from(fd);
    let me = (mac(POD_MAC), Ipv4Addr::new(10, 99, 0, 2));
    let peer_ip = Ipv4Addr::new(10, 99, 0, 1);
    file.write_all(&arp_request(me.0, me.1, peer_ip)).unwrap();
    let reply = read_until(&mut file, "ARP reply", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == peer_ip.octets()
    });
    let peer_mac = Mac::from_bytes(&reply[22..28]).unwrap();
    assert_eq!(&reply[0..6], &me.0 .0, "the reply is addressed to the pod's MAC");
    file.write_all(&echo_request(me, (peer_mac, peer_ip))).unwrap();
    read_until(&mut file, "ICMP echo reply", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0 && f[38..40] == [0x76, 0x62]
    });

    host::detach(&ns.path(1), &[eth0(true)]).unwrap();
    assert!(!ns.tc(1, &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    drop(file);
    drop(a);
    let left = ns.ip(1, &["-o", "link", "show"]);
    assert!(!left.contains("tap0_vmbox"), "the tap outlived its fds: {left}");
    // The CNI's link is as it was.
    assert!(ns.ip(1, &["addr", "show", "eth0"]).contains("10.99.0.2/24"));
}

#[test]
fn the_guest_side_applies_what_the_host_saw() {
    let ns = pod_and_peer();
    let host_view = host::attach(&ns.path(1)).unwrap();
    // A "guest": a namespace whose NIC has the pod's MAC under the kernel's name, its peer
    // up in a third namespace so the link has carrier; a second NIC already named eth0.
    let g = Netns::new(&["guest", "wire"]);
    g.ip(
        1,
        &[
            "link",
            "add",
            "w0",
            "type",
            "veth",
            "peer",
            "name",
            "veth7",
            "netns",
            g.name(0),
        ],
    );
    g.ip(1, &["link", "set", "w0", "up"]);
    g.ip(
        1,
        &[
            "link",
            "add",
            "w1",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            g.name(0),
        ],
    );
    g.ip(0, &["link", "set", "veth7", "address", POD_MAC]);
    let view = netns::run_in(Some(&g.path(0)), {
        let want = host_view.network.clone();
        move |h| async move {
            let first = guest::apply(&h, &want).await?;
            let second = guest::apply(&h, &want).await?;
            assert_eq!(first, second, "apply is idempotent");
            Ok(first)
        }
    })
    .unwrap();
    assert_eq!(view, host_view.network, "guest view out == host view in\n{view}");
    let lo = g.ip(0, &["link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let v6 = g.ip(0, &["-6", "addr", "show", "dev", "eth0"]);
    let pod_v6 = v6.lines().find(|l| l.contains("fd00:99::2/64")).unwrap_or_default();
    assert!(
        pod_v6.contains("nodad") && !pod_v6.contains("tentative"),
        "no DAD wait: {v6}"
    );
    // The NIC that had the name was moved aside.
    assert!(g.ip(0, &["link", "show"]).contains("vmboxtmp0"));

    let mut stranger = host_view.network.clone();
    stranger.interfaces[0].mac = mac("02:00:00:00:00:77");
    let e = netns::run_in(
        Some(&g.path(0)),
        move |h| async move { guest::apply(&h, &stranger).await },
    )
    .unwrap_err();
    assert!(e.to_string().contains("02:00:00:00:00:77"), "{e}");
    host::detach(&ns.path(1), &[eth0(true)]).unwrap();
}

fn eth0(own_qdisc: bool) -> host::Redirected {
    host::Redirected {
        name: "eth0".into(),
        own_qdisc,
    }
}

/// Another tool's ingress qdisc and filter on the pod's link are used and left alone.
#[test]
fn another_tools_ingress_qdisc_and_filter_survive_attach_and_detach() {
    let ns = pod_and_peer();
    ns.tc(1, &["qdisc", "add", "dev", "eth0", "ingress"]);
    ns.tc(
        1,
        &[
            "filter", "add", "dev", "eth0", "ingress", "pref", "10", "protocol", "ip", "u32", "match", "u32", "0", "0",
            "flowid", "ffff:1",
        ],
    );
    let a = host::attach(&ns.path(1)).unwrap();
    assert_eq!(a.taps[0].link, eth0(false));
    let f = ns.tc(1, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("pref 10") && f.contains("tap0_vmbox"), "{f}");
    host::detach(&ns.path(1), &[a.taps[0].link.clone()]).unwrap();
    let f = ns.tc(1, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        f.contains("pref 10") && !f.contains("tap0_vmbox"),
        "only vmbox's filter goes: {f}"
    );
    assert!(ns.tc(1, &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}
