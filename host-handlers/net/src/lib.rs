//! Host handlers on the vsock ports: the only way a guest byte reaches a network.
//!
//! - The DNS handler ([`Handlers::serve_dns`], vsock port [`DNS_PORT`]) answers the guest's
//!   queries under policy: allowed names are resolved upstream (cached, with
//!   answers pointing into internal ranges dropped), blocked ones get NXDOMAIN,
//!   rewrites are answered from the policy without asking upstream.
//! - The MITM handler ([`Handlers::serve_mitm`], vsock port [`MITM_PORT`]) terminates the
//!   guest's TLS with a leaf minted by the [`SandboxCa`] for the SNI, decides on
//!   every HTTP request and response, and forwards allowed requests over a
//!   verified TLS connection to the upstream the SNI names.
//!
//! Both are Unix-socket servers on `<dir>/vsock.sock_<port>`
//! ([`guest_protocol::sandbox_dir::SandboxDir::vsock_port_socket`]; the VMM delivers
//! guest connections there) and record every query, request and failed
//! connection in the sandbox's telemetry.

pub mod bindings;
pub mod ca;
pub mod client_hello;
pub mod config;
pub mod dns;
mod dns_limits;
mod error;
pub mod guard;
mod handlers;
mod idle;
pub mod mitm;
pub mod proxy;
pub mod proxy_header;
mod server;
pub mod upstream;

#[cfg(feature = "fixtures")]
pub mod fixtures;

pub use ca::SandboxCa;
pub use config::NetConfig;
pub use dns_limits::DNS_LIMIT_RULE;
pub use error::{Error, Result};
pub use handlers::{HandlerFiles, Handlers, DNS_PORT, MITM_PORT, RUNTIME_WORKERS};
pub use proxy::UpstreamProxy;
pub use server::Server;

/// The rustls crypto provider used for every TLS configuration here.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
