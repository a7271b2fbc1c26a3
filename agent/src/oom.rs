//! OOM kills of the containers, queued until the host takes them (`GetOomEvent`).
//!
//! A container's cgroup counts its OOM kills (`oom_kill` in memory.events, which covers
//! the cgroup's descendants). The count is checked every [`POLL`], and also whenever a
//! process of the container exits and just before the container is removed, so a kill
//! that ends the container is queued before its exit is reported, and a container
//! removed between two polls is not missed. Events wait in a bounded queue: one that
//! happens while the host is not asking (between two `GetOomEvent` calls) is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::cgroup;

/// How often every container's count is read.
pub const POLL: Duration = Duration::from_millis(500);
/// Events kept for the host at most; the oldest are dropped beyond it.
const MAX_QUEUED: usize = 1024;

#[derive(Default)]
struct State {
    /// OOM kills already queued, per container.
    seen: HashMap<String, u64>,
    queue: VecDeque<String>,
}

/// The queue of OOM events (container ids); cheap to clone.
#[derive(Clone, Default)]
pub struct OomEvents {
    state: Arc<Mutex<State>>,
    ready: Arc<Notify>,
}

impl OomEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts counting container `id`'s OOM kills (at create), from what its cgroup shows
    /// now (a cgroup left by an earlier container of that id keeps its count).
    pub fn track(&self, id: &str) {
        let now = cgroup::oom_kills(id);
        self.lock().seen.insert(id.to_string(), now);
    }

    /// Reads container `id`'s OOM kill count and queues an event if it grew. Containers
    /// not tracked (removed, or never created) are ignored.
    pub fn check(&self, id: &str) {
        if !self.lock().seen.contains_key(id) {
            return;
        }
        self.record(id, cgroup::oom_kills(id));
    }

    /// Queues an event for tracked container `id` if `kills` is more than was seen before.
    fn record(&self, id: &str, kills: u64) {
        let mut s = self.lock();
        let Some(&before) = s.seen.get(id) else { return };
        if kills <= before {
            return;
        }
        s.seen.insert(id.to_string(), kills);
        log::warn!("container {id}: OOM kill ({kills} in all)");
        s.queue.push_back(id.to_string());
        while s.queue.len() > MAX_QUEUED {
            s.queue.pop_front();
        }
        drop(s);
        self.ready.notify_one();
    }

    /// Stops tracking a removed container: later checks of `id` queue nothing.
    pub fn forget(&self, id: &str) {
        self.lock().seen.remove(id);
    }

    /// The oldest queued event, waiting for one if there is none.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.ready.notified();
            if let Some(id) = self.lock().queue.pop_front() {
                return id;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_wait_for_the_host_and_are_not_repeated() {
        let o = OomEvents::default();
        o.track("a");
        o.track("b");
        o.record("a", 1);
        o.record("b", 1);
        o.record("a", 1);
        o.record("a", 2);
        assert_eq!(o.next().await, "a");
        assert_eq!(o.next().await, "b");
        assert_eq!(o.next().await, "a");
        let pending = tokio::time::timeout(Duration::from_millis(20), o.next()).await;
        assert!(pending.is_err(), "no more events");
    }

    #[tokio::test]
    async fn a_waiting_host_is_woken() {
        let o = OomEvents::default();
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.next().await });
        tokio::task::yield_now().await;
        o.track("c");
        o.record("c", 1);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(got.unwrap().unwrap(), "c");
    }

    #[test]
    fn the_queue_is_bounded() {
        let o = OomEvents::default();
        for i in 0..MAX_QUEUED + 5 {
            o.track(&format!("c{i}"));
            o.record(&format!("c{i}"), 1);
        }
        assert_eq!(o.lock().queue.len(), MAX_QUEUED);
    }

    #[tokio::test]
    async fn removed_containers_queue_nothing() {
        let o = OomEvents::default();
        o.record("never-created", 3);
        o.track("gone");
        o.forget("gone");
        o.record("gone", 1);
        assert!(o.lock().queue.is_empty());
    }
}
