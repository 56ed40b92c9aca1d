//! Security events: what the host handlers see the guest do, typed.
//!
//! Every event has a kind (`dns.request`, `http.request`, `http.response`,
//! `tcp.connect`) and a fixed set of fields. The same field table drives the
//! condition checker (which names a condition may use, and their types), the
//! CEL variable resolver and the fast evaluator, so the three cannot disagree.
//! Events also come from JSON, for `sandbox policy explain --event`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use crate::ProfileError;

/// A DNS query seen from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRequest {
    /// Query name, lower case, without the trailing dot.
    pub qname: String,
    /// Record type mnemonic, e.g. "A", "AAAA", "TXT".
    pub qtype: String,
}

/// An HTTP request seen inside a guest TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Host header (or :authority), lower case, without port.
    pub host: String,
    /// TLS SNI of the connection.
    pub sni: String,
    /// Request method as sent, e.g. "GET".
    pub method: String,
    /// Request path, without the query string, normalised by [`normalise_path`]
    /// (what rules should match on).
    pub path: String,
    /// The path as the guest sent it, without the query string.
    pub raw_path: String,
    /// Query string without the leading '?', empty if none.
    pub query: String,
    /// Header names lower case; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// "https" for traffic through the MITM.
    pub scheme: String,
    /// The port the guest connected to (its original destination). Only
    /// rules whose condition reads `http.request.port` allow a port other
    /// than [`HTTPS_PORT`].
    pub port: u16,
}

/// The port inspected HTTPS traffic goes to unless a rule names another.
pub const HTTPS_PORT: u16 = 443;

/// An upstream response, with the request it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The request this response answers.
    pub request: HttpRequest,
    /// HTTP status code.
    pub status: u16,
    /// Header names lower case; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
}

/// A TCP connection attempt, decided before anything is sent on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnect {
    /// The name (lower case) the sandbox's DNS handler answered with this
    /// address; empty when the sandbox never got the address from an
    /// allowed DNS answer (a literal address).
    pub host: String,
    /// Address about to be connected to, when known.
    pub ip: Option<IpAddr>,
    /// Destination port.
    pub port: u16,
}

/// A security event (`dns.request`, `http.request`, `http.response`, `tcp.connect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `dns.request`
    DnsRequest(DnsRequest),
    /// `http.request`
    HttpRequest(HttpRequest),
    /// `http.response`
    HttpResponse(HttpResponse),
    /// `tcp.connect`
    TcpConnect(TcpConnect),
}

/// The kind of an [`Event`], as named in profiles (`on = "http.request"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// `dns.request`
    DnsRequest,
    /// `http.request`
    HttpRequest,
    /// `http.response`
    HttpResponse,
    /// `tcp.connect`
    TcpConnect,
}

impl EventKind {
    /// Every kind, in a fixed order (also the order of [`EventKind::index`]).
    pub const ALL: [EventKind; 4] =
        [EventKind::DnsRequest, EventKind::HttpRequest, EventKind::HttpResponse, EventKind::TcpConnect];

    /// The name used in profiles and JSON, e.g. `http.request`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::DnsRequest => "dns.request",
            EventKind::HttpRequest => "http.request",
            EventKind::HttpResponse => "http.response",
            EventKind::TcpConnect => "tcp.connect",
        }
    }

    /// The profile section whose rules may handle this kind (`dns`, `http`, `tcp`).
    pub fn section(self) -> Section {
        match self {
            EventKind::DnsRequest => Section::Dns,
            EventKind::HttpRequest | EventKind::HttpResponse => Section::Http,
            EventKind::TcpConnect => Section::Tcp,
        }
    }

    /// Parses a kind name, e.g. `dns.request`.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Position in [`EventKind::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The fields a condition on this kind may use.
    pub fn fields(self) -> impl Iterator<Item = Field> {
        Field::ALL.into_iter().filter(move |field| field.events().contains(&self))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A profile section: rules live in `[security.rules.<section>.<name>]`, and
/// locks apply to whole sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// `dns`: `dns.request` rules.
    Dns,
    /// `http`: `http.request` and `http.response` rules.
    Http,
    /// `tcp`: `tcp.connect` rules.
    Tcp,
}

