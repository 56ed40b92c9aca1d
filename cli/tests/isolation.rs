//! `sandbox verify-isolation` end to end: a canary and a peer sandbox on the
//! real kernel, an outside "target" the test starts in a network namespace
//! of its own (reachable from this host over a veth pair), and the
//! command's verdict. The failure path is proven honestly: a profile that
//! answers the canary's DNS name lets that one check through, and the command
//! must say so and exit non-zero. Needs /dev/kvm and ./setup.sh's artefacts;
//! skips without them, or fails with `SANDBOX_REQUIRE_VM=1` (./test.sh).
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One verification at a time: each boots real guests, and several at once
/// on a small, loaded host can miss the runtime's boot timeouts.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sandbox(args: &[&str]) -> Output {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    common::sandbox(args)
}

/// A network namespace joined to this one by a veth pair: an "outside"
/// network this host reaches and a guest must not. Deleted on drop.
struct OutsideNetwork {
    name: String,
    /// The namespace's end of the link.
    address: Ipv4Addr,
}

impl OutsideNetwork {
    fn create() -> Self {
        let pid = std::process::id();
        let (name, host_link, inner_link) = (format!("sbx-iso-{pid}"), format!("sbxh{pid}"), format!("sbxn{pid}"));
        // A /30 no other link has (one left by a killed run would take the traffic).
        let in_use = String::from_utf8_lossy(&Command::new("ip").args(["-4", "-br", "addr"]).output().unwrap().stdout)
            .into_owned();
        let subnet = (0..250)
            .map(|i| (pid + i) % 250 + 1)
            .find(|s| !in_use.contains(&format!("10.231.{s}.")))
            .expect("a free 10.231.x.0/30");
        let (host_ip, address) = (format!("10.231.{subnet}.1"), Ipv4Addr::new(10, 231, subnet as u8, 2));
        let net = Self { name: name.clone(), address };
        for args in [
            vec!["netns", "add", &name],
            vec!["link", "add", &host_link, "type", "veth", "peer", "name", &inner_link, "netns", &name],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &host_link],
            vec!["link", "set", &host_link, "up"],
            vec!["-n", &name, "addr", "add", &format!("{address}/30"), "dev", &inner_link],
            vec!["-n", &name, "link", "set", &inner_link, "up"],
        ] {
            let o = Command::new("ip").args(&args).output().unwrap();
            assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        }
        net
    }

    /// Run `f` on a thread that has joined the namespace (sockets it opens
    /// stay in the namespace).
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::spawn(move || {
            // SAFETY: `ns` is an open namespace file; setns changes only the
            // network namespace of this thread, which ends with `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for OutsideNetwork {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// A TCP and UDP server on the outside network counting whoever reaches it
/// (and echoing datagrams: `verify-isolation` judges a silent guest only
/// against a target that answers the host), checked from this host first:
/// the address is reachable from here.
fn target(net: &OutsideNetwork) -> (String, Arc<AtomicU32>) {
    let address = net.address;
    let (tcp, udp) = net.inside(move || {
        let tcp = TcpListener::bind((address, 0)).unwrap();
        let udp = UdpSocket::bind(tcp.local_addr().unwrap()).unwrap();
        (tcp, udp)
    });
    let addr = tcp.local_addr().unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let tcp_hits = Arc::clone(&hits);
    std::thread::spawn(move || {
        for _ in tcp.incoming().flatten() {
            tcp_hits.fetch_add(1, Ordering::SeqCst);
        }
    });
    let udp_hits = Arc::clone(&hits);
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            udp_hits.fetch_add(1, Ordering::SeqCst);
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    drop(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("the host reaches the outside network"));
    UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"control", addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hits.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(hits.swap(0, Ordering::SeqCst), 2, "the host's TCP connection and datagram reach the target");
    (addr.to_string(), hits)
}

#[test]
fn a_sound_sandbox_blocks_every_check_and_the_command_says_so() {
    common::require_vm!();
    let outside = OutsideNetwork::create();
    let (target, hits) = target(&outside);
    let o = sandbox(&["verify-isolation", "--target", &target]);
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("--- stdout ---\n{out}--- stderr ---\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0));
    let rows: Vec<&str> = out.lines().skip(1).take_while(|l| !l.starts_with("isolated")).collect();
    for invariant in ["peer sandbox", "host loopback", "sandbox sockets", "dns", "outside address", "guest network"] {
        assert!(rows.iter().any(|r| r.starts_with(invariant)), "no {invariant} row in:\n{out}");
    }
    assert!(rows.iter().all(|r| r.contains(" blocked ")), "{out}");
    for attempt in [
        format!("tcp {target} (rules deleted)"),
        format!("udp {target}"),
        format!("udp {target} (rules deleted)"),
        "connections seen by the peer".to_string(),
        "connections seen by the service".to_string(),
        "delete every nftables rule".to_string(),
    ] {
        assert!(rows.iter().any(|r| r.contains(&attempt)), "no {attempt:?} row in:\n{out}");
    }
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with(&format!("isolated: all {} checks blocked", rows.len())), "{summary}");
    // verify-isolation reaches the target from the host once per protocol
    // (its control); anything more came from the canary.
    assert_eq!(hits.load(Ordering::SeqCst), 2, "the target was reached by more than the host's two control probes");
}

#[test]
fn a_profile_that_lets_the_canary_name_resolve_fails_the_check_every_round() {
    common::require_vm!();
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("leaky.toml");
    std::fs::write(
        &profile,
        r#"
[security.rules.dns.canary]
on = "dns.request"
if = 'dns.request.qname == "canary.test"'
decision = "allow"

[security.rules.dns.canary_answer]
on = "dns.request"
if = 'dns.request.qname == "canary.test"'
decision = "rewrite"
answer = { a = ["192.0.2.80"] }
"#,
    )
    .unwrap();
    let o = sandbox(&[
        "verify-isolation",
        "--no-peer",
        "--profile",
        profile.to_str().unwrap(),
        "--canary-name",
        "canary.test",
        "--every",
        "1s",
        "--rounds",
        "2",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("--- stdout ---\n{out}--- stderr ---\n{err}");
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("round 1 (") && out.contains("round 2 ("), "{out}");
    let escaped: Vec<&str> = out.lines().filter(|l| l.contains(" ESCAPED ")).collect();
    assert_eq!(escaped.len(), 2, "one escape per round:\n{out}");
    assert!(
        escaped.iter().all(|l| l.starts_with("dns ") && l.contains("canary.test A") && l.contains("192.0.2.80")),
        "{escaped:?}"
    );
    assert_eq!(out.lines().filter(|l| l.starts_with("NOT ISOLATED: 1 of ")).count(), 2, "{out}");
    assert!(!out.contains("connections seen by the peer"), "--no-peer boots no peer:\n{out}");
    assert_eq!(err.matches("verify-isolation: NOT isolated").count(), 2, "each round is logged:\n{err}");
}
