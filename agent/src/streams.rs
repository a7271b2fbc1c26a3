//! Stdio streams: the host opens one vsock connection per stdio fd of a process to
//! [`STDIO_PORT`] and names it with a header; requests then refer to it by id. Streams
//! wait here until a request claims them (bounded in number and time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};
use vmbox_protocol::{stream, STDIO_PORT};

/// Streams announced but not yet claimed; more are refused.
const MAX_PENDING: usize = 1024;
/// An unclaimed stream is dropped after this (requests wait at most 10 s for theirs).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);
/// A connection must name itself this fast.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
pub struct Streams {
    pending: Arc<Mutex<HashMap<u64, (Instant, VsockStream)>>>,
    arrived: Arc<Notify>,
}

impl Streams {
    /// Accepts stdio streams for as long as the agent runs.
    pub fn listen(&self) -> std::io::Result<()> {
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_PORT))?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let this = this.clone();
                        tokio::spawn(async move { this.register(conn).await });
                    }
                    Err(e) => log::warn!("stdio listener: accept: {e}"),
                }
            }
        });
        Ok(())
    }

    async fn register(&self, mut conn: VsockStream) {
        let id = match tokio::time::timeout(HEADER_TIMEOUT, stream::read_header(&mut conn)).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => return log::warn!("stdio stream dropped: {e}"),
            Err(_) => return log::warn!("stdio stream dropped: no header within {HEADER_TIMEOUT:?}"),
        };
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Streams of requests that failed before claiming them are never taken: drop
            // them once no request could still be waiting for them.
            p.retain(|_, (at, _)| at.elapsed() < UNCLAIMED_TTL);
            if p.len() >= MAX_PENDING {
                return log::warn!("stdio stream {id} dropped: {MAX_PENDING} streams already pending");
            }
            p.insert(id, (Instant::now(), conn));
        }
        self.arrived.notify_waiters();
    }

    /// Claims stream `id`, waiting up to `timeout` for it to arrive.
    pub async fn take(&self, id: u64, timeout: Duration) -> Option<VsockStream> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some((_, s)) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                return Some(s);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}
