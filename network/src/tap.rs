//! Tap devices: `/dev/net/tun` with `TUNSETIFF`. A tap is made in the network namespace
//! of the thread that opens it, and lives as long as an fd to it is open (not persistent):
//! when the shim's and QEMU's fds close, the kernel removes it.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::NetworkError;

// `_IOW('T', 202, int)`.
nix::ioctl_write_int!(tunsetiff, b'T', 202);

/// Opens a tap named `name` (at most 15 bytes) with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`:
/// every frame read or written carries a 10-byte virtio-net header first, as QEMU's
/// virtio-net expects.
pub(crate) fn open(name: &str) -> Result<OwnedFd, NetworkError> {
    if name.is_empty() || name.len() > 15 {
        return Err(NetworkError::Invalid(format!("tap name {name:?}: 1-15 bytes")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(NetworkError::io("open /dev/net/tun"))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) the ifreq, which outlives the call; the
    // nix macro passes the pointer as the ioctl's integer argument.
    unsafe { tunsetiff(f.as_raw_fd(), &mut req as *mut libc::ifreq as libc::c_ulong) }.map_err(|e| {
        NetworkError::Io {
            what: format!("create tap {name}"),
            source: e.into(),
        }
    })?;
    Ok(OwnedFd::from(f))
}
