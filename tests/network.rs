//! End to end, one boot: the guest's network reaches the host handlers and
//! only what the profile allows gets out, also when guest root tries to get
//! past them. A local HTTPS upstream (own test CA) and a local DNS server
//! stand in for the internet; nothing leaves this machine. Needs /dev/kvm and
//! ./setup.sh's artefacts (the default image, and the same `fetch` binary
//! built for the host, for the throughput comparison).
//!
//! `SANDBOX_E2E_DOWNLOAD_MB` sets the size of the large download (default
//! 100; where guest kernel code is emulated the guest receives it at a few
//! hundred KB/s, so it takes minutes there).
//!
//! Without /dev/kvm or ./setup.sh's artefacts it skips, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use net::fixtures::{HttpsUpstream, TestCa, TestDns};
use sandbox::{Command, Image, NetConfig, Sandbox, Status};

/// The "internet" address of the test names: a loopback address of its own,
/// so that port 443 is free on it.
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 83, 0, 1);

const PROFILE: &str = r#"
[security.rules.dns.test_names]
on = "dns.request"
if = 'dns.request.qname.endsWith(".test")'
decision = "allow"

[security.rules.http.allowed]
on = "http.request"
if = 'http.request.host in ["allowed.test", "loop.test"]'
decision = "allow"
priority = 10

[security.rules.http.no_post]
on = "http.request"
if = 'http.request.host == "allowed.test" && http.request.method == "POST"'
decision = "block"
priority = 5

[security.rules.http.responses]
on = "http.response"
if = 'http.request.host == "allowed.test"'
decision = "allow"

[security.rules.tcp.pinned]
on = "tcp.connect"
if = 'tcp.connect.host == "pinned.test"'
decision = "allow"
mode = "passthrough"

# git.test and models.test answer with addresses outside the guest's
# loopback, so connections to them leave through dummy0.
[security.rules.dns.git_answer]
on = "dns.request"
if = 'dns.request.qname == "git.test"'
decision = "rewrite"
answer = { ttl = 60, a = ["198.51.100.22"] }

[security.rules.dns.models_answer]
on = "dns.request"
if = 'dns.request.qname == "models.test"'
decision = "rewrite"
answer = { ttl = 60, a = ["198.51.100.80"] }

[security.rules.tcp.git_ssh]
on = "tcp.connect"
if = 'tcp.connect.host == "git.test" && tcp.connect.port == 22'
decision = "allow"
mode = "tcp"

[security.rules.tcp.models]
on = "tcp.connect"
if = 'tcp.connect.host == "models.test" && tcp.connect.port == 8080'
decision = "allow"
mode = "http"

[security.rules.http.models]
on = "http.request"
if = 'http.request.host == "models.test" && http.request.port == 8080 && !http.request.path.startsWith("/admin")'
decision = "allow"

[security.rules.http.models_responses]
on = "http.response"
if = 'http.request.host == "models.test"'
decision = "allow"
"#;

