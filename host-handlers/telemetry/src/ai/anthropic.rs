//! Anthropic Messages API: streamed events and the non-streamed message.
//!
//! Stream: `message_start` carries the model and input usage;
//! `content_block_start` opens a block (a `tool_use` block names the tool);
//! `content_block_delta` with `input_json_delta` carries the tool input JSON
//! in pieces; `message_delta` carries the stop reason and cumulative usage;
//! `message_stop` ends the message; `error` reports a provider error.

use serde_json::Value;

use super::{position, str_field, u64_field, Draft};

/// Content block types that are tool calls.
const TOOL_BLOCKS: &[&str] = &["tool_use", "server_tool_use", "mcp_tool_use"];

pub(super) fn apply(draft: &mut Draft, event: &Value) {
    match str_field(event, "type") {
        Some("message_start") => {
            if let Some(message) = event.get("message") {
                apply_message(draft, message);
            }
        }
        Some("content_block_start") => {
            let index = u64_field(event, "index").unwrap_or(0);
            if let Some(block) = event.get("content_block") {
                apply_block(draft, index, block, true);
            }
        }
        Some("content_block_delta") => {
            let index = u64_field(event, "index").unwrap_or(0);
            let Some(delta) = event.get("delta") else {
                return;
            };
            if str_field(delta, "type") == Some("input_json_delta") {
                if let (Some(part), Some(tool)) = (str_field(delta, "partial_json"), draft.existing_tool((index, 0))) {
                    tool.append_arguments(part);
                }
            }
        }
        Some("message_delta") => {
            if let Some(reason) = event.get("delta").and_then(|d| str_field(d, "stop_reason")) {
                draft.set_stop(reason);
            }
            if let Some(usage) = event.get("usage") {
                apply_usage(draft, usage);
            }
        }
        Some("message_stop") => draft.call.complete = true,
        Some("error") => draft.provider_error(event.get("error").unwrap_or(event)),
        Some("message") => {
            apply_message(draft, event);
            if let Some(content) = event.get("content").and_then(Value::as_array) {
                for (index, block) in content.iter().enumerate() {
                    apply_block(draft, position(index), block, false);
                }
            }
            draft.call.complete = true;
        }
        _ => {}
    }
}

fn apply_message(draft: &mut Draft, message: &Value) {
    draft.set_model(str_field(message, "model"));
    if let Some(reason) = str_field(message, "stop_reason") {
        draft.set_stop(reason);
    }
    if let Some(usage) = message.get("usage") {
        apply_usage(draft, usage);
    }
}

/// Usage fields present in `usage` replace what was known (they are cumulative).
fn apply_usage(draft: &mut Draft, usage: &Value) {
    let call = &mut draft.call;
    for (key, slot) in [
        ("input_tokens", &mut call.input_tokens),
        ("output_tokens", &mut call.output_tokens),
        ("cache_read_input_tokens", &mut call.cache_read_tokens),
        ("cache_creation_input_tokens", &mut call.cache_write_tokens),
    ] {
        if let Some(n) = u64_field(usage, key) {
            *slot = Some(n);
        }
    }
}

/// A content block; in a stream its `input` is `{}` and arrives in deltas.
fn apply_block(draft: &mut Draft, index: u64, block: &Value, streamed: bool) {
    let is_tool = str_field(block, "type").is_some_and(|t| TOOL_BLOCKS.contains(&t));
    if !is_tool {
        return;
    }
    let Some(tool) = draft.tool((index, 0)) else {
        return;
    };
    tool.set_name(str_field(block, "name"));
    tool.set_call_id(str_field(block, "id"));
    match block.get("input") {
        Some(Value::Object(input)) if streamed && input.is_empty() => {}
        Some(input) => tool.set_arguments(input),
        None => {}
    }
}
