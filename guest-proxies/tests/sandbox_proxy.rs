//! The `sandbox-proxy` program as init starts it: its three listening
//! sockets bound beforehand and passed at descriptors 3 to 5, the pipe it
//! says it serves on at 6, fake host handlers on Unix sockets standing in
//! for vsock.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

const PROGRAM: &str = env!("CARGO_BIN_EXE_sandbox-proxy");
const WAIT: Duration = Duration::from_secs(20);

/// `cmd` with `fds` at descriptors 3 to 6 (`None`: closed there).
fn with_descriptors(cmd: &mut Command, fds: [Option<RawFd>; 4]) {
    // SAFETY: dup2 and close are async-signal-safe; the sources stay open in
    // the parent until the child has been spawned, and are at 10 or above
    // (see `above`), so no move overwrites a source.
    unsafe {
        cmd.pre_exec(move || {
            for (to, from) in (3..).zip(fds) {
                match from {
                    Some(from) if libc::dup2(from, to) < 0 => return Err(std::io::Error::last_os_error()),
                    Some(_) => {}
                    // Not open there is what is wanted: the result is moot.
                    None => _ = libc::close(to),
                }
            }
            Ok(())
        });
    }
}

/// A copy of `fd` at descriptor 10 or above, clear of 3 to 6.
fn above(fd: impl Into<OwnedFd>) -> OwnedFd {
    let fd: OwnedFd = fd.into();
    let copy = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)).unwrap();
    // SAFETY: fcntl just returned this new descriptor.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(copy) }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_dns_and_connections_on_the_sockets_init_bound() {
    let dir = tempfile::tempdir().unwrap();
    let dns_host = UnixListener::bind(dir.path().join("dns.sock")).unwrap();
    let net_host = UnixListener::bind(dir.path().join("net.sock")).unwrap();
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let dns_tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let net = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let (udp_addr, net_addr) = (udp.local_addr().unwrap(), net.local_addr().unwrap());

    // A connection made before the program runs waits in the listener.
    let mut early = TcpStream::connect(net_addr).unwrap();
    early.write_all(b"sent before the proxy ran").unwrap();
    early.shutdown(std::net::Shutdown::Write).unwrap();

    let (mut ready, ready_tx) = std::io::pipe().unwrap();
    let fds = [above(udp), above(dns_tcp), above(net), above(ready_tx)];
    let mut cmd = Command::new(PROGRAM);
    cmd.arg("--inherited-sockets")
        .arg(format!("--dns-upstream=unix:{}", dir.path().join("dns.sock").display()))
        .arg(format!("--net-upstream=unix:{}", dir.path().join("net.sock").display()))
        .stdout(Stdio::null());
    with_descriptors(&mut cmd, fds.each_ref().map(|fd| Some(fd.as_raw_fd())));
    let _proxy = Running(cmd.spawn().unwrap());
    drop(fds);
    // It says when it serves, once.
    let mut said = Vec::new();
    ready.read_to_end(&mut said).unwrap();
    assert_eq!(said, b"r");

    // net-proxy: the early connection reaches the host with its header.
    let (host_side, _) = net_host.accept().unwrap();
    host_side.set_read_timeout(Some(WAIT)).unwrap();
    let mut host_side = BufReader::new(host_side);
    let mut header = String::new();
    host_side.read_line(&mut header).unwrap();
    let client_port = early.local_addr().unwrap().port();
    assert_eq!(header, format!("PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}\r\n", net_addr.port()));
    let mut data = String::new();
    host_side.read_to_string(&mut data).unwrap();
    assert_eq!(data, "sent before the proxy ran");

    // dns-proxy: a UDP query goes to the host framed, and its answer comes back.
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut query = Message::new(0x5150, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(Name::from_ascii("inherited.test.").unwrap(), RecordType::A));
    client.send_to(&query.to_vec().unwrap(), udp_addr).unwrap();
    let (mut dns_side, _) = dns_host.accept().unwrap();
    dns_side.set_read_timeout(Some(WAIT)).unwrap();
    let mut len = [0; 2];
    dns_side.read_exact(&mut len).unwrap();
    let mut framed = vec![0; usize::from(u16::from_be_bytes(len))];
    dns_side.read_exact(&mut framed).unwrap();
    let asked = Message::from_vec(&framed).unwrap();
    assert_eq!(asked.queries[0].name().to_ascii(), "inherited.test.");
    let mut answer = Message::response(asked.metadata.id, OpCode::Query);
    answer.add_queries(asked.queries.iter().cloned());
    let answer = answer.to_vec().unwrap();
    dns_side.write_all(&(answer.len() as u16).to_be_bytes()).unwrap();
    dns_side.write_all(&answer).unwrap();
    let mut buf = [0; 512];
    let got = client.recv(&mut buf).unwrap();
    let got = Message::from_vec(&buf[..got]).unwrap();
    assert_eq!(got.metadata.id, 0x5150);
    assert_eq!(got.metadata.message_type, MessageType::Response);
}

#[test]
fn started_without_the_sockets_it_says_so_and_exits() {
    let mut cmd = Command::new(PROGRAM);
    cmd.arg("--inherited-sockets");
    with_descriptors(&mut cmd, [None; 4]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("descriptor 3 is not open"), "{stderr}");

    // A socket of the wrong kind at a descriptor is refused too.
    let stream = above(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let mut cmd = Command::new(PROGRAM);
    cmd.arg("--inherited-sockets");
    with_descriptors(&mut cmd, [Some(stream.as_raw_fd()), None, None, None]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected Datagram"), "{stderr}");
}
