//! End to end: snapshots from the command line. A background sandbox is
//! saved by name (`snapshot`), listed (`snapshots`), restored (`run
//! --from`), copied while it runs (`fork -n 2`) and the snapshot deleted
//! (`rm-snapshot`); a damaged or missing snapshot is refused with status
//! 125. Warm starts: two `run`s of the default image restore one cached
//! snapshot and each starts from it unchanged, `--cold` boots. Each test has a data
//! directory of its own. Needs root, /dev/kvm and ./setup.sh's artefacts;
//! skips without the last two, or fails with `SANDBOX_REQUIRE_VM=1`.
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::text;

fn in_data(data: &Path, args: &[&str]) -> Output {
    common::sandbox_with_env(args, &[("SANDBOX_DATA", data.to_str().unwrap())])
}

/// Run `args`, assert success, return standard output.
fn ok(data: &Path, args: &[&str]) -> String {
    let out = in_data(data, args);
    assert!(out.status.success(), "sandbox {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Stops every sandbox of a data directory when dropped.
struct StopAll<'a>(&'a Path);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        let ids = text(&in_data(self.0, &["ps", "-q"]).stdout);
        for id in ids.lines() {
            let _ = in_data(self.0, &["stop", id]);
        }
    }
}

#[test]
fn a_running_sandbox_is_saved_by_name_restored_and_copied() {
    common::require_vm!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let _stop = StopAll(data);

    let id = ok(data, &["run", "-d", "default"]).trim().to_string();
    ok(data, &["exec", &id, "--", "sh", "-c", "echo saved > /tmp/marker"]);
    assert_eq!(ok(data, &["snapshot", &id, "--name", "base"]).trim(), "base");
    let listed = ok(data, &["snapshots"]);
    assert!(listed.lines().any(|l| l.starts_with("base ") && l.contains(&id) && l.contains("256 MiB")), "{listed}");
    let taken = in_data(data, &["snapshot", &id, "--name", "base"]);
    assert_eq!(taken.status.code(), Some(125), "a name is taken once");
    assert!(text(&taken.stderr).contains("already exists"), "{}", text(&taken.stderr));

    // The source runs on, and a sandbox restored by name sees its file.
    assert_eq!(ok(data, &["exec", &id, "--", "cat", "/tmp/marker"]), "saved\n");
    assert_eq!(ok(data, &["run", "--from", "base", "--", "cat", "/tmp/marker"]), "saved\n");
    let status = in_data(data, &["run", "--from", "base", "--", "sh", "-c", "exit 3"]).status;
    assert_eq!(status.code(), Some(3));

    // Two copies of the running source, each a sandbox of its own.
    let copies: Vec<String> = ok(data, &["fork", &id, "-n", "2"]).lines().map(str::to_string).collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    for copy in &copies {
        assert_ne!(copy, &id);
        assert_eq!(ok(data, &["exec", copy, "--", "cat", "/tmp/marker"]), "saved\n");
    }
    let running = ok(data, &["ps", "-q"]);
    assert_eq!(running.lines().count(), 3, "{running}");
    // fork keeps no snapshot of its own.
    assert_eq!(ok(data, &["snapshots", "-q"]).lines().collect::<Vec<_>>(), ["base"]);

    ok(data, &["rm-snapshot", "base"]);
    assert!(ok(data, &["snapshots", "-q"]).is_empty());
    let gone = in_data(data, &["rm-snapshot", "base"]);
    assert_eq!(gone.status.code(), Some(1));
    // The copies run on without it.
    assert_eq!(ok(data, &["exec", &copies[0], "--", "cat", "/tmp/marker"]), "saved\n");
    ok(data, &["snapshot", &id, "--name", "last", "--stop"]);
    assert!(!ok(data, &["ps", "-q"]).contains(&id), "--stop stopped the source");
}

/// Damages the snapshot in a directory.
type Damage = fn(&Path);

#[test]
fn a_damaged_or_missing_snapshot_is_refused_with_status_125() {
    common::require_vm!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let _stop = StopAll(data);
    let id = ok(data, &["run", "-d", "default"]).trim().to_string();
    ok(data, &["snapshot", &id, "--name", "good", "--stop"]);
    let good = data.join("snapshots/good");

    let missing = in_data(data, &["run", "--from", "nothing", "--", "true"]);
    assert_eq!(missing.status.code(), Some(125));
    assert!(text(&missing.stderr).contains("no snapshot nothing"), "{}", text(&missing.stderr));

    // Each damage in a copy of the good one.
    let damages: [(&str, Damage); 4] = [
        ("truncated state", |d| std::fs::write(d.join("vm.state"), b"short").unwrap()),
        ("flipped state byte", |d| {
            let mut bytes = std::fs::read(d.join("vm.state")).unwrap();
            let n = bytes.len() - 10;
            bytes[n] ^= 0xff;
            std::fs::write(d.join("vm.state"), bytes).unwrap();
        }),
        ("truncated memory", |d| {
            std::fs::File::options().write(true).open(d.join("vm.mem")).unwrap().set_len(4096).unwrap()
        }),
        ("garbage description", |d| std::fs::write(d.join("snapshot.json"), b"{\"image\": 7}").unwrap()),
    ];
    for (what, damage) in damages {
        let copy = work.path().join(what.replace(' ', "-"));
        std::fs::create_dir(&copy).unwrap();
        for file in ["vm.state", "vm.mem", "snapshot.json"] {
            std::fs::copy(good.join(file), copy.join(file)).unwrap();
            std::fs::set_permissions(copy.join(file), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        }
        damage(&copy);
        let t = Instant::now();
        let out = in_data(data, &["run", "--from", copy.to_str().unwrap(), "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{what}: {}", text(&out.stderr));
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: took {:?}", t.elapsed());
        assert!(text(&out.stderr).starts_with("sandbox: "), "{what}: {}", text(&out.stderr));
    }
    assert!(ok(data, &["ps", "-q"]).is_empty(), "no half-started sandbox is left");
}

#[test]
fn runs_of_one_image_restore_a_warm_snapshot_and_cold_boots() {
    common::require_vm!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().to_str().unwrap();
    // Whether the sandbox was restored, from the runtime's own log line.
    let restored = |args: &[&str]| {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["default", "--", "cat", "/tmp/warm"]);
        let out = common::sandbox_with_env(&all, &[("SANDBOX_DATA", data), ("SANDBOX_LOG", "sandbox::instance=debug")]);
        let log = text(&out.stderr);
        // The guest's own /tmp: nothing from an earlier run.
        assert_eq!(out.status.code(), Some(1), "{log}");
        assert!(log.contains("sandbox ready"), "{log}");
        log.contains("restored=true")
    };
    // 288 MiB: a size of this test's own (the warm cache is shared); the
    // first run may make its snapshot, every later one restores it.
    restored(&["--memory", "288"]);
    assert!(restored(&["--memory", "288"]));
    assert!(!restored(&["--memory", "288", "--cold"]));
    // A run that writes leaves the snapshot as it was.
    let wrote = common::sandbox_with_env(
        &["run", "--memory", "288", "default", "--", "sh", "-c", "echo x > /tmp/warm"],
        &[("SANDBOX_DATA", data)],
    );
    assert!(wrote.status.success(), "{}", text(&wrote.stderr));
    assert!(restored(&["--memory", "288"]));
}
