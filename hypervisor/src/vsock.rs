//! Host side of the vsock transport, over either
//! - vhost-user (`vhost-device-vsock`): a "hybrid" unix socket. The host connects to
//!   `UDS`, writes `CONNECT <port>\n`, reads `OK <n>\n`, then has a byte stream; the
//!   guest dialling the host's port P reaches a listener on `UDS_P`.
//! - the kernel's vhost-vsock: plain AF_VSOCK to the guest's CID.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::HypervisorError;

/// A connected stream to the guest.
pub enum Conn {
    Unix(UnixStream),
    Vsock(VsockStream),
}

/// How to reach a guest's ports.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// `owner`: the uid `uds` must belong to (the confined vhost-device-vsock's).
    Hybrid {
        uds: PathBuf,
        owner: Option<u32>,
    },
    Kernel {
        cid: u32,
    },
}

/// Bound of the hybrid handshake's reply line.
const MAX_REPLY: usize = 64;

impl Dialer {
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<Conn, HypervisorError> {
        let err = |detail: String| HypervisorError::Vsock { port, detail };
        let fut = async {
            match self {
                Dialer::Hybrid { uds, owner } => {
                    let mut s = crate::confine::connect_unix(uds, *owner)
                        .await
                        .map_err(|e| err(format!("{}: {e}", uds.display())))?;
                    s.write_all(format!("CONNECT {port}\n").as_bytes())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    // Read the reply byte by byte: anything after the newline is stream data.
                    let mut line = Vec::new();
                    let mut r = BufReader::with_capacity(1, &mut s);
                    loop {
                        let buf = r.fill_buf().await.map_err(|e| err(e.to_string()))?;
                        let Some(&b) = buf.first() else {
                            return Err(err("closed during the handshake".into()));
                        };
                        r.consume(1);
                        if b == b'\n' {
                            break;
                        }
                        if line.len() >= MAX_REPLY {
                            return Err(err("handshake reply too long".into()));
                        }
                        line.push(b);
                    }
                    if !line.starts_with(b"OK ") {
                        return Err(err(format!("handshake refused: {:?}", String::from_utf8_lossy(&line))));
                    }
                    Ok(Conn::Unix(s))
                }
                Dialer::Kernel { cid } => VsockStream::connect(VsockAddr::new(*cid, port))
                    .await
                    .map(Conn::Vsock)
                    .map_err(|e| err(format!("cid {cid}: {e}"))),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| err(format!("no answer within {} ms", timeout.as_millis())))?
    }
}

/// Where the guest's hello arrives.
pub enum HelloListener {
    Unix(UnixListener, PathBuf, u32),
    Vsock(VsockListener, u32),
}

/// "Any port" for AF_VSOCK's bind.
const VMADDR_PORT_ANY: u32 = u32::MAX;

impl HelloListener {
    /// Listens for guest connections to host port `port`; `None` lets the kernel pick a
    /// free one (AF_VSOCK ports are host-wide, shared by every VM).
    pub fn bind(dialer: &Dialer, port: Option<u32>) -> Result<HelloListener, HypervisorError> {
        match dialer {
            Dialer::Hybrid { uds, .. } => {
                let port = port.unwrap_or(vmbox_protocol::HELLO_PORT);
                let path = PathBuf::from(format!("{}_{port}", uds.display()));
                let l = UnixListener::bind(&path).map_err(HypervisorError::io("listen on", &path))?;
                Ok(HelloListener::Unix(l, path, port))
            }
            Dialer::Kernel { .. } => {
                let l = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port.unwrap_or(VMADDR_PORT_ANY)))
                    .map_err(HypervisorError::io("listen on vsock port", format!("{port:?}")))?;
                let port = l
                    .local_addr()
                    .map_err(HypervisorError::io("read the address of vsock listener", "hello"))?
                    .port();
                Ok(HelloListener::Vsock(l, port))
            }
        }
    }

    /// The host port the guest must dial.
    pub fn port(&self) -> u32 {
        match self {
            HelloListener::Unix(_, _, p) | HelloListener::Vsock(_, p) => *p,
        }
    }

    /// Accepts the guest's connection (from `cid` only, for AF_VSOCK).
    pub async fn accept(&self, cid: Option<u32>) -> io::Result<Conn> {
        match self {
            HelloListener::Unix(l, _, _) => Ok(Conn::Unix(l.accept().await?.0)),
            HelloListener::Vsock(l, _) => loop {
                let (s, addr) = l.accept().await?;
                if cid.is_none_or(|c| c == addr.cid()) {
                    return Ok(Conn::Vsock(s));
                }
                log::warn!("hello from unexpected cid {} ignored", addr.cid());
            },
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            HelloListener::Unix(_, p, _) => Some(p),
            HelloListener::Vsock(..) => None,
        }
    }
}

impl Drop for HelloListener {
    fn drop(&mut self) {
        if let HelloListener::Unix(_, p, _) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_write(cx, data),
            Conn::Vsock(s) => Pin::new(s).poll_write(cx, data),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile vhost-device-vsock (or one it impersonates) answering the handshake with
    /// an endless line: the host stops after MAX_REPLY bytes.
    #[tokio::test]
    async fn a_handshake_reply_is_bounded() {
        let dir = std::env::temp_dir().join(format!("vmbox-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock");
        let l = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(&[b'x'; 4096]).await;
                    let mut sink = [0u8; 64];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut sink).await;
                });
            }
        });
        let d = Dialer::Hybrid {
            uds: uds.clone(),
            owner: None,
        };
        match d.connect(1025, Duration::from_secs(5)).await {
            Err(HypervisorError::Vsock { detail, .. }) => assert!(detail.contains("too long"), "{detail}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an endless reply was accepted"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
