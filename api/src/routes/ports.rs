//! `POST /v1/sandboxes/{id}/ports`, `GET /v1/sandboxes/{id}/ports`: port
//! forwards from the host into a running sandbox.
//!
//! The server binds the listener (on `127.0.0.1` unless the request names
//! another address) and hands it to the process holding the sandbox, which
//! carries every connection to the guest's `127.0.0.1:guest_port` and
//! records it in `session.db` (`inbound_events`, shown by the events
//! endpoints as `kind: "inbound"`). A forward ends with its sandbox.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, find, JsonBody, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// A forward to add.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePort {
    /// The port on the guest's 127.0.0.1 that connections go to (1-65535).
    #[schema(example = 8080)]
    pub guest_port: u16,
    /// The host port to listen on (default 0: a free one, named in the reply).
    #[serde(default)]
    #[schema(example = 0)]
    pub host_port: u16,
    /// The host address to listen on (default `127.0.0.1`; anything wider
    /// only when given here).
    #[schema(value_type = Option<String>, example = "127.0.0.1")]
    pub host_address: Option<IpAddr>,
}

/// A forward that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortInfo {
    /// The address the host listens on.
    #[schema(value_type = String, example = "127.0.0.1:40123")]
    pub host: SocketAddr,
    #[schema(example = 8080)]
    pub guest_port: u16,
}

impl From<sandbox::PortForward> for PortInfo {
    fn from(forward: sandbox::PortForward) -> PortInfo {
        PortInfo { host: forward.host, guest_port: forward.guest_port }
    }
}

/// A sandbox's forwards.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortList {
    pub ports: Vec<PortInfo>,
}

/// The listener for `request`, or the error to answer with.
fn bind(request: &CreatePort) -> ApiResult<std::net::TcpListener> {
    if request.guest_port == 0 {
        return Err(ApiError::bad_request("guest_port must be within 1..=65535"));
    }
    let host = SocketAddr::new(request.host_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), request.host_port);
    std::net::TcpListener::bind(host).map_err(|e| {
        let status = match e.kind() {
            std::io::ErrorKind::AddrInUse => StatusCode::CONFLICT,
            std::io::ErrorKind::AddrNotAvailable => StatusCode::BAD_REQUEST,
            std::io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, format!("cannot listen on {host}: {e}"))
    })
}

/// Forward a host port to a running sandbox: connections to the returned
/// address reach the guest's `127.0.0.1:guest_port`, each one recorded.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/ports", tag = "ports", request_body = CreatePort,
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 201, description = "Listening", body = PortInfo),
              (status = 400, description = "A bad port or address", body = crate::ErrorBody),
              (status = 403, description = "Not allowed to listen there", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody),
              (status = 409, description = "The sandbox is not running, or the host port is taken", body = crate::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
    JsonBody(request): JsonBody<CreatePort>,
) -> ApiResult<(StatusCode, Json<PortInfo>)> {
    let forward = blocking(move || {
        let sandbox = find(&state, &id)?;
        if !sandbox.is_running() {
            return Err(sandbox::Error::NotRunning(id).into());
        }
        let listener = bind(&request)?;
        Ok(sandbox.forward_listener(listener, request.guest_port)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(forward.into())))
}

/// The forwards of a sandbox (none once it has stopped).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", tag = "ports",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "Its forwards", body = PortList),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn list(State(state): State<AppState>, SandboxId(id): SandboxId) -> ApiResult<Json<PortList>> {
    let ports = blocking(move || Ok(find(&state, &id)?.ports())).await?;
    Ok(Json(PortList { ports: ports.into_iter().map(PortInfo::from).collect() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_to_loopback_and_bad_ones_are_refused() {
        let request: CreatePort = serde_json::from_str(r#"{"guest_port": 80}"#).unwrap();
        let listener = bind(&request).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
        let taken = CreatePort { guest_port: 80, host_port: addr.port(), host_address: None };
        assert_eq!(bind(&taken).unwrap_err().status, StatusCode::CONFLICT);
        let zero = CreatePort { guest_port: 0, ..CreatePort::default() };
        assert_eq!(bind(&zero).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(serde_json::from_str::<CreatePort>(r#"{"guest_port": 70000}"#).is_err());
        assert!(serde_json::from_str::<CreatePort>(r#"{"guest_port": 80, "host_address": "localhost"}"#).is_err());
        assert!(serde_json::from_str::<CreatePort>(r#"{"guest_port": 80, "extra": 1}"#).is_err());
    }
}
