//! Model calls parsed from AI provider responses (streamed or not).
//!
//! [`StreamParser::for_request`] recognises a provider endpoint by host and
//! path; the handler then feeds the (decoded) response body chunk by chunk as
//! it passes to the guest and calls [`StreamParser::finish`] when the body
//! ends or the connection breaks. Nothing is buffered beyond the current event
//! (or JSON object), and that is bounded: an event over the limit is skipped
//! and noted in [`ModelCall::problems`].
//!
//! Supported:
//! - Anthropic Messages (`api.anthropic.com/v1/messages`): SSE events
//!   `message_start`, `content_block_start` (`tool_use`), `content_block_delta`
//!   (`input_json_delta`), `message_delta` (usage, stop reason), `message_stop`;
//!   and the non-streamed message.
//! - OpenAI Chat Completions (`/v1/chat/completions`, also Azure OpenAI):
//!   chunks with `choices[].delta.tool_calls` by index, usage in the last
//!   chunk, `[DONE]`; and the non-streamed completion.
//! - OpenAI Responses (`/v1/responses`): `response.output_item.*`,
//!   `response.function_call_arguments.*`, `response.completed` (usage); and
//!   the non-streamed response object.
//! - Google Gemini `generateContent` / `streamGenerateContent`
//!   (generativelanguage and Vertex AI hosts), as SSE (`alt=sse`) or as a
//!   streamed JSON array: `usageMetadata`, `functionCall` parts, `finishReason`.
//!
//! Token counts are normalised across providers: `input_tokens` counts input
//! billed at the full rate (OpenAI's and Gemini's cached tokens are moved to
//! `cache_read_tokens`), `output_tokens` includes reasoning/thinking tokens.
//!
//! A malformed event, a cut stream or an unknown shape never stops parsing:
//! the call keeps what was known and lists what went wrong in `problems`.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::preview::{push_bounded, truncate_str, PREVIEW_LIMIT};

mod anthropic;
mod gemini;
pub mod json_stream;
mod openai;
pub mod prices;
pub mod sse;

use json_stream::{JsonItem, JsonSplitter};
use sse::{SseItem, SseParser};

/// Default limit for one SSE event or one JSON object of a response.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;
/// Most tool calls kept per model call.
pub const MAX_TOOL_CALLS: usize = 1024;
/// Most problems kept per model call.
const MAX_PROBLEMS: usize = 16;
/// Longest model name, tool name, call id or stop reason kept.
const MAX_NAME: usize = 256;
/// Longest problem description kept.
const MAX_PROBLEM_TEXT: usize = 300;

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text, first 4 KiB (cut on a character boundary).
    pub arguments_preview: String,
    /// The provider's id for the call (`toolu_...`, `call_...`), if it sent one.
    pub call_id: Option<String>,
}

/// What one provider response said about the model call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelCall {
    pub provider: String,
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_read_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    pub stop_reason: Option<String>,
    pub estimated_cost_usd: Option<f64>,
    pub tool_calls: Vec<ToolCall>,
    /// The provider's end-of-response marker was seen (or the whole
    /// non-streamed body was parsed). False for a stream that was cut.
    pub complete: bool,
    /// What could not be parsed: malformed or oversized events, a cut stream.
    pub problems: Vec<String>,
}

/// Which API's response format the body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    AnthropicMessages,
    OpenAiChat,
    OpenAiResponses,
    Gemini,
}

/// How the body is framed; decided by the content type or the first byte.
#[derive(Debug)]
enum Framing {
    Undecided,
    Sse(SseParser),
    Json(JsonSplitter),
    /// The body is compressed: nothing can be parsed from it.
    Compressed,
}

/// Incremental parser for one response body.
#[derive(Debug)]
pub struct StreamParser {
    api: Api,
    framing: Framing,
    max_event_bytes: usize,
    draft: Draft,
    sse_items: Vec<SseItem>,
    json_items: Vec<JsonItem>,
}

impl StreamParser {
    /// A parser if `host` + `path` is a known provider endpoint.
    /// `content_type` is the response's, when known; without it the framing
    /// is recognised from the first byte of the body.
    pub fn for_request(host: &str, path: &str, content_type: Option<&str>) -> Option<StreamParser> {
        Self::with_limit(host, path, content_type, DEFAULT_MAX_EVENT_BYTES)
    }

