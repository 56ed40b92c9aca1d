//! The holder's control socket: how another process asks the process that
//! holds a sandbox to do what only it can: take a snapshot (which needs the
//! VM itself, not just its agent), and carry connections into the guest
//! (which it records in the `session.db` it alone writes; see `crate::ports`).
//!
//! A holder listens on `<sandbox dir>/control.sock` once its sandbox is
//! ready. The directory is the sandbox's private one (mode 0700, owned by
//! the holder's uid), so only root and the holder reach the socket. A
//! client sends one [`ControlRequest`] as a JSON line and reads one
//! [`ControlReply`] line. A descriptor may travel with either line
//! (`SCM_RIGHTS`): a forward's listening socket with
//! [`ControlRequest::Forward`], the caller's end of a connection with the
//! reply to [`ControlRequest::Connect`]. Snapshots are carried out by the
//! holder's main loop one at a time; port requests by the control thread
//! and the handlers' runtime, so a connection does not wait for a
//! snapshot, nor for another connection. The holder writes only inside its
//! own directory (a confined holder cannot write anywhere else); the client
//! moves what it wrote to where it belongs.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::ports::{Forwarder, PortForward};
use crate::Error;

/// The socket's file name in the sandbox's directory.
const CONTROL_SOCKET: &str = "control.sock";
/// The longest request line a holder reads.
const MAX_REQUEST_BYTES: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the reply (a snapshot writes the guest's
/// memory; on a loaded host that takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest reply line a client reads.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// What a client asks of a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlRequest {
    /// Write a snapshot of the VM into `<sandbox dir>/<name>` (a new
    /// directory; `name` is a sandbox id, so it cannot leave the
    /// directory), then let the VM run on, or stop the sandbox if `stop`.
    Snapshot { name: String, stop: bool },
    /// Accept connections on the listening TCP socket sent with this
    /// request and carry each to the guest's `127.0.0.1:guest_port`, until
    /// the sandbox stops. Answered with [`ControlReply::Forwarding`].
    Forward { guest_port: u16 },
    /// Open a connection to the guest's `127.0.0.1:guest_port`; `peer` says
    /// for whom (recorded). Answered with `Done` and the caller's end of
    /// the connection.
    Connect {
        guest_port: u16,
        #[serde(default)]
        peer: Option<String>,
    },
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlReply {
    Done,
    Error(String),
    Forwarding(PortForward),
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
/// well-formed snapshot request to `calls` as a [`ControlCall`], from a
/// thread of its own (`control`) that lives as long as the process. `wrap`
/// turns a call into whatever the receiving loop takes. Port requests go to
/// `ports`.
pub(crate) fn serve<T: Send + 'static>(
    dir: &Path,
    calls: mpsc::Sender<T>,
    wrap: fn(ControlCall) -> T,
    ports: Option<Forwarder>,
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
                if let Err(e) = serve_one(stream, &calls, wrap, ports.as_ref()) {
                    tracing::warn!("control socket: {e}");
                }
            }
        })
        .map_err(|e| Error::Io("start the control thread".into(), e))?;
    Ok(())
}

