//! CPU cost of the MITM handler against other TLS-inspecting proxies, measured
//! in one run on the same upstream and the same client:
//!
//! - the upstream is the crate's HTTPS fixture (HTTP/1.1, its own CA) on
//!   127.0.0.1, in a process of its own;
//! - the client is this process (hyper + rustls on one thread), trusting each
//!   proxy's CA: our handler is reached through its Unix socket with a PROXY
//!   line, as the guest's net-proxy does; squid (ssl-bump) and mitmproxy as
//!   HTTPS proxies through CONNECT;
//! - our handler runs in a process of its own (the crate's handlers with the
//!   test profile, recording to a real session.db), as in the holder.
//! - `forwarder`, for reference, is the floor of our handler's design: the
//!   same stack (PROXY line, rustls, hyper's server and pooled client, the
//!   same upstream connector and runtime) forwarding each request as it
//!   comes, with no policy, no header handling and no session.db.
//!
//! For each, the CPU time (from /proc: the on-CPU time of the threads of the
//! process and its children) of the client, the upstream and the proxy is taken over a
//! 100 MB download and over small keep-alive requests (4 connections × 1000
//! sequential GETs). The table gives the proxy's CPU per MB and per request,
//! and the total (client + proxy + upstream) against the direct path's total
//! (client + upstream, no proxy): the goals are at most 2.2× per MB and 2.5×
//! per request. Each measurement is repeated (`PROXIES_BENCH_ROUNDS`, default
//! 2) and the lowest CPU kept; the load average is printed.
//!
//! squid and mitmproxy are skipped with a message when not installed:
//!
//! ```text
//! apt-get install -y squid-openssl
//! python3 -m venv target/mitmproxy-venv && target/mitmproxy-venv/bin/pip install mitmproxy
//! cargo bench -p net --bench proxies
//! ```
//!
//! `PROXIES_BENCH_MITMDUMP` names the `mitmdump` binary (default: the venv
//! above, then `mitmdump` on PATH); `PROXIES_BENCH_ONLY=direct,ours` limits
//! the proxies measured; `PROXIES_BENCH_WORKERS=2` adds a row for our
//! handler on a runtime of that many workers (the holder's has
//! [`net::RUNTIME_WORKERS`]).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_protocol::sandbox_dir::SandboxDir;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use net::fixtures::{empty_body, GuestBody, HttpsUpstream, TestCa, TestDns};
use net::{Handlers, NetConfig, MITM_PORT};
use policy::{Engine, Layer, Policy, ProfileSource, Secrets};
use telemetry::SessionDb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Download size; `PROXIES_BENCH_MB` overrides the 100 (in MiB).
fn download_size() -> u64 {
    std::env::var("PROXIES_BENCH_MB").ok().and_then(|mb| mb.parse().ok()).unwrap_or(100) * 1024 * 1024
}
const CONNECTIONS: usize = 4;
const REQUESTS_PER_CONNECTION: usize = 1000;
const ROLE: &str = "PROXIES_BENCH_ROLE";
const NAME: &str = "a.test";

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("upstream") => serve_upstream(),
        Ok("ours") => serve_ours(),
        Ok("forwarder") => serve_forwarder(),
        _ => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(run());
        }
    }
}

// ---- the processes under test ------------------------------------------------

/// Wait until the parent closes our stdin (or goes away).
fn until_stdin_closes() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// The HTTPS upstream and the DNS naming it: prints `<upstream addr> <dns addr>`,
/// writes its CA to `<dir>/upstream-ca.pem`.
fn serve_upstream() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let ca = TestCa::new("upstream bench CA").unwrap();
        ca.write_pem(&dir, "upstream-ca.pem").unwrap();
        let upstream = HttpsUpstream::start_http1_only(&ca, &[NAME]).await.unwrap();
        let dns = TestDns::start(&[(NAME, "127.0.0.1".parse().unwrap())]).await.unwrap();
        println!("{} {}", upstream.addr(), dns.addr());
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(until_stdin_closes).await.unwrap();
    });
}