    /// Like [`StreamParser::for_request`], skipping any single event or JSON
    /// object larger than `max_event_bytes`.
    pub fn with_limit(
        host: &str,
        path: &str,
        content_type: Option<&str>,
        max_event_bytes: usize,
    ) -> Option<StreamParser> {
        let (api, provider) = endpoint(host, path)?;
        let mut draft = Draft::new(provider);
        if api == Api::Gemini {
            draft.set_model(gemini::model_from_path(path));
        }
        let content_type = content_type.map(str::to_ascii_lowercase);
        let framing = match content_type.as_deref() {
            Some(t) if t.starts_with("text/event-stream") => Framing::Sse(SseParser::new(max_event_bytes)),
            Some(t) if t.starts_with("application/json") => Framing::Json(JsonSplitter::new(max_event_bytes)),
            _ => Framing::Undecided,
        };
        Some(StreamParser { api, framing, max_event_bytes, draft, sse_items: Vec::new(), json_items: Vec::new() })
    }

    /// Feed the next chunk of the body (any split, even inside a UTF-8 char).
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut chunk = chunk;
        if !self.draft.body_started {
            let Some(start) = chunk.iter().position(|b| !b.is_ascii_whitespace()) else {
                return;
            };
            chunk = &chunk[start..];
            self.draft.body_started = true;
            if chunk[0] == 0x1f {
                self.draft.problem("the body is compressed; only a decoded body can be parsed".into());
                self.framing = Framing::Compressed;
            } else if matches!(self.framing, Framing::Undecided) {
                self.framing = if matches!(chunk[0], b'{' | b'[') {
                    Framing::Json(JsonSplitter::new(self.max_event_bytes))
                } else {
                    Framing::Sse(SseParser::new(self.max_event_bytes))
                };
            }
        }
        match &mut self.framing {
            Framing::Sse(parser) => {
                parser.feed(chunk, &mut self.sse_items);
                self.take_sse_items();
            }
            Framing::Json(splitter) => {
                splitter.feed(chunk, &mut self.json_items);
                self.take_json_items();
            }
            Framing::Undecided | Framing::Compressed => {}
        }
    }

    /// The call, with whatever was known when the body ended or was cut.
    pub fn finish(mut self) -> ModelCall {
        match &mut self.framing {
            Framing::Sse(parser) => {
                let cut = parser.finish(&mut self.sse_items);
                self.take_sse_items();
                if cut {
                    self.draft.problem("the stream ended in the middle of an event".into());
                }
            }
            Framing::Json(splitter) => {
                if splitter.in_item() {
                    self.draft.problem("the body ended in the middle of a JSON object".into());
                }
                if splitter.array_closed() {
                    self.draft.call.complete = true;
                }
            }
            Framing::Undecided => self.draft.problem("the response had no body".into()),
            Framing::Compressed => {}
        }
        self.draft.into_call()
    }

    fn take_sse_items(&mut self) {
        for item in self.sse_items.drain(..) {
            self.draft.events += 1;
            match item {
                SseItem::Oversized => self.draft.oversized(self.max_event_bytes),
                SseItem::Event { data, .. } if data.trim() == "[DONE]" => self.draft.call.complete = true,
                SseItem::Event { data, .. } => self.draft.apply_json(self.api, data.as_bytes()),
            }
        }
    }

    fn take_json_items(&mut self) {
        for item in self.json_items.drain(..) {
            self.draft.events += 1;
            match item {
                JsonItem::Oversized => self.draft.oversized(self.max_event_bytes),
                JsonItem::Value(bytes) => self.draft.apply_json(self.api, &bytes),
            }
        }
    }
}

