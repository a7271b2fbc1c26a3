//! vmbox-agent: PID 1 of a vmbox micro-VM.
//!
//! Boot: mount the basics, read `vmbox.*` from the kernel command line, mount the
//! virtio-fs share, start the one reaper, serve the ttrpc `Agent` API on vsock
//! [`AGENT_PORT`], accept stdio streams on [`STDIO_PORT`], then dial the host's hello
//! port to say it is ready. Containers are created by libcontainer in a single-threaded
//! helper (`vmbox-agent helper`, see engine.rs), never from this multithreaded process.
//!
//! Must never: wait on children outside reaper.rs, use tokio's `process` feature, or
//! trust a path from a request without keeping it inside the guest's own directories.

mod cgroup;
mod container;
mod engine;
mod fdio;
mod forward;
mod init;
mod oom;
mod reaper;
mod service;
mod shutdown;
mod streams;
mod workload;
mod zygote;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};
use vmbox_protocol::agent::Hello;
use vmbox_protocol::{AGENT_PORT, PROTOCOL_VERSION};

/// The agent's errors; each becomes the ttrpc status containerd acts on (the shim keeps
/// the code): NotFound for a missing container or process, FailedPrecondition for a
/// request the object's state does not allow, AlreadyExists for a taken id,
/// InvalidArgument only for a malformed request, Internal for a failed system call.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Internal(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Network(#[from] vmbox_network::NetworkError),
}

impl AgentError {
    pub fn io(path: &Path, source: std::io::Error) -> AgentError {
        AgentError::Io {
            path: path.display().to_string(),
            source,
        }
    }
    /// A failed system call: Internal, naming what failed.
    pub fn sys(what: &'static str) -> impl Fn(nix::errno::Errno) -> AgentError {
        move |e| AgentError::Internal(format!("{what}: {e}"))
    }
    /// A failed I/O operation: Internal, naming what failed.
    pub fn sys_io(what: &'static str) -> impl Fn(std::io::Error) -> AgentError {
        move |e| AgentError::Internal(format!("{what}: {e}"))
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> ttrpc::Error {
        let code = match e {
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::Network(vmbox_network::NetworkError::Invalid(_)) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::Network(vmbox_network::NetworkError::NoNic { .. }) => ttrpc::Code::NOT_FOUND,
            _ => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// Logs to the console (the host keeps it as the VM's console log).
struct ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) && r.target().starts_with("vmbox") {
            eprintln!("vmbox-agent {}: {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("helper") {
        std::process::exit(engine::helper_main());
    }
    if std::process::id() != 1 {
        eprintln!("vmbox-agent runs as PID 1 of a vmbox guest (or as `vmbox-agent helper`)");
        std::process::exit(2);
    }
    let _ = log::set_logger(&ConsoleLogger);
    log::set_max_level(log::LevelFilter::Info);
    let mut steps = BootSteps::default();
    steps.at("main");
    if let Err(e) = init::switch_root() {
        fatal(&format!("boot: {e}"));
    }
    if let Err(e) = init::mount_base() {
        fatal(&format!("boot: {e}"));
    }
    let params = init::Params::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    log::set_max_level(params.log_level);
    steps.at("mounts");
    init::tune(&params);
    steps.at("tune");
    // SAFETY: no thread has been started yet: the async runtime starts below.
    let zygote = match unsafe { zygote::Zygote::start() } {
        Ok(z) => Some(Arc::new(z)),
        Err(e) => {
            log::warn!("container-setup zygote: {e}; helpers will be executed");
            None
        }
    };
    steps.at("zygote");
    // The async runtime starts only now, after every single-threaded step.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fatal(&format!("tokio runtime: {e}")),
    };
    steps.at("runtime");
    if let Err(e) = rt.block_on(serve(params, zygote, steps)) {
        fatal(&e);
    }
    shutdown::power_off();
}

fn fatal(msg: &str) -> ! {
    eprintln!("vmbox-agent: fatal: {msg}");
    shutdown::power_off();
    std::process::exit(1);
}

/// When each boot step of the agent ended, in ms of the guest kernel's clock (logged at
/// debug level with the hello: where the agent's part of a boot goes).
#[derive(Default)]
struct BootSteps(Vec<(&'static str, u64)>);

impl BootSteps {
    fn at(&mut self, step: &'static str) {
        self.0.push((step, init::boot_time_us() / 1000));
    }
    fn log(&self) {
        let steps: Vec<String> = self.0.iter().map(|(s, ms)| format!("{s} {ms}")).collect();
        log::debug!("boot steps, ms since the kernel started: {}", steps.join(", "));
    }
}

async fn serve(params: init::Params, zygote: Option<Arc<zygote::Zygote>>, mut steps: BootSteps) -> Result<(), String> {
    if !params.share.is_empty() {
        init::mount_share(&params.share).map_err(|e| e.to_string())?;
    }
    steps.at("share");
    cgroup::enable_controllers().map_err(|e| e.to_string())?;
    let reaper = reaper::Reaper::start().map_err(|e| format!("reaper: {e}"))?;
    let streams = streams::Streams::default();
    streams
        .listen()
        .map_err(|e| format!("stdio listener on vsock port {}: {e}", vmbox_protocol::STDIO_PORT))?;
    forward::listen().map_err(|e| {
        format!(
            "port-forward listener on vsock port {}: {e}",
            vmbox_protocol::FORWARD_PORT
        )
    })?;
    let containers = container::Containers::new(reaper, streams, zygote);
    watch_oom(containers.clone());
    let service = service::Service {
        containers,
        kernel_release: init::kernel_release(),
    };
    let services = vmbox_protocol::agent_ttrpc::create_agent(Arc::new(service));
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_PORT))
        .map_err(|e| format!("ttrpc listener on vsock port {AGENT_PORT}: {e}"))?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener.into())
        .register_service(services);
    server.start().await.map_err(|e| format!("ttrpc server: {e}"))?;
    steps.at("listening");
    let hello = say_hello(params.hello_port).await;
    steps.at("hello");
    steps.log();
    hello?;
    log::info!("serving on vsock port {AGENT_PORT}");
    std::future::pending::<()>().await;
    Ok(())
}

/// Dials the host's hello port. Retried briefly: the host listens before QEMU starts,
/// but the vsock device may need a moment after boot.
async fn say_hello(port: u32) -> Result<(), String> {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: init::kernel_release(),
        boot_time_us: init::boot_time_us(),
        ..Default::default()
    };
    let mut last = String::new();
    for _ in 0..50 {
        match VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await {
            Ok(mut s) => {
                vmbox_protocol::hello::write_hello(&mut s, &hello)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("cannot reach the host on vsock port {port}: {last}"))
}

/// Polls every container's OOM kill count (cheap: one small read each); exits and
/// removals check too (oom.rs).
fn watch_oom(containers: container::Containers) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(oom::POLL).await;
            let ids: Vec<String> = containers.map.lock().await.keys().cloned().collect();
            for id in ids {
                containers.oom.check(&id);
            }
        }
    });
}
