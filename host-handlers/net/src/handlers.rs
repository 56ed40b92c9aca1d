//! The public entry point: both handlers of one sandbox, sharing the resolver
//! cache, the address guard, the CA, the DNS limits and the names of the
//! addresses the DNS handler answered with.

use std::path::Path;
use std::sync::Arc;

use guest_protocol::sandbox_dir::SandboxDir;
use policy::Policy;
use telemetry::Recorder;
use tokio::sync::Semaphore;

use crate::bindings::Bindings;
use crate::ca::SandboxCa;
use crate::config::NetConfig;
use crate::dns::DnsHandler;
use crate::dns_limits::DnsLimiter;
use crate::error::Result;
use crate::mitm::MitmHandler;
use crate::server::Server;
use crate::upstream::Upstream;

pub use guest_protocol::ports::{DNS_PORT, MITM_PORT};

/// Worker threads of the tokio runtime the handlers of one sandbox are
/// served on. One: a request through the MITM wakes several tasks in turn
/// (the guest's connection, the pooled upstream connection, timers), and
/// with a second worker each wake could hand the task to the other thread,
/// a futex wake and a context switch per hop. Measured with
/// `cargo bench -p net --bench proxies` on 2 cores, one worker took about
/// 0.8 of the CPU per small request that two did, and 0.7 per MB; each
/// sandbox has its own runtime, so sandboxes still use every core.
pub const RUNTIME_WORKERS: usize = 1;

/// The DNS and MITM handlers of one sandbox.
#[derive(Debug)]
pub struct Handlers {
    config: NetConfig,
    upstream: Arc<Upstream>,
    ca: Arc<SandboxCa>,
    policy: Policy,
    recorder: Recorder,
    dns_limiter: Arc<DnsLimiter>,
    bindings: Arc<Bindings>,
    /// Bytes the DNS connections of this sandbox may still hold.
    dns_bytes: Arc<Semaphore>,
}

/// What the handlers read from the host's files or make once per sandbox:
/// the CA (fresh, or the one in [`NetConfig::ca_dir`]), the DNS
/// configuration and the root certificates. Loaded apart
/// from [`Handlers`] so a process can read them and then lose access to the
/// files (a confined holder loads them before it enters its jail).
#[derive(Debug)]
pub struct HandlerFiles {
    ca: Arc<SandboxCa>,
    upstream: Arc<Upstream>,
}

impl HandlerFiles {
    /// Generate the sandbox's CA (or load or create the one in
    /// [`NetConfig::ca_dir`]), read the DNS configuration and the root certificates.
    pub fn load(config: &NetConfig) -> Result<HandlerFiles> {
        let ca = match &config.ca_dir {
            Some(dir) => SandboxCa::load_or_create(dir)?,
            None => SandboxCa::generate()?,
        };
        Ok(HandlerFiles { ca: Arc::new(ca), upstream: Arc::new(Upstream::new(config)?) })
    }

    /// The CA these handlers will sign leaves with; its certificate is what
    /// the guest must trust.
    pub fn ca(&self) -> &SandboxCa {
        &self.ca
    }
}

impl Handlers {
    /// Generate (or load) the CA, read the DNS configuration and the root
    /// certificates ([`HandlerFiles::load`]). Nothing listens yet.
    pub fn new(config: NetConfig, policy: Policy, recorder: Recorder) -> Result<Handlers> {
        Ok(Handlers::with_files(HandlerFiles::load(&config)?, config, policy, recorder))
    }

    /// The handlers, from files already loaded with `config`. Nothing listens yet.
    pub fn with_files(files: HandlerFiles, config: NetConfig, policy: Policy, recorder: Recorder) -> Handlers {
        let HandlerFiles { ca, upstream } = files;
        let dns_limiter = Arc::new(DnsLimiter::new(policy.engine().dns_limits(), recorder.clone()));
        let bindings = Arc::default();
        let dns_bytes = Arc::new(Semaphore::new(crate::dns::MAX_HELD_BYTES_PER_SANDBOX));
        Handlers { config, upstream, ca, policy, recorder, dns_limiter, bindings, dns_bytes }
    }

    /// The sandbox CA whose certificate the guest must trust.
    pub fn ca(&self) -> &SandboxCa {
        &self.ca
    }

    /// Serve DNS on the Unix socket `path` (the host side of vsock port [`DNS_PORT`]).
    /// Must be called inside a tokio runtime.
    pub fn serve_dns(&self, path: &Path) -> Result<Server> {
        let handler = DnsHandler {
            upstream: self.upstream.clone(),
            policy: self.policy.clone(),
            recorder: self.recorder.clone(),
            limiter: self.dns_limiter.clone(),
            bindings: self.bindings.clone(),
            idle_timeout: self.config.idle_timeout,
            held: self.dns_bytes.clone(),
        };
        Server::bind(path, self.config.max_connections, Arc::new(handler))
    }

    /// Serve the MITM handler on the Unix socket `path` (the host side of vsock
    /// port [`MITM_PORT`]). Must be called inside a tokio runtime.
    pub fn serve_mitm(&self, path: &Path) -> Result<Server> {
        let handler = MitmHandler::new(
            self.upstream.clone(),
            self.ca.clone(),
            self.policy.clone(),
            self.recorder.clone(),
            self.bindings.clone(),
            &self.config,
        )?;
        Server::bind(path, self.config.max_connections, Arc::new(handler))
    }

    /// Serve both handlers in a sandbox's directory, on the sockets the VMM
    /// hands guest connections to their ports to (`vsock.sock_<port>`, see
    /// [`SandboxDir::vsock_port_socket`]). Returns (DNS, MITM).
    pub fn serve_vsock_dir(&self, dir: &Path) -> Result<(Server, Server)> {
        let dir = SandboxDir::new(dir);
        let dns = self.serve_dns(&dir.vsock_port_socket(DNS_PORT))?;
        let mitm = self.serve_mitm(&dir.vsock_port_socket(MITM_PORT))?;
        Ok((dns, mitm))
    }
}