/// The API and provider name for a request, if it is a model endpoint.
fn endpoint(host: &str, path: &str) -> Option<(Api, &'static str)> {
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let path = path.split(['?', '#']).next().unwrap_or(path).trim_end_matches('/');
    let gemini = || {
        path.contains("/models/") && (path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent"))
    };
    match host.as_str() {
        "api.anthropic.com" if path == "/v1/messages" => Some((Api::AnthropicMessages, "anthropic")),
        "api.openai.com" if path == "/v1/chat/completions" => Some((Api::OpenAiChat, "openai")),
        "api.openai.com" if path == "/v1/responses" => Some((Api::OpenAiResponses, "openai")),
        "generativelanguage.googleapis.com" if gemini() => Some((Api::Gemini, "google")),
        h if h.ends_with("aiplatform.googleapis.com") && gemini() => Some((Api::Gemini, "google-vertex")),
        h if h.ends_with(".openai.azure.com") && path.ends_with("/chat/completions") => {
            Some((Api::OpenAiChat, "azure-openai"))
        }
        h if h.ends_with(".openai.azure.com") && path.ends_with("/responses") => {
            Some((Api::OpenAiResponses, "azure-openai"))
        }
        _ => None,
    }
}

/// A tool call being assembled.
#[derive(Debug, Default)]
struct ToolDraft {
    call_id: Option<String>,
    name: String,
    arguments: String,
}

/// The call being assembled from events.
#[derive(Debug)]
struct Draft {
    call: ModelCall,
    /// Tool calls by (choice or candidate, position); ordered as they appear.
    tools: BTreeMap<(u64, u64), ToolDraft>,
    tools_dropped: u64,
    problems_dropped: u64,
    /// Events (or JSON objects) seen, to point at the malformed one.
    events: u64,
    body_started: bool,
}

impl Draft {
    fn new(provider: &str) -> Draft {
        Draft {
            call: ModelCall { provider: provider.to_owned(), ..ModelCall::default() },
            tools: BTreeMap::new(),
            tools_dropped: 0,
            problems_dropped: 0,
            events: 0,
            body_started: false,
        }
    }

    fn apply_json(&mut self, api: Api, bytes: &[u8]) {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(value) => value,
            Err(e) => {
                self.problem(format!("event {}: invalid JSON: {e}", self.events));
                return;
            }
        };
        match api {
            Api::AnthropicMessages => anthropic::apply(self, &value),
            Api::OpenAiChat => openai::apply_chat(self, &value),
            Api::OpenAiResponses => openai::apply_responses(self, &value),
            Api::Gemini => gemini::apply(self, &value),
        }
    }

    fn oversized(&mut self, limit: usize) {
        self.problem(format!("event {}: larger than {limit} bytes, skipped", self.events));
    }

    fn problem(&mut self, text: String) {
        if self.call.problems.len() < MAX_PROBLEMS {
            self.call.problems.push(truncate_str(&text, MAX_PROBLEM_TEXT).to_owned());
        } else {
            self.problems_dropped += 1;
        }
    }

    /// An error reported by the provider, in the body or as a stream event.
    fn provider_error(&mut self, error: &Value) {
        let kind = str_field(error, "type")
            .or_else(|| str_field(error, "status"))
            .or_else(|| str_field(error, "code"))
            .unwrap_or("error");
        let message = str_field(error, "message").unwrap_or("");
        self.problem(format!("provider error: {kind}: {message}"));
        if self.call.stop_reason.is_none() {
            self.set_stop("error");
        }
        self.call.complete = true;
    }

    fn set_model(&mut self, model: Option<&str>) {
        if let Some(model) = model.filter(|m| !m.is_empty()) {
            self.call.model = Some(truncate_str(model, MAX_NAME).to_owned());
        }
    }

    fn set_stop(&mut self, reason: &str) {
        self.call.stop_reason = Some(truncate_str(reason, MAX_NAME).to_owned());
    }

    /// The tool call at `key`, created if new (and if there is room).
    fn tool(&mut self, key: (u64, u64)) -> Option<&mut ToolDraft> {
        if !self.tools.contains_key(&key) && self.tools.len() >= MAX_TOOL_CALLS {
            self.tools_dropped += 1;
            return None;
        }
        Some(self.tools.entry(key).or_default())
    }

    /// The tool call at `key` if it was started (deltas for unknown calls are ignored).
    fn existing_tool(&mut self, key: (u64, u64)) -> Option<&mut ToolDraft> {
        self.tools.get_mut(&key)
    }

    /// The key of the tool call with provider id `call_id`, if known.
    fn tool_key_by_call_id(&self, call_id: &str) -> Option<(u64, u64)> {
        self.tools.iter().find(|(_, t)| t.call_id.as_deref() == Some(call_id)).map(|(key, _)| *key)
    }

    /// A key after every tool call so far, for providers that only append.
    fn next_tool_key(&self, group: u64) -> (u64, u64) {
        let next = self.tools.range((group, 0)..=(group, u64::MAX)).next_back().map_or(0, |((_, n), _)| n + 1);
        (group, next)
    }

    fn into_call(mut self) -> ModelCall {
        if self.tools_dropped > 0 {
            let text = format!("{} more tool calls than the {MAX_TOOL_CALLS} kept", self.tools_dropped);
            self.problem(text);
        }
        if self.problems_dropped > 0 {
            let text = format!("and {} more problems", self.problems_dropped);
            if let Some(last) = self.call.problems.last_mut() {
                *last = text;
            }
        }
        self.call.tool_calls = self
            .tools
            .into_values()
            .map(|t| ToolCall { name: t.name, arguments_preview: t.arguments, call_id: t.call_id })
            .collect();
        self.call
    }
}

