//! The container-setup zygote: a single-threaded copy of the agent, forked before the
//! async runtime starts, that forks one helper per libcontainer request.
//!
//! Re-executing the agent for every create and exec (`/proc/self/exe helper`) costs an
//! exec of a 6 MB static binary: its relocation, its page faults and, under TCG, the
//! translation of all the code it runs again, since a new image lands at new addresses.
//! A fork of the zygote keeps the address space, so translated code stays valid and
//! nothing is loaded. The helper is still a fresh single-threaded process (the field's
//! lesson: never clone from a multithreaded one), and its work is exactly the exec'd
//! helper's ([`crate::engine::serve_helper`]).
//!
//! Container processes must be children of PID 1, where the one reaper collects them
//! (libcontainer's `as_sibling` makes them siblings of the helper). So the zygote forks
//! twice: an intermediate forks the helper and exits at once, and the orphaned helper is
//! re-parented to PID 1 before the zygote reports its pid, i.e. before the agent sends it
//! a request. The zygote waits only for its own intermediates.
//!
//! Protocol on the control socket (SOCK_SEQPACKET, one request at a time): the agent
//! sends one byte with the helper's request socket attached (SCM_RIGHTS); the zygote
//! answers with 4 bytes, the helper's pid (native endian), or a negative errno.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::unistd::{fork, ForkResult};

use crate::engine::retry_eintr;

/// How long the agent waits for the zygote's answer (a double fork) before it falls back
/// to executing a helper.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's end of the zygote. Requests are serialized: the zygote serves one at a time.
pub struct Zygote {
    /// `None` once an exchange failed half-way: a late answer would otherwise be read as
    /// the next request's pid, so the agent executes helpers from then on.
    control: Mutex<Option<OwnedFd>>,
}

impl Zygote {
    /// Forks the zygote.
    ///
    /// # Safety
    /// This process must have exactly one thread: the child runs on after the fork.
    ///
    /// Errors: the socketpair or the fork failed (the agent then executes helpers).
    pub unsafe fn start() -> nix::Result<Zygote> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: the caller guarantees a single thread, so the child's copy of every lock
        // is consistent; the child never returns from `serve`.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(ours);
                serve(&theirs);
                // SAFETY: leaves the zygote without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { .. } => {
                drop(theirs);
                Ok(Zygote {
                    control: Mutex::new(Some(ours)),
                })
            }
        }
    }

    /// Has a helper forked that serves requests on `sock`; returns its pid. The helper is
    /// a child of this process (PID 1) by the time this returns.
    ///
    /// Errors: the zygote could not fork (its errno); or it is gone, did not answer within
    /// [`ANSWER_TIMEOUT`], or answered garbage, after which it is not asked again.
    pub fn spawn(&self, sock: OwnedFd) -> std::io::Result<i32> {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let Some(fd) = control.as_ref() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the zygote failed before; helpers are executed",
            ));
        };
        match exchange(fd, sock) {
            Ok(Ok(pid)) => Ok(pid),
            Ok(Err(errno)) => Err(std::io::Error::from(errno)),
            Err(e) => {
                // Closing our end also ends the zygote (EOF).
                *control = None;
                Err(e)
            }
        }
    }
}

/// One request: sends `sock`, reads the answer. The outer error means the exchange broke
/// off (the protocol may be out of step); the inner one is the zygote's failed fork.
fn exchange(control: &OwnedFd, sock: OwnedFd) -> std::io::Result<Result<i32, nix::errno::Errno>> {
    let raw = [sock.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    retry_eintr(|| {
        sendmsg::<()>(
            control.as_raw_fd(),
            &[IoSlice::new(b"h")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
    })?;
    drop(sock);
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    let mut answer = [0u8; 4];
    let n = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the zygote did not answer in time",
            ));
        }
        // A signal fails a read that has a timeout with EINTR (signal(7)): go on with
        // what is left of the deadline.
        let timeout = nix::sys::time::TimeVal::new(left.as_secs() as i64, left.subsec_micros() as i64);
        nix::sys::socket::setsockopt(&control.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        match nix::unistd::read(control.as_raw_fd(), &mut answer) {
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            r => break r?,
        }
    };
    if n != answer.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the zygote closed its control socket",
        ));
    }
    Ok(match i32::from_ne_bytes(answer) {
        pid if pid > 0 => Ok(pid),
        e => Err(nix::errno::Errno::from_raw(-e)),
    })
}

/// The zygote's loop: one helper per message, until the agent's end closes (or fails).
fn serve(control: &OwnedFd) {
    loop {
        let answer = match receive_fd(control) {
            Ok(Some(Ok(sock))) => match fork_helper(control, sock) {
                Ok(pid) => pid,
                Err(e) => -(e as i32),
            },
            // A message without exactly one descriptor still gets its answer.
            Ok(Some(Err(e))) => -(e as i32),
            Ok(None) | Err(_) => return,
        };
        let _ = retry_eintr(|| nix::unistd::write(control, &answer.to_ne_bytes()));
    }
}