impl Section {
    /// Every section.
    pub const ALL: [Section; 3] = [Section::Dns, Section::Http, Section::Tcp];

    /// The section's name in profiles.
    pub fn name(self) -> &'static str {
        match self {
            Section::Dns => "dns",
            Section::Http => "http",
            Section::Tcp => "tcp",
        }
    }

    /// Parses a section name.
    pub fn from_name(name: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|section| section.name() == name)
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of an event field, as seen by conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// CEL `string`.
    String,
    /// CEL `int`.
    Int,
    /// CEL `map(string, string)`: header names (lower case) to values.
    Headers,
}

/// A field a condition can read, e.g. `http.request.host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `dns.request.qname`
    DnsQname,
    /// `dns.request.qtype`
    DnsQtype,
    /// `http.request.host`
    HttpHost,
    /// `http.request.sni`
    HttpSni,
    /// `http.request.method`
    HttpMethod,
    /// `http.request.path`
    HttpPath,
    /// `http.request.raw_path`
    HttpRawPath,
    /// `http.request.query`
    HttpQuery,
    /// `http.request.scheme`
    HttpScheme,
    /// `http.request.port`
    HttpPort,
    /// `http.request.headers`
    HttpRequestHeaders,
    /// `http.response.status`
    HttpStatus,
    /// `http.response.headers`
    HttpResponseHeaders,
    /// `tcp.connect.host`
    TcpHost,
    /// `tcp.connect.ip`
    TcpIp,
    /// `tcp.connect.port`
    TcpPort,
}

const DNS: &[EventKind] = &[EventKind::DnsRequest];
const HTTP: &[EventKind] = &[EventKind::HttpRequest, EventKind::HttpResponse];
const RESPONSE: &[EventKind] = &[EventKind::HttpResponse];
const TCP: &[EventKind] = &[EventKind::TcpConnect];

impl Field {
    /// Every field.
    pub const ALL: [Field; 16] = [
        Field::DnsQname,
        Field::DnsQtype,
        Field::HttpHost,
        Field::HttpSni,
        Field::HttpMethod,
        Field::HttpPath,
        Field::HttpRawPath,
        Field::HttpQuery,
        Field::HttpScheme,
        Field::HttpPort,
        Field::HttpRequestHeaders,
        Field::HttpStatus,
        Field::HttpResponseHeaders,
        Field::TcpHost,
        Field::TcpIp,
        Field::TcpPort,
    ];

