//! `fetch` against servers the test starts on 127.0.0.1: statuses, bodies,
//! framing, certificate checks and every failure's exit code.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

use net::fixtures::{HttpsUpstream, TestCa};

fn fetch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fetch")).args(args).env_remove("SSL_CERT_FILE").output().unwrap()
}

/// A plain HTTP server answering one connection with `response`.
fn serve_once(response: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(response);
    });
    port
}

#[test]
fn https_with_the_right_root_works_and_an_unknown_issuer_is_35() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fetch test CA").unwrap();
    let ca_file = ca.write_pem(dir.path(), "ca.pem").unwrap();
    let upstream = rt.block_on(HttpsUpstream::start(&ca, &["localhost"])).unwrap();
    let url = format!("https://localhost:{}/hello", upstream.addr().port());
    let o = fetch(&["-s", "--cacert", ca_file.to_str().unwrap(), &url]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hello localhost"));

    let other = TestCa::new("someone else").unwrap();
    let other_file = other.write_pem(dir.path(), "other.pem").unwrap();
    let o = fetch(&["-s", "--cacert", other_file.to_str().unwrap(), &url]);
    assert_eq!(o.status.code(), Some(35), "{}", String::from_utf8_lossy(&o.stderr));

    let post = format!("https://localhost:{}/echo", upstream.addr().port());
    let o = fetch(&["-s", "--cacert", ca_file.to_str().unwrap(), "-d", "posted body", &post]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "posted body");
}

#[test]
fn error_statuses_are_22_with_the_body_and_chunked_bodies_are_decoded() {
    let port = serve_once(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 9\r\n\r\nforbidden");
    let o = fetch(&["-s", &format!("http://127.0.0.1:{port}/")]);
    assert_eq!(o.status.code(), Some(22));
    assert_eq!(o.stdout, b"forbidden");
    let port =
        serve_once(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let o = fetch(&["-s", "-w", &format!("http://127.0.0.1:{port}/")]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello world200\n");
}

#[test]
fn failures_have_curls_exit_codes_and_never_panic() {
    // Refused: a port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    assert_eq!(fetch(&[&format!("http://127.0.0.1:{port}/")]).status.code(), Some(7));
    // A server that never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    assert_eq!(fetch(&["--max-time", "1", &format!("http://127.0.0.1:{port}/")]).status.code(), Some(28));
    // Garbage instead of HTTP, and a body cut short.
    let port = serve_once(b"\x00\x01garbage\r\n\r\n");
    let o = fetch(&[&format!("http://127.0.0.1:{port}/")]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let port = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort");
    assert_eq!(fetch(&[&format!("http://127.0.0.1:{port}/")]).status.code(), Some(18));
    // Usage errors.
    assert_eq!(fetch(&["ftp://example.invalid/"]).status.code(), Some(2));
    assert_eq!(fetch(&["-H", "no colon", "http://127.0.0.1:1/"]).status.code(), Some(2));
    drop(silent);
}

#[test]
fn sha256_resolve_and_show_cert() {
    use sha2::Digest;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fetch digest CA").unwrap();
    let ca_file = ca.write_pem(dir.path(), "ca.pem").unwrap();
    let upstream = rt.block_on(HttpsUpstream::start(&ca, &["named.test"])).unwrap();
    let port = upstream.addr().port();
    let url = format!("https://named.test:{port}/bytes/300000");
    let resolve = format!("named.test:{port}:127.0.0.1");
    let out_file = dir.path().join("body");
    let o = fetch(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &resolve,
        "--sha256",
        "--show-cert",
        "-o",
        out_file.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let body = std::fs::read(&out_file).unwrap();
    let expected: String = sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(body.len(), 300_000);
    assert!(stderr.contains(&format!("sha256={expected} bytes=300000 seconds=")), "{stderr}");
    assert!(stderr.contains("; issuer=CN=fetch digest CA"), "{stderr}");
    // Without --resolve the test name does not resolve; a bad entry is a usage error.
    assert_eq!(fetch(&["--cacert", ca_file.to_str().unwrap(), &url]).status.code(), Some(6));
    assert_eq!(fetch(&["--resolve", "named.test:x:127.0.0.1", &url]).status.code(), Some(2));
}
