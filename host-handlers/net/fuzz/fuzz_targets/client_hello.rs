//! The ClientHello reader on arbitrary guest bytes: an answer or an error, never a panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return };
    runtime.block_on(async {
        let io = tokio::io::join(data, tokio::io::sink());
        if let Ok((hello, _)) = sandbox_net::client_hello::read_client_hello(io).await {
            if let Some(sni) = hello.sni {
                assert!(!sni.is_empty() && !sni.bytes().any(|b| b.is_ascii_uppercase()));
            }
        }
    });
});
