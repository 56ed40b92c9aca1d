//! End to end: a running sandbox is saved to a snapshot, and sandboxes
//! restored from it go on from that point, each a sandbox of its own: its
//! own id (also its hostname) and session.db, random bytes no other
//! restored sandbox produces, the host's clock, and a CA of its own (its
//! `ca.pem`) in place of the one the snapshot's sandbox trusted; one of
//! them in a confined holder. Needs root, /dev/kvm and ./setup.sh's artefacts; skips without
//! the last two, or fails with `SANDBOX_REQUIRE_VM=1`.
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sandbox::{AfterSnapshot, Command, Image, Sandbox, Snapshot, Status};

fn sh(sandbox: &Sandbox, script: &str) -> String {
    let out = sandbox.output(Command::new("/bin/sh").args(["-c", script])).unwrap();
    assert_eq!(out.status, Status::Exited(0), "{script}: {}", common::text(&out.stderr));
    common::text(&out.stdout)
}

/// What a restored sandbox shows of its identity: its random bytes, its
/// clock, the sandbox CA certificates it trusts, its hostname (the kernel's
/// and /etc/hostname).
struct Seen {
    random: String,
    clock: u64,
    bundle: String,
    hostname: String,
}

fn look(sandbox: &Sandbox) -> Seen {
    assert_eq!(sh(sandbox, "cat /tmp/marker"), "before the snapshot\n", "the guest's state came back");
    Seen {
        random: sh(sandbox, "head -c 32 /dev/urandom | od -An -tx1"),
        clock: sh(sandbox, "date +%s").trim().parse().unwrap(),
        bundle: sh(sandbox, "cat /etc/ssl/certs/ca-certificates.crt"),
        hostname: sh(sandbox, "cat /proc/sys/kernel/hostname /etc/hostname"),
    }
}

/// The certificate of `sandbox`'s own CA (its `ca.pem`), trimmed.
fn ca_cert(sandbox: &Sandbox) -> String {
    let pem = std::fs::read_to_string(sandbox.ca_cert()).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----") && !pem.contains("PRIVATE KEY"), "{pem}");
    pem.trim().to_string()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn restored_sandboxes_go_on_from_the_snapshot_each_with_an_identity_of_its_own() {
    common::require_vm!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");

    let source = Sandbox::builder(Image::Default).memory_mib(256).data_dir(&data).start().unwrap();
    let source_ca = ca_cert(&source);
    assert!(sh(&source, "cat /etc/ssl/certs/ca-certificates.crt").contains(&source_ca));
    assert_eq!(sh(&source, "cat /proc/sys/kernel/hostname"), format!("{}\n", source.id()));
    sh(&source, "echo 'before the snapshot' > /tmp/marker");
    let saved = Instant::now();
    let snapshot = source.snapshot(work.path().join("snap"), AfterSnapshot::Stop).unwrap();
    println!("snapshot of a {} MiB guest written in {:?}", snapshot.memory_mib, saved.elapsed());
    let _ = source.shutdown();
    let snapshot = Snapshot::load(&snapshot.dir).unwrap();

    // Two restored in this process, a third in a confined holder.
    let mut restored = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let instance = Sandbox::from_snapshot(snapshot.clone()).data_dir(&data).start().unwrap();
        println!("restored {} in {:?} (to its agent: {:?})", instance.id(), t.elapsed(), instance.boot_time());
        restored.push(instance);
    }
    let t = Instant::now();
    let held = Sandbox::from_snapshot(snapshot.clone())
        .data_dir(&data)
        .holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
        .spawn()
        .unwrap();
    println!("restored {} in a confined holder in {:?}", held.id(), t.elapsed());

    let sandboxes: Vec<&Sandbox> = restored.iter().map(|i| i.sandbox()).chain([&held]).collect();
    let seen: Vec<Seen> = sandboxes.iter().map(|s| look(s)).collect();
    let cas: Vec<String> = sandboxes.iter().map(|s| ca_cert(s)).collect();
    for ((sandbox, seen), ca) in sandboxes.iter().zip(&seen).zip(&cas) {
        assert_ne!(sandbox.id(), snapshot.source);
        assert!(sandbox.session_db().exists());
        assert!(now().abs_diff(seen.clock) <= 60, "guest clock {} against the host's {}", seen.clock, now());
        assert!(seen.bundle.contains(ca.as_str()), "{} does not trust its own CA", sandbox.id());
        assert!(!seen.bundle.contains(&source_ca), "{} still trusts the snapshot's CA", sandbox.id());
        assert_eq!(seen.bundle.matches("BEGIN CERTIFICATE").count(), 1, "{} trusts one sandbox CA", sandbox.id());
        assert_eq!(seen.hostname, format!("{id}\n{id}\n", id = sandbox.id()), "the hostname is the sandbox id");
    }
    for (i, a) in seen.iter().enumerate() {
        for (b, ca) in seen[i + 1..].iter().zip(&cas[i + 1..]) {
            assert_ne!(a.random, b.random, "two restored sandboxes produced the same random bytes");
            assert_ne!(&cas[i], ca, "two restored sandboxes share a CA");
            assert!(!a.bundle.contains(ca.as_str()), "a restored sandbox trusts another one's CA");
        }
    }
    let ids: std::collections::HashSet<&str> = sandboxes.iter().map(|s| s.id()).collect();
    assert_eq!(ids.len(), 3);

    held.stop(std::time::Duration::from_secs(60)).unwrap();
    for instance in restored {
        instance.shutdown().unwrap();
    }
}

#[test]
fn a_damaged_snapshot_is_refused_with_a_clear_error() {
    common::require_vm!();
    let work = tempfile::tempdir().unwrap();
    let source = Sandbox::builder(Image::Default).memory_mib(128).data_dir(work.path()).start().unwrap();
    let snapshot = source.snapshot(work.path().join("snap"), AfterSnapshot::Stop).unwrap();
    let _ = source.shutdown();
    // Cut the memory file short: the restore refuses it and leaves no VM.
    let memory = snapshot.files().memory;
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(4096).unwrap();
    let err = Sandbox::from_snapshot(snapshot.clone()).data_dir(work.path()).start().unwrap_err();
    assert!(err.to_string().contains("vm.mem"), "{err}");
    // A flipped byte in the state file: refused when loaded.
    let state = snapshot.files().state;
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&state, bytes).unwrap();
    let err = Snapshot::load(&snapshot.dir).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}