/// Handler configuration reaching the upstream role: its DNS, its CA (in
/// `<dir>/upstream-ca.pem`), loopback allowed.
fn upstream_config(dir: &Path, dns: SocketAddr) -> NetConfig {
    let mut config = NetConfig::default();
    config.dns_servers = vec![dns];
    config.system_roots = false;
    config.extra_root_files = vec![dir.join("upstream-ca.pem")];
    config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
    config
}

/// Our handlers on `<dir>/vsock.sock_5002`, as the holder runs them (a
/// runtime of the workers given, a session.db in the sandbox directory); writes the
/// sandbox CA to `<dir>/sandbox-ca.pem` and prints `ready`.
fn serve_ours() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let dns: SocketAddr = args[2].parse().unwrap();
    let port: u16 = args[3].parse().unwrap();
    let workers: usize = args[4].parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
    runtime.block_on(async {
        let config = upstream_config(&dir, dns);
        let engine = Engine::builder()
            .secrets(Secrets::none().with_value("NET_TEST_TOKEN", common::SECRET_TOKEN))
            .profile(Layer::User, ProfileSource::Text { name: "bench.toml".into(), text: common::profile(port) })
            .build()
            .unwrap();
        let db = SessionDb::open(&SandboxDir::new(&dir).session_db()).unwrap();
        let handlers = Handlers::new(config, Policy::new(engine), db.recorder()).unwrap();
        let mitm = handlers.serve_mitm(&SandboxDir::new(&dir).vsock_port_socket(MITM_PORT)).unwrap();
        std::fs::write(dir.join("sandbox-ca.pem"), handlers.ca().ca_cert_pem()).unwrap();
        println!("ready");
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(until_stdin_closes).await.unwrap();
        mitm.shutdown().await;
        db.close().await.unwrap();
    });
}

/// The floor of our handler's design, for reference: the same stack (a
/// Unix socket with a PROXY line, rustls, hyper's HTTP/1.1 server, the
/// pooled client and [`net::upstream`]'s connector, the same runtime)
/// forwarding every request as it comes, with no policy, no header
/// handling and no session.db. Listens on `<dir>/forwarder.sock`, writes its
/// CA to `<dir>/forwarder-ca.pem` and prints `ready`.
fn serve_forwarder() {
    use hyper::service::service_fn;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use net::upstream::{Upstream, UpstreamConnector};
    use tokio::io::AsyncBufReadExt;

    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let dns: SocketAddr = args[2].parse().unwrap();
    let port: u16 = args[3].parse().unwrap();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(net::RUNTIME_WORKERS).enable_all().build().unwrap();
    runtime.block_on(async {
        let ca = TestCa::new("forwarder bench CA").unwrap();
        ca.write_pem(&dir, "forwarder-ca.pem").unwrap();
        let (chain, key) = ca.issue(&[NAME]).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(net::crypto_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let upstream = Arc::new(Upstream::new(&upstream_config(&dir, dns)).unwrap());
        let client: Client<_, hyper::body::Incoming> =
            Client::builder(TokioExecutor::new()).build(UpstreamConnector::new(upstream, true));
        let listener = tokio::net::UnixListener::bind(dir.join("forwarder.sock")).unwrap();
        println!("ready");
        std::io::stdout().flush().unwrap();
        let serve = async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (acceptor, client) = (acceptor.clone(), client.clone());
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut header = String::new();
                    stream.read_line(&mut header).await.unwrap();
                    let tls = acceptor.accept(stream).await.unwrap();
                    let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let target = format!("https://{NAME}:{port}{}", req.uri().path());
                        *req.uri_mut() = target.parse().unwrap();
                        let client = client.clone();
                        async move { client.request(req).await }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        };
        tokio::select! {
            () = serve => {}
            _ = tokio::task::spawn_blocking(until_stdin_closes) => {}
        }
    });
}

/// Our handler in a process of its own, on a runtime of `workers` workers,
/// with `dir` (holding `upstream-ca.pem`) as its sandbox directory.
fn start_ours(dir: &Path, name: &'static str, dns: &str, upstream: SocketAddr, workers: usize) -> Proxy {
    let args = [dir.display().to_string(), dns.to_owned(), upstream.port().to_string(), workers.to_string()];
    let (process, _) = spawn_role("ours", &args);
    let pem = std::fs::read_to_string(dir.join("sandbox-ca.pem")).unwrap();
    let socket = SandboxDir::new(dir).vsock_port_socket(MITM_PORT);
    Proxy { name, route: Route::Unix(socket), roots: roots_from_pem(&pem), process: Some(process) }
}

