//! One line of QEMU's monitor (QMP) as the host parses it (`qmp::parse_reply`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbox_hypervisor::qmp::{parse_reply, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(Reply::Error(e)) = parse_reply(data) {
        assert!(e.len() <= 1024, "error text bounded");
    }
});
