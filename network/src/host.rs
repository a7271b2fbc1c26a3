//! The host side: the pod namespace's links redirected to taps QEMU serves.
//!
//! For every link that carries an address (a CNI's `eth0`), a tap `tap<N>_vmbox` in the
//! same namespace with the link's MTU, an ingress qdisc on both, and one u32 match-all
//! filter on each whose action is mirred egress redirect to the other: what arrives on the
//! link leaves through the tap into the VM, what the VM sends leaves through the link. The
//! guest NIC takes the link's MAC, addresses and routes; the link keeps them too (nothing
//! the CNI made is changed), so CNI DEL finds what it made.

use std::os::fd::OwnedFd;
use std::path::Path;

use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::LinkUnspec;

use crate::scan::{self, Link};
use crate::{errno_of, tap, Mac, Network, NetworkError, MAX_INTERFACES};

/// One redirected link: the tap QEMU gets, and the MAC its guest NIC must have.
#[derive(Debug)]
pub struct Tap {
    /// The tap's name in the pod namespace (`tap0_vmbox`, ...).
    pub name: String,
    /// The link it mirrors (`eth0`).
    pub link: String,
    /// The guest NIC's MAC: the link's.
    pub mac: Mac,
    /// The tap's queue, opened with a 10-byte virtio-net header per frame; QEMU's
    /// `-netdev tap,fd=`. The tap disappears when the last fd to it closes.
    pub fd: OwnedFd,
}

/// What [`attach`] made: the namespace's network as the guest must see it, and one tap
/// per interface, in the same order.
#[derive(Debug, Default)]
pub struct Attachment {
    pub network: Network,
    pub taps: Vec<Tap>,
}

/// Redirects every addressed link of the network namespace at `netns` to a new tap.
/// A namespace without such a link (`ctr run` without CNI) gives an empty attachment.
/// Fails naming the namespace or the link; on failure the qdiscs made so far are removed.
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
        let mut taps = Vec::new();
        for (n, link) in links.iter().enumerate() {
            match redirect(&handle, n, link).await {
                Ok(tap) => taps.push(tap),
                Err(e) => {
                    for l in &links[..=n] {
                        remove_ingress(&handle, l.index, &l.interface.name).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Attachment { network, taps })
    })
}

async fn redirect(handle: &rtnetlink::Handle, n: usize, link: &Link) -> Result<Tap, NetworkError> {
    let name = format!("tap{n}_vmbox");
    let iface = &link.interface;
    let fd = tap::open(&name)?;
    let tap_index = scan::links(handle)
        .await?
        .into_iter()
        .find(|(_, l, ..)| *l == name)
        .map(|(i, ..)| i)
        .ok_or_else(|| NetworkError::Invalid(format!("tap {name} vanished after it was made")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(iface.mtu).up().build())
        .execute()
        .await
        .map_err(NetworkError::netlink(format!(
            "set tap {name} up with MTU {}",
            iface.mtu
        )))?;
    // A previous owner that died (a killed shim) may have left the link's qdisc behind.
    remove_ingress(handle, link.index, &iface.name).await;
    for (index, dev, to) in [(link.index, &iface.name, tap_index), (tap_index, &name, link.index)] {
        handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await
            .map_err(NetworkError::netlink(format!("add an ingress qdisc to {dev}")))?;
        handle
            .traffic_filter(index as i32)
            .add()
            .ingress()
            // tcm_info's low half is the protocol in network byte order (htons).
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(NetworkError::netlink(format!("build the redirect filter of {dev}")))?
            .execute()
            .await
            .map_err(NetworkError::netlink(format!("add the redirect filter to {dev}")))?;
    }
    log::debug!("{} ({}) redirected to {name}", iface.name, iface.mac);
    Ok(Tap {
        name,
        link: iface.name.clone(),
        mac: iface.mac,
        fd,
    })
}

/// Deletes the ingress qdisc (and with it the redirect filter) of link `index`; nothing
/// there is fine.
async fn remove_ingress(handle: &rtnetlink::Handle, index: u32, name: &str) {
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    if let Err(e) = req.execute().await {
        if !matches!(errno_of(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) {
            log::warn!("remove the ingress qdisc of {name}: {e}");
        }
    }
}

/// Undoes [`attach`] for the links named `links` of the namespace at `netns`: their
/// ingress qdiscs go (the taps go by themselves with their fds). A namespace that no longer
/// exists (CRI removes it right after CNI DEL) or a link that is gone is not an error.
/// Blocking.
pub fn detach(netns: &Path, links: &[String]) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    let links = links.to_vec();
    let r = crate::netns::run_in(Some(netns), move |handle| async move {
        let all = scan::links(&handle).await?;
        for name in &links {
            if let Some((index, ..)) = all.iter().find(|(_, n, ..)| n == name) {
                remove_ingress(&handle, *index, name).await;
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
