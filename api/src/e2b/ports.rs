//! Sandbox ports by host name, as E2B serves them: a request whose `Host`
//! is `<port>-<sandbox id>.<domain>` (what the SDK's `get_host(port)`
//! gives) goes to the guest's `127.0.0.1:<port>` through the agent
//! (`Sandbox::connect_port_from`, which records the connection in the
//! sandbox's session.db). With the default domain, `localhost:<server
//! port>`, such a URL works on this host as it is in curl and browsers,
//! which resolve every `*.localhost` name to loopback.
//!
//! Like an E2B sandbox's ports by default, these need no key: anyone who
//! reaches the server reaches the ports of the sandboxes the E2B surface
//! knows (created through it, or asked about by a client with the key);
//! other sandboxes' ports are not reachable this way.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use crate::error::ApiError;
use crate::routes::find;
use crate::AppState;

/// The guest port and sandbox a `Host` names under `domain`, if it does.
pub fn parse_host<'a>(host: &'a str, domain: &str) -> Option<(u16, &'a str)> {
    let name = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = name.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    sandbox::valid_id(id).then_some((port, id))
}

/// Middleware in front of everything: requests for a sandbox's port go
/// there; the rest go on.
pub async fn route_by_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(domain) = state.config().e2b_domain.as_deref() else { return next.run(request).await };
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Some((port, id)) = parse_host(host, domain) else { return next.run(request).await };
    let (port, id) = (port, id.to_string());
    // Only sandboxes the E2B surface created or was asked about by a client
    // with the key: a sandbox of the CLI or of /v1 is not reachable this way.
    if state.e2b().record(&id).is_none() {
        return ApiError::new(StatusCode::BAD_GATEWAY, format!("sandbox {id} not found")).into_response();
    }
    match proxy(&state, port, &id, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn proxy(state: &AppState, port: u16, id: &str, request: Request) -> Result<Response, ApiError> {
    let peer = request.extensions().get::<ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.to_string());
    let (st, owned) = (state.clone(), id.to_string());
    let stream = crate::routes::blocking(move || Ok(find(&st, &owned)?.connect_port_from(port, peer.as_deref())?))
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("sandbox {id}, port {port}: {}", e.message)))?;
    stream.set_nonblocking(true).map_err(|e| ApiError::internal(format!("the guest connection: {e}")))?;
    let stream = tokio::net::UnixStream::from_std(stream)
        .map_err(|e| ApiError::internal(format!("the guest connection: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("sandbox {id}, port {port}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("a sandbox port connection ended: {e}");
        }
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("sandbox {id}, port {port}: {e}")))?;
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_name_a_port_and_a_sandbox() {
        let domain = "localhost:8080";
        assert_eq!(parse_host("3000-ab12cd.localhost:8080", domain), Some((3000, "ab12cd")));
        assert_eq!(parse_host("localhost:8080", domain), None);
        assert_eq!(parse_host("0-ab.localhost:8080", domain), None);
        assert_eq!(parse_host("99999-ab.localhost:8080", domain), None);
        assert_eq!(parse_host("80-a_b.localhost:8080", domain), None);
        assert_eq!(parse_host("80-ab.evil.localhost:8080", domain), None);
        assert_eq!(parse_host("80-ab.localhost:8081", domain), None);
    }
}
