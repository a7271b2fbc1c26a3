//! Task events: what the core reports ([`Event`]), the seam it reports through
//! ([`EventSink`]), and the one ordered pipeline to containerd ([`Forwarder`]).
//!
//! Order is part of the contract: containerd (and the CRI plugin above it) expect a
//! process's TaskExit after its TaskStart or TaskExecStarted. The core enqueues events in
//! the order its transitions happen ([`EventSink::publish`] never waits), and a single task
//! forwards them one after another. Each forward has its own deadline
//! ([`PUBLISH_DEADLINE`]): containerd-shim 0.11's publisher queues an event and forwards it
//! with the context it was given, so a forward without a deadline to a stuck containerd
//! would hold every later event for ever.

use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::api::Mount;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics::*;
use tokio::sync::mpsc;

use crate::io::StdioPaths;

/// The longest one event may take to reach containerd before it is given up (containerd's
/// runc shim uses the same bound).
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(5);

/// A task event, in the core's terms. Pids are the ones reported for the process.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create {
        container: String,
        bundle: String,
        rootfs: Vec<Mount>,
        stdio: StdioPaths,
        pid: u32,
    },
    Start {
        container: String,
        pid: u32,
    },
    ExecAdded {
        container: String,
        exec: String,
    },
    ExecStarted {
        container: String,
        exec: String,
        pid: u32,
    },
    /// `id` is the exec id, or the container id for the init process.
    Exit {
        container: String,
        id: String,
        pid: u32,
        status: u32,
        at: Timestamp,
    },
    Delete {
        container: String,
        pid: u32,
        status: u32,
        at: Timestamp,
    },
    Oom {
        container: String,
    },
    Paused {
        container: String,
    },
    Resumed {
        container: String,
    },
}

/// Where the core's events go. `publish` only enqueues: it never waits for the receiver.
pub trait EventSink: Send + Sync {
    fn publish(&self, event: Event);
}

impl Event {
    /// containerd's topic and message for this event.
    pub fn to_containerd(&self) -> (&'static str, Box<dyn MessageDyn>) {
        match self.clone() {
            Event::Create {
                container,
                bundle,
                rootfs,
                stdio,
                pid,
            } => (
                TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: container,
                    bundle,
                    rootfs,
                    io: Some(TaskIO {
                        stdin: stdio.stdin,
                        stdout: stdio.stdout,
                        stderr: stdio.stderr,
                        terminal: stdio.terminal,
                        ..Default::default()
                    })
                    .into(),
                    pid,
                    ..Default::default()
                }),
            ),
            Event::Start { container, pid } => (
                TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: container,
                    pid,
                    ..Default::default()
                }),
            ),
            Event::ExecAdded { container, exec } => (
                TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: container,
                    exec_id: exec,
                    ..Default::default()
                }),
            ),
            Event::ExecStarted { container, exec, pid } => (
                TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: container,
                    exec_id: exec,
                    pid,
                    ..Default::default()
                }),
            ),
            Event::Exit {
                container,
                id,
                pid,
                status,
                at,
            } => (
                TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: container,
                    id,
                    pid,
                    exit_status: status,
                    exited_at: Some(at).into(),
                    ..Default::default()
                }),
            ),
            Event::Delete {
                container,
                pid,
                status,
                at,
            } => (
                TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    id: container.clone(),
                    container_id: container,
                    pid,
                    exit_status: status,
                    exited_at: Some(at).into(),
                    ..Default::default()
                }),
            ),
            Event::Oom { container } => (
                TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: container,
                    ..Default::default()
                }),
            ),
            Event::Paused { container } => (
                TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: container,
                    ..Default::default()
                }),
            ),
            Event::Resumed { container } => (
                TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: container,
                    ..Default::default()
                }),
            ),
        }
    }
}

/// The production [`EventSink`]: one queue, one task forwarding to containerd in order.
pub struct Forwarder {
    tx: mpsc::UnboundedSender<Event>,
}

impl Forwarder {
    /// Starts the forwarding task (needs a tokio runtime). The queue is unbounded on
    /// purpose: dropping a TaskExit would leave containerd waiting for ever, and every event
    /// comes from a transition this shim made (the guest's OOM reports are checked against
    /// the containers served first), so its length is bounded by the requests containerd sent.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Forwarder {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let (topic, message) = event.to_containerd();
                let ctx = ttrpc::context::with_timeout(PUBLISH_DEADLINE.as_nanos() as i64);
                let sent = tokio::time::timeout(PUBLISH_DEADLINE, publisher.publish(ctx, topic, &namespace, message));
                match sent.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::warn!("publish {topic}: {e}"),
                    Err(_) => log::warn!("publish {topic}: not queued within {PUBLISH_DEADLINE:?}; dropped"),
                }
            }
        });
        Forwarder { tx }
    }
}

impl EventSink for Forwarder {
    fn publish(&self, event: Event) {
        if self.tx.send(event).is_err() {
            log::warn!("event forwarder gone; event dropped");
        }
    }
}
