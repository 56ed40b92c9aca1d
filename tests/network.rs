//! End to end, one boot: the guest's network reaches the host handlers and
//! only what the profile allows gets out. A local HTTPS upstream (own test CA)
//! and a local DNS server stand in for the internet; nothing leaves this
//! machine. Needs /dev/kvm and ./setup.sh's artefacts.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sandbox::{Image, NetConfig, Sandbox, Status};
use sandbox_net::fixtures::{HttpsUpstream, TestCa, TestDns};

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
if = 'http.request.host == "allowed.test"'
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
"#;

const SCRIPT: &str = r#"
check() { echo "$1=$2"; }
body=$(fetch -s https://allowed.test/hello); check allowed $?; echo "body=$body"
fetch -s https://other.test/hello >/dev/null; check other $?
fetch -s -X POST -d data https://allowed.test/echo >/dev/null; check post $?
nslookup nx.test >/dev/null 2>&1; check nx $?
nslookup blocked.example >/dev/null 2>&1; check blocked_dns $?
fetch -s --max-time 10 https://meta.test/ >/dev/null 2>&1; check metadata $?
fetch -s --max-time 10 http://allowed.test/ >/dev/null 2>&1; check port80 $?
fetch -s --max-time 10 https://allowed.test:8443/ >/dev/null 2>&1; check port8443 $?
fetch -s --max-time 10 http://10.0.0.2/ >/dev/null 2>&1; check dummy_port80 $?
fetch -s --max-time 10 https://10.0.0.2:8443/ >/dev/null 2>&1; check literal_ip $?
echo "links=$(ls /sys/class/net | tr '\n' ' ')"
ip -4 addr show dummy0 | grep -o 'inet [0-9./]*'
echo "cert_env=$SSL_CERT_FILE $REQUESTS_CA_BUNDLE $CURL_CA_BUNDLE $NODE_EXTRA_CA_CERTS"
netstat -lnu | grep -q '127.0.0.1:1053 '; check udp1053 $?
netstat -lnt | grep -q '127.0.0.1:1053 '; check tcp1053 $?
netstat -lnt | grep -q '127.0.0.1:10443 '; check tcp10443 $?
nslookup allowed.test 192.0.2.53 >/dev/null 2>&1; check dns_any_address $?
grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt
kill $(pidof net-proxy); sleep 2; pidof net-proxy >/dev/null; check proxy_restarted $?
fetch -s https://allowed.test/hello >/dev/null; check after_restart $?
"#;

/// Forward `listen` to `target` (the fixture upstream listens on a random port).
async fn forward(listen: SocketAddr, target: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[test]
fn the_guest_reaches_what_the_profile_allows_and_nothing_else() {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    assert!(kvm.is_ok(), "this test boots a VM and needs /dev/kvm: {:?}", kvm.err());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("sandbox e2e upstream CA").unwrap();
    let ca_file = ca.write_pem(dir.path(), "upstream-ca.pem").unwrap();
    let (upstream, dns, _forwarder) = rt.block_on(async {
        let upstream = HttpsUpstream::start(&ca, &["allowed.test", "other.test", "meta.test"]).await.unwrap();
        let dns = TestDns::start(&[
            ("allowed.test", IpAddr::V4(UPSTREAM_IP)),
            ("other.test", IpAddr::V4(UPSTREAM_IP)),
            ("meta.test", IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))),
        ])
        .await
        .unwrap();
        let fwd = forward(SocketAddr::from((UPSTREAM_IP, 443)), upstream.addr()).await;
        (upstream, dns, fwd)
    });
    let profile = dir.path().join("profile.toml");
    std::fs::write(&profile, PROFILE).unwrap();

    let net = NetConfig {
        dns_servers: vec![dns.addr()],
        extra_root_files: vec![ca_file],
        allowed_networks: vec![format!("{UPSTREAM_IP}/32").parse().unwrap()],
        system_roots: false,
        ..NetConfig::default()
    };
    let run = Sandbox::builder(Image::Default)
        .memory_mib(256)
        .profile(profile.to_str().unwrap())
        .net_config(net)
        .timeout(Duration::from_secs(900))
        .run(["/bin/sh", "-c", SCRIPT])
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
    expect("allowed=0");
    expect("body=hello allowed.test HTTP/1.1");
    expect("other=22"); // 403 from the MITM: no rule allows other.test
    expect("post=22"); // 403: blocked by the method rule
    for failed in ["nx=0", "blocked_dns=0", "metadata=0"] {
        assert!(!out.lines().any(|l| l == failed), "{failed} in:\n{out}");
    }
    for refused in ["port80=7", "port8443=7", "dummy_port80=7", "literal_ip=7"] {
        expect(refused);
    }
    expect("links=dummy0 lo ");
    expect("inet 10.0.0.1/24");
    expect("cert_env=/etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates/sandbox-ca.crt");
    for listening in ["udp1053=0", "tcp1053=0", "tcp10443=0", "dns_any_address=0"] {
        expect(listening);
    }
    expect("proxy_restarted=0");
    expect("after_restart=0");

    // Every query and request is in session.db with its decision and rule.
    let db = rusqlite::Connection::open(&run.session_db).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(count("SELECT count(*) FROM net_events WHERE domain = 'allowed.test' AND decision = 'allowed' AND matched_rule = 'http.allowed'"), 2);
    assert_eq!(count("SELECT count(*) FROM net_events WHERE domain = 'other.test' AND decision = 'denied'"), 1);
    assert_eq!(count("SELECT count(*) FROM net_events WHERE method = 'POST' AND decision = 'denied' AND matched_rule = 'http.no_post'"), 1);
    assert!(count("SELECT count(*) FROM dns_events WHERE qname = 'blocked.example' AND decision = 'denied' AND rcode = 'NXDOMAIN'") >= 1);
    assert!(count("SELECT count(*) FROM dns_events WHERE qname = 'nx.test' AND rcode = 'NXDOMAIN'") >= 1);
    assert!(count("SELECT count(*) FROM dns_events WHERE qname = 'allowed.test' AND decision = 'allowed' AND matched_rule = 'dns.test_names'") >= 1);
    assert_eq!(count("SELECT count(*) FROM net_events WHERE domain = 'meta.test' AND decision = 'allowed'"), 0);
    drop((upstream, dns));
}
