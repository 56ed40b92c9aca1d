//! DNS exfiltration limits of one sandbox: token buckets for what reaches the
//! host's resolver and for blocked queries, caps on the query name, and one
//! summary row per second for what is refused beyond them.
//!
//! A guest can smuggle data out in query names even when every name is
//! blocked (the names reach session.db and, when allowed, the upstream
//! resolvers), and a flood of cheap queries would turn logging into the
//! denial of service. So:
//!
//! - a name longer than `max_name_length` or with more than `max_labels`
//!   labels is REFUSED without a policy decision (rule `builtin.dns_limit`);
//! - a query that would go upstream takes a token from the `queries_*`
//!   bucket; the upstream never sees more than that budget;
//! - a blocked, malformed or over-long query takes a token from the
//!   `blocked_*` bucket, which only pays for its row: blocked queries never
//!   reach the upstream, and an allowed name still resolves during a flood;
//! - without a token the query is REFUSED and counted, not logged one by one:
//!   each second with refusals gets one `dns_events` row (qtype `*`, rcode
//!   REFUSED, rule `builtin.dns_limit`) with the count, the reasons and an
//!   example name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use policy::DnsLimits;
use telemetry::{DnsEvent, Outcome, Recorder};

/// Rule recorded for queries refused by a limit, and for their summaries.
pub const DNS_LIMIT_RULE: &str = "builtin.dns_limit";

/// How long refusals are counted before their summary row is written.
const SUMMARY_WINDOW: Duration = Duration::from_secs(1);

/// Why a query was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Limit {
    NameLength,
    Labels,
    Queries,
    Blocked,
}

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::NameLength => "max_name_length",
            Limit::Labels => "max_labels",
            Limit::Queries => "queries_per_second",
            Limit::Blocked => "blocked_per_second",
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { tokens: burst, rate: f64::from(rate), burst, refilled: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Refusals counted since the last summary row.
#[derive(Debug, Default)]
struct Window {
    started: Option<SystemTime>,
    by_limit: BTreeMap<Limit, u64>,
    example: String,
}

#[derive(Debug)]
struct State {
    queries: Bucket,
    blocked: Bucket,
    window: Window,
}

/// The limits of one sandbox, shared by its DNS connections.
#[derive(Debug)]
pub(crate) struct DnsLimiter {
    limits: DnsLimits,
    state: Mutex<State>,
    recorder: Recorder,
}

impl DnsLimiter {
    pub(crate) fn new(limits: DnsLimits, recorder: Recorder) -> Self {
        let now = Instant::now();
        let state = State {
            queries: Bucket::new(limits.queries_per_second, limits.queries_burst, now),
            blocked: Bucket::new(limits.blocked_per_second, limits.blocked_burst, now),
            window: Window::default(),
        };
        Self { limits, state: Mutex::new(state), recorder }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name cap this query breaks, if any.
    pub(crate) fn check_name(&self, qname: &str) -> Option<(Limit, String)> {
        check_name(&self.limits, qname)
    }

    /// A token for a query about to go upstream.
    pub(crate) fn take_query(&self) -> bool {
        self.state().queries.take(Instant::now())
    }

    /// A token for the row of a query answered without the upstream's help
    /// (blocked, malformed, over a name cap).
    pub(crate) fn take_blocked(&self) -> bool {
        self.state().blocked.take(Instant::now())
    }

    /// Count a query refused for `limit` into the current second's summary;
    /// the first refusal of a window schedules its row.
    pub(crate) fn refused(self: &Arc<Self>, limit: Limit, qname: &str) {
        let first = {
            let mut state = self.state();
            let window = &mut state.window;
            let first = window.started.is_none();
            if first {
                window.started = Some(SystemTime::now());
                window.example = qname.chars().take(self.limits.max_name_length as usize).collect();
            }
            *window.by_limit.entry(limit).or_default() += 1;
            first
        };
        if first {
            let limiter = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SUMMARY_WINDOW).await;
                limiter.write_summary();
            });
        }
    }

    /// Write the current window's summary row, if it counted anything.
    pub(crate) fn write_summary(&self) {
        let window = std::mem::take(&mut self.state().window);
        let Some(started) = window.started else { return };
        let total: u64 = window.by_limit.values().sum();
        let reasons: Vec<String> =
            window.by_limit.iter().map(|(limit, count)| format!("{count} over {}", limit.name())).collect();
        let row = summary_row(started, total, &reasons, window.example);
        if let Err(err) = self.recorder.record_dns(row) {
            tracing::error!(%err, total, "summary of refused DNS queries not recorded");
        }
        tracing::warn!(total, reasons = reasons.join(", "), "DNS queries refused over the sandbox's limits");
    }
}

/// The name cap `qname` (without the trailing dot) breaks, if any, and why.
fn check_name(limits: &DnsLimits, qname: &str) -> Option<(Limit, String)> {
    let length = qname.len();
    let labels = if qname.is_empty() { 0 } else { qname.split('.').count() };
    if length > limits.max_name_length as usize {
        let why = format!("query name of {length} bytes is over the limit of {}", limits.max_name_length);
        return Some((Limit::NameLength, why));
    }
    if labels > limits.max_labels as usize {
        let why = format!("query name of {labels} labels is over the limit of {}", limits.max_labels);
        return Some((Limit::Labels, why));
    }
    None
}

/// Refusals still counting when the sandbox's handlers go away are written too.
impl Drop for DnsLimiter {
    fn drop(&mut self) {
        self.write_summary();
    }
}

fn summary_row(started: SystemTime, total: u64, reasons: &[String], example: String) -> DnsEvent {
    DnsEvent {
        time: started,
        qname: example,
        qtype: "*".into(),
        rcode: "REFUSED".into(),
        decision: Outcome::Denied,
        matched_rule: Some(DNS_LIMIT_RULE.into()),
        answers: Vec::new(),
        process_name: None,
        trace_id: None,
        error: Some(format!(
            "{total} queries refused over the sandbox's DNS limits within {} s ({}); the name is one of them",
            SUMMARY_WINDOW.as_secs(),
            reasons.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_gives_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10, 3, start);
        assert_eq!((0..5).filter(|_| bucket.take(start)).count(), 3);
        assert!(!bucket.take(start + Duration::from_millis(50)));
        assert!(bucket.take(start + Duration::from_millis(101)));
        // Saved up to the burst, never more.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(later)).count(), 3);
    }

    #[test]
    fn name_caps() {
        let mut limits = DnsLimits::default();
        limits.max_name_length = 20;
        limits.max_labels = 3;
        let limit = |qname: &str| check_name(&limits, qname).map(|(limit, _)| limit);
        assert_eq!(limit("a.b.example"), None);
        assert_eq!(limit(""), None);
        assert_eq!(limit("a.b.c.example"), Some(Limit::Labels));
        assert_eq!(limit("abcdefghijklmnopqrstu.x"), Some(Limit::NameLength));
        let why = check_name(&limits, "abcdefghijklmnopqrstu.x").map(|(_, why)| why).unwrap_or_default();
        assert!(why.contains("23 bytes"), "{why}");
    }
}
