//! The native evaluation of lowered conditions against the `cel`
//! interpreter, on the same checked trees and the same events.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::event::{DnsRequest, HttpRequest, HttpResponse, TcpConnect};

fn request(host: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpRequest {
    HttpRequest {
        host: host.into(),
        sni: if host == "sni.example" { "other.example".into() } else { host.into() },
        method: method.into(),
        path: path.into(),
        raw_path: path.into(),
        query: if path == "/q" { "a=1&b=2".into() } else { String::new() },
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        scheme: "https".into(),
        port: 443,
    }
}

fn events(kind: EventKind) -> Vec<Event> {
    match kind {
        EventKind::DnsRequest => vec![
            Event::DnsRequest(DnsRequest { qname: "www.example.com".into(), qtype: "A".into() }),
            Event::DnsRequest(DnsRequest { qname: "example.org".into(), qtype: "TXT".into() }),
        ],
        EventKind::HttpRequest => vec![
            Event::HttpRequest(request("x.com", "GET", "/", &[])),
            Event::HttpRequest(request("api.x.com", "POST", "/v1/items", &[("x-a", "b"), ("authorization", "t")])),
            Event::HttpRequest(request("pypi.org", "GET", "/q", &[("x-a", "c"), ("accept", "*/*")])),
            Event::HttpRequest(request("sni.example", "HEAD", "/api/x", &[("x-long-header", "")])),
        ],
        EventKind::HttpResponse => vec![
            Event::HttpResponse(HttpResponse {
                request: request("x.com", "GET", "/", &[]),
                status: 200,
                headers: BTreeMap::from([("etag".to_owned(), "1".to_owned())]),
            }),
            Event::HttpResponse(HttpResponse {
                request: request("y.com", "GET", "/", &[]),
                status: 503,
                headers: BTreeMap::from([("content-type".to_owned(), "text/html".to_owned())]),
            }),
        ],
        EventKind::TcpConnect => vec![
            Event::TcpConnect(TcpConnect { host: "db".into(), ip: Some(IpAddr::from([10, 0, 0, 5])), port: 5432 }),
            Event::TcpConnect(TcpConnect { host: "other".into(), ip: None, port: 22 }),
        ],
    }
}

/// (event kind, condition, whether evaluating it may fail on the test events)
const CONDITIONS: &[(EventKind, &str, bool)] = &[
    (EventKind::HttpRequest, r#"http.request.host == "pypi.org""#, false),
    (EventKind::HttpRequest, r#""pypi.org" == http.request.host"#, false),
    (EventKind::HttpRequest, r#"http.request.host != "pypi.org""#, false),
    (EventKind::HttpRequest, r#"http.request.host.endsWith(".x.com") || http.request.method == "POST""#, false),
    (EventKind::HttpRequest, r#"!(http.request.host.startsWith("api.")) && http.request.path.contains("/v1")"#, false),
    (EventKind::HttpRequest, r#"http.request.host in ["x.com", "pypi.org", "x.com"]"#, false),
    (EventKind::HttpRequest, r#"http.request.host.matches("^[a-z]+\\.(com|org)$")"#, false),
    (EventKind::HttpRequest, r#"matches(http.request.path, "^/v[0-9]+/")"#, false),
    (EventKind::HttpRequest, r#"http.request.host.matches("x\\.c") && !http.request.path.matches("v2")"#, false),
    (EventKind::HttpRequest, r#""authorization" in http.request.headers"#, false),
    (EventKind::HttpRequest, "has(http.request.headers.authorization)", false),
    (EventKind::HttpRequest, r#"http.request.headers.accept == "*/*""#, true),
    (EventKind::HttpRequest, r#"http.request.headers["x-a"] == "b""#, true),
    (EventKind::HttpRequest, r#"http.request.headers["x-a"] == "b" || http.request.host == "x.com""#, true),
    (EventKind::HttpRequest, r#"http.request.host == "x.com" && http.request.headers["x-a"] == "b""#, true),
    (EventKind::HttpRequest, r#"http.request.headers["x-a"].startsWith("b") && false"#, false),
    (EventKind::HttpRequest, r#"http.request.headers["x-a"].matches("^[bc]$")"#, true),
    (EventKind::HttpRequest, "size(http.request.path) > 3 && http.request.path.size() < 10", false),
    (EventKind::HttpRequest, r#"http.request.headers.exists(h, h.startsWith("x-"))"#, false),
    (EventKind::HttpRequest, r#"http.request.headers.all(k, http.request.headers[k] != "")"#, false),
    (
        EventKind::HttpRequest,
        r#"http.request.method == "GET" ? http.request.path == "/" : http.request.path.startsWith("/api")"#,
        false,
    ),
    (EventKind::HttpRequest, "http.request.sni == http.request.host", false),
    (EventKind::HttpRequest, r#"http.request.query.contains("a=1") && http.request.scheme == "https""#, false),
    (EventKind::HttpRequest, r#"[http.request.host, http.request.sni].exists(x, x == "other.example")"#, false),
    (EventKind::HttpRequest, "http.request.headers.map(k, k.size()).exists(n, n > 5)", false),
    (EventKind::HttpRequest, r#"http.request.headers.filter(k, k.startsWith("x")).size() >= 1"#, false),
    (EventKind::HttpRequest, r#"http.request.headers.exists_one(k, k == "x-a")"#, false),
    (EventKind::HttpRequest, r#"http.request.host + "." == "x.com.""#, false),
    (EventKind::HttpRequest, r#"dyn(http.request.host) == "x.com""#, false),
    (
        EventKind::HttpRequest,
        r#"int("12") == 12 && string(12) == "12" && double("1.5") == 1.5 && uint(3) == 3u"#,
        false,
    ),
    (EventKind::HttpRequest, r#"bool("true") && bytes("a") == b"a" && string(b"a") == "a" && int(2.0) == 2"#, false),
    (EventKind::HttpRequest, r#"{"a": 1}["a"] == 1 && [1, 2][1] == 2 && -1 < 0 && 7 % 2 == 1"#, false),
    (EventKind::HttpRequest, "1 / (size(http.request.path) - 1) >= 0", true),
    (EventKind::HttpRequest, "true", false),
    (EventKind::HttpRequest, r#"!("x-a" in http.request.headers) || http.request.headers["x-a"] != "c""#, false),
    (EventKind::HttpResponse, r#"http.response.status >= 400 && http.request.host == "y.com""#, false),
    (EventKind::HttpResponse, "http.response.status == 200 || http.response.status < 100", false),
    (EventKind::HttpResponse, "has(http.response.headers.etag)", false),
    (EventKind::HttpResponse, r#"http.response.headers["content-type"].startsWith("text/")"#, true),
    (EventKind::HttpResponse, "http.response.status in [200, 204]", false),
    (
        EventKind::DnsRequest,
        r#"dns.request.qname.endsWith(".example.com") && dns.request.qtype in ["A", "AAAA"]"#,
        false,
    ),
    (EventKind::DnsRequest, r#"dns.request.qname.split_test == 1 || true"#, false),
    (EventKind::TcpConnect, r#"tcp.connect.port == 5432 && tcp.connect.host == "db""#, false),
    (EventKind::TcpConnect, r#"tcp.connect.ip.startsWith("10.") || tcp.connect.ip == """#, false),
    (EventKind::TcpConnect, "tcp.connect.port < 1024 && tcp.connect.port != 0", false),
];

fn env() -> Arc<Env> {
    Arc::new(environment())
}

fn has_cel(cond: &Cond) -> bool {
    match cond {
        Cond::Cel(_) => true,
        Cond::Not(inner) => has_cel(inner),
        Cond::And(a, b) | Cond::Or(a, b) => has_cel(a) || has_cel(b),
        Cond::If(a, b, c) => has_cel(a) || has_cel(b) || has_cel(c),
        Cond::Str { left, right, .. } => matches!(left, StrOperand::Cel(_)) || matches!(right, StrOperand::Cel(_)),
        Cond::Matches { subject, .. } | Cond::InList { subject, .. } => {
            matches!(subject, StrOperand::Cel(_))
        }
        Cond::HasKey { key, .. } => matches!(key, StrOperand::Cel(_)),
        Cond::Const(_) | Cond::Int { .. } => false,
    }
}

#[test]
fn native_evaluation_agrees_with_the_interpreter() {
    let env = env();
    let mut compared = 0;
    for (kind, text, may_fail) in CONDITIONS {
        if text.contains("split_test") {
            continue; // a deliberately unknown field, see the next test
        }
        let lowered = Condition::compile(text, *kind, &env).unwrap_or_else(|e| panic!("{text}: {}", e.message));
        let (expr, _) = parse_and_check(text, *kind, &env).unwrap();
        let interpreted = Condition { cond: Cond::Cel(expr), reads: Box::new([]) };
        for event in events(*kind) {
            let (native, reference) = with_event(&event, &env, |cx| (lowered.eval(cx), interpreted.eval(cx)));
            match (&native, &reference) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text} on {event}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{text} on {event}: native {native:?}, interpreter {reference:?}"),
            }
            if !may_fail {
                assert!(reference.is_ok(), "{text} on {event}: {reference:?}");
            }
            compared += 1;
        }
    }
    assert!(compared > 100);
}

#[test]
fn unknown_fields_are_caught_at_compile_time() {
    let env = env();
    let error =
        Condition::compile(r#"dns.request.qname.split_test == 1 || true"#, EventKind::DnsRequest, &env).unwrap_err();
    assert_eq!(error.message, "cannot select `split_test` on string");
    assert_eq!(error.offset, 17);
}

#[test]
fn field_tests_against_literals_run_natively() {
    let env = env();
    for (kind, text) in [
        (
            EventKind::HttpRequest,
            r#"http.request.host == "pypi.org" || http.request.host.endsWith(".pythonhosted.org")"#,
        ),
        (EventKind::HttpRequest, r#"http.request.host in ["a", "b"] && http.request.method != "POST""#),
        (EventKind::HttpRequest, r#"http.request.path.matches("^/v1/") && !has(http.request.headers.cookie)"#),
        (EventKind::HttpRequest, r#""cookie" in http.request.headers ? http.request.sni == http.request.host : true"#),
        (EventKind::HttpResponse, "http.response.status >= 500 && http.response.status <= 599"),
        (EventKind::DnsRequest, r#"dns.request.qname.contains("x") && dns.request.qtype == "A""#),
        (EventKind::TcpConnect, r#"tcp.connect.port == 22 || tcp.connect.ip.startsWith("192.168.")"#),
    ] {
        let condition = Condition::compile(text, kind, &env).unwrap();
        assert!(!has_cel(&condition.cond), "{text}: {:?}", condition.cond);
    }
    let condition = Condition::compile(r#"http.request.headers["x"] == "y""#, EventKind::HttpRequest, &env).unwrap();
    assert!(has_cel(&condition.cond));
}

#[test]
fn positions_are_byte_offsets_in_the_condition() {
    let env = env();
    let error = Condition::compile("http.request.host == 1", EventKind::HttpRequest, &env).unwrap_err();
    assert_eq!((error.offset, error.message.as_str()), (18, "cannot compare string with int"));
    let error = Condition::compile("\"é\" == http.request.hots", EventKind::HttpRequest, &env).unwrap_err();
    assert_eq!(error.offset, 20);
    let error = Condition::compile("true &&\n  (", EventKind::HttpRequest, &env).unwrap_err();
    assert_eq!(error.offset, 11);
    assert!(
        error.message.starts_with("invalid condition: syntax error: mismatched input '<EOF>'"),
        "{}",
        error.message
    );
}
