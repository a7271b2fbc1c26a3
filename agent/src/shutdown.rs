//! Graceful shutdown of the guest: stop containers, flush, power off.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::container::{Containers, SHARED_MOUNT};
use crate::AgentError;

/// SIGTERM every container process, wait up to `grace` for the containers' processes to
/// exit, SIGKILL what is left. Returns how many processes needed SIGKILL.
pub async fn stop_all(containers: &Containers, grace: Duration) -> u32 {
    let (ids, exits) = {
        let map = containers.map.lock().await;
        let ids: Vec<String> = map.keys().cloned().collect();
        let exits: Vec<_> = map
            .values()
            .flat_map(|c| std::iter::once(&c.init).chain(c.execs.values()))
            .map(|p| p.exit_watch())
            .collect();
        (ids, exits)
    };
    let all_exited = || {
        let mut exits = exits.clone();
        async move {
            for rx in exits.iter_mut() {
                let _ = rx.wait_for(|e| e.is_some()).await;
            }
        }
    };
    signal_all(&ids, Signal::SIGTERM);
    if tokio::time::timeout(grace, all_exited()).await.is_ok() {
        return 0;
    }
    let killed = signal_all(&ids, Signal::SIGKILL);
    log::warn!("shutdown: {killed} processes still running after {grace:?}: SIGKILL");
    if tokio::time::timeout(Duration::from_secs(5), all_exited())
        .await
        .is_err()
    {
        log::error!("shutdown: processes survived SIGKILL for 5s");
    }
    killed
}

fn signal_all(ids: &[String], sig: Signal) -> u32 {
    let mut n = 0;
    for id in ids {
        for pid in crate::cgroup::pids(id).unwrap_or_default() {
            if kill(Pid::from_raw(pid as i32), sig).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Writes everything back to the host and unmounts the share.
pub fn flush() -> Result<(), AgentError> {
    nix::unistd::sync();
    match nix::mount::umount2(SHARED_MOUNT, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => Ok(()), // not mounted
        Err(e) => {
            // Still busy (a process we could not kill): detach it, the data is synced.
            log::warn!("umount {SHARED_MOUNT}: {e}; detaching");
            nix::mount::umount2(SHARED_MOUNT, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| AgentError::Internal(format!("umount {SHARED_MOUNT}: {e}")))
        }
    }
}

/// Reboots (QEMU runs with -no-reboot, so it exits) once the reply had time to leave.
pub fn power_off_soon() {
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        power_off();
    });
}

pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
}
