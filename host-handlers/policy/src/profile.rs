//! Reading one TOML profile into rules and locks.
//!
//! ```toml
//! [security]
//! description = "what this profile is for"     # optional
//! locks = ["http"]                              # optional: sections later profiles may only tighten
//!
//! [security.rules.<section>.<name>]              # section: dns, http or tcp
//! on = "http.request"                           # the event (must belong to the section)
//! if = 'http.request.host == "pypi.org"'        # optional CEL condition (default: always)
//! decision = "allow"                            # allow, block, ask or rewrite
//! priority = 10                                 # 0..=1000, lowest wins; default 100
//! description = "why"                           # optional
//! # rewrite rules only, by event:
//! set_request_headers = { authorization = "Bearer ${secret:TOKEN}" }   # http.request
//! remove_request_headers = ["cookie"]                                 # http.request
//! set_response_headers = { "x-sandbox" = "1" }                        # http.response
//! remove_response_headers = ["set-cookie"]                            # http.response
//! answer = { ttl = 60, a = ["10.0.0.7"], aaaa = ["fd00::7"], txt = ["hi"] }  # dns.request
//! answer = { cname = "other.example" }                                 # dns.request
//! # tcp.connect allow and ask rules only:
//! mode = "tcp"                                  # inspect (default), passthrough, tcp or http
//!
//! [security.limits.dns]                         # optional, see `limits`
//! queries_per_second = 50
//! ```
//!
//! Every problem is reported with its place in the file; the checks of one
//! rule do not stop the checks of the next, so one pass reports them all.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use cel::Env;
use serde::Deserialize;
use toml::Spanned;

use crate::condition::Condition;
use crate::engine::RuleDecision;
use crate::event::{EventKind, Section};
use crate::limits::{self, GivenDnsLimits};
use crate::location::{Location, SourceText};
use crate::secrets::Secrets;
use crate::{Action, ConnectMode, DnsRecord, ProfileError, SecretValue};

/// The largest profile accepted, in bytes.
pub(crate) const MAX_PROFILE_LEN: usize = 1 << 20;
/// The priority range.
pub(crate) const MAX_PRIORITY: i64 = 1000;
/// The priority of a rule that does not say.
pub(crate) const DEFAULT_PRIORITY: i64 = 100;
/// The time to live of synthesised DNS records when the rule does not say.
pub(crate) const DEFAULT_TTL: i64 = 60;
/// The largest time to live (RFC 2181).
const MAX_TTL: i64 = i32::MAX as i64;

/// A rule as read from a profile.
#[derive(Debug)]
pub(crate) struct RuleSpec {
    /// `<section>.<name>`
    pub name: String,
    pub section: Section,
    pub event: EventKind,
    pub decision: RuleDecision,
    pub priority: u32,
    pub condition: Condition,
    pub condition_text: Option<String>,
    pub actions: Vec<Action>,
    pub mode: Option<ConnectMode>,
    pub description: Option<String>,
    /// Where the rule's name is written.
    pub location: Location,
    /// The values of the secrets its header values use.
    pub secret_values: Vec<String>,
}

/// A section lock declared by a profile.
#[derive(Debug, Clone)]
pub(crate) struct LockSpec {
    pub section: Section,
    pub location: Location,
}

/// One profile, read and checked.
#[derive(Debug, Default)]
pub(crate) struct Profile {
    pub description: Option<String>,
    pub rules: Vec<RuleSpec>,
    pub locks: Vec<LockSpec>,
    pub dns_limits: GivenDnsLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    security: Option<SecurityToml>,
}

