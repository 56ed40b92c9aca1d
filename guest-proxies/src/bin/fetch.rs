//! `fetch`: a small HTTPS client for the sandbox guest, in the spirit of
//! `curl -sS`. The certificate is always verified, against `--cacert`, else
//! `$SSL_CERT_FILE`, else the system bundle; there is no way to skip that.
//! `--show-cert` prints who issued the server's certificate, `--sha256` the
//! digest, size and duration of the body (for checking large downloads).
//!
//! Exit status (curl's numbers): 0 success, 22 HTTP status >= 400 (the body
//! is still written), 6 the host did not resolve, 7 the connection was
//! refused, 28 timeout, 35 TLS failure (e.g. an untrusted certificate),
//! 2 usage, 1 anything else.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Read buffer on the connection and on the response.
const SOCKET_BUFFER: usize = 256 * 1024;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(name = "fetch", about = "Fetch a URL over HTTP or HTTPS (certificates always verified)")]
struct Args {
    /// Request method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    method: String,
    /// Request body (sets POST unless -X says otherwise).
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Write the body to this file instead of standard output.
    #[arg(short = 'o', long = "output")]
    output: Option<std::path::PathBuf>,
    /// Print nothing but errors (accepted for curl compatibility; always on).
    #[arg(short = 's', long = "silent")]
    _silent: bool,
    /// Print the response status code after the body.
    #[arg(short = 'w', long = "write-status")]
    write_status: bool,
    /// PEM bundle of trusted roots.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Print the server certificate's subject and issuer on standard error.
    #[arg(long)]
    show_cert: bool,
    /// Print `sha256=<hex> bytes=<n> seconds=<s>` for the body on standard error.
    #[arg(long)]
    sha256: bool,
    /// Connect to ADDR for HOST:PORT instead of resolving HOST (as curl's --resolve).
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    resolve: Vec<String>,
    /// Give up after this many seconds.
    #[arg(short = 'm', long = "max-time", default_value_t = 60)]
    max_time: u64,
    url: String,
}

/// A failure with curl's exit status.
struct Failure(u8, String);

fn fail(code: u8, msg: impl std::fmt::Display) -> Failure {
    Failure(code, msg.to_string())
}

fn io_failure(e: &io::Error, what: &str) -> Failure {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => fail(28, format!("{what}: timed out")),
        io::ErrorKind::ConnectionRefused => fail(7, format!("{what}: connection refused")),
        io::ErrorKind::InvalidData => fail(35, format!("{what}: {e}")),
        _ => fail(1, format!("{what}: {e}")),
    }
}

struct Url {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, Failure> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(fail(2, format!("{url}: only http:// and https:// URLs are supported")));
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| fail(2, format!("{url}: bad port")))?),
        None => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(fail(2, format!("{url}: no host")));
    }
    Ok(Url { tls, host: host.to_string(), port, path: path.to_string() })
}

