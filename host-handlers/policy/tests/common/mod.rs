#![allow(clippy::unwrap_used, dead_code)]
//! An engine with an `ask` rule and a scripted asker, for the `ask` tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use policy::{Asker, Engine, Event, Layer, ProfileSource, Secrets};

const PROFILE: &str = r#"
[security.rules.http.ask_unknown]
on = "http.request"
decision = "ask"
priority = 900

[security.rules.http.allow_known]
on = "http.request"
if = 'http.request.host == "known.example"'
decision = "allow"

[security.rules.http.key]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:TOKEN}" }
"#;

pub fn engine() -> Engine {
    Engine::builder()
        .profile(Layer::User, ProfileSource::Text { name: "p.toml".into(), text: PROFILE.into() })
        .secrets(Secrets::none().with_value("TOKEN", "t0k3n-value"))
        .build()
        .unwrap()
}

pub fn request(host: &str) -> Event {
    Event::from_json(&format!(r#"{{"event": "http.request", "host": "{host}"}}"#)).unwrap()
}

/// Answers with `answer` after `delay`, or never when `answer` is `None`.
#[derive(Debug)]
pub struct Scripted {
    answer: Option<bool>,
    delay: Duration,
    calls: AtomicUsize,
}

impl Scripted {
    pub fn new(answer: Option<bool>, delay: Duration) -> Arc<Scripted> {
        Arc::new(Scripted { answer, delay, calls: AtomicUsize::new(0) })
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Asker for Scripted {
    fn ask(&self, _event: &Event, rule: Option<&str>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        assert_eq!(rule, Some("http.ask_unknown"));
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            match self.answer {
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        })
    }
}
