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
    let err = |detail: String| HypervisorError::Qmp {
        command: command.into(),
        detail,
    };
    let fut = async {
        let s = UnixStream::connect(socket)
            .await
            .map_err(|e| err(format!("{}: {e}", socket.display())))?;
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
