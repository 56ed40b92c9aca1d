//! One HTTP request inside a guest TLS connection.
//!
//! 1. The Host header (and `:authority`) must name the SNI of the connection
//!    (for plain HTTP, `mode = "http"`: the name the address was resolved
//!    for); otherwise 403 by `builtin.sni_host_mismatch` (domain fronting).
//! 2. The `http.request` event goes to the policy, with the port the guest
//!    connected to (a rule must name `http.request.port` to allow one other
//!    than 443), its `path` normalised and the path as sent in `raw_path`;
//!    anything but allow is a 403 whose text body names the rule.
//! 3. Connection-specific (hop-by-hop) headers are removed, then rewrite
//!    actions change the request headers before forwarding and before
//!    logging; values from secrets are logged as `REDACTED`, and so are
//!    credential-like headers (telemetry's [`redact`] rules).
//! 4. The request goes to `https://<sni>:<the decided port>` through a pooled
//!    client speaking the guest's protocol when the upstream can (a guest on
//!    HTTP/2 offers h2 first, one on HTTP/1.1 offers http/1.1 only), or, for an
//!    HTTP/1.1 upgrade such as WebSocket, over a dedicated HTTP/1.1 connection
//!    that becomes a byte tunnel after `101`.
//! 5. The `http.response` event is decided too (no matching rule blocks, as
//!    for every event): anything but allow turns the answer into a 403 naming
//!    the rule. Response header rewrites apply.
//!    For known AI provider endpoints the request asks for an uncompressed
//!    response (`accept-encoding: identity`) so that the model call can be
//!    parsed from the body.
//! 6. The response body streams to the guest through [`ObservedBody`], which
//!    counts it, keeps a preview, feeds the AI stream parser and writes the row.
//!
//! Upstream failures answer 502 (504 for timeouts, 503 when the sandbox's
//! upstream connections stay at their limit for the configured wait); an
//! upstream whose addresses are all refused by the address guard answers 403
//! by `builtin.address_guard`. A request whose row cannot be queued in time
//! (telemetry behind) answers 503 without being decided or forwarded.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use policy::{normalise_path, Action, ConnectMode, Decision, Event, HttpRequest, HttpResponse};
use telemetry::ai::StreamParser;
use telemetry::{redact, Outcome};

use super::exchange::{CountedBody, Exchange, ObservedBody};
use super::redact::{RedactingBody, SecretRedactor};
use super::{Destination, MitmHandler, RequestCount};
use crate::dns::ADDRESS_GUARD_RULE;
use crate::error::Error;
use crate::idle::Activity;

/// Rule recorded when the Host of a request is not the connection's SNI.
pub const SNI_HOST_MISMATCH_RULE: &str = "builtin.sni_host_mismatch";

/// Rule recorded when a TRACE request would carry a secret a rule injected
/// (the upstream would send it back to the guest).
pub const SECRET_TRACE_RULE: &str = "builtin.trace_with_secret";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response sent to the guest.
pub(crate) type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// State shared by the requests of one guest connection.
#[derive(Debug)]
pub(crate) struct Conn {
    handler: Arc<MitmHandler>,
    sni: String,
    /// Where the guest connected, as `tcp.connect` decided.
    destination: Destination,
    /// The guest speaks HTTP/2.
    h2: bool,
    activity: Arc<Activity>,
    pub(crate) requests: RequestCount,
    /// The address connected to, as every row of the connection shows it.
    ip: String,
    /// Where requests are forwarded, `<sni>:<port>`; or why that is not an
    /// authority (each request is then refused).
    upstream_authority: Result<Authority, String>,
}

/// A request already answered by the handler (403, 502, 504, 400).
struct Refusal {
    status: StatusCode,
    outcome: Outcome,
    rule: Option<String>,
    message: String,
}

impl Refusal {
    fn blocked(rule: Option<String>, message: String) -> Self {
        Self { status: StatusCode::FORBIDDEN, outcome: Outcome::Denied, rule, message }
    }
    fn failed(status: StatusCode, message: String) -> Self {
        Self { status, outcome: Outcome::Error, rule: None, message }
    }
}

/// What an allowed request turned into.
enum Reply {
    /// A response whose body streams to the guest; with `redact`, secret
    /// values in it are replaced (a rule injected a secret into the request).
    Stream { response: Response<Incoming>, redact: bool },
    /// A `101` after which the guest and upstream connections are joined.
    Tunnel { response: Response<Incoming>, guest: OnUpgrade },
}