type Table<T> = BTreeMap<Spanned<String>, T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityToml {
    description: Option<String>,
    #[serde(default)]
    locks: Vec<Spanned<String>>,
    #[serde(default)]
    rules: Table<Table<RuleToml>>,
    limits: Option<limits::LimitsToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    on: Spanned<String>,
    #[serde(rename = "if")]
    condition: Option<Spanned<String>>,
    decision: Spanned<String>,
    priority: Option<Spanned<i64>>,
    description: Option<String>,
    set_request_headers: Option<Spanned<Table<Spanned<String>>>>,
    remove_request_headers: Option<Spanned<Vec<Spanned<String>>>>,
    set_response_headers: Option<Spanned<Table<Spanned<String>>>>,
    remove_response_headers: Option<Spanned<Vec<Spanned<String>>>>,
    answer: Option<Spanned<AnswerToml>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerToml {
    ttl: Option<Spanned<i64>>,
    #[serde(default)]
    a: Vec<Spanned<String>>,
    #[serde(default)]
    aaaa: Vec<Spanned<String>>,
    cname: Option<Spanned<String>>,
    #[serde(default)]
    txt: Vec<Spanned<String>>,
}

/// Reads the bytes of a profile as text, within the size limit.
pub(crate) fn text_of(name: std::sync::Arc<std::path::Path>, bytes: Vec<u8>) -> Result<SourceText, ProfileError> {
    if bytes.len() > MAX_PROFILE_LEN {
        let source = SourceText { name, text: String::new() };
        return Err(source.error(0, format!("the profile is larger than {MAX_PROFILE_LEN} bytes")));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(SourceText { name, text }),
        Err(error) => {
            let valid = error.utf8_error().valid_up_to();
            let text = String::from_utf8_lossy(&error.into_bytes()[..valid]).into_owned();
            let source = SourceText { name, text };
            Err(source.error(valid, "the profile is not valid UTF-8"))
        }
    }
}

/// Reads and checks a profile.
pub(crate) fn parse(source: &SourceText, env: &Env, secrets: &Secrets) -> Result<Profile, Vec<ProfileError>> {
    let file: FileToml = toml::from_str(&source.text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        let message = error.message().trim_end().lines().collect::<Vec<_>>().join(": ");
        vec![source.error(offset, message)]
    })?;
    let Some(security) = file.security else {
        return Ok(Profile::default());
    };
    let mut errors = Vec::new();
    let mut profile = Profile {
        description: security.description,
        dns_limits: limits::read(source, security.limits, &mut errors),
        ..Profile::default()
    };
    for lock in &security.locks {
        match Section::from_name(lock.get_ref()) {
            Some(section) => {
                profile.locks.push(LockSpec { section, location: source.location(string_start(lock.span())) })
            }
            None => errors.push(source.error(
                string_start(lock.span()),
                format!("unknown section `{}` in locks (sections: dns, http, tcp)", lock.get_ref()),
            )),
        }
    }
    for (section_name, rules) in security.rules {
        let Some(section) = Section::from_name(section_name.get_ref()) else {
            errors.push(source.error(
                section_name.span().start,
                format!("unknown section `{}` (sections: dns, http, tcp)", section_name.get_ref()),
            ));
            continue;
        };
        for (name, rule) in rules {
            let reader = RuleReader { source, env, secrets, section, errors: Vec::new(), secret_values: Vec::new() };
            match reader.read(&name, rule) {
                Ok(spec) => profile.rules.push(spec),
                Err(rule_errors) => errors.extend(rule_errors),
            }
        }
    }
    if errors.is_empty() {
        Ok(profile)
    } else {
        Err(errors)
    }
}

/// The offset of the first character inside a quoted TOML value.
fn string_start(span: Range<usize>) -> usize {
    span.start + 1
}

struct RuleReader<'a> {
    source: &'a SourceText,
    env: &'a Env,
    secrets: &'a Secrets,
    section: Section,
    errors: Vec<ProfileError>,
    /// Values of the secrets filled in so far.
    secret_values: Vec<String>,
}

