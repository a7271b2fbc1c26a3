//! Translating the OCI runtime spec containerd gives the shim (host view) into the spec
//! the guest agent runs (guest view). Filled in with the containerd shim.
