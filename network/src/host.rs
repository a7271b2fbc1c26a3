//! The host side: the pod namespace's links redirected to taps QEMU serves.
//!
//! For every link that carries an address (a CNI's `eth0`), a tap `tap<N>_vmbox` in the
//! same namespace with the link's MTU, an ingress qdisc on both, and one u32 match-all
//! filter on each whose action is mirred egress redirect to the other: what arrives on the
//! link leaves through the tap into the VM, what the VM sends leaves through the link. The
//! guest NIC takes the link's MAC, addresses and routes; the link keeps them too (nothing
//! the CNI made is changed), so CNI DEL finds what it made.
//!
//! Other tools' tc state on the link is left alone: vmbox's filters have their own
//! priority ([`FILTER_PRIORITY`]), and an ingress qdisc that was there before is used, not
//! replaced, and not removed at [`detach`].

use std::os::fd::OwnedFd;
use std::path::Path;

use futures_util::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::LinkUnspec;

use crate::scan::{self, Link};
use crate::{errno_of, is_exists, tap, Mac, Network, NetworkError, MAX_INTERFACES};

/// The priority (`tc filter ... pref`) of vmbox's redirect filters: what [`detach`]
/// removes on a link whose ingress qdisc is not vmbox's.
pub const FILTER_PRIORITY: u16 = 0x7662;

/// One redirected link: the tap QEMU gets, and the MAC its guest NIC must have.
#[derive(Debug)]
pub struct Tap {
    /// The tap's name in the pod namespace (`tap0_vmbox`, ...).
    pub name: String,
    /// The link it mirrors (`eth0`), and whether its ingress qdisc is vmbox's.
    pub link: Redirected,
    /// The guest NIC's MAC: the link's.
    pub mac: Mac,
    /// The tap's queue, opened with a 10-byte virtio-net header per frame; QEMU's
    /// `-netdev tap,fd=`. The tap disappears when the last fd to it closes.
    pub fd: OwnedFd,
}

/// A link [`attach`] redirected, as [`detach`] needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    /// The link's name.
    pub name: String,
    /// Whether vmbox added the link's ingress qdisc (then removing it removes the filter
    /// too); `false`: another tool's was there, and only vmbox's filter is removed.
    pub own_qdisc: bool,
}

/// What [`attach`] made: the namespace's network as the guest must see it, and one tap
/// per interface, in the same order.
#[derive(Debug, Default)]
pub struct Attachment {
    /// The pod's network, for the guest.
    pub network: Network,
    /// One per interface of `network`.
    pub taps: Vec<Tap>,
}

