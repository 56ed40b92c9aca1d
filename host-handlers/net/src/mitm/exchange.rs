//! One HTTP exchange's telemetry row, and the body wrappers that fill it while
//! the bodies stream through (never buffered whole).
//!
//! The row is written exactly once, when the [`Exchange`] is dropped: at the end
//! of the response body, on an error, when the guest goes away mid-body, or
//! straight away for requests answered by the handler itself (403, 502, 504).
//!
//! A request is forwarded only once [`Exchange::reserve`] has a telemetry slot
//! for its row, so that the row written at the end cannot be lost for lack of
//! room. Rows of connections that failed before a request (and of refusals)
//! have no slot and are recorded best effort.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use telemetry::ai::StreamParser;
use telemetry::{NetEvent, Outcome, Recorder, Slot, TelemetryError};

use super::redact::SecretRedactor;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes of each body kept in the row.
pub(crate) const PREVIEW_LEN: usize = 4096;

/// Byte count and preview of a body, shared with the exchange it belongs to.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    bytes: AtomicU64,
    preview: Mutex<Vec<u8>>,
}

impl Capture {
    fn add(&self, chunk: &[u8]) {
        let before = self.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if before < PREVIEW_LEN as u64 {
            let mut preview = self.preview.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let room = PREVIEW_LEN.saturating_sub(preview.len());
            preview.extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
    }

    /// Count bytes without keeping them (tunnelled streams).
    pub(crate) fn count(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn take(&self) -> (u64, Vec<u8>) {
        let preview = std::mem::take(&mut *self.preview.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        (self.bytes.load(Ordering::Relaxed), preview)
    }
}

/// A row with nothing known yet but when and where.
fn blank_event(started: SystemTime, domain: String, sni: Option<String>) -> NetEvent {
    NetEvent {
        started,
        finished: started,
        domain,
        port: None,
        ip: None,
        mode: None,
        sni,
        method: None,
        path: None,
        status_code: None,
        decision: Outcome::Error,
        matched_rule: None,
        bytes_sent: 0,
        bytes_received: 0,
        request_headers: Vec::new(),
        request_body_preview: Vec::new(),
        response_body_preview: Vec::new(),
        error: None,
        model_call: None,
    }
}

/// The telemetry of one request, recorded when dropped.
#[derive(Debug)]
pub(crate) struct Exchange {
    recorder: Recorder,
    /// Room for the row, reserved before the request is forwarded.
    slot: Option<Slot>,
    /// The row; `bytes_*` and previews are filled in from the captures at the end.
    pub(crate) event: NetEvent,
    pub(crate) sent: Arc<Capture>,
    received: Arc<Capture>,
    parser: Option<StreamParser>,
    /// Secret values kept out of the row.
    secrets: Option<Arc<SecretRedactor>>,
}

impl Exchange {
    pub(crate) fn new(recorder: Recorder, started: SystemTime, domain: String, sni: Option<String>) -> Self {
        let event = blank_event(started, domain, sni);
        Self {
            recorder,
            slot: None,
            event,
            sent: Arc::default(),
            received: Arc::default(),
            parser: None,
            secrets: None,
        }
    }

    /// Reserve room for the row before the request is acted on. An error means
    /// the request must be refused: the writer is behind (`Overloaded`) or has
    /// failed and the sandbox fails closed.
    pub(crate) async fn reserve(&mut self) -> Result<(), TelemetryError> {
        self.slot = self.recorder.reserve_to_act().await?;
        Ok(())
    }

    /// Set how the exchange ended, with the rule that decided it.
    pub(crate) fn decide(&mut self, decision: Outcome, rule: Option<String>) {
        self.event.decision = decision;
        self.event.matched_rule = rule;
    }

    pub(crate) fn fail(&mut self, error: impl Into<String>) {
        self.event.decision = Outcome::Error;
        self.event.error = Some(error.into());
    }

    pub(crate) fn set_parser(&mut self, parser: Option<StreamParser>) {
        self.parser = parser;
    }

    /// Replace these secret values in the row's previews, headers and error.
    pub(crate) fn set_redactor(&mut self, secrets: Arc<SecretRedactor>) {
        self.secrets = Some(secrets);
    }

    /// Wrap the guest's side of a tunnel so that its traffic is counted:
    /// reads are bytes sent upstream, writes bytes received from it.
    pub(crate) fn count_tunnel<T>(&self, guest: T) -> CountedIo<T> {
        CountedIo { inner: guest, reads: self.sent.clone(), writes: self.received.clone() }
    }

    fn received(&mut self, chunk: &[u8]) {
        self.received.add(chunk);
        if let Some(parser) = &mut self.parser {
            parser.feed(chunk);
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let mut event = std::mem::replace(&mut self.event, blank_event(SystemTime::UNIX_EPOCH, String::new(), None));
        event.finished = SystemTime::now();
        (event.bytes_sent, event.request_body_preview) = self.sent.take();
        (event.bytes_received, event.response_body_preview) = self.received.take();
        event.model_call = self.parser.take().map(StreamParser::finish);
        if let Some(secrets) = self.secrets.as_ref().filter(|s| !s.is_empty()) {
            event.request_body_preview = secrets.redact_preview(std::mem::take(&mut event.request_body_preview));
            event.response_body_preview = secrets.redact_preview(std::mem::take(&mut event.response_body_preview));
            for (_, value) in &mut event.request_headers {
                *value = secrets.redact_str(value).into_owned();
            }
            event.error = event.error.map(|error| secrets.redact_str(&error).into_owned());
        }
        if let Some(slot) = self.slot.take() {
            return slot.record_net(event);
        }
        let domain = event.domain.clone();
        if let Err(err) = self.recorder.record_net(event) {
            tracing::error!(%err, domain, "HTTP exchange not recorded");
        }
    }
}

/// A request body on its way upstream, counted into the exchange.
#[derive(Debug)]
pub(crate) struct CountedBody<B> {
    inner: B,
    capture: Arc<Capture>,
}

impl<B> CountedBody<B> {
    pub(crate) fn new(inner: B, capture: Arc<Capture>) -> Self {
        Self { inner, capture }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.capture.add(data);
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the guest; ends the exchange when it ends.
#[derive(Debug)]
pub(crate) struct ObservedBody<B: Body> {
    inner: B,
    exchange: Option<Exchange>,
    /// The length announced by the upstream, if any.
    length: Option<u64>,
}

impl<B: Body> ObservedBody<B> {
    pub(crate) fn new(inner: B, exchange: Exchange) -> Self {
        let length = inner.size_hint().exact();
        Self { inner, exchange: Some(exchange), length }
    }
}

impl<B: Body> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // A server stops polling a body once it has written the announced
        // length, possibly before the upstream's end-of-stream arrived.
        if let Some(exchange) = &mut self.exchange {
            let complete = self.inner.is_end_stream() || self.length == Some(exchange.received.bytes());
            if !complete {
                exchange.fail("response not completed: the guest went away");
            }
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(exchange)) = (frame.data_ref(), this.exchange.as_mut()) {
                    exchange.received(data);
                }
            }
            Poll::Ready(Some(Err(err))) => {
                if let Some(mut exchange) = this.exchange.take() {
                    exchange.fail(format!("upstream response body: {err}"));
                }
            }
            Poll::Ready(None) => drop(this.exchange.take()),
            Poll::Pending => {}
        }
        if this.exchange.is_some() && this.inner.is_end_stream() {
            drop(this.exchange.take());
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The guest's side of an upgraded connection, counted into its exchange.
#[derive(Debug)]
pub(crate) struct CountedIo<T> {
    inner: T,
    reads: Arc<Capture>,
    writes: Arc<Capture>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.reads.count(buf.filled().len() - before);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.writes.count(n);
        }
        polled
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_counts_everything_and_keeps_the_first_4k() {
        let capture = Capture::default();
        capture.add(&[1u8; 3000]);
        capture.add(&[2u8; 3000]);
        capture.add(&[3u8; 10]);
        let (bytes, preview) = capture.take();
        assert_eq!(bytes, 6010);
        assert_eq!(preview.len(), PREVIEW_LEN);
        assert_eq!(preview[2999], 1);
        assert_eq!(preview[3000], 2);
    }
}