fn tls_config(cacert: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, Failure> {
    let path = cacert
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("SSL_CERT_FILE").map(Into::into))
        .unwrap_or_else(|| SYSTEM_BUNDLE.into());
    let pem = std::fs::read(&path).map_err(|e| fail(77, format!("{}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(fail(77, format!("{}: no certificates", path.display())));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(35, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Read the response head; returns (status, headers) and leaves the body in `r`.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>), Failure> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = r.read_until(b'\n', &mut head).map_err(|e| io_failure(&e, "reading the response"))?;
        if n == 0 {
            return Err(fail(52, "the server closed the connection without a complete response"));
        }
        if head.len() > MAX_HEAD {
            return Err(fail(1, "response head too large"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(fail(1, "malformed response head")),
    }
    let status = response.code.ok_or_else(|| fail(1, "no status code"))?;
    let headers = response
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// Copy the body to `out`, as its headers frame it.
fn copy_body(r: &mut impl BufRead, headers: &[(String, String)], out: &mut dyn Write) -> Result<(), Failure> {
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let copy_err = |e: io::Error| io_failure(&e, "reading the body");
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).map_err(copy_err)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size =
                u64::from_str_radix(size, 16).map_err(|_| fail(1, format!("bad chunk size {:?}", line.trim())))?;
            if size == 0 {
                return Ok(());
            }
            let copied = io::copy(&mut r.by_ref().take(size), out).map_err(copy_err)?;
            if copied != size {
                return Err(fail(18, "the body ended early"));
            }
            let mut crlf = String::new();
            r.read_line(&mut crlf).map_err(copy_err)?;
        }
    } else if let Some(len) = header("content-length") {
        let len: u64 = len.parse().map_err(|_| fail(1, "bad content-length"))?;
        let copied = io::copy(&mut r.by_ref().take(len), out).map_err(copy_err)?;
        if copied != len {
            return Err(fail(18, format!("the body ended after {copied} of {len} bytes")));
        }
        Ok(())
    } else {
        io::copy(r, out).map(|_| ()).map_err(copy_err)
    }
}

fn fetch(args: &Args) -> Result<u16, Failure> {
    let url = parse_url(&args.url)?;
    if let Some(h) = args.headers.iter().find(|h| !h.contains(':') || h.contains('\r') || h.contains('\n')) {
        return Err(fail(2, format!("bad header {h:?}: expected 'Name: value'")));
    }
    let timeout = Duration::from_secs(args.max_time.max(1));
    let addrs: Vec<_> = match resolved(&args.resolve, &url)? {
        Some(addr) => vec![addr],
        None => (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| fail(6, format!("could not resolve {}: {e}", url.host)))?
            .collect(),
    };
    let mut last = fail(6, format!("could not resolve {}", url.host));
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = io_failure(&e, &format!("connect to {addr}")),
        }
    }
    let tcp = tcp.ok_or(last)?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| io_failure(&e, "socket"))?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| io_failure(&e, "socket"))?;
    let stream: Box<dyn ReadWrite> = if url.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| fail(2, e))?;
        let conn = rustls::ClientConnection::new(tls_config(args.cacert.as_deref())?, name).map_err(|e| fail(35, e))?;
        let mut tls = rustls::StreamOwned::new(conn, BufferedTcp(BufReader::with_capacity(SOCKET_BUFFER, tcp)));
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => fail(35, format!("TLS handshake with {}: {e}", url.host)),
                _ => io_failure(&e, &format!("TLS handshake with {}", url.host)),
            })?;
        }
        if args.show_cert {
            match tls.conn.peer_certificates().and_then(<[_]>::first) {
                Some(cert) => eprintln!("{}", guest_proxies::cert::describe(cert)),
                None => eprintln!("certificate: none"),
            }
        }
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let method = if args.data.is_some() && args.method == "GET" { "POST" } else { args.method.as_str() };
    let body = args.data.as_deref().unwrap_or("");
    let mut request = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fetch\r\nAccept: */*\r\nConnection: close\r\n",
        url.path, url.host
    );
    for h in &args.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    if args.data.is_some() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = BufReader::with_capacity(SOCKET_BUFFER, stream);
    stream.get_mut().write_all(request.as_bytes()).map_err(|e| io_failure(&e, "sending the request"))?;
    stream.get_mut().flush().map_err(|e| io_failure(&e, "sending the request"))?;
    let (status, headers) = read_head(&mut stream)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| fail(23, format!("{}: {e}", p.display())))?),
        None => Box::new(io::stdout().lock()),
    };
    let started = std::time::Instant::now();
    let mut sink = Digest { hash: args.sha256.then(sha2::Sha256::default), bytes: 0, out: &mut out };
    if method != "HEAD" && status != 204 && status != 304 {
        copy_body(&mut stream, &headers, &mut sink)?;
    }
    if let Some(hash) = sink.hash {
        use sha2::Digest as _;
        let seconds = started.elapsed().as_secs_f64();
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("sha256={hex} bytes={} seconds={seconds:.3}", sink.bytes);
    }
    out.flush().map_err(|e| fail(23, e))?;
    Ok(status)
}

/// `--resolve HOST:PORT:ADDR` entries that name this URL's host and port.
fn resolved(entries: &[String], url: &Url) -> Result<Option<std::net::SocketAddr>, Failure> {
    for entry in entries {
        let mut parts = entry.splitn(3, ':');
        let (Some(host), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(fail(2, format!("bad --resolve {entry:?}: expected HOST:PORT:ADDR")));
        };
        let port: u16 = port.parse().map_err(|_| fail(2, format!("bad --resolve {entry:?}: bad port")))?;
        let ip: std::net::IpAddr = addr
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| fail(2, format!("bad --resolve {entry:?}: bad address")))?;
        if host.eq_ignore_ascii_case(&url.host) && port == url.port {
            return Ok(Some((ip, port).into()));
        }
    }
    Ok(None)
}

/// Counts (and with `--sha256` hashes) what passes through on its way to `out`.
struct Digest<'a> {
    hash: Option<sha2::Sha256>,
    bytes: u64,
    out: &'a mut Box<dyn Write>,
}

impl Write for Digest<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        if let Some(hash) = self.hash.as_mut() {
            sha2::Digest::update(hash, &buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A TCP connection read through a large buffer. rustls reads at most 4 KiB
/// per call; this turns those into few large system calls, which matters
/// where guest kernel code is emulated.
struct BufferedTcp(BufReader<TcpStream>);

impl Read for BufferedTcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for BufferedTcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// What `fetch` reads from and writes to: TCP or TLS over TCP.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn main() -> ExitCode {
    let args = Args::parse();
    match fetch(&args) {
        Ok(status) => {
            if args.write_status {
                println!("{status}");
            }
            if status >= 400 {
                eprintln!("fetch: {}: HTTP status {status}", args.url);
                ExitCode::from(22)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(Failure(code, msg)) => {
            eprintln!("fetch: {msg}");
            ExitCode::from(code)
        }
    }
}
