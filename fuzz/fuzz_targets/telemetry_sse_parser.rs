//! The SSE parser on arbitrary bytes: no panic, events within the limit, and
//! the same events however the input is split into chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry::ai::sse::{SseItem, SseParser};

const LIMIT: usize = 256;

fn parse<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<SseItem>, bool) {
    let mut parser = SseParser::new(LIMIT);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, &mut out);
    }
    let cut = parser.finish(&mut out);
    (out, cut)
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, body)) = input.split_first() else {
        return;
    };
    let whole = parse(std::iter::once(body));
    let pieces = parse(body.chunks(usize::from(split % 17) + 1));
    assert_eq!(whole, pieces);
    for item in &whole.0 {
        if let SseItem::Event { data, .. } = item {
            // Lossy UTF-8 replacement may grow invalid bytes up to 3x.
            assert!(data.len() <= LIMIT * 3);
        }
    }
});
