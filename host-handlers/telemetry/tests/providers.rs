//! Hand-written provider responses through `StreamParser`, fed in many chunk
//! sizes: full streams with several tool calls and usage in the last event,
//! non-streamed bodies, streams cut in the middle and streams with one
//! malformed event.
#![allow(clippy::unwrap_used)]

use telemetry::ai::{ModelCall, StreamParser, ToolCall};

const ANTHROPIC: (&str, &str) = ("api.anthropic.com", "/v1/messages");
const OPENAI_CHAT: (&str, &str) = ("api.openai.com", "/v1/chat/completions");
const OPENAI_RESPONSES: (&str, &str) = ("api.openai.com", "/v1/responses");
const GEMINI_SSE: (&str, &str) =
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
const GEMINI_ARRAY: (&str, &str) =
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:streamGenerateContent");
const GEMINI: (&str, &str) = ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:generateContent");

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parse `body` fed in chunks of `piece` bytes.
fn parse_pieces(endpoint: (&str, &str), content_type: Option<&str>, body: &[u8], piece: usize) -> ModelCall {
    let mut parser = StreamParser::for_request(endpoint.0, endpoint.1, content_type).unwrap();
    for chunk in body.chunks(piece) {
        parser.feed(chunk);
    }
    parser.finish()
}

/// Parse `body` in several chunkings (with and without a content type) and
/// check they all agree before returning the result.
fn parse(endpoint: (&str, &str), content_type: &str, body: &[u8]) -> ModelCall {
    let whole = parse_pieces(endpoint, Some(content_type), body, body.len().max(1));
    for piece in [1, 2, 3, 7, 64, 1000] {
        assert_eq!(parse_pieces(endpoint, Some(content_type), body, piece), whole, "chunks of {piece}");
        assert_eq!(parse_pieces(endpoint, None, body, piece), whole, "chunks of {piece}, no content type");
    }
    whole
}

/// `body` cut in the middle of the first occurrence of `marker`.
fn cut_at<'a>(body: &'a [u8], marker: &str) -> &'a [u8] {
    let text = std::str::from_utf8(body).unwrap();
    let at = text.find(marker).unwrap() + marker.len() / 2;
    &body[..at]
}

fn tool(name: &str, arguments: &str, call_id: Option<&str>) -> ToolCall {
    ToolCall { name: name.into(), arguments_preview: arguments.into(), call_id: call_id.map(Into::into) }
}

#[test]
fn anthropic_stream_with_two_tool_calls() {
    let call = parse(ANTHROPIC, "text/event-stream", &fixture("anthropic_stream.sse"));
    assert_eq!(call.provider, "anthropic");
    assert_eq!(call.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(call.input_tokens, Some(472));
    assert_eq!(call.cache_write_tokens, Some(1200));
    assert_eq!(call.cache_read_tokens, Some(8000));
    assert_eq!(call.output_tokens, Some(89), "usage from the last message_delta");
    assert_eq!(call.stop_reason.as_deref(), Some("tool_use"));
    assert!(call.complete);
    assert!(call.problems.is_empty(), "{:?}", call.problems);
    assert_eq!(
        call.tool_calls,
        vec![
            tool(
                "get_weather",
                "{\"location\": \"San Francisco, CA\", \"unit\": \"°C\"}",
                Some("toolu_01A09q90qw90lq917835lq9")
            ),
            tool("get_time", "{\"tz\": \"America/Los_Angeles\"}", Some("toolu_01B")),
        ]
    );
}

#[test]
fn anthropic_stream_cut_in_the_middle() {
    let body = fixture("anthropic_stream.sse");
    let call = parse(ANTHROPIC, "text/event-stream", cut_at(&body, "ncisco, CA"));
    assert!(!call.complete);
    assert_eq!(call.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(call.input_tokens, Some(472));
    assert_eq!(call.output_tokens, Some(2), "only message_start's usage arrived");
    assert_eq!(call.stop_reason, None);
    assert_eq!(
        call.tool_calls,
        vec![tool("get_weather", "{\"location\": \"San Fra", Some("toolu_01A09q90qw90lq917835lq9"))]
    );
    assert!(call.problems.iter().any(|p| p.contains("ended in the middle")), "{:?}", call.problems);
}

#[test]
fn anthropic_stream_with_a_malformed_event() {
    let call = parse(ANTHROPIC, "text/event-stream", &fixture("anthropic_malformed.sse"));
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("claude-haiku-4-5"));
    assert_eq!((call.input_tokens, call.output_tokens), (Some(50), Some(17)));
    assert_eq!(call.tool_calls, vec![tool("run_shell", "{\"cmd\": \"ls\"}", Some("toolu_X"))]);
    assert_eq!(call.problems.len(), 1, "{:?}", call.problems);
    assert!(call.problems[0].starts_with("event 4: invalid JSON"), "{:?}", call.problems);
}

#[test]
fn anthropic_message_not_streamed() {
    let call = parse(ANTHROPIC, "application/json", &fixture("anthropic_message.json"));
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("claude-opus-4-1-20250805"));
    assert_eq!((call.input_tokens, call.output_tokens), (Some(2095), Some(503)));
    assert_eq!(call.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        call.tool_calls,
        vec![
            tool("search", "{\"limit\":5,\"query\":\"rust sqlite wal\"}", Some("toolu_1")),
            tool("fetch", "{\"url\":\"https://sqlite.org/wal.html\"}", Some("toolu_2")),
        ]
    );
}

