//! The shim's errors and their mapping onto ttrpc status codes containerd understands.

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
    /// The agent answered with an error, or could not be reached.
    #[error("guest agent: {0}")]
    Agent(String),
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
                let msg = format!("guest agent: {}", s.message);
                match s.code() {
                    ttrpc::Code::NOT_FOUND => ShimError::NotFound(msg),
                    ttrpc::Code::INVALID_ARGUMENT => ShimError::Invalid(msg),
                    ttrpc::Code::FAILED_PRECONDITION => ShimError::FailedPrecondition(msg),
                    ttrpc::Code::ALREADY_EXISTS => ShimError::AlreadyExists(msg),
                    _ => ShimError::Agent(s.message),
                }
            }
            other => ShimError::Agent(other.to_string()),
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        let code = match &e {
            ShimError::Invalid(_) | ShimError::Oci(_) | ShimError::Config(_) => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            _ => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
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
}