impl ToolDraft {
    fn set_name(&mut self, name: Option<&str>) {
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            self.name = truncate_str(name, MAX_NAME).to_owned();
        }
    }

    fn set_call_id(&mut self, id: Option<&str>) {
        if let Some(id) = id.filter(|i| !i.is_empty()) {
            self.call_id = Some(truncate_str(id, MAX_NAME).to_owned());
        }
    }

    fn append_arguments(&mut self, part: &str) {
        push_bounded(&mut self.arguments, part, PREVIEW_LIMIT);
    }

    /// Replace the arguments with a complete value: a JSON string holding
    /// the arguments text (OpenAI), or the arguments object itself.
    fn set_arguments(&mut self, arguments: &Value) {
        self.arguments = match arguments {
            Value::String(text) => truncate_str(text, PREVIEW_LIMIT).to_owned(),
            other => truncate_str(&other.to_string(), PREVIEW_LIMIT).to_owned(),
        };
    }
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn u64_field(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

/// The position of an array element as a key part.
fn position(index: usize) -> u64 {
    u64::try_from(index).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_recognised_by_host_and_path() {
        let api = endpoint;
        assert_eq!(api("api.anthropic.com", "/v1/messages"), Some((Api::AnthropicMessages, "anthropic")));
        assert_eq!(
            api("API.Anthropic.com.:443", "/v1/messages?beta=true"),
            Some((Api::AnthropicMessages, "anthropic"))
        );
        assert_eq!(api("api.anthropic.com", "/v1/messages/count_tokens"), None);
        assert_eq!(api("api.openai.com", "/v1/chat/completions"), Some((Api::OpenAiChat, "openai")));
        assert_eq!(api("api.openai.com", "/v1/responses"), Some((Api::OpenAiResponses, "openai")));
        assert_eq!(api("api.openai.com", "/v1/responses/resp_1/input_items"), None);
        assert_eq!(
            api("my.openai.azure.com", "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            Some((Api::OpenAiChat, "azure-openai"))
        );
        assert_eq!(
            api("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
            Some((Api::Gemini, "google"))
        );
        assert_eq!(
            api(
                "us-central1-aiplatform.googleapis.com",
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
            ),
            Some((Api::Gemini, "google-vertex"))
        );
        assert_eq!(api("generativelanguage.googleapis.com", "/v1beta/models"), None);
        assert_eq!(api("example.com", "/v1/messages"), None);
        assert_eq!(api("api.anthropic.com.evil.example", "/v1/messages"), None);
    }

    #[test]
    fn compressed_and_empty_bodies_are_noted() {
        let mut parser = StreamParser::for_request("api.openai.com", "/v1/chat/completions", None).unwrap();
        parser.feed(&[0x1f, 0x8b, 0x08, 0x00]);
        let call = parser.finish();
        assert_eq!(call.provider, "openai");
        assert!(call.problems.iter().any(|p| p.contains("compressed")), "{:?}", call.problems);
        let call = StreamParser::for_request("api.openai.com", "/v1/responses", None).unwrap().finish();
        assert!(!call.complete && call.problems.iter().any(|p| p.contains("no body")), "{call:?}");
    }
}
