//! Keeps the guest proxy running: it is restarted when it exits, with a
//! backoff that grows while it keeps failing, and every restart is logged on
//! the console.
//!
//! Init binds the proxy's listening sockets itself, before the proxy first
//! starts, and keeps them: a connection or DNS packet that arrives while the
//! proxy starts (which takes seconds where guest kernel code is emulated)
//! or restarts waits in the socket instead of being refused.

use std::io;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_protocol::ports::{DNS_PROXY_PORT, DNS_TCP_SOCKET_FD, DNS_UDP_SOCKET_FD, NET_PROXY_PORT, NET_SOCKET_FD};
use nix::fcntl::{fcntl, FcntlArg};

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

    /// Have `cmd`'s process find the sockets at their descriptors.
    fn pass_to(&self, cmd: &mut Command) {
        let moves: Vec<(RawFd, RawFd)> = self.0.iter().map(|(fd, at)| (fd.as_raw_fd(), *at)).collect();
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls dup2, which is async-signal-safe, on descriptors this
        // struct keeps open for as long as it lives (the supervising thread
        // owns it). Every source is at or above KEPT_FROM and every target
        // below it, so no move overwrites a source; dup2's copy is not
        // close-on-exec, so the proxy gets exactly these three.
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

/// A close-on-exec copy of `fd` at [`KEPT_FROM`] or above.
fn keep_clear(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(KEPT_FROM)).map_err(io::Error::from)?;
    // SAFETY: fcntl just returned this new descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Start `program` with `sockets` and keep restarting it, on a thread of its own.
pub(crate) fn supervise(program: String, sockets: ProxySockets) -> io::Result<()> {
    std::thread::Builder::new().name(format!("supervise {program}")).spawn(move || {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let mut cmd = Command::new(&program);
            cmd.arg("--inherited-sockets")
                .stdin(Stdio::null())
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            sockets.pass_to(&mut cmd);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// The child finds each socket at its descriptor, open across exec, and
    /// not init's copies of them.
    #[test]
    fn the_sockets_reach_the_child_at_their_descriptors() {
        let mut kept = Vec::new();
        let mut expected = String::new();
        for at in [3, 4, 5] {
            let socket = OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap());
            let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd())).unwrap().ino();
            expected.push_str(&format!("socket:[{inode}]\n"));
            kept.push((keep_clear(&socket).unwrap(), at));
        }
        let copies: Vec<String> = kept.iter().map(|(fd, _)| fd.as_raw_fd().to_string()).collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "readlink /proc/$$/fd/3 /proc/$$/fd/4 /proc/$$/fd/5; ls /proc/$$/fd"]);
        let sockets = ProxySockets(kept);
        sockets.pass_to(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with(&expected), "expected\n{expected}got\n{text}");
        let open: Vec<&str> = text.lines().skip(3).collect();
        for copy in &copies {
            assert!(!open.contains(&copy.as_str()), "init's copy {copy} reached the child: {open:?}");
        }
    }
}
