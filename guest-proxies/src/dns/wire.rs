//! What dns-proxy does with the bytes it is given, on hickory-proto's wire
//! format: which client packets to forward, which answers to pass back (and
//! how to shorten them for UDP), and the error answers it makes up itself.
//!
//! Every function here takes untrusted bytes (from guest programs, or from the
//! host) and never panics; `fuzz/` drives them with arbitrary input.

use hickory_proto::op::{Edns, Header, Message, MessageType, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, DecodeError};
use hickory_proto::ProtoError;

/// Largest answer a UDP client without EDNS accepts (RFC 1035 section 4.2.1).
pub const CLASSIC_UDP_LIMIT: usize = 512;

/// The UDP payload size advertised in the OPT record of answers made here.
const ADVERTISED_PAYLOAD: u16 = 1232;

/// A query from a guest client, fit to forward to the host.
#[derive(Debug)]
pub struct Query {
    message: Message,
}

/// Why a client's packet is not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// A query that cannot be used: answer it with `response` (FORMERR).
    #[error("malformed query: {reason}")]
    FormErr {
        /// What is wrong with it.
        reason: String,
        /// The FORMERR answer for the client.
        response: Vec<u8>,
    },
    /// Not answerable (too short for a header, or not a query at all).
    #[error("dropped: {0}")]
    Drop(String),
}

