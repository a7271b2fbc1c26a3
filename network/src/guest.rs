//! The guest side: the pod's interfaces, routes and neighbours applied to the guest's NICs.

use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::scan::{self, links};
use crate::{is_exists, Interface, Network, NetworkError, Route};

/// Applies `net` in the namespace `handle` is in, and returns what that namespace then
/// holds ([`scan::scan`]), which equals `net` when all went well:
///
/// 1. `lo` up;
/// 2. each interface: the NIC with its MAC (never found by name: the guest's names are the
///    kernel's) is taken down, renamed (a link already holding the name is moved aside
///    first), given the MTU and ARP flag, and brought up; its addresses are added, IPv6
///    ones with `IFA_F_NODAD` (the address is the pod's already; DAD would hold it
///    tentative for a second);
/// 3. static neighbours (replaced);
/// 4. routes without a gateway, then routes with one (their gateway must be reachable).
///
/// Idempotent: what exists already is left as it is. Fails naming the interface, address
/// or route; an interface whose MAC no NIC has is [`NetworkError::NoNic`].
pub async fn apply(handle: &Handle, net: &Network) -> Result<Network, NetworkError> {
    let all = links(handle).await?;
    if let Some((lo, ..)) = all.iter().find(|(_, n, ..)| n == "lo") {
        handle
            .link()
            .set(LinkUnspec::new_with_index(*lo).up().build())
            .execute()
            .await
            .map_err(NetworkError::netlink("set lo up"))?;
    }
    for (n, iface) in net.interfaces.iter().enumerate() {
        configure_link(handle, n, iface).await?;
    }
    let all = links(handle).await?;
    let index_of = |name: &str| {
        all.iter()
            .find(|(_, n, ..)| n == name)
            .map(|(i, ..)| *i)
            .ok_or_else(|| NetworkError::Invalid(format!("no interface {name} in the guest")))
    };
    for iface in &net.interfaces {
        let index = index_of(&iface.name)?;
        for a in &iface.addresses {
            let mut req = handle.address().add(index, a.ip(), a.prefix());
            if a.is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            match req.execute().await {
                Err(e) if !is_exists(&e) => {
                    return Err(NetworkError::Netlink {
                        what: format!("add address {a} to {}", iface.name),
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    for nb in &net.neighbours {
        let index = index_of(&nb.device)?;
        handle
            .neighbours()
            .add(index, nb.ip)
            .link_layer_address(&nb.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetworkError::netlink(format!(
                "add neighbour {} on {}",
                nb.ip, nb.device
            )))?;
    }
    let (direct, via): (Vec<&Route>, Vec<&Route>) = net.routes.iter().partition(|r| r.gateway.is_none());
    for r in direct.into_iter().chain(via) {
        let index = index_of(&r.device)?;
        let msg = route_message(r, index)?;
        match handle.route().add(msg).execute().await {
            Err(e) if !is_exists(&e) => {
                return Err(NetworkError::Netlink {
                    what: format!("add route {} dev {}", r.destination, r.device),
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(scan::scan(handle).await?.0)
}

/// Finds the NIC of `iface` by MAC and gives it the interface's name, MTU, ARP flag; up.
async fn configure_link(handle: &Handle, n: usize, iface: &Interface) -> Result<(), NetworkError> {
    let all = links(handle).await?;
    let (index, name, ..) = all
        .iter()
        .find(|(_, _, mac, ..)| *mac == Some(iface.mac))
        .ok_or_else(|| NetworkError::NoNic {
            name: iface.name.clone(),
            mac: iface.mac,
        })?;
    let what = |s: &str| format!("{s} {} ({})", iface.name, iface.mac);
    if *name != iface.name {
        if let Some((other, ..)) = all.iter().find(|(_, l, ..)| *l == iface.name) {
            // Another NIC has the name the kernel gave it: move it aside (it gets its
            // own name when its turn comes).
            let aside = format!("vmboxtmp{n}");
            handle
                .link()
                .set(LinkUnspec::new_with_index(*other).down().name(aside).build())
                .execute()
                .await
                .map_err(NetworkError::netlink(what("move aside the link named")))?;
        }
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(*index)
                    .down()
                    .name(iface.name.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(NetworkError::netlink(what("rename the NIC of")))?;
    }
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(*index)
                .mtu(iface.mtu)
                .arp(!iface.noarp)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(NetworkError::netlink(what("set MTU and up on")))?;
    Ok(())
}

fn route_message(r: &Route, index: u32) -> Result<rtnetlink::packet_route::route::RouteMessage, NetworkError> {
    let bad =
        |e: &dyn std::fmt::Display| NetworkError::Invalid(format!("route {} dev {}: {e}", r.destination, r.device));
    let mut b = RouteMessageBuilder::<std::net::IpAddr>::new()
        .destination_prefix(r.destination.ip(), r.destination.prefix())
        .map_err(|e| bad(&e))?
        .output_interface(index)
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::from(r.scope));
    if let Some(g) = r.gateway {
        b = b.gateway(g).map_err(|e| bad(&e))?;
    }
    if let Some(s) = r.source {
        b = b.pref_source(s).map_err(|e| bad(&e))?;
    }
    if r.metric != 0 {
        b = b.priority(r.metric);
    }
    if r.onlink {
        b = b.onlink();
    }
    Ok(b.build())
}
