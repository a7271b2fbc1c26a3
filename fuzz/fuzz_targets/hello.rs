//! The agent's hello, the first bytes a booting guest sends the host
//! (`vmbox_protocol::hello::read_hello`): bounded, never panics, and what it accepts
//! encodes back to the same hello.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut r = data;
        if let Ok(h) = vmbox_protocol::hello::read_hello(&mut r).await {
            let mut out = Vec::new();
            vmbox_protocol::hello::write_hello(&mut out, &h).await.expect("an accepted hello encodes");
            let mut again = out.as_slice();
            assert_eq!(vmbox_protocol::hello::read_hello(&mut again).await.expect("round trip"), h);
        }
    });
});
