//! Stdio streams: one vsock connection per stdio fd of a process.
//!
//! The host opens a connection to [`crate::STDIO_PORT`] and first writes a 12-byte
//! header: the magic `VMBS` and the stream id (u64, big endian). Process requests then
//! name these ids. After the header the connection is a plain byte stream: for stdin the
//! host closing the connection means EOF; for stdout/stderr the agent closes it once the
//! process's end of the pipe is drained.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ProtocolError;

const MAGIC: &[u8; 4] = b"VMBS";
/// Length of the stream header.
pub const HEADER_LEN: usize = 12;

/// Writes the header announcing stream `id` (never 0: 0 means "no stream").
pub async fn write_header<W: AsyncWrite + Unpin>(w: &mut W, id: u64) -> Result<(), ProtocolError> {
    if id == 0 {
        return Err(ProtocolError::Malformed {
            what: "stream header",
            detail: "stream id 0 is reserved".into(),
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..].copy_from_slice(&id.to_be_bytes());
    let io = |source| ProtocolError::Io {
        what: "stdio stream",
        source,
    };
    w.write_all(&h).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads a stream header and returns its id.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|source| ProtocolError::Io {
        what: "stdio stream",
        source,
    })?;
    if &h[..4] != MAGIC {
        return Err(ProtocolError::Malformed {
            what: "stream header",
            detail: format!("bad magic {:?}", &h[..4]),
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[4..]);
    match u64::from_be_bytes(id) {
        0 => Err(ProtocolError::Malformed {
            what: "stream header",
            detail: "stream id 0 is reserved".into(),
        }),
        id => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_round_trips() {
        let mut buf = Vec::new();
        write_header(&mut buf, 42).await.unwrap();
        assert_eq!(buf.len(), HEADER_LEN);
        assert_eq!(read_header(&mut buf.as_slice()).await.unwrap(), 42);
    }

    #[tokio::test]
    async fn bad_magic_is_rejected() {
        let buf = [0u8; HEADER_LEN];
        assert!(read_header(&mut buf.as_slice()).await.is_err());
    }
}