    /// The full name used in conditions.
    pub fn path(self) -> &'static str {
        match self {
            Field::DnsQname => "dns.request.qname",
            Field::DnsQtype => "dns.request.qtype",
            Field::HttpHost => "http.request.host",
            Field::HttpSni => "http.request.sni",
            Field::HttpMethod => "http.request.method",
            Field::HttpPath => "http.request.path",
            Field::HttpRawPath => "http.request.raw_path",
            Field::HttpQuery => "http.request.query",
            Field::HttpScheme => "http.request.scheme",
            Field::HttpPort => "http.request.port",
            Field::HttpRequestHeaders => "http.request.headers",
            Field::HttpStatus => "http.response.status",
            Field::HttpResponseHeaders => "http.response.headers",
            Field::TcpHost => "tcp.connect.host",
            Field::TcpIp => "tcp.connect.ip",
            Field::TcpPort => "tcp.connect.port",
        }
    }

    /// The field's type.
    pub fn field_type(self) -> FieldType {
        match self {
            Field::HttpRequestHeaders | Field::HttpResponseHeaders => FieldType::Headers,
            Field::HttpStatus | Field::HttpPort | Field::TcpPort => FieldType::Int,
            _ => FieldType::String,
        }
    }

    /// The event kinds that carry this field.
    pub fn events(self) -> &'static [EventKind] {
        match self {
            Field::DnsQname | Field::DnsQtype => DNS,
            Field::HttpHost
            | Field::HttpSni
            | Field::HttpMethod
            | Field::HttpPath
            | Field::HttpRawPath
            | Field::HttpQuery
            | Field::HttpScheme
            | Field::HttpPort
            | Field::HttpRequestHeaders => HTTP,
            Field::HttpStatus | Field::HttpResponseHeaders => RESPONSE,
            Field::TcpHost | Field::TcpIp | Field::TcpPort => TCP,
        }
    }

    /// Looks a field up by its full name.
    pub fn from_path(path: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.path() == path)
    }

    /// The last segment of the name, e.g. `host`.
    pub fn short_name(self) -> &'static str {
        let path = self.path();
        path.rsplit('.').next().unwrap_or(path)
    }
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::DnsRequest(_) => EventKind::DnsRequest,
            Event::HttpRequest(_) => EventKind::HttpRequest,
            Event::HttpResponse(_) => EventKind::HttpResponse,
            Event::TcpConnect(_) => EventKind::TcpConnect,
        }
    }

    /// The HTTP request an `http.request` or `http.response` event is about.
    fn http_request(&self) -> Option<&HttpRequest> {
        match self {
            Event::HttpRequest(request) => Some(request),
            Event::HttpResponse(response) => Some(&response.request),
            _ => None,
        }
    }

    /// A string field's value; `None` if the field is not a string field of
    /// this event. `tcp.connect.ip` is not stored as text: see [`Event::ip_text`].
    pub(crate) fn str_field(&self, field: Field) -> Option<&str> {
        match (field, self) {
            (Field::DnsQname, Event::DnsRequest(dns)) => Some(&dns.qname),
            (Field::DnsQtype, Event::DnsRequest(dns)) => Some(&dns.qtype),
            (Field::TcpHost, Event::TcpConnect(tcp)) => Some(&tcp.host),
            (Field::HttpHost, _) => self.http_request().map(|r| r.host.as_str()),
            (Field::HttpSni, _) => self.http_request().map(|r| r.sni.as_str()),
            (Field::HttpMethod, _) => self.http_request().map(|r| r.method.as_str()),
            (Field::HttpPath, _) => self.http_request().map(|r| r.path.as_str()),
            (Field::HttpRawPath, _) => self.http_request().map(|r| r.raw_path.as_str()),
            (Field::HttpQuery, _) => self.http_request().map(|r| r.query.as_str()),
            (Field::HttpScheme, _) => self.http_request().map(|r| r.scheme.as_str()),
            _ => None,
        }
    }

    /// `tcp.connect.ip` as text: the address, or "" when unknown.
    pub(crate) fn ip_text(&self) -> String {
        match self {
            Event::TcpConnect(TcpConnect { ip: Some(ip), .. }) => ip.to_string(),
            _ => String::new(),
        }
    }

    /// An int field's value.
    pub(crate) fn int_field(&self, field: Field) -> Option<i64> {
        match (field, self) {
            (Field::HttpStatus, Event::HttpResponse(response)) => Some(i64::from(response.status)),
            (Field::HttpPort, _) => self.http_request().map(|r| i64::from(r.port)),
            (Field::TcpPort, Event::TcpConnect(tcp)) => Some(i64::from(tcp.port)),
            _ => None,
        }
    }

    /// A headers field's value.
    pub(crate) fn headers_field(&self, field: Field) -> Option<&BTreeMap<String, String>> {
        match (field, self) {
            (Field::HttpRequestHeaders, _) => self.http_request().map(|r| &r.headers),
            (Field::HttpResponseHeaders, Event::HttpResponse(response)) => Some(&response.headers),
            _ => None,
        }
    }

    /// The event in one line, as an `ask` question shows it: the record type
    /// and name of a query; the method, scheme, host, port, path and query of
    /// a request (and the status of a response to it); host and port of a
    /// connection. Guest-chosen text is escaped (control, non-ASCII and
    /// bidirectional characters as `\u{..}`), so it cannot move the cursor or
    /// reorder what a terminal shows. A remembered answer is keyed by this
    /// text: it applies to exactly what was shown.
    pub fn describe(&self) -> String {
        let request = |r: &HttpRequest| {
            let query = if r.query.is_empty() { String::new() } else { format!("?{}", r.query) };
            format!("{} {}://{}:{}{}{}", r.method, r.scheme, r.host, r.port, r.path, query)
        };
        let text = match self {
            Event::DnsRequest(q) => format!("DNS {} query for {}", q.qtype, q.qname),
            Event::HttpRequest(r) => request(r),
            Event::HttpResponse(r) => {
                format!("response {} to {}", r.status, request(&r.request))
            }
            Event::TcpConnect(c) if c.host.is_empty() => {
                format!("TCP connection to {}:{}", self.ip_text(), c.port)
            }
            Event::TcpConnect(c) => format!("TCP connection to {}:{}", c.host, c.port),
        };
        printable(&text)
    }

    /// Parses an event from JSON, as `sandbox policy explain --event` takes it.
    ///
    /// ```json
    /// {"event": "dns.request", "qname": "pypi.org", "qtype": "A"}
    /// {"event": "http.request", "host": "github.com", "method": "POST", "path": "/x/y",
    ///  "query": "", "headers": {"user-agent": "git/2"}, "sni": "github.com", "scheme": "https"}
    /// {"event": "http.response", "status": 200, "headers": {}, "request": {"host": "pypi.org"}}
    /// {"event": "tcp.connect", "host": "db.internal", "ip": "10.0.0.5", "port": 5432}
    /// ```
    ///
    /// `path` is the path as a guest sends it: the event's `raw_path`, and,
    /// normalised by [`normalise_path`], its `path`.
    ///
    /// Defaults: `qtype` "A"; `method` "GET", `path` "/", `query` "",
    /// `headers` {}, `sni` the host, `scheme` "https", `port` 443; `ip`
    /// unknown; a `tcp.connect` without `host` is to an address no DNS
    /// answer gave. Names are
    /// normalised as the handlers do: host names and query names lower case
    /// without a trailing dot, header names lower case, `qtype` upper case.
    /// Unknown keys are errors.
    pub fn from_json(json: &str) -> Result<Event, ProfileError> {
        let raw: RawEvent =
            serde_json::from_str(json).map_err(|error| ProfileError::Event { message: error.to_string() })?;
        raw.into_event()
    }
}