impl RuleReader<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.errors.push(self.source.error(offset, message));
    }

    fn read(mut self, name: &Spanned<String>, rule: RuleToml) -> Result<RuleSpec, Vec<ProfileError>> {
        let valid_name = !name.get_ref().is_empty()
            && name.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            self.error(
                name.span().start,
                format!("invalid rule name `{}`: use letters, digits, `_` and `-`", name.get_ref()),
            );
        }
        let full_name = format!("{}.{}", self.section, name.get_ref());

        let event = EventKind::from_name(rule.on.get_ref());
        match event {
            None => self.error(
                string_start(rule.on.span()),
                format!(
                    "unknown event `{}` (events: dns.request, http.request, http.response, tcp.connect)",
                    rule.on.get_ref()
                ),
            ),
            Some(kind) if kind.section() != self.section => self.error(
                string_start(rule.on.span()),
                format!(
                    "`{kind}` rules belong in section `{}`, not `{}` (write [security.rules.{}.{}])",
                    kind.section(),
                    self.section,
                    kind.section(),
                    name.get_ref()
                ),
            ),
            Some(_) => {}
        }

        let decision = RuleDecision::from_name(rule.decision.get_ref());
        if decision.is_none() {
            self.error(
                string_start(rule.decision.span()),
                format!("unknown decision `{}` (decisions: allow, block, ask, rewrite)", rule.decision.get_ref()),
            );
        }

        let priority = match &rule.priority {
            None => DEFAULT_PRIORITY,
            Some(priority) => {
                let value = *priority.get_ref();
                if !(0..=MAX_PRIORITY).contains(&value) {
                    self.error(
                        priority.span().start,
                        format!("priority {value} is out of range (0 to {MAX_PRIORITY}, lowest wins)"),
                    );
                }
                value
            }
        };

        let condition = match (&rule.condition, event) {
            (None, _) => Some(Condition::always()),
            (Some(text), Some(kind)) => match Condition::compile(text.get_ref(), kind, self.env) {
                Ok(condition) => Some(condition),
                Err(error) => {
                    let offset = self.source.string_offset(&text.span(), error.offset);
                    self.error(offset, error.message);
                    None
                }
            },
            (Some(_), None) => None,
        };

        let actions = match (event, decision) {
            (Some(kind), Some(decision)) => self.actions(&rule, kind, decision, &rule.decision),
            _ => Vec::new(),
        };

        let mode = self.mode(rule.mode.as_ref(), event, decision);

        match (event, decision, condition) {
            (Some(event), Some(decision), Some(condition)) if self.errors.is_empty() => Ok(RuleSpec {
                name: full_name,
                section: self.section,
                event,
                decision,
                priority: u32::try_from(priority).unwrap_or(u32::MAX),
                condition,
                condition_text: rule.condition.map(Spanned::into_inner),
                actions,
                mode,
                description: rule.description,
                location: self.source.location(name.span().start),
                secret_values: self.secret_values,
            }),
            _ => Err(self.errors),
        }
    }

    /// The connect mode of a `tcp.connect` allow or ask rule (`inspect` when
    /// not given); `mode` anywhere else is an error.
    fn mode(
        &mut self,
        given: Option<&Spanned<String>>,
        event: Option<EventKind>,
        decision: Option<RuleDecision>,
    ) -> Option<ConnectMode> {
        let connecting =
            event == Some(EventKind::TcpConnect) && matches!(decision, Some(RuleDecision::Allow | RuleDecision::Ask));
        let Some(given) = given else {
            return connecting.then_some(ConnectMode::Inspect);
        };
        let offset = string_start(given.span());
        if event.is_some_and(|kind| kind != EventKind::TcpConnect) {
            self.error(offset, "`mode` applies to `tcp.connect` rules only");
            return None;
        }
        if decision.is_some_and(|d| !matches!(d, RuleDecision::Allow | RuleDecision::Ask)) {
            self.error(offset, "`mode` needs `decision = \"allow\"` or `\"ask\"`");
            return None;
        }
        let mode = ConnectMode::from_name(given.get_ref());
        if mode.is_none() {
            self.error(offset, format!("unknown mode `{}` (modes: inspect, passthrough, tcp, http)", given.get_ref()));
        }
        mode
    }

    /// The rule's actions, checked against its event and decision.
    fn actions(
        &mut self,
        rule: &RuleToml,
        event: EventKind,
        decision: RuleDecision,
        decision_text: &Spanned<String>,
    ) -> Vec<Action> {
        let present: Vec<(&str, usize, EventKind)> = [
            ("set_request_headers", rule.set_request_headers.as_ref().map(Spanned::span), EventKind::HttpRequest),
            ("remove_request_headers", rule.remove_request_headers.as_ref().map(Spanned::span), EventKind::HttpRequest),
            ("set_response_headers", rule.set_response_headers.as_ref().map(Spanned::span), EventKind::HttpResponse),
            (
                "remove_response_headers",
                rule.remove_response_headers.as_ref().map(Spanned::span),
                EventKind::HttpResponse,
            ),
            ("answer", rule.answer.as_ref().map(Spanned::span), EventKind::DnsRequest),
        ]
        .into_iter()
        .filter_map(|(key, span, kind)| span.map(|span| (key, span.start, kind)))
        .collect();

        if decision != RuleDecision::Rewrite {
            if let Some((key, offset, _)) = present.first() {
                self.error(*offset, format!("`{key}` is an action: it needs `decision = \"rewrite\"`"));
            }
            return Vec::new();
        }
        if event == EventKind::TcpConnect {
            self.error(
                string_start(decision_text.span()),
                "`tcp.connect` rules cannot rewrite (there is nothing to rewrite)",
            );
            return Vec::new();
        }
        let mut misplaced = false;
        for (key, offset, kind) in &present {
            if *kind != event {
                self.error(*offset, format!("`{key}` applies to `{kind}` rules, not `{event}`"));
                misplaced = true;
            }
        }
        if misplaced {
            return Vec::new();
        }
        if present.is_empty() {
            let keys = match event {
                EventKind::HttpRequest => "set_request_headers or remove_request_headers",
                EventKind::HttpResponse => "set_response_headers or remove_response_headers",
                _ => "answer",
            };
            self.error(string_start(decision_text.span()), format!("a rewrite rule needs an action: {keys}"));
            return Vec::new();
        }

        let mut actions = Vec::new();
        let (set, remove) = match event {
            EventKind::HttpRequest => (&rule.set_request_headers, &rule.remove_request_headers),
            _ => (&rule.set_response_headers, &rule.remove_response_headers),
        };
        let request = event == EventKind::HttpRequest;
        let mut removed: Vec<String> = Vec::new();
        for name in remove.iter().flat_map(|list| list.get_ref()) {
            if let Some(header) = self.header_name(name) {
                if removed.contains(&header) {
                    self.error(string_start(name.span()), format!("header `{header}` is listed twice"));
                    continue;
                }
                removed.push(header.clone());
                actions.push(if request {
                    Action::RemoveRequestHeader(header)
                } else {
                    Action::RemoveResponseHeader(header)
                });
            }
        }
        for (name, value) in set.iter().flat_map(|table| table.get_ref()) {
            let Some(header) = self.header_name(name) else {
                continue;
            };
            if removed.contains(&header) {
                self.error(name.span().start, format!("header `{header}` is both set and removed"));
                continue;
            }
            if let Some(value) = self.header_value(&header, value) {
                actions.push(if request {
                    Action::SetRequestHeader(header, value)
                } else {
                    Action::SetResponseHeader(header, value)
                });
            }
        }
        if let Some(answer) = &rule.answer {
            if let Some(action) = self.answer(answer) {
                actions.push(action);
            }
        }
        actions
    }

    /// A header name: an HTTP token, lower-cased.
    fn header_name(&mut self, name: &Spanned<String>) -> Option<String> {
        let text = name.get_ref();
        let token =
            !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            self.error(name.span().start, format!("invalid header name `{text}`"));
            return None;
        }
        Some(text.to_ascii_lowercase())
    }

    /// A header value with its `${secret:NAME}` placeholders filled in.
    fn header_value(&mut self, header: &str, value: &Spanned<String>) -> Option<SecretValue> {
        let text = value.get_ref();
        let source = self.source;
        let offset_of = |at: usize| source.string_offset(&value.span(), at);
        if let Some(at) = text.find(invalid_header_char) {
            let offset = offset_of(at);
            self.error(offset, format!("the value of header `{header}` contains a control character"));
            return None;
        }
        let mut filled = String::new();
        let mut secret = false;
        let mut rest = text.as_str();
        let mut consumed = 0;
        while let Some(start) = rest.find("${") {
            filled.push_str(&rest[..start]);
            let placeholder_at = consumed + start;
            let Some(end) = rest[start..].find('}') else {
                let offset = offset_of(placeholder_at);
                self.error(offset, "unterminated placeholder: write `${secret:NAME}`");
                return None;
            };
            let placeholder = &rest[start..start + end + 1];
            let inner = &placeholder[2..placeholder.len() - 1];
            let Some(name) = inner.strip_prefix("secret:") else {
                let offset = offset_of(placeholder_at);
                self.error(
                    offset,
                    format!("unknown placeholder `{placeholder}`: only `${{secret:NAME}}` is supported"),
                );
                return None;
            };
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                let offset = offset_of(placeholder_at);
                self.error(offset, format!("invalid secret name `{name}`: use letters, digits and `_`"));
                return None;
            }
            let Some(secret_value) = self.secrets.get(name) else {
                let offset = offset_of(placeholder_at);
                let places = self.secrets.places();
                self.error(offset, format!("secret `{name}` is not set ({places})"));
                return None;
            };
            if secret_value.contains(invalid_header_char) {
                let offset = offset_of(placeholder_at);
                self.error(
                    offset,
                    format!("secret `{name}` cannot go in a header: its value contains a control character"),
                );
                return None;
            }
            filled.push_str(&secret_value);
            self.secret_values.push(secret_value);
            secret = true;
            consumed += start + end + 1;
            rest = &rest[start + end + 1..];
        }
        filled.push_str(rest);
        Some(if secret { SecretValue::secret(filled) } else { SecretValue::plain(filled) })
    }

    fn answer(&mut self, answer: &Spanned<AnswerToml>) -> Option<Action> {
        let spec = answer.get_ref();
        let errors_before = self.errors.len();
        let ttl = match &spec.ttl {
            None => DEFAULT_TTL,
            Some(ttl) => {
                if !(0..=MAX_TTL).contains(ttl.get_ref()) {
                    self.error(ttl.span().start, format!("ttl {} is out of range (0 to {MAX_TTL})", ttl.get_ref()));
                }
                *ttl.get_ref()
            }
        };
        let mut records = Vec::new();
        for text in &spec.a {
            match text.get_ref().parse::<Ipv4Addr>() {
                Ok(ip) => records.push(DnsRecord::A(ip)),
                Err(_) => self.error(string_start(text.span()), format!("invalid IPv4 address `{}`", text.get_ref())),
            }
        }
        for text in &spec.aaaa {
            match text.get_ref().parse::<Ipv6Addr>() {
                Ok(ip) => records.push(DnsRecord::Aaaa(ip)),
                Err(_) => self.error(string_start(text.span()), format!("invalid IPv6 address `{}`", text.get_ref())),
            }
        }
        for text in &spec.txt {
            if text.get_ref().contains("${") {
                self.error(string_start(text.span()), "placeholders are only allowed in header values");
            } else if text.get_ref().len() > 255 {
                self.error(string_start(text.span()), "a TXT string is at most 255 bytes");
            } else {
                records.push(DnsRecord::Txt(text.get_ref().clone()));
            }
        }
        if let Some(cname) = &spec.cname {
            match domain_name(cname.get_ref()) {
                Some(name) => records.push(DnsRecord::Cname(name)),
                None => self.error(string_start(cname.span()), format!("invalid domain name `{}`", cname.get_ref())),
            }
            if !spec.a.is_empty() || !spec.aaaa.is_empty() || !spec.txt.is_empty() {
                self.error(cname.span().start, "a CNAME cannot be combined with other records (RFC 1034)");
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        if records.is_empty() {
            self.error(answer.span().start, "the answer has no records: give a, aaaa, cname or txt");
            return None;
        }
        Some(Action::DnsAnswer { records, ttl: u32::try_from(ttl).unwrap_or(0) })
    }
}

/// Control characters may not appear in header values (tab may).
fn invalid_header_char(c: char) -> bool {
    c.is_control() && c != '\t'
}

/// A domain name for a CNAME: dot-separated labels of letters, digits, `-`
/// and `_`, each 1 to 63 bytes, 253 in all; lower-cased, trailing dot dropped.
fn domain_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| name.to_ascii_lowercase())
}