fn serve_one<T>(
    stream: UnixStream,
    calls: &mpsc::Sender<T>,
    wrap: fn(ControlCall) -> T,
    ports: Option<&Forwarder>,
) -> Result<(), Error> {
    let io = |what: &'static str| move |e| Error::Io(format!("control socket: {what}"), e);
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io("set a timeout"))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io("set a timeout"))?;
    // Descriptors sent with a request that takes none are closed here.
    let (line, mut fds) = recv_line(&stream, MAX_REQUEST_BYTES).map_err(io("read a request"))?;
    let reply = match serde_json::from_slice::<ControlRequest>(&line) {
        Err(e) => ControlReply::Error(format!("not a control request: {e}")),
        Ok(ControlRequest::Forward { guest_port }) => match (ports, fds.pop()) {
            (None, _) => ControlReply::Error("this holder carries no connections into its guest".into()),
            (Some(_), None) => ControlReply::Error("a forward request comes with its listening socket".into()),
            (Some(ports), Some(fd)) => match listening_tcp(fd).and_then(|l| ports.forward(l, guest_port)) {
                Ok(forward) => ControlReply::Forwarding(forward),
                Err(e) => ControlReply::Error(e.to_string()),
            },
        },
        Ok(ControlRequest::Connect { guest_port, peer }) => {
            let Some(ports) = ports else {
                return send_line(
                    &stream,
                    &ControlReply::Error("this holder carries no connections into its guest".into()),
                    None,
                )
                .map_err(io("send the reply"));
            };
            // Made on this thread (the handlers' threads may not make one);
            // the reply is sent once the guest has answered, from the
            // handlers' runtime, while this thread serves the next request.
            let pair = UnixStream::pair().map_err(io("make a socket pair"))?;
            ports.open(guest_port, peer, pair, move |result| {
                let sent = match result {
                    Ok(theirs) => send_line(&stream, &ControlReply::Done, Some(theirs.as_raw_fd())),
                    Err(e) => send_line(&stream, &ControlReply::Error(e.to_string()), None),
                };
                if let Err(e) = sent {
                    tracing::warn!("control socket: send the reply to a connect request: {e}");
                }
            });
            return Ok(());
        }
        Ok(request @ ControlRequest::Snapshot { .. }) => {
            let (tx, rx) = mpsc::channel();
            if calls.send(wrap(ControlCall { request, reply: tx })).is_err() {
                ControlReply::Error("the holder is stopping".into())
            } else {
                rx.recv().unwrap_or_else(|_| ControlReply::Error("the holder is stopping".into()))
            }
        }
    };
    send_line(&stream, &reply, None).map_err(io("send the reply"))
}

/// `fd` as a listening TCP socket, or why it is not one.
fn listening_tcp(fd: OwnedFd) -> Result<std::net::TcpListener, Error> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    let not = |why: String| Error::Config(format!("a forward needs a listening TCP socket: {why}"));
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(|e| not(e.to_string()))?;
    let stream = getsockopt(&fd, sockopt::SockType).map_err(|e| not(e.to_string()))? == SockType::Stream;
    if !listening || !stream {
        return Err(not("the socket sent is not listening for TCP connections".into()));
    }
    let listener = std::net::TcpListener::from(fd);
    listener.local_addr().map_err(|e| not(format!("not an IP socket ({e})")))?;
    Ok(listener)
}

/// Send `message` as one JSON line, with `fd` if given.
fn send_line(stream: &UnixStream, message: &impl Serialize, fd: Option<RawFd>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let fds = fd.map(|fd| [fd]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.as_ref().map(|f| ControlMessage::ScmRights(f)).into_iter().collect();
    let mut sent = 0;
    while sent < line.len() {
        // The descriptor goes with the first byte.
        let cmsgs = if sent == 0 { cmsgs.as_slice() } else { &[] };
        let iov = [IoSlice::new(&line[sent..])];
        match sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read one line (at most `max` bytes, without its newline) and the
/// descriptors that came with it.
fn recv_line(stream: &UnixStream, max: usize) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while line.len() < max && !line.contains(&b'\n') {
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let want = buf.len().min(max - line.len());
        let mut iov = [IoSliceMut::new(&mut buf[..want])];
        let (n, received) =
            match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut received = Vec::new();
                    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(list) = cmsg {
                            received.extend(list);
                        }
                    }
                    (msg.bytes, received)
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
        for fd in received {
            // SAFETY: the kernel just installed this descriptor for this
            // process (SCM_RIGHTS); nothing else owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    if let Some(end) = line.iter().position(|&b| b == b'\n') {
        line.truncate(end);
    }
    Ok((line, fds))
}

/// Send `request` (with `fd`, if given) to the holder of the sandbox in
/// `dir` and wait for its reply, and the descriptor that came with it.
pub(crate) fn call_with(
    dir: &Path,
    request: &ControlRequest,
    fd: Option<RawFd>,
) -> Result<(ControlReply, Option<OwnedFd>), Error> {
    let path = socket_path(dir);
    let io = |what: &'static str| {
        let path = path.display().to_string();
        move |e| Error::Io(format!("{what} {path}"), e)
    };
    let stream = UnixStream::connect(&path).map_err(io("connect to the holder's control socket"))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io("set a timeout on"))?;
    send_line(&stream, request, fd).map_err(io("send a request to"))?;
    let (line, mut fds) = recv_line(&stream, MAX_REPLY_BYTES).map_err(io("read the reply from"))?;
    match serde_json::from_slice::<ControlReply>(&line) {
        Ok(ControlReply::Error(message)) => Err(Error::Holder(message)),
        Ok(reply) => Ok((reply, fds.pop())),
        Err(_) if line.is_empty() => Err(Error::Holder("it closed the control connection without a reply".into())),
        Err(e) => Err(Error::Holder(format!("its control reply is not valid: {e}"))),
    }
}

