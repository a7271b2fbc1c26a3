//! `kubectl port-forward` for a pod in a VM.
//!
//! containerd 1.6's PortForward enters the pod's network namespace and dials
//! `localhost:PORT` there. With the pod's interface redirected into the VM, nothing
//! listens on that namespace's loopback, so the shim does: every [`POLL`] it asks the
//! agent which TCP ports the guest listens on, listens on `127.0.0.1` and `::1` of the pod
//! namespace for the same ports, and relays each accepted connection over a vsock stream
//! to the agent, which connects to the port on the guest's loopback
//! ([`vmbox_protocol::forward`]). Ports the guest stops listening on are closed again.
//! Everything is cancelled when the relay is dropped (the sandbox stops).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};
use vmbox_hypervisor::Vm;

use crate::agent::GuestAgent;

/// How often the guest's listening ports are read.
pub const POLL: Duration = Duration::from_secs(1);
/// The agent's answer to a relay request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest's side may stay idle once the client stopped sending.
const DRAIN: Duration = Duration::from_secs(60);
/// New ports bound per poll (the guest chooses the list).
const BINDS_PER_POLL: usize = 16;

/// The running relay of one sandbox; stops everything when dropped.
pub struct PortForward {
    task: JoinHandle<()>,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relayed connections of a sandbox: they outlive the listener that accepted them
/// (a server that stops listening keeps its open sessions), not the relay.
type Relays = Arc<Mutex<JoinSet<()>>>;

/// Starts relaying the loopback ports of the pod namespace `netns` (held open) to the
/// guest of `vm`.
pub fn start(netns: std::fs::File, vm: Arc<dyn Vm>, agent: Arc<dyn GuestAgent>) -> PortForward {
    let netns = Arc::new(netns);
    let task = tokio::spawn(async move {
        let relays: Relays = Arc::default();
        // Per port: the accept loops of its listeners.
        let mut open: HashMap<u16, JoinSet<()>> = HashMap::new();
        // Ports that could not be bound, not retried while the guest lists them.
        let mut failed: HashSet<u16> = HashSet::new();
        loop {
            if vm.exited().is_some() {
                return;
            }
            while relays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_join_next()
                .is_some()
            {}
            match agent.listeners().await {
                Ok(ports) => {
                    open.retain(|p, _| ports.contains(p));
                    failed.retain(|p| ports.contains(p));
                    let new: Vec<u16> = ports
                        .into_iter()
                        .filter(|p| !open.contains_key(p) && !failed.contains(p))
                        .take(BINDS_PER_POLL)
                        .collect();
                    for port in new {
                        let ns = netns.clone();
                        let bound = tokio::task::spawn_blocking(move || bind(&ns, port))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r);
                        match bound {
                            Ok(listeners) => {
                                let mut set = JoinSet::new();
                                for l in listeners {
                                    set.spawn(accept_loop(l, port, vm.clone(), relays.clone()));
                                }
                                log::debug!("port-forward: relaying port {port}");
                                open.insert(port, set);
                            }
                            Err(e) => {
                                failed.insert(port);
                                log::warn!("port-forward: cannot listen on port {port} in the pod's namespace: {e}");
                            }
                        }
                    }
                }
                Err(e) => log::debug!("port-forward: list the guest's listeners: {e}"),
            }
            tokio::time::sleep(POLL).await;
        }
    });
    PortForward { task }
}

/// Listens on `127.0.0.1:port` and `[::1]:port` inside the namespace (whichever work).
/// Blocking.
fn bind(netns: &std::fs::File, port: u16) -> Result<Vec<tokio::net::TcpListener>, String> {
    let made = vmbox_network::netns::run_blocking_in_file(netns, move || {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            match std::net::TcpListener::bind(&addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => out.push(l),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        (out, errors)
    })
    .map_err(|e| e.to_string())?;
    let (std_listeners, errors) = made;
    if std_listeners.is_empty() {
        return Err(errors.join("; "));
    }
    std_listeners
        .into_iter()
        .map(|l| tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string()))
        .collect()
}

async fn accept_loop(listener: tokio::net::TcpListener, port: u16, vm: Arc<dyn Vm>, relays: Relays) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                relays
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .spawn(relay(tcp, port, vm.clone()));
            }
            Err(e) => {
                log::debug!("port-forward: accept on port {port}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn relay(mut tcp: tokio::net::TcpStream, port: u16, vm: Arc<dyn Vm>) {
    let mut conn = match vm.connect(vmbox_protocol::FORWARD_PORT).await {
        Ok(c) => c,
        Err(e) => return log::warn!("port-forward to guest port {port}: {e}"),
    };
    let asked = async {
        vmbox_protocol::forward::write_request(&mut conn, port).await?;
        vmbox_protocol::forward::read_reply(&mut conn).await
    };
    match tokio::time::timeout(REPLY_TIMEOUT, asked).await {
        Ok(Ok(true)) => {}
        // Dropping the client's connection is what a refused port looks like to it.
        Ok(Ok(false)) => return log::debug!("port-forward: guest port {port} refused the connection"),
        Ok(Err(e)) => return log::warn!("port-forward to guest port {port}: {e}"),
        Err(_) => return log::warn!("port-forward to guest port {port}: no answer within {REPLY_TIMEOUT:?}"),
    }
    // Both directions. Once the client (containerd) is done sending, the guest's side
    // may stay idle at most DRAIN: a guest that never closes its side cannot hold the
    // relay (a task, two fds) after the client left.
    let (mut client_rx, mut client_tx) = tcp.split();
    let (mut guest_rx, mut guest_tx) = tokio::io::split(conn);
    let client_done = tokio::sync::Notify::new();
    let up = async {
        let r = tokio::io::copy(&mut client_rx, &mut guest_tx).await;
        let _ = guest_tx.shutdown().await;
        client_done.notify_one();
        r.map(|_| ())
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut timed = false;
        loop {
            let n = if timed {
                match tokio::time::timeout(DRAIN, guest_rx.read(&mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    r = guest_rx.read(&mut buf) => r?,
                    _ = client_done.notified() => { timed = true; continue }
                }
            };
            if n == 0 {
                break;
            }
            client_tx.write_all(&buf[..n]).await?;
        }
        let _ = client_tx.shutdown().await;
        Ok::<_, std::io::Error>(())
    };
    let (u, d) = tokio::join!(up, down);
    let done = u.and(d);
    if let Err(e) = done {
        log::debug!("port-forward on port {port}: {e}");
    }
}