/// Everything runs in one guest. DNS goes through musl's resolver (fetch) and
/// sandbox-probe, each sending one query per name and type (`attempts:1`), so
/// that session.db's counts are exact. `$MB` is the large download's size.
const SCRIPT: &str = r#"
printf 'nameserver 10.0.0.1\noptions attempts:1 timeout:30\n' > /etc/resolv.conf
check() { echo "$1=$2"; }
body=$(fetch -s https://allowed.test/hello); check allowed $?; echo "body=$body"
fetch -s --show-cert -o /dev/null https://allowed.test/hello 2>&1 | grep '^certificate:'
sandbox-probe tls 127.83.0.1:443 --sni allowed.test --path /hello --cafile /usr/local/share/ca-certificates/sandbox-ca.crt
printf 'GET /hello HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n' > /tmp/request
openssl s_client -quiet -verify_return_error -connect allowed.test:443 -servername allowed.test < /tmp/request > /tmp/openssl.out 2>&1
check openssl $?; echo "openssl_body=$(tail -n 1 /tmp/openssl.out)"
fetch -s https://other.test/hello >/dev/null; check other $?
fetch -s -X POST -d data https://allowed.test/echo >/dev/null; check post $?
sandbox-probe dns nx.test
sandbox-probe dns blocked.example
sandbox-probe dns meta.test
sandbox-probe dns loop.test
fetch -s --max-time 10 https://meta.test/ >/dev/null 2>&1; check metadata $?
fetch -s --max-time 10 http://allowed.test/ >/dev/null 2>&1; check port80 $?
fetch -s --max-time 10 https://allowed.test:8443/ >/dev/null 2>&1; check port8443 $?
fetch -s --max-time 10 http://10.0.0.2/ >/dev/null 2>&1; check dummy_port80 $?
fetch -s --max-time 10 https://10.0.0.2:8443/ >/dev/null 2>&1; check literal_ip $?
echo "links=$(ls /sys/class/net | tr '\n' ' ')"
ip -4 addr show dummy0 | grep -o 'inet [0-9./]*'
echo "cert_env=$SSL_CERT_FILE $REQUESTS_CA_BUNDLE $CURL_CA_BUNDLE $NODE_EXTRA_CA_CERTS"
echo "sandbox_ca=$(grep -v -e '-----' /usr/local/share/ca-certificates/sandbox-ca.crt | tr -d '\n')"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
grep -q ' 0100007F:041D 00000000:0000 07 ' /proc/net/udp; check udp1053 $?
grep -q ' 0100007F:041D 00000000:0000 0A ' /proc/net/tcp; check tcp1053 $?
grep -q ' 0100007F:28CB 00000000:0000 0A ' /proc/net/tcp; check tcp10443 $?
sandbox-probe dns allowed.test --server 192.0.2.53:53 >/dev/null; check dns_any_address $?
grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt
fetch -s --sha256 -o /dev/null https://allowed.test/bytes/$((MB * 1048576)) 2>&1 | grep '^sha256='
# Guest root tries to get out.
sandbox-probe tls 127.0.0.1:10443 --sni allowed.test --path /hello
sandbox-probe tls 10.0.0.2:443 --sni allowed.test --path /hello
sandbox-probe tls 127.83.0.1:443 --sni allowed.test --host other.test --path /hello
sandbox-probe tls 127.83.0.1:443 --sni loop.test --path /hello
for port in 5000 5001 22 1234; do sandbox-probe vsock-connect 2:$port; done
sandbox-probe --timeout 3 vsock-connect 4:5002
sandbox-probe vsock-connect 2:5002 --send 'GARBAGE NOT A PROXY LINE'
# Passthrough: a client that trusts only the upstream's own CA, once the
# address is bound to pinned.test; then a DNS flood under a blocked domain.
printf '%s\n' "$UPSTREAM_CA" > /tmp/upstream-ca.pem
sandbox-probe dns pinned.test >/dev/null
sandbox-probe tls 127.83.0.1:443 --sni pinned.test --path /hello --cafile /tmp/upstream-ca.pem
sandbox-probe dns-flood flood.example --count 300
sandbox-probe dns allowed.test
# Other ports reach the host too: git over ssh (tcp mode) by name, the same
# port on an address no DNS answer gave, and a local model server on plain
# HTTP (http mode) with a blocked path.
sandbox-probe dns git.test >/dev/null
sandbox-probe tcp-connect 198.51.100.22:22 --send SSH-2.0-sandbox-probe
sandbox-probe tcp-connect 198.51.100.99:22 --send SSH-2.0-literal
body=$(fetch -s http://models.test:8080/api/generate); check models $?; echo "models_body=$body"
fetch -s http://models.test:8080/admin/keys >/dev/null; check models_admin $?
kill $(pidof sandbox-proxy); fetch -s https://allowed.test/hello >/dev/null; check during_restart $?
pidof sandbox-proxy >/dev/null; check proxy_restarted $?
kill -9 $(pidof sandbox-proxy)
sandbox-probe --timeout 3 tcp-connect 127.83.0.1:80
sleep 2
sandbox-probe nat-flush
sandbox-probe --timeout 3 tcp-connect 10.0.0.2:443
sandbox-probe --timeout 3 dns allowed.test --server 10.0.0.2:53
sandbox-probe --timeout 3 udp 10.0.0.2:53
fetch -s --max-time 5 https://allowed.test/hello >/dev/null 2>&1; check after_flush $?
"#;

/// Forward `listen` to `target` (the fixture upstream listens on a random
/// port), counting the connections: every one of them reached "the internet".
async fn forward(listen: SocketAddr, target: SocketAddr, count: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// An ssh server stand-in on `listen`: echoes what it gets, counting connections.
async fn echo(listen: SocketAddr, count: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    })
}

/// A local model server stand-in on `listen`, plain HTTP: every request gets
/// `200 model says hi` and is counted.
async fn plain_http(listen: SocketAddr, count: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                count.fetch_add(1, Ordering::SeqCst);
                let body = "model says hi";
                let response =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    })
}