// ---- process bookkeeping ------------------------------------------------------

/// A child process, killed when dropped.
struct Process {
    child: Child,
    name: &'static str,
    /// One of this bench's roles, which stop when their stdin closes; the
    /// others are sent SIGTERM.
    role: bool,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds of the process and its live descendants.
    fn cpu(&self) -> f64 {
        tree_cpu_seconds(self.pid())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Our roles stop when their stdin closes; the others on SIGTERM.
        drop(self.child.stdin.take());
        if !self.role {
            let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop, killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This bench binary again, in `role`, with `args`; returns it and its first stdout line.
fn spawn_role(role: &'static str, args: &[String]) -> (Process, String) {
    let exe = std::env::current_exe().unwrap();
    let mut child =
        Command::new(exe).args(args).env(ROLE, role).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    (Process { child, name: role, role: true }, line.trim().to_owned())
}

fn stat_cpu_seconds(stat: &str) -> (f64, u32) {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (ticks as f64 / 100.0, fields[1].parse().unwrap())
}

/// On-CPU time of the live threads of `pid`, from their schedstat (in ns;
/// utime + stime count in 10 ms ticks, too coarse for 20 µs requests).
fn threads_cpu_seconds(pid: &str) -> Option<f64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += schedstat.split(' ').next().and_then(|ns| ns.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total as f64 / 1e9)
}

/// On-CPU time of the threads of `pid` whose name starts with `prefix`.
fn named_threads_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += schedstat.split(' ').next().and_then(|ns| ns.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total as f64 / 1e9
}

/// On-CPU time of `pid` and of every live process below it.
fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut stats = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
                let (ticks, ppid) = stat_cpu_seconds(&stat);
                stats.push((p, ppid, threads_cpu_seconds(&p.to_string()).unwrap_or(ticks)));
            }
        }
    }
    let mut tree = vec![pid];
    let mut total = 0.0;
    while let Some(p) = tree.pop() {
        for &(child, ppid, cpu) in &stats {
            if child == p {
                total += cpu;
            }
            if ppid == p {
                tree.push(child);
            }
        }
    }
    total
}

fn self_cpu_seconds() -> f64 {
    threads_cpu_seconds("self").unwrap()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
}

// ---- the proxies ----------------------------------------------------------------

/// How the client reaches the upstream.
enum Route {
    Direct,
    /// A Unix socket taking a PROXY line for the upstream (our handler, and
    /// the forwarder).
    Unix(PathBuf),
    /// An HTTP proxy on this port, asked to CONNECT to `target`.
    Connect {
        port: u16,
        target: String,
    },
}

struct Proxy {
    name: &'static str,
    route: Route,
    /// The CA the client trusts for `a.test` on this route.
    roots: rustls::RootCertStore,
    process: Option<Process>,
}

