//! Keeps the guest proxy running: it is restarted when it exits, with a
//! backoff that grows while it keeps failing, and every restart is logged on
//! the console.
//!
//! Init binds the proxy's listening sockets itself, before the proxy first
//! starts, and keeps them: a connection or DNS packet that arrives while the
//! proxy starts (which takes seconds where guest kernel code is emulated)
//! or restarts waits in the socket instead of being refused.

use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use guest_protocol::ports::{
    DNS_PROXY_PORT, DNS_TCP_SOCKET_FD, DNS_UDP_SOCKET_FD, NET_PROXY_PORT, NET_SOCKET_FD, PROXY_READY_FD,
};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::reaper;

/// The program init starts at boot: `sandbox-proxy`, which runs dns-proxy
/// (on [`DNS_PROXY_PORT`]) and net-proxy (on [`NET_PROXY_PORT`]), both
/// bridging to the host over vsock. It lives in the boot image's
/// `/usr/libexec/sandbox`, which an OCI image's root shows at `/.sandbox`
/// (see `mounts`).
pub(crate) const PROXY: &str = "sandbox-proxy";

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A run this long counts as healthy: the next failure starts the backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Init keeps the proxy's sockets at descriptors from here up, clear of the
/// ones the proxy finds them at (3 to 5), so that moving each into place in
/// the child cannot overwrite another.
const KEPT_FROM: RawFd = 10;

/// The proxy's listening sockets, each with the descriptor the proxy finds
/// it at.
#[derive(Debug)]
pub(crate) struct ProxySockets(Vec<(OwnedFd, RawFd)>);

impl ProxySockets {
    /// Bind dns-proxy's UDP and TCP sockets and net-proxy's listener on
    /// 127.0.0.1, where the nftables rules redirect the guest's traffic.
    pub(crate) fn bind() -> io::Result<ProxySockets> {
        let dns = (Ipv4Addr::LOCALHOST, DNS_PROXY_PORT);
        let sockets = [
            (OwnedFd::from(UdpSocket::bind(dns)?), DNS_UDP_SOCKET_FD),
            (OwnedFd::from(TcpListener::bind(dns)?), DNS_TCP_SOCKET_FD),
            (OwnedFd::from(TcpListener::bind((Ipv4Addr::LOCALHOST, NET_PROXY_PORT))?), NET_SOCKET_FD),
        ];
        let mut kept = Vec::new();
        for (fd, at) in sockets {
            kept.push((keep_clear(&fd)?, at));
        }
        Ok(ProxySockets(kept))
    }

