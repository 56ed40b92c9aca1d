//! Talking to the default image's guest agent through the VMM's vsock
//! socket, for the snapshot test and benchmark (`#[path]`-included).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_protocol::agent::{read_frame, write_frame, Exec, GuestMessage, HostMessage, VERSION};

/// A connection to the guest agent through the VMM's vsock socket, after
/// the `CONNECT` handshake and the agent's hello.
pub fn agent(uds: &Path) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 5000\n").map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte != *b"\n" {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            other => return Err(format!("handshake: {other:?} after {:?}", String::from_utf8_lossy(&line))),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("handshake answered {:?}", String::from_utf8_lossy(&line)));
    }
    write_frame(&mut s, &HostMessage::Hello { version: VERSION }).map_err(|e| e.to_string())?;
    match read_frame::<GuestMessage>(&mut s) {
        Ok(Some(GuestMessage::Hello { .. })) => Ok(s),
        Ok(Some(GuestMessage::Error(e))) => Err(format!("{REFUSED}: {e}")),
        other => Err(format!("hello answered {other:?}")),
    }
}

/// How [`agent`]'s error starts when the agent answered, but refused.
const REFUSED: &str = "the agent refused the hello";

/// Waits until the agent answers; returns how long that took.
pub fn wait_for_agent(uds: &Path, console: &dyn Fn() -> String, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match agent(uds) {
            Ok(_) => return started.elapsed(),
            // Not a guest still booting: an image built from other sources.
            Err(e) if e.starts_with(REFUSED) => panic!(
                "{e} (protocol version {VERSION} here): is the image built from this tree? \
                 rebuild it (./setup.sh) or point SANDBOX_IMAGE at one that is"
            ),
            Err(e) if started.elapsed() > limit => {
                panic!("the agent did not answer within {limit:?}: {e}\nconsole:\n{}", console())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Runs `script` with /bin/sh in the guest: (exit status, stdout + stderr).
pub fn sh(uds: &Path, script: &str) -> (i32, String) {
    sh_on(agent(uds).expect("agent"), script)
}

/// Runs `script` with /bin/sh on an agent connection made earlier.
pub fn sh_on(mut s: UnixStream, script: &str) -> (i32, String) {
    let exec = Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: "/".into(),
        user: None,
        tty: None,
        groups: Vec::new(),
        rlimits: Vec::new(),
    };
    write_frame(&mut s, &HostMessage::Exec(exec)).expect("agent");
    write_frame(&mut s, &HostMessage::StdinEof).expect("agent");
    let mut out = Vec::new();
    loop {
        match read_frame::<GuestMessage>(&mut s).expect("agent") {
            Some(GuestMessage::Started { .. }) => {}
            Some(GuestMessage::Stdout(b) | GuestMessage::Stderr(b)) => out.extend(b),
            Some(GuestMessage::Exited { status }) => return (status, String::from_utf8_lossy(&out).into_owned()),
            other => panic!("unexpected agent message {other:?}"),
        }
    }
}
