//! The DNS handler (vsock port [`DNS_PORT`](guest_protocol::ports::DNS_PORT)):
//! RFC 1035 TCP framing ([`dns_framing`]), RFC 7766 pipelining
//! (answers are written as soon as each is ready, possibly out of order; the
//! guest matches them by message ID).
//!
//! Each query becomes a `dns.request` event. Allowed: answered from the policy's
//! rewrite records if any, else resolved upstream through the shared caching
//! resolver (TTLs count down with the cache; NXDOMAIN and SERVFAIL are passed on).
//! Address records pointing into ranges the guest may not reach are dropped; if
//! that leaves no address the query is answered NXDOMAIN and recorded as denied
//! by `builtin.address_guard`. Blocked: NXDOMAIN (REFUSED would make glibc retry
//! other servers). Malformed: FORMERR (NOTIMP for other opcodes and classes).
//! Every query gets exactly one `dns_events` row (or, beyond the sandbox's
//! DNS limits, a share of a summary row: see `dns_limits`). The addresses of
//! allowed answers are bound to the name asked (see [`Bindings`]): that is
//! the name a TCP connection to them is decided as.
//!
//! No query is acted on unless its row is queued: before answering or
//! forwarding, the handler reserves a telemetry slot (waiting at most the
//! recorder's `slot_wait`). Without one the query is answered SERVFAIL
//! (transient: stub resolvers retry later, and nothing was decided) and the
//! refusal is counted by the recorder and logged best effort.
//!
//! Memory: a connection holds at most [`MAX_HELD_BYTES_PER_CONNECTION`] bytes
//! of guest frames and pending answers, and all DNS connections of a sandbox at
//! most [`MAX_HELD_BYTES_PER_SANDBOX`]; reading pauses until bytes are released.
//! A frame is released as soon as it is parsed, an answer once it is written.

use std::io;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use guest_protocol::dns_framing;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::net::{DnsError, NetError};
use policy::{Action, Decision, DnsRecord, DnsRequest, Event, Policy};
use telemetry::{DnsEvent, Outcome, Recorder, Slot, TelemetryError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::bindings::Bindings;
use crate::dns_limits::{DnsLimiter, Limit, DNS_LIMIT_RULE};
use crate::idle::{Activity, Tracked};
use crate::server::ConnectionHandler;
use crate::upstream::Upstream;

/// Queries of one connection being answered at once; reading pauses beyond this.
const MAX_IN_FLIGHT: usize = 64;
/// Bytes of guest frames and unwritten answers one connection may hold (four
/// frames of the largest size, or 64 in flight of up to 4 KiB each).
pub const MAX_HELD_BYTES_PER_CONNECTION: usize = 256 * 1024;
/// Bytes of guest frames and unwritten answers all DNS connections of one
/// sandbox may hold together.
pub const MAX_HELD_BYTES_PER_SANDBOX: usize = 4 * 1024 * 1024;
/// UDP payload size announced in answers to EDNS queries (DNS flag day 2020).
const EDNS_PAYLOAD: u16 = 1232;
/// Rule name recorded when the address guard empties an answer.
pub const ADDRESS_GUARD_RULE: &str = "builtin.address_guard";

/// A query the handler can act on.
#[derive(Debug, Clone)]
pub struct GuestQuery {
    metadata: Metadata,
    query: Query,
    edns: bool,
    /// Query name, lower case, without the trailing dot.
    pub qname: String,
    /// Record type mnemonic (`TYPE<n>` for unknown types).
    pub qtype: String,
}

/// A message that cannot be answered normally.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The error answer, if the message had an ID to answer to.
    pub response: Option<Vec<u8>>,
    pub rcode: ResponseCode,
    pub qname: String,
    pub qtype: String,
    pub reason: String,
}

