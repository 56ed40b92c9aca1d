//! `sandbox-probe`: tries one way out of the guest and says what happened.
//!
//! Isolation checks run it inside a sandbox (`sandbox verify-isolation`, the
//! end-to-end suites). Every subcommand prints exactly one line on standard
//! output, a [`ProbeLine`] (`<probe> <target> ok|fail <detail>`, see
//! [`guest_protocol::probe`]); the exit status is 0 for `ok`, 1 for `fail`,
//! 2 for a bad command line.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use guest_protocol::probe::ProbeLine;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, VsockAddr};

#[derive(Debug, Parser)]
#[command(name = "sandbox-probe", about = "Try one way out of the sandbox guest and report the outcome on one line")]
struct Args {
    /// Give up on the attempt after this many seconds.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
    #[command(subcommand)]
    probe: Probe,
}

#[derive(Debug, Subcommand)]
enum Probe {
    /// Open a TCP connection, optionally send a line and read the answer.
    TcpConnect {
        addr: SocketAddr,
        /// Send this text (and a CRLF) once connected, then read what comes back.
        #[arg(long)]
        send: Option<String>,
    },
    /// Send a UDP datagram and wait for any answer.
    Udp { addr: SocketAddr },
    /// Send one DNS query over UDP (no retries) and report the answer.
    Dns {
        name: String,
        /// Record type.
        #[arg(long = "type", default_value = "A")]
        rtype: String,
        /// The server to ask (any address: port 53 is redirected to the DNS proxy).
        #[arg(long, default_value = "10.0.0.1:53")]
        server: SocketAddr,
    },
    /// Send COUNT queries for `<n>.SUFFIX` (n = 0..COUNT) one after the other
    /// over one UDP socket, and count the answers by response code.
    DnsFlood {
        suffix: String,
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// The server to ask.
        #[arg(long, default_value = "10.0.0.1:53")]
        server: SocketAddr,
    },
    /// Open a vsock stream to CID:PORT, optionally send bytes and read the answer.
    VsockConnect {
        /// `CID:PORT`, e.g. `2:5000` (the host).
        target: String,
        /// Send this text once connected.
        #[arg(long)]
        send: Option<String>,
    },
    /// Delete every nftables table (what `nft flush ruleset` does), over netlink.
    NatFlush,
    /// TLS to ADDR with this SNI, verified against a CA file, then a GET with this Host header.
    Tls {
        addr: SocketAddr,
        /// The TLS server name.
        #[arg(long)]
        sni: String,
        /// The HTTP Host header (default: the SNI).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/")]
        path: String,
        /// PEM roots to verify the server against.
        #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
        cafile: std::path::PathBuf,
    },
    /// Listen on TCP and/or vsock ports for `--timeout` seconds and count connections.
    Listen {
        #[arg(long)]
        tcp: Option<u16>,
        #[arg(long)]
        vsock: Option<u32>,
        /// Stop as soon as standard input ends (still at most `--timeout`).
        #[arg(long)]
        until_eof: bool,
    },
}

/// The outcome of one attempt: (target, got through?, detail).
type Outcome = (String, bool, String);

