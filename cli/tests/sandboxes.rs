//! End to end: a long-lived sandbox on the real guest kernel, driven through
//! the CLI (`run -d`, `ps`, `ca`, `exec`, `exec -it`, `cp`, `stop`, `rm`) and
//! the library (`Sandbox::find`), and its vsock device under load: 100
//! concurrent guest-to-host connections of 1 MiB checked by digest, and a
//! reset for a port with no listener. One long boot, and a short second one
//! whose CA must differ. Needs /dev/kvm and ./setup.sh's artefacts; skips
//! without them, or fails with `SANDBOX_REQUIRE_VM=1` (./test.sh).
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sandbox, text, RemoveOnDrop, SharedBuf};
use sandbox::Sandbox;
use sha2::{Digest, Sha256};

/// Answer every connection to `listener` with the SHA-256 of what it sent,
/// each on its own thread; count the connections.
fn digest_server(listener: UnixListener) -> Arc<Mutex<usize>> {
    let served = Arc::new(Mutex::new(0));
    let count = Arc::clone(&served);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let count = Arc::clone(&count);
            std::thread::spawn(move || {
                let mut digest = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => digest.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                if stream.write_all(&digest.finalize()).is_ok() {
                    *count.lock().unwrap() += 1;
                }
            });
        }
    });
    served
}

