//! Model calls parsed from AI provider responses (streamed or not).

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments_preview: String,
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
}

/// Incremental parser for one response body.
#[derive(Debug)]
pub struct StreamParser {}

impl StreamParser {
    /// A parser if `host` + `path` is a known provider endpoint.
    pub fn for_request(_host: &str, _path: &str, _content_type: Option<&str>) -> Option<StreamParser> {
        None
    }
    /// Feed the next chunk of the body (any split, even inside a UTF-8 char).
    pub fn feed(&mut self, _chunk: &[u8]) {}
    /// The call, with whatever was known when the body ended or was cut.
    pub fn finish(self) -> ModelCall {
        ModelCall::default()
    }
}