fn main() -> ExitCode {
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let (name, (target, ok, detail)) = match &args.probe {
        Probe::TcpConnect { addr, send } => ("tcp-connect", tcp_connect(*addr, send.as_deref(), timeout)),
        Probe::Udp { addr } => ("udp", udp(*addr, timeout)),
        Probe::Dns { name, rtype, server } => ("dns", dns(name, rtype, *server, timeout)),
        Probe::DnsFlood { suffix, count, server } => ("dns-flood", dns_flood(suffix, *count, *server, timeout)),
        Probe::VsockConnect { target, send } => ("vsock-connect", vsock_connect(target, send.as_deref(), timeout)),
        Probe::NatFlush => ("nat-flush", nat_flush()),
        Probe::Tls { addr, sni, host, path, cafile } => {
            ("tls", tls(*addr, sni, host.as_deref().unwrap_or(sni), path, cafile, timeout))
        }
        Probe::Listen { tcp, vsock, until_eof } => ("listen", listen(*tcp, *vsock, *until_eof, timeout)),
    };
    println!("{}", ProbeLine { probe: name.into(), target, ok, detail });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn tcp_connect(addr: SocketAddr, send: Option<&str>, timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(stream) => stream,
        Err(e) => return (addr.to_string(), false, io_detail(&e)),
    };
    let connected = format!("connected from {}", stream.local_addr().map_or("?".into(), |a| a.to_string()));
    let Some(text) = send else { return (addr.to_string(), true, connected) };
    let exchanged = (|| -> io::Result<String> {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("{text}\r\n").as_bytes())?;
        let mut answer = vec![0u8; 4096];
        let n = match stream.read(&mut answer) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&answer[..n]).trim_end().to_string();
        Ok(format!("received {n} bytes: {text:?}"))
    })();
    match exchanged {
        Ok(detail) => (addr.to_string(), true, format!("{connected}; {detail}")),
        Err(e) => (addr.to_string(), true, format!("{connected}; {}", io_detail(&e))),
    }
}

fn udp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let attempt = || -> io::Result<String> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"sandbox-probe\n")?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        Ok(format!("answer of {n} bytes"))
    };
    match attempt() {
        Ok(d) => (addr.to_string(), true, d),
        Err(e) => (addr.to_string(), false, io_detail(&e)),
    }
}

fn dns(name: &str, rtype: &str, server: SocketAddr, timeout: Duration) -> Outcome {
    let target = format!("{name}/{rtype}");
    let attempt = || -> Result<(bool, String), String> {
        let rtype: RecordType = rtype.parse().map_err(|e| format!("bad type: {e}"))?;
        let qname =
            Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|e| format!("bad name: {e}"))?;
        let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
        let mut query = Message::new(id, MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(qname, rtype));
        let bytes = query.to_vec().map_err(|e| format!("encode: {e}"))?;
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| io_detail(&e))?;
        socket.connect(server).map_err(|e| io_detail(&e))?;
        socket.set_read_timeout(Some(timeout)).map_err(|e| io_detail(&e))?;
        socket.send(&bytes).map_err(|e| io_detail(&e))?;
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).map_err(|e| io_detail(&e))?;
            let Ok(answer) = Message::from_vec(&buf[..n]) else { continue };
            if answer.metadata.id != id {
                continue;
            }
            let records: Vec<String> = answer.answers.iter().map(|r| r.data.to_string()).collect();
            let rcode = answer.metadata.response_code;
            let got = rcode == hickory_proto::op::ResponseCode::NoError && !records.is_empty();
            return Ok((got, format!("rcode={rcode} answers=[{}]", records.join(","))));
        }
    };
    match attempt() {
        Ok((ok, d)) => (target, ok, d),
        Err(d) => (target, false, d),
    }
}

fn dns_flood(suffix: &str, count: u32, server: SocketAddr, timeout: Duration) -> Outcome {
    let target = format!("{suffix}/x{count}");
    let attempt = || -> Result<(bool, String), String> {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| io_detail(&e))?;
        socket.connect(server).map_err(|e| io_detail(&e))?;
        socket.set_read_timeout(Some(timeout)).map_err(|e| io_detail(&e))?;
        let mut rcodes = std::collections::BTreeMap::<String, u32>::new();
        let mut buf = [0u8; 4096];
        for n in 0..count {
            let qname = Name::from_ascii(format!("{n}.{}.", suffix.trim_end_matches('.')))
                .map_err(|e| format!("bad name: {e}"))?;
            let id = u16::try_from(n & 0xffff).unwrap_or(0);
            let mut query = Message::new(id, MessageType::Query, OpCode::Query);
            query.metadata.recursion_desired = true;
            query.add_query(Query::query(qname, RecordType::A));
            socket.send(&query.to_vec().map_err(|e| format!("encode: {e}"))?).map_err(|e| io_detail(&e))?;
            let rcode = loop {
                match socket.recv(&mut buf) {
                    Ok(len) => match Message::from_vec(&buf[..len]) {
                        Ok(answer) if answer.metadata.id == id => break answer.metadata.response_code.to_string(),
                        _ => continue,
                    },
                    Err(e) => break format!("no answer ({})", io_detail(&e)),
                }
            };
            *rcodes.entry(rcode).or_default() += 1;
        }
        let answered = rcodes.iter().filter(|(rcode, _)| !rcode.starts_with("no answer")).map(|(_, n)| n).sum::<u32>();
        let counts: Vec<String> = rcodes.iter().map(|(rcode, n)| format!("{rcode}={n}")).collect();
        Ok((answered == count, counts.join(" ")))
    };
    match attempt() {
        Ok((ok, d)) => (target, ok, d),
        Err(d) => (target, false, d),
    }
}

