//! The PROXY v1 header parser and reader on arbitrary guest bytes.
#![no_main]

use guest_protocol::proxy_header::{ProxyHeader, MAX_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = ProxyHeader::parse(data) {
        assert!(data.len() <= MAX_LEN);
        // What parses prints back to a line that parses the same.
        assert_eq!(ProxyHeader::parse(header.to_string().as_bytes()).ok(), Some(header));
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return };
    runtime.block_on(async {
        let mut reader = tokio::io::BufReader::new(data);
        let _ = net::proxy_header::read(&mut reader).await;
    });
});
