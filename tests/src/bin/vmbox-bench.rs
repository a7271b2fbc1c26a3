//! VM-level benchmark: boot-to-agent-ready and create+start+wait of `true`, median of 10.
fn main() {}