/// Decode one framed message from the guest.
pub fn parse_query(frame: &[u8]) -> Result<GuestQuery, Rejected> {
    let reject = |rcode: ResponseCode, reason: String, query: Option<&Query>| {
        let response = (frame.len() >= 2).then(|| {
            let mut message = Message::error_msg(u16::from_be_bytes([frame[0], frame[1]]), OpCode::Query, rcode);
            if let Some(query) = query {
                message.add_query(query.clone());
            }
            encode(&message)
        });
        let (qname, qtype) = query.map(|q| (name_text(q.name()), type_text(q.query_type()))).unwrap_or_default();
        Rejected { response, rcode, qname, qtype, reason }
    };
    let message = Message::from_vec(frame).map_err(|e| reject(ResponseCode::FormErr, e.to_string(), None))?;
    let first = message.queries.first();
    if message.metadata.message_type != MessageType::Query {
        return Err(reject(ResponseCode::FormErr, "message is a response, not a query".into(), first));
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(reject(
            ResponseCode::NotImp,
            format!("opcode {:?} not supported", message.metadata.op_code),
            first,
        ));
    }
    let [query] = message.queries.as_slice() else {
        return Err(reject(ResponseCode::FormErr, format!("{} questions, expected 1", message.queries.len()), first));
    };
    if query.query_class() != DNSClass::IN {
        return Err(reject(ResponseCode::NotImp, format!("class {} not supported", query.query_class()), first));
    }
    Ok(GuestQuery {
        metadata: message.metadata,
        query: query.clone(),
        edns: message.edns.is_some(),
        qname: name_text(query.name()),
        qtype: type_text(query.query_type()),
    })
}

/// Read one message in [`dns_framing`]; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    match read_frame_len(reader).await? {
        Some(len) => read_frame_body(reader, len).await.map(Some),
        None => Ok(None),
    }
}

/// The length prefix of the next message; `None` at a clean end of stream.
async fn read_frame_len<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<usize>> {
    let mut prefix = [0u8; dns_framing::PREFIX_LEN];
    if reader.read(&mut prefix[..1]).await? == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut prefix[1..]).await?;
    Ok(Some(dns_framing::message_len(prefix)))
}

async fn read_frame_body<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut frame = vec![0; len];
    reader.read_exact(&mut frame).await?;
    Ok(frame)
}

/// Bytes counted against a connection's and the sandbox's bounds until dropped.
#[derive(Debug)]
struct Held {
    _connection: OwnedSemaphorePermit,
    _sandbox: OwnedSemaphorePermit,
}

