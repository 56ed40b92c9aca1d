//! `sandbox-probe` against servers the test starts on 127.0.0.1: one line per
//! attempt, `ok` only when the attempt got through. (`nat-flush` and vsock
//! targets are exercised inside a guest by the end-to-end suites: on a host
//! they would touch the host's own firewall and vsock.)
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Command, Output, Stdio};

use net::fixtures::{HttpsUpstream, TestCa, TestDns};

fn probe(args: &[&str]) -> (i32, String) {
    let Output { status, stdout, .. } = Command::new(env!("CARGO_BIN_EXE_sandbox-probe")).args(args).output().unwrap();
    let out = String::from_utf8(stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "exactly one line: {out:?}");
    (status.code().unwrap(), out.trim_end().to_string())
}

#[test]
fn tcp_and_udp_report_connections_and_refusals() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (code, line) = probe(&["tcp-connect", &addr]);
    assert_eq!(code, 0);
    assert!(line.starts_with(&format!("tcp-connect {addr} ok connected from 127.0.0.1:")), "{line}");
    drop(listener);
    let (code, line) = probe(&["tcp-connect", &addr]);
    assert_eq!(
        (code, line.as_str()),
        (1, format!("tcp-connect {addr} fail refused: Connection refused (os error 111)").as_str())
    );

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, from) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(b"pong", from).unwrap();
    });
    let (code, line) = probe(&["udp", &udp_addr.to_string()]);
    assert_eq!((code, line), (0, format!("udp {udp_addr} ok answer of 4 bytes")));
    let (code, line) = probe(&["--timeout", "1", "udp", &addr]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains(" fail "), "{line}");
}

#[test]
fn dns_is_ok_only_with_an_answer() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt.block_on(TestDns::start(&[("a.test", IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))])).unwrap();
    let server = dns.addr().to_string();
    let (code, line) = probe(&["dns", "a.test", "--server", &server]);
    assert_eq!((code, line.as_str()), (0, "dns a.test/A ok rcode=No Error answers=[192.0.2.7]"));
    let (code, line) = probe(&["dns", "nx.test", "--server", &server]);
    assert_eq!(code, 1);
    assert!(line.starts_with("dns nx.test/A fail rcode=Non-Existent Domain"), "{line}");
    let (code, line) = probe(&["dns", "a.test", "--type", "AAAA", "--server", &server]);
    assert_eq!(code, 1, "no AAAA record: {line}");
    assert_eq!(probe(&["dns", "a.test", "--type", "BOGUS", "--server", &server]).0, 1);
    drop(dns);
}

#[test]
fn tls_verifies_names_the_issuer_and_sends_the_host_header_given() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("probe test CA").unwrap();
    let ca_file = ca.write_pem(dir.path(), "ca.pem").unwrap();
    let upstream = rt.block_on(HttpsUpstream::start(&ca, &["good.test"])).unwrap();
    let addr = upstream.addr().to_string();
    let cafile = ca_file.to_str().unwrap();
    let (code, line) = probe(&["tls", &addr, "--sni", "good.test", "--path", "/hello", "--cafile", cafile]);
    assert_eq!(code, 0, "{line}");
    assert!(line.contains("issuer=CN=probe test CA"), "{line}");
    let (code, line) = probe(&[
        "tls",
        &addr,
        "--sni",
        "good.test",
        "--host",
        "other.test",
        "--path",
        "/status/403",
        "--cafile",
        cafile,
    ]);
    assert_eq!(code, 1);
    assert!(line.starts_with(&format!("tls {addr}/sni=good.test/host=other.test fail status=403")), "{line}");
    let other = TestCa::new("someone else").unwrap().write_pem(dir.path(), "other.pem").unwrap();
    let (code, line) = probe(&["tls", &addr, "--sni", "good.test", "--cafile", other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(line.contains("UnknownIssuer"), "{line}");
}

#[test]
fn listen_counts_connections_and_stops_at_end_of_input() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox-probe"))
        .args(["--timeout", "60", "listen", "--tcp", &port.to_string(), "--until-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut connected = 0;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            connected += 1;
            if connected == 2 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(connected, 2);
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.stdin.take().unwrap().write_all(b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), format!("listen tcp:{port} ok accepted=2"));
}
