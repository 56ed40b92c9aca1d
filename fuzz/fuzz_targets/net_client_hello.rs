//! The ClientHello readers on arbitrary guest bytes (the MITM's, and the
//! passthrough one that keeps every byte): an answer or an error, never a
//! panic or hang, and the two agree on the server name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return };
    runtime.block_on(async {
        let io = tokio::io::join(data, tokio::io::sink());
        let read = net::client_hello::read_client_hello(io).await.map(|(hello, _)| hello.sni);
        if let Ok(Some(sni)) = &read {
            assert!(!sni.is_empty() && !sni.bytes().any(|b| b.is_ascii_uppercase()));
        }
        let mut bytes = data;
        let peeked = net::client_hello::peek_server_name(&mut bytes).await;
        if let Ok((sni, raw)) = &peeked {
            assert!(data.starts_with(raw), "the bytes kept are the bytes read, in order");
            if let Ok(read) = &read {
                assert_eq!(sni, read);
            }
        }
    });
});
