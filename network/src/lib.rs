//! Pod networking: the interfaces a CNI plugin put in a pod's network namespace, carried
//! into the pod's micro-VM the way Kata does by default ("tcfilter").
//!
//! - Host side ([`host::attach`], used by the hypervisor): in the pod's network namespace,
//!   every link that carries an address gets a tap with two tc ingress redirects (link to
//!   tap, tap to link); QEMU gets the tap's fd and the guest NIC the link's MAC.
//! - Guest side ([`guest::apply`], used by the agent): the NIC with that MAC gets the link's
//!   name, MTU, addresses, routes and static neighbours.
//! - Both sides describe what they see with [`scan`], so the host's view sent in equals the
//!   guest's view sent back.
//!
//! Netlink through rust-netlink's `rtnetlink`/`netlink-packet-route` (>= 0.30 parses link
//! dumps of kernels >= 6.17). Network namespaces are entered on a dedicated OS thread only
//! ([`netns`]): `setns` changes the calling thread, never a tokio worker's.

pub mod guest;
pub mod host;
pub mod netns;
pub mod proto;
pub mod scan;
mod tap;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

pub use ipnetwork::IpNetwork;

/// Most NICs a VM gets: microvm has eight virtio-mmio slots, three of which the balloon,
/// vsock and virtio-fs devices take.
pub const MAX_INTERFACES: usize = 5;
/// Most addresses per interface a description may carry (the guest sends one back: its
/// sizes are bounded like everything else it sends).
pub const MAX_ADDRESSES: usize = 64;
/// Most routes a description may carry.
pub const MAX_ROUTES: usize = 256;
/// Most static neighbours a description may carry.
pub const MAX_NEIGHBOURS: usize = 256;

/// A link-layer (Ethernet) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// From netlink's bytes; `None` unless exactly six.
    pub fn from_bytes(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// One network interface of the pod, as the pod sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The link's name (`eth0` from a CNI), at most 15 bytes.
    pub name: String,
    /// The link's MAC, which the guest NIC gets.
    pub mac: Mac,
    /// Bytes.
    pub mtu: u32,
    /// `IFF_NOARP` (point-to-point style CNIs).
    pub noarp: bool,
    /// IPv4 and global/ULA IPv6 addresses with their prefix length, sorted; IPv6 link-local
    /// ones are left out (each side derives the same one from the MAC).
    pub addresses: Vec<IpNetwork>,
}

/// A route of the main table through one of the interfaces. The kernel's own (protocol
/// `kernel`: the subnet route of each address) are left out: adding the address makes them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// Prefix 0 is the default route of its family.
    pub destination: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Preferred source address (`src`).
    pub source: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    /// `RT_SCOPE_*` (0 universe, 253 link).
    pub scope: u8,
    /// `RTNH_F_ONLINK`: the gateway is on the link whatever the addresses say.
    pub onlink: bool,
    /// The route's priority (`metric`); the kernel gives IPv6 routes 1024 when unset.
    pub metric: u32,
}

/// A static (`NUD_PERMANENT`) neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    /// Its IPv4 or IPv6 address.
    pub ip: IpAddr,
    /// Its link-layer address.
    pub mac: Mac,
    /// The interface's name.
    pub device: String,
}

/// A pod's network as one side sees it, sorted (interfaces by name, routes and neighbours
/// by value) so two views compare equal when they hold the same things.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Network {
    /// At most [`MAX_INTERFACES`].
    pub interfaces: Vec<Interface>,
    /// At most [`MAX_ROUTES`].
    pub routes: Vec<Route>,
    /// At most [`MAX_NEIGHBOURS`].
    pub neighbours: Vec<Neighbour>,
}

impl Network {
    /// No interface: the guest keeps loopback only.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
    }

    /// Sorts every list (the order the kernel dumps things in is not part of a view).
    pub fn normalize(&mut self) {
        self.interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        for i in &mut self.interfaces {
            i.addresses.sort();
        }
        self.routes.sort();
        self.neighbours.sort();
    }
}

impl fmt::Display for Network {
    /// One line per interface: `eth0 02:..:ff mtu 1400 10.88.0.5/16 fd00:88::5/64`, then
    /// the routes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in &self.interfaces {
            write!(f, "{} {} mtu {}", i.name, i.mac, i.mtu)?;
            for a in &i.addresses {
                write!(f, " {a}")?;
            }
            writeln!(f)?;
        }
        for r in &self.routes {
            write!(f, "route {} dev {}", r.destination, r.device)?;
            if let Some(g) = r.gateway {
                write!(f, " via {g}")?;
            }
            writeln!(f)?;
        }
        for n in &self.neighbours {
            writeln!(f, "neighbour {} lladdr {} dev {}", n.ip, n.mac, n.device)?;
        }
        Ok(())
    }
}

/// What failed, naming the namespace, link or field.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The guest has no NIC with the MAC an interface needs.
    #[error("no network card with MAC {mac} for interface {name} in the guest")]
    NoNic { name: String, mac: Mac },
    #[error("{0}")]
    Invalid(String),
    #[error("the pod's network namespace has {found} interfaces with addresses; a VM takes at most {max}")]
    TooMany { found: usize, max: usize },
}

impl NetworkError {
    pub(crate) fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
        let what = what.into();
        move |source| NetworkError::Netlink { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
        let what = what.into();
        move |source| NetworkError::Io { what, source }
    }
}

/// Whether a netlink error is the kernel's EEXIST (adding what is already there).
pub(crate) fn is_exists(e: &rtnetlink::Error) -> bool {
    errno_of(e) == Some(libc::EEXIST)
}

/// The kernel's errno behind a netlink error, if it is one.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}
