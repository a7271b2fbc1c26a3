//! A process's stdio on the host: containerd's FIFOs (or `file://` / `binary://` log
//! URIs) connected to the vsock streams the agent ties to the process.
//!
//! - stdin: FIFO -> stream. The FIFO is opened non-blocking and read through epoll, which
//!   reports nothing until a writer has connected (Linux reports hang-up on a FIFO only
//!   once a writer came and went), so no thread ever sits in a blocking open waiting for
//!   a client that may never come (such threads once kept a shim alive for ever, as the
//!   runtime's exit waits for blocking threads). The copy ends at the client's EOF, on
//!   CloseIO (after draining what is buffered), or when aborted.
//! - No open here can block: output FIFOs are opened read-write, `file://` logs with
//!   O_NONBLOCK, a `binary://` logger's readiness is awaited asynchronously with a deadline.
//! - stdout/stderr: stream -> sink until the agent closes the stream, which it does once
//!   the process's pipe is drained; only then is the sink closed.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use vmbox_hypervisor::Conn;

use crate::error::ShimError;

/// Where containerd wants a process's stdio.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// The sink of an output stream.
enum Sink {
    Fifo(pipe::Sender),
    File(tokio::fs::File),
}

/// The host's ends of a process's stdio, opened before the guest is asked for anything
/// (a log URI in a missing directory fails the request before the guest creates a thing).
pub struct HostStdio {
    stdin: Option<pipe::Receiver>,
    stdout: Option<(Sink, String)>,
    stderr: Option<(Sink, String)>,
}

impl HostStdio {
    /// Opens what `paths` names: the stdin FIFO, and the stdout/stderr sinks (stderr is
    /// unused with a terminal).
    pub async fn open(paths: &StdioPaths, container_id: &str, namespace: &str) -> Result<HostStdio, ShimError> {
        let stdin = match paths.stdin.is_empty() {
            true => None,
            false => Some(open_fifo_reader(Path::new(&paths.stdin))?),
        };
        let mut logger: Option<BinaryLogger> = None;
        let mut sinks = [None, None];
        let wanted = [(&paths.stdout, true), (&paths.stderr, !paths.terminal)];
        for (i, (uri, want)) in wanted.into_iter().enumerate() {
            if uri.is_empty() || !want {
                continue;
            }
            let sink = if let Some(rest) = uri.strip_prefix("binary://") {
                if logger.is_none() {
                    logger = Some(BinaryLogger::spawn(rest, container_id, namespace).await?);
                }
                let fd = logger.as_mut().and_then(|l| l.take_writer(i));
                let fd = fd.ok_or_else(|| ShimError::Internal(format!("log uri {uri}: no writer")))?;
                Sink::Fifo(pipe::Sender::from_owned_fd(fd).map_err(ShimError::io("log pipe"))?)
            } else if let Some(path) = uri.strip_prefix("file://") {
                // O_NONBLOCK: a FIFO named as a log file fails at once instead of
                // blocking until a reader comes.
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .custom_flags(libc::O_NONBLOCK)
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
            sinks[i] = Some((sink, uri.clone()));
        }
        let [stdout, stderr] = sinks;
        Ok(HostStdio { stdin, stdout, stderr })
    }

    /// Starts the copy loops between the host's ends and the process's streams (`None`
    /// where no stream was opened).
    pub fn connect(self, stdin: Option<Conn>, stdout: Option<Conn>, stderr: Option<Conn>) -> ProcessIo {
        let mut io = ProcessIo {
            stdin_close: None,
            stdin_task: None,
            outputs: Vec::new(),
        };
        if let (Some(rx), Some(conn)) = (self.stdin, stdin) {
            let close = Arc::new(Notify::new());
            io.stdin_close = Some(close.clone());
            io.stdin_task = Some(tokio::spawn(copy_stdin(rx, conn, close)));
        }
        for (sink, conn) in [(self.stdout, stdout), (self.stderr, stderr)] {
            if let (Some((sink, uri)), Some(conn)) = (sink, conn) {
                io.outputs.push(tokio::spawn(copy_output(conn, sink, uri)));
            }
        }
        io
    }
}

impl ProcessIo {
    /// Ends stdin once what the client wrote is forwarded.
    pub fn close_stdin(&self) {
        if let Some(c) = &self.stdin_close {
            c.notify_one();
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

/// Opens a stdin FIFO for reading without waiting for its writer (see the module doc).
pub fn open_fifo_reader(path: &Path) -> Result<pipe::Receiver, ShimError> {
    pipe::OpenOptions::new()
        .open_receiver(path)
        .map_err(ShimError::io(format!("open stdin fifo {}", path.display())))
}

async fn copy_stdin(mut rx: pipe::Receiver, mut conn: Conn, close: Arc<Notify>) {
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
    /// The write ends of its stdout (0) and stderr (1) pipes.
    writers: [Option<OwnedFd>; 2],
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
        // SAFETY: only fcntl and dup2 between fork and exec, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // Every source moves above 3-5 first, so no dup2 below overwrites a
                // source still to be moved (a pipe may sit at 3, 4 or 5 already).
                let mut high = [0; 3];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // dup2 onto a different fd clears close-on-exec on the copy.
                for (i, fd) in high.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(ShimError::io(format!("start log binary {path}")))?;
        let pid = child.id();
        // Its exit is collected by a thread that waits for that pid only.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        drop((out_r, err_r, ready_w));
        // Ready when it closes fd 5 (EOF) or writes to it; awaited without a thread.
        let mut ready = pipe::Receiver::from_owned_fd(ready_r).map_err(ShimError::io("log binary ready pipe"))?;
        let mut b = [0u8; 1];
        let after = std::time::Duration::from_secs(10);
        match tokio::time::timeout(after, ready.read(&mut b)).await {
            Ok(Ok(_)) => Ok(BinaryLogger {
                writers: [Some(out_w), Some(err_w)],
            }),
            Ok(Err(e)) => Err(ShimError::io(format!("log binary {path}: ready pipe"))(e)),
            Err(_) => {
                // Not left behind: its waiter thread reaps it.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Err(ShimError::Timeout {
                    what: format!("log binary {path}'s readiness"),
                    after,
                })
            }
        }
    }

