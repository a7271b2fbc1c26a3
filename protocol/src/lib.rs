//! The vmbox host <-> guest agent protocol.
//!
//! - `agent` / `agent_ttrpc`: messages and the ttrpc `Agent` service (client and server),
//!   generated at build time from `protos/agent.proto`.
//! - [`hello`]: the one length-prefixed message the agent sends when it is ready.
//! - [`stream`]: the header that names a stdio stream when the host opens it.
//! - [`id`]: the one rule for container, exec and sandbox ids, checked on both sides.
//!
//! Both sides treat the other as a peer that may misbehave: every frame read here has a
//! size bound, so a broken guest cannot make the host allocate without limit.

#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/gen/agent.rs"));
}
#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/gen/agent_ttrpc.rs"));
}

pub mod forward;
pub mod hello;
pub mod id;
pub mod rate;
pub mod stream;
pub mod text;

pub use id::{valid_id, Id, IdError};

/// Where the guest mounts the sandbox's shared directory (virtio-fs). Paths in requests
/// that refer to shared files are below it.
pub const GUEST_SHARED_MOUNT: &str = "/run/vmbox/shared";

/// Where the guest keeps each pod's /dev/shm tmpfs: `<POD_SHM_DIR>/<sandbox id>`.
pub const POD_SHM_DIR: &str = "/run/vmbox/pod-shm";

/// Bumped on every incompatible change of the protocol; host and guest must agree.
/// 2: `CreateContainerRequest.pod` (pod namespaces and /dev/shm).
pub const PROTOCOL_VERSION: u32 = 3;

/// Default host vsock port for the agent's hello (guest dials CID 2); the host picks
/// one per VM and passes it as `vmbox.hello_port=`.
pub const HELLO_PORT: u32 = 1024;
/// Guest vsock port of the agent's ttrpc server.
pub const AGENT_PORT: u32 = 1025;
/// Guest vsock port on which the agent accepts stdio streams.
pub const STDIO_PORT: u32 = 1026;
/// Guest vsock port on which the agent accepts port-forward streams ([`forward`]).
pub const FORWARD_PORT: u32 = 1027;

/// Errors of the framing in this crate.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o error on the {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error(
        "protocol version mismatch: host speaks {host}, guest agent {agent_version} speaks {guest}; \
         rebuild the guest (make guest) so both come from the same vmbox"
    )]
    VersionMismatch {
        host: u32,
        guest: u32,
        agent_version: String,
    },
}

/// A ttrpc client of the agent over an established stream (vsock or hybrid socket).
/// ttrpc bounds every message (4 MiB), so a misbehaving guest cannot flood the host.
pub fn client<S>(stream: S) -> agent_ttrpc::AgentClient
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + 'static,
{
    let socket = ttrpc::r#async::transport::Socket::new(stream);
    agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket))
}

/// Whether `name` is a hostname both sides accept (`vmbox.hostname=` on the kernel
/// command line): 1-64 bytes of letters, digits, `-` and `.` (RFC 1123 labels, the
/// kernel's limit), so it can never break the command line or carry a path.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostnames_are_checked() {
        assert!(super::valid_hostname("vm"));
        assert!(super::valid_hostname("node-1.example.com"));
        for bad in ["", "-x", ".x", "a b", "a/b", "a=b", &"x".repeat(65)] {
            assert!(!super::valid_hostname(bad), "{bad:?}");
        }
    }
}
