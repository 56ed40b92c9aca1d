//! End to end: copies of a running sandbox. A sandbox in a confined holder
//! writes a file and starts a background process; it is snapshotted while
//! it runs on, and two copies are restored from that snapshot at once, each
//! in a holder of its own. Both see the file and the process; then each goes
//! its own way: its own files, random bytes, hostname, session.db rows and
//! CA (a TLS client in one copy that trusts only the other copy's CA is
//! refused); stopping one leaves the other running. A [`Pool`] of restored
//! sandboxes hands them out and starts more. Needs root, /dev/kvm and
//! ./setup.sh's artefacts; skips without the last two, or fails with
//! `SANDBOX_REQUIRE_VM=1`.
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandbox::{AfterSnapshot, Command, Image, Pool, Sandbox, SandboxBuilder, Status};

/// `ca.test` resolves (to an address outside the guest), so HTTPS to it is
/// inspected; no request is allowed, so nothing leaves the host.
const PROFILE: &str = r#"
[security.rules.dns.ca_test_allowed]
on = "dns.request"
if = 'dns.request.qname == "ca.test"'
decision = "allow"

[security.rules.dns.ca_test]
on = "dns.request"
if = 'dns.request.qname == "ca.test"'
decision = "rewrite"
answer = { ttl = 60, a = ["198.51.100.7"] }
"#;

fn holder(builder: SandboxBuilder, data: &Path, profile: &Path) -> SandboxBuilder {
    builder
        .data_dir(data)
        .profile(profile.to_str().unwrap())
        .holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
}

/// Run `script` and return its status and output.
fn run(sandbox: &Sandbox, script: &str) -> (i32, String) {
    let out = sandbox.output(Command::new("/bin/sh").args(["-c", script])).unwrap();
    let Status::Exited(code) = out.status else { panic!("{script}: {:?}", out.status) };
    (code, format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)))
}

fn sh(sandbox: &Sandbox, script: &str) -> String {
    let (code, out) = run(sandbox, script);
    assert_eq!(code, 0, "{script}: {out}");
    out
}

/// A work directory with a data directory and the profile; a sandbox
/// booted there in a holder.
fn source() -> (tempfile::TempDir, PathBuf, PathBuf, Sandbox) {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let profile = work.path().join("profile.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let source = holder(Sandbox::builder(Image::Default).memory_mib(256), &data, &profile).spawn().unwrap();
    (work, data, profile, source)
}

/// Stops its sandboxes when dropped, also when an assertion fails (a
/// holder runs until it is told to stop).
#[derive(Default)]
struct StopOnDrop(Vec<Sandbox>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for sandbox in &self.0 {
            let _ = sandbox.stop(Duration::from_secs(60));
        }
    }
}

fn dns_names(sandbox: &Sandbox) -> Vec<String> {
    let db = rusqlite::Connection::open(sandbox.session_db()).unwrap();
    let mut query = db.prepare("SELECT qname FROM dns_events ORDER BY qname").unwrap();
    query.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
}