    /// The write end for stdout (0) or stderr (1).
    fn take_writer(&mut self, which: usize) -> Option<OwnedFd> {
        self.writers.get_mut(which).and_then(|w| w.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn fifo(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmbox-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    #[tokio::test]
    async fn a_stdin_fifo_opens_at_once_and_waits_for_its_writer() {
        let p = fifo("wait");
        // Returns without a writer (a blocking open would hang here).
        let mut rx = open_fifo_reader(&p).unwrap();
        let mut buf = [0u8; 16];
        // No writer yet: no data and no EOF.
        let early = tokio::time::timeout(Duration::from_millis(200), rx.read(&mut buf)).await;
        assert!(early.is_err(), "read returned {early:?} before any writer came");
        let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        w.write_all(b"hi").unwrap();
        drop(w);
        let n = tokio::time::timeout(Duration::from_secs(5), rx.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"hi");
        let n = tokio::time::timeout(Duration::from_secs(5), rx.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "EOF once the writer left");
        std::fs::remove_file(&p).unwrap();
    }

    #[tokio::test]
    async fn a_writer_that_never_comes_leaves_no_thread_behind() {
        // The shim's exit waits for blocking threads; a stdin copy must hold none.
        let p = fifo("never");
        let rx = open_fifo_reader(&p).unwrap();
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let close = Arc::new(Notify::new());
        let task = tokio::spawn(copy_stdin(rx, Conn::Unix(a), close.clone()));
        close.notify_one();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("CloseIO ends a stdin copy whose writer never came")
            .unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}