fn roots_from_pem(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn wait_for_file(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn find_binary(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned().or_else(|| {
        let name = candidates.last()?.file_name()?.to_owned();
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(&name)).find(|p| p.is_file())
    })
}

/// squid-openssl with ssl-bump (peek at step 1, then bump), its own CA, no cache,
/// an access log as our session.db; one process (`-N`) and its certificate helper.
fn start_squid(dir: &Path, upstream: SocketAddr) -> Result<Proxy, String> {
    let squid = find_binary(&[PathBuf::from("/usr/sbin/squid")]).ok_or("squid is not installed")?;
    let dir = dir.join("squid");
    std::fs::create_dir_all(&dir).unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=squid bench CA"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem"))
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("openssl: {e}"))?;
    if !made.success() {
        return Err("openssl could not make squid's CA".into());
    }
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 {NAME}\n")).unwrap();
    let certgen = "/usr/lib/squid/security_file_certgen";
    let made = Command::new(certgen).arg("-c").arg("-s").arg(dir.join("ssl_db")).args(["-M", "4MB"]).output();
    if !made.is_ok_and(|m| m.status.success()) {
        return Err(format!("{certgen} could not make its database"));
    }
    let port = free_port();
    let d = dir.display();
    let config = format!(
        "http_port 127.0.0.1:{port} ssl-bump tls-cert={d}/ca.pem tls-key={d}/ca.key \
         generate-host-certificates=on dynamic_cert_mem_cache_size=4MB\n\
         acl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\n\
         tls_outgoing_options cafile={d}/../upstream-ca.pem\n\
         http_access allow localhost\nhttp_access deny all\n\
         hosts_file {d}/hosts\ncache deny all\ncache_mem 0 MB\n\
         access_log stdio:{d}/access.log\ncache_log {d}/cache.log\npid_filename {d}/squid.pid\n\
         coredump_dir {d}\nshutdown_lifetime 0 seconds\npinger_enable off\n\
         sslcrtd_program {certgen} -s {d}/ssl_db -M 4MB\nsslcrtd_children 1 startup=1 idle=1\n"
    );
    std::fs::write(dir.join("squid.conf"), config).unwrap();
    // squid drops root for its `proxy` user, which must reach its files.
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(dir.parent().unwrap()).status();
    let _ = Command::new("chown").args(["-R", "proxy"]).arg(dir.join("ssl_db")).stderr(Stdio::null()).status();
    let child = Command::new(squid)
        .args(["-N", "-f"])
        .arg(dir.join("squid.conf"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("squid: {e}"))?;
    let process = Process { child, name: "squid", role: false };
    if !wait_for_port(port) {
        return Err(format!("squid did not listen; see {d}/cache.log"));
    }
    let roots = roots_from_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap());
    let target = format!("{NAME}:{}", upstream.port());
    Ok(Proxy { name: "squid ssl-bump", route: Route::Connect { port, target }, roots, process: Some(process) })
}

