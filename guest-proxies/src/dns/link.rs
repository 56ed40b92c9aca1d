//! One connection to the host's DNS handler, shared by every client.
//!
//! Queries are pipelined on it (RFC 7766): each is framed (2-byte length, see
//! [`guest_protocol::dns_framing`]),
//! written as soon as it arrives, and answered whenever the host is ready, in
//! any order. Two guest clients may well pick the same message ID, so each
//! query gets an ID of the link's own on the way out, and the client's ID is
//! put back into the answer. The connection is opened at the first query and
//! again at the first query after it is lost; when it is lost, every query in
//! flight fails at once (its client gets SERVFAIL instead of waiting).

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use guest_protocol::dns_framing::{push_frame, take_frame};

use super::wire::{message_id, set_message_id};
use crate::upstream::{Stream, Upstream};

/// Queries waiting for the link task; more wait in their clients' tasks.
const QUEUE: usize = 64;
/// Framed queries not yet written to the host before new ones wait.
const OUTPUT_LIMIT: usize = 64 * 1024;

/// A handle on the link to the host; cheap to clone.
#[derive(Debug, Clone)]
pub struct HostLink {
    requests: mpsc::Sender<Request>,
}

/// Why a query got no answer from the host.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed, could not be opened, or the query could not be sent.
    #[error("no connection to the host DNS handler")]
    Lost,
    /// The host did not answer in time.
    #[error("no answer from the host within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug)]
struct Request {
    query: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
}

impl HostLink {
    /// Start the link task on the current tokio runtime.
    pub fn spawn(upstream: Upstream) -> Self {
        let (requests, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(upstream, receiver));
        Self { requests }
    }

    /// Send `query` (a DNS message) to the host and wait up to `timeout` for
    /// its answer, which comes back with the query's own message ID.
    pub async fn exchange(&self, query: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ExchangeError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.requests.send(Request { query, reply }).await.map_err(|_| ExchangeError::Lost)?;
            answer.await.map_err(|_| ExchangeError::Lost)
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| ExchangeError::Timeout(timeout))?
    }
}

/// Connect at the first query, serve until the connection fails, repeat.
async fn run(upstream: Upstream, mut requests: mpsc::Receiver<Request>) {
    while let Some(first) = requests.recv().await {
        match upstream.connect().await {
            Ok(stream) => match session(stream, first, &mut requests).await {
                Ok(()) => return,
                Err(err) => warn!("connection to the host DNS handler lost: {err}"),
            },
            // Dropping `first` answers its client now.
            Err(err) => warn!("{err}"),
        }
    }
}

/// Carry queries and answers over one connection. Returns Ok when every
/// [`HostLink`] is gone, Err when the connection fails.
async fn session(stream: Box<dyn Stream>, first: Request, requests: &mut mpsc::Receiver<Request>) -> io::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut in_flight = InFlight::default();
    let mut output = Vec::new();
    let mut input = Vec::new();
    in_flight.send(first, &mut output);
    loop {
        tokio::select! {
            request = requests.recv(), if output.len() < OUTPUT_LIMIT => match request {
                Some(request) => in_flight.send(request, &mut output),
                None => return Ok(()),
            },
            read = reader.read_buf(&mut input) => {
                if read? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the host"));
                }
                while let Some(answer) = take_frame(&mut input) {
                    in_flight.deliver(answer);
                }
            }
            written = writer.write(&output), if !output.is_empty() => {
                output.drain(..written?);
            }
        }
    }
}

/// Queries sent on the current connection, by the link's message ID.
#[derive(Debug, Default)]
struct InFlight {
    waiting: HashMap<u16, Waiting>,
    next_id: u16,
}

#[derive(Debug)]
struct Waiting {
    client_id: u16,
    reply: oneshot::Sender<Vec<u8>>,
}

impl InFlight {
    /// Give the query a free link ID and frame it onto `output`. A query that
    /// cannot be sent is dropped, which fails it for its client.
    fn send(&mut self, mut request: Request, output: &mut Vec<u8>) {
        let Some(client_id) = message_id(&request.query) else { return };
        let Some(id) = self.free_id() else {
            warn!("65536 DNS queries in flight; failing one more");
            return;
        };
        set_message_id(&mut request.query, id);
        if push_frame(output, &request.query) {
            self.waiting.insert(id, Waiting { client_id, reply: request.reply });
        }
    }

    /// An ID with no query waiting for it (a query whose client has given up
    /// does not count).
    fn free_id(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if self.waiting.get(&id).is_none_or(|w| w.reply.is_closed()) {
                return Some(id);
            }
        }
        None
    }

    /// Hand an answer from the host to the query it answers.
    fn deliver(&mut self, mut answer: Vec<u8>) {
        let Some(id) = message_id(&answer) else {
            warn!("ignoring a {}-byte answer from the host: no message ID", answer.len());
            return;
        };
        let Some(waiting) = self.waiting.remove(&id) else {
            debug!(id, "ignoring an answer from the host for no query in flight");
            return;
        };
        set_message_id(&mut answer, waiting.client_id);
        // The client may have given up meanwhile.
        let _ = waiting.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &[u8]) -> (Request, oneshot::Receiver<Vec<u8>>) {
        let (reply, answer) = oneshot::channel();
        (Request { query: query.to_vec(), reply }, answer)
    }

    #[test]
    fn same_client_ids_get_distinct_link_ids_and_their_own_answers() {
        let mut in_flight = InFlight::default();
        let mut output = Vec::new();
        let (a, mut answer_a) = request(&[0, 7, b'a']);
        let (b, mut answer_b) = request(&[0, 7, b'b']);
        in_flight.send(a, &mut output);
        in_flight.send(b, &mut output);
        let frame_a = take_frame(&mut output).unwrap();
        let frame_b = take_frame(&mut output).unwrap();
        assert_ne!(message_id(&frame_a), message_id(&frame_b));
        // Answers out of order.
        in_flight.deliver(frame_b.clone());
        in_flight.deliver(frame_a.clone());
        assert_eq!(answer_a.try_recv().unwrap(), [0, 7, b'a']);
        assert_eq!(answer_b.try_recv().unwrap(), [0, 7, b'b']);
        assert!(in_flight.waiting.is_empty());
    }

    #[test]
    fn unknown_and_short_answers_are_ignored() {
        let mut in_flight = InFlight::default();
        let mut output = Vec::new();
        let (a, mut answer) = request(&[1, 2, 3]);
        in_flight.send(a, &mut output);
        in_flight.deliver(vec![9]);
        in_flight.deliver(vec![0xff, 0xff, 0]);
        assert!(answer.try_recv().is_err());
        assert_eq!(in_flight.waiting.len(), 1);
    }

    #[test]
    fn ids_of_abandoned_queries_are_reused() {
        let mut in_flight = InFlight::default();
        let mut output = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..=u16::MAX {
            let (r, answer) = request(&[0, 0]);
            in_flight.send(r, &mut output);
            kept.push(answer);
        }
        assert_eq!(in_flight.waiting.len(), 65536);
        let (extra, mut failed) = request(&[0, 0]);
        in_flight.send(extra, &mut output);
        assert_eq!(failed.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        kept.truncate(10);
        let (late, mut waiting) = request(&[0, 0]);
        in_flight.send(late, &mut output);
        assert_eq!(waiting.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert_eq!(in_flight.waiting.len(), 65536);
    }
}