/// The path rules match on (`http.request.path`), from the path as sent
/// (`http.request.raw_path`, without the query): percent-encoded unreserved
/// characters (letters, digits, `-._~`) decoded and other escapes written
/// with upper-case hex, runs of `/` collapsed to one, and `.` and `..`
/// segments removed (RFC 3986 sections 6.2.2 and 5.2.4). So `/%61dmin`,
/// `//admin` and `/static/../admin` are all `/admin`. Escapes of reserved
/// characters (`%2F`) stay escaped; `*` (as in `OPTIONS *`) stays `*`; an
/// empty path is `/`.
pub fn normalise_path(raw: &str) -> String {
    if raw == "*" {
        return raw.to_owned();
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len() + 1);
    if !raw.starts_with('/') {
        decoded.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        let escape = match (byte, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(hi, lo)| hi << 4 | lo),
            _ => None,
        };
        match escape {
            Some(value) if value.is_ascii_alphanumeric() || b"-._~".contains(&value) => {
                decoded.push(char::from(value));
                i += 3;
            }
            Some(value) => {
                decoded.push_str(&format!("%{value:02X}"));
                i += 3;
            }
            None => {
                // Not an escape: copy the character (a whole UTF-8 sequence).
                let len = raw[i..].chars().next().map_or(1, char::len_utf8);
                if !(byte == b'/' && decoded.ends_with('/')) {
                    decoded.push_str(&raw[i..i + len]);
                }
                i += len;
            }
        }
    }
    remove_dot_segments(&decoded)
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 section 5.2.4 on a path that starts with `/` and has no empty
/// segments but a trailing one.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn normalise_headers(headers: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut normalised = BTreeMap::new();
    for (name, value) in headers {
        normalised
            .entry(name.to_ascii_lowercase())
            .and_modify(|joined: &mut String| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.clone());
    }
    normalised
}

