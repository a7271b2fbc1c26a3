//! A minimal QMP client: one command at a time over QEMU's monitor socket.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::HypervisorError;

/// Bound of one QMP reply line; QEMU's answers to our commands are far smaller.
const MAX_LINE: usize = 1 << 20;

/// Runs `command` (with capabilities negotiation) and returns its `return` value.
/// `owner`: the uid the socket must belong to (the confined QEMU's), see
/// [`crate::confine::connect_unix`].
pub async fn execute(
    socket: &Path,
    owner: Option<u32>,
    command: &str,
    timeout: Duration,
) -> Result<Value, HypervisorError> {
    execute_inner(socket, owner, command, timeout, false).await
}

/// Like [`execute`], for a QEMU that is still starting: its monitor socket may not exist
/// yet, or exist before QEMU listens on it (connections are refused in between). Both
/// are retried until `timeout`.
pub async fn execute_when_up(
    socket: &Path,
    owner: Option<u32>,
    command: &str,
    timeout: Duration,
) -> Result<Value, HypervisorError> {
    execute_inner(socket, owner, command, timeout, true).await
}

async fn execute_inner(
    socket: &Path,
    owner: Option<u32>,
    command: &str,
    timeout: Duration,
    wait: bool,
) -> Result<Value, HypervisorError> {
    let err = |detail: String| HypervisorError::Qmp {
        command: command.into(),
        detail,
    };
    let fut = async {
        let s = loop {
            match crate::confine::connect_unix(socket, owner).await {
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
        parse_reply(&read_line(&mut r).await.map_err(err)?).map_err(err)?; // greeting
        for cmd in ["qmp_capabilities", command] {
            let line = format!("{}\n", json!({ "execute": cmd }));
            w.write_all(line.as_bytes()).await.map_err(|e| err(e.to_string()))?;
            loop {
                match parse_reply(&read_line(&mut r).await.map_err(err)?).map_err(err)? {
                    Reply::Error(e) => return Err(err(e)),
                    Reply::Return(ret) if cmd == command => return Ok(ret),
                    Reply::Return(_) => break,
                    Reply::Other => {} // an asynchronous event or the greeting
                }
            }
        }
        Err(err("no reply".into()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| err(format!("no reply within {} ms", timeout.as_millis())))?
}

/// One line QEMU's monitor sent, as far as this client cares.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"return": ...}`: the command's result.
    Return(Value),
    /// `{"error": ...}`: the command failed; the error object as text (at most 1 KiB).
    Error(String),
    /// The greeting or an asynchronous event.
    Other,
}

/// Parses one monitor line (bytes QEMU, a process the guest may control, wrote).
///
/// Errors: the line is not a JSON object (the text says why).
pub fn parse_reply(line: &[u8]) -> Result<Reply, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("bad reply: {e}"))?;
    if !v.is_object() {
        return Err("bad reply: not a JSON object".into());
    }
    if let Some(e) = v.get("error") {
        let mut text = e.to_string();
        if text.len() > 1024 {
            let mut end = 1024;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        return Ok(Reply::Error(text));
    }
    Ok(match v.get("return") {
        Some(ret) => Reply::Return(ret.clone()),
        None => Reply::Other,
    })
}

/// Reads one line of at most [`MAX_LINE`] bytes.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("QEMU closed the monitor".into());
    }
    Ok(line)
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
        assert!(execute(&path, None, "cont", Duration::from_millis(500)).await.is_err());
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
        let got = execute_when_up(&path, None, "cont", Duration::from_secs(5)).await;
        assert!(got.is_ok(), "{got:?}");
        assert!(server.await.unwrap().contains("\"cont\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn replies_errors_and_events_are_told_apart_and_bounded() {
        assert_eq!(parse_reply(br#"{"return": {}}"#), Ok(Reply::Return(json!({}))));
        assert_eq!(parse_reply(br#"{"QMP": {"version": {}}}"#), Ok(Reply::Other));
        assert_eq!(parse_reply(br#"{"event": "STOP"}"#), Ok(Reply::Other));
        let long = format!(r#"{{"error": {{"desc": "{}"}}}}"#, "é".repeat(4000));
        match parse_reply(long.as_bytes()) {
            Ok(Reply::Error(e)) => assert!(e.len() <= 1024, "{}", e.len()),
            r => panic!("{r:?}"),
        }
        for bad in [&b"[1]"[..], b"", b"{", b"\xff", b"42"] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }
}