/// Join the upgraded guest and upstream connections until either side ends or
/// nothing moves for the idle timeout; the exchange is recorded at the end.
async fn tunnel(
    guest: OnUpgrade,
    upstream: OnUpgrade,
    mut exchange: Exchange,
    activity: Arc<Activity>,
    idle: Duration,
) {
    match tokio::join!(guest, upstream) {
        (Ok(guest), Ok(upstream)) => {
            let mut guest = exchange.count_tunnel(TokioIo::new(guest));
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => match copied {
                    // A peer closing without TLS close_notify is a normal end here.
                    Ok(_) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Err(err) => exchange.event.error = Some(format!("tunnel: {err}")),
                },
                _ = activity.expired(idle) => exchange.event.error = Some(format!("tunnel idle for {idle:?}")),
            }
        }
        (guest, upstream) => {
            let err = guest.err().or(upstream.err()).map(|e| e.to_string()).unwrap_or_default();
            exchange.fail(format!("upgrade failed: {err}"));
        }
    }
}

impl Conn {
    pub(crate) fn new(
        handler: Arc<MitmHandler>,
        sni: String,
        destination: Destination,
        h2: bool,
        activity: Arc<Activity>,
    ) -> Self {
        let ip = destination.ip.to_string();
        let upstream_authority =
            Authority::try_from(format!("{sni}:{}", destination.port)).map_err(|e| format!("{sni}: {e}"));
        Self { handler, sni, destination, h2, activity, requests: RequestCount::default(), ip, upstream_authority }
    }

    /// TLS inspected (`https`), or plain HTTP (`mode = "http"`).
    fn tls(&self) -> bool {
        self.destination.mode != ConnectMode::Http
    }

