//! The one place that talks to youki's libcontainer.
//!
//! libcontainer clones processes with a raw clone3. Doing that from the agent's
//! multithreaded tokio process can hand the child a lock another thread held (seen:
//! hangs on the second container). So every libcontainer call runs in a short-lived,
//! single-threaded helper: the agent re-executes itself (`/proc/self/exe helper`), sends
//! one [`Request`] plus the stdio fds (SCM_RIGHTS) over the helper's stdin socket, and
//! reads one [`Response`] line back. The helper builds with `as_sibling(true)`, so
//! container processes become children of the agent, where the one reaper finds them.
//! The helper's own exit is collected by that reaper too: nothing here calls `wait`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::reaper::Reaper;
use crate::zygote::Zygote;

/// libcontainer's state directory in the guest.
pub const STATE_ROOT: &str = "/run/vmbox/containers";
/// Upper bound of a request or reply line.
const MAX_LINE: usize = 1 << 20;
/// A helper that has not answered by then is broken.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create the container of bundle `bundle`; fds: the present stdio, in order.
    Create {
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: [bool; 3],
    },
    Start {
        id: String,
    },
    /// Exec the OCI process in file `process` inside container `id`.
    Exec {
        id: String,
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: [bool; 3],
    },
    Kill {
        id: String,
        signal: i32,
        all: bool,
    },
    Delete {
        id: String,
        force: bool,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub pid: Option<i32>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("libcontainer: {0}")]
    Container(String),
    #[error("container helper: {0}")]
    Helper(String),
}

/// Runs requests in helpers.
/// Helpers running at once; more only thrash a small VM's vCPUs (each is a fork/exec of
/// the agent and a container setup), so requests beyond it queue here.
const MAX_HELPERS: usize = 4;

#[derive(Clone)]
pub struct Engine {
    reaper: Reaper,
    zygote: Option<Arc<Zygote>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Engine {
    /// `zygote`: forks helpers ([`Zygote`]); without it (or when it fails) each helper is
    /// an exec of the agent.
    pub fn new(reaper: Reaper, zygote: Option<Arc<Zygote>>) -> Engine {
        Engine {
            reaper,
            zygote,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_HELPERS)),
        }
    }

    /// Runs `req` in a fresh helper, passing `fds` along; returns the pid it reports.
    pub async fn run(&self, req: Request, fds: Vec<OwnedFd>) -> Result<Option<i32>, EngineError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| EngineError::Helper(e.to_string()))?;
        let helper_err = |what: &str, e: &dyn std::fmt::Display| EngineError::Helper(format!("{what}: {e}"));
        let since = self.reaper.mark();
        let (ours, helper_pid) = match self.fork_helper().await {
            Ok(forked) => forked,
            Err(e) => {
                log::warn!("container helper from the zygote: {e}; executing one instead");
                exec_helper().map_err(|e| helper_err("spawn /proc/self/exe helper", &e))?
            }
        };
        let helper_pid = nix::unistd::Pid::from_raw(helper_pid);
        let exited = self.reaper.watch(helper_pid.as_raw(), since);
        let line = serde_json::to_vec(&req).map_err(|e| helper_err("encode request", &e))?;
        let talk = tokio::task::spawn_blocking(move || -> (Result<Response, EngineError>, bool) {
            if let Err(e) = send_with_fds(&ours, &line, &fds) {
                return (Err(helper_err("send request", &e)), false);
            }
            drop(fds);
            let deadline = std::time::Instant::now() + HELPER_TIMEOUT;
            match read_line(&ours, deadline) {
                Ok(reply) => (
                    serde_json::from_slice(&reply).map_err(|e| helper_err("decode reply", &e)),
                    false,
                ),
                Err(e) => (
                    Err(helper_err("read reply", &e)),
                    e.kind() == std::io::ErrorKind::TimedOut,
                ),
            }
        });
        let (reply, stuck) = talk.await.map_err(|e| helper_err("join", &e))?;
        if stuck {
            // A helper that did not answer in time must not hold a slot (and its container
            // half-made) for another HELPER_TIMEOUT. It is alive, or exited this very
            // moment (its pid reused before this kill would take a pid_max cycle).
            let _ = nix::sys::signal::kill(helper_pid, nix::sys::signal::Signal::SIGKILL);
        }
        let exit = tokio::time::timeout(HELPER_TIMEOUT, exited)
            .await
            .map_err(|_| EngineError::Helper("did not exit".into()))?
            .map_err(|_| EngineError::Helper("reaper gone".into()))?;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => return Err(EngineError::Helper(format!("{e} (helper exit status {})", exit.status))),
        };
        match reply.error {
            Some(e) => Err(EngineError::Container(e)),
            None => Ok(reply.pid),
        }
    }

    /// A helper forked by the zygote: our end of its request socket and its pid.
    async fn fork_helper(&self) -> std::io::Result<(UnixStream, i32)> {
        let zygote = self
            .zygote
            .clone()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no zygote"))?;
        let (ours, theirs) = UnixStream::pair()?;
        let pid = tokio::task::spawn_blocking(move || zygote.spawn(OwnedFd::from(theirs)))
            .await
            .map_err(std::io::Error::other)??;
        Ok((ours, pid))
    }
}

