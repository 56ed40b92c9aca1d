//! `sandbox serve`: an HTTP API over the `sandbox` library.
//!
//! Every endpoint is a thin layer over a library call (run in
//! `spawn_blocking`, as the library's calls block): nothing here boots,
//! restores or drives a VM itself. The native endpoints live under `/v1`
//! and are described by an OpenAPI 3.1 document generated from this code
//! ([`openapi`]), served at `/openapi.json` and committed as
//! `api/openapi.json`. Errors always have one shape, [`ErrorBody`].
//!
//! The server listens on a Unix socket (access is the socket's
//! permissions, 0600) or on a TCP address, where an API key is required
//! ([`auth`]). The E2B-compatible surface ([`e2b`]) is merged beside them:
//! its control plane behind the same key, its envd services behind each
//! sandbox's own access token.

pub mod auth;
pub mod e2b;
pub mod error;
pub mod openapi;
pub(crate) mod routes;
pub mod serve;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;

pub use auth::ApiKey;
pub use error::{ApiError, Error, ErrorBody};
pub use openapi::openapi;
pub use serve::{serve_tcp, serve_unix, shutdown_signal};

/// The largest file a client may upload (`PUT /v1/sandboxes/{id}/files`): 100 MiB.
pub const DEFAULT_UPLOAD_LIMIT: u64 = 100 * 1024 * 1024;

/// What the server needs to know.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The data directory: sandboxes, named snapshots, the default socket.
    pub data_dir: PathBuf,
    /// The holder program sandboxes are spawned with, and its arguments
    /// (`None`: the library's default, `sandbox-holder`).
    pub holder: Option<(PathBuf, Vec<String>)>,
    /// The key every request must present (`None`: none needed).
    pub api_key: Option<ApiKey>,
    /// The largest upload, in bytes.
    pub upload_limit: u64,
    /// The domain E2B clients build sandbox host names in
    /// (`<port>-<id>.<domain>`): `localhost:<port>` of a loopback listener.
    pub e2b_domain: Option<String>,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            holder: None,
            api_key: None,
            upload_limit: DEFAULT_UPLOAD_LIMIT,
            e2b_domain: None,
        }
    }

    #[must_use]
    pub fn holder<S: Into<String>>(mut self, program: impl Into<PathBuf>, args: impl IntoIterator<Item = S>) -> Config {
        self.holder = Some((program.into(), args.into_iter().map(Into::into).collect()));
        self
    }

    #[must_use]
    pub fn api_key(mut self, key: Option<ApiKey>) -> Config {
        self.api_key = key;
        self
    }

    #[must_use]
    pub fn e2b_domain(mut self, domain: Option<String>) -> Config {
        self.e2b_domain = domain;
        self
    }

    #[must_use]
    pub fn upload_limit(mut self, bytes: u64) -> Config {
        self.upload_limit = bytes;
        self
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    config: Arc<Config>,
    e2b: Arc<e2b::E2bState>,
}

impl AppState {
    pub fn new(config: Config) -> AppState {
        let e2b = Arc::new(e2b::E2bState::load(&config.data_dir));
        AppState { config: Arc::new(config), e2b }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn e2b(&self) -> &e2b::E2bState {
        &self.e2b
    }
}

/// The whole API: `/v1`, `/openapi.json` and E2B's control plane with the
/// key check in front, envd's services with the sandbox token check. Inside
/// a tokio runtime, this also starts the sweeper that stops sandboxes past
/// their E2B timeout.
pub fn router(config: Config) -> Router {
    let state = AppState::new(config);
    e2b::spawn_sweeper(state.clone());
    let keyed = routes::router()
        .merge(e2b::control_router())
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    e2b::envd_router(state.clone())
        .merge(keyed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), e2b::ports::route_by_host))
        .with_state(state)
}