    fn scheme(&self) -> Scheme {
        if self.tls() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        }
    }

    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let recorder = self.handler.recorder.clone();
        let sni = self.tls().then(|| self.sni.clone());
        let mut exchange = Exchange::new(recorder, SystemTime::now(), self.sni.clone(), sni);
        exchange.event.port = Some(self.destination.port);
        exchange.event.ip = Some(self.ip.clone());
        exchange.event.mode = Some(self.destination.mode.name().to_owned());
        exchange.event.method = Some(req.method().to_string());
        exchange.event.path = Some(req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned());
        exchange.event.request_headers = logged_headers(req.headers(), &HashSet::new());
        exchange.set_redactor(row_redactor(&self.handler.secrets, req.headers()));
        if let Err(err) = exchange.reserve().await {
            let message = format!("not forwarded: {err}");
            exchange.fail(message.clone());
            exchange.event.status_code = Some(StatusCode::SERVICE_UNAVAILABLE.as_u16());
            let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, message);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        match self.process(req, &mut exchange).await {
            Ok(Reply::Stream { response, redact }) => {
                let (parts, body) = response.into_parts();
                let body = if redact {
                    Either::Left(RedactingBody::new(body, self.handler.secrets.clone()))
                } else {
                    Either::Right(body)
                };
                let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                let path = req_path(exchange.event.path.as_deref());
                exchange.set_parser(StreamParser::for_request(&exchange.event.domain, path, content_type));
                let body = ObservedBody::new(body, exchange).map_err(BoxError::from).boxed_unsync();
                Response::from_parts(parts, body)
            }
            Ok(Reply::Tunnel { mut response, guest }) => {
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(guest, upstream, exchange, self.activity.clone(), self.handler.idle_timeout));
                let (parts, _) = response.into_parts();
                Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed_unsync())
            }
            Err(refusal) => {
                let rule = refusal.rule.or(exchange.event.matched_rule.take());
                exchange.decide(refusal.outcome, rule);
                exchange.event.status_code = Some(refusal.status.as_u16());
                exchange.event.error = Some(refusal.message.clone());
                text_response(refusal.status, refusal.message)
            }
        }
    }

    async fn process(&self, mut req: Request<Incoming>, exchange: &mut Exchange) -> Result<Reply, Refusal> {
        let host = request_host(&req).map_err(|why| Refusal::blocked(Some(SNI_HOST_MISMATCH_RULE.into()), why))?;
        if host != self.sni {
            let why = if self.tls() {
                format!("Host {host} does not match the TLS server name {}", self.sni)
            } else {
                format!("Host {host} does not match the name the address was resolved for, {}", self.sni)
            };
            return Err(Refusal::blocked(Some(SNI_HOST_MISMATCH_RULE.into()), why));
        }
        exchange.event.domain = host.clone();
        let request_event = HttpRequest {
            host,
            sni: self.sni.clone(),
            method: req.method().to_string(),
            path: normalise_path(req.uri().path()),
            raw_path: req.uri().path().to_owned(),
            query: req.uri().query().unwrap_or_default().to_owned(),
            headers: header_map(req.headers()),
            scheme: self.scheme().as_str().to_owned(),
            port: self.destination.port,
        };
        let verdict = self.handler.policy.decide(&Event::HttpRequest(request_event.clone())).await;
        if verdict.decision != Decision::Allow {
            let message = match &verdict.rule {
                Some(rule) => format!("blocked by sandbox policy rule {rule}"),
                None => "blocked by sandbox policy: no rule allows this request".to_owned(),
            };
            return Err(Refusal::blocked(verdict.rule, message));
        }
        exchange.decide(Outcome::Allowed, verdict.rule.clone());
        // Connection-specific headers go before the rewrites, so that a guest's
        // `Connection: <name>` cannot remove a header a rule sets.
        let upgrade = req.headers().get(header::UPGRADE).cloned().filter(|_| req.version() == Version::HTTP_11);
        strip_hop_by_hop(req.headers_mut());
        let secret_headers = rewrite_headers(req.headers_mut(), &verdict.actions, Target::Request);
        let injected = !secret_headers.is_empty();
        if injected && req.method() == Method::TRACE {
            let why = format!(
                "blocked by {SECRET_TRACE_RULE}: TRACE would send the secret a rule adds to this request back to the guest"
            );
            return Err(Refusal::blocked(Some(SECRET_TRACE_RULE.into()), why));
        }
        // Reflected secrets are looked for in the bytes as sent: no compression.
        if injected || StreamParser::for_request(&request_event.host, &request_event.path, None).is_some() {
            req.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        let head = req.method() == Method::HEAD;
        exchange.event.request_headers = logged_headers(req.headers(), &secret_headers);

        if let Some(upgrade) = upgrade {
            let guest = hyper::upgrade::on(&mut req);
            let response = self.send_upgrade(req, upgrade, exchange).await?;
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let mut response = self.screen_response(response, exchange, request_event).await?;
            if switching {
                return Ok(Reply::Tunnel { response, guest });
            }
            let redact = injected && redacted_body(&mut response, head);
            return Ok(Reply::Stream { response, redact });
        }
        let response = self.send(req, exchange).await?;
        let mut response = self.screen_response(response, exchange, request_event).await?;
        let redact = injected && redacted_body(&mut response, head);
        Ok(Reply::Stream { response, redact })
    }

    /// Forward through the pooled client.
    async fn send(&self, req: Request<Incoming>, exchange: &Exchange) -> Result<Response<Incoming>, Refusal> {
        let (parts, body) = req.into_parts();
        let mut upstream_req = Request::new(CountedBody::new(body, exchange.sent.clone()));
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = self.upstream_uri(&parts.uri)?;
        *upstream_req.headers_mut() = parts.headers;
        let client = if self.h2 { &self.handler.client_h2 } else { &self.handler.client_http1 };
        let sent = tokio::time::timeout(self.handler.response_timeout, client.request(upstream_req)).await;
        match sent {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(upstream_refusal(&self.sni, &err)),
            Err(_) => Err(self.response_timed_out()),
        }
    }

    /// Forward an upgrade request over its own HTTP/1.1 connection (the pooled
    /// client may speak HTTP/2 upstream, which has no such upgrades).
    async fn send_upgrade(
        &self,
        req: Request<Incoming>,
        upgrade: HeaderValue,
        exchange: &Exchange,
    ) -> Result<Response<Incoming>, Refusal> {
        let handler = &self.handler;
        let (parts, body) = req.into_parts();
        let mut upstream_req = Request::new(CountedBody::new(body, exchange.sent.clone()));
        *upstream_req.method_mut() = parts.method;
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        *upstream_req.uri_mut() = Uri::try_from(target)
            .map_err(|e| Refusal::failed(StatusCode::BAD_REQUEST, format!("request target {target}: {e}")))?;
        *upstream_req.headers_mut() = parts.headers;
        upstream_req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        upstream_req.headers_mut().insert(header::UPGRADE, upgrade);
        let exchanged = tokio::time::timeout(handler.response_timeout, async {
            let stream = if self.tls() {
                handler.upstream.connect(&self.sni, self.destination.port, true).await
            } else {
                handler.upstream.connect_tcp(&self.sni, self.destination.port).await
            };
            let stream = stream.map_err(BoxError::from)?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                if let Err(err) = connection.with_upgrades().await {
                    tracing::debug!(%err, "upstream upgrade connection ended");
                }
            });
            Ok::<_, BoxError>(sender.send_request(upstream_req).await?)
        })
        .await;
        match exchanged {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(upstream_refusal(&self.sni, err.as_ref())),
            Err(_) => Err(self.response_timed_out()),
        }
    }

    /// The `http.response` decision and response header rewrites.
    async fn screen_response(
        &self,
        response: Response<Incoming>,
        exchange: &mut Exchange,
        request: HttpRequest,
    ) -> Result<Response<Incoming>, Refusal> {
        let status = response.status();
        exchange.event.status_code = Some(status.as_u16());
        let event = HttpResponse { request, status: status.as_u16(), headers: header_map(response.headers()) };
        let verdict = self.handler.policy.decide(&Event::HttpResponse(event)).await;
        if verdict.decision != Decision::Allow {
            let message = match &verdict.rule {
                Some(rule) => format!("response blocked by sandbox policy rule {rule}"),
                None => "response blocked by sandbox policy: no rule allows this response".to_owned(),
            };
            return Err(Refusal::blocked(verdict.rule, message));
        }
        let (mut parts, body) = response.into_parts();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers);
        }
        parts.version = Version::HTTP_11;
        rewrite_headers(&mut parts.headers, &verdict.actions, Target::Response);
        if self.handler.secrets.redact_headers(&mut parts.headers) {
            tracing::warn!(host = %self.sni, "upstream response headers carried a secret value: redacted");
        }
        Ok(Response::from_parts(parts, body))
    }

    /// The request's path and query at the connection's upstream.
    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, Refusal> {
        let refused =
            |e: &dyn std::fmt::Display| Refusal::failed(StatusCode::BAD_REQUEST, format!("request target {uri}: {e}"));
        let authority = self.upstream_authority.clone().map_err(|e| refused(&e))?;
        upstream_uri(self.scheme(), authority, uri).map_err(|e| refused(&e))
    }

    fn response_timed_out(&self) -> Refusal {
        let message = format!("upstream {} did not respond within {:?}", self.sni, self.handler.response_timeout);
        Refusal::failed(StatusCode::GATEWAY_TIMEOUT, message)
    }
}