/// A helper executed afresh (`/proc/self/exe helper`): our end of its socket and its pid.
fn exec_helper() -> std::io::Result<(UnixStream, i32)> {
    let (ours, theirs) = UnixStream::pair()?;
    let child = std::process::Command::new("/proc/self/exe")
        .arg("helper")
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    // Dropping a std Child neither kills nor waits: the reaper collects it.
    drop(child);
    Ok((ours, pid))
}

fn send_with_fds(sock: &UnixStream, line: &[u8], fds: &[OwnedFd]) -> nix::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut buf = line.to_vec();
    buf.push(b'\n');
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let mut sent =
        retry_eintr(|| sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&buf)], cmsgs, MsgFlags::empty(), None))?;
    while sent < buf.len() {
        sent += retry_eintr(|| nix::unistd::write(sock, &buf[sent..]))?;
    }
    Ok(())
}

/// Calls `f` again while it fails with EINTR. The agent handles SIGCHLD (its reaper), so
/// any blocking call may be interrupted by a child's exit; SA_RESTART does not cover
/// every call (a socket read with a timeout, for one: signal(7)).
pub fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// Reads up to a newline (bounded, [`MAX_LINE`]) until `deadline`; the peer may keep the
/// socket open afterwards. A signal does not end the wait (Linux fails a socket read that
/// has a timeout with EINTR even under SA_RESTART); the timeout is renewed to what is left.
///
/// Errors: `TimedOut` at the deadline, `UnexpectedEof` if the peer closes first,
/// `InvalidData` past [`MAX_LINE`], or the read's own error.
fn read_line(mut sock: &UnixStream, deadline: std::time::Instant) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply in time"));
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.read(&mut b) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a reply",
            ));
        }
        out.extend_from_slice(&b[..n]);
        if let Some(i) = out.iter().position(|c| *c == b'\n') {
            out.truncate(i);
            return Ok(out);
        }
        if out.len() > MAX_LINE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "reply too long"));
        }
    }
}

/// libcontainer names an exec's notify socket `tenant-notify-<fastrand>.sock` after checking
/// that no such file exists, and fastrand seeds itself from the monotonic clock and the
/// thread id. Helpers started together in a guest whose clocksource fell back to jiffies
/// (TSC calibration can fail under emulation) get the same seed, pick the same name, and
/// all but one fail to bind. Seed from the kernel's random pool and the helper's pid,
/// which concurrent helpers never share.
fn seed_names() {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    let random = if n == buf.len() as isize {
        u64::from_ne_bytes(buf)
    } else {
        0
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    fastrand::seed(random ^ nanos.rotate_left(17) ^ ((std::process::id() as u64) << 40));
}

/// Upper bound of the failure detail collected from libcontainer's log events.
const MAX_DETAIL: usize = 8 * 1024;

/// libcontainer reports a failure inside the processes it clones (the intermediate and
/// the container's init) as a bare top-level message over its channel ("failed to unix
/// syscall"), without errno or path; those are only in the tracing error events it logs
/// where the failure happened. The helper sends its own and its clones' error events
/// (the clones inherit the pipe) to a pipe, and adds them to the error it reports.
/// Both ends are non-blocking: a full pipe drops events, it never stalls a container.
fn capture_failure_details() -> Option<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).ok()?;
    // The write end lives as long as the helper (and its clones, until they exec).
    let fd = std::os::fd::IntoRawFd::into_raw_fd(write);
    tracing_subscriber::fmt()
        .with_writer(move || PipeWriter(fd))
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_level(false)
        .try_init()
        .ok()?;
    Some(read)
}

