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
//! Every key is optional. Across profiles the strictest value given for a key
//! wins (a user profile can tighten a corporate profile's limits but never
//! loosen them); a key no profile gives has its default.

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

/// The limits one profile (or several, merged) gives; `None`: not given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GivenDnsLimits {
    queries_per_second: Option<u32>,
    queries_burst: Option<u32>,
    blocked_per_second: Option<u32>,
    blocked_burst: Option<u32>,
    max_name_length: Option<u32>,
    max_labels: Option<u32>,
}

impl GivenDnsLimits {
    /// Both profiles' limits: the stricter value of each key either gives.
    pub(crate) fn merge(self, other: GivenDnsLimits) -> GivenDnsLimits {
        let strictest = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        GivenDnsLimits {
            queries_per_second: strictest(self.queries_per_second, other.queries_per_second),
            queries_burst: strictest(self.queries_burst, other.queries_burst),
            blocked_per_second: strictest(self.blocked_per_second, other.blocked_per_second),
            blocked_burst: strictest(self.blocked_burst, other.blocked_burst),
            max_name_length: strictest(self.max_name_length, other.max_name_length),
            max_labels: strictest(self.max_labels, other.max_labels),
        }
    }

    /// The limits in force: the defaults where no profile gave a key.
    pub(crate) fn resolve(self) -> DnsLimits {
        let defaults = DnsLimits::default();
        DnsLimits {
            queries_per_second: self.queries_per_second.unwrap_or(defaults.queries_per_second),
            queries_burst: self.queries_burst.unwrap_or(defaults.queries_burst),
            blocked_per_second: self.blocked_per_second.unwrap_or(defaults.blocked_per_second),
            blocked_burst: self.blocked_burst.unwrap_or(defaults.blocked_burst),
            max_name_length: self.max_name_length.unwrap_or(defaults.max_name_length),
            max_labels: self.max_labels.unwrap_or(defaults.max_labels),
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

/// The limits a profile gives, checked.
pub(crate) fn read(source: &SourceText, limits: Option<LimitsToml>, errors: &mut Vec<ProfileError>) -> GivenDnsLimits {
    let Some(dns) = limits.and_then(|limits| limits.dns) else {
        return GivenDnsLimits::default();
    };
    let mut value = |key: &str, given: Option<Spanned<i64>>, max: i64| {
        let given = given?;
        let number = *given.get_ref();
        if !(1..=max).contains(&number) {
            errors.push(source.error(given.span().start, format!("`{key}` = {number} is out of range (1 to {max})")));
            return None;
        }
        u32::try_from(number).ok()
    };
    let rate_max = i64::from(u32::MAX);
    GivenDnsLimits {
        queries_per_second: value("queries_per_second", dns.queries_per_second, rate_max),
        queries_burst: value("queries_burst", dns.queries_burst, rate_max),
        blocked_per_second: value("blocked_per_second", dns.blocked_per_second, rate_max),
        blocked_burst: value("blocked_burst", dns.blocked_burst, rate_max),
        max_name_length: value("max_name_length", dns.max_name_length, 253),
        max_labels: value("max_labels", dns.max_labels, 127),
    }
}
