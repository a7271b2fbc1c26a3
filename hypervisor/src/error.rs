use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{name} not found (looked for {path:?} in PATH): {hint}")]
    MissingBinary {
        name: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {name} confined: {step}: {source} (confinement.enabled = false runs it unconfined)")]
    Confine {
        name: &'static str,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited during start ({status}); its log:\n{log}")]
    EarlyExit {
        name: &'static str,
        status: crate::ProcessExit,
        log: String,
    },
    #[error("{what} did not appear within {timeout_ms} ms")]
    Timeout { what: String, timeout_ms: u64 },
    #[error("the guest agent did not say hello within {timeout_ms} ms; last lines of the guest console:\n{console}")]
    BootTimeout { timeout_ms: u64, console: String },
    #[error("the VM stopped before its agent said hello ({status}); last lines of the guest console:\n{console}")]
    BootFailed { status: String, console: String },
    #[error("agent hello: {0}")]
    Hello(#[from] vmbox_protocol::ProtocolError),
    #[error("vsock connect to guest port {port}: {detail}")]
    Vsock { port: u32, detail: String },
    #[error("QMP {command}: {detail}")]
    Qmp { command: String, detail: String },
    #[error("invalid VM spec: {0}")]
    Spec(String),
    #[error("{0}")]
    Internal(String),
    #[error("pod network: {0}")]
    Network(#[from] vmbox_network::NetworkError),
    #[error("host cgroup {path}: {detail}")]
    Cgroup { path: PathBuf, detail: String },
}

impl HypervisorError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HypervisorError {
        let path = path.into();
        move |source| HypervisorError::Io { what, path, source }
    }
}
