//! End to end: connections from the host into the guest. busybox `httpd`
//! serves a file on the guest's 127.0.0.1:8080; a port forward on the
//! host's loopback and `Sandbox::connect_port` reach it, a port nothing
//! listens on gives a clean close (forward) or a clear error
//! (`connect_port`), every connection is an `inbound_events` row, and the
//! listener is gone once the sandbox stops. Once for a sandbox in a
//! confined holder (the listener crosses its control socket), once for one
//! held in this process. Needs root, /dev/kvm and ./setup.sh's artefacts;
//! skips without the last two, or fails with `SANDBOX_REQUIRE_VM=1`.
// Its helper functions (outside #[test] fns) unwrap too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sandbox::{Command, Image, LogRow, PortSpec, Sandbox, SandboxBuilder, Status};

const PAGE: &str = "hello through a port forward\n";

fn builder(data: &Path) -> SandboxBuilder {
    Sandbox::builder(Image::Default)
        .memory_mib(128)
        .data_dir(data)
        .holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
        .warm()
}

/// Stops the sandbox when the test ends, passed or failed.
struct StopOnDrop(Sandbox);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop(Duration::from_secs(60));
    }
}

/// Start busybox httpd on the guest's 127.0.0.1:8080, serving [`PAGE`] as /hello.txt.
fn start_httpd(sandbox: &Sandbox) {
    let script = format!(
        "mkdir -p /tmp/www && printf '{}' > /tmp/www/hello.txt && httpd -p 127.0.0.1:8080 -h /tmp/www",
        PAGE.replace('\n', "\\n")
    );
    let out = sandbox.output(Command::new("sh").args(["-c", &script])).unwrap();
    assert_eq!(out.status, Status::Exited(0), "{}", common::text(&out.stderr));
}

/// GET /hello.txt over `stream`; the whole response.
fn get(mut stream: impl Read + Write) -> String {
    stream.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: sandbox\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn assert_page(response: &str) {
    assert!(response.starts_with("HTTP/1.") && response.contains(" 200 "), "{response}");
    assert!(response.ends_with(PAGE), "{response}");
}

/// The sandbox's inbound rows, once there are `n` of them.
fn inbound_rows(sandbox: &Sandbox, n: usize) -> Vec<sandbox::InboundRow> {
    let mut events = sandbox.events().unwrap();
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows.len() < n {
        assert!(Instant::now() < deadline, "only {} inbound rows: {rows:?}", rows.len());
        if let Some(LogRow::Inbound(row)) = events.next_timeout(Duration::from_millis(500)).unwrap() {
            rows.push(row);
        }
    }
    rows
}

fn assert_gone(host: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(host).is_ok() {
        assert!(Instant::now() < deadline, "{host} still accepts after the sandbox stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_holders_forward_reaches_httpd_in_the_guest_and_ends_with_the_sandbox() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let guard = StopOnDrop(builder(data.path()).spawn().unwrap());
    let sandbox = &guard.0;
    eprintln!("sandbox ready in {:?}", started.elapsed());
    start_httpd(sandbox);

    // The host picks the port; the caller binds it, the holder accepts on it.
    let forward = sandbox.forward_port(&PortSpec::loopback(0, 8080)).unwrap();
    assert!(forward.host.ip().is_loopback() && forward.host.port() != 0, "{forward}");
    assert_eq!(sandbox.ports(), std::slice::from_ref(&forward));
    // Another process's view: the sandbox's ports.json.
    assert_eq!(Sandbox::find_in(data.path(), sandbox.id()).unwrap().ports(), std::slice::from_ref(&forward));

    let client = TcpStream::connect(forward.host).unwrap();
    let peer = client.local_addr().unwrap().to_string();
    assert_page(&get(client));

    // Nothing listens on guest port 9: the client's connection is closed cleanly.
    let refused = sandbox.forward_port(&PortSpec::loopback(0, 9)).unwrap();
    let mut client = TcpStream::connect(refused.host).unwrap();
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);

    // connect_port: the same server without a listener, and a clear error.
    assert_page(&get(sandbox.connect_port_from(8080, Some("e2e")).unwrap()));
    let err = sandbox.connect_port(9).unwrap_err().to_string();
    assert!(err.contains("127.0.0.1:9") && err.contains("refused"), "{err}");

    let rows = inbound_rows(sandbox, 4);
    let find = |listener: &str, port: i64| {
        rows.iter().find(|r| r.listener == listener && r.guest_port == port).unwrap_or_else(|| panic!("{rows:?}"))
    };
    let row = find(&forward.host.to_string(), 8080);
    assert_eq!((row.decision.as_str(), row.peer.as_deref()), ("allowed", Some(peer.as_str())));
    assert!(row.bytes_to_guest > 0 && row.bytes_from_guest > PAGE.len() as i64, "{row:?}");
    let row = find(&refused.host.to_string(), 9);
    assert_eq!(row.decision, "error");
    assert!(row.error.as_deref().is_some_and(|e| e.contains("refused")), "{row:?}");
    let row = find(sandbox::CONNECT_PORT_LISTENER, 8080);
    assert_eq!((row.decision.as_str(), row.peer.as_deref()), ("allowed", Some("e2e")));
    assert_eq!(find(sandbox::CONNECT_PORT_LISTENER, 9).decision, "error");

    sandbox.stop(Duration::from_secs(60)).unwrap();
    assert_gone(forward.host);
    assert_gone(refused.host);
    assert!(sandbox.ports().is_empty());
    assert!(sandbox.connect_port(8080).is_err());
}

#[test]
fn a_forward_given_to_the_builder_lives_in_this_process_and_ends_with_it() {
    common::require_vm!();
    let data = tempfile::tempdir().unwrap();
    let listener = PortSpec::loopback(0, 8080).bind().unwrap();
    let host = listener.local_addr().unwrap();
    let instance = builder(data.path()).forward(listener, 8080).start().unwrap();
    start_httpd(&instance);
    assert_eq!(instance.ports().iter().map(|f| (f.host, f.guest_port)).collect::<Vec<_>>(), [(host, 8080)]);
    assert_page(&get(TcpStream::connect(host).unwrap()));
    assert_page(&get(instance.connect_port(8080).unwrap()));
    let rows = inbound_rows(&instance, 2);
    assert!(rows.iter().all(|r| r.decision == "allowed" && r.guest_port == 8080), "{rows:?}");
    instance.kill().unwrap();
    assert_gone(host);
}
