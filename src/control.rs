//! The holder's control socket: how another process asks the process that
//! holds a sandbox to do what only it can (today: take a snapshot, which
//! needs the VM itself, not just its agent).
//!
//! A holder listens on `<sandbox dir>/control.sock` once its sandbox is
//! ready. The directory is the sandbox's private one (mode 0700, owned by
//! the holder's uid), so only root and the holder reach the socket. A
//! client sends one [`ControlRequest`] as a JSON line and reads one
//! [`ControlReply`] line; the holder serves one request at a time. The
//! holder writes only inside its own directory (a confined holder cannot
//! write anywhere else); the client moves what it wrote to where it
//! belongs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The socket's file name in the sandbox's directory.
const CONTROL_SOCKET: &str = "control.sock";
/// The longest request line a holder reads.
const MAX_REQUEST_BYTES: u64 = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the reply (a snapshot writes the guest's
/// memory; on a loaded host that takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// What a client asks of a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlRequest {
    /// Write a snapshot of the VM into `<sandbox dir>/<name>` (a new
    /// directory; `name` is a sandbox id, so it cannot leave the
    /// directory), then let the VM run on, or stop the sandbox if `stop`.
    Snapshot { name: String, stop: bool },
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlReply {
    Done,
    Error(String),
}

/// A request the holder's main loop is to carry out, and where its reply goes.
pub(crate) struct ControlCall {
    pub request: ControlRequest,
    pub reply: mpsc::Sender<ControlReply>,
}

/// The control socket of the sandbox in `dir`.
pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Listen on the control socket of the sandbox in `dir`, and hand every
/// well-formed request to `calls` as a [`ControlCall`], from a thread of
/// its own (`control`) that lives as long as the process. `wrap` turns a
/// call into whatever the receiving loop takes.
pub(crate) fn serve<T: Send + 'static>(
    dir: &Path,
    calls: mpsc::Sender<T>,
    wrap: fn(ControlCall) -> T,
) -> Result<(), Error> {
    let path = socket_path(dir);
    // A socket file left by a holder that was killed.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| Error::Io(format!("listen on {}", path.display()), e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Err(e) = serve_one(stream, &calls, wrap) {
                    tracing::warn!("control socket: {e}");
                }
            }
        })
        .map_err(|e| Error::Io("start the control thread".into(), e))?;
    Ok(())
}

fn serve_one<T>(stream: UnixStream, calls: &mpsc::Sender<T>, wrap: fn(ControlCall) -> T) -> Result<(), Error> {
    let io = |what: &'static str| move |e| Error::Io(format!("control socket: {what}"), e);
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io("set a timeout"))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REQUEST_BYTES)).read_until(b'\n', &mut line).map_err(io("read a request"))?;
    let reply = match serde_json::from_slice::<ControlRequest>(&line) {
        Err(e) => ControlReply::Error(format!("not a control request: {e}")),
        Ok(request) => {
            let (tx, rx) = mpsc::channel();
            if calls.send(wrap(ControlCall { request, reply: tx })).is_err() {
                ControlReply::Error("the holder is stopping".into())
            } else {
                rx.recv().unwrap_or_else(|_| ControlReply::Error("the holder is stopping".into()))
            }
        }
    };
    send_line(&stream, &reply).map_err(io("send the reply"))
}

fn send_line(mut stream: &UnixStream, message: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Send `request` to the holder of the sandbox in `dir` and wait for its reply.
pub(crate) fn call(dir: &Path, request: &ControlRequest) -> Result<(), Error> {
    let path = socket_path(dir);
    let io = |what: &'static str| {
        let path = path.display().to_string();
        move |e| Error::Io(format!("{what} {path}"), e)
    };
    let stream = UnixStream::connect(&path).map_err(io("connect to the holder's control socket"))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io("set a timeout on"))?;
    send_line(&stream, request).map_err(io("send a request to"))?;
    let mut line = String::new();
    BufReader::new((&stream).take(64 * 1024)).read_line(&mut line).map_err(io("read the reply from"))?;
    match serde_json::from_str::<ControlReply>(line.trim()) {
        Ok(ControlReply::Done) => Ok(()),
        Ok(ControlReply::Error(message)) => Err(Error::Holder(message)),
        Err(_) if line.is_empty() => Err(Error::Holder("it closed the control connection without a reply".into())),
        Err(e) => Err(Error::Holder(format!("its control reply is not valid: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder stand-in: serves the socket and answers each call from a
    /// loop, as the holder's main loop does.
    fn holder(dir: &Path, answer: fn(&ControlRequest) -> ControlReply) {
        let (tx, rx) = mpsc::channel::<ControlCall>();
        serve(dir, tx, |call| call).unwrap();
        std::thread::spawn(move || {
            for call in rx {
                let _ = call.reply.send(answer(&call.request));
            }
        });
    }

    #[test]
    fn a_request_gets_the_holders_reply() {
        let dir = tempfile::tempdir().unwrap();
        holder(dir.path(), |request| match request {
            ControlRequest::Snapshot { name, stop: false } if name == "ok" => ControlReply::Done,
            ControlRequest::Snapshot { .. } => ControlReply::Error("disk full".into()),
        });
        call(dir.path(), &ControlRequest::Snapshot { name: "ok".into(), stop: false }).unwrap();
        let err = call(dir.path(), &ControlRequest::Snapshot { name: "x".into(), stop: true }).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn garbage_gets_an_error_reply_and_the_socket_serves_on() {
        let dir = tempfile::tempdir().unwrap();
        holder(dir.path(), |_| ControlReply::Done);
        for garbage in [&b"{\"reboot\":{}}\n"[..], b"\xff\xfe\n", &[b'x'; 5000]] {
            let mut stream = UnixStream::connect(socket_path(dir.path())).unwrap();
            stream.write_all(garbage).unwrap();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut reply = String::new();
            let read = stream.read_to_string(&mut reply);
            // Past the limit the holder stops reading: its reply may be
            // lost to the reset of a socket closed with unread bytes.
            if garbage.len() < MAX_REQUEST_BYTES as usize {
                read.unwrap();
                assert!(reply.contains("not a control request"), "{reply}");
            }
        }
        call(dir.path(), &ControlRequest::Snapshot { name: "a".into(), stop: false }).unwrap();
    }

    #[test]
    fn no_holder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(dir.path(), &ControlRequest::Snapshot { name: "a".into(), stop: false }).unwrap_err();
        assert!(err.to_string().contains("control socket"), "{err}");
    }
}
