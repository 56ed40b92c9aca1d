//! What the end-to-end suites share: the guard of the tests that boot a VM,
//! and a buffer threads write into. (The CLI's suites, in cli/tests, add
//! the runner of the `sandbox` binary.)
// Each suite uses part of this; the helpers unwrap like the tests they serve.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

mod vm;

/// Whether this machine can boot the sandbox: `/dev/kvm` and ./setup.sh's
/// guest kernel and default image. See [`vm::vm_available`] for what happens
/// when it cannot.
pub fn vm_available() -> bool {
    let missing = [sandbox::paths::kernel().err(), sandbox::paths::default_image().err()];
    vm::vm_available(missing.into_iter().flatten().map(|e| e.to_string()))
}

/// Ends the calling test (a skip, said on stderr) unless it can boot a VM
/// here; with `SANDBOX_REQUIRE_VM=1` that fails the test instead.
#[allow(unused_macros)]
macro_rules! require_vm {
    () => {
        if !$crate::common::vm_available() {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_vm;

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes written from any thread (a clone writes into the same buffer).
#[derive(Clone, Default)]
pub struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        text(&self.0.lock().unwrap())
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