/// mitmdump in regular proxy mode with its own CA (made in its confdir),
/// streaming bodies over 1 MB as the others do, trusting the upstream's CA.
fn start_mitmproxy(dir: &Path, upstream: SocketAddr) -> Result<Proxy, String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/mitmproxy-venv/bin/mitmdump");
    let mut candidates = vec![venv, PathBuf::from("mitmdump")];
    if let Some(path) = std::env::var_os("PROXIES_BENCH_MITMDUMP") {
        candidates.insert(0, PathBuf::from(path));
    }
    let mitmdump = find_binary(&candidates).ok_or("mitmproxy is not installed (no mitmdump)")?;
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir).unwrap();
    let port = free_port();
    let child = Command::new(mitmdump)
        .args(["--listen-host", "127.0.0.1", "--listen-port", &port.to_string(), "-q"])
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .arg("--set")
        .arg(format!("ssl_verify_upstream_trusted_ca={}", dir.join("upstream-ca.pem").display()))
        .args(["--set", "stream_large_bodies=1m"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mitmdump: {e}"))?;
    let process = Process { child, name: "mitmproxy", role: false };
    let ca = confdir.join("mitmproxy-ca-cert.pem");
    if !wait_for_file(&ca) || !wait_for_port(port) {
        return Err("mitmdump did not start".into());
    }
    let roots = roots_from_pem(&std::fs::read_to_string(ca).unwrap());
    // mitmproxy resolves the CONNECT target itself (no hosts file): the
    // address, with the name in the client's SNI, which it passes on.
    let target = upstream.to_string();
    Ok(Proxy { name: "mitmproxy", route: Route::Connect { port, target }, roots, process: Some(process) })
}

// ---- the client ---------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn open(proxy: &Proxy, upstream: SocketAddr) -> SendRequest<GuestBody> {
    let stream: Box<dyn Io> = match &proxy.route {
        Route::Direct => {
            let tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            Box::new(tcp)
        }
        Route::Unix(socket) => {
            let mut unix = tokio::net::UnixStream::connect(socket).await.unwrap();
            let header = format!("PROXY TCP4 10.0.0.2 {} 40000 {}\r\n", upstream.ip(), upstream.port());
            unix.write_all(header.as_bytes()).await.unwrap();
            Box::new(unix)
        }
        Route::Connect { port, target } => {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            tcp.write_all(connect.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "{}: CONNECT answer cut short", proxy.name);
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            assert!(head.split(' ').nth(1) == Some("200"), "{}: CONNECT answered {head}", proxy.name);
            Box::new(tcp)
        }
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(net::crypto_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(proxy.roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// A GET with the Host a client would send for `a.test` on the upstream's port.
fn get(path: &str, port: u16) -> Request<GuestBody> {
    Request::get(path).header(HOST, format!("{NAME}:{port}")).body(empty_body()).unwrap()
}

async fn fetch(sender: &mut SendRequest<GuestBody>, path: &str, port: u16) -> u64 {
    let response = sender.send_request(get(path, port)).await.unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    received
}

async fn download(mut sender: SendRequest<GuestBody>, port: u16) {
    let size = download_size();
    assert_eq!(fetch(&mut sender, &format!("/bytes/{size}"), port).await, size);
}

async fn small_requests(senders: Vec<SendRequest<GuestBody>>, port: u16) {
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            tokio::spawn(async move {
                for _ in 0..REQUESTS_PER_CONNECTION {
                    fetch(&mut sender, "/hello", port).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// CPU seconds spent by (client, proxy, upstream) while `work` ran, and its wall time.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    client: f64,
    proxy: f64,
    upstream: f64,
    /// Of the proxy's, the session.db writer thread's (ours only).
    writer: f64,
    wall: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.client + self.proxy + self.upstream
    }
}

async fn measured(proxy: &Proxy, upstream: &Process, work: impl std::future::Future<Output = ()>) -> Cpu {
    let proxy_cpu = || proxy.process.as_ref().map_or(0.0, Process::cpu);
    let writer_cpu = || proxy.process.as_ref().map_or(0.0, |p| named_threads_cpu_seconds(p.pid(), "session-db-writ"));
    let before = (self_cpu_seconds(), proxy_cpu(), upstream.cpu(), writer_cpu());
    let started = Instant::now();
    work.await;
    let wall = started.elapsed().as_secs_f64();
    // Let the last rows and log lines be written.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Cpu {
        client: self_cpu_seconds() - before.0,
        proxy: proxy_cpu() - before.1,
        upstream: upstream.cpu() - before.2,
        writer: writer_cpu() - before.3,
        wall,
    }
}

fn lowest(a: Option<Cpu>, b: Cpu) -> Option<Cpu> {
    Some(match a {
        Some(a) if a.total() <= b.total() => a,
        _ => b,
    })
}

async fn run() {
    let rounds: usize = std::env::var("PROXIES_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(2);
    let only = std::env::var("PROXIES_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|w| name.starts_with(w.trim())));
    // PROXIES_BENCH_KEEP keeps the proxies' files (configurations, logs).
    let keep = std::env::var_os("PROXIES_BENCH_KEEP").is_some();
    let dir = tempfile::Builder::new().prefix("proxies-bench").disable_cleanup(keep).tempdir().unwrap();
    println!("load average at start: {}", load_average());

    let (upstream, line) = spawn_role("upstream", &[dir.path().display().to_string()]);
    let mut addrs = line.split(' ');
    let upstream_addr: SocketAddr = addrs.next().unwrap().parse().unwrap();
    let dns_addr = addrs.next().unwrap().to_owned();
    let upstream_ca = std::fs::read_to_string(dir.path().join("upstream-ca.pem")).unwrap();

    let mut proxies =
        vec![Proxy { name: "direct", route: Route::Direct, roots: roots_from_pem(&upstream_ca), process: None }];
    if wanted("ours") {
        proxies.push(start_ours(dir.path(), "ours", &dns_addr, upstream_addr, net::RUNTIME_WORKERS));
        // Another worker count, for comparison.
        if let Some(workers) = std::env::var("PROXIES_BENCH_WORKERS").ok().and_then(|w| w.parse().ok()) {
            let own = dir.path().join(format!("ours-{workers}"));
            std::fs::create_dir(&own).unwrap();
            std::fs::copy(dir.path().join("upstream-ca.pem"), own.join("upstream-ca.pem")).unwrap();
            let name = format!("ours, {workers} workers").leak();
            proxies.push(start_ours(&own, name, &dns_addr, upstream_addr, workers));
        }
    }
    if wanted("forwarder") {
        let args = [dir.path().display().to_string(), dns_addr.clone(), upstream_addr.port().to_string()];
        let (process, _) = spawn_role("forwarder", &args);
        let pem = std::fs::read_to_string(dir.path().join("forwarder-ca.pem")).unwrap();
        proxies.push(Proxy {
            name: "forwarder",
            route: Route::Unix(dir.path().join("forwarder.sock")),
            roots: roots_from_pem(&pem),
            process: Some(process),
        });
    }
    for (name, start) in
        [("squid", start_squid as fn(&Path, SocketAddr) -> Result<Proxy, String>), ("mitmproxy", start_mitmproxy)]
    {
        if !wanted(name) {
            continue;
        }
        match start(dir.path(), upstream_addr) {
            Ok(proxy) => proxies.push(proxy),
            Err(why) => println!("{name}: skipped: {why}"),
        }
    }

    // Warm up: certificates made, upstream connections pooled.
    for proxy in &proxies {
        let mut sender = open(proxy, upstream_addr).await;
        fetch(&mut sender, "/hello", upstream_addr.port()).await;
    }

    let mut results: Vec<(Option<Cpu>, Option<Cpu>)> = vec![(None, None); proxies.len()];
    for _ in 0..rounds {
        // Alternate the proxies within a round, so that all see the same load.
        for (proxy, result) in proxies.iter().zip(&mut results) {
            let sender = open(proxy, upstream_addr).await;
            result.0 = lowest(result.0, measured(proxy, &upstream, download(sender, upstream_addr.port())).await);
            let mut senders = Vec::new();
            for _ in 0..CONNECTIONS {
                senders.push(open(proxy, upstream_addr).await);
            }
            result.1 =
                lowest(result.1, measured(proxy, &upstream, small_requests(senders, upstream_addr.port())).await);
        }
    }

    let mb = download_size() as f64 / 1e6;
    let requests = (CONNECTIONS * REQUESTS_PER_CONNECTION) as f64;
    let (direct_mb, direct_req) = (results[0].0.unwrap(), results[0].1.unwrap());
    println!(
        "CPU time, lowest of {rounds} rounds; proxy = the proxy process (and children) only; total = client + proxy \
         + upstream; x direct = total / total of the direct path (goals: <= 2.2 per MB, <= 2.5 per request)"
    );
    println!(
        "{:<16} {:>13} {:>13} {:>9} {:>8} | {:>13} {:>13} {:>9} {:>8}",
        "path", "proxy ms/MB", "total ms/MB", "x direct", "MB/s", "proxy us/req", "total us/req", "x direct", "req/s"
    );
    for (proxy, (per_mb, per_req)) in proxies.iter().zip(&results) {
        let (per_mb, per_req) = (per_mb.unwrap(), per_req.unwrap());
        println!(
            "{:<16} {:>13.2} {:>13.2} {:>9.2} {:>8.0} | {:>13.0} {:>13.0} {:>9.2} {:>8.0}",
            proxy.name,
            per_mb.proxy * 1e3 / mb,
            per_mb.total() * 1e3 / mb,
            per_mb.total() / direct_mb.total(),
            mb / per_mb.wall,
            per_req.proxy * 1e6 / requests,
            per_req.total() * 1e6 / requests,
            per_req.total() / direct_req.total(),
            requests / per_req.wall,
        );
    }
    println!(
        "direct path split: client {:.2} + upstream {:.2} ms/MB; client {:.0} + upstream {:.0} us/req",
        direct_mb.client * 1e3 / mb,
        direct_mb.upstream * 1e3 / mb,
        direct_req.client * 1e6 / requests,
        direct_req.upstream * 1e6 / requests,
    );
    if let Some((Some(per_mb), Some(per_req))) = proxies.iter().position(|p| p.name == "ours").map(|i| results[i]) {
        println!(
            "ours: of which the session.db writer thread {:.3} ms/MB, {:.1} us/req",
            per_mb.writer * 1e3 / mb,
            per_req.writer * 1e6 / requests
        );
    }
    println!("load average at end: {}", load_average());
    drop(proxies);
    drop(upstream);
}
