//! dns-proxy against a fake host DNS handler on a Unix socket (standing in
//! for vsock port 5007), with clients on 127.0.0.1.
//!
//! The fake host answers by query name: `<n>.a.test` gets an A record
//! 192.0.2.<n>, `big.test` gets ~2 KB of TXT records, `slow.test` is never
//! answered, `junk.test` gets bytes that are not DNS, and a name starting with
//! `wait<ms>` is answered after that many milliseconds.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_proxies::dns;
use guest_proxies::upstream::Upstream;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_millis(500);

struct Proxy {
    addr_udp: SocketAddr,
    addr_tcp: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Start dns-proxy, with the fake host listening unless `host` is false.
async fn start(host: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("vsock.sock_5007");
    if host {
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(fake_host(listener));
    }
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (addr_udp, addr_tcp) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    tokio::spawn(dns::serve(udp, tcp, Upstream::Unix(socket), TIMEOUT));
    Proxy { addr_udp, addr_tcp, _dir: dir }
}

async fn fake_host(listener: UnixListener) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut reader, writer) = stream.into_split();
        let writer = std::sync::Arc::new(Mutex::new(writer));
        tokio::spawn(async move {
            loop {
                let Ok(len) = reader.read_u16().await else { return };
                let mut buf = vec![0; usize::from(len)];
                if reader.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let writer = writer.clone();
                tokio::spawn(async move {
                    let query = Message::from_vec(&buf).unwrap();
                    let name = query.queries[0].name().to_ascii();
                    if let Some(ms) = name.strip_prefix("wait").and_then(|r| r.split('.').next()) {
                        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                    }
                    let answer = match name.as_str() {
                        "slow.test." => return,
                        "junk.test." => {
                            let mut junk = buf[..2].to_vec();
                            junk.extend_from_slice(b"\xff\xffnot dns");
                            junk
                        }
                        _ => host_answer(&query, &name),
                    };
                    let mut w = writer.lock().await;
                    w.write_u16(answer.len() as u16).await.unwrap();
                    w.write_all(&answer).await.unwrap();
                });
            }
        });
    }
}

fn host_answer(query: &Message, name: &str) -> Vec<u8> {
    let mut response = Message::response(query.metadata.id, OpCode::Query);
    response.add_queries(query.queries.iter().cloned());
    let owner = query.queries[0].name().clone();
    if name == "big.test." {
        for i in 0..20 {
            let rdata = RData::TXT(TXT::new(vec![format!("{i:03}{}", "x".repeat(97))]));
            response.add_answer(Record::from_rdata(owner.clone(), 60, rdata));
        }
    } else {
        let n: u8 = name.split('.').rev().nth(3).and_then(|l| l.parse().ok()).unwrap_or(0);
        response.add_answer(Record::from_rdata(owner, 60, RData::A(A(Ipv4Addr::new(192, 0, 2, n)))));
    }
    if let Some(edns) = &query.edns {
        let mut e = Edns::new();
        e.set_max_payload(edns.max_payload());
        response.set_edns(e);
    }
    response.to_vec().unwrap()
}

fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

async fn udp_exchange(proxy: &Proxy, packet: &[u8]) -> Message {
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    client.send_to(packet, proxy.addr_udp).await.unwrap();
    let mut buf = vec![0; 65535];
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
    Message::from_vec(&buf[..len]).unwrap()
}

fn a_record(m: &Message) -> Ipv4Addr {
    match &m.answers[0].data {
        RData::A(a) => a.0,
        other => panic!("not an A record: {other:?}"),
    }
}

#[tokio::test]
async fn udp_round_trip() {
    let proxy = start(true).await;
    let answer = udp_exchange(&proxy, &query(0x4242, "7.a.test.", None)).await;
    assert_eq!(answer.metadata.id, 0x4242);
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(!answer.metadata.truncation);
    assert_eq!(a_record(&answer), Ipv4Addr::new(192, 0, 2, 7));
}

