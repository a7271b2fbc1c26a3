//! Port-forward: the host relays connections made to `localhost:PORT` in the pod's
//! host-side network namespace here ([`vmbox_protocol::forward`]); each is connected to
//! the same port on the guest's loopback. And the list of ports the guest listens on,
//! which tells the host what to relay.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};
use vmbox_protocol::{forward, FORWARD_PORT};

/// Relayed connections at once; more wait for a slot.
const MAX_RELAYS: usize = 256;
/// A stream must send its request this fast.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a guest port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most ports [`listeners`] reports.
pub const MAX_LISTENERS: usize = 1024;

/// Accepts port-forward streams for as long as the agent runs.
pub fn listen() -> std::io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, FORWARD_PORT))?;
    let slots = Arc::new(Semaphore::new(MAX_RELAYS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let slots = slots.clone();
                    tokio::spawn(async move {
                        let Ok(_slot) = slots.acquire_owned().await else { return };
                        relay(conn).await
                    });
                }
                Err(e) => log::warn!("port-forward listener: accept: {e}"),
            }
        }
    });
    Ok(())
}

async fn relay(mut conn: VsockStream) {
    let port = match tokio::time::timeout(REQUEST_TIMEOUT, forward::read_request(&mut conn)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return log::warn!("port-forward stream dropped: {e}"),
        Err(_) => return log::warn!("port-forward stream dropped: no request within {REQUEST_TIMEOUT:?}"),
    };
    let mut tcp = None;
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            tcp = Some(s);
            break;
        }
    }
    if forward::write_reply(&mut conn, tcp.is_some()).await.is_err() {
        return;
    }
    let Some(mut tcp) = tcp else {
        return log::debug!("port-forward to guest port {port}: refused");
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut tcp).await {
        log::debug!("port-forward to guest port {port}: {e}");
    }
}

/// TCP ports in LISTEN state on a wildcard or loopback address (`/proc/net/tcp` and
/// `tcp6`), sorted, unique, at most [`MAX_LISTENERS`].
pub fn listeners() -> Vec<u32> {
    let mut ports = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            ports.extend(parse_listeners(&text));
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(MAX_LISTENERS);
    ports
}

/// The LISTEN rows' ports of one `/proc/net/tcp{,6}` table whose local address is the
/// wildcard or loopback.
fn parse_listeners(table: &str) -> Vec<u32> {
    const LISTEN: &str = "0A";
    let reachable = |addr: &str| {
        matches!(
            addr,
            "00000000" | "0100007F" | "00000000000000000000000000000000" | "00000000000000000000000001000000"
        )
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            let (addr, port) = local.split_once(':')?;
            (state == LISTEN && reachable(addr)).then(|| u32::from_str_radix(port, 16).ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_wildcard_and_loopback_ports_are_found() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0200580A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        assert_eq!(parse_listeners(tcp), [8080, 80]);
        let tcp6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5
   1: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6
";
        assert_eq!(parse_listeners(tcp6), [8081, 53]);
    }
}