/// The SHA-256 of the fixture's `/bytes/<n>` body, and `fetch` run on the host.
fn host_fetch(args: &[&str]) -> std::process::Output {
    // Where ./setup.sh built it: the target directory this test was built in.
    let target = option_env!("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let fetch = target.join("x86_64-unknown-linux-musl/guest/fetch");
    assert!(fetch.is_file(), "{} is missing: run ./setup.sh (rootfs/build-default.sh builds it)", fetch.display());
    std::process::Command::new(fetch).args(args).output().unwrap()
}

/// `sha256=<hex> bytes=<n> seconds=<s>` -> (hex, bytes, seconds).
fn digest_line(text: &str) -> (String, u64, f64) {
    let line = text.lines().find(|l| l.starts_with("sha256=")).unwrap_or_else(|| panic!("no digest in {text:?}"));
    let field = |name: &str| line.split(' ').find_map(|f| f.strip_prefix(name)).unwrap().to_string();
    (field("sha256="), field("bytes=").parse().unwrap(), field("seconds=").parse().unwrap())
}

#[test]
fn the_guest_reaches_what_the_profile_allows_and_nothing_else() {
    common::require_vm!();
    // The runtime's warnings (the VMM's refusals among them), collected.
    let log = common::SharedBuf::default();
    let writer = log.clone();
    let _ =
        tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_writer(move || writer.clone()).try_init();
    let mb: u64 = std::env::var("SANDBOX_E2E_DOWNLOAD_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("sandbox e2e upstream CA").unwrap();
    let ca_file = ca.write_pem(dir.path(), "upstream-ca.pem").unwrap();
    let upstream_connections = Arc::new(AtomicU64::new(0));
    let forged_port_connections = Arc::new(AtomicU64::new(0));
    let ssh_connections = Arc::new(AtomicU64::new(0));
    let model_requests = Arc::new(AtomicU64::new(0));
    // The upstream's port 80, which the guest tries directly once its proxies
    // are dead: only a connection counted here would prove that it got out.
    let direct_connections = Arc::new(AtomicU64::new(0));
    let (upstream, dns, _forwarders) = rt.block_on(async {
        let upstream =
            HttpsUpstream::start(&ca, &["allowed.test", "other.test", "meta.test", "loop.test", "pinned.test"])
                .await
                .unwrap();
        let dns = TestDns::start(&[
            ("allowed.test", IpAddr::V4(UPSTREAM_IP)),
            ("other.test", IpAddr::V4(UPSTREAM_IP)),
            ("meta.test", IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))),
            ("loop.test", IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ("pinned.test", IpAddr::V4(UPSTREAM_IP)),
            ("git.test", IpAddr::V4(UPSTREAM_IP)),
            ("models.test", IpAddr::V4(UPSTREAM_IP)),
        ])
        .await
        .unwrap();
        let fwd =
            forward(SocketAddr::from((UPSTREAM_IP, 443)), upstream.addr(), Arc::clone(&upstream_connections)).await;
        // The same upstream on the port a guest connecting to net-proxy's own
        // port announces: no rule names it, so nothing may arrive here.
        let forged =
            forward(SocketAddr::from((UPSTREAM_IP, 10443)), upstream.addr(), Arc::clone(&forged_port_connections))
                .await;
        let direct =
            forward(SocketAddr::from((UPSTREAM_IP, 80)), upstream.addr(), Arc::clone(&direct_connections)).await;
        let ssh = echo(SocketAddr::from((UPSTREAM_IP, 22)), Arc::clone(&ssh_connections)).await;
        let models = plain_http(SocketAddr::from((UPSTREAM_IP, 8080)), Arc::clone(&model_requests)).await;
        (upstream, dns, (fwd, forged, direct, ssh, models))
    });
    let profile = dir.path().join("profile.toml");
    std::fs::write(&profile, PROFILE).unwrap();

    let mut net = NetConfig::default();
    net.dns_servers = vec![dns.addr()];
    net.extra_root_files = vec![ca_file.clone()];
    net.allowed_networks = vec![format!("{UPSTREAM_IP}/32").parse().unwrap()];
    net.system_roots = false;
    // Where guest kernel code is emulated, a loaded machine can take longer
    // than the default 10 s between a guest's connect and its ClientHello.
    net.handshake_timeout = Duration::from_secs(120);
    let run = Sandbox::builder(Image::Default)
        .memory_mib(256)
        .warm()
        .holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
        .profile(profile.to_str().unwrap())
        .net_config(net)
        .run(
            Command::new("/bin/sh")
                .args(["-c", SCRIPT])
                .env("MB", mb.to_string())
                .env("UPSTREAM_CA", ca.cert_pem())
                .timeout(Duration::from_secs(3600 + 60 * mb)),
        )
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!(
        "boot: {:?}, whole run: {:?}\n--- stdout ---\n{out}--- stderr ---\n{}",
        run.boot_time,
        run.total_time,
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.status, Status::Exited(0));
    let expect = |line: &str| assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
    let expect_prefix =
        |prefix: &str| assert!(out.lines().any(|l| l.starts_with(prefix)), "no line starting {prefix:?} in:\n{out}");
    let line_starting = |prefix: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
            .to_string()
    };
    expect("allowed=0");
    expect("body=hello allowed.test HTTP/1.1");
    // The guest sees a certificate issued by the sandbox's own CA, whose
    // certificate is the sandbox's ca.pem, and trusts it through the system
    // bundle (fetch, OpenSSL) and through the CA's own file (probe).
    let ca_cert =
        std::fs::read_to_string(run.session_db.with_file_name(guest_protocol::sandbox_dir::CA_CERT_FILE)).unwrap();
    assert!(!ca_cert.contains("PRIVATE KEY"), "the key of the sandbox's CA left its process");
    let ca_body: String = ca_cert.lines().filter(|l| !l.starts_with("-----")).collect();
    expect(&format!("sandbox_ca={ca_body}"));
    expect(&format!("hostname={}", run.id));
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_cert.as_bytes()).unwrap();
    let sandbox_ca_subject = ca_pem.parse_x509().unwrap().subject().to_string();
    let issuer = line_starting("certificate:");
    assert!(
        issuer.ends_with(&format!("; issuer={sandbox_ca_subject}")),
        "{issuer} is not issued by {sandbox_ca_subject}"
    );
    let second = line_starting("tls 127.83.0.1:443/sni=allowed.test/host=allowed.test ");
    assert!(
        second.contains(" ok status=200; ") && second.ends_with(&format!("; issuer={sandbox_ca_subject}")),
        "{second}"
    );
    // A second TLS stack, OpenSSL's s_client, verifying against its default store.
    expect("openssl=0");
    expect("openssl_body=hello allowed.test HTTP/1.1");
    expect("other=22"); // 403 from the MITM: no rule allows other.test
    expect("post=22"); // 403: blocked by the method rule
    expect_prefix("dns nx.test/A fail rcode=Non-Existent Domain");
    expect_prefix("dns blocked.example/A fail rcode=Non-Existent Domain");
    expect_prefix("dns meta.test/A fail rcode=Non-Existent Domain");
    expect_prefix("dns loop.test/A fail rcode=Non-Existent Domain");
    expect("metadata=6");
    // allowed.test's address is the guest's own loopback: refused there.
    for refused in ["port80=7", "port8443=7"] {
        expect(refused);
    }
    // 10.0.0.2 leaves through dummy0 to the host, which refuses an address no
    // DNS answer gave (the connection closes: no HTTP or TLS answer).
    for blocked in ["dummy_port80=", "literal_ip="] {
        let line = line_starting(blocked);
        assert!(!line.ends_with("=0"), "{line}");
    }
    expect("links=dummy0 lo ");
    expect("inet 10.0.0.1/24");
    expect("cert_env=/etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates/sandbox-ca.crt");
    for listening in ["udp1053=0", "tcp1053=0", "tcp10443=0", "dns_any_address=0"] {
        expect(listening);
    }

    // The large download arrived whole, and the same client on the host fetches
    // the same body from the same upstream (through the same forwarder) directly.
    let expected_digest = {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for chunk in net::fixtures::pattern_chunks(mb * 1_048_576) {
            hash.update(&chunk);
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (guest_digest, guest_bytes, guest_secs) = digest_line(&out);
    assert_eq!((guest_digest.as_str(), guest_bytes), (expected_digest.as_str(), mb * 1_048_576));
    let host = host_fetch(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &format!("allowed.test:443:{UPSTREAM_IP}"),
        "--sha256",
        "-o",
        "/dev/null",
        &format!("https://allowed.test/bytes/{}", mb * 1_048_576),
    ]);
    let (host_digest, _, host_secs) = digest_line(&String::from_utf8_lossy(&host.stderr));
    assert_eq!(host_digest, expected_digest);
    let (guest_rate, host_rate) = (mb as f64 / guest_secs, mb as f64 / host_secs);
    eprintln!(
        "download of {mb} MB with fetch: guest through the MITM {guest_rate:.3} MB/s ({guest_secs:.1} s), \
         host directly {host_rate:.1} MB/s ({host_secs:.2} s), ratio {:.5}",
        guest_rate / host_rate
    );

    // Guest root's attempts to get out.
    // Straight to net-proxy's port: the host sees destination port 10443,
    // which no rule names (the allowed.test rule allows 443 only).
    // It is not even an address the sandbox resolved: blocked by tcp.connect.
    let forged_port = line_starting("tls 127.0.0.1:10443/sni=allowed.test/host=allowed.test ");
    assert!(forged_port.contains(" fail "), "{forged_port}");
    assert_eq!(forged_port_connections.load(Ordering::SeqCst), 0, "the upstream was reached on port 10443");
    // A literal address on 443 no DNS answer gave: blocked before TLS.
    let literal = line_starting("tls 10.0.0.2:443/sni=allowed.test/host=allowed.test ");
    assert!(literal.contains(" fail ") && !literal.contains("status=200"), "{literal}");
    let fronting = line_starting("tls 127.83.0.1:443/sni=allowed.test/host=other.test ");
    assert!(fronting.contains(" fail status=403"), "{fronting}");
    let rebinding = line_starting("tls 127.83.0.1:443/sni=loop.test/host=loop.test ");
    assert!(rebinding.contains(" fail status=403"), "{rebinding}");
    for port in [5000, 5001, 22, 1234] {
        let line = line_starting(&format!("vsock-connect 2:{port} "));
        assert!(line.contains(" fail reset"), "{line}");
    }
    assert!(line_starting("vsock-connect 4:5002 ").contains(" fail timeout"));
    // The MITM's own port is reachable (that is the way out), but garbage gets nothing.
    let garbage = line_starting("vsock-connect 2:5002 ");
    assert!(garbage.contains("received 0 bytes"), "{garbage}");
    // Passthrough: the upstream's own certificate reaches the guest.
    let upstream_ca_subject = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        pem.parse_x509().unwrap().subject().to_string()
    };
    let pinned = line_starting("tls 127.83.0.1:443/sni=pinned.test/host=pinned.test ");
    assert!(
        pinned.contains(" ok status=200; ") && pinned.ends_with(&format!("; issuer={upstream_ca_subject}")),
        "{pinned}"
    );
    // The DNS flood: every query answered (NXDOMAIN while the blocked budget
    // lasts, REFUSED beyond it), and an allowed name resolves right after.
    let flood = line_starting("dns-flood flood.example/x300 ");
    assert!(flood.contains(" ok ") && flood.contains("Refused="), "{flood}");
    expect_prefix("dns allowed.test/A ok ");
    // Other ports: tcp mode by name reaches the ssh stand-in; a literal
    // address gets nothing; plain HTTP is inspected.
    let ssh = line_starting("tcp-connect 198.51.100.22:22 ");
    assert!(ssh.contains(r#"received 23 bytes: "SSH-2.0-sandbox-probe""#), "{ssh}");
    let literal_ssh = line_starting("tcp-connect 198.51.100.99:22 ");
    assert!(literal_ssh.contains("received 0 bytes"), "{literal_ssh}");
    assert_eq!(ssh_connections.load(Ordering::SeqCst), 1, "only the connection by name reaches the ssh server");
    expect("models=0");
    expect("models_body=model says hi");
    expect("models_admin=22");
    assert_eq!(model_requests.load(Ordering::SeqCst), 1, "the blocked path reached the model server");
    // The query and the connection made while the proxy was down waited
    // in init's sockets for the next one.
    expect("during_restart=0");
    expect("proxy_restarted=0");
    // 127.83.0.1 is what DNS gave the guest for allowed.test, but inside the
    // guest it is the guest's own loopback: the refusal there says nothing
    // about the host. The host's listener on that address and port is the
    // target; it must have seen no connection.
    expect_prefix("tcp-connect 127.83.0.1:80 fail ");
    assert_eq!(direct_connections.load(Ordering::SeqCst), 0, "the guest reached the upstream's port 80 directly");
    expect("nat-flush nftables ok every table deleted");
    // Without the redirects, what leaves the guest's loopback falls into dummy0.
    expect_prefix("tcp-connect 10.0.0.2:443 fail timeout");
    expect_prefix("dns allowed.test/A fail timeout");
    expect_prefix("udp 10.0.0.2:53 fail timeout");
    expect("after_flush=6");

    // Outside the guest: at most one upstream connection per allowed request
    // (6 from the guest, 1 from the host; the MITM may reuse its upstream
    // connections, so fewer is fine). session.db below is the exact record.
    let reached = upstream_connections.load(Ordering::SeqCst);
    assert!((2..=7).contains(&reached), "{reached} connections reached the upstream");

    // Each attempt is logged: vsock refusals by the VMM, proxy deaths on the console.
    let warnings = log.text();
    for port in [5000, 5001, 22, 1234] {
        assert!(
            warnings.contains(&format!("guest connection to host port {port} (no handler")),
            "port {port} not logged:\n{warnings}"
        );
    }
    assert!(warnings.contains("to CID 4 port 5002 dropped"), "{warnings}");
    let console = String::from_utf8_lossy(&run.console);
    assert!(console.contains("nftables changed after boot: table deleted"), "the flush is not logged:\n{console}");
    assert!(
        console.contains("/usr/libexec/sandbox/sandbox-proxy exited (status 137)"),
        "the proxy's death is not logged:\n{console}"
    );

    // Every query and request is in session.db with its decision and rule, exactly.
    let db = rusqlite::Connection::open(&run.session_db).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let mut stmt = db.prepare(sql).unwrap();
        let mut rows: Vec<String> =
            stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect();
        rows.sort();
        rows
    };
    let dns_rows = rows(
        "SELECT qname || ' ' || qtype || ' ' || rcode || ' ' || decision || ' ' || coalesce(matched_rule, '-') || ' x' || count(*) \
         FROM dns_events WHERE qname NOT LIKE '%flood.example' GROUP BY qname, qtype, rcode, decision, matched_rule",
    );
    // The flood: rows while the blocked budget lasted, then summaries
    // counting the rest; 300 in all.
    let flood_rows: i64 = db
        .query_row(
            "SELECT count(*) FROM dns_events WHERE qname LIKE '%flood.example' AND qtype = 'A' AND rcode = 'NXDOMAIN'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let summaries: Vec<String> = {
        let mut stmt = db
            .prepare("SELECT error FROM dns_events WHERE qtype = '*' AND matched_rule = 'builtin.dns_limit'")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
    };
    let summarized: i64 = summaries.iter().map(|e| e.split_whitespace().next().unwrap().parse::<i64>().unwrap()).sum();
    eprintln!("DNS flood of 300: {flood_rows} rows, {} summary rows counting {summarized}", summaries.len());
    assert_eq!(flood_rows + summarized, 300, "{summaries:?}");
    let flood_ms: i64 = db
        .query_row("SELECT max(time_ms) - min(time_ms) FROM dns_events WHERE qname LIKE '%flood.example'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let budget = 50 + 5 * (flood_ms / 1000 + 2);
    eprintln!("the flood took {flood_ms} ms in the guest: at most {budget} rows (burst 50, 5/s)");
    assert!(flood_rows <= budget, "{flood_rows} rows for a flood of {flood_ms} ms: over the blocked budget");
    let net_rows = rows(
        "SELECT coalesce(nullif(domain, ''), '-') || ' ' || coalesce(method, '-') || ' ' || coalesce(status_code, '-') || ' ' || decision || ' ' \
         || coalesce(matched_rule, '-') || ' x' || count(*) FROM net_events GROUP BY domain, method, status_code, decision, matched_rule",
    );
    eprintln!("dns_events:\n  {}\nnet_events:\n  {}", dns_rows.join("\n  "), net_rows.join("\n  "));
    let sorted = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(dns_rows, sorted(EXPECTED_DNS));
    assert_eq!(net_rows, sorted(EXPECTED_NET));
    let forged_rows: i64 = db
        .query_row("SELECT count(*) FROM net_events WHERE port = 10443 AND decision = 'denied'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(forged_rows, 1, "the forged-port request is not logged with its port");
    drop((upstream, dns));
}

/// session.db's `dns_events`, grouped: qname qtype rcode decision rule xcount.
/// musl's resolver (fetch) asks A and AAAA once per lookup; sandbox-probe asks A once,
/// and so does glibc's for openssl (AI_ADDRCONFIG: the guest has no IPv6 address).
const EXPECTED_DNS: &[&str] = &[
    // fetch x7 (hello, show-cert, POST, port 80, port 8443, download, during the restart),
    // openssl, probe at 192.0.2.53, probe after the flood
    "allowed.test A NOERROR allowed dns.test_names x10",
    "allowed.test AAAA NOERROR allowed dns.test_names x7",
    "other.test A NOERROR allowed dns.test_names x1",
    "other.test AAAA NOERROR allowed dns.test_names x1",
    "nx.test A NXDOMAIN allowed dns.test_names x1",
    "blocked.example A NXDOMAIN denied - x1",
    // rebinding: upstream answers 169.254.169.254 and 127.0.0.1, the guard drops them
    "meta.test A NXDOMAIN denied builtin.address_guard x2",
    "meta.test AAAA NOERROR allowed dns.test_names x1",
    "loop.test A NXDOMAIN denied builtin.address_guard x1",
    "pinned.test A NOERROR allowed dns.test_names x1",
    // synthesised by the rewrite rules (probe: A; fetch x2: A and AAAA)
    "git.test A NOERROR allowed dns.test_names x1",
    "models.test A NOERROR allowed dns.test_names x2",
    "models.test AAAA NOERROR allowed dns.test_names x2",
];

/// session.db's `net_events`, grouped: domain method status decision rule xcount.
const EXPECTED_NET: &[&str] = &[
    // /hello by fetch, fetch --show-cert, sandbox-probe, openssl, during the restart; the download
    "allowed.test GET 200 allowed http.allowed x6",
    "other.test GET 403 denied - x1",
    "allowed.test POST 403 denied http.no_post x1",
    // straight to net-proxy's port 10443, and a literal address on 443: no
    // DNS answer gave either address, no tcp.connect rule allows them
    "127.0.0.1 - - denied - x1",
    // 10.0.0.2 on 443 (probe), 80 and 8443 (fetch)
    "10.0.0.2 - - denied - x3",
    // tcp mode by name, the same port on a literal address
    "git.test - - allowed tcp.git_ssh x1",
    "198.51.100.99 - - denied - x1",
    // http mode
    "models.test GET 200 allowed http.models x1",
    "models.test GET 403 denied - x1",
    // passthrough: nothing inside the TLS is seen
    "pinned.test - - allowed tcp.pinned x1",
    // domain fronting: SNI allowed.test, Host other.test
    "allowed.test GET 403 denied builtin.sni_host_mismatch x1",
    // allowed by the profile, but loop.test resolves to 127.0.0.1 on the host
    "loop.test GET 403 denied builtin.address_guard x1",
    // garbage sent straight to the MITM's vsock port
    "- - - error - x1",
];
