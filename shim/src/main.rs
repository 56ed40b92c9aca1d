//! `containerd-shim-sandbox-v2`: containerd starts it (`start`), talks to
//! the daemon it spawns over ttrpc, and calls `delete` after a crash.

fn main() {
    containerd_shim::run::<shim::shim::Shim>(shim::RUNTIME_ID, Some(shim::shim::config()));
}
