//! The DNS handler end to end on loopback, with a hickory authoritative server
//! as its upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::str::FromStr;

use common::Harness;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use net::fixtures::{dns_query, dns_query_message};
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
    assert_eq!(
        (metadata.decision.as_str(), metadata.matched_rule.as_deref()),
        ("denied", Some("builtin.address_guard"))
    );
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
        let frame = net::dns::read_frame(&mut stream).await.unwrap().unwrap();
        let answer = Message::from_vec(&frame).unwrap();
        let name = answer.queries[0].name().to_string();
        assert_eq!(name, names[usize::from(answer.metadata.id) % names.len()], "answer matches its query by ID");
        seen.insert(answer.metadata.id, answer.metadata.response_code);
    }
    assert_eq!(seen.len(), 40);
    stream.shutdown().await.unwrap();
    assert_eq!(net::dns::read_frame(&mut stream).await.unwrap(), None);
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

/// Send `names` as pipelined A queries on one connection and read every
/// answer: (id, rcode) pairs.
async fn pipelined(h: &Harness, names: &[String]) -> Vec<(u16, ResponseCode)> {
    let mut stream = tokio::net::UnixStream::connect(h.dns_socket()).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        for (id, name) in names.iter().enumerate() {
            let mut query = Message::new(u16::try_from(id).unwrap(), MessageType::Query, OpCode::Query);
            query.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
            let bytes = query.to_vec().unwrap();
            writer.write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes()).await.unwrap();
            writer.write_all(&bytes).await.unwrap();
        }
    };
    let receive = async {
        let mut answers = Vec::new();
        for _ in 0..names.len() {
            let frame = net::dns::read_frame(&mut reader).await.unwrap().unwrap();
            let answer = Message::from_vec(&frame).unwrap();
            answers.push((answer.metadata.id, answer.metadata.response_code));
        }
        answers
    };
    let ((), answers) = tokio::join!(send, receive);
    answers
}

/// The number of refused queries a summary row counts.
fn summarized(row: &telemetry::query::DnsRow) -> u64 {
    let error = row.error.as_deref().unwrap_or_default();
    error.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in {error:?}"))
}

/// A guest flooding random names under a blocked domain: nothing reaches the
/// upstream, session.db stays bounded (rows for the burst, then one summary
/// a second), every query is accounted for, and allowed names still resolve.
#[tokio::test]
async fn dns_flood_of_blocked_names_is_refused_summarised_and_bounded() {
    let h = Harness::start().await;
    let started = std::time::Instant::now();
    let names: Vec<String> =
        (0..10_000u32).map(|i| format!("{:08x}.exfil.example.", i.wrapping_mul(2_654_435_761))).collect();
    let answers = pipelined(&h, &names).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(answers.len(), 10_000);
    let refused = answers.iter().filter(|(_, rcode)| *rcode == ResponseCode::Refused).count();
    let nxdomain = answers.iter().filter(|(_, rcode)| *rcode == ResponseCode::NXDomain).count();
    assert_eq!(refused + nxdomain, 10_000, "every blocked query is NXDOMAIN or REFUSED");
    assert_eq!(h.dns_fixture.queries(), 0, "a blocked name reached the upstream");

    // Right after: an allowed name resolves.
    let answer = dns_query(&h.dns_socket(), "a.test.", RecordType::A).await.unwrap();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer), ["127.0.0.1"]);

    // Summaries are written a second after their first refusal.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let rows = h.dns_rows().await;
    let (summaries, single): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.qtype == "*");
    let logged_blocked = single.iter().filter(|r| r.decision == "denied" && r.rcode == "NXDOMAIN").count();
    assert_eq!(logged_blocked, nxdomain, "each NXDOMAIN answer has its row");
    let budget = 50.0 + 5.0 * (elapsed + 1.0);
    assert!((logged_blocked as f64) <= budget, "{logged_blocked} blocked rows in {elapsed:.1} s: over the limit");
    assert!(summaries.len() as f64 <= elapsed + 3.0, "{} summary rows in {elapsed:.1} s", summaries.len());
    assert!(summaries.iter().all(|r| r.rcode == "REFUSED" && r.matched_rule.as_deref() == Some("builtin.dns_limit")));
    let counted: u64 = summaries.iter().map(|r| summarized(r)).sum();
    assert_eq!(counted, refused as u64, "summary rows count every refused query");
    assert!(single.iter().any(|r| r.qname == "a.test" && r.rcode == "NOERROR"));
    eprintln!(
        "10000 blocked queries in {elapsed:.2} s: {nxdomain} NXDOMAIN with a row each, {refused} REFUSED in {} summary rows",
        summaries.len()
    );
    h.shutdown().await;
}

/// Allowed names beyond the upstream budget are refused: the upstream sees at
/// most the burst, and the refusals are summarised.
#[tokio::test]
async fn upstream_sees_no_more_than_the_query_budget() {
    let limits = "[security.limits.dns]\nqueries_per_second = 1\nqueries_burst = 20\n";
    let h =
        Harness::start_with_profile(|config| config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()], limits)
            .await;
    let names: Vec<String> = (0..200).map(|i| format!("n{i}.nosuch.test.")).collect();
    let answers = pipelined(&h, &names).await;
    let refused = answers.iter().filter(|(_, rcode)| *rcode == ResponseCode::Refused).count();
    assert!(h.dns_fixture.queries() <= 22, "the upstream saw {} queries", h.dns_fixture.queries());
    assert!(refused >= 178, "{refused} refused");
    let rows = h.dns_rows().await;
    let logged = rows.iter().filter(|r| r.qtype == "A").count();
    assert_eq!(logged + refused, 200, "each query has its row or is counted in a summary");
    h.shutdown().await;
}

/// Names over the length or label caps are refused without a decision or a lookup.
#[tokio::test]
async fn long_names_are_refused_without_a_lookup() {
    let h = Harness::start().await;
    let long = format!(
        "{}.abcdefghij.test.",
        ["abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0"; 3].join(".")
    );
    let deep = format!("{}test.", "a.".repeat(20));
    for name in [long.as_str(), deep.as_str()] {
        let answer = dns_query(&h.dns_socket(), name, RecordType::A).await.unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    assert_eq!(h.dns_fixture.queries(), 0);
    let rows = h.dns_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.matched_rule.as_deref() == Some("builtin.dns_limit") && r.decision == "denied"));
    assert!(
        rows[0].error.as_deref().unwrap_or_default().contains("bytes is over the limit of 200"),
        "{:?}",
        rows[0].error
    );
    assert!(
        rows[1].error.as_deref().unwrap_or_default().contains("21 labels is over the limit of 16"),
        "{:?}",
        rows[1].error
    );
    h.shutdown().await;
}
