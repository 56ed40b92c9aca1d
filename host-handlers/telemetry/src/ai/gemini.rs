//! Google Gemini `generateContent` / `streamGenerateContent`.
//!
//! Every streamed chunk (an SSE event with `alt=sse`, else an element of a
//! JSON array) is a `GenerateContentResponse`, like the non-streamed body:
//! `candidates[].content.parts[]` may hold complete `functionCall`s,
//! `candidates[].finishReason` marks the end, `usageMetadata` holds the
//! cumulative usage and `modelVersion` the model.

use serde_json::Value;

use super::{position, str_field, u64_field, Draft};

/// The model named in a request path such as
/// `/v1beta/models/gemini-2.5-flash:streamGenerateContent`.
pub(super) fn model_from_path(path: &str) -> Option<&str> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let (_, rest) = path.rsplit_once("/models/")?;
    rest.split(':').next().filter(|m| !m.is_empty())
}

pub(super) fn apply(draft: &mut Draft, chunk: &Value) {
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        draft.provider_error(error);
        return;
    }
    draft.set_model(str_field(chunk, "modelVersion"));
    if let Some(usage) = chunk.get("usageMetadata") {
        apply_usage(draft, usage);
    }
    if let Some(reason) = chunk.get("promptFeedback").and_then(|f| str_field(f, "blockReason")) {
        draft.set_stop(&format!("blocked: {reason}"));
        draft.call.complete = true;
    }
    let Some(candidates) = chunk.get("candidates").and_then(Value::as_array) else {
        return;
    };
    for (pos, candidate) in candidates.iter().enumerate() {
        let index = u64_field(candidate, "index").unwrap_or(position(pos));
        let parts = candidate.get("content").and_then(|c| c.get("parts")).and_then(Value::as_array);
        for call in parts.into_iter().flatten().filter_map(|part| part.get("functionCall")) {
            let key = draft.next_tool_key(index);
            let Some(tool) = draft.tool(key) else {
                continue;
            };
            tool.set_name(str_field(call, "name"));
            tool.set_call_id(str_field(call, "id"));
            if let Some(args) = call.get("args") {
                tool.set_arguments(args);
            }
        }
        if let Some(reason) = str_field(candidate, "finishReason") {
            draft.set_stop(reason);
            draft.call.complete = true;
        }
    }
}

/// Gemini counts cached tokens inside `promptTokenCount` and thinking tokens
/// outside `candidatesTokenCount`; tool-use prompt tokens are input too.
fn apply_usage(draft: &mut Draft, usage: &Value) {
    let prompt = u64_field(usage, "promptTokenCount");
    let cached = u64_field(usage, "cachedContentTokenCount");
    let tool_prompt = u64_field(usage, "toolUsePromptTokenCount");
    let candidates = u64_field(usage, "candidatesTokenCount");
    let thoughts = u64_field(usage, "thoughtsTokenCount");
    if prompt.is_some() || tool_prompt.is_some() {
        let input = prompt.unwrap_or(0).saturating_add(tool_prompt.unwrap_or(0));
        draft.call.input_tokens = Some(input.saturating_sub(cached.unwrap_or(0)));
    }
    if cached.is_some() {
        draft.call.cache_read_tokens = cached;
    }
    if candidates.is_some() || thoughts.is_some() {
        draft.call.output_tokens = Some(candidates.unwrap_or(0).saturating_add(thoughts.unwrap_or(0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_comes_from_the_path() {
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            model_from_path("/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent"),
            Some("gemini-2.5-pro")
        );
        assert_eq!(model_from_path("/v1beta/models/:generateContent"), None);
    }
}