/// One formatted event per write (tracing-subscriber buffers each event), so lines from
/// several processes do not interleave.
struct PipeWriter(RawFd);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writes at most buf.len() bytes from a valid buffer to an fd we own.
        let _ = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        // Dropped when the pipe is full: details are best effort.
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The distinct lines waiting in the detail pipe, joined, at most [`MAX_DETAIL`] bytes.
fn failure_details(read: &OwnedFd) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while text.len() < MAX_DETAIL {
        match retry_eintr(|| nix::unistd::read(read.as_raw_fd(), &mut buf)) {
            Ok(n) if n > 0 => text.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&text);
    let mut lines: Vec<&str> = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !lines.contains(&l) {
            lines.push(l);
        }
    }
    let mut out = lines.join("; ");
    if out.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// An error with every cause in its chain ("a: b: c"), skipping causes its message
/// already contains.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !m.is_empty() && !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

/// The executed helper (`vmbox-agent helper`): serves the request socket on its stdin.
pub fn helper_main() -> i32 {
    // SAFETY: fd 0 is the request socket the agent gave us; we own it from here on.
    serve_helper(unsafe { UnixStream::from_raw_fd(0) })
}

/// A helper's work, executed or forked by the zygote: reads one request from `sock`, runs
/// it, answers, and returns the exit code. Runs in a process with one thread, and never
/// starts another.
pub fn serve_helper(sock: UnixStream) -> i32 {
    seed_names();
    let details = capture_failure_details();
    let reply = match receive(&sock) {
        Ok((req, fds)) => match execute(req, fds) {
            Ok(pid) => Response { pid, error: None },
            Err(e) => {
                let detail = details.as_ref().map(failure_details).unwrap_or_default();
                Response {
                    pid: None,
                    error: Some(if detail.is_empty() || e.contains(&detail) {
                        e
                    } else {
                        format!("{e} ({detail})")
                    }),
                }
            }
        },
        Err(e) => Response {
            pid: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"error\":\"encode reply\"}".to_vec());
    line.push(b'\n');
    match (&sock).write_all(&line) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn receive(sock: &UnixStream) -> Result<(Request, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // Not retry_eintr: the message borrows `cmsg`, which a closure cannot hand out.
        let msg = loop {
            match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(|e| format!("recvmsg: {e}"))?,
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| format!("cmsgs: {e}"))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS gave us fresh descriptors that nobody else owns.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(n);
    while !buf.contains(&b'\n') {
        let mut more = [0u8; 4096];
        let m = match (&*sock).read(&mut more) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.map_err(|e| e.to_string())?,
        };
        if m == 0 || buf.len() > MAX_LINE {
            return Err("truncated request".into());
        }
        buf.extend_from_slice(&more[..m]);
    }
    let end = buf.iter().position(|c| *c == b'\n').unwrap_or(buf.len());
    let req = serde_json::from_slice(&buf[..end]).map_err(|e| e.to_string())?;
    Ok((req, fds))
}

fn execute(req: Request, fds: Vec<OwnedFd>) -> Result<Option<i32>, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::container::Container;
    use libcontainer::syscall::syscall::SyscallType;

    let err = |e: libcontainer::error::LibcontainerError| chain(&e);
    let load = |id: &str| Container::load(Path::new(STATE_ROOT).join(id)).map_err(err);
    let builder = |id: &str, console: Option<PathBuf>, stdio: [bool; 3], fds: Vec<OwnedFd>| {
        let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(STATE_ROOT)
            .map_err(err)?
            .with_executor(crate::workload::Workload)
            .with_console_socket(console);
        let mut fds = fds.into_iter();
        for (i, present) in stdio.iter().enumerate() {
            if !present {
                continue;
            }
            let fd = fds.next().ok_or("fewer fds than the request's stdio says")?;
            b = match i {
                0 => b.with_stdin(fd),
                1 => b.with_stdout(fd),
                _ => b.with_stderr(fd),
            };
        }
        Ok::<_, String>(b)
    };
    match req {
        Request::Create {
            id,
            bundle,
            console_socket,
            stdio,
        } => {
            let c = builder(&id, console_socket, stdio, fds)?
                .validate_id()
                .map_err(err)?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(err)?;
            Ok(c.pid().map(|p| p.as_raw()))
        }
        Request::Start { id } => load(&id)?.start().map(|_| None).map_err(err),
        Request::Exec {
            id,
            process,
            console_socket,
            stdio,
        } => {
            let pid = builder(&id, console_socket, stdio, fds)?
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(err)?;
            Ok(Some(pid.as_raw()))
        }
        Request::Kill { id, signal, all } => {
            let sig = libcontainer::signal::Signal::try_from(signal).map_err(|e| e.to_string())?;
            load(&id)?.kill(sig, all).map(|_| None).map_err(err)
        }
        Request::Delete { id, force } => load(&id)?.delete(force).map(|_| None).map_err(err),
        Request::Pause { id } => load(&id)?.pause().map(|_| None).map_err(err),
        Request::Resume { id } => load(&id)?.resume().map(|_| None).map_err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::time::Instant;

    /// Signals handled so far (the handler only counts).
    static HANDLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    extern "C" fn count(_: libc::c_int) {
        HANDLED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The state letter of thread `tid` of this process (`/proc/self/task/<tid>/stat`).
    fn thread_state(tid: i32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next())
            .unwrap_or('?')
    }

    /// CI failure "read reply: Interrupted system call": a child exiting while the agent
    /// waits for a helper's reply interrupts the read (SO_RCVTIMEO reads are not restarted).
    #[test]
    fn a_signal_during_the_reply_wait_does_not_fail_the_request() {
        // SA_RESTART, as tokio's own handlers: the read still fails with EINTR.
        let action = SigAction::new(SigHandler::Handler(count), SaFlags::SA_RESTART, SigSet::empty());
        // SAFETY: the handler does nothing; no other test uses SIGUSR1.
        unsafe { sigaction(Signal::SIGUSR1, &action) }.expect("sigaction");
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send((nix::unistd::gettid().as_raw(), unsafe { libc::pthread_self() }))
                .ok();
            read_line(&ours, Instant::now() + Duration::from_secs(20))
        });
        let (tid, thread) = rx.recv().expect("reader started");
        let before = HANDLED.load(std::sync::atomic::Ordering::SeqCst);
        for round in 0..5 {
            let until = Instant::now() + Duration::from_secs(10);
            // Each signal lands in a read of its own: the previous one was handled and
            // the reader is asleep again.
            while thread_state(tid) != 'S' || HANDLED.load(std::sync::atomic::Ordering::SeqCst) != before + round {
                assert!(Instant::now() < until, "round {round}: reader never blocked in read");
                assert!(!reader.is_finished(), "round {round}: reader returned early");
                std::thread::yield_now();
            }
            // SAFETY: `thread` is alive: the reader has not returned (checked above).
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0, "pthread_kill");
        }
        let until = Instant::now() + Duration::from_secs(10);
        while HANDLED.load(std::sync::atomic::Ordering::SeqCst) != before + 5 {
            assert!(Instant::now() < until, "the fifth signal was never handled");
            std::thread::yield_now();
        }
        theirs.write_all(b"{\"pid\":7}\nrest").expect("reply");
        let line = reader.join().expect("reader panicked").expect("read_line");
        assert_eq!(line, b"{\"pid\":7}");
    }

    #[test]
    fn a_reply_that_never_comes_times_out() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        let err = read_line(&ours, Instant::now() + Duration::from_millis(50)).expect_err("no reply");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
