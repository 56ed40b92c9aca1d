//! DNS framing and query parsing on an arbitrary guest byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return };
    runtime.block_on(async {
        let mut reader = data;
        while let Ok(Some(frame)) = net::dns::read_frame(&mut reader).await {
            match net::dns::parse_query(&frame) {
                Ok(query) => assert!(!query.qname.ends_with('.')),
                Err(rejected) => {
                    if let Some(response) = rejected.response {
                        assert!(response.len() >= 12 && response[..2] == frame[..2]);
                    }
                }
            }
        }
    });
});