#[test]
fn a_detached_sandbox_is_driven_from_other_processes() {
    common::require_vm!();

    let t = Instant::now();
    let started = sandbox(&["run", "-d", "--memory", "256", "default"]);
    assert!(started.status.success(), "run -d failed: {}", text(&started.stderr));
    let id = text(&started.stdout).trim().to_string();
    let _cleanup = RemoveOnDrop(id.clone());
    eprintln!("run -d returned {id} after {:?}", t.elapsed());
    assert!(sandbox::valid_id(&id), "{id:?}");

    let ps = text(&sandbox(&["ps"]).stdout);
    let line = ps.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{id} not in ps:\n{ps}"));
    assert!(line.contains("running") && line.contains("default"), "{line}");
    let found = Sandbox::find(&id[..6]).unwrap();
    assert!(found.is_running());
    assert_eq!(found.id(), id);

    let cert = own_ca_and_hostname(&id);
    assert_eq!(cert, std::fs::read_to_string(found.ca_cert()).unwrap());
    second_sandbox_has_another_ca(&id, &cert);

    interactive_shell(&id);

    // 100 concurrent guest-to-host connections of 1 MiB each, answered
    // with the digest of what arrived.
    // The sandbox's process runs as the sandbox's own uid: a host service
    // for it gives it the socket (connecting needs write permission).
    let socket = found.dir().join("vsock.sock_6000");
    let listener = UnixListener::bind(&socket).unwrap();
    let owner = std::fs::metadata(found.dir()).unwrap();
    std::os::unix::fs::chown(&socket, Some(owner.uid()), Some(owner.gid())).unwrap();
    let served = digest_server(listener);
    let t = Instant::now();
    let digests =
        sandbox(&["exec", &id, "--", "vsock-stream", "digest", "6000", "--conns", "100", "--bytes", "1048576"]);
    eprintln!("100 x 1 MiB: {:?}: {}", t.elapsed(), text(&digests.stdout).trim());
    assert_eq!(digests.status.code(), Some(0), "{}{}", text(&digests.stdout), text(&digests.stderr));
    assert!(
        text(&digests.stdout).starts_with("ok 100 connections, 1048576 bytes each, digests match"),
        "{}",
        text(&digests.stdout)
    );
    assert_eq!(*served.lock().unwrap(), 100);

    // No listener on the host: the device resets the connection at once,
    // which the guest sees as ECONNRESET (a timeout would be ETIMEDOUT).
    let refused = sandbox(&["exec", &id, "--", "vsock-stream", "refused", "6001"]);
    let said = text(&refused.stdout);
    eprintln!("no listener: {}", said.trim());
    assert_eq!(refused.status.code(), Some(0), "{said}{}", text(&refused.stderr));
    assert!(said.contains("reset by peer"), "{said}");

    // exec with stdin, separated stdout and stderr, and the exit status.
    let mut child = common::sandbox_command(&[
        "exec",
        "-i",
        "-e",
        "WHO=guest",
        "-w",
        "/tmp",
        &id,
        "--",
        "sh",
        "-c",
        "cat; echo \"$WHO in $(pwd)\" >&2; exit 7",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    child.stdin.take().unwrap().write_all(b"line one\nline two\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "line one\nline two\n");
    assert_eq!(text(&out.stderr), "guest in /tmp\n");

    // A 10 MiB file in and out, intact.
    let work = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..10 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let digest = hex(&Sha256::digest(&data));
    let local = work.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let t = Instant::now();
    let cp_in = sandbox(&["cp", local.to_str().unwrap(), &format!("{id}:/tmp/big.bin")]);
    assert!(cp_in.status.success(), "{}", text(&cp_in.stderr));
    eprintln!("10 MiB in: {:?}", t.elapsed());
    let sum = sandbox(&["exec", &id, "--", "sha256sum", "/tmp/big.bin"]);
    assert!(text(&sum.stdout).starts_with(&digest), "guest digest {} != {digest}", text(&sum.stdout));
    let t = Instant::now();
    let cp_out = sandbox(&["cp", &format!("{id}:/tmp/big.bin"), work.path().to_str().unwrap()]);
    assert!(cp_out.status.success(), "{}", text(&cp_out.stderr));
    eprintln!("10 MiB out: {:?}", t.elapsed());
    assert!(std::fs::read(work.path().join("big.bin")).unwrap() == data, "the copy out differs");
    let missing = sandbox(&["cp", &format!("{id}:/no/such/file"), work.path().join("x").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("/no/such/file"), "{}", text(&missing.stderr));
    assert!(!work.path().join("x").exists(), "a failed copy leaves no file");

    // stop: the holder stops the VM, the sandbox is listed as exited, rm deletes it.
    let stop = sandbox(&["stop", &id]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(text(&stop.stdout).trim(), id);
    assert!(!found.is_running());
    assert!(!text(&sandbox(&["ps"]).stdout).contains(&id));
    let all = text(&sandbox(&["ps", "-a"]).stdout);
    assert!(all.lines().any(|l| l.starts_with(&id) && l.contains("exited")), "{all}");
    let exec_stopped = sandbox(&["exec", &id, "--", "true"]);
    assert_eq!(exec_stopped.status.code(), Some(125));
    assert!(text(&exec_stopped.stderr).contains("not running"), "{}", text(&exec_stopped.stderr));
    let log = std::fs::read_to_string(found.dir().join("sandbox.log")).unwrap_or_default();
    assert!(log.contains("stopping: signal 15"), "{log}");
    let rm = sandbox(&["rm", &id]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(!found.dir().exists());
    let gone = sandbox(&["exec", &id, "--", "true"]);
    assert!(text(&gone.stderr).contains("no sandbox"), "{}", text(&gone.stderr));
}

/// The guest's trust bundle.
fn guest_bundle(id: &str) -> String {
    let out = sandbox(&["exec", id, "--", "cat", "/etc/ssl/certs/ca-certificates.crt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// `sandbox ca <id>` prints the certificate of the sandbox's own CA, which
/// is what its guest trusts; its hostname is its id. Returns the certificate.
fn own_ca_and_hostname(id: &str) -> String {
    let ca = sandbox(&["ca", &id[..6]]);
    assert!(ca.status.success(), "{}", text(&ca.stderr));
    let cert = text(&ca.stdout);
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----\n") && cert.ends_with("-----END CERTIFICATE-----\n"));
    assert!(!cert.contains("PRIVATE KEY"), "{cert}");
    let bundle = guest_bundle(id);
    assert!(bundle.contains(cert.trim()), "the guest does not trust the CA `sandbox ca` printed:\n{bundle}");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    let hostname = sandbox(&["exec", id, "--", "cat", "/proc/sys/kernel/hostname", "/etc/hostname"]);
    assert_eq!(text(&hostname.stdout), format!("{id}\n{id}\n"), "{}", text(&hostname.stderr));
    cert
}

/// Another sandbox gets a CA of its own: neither guest trusts the other's.
fn second_sandbox_has_another_ca(first: &str, first_cert: &str) {
    let started = sandbox(&["run", "-d", "--memory", "128", "default"]);
    assert!(started.status.success(), "run -d failed: {}", text(&started.stderr));
    let second = text(&started.stdout).trim().to_string();
    let _cleanup = RemoveOnDrop(second.clone());
    let cert = own_ca_and_hostname(&second);
    assert_ne!(cert, first_cert, "two sandboxes share a CA");
    assert!(!guest_bundle(&second).contains(first_cert.trim()));
    assert!(!guest_bundle(first).contains(cert.trim()));
    let rm = sandbox(&["rm", "--force", &second]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sandbox exec -it <id> -- sh` on a pseudo-terminal made here: the
/// guest's terminal has this one's size and follows a resize, Ctrl-C
/// reaches the guest's foreground process as SIGINT, and `exit 5` is the status.
fn interactive_shell(id: &str) {
    let size = nix::pty::Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut cmd = common::sandbox_command(&["exec", "-it", id, "--", "sh"]);
    cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and ioctl are async-signal-safe; they make the pseudo-
    // terminal on stdin the controlling terminal of the child's new session,
    // so that resizes send it SIGWINCH as a real terminal would.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    let master = std::fs::File::from(pty.master);
    let screen = SharedBuf::default();
    {
        let mut screen = screen.clone();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.write_all(&buf[..n]).unwrap();
            }
        });
    }
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let seen = screen.text();
            if seen.contains(needle) {
                break;
            }
            assert!(Instant::now() < deadline, "no {needle:?} on the terminal:\n{seen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut keys = master.try_clone().unwrap();
    keys.write_all(b"echo SIZE:$(stty size)\r").unwrap();
    wait_for("SIZE:24 80");
    let bigger = libc::winsize { ws_row: 40, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from memory that outlives the call.
    assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &bigger) }, 0);
    // The resize travels asynchronously: ask (one question at a time) until
    // the guest has it.
    for probe in 0.. {
        keys.write_all(format!("echo SIZE{probe}:$(stty size)\r").as_bytes()).unwrap();
        wait_for(&format!("\nSIZE{probe}:"));
        if screen.text().contains(&format!("\nSIZE{probe}:40 100")) {
            break;
        }
        assert!(probe < 20, "the resize did not reach the guest:\n{}", screen.text());
        std::thread::sleep(Duration::from_millis(500));
    }
    // The trap is in place before READY is printed, so the Ctrl-C that
    // follows READY must arrive as SIGINT in that guest process.
    keys.write_all(b"sh -c 'trap \"echo GOT-SIGINT; exit 3\" INT; echo READY; while :; do sleep 1; done'\r").unwrap();
    wait_for("\nREADY");
    keys.write_all(b"\x03").unwrap();
    wait_for("GOT-SIGINT\r\n");
    keys.write_all(b"echo RC:$?\r").unwrap();
    wait_for("RC:3");
    keys.write_all(b"exit 5\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "exec -it did not end after exit:\n{}", screen.text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(5), "{}", screen.text());
}
