//! Host side of the guest agent: connects through the VMM's vsock Unix
//! socket (`CONNECT 5000\n` -> `OK <hostport>\n`, Firecracker's convention)
//! and speaks `guest_protocol::agent` over it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::agent::{
    read_frame, write_frame, Entry, FrameError, FrameWriter, FsErrorKind, FsRequest, GuestMessage, HostMessage,
    Identity, AGENT_PORT, CHUNK, MAX_LIST_ENTRIES, VERSION,
};

/// What went wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the sandbox's vsock socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("the VMM refused the connection to the guest agent: {0:?}")]
    Refused(String),
    #[error("guest agent: {0}")]
    Frame(#[from] FrameError),
    #[error("guest agent: {0}")]
    Io(#[from] io::Error),
    #[error("guest agent reported: {0}")]
    Remote(String),
    #[error("{path} in the guest is larger than the limit of {max} bytes")]
    TooLarge { path: String, max: u64 },
    /// A file system operation failed in the guest.
    #[error("{message}")]
    Fs { kind: FsErrorKind, message: String },
    #[error("guest agent sent {0} where it was not expected")]
    Unexpected(String),
    /// The agent refused the hello: guest image and host program were
    /// built from different sources.
    #[error("the guest agent does not speak this program's protocol ({0}): the guest image was built from other sources than this program; rebuild it with ./setup.sh")]
    Mismatch(String),
    #[error("the guest agent did not answer within {0:?} (the guest is busy: too many commands at once for its vCPUs, or stuck)")]
    Timeout(Duration),
}

/// Did a read end because its timeout passed?
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// One connection to the agent, after the version handshake.
#[derive(Debug)]
pub struct AgentConn {
    stream: UnixStream,
}

impl AgentConn {
    /// Connect through `vsock.sock` to the agent's port and say hello.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        Self::connect_with(uds, timeout, &[])
    }

    /// [`Self::connect`], sending `first` (the request) right behind the
    /// hello. The `CONNECT` line, the hello and the request leave in one
    /// write, so the request costs no round trip of its own: the VMM keeps
    /// what follows the line for the guest, and the agent checks the
    /// version before it reads the request (a wrong one is refused with a
    /// clear error, the request unread).
    pub fn connect_with(uds: &Path, timeout: Duration, first: &[HostMessage]) -> Result<Self, AgentError> {
        let connect_err = |source| AgentError::Connect { path: uds.display().to_string(), source };
        let mut stream = UnixStream::connect(uds).map_err(connect_err)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut out = format!("CONNECT {AGENT_PORT}\n").into_bytes();
        let mut frames = FrameWriter::default();
        frames.write(&mut out, &HostMessage::Hello { version: VERSION })?;
        for msg in first {
            frames.write(&mut out, msg)?;
        }
        stream.write_all(&out)?;
        // Read the reply byte by byte: what follows it belongs to the agent.
        // A VMM that refuses closes the socket over the unread hello, which
        // reads as a reset: a refusal too.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 {
            match stream.read(&mut byte) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) if timed_out(&e) => return Err(AgentError::Timeout(timeout)),
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if !line.starts_with("OK ") {
            return Err(AgentError::Refused(line));
        }
        let hello = read_frame::<GuestMessage>(&mut stream).map_err(|e| match e {
            FrameError::Io(io) if timed_out(&io) => AgentError::Timeout(timeout),
            other => other.into(),
        })?;
        match hello {
            Some(GuestMessage::Hello { version }) if version == VERSION => {}
            Some(GuestMessage::Hello { version }) => {
                return Err(AgentError::Mismatch(format!("it speaks version {version}, this program {VERSION}")))
            }
            Some(GuestMessage::Error(e)) => return Err(AgentError::Mismatch(e)),
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        stream.set_read_timeout(None)?;
        Ok(Self { stream })
    }

    /// The connection, for a request that drives it directly ([`crate::Process`]).
    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Copy `src` to `path` in the guest with `mode`.
    pub fn put_file(mut self, src: &mut dyn Read, path: &str, mode: u32) -> Result<u64, AgentError> {
        write_frame(&mut self.stream, &HostMessage::PutFile { path: path.into(), mode })?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            write_frame(&mut self.stream, &HostMessage::Data(buf[..n].to_vec()))?;
        }
        write_frame(&mut self.stream, &HostMessage::DataEnd)?;
        match read_frame::<GuestMessage>(&mut self.stream)? {
            Some(GuestMessage::DataEnd) => Ok(total),
            Some(GuestMessage::Error(e)) => Err(AgentError::Remote(e)),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Copy `path` from the guest into `dst`; more than `max` bytes is an error.
    pub fn get_file(mut self, path: &str, dst: &mut dyn Write, max: u64) -> Result<u64, AgentError> {
        write_frame(&mut self.stream, &HostMessage::GetFile { path: path.into() })?;
        let mut total = 0u64;
        loop {
            match read_frame::<GuestMessage>(&mut self.stream)? {
                Some(GuestMessage::Data(b)) => {
                    total = total.saturating_add(b.len() as u64);
                    if total > max {
                        return Err(AgentError::TooLarge { path: path.into(), max });
                    }
                    dst.write_all(&b)?;
                }
                Some(GuestMessage::DataEnd) => return Ok(total),
                Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e)),
                other => return Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Give the guest its identity: the CA it trusts, fresh entropy, the
    /// time, its hostname.
    pub fn set_identity(mut self, identity: Identity) -> Result<(), AgentError> {
        write_frame(&mut self.stream, &HostMessage::SetIdentity(identity))?;
        match read_frame::<GuestMessage>(&mut self.stream)? {
            Some(GuestMessage::DataEnd) => Ok(()),
            Some(GuestMessage::Error(e)) => Err(AgentError::Remote(e)),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Carry out a file system operation in the guest; the entries it
    /// answers with (none for a removal).
    pub fn fs(mut self, request: FsRequest) -> Result<Vec<Entry>, AgentError> {
        write_frame(&mut self.stream, &HostMessage::Fs(request))?;
        let mut entries = Vec::new();
        loop {
            match read_frame::<GuestMessage>(&mut self.stream)? {
                Some(GuestMessage::Entries(batch)) if entries.len() + batch.len() <= MAX_LIST_ENTRIES => {
                    entries.extend(batch);
                }
                Some(GuestMessage::DataEnd) => return Ok(entries),
                Some(GuestMessage::FsFailed { kind, message }) => return Err(AgentError::Fs { kind, message }),
                Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e)),
                Some(GuestMessage::Entries(_)) => {
                    return Err(AgentError::Unexpected(format!("more than {MAX_LIST_ENTRIES} entries")))
                }
                other => return Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Connect to `127.0.0.1:port` in the guest (the request sent with the
    /// hello, see [`Self::connect_with`]) and return the connection, which
    /// from then on carries that TCP connection's bytes both ways.
    pub fn open_port(uds: &Path, port: u16, timeout: Duration) -> Result<UnixStream, AgentError> {
        let mut conn = Self::connect_with(uds, timeout, &[HostMessage::Connect { port }])?;
        conn.stream.set_read_timeout(Some(timeout))?;
        let reply = read_frame::<GuestMessage>(&mut conn.stream).map_err(|e| match e {
            FrameError::Io(io) if timed_out(&io) => AgentError::Timeout(timeout),
            other => other.into(),
        })?;
        match reply {
            Some(GuestMessage::Connected) => {
                conn.stream.set_read_timeout(None)?;
                Ok(conn.stream)
            }
            Some(GuestMessage::Error(e)) => Err(AgentError::Remote(e)),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Ask the guest to stop everything and power off.
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        write_frame(&mut self.stream, &HostMessage::Shutdown)?;
        match read_frame::<GuestMessage>(&mut self.stream)? {
            Some(GuestMessage::DataEnd) | None => Ok(()),
            Some(GuestMessage::Error(e)) => Err(AgentError::Remote(e)),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Init's word that the agent listens ([`guest_protocol::console::READY`]
/// on the console), raised by the console sink.
#[derive(Debug, Default)]
pub struct ReadySignal {
    raised: Mutex<bool>,
    changed: Condvar,
}

impl ReadySignal {
    /// Say that the agent listens (init said so, or the guest was restored
    /// from a snapshot taken while it did).
    pub fn raise(&self) {
        if let Ok(mut raised) = self.raised.lock() {
            *raised = true;
            self.changed.notify_all();
        }
    }

    /// Wait at most `timeout` for the word; whether it has come.
    fn wait(&self, timeout: Duration) -> bool {
        let Ok(raised) = self.raised.lock() else { return true };
        self.changed.wait_timeout_while(raised, timeout, |raised| !*raised).map_or(true, |(raised, _)| *raised)
    }
}

/// How often [`wait_ready`] knocks on a guest whose init has not said that
/// the agent listens.
const UNANNOUNCED_KNOCK: Duration = Duration::from_secs(2);

/// Wait until the agent answers through `uds`, or `timeout` passes. The
/// connection that got the answer is returned for a first request: where
/// guest kernel code is emulated, every new connection costs the guest
/// tenths of a second.
///
/// It knocks once `ready` is raised, and every [`UNANNOUNCED_KNOCK`] before
/// that: a knock on a guest that does not listen yet costs it an interrupt
/// and a reset, tens of milliseconds of a booting guest's time where its
/// kernel code is emulated.
pub fn wait_ready(
    uds: &Path,
    timeout: Duration,
    ready: &ReadySignal,
    mut alive: impl FnMut() -> bool,
) -> Result<AgentConn, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        let announced = ready.wait(UNANNOUNCED_KNOCK.min(deadline.saturating_duration_since(Instant::now())));
        match AgentConn::connect(uds, Duration::from_secs(5)) {
            Ok(conn) => return Ok(conn),
            // An agent that answers and refuses will not change its mind.
            Err(e @ AgentError::Mismatch(_)) => return Err(e),
            Err(e) if Instant::now() >= deadline || !alive() => return Err(e),
            Err(_) if announced => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => {}
        }
    }
}

/// Read `CONNECT <port>\n` as the VMM side would (for tests of this module).
#[cfg(test)]
fn read_connect(stream: &mut UnixStream) -> io::Result<String> {
    // Byte by byte, as the VMM does: the agent's frames may follow at once.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A VMM-and-agent stand-in that answers one connection with `script`.
    pub(crate) fn fake(script: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(read_connect(&mut s).unwrap(), "CONNECT 5000\n");
            s.write_all(b"OK 1073741824\n").unwrap();
            assert_eq!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::Hello { version: VERSION }));
            write_frame(&mut s, &GuestMessage::Hello { version: VERSION }).unwrap();
            script(s);
        });
        (dir, path)
    }

    #[test]
    fn an_agent_of_another_protocol_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            read_connect(&mut s).unwrap();
            s.write_all(b"OK 1073741824\n").unwrap();
            let _ = read_frame::<HostMessage>(&mut s);
            let msg = format!("protocol version {VERSION} is not supported (agent speaks {})", VERSION - 1);
            write_frame(&mut s, &GuestMessage::Error(msg)).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let ready = ReadySignal::default();
        ready.raise();
        let started = Instant::now();
        let err = wait_ready(&path, Duration::from_secs(30), &ready, || true).unwrap_err();
        assert!(matches!(err, AgentError::Mismatch(_)), "{err}");
        assert!(err.to_string().contains("./setup.sh"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn a_booting_guest_is_knocked_on_when_init_says_the_agent_listens() {
        let (knocked_tx, knocked) = std::sync::mpsc::channel();
        let (_dir, path) = fake(move |_| knocked_tx.send(Instant::now()).unwrap());
        let ready = std::sync::Arc::new(ReadySignal::default());
        let raiser = std::sync::Arc::clone(&ready);
        let started = Instant::now();
        let raised_at = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let at = Instant::now();
            raiser.raise();
            at
        });
        wait_ready(&path, Duration::from_secs(30), &ready, || true).unwrap();
        let raised_at = raised_at.join().unwrap();
        let knocked = knocked.recv().unwrap();
        assert!(knocked >= raised_at, "knocked {:?} before the word", raised_at - knocked);
        assert!(started.elapsed() < UNANNOUNCED_KNOCK, "{:?}", started.elapsed());
    }

    #[test]
    fn a_guest_whose_init_never_says_it_listens_is_knocked_on_now_and_then() {
        let (_dir, path) = fake(|_| {});
        let started = Instant::now();
        wait_ready(&path, Duration::from_secs(30), &ReadySignal::default(), || true).unwrap();
        assert!(started.elapsed() >= UNANNOUNCED_KNOCK, "{:?}", started.elapsed());
    }

    #[test]
    fn a_guest_that_sends_more_than_the_limit_is_cut_off() {
        let (_dir, path) = fake(|mut s| {
            assert!(matches!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::GetFile { .. })));
            // A file that never ends, as /dev/zero would be.
            while write_frame(&mut s, &GuestMessage::Data(vec![0; CHUNK])).is_ok() {}
        });
        let mut got = Vec::new();
        let conn = AgentConn::connect(&path, Duration::from_secs(5)).unwrap();
        let err = conn.get_file("/dev/zero", &mut got, 3 * CHUNK as u64).unwrap_err();
        assert!(matches!(err, AgentError::TooLarge { max, .. } if max == 3 * CHUNK as u64), "{err}");
        assert_eq!(got.len(), 3 * CHUNK, "no more than the limit is written");
    }

    #[test]
    fn a_refusal_and_a_missing_socket_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let err = AgentConn::connect(&path, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("vsock.sock"), "{err}");

        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = read_connect(&mut s);
            drop(s);
        });
        let err = AgentConn::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, AgentError::Refused(_)), "{err}");
    }

    #[test]
    fn an_agent_that_does_not_answer_in_time_is_a_timeout() {
        for answer in [&b""[..], b"OK 1073741824\n"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vsock.sock");
            let listener = UnixListener::bind(&path).unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let _ = read_connect(&mut s);
                s.write_all(answer).unwrap();
                // Holds the connection, silent, until the client gives up.
                while s.read(&mut [0u8; 64]).is_ok_and(|n| n > 0) {}
            });
            let err = AgentConn::connect(&path, Duration::from_millis(200)).unwrap_err();
            assert!(matches!(err, AgentError::Timeout(_)), "{err}");
            assert!(err.to_string().contains("did not answer within 200ms"), "{err}");
        }
    }
}