/// `uri`'s path and query (`/` if none) at `scheme://authority`. Only a
/// path is forwarded: not the asterisk form (`OPTIONS *`).
fn upstream_uri(scheme: Scheme, authority: Authority, uri: &Uri) -> Result<Uri, String> {
    let path_and_query = match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) if !pq.as_str().is_empty() => return Err(format!("{pq} is not a path")),
        _ => PathAndQuery::from_static("/"),
    };
    Uri::builder().scheme(scheme).authority(authority).path_and_query(path_and_query).build().map_err(|e| e.to_string())
}

/// What to keep out of a request's row: the policy's secret values and the
/// guest's credentials (the whole value of a credential-like header, and the
/// part after an authorization scheme), which an upstream may echo.
fn row_redactor(secrets: &Arc<SecretRedactor>, headers: &HeaderMap) -> Arc<SecretRedactor> {
    let mut credentials = Vec::new();
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        if !redact::is_secret_name(name.as_str()) || value.len() < 4 {
            continue;
        }
        if let Some((scheme, rest)) = value.split_once(' ') {
            if scheme.bytes().all(|b| b.is_ascii_alphabetic()) && rest.len() >= 4 {
                credentials.push(rest.trim().to_owned());
            }
        }
        credentials.push(value.to_owned());
    }
    if credentials.is_empty() {
        secrets.clone()
    } else {
        Arc::new(secrets.with_values(credentials))
    }
}

