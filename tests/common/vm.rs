//! The guard of every test that boots a VM. Where `/dev/kvm` or a built
//! artefact is missing, a plain `cargo test` skips the test and says so on
//! stderr; with `SANDBOX_REQUIRE_VM=1` (./test.sh sets it) the same absence
//! fails the test, so that a skipped VM test never counts as a pass there.
//!
//! Plain std, so that the VMM's own suites share it:
//! `#[path = "../../tests/common/vm.rs"] mod vm;`.

use std::io::Write;
use std::path::Path;

/// The environment variable that turns a skip into a failure.
pub const REQUIRE_VM: &str = "SANDBOX_REQUIRE_VM";

/// Why `path` (the guest kernel, an image, ...) cannot be used, if it cannot;
/// `how` says what builds it.
pub fn missing_file(path: &Path, how: &str) -> Option<String> {
    (!path.is_file()).then(|| format!("{} is missing: {how}", path.display()))
}

/// Whether a test can boot a VM here: `/dev/kvm` opens read-write and
/// nothing in `missing` (the test's other prerequisites, each a reason) is
/// missing. When it cannot, prints `skipped: <test>: <why>` to stderr and
/// returns false; or, with `SANDBOX_REQUIRE_VM=1`, panics with the reason.
pub fn vm_available(missing: impl IntoIterator<Item = String>) -> bool {
    let mut why: Vec<String> = Vec::new();
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        why.push(format!("this test boots a VM and needs read-write access to /dev/kvm ({e})"));
    }
    why.extend(missing);
    if why.is_empty() {
        return true;
    }
    let why = why.join("; ");
    if std::env::var_os(REQUIRE_VM).is_some_and(|v| v == "1") {
        panic!("{why} ({REQUIRE_VM}=1: a VM test must run, not skip)");
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("a VM test");
    // Straight to stderr, past the test harness's capture of eprintln!: a
    // skip is said also when the test "passes".
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why} (set {REQUIRE_VM}=1 to make this a failure)");
    false
}
