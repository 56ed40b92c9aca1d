//! Keeping injected secrets from coming back: the values of every secret the
//! policy's rules put into headers (`${secret:NAME}`) are replaced by
//! [`REDACTED`] wherever an upstream reflects them (TRACE, debug and error
//! pages that echo the request).
//!
//! - Rows: previews, logged headers and error texts of every exchange; there
//!   the values of the guest's own credential headers (names as telemetry's
//!   redaction rules match them) are replaced too.
//! - Responses to requests where a rule injected a secret: the header values,
//!   and the body as it streams through [`RedactingBody`], which finds values
//!   split across chunks by holding back at most the length of the longest
//!   secret minus one byte. Such requests ask for an uncompressed response
//!   (`accept-encoding: identity`); what is covered is the exact bytes of a
//!   value, not encodings of it (compressed bodies an upstream sends anyway,
//!   base64, JSON or URL escapes), nor the bytes of upgraded (WebSocket)
//!   connections.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderValue};

/// What a reflected secret value is replaced by.
pub(crate) const REDACTED: &str = "[REDACTED]";

/// The secret values to look for.
pub(crate) struct SecretRedactor {
    /// Longest first, so that the longest value matching at a position wins.
    values: Vec<Vec<u8>>,
    /// Which bytes start a value.
    first: [bool; 256],
}

impl std::fmt::Debug for SecretRedactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRedactor").field("values", &self.values.len()).finish_non_exhaustive()
    }
}

/// The outcome of scanning a buffer.
struct Scanned {
    /// The redacted bytes that may go out, if any byte changed.
    changed: Option<Vec<u8>>,
    /// Bytes before this index were dealt with; the rest may be the start of
    /// a value and waits for more data.
    done: usize,
}

impl SecretRedactor {
    /// These values and the redactor's own.
    pub(crate) fn with_values(&self, more: Vec<String>) -> Self {
        let mut values: Vec<String> = self.values.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        values.extend(more);
        Self::new(&values)
    }

    pub(crate) fn new(values: &[String]) -> Self {
        let mut values: Vec<Vec<u8>> = values.iter().filter(|v| !v.is_empty()).map(|v| v.as_bytes().to_vec()).collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        let mut first = [false; 256];
        for value in &values {
            first[usize::from(value[0])] = true;
        }
        Self { values, first }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Replace every value in `buf`. Unless `at_end`, a tail that may be the
    /// start of a value is left for the next call (`done` < `buf.len()`).
    fn scan(&self, buf: &[u8], at_end: bool) -> Scanned {
        let mut changed: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut i = 0;
        'positions: while i < buf.len() {
            if !self.first[usize::from(buf[i])] {
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            for value in &self.values {
                if rest.len() >= value.len() {
                    if rest.starts_with(value) {
                        let out = changed.get_or_insert_with(|| Vec::with_capacity(buf.len()));
                        out.extend_from_slice(&buf[copied..i]);
                        out.extend_from_slice(REDACTED.as_bytes());
                        i += value.len();
                        copied = i;
                        continue 'positions;
                    }
                } else if !at_end && value.starts_with(rest) {
                    // Possibly a (longer) value cut by the end of the buffer.
                    break 'positions;
                }
            }
            i += 1;
        }
        if let Some(out) = &mut changed {
            out.extend_from_slice(&buf[copied..i]);
        }
        Scanned { changed, done: i }
    }

    /// `text` with every value replaced.
    pub(crate) fn redact_str<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.scan(text.as_bytes(), true).changed {
            // Values and the replacement are whole UTF-8 strings.
            Some(out) => Cow::Owned(String::from_utf8_lossy(&out).into_owned()),
            None => Cow::Borrowed(text),
        }
    }

    /// A preview (the first bytes of a body) with every value replaced, and
    /// without a tail that may be the start of one cut by the preview's end.
    pub(crate) fn redact_preview(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        if self.is_empty() {
            return bytes;
        }
        let scanned = self.scan(&bytes, false);
        match scanned.changed {
            Some(out) => out,
            None => {
                bytes.truncate(scanned.done);
                bytes
            }
        }
    }

