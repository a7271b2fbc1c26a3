//! Port-forward streams: the host relays a connection made to `localhost:PORT` in the
//! pod's host-side network namespace (what containerd's PortForward dials) to the same
//! port on the guest's loopback.
//!
//! The host opens a connection to [`crate::FORWARD_PORT`] and writes a 6-byte request:
//! the magic `VMPF` and the TCP port (u16, big endian). The agent connects to
//! `127.0.0.1:PORT` (then `[::1]:PORT`) in the guest and answers one byte: 0 when
//! connected, 1 when refused. After that the connection carries the TCP stream's bytes
//! both ways.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ProtocolError;

const MAGIC: &[u8; 4] = b"VMPF";
/// Length of the request.
pub const REQUEST_LEN: usize = 6;

fn io(source: std::io::Error) -> ProtocolError {
    ProtocolError::Io {
        what: "port-forward stream",
        source,
    }
}

/// Asks for a connection to guest port `port`.
pub async fn write_request<W: AsyncWrite + Unpin>(w: &mut W, port: u16) -> Result<(), ProtocolError> {
    let mut h = [0u8; REQUEST_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..].copy_from_slice(&port.to_be_bytes());
    w.write_all(&h).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads a request; returns the port (never 0).
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<u16, ProtocolError> {
    let mut h = [0u8; REQUEST_LEN];
    r.read_exact(&mut h).await.map_err(io)?;
    if &h[..4] != MAGIC {
        return Err(ProtocolError::Malformed {
            what: "port-forward request",
            detail: format!("bad magic {:?}", &h[..4]),
        });
    }
    match u16::from_be_bytes([h[4], h[5]]) {
        0 => Err(ProtocolError::Malformed {
            what: "port-forward request",
            detail: "port 0".into(),
        }),
        p => Ok(p),
    }
}

/// Answers a request: whether the guest port accepted the connection.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, connected: bool) -> Result<(), ProtocolError> {
    w.write_all(&[u8::from(!connected)]).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads the answer: `true` when connected.
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<bool, ProtocolError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).await.map_err(io)?;
    Ok(b[0] == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_and_replies_round_trip_and_bad_ones_are_named() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_request(&mut a, 8080).await.unwrap();
        assert_eq!(read_request(&mut b).await.unwrap(), 8080);
        write_reply(&mut b, true).await.unwrap();
        assert!(read_reply(&mut a).await.unwrap());
        write_reply(&mut b, false).await.unwrap();
        assert!(!read_reply(&mut a).await.unwrap());
        a.write_all(b"XXXX\x00\x50").await.unwrap();
        assert!(read_request(&mut b).await.unwrap_err().to_string().contains("magic"));
        a.write_all(b"VMPF\x00\x00").await.unwrap();
        assert!(read_request(&mut b).await.unwrap_err().to_string().contains("port 0"));
    }
}
