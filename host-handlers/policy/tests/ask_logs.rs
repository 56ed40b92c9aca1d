#![allow(clippy::unwrap_used)]
//! Logs of `ask` resolution never show secrets. Alone in its test binary:
//! the log subscriber is per thread, and other tests logging on other
//! threads at the same time would disturb tracing's per-callsite caching.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{engine, request, Scripted};
use policy::Policy;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn logs_never_show_secrets() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for answer in [Some(true), Some(false), None] {
        let policy = Policy::with_asker(engine(), Scripted::new(answer, Duration::ZERO), Duration::from_secs(1));
        let verdict = policy.decide(&request("unknown.example")).await;
        tracing::info!(?verdict, "decided");
    }
    Policy::new(engine()).decide(&request("unknown.example")).await;
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for expected in ["ask answered", "ask timed out: blocked", "ask without an asker: blocked", "[REDACTED]"] {
        assert!(logs.contains(expected), "missing {expected:?} in {logs}");
    }
    assert!(!logs.contains("t0k3n"), "{logs}");
}