#[tokio::test]
async fn tcp_pipelined_queries_are_answered_out_of_order() {
    let proxy = start(true).await;
    let mut stream = TcpStream::connect(proxy.addr_tcp).await.unwrap();
    // The first query is answered last.
    for (id, name) in [(1, "wait300.1.a.test."), (2, "2.a.test."), (3, "3.a.test.")] {
        let q = query(id, name, None);
        stream.write_u16(q.len() as u16).await.unwrap();
        stream.write_all(&q).await.unwrap();
    }
    stream.shutdown().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(a_record(&m), Ipv4Addr::new(192, 0, 2, m.metadata.id as u8));
        ids.push(m.metadata.id);
    }
    assert_eq!(ids.last(), Some(&1));
    // After our EOF and the last answer, the proxy closes.
    assert_eq!(stream.read(&mut [0; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn clients_reusing_an_id_get_their_own_answers() {
    let proxy = start(true).await;
    let slow_query = query(99, "wait200.5.a.test.", None);
    let slow = udp_exchange(&proxy, &slow_query);
    let fast = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        udp_exchange(&proxy, &query(99, "6.a.test.", None)).await
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!((slow.metadata.id, fast.metadata.id), (99, 99));
    assert_eq!(a_record(&slow), Ipv4Addr::new(192, 0, 2, 5));
    assert_eq!(a_record(&fast), Ipv4Addr::new(192, 0, 2, 6));
}

#[tokio::test]
async fn large_udp_answers_are_truncated_unless_edns_allows_them() {
    let proxy = start(true).await;
    let plain = udp_exchange(&proxy, &query(1, "big.test.", None)).await;
    assert!(plain.metadata.truncation);
    assert!(plain.answers.is_empty());
    assert_eq!(plain.queries[0].name().to_ascii(), "big.test.");

    let small_edns = udp_exchange(&proxy, &query(2, "big.test.", Some(1232))).await;
    assert!(small_edns.metadata.truncation);

    let edns = udp_exchange(&proxy, &query(3, "big.test.", Some(4096))).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 20);

    // Over TCP the whole answer comes back.
    let mut stream = TcpStream::connect(proxy.addr_tcp).await.unwrap();
    let q = query(4, "big.test.", None);
    stream.write_u16(q.len() as u16).await.unwrap();
    stream.write_all(&q).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    let full = Message::from_vec(&buf).unwrap();
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 20);
}

#[tokio::test]
async fn unanswered_query_gets_servfail_after_the_timeout() {
    let proxy = start(true).await;
    let started = Instant::now();
    let answer = udp_exchange(&proxy, &query(0x77, "slow.test.", Some(1232))).await;
    let waited = started.elapsed();
    assert_eq!(answer.metadata.id, 0x77);
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(answer.queries[0].name().to_ascii(), "slow.test.");
    assert!(answer.edns.is_some());
    assert!(waited >= TIMEOUT, "answered after {waited:?}");
    // The link is still usable for other queries.
    let ok = udp_exchange(&proxy, &query(0x78, "8.a.test.", None)).await;
    assert_eq!(a_record(&ok), Ipv4Addr::new(192, 0, 2, 8));
}

#[tokio::test]
async fn junk_from_the_host_becomes_servfail() {
    let proxy = start(true).await;
    let answer = udp_exchange(&proxy, &query(5, "junk.test.", None)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn absent_host_gets_servfail_without_waiting() {
    let proxy = start(false).await;
    let started = Instant::now();
    let answer = udp_exchange(&proxy, &query(6, "1.a.test.", None)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn malformed_queries_get_formerr_and_headerless_packets_nothing() {
    let proxy = start(true).await;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    // Too short for a header: no answer. Then a truncated query: FORMERR.
    client.send_to(b"\x12\x34\x01", proxy.addr_udp).await.unwrap();
    let mut cut = query(0x1234, "1.a.test.", None);
    cut.truncate(cut.len() - 2);
    client.send_to(&cut, proxy.addr_udp).await.unwrap();
    let mut buf = vec![0; 1500];
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
    let answer = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(answer.metadata.id, 0x1234);
    assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
    // Nothing else arrives (the short packet was dropped).
    assert!(tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf)).await.is_err());
}