#[test]
fn two_copies_of_a_running_sandbox_start_from_its_state_and_then_go_their_own_ways() {
    common::require_vm!();
    let (work, data, profile, source) = source();
    let mut cleanup = StopOnDrop(vec![source.clone()]);
    sh(&source, "echo 'from the source' > /tmp/marker; setsid sleep 1000 </dev/null >/dev/null 2>&1 &");
    let snapshot = source.snapshot(work.path().join("snap"), AfterSnapshot::Resume).unwrap();
    assert_eq!(snapshot.source, source.id());
    // The source runs on.
    assert_eq!(sh(&source, "cat /tmp/marker"), "from the source\n");

    let (a, b) = std::thread::scope(|s| {
        let start = || s.spawn(|| holder(Sandbox::from_snapshot(snapshot.clone()), &data, &profile).spawn().unwrap());
        let (a, b) = (start(), start());
        (a.join().unwrap(), b.join().unwrap())
    });
    cleanup.0.extend([a.clone(), b.clone()]);
    let ids = [source.id(), a.id(), b.id()];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");

    for copy in [&a, &b] {
        assert_eq!(sh(copy, "cat /tmp/marker"), "from the source\n");
        assert!(sh(copy, "ps -o args").contains("sleep 1000"), "the background process came along");
        assert_eq!(sh(copy, "hostname").trim(), copy.id(), "each copy is named after its id");
    }
    // They diverge.
    sh(&a, "echo a > /tmp/own; kill $(pidof sleep)");
    sh(&b, "echo b > /tmp/own");
    assert_eq!(sh(&a, "cat /tmp/own"), "a\n");
    assert_eq!(sh(&b, "cat /tmp/own"), "b\n");
    assert!(!sh(&a, "ps -o args").contains("sleep 1000"));
    assert!(sh(&b, "ps -o args").contains("sleep 1000"));
    assert_eq!(run(&source, "cat /tmp/own").0, 1, "the source has neither copy's file");
    let random = |s: &Sandbox| sh(s, "head -c 32 /dev/urandom | od -An -tx1");
    assert_ne!(random(&a), random(&b));

    // Each copy trusts its own CA only.
    let (ca_a, ca_b) = (a.dir().join("ca.pem"), b.dir().join("ca.pem"));
    assert_ne!(std::fs::read(&ca_a).unwrap(), std::fs::read(&ca_b).unwrap());
    a.copy_in(&ca_a, "/tmp/own-ca.pem").unwrap();
    a.copy_in(&ca_b, "/tmp/other-ca.pem").unwrap();
    // 22: the handshake worked and the request was refused (403) by policy.
    assert_eq!(run(&a, "fetch -s https://ca.test/ -o /dev/null").0, 22);
    assert_eq!(run(&a, "fetch -s --cacert /tmp/own-ca.pem https://ca.test/ -o /dev/null").0, 22);
    // 35: the TLS handshake failed: the certificate is not from that CA.
    let (code, out) = run(&a, "fetch -s --cacert /tmp/other-ca.pem https://ca.test/ -o /dev/null");
    assert_eq!(code, 35, "{out}");
    sh(&b, "nslookup only-b.test >/dev/null 2>&1; true");

    // Stopping one leaves the other running.
    a.stop(Duration::from_secs(60)).unwrap();
    assert!(!a.is_running());
    assert!(b.is_running());
    assert_eq!(sh(&b, "cat /tmp/own"), "b\n");
    b.stop(Duration::from_secs(60)).unwrap();
    source.stop(Duration::from_secs(60)).unwrap();
    // Each session.db has its own sandbox's queries.
    let (names_a, names_b) = (dns_names(&a), dns_names(&b));
    assert!(names_a.iter().any(|n| n == "ca.test") && !names_a.iter().any(|n| n == "only-b.test"), "{names_a:?}");
    assert!(names_b.iter().any(|n| n == "only-b.test") && !names_b.iter().any(|n| n == "ca.test"), "{names_b:?}");
    assert!(dns_names(&source).is_empty());
}

#[test]
fn a_pool_hands_out_restored_sandboxes_and_starts_more() {
    common::require_vm!();
    let (work, data, profile, source) = source();
    let mut cleanup = StopOnDrop(vec![source.clone()]);
    sh(&source, "echo pooled > /tmp/marker");
    let snapshot = source.snapshot(work.path().join("snap"), AfterSnapshot::Stop).unwrap();

    let (data_dir, profile_path) = (data.clone(), profile.clone());
    let pool = Pool::from_snapshot(snapshot, 2, move |builder| holder(builder, &data_dir, &profile_path));
    let mut taken = Vec::new();
    for _ in 0..3 {
        let sandbox = pool.take(Duration::from_secs(300)).unwrap();
        cleanup.0.push(sandbox.clone());
        assert_eq!(sh(&sandbox, "cat /tmp/marker"), "pooled\n");
        taken.push(sandbox);
    }
    let mut ids: Vec<&str> = taken.iter().map(Sandbox::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    // It refills to its size.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while pool.ready() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pool.ready(), 2);
    let pooled: Vec<Sandbox> = Sandbox::list_in(&data).unwrap().into_iter().filter(Sandbox::is_running).collect();
    assert_eq!(pooled.len(), 5, "3 taken, 2 ready");
    // Dropping the pool stops the ready ones, not the taken ones.
    drop(pool);
    let running: Vec<String> =
        Sandbox::list_in(&data).unwrap().into_iter().filter(Sandbox::is_running).map(|s| s.id().to_string()).collect();
    assert_eq!(running.len(), 3, "{running:?}");
    for sandbox in taken {
        assert!(running.contains(&sandbox.id().to_string()));
        sandbox.stop(Duration::from_secs(60)).unwrap();
    }
}
