//! A process's stdio on the host: containerd's FIFOs (or `file://` / `binary://` log
//! URIs) connected to the vsock streams the agent ties to the process.
//!
//! - stdin: FIFO -> stream. The FIFO is opened blocking-for-a-writer in a helper thread
//!   (opening non-blocking would read EOF before the client connects); the copy ends at
//!   the client's EOF, or on CloseIO (after draining what is buffered), or on shutdown.
//! - stdout/stderr: stream -> sink until the agent closes the stream, which it does once
//!   the process's pipe is drained; only then is the sink closed.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use vmbox_hypervisor::Conn;

use crate::error::ShimError;

/// Where containerd wants a process's stdio.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running copy loops of one process.
pub struct ProcessIo {
    stdin_close: Option<Arc<Notify>>,
    stdin_task: Option<JoinHandle<()>>,
    outputs: Vec<JoinHandle<()>>,
    fifo_unblock: Option<PathBuf>,
}

/// The sink of an output stream.
enum Sink {
    Fifo(pipe::Sender),
    File(tokio::fs::File),
}

impl ProcessIo {
    /// Starts the loops. `stdin`/`stdout`/`stderr` are the streams opened for the paths
    /// that are set (stderr unused with a terminal).
    pub async fn start(
        paths: &StdioPaths,
        stdin: Option<Conn>,
        stdout: Option<Conn>,
        stderr: Option<Conn>,
        container_id: &str,
        namespace: &str,
    ) -> Result<ProcessIo, ShimError> {
        let mut io = ProcessIo {
            stdin_close: None,
            stdin_task: None,
            outputs: Vec::new(),
            fifo_unblock: None,
        };
        if let Some(conn) = stdin {
            let close = Arc::new(Notify::new());
            io.stdin_close = Some(close.clone());
            io.fifo_unblock = Some(PathBuf::from(&paths.stdin));
            io.stdin_task = Some(tokio::spawn(copy_stdin(PathBuf::from(&paths.stdin), conn, close)));
        }
        let mut logger = None;
        for (conn, uri) in [(stdout, &paths.stdout), (stderr, &paths.stderr)] {
            let Some(conn) = conn else { continue };
            let sink = if let Some(rest) = uri.strip_prefix("binary://") {
                if logger.is_none() {
                    logger = Some(BinaryLogger::spawn(rest, container_id, namespace).await?);
                }
                let l = logger.as_mut().map(|l| l.take_writer()).unwrap_or(None);
                let fd = l.ok_or_else(|| ShimError::Invalid(format!("log uri {uri}: no writer")))?;
                Sink::Fifo(pipe::Sender::from_owned_fd(fd).map_err(ShimError::io("log pipe"))?)
            } else if let Some(path) = uri.strip_prefix("file://") {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(ShimError::io(format!("open log file {path}")))?;
                Sink::File(f)
            } else {
                // Read-write: opening never blocks, and we are a writer for as long as we
                // hold it, so the reader sees EOF exactly when we close it.
                let s = pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(uri)
                    .map_err(ShimError::io(format!("open stdio fifo {uri}")))?;
                Sink::Fifo(s)
            };
            io.outputs.push(tokio::spawn(copy_output(conn, sink, uri.clone())));
        }
        Ok(io)
    }

    /// Ends stdin once what the client wrote is forwarded.
    pub fn close_stdin(&self) {
        if let Some(c) = &self.stdin_close {
            c.notify_one();
        }
        // A stdin FIFO nobody opened keeps the opener thread blocked: open it ourselves.
        if let Some(p) = &self.fifo_unblock {
            let _ = pipe::OpenOptions::new().open_sender(p);
        }
    }

    /// Waits until stdout and stderr are drained into their sinks.
    pub async fn wait_outputs(&mut self) {
        for t in self.outputs.drain(..) {
            let _ = t.await;
        }
    }

    /// Stops every loop now (shutdown, delete).
    pub fn abort(&mut self) {
        self.close_stdin();
        for t in self.outputs.iter().chain(self.stdin_task.iter()) {
            t.abort();
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn copy_stdin(path: PathBuf, mut conn: Conn, close: Arc<Notify>) {
    let p = path.clone();
    let opened = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().read(true).open(&p)).await;
    let file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return log::warn!("stdin fifo {}: {e}", path.display()),
        Err(_) => return,
    };
    let mut rx = match pipe::Receiver::from_owned_fd(OwnedFd::from(file)) {
        Ok(rx) => rx,
        Err(e) => return log::warn!("stdin fifo {}: {e}", path.display()),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = false;
    loop {
        let n = if closing {
            // Drain what is already buffered, without waiting for more.
            rx.try_read(&mut buf).unwrap_or(0)
        } else {
            tokio::select! {
                r = rx.read(&mut buf) => r.unwrap_or(0),
                _ = close.notified() => { closing = true; continue; }
            }
        };
        if n == 0 {
            break;
        }
        if let Err(e) = conn.write_all(&buf[..n]).await {
            log::debug!("stdin stream: {e}");
            break;
        }
    }
    // Closing the stream is the process's EOF.
    let _ = conn.shutdown().await;
}

async fn copy_output(mut conn: Conn, sink: Sink, what: String) {
    let r = match sink {
        Sink::Fifo(mut s) => copy(&mut conn, &mut s).await,
        Sink::File(mut f) => copy(&mut conn, &mut f).await,
    };
    if let Err(e) = r {
        log::debug!("output {what}: {e}");
    }
}

async fn copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) -> std::io::Result<u64> {
    let n = tokio::io::copy(r, w).await?;
    w.flush().await?;
    Ok(n)
}

/// A `binary://` logging driver: containerd's protocol gives it the read ends of stdout
/// and stderr pipes as fds 3 and 4 and a "ready" pipe as fd 5, which it closes when set up.
struct BinaryLogger {
    writers: Vec<OwnedFd>,
}

impl BinaryLogger {
    async fn spawn(rest: &str, container_id: &str, namespace: &str) -> Result<BinaryLogger, ShimError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !Path::new(path).is_file() {
            return Err(ShimError::Invalid(format!("log binary {path} does not exist")));
        }
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::io("pipe")(e.into()))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::io("pipe")(e.into()))?;
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::io("pipe")(e.into()))?;
        let mut cmd = std::process::Command::new(path);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some((k, v)) => cmd.arg(format!("{k}={v}")),
                None => cmd.arg(kv),
            };
        }
        cmd.env("CONTAINER_ID", container_id)
            .env("CONTAINER_NAMESPACE", namespace);
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        // SAFETY: only dup2 between fork and exec, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ShimError::io(format!("start log binary {path}")))?;
        // Its exit is collected by a thread that waits for that pid only.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        drop((out_r, err_r, ready_w));
        let wait_ready = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::from(ready_r);
            let mut b = [0u8; 1];
            let _ = std::io::Read::read(&mut f, &mut b);
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), wait_ready)
            .await
            .map_err(|_| ShimError::Invalid(format!("log binary {path} did not get ready within 10 s")))?
            .map_err(|e| ShimError::Invalid(format!("log binary {path}: {e}")))?;
        Ok(BinaryLogger {
            writers: vec![err_w, out_w],
        })
    }

    fn take_writer(&mut self) -> Option<OwnedFd> {
        self.writers.pop()
    }
}
