//! Per-sandbox limits on DNS, the channel a guest could use to smuggle data
//! out in query names even when every name is blocked.
//!
//! ```toml
//! [security.limits.dns]
//! queries_per_second = 50    # queries the host's resolver may be asked, sustained
//! queries_burst = 200        # ... and at once
//! blocked_per_second = 5     # blocked queries answered (and logged one by one), sustained
//! blocked_burst = 50         # ... and at once
//! max_name_length = 200      # longest query name, in bytes without the trailing dot
//! max_labels = 16            # most labels in a query name
//! ```
//!
//! Every key is optional. Across profiles the strictest value wins, so a
//! user profile can tighten a corporate profile's limits but never loosen them.

use serde::Deserialize;
use toml::Spanned;

use crate::location::SourceText;
use crate::ProfileError;

/// DNS limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsLimits {
    /// Queries per second the host's upstream resolver may see, sustained.
    pub queries_per_second: u32,
    /// Queries the upstream resolver may see at once.
    pub queries_burst: u32,
    /// Blocked queries per second answered with the policy's answer and
    /// logged one by one, sustained; beyond that they are REFUSED and
    /// summarised.
    pub blocked_per_second: u32,
    /// Blocked queries answered at once.
    pub blocked_burst: u32,
    /// The longest query name, in bytes, without the trailing dot.
    pub max_name_length: u32,
    /// The most labels in a query name.
    pub max_labels: u32,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            queries_per_second: 50,
            queries_burst: 200,
            blocked_per_second: 5,
            blocked_burst: 50,
            max_name_length: 200,
            max_labels: 16,
        }
    }
}

impl DnsLimits {
    /// The stricter of two sets of limits, key by key.
    pub fn strictest(self, other: DnsLimits) -> DnsLimits {
        DnsLimits {
            queries_per_second: self.queries_per_second.min(other.queries_per_second),
            queries_burst: self.queries_burst.min(other.queries_burst),
            blocked_per_second: self.blocked_per_second.min(other.blocked_per_second),
            blocked_burst: self.blocked_burst.min(other.blocked_burst),
            max_name_length: self.max_name_length.min(other.max_name_length),
            max_labels: self.max_labels.min(other.max_labels),
        }
    }
}

/// `[security.limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsToml {
    dns: Option<DnsLimitsToml>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsLimitsToml {
    queries_per_second: Option<Spanned<i64>>,
    queries_burst: Option<Spanned<i64>>,
    blocked_per_second: Option<Spanned<i64>>,
    blocked_burst: Option<Spanned<i64>>,
    max_name_length: Option<Spanned<i64>>,
    max_labels: Option<Spanned<i64>>,
}

/// The limits a profile sets: the defaults, tightened by each key it gives.
pub(crate) fn read(
    source: &SourceText,
    limits: Option<LimitsToml>,
    errors: &mut Vec<ProfileError>,
) -> DnsLimits {
    let defaults = DnsLimits::default();
    let Some(dns) = limits.and_then(|limits| limits.dns) else {
        return defaults;
    };
    let mut value = |key: &str, given: Option<Spanned<i64>>, max: i64, default: u32| {
        let Some(given) = given else {
            return default;
        };
        let number = *given.get_ref();
        if !(1..=max).contains(&number) {
            errors.push(source.error(
                given.span().start,
                format!("`{key}` = {number} is out of range (1 to {max})"),
            ));
            return default;
        }
        u32::try_from(number).unwrap_or(default)
    };
    let rate_max = i64::from(u32::MAX);
    DnsLimits {
        queries_per_second: value(
            "queries_per_second",
            dns.queries_per_second,
            rate_max,
            defaults.queries_per_second,
        ),
        queries_burst: value(
            "queries_burst",
            dns.queries_burst,
            rate_max,
            defaults.queries_burst,
        ),
        blocked_per_second: value(
            "blocked_per_second",
            dns.blocked_per_second,
            rate_max,
            defaults.blocked_per_second,
        ),
        blocked_burst: value(
            "blocked_burst",
            dns.blocked_burst,
            rate_max,
            defaults.blocked_burst,
        ),
        max_name_length: value(
            "max_name_length",
            dns.max_name_length,
            253,
            defaults.max_name_length,
        ),
        max_labels: value("max_labels", dns.max_labels, 127, defaults.max_labels),
    }
}
