//! Decisions per second on one core, with a profile of 100 rules.
//!
//! The profile mixes the rule shapes profiles use: host and query-name
//! equality, suffixes, lists, methods, path prefixes, regular expressions,
//! header tests (evaluated by the CEL interpreter) and rewrite rules. Three
//! workloads are measured on the calling thread:
//! - mixed: DNS queries and HTTP requests, some allowed, some blocked;
//! - worst case: an HTTP request no rule matches, so every HTTP rule is
//!   evaluated before the default block;
//! - allowed with rewrites: the last allow rule decides and two rewrite
//!   rules add headers.
//!
//! Run with `cargo bench -p policy --bench decide`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use policy::{DnsRequest, Engine, Event, HttpRequest, HttpResponse, Layer, ProfileSource, Secrets, TcpConnect};

const TARGET_PER_SECOND: f64 = 200_000.0;

fn rule(text: &mut String, section: &str, name: &str, on: &str, condition: &str, decision: &str, priority: u32) {
    text.push_str(&format!(
        "[security.rules.{section}.{name}]\non = \"{on}\"\nif = '''{condition}'''\ndecision = \"{decision}\"\npriority = {priority}\n\n"
    ));
}

/// A profile of exactly 100 rules.
fn profile() -> (String, usize) {
    let mut text = String::new();
    let mut count = 0;
    let mut add =
        |text: &mut String, section: &str, name: String, on: &str, condition: String, decision: &str, priority: u32| {
            rule(text, section, &name, on, &condition, decision, priority);
            count += 1;
        };
    for i in 0..30 {
        add(
            &mut text,
            "http",
            format!("host_{i}"),
            "http.request",
            format!(r#"http.request.host == "pkg{i}.example.com" && http.request.method in ["GET", "HEAD"]"#),
            "allow",
            100 + i,
        );
    }
    for i in 0..10 {
        add(
            &mut text,
            "http",
            format!("suffix_{i}"),
            "http.request",
            format!(r#"http.request.host.endsWith(".cdn{i}.example.net")"#),
            "allow",
            200 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "http",
            format!("list_{i}"),
            "http.request",
            format!(r#"http.request.host in ["a{i}.example.org", "b{i}.example.org", "c{i}.example.org"]"#),
            "allow",
            300 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "http",
            format!("api_path_{i}"),
            "http.request",
            format!(
                r#"http.request.host == "api{i}.example.com" && http.request.path.startsWith("/v1/") && http.request.method == "GET""#
            ),
            "allow",
            400 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "http",
            format!("regex_{i}"),
            "http.request",
            format!(r#"http.request.host.matches("^mirror[0-9]+\\.site{i}\\.example$")"#),
            "allow",
            500 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "http",
            format!("no_write_{i}"),
            "http.request",
            format!(r#"http.request.host == "pkg{i}.example.com" && http.request.method in ["POST", "PUT", "DELETE"]"#),
            "block",
            10 + i,
        );
    }
    for i in 0..3 {
        add(
            &mut text,
            "http",
            format!("header_{i}"),
            "http.request",
            format!(r#""x-team-{i}" in http.request.headers && http.request.headers["x-team-{i}"] == "infra""#),
            "allow",
            600 + i,
        );
    }
    for i in 0..2 {
        add(
            &mut text,
            "http",
            format!("token_{i}"),
            "http.request",
            format!(r#"http.request.host == "pkg{i}.example.com""#),
            "rewrite",
            700 + i,
        );
        text.push_str(&format!(
            "set_request_headers = {{ authorization = \"Bearer ${{secret:TOKEN}}\", \"x-rule\" = \"{i}\" }}\n\n"
        ));
    }
    for i in 0..20 {
        add(
            &mut text,
            "dns",
            format!("name_{i}"),
            "dns.request",
            format!(r#"dns.request.qname == "pkg{i}.example.com""#),
            "allow",
            100 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "dns",
            format!("zone_{i}"),
            "dns.request",
            format!(r#"dns.request.qname.endsWith(".zone{i}.example") && dns.request.qtype in ["A", "AAAA"]"#),
            "allow",
            200 + i,
        );
    }
    for i in 0..5 {
        add(
            &mut text,
            "dns",
            format!("deny_{i}"),
            "dns.request",
            format!(r#"dns.request.qname.endsWith(".bad{i}.example")"#),
            "block",
            10 + i,
        );
    }
    add(
        &mut text,
        "http",
        "responses".to_owned(),
        "http.response",
        "http.response.status < 500".to_owned(),
        "allow",
        100,
    );
    add(
        &mut text,
        "http",
        "errors".to_owned(),
        "http.response",
        "http.response.status >= 500".to_owned(),
        "block",
        100,
    );
    add(
        &mut text,
        "http",
        "big".to_owned(),
        "http.response",
        "has(http.response.headers.etag)".to_owned(),
        "allow",
        200,
    );
    add(
        &mut text,
        "tcp",
        "db".to_owned(),
        "tcp.connect",
        r#"tcp.connect.host == "db.internal" && tcp.connect.port == 5432"#.to_owned(),
        "allow",
        100,
    );
    add(&mut text, "tcp", "ssh".to_owned(), "tcp.connect", "tcp.connect.port == 22".to_owned(), "block", 10);
    (text, count)
}

fn request(host: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Event {
    Event::HttpRequest(HttpRequest {
        host: host.into(),
        sni: host.into(),
        method: method.into(),
        path: path.into(),
        raw_path: path.into(),
        query: String::new(),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
        scheme: "https".into(),
        port: 443,
    })
}

fn dns(qname: &str, qtype: &str) -> Event {
    Event::DnsRequest(DnsRequest { qname: qname.into(), qtype: qtype.into() })
}

/// Decisions per second over `events`, round robin, for about `time`.
fn rate(engine: &Engine, events: &[Event], time: Duration) -> f64 {
    let start = Instant::now();
    let mut decisions = 0u64;
    while start.elapsed() < time {
        for event in events {
            black_box(engine.decide(black_box(event)));
        }
        decisions += events.len() as u64;
    }
    decisions as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let (text, count) = profile();
    assert_eq!(count, 100, "the benchmark profile must have 100 rules");
    let engine = Engine::builder()
        .profile(Layer::User, ProfileSource::Text { name: "bench.toml".into(), text })
        .secrets(Secrets::none().with_value("TOKEN", "bench-token"))
        .build()
        .unwrap_or_else(|error| panic!("benchmark profile: {error}"));

    let mixed = vec![
        request("pkg3.example.com", "GET", "/simple/", &[("user-agent", "pip")]),
        request("pkg25.example.com", "HEAD", "/", &[]),
        request("pkg1.example.com", "POST", "/upload", &[]),
        request("x.cdn7.example.net", "GET", "/file", &[]),
        request("b2.example.org", "GET", "/", &[]),
        request("api3.example.com", "GET", "/v1/items", &[("accept", "application/json")]),
        request("mirror12.site4.example", "GET", "/", &[]),
        request("unknown.example", "GET", "/", &[("x-team-1", "infra")]),
        request("evil.example", "GET", "/", &[("user-agent", "curl"), ("accept", "*/*")]),
        dns("pkg7.example.com", "A"),
        dns("host.zone3.example", "AAAA"),
        dns("x.bad2.example", "A"),
        dns("unknown.example", "A"),
        Event::HttpResponse(HttpResponse {
            request: HttpRequest {
                host: "pkg3.example.com".into(),
                sni: "pkg3.example.com".into(),
                method: "GET".into(),
                path: "/".into(),
                raw_path: "/".into(),
                query: String::new(),
                headers: BTreeMap::new(),
                scheme: "https".into(),
                port: 443,
            },
            status: 200,
            headers: BTreeMap::new(),
        }),
        Event::TcpConnect(TcpConnect { host: "db.internal".into(), ip: None, port: 5432 }),
    ];
    let worst = vec![request("nothing.example", "GET", "/", &[("user-agent", "curl"), ("accept", "*/*")])];
    let rewrites = vec![request("pkg1.example.com", "GET", "/simple/", &[])];
    assert!(engine.decide(&rewrites[0]).actions.len() == 2, "the rewrite workload must rewrite");

    let time = Duration::from_secs(2);
    println!("policy decide benchmark: {count} rules, one thread");
    for (name, events) in
        [("mixed events", &mixed), ("worst case (no rule matches)", &worst), ("allowed with rewrites", &rewrites)]
    {
        let per_second = rate(&engine, events, time);
        println!(
            "{name:>30}: {per_second:>12.0} decisions/s ({:.2} us each), {:.1}x the target of {TARGET_PER_SECOND:.0}/s",
            1e6 / per_second,
            per_second / TARGET_PER_SECOND
        );
    }
}
