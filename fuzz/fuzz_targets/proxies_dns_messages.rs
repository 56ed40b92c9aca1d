//! dns-proxy's handling of untrusted bytes: a client's packet, the host's
//! answer to it, and RFC 1035 TCP framing.
//!
//! Input: a 2-byte big-endian length n, n bytes of query, then the answer.

#![no_main]

use guest_protocol::dns_framing::{take_frame, PREFIX_LEN};
use guest_proxies::dns::wire::Query;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = data.to_vec();
    let mut framed = 0;
    while let Some(frame) = take_frame(&mut frames) {
        framed += PREFIX_LEN + frame.len();
    }
    assert_eq!(framed + frames.len(), data.len());

    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let split = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query, answer) = rest.split_at(split);
    let Ok(query) = Query::parse(query) else { return };
    let _ = query.servfail();
    for limit in [query.udp_limit(), usize::from(u16::MAX)] {
        if let Ok(out) = query.answer(answer, limit) {
            assert!(out.len() <= limit, "{} bytes over a {limit}-byte limit", out.len());
        }
    }
});
