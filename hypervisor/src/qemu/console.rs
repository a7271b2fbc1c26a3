//! The guest console, kept in a bounded ring in the host's memory.
//!
//! The guest decides what it prints, so the host keeps only the last [`CONSOLE_RING`]
//! bytes: QEMU connects its serial chardev to a socket this side listens on, and one task
//! reads it into the ring until QEMU closes it. A guest that prints for ever costs a fixed
//! amount of memory and no disk. If the reader lags, QEMU's serial port waits, which slows
//! only the printing guest.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::HypervisorError;

/// Bytes of console output kept (the newest).
pub const CONSOLE_RING: usize = 64 * 1024;
/// Longest console line copied into the log, in bytes.
pub const MAX_LOG_LINE: usize = 1024;
/// Console lines copied into the log per second at most (a burst of this many, refilled at
/// this rate); the rest are counted and reported as suppressed.
pub const LOG_LINES_PER_SEC: u32 = 50;

use vmbox_protocol::rate::RateLimiter;

/// A bounded byte ring: pushing past its capacity drops the oldest bytes.
#[derive(Debug, Default)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            buf: VecDeque::with_capacity(cap.min(4096)),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over.min(self.buf.len()));
        self.buf.extend(data);
    }

    /// Bytes held (at most the capacity).
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// The last `n` lines (lossy UTF-8), each at most [`MAX_LOG_LINE`] bytes with control
    /// characters escaped: the guest wrote them, they go to logs and to containerd.
    pub fn tail(&self, n: usize) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| vmbox_protocol::text::bounded(l, MAX_LOG_LINE))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A console line as the log shows it: lossy UTF-8, control characters escaped (the guest
/// cannot forge log lines), at most [`MAX_LOG_LINE`] bytes.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    vmbox_protocol::text::bounded(text.trim_end(), MAX_LOG_LINE)
}

/// The host end of a VM's console.
pub struct Console {
    ring: Arc<Mutex<Ring>>,
    received: Arc<std::sync::atomic::AtomicU64>,
    reader: JoinHandle<()>,
    path: PathBuf,
}

impl Console {
    /// Listens on `path` (before QEMU starts: QEMU connects at start-up) and keeps what
    /// arrives; each line also goes to the log at trace level, as `vm <name> console: ...`
    /// (cut at [`MAX_LOG_LINE`] bytes, at most [`LOG_LINES_PER_SEC`] a second, the rest
    /// counted as suppressed). Needs a tokio runtime.
    pub fn listen(path: &Path, name: &str) -> Result<Console, HypervisorError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(HypervisorError::io("listen on console socket", path))?;
        let ring = Arc::new(Mutex::new(Ring::new(CONSOLE_RING)));
        let r = ring.clone();
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let total = received.clone();
        let name = name.to_string();
        let mut limiter = RateLimiter::new(LOG_LINES_PER_SEC);
        let reader = tokio::spawn(async move {
            let mut line: Vec<u8> = Vec::new();
            // One connection: QEMU's. It lives as long as QEMU.
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            drop(listener);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        if let Ok(mut ring) = r.lock() {
                            ring.push(&buf[..n]);
                        }
                        if log::log_enabled!(log::Level::Trace) {
                            for &b in &buf[..n] {
                                if b == b'\n' {
                                    match limiter.allow(std::time::Instant::now()) {
                                        Some(0) => log::trace!("vm {name} console: {}", printable(&line)),
                                        Some(k) => log::trace!(
                                            "vm {name} console ({k} lines suppressed before): {}",
                                            printable(&line)
                                        ),
                                        None => {}
                                    }
                                    line.clear();
                                } else if line.len() < MAX_LOG_LINE {
                                    line.push(b);
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(Console {
            ring,
            received,
            reader,
            path: path.to_path_buf(),
        })
    }

    /// The last `n` lines the guest printed.
    pub fn tail(&self, n: usize) -> String {
        self.ring.lock().map(|r| r.tail(n)).unwrap_or_default()
    }

    /// Bytes held now (at most [`CONSOLE_RING`]).
    pub fn held(&self) -> usize {
        self.ring.lock().map(|r| r.held()).unwrap_or(0)
    }

    /// Bytes the guest printed in all.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_ring_keeps_the_newest_bytes_within_its_bound() {
        let mut r = Ring::new(10);
        r.push(b"a\nb\n");
        assert_eq!(r.tail(5), "a\nb");
        r.push(b"0123456789\nxyz\n");
        assert!(r.held() <= 10);
        assert_eq!(r.tail(1), "xyz");
        r.push(&[b'q'; 1000]);
        assert_eq!(r.held(), 10);
    }

    #[test]
    fn log_lines_are_limited_to_a_burst_and_a_rate_and_the_rest_counted() {
        let mut l = RateLimiter::new(10);
        let t0 = std::time::Instant::now();
        let allowed = (0..100).filter(|_| l.allow(t0).is_some()).count();
        assert_eq!(allowed, 10, "a burst of the rate");
        // Half a second later: five more, the first reporting the 90 suppressed.
        let t1 = t0 + std::time::Duration::from_millis(500);
        assert_eq!(l.allow(t1), Some(90));
        assert_eq!((0..10).filter(|_| l.allow(t1).is_some()).count(), 4);
        // A quiet minute refills only up to the burst.
        let t2 = t1 + std::time::Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| l.allow(t2).is_some()).count(), 10);
    }

    #[tokio::test]
    async fn a_flooding_guest_costs_a_fixed_amount_of_memory() {
        let dir = std::env::temp_dir().join(format!("vmbox-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("con.sock");
        let console = Console::listen(&path, "test").unwrap();
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let line = [b'x'; 1023];
        for _ in 0..4096 {
            s.write_all(&line).await.unwrap();
            s.write_all(b"\n").await.unwrap();
        }
        s.write_all(b"the end\n").await.unwrap();
        drop(s);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while console.tail(1) != "the end" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the console never showed the last line"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(console.held() <= CONSOLE_RING, "{} bytes held", console.held());
        assert_eq!(console.received(), 4096 * 1024 + 8);
        drop(console);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