impl Held {
    /// Wait until `bytes` (at most 65,535) fit under both bounds; `None` once closed.
    async fn acquire(connection: &Arc<Semaphore>, sandbox: &Arc<Semaphore>, bytes: usize) -> Option<Held> {
        let bytes = u32::try_from(bytes.min(u16::MAX.into())).ok()?;
        let connection = connection.clone().acquire_many_owned(bytes).await.ok()?;
        let sandbox = sandbox.clone().acquire_many_owned(bytes).await.ok()?;
        Some(Held { _connection: connection, _sandbox: sandbox })
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, message: &[u8]) -> io::Result<()> {
    let prefix =
        dns_framing::length_prefix(message.len()).ok_or_else(|| io::Error::other("DNS message over 65535 bytes"))?;
    writer.write_all(&prefix).await?;
    writer.write_all(message).await
}

/// Encode a response that fits TCP framing: truncated (TC set) if too long,
/// header-only SERVFAIL if it cannot be encoded at all.
fn encode(message: &Message) -> Vec<u8> {
    match message.to_vec() {
        Ok(bytes) if bytes.len() <= dns_framing::MAX_MESSAGE_LEN => bytes,
        Ok(_) => message.truncate().to_vec().unwrap_or_default(),
        Err(err) => {
            tracing::warn!(%err, "cannot encode DNS answer");
            let mut failed = Message::error_msg(message.metadata.id, OpCode::Query, ResponseCode::ServFail);
            failed.add_queries(message.queries.iter().cloned());
            failed
                .to_vec()
                .or_else(|_| Message::error_msg(message.metadata.id, OpCode::Query, ResponseCode::ServFail).to_vec())
                .unwrap_or_default()
        }
    }
}

fn name_text(name: &Name) -> String {
    name.to_lowercase().to_string().trim_end_matches('.').to_owned()
}

fn type_text(rtype: RecordType) -> String {
    match rtype {
        RecordType::Unknown(code) => format!("TYPE{code}"),
        other => other.to_string(),
    }
}

fn rcode_text(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// What to answer and record for one query.
struct Answer {
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    outcome: Outcome,
    rule: Option<String>,
    error: Option<String>,
    /// Refused over this limit, without a token for a row of its own: it is
    /// counted into the second's summary row instead.
    summarized: Option<Limit>,
}

impl Answer {
    fn new(rcode: ResponseCode, outcome: Outcome, rule: Option<String>) -> Self {
        Self { rcode, answers: Vec::new(), authorities: Vec::new(), outcome, rule, error: None, summarized: None }
    }

    /// REFUSED over a DNS limit.
    fn over_limit(limit: Limit, error: Option<String>, summarized: bool) -> Self {
        let mut answer = Answer::new(ResponseCode::Refused, Outcome::Denied, Some(DNS_LIMIT_RULE.into()));
        answer.error = error;
        answer.summarized = summarized.then_some(limit);
        answer
    }
}

/// Serves guest DNS connections.
#[derive(Debug)]
pub(crate) struct DnsHandler {
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) policy: Policy,
    pub(crate) recorder: Recorder,
    pub(crate) limiter: Arc<DnsLimiter>,
    pub(crate) bindings: Arc<Bindings>,
    pub(crate) idle_timeout: Duration,
    /// Bytes all connections may still hold ([`MAX_HELD_BYTES_PER_SANDBOX`]).
    pub(crate) held: Arc<Semaphore>,
}

impl DnsHandler {
    /// Answer one framed message; `None` if it has no ID to answer to. The
    /// frame and the bytes it holds are released once it is parsed.
    async fn respond(&self, frame: Vec<u8>, held: Held) -> Option<Vec<u8>> {
        let time = SystemTime::now();
        let parsed = parse_query(&frame);
        let id = (frame.len() >= 2).then(|| u16::from_be_bytes([frame[0], frame[1]]));
        drop(frame);
        drop(held);
        let slot = match self.recorder.reserve_to_act().await {
            Ok(slot) => slot,
            Err(err) => return self.refuse(time, id, parsed, &err),
        };
        let query = match parsed {
            Ok(query) => query,
            Err(rejected) => {
                if !self.limiter.take_blocked() {
                    self.limiter.refused(Limit::Blocked, &rejected.qname);
                    return rejected.response;
                }
                record_in(
                    slot,
                    self,
                    DnsEvent {
                        time,
                        qname: rejected.qname,
                        qtype: rejected.qtype,
                        rcode: rcode_text(rejected.rcode),
                        decision: Outcome::Error,
                        matched_rule: None,
                        answers: Vec::new(),
                        process_name: None,
                        trace_id: None,
                        error: Some(rejected.reason),
                    },
                );
                return rejected.response;
            }
        };
        let answer = self.answer(&query).await;
        let mut message = Message::response(query.metadata.id, OpCode::Query);
        message.metadata = Metadata::response_from_request(&query.metadata);
        message.metadata.recursion_available = true;
        message.metadata.response_code = answer.rcode;
        message.add_query(query.query.clone());
        message.add_answers(answer.answers.iter().cloned());
        message.add_authorities(answer.authorities);
        if query.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            message.set_edns(edns);
        }
        if let Some(limit) = answer.summarized {
            self.limiter.refused(limit, &query.qname);
            return Some(encode(&message));
        }
        if answer.outcome == Outcome::Allowed {
            let addresses: Vec<IpAddr> = answer.answers.iter().filter_map(record_ip).collect();
            let ttl = answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
            self.bindings.bind(&query.qname, addresses, Duration::from_secs(u64::from(ttl)));
        }
        record_in(
            slot,
            self,
            DnsEvent {
                time,
                qname: query.qname,
                qtype: query.qtype,
                rcode: rcode_text(answer.rcode),
                decision: answer.outcome,
                matched_rule: answer.rule,
                answers: answer.answers.iter().map(|r| format!("{} {}", r.record_type(), r.data)).collect(),
                process_name: None,
                trace_id: None,
                error: answer.error,
            },
        );
        Some(encode(&message))
    }

    /// The answer to a well-formed query: name caps, the policy, the limits.
    async fn answer(&self, query: &GuestQuery) -> Answer {
        if let Some((limit, why)) = self.limiter.check_name(&query.qname) {
            return Answer::over_limit(limit, Some(why), !self.limiter.take_blocked());
        }
        let event = Event::DnsRequest(DnsRequest { qname: query.qname.clone(), qtype: query.qtype.clone() });
        let verdict = self.policy.decide(&event).await;
        match verdict.decision {
            Decision::Allow => self.resolve(query, &verdict.actions, verdict.rule).await,
            Decision::Block | Decision::Ask if self.limiter.take_blocked() => {
                Answer::new(ResponseCode::NXDomain, Outcome::Denied, verdict.rule)
            }
            Decision::Block | Decision::Ask => Answer::over_limit(Limit::Blocked, None, true),
        }
    }

