//! The shim's errors and their mapping onto ttrpc status codes containerd understands.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::ttrpc;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// Bad input from containerd or its user (config.json, mounts, annotations, ids).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Config(#[from] vmbox_config::ConfigError),
    #[error(transparent)]
    Oci(#[from] vmbox_oci::OciError),
    #[error(transparent)]
    Hypervisor(#[from] vmbox_hypervisor::HypervisorError),
    /// An id that breaks [`vmbox_protocol::id`]'s rule (InvalidArgument).
    #[error(transparent)]
    Id(#[from] vmbox_protocol::IdError),
    /// The agent answered with an error, or could not be reached.
    #[error("guest agent: {0}")]
    Agent(String),
    /// A step that did not finish in time (Internal: the peer, not the request, failed).
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The sandbox's VMM exited (Internal).
    #[error("the sandbox's VM exited ({0})")]
    VmExited(vmbox_hypervisor::VmExit),
    /// A failure shared by several requests (a sandbox boot several creates waited for);
    /// its code is the inner error's.
    #[error("{0}")]
    Shared(Arc<ShimError>),
    /// A failure of the shim itself (a task that panicked, a closed channel).
    #[error("{0}")]
    Internal(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ShimError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let what = what.into();
        move |source| ShimError::Io { what, source }
    }

    /// Maps an agent reply, keeping the agent's status code, which containerd acts on
    /// (NotFound: already finished; FailedPrecondition: wrong state; AlreadyExists;
    /// InvalidArgument: bad input); anything else is Internal.
    pub fn agent(e: ttrpc::Error) -> ShimError {
        match e {
            ttrpc::Error::RpcStatus(s) => {
                // The guest wrote it: bounded and escaped before it reaches logs or containerd.
                let text = vmbox_protocol::text::bounded(&s.message, vmbox_protocol::text::MAX_GUEST_TEXT);
                let msg = format!("guest agent: {text}");
                match s.code() {
                    ttrpc::Code::NOT_FOUND => ShimError::NotFound(msg),
                    ttrpc::Code::INVALID_ARGUMENT => ShimError::Invalid(msg),
                    ttrpc::Code::FAILED_PRECONDITION => ShimError::FailedPrecondition(msg),
                    ttrpc::Code::ALREADY_EXISTS => ShimError::AlreadyExists(msg),
                    _ => ShimError::Agent(text),
                }
            }
            other => ShimError::Agent(vmbox_protocol::text::bounded(
                &other.to_string(),
                vmbox_protocol::text::MAX_GUEST_TEXT,
            )),
        }
    }
}

impl ShimError {
    /// The ttrpc code containerd gets for this error.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            ShimError::Invalid(_) | ShimError::Oci(_) | ShimError::Config(_) | ShimError::Id(_) => {
                ttrpc::Code::INVALID_ARGUMENT
            }
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            ShimError::Shared(inner) => inner.code(),
            ShimError::Hypervisor(vmbox_hypervisor::HypervisorError::Spec(_)) => ttrpc::Code::INVALID_ARGUMENT,
            // The spec's network namespace: more interfaces than a VM takes, or gone.
            ShimError::Hypervisor(vmbox_hypervisor::HypervisorError::Network(n)) => match n {
                vmbox_network::NetworkError::TooMany { .. } | vmbox_network::NetworkError::Invalid(_) => {
                    ttrpc::Code::INVALID_ARGUMENT
                }
                vmbox_network::NetworkError::Netns { .. } => ttrpc::Code::FAILED_PRECONDITION,
                _ => ttrpc::Code::INTERNAL,
            },
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_reach_containerd_unchanged() {
        for code in [
            ttrpc::Code::NOT_FOUND,
            ttrpc::Code::INVALID_ARGUMENT,
            ttrpc::Code::FAILED_PRECONDITION,
            ttrpc::Code::ALREADY_EXISTS,
            ttrpc::Code::INTERNAL,
        ] {
            let from_agent = ttrpc::Error::RpcStatus(ttrpc::get_status(code, "x"));
            let to_containerd: ttrpc::Error = ShimError::agent(from_agent).into();
            match to_containerd {
                ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), code),
                other => panic!("{other:?}"),
            }
        }
        let unknown = ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::DATA_LOSS, "x"));
        match ttrpc::Error::from(ShimError::agent(unknown)) {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::INTERNAL),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_guest_error_message_reaches_containerd_bounded_and_escaped() {
        let huge = format!("line one\nforged log line\x1b[2J{}", "x".repeat(1 << 20));
        for code in [ttrpc::Code::NOT_FOUND, ttrpc::Code::INTERNAL] {
            let from_agent = ttrpc::Error::RpcStatus(ttrpc::get_status(code, huge.clone()));
            match ttrpc::Error::from(ShimError::agent(from_agent)) {
                ttrpc::Error::RpcStatus(s) => {
                    assert!(s.message.len() < 4096 + 64, "{} bytes", s.message.len());
                    assert!(
                        !s.message.contains('\n') && !s.message.contains('\x1b'),
                        "{:.80}",
                        s.message
                    );
                    assert!(s.message.contains("line one\\nforged"), "{:.80}", s.message);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
