//! Netlink work inside a network namespace, on a thread of its own.
//!
//! `setns(2)` moves only the calling thread, and tokio moves tasks between its workers at
//! every `.await`, so namespace work never runs on a runtime's worker: [`run_in`] starts an
//! OS thread, enters the namespace there, runs a current-thread runtime with a netlink
//! connection made inside the namespace (a netlink socket, like a tap, stays bound to the
//! namespace it was made in), and the thread ends with the job.

use std::future::Future;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::CloneFlags;

use crate::NetworkError;

/// Runs the blocking `job` on a new thread inside the network namespace `ns` (an open
/// `/proc/<pid>/ns/net` or bind mount, opened while it was known to be the right one;
/// sockets the job makes stay in that namespace whichever thread uses them later).
/// Blocks the caller until the job is done.
pub fn run_blocking_in_file<T: Send + 'static>(
    ns: &std::fs::File,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetworkError> {
    let f = ns
        .try_clone()
        .map_err(NetworkError::io("duplicate a network namespace fd"))?;
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Netns {
                path: "(held namespace)".into(),
                source: e.into(),
            })?;
            Ok(job())
        })
        .map_err(NetworkError::io("start a thread for a network namespace"))?
        .join()
        .map_err(|_| NetworkError::Invalid("the network namespace thread panicked".into()))?
}

/// Runs `job` with a netlink handle inside the network namespace at `path` (a bind mount
/// such as `/var/run/netns/cni-...`, or `/proc/<pid>/ns/net`); `None` runs it in the
/// calling process's own namespace. Blocks the caller until the job is done: call it
/// off the async workers. Fails naming `path` when it cannot be entered.
pub fn run_in<T, F, Fut>(path: Option<&Path>, job: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let ns = match path {
        Some(p) => Some((
            std::fs::File::open(p).map_err(|source| NetworkError::Netns { path: p.into(), source })?,
            p.to_path_buf(),
        )),
        None => None,
    };
    let thread = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            if let Some((f, p)) = &ns {
                nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Netns {
                    path: p.clone(),
                    source: e.into(),
                })?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(NetworkError::io("start a runtime for netlink"))?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(NetworkError::io("open a netlink socket"))?;
                let conn = tokio::spawn(conn);
                let r = job(handle).await;
                conn.abort();
                r
            })
        })
        .map_err(NetworkError::io("start a thread for netlink"))?;
    thread
        .join()
        .map_err(|_| NetworkError::Invalid("the netlink thread panicked".into()))?
}
