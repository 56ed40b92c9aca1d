#![allow(clippy::unwrap_used)]
//! Resolving `ask`: answers, timeouts and remembered answers.

mod common;

use std::time::Duration;

use policy::{Action, Decision, Event, Policy};

use common::{engine, request, Scripted};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(start_paused = true)]
async fn answers_timeouts_and_no_asker() {
    // (what, asker's answer, expected decision)
    let cases = [
        ("yes allows", Some(true), Decision::Allow),
        ("no blocks", Some(false), Decision::Block),
        ("no answer before the timeout blocks", None, Decision::Block),
    ];
    for (what, answer, expected) in cases {
        let asker = Scripted::new(answer, Duration::from_secs(1));
        let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
        let verdict = policy.decide(&request("unknown.example")).await;
        assert_eq!((verdict.decision, verdict.rule.as_deref()), (expected, Some("http.ask_unknown")), "{what}");
        assert_eq!(asker.calls(), 1, "{what}");
        // An allowed answer brings the rewrite actions with it.
        let rewrites = verdict.actions.iter().filter(|a| matches!(a, Action::SetRequestHeader(..))).count();
        assert_eq!(rewrites, usize::from(expected == Decision::Allow), "{what}");
    }
    let verdict = Policy::new(engine()).decide(&request("unknown.example")).await;
    assert_eq!((verdict.decision, verdict.rule.as_deref()), (Decision::Block, Some("http.ask_unknown")));
}

#[tokio::test(start_paused = true)]
async fn a_slow_answer_is_a_timeout() {
    let asker = Scripted::new(Some(true), Duration::from_secs(31));
    let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
    let started = tokio::time::Instant::now();
    assert_eq!(policy.decide(&request("slow.example")).await.decision, Decision::Block);
    assert_eq!(started.elapsed(), TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn decisions_that_are_not_ask_do_not_ask() {
    let asker = Scripted::new(Some(false), Duration::ZERO);
    let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
    let verdict = policy.decide(&request("known.example")).await;
    assert_eq!((verdict.decision, verdict.actions.len()), (Decision::Allow, 1));
    let verdict = policy.decide(&Event::from_json(r#"{"event": "dns.request", "qname": "x"}"#).unwrap()).await;
    assert_eq!((verdict.decision, verdict.rule), (Decision::Block, None));
    assert_eq!(asker.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn answers_are_remembered_per_rule_and_host() {
    let asker = Scripted::new(Some(true), Duration::from_millis(10));
    let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
    let clone = policy.clone();
    for (host, calls) in [("a.example", 1), ("a.example", 1), ("b.example", 2), ("a.example", 2)] {
        assert_eq!(policy.decide(&request(host)).await.decision, Decision::Allow);
        assert_eq!(asker.calls(), calls, "{host}");
    }
    // Clones share what was answered.
    assert_eq!(clone.decide(&request("b.example")).await.decision, Decision::Allow);
    assert_eq!(asker.calls(), 2);

    let forgetful = Policy::with_asker(engine(), asker.clone(), TIMEOUT).remember_answers(false);
    for _ in 0..3 {
        forgetful.decide(&request("a.example")).await;
    }
    assert_eq!(asker.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_not_remembered() {
    let silent = Scripted::new(None, Duration::ZERO);
    let policy = Policy::with_asker(engine(), silent.clone(), Duration::from_secs(1));
    for calls in [1, 2] {
        assert_eq!(policy.decide(&request("a.example")).await.decision, Decision::Block);
        assert_eq!(silent.calls(), calls);
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_questions_are_asked_once() {
    let asker = Scripted::new(Some(false), Duration::from_secs(2));
    let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
    let event = request("a.example");
    let verdicts = futures_join(&policy, &event, 5).await;
    assert!(verdicts.iter().all(|decision| *decision == Decision::Block));
    assert_eq!(asker.calls(), 1);
}

async fn futures_join(policy: &Policy, event: &Event, count: usize) -> Vec<Decision> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (policy, event) = (policy.clone(), event.clone());
        tasks.spawn(async move { policy.decide(&event).await.decision });
    }
    let mut decisions = Vec::new();
    while let Some(decision) = tasks.join_next().await {
        decisions.push(decision.unwrap());
    }
    decisions
}

#[tokio::test(start_paused = true)]
async fn remembered_answers_cover_only_what_was_shown() {
    let asker = Scripted::new(Some(true), Duration::from_millis(10));
    let policy = Policy::with_asker(engine(), asker.clone(), TIMEOUT);
    let event = |json: &str| Event::from_json(json).unwrap();
    let shown = r#"{"event": "http.request", "host": "a.example", "method": "GET", "path": "/a"}"#;
    assert_eq!(policy.decide(&event(shown)).await.decision, Decision::Allow);
    assert_eq!(asker.calls(), 1);
    // The very question that was answered is not asked again.
    assert_eq!(policy.decide(&event(shown)).await.decision, Decision::Allow);
    assert_eq!(asker.calls(), 1);
    // A yes for GET /a on port 443 says nothing about another method, path
    // or query on the same host: each is asked.
    let others = [
        r#"{"event": "http.request", "host": "a.example", "method": "POST", "path": "/a"}"#,
        r#"{"event": "http.request", "host": "a.example", "method": "GET", "path": "/admin"}"#,
        r#"{"event": "http.request", "host": "a.example", "method": "GET", "path": "/a", "query": "x=1"}"#,
    ];
    for (i, other) in others.iter().enumerate() {
        policy.decide(&event(other)).await;
        assert_eq!(asker.calls(), 2 + i, "{other}");
    }
    // Nor about another port (which this ask rule does not name: blocked).
    let port = r#"{"event": "http.request", "host": "a.example", "method": "GET", "path": "/a", "port": 8443}"#;
    assert_eq!(policy.decide(&event(port)).await.decision, Decision::Block);
}

#[test]
fn questions_state_method_host_port_and_path_and_escape_guest_text() {
    let request = Event::from_json(
        r#"{"event": "http.request", "host": "a.example", "method": "PUT", "path": "/up", "query": "k=v", "port": 8443}"#,
    )
    .unwrap();
    assert_eq!(request.describe(), "PUT https://a.example:8443/up?k=v");
    let dns = Event::from_json(r#"{"event": "dns.request", "qname": "x.example", "qtype": "TXT"}"#).unwrap();
    assert_eq!(dns.describe(), "DNS TXT query for x.example");
    // A path carrying terminal escapes or a bidi override cannot redraw the prompt.
    let hostile = Event::from_json(
        "{\"event\": \"http.request\", \"host\": \"a.example\", \"path\": \"/\\u001b[2K\\r\\u202eok\"}",
    )
    .unwrap();
    let text = hostile.describe();
    assert!(text.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "{text:?}");
    assert!(text.contains("\\u{1b}[2K\\u{d}\\u{202e}ok"), "{text}");
}
