//! The CLI's answers to bad input: a clear message and a non-zero status,
//! before any VM is started.

mod common;

use std::process::Output;

use common::sandbox_with_env as sandbox;

fn stderr(o: &Output) -> String {
    common::text(&o.stderr)
}

#[test]
fn a_missing_kernel_names_the_command_that_builds_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = sandbox(
        &["run", "default", "--", "true"],
        &[("SANDBOX_CACHE", dir.path().to_str().unwrap()), ("SANDBOX_KERNEL", "")],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("./setup.sh"), "{}", stderr(&o));
}

#[test]
fn an_image_that_is_not_an_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not used").unwrap();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let kernel = kernel.to_str().unwrap();
    let o = sandbox(&["run", junk.to_str().unwrap(), "--", "true"], &[("SANDBOX_KERNEL", kernel)]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("not an erofs or ext4 filesystem image"), "{}", stderr(&o));
    let o = sandbox(&["run", "/nonexistent.img", "--", "true"], &[("SANDBOX_KERNEL", kernel)]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("/nonexistent.img"), "{}", stderr(&o));
}

#[test]
fn memory_and_cpus_out_of_range_are_refused() {
    for (flag, value, msg) in [
        ("--memory", "16", "memory must be between"),
        ("--memory", "999999", "memory must be between"),
        ("--cpus", "0", "vCPUs must be between"),
    ] {
        let o = sandbox(&["run", flag, value, "default", "--", "true"], &[]);
        assert_eq!(o.status.code(), Some(125), "{flag} {value}");
        assert!(stderr(&o).contains(msg), "{flag} {value}: {}", stderr(&o));
    }
}

#[test]
fn unknown_flags_and_missing_commands_are_usage_errors() {
    let o = sandbox(&["run", "--no-such-flag", "default", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--no-such-flag"), "{}", stderr(&o));
    let o = sandbox(&["run", "default"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let o = sandbox(&["run", "-e", "NOEQUALS", "default", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("KEY=VALUE"), "{}", stderr(&o));
}

#[test]
fn a_broken_profile_is_refused_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[security.rules.http.x]\non = \"http.request\"\nif = 'http.request.hots == \"a\"'\ndecision = \"allow\"\n",
    )
    .unwrap();
    let p = profile.to_str().unwrap();
    let o = sandbox(&["run", "--profile", p, "default", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("p.toml:3:"), "{}", stderr(&o));
    let o = sandbox(&["policy", "check", p], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown field `hots`"), "{}", stderr(&o));
    std::fs::write(&profile, "[security.rules.http.x]\non = \"http.request\"\nif = 'http.request.host == \"a.test\"'\ndecision = \"allow\"\n").unwrap();
    let o = sandbox(
        &["policy", "explain", p, "--event", r#"{"event": "http.request", "host": "a.test", "method": "GET"}"#],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(out.contains("allow") && out.contains("http.x"), "{out}");
}

#[test]
fn ca_names_a_sandbox_and_says_when_it_has_no_certificate() {
    let data = tempfile::tempdir().unwrap();
    let env = [("SANDBOX_DATA", data.path().to_str().unwrap())];
    let o = sandbox(&["ca"], &env);
    assert_eq!(o.status.code(), Some(2), "the id is required: {}", stderr(&o));
    let o = sandbox(&["ca", "0123456789ab"], &env);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no sandbox 0123456789ab"), "{}", stderr(&o));
    // A sandbox whose directory has no ca.pem (it never started).
    let dir = data.path().join("sandboxes/0123456789ab");
    std::fs::create_dir_all(&dir).unwrap();
    let state = r#"{"id":"0123456789ab","image":"default","command":[],"created":0,"memory_mib":128,"vcpus":1,"pid":0,"pid_start":0}"#;
    std::fs::write(dir.join("state.json"), state).unwrap();
    let o = sandbox(&["ca", "0123"], &env);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("sandbox 0123456789ab has no CA certificate"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    // Its certificate, printed as the sandbox wrote it.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.join("ca.pem"), pem).unwrap();
    let o = sandbox(&["ca", "0123"], &env);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(common::text(&o.stdout), pem);
}