    async fn resolve(&self, query: &GuestQuery, actions: &[Action], rule: Option<String>) -> Answer {
        let name = query.query.name().clone();
        let rtype = query.query.query_type();
        let mut synthesized = None;
        for action in actions {
            if let Action::DnsAnswer { records, ttl } = action {
                let answers = synthesized.get_or_insert_with(Vec::new);
                answers.extend(records.iter().filter_map(|record| synthesize(&name, rtype, record, *ttl)));
            }
        }
        if let Some(answers) = synthesized {
            let mut answer = Answer::new(ResponseCode::NoError, Outcome::Allowed, rule);
            answer.answers = answers;
            return answer;
        }

        if !self.limiter.take_query() {
            return Answer::over_limit(Limit::Queries, None, true);
        }
        let lookup = self.upstream.resolver().lookup(name.to_lowercase(), rtype).await;
        match lookup {
            Ok(lookup) => {
                let remaining = lookup.valid_until().saturating_duration_since(Instant::now()).as_secs();
                let remaining = u32::try_from(remaining).unwrap_or(u32::MAX);
                let mut refused = Vec::new();
                let mut answers = Vec::new();
                for record in lookup.answers() {
                    if let Some(ip) = record_ip(record) {
                        if let Err(why) = self.upstream.guard().check(ip) {
                            refused.push(format!("{} {ip} ({why})", record.record_type()));
                            continue;
                        }
                    }
                    let mut record = record.clone();
                    record.ttl = record.ttl.min(remaining);
                    answers.push(record);
                }
                if !refused.is_empty() && !answers.iter().any(|r| record_ip(r).is_some()) {
                    let mut answer =
                        Answer::new(ResponseCode::NXDomain, Outcome::Denied, Some(ADDRESS_GUARD_RULE.into()));
                    answer.error = Some(format!("answers in refused ranges: {}", refused.join(", ")));
                    return answer;
                }
                let mut answer = Answer::new(ResponseCode::NoError, Outcome::Allowed, rule);
                if !refused.is_empty() {
                    answer.error = Some(format!("dropped answers in refused ranges: {}", refused.join(", ")));
                }
                answer.answers = answers;
                answer
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                let mut answer = Answer::new(none.response_code, Outcome::Allowed, rule);
                if let Some(soa) = none.soa {
                    answer.authorities.push(soa.into_record_of_rdata());
                }
                answer
            }
            Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain))) => {
                Answer::new(ResponseCode::NXDomain, Outcome::Allowed, rule)
            }
            Err(err) => {
                let mut answer = Answer::new(ResponseCode::ServFail, Outcome::Allowed, rule);
                answer.error = Some(format!("upstream: {err}"));
                answer
            }
        }
    }

    /// Answer SERVFAIL without acting on the query, and record that best effort.
    fn refuse(
        &self,
        time: SystemTime,
        id: Option<u16>,
        parsed: Result<GuestQuery, Rejected>,
        err: &TelemetryError,
    ) -> Option<Vec<u8>> {
        let (query, qname, qtype) = match parsed {
            Ok(q) => (Some(q.query), q.qname, q.qtype),
            Err(rejected) => (None, rejected.qname, rejected.qtype),
        };
        tracing::debug!(%err, qname, "DNS query refused: its row cannot be queued");
        self.record(DnsEvent {
            time,
            qname,
            qtype,
            rcode: rcode_text(ResponseCode::ServFail),
            decision: Outcome::Error,
            matched_rule: None,
            answers: Vec::new(),
            process_name: None,
            trace_id: None,
            error: Some(format!("refused, not answered: {err}")),
        });
        let mut message = Message::error_msg(id?, OpCode::Query, ResponseCode::ServFail);
        message.metadata.recursion_available = true;
        message.add_queries(query);
        Some(encode(&message))
    }

    /// Record without a slot, best effort (connection-level events and refusals).
    fn record(&self, event: DnsEvent) {
        if let Err(err) = self.recorder.record_dns(event) {
            tracing::error!(%err, "DNS event not recorded");
        }
    }

    fn record_connection_error(&self, error: String) {
        self.record(DnsEvent {
            time: SystemTime::now(),
            qname: String::new(),
            qtype: String::new(),
            rcode: String::new(),
            decision: Outcome::Error,
            matched_rule: None,
            answers: Vec::new(),
            process_name: None,
            trace_id: None,
            error: Some(error),
        });
    }
}