fn vsock_connect(target: &str, send: Option<&str>, timeout: Duration) -> Outcome {
    let attempt = || -> Result<String, String> {
        let (cid, port) = target.split_once(':').ok_or("expected CID:PORT")?;
        let cid: u32 = cid.parse().map_err(|_| "bad CID")?;
        let port: u32 = port.parse().map_err(|_| "bad port")?;
        let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| format!("socket: {e}"))?;
        socket::setsockopt(&fd, socket::sockopt::SendTimeout, &timeval(timeout)).map_err(|e| format!("{e}"))?;
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeval(timeout)).map_err(|e| format!("{e}"))?;
        socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)).map_err(errno_detail)?;
        let mut stream = std::fs::File::from(fd);
        let Some(text) = send else { return Ok("connected".into()) };
        stream.write_all(text.as_bytes()).map_err(|e| format!("connected; send: {}", io_detail(&e)))?;
        let mut answer = Vec::new();
        let read = Read::by_ref(&mut stream).take(4096).read_to_end(&mut answer);
        Ok(format!(
            "connected; sent {} bytes; received {} bytes ({})",
            text.len(),
            answer.len(),
            read.map_or_else(|e| io_detail(&e), |_| "closed".into())
        ))
    };
    match attempt() {
        Ok(d) => (target.to_string(), true, d),
        Err(d) => (target.to_string(), false, d),
    }
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(i64::try_from(d.as_secs()).unwrap_or(i64::MAX), 0)
}

/// nfnetlink: batch framing and the nftables subsystem.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_DELTABLE: u16 = 2;

/// One netlink message with an nfgenmsg header (family, version 0, res_id).
fn nfnl_message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Vec<u8> {
    let len: u32 = 16 + 4;
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    m
}

fn nat_flush() -> Outcome {
    let target = "nftables".to_string();
    let attempt = || -> Result<String, String> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| format!("netlink socket: {e}"))?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("bind: {e}"))?;
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeval(Duration::from_secs(5)))
            .map_err(|e| format!("{e}"))?;
        let request = libc::NLM_F_REQUEST as u16;
        let ack = libc::NLM_F_ACK as u16;
        let mut batch = nfnl_message(NFNL_MSG_BATCH_BEGIN, request, 1, 0, NFNL_SUBSYS_NFTABLES);
        // DELTABLE with family unspec and no name deletes every table.
        batch.extend(nfnl_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE, request | ack, 2, 0, 0));
        batch.extend(nfnl_message(NFNL_MSG_BATCH_END, request, 3, 0, NFNL_SUBSYS_NFTABLES));
        socket::sendto(fd.as_raw_fd(), &batch, &NetlinkAddr::new(0, 0), socket::MsgFlags::empty())
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 4096];
        let n = socket::recv(fd.as_raw_fd(), &mut buf, socket::MsgFlags::empty()).map_err(|e| format!("recv: {e}"))?;
        // nlmsghdr (16 bytes) of type NLMSG_ERROR, then the error as an i32.
        let kind = buf.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let code = buf.get(16..20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match (n, kind, code) {
            (n, Some(k), Some(0)) if n >= 20 && k == libc::NLMSG_ERROR as u16 => Ok("every table deleted".into()),
            (n, Some(k), Some(c)) if n >= 20 && k == libc::NLMSG_ERROR as u16 => {
                Err(format!("refused: {}", io::Error::from_raw_os_error(-c)))
            }
            _ => Err(format!("unexpected answer of {n} bytes")),
        }
    };
    match attempt() {
        Ok(d) => (target, true, d),
        Err(d) => (target, false, d),
    }
}

