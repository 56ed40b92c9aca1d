//! Upstream connections through a real HTTP proxy started on loopback
//! (Debian's `tinyproxy`, which `./test.sh` installs): inspected, passthrough
//! and tcp connections all go through `CONNECT`, and the proxy's own log
//! shows each tunnel.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{echo_server, modes_profile, Harness};
use hickory_proto::rr::RecordType;
use http_body_util::BodyExt;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use net::fixtures::{dns_query, empty_body, Guest};
use net::UpstreamProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// tinyproxy on a free loopback port, logging every request to `dir/proxy.log`.
struct Tinyproxy {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Tinyproxy {
    fn start(dir: &Path) -> Tinyproxy {
        assert!(
            Path::new("/usr/bin/tinyproxy").exists(),
            "this test needs Debian's tinyproxy (apt-get install tinyproxy; ./test.sh installs it)"
        );
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let log = dir.join("proxy.log");
        let config = dir.join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "Port {}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 50\nAllow 127.0.0.1\nPidFile \"{}\"\n",
                addr.port(),
                log.display(),
                dir.join("tinyproxy.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/tinyproxy")
            .args(["-d", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tinyproxy { child, addr, log }
    }

    fn connects(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split("): ").nth(1))
            .filter(|r| r.starts_with("CONNECT "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inspected HTTPS, passthrough and tcp mode, each through the proxy.
#[tokio::test]
async fn every_mode_goes_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Tinyproxy::start(dir.path());
    let (echo_addr, _) = echo_server().await;
    let proxy_addr = proxy.addr.to_string();
    let h = Harness::start_with_profile(
        |config| {
            config.allowed_networks = vec!["127.0.0.0/24".parse().unwrap()];
            config.upstream_proxy = Some(UpstreamProxy { address: proxy_addr, credentials: None });
        },
        &modes_profile(echo_addr.port()),
    )
    .await;
    let upstream = h.upstream_addr();

    // Inspected.
    let mut sender = h.guest.http1("a.test", upstream).await.unwrap();
    let response =
        sender.send_request(Request::get("/hello").header(HOST, "a.test").body(empty_body()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"hello a.test"), "{body:?}");

    // Passthrough, with a client that trusts only the upstream's CA.
    dns_query(&h.dns_socket(), "pinned.test.", RecordType::A).await.unwrap();
    let pinning = Guest::new(&h.mitm_socket(), h.upstream_ca.cert_pem()).unwrap();
    let mut sender = pinning.http1("pinned.test", upstream).await.unwrap();
    let response = sender
        .send_request(Request::get("/hello").header(HOST, "pinned.test").body(empty_body()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // tcp.
    dns_query(&h.dns_socket(), "ssh.test.", RecordType::A).await.unwrap();
    let mut stream = h.guest.connect(echo_addr).await.unwrap();
    // tinyproxy ends a tunnel at the first half-close, so read the echo
    // before closing.
    stream.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let mut back = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"SSH-2.0-test\r\n");
    drop(stream);

    let connects = proxy.connects();
    eprintln!("tinyproxy saw: {connects:#?}");
    for target in [upstream.to_string(), echo_addr.to_string()] {
        assert!(
            connects.iter().any(|c| c.starts_with(&format!("CONNECT {target} "))),
            "no CONNECT {target} in {connects:?}"
        );
    }
    assert!(connects.len() >= 3, "{connects:?}");
    h.shutdown().await;
}

/// A proxy that refuses the tunnel: the guest gets 502 and the row says why.
#[tokio::test]
async fn a_refused_tunnel_is_a_502_naming_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Tinyproxy::start(dir.path());
    let proxy_addr = proxy.addr.to_string();
    let h = Harness::start_with(|config| {
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        config.upstream_proxy = Some(UpstreamProxy { address: proxy_addr, credentials: None });
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut sender = h.guest.http1("down.test", SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let response =
        sender.send_request(Request::get("/").header(HOST, "down.test").body(empty_body()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(body.contains("upstream proxy") && body.contains("CONNECT refused"), "{body}");
    h.shutdown().await;
}
