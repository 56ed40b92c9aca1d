//! OpenAI Chat Completions and Responses APIs, streamed and not.
//!
//! Chat Completions streams chunks whose `choices[].delta.tool_calls[]` carry
//! an `index`: the first piece of a call has its id and function name, later
//! pieces append to `function.arguments`. With `stream_options.include_usage`
//! the last chunk (empty `choices`) has `usage`; `[DONE]` ends the stream
//! (handled by the caller). The non-streamed completion has the same fields
//! under `choices[].message`.
//!
//! Responses streams typed events: `response.output_item.added/done` carry
//! output items (`function_call`, `custom_tool_call`, `mcp_call`, built-in
//! `*_call`s), `response.function_call_arguments.delta/done` the arguments,
//! and `response.completed` / `incomplete` / `failed` the final response with
//! `usage`. The non-streamed body is that final response object.

use serde_json::Value;

use super::{position, str_field, u64_field, Draft};

pub(super) fn apply_chat(draft: &mut Draft, chunk: &Value) {
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        draft.provider_error(error);
        return;
    }
    draft.set_model(str_field(chunk, "model"));
    if let Some(choices) = chunk.get("choices").and_then(Value::as_array) {
        for (pos, choice) in choices.iter().enumerate() {
            let choice_index = u64_field(choice, "index").unwrap_or(position(pos));
            if let Some(reason) = str_field(choice, "finish_reason") {
                draft.set_stop(reason);
            }
            let calls = choice
                .get("delta")
                .or_else(|| choice.get("message"))
                .and_then(|m| m.get("tool_calls"))
                .and_then(Value::as_array);
            for (tool_pos, call) in calls.into_iter().flatten().enumerate() {
                let tool_index = u64_field(call, "index").unwrap_or(position(tool_pos));
                let Some(tool) = draft.tool((choice_index, tool_index)) else {
                    continue;
                };
                tool.set_call_id(str_field(call, "id"));
                // `function` for function tools, `custom` for free-form custom tools.
                if let Some(function) = call.get("function").or_else(|| call.get("custom")) {
                    if tool.name.is_empty() {
                        tool.set_name(str_field(function, "name"));
                    }
                    if let Some(part) = str_field(function, "arguments").or_else(|| str_field(function, "input")) {
                        tool.append_arguments(part);
                    }
                }
            }
        }
    }
    if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
        let cached = usage.get("prompt_tokens_details").and_then(|d| u64_field(d, "cached_tokens"));
        apply_usage(draft, u64_field(usage, "prompt_tokens"), cached, u64_field(usage, "completion_tokens"));
    }
    if str_field(chunk, "object") == Some("chat.completion") {
        draft.call.complete = true;
    }
}

pub(super) fn apply_responses(draft: &mut Draft, event: &Value) {
    let output_index = u64_field(event, "output_index").unwrap_or(0);
    match str_field(event, "type") {
        Some("response.created" | "response.in_progress" | "response.queued") => {
            if let Some(response) = event.get("response") {
                draft.set_model(str_field(response, "model"));
            }
        }
        Some("response.output_item.added" | "response.output_item.done") => {
            if let Some(item) = event.get("item") {
                apply_item(draft, output_index, item);
            }
        }
        Some(
            "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta"
            | "response.mcp_call_arguments.delta",
        ) => {
            if let (Some(delta), Some(tool)) = (str_field(event, "delta"), draft.existing_tool((output_index, 0))) {
                tool.append_arguments(delta);
            }
        }
        Some(
            "response.function_call_arguments.done"
            | "response.custom_tool_call_input.done"
            | "response.mcp_call_arguments.done",
        ) => {
            let arguments = event.get("arguments").or_else(|| event.get("input"));
            if let (Some(arguments), Some(tool)) = (arguments, draft.existing_tool((output_index, 0))) {
                tool.set_arguments(arguments);
            }
        }
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            if let Some(response) = event.get("response") {
                apply_response(draft, response);
            }
        }
        Some("error") => draft.provider_error(event.get("error").unwrap_or(event)),
        _ if str_field(event, "object") == Some("response") => apply_response(draft, event),
        _ => {
            if let Some(error) = event.get("error").filter(|e| e.is_object()) {
                draft.provider_error(error);
            }
        }
    }
}

/// A finished response: the streamed `response.completed` payload or the
/// non-streamed body.
fn apply_response(draft: &mut Draft, response: &Value) {
    draft.set_model(str_field(response, "model"));
    match str_field(response, "status") {
        Some("incomplete") => {
            let reason = response.get("incomplete_details").and_then(|d| str_field(d, "reason"));
            draft.set_stop(reason.unwrap_or("incomplete"));
        }
        Some(status) => draft.set_stop(status),
        None => {}
    }
    if let Some(error) = response.get("error").filter(|e| e.is_object()) {
        draft.provider_error(error);
    }
    if let Some(output) = response.get("output").and_then(Value::as_array) {
        for (index, item) in output.iter().enumerate() {
            apply_item(draft, position(index), item);
        }
    }
    if let Some(usage) = response.get("usage").filter(|u| u.is_object()) {
        let cached = usage.get("input_tokens_details").and_then(|d| u64_field(d, "cached_tokens"));
        apply_usage(draft, u64_field(usage, "input_tokens"), cached, u64_field(usage, "output_tokens"));
    }
    draft.call.complete = true;
}

/// An output item; only tool calls are kept. A complete item replaces the
/// arguments accumulated from deltas.
fn apply_item(draft: &mut Draft, output_index: u64, item: &Value) {
    let Some(kind) = str_field(item, "type") else {
        return;
    };
    let (name, arguments) = match kind {
        "function_call" | "mcp_call" => (str_field(item, "name"), item.get("arguments")),
        "custom_tool_call" => (str_field(item, "name"), item.get("input")),
        // Built-in tools (web_search_call, code_interpreter_call, ...) are
        // named by their type; their action is their arguments.
        other if other.ends_with("_call") => (Some(other), item.get("action")),
        _ => return,
    };
    let call_id = str_field(item, "call_id").or_else(|| str_field(item, "id"));
    // The same call seen before under another index is the same call.
    let key = call_id.and_then(|id| draft.tool_key_by_call_id(id)).unwrap_or((output_index, 0));
    let Some(tool) = draft.tool(key) else { return };
    tool.set_name(name);
    tool.set_call_id(call_id);
    if let Some(arguments) = arguments.filter(|a| !a.is_null() && a.as_str() != Some("")) {
        tool.set_arguments(arguments);
    }
}

/// OpenAI counts cached tokens inside the prompt tokens; split them out.
fn apply_usage(draft: &mut Draft, prompt: Option<u64>, cached: Option<u64>, output: Option<u64>) {
    if let Some(prompt) = prompt {
        draft.call.input_tokens = Some(prompt.saturating_sub(cached.unwrap_or(0)));
    }
    if cached.is_some() {
        draft.call.cache_read_tokens = cached;
    }
    if output.is_some() {
        draft.call.output_tokens = output;
    }
}
