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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use vmbox_hypervisor::Vm;

use crate::agent::GuestAgent;

/// How often the guest's listening ports are read.
pub const POLL: Duration = Duration::from_secs(1);
/// The agent's answer to a relay request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The running relay of one sandbox; stops everything when dropped.
pub struct PortForward {
    task: JoinHandle<()>,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts relaying the pod namespace `netns`'s loopback ports to the guest of `vm`.
pub fn start(netns: PathBuf, vm: Arc<dyn Vm>, agent: Arc<dyn GuestAgent>) -> PortForward {
    let task = tokio::spawn(async move {
        // Per port: the accept loops of its listeners (and, inside, their relays).
        let mut open: HashMap<u16, JoinSet<()>> = HashMap::new();
        let mut warned: HashSet<u16> = HashSet::new();
        loop {
            if vm.exited().is_some() {
                return;
            }
            match agent.listeners().await {
                Ok(ports) => {
                    open.retain(|p, _| ports.contains(p));
                    for port in ports {
                        if open.contains_key(&port) {
                            continue;
                        }
                        match bind(&netns, port) {
                            Ok(listeners) => {
                                let mut set = JoinSet::new();
                                for l in listeners {
                                    set.spawn(accept_loop(l, port, vm.clone()));
                                }
                                log::debug!("port-forward: relaying {}:{port}", netns.display());
                                open.insert(port, set);
                            }
                            Err(e) => {
                                if warned.insert(port) {
                                    log::warn!(
                                        "port-forward: cannot listen on port {port} in {}: {e}",
                                        netns.display()
                                    );
                                }
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
fn bind(netns: &std::path::Path, port: u16) -> Result<Vec<tokio::net::TcpListener>, String> {
    let made = vmbox_network::netns::run_blocking_in(netns, move || {
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

async fn accept_loop(listener: tokio::net::TcpListener, port: u16, vm: Arc<dyn Vm>) {
    let mut relays = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                relays.spawn(relay(tcp, port, vm.clone()));
            }
            Err(e) => {
                log::debug!("port-forward: accept on port {port}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Finished relays are reaped as they end.
        while relays.try_join_next().is_some() {}
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
    if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut conn).await {
        log::debug!("port-forward on port {port}: {e}");
    }
}
