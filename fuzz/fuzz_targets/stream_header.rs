//! Fixed-size headers the host reads from guest connections: the stdio stream header
//! (`stream::read_header`) and the port-forward request and reply (`forward::*`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut r = data;
        if let Ok(id) = vmbox_protocol::stream::read_header(&mut r).await {
            let mut out = Vec::new();
            vmbox_protocol::stream::write_header(&mut out, id).await.expect("encodes");
            let mut again = out.as_slice();
            assert_eq!(vmbox_protocol::stream::read_header(&mut again).await.expect("round trip"), id);
        }
        let mut r = data;
        let _ = vmbox_protocol::forward::read_request(&mut r).await;
        let mut r = data;
        let _ = vmbox_protocol::forward::read_reply(&mut r).await;
    });
});
