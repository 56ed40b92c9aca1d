//! `StreamParser` for every provider and framing on arbitrary bodies: no
//! panic, bounded results, and the same result however the body is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry::ai::{StreamParser, MAX_TOOL_CALLS};

const ENDPOINTS: [(&str, &str); 6] = [
    ("api.anthropic.com", "/v1/messages"),
    ("api.openai.com", "/v1/chat/completions"),
    ("api.openai.com", "/v1/responses"),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:generateContent"),
];
const CONTENT_TYPES: [Option<&str>; 3] = [None, Some("text/event-stream"), Some("application/json")];

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let (host, path) = ENDPOINTS[usize::from(selector) % ENDPOINTS.len()];
    let content_type = CONTENT_TYPES[usize::from(selector / 8) % CONTENT_TYPES.len()];
    let run = |piece: usize| {
        let mut parser = StreamParser::with_limit(host, path, content_type, 512).expect("known endpoint");
        for chunk in body.chunks(piece) {
            parser.feed(chunk);
        }
        parser.finish()
    };
    let whole = run(body.len().max(1));
    let pieces = run(usize::from(selector % 13) + 1);
    // The parser never sets `estimated_cost_usd`, so `==` on the whole call is exact.
    assert_eq!(whole, pieces);
    assert!(whole.tool_calls.len() <= MAX_TOOL_CALLS);
    assert!(whole.tool_calls.iter().all(|t| t.arguments_preview.len() <= 4096 && t.name.len() <= 256));
    assert!(whole.problems.len() <= 16);
});