    /// Replace values in header values; returns whether any was found.
    pub(crate) fn redact_headers(&self, headers: &mut HeaderMap) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut found = false;
        for value in headers.values_mut() {
            if let Some(out) = self.scan(value.as_bytes(), true).changed {
                found = true;
                *value = HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(REDACTED));
            }
        }
        found
    }
}

/// A response body with every secret value replaced as it streams.
#[derive(Debug)]
pub(crate) struct RedactingBody<B> {
    inner: B,
    redactor: std::sync::Arc<SecretRedactor>,
    /// Bytes that may be the start of a value, waiting for the next chunk.
    held: Vec<u8>,
    /// A trailers frame that waits for the held bytes to go out first.
    trailers: Option<Frame<Bytes>>,
    ended: bool,
}

impl<B> RedactingBody<B> {
    pub(crate) fn new(inner: B, redactor: std::sync::Arc<SecretRedactor>) -> Self {
        Self { inner, redactor, held: Vec::new(), trailers: None, ended: false }
    }

    /// The redacted bytes of `data` (after what was held) that may go out now.
    fn pass(&mut self, data: Bytes) -> Option<Bytes> {
        if self.held.is_empty() {
            let scanned = self.redactor.scan(&data, false);
            self.held.extend_from_slice(&data[scanned.done..]);
            return match scanned.changed {
                Some(out) => Some(Bytes::from(out)),
                None if scanned.done == 0 => None,
                None => Some(data.slice(..scanned.done)),
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&data);
        self.drain(buf, false)
    }

    fn drain(&mut self, buf: Vec<u8>, at_end: bool) -> Option<Bytes> {
        let scanned = self.redactor.scan(&buf, at_end);
        self.held = buf[scanned.done..].to_vec();
        let out = scanned.changed.unwrap_or_else(|| buf[..scanned.done].to_vec());
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

impl<B> Body for RedactingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(out) = this.pass(data) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        let held = std::mem::take(&mut this.held);
                        match this.drain(held, true) {
                            Some(out) => {
                                this.trailers = Some(trailers);
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            None => return Poll::Ready(Some(Ok(trailers))),
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.ended = true;
                    let held = std::mem::take(&mut this.held);
                    if let Some(out) = this.drain(held, true) {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.ended || self.inner.is_end_stream()) && self.held.is_empty() && self.trailers.is_none()
    }

    /// Unknown: replacing values changes the length.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;

    fn redactor() -> Arc<SecretRedactor> {
        Arc::new(SecretRedactor::new(&["s3cr3t-token".into(), "s3cr3t".into(), String::new()]))
    }

    async fn through(chunks: &[&str]) -> String {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::copy_from_slice(c.as_bytes())))).collect();
        let body = RedactingBody::new(StreamBody::new(futures_util::stream::iter(frames)), redactor());
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn values_are_replaced_longest_first() {
        let r = redactor();
        assert_eq!(r.redact_str("a s3cr3t-token b s3cr3t c s3cr3"), "a [REDACTED] b [REDACTED] c s3cr3");
        assert_eq!(r.redact_str("nothing here"), "nothing here");
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_static("Bearer s3cr3t"));
        headers.insert("x-other", HeaderValue::from_static("fine"));
        assert!(r.redact_headers(&mut headers));
        assert_eq!(headers["x-echo"], "Bearer [REDACTED]");
        assert_eq!(headers["x-other"], "fine");
        assert!(SecretRedactor::new(&[]).is_empty());
        assert_eq!(r.redact_preview(b"x s3cr3t y s3cr".to_vec()), b"x [REDACTED] y ");
    }

    #[tokio::test]
    async fn values_split_across_chunks_are_replaced() {
        assert_eq!(through(&["x s3c", "r3t-tok", "en y"]).await, "x [REDACTED] y");
        assert_eq!(through(&["s", "3", "c", "r", "3", "t"]).await, "[REDACTED]");
        // The shorter value is only taken once the longer one cannot match.
        assert_eq!(through(&["<s3cr3t", "-tok>"]).await, "<[REDACTED]-tok>");
        assert_eq!(through(&["<s3cr3t-", "token>"]).await, "<[REDACTED]>");
        assert_eq!(through(&["plain ", "text", ""]).await, "plain text");
        assert_eq!(through(&["ends with s3c"]).await, "ends with s3c");
    }
}
