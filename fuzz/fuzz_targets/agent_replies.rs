//! The agent's ttrpc replies as the host decodes them: every reply message type of
//! agent.proto, then what the shim makes of them (the guest's network view through
//! `vmbox_network::proto::decode`, container ids through `Id::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use vmbox_protocol::agent as pb;

fn parse<M: Message>(data: &[u8]) -> Option<M> {
    M::parse_from_bytes(data).ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = parse::<pb::VersionResponse>(data);
    let _ = parse::<pb::CheckResponse>(data);
    let _ = parse::<pb::PidResponse>(data);
    let _ = parse::<pb::WaitProcessResponse>(data);
    let _ = parse::<pb::ListProcessesResponse>(data);
    let _ = parse::<pb::StatsContainerResponse>(data);
    let _ = parse::<pb::ListenersResponse>(data);
    let _ = parse::<pb::ShutdownResponse>(data);
    if let Some(net) = parse::<pb::Network>(data) {
        if let Ok(n) = vmbox_network::proto::decode(&net) {
            // What the host accepts it can describe and encode again.
            let _ = n.to_string();
            let again = vmbox_network::proto::decode(&vmbox_network::proto::encode(&n)).expect("round trip");
            assert_eq!(again, n);
        }
    }
    if let Some(oom) = parse::<pb::OomEvent>(data) {
        let _ = vmbox_protocol::Id::parse("container_id", &oom.container_id);
    }
});
