//! The Connect protocol (connectrpc.com/docs/protocol) as envd speaks it
//! to the E2B SDKs, with the JSON codec: unary calls are a JSON body in and
//! out; a server stream takes one enveloped message and answers with
//! enveloped messages and an end-of-stream envelope; errors are
//! `{"code": "not_found", "message": "..."}`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt as _};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest request message: enough for a command line and its environment.
pub const MAX_REQUEST: usize = 1 << 20;
/// The envelope flag of the end-of-stream message.
const END_STREAM: u8 = 0x02;
/// The envelope flag of a compressed message (not accepted).
const COMPRESSED: u8 = 0x01;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
    ResourceExhausted,
}

impl Code {
    fn name(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
            Code::ResourceExhausted => "resource_exhausted",
        }
    }

    /// The HTTP status a unary error answers with (the protocol's table).
    fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// An error a call answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new(Code::InvalidArgument, message)
    }

    pub fn unimplemented(what: &str) -> RpcError {
        RpcError::new(Code::Unimplemented, format!("{what} is not supported by this server"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.name(), "message": self.message })
    }
}

impl From<sandbox::Error> for RpcError {
    fn from(e: sandbox::Error) -> RpcError {
        use sandbox::{AgentError, Error as E, FsErrorKind as K};
        let code = match &e {
            E::NoSuchSandbox(_) => Code::NotFound,
            E::NotRunning(_) => Code::Unavailable,
            E::Agent(AgentError::Fs { kind, .. }) => match kind {
                K::NotFound => Code::NotFound,
                K::AlreadyExists => Code::AlreadyExists,
                K::PermissionDenied => Code::PermissionDenied,
                K::NotADirectory | K::InvalidInput => Code::InvalidArgument,
                K::Other => Code::Internal,
            },
            E::Agent(AgentError::Remote(_)) | E::Config(_) => Code::InvalidArgument,
            E::Agent(AgentError::TooLarge { .. }) => Code::ResourceExhausted,
            E::Agent(AgentError::Timeout(_)) => Code::Unavailable,
            _ => Code::Internal,
        };
        if code == Code::Internal {
            tracing::warn!("envd call failed: {e}");
        }
        RpcError::new(code, e.to_string())
    }
}

impl From<crate::ApiError> for RpcError {
    fn from(e: crate::ApiError) -> RpcError {
        let code = match e.status {
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::PAYLOAD_TOO_LARGE => Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            s if s.is_client_error() => Code::InvalidArgument,
            _ => Code::Internal,
        };
        RpcError::new(code, e.message)
    }
}

impl IntoResponse for RpcError {
    /// A unary call's error.
    fn into_response(self) -> Response {
        (self.code.status(), axum::Json(self.json())).into_response()
    }
}

/// The request message of a unary call: its JSON body (`{}` when empty).
pub fn unary_request<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, RpcError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return Err(RpcError::invalid(format!(
            "content type {content_type:?}: this server speaks the Connect protocol with JSON (application/json)"
        )));
    }
    decode(if body.is_empty() { b"{}" } else { body })
}

/// A unary call's answer.
pub fn unary_response<T: Serialize>(message: &T) -> Response {
    axum::Json(message).into_response()
}

/// The one request message of a server-streaming call: a single envelope.
pub fn stream_request<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, RpcError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/connect+json") {
        return Err(RpcError::invalid(format!(
            "content type {content_type:?}: a streaming call takes application/connect+json"
        )));
    }
    match Envelopes::default().push(body)?.as_slice() {
        [(0, message)] => decode(message),
        [(flags, _)] if flags & COMPRESSED != 0 => Err(RpcError::invalid("compressed messages are not accepted")),
        _ => Err(RpcError::invalid("a server-streaming call takes exactly one message")),
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(bytes).map_err(|e| RpcError::invalid(format!("bad request message: {e}")))
}

/// Splits a byte stream into envelopes (flags, message).
#[derive(Debug, Default)]
pub struct Envelopes {
    buf: Vec<u8>,
}

impl Envelopes {
    /// Add `bytes`; the envelopes now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, RpcError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(header) = self.buf.get(..5) {
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            if len > MAX_REQUEST {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("a message of {len} bytes is over the limit"),
                ));
            }
            if self.buf.len() < 5 + len {
                break;
            }
            let flags = header[0];
            let message = self.buf[5..5 + len].to_vec();
            self.buf.drain(..5 + len);
            out.push((flags, message));
        }
        Ok(out)
    }

    /// Bytes of an envelope not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One envelope.
fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// A message of a server stream, enveloped.
pub fn stream_message<T: Serialize>(message: &T) -> Bytes {
    envelope(0, &serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The end of a server stream, with the error it ended on.
pub fn end_of_stream(error: Option<&RpcError>) -> Bytes {
    let end = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.json() }),
    };
    envelope(END_STREAM, end.to_string().as_bytes())
}

/// A server stream's response: `messages` (already enveloped, the last one
/// the end of the stream).
pub fn stream_response(messages: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let body = Body::from_stream(messages.map(Ok::<_, Infallible>));
    ([(header::CONTENT_TYPE, "application/connect+json")], body).into_response()
}

/// A server stream that fails before its first message.
pub fn stream_error(error: &RpcError) -> Response {
    stream_response(futures_util::stream::iter([end_of_stream(Some(error))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_across_reads_and_oversize_is_refused() {
        let mut wire = stream_message(&serde_json::json!({"a": 1})).to_vec();
        wire.extend_from_slice(&end_of_stream(Some(&RpcError::invalid("bad"))));
        let mut envelopes = Envelopes::default();
        let mut got = Vec::new();
        for byte in &wire {
            got.extend(envelopes.push(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(envelopes.pending(), 0);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].1.as_slice()), (0, br#"{"a":1}"#.as_slice()));
        assert_eq!(got[1].0, END_STREAM);
        let end: serde_json::Value = serde_json::from_slice(&got[1].1).unwrap();
        assert_eq!(end["error"]["code"], "invalid_argument");

        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Envelopes::default().push(&huge).unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn stream_requests_take_exactly_one_uncompressed_message() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/connect+json".parse().unwrap());
        let one = stream_message(&serde_json::json!({"x": "y"}));
        let v: serde_json::Value = stream_request(&headers, &one).unwrap();
        assert_eq!(v["x"], "y");
        let mut two = one.to_vec();
        two.extend_from_slice(&one);
        assert!(stream_request::<serde_json::Value>(&headers, &Bytes::from(two)).is_err());
        let compressed = envelope(COMPRESSED, b"{}");
        assert!(stream_request::<serde_json::Value>(&headers, &compressed).is_err());
        assert!(stream_request::<serde_json::Value>(&headers, &Bytes::from_static(b"\0\0\0")).is_err());
        headers.insert(header::CONTENT_TYPE, "application/connect+proto".parse().unwrap());
        assert!(stream_request::<serde_json::Value>(&headers, &one).is_err());
    }
}
