//! Where a request's time goes: on the host, or waiting for the guest.
//!
//! A phase (`create`, `start`, `teardown`, ...) runs inside [`phase`]; every wait for the
//! guest inside it (agent requests, stream connects, the guest booting) runs inside
//! [`guest`]. At the end the shim logs, at debug level,
//! `timing: container=ID <phase>_ms=T <phase>_guest_ms=G <phase>_host_ms=T-G`, which the
//! benchmark (`make bench`) sums into host-side time per container start. Waits are
//! attributed per tokio task, so concurrent requests do not mix their figures.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static GUEST_WAIT: Cell<Duration>;
}

/// Runs `f`, a wait for the guest, and counts its duration as guest time of the current phase.
pub async fn guest<F: Future>(f: F) -> F::Output {
    let t = Instant::now();
    let out = f.await;
    add_guest(t.elapsed());
    out
}

/// Counts `d` as guest time of the current phase (e.g. the guest's own boot clock).
pub fn add_guest(d: Duration) {
    let _ = GUEST_WAIT.try_with(|g| g.set(g.get() + d));
}

/// Runs `f` as phase `name` of `subject` (e.g. `container=ID`) and logs its split.
pub async fn phase<F: Future>(subject: &str, name: &str, f: F) -> F::Output {
    let t = Instant::now();
    let (out, guest) = GUEST_WAIT
        .scope(Cell::new(Duration::ZERO), async {
            let out = f.await;
            (out, GUEST_WAIT.with(|g| g.get()))
        })
        .await;
    let (total, host) = split(t.elapsed(), guest);
    log::debug!(
        "timing: {subject} {name}_ms={total} {name}_guest_ms={} {name}_host_ms={host}",
        total - host
    );
    out
}

/// (total ms, host ms) of a phase that took `total` and waited `guest` for the guest.
fn split(total: Duration, guest: Duration) -> (u128, u128) {
    let host = total.saturating_sub(guest);
    (total.as_millis(), host.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_time_is_what_the_guest_did_not_take() {
        assert_eq!(split(Duration::from_millis(510), Duration::from_millis(480)), (510, 30));
        // A guest clock that ran ahead of the host's never makes host time negative.
        assert_eq!(split(Duration::from_millis(100), Duration::from_millis(150)), (100, 0));
    }

    #[tokio::test]
    async fn waits_count_only_inside_their_phase() {
        // Outside a phase, guest() is a plain await.
        assert_eq!(guest(async { 7 }).await, 7);
        let got = GUEST_WAIT
            .scope(Cell::new(Duration::ZERO), async {
                add_guest(Duration::from_millis(40));
                guest(async {}).await;
                add_guest(Duration::from_millis(2));
                GUEST_WAIT.with(|g| g.get())
            })
            .await;
        assert!(
            got >= Duration::from_millis(42) && got < Duration::from_millis(1000),
            "{got:?}"
        );
    }
}