fn required_name(value: String, what: &str) -> Result<String, ProfileError> {
    let name = normalise_name(&value);
    if name.is_empty() {
        return Err(ProfileError::Event { message: format!("`{what}` is empty") });
    }
    Ok(name)
}

#[derive(Deserialize)]
#[serde(tag = "event", deny_unknown_fields)]
enum RawEvent {
    #[serde(rename = "dns.request")]
    Dns {
        qname: String,
        #[serde(default = "default_qtype")]
        qtype: String,
    },
    #[serde(rename = "http.request")]
    HttpRequest(RawHttpRequest),
    #[serde(rename = "http.response")]
    HttpResponse {
        request: RawHttpRequest,
        status: u16,
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
    #[serde(rename = "tcp.connect")]
    Tcp {
        #[serde(default)]
        host: String,
        #[serde(default)]
        ip: Option<IpAddr>,
        port: u16,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpRequest {
    host: String,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    query: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "default_scheme")]
    scheme: String,
    #[serde(default = "default_port")]
    port: u16,
}

fn default_qtype() -> String {
    "A".to_owned()
}
fn default_method() -> String {
    "GET".to_owned()
}
fn default_path() -> String {
    "/".to_owned()
}
fn default_scheme() -> String {
    "https".to_owned()
}
fn default_port() -> u16 {
    HTTPS_PORT
}

/// `text` with every character outside printable ASCII escaped.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    out
}

impl RawHttpRequest {
    fn into_request(self) -> Result<HttpRequest, ProfileError> {
        let host = required_name(self.host, "host")?;
        let sni = match self.sni {
            Some(sni) => normalise_name(&sni),
            None => host.clone(),
        };
        Ok(HttpRequest {
            host,
            sni,
            method: self.method,
            path: normalise_path(&self.path),
            raw_path: self.path,
            query: self.query.strip_prefix('?').map(str::to_owned).unwrap_or(self.query),
            headers: normalise_headers(self.headers),
            scheme: self.scheme.to_ascii_lowercase(),
            port: self.port,
        })
    }
}

impl RawEvent {
    fn into_event(self) -> Result<Event, ProfileError> {
        Ok(match self {
            RawEvent::Dns { qname, qtype } => Event::DnsRequest(DnsRequest {
                qname: required_name(qname, "qname")?,
                qtype: qtype.to_ascii_uppercase(),
            }),
            RawEvent::HttpRequest(request) => Event::HttpRequest(request.into_request()?),
            RawEvent::HttpResponse { request, status, headers } => Event::HttpResponse(HttpResponse {
                request: request.into_request()?,
                status,
                headers: normalise_headers(headers),
            }),
            RawEvent::Tcp { host, ip, port } => Event::TcpConnect(TcpConnect { host: normalise_name(&host), ip, port }),
        })
    }
}

fn write_request(f: &mut fmt::Formatter<'_>, request: &HttpRequest) -> fmt::Result {
    write!(f, "{} {}://{}", request.method, request.scheme, request.host)?;
    if request.port != HTTPS_PORT {
        write!(f, ":{}", request.port)?;
    }
    f.write_str(&request.path)?;
    if !request.query.is_empty() {
        write!(f, "?{}", request.query)?;
    }
    if request.sni != request.host {
        write!(f, " (sni {})", request.sni)?;
    }
    Ok(())
}

