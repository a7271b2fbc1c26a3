//! SIGTERM and SIGINT: the first runs the graceful shutdown (agent Shutdown: containers
//! stopped, filesystems flushed, VM powered off; bounded by timeouts.shutdown_ms), the
//! second stops the VM hard at once.

use std::sync::Arc;

use containerd_shim::asynchronous::ExitSignal;
use tokio::signal::unix::{signal, SignalKind};

use crate::core::Core;

pub fn graceful_on_sigterm(core: Arc<Core>, exit: Arc<ExitSignal>) {
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return log::error!("cannot install SIGTERM/SIGINT handlers");
        };
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: graceful shutdown"),
            _ = int.recv() => log::info!("SIGINT: graceful shutdown"),
        }
        let sandbox = core.current_sandbox();
        // In a task of its own: a second signal must not leave the slot half shut down.
        let c = core.clone();
        let graceful = tokio::spawn(async move { c.shutdown_sandbox(true).await });
        tokio::select! {
            _ = graceful => {}
            _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
                log::warn!("second signal: stopping the VM hard");
                if let Some(s) = sandbox.or_else(|| core.current_sandbox()) {
                    s.stop_hard().await;
                }
            }
        }
        exit.signal();
    });
}
