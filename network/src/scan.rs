//! What a network namespace holds, as a [`Network`]: the same function describes the pod's
//! namespace on the host and the guest's after [`crate::guest::apply`].

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteProtocol, RouteType};
use rtnetlink::{Handle, IpVersion};

use crate::{Interface, IpNetwork, Mac, Neighbour, Network, NetworkError, Route};

/// A link that carries addresses, with its kernel index.
#[derive(Debug, Clone)]
pub struct Link {
    /// The kernel's interface index in the scanned namespace.
    pub index: u32,
    /// What the guest's NIC must become.
    pub interface: Interface,
}

/// Every link of the namespace: index, name, MAC, MTU, flags.
pub(crate) async fn links(handle: &Handle) -> Result<Vec<(u32, String, Option<Mac>, u32, LinkFlags)>, NetworkError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(NetworkError::netlink("list links"))?;
    Ok(msgs
        .into_iter()
        .map(|m| {
            let mut name = String::new();
            let mut mac = None;
            let mut mtu = 0;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Address(b) => mac = Mac::from_bytes(b),
                    LinkAttribute::Mtu(v) => mtu = *v,
                    _ => {}
                }
            }
            (m.header.index, name, mac, mtu, m.header.flags)
        })
        .collect())
}

/// The links that carry an IPv4 or a non-link-local IPv6 address (loopback never), each
/// with its addresses.
pub async fn addressed_links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let mut addrs: HashMap<u32, Vec<IpNetwork>> = HashMap::new();
    let mut stream = handle.address().get().execute();
    while let Some(m) = stream
        .try_next()
        .await
        .map_err(NetworkError::netlink("list addresses"))?
    {
        // IFA_LOCAL is the address itself on point-to-point links, IFA_ADDRESS the peer's.
        let mut local = None;
        let mut address = None;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        let Some(ip) = local.or(address) else { continue };
        if ip.is_loopback() || is_link_local(&ip) {
            continue;
        }
        let net = IpNetwork::new(ip, m.header.prefix_len)
            .map_err(|e| NetworkError::Invalid(format!("address {ip}/{}: {e}", m.header.prefix_len)))?;
        addrs.entry(m.header.index).or_default().push(net);
    }
    let mut out = Vec::new();
    for (index, name, mac, mtu, flags) in links(handle).await? {
        if flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let Some(mut addresses) = addrs.remove(&index) else {
            continue;
        };
        let Some(mac) = mac else {
            // An L3-only device (wireguard, tun): nothing a virtio NIC can stand in for.
            log::warn!("link {name} has addresses but no MAC address; it is not carried into the VM");
            continue;
        };
        addresses.sort();
        out.push(Link {
            index,
            interface: Interface {
                name,
                mac,
                mtu,
                noarp: flags.contains(LinkFlags::Noarp),
                addresses,
            },
        });
    }
    out.sort_by(|a, b| a.interface.name.cmp(&b.interface.name));
    Ok(out)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The routes of the main table through `links`, without the kernel's own (protocol
/// kernel) and router advertisements' (protocol ra), which each side makes for itself.
pub async fn routes(handle: &Handle, links: &[Link]) -> Result<Vec<Route>, NetworkError> {
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.interface.name.as_str())).collect();
    let mut out = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let msg = match version {
            IpVersion::V4 => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut stream = handle.route().get(msg).execute();
        while let Some(m) = stream.try_next().await.map_err(NetworkError::netlink("list routes"))? {
            if let Some(r) = route_of(&m.header, &m.attributes, &names) {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn route_of(h: &RouteHeader, attrs: &[RouteAttribute], names: &HashMap<u32, &str>) -> Option<Route> {
    if matches!(h.protocol, RouteProtocol::Kernel | RouteProtocol::Ra) || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = h.table as u32;
    let (mut dst, mut gateway, mut source, mut oif, mut metric) = (None, None, None, None, 0);
    for a in attrs {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => source = ip_of(s),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != RouteHeader::RT_TABLE_MAIN as u32 {
        return None;
    }
    let device = names.get(&oif?)?.to_string();
    let dst = match (dst, h.address_family) {
        (Some(ip), _) => ip,
        (None, rtnetlink::packet_route::AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let destination = IpNetwork::new(dst, h.destination_prefix_length).ok()?;
    Some(Route {
        destination,
        gateway,
        source,
        device,
        scope: h.scope.into(),
        onlink: h.flags.contains(RouteFlags::Onlink),
        metric,
    })
}

/// The static (`NUD_PERMANENT`) neighbours on `links`.
pub async fn neighbours(handle: &Handle, links: &[Link]) -> Result<Vec<Neighbour>, NetworkError> {
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.interface.name.as_str())).collect();
    let mut out = Vec::new();
    let mut stream = handle.neighbours().get().execute();
    while let Some(m) = stream
        .try_next()
        .await
        .map_err(NetworkError::netlink("list neighbours"))?
    {
        if m.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(device) = names.get(&m.header.ifindex) else {
            continue;
        };
        let (mut ip, mut mac) = (None, None);
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
                NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_bytes(b),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.push(Neighbour {
                ip,
                mac,
                device: device.to_string(),
            });
        }
    }
    out.sort();
    Ok(out)
}

/// The namespace's network: addressed links, their routes and static neighbours.
pub async fn scan(handle: &Handle) -> Result<(Network, Vec<Link>), NetworkError> {
    let links = addressed_links(handle).await?;
    let routes = routes(handle, &links).await?;
    let neighbours = neighbours(handle, &links).await?;
    let mut net = Network {
        interfaces: links.iter().map(|l| l.interface.clone()).collect(),
        routes,
        neighbours,
    };
    net.normalize();
    Ok((net, links))
}