/// Why an answer from the host cannot be passed to the client.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The bytes are not a DNS message.
    #[error("malformed answer: {0}")]
    Malformed(#[from] DecodeError),
    /// The message is not a response, or answers another query.
    #[error("answer does not match the query: {0}")]
    Mismatch(&'static str),
    /// The shortened answer could not be encoded.
    #[error("encode the truncated answer: {0}")]
    Encode(#[from] ProtoError),
}

impl Query {
    /// Check a client's packet: a query (QR clear) with exactly one question.
    pub fn parse(packet: &[u8]) -> Result<Self, Rejected> {
        let message = match Message::from_vec(packet) {
            Ok(message) => message,
            Err(err) => {
                // Answer FORMERR when at least the header says "query".
                let header = Header::read(&mut BinDecoder::new(packet))
                    .map_err(|_| Rejected::Drop(format!("{} bytes, no DNS header", packet.len())))?;
                return Err(form_err(&header, err.to_string()));
            }
        };
        if message.metadata.message_type != MessageType::Query {
            return Err(Rejected::Drop("a response, not a query".to_string()));
        }
        if message.queries.len() != 1 {
            let header = Header { metadata: message.metadata, counts: Default::default() };
            return Err(form_err(&header, format!("{} questions, expected 1", message.queries.len())));
        }
        Ok(Self { message })
    }

    /// The client's message ID.
    pub fn id(&self) -> u16 {
        self.message.metadata.id
    }

    /// The question, for logs: `name type`.
    pub fn question(&self) -> String {
        self.message.queries.first().map(|q| format!("{} {}", q.name(), q.query_type())).unwrap_or_default()
    }

    /// The largest UDP answer this client accepts: its EDNS payload size, or
    /// 512 bytes without EDNS (never less than 512).
    pub fn udp_limit(&self) -> usize {
        usize::from(self.message.max_payload())
    }

    /// Check the host's `answer` to this query and return the bytes for the
    /// client: the answer as it came when it fits in `limit` bytes, otherwise
    /// its header and question only, with TC set (RFC 2181 section 9), so the
    /// client retries over TCP.
    pub fn answer(&self, answer: &[u8], limit: usize) -> Result<Vec<u8>, AnswerError> {
        let message = Message::from_vec(answer)?;
        if message.metadata.message_type != MessageType::Response {
            return Err(AnswerError::Mismatch("not a response"));
        }
        if message.metadata.id != self.id() {
            return Err(AnswerError::Mismatch("another message ID"));
        }
        if message.queries != self.message.queries {
            return Err(AnswerError::Mismatch("another question"));
        }
        if answer.len() <= limit {
            return Ok(answer.to_vec());
        }
        let mut truncated = message.truncate();
        let bytes = truncated.to_vec()?;
        if bytes.len() <= limit {
            return Ok(bytes);
        }
        // Only a bulky OPT record can still be in the way.
        truncated.edns = None;
        Ok(truncated.to_vec()?)
    }

    /// SERVFAIL for this query: the host did not answer (in time, or usably).
    pub fn servfail(&self) -> Result<Vec<u8>, ProtoError> {
        let query = &self.message;
        let mut response = Message::error_msg(query.metadata.id, query.metadata.op_code, ResponseCode::ServFail);
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_queries(query.queries.iter().cloned());
        if query.edns.is_some() {
            // RFC 6891 section 6.1.1: a query with OPT gets an answer with OPT.
            let mut edns = Edns::new();
            edns.set_max_payload(ADVERTISED_PAYLOAD);
            response.set_edns(edns);
        }
        response.to_vec()
    }
}

/// FORMERR for a message whose header says "query", otherwise a drop.
fn form_err(header: &Header, reason: String) -> Rejected {
    if header.metadata.message_type != MessageType::Query {
        return Rejected::Drop(format!("malformed, and not a query: {reason}"));
    }
    let response = Message::error_msg(header.metadata.id, header.metadata.op_code, ResponseCode::FormErr);
    match response.to_vec() {
        Ok(response) => Rejected::FormErr { reason, response },
        Err(err) => Rejected::Drop(format!("{reason}; FORMERR not encodable: {err}")),
    }
}

/// The message ID: the first two bytes of a DNS message, if there are two.
pub fn message_id(message: &[u8]) -> Option<u16> {
    be_u16(message)
}

/// The big-endian u16 at the start of `bytes`.
fn be_u16(bytes: &[u8]) -> Option<u16> {
    bytes.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Replace the message ID of a message at least two bytes long.
pub fn set_message_id(message: &mut [u8], id: u16) {
    if let Some(bytes) = message.get_mut(..2) {
        bytes.copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType, OpCode, Query as Question};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use super::*;

    fn query(id: u16, edns: Option<u16>) -> Message {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Question::query(Name::from_ascii("example.test.").unwrap(), RecordType::TXT));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            message.set_edns(e);
        }
        message
    }

    /// An answer with `records` TXT records of 100 bytes each.
    fn answer(query: &Message, records: usize) -> Vec<u8> {
        let mut response = Message::response(query.metadata.id, OpCode::Query);
        response.add_queries(query.queries.iter().cloned());
        for _ in 0..records {
            let rdata = RData::TXT(TXT::new(vec!["x".repeat(100)]));
            response.add_answer(Record::from_rdata(Name::from_ascii("example.test.").unwrap(), 60, rdata));
        }
        response.to_vec().unwrap()
    }

    #[test]
    fn small_answers_pass_unchanged() {
        let q = query(7, None);
        let parsed = Query::parse(&q.to_vec().unwrap()).unwrap();
        let a = answer(&q, 2);
        assert_eq!(parsed.answer(&a, parsed.udp_limit()).unwrap(), a);
    }

    #[test]
    fn udp_limit_follows_edns() {
        assert_eq!(Query::parse(&query(1, None).to_vec().unwrap()).unwrap().udp_limit(), 512);
        assert_eq!(Query::parse(&query(1, Some(4096)).to_vec().unwrap()).unwrap().udp_limit(), 4096);
        assert_eq!(Query::parse(&query(1, Some(100)).to_vec().unwrap()).unwrap().udp_limit(), 512);
    }

    #[test]
    fn oversized_answers_are_truncated_with_tc() {
        let q = query(9, None);
        let parsed = Query::parse(&q.to_vec().unwrap()).unwrap();
        let big = answer(&q, 10);
        assert!(big.len() > 512);
        let out = parsed.answer(&big, 512).unwrap();
        assert!(out.len() <= 512);
        let msg = Message::from_vec(&out).unwrap();
        assert!(msg.metadata.truncation);
        assert_eq!(msg.metadata.id, 9);
        assert_eq!(msg.queries, q.queries);
        assert!(msg.answers.is_empty());
        // Over TCP the same answer passes whole.
        assert_eq!(parsed.answer(&big, usize::from(u16::MAX)).unwrap(), big);
    }

    #[test]
    fn answers_to_something_else_are_refused() {
        let q = query(3, None);
        let parsed = Query::parse(&q.to_vec().unwrap()).unwrap();
        let other = query(4, None);
        assert!(matches!(parsed.answer(&answer(&other, 1), 512), Err(AnswerError::Mismatch(_))));
        assert!(matches!(parsed.answer(&q.to_vec().unwrap(), 512), Err(AnswerError::Mismatch(_))));
        assert!(matches!(parsed.answer(b"\x00\x03garbage", 512), Err(AnswerError::Malformed(_))));
    }

    #[test]
    fn servfail_keeps_id_question_and_opt() {
        let q = query(0xBEEF, Some(1400));
        let parsed = Query::parse(&q.to_vec().unwrap()).unwrap();
        let msg = Message::from_vec(&parsed.servfail().unwrap()).unwrap();
        assert_eq!(msg.metadata.id, 0xBEEF);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
        assert!(msg.metadata.recursion_desired);
        assert_eq!(msg.queries, q.queries);
        assert!(msg.edns.is_some());
    }

    #[test]
    fn malformed_queries_get_formerr_or_are_dropped() {
        let mut bytes = query(0x1234, None).to_vec().unwrap();
        bytes.truncate(bytes.len() - 3);
        match Query::parse(&bytes) {
            Err(Rejected::FormErr { response, .. }) => {
                let msg = Message::from_vec(&response).unwrap();
                assert_eq!(msg.metadata.id, 0x1234);
                assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("expected FORMERR, got {other:?}"),
        }
        let mut two = query(5, None);
        two.add_query(Question::query(Name::from_ascii("b.test.").unwrap(), RecordType::A));
        assert!(matches!(Query::parse(&two.to_vec().unwrap()), Err(Rejected::FormErr { .. })));
        assert!(matches!(Query::parse(b"short"), Err(Rejected::Drop(_))));
        let response = answer(&query(6, None), 1);
        assert!(matches!(Query::parse(&response), Err(Rejected::Drop(_))));
    }

    #[test]
    fn message_ids_are_read_and_replaced() {
        let mut m = vec![0x12, 0x34, 0xff];
        assert_eq!(message_id(&m), Some(0x1234));
        set_message_id(&mut m, 0xabcd);
        assert_eq!(m, [0xab, 0xcd, 0xff]);
        let mut short = vec![1];
        set_message_id(&mut short, 7);
        assert_eq!((message_id(&short), short), (None, vec![1]));
    }
}