#[test]
fn anthropic_error_event() {
    let body = b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
    let call = parse(ANTHROPIC, "text/event-stream", body);
    assert_eq!(call.stop_reason.as_deref(), Some("error"));
    assert_eq!(call.problems, vec!["provider error: overloaded_error: Overloaded".to_string()]);
}

#[test]
fn openai_chat_stream_with_two_tool_calls() {
    let call = parse(OPENAI_CHAT, "text/event-stream; charset=utf-8", &fixture("openai_chat_stream.sse"));
    assert_eq!(call.provider, "openai");
    assert_eq!(call.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(call.input_tokens, Some(176), "prompt tokens minus cached tokens");
    assert_eq!(call.cache_read_tokens, Some(1024));
    assert_eq!(call.output_tokens, Some(45));
    assert_eq!(call.stop_reason.as_deref(), Some("tool_calls"));
    assert!(call.complete);
    assert!(call.problems.is_empty(), "{:?}", call.problems);
    assert_eq!(
        call.tool_calls,
        vec![
            tool("get_weather", "{\"location\":\"Paris\"}", Some("call_abc")),
            tool("get_time", "{\"tz\":\"Europe/Paris\"}", Some("call_def")),
        ]
    );
}

#[test]
fn openai_chat_stream_cut_before_usage() {
    let body = fixture("openai_chat_stream.sse");
    let call = parse(OPENAI_CHAT, "text/event-stream", cut_at(&body, "Europe/Paris"));
    assert!(!call.complete);
    assert_eq!(call.input_tokens, None);
    assert_eq!(call.output_tokens, None);
    assert_eq!(
        call.tool_calls,
        vec![tool("get_weather", "{\"location\":\"Paris\"}", Some("call_abc")), tool("get_time", "", Some("call_def"))]
    );
    assert!(call.problems.iter().any(|p| p.contains("ended in the middle")), "{:?}", call.problems);
}

#[test]
fn openai_chat_stream_with_a_malformed_event() {
    let call = parse(OPENAI_CHAT, "text/event-stream", &fixture("openai_chat_malformed.sse"));
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!((call.input_tokens, call.output_tokens, call.cache_read_tokens), (Some(80), Some(12), None));
    assert_eq!(call.stop_reason.as_deref(), Some("tool_calls"));
    assert_eq!(call.tool_calls, vec![tool("read_file", "{\"path\":", Some("call_1"))]);
    assert_eq!(call.problems.len(), 1);
    assert!(call.problems[0].starts_with("event 3: invalid JSON"), "{:?}", call.problems);
}

#[test]
fn openai_chat_not_streamed() {
    let call = parse(OPENAI_CHAT, "application/json", &fixture("openai_chat.json"));
    assert!(call.complete);
    assert_eq!((call.input_tokens, call.output_tokens, call.cache_read_tokens), (Some(50), Some(20), Some(0)));
    assert_eq!(
        call.tool_calls,
        vec![
            tool("search", "{\"q\":\"rust\"}", Some("call_1")),
            tool("open", "{\"url\":\"https://example.com/?a=[1]\"}", Some("call_2")),
        ]
    );
}

#[test]
fn openai_responses_stream_with_two_tool_calls() {
    let call = parse(OPENAI_RESPONSES, "text/event-stream", &fixture("openai_responses_stream.sse"));
    assert_eq!(call.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert_eq!((call.input_tokens, call.cache_read_tokens, call.output_tokens), (Some(200), Some(100), Some(40)));
    assert_eq!(call.stop_reason.as_deref(), Some("completed"));
    assert!(call.complete);
    assert!(call.problems.is_empty(), "{:?}", call.problems);
    assert_eq!(
        call.tool_calls,
        vec![
            tool("get_weather", "{\"location\":\"Oslo\"}", Some("call_A")),
            tool("get_news", "{\"topic\":\"skiing\"}", Some("call_B")),
        ]
    );
}

#[test]
fn openai_responses_stream_cut_in_the_middle() {
    let body = fixture("openai_responses_stream.sse");
    let call = parse(OPENAI_RESPONSES, "text/event-stream", cut_at(&body, "skiing"));
    assert!(!call.complete);
    assert_eq!(call.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert_eq!(call.input_tokens, None);
    assert_eq!(
        call.tool_calls,
        vec![
            tool("get_weather", "{\"location\":\"Oslo\"}", Some("call_A")),
            tool("get_news", "{\"topic\":", Some("call_B"))
        ]
    );
}

#[test]
fn openai_responses_stream_with_a_malformed_event() {
    let call = parse(OPENAI_RESPONSES, "text/event-stream", &fixture("openai_responses_malformed.sse"));
    assert!(call.complete);
    assert_eq!(call.stop_reason.as_deref(), Some("max_output_tokens"));
    assert_eq!((call.input_tokens, call.output_tokens), (Some(90), Some(300)));
    // The final response carries the arguments the broken delta lost.
    assert_eq!(call.tool_calls, vec![tool("list_dir", "{\"dir\":\"/tmp\"}", Some("call_Z"))]);
    assert_eq!(call.problems.len(), 1);
    assert!(call.problems[0].starts_with("event 4: invalid JSON"), "{:?}", call.problems);
}

#[test]
fn openai_responses_not_streamed() {
    let call = parse(OPENAI_RESPONSES, "application/json", &fixture("openai_responses.json"));
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("gpt-5-2025-08-07"));
    assert_eq!((call.input_tokens, call.cache_read_tokens, call.output_tokens), (Some(872), Some(128), Some(64)));
    assert_eq!(
        call.tool_calls,
        vec![
            tool("web_search_call", "{\"query\":\"sqlite wal\",\"type\":\"search\"}", Some("ws_1")),
            tool("read_file", "{\"path\":\"README.md\"}", Some("call_R")),
        ]
    );
}

fn assert_gemini_stream(call: &ModelCall) {
    assert_eq!(call.provider, "google");
    assert_eq!(call.model.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(call.input_tokens, Some(60), "prompt minus cached");
    assert_eq!(call.cache_read_tokens, Some(40));
    assert_eq!(call.output_tokens, Some(50), "candidates plus thoughts");
    assert_eq!(call.stop_reason.as_deref(), Some("STOP"));
    assert!(call.complete);
    assert!(call.problems.is_empty(), "{:?}", call.problems);
    assert_eq!(
        call.tool_calls,
        vec![tool("get_weather", "{\"city\":\"Rome\"}", None), tool("get_time", "{\"tz\":\"Europe/Rome\"}", None)]
    );
}

#[test]
fn gemini_sse_stream_with_two_function_calls() {
    assert_gemini_stream(&parse(GEMINI_SSE, "text/event-stream", &fixture("gemini_stream.sse")));
}

#[test]
fn gemini_json_array_stream_with_two_function_calls() {
    assert_gemini_stream(&parse(GEMINI_ARRAY, "application/json; charset=UTF-8", &fixture("gemini_stream.json")));
}

#[test]
fn gemini_streams_cut_in_the_middle() {
    for (endpoint, name, content_type) in [
        (GEMINI_SSE, "gemini_stream.sse", "text/event-stream"),
        (GEMINI_ARRAY, "gemini_stream.json", "application/json"),
    ] {
        let body = fixture(name);
        let call = parse(endpoint, content_type, cut_at(&body, "\"candidatesTokenCount\""));
        assert!(!call.complete, "{name}");
        assert_eq!(call.input_tokens, Some(100), "{name}: usage of the last complete chunk");
        assert_eq!(call.output_tokens, None, "{name}");
        assert_eq!(call.tool_calls.len(), 2, "{name}");
        assert!(call.problems.iter().any(|p| p.contains("middle")), "{name}: {:?}", call.problems);
    }
}

#[test]
fn gemini_array_with_a_malformed_element() {
    let call = parse(
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
        "application/json",
        &fixture("gemini_malformed.json"),
    );
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("gemini-2.0-flash"));
    assert_eq!((call.input_tokens, call.output_tokens), (Some(10), Some(7)));
    assert_eq!(call.stop_reason.as_deref(), Some("MAX_TOKENS"));
    assert_eq!(call.tool_calls, vec![tool("search", "{\"q\":\"}{\"}", None)]);
    assert_eq!(call.problems.len(), 1);
    assert!(call.problems[0].starts_with("event 2: invalid JSON"), "{:?}", call.problems);
}

#[test]
fn gemini_not_streamed() {
    let call = parse(GEMINI, "application/json", &fixture("gemini.json"));
    assert!(call.complete);
    assert_eq!(call.model.as_deref(), Some("gemini-2.5-pro"));
    assert_eq!((call.input_tokens, call.output_tokens, call.cache_read_tokens), (Some(120), Some(24), None));
    assert_eq!(
        call.tool_calls,
        vec![tool(
            "schedule_meeting",
            "{\"attendees\":[\"Bob\",\"Alice\"],\"date\":\"2025-03-27\",\"time\":\"10:00\"}",
            Some("fc-1")
        )]
    );
}

#[test]
fn gemini_model_falls_back_to_the_path() {
    let body =
        b"data: {\"candidates\": [{\"finishReason\": \"STOP\"}], \"usageMetadata\": {\"promptTokenCount\": 3}}\n\n";
    let call = parse(GEMINI_SSE, "text/event-stream", body);
    assert_eq!(call.model.as_deref(), Some("gemini-2.5-flash"));
    assert_eq!(call.input_tokens, Some(3));
}

#[test]
fn oversized_events_are_skipped_not_accumulated() {
    let big = "x".repeat(10_000);
    let body = format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{big}\"}}}}]}}\n\n\
         data: {{\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":6}}}}\n\ndata: [DONE]\n\n"
    );
    let mut parser = StreamParser::with_limit(OPENAI_CHAT.0, OPENAI_CHAT.1, None, 4096).unwrap();
    for chunk in body.as_bytes().chunks(100) {
        parser.feed(chunk);
    }
    let call = parser.finish();
    assert!(call.complete);
    assert_eq!((call.input_tokens, call.output_tokens), (Some(5), Some(6)));
    assert_eq!(call.problems, vec!["event 1: larger than 4096 bytes, skipped".to_string()]);
}

#[test]
fn long_tool_arguments_are_cut_to_the_preview_size() {
    let piece = "{\\\"data\\\": \\\"".to_string() + &"é".repeat(3000);
    let mut body = String::from(
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"write\",\"input\":{}}}\n\n",
    );
    for _ in 0..3 {
        body.push_str(&format!(
            "data: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"input_json_delta\",\"partial_json\":\"{piece}\"}}}}\n\n"
        ));
    }
    let call = parse(ANTHROPIC, "text/event-stream", body.as_bytes());
    let arguments = &call.tool_calls[0].arguments_preview;
    assert!(arguments.len() <= 4096 && arguments.len() > 4090, "{}", arguments.len());
    assert!(arguments.starts_with("{\"data\": \"éé"));
}

#[test]
fn unrelated_endpoints_get_no_parser() {
    assert!(StreamParser::for_request("api.anthropic.com", "/v1/models", None).is_none());
    assert!(StreamParser::for_request("example.com", "/v1/chat/completions", None).is_none());
}