/// Receives one message and the fd attached to it: `None` when the agent's end is closed,
/// `Some(Err(EINVAL))` for a message that does not carry exactly one descriptor.
fn receive_fd(control: &OwnedFd) -> nix::Result<Option<nix::Result<OwnedFd>>> {
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let msg = loop {
        match recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if msg.bytes == 0 {
        return Ok(None);
    }
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: SCM_RIGHTS gave us fresh descriptors that nobody else owns.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    // Extra descriptors are closed with `fds`.
    Ok(Some(if fds.len() == 1 {
        fds.pop().ok_or(nix::errno::Errno::EINVAL)
    } else {
        Err(nix::errno::Errno::EINVAL)
    }))
}

/// Double fork: the intermediate forks the helper and exits; the helper, orphaned, becomes
/// PID 1's child. Returns the helper's pid once the intermediate is reaped.
fn fork_helper(control: &OwnedFd, sock: OwnedFd) -> nix::Result<i32> {
    let (pid_r, pid_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the zygote is single-threaded.
    match unsafe { fork() }? {
        ForkResult::Child => {
            // SAFETY: still single-threaded; neither branch returns.
            let code = match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    // SAFETY: closing descriptors this process owns and does not use again.
                    unsafe {
                        libc::close(control.as_raw_fd());
                        libc::close(pid_r.as_raw_fd());
                        libc::close(pid_w.as_raw_fd());
                    }
                    // The same descriptors as an executed helper: the request socket on
                    // stdin, /dev/null on stdout (what a container without them inherits).
                    match as_stdio(sock) {
                        Ok(sock) => crate::engine::serve_helper(sock),
                        Err(_) => 1,
                    }
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = nix::unistd::write(&pid_w, &child.as_raw().to_ne_bytes());
                    0
                }
                Err(_) => 1,
            };
            // SAFETY: leaves without the parent's exit handlers (nothing of theirs is ours).
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(pid_w);
            drop(sock);
            let mut buf = [0u8; 4];
            let n = retry_eintr(|| nix::unistd::read(pid_r.as_raw_fd(), &mut buf));
            // The intermediate has exited (or is about to): its helper is PID 1's now.
            let _ = retry_eintr(|| nix::sys::wait::waitpid(child, None));
            match n {
                Ok(4) => Ok(i32::from_ne_bytes(buf)),
                Ok(_) => Err(nix::errno::Errno::ECHILD),
                Err(e) => Err(e),
            }
        }
    }
}

/// Puts `sock` on fd 0 and /dev/null on fd 1, as `exec_helper` in engine.rs does; returns
/// the socket, now fd 0.
fn as_stdio(sock: OwnedFd) -> nix::Result<UnixStream> {
    let null = nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_WRONLY, nix::sys::stat::Mode::empty())?;
    retry_eintr(|| nix::unistd::dup2(null, 1))?;
    if null != 1 {
        let _ = nix::unistd::close(null);
    }
    if sock.as_raw_fd() != 0 {
        retry_eintr(|| nix::unistd::dup2(sock.as_raw_fd(), 0))?;
        drop(sock);
    } else {
        // Already fd 0: keep it open across the conversion below.
        std::mem::forget(sock);
    }
    // SAFETY: fd 0 is the request socket now, owned by nobody else.
    Ok(unsafe { UnixStream::from_raw_fd(0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The test process is multithreaded, so the zygote runs here in a child of a forked
    /// copy of the test's main thread only; helpers are the test's grandchildren and the
    /// test only talks to them.
    #[test]
    fn a_helper_from_the_zygote_serves_its_socket() {
        let (control, zygote_end) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("control");
        // SAFETY: the child only runs the zygote loop (raw syscalls and fork) and _exits.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // Only the control socket stays open (as fd 3): copies of other tests'
                // descriptors would keep their sockets open.
                let fd = zygote_end.as_raw_fd();
                std::mem::forget(control);
                std::mem::forget(zygote_end);
                // SAFETY: this child owns its descriptor table; nothing uses the closed ones.
                let end = unsafe {
                    libc::dup2(fd, 3);
                    libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                    OwnedFd::from_raw_fd(3)
                };
                serve(&end);
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop(zygote_end);
                let z = Zygote {
                    control: Mutex::new(Some(control)),
                };
                // Made after the fork: the zygote must hold no copy of the helper's end.
                let (ours, theirs) = UnixStream::pair().expect("socketpair");
                let pid = z.spawn(OwnedFd::from(theirs)).expect("spawn");
                assert!(pid > 0);
                // A request the helper rejects: it answers with an error line and exits.
                (&ours).write_all(b"{\"op\":\"nonsense\"}\n").expect("request");
                ours.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
                let mut reply = String::new();
                (&ours).read_to_string(&mut reply).expect("reply, then EOF within 20 s");
                assert!(reply.contains("bad request"), "{reply}");
                drop(z);
                let status = nix::sys::wait::waitpid(child, None).expect("zygote exit");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