fn tls(addr: SocketAddr, sni: &str, host: &str, path: &str, cafile: &std::path::Path, timeout: Duration) -> Outcome {
    let target = format!("{addr}/sni={sni}/host={host}");
    let attempt = || -> Result<(bool, String), String> {
        let pem = std::fs::read(cafile).map_err(|e| format!("{}: {e}", cafile.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = roots.add(cert);
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io_detail(&e))?;
        tcp.set_read_timeout(Some(timeout)).map_err(|e| io_detail(&e))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sandbox-probe\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).map_err(|e| format!("handshake or send: {}", io_detail(&e)))?;
        let issuer = tls
            .conn
            .peer_certificates()
            .and_then(<[_]>::first)
            .map_or_else(|| "certificate: none".into(), |c| guest_proxies::cert::describe(c));
        let mut head = Vec::new();
        let _ = Read::by_ref(&mut tls).take(64 * 1024).read_to_end(&mut head);
        let text = String::from_utf8_lossy(&head);
        let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(((200..400).contains(&status), format!("status={status}; {issuer}")))
    };
    match attempt() {
        Ok((ok, d)) => (target, ok, d),
        Err(d) => (target, false, d),
    }
}

fn listen(tcp: Option<u16>, vsock: Option<u32>, until_eof: bool, timeout: Duration) -> Outcome {
    let mut target = Vec::new();
    let mut attempt = || -> Result<String, String> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Some(port) = tcp {
            target.push(format!("tcp:{port}"));
            let l = TcpListener::bind((IpAddr::from([0, 0, 0, 0]), port)).map_err(|e| format!("tcp {port}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            fds.push(OwnedFd::from(l));
        }
        if let Some(port) = vsock {
            target.push(format!("vsock:{port}"));
            let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)
                .map_err(|e| format!("vsock socket: {e}"))?;
            socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
                .map_err(|e| format!("vsock {port}: {e}"))?;
            socket::listen(&fd, socket::Backlog::new(16).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            fds.push(fd);
        }
        let deadline = Instant::now() + timeout;
        let mut accepted = 0u32;
        let stdin = io::stdin();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut polls: Vec<nix::poll::PollFd> =
                fds.iter().map(|fd| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)).collect();
            if until_eof {
                polls.push(nix::poll::PollFd::new(stdin.as_fd(), nix::poll::PollFlags::POLLIN));
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut polls, nix::poll::PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready: Vec<bool> = polls.iter().map(|p| p.any().unwrap_or(false)).collect();
            if until_eof && ready.get(fds.len()).copied().unwrap_or(false) {
                let mut buf = [0u8; 256];
                if matches!(stdin.lock().read(&mut buf), Ok(0) | Err(_)) {
                    break;
                }
            }
            for (fd, ready) in fds.iter().zip(ready) {
                if ready {
                    if let Ok(conn) = socket::accept(fd.as_raw_fd()) {
                        accepted += 1;
                        // SAFETY: accept returned a new descriptor that nothing else owns.
                        drop(unsafe { OwnedFd::from_raw_fd(conn) });
                    }
                }
            }
        }
        Ok(format!("accepted={accepted}"))
    };
    let result = attempt();
    let target = if target.is_empty() { "nothing".to_string() } else { target.join(",") };
    match result {
        // "ok" here means the listener ran; the count says whether anyone came.
        Ok(d) => (target, true, d),
        Err(d) => (target, false, d),
    }
}

fn io_detail(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => format!("refused: {e}"),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => format!("timeout: {e}"),
        io::ErrorKind::ConnectionReset => format!("reset: {e}"),
        _ => e.to_string(),
    }
}

fn errno_detail(e: nix::errno::Errno) -> String {
    io_detail(&io::Error::from(e))
}