/// Prepare a response whose body will have secret values replaced: the
/// replacement changes its length, so the announced length goes (hyper then
/// frames the body itself). False if the response has no body to redact.
fn redacted_body<B>(response: &mut Response<B>, head: bool) -> bool {
    let bodyless = head || matches!(response.status(), StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    if bodyless {
        return false;
    }
    response.headers_mut().remove(header::CONTENT_LENGTH);
    true
}

/// Map an upstream failure to what the guest sees.
fn upstream_refusal(host: &str, err: &(dyn std::error::Error + 'static)) -> Refusal {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut chain = Vec::new();
    let mut ours = None;
    while let Some(current) = source {
        chain.push(current.to_string());
        if ours.is_none() {
            ours = current.downcast_ref::<Error>();
        }
        source = current.source();
    }
    chain.dedup();
    let detail = chain.join(": ");
    match ours {
        Some(Error::AddressRefused { .. }) => {
            Refusal::blocked(Some(ADDRESS_GUARD_RULE.into()), format!("upstream address refused: {detail}"))
        }
        Some(Error::ConnectTimeout { .. }) => Refusal::failed(StatusCode::GATEWAY_TIMEOUT, detail),
        Some(Error::UpstreamConnectionLimit { .. }) => Refusal::failed(StatusCode::SERVICE_UNAVAILABLE, detail),
        _ => Refusal::failed(StatusCode::BAD_GATEWAY, format!("upstream {host} failed: {detail}")),
    }
}

/// The path of a logged `path?query`.
fn req_path(logged: Option<&str>) -> &str {
    logged.unwrap_or("/").split('?').next().unwrap_or("/")
}

fn text_response(status: StatusCode, message: String) -> Response<ResponseBody> {
    let text = format!("{} {}: {message}\n", status.as_u16(), status.canonical_reason().unwrap_or_default());
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The host a request names: `:authority`/absolute-form and every Host header
/// must agree. Lower case, without port or trailing dot.
fn request_host<B>(req: &Request<B>) -> Result<String, String> {
    let normalize = |host: &str| host.trim_end_matches('.').to_ascii_lowercase();
    let mut hosts = Vec::new();
    if let Some(authority) = req.uri().authority() {
        hosts.push(normalize(authority.host()));
    }
    for value in req.headers().get_all(header::HOST) {
        let authority = value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<Authority>().ok())
            .ok_or_else(|| format!("malformed Host header {value:?}"))?;
        hosts.push(normalize(authority.host()));
    }
    let Some(first) = hosts.first() else {
        return Err("request names no host".into());
    };
    if hosts.iter().any(|h| h != first) {
        return Err(format!("conflicting hosts in one request: {}", hosts.join(", ")));
    }
    Ok(first.clone())
}

/// Headers for policy events: lower-case names, repeated values joined by ", ".
fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// Headers as logged: values set from secrets and credential-like headers redacted.
fn logged_headers(headers: &HeaderMap, secret: &HashSet<HeaderName>) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = if secret.contains(name) {
                redact::REDACTED.to_owned()
            } else {
                redact::header_value(name.as_str(), &String::from_utf8_lossy(value.as_bytes())).into_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Request,
    Response,
}

/// Apply the header actions for `target`; returns the names set from secrets.
fn rewrite_headers(headers: &mut HeaderMap, actions: &[Action], target: Target) -> HashSet<HeaderName> {
    let mut secret = HashSet::new();
    for action in actions {
        let (name, value) = match (action, target) {
            (Action::RemoveRequestHeader(name), Target::Request)
            | (Action::RemoveResponseHeader(name), Target::Response) => (name, None),
            (Action::SetRequestHeader(name, value), Target::Request)
            | (Action::SetResponseHeader(name, value), Target::Response) => (name, Some(value)),
            _ => continue,
        };
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::warn!(name, "rewrite names an invalid header");
            continue;
        };
        match value {
            None => {
                headers.remove(&name);
            }
            Some(value) => match HeaderValue::from_str(value.expose()) {
                Ok(mut header_value) => {
                    header_value.set_sensitive(value.is_secret());
                    if value.is_secret() {
                        secret.insert(name.clone());
                    }
                    headers.insert(name, header_value);
                }
                Err(_) => tracing::warn!(%name, value = value.redacted(), "rewrite value is not a valid header value"),
            },
        }
    }
    secret
}

/// Remove connection-specific headers (RFC 9110 section 7.6.1); `te: trailers`
/// stays, as HTTP/2 allows it.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::SecretValue;

    fn request(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn host_comes_from_authority_and_host_headers() {
        assert_eq!(request_host(&request("/", &["API.Example.com:443"])).unwrap(), "api.example.com");
        assert_eq!(request_host(&request("https://a.test/x", &[])).unwrap(), "a.test");
        assert_eq!(request_host(&request("https://a.test./x", &["a.test"])).unwrap(), "a.test");
        assert!(request_host(&request("https://a.test/x", &["b.test"])).unwrap_err().contains("conflicting"));
        assert!(request_host(&request("/", &["a.test", "b.test"])).unwrap_err().contains("conflicting"));
        assert!(request_host(&request("/", &[])).unwrap_err().contains("no host"));
        assert!(request_host(&request("/", &["bad host"])).unwrap_err().contains("malformed"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "te"]);
    }

    #[test]
    fn rewrites_apply_to_their_side_and_secrets_are_redacted_in_logs() {
        let mut headers = HeaderMap::new();
        headers.insert("x-remove", HeaderValue::from_static("1"));
        headers.insert("authorization", HeaderValue::from_static("Bearer guest"));
        let actions = vec![
            Action::RemoveRequestHeader("x-remove".into()),
            Action::SetRequestHeader("x-api-token".into(), SecretValue::secret("s3cr3t")),
            Action::SetRequestHeader("x-plain".into(), SecretValue::plain("visible")),
            Action::SetResponseHeader("x-response".into(), SecretValue::plain("no")),
        ];
        let secret = rewrite_headers(&mut headers, &actions, Target::Request);
        assert!(!headers.contains_key("x-remove") && !headers.contains_key("x-response"));
        assert_eq!(headers["x-api-token"], "s3cr3t");
        assert!(headers["x-api-token"].is_sensitive());
        let logged = logged_headers(&headers, &secret);
        let text = format!("{logged:?}");
        assert!(!text.contains("s3cr3t") && !text.contains("Bearer guest"), "{text}");
        assert!(logged.contains(&("x-plain".into(), "visible".into())));
        assert!(logged.contains(&("x-api-token".into(), "REDACTED".into())));
        assert!(logged.contains(&("authorization".into(), "Bearer REDACTED".into())));
    }

    #[test]
    fn upstream_uris_keep_path_and_query_at_the_connection_authority() {
        let authority = Authority::from_static("a.test:8443");
        for (target, expected) in [
            ("/", "https://a.test:8443/"),
            ("/x/y?q=1&r", "https://a.test:8443/x/y?q=1&r"),
            ("https://a.test/x?y", "https://a.test:8443/x?y"),
            ("http://other.test:80/z", "https://a.test:8443/z"),
            ("/%2e%2e/a", "https://a.test:8443/%2e%2e/a"),
        ] {
            let uri = upstream_uri(Scheme::HTTPS, authority.clone(), &target.parse().unwrap()).unwrap();
            assert_eq!(uri.to_string(), expected, "{target}");
            // What the format and parse it replaces made of it.
            let formatted: Uri = format!(
                "https://a.test:8443{}",
                target.parse::<Uri>().unwrap().path_and_query().map_or("/", |pq| pq.as_str())
            )
            .parse()
            .unwrap();
            assert_eq!(uri, formatted, "{target}");
        }
        assert_eq!(
            upstream_uri(Scheme::HTTP, authority.clone(), &"http://a.test".parse().unwrap()).unwrap(),
            "http://a.test:8443/"
        );
        assert!(upstream_uri(Scheme::HTTPS, authority, &"*".parse().unwrap()).is_err());
    }

    #[test]
    fn headers_for_events_join_repeats() {
        let mut headers = HeaderMap::new();
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("b"));
        assert_eq!(header_map(&headers)["accept"], "a, b");
    }

    #[test]
    fn refusals_map_guard_timeouts_and_other_failures() {
        let refused =
            Error::AddressRefused { host: "m.test".into(), refused: vec!["169.254.169.254".parse().unwrap()] };
        let r = upstream_refusal("m.test", &refused);
        assert_eq!((r.status, r.rule.as_deref()), (StatusCode::FORBIDDEN, Some(ADDRESS_GUARD_RULE)));
        assert!(r.message.contains("169.254.169.254"));
        let r = upstream_refusal("t.test", &Error::ConnectTimeout { host: "t.test".into() });
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        let tls =
            Error::UpstreamTls { host: "b.test".into(), source: std::io::Error::other("invalid peer certificate") };
        let r = upstream_refusal("b.test", &tls);
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(r.message.contains("invalid peer certificate"));
    }
}
