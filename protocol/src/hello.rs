//! The hello: the first thing the agent says, on the hello port, once it serves.
//!
//! Framing: a 4-byte big-endian length, then a protobuf `Hello`. The host waits for it
//! instead of dialling into a booting guest (dialling too early can wedge vhost-user
//! vsock devices), and checks the protocol version before any RPC.

use protobuf::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent::Hello;
use crate::{ProtocolError, PROTOCOL_VERSION};

/// Upper bound of an encoded hello; a guest sending more is broken or hostile.
pub const MAX_HELLO_LEN: usize = 4096;

/// Writes `hello` framed.
pub async fn write_hello<W: AsyncWrite + Unpin>(w: &mut W, hello: &Hello) -> Result<(), ProtocolError> {
    let body = hello.write_to_bytes().map_err(|e| ProtocolError::Malformed {
        what: "hello",
        detail: e.to_string(),
    })?;
    if body.len() > MAX_HELLO_LEN {
        return Err(ProtocolError::TooLarge {
            what: "hello",
            len: body.len(),
            max: MAX_HELLO_LEN,
        });
    }
    let io = |source| ProtocolError::Io {
        what: "hello stream",
        source,
    };
    w.write_all(&(body.len() as u32).to_be_bytes()).await.map_err(io)?;
    w.write_all(&body).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads one framed hello and checks its protocol version.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, ProtocolError> {
    let io = |source| ProtocolError::Io {
        what: "hello stream",
        source,
    };
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HELLO_LEN {
        return Err(ProtocolError::TooLarge {
            what: "hello",
            len,
            max: MAX_HELLO_LEN,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(io)?;
    let hello = Hello::parse_from_bytes(&body).map_err(|e| ProtocolError::Malformed {
        what: "hello",
        detail: e.to_string(),
    })?;
    check_version(hello.protocol_version, &hello.agent_version)?;
    Ok(hello)
}

/// Fails with a clear message unless the guest speaks this crate's protocol version.
pub fn check_version(guest: u32, agent_version: &str) -> Result<(), ProtocolError> {
    if guest != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch {
            host: PROTOCOL_VERSION,
            guest,
            agent_version: agent_version.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hello_round_trips() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.0".into(),
            boot_time_us: 1234,
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello).await.unwrap();
        let got = read_hello(&mut buf.as_slice()).await.unwrap();
        assert_eq!(got, hello);
    }

    #[tokio::test]
    async fn oversized_hello_is_rejected_before_allocating() {
        let buf = (u32::MAX).to_be_bytes();
        let err = read_hello(&mut buf.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn version_mismatch_names_both_versions() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            agent_version: "9.9".into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello).await.unwrap();
        let err = read_hello(&mut buf.as_slice()).await.unwrap_err().to_string();
        assert!(err.contains(&format!("host speaks {PROTOCOL_VERSION}")), "{err}");
        assert!(err.contains("9.9"), "{err}");
    }
}