/// One line naming the event and its main fields; header values are left out.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind())?;
        match self {
            Event::DnsRequest(dns) => write!(f, "{} {}", dns.qname, dns.qtype),
            Event::HttpRequest(request) => write_request(f, request),
            Event::HttpResponse(response) => {
                write!(f, "{} for ", response.status)?;
                write_request(f, &response.request)
            }
            Event::TcpConnect(tcp) => match (tcp.host.as_str(), tcp.ip) {
                ("", Some(ip)) => write!(f, "{ip}:{} (no DNS name)", tcp.port),
                ("", None) => write!(f, "?:{}", tcp.port),
                (host, Some(ip)) => write!(f, "{host}:{} ({ip})", tcp.port),
                (host, None) => write!(f, "{host}:{}", tcp.port),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_to_one_spelling() {
        let cases = [
            ("", "/"),
            ("*", "*"),
            ("/", "/"),
            ("/a/b/", "/a/b/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("a/b", "/a/b"),
            ("/%7euser/%41", "/~user/A"),
            ("/a%2fb%2F", "/a%2Fb%2F"),
            ("/%zz/%4", "/%zz/%4"),
            ("/%C3%A9/é", "/%C3%A9/é"),
            ("/.%2e/%2E./x", "/x"),
            ("/a//b///c", "/a/b/c"),
            ("/a/.../b", "/a/.../b"),
        ];
        for (raw, normalised) in cases {
            assert_eq!(normalise_path(raw), normalised, "{raw:?}");
        }
    }

    #[test]
    fn json_events_get_defaults_and_normalised_names() {
        let event =
            Event::from_json(r#"{"event":"http.request","host":"GitHub.com.","headers":{"User-Agent":"x"}}"#).unwrap();
        let Event::HttpRequest(request) = event else { panic!("wrong kind") };
        assert_eq!(request.host, "github.com");
        assert_eq!(request.sni, "github.com");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/");
        assert_eq!(request.scheme, "https");
        assert_eq!(request.headers.get("user-agent").map(String::as_str), Some("x"));

        let event = Event::from_json(r#"{"event":"dns.request","qname":"PyPI.org."}"#).unwrap();
        assert_eq!(event, Event::DnsRequest(DnsRequest { qname: "pypi.org".into(), qtype: "A".into() }));

        let event = Event::from_json(r#"{"event":"tcp.connect","host":"db","ip":"10.0.0.5","port":5432}"#).unwrap();
        assert_eq!(event.ip_text(), "10.0.0.5");
        assert_eq!(event.int_field(Field::TcpPort), Some(5432));

        let event =
            Event::from_json(r#"{"event":"http.response","status":404,"request":{"host":"a.b","query":"?x=1"}}"#)
                .unwrap();
        assert_eq!(event.str_field(Field::HttpQuery), Some("x=1"));
        assert_eq!(event.int_field(Field::HttpStatus), Some(404));
    }

    #[test]
    fn bad_json_events_are_errors() {
        for (json, expected) in [
            (r#"{"event":"http.requests","host":"a"}"#, "unknown variant `http.requests`"),
            (r#"{"event":"http.request","hots":"a"}"#, "unknown field `hots`"),
            (r#"{"event":"tcp.connect","host":"a","port":70000}"#, "invalid value: integer `70000`"),
            (r#"{"event":"dns.request","qname":"."}"#, "`qname` is empty"),
            (r#"{"event":"dns.request"}"#, "missing field `qname`"),
            (r#"{"event": "dns.request", "qname": "#, "EOF while parsing"),
            ("[1, 2]", "expected variant identifier"),
        ] {
            let error = Event::from_json(json).unwrap_err().to_string();
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn every_field_belongs_to_the_section_of_its_events() {
        for field in Field::ALL {
            assert_eq!(Field::from_path(field.path()), Some(field));
            for kind in field.events() {
                assert!(field.path().starts_with(kind.section().name()));
                assert!(kind.fields().any(|f| f == field));
            }
        }
    }
}
