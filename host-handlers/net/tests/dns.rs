//! The DNS handler end to end on loopback, with a hickory authoritative server
//! as its upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::str::FromStr;

use common::Harness;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use sandbox_net::fixtures::{dns_query, dns_query_message};
use tokio::io::AsyncWriteExt;

fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn allowed_name_resolves_and_is_recorded() {
    let h = Harness::start().await;
    let answer = dns_query(&h.dns_socket(), "a.test.", RecordType::A).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer), ["127.0.0.1"]);
    assert!(answer.metadata.recursion_available);
    let rows = h.dns_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].qname.as_str(), rows[0].qtype.as_str(), rows[0].rcode.as_str()), ("a.test", "A", "NOERROR"));
    assert_eq!((rows[0].decision.as_str(), rows[0].matched_rule.as_deref()), ("allowed", Some("dns.test_names")));
    assert_eq!(rows[0].answers, ["A 127.0.0.1"]);
    h.shutdown().await;
}

#[tokio::test]
async fn blocked_names_get_nxdomain_without_asking_upstream() {
    let h = Harness::start().await;
    for name in ["blocked.test.", "example.com."] {
        let answer = dns_query(&h.dns_socket(), name, RecordType::A).await.unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    assert_eq!(h.dns_fixture.queries(), 0);
    let rows = h.dns_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.decision == "denied" && r.rcode == "NXDOMAIN"));
    h.shutdown().await;
}

#[tokio::test]
async fn nxdomain_nodata_and_servfail_propagate() {
    let h = Harness::start().await;
    let missing = dns_query(&h.dns_socket(), "nosuch.test.", RecordType::A).await.unwrap();
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert!(missing.authorities.iter().any(|r| r.record_type() == RecordType::SOA), "negative answers carry the SOA");
    let nodata = dns_query(&h.dns_socket(), "a.test.", RecordType::AAAA).await.unwrap();
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    let failing = dns_query(&h.dns_socket(), "x.servfail.test.", RecordType::A).await.unwrap();
    assert_eq!(failing.metadata.response_code, ResponseCode::ServFail);

    let rows = h.dns_rows().await;
    let rcodes: Vec<_> = rows.iter().map(|r| (r.qname.as_str(), r.rcode.as_str(), r.decision.as_str())).collect();
    assert!(rcodes.contains(&("nosuch.test", "NXDOMAIN", "allowed")), "{rcodes:?}");
    assert!(rcodes.contains(&("a.test", "NOERROR", "allowed")), "{rcodes:?}");
    assert!(rcodes.contains(&("x.servfail.test", "SERVFAIL", "allowed")), "{rcodes:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn rewrite_answers_without_upstream() {
    let h = Harness::start().await;
    let answer = dns_query(&h.dns_socket(), "svc.test.", RecordType::A).await.unwrap();
    assert_eq!(addresses(&answer), ["10.9.8.7"]);
    assert_eq!(answer.answers[0].ttl, 30);
    assert_eq!(h.dns_fixture.queries(), 0, "upstream was not asked");
    let rows = h.dns_rows().await;
    assert_eq!(rows[0].answers, ["A 10.9.8.7"]);
    assert_eq!(rows[0].decision, "allowed");
    h.shutdown().await;
}

#[tokio::test]
async fn answers_into_internal_ranges_are_dropped() {
    let h = Harness::start().await;
    for name in ["metadata.test.", "private.test."] {
        let answer = dns_query(&h.dns_socket(), name, RecordType::A).await.unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(answer.answers.is_empty());
    }
    let mixed = dns_query(&h.dns_socket(), "mixed.test.", RecordType::A).await.unwrap();
    assert_eq!(addresses(&mixed), ["93.184.216.34"]);

    let rows = h.dns_rows().await;
    let metadata = rows.iter().find(|r| r.qname == "metadata.test").unwrap();
    assert_eq!((metadata.decision.as_str(), metadata.matched_rule.as_deref()), ("denied", Some("builtin.address_guard")));
    assert!(metadata.error.as_deref().unwrap().contains("169.254.169.254"));
    let mixed = rows.iter().find(|r| r.qname == "mixed.test").unwrap();
    assert_eq!(mixed.decision, "allowed");
    assert!(mixed.error.as_deref().unwrap().contains("192.168.1.9"));
    h.shutdown().await;
}

#[tokio::test]
async fn loopback_answers_need_configuration() {
    let h = Harness::start_with(|config| config.allowed_networks.clear()).await;
    let answer = dns_query(&h.dns_socket(), "a.test.", RecordType::A).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    h.shutdown().await;
}

#[tokio::test]
async fn malformed_queries_get_formerr_and_a_row() {
    let h = Harness::start().await;
    let answer = dns_query_message(&h.dns_socket(), &[0xab, 0xcd, 0x01]).await.unwrap().unwrap();
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!((answer.metadata.id, answer.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    assert_eq!(dns_query_message(&h.dns_socket(), &[0x01]).await.unwrap(), None, "nothing to answer to");
    let rows = h.dns_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.decision == "error"));
    assert!(rows.iter().any(|r| r.rcode == "FORMERR"));
    h.shutdown().await;
}

#[tokio::test]
async fn pipelined_queries_are_answered_by_id() {
    let h = Harness::start().await;
    let mut stream = tokio::net::UnixStream::connect(h.dns_socket()).await.unwrap();
    let names = ["a.test.", "b.test.", "nosuch.test.", "svc.test.", "blocked.test."];
    let mut wire = Vec::new();
    for id in 0..40u16 {
        let mut query = Message::new(id, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(Name::from_str(names[usize::from(id) % names.len()]).unwrap(), RecordType::A));
        let bytes = query.to_vec().unwrap();
        wire.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
        wire.extend_from_slice(&bytes);
    }
    stream.write_all(&wire).await.unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let frame = sandbox_net::dns::read_frame(&mut stream).await.unwrap().unwrap();
        let answer = Message::from_vec(&frame).unwrap();
        let name = answer.queries[0].name().to_string();
        assert_eq!(name, names[usize::from(answer.metadata.id) % names.len()], "answer matches its query by ID");
        seen.insert(answer.metadata.id, answer.metadata.response_code);
    }
    assert_eq!(seen.len(), 40);
    stream.shutdown().await.unwrap();
    assert_eq!(sandbox_net::dns::read_frame(&mut stream).await.unwrap(), None);
    assert_eq!(h.dns_rows().await.len(), 40);
    h.shutdown().await;
}

#[tokio::test]
async fn cache_honours_ttls() {
    let h = Harness::start().await;
    let first = dns_query(&h.dns_socket(), "b.test.", RecordType::A).await.unwrap();
    let asked = h.dns_fixture.queries();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = dns_query(&h.dns_socket(), "b.test.", RecordType::A).await.unwrap();
    assert_eq!(h.dns_fixture.queries(), asked, "second answer came from the cache");
    assert_eq!(addresses(&second), ["127.0.0.1"]);
    assert!(first.answers[0].ttl <= 300);
    assert!(second.answers[0].ttl < first.answers[0].ttl, "TTL counts down in the cache");
    h.shutdown().await;
}
