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
//! ([`auth`]). Other surfaces (an E2B-compatible one, port forwards) are
//! meant to be further routers merged into [`router`].

pub mod auth;
pub mod error;
pub mod openapi;
mod routes;
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
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config { data_dir: data_dir.into(), holder: None, api_key: None, upload_limit: DEFAULT_UPLOAD_LIMIT }
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
    pub fn upload_limit(mut self, bytes: u64) -> Config {
        self.upload_limit = bytes;
        self
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Config>);

impl AppState {
    pub fn config(&self) -> &Config {
        &self.0
    }
}

/// The whole API: `/v1`, `/openapi.json`, the key check in front of all of it.
pub fn router(config: Config) -> Router {
    let state = AppState(Arc::new(config));
    routes::router().layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key)).with_state(state)
}
