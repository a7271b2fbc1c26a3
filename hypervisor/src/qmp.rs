//! A minimal QMP client: one command at a time over QEMU's monitor socket.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::HypervisorError;

/// Bound of one QMP reply line; QEMU's answers to our commands are far smaller.
const MAX_LINE: usize = 1 << 20;

/// Runs `command` (with capabilities negotiation) and returns its `return` value.
pub async fn execute(socket: &Path, command: &str, timeout: Duration) -> Result<Value, HypervisorError> {
    execute_inner(socket, command, timeout, false).await
}

/// Like [`execute`], for a QEMU that is still starting: its monitor socket may not exist
/// yet, or exist before QEMU listens on it (connections are refused in between). Both
/// are retried until `timeout`.
pub async fn execute_when_up(socket: &Path, command: &str, timeout: Duration) -> Result<Value, HypervisorError> {
    execute_inner(socket, command, timeout, true).await
}

async fn execute_inner(socket: &Path, command: &str, timeout: Duration, wait: bool) -> Result<Value, HypervisorError> {
    let err = |detail: String| HypervisorError::Qmp {
        command: command.into(),
        detail,
    };
    let fut = async {
        let s = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e)
                    if wait
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(err(format!("{}: {e}", socket.display()))),
            }
        };
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        read_reply(&mut r).await.map_err(err)?; // greeting
        for cmd in ["qmp_capabilities", command] {
            let line = format!("{}\n", json!({ "execute": cmd }));
            w.write_all(line.as_bytes()).await.map_err(|e| err(e.to_string()))?;
            loop {
                let v = read_reply(&mut r).await.map_err(err)?;
                if let Some(e) = v.get("error") {
                    return Err(err(e.to_string()));
                }
                if let Some(ret) = v.get("return") {
                    if cmd == command {
                        return Ok(ret.clone());
                    }
                    break;
                }
                // An asynchronous event: skip it.
            }
        }
        Err(err("no reply".into()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| err(format!("no reply within {} ms", timeout.as_millis())))?
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("QEMU closed the monitor".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("bad reply: {e}"))
}

use tokio::io::AsyncReadExt;

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// A QEMU that has bound its monitor socket but listens only later: connections are
    /// refused in between, which must not fail the boot.
    #[tokio::test]
    async fn a_monitor_that_listens_late_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("vmbox-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let fd: OwnedFd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        assert!(execute(&path, "cont", Duration::from_millis(500)).await.is_err());
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            listen(&fd, Backlog::new(1).unwrap()).unwrap();
            // SAFETY: fd is a listening Unix socket we own; ownership moves to the listener.
            let std_listener =
                unsafe { std::os::unix::net::UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
            std_listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut line = String::new();
            for reply in ["{\"return\": {}}\n", "{\"event\": \"RESUME\"}\n{\"return\": {}}\n"] {
                line.clear();
                r.read_line(&mut line).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            line
        });
        let got = execute_when_up(&path, "cont", Duration::from_secs(5)).await;
        assert!(got.is_ok(), "{got:?}");
        assert!(server.await.unwrap().contains("\"cont\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