    /// Have `cmd`'s process find the sockets at their descriptors, and
    /// `ready` (the write end of a [`ready_pipe`], which must stay open
    /// until `cmd` is spawned) at [`PROXY_READY_FD`].
    fn pass_to(&self, cmd: &mut Command, ready: &OwnedFd) {
        let mut moves: Vec<(RawFd, RawFd)> = self.0.iter().map(|(fd, at)| (fd.as_raw_fd(), *at)).collect();
        moves.push((ready.as_raw_fd(), PROXY_READY_FD));
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls dup2, which is async-signal-safe, on descriptors that
        // stay open until the spawn (this struct's, which the supervising
        // thread owns, and `ready`, as documented). Every source is at or
        // above KEPT_FROM and every target below it, so no move overwrites
        // a source; dup2's copy is not close-on-exec, so the proxy gets
        // exactly these.
        unsafe {
            cmd.pre_exec(move || {
                for &(from, to) in &moves {
                    if libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// Where the proxy is, for [`wait_until_serving`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    /// Not started (none in the image, or a test).
    None,
    Starting,
    /// It said so (see [`PROXY_READY_FD`]); it stays so across restarts,
    /// since init keeps the sockets.
    Serving,
}

static PROXY_STATE: (Mutex<Proxy>, Condvar) = (Mutex::new(Proxy::None), Condvar::new());

fn set_proxy(state: Proxy) {
    *PROXY_STATE.0.lock().unwrap_or_else(PoisonError::into_inner) = state;
    PROXY_STATE.1.notify_all();
}

/// Wait until the proxy, if one was started, serves its sockets, for at
/// most `limit`; false if it still does not.
pub(crate) fn wait_until_serving(limit: Duration) -> bool {
    let state = PROXY_STATE.0.lock().unwrap_or_else(PoisonError::into_inner);
    let (state, _) = PROXY_STATE
        .1
        .wait_timeout_while(state, limit, |state| *state == Proxy::Starting)
        .unwrap_or_else(PoisonError::into_inner);
    *state != Proxy::Starting
}

/// A close-on-exec copy of `fd` at [`KEPT_FROM`] or above.
fn keep_clear(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(KEPT_FROM)).map_err(io::Error::from)?;
    // SAFETY: fcntl just returned this new descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Start `program` with `sockets` and keep restarting it, on a thread of its own.
pub(crate) fn supervise(program: String, sockets: ProxySockets) -> io::Result<()> {
    set_proxy(Proxy::Starting);
    std::thread::Builder::new().name(format!("supervise {program}")).spawn(move || {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let status = match run_once(&program, &sockets) {
                Ok(status) => status,
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

/// The pipe on which the proxy says that it serves: read end, write end
/// (at [`KEPT_FROM`] or above, for [`ProxySockets::pass_to`]).
fn ready_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    Ok((rx, keep_clear(&tx)?))
}

/// Run `program` once, noting when it serves; its status, in shell convention.
fn run_once(program: &str, sockets: &ProxySockets) -> io::Result<String> {
    let (ready_rx, ready_tx) = ready_pipe()?;
    let mut cmd = Command::new(program);
    cmd.arg("--inherited-sockets").stdin(Stdio::null()).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    sockets.pass_to(&mut cmd, &ready_tx);
    let (_child, status) = reaper::spawn(&mut cmd)?;
    // Only the proxy holds the write end now: the read ends with its byte,
    // or with end of file if it exits before serving.
    drop(ready_tx);
    let mut byte = [0; 1];
    if std::fs::File::from(ready_rx).read(&mut byte).is_ok_and(|n| n == 1) {
        set_proxy(Proxy::Serving);
    }
    Ok(status.recv().map_or_else(|_| "lost".to_string(), |s| s.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn inode(fd: &OwnedFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino()
    }

    fn sockets() -> ProxySockets {
        let sockets =
            [3, 4, 5].map(|at| (keep_clear(&OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap())).unwrap(), at));
        ProxySockets(sockets.into())
    }

    /// The child finds each socket and the pipe at their descriptors, open
    /// across exec, and not init's copies of them.
    #[test]
    fn the_sockets_reach_the_child_at_their_descriptors() {
        let sockets = sockets();
        let (_ready_rx, ready_tx) = ready_pipe().unwrap();
        let mut expected: String = sockets.0.iter().map(|(fd, _)| format!("socket:[{}]\n", inode(fd))).collect();
        expected.push_str(&format!("pipe:[{}]\n", inode(&ready_tx)));
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "readlink /proc/$$/fd/3 /proc/$$/fd/4 /proc/$$/fd/5 /proc/$$/fd/6; ls /proc/$$/fd"]);
        sockets.pass_to(&mut cmd, &ready_tx);
        let out = cmd.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with(&expected), "expected\n{expected}got\n{text}");
        let open: Vec<&str> = text.lines().skip(4).collect();
        for (copy, _) in &sockets.0 {
            let copy = copy.as_raw_fd().to_string();
            assert!(!open.contains(&copy.as_str()), "init's copy {copy} reached the child: {open:?}");
        }
    }

    /// Readiness is the proxy's byte on the pipe: one that exits without it
    /// is not waited for in vain, one that writes it is.
    #[test]
    fn the_proxy_serves_once_it_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let program = |name: &str, body: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path.display().to_string()
        };
        let sockets = sockets();
        set_proxy(Proxy::Starting);
        assert_eq!(run_once(&program("fails", "exit 3"), &sockets).unwrap(), "3");
        assert!(!wait_until_serving(Duration::from_millis(50)));

        let serves = program("serves", "sleep 0.3; printf r >&6; exec 6>&-; sleep 0.3");
        let run = std::thread::spawn(move || run_once(&serves, &sockets).unwrap());
        assert!(wait_until_serving(Duration::from_secs(30)));
        assert_eq!(run.join().unwrap(), "0");
        assert!(wait_until_serving(Duration::ZERO), "serving is kept after the proxy exits");
    }
}
