//! Keeps the guest proxies running: each one is restarted when it exits,
//! with a backoff that grows while it keeps failing, and every restart is
//! logged on the console.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::reaper;

/// The proxies init starts at boot: the DNS proxy (on
/// [`DNS_PROXY_PORT`](guest_protocol::ports::DNS_PROXY_PORT)) and the HTTPS
/// proxy (on [`NET_PROXY_PORT`](guest_protocol::ports::NET_PROXY_PORT)), both bridging to the host over vsock. They live in the
/// boot image's `/usr/libexec/sandbox`, which an OCI image's root shows at
/// `/.sandbox` (see `mounts`).
pub(crate) const PROXIES: &[&str] = &["dns-proxy", "net-proxy"];

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A run this long counts as healthy: the next failure starts the backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Start `program` and keep restarting it, on a thread of its own.
pub(crate) fn supervise(program: String) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("supervise {program}")).spawn(move || {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let mut cmd = Command::new(&program);
            cmd.stdin(Stdio::null()).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            let status = match reaper::spawn(&mut cmd) {
                Ok((_child, status)) => status.recv().map_or_else(|_| "lost".to_string(), |s| s.to_string()),
                Err(e) => format!("could not start: {e}"),
            };
            if started.elapsed() >= HEALTHY_RUN {
                backoff = FIRST_BACKOFF;
            }
            crate::log(&format!("{program} exited (status {status}); restarting in {} ms", backoff.as_millis()));
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })?;
    Ok(())
}