/// Record in a reserved slot, or best effort when serving without one (fail open).
fn record_in(slot: Option<Slot>, handler: &DnsHandler, event: DnsEvent) {
    match slot {
        Some(slot) => slot.record_dns(event),
        None => handler.record(event),
    }
}

fn record_ip(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

/// A record from a rewrite rule, if it answers a query of type `rtype`.
/// CNAMEs answer every type, as a real alias would.
fn synthesize(name: &Name, rtype: RecordType, record: &DnsRecord, ttl: u32) -> Option<Record> {
    let data = match record {
        DnsRecord::A(ip) if rtype == RecordType::A => RData::A(A(*ip)),
        DnsRecord::Aaaa(ip) if rtype == RecordType::AAAA => RData::AAAA(AAAA(*ip)),
        DnsRecord::Txt(text) if rtype == RecordType::TXT => RData::TXT(TXT::new(vec![text.clone()])),
        DnsRecord::Cname(target) => match Name::from_str(target) {
            Ok(mut target) => {
                target.set_fqdn(true);
                RData::CNAME(CNAME(target))
            }
            Err(err) => {
                tracing::warn!(%err, target, "rewrite CNAME target is not a domain name");
                return None;
            }
        },
        _ => return None,
    };
    Some(Record::from_rdata(name.clone(), ttl, data))
}

impl ConnectionHandler for DnsHandler {
    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let activity = Activity::new();
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(Tracked::new(read_half, activity.clone()));
        let mut writer = BufWriter::new(Tracked::new(write_half, activity.clone()));
        let (answers, mut to_write) = mpsc::channel::<(Vec<u8>, Held)>(MAX_IN_FLIGHT);
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let connection_bytes = Arc::new(Semaphore::new(MAX_HELD_BYTES_PER_CONNECTION));

        let reading = async {
            loop {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let frame = async {
                    let Some(len) = read_frame_len(&mut reader).await? else { return Ok(None) };
                    let Some(held) = Held::acquire(&connection_bytes, &self.held, len).await else { return Ok(None) };
                    Ok::<_, io::Error>(Some((read_frame_body(&mut reader, len).await?, held)))
                };
                match frame.await {
                    Ok(Some((frame, held))) => {
                        // Detached: a query being answered is recorded even if
                        // the connection goes away meanwhile.
                        let handler = self.clone();
                        let answers = answers.clone();
                        let connection_bytes = connection_bytes.clone();
                        tokio::spawn(async move {
                            if let Some(response) = handler.respond(frame, held).await {
                                if let Some(held) =
                                    Held::acquire(&connection_bytes, &handler.held, response.len()).await
                                {
                                    let _ = answers.send((response, held)).await;
                                }
                            }
                            drop(permit);
                        });
                    }
                    Ok(None) => break,
                    Err(err) => {
                        if err.kind() == io::ErrorKind::UnexpectedEof {
                            self.record_connection_error("connection closed inside a DNS frame".into());
                        }
                        break;
                    }
                }
            }
            drop(answers);
        };
        let writing = async {
            while let Some((response, held)) = to_write.recv().await {
                if write_frame(&mut writer, &response).await.is_err() {
                    break;
                }
                drop(held);
                if to_write.is_empty() && writer.flush().await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        };
        tokio::select! {
            _ = async { tokio::join!(reading, writing) } => {}
            _ = activity.expired(self.idle_timeout) => tracing::debug!("idle DNS connection closed"),
        }
    }

    fn accepting(&self) -> bool {
        self.recorder.accept_new_connections()
    }

    fn stopped(&self) {
        self.limiter.write_summary();
    }

    fn refused(&self, reason: &str) {
        tracing::warn!(reason, "DNS connection refused");
        self.record_connection_error(format!("connection refused: {reason}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_bytes(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
        message.to_vec().unwrap()
    }

    #[test]
    fn parses_a_query() {
        let q = parse_query(&query_bytes(7, "Example.COM.", RecordType::AAAA)).unwrap();
        assert_eq!((q.qname.as_str(), q.qtype.as_str()), ("example.com", "AAAA"));
        let q = parse_query(&query_bytes(7, "x.test.", RecordType::Unknown(65280))).unwrap();
        assert_eq!(q.qtype, "TYPE65280");
    }

    #[test]
    fn rejects_malformed_messages_with_formerr() {
        for garbage in [&[0x12u8, 0x34, 0xff][..], &[0x12, 0x34, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 3, b'a']] {
            let rejected = parse_query(garbage).unwrap_err();
            assert_eq!(rejected.rcode, ResponseCode::FormErr);
            let answer = Message::from_vec(&rejected.response.unwrap()).unwrap();
            assert_eq!(answer.metadata.id, 0x1234);
            assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(answer.metadata.message_type, MessageType::Response);
        }
        assert!(parse_query(&[0x12]).unwrap_err().response.is_none());
        assert!(parse_query(&[]).unwrap_err().response.is_none());
    }

    #[test]
    fn rejects_responses_multiple_questions_and_other_opcodes() {
        let mut message = Message::new(1, MessageType::Response, OpCode::Query);
        message.add_query(Query::query(Name::from_str("a.test.").unwrap(), RecordType::A));
        assert_eq!(parse_query(&message.to_vec().unwrap()).unwrap_err().rcode, ResponseCode::FormErr);

        let mut message = Message::new(1, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(Name::from_str("a.test.").unwrap(), RecordType::A));
        message.add_query(Query::query(Name::from_str("b.test.").unwrap(), RecordType::A));
        let rejected = parse_query(&message.to_vec().unwrap()).unwrap_err();
        assert_eq!(rejected.rcode, ResponseCode::FormErr);
        assert_eq!(rejected.qname, "a.test");

        let mut message = Message::new(1, MessageType::Query, OpCode::Update);
        message.add_query(Query::query(Name::from_str("a.test.").unwrap(), RecordType::SOA));
        assert_eq!(parse_query(&message.to_vec().unwrap()).unwrap_err().rcode, ResponseCode::NotImp);

        let mut message = Message::new(1, MessageType::Query, OpCode::Query);
        let mut query = Query::query(Name::from_str("a.test.").unwrap(), RecordType::A);
        query.set_query_class(DNSClass::CH);
        message.add_query(query);
        assert_eq!(parse_query(&message.to_vec().unwrap()).unwrap_err().rcode, ResponseCode::NotImp);
    }

    #[tokio::test]
    async fn frames_round_trip_and_truncation_is_an_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"one").await.unwrap();
        write_frame(&mut wire, b"").await.unwrap();
        write_frame(&mut wire, b"three").await.unwrap();
        let mut reader = &wire[..];
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), b"one");
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), b"");
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), b"three");
        assert!(read_frame(&mut reader).await.unwrap().is_none());
        let cut = &wire[..wire.len() - 1];
        let mut reader = cut;
        read_frame(&mut reader).await.unwrap();
        read_frame(&mut reader).await.unwrap();
        assert_eq!(read_frame(&mut reader).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(read_frame(&mut &[0u8][..]).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn oversized_answers_are_truncated() {
        let name = Name::from_str("big.test.").unwrap();
        let mut message = Message::response(9, OpCode::Query);
        message.add_query(Query::query(name.clone(), RecordType::TXT));
        for i in 0..300 {
            message.add_answer(Record::from_rdata(name.clone(), 60, RData::TXT(TXT::new(vec![format!("{i:0>250}")]))));
        }
        let bytes = encode(&message);
        assert!(bytes.len() <= usize::from(u16::MAX));
        let decoded = Message::from_vec(&bytes).unwrap();
        assert!(decoded.metadata.truncation);
        assert_eq!(decoded.metadata.id, 9);
    }

    #[test]
    fn rewrite_records_answer_matching_types_and_cnames_always() {
        let name = Name::from_str("svc.test.").unwrap();
        let a = DnsRecord::A("10.1.2.3".parse().unwrap());
        let cname = DnsRecord::Cname("target.test".into());
        assert!(synthesize(&name, RecordType::A, &a, 30).is_some());
        assert!(synthesize(&name, RecordType::AAAA, &a, 30).is_none());
        let alias = synthesize(&name, RecordType::AAAA, &cname, 30).unwrap();
        assert_eq!(alias.data.to_string(), "target.test.");
        assert_eq!(alias.ttl, 30);
        assert!(synthesize(&name, RecordType::A, &DnsRecord::Cname("bad..name".into()), 30).is_none());
    }
}