/// Redirects every addressed link of the network namespace at `netns` to a new tap.
/// A namespace without such a link (`ctr run` without CNI) gives an empty attachment.
/// Fails naming the namespace or the link; on failure what was added so far is removed.
/// Blocking (a thread of its own in the namespace).
pub fn attach(netns: &Path) -> Result<Attachment, NetworkError> {
    crate::netns::run_in(Some(netns), |handle| async move {
        let (network, links) = scan::scan(&handle).await?;
        if links.len() > MAX_INTERFACES {
            return Err(NetworkError::TooMany {
                found: links.len(),
                max: MAX_INTERFACES,
            });
        }
        let mut taps: Vec<Tap> = Vec::new();
        for (n, link) in links.iter().enumerate() {
            match redirect(&handle, n, link).await {
                Ok(tap) => taps.push(tap),
                Err((e, own_qdisc)) => {
                    let done = taps
                        .iter()
                        .map(|t| (&t.link, links.iter().find(|l| l.interface.name == t.link.name)));
                    for (r, l) in done {
                        if let Some(l) = l {
                            undo(&handle, l.index, r).await;
                        }
                    }
                    if let Some(own) = own_qdisc {
                        let r = Redirected {
                            name: link.interface.name.clone(),
                            own_qdisc: own,
                        };
                        undo(&handle, link.index, &r).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Attachment { network, taps })
    })
}

/// Redirects `link` to a new tap `tap<n>_vmbox`. On failure, says whether the link's
/// qdisc had been reached (and was vmbox's) so the caller can undo it.
async fn redirect(handle: &rtnetlink::Handle, n: usize, link: &Link) -> Result<Tap, (NetworkError, Option<bool>)> {
    let name = format!("tap{n}_vmbox");
    let iface = &link.interface;
    let fd = tap::open(&name).map_err(|e| (e, None))?;
    let tap_index = scan::links(handle)
        .await
        .map_err(|e| (e, None))?
        .into_iter()
        .find(|(_, l, ..)| *l == name)
        .map(|(i, ..)| i)
        .ok_or_else(|| {
            (
                NetworkError::Invalid(format!("tap {name} vanished after it was made")),
                None,
            )
        })?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(iface.mtu).up().build())
        .execute()
        .await
        .map_err(|e| {
            (
                NetworkError::netlink(format!("set tap {name} up with MTU {}", iface.mtu))(e),
                None,
            )
        })?;
    // A previous owner that died (a killed shim) may have left its filter behind.
    del_filter(handle, link.index).await;
    let own_qdisc = match handle.qdisc().add(link.index as i32).ingress().execute().await {
        Ok(()) => true,
        Err(e) if is_exists(&e) => false,
        Err(e) => {
            return Err((
                NetworkError::netlink(format!("add an ingress qdisc to {}", iface.name))(e),
                None,
            ))
        }
    };
    let fail = |what: String| move |e| (NetworkError::netlink(what)(e), Some(own_qdisc));
    handle
        .qdisc()
        .add(tap_index as i32)
        .ingress()
        .execute()
        .await
        .map_err(fail(format!("add an ingress qdisc to {name}")))?;
    for (index, dev, to) in [(link.index, &iface.name, tap_index), (tap_index, &name, link.index)] {
        handle
            .traffic_filter(index as i32)
            .add()
            .ingress()
            .priority(FILTER_PRIORITY)
            // tcm_info's low half is the protocol in network byte order (htons).
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(fail(format!("build the redirect filter of {dev}")))?
            .execute()
            .await
            .map_err(fail(format!("add the redirect filter to {dev}")))?;
    }
    log::debug!("{} ({}) redirected to {name}", iface.name, iface.mac);
    Ok(Tap {
        name,
        link: Redirected {
            name: iface.name.clone(),
            own_qdisc,
        },
        mac: iface.mac,
        fd,
    })
}

/// Deletes vmbox's redirect filter ([`FILTER_PRIORITY`]) from link `index`'s ingress;
/// none there is fine.
async fn del_filter(handle: &rtnetlink::Handle, index: u32) {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle {
        major: 0xffff,
        minor: TcHandle::MIN_INGRESS,
    };
    msg.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from((libc::ETH_P_ALL as u16).to_be());
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut handle = handle.clone();
    if let Ok(mut resp) = handle.request(req) {
        // An error (no qdisc, no such filter) means there is nothing of ours.
        let _ = resp.next().await;
    }
}

/// Removes what [`attach`] added to a link: its qdisc if vmbox's, else vmbox's filter.
async fn undo(handle: &rtnetlink::Handle, index: u32, link: &Redirected) {
    if !link.own_qdisc {
        return del_filter(handle, index).await;
    }
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    if let Err(e) = req.execute().await {
        if !matches!(errno_of(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) {
            log::warn!("remove the ingress qdisc of {}: {e}", link.name);
        }
    }
}

/// Undoes [`attach`] for `links` of the namespace at `netns` (the taps go by themselves
/// with their fds). A namespace that no longer exists (CRI removes it right after CNI
/// DEL) or a link that is gone is not an error. Blocking.
pub fn detach(netns: &Path, links: &[Redirected]) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    let links = links.to_vec();
    let r = crate::netns::run_in(Some(netns), move |handle| async move {
        let all = scan::links(&handle).await?;
        for link in &links {
            if let Some((index, ..)) = all.iter().find(|(_, n, ..)| *n == link.name) {
                undo(&handle, *index, link).await;
            }
        }
        Ok(())
    });
    match r {
        // Removed between the check and the open, or unmounted (setns: EINVAL).
        Err(NetworkError::Netns { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::EINVAL) =>
        {
            Ok(())
        }
        r => r,
    }
}