/// Send `request` to the holder of the sandbox in `dir` and wait for its reply.
pub(crate) fn call(dir: &Path, request: &ControlRequest) -> Result<(), Error> {
    match call_with(dir, request, None)? {
        (ControlReply::Done, _) => Ok(()),
        (other, _) => Err(Error::Holder(format!("unexpected control reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A holder stand-in: serves the socket and answers each call from a
    /// loop, as the holder's main loop does.
    fn holder(dir: &Path, answer: fn(&ControlRequest) -> ControlReply) {
        let (tx, rx) = mpsc::channel::<ControlCall>();
        serve(dir, tx, |call| call, None).unwrap();
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
            _ => ControlReply::Error("unexpected".into()),
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
            if garbage.len() < MAX_REQUEST_BYTES {
                read.unwrap();
                assert!(reply.contains("not a control request"), "{reply}");
            }
        }
        call(dir.path(), &ControlRequest::Snapshot { name: "a".into(), stop: false }).unwrap();
    }

    #[test]
    fn port_requests_pass_descriptors_both_ways() {
        use guest_protocol::sandbox_dir::SandboxDir;
        let dir = tempfile::tempdir().unwrap();
        crate::ports::tests::fake_guest(dir.path());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let sandbox_dir = SandboxDir::new(dir.path());
        let session = telemetry::SessionDb::open(&sandbox_dir.session_db()).unwrap();
        let forwarder = Forwarder::new(runtime.handle().clone(), session.recorder(), &sandbox_dir);
        let (tx, _calls) = mpsc::channel::<ControlCall>();
        serve(dir.path(), tx, |call| call, Some(forwarder)).unwrap();

        // The listener crosses to the holder, which accepts on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap();
        let request = ControlRequest::Forward { guest_port: 7 };
        let (reply, _) = call_with(dir.path(), &request, Some(listener.as_raw_fd())).unwrap();
        assert_eq!(reply, ControlReply::Forwarding(PortForward { host, guest_port: 7 }));
        drop(listener);
        let mut client = std::net::TcpStream::connect(host).unwrap();
        client.write_all(b"hi").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).unwrap();
        assert_eq!(back, "HI");

        // The caller's end of a connection crosses back.
        let request = ControlRequest::Connect { guest_port: 7, peer: Some("test".into()) };
        let (reply, fd) = call_with(dir.path(), &request, None).unwrap();
        assert_eq!(reply, ControlReply::Done);
        let mut stream = UnixStream::from(fd.unwrap());
        stream.write_all(b"abc").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).unwrap();
        assert_eq!(back, "ABC");

        let err = call_with(dir.path(), &ControlRequest::Connect { guest_port: 9, peer: None }, None).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        let err = call_with(dir.path(), &ControlRequest::Forward { guest_port: 7 }, None).unwrap_err();
        assert!(err.to_string().contains("listening socket"), "{err}");
        let (a, _b) = UnixStream::pair().unwrap();
        let err = call_with(dir.path(), &ControlRequest::Forward { guest_port: 7 }, Some(a.as_raw_fd())).unwrap_err();
        assert!(err.to_string().contains("listening TCP socket"), "{err}");
        let unbound = std::net::TcpStream::connect(host).unwrap();
        let err =
            call_with(dir.path(), &ControlRequest::Forward { guest_port: 7 }, Some(unbound.as_raw_fd())).unwrap_err();
        assert!(err.to_string().contains("listening TCP socket"), "{err}");
    }

    #[test]
    fn no_holder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(dir.path(), &ControlRequest::Snapshot { name: "a".into(), stop: false }).unwrap_err();
        assert!(err.to_string().contains("control socket"), "{err}");
    }
}
