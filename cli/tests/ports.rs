//! End to end through the CLI: `run -d -p` forwards a host port to busybox
//! `httpd` in the guest, `sandbox port` adds one to the running sandbox and
//! lists them, `ps` shows them, `logs --inbound` shows each connection, and
//! `stop` ends the listeners. Its own data directory. Needs root, /dev/kvm
//! and ./setup.sh's artefacts; skips without the last two, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::text;

fn sandbox(data: &Path, args: &[&str]) -> Output {
    common::sandbox_with_env(args, &[("SANDBOX_DATA", data.to_str().unwrap())])
}

/// Removes the sandbox when the test ends, passed or failed.
struct RemoveOnDrop<'a>(&'a Path, String);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = sandbox(self.0, &["rm", "--force", &self.1]);
    }
}

fn get(host: SocketAddr) -> String {
    let mut stream = TcpStream::connect(host).unwrap();
    stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn run_p_and_sandbox_port_forward_host_ports_to_the_guest() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    let data = data.path();
    let started = sandbox(data, &["run", "-d", "-p", "127.0.0.1:0:8080", "--memory", "128", "default"]);
    assert!(started.status.success(), "run -d failed: {}", text(&started.stderr));
    let id = text(&started.stdout).trim().to_string();
    let _guard = RemoveOnDrop(data, id.clone());
    // `sandbox: port 127.0.0.1:PORT -> 8080` on stderr.
    let stderr = text(&started.stderr);
    let line = stderr.lines().find_map(|l| l.strip_prefix("sandbox: port ")).unwrap_or_else(|| panic!("{stderr}"));
    let (host, guest) = line.split_once(" -> ").unwrap();
    assert_eq!(guest, "8080");
    let host: SocketAddr = host.parse().unwrap();
    assert!(host.ip().is_loopback() && host.port() != 0, "{host}");

    let serve = "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && httpd -p 127.0.0.1:8080 -h /tmp/www";
    let out = sandbox(data, &["exec", &id, "--", "sh", "-c", serve]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let response = get(host);
    assert!(response.contains(" 200 ") && response.ends_with("forwarded\n"), "{response}");

    // A second forward on a running sandbox: its address on stdout.
    let added = sandbox(data, &["port", &id, "0:8080"]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    let second: SocketAddr = text(&added.stdout).trim().parse().unwrap();
    assert!(get(second).ends_with("forwarded\n"));
    let bad = sandbox(data, &["port", &id, "8080"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("HOST_PORT:GUEST_PORT"), "{}", text(&bad.stderr));

    let listed = text(&sandbox(data, &["port", &id]).stdout);
    assert_eq!(listed, format!("{host} -> 8080\n{second} -> 8080\n"));
    let ps = text(&sandbox(data, &["ps"]).stdout);
    assert!(ps.contains(&format!("{host}->8080, {second}->8080")), "{ps}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = text(&sandbox(data, &["logs", &id, "--inbound"]).stdout);
        if logs.lines().filter(|l| l.contains("-> guest:8080") && l.contains("allowed")).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no inbound rows: {logs}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let stopped = sandbox(data, &["stop", &id]);
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
    for addr in [host, second] {
        assert!(TcpStream::connect(addr).is_err(), "{addr} still accepts after stop");
    }
}
