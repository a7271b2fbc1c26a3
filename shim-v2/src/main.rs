//! containerd-shim-vmbox-v2: the containerd runtime `io.containerd.vmbox.v2`, which runs
//! each sandbox's containers inside a micro-VM.
//!
//! task.rs maps containerd's Task API onto the sandbox (sandbox.rs) and its guest agent;
//! io.rs wires stdio; mounts.rs shares rootfs and binds with the guest; service.rs is the
//! shim's own start/delete lifecycle.

mod check;
mod container;
mod error;
mod io;
mod metrics;
mod mounts;
mod sandbox;
mod service;
mod signals;
mod task;
mod timing;

const RUNTIME: &str = "io.containerd.vmbox.v2";

#[tokio::main]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-version" | "-v" | "version") => {
            println!(
                "containerd-shim-vmbox-v2 {} (runtime {RUNTIME})",
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
        Some("check") => std::process::exit(if check::run() { 0 } else { 1 }),
        _ => {}
    }
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME, None).await;
}
