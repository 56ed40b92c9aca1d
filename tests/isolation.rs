//! `sandbox verify-isolation` end to end: a canary and a peer sandbox on the
//! real kernel, an outside "target" the test starts on 127.0.0.1, and the
//! command's verdict. The failure path is proven honestly: a profile that
//! answers the canary's DNS name lets that one check through, and the command
//! must say so and exit non-zero. Needs /dev/kvm and ./setup.sh's artefacts.
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// One verification at a time: each boots real guests, and several at once
/// on a small, loaded host can miss the runtime's boot timeouts.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sandbox(args: &[&str]) -> Output {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    assert!(kvm.is_ok(), "this test boots VMs and needs /dev/kvm: {:?}", kvm.err());
    Command::new(env!("CARGO_BIN_EXE_sandbox")).args(args).output().unwrap()
}

/// A TCP and UDP server on 127.0.0.1 counting whoever reaches it.
fn target() -> (String, Arc<AtomicU32>) {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let udp = UdpSocket::bind(addr).unwrap();
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
        while udp.recv_from(&mut buf).is_ok() {
            udp_hits.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr.to_string(), hits)
}

#[test]
fn a_sound_sandbox_blocks_every_check_and_the_command_says_so() {
    let (target, hits) = target();
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
        "connections seen by the peer".to_string(),
        "connections seen by the service".to_string(),
        "delete every nftables rule".to_string(),
    ] {
        assert!(rows.iter().any(|r| r.contains(&attempt)), "no {attempt:?} row in:\n{out}");
    }
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with(&format!("isolated: all {} checks blocked", rows.len())), "{summary}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the target was reached");
}

#[test]
fn a_profile_that_lets_the_canary_name_resolve_fails_the_check_every_round() {
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
    assert!(escaped.iter().all(|l| l.starts_with("dns ") && l.contains("canary.test A") && l.contains("192.0.2.80")), "{escaped:?}");
    assert_eq!(out.lines().filter(|l| l.starts_with("NOT ISOLATED: 1 of ")).count(), 2, "{out}");
    assert!(!out.contains("connections seen by the peer"), "--no-peer boots no peer:\n{out}");
    assert_eq!(err.matches("verify-isolation: NOT isolated").count(), 2, "each round is logged:\n{err}");
}
