//! containerd-shim-vmbox-v2: the containerd runtime `io.containerd.vmbox.v2`, which runs
//! each sandbox's containers inside a micro-VM.
//!
//! - task.rs: containerd's Task API, decoded and handed to the core;
//! - core/: the sandbox's and processes' state machines over small seams (the VM backend,
//!   the guest agent in agent.rs, host mounts in mounts.rs, events in events.rs);
//! - io.rs wires stdio; service.rs is the shim's own start/delete lifecycle.

mod agent;
mod check;
mod core;
mod error;
mod events;
mod forward;
mod hooks;
mod io;
mod metrics;
mod mounts;
mod options;
mod pool;
mod service;
mod signals;
mod task;
mod timing;

const RUNTIME: &str = "io.containerd.vmbox.v2";

/// Once the shim has signalled its own exit (Shutdown after its last container, or the end
/// of the graceful SIGTERM path, which first stops the sandbox within its own timeouts),
/// the process is gone within this time, whatever its peers do: work still in flight (a
/// request stuck on the guest, a copy loop) is abandoned.
pub const EXIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// From the moment the shim's exit was signalled: ends the process after
/// [`EXIT_DEADLINE`] even if a server shutdown or a task still waits on a peer.
pub fn exit_within_deadline(id: String) {
    std::thread::spawn(move || {
        std::thread::sleep(EXIT_DEADLINE);
        log::warn!("shim {id}: still running {EXIT_DEADLINE:?} after exit was signalled; exiting");
        std::process::exit(0);
    });
}

fn main() {
    // A panic in a request handler ends that connection's tasks, which containerd sees as
    // "shim disconnected"; the shim's stderr goes nowhere, so the panic goes to its log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        log::error!("panic: {info}");
        default_hook(info);
    }));
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-vmbox-v2: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(serve());
    // A runtime dropped normally waits for every blocking task without end.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
}

async fn serve() {
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-version" | "-v" | "version") => {
            println!(
                "containerd-shim-vmbox-v2 {} (runtime {RUNTIME})",
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
        Some("check") => std::process::exit(if check::run() { 0 } else { 1 }),
        // A warm pool's standby (pool.rs), started by `start`.
        Some("standby") => {
            let Some(sid) = std::env::args().nth(2) else {
                eprintln!("usage: containerd-shim-vmbox-v2 standby <id>");
                std::process::exit(2);
            };
            return pool::run_standby(&sid).await;
        }
        Some("pool") => {
            if std::env::args().nth(2).as_deref() != Some("drain") {
                eprintln!("usage: containerd-shim-vmbox-v2 pool drain");
                std::process::exit(2);
            }
            match vmbox_config::Config::load() {
                Ok(c) => {
                    let n = tokio::task::spawn_blocking(move || pool::drain(&c)).await.unwrap_or(0);
                    println!("stopped {n} standby VMs");
                    return;
                }
                Err(e) => {
                    eprintln!("containerd-shim-vmbox-v2: {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => {}
    }
    // No waitpid(-1) reaper and no subreaper. These must be set here: containerd-shim 0.11
    // installs its signal handling (the reaper on SIGCHLD) before `Shim::new` sees the
    // config, so setting them there came too late and the crate's reaper stole the exit
    // statuses of QEMU, its daemons and OCI hooks (ECHILD in their waiters).
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME, Some(config)).await;
}
