//! Connections from the host into the guest: [`crate::Sandbox::connect_port`]
//! (one byte stream to a port on the guest's `127.0.0.1`) and port
//! forwards (a host TCP listener whose every connection is carried to one).
//!
//! Both are made by the process that holds the sandbox, on its handlers'
//! runtime, because that process alone writes the sandbox's `session.db`:
//! every connection is an `inbound_events` row (where it came in, from
//! whom, the guest port, how it ended, the bytes each way), its room
//! reserved before the guest is asked, as for every guarded action. The
//! guest side is the agent's `Connect` request (see
//! `guest_protocol::agent`): only the host asks, so nothing in the guest
//! can open a listener on the host.
//!
//! A forward's listener is bound by whoever asks for it, never by the
//! holder: [`crate::Sandbox::forward_port`] binds it (loopback unless an
//! address is given) and hands the listening socket over, on the holder's
//! control socket for a sandbox another process holds (see
//! `crate::control`). The holder only accepts: it needs no right to bind,
//! ports below 1024 work when the caller may bind them, and the choice of
//! address stays with the caller. A forward ends with its sandbox; the
//! running ones are listed in the sandbox's `ports.json`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use guest_protocol::sandbox_dir::SandboxDir;
use serde::{Deserialize, Serialize};
use telemetry::{InboundEvent, Outcome, Recorder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// How long the guest may take to accept a connection.
const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections carried at once per sandbox (a forward stops accepting
/// until one ends): each holds two descriptors and buffers in the holder.
const MAX_CONNECTIONS: usize = 256;
/// Bytes read at a time, per direction of a connection.
const BUFFER: usize = 32 * 1024;
/// How long a stopping sandbox waits for its connections to record their rows.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// What `inbound_events.listener` says for a connection [`crate::Sandbox::connect_port`] made.
pub const CONNECT_PORT_LISTENER: &str = "connect_port";

/// A forward to set up: `[HOST_ADDR:]HOST_PORT:GUEST_PORT`, as `docker run
/// -p` takes it. The host address defaults to `127.0.0.1`; host port 0
/// picks a free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The port on the guest's `127.0.0.1` connections go to.
    pub guest_port: u16,
}

impl PortSpec {
    /// Listen on `127.0.0.1:host_port`, carry to `guest_port`.
    pub fn loopback(host_port: u16, guest_port: u16) -> PortSpec {
        PortSpec { host: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port), guest_port }
    }

    /// Bind the host listener.
    pub fn bind(&self) -> Result<TcpListener, Error> {
        if self.guest_port == 0 {
            return Err(Error::Config("a forward needs a guest port (1-65535)".into()));
        }
        TcpListener::bind(self.host).map_err(|e| Error::Io(format!("listen on {}", self.host), e))
    }
}

impl FromStr for PortSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<PortSpec, Error> {
        let bad = |why: &str| {
            Error::Config(format!("port forward {spec:?}: {why} (expected [HOST_ADDR:]HOST_PORT:GUEST_PORT)"))
        };
        let (rest, guest) = spec.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
        let guest_port = guest.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("bad guest port"))?;
        let (addr, host_port) = match rest.rsplit_once(':') {
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
            Some((addr, port)) => {
                let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
                (addr.parse::<IpAddr>().map_err(|_| bad("bad host address"))?, port)
            }
        };
        let host_port = host_port.parse::<u16>().map_err(|_| bad("bad host port"))?;
        Ok(PortSpec { host: SocketAddr::new(addr, host_port), guest_port })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest_port)
    }
}

/// A forward that runs: connections to `host` reach the guest's
/// `127.0.0.1:guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// The address the host listens on (the port chosen when 0 was asked).
    pub host: SocketAddr,
    pub guest_port: u16,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.host, self.guest_port)
    }
}

/// The forwards recorded in a sandbox's `ports.json` (none if it has no
/// such file or it cannot be read).
pub(crate) fn recorded(dir: &SandboxDir) -> Vec<PortForward> {
    std::fs::read(dir.ports_file()).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

fn record_forwards(dir: &SandboxDir, forwards: &[PortForward]) -> Result<(), Error> {
    let path = dir.ports_file();
    let tmp = dir.ports_tmp_file();
    let json = serde_json::to_vec_pretty(forwards).map_err(|e| Error::Io("encode ports.json".into(), e.into()))?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::Io(format!("write {}", path.display()), e))
}

/// Where a connection came from, as its row records it.
#[derive(Debug, Clone)]
struct Origin {
    listener: String,
    peer: Option<String>,
}

/// The connections into one sandbox's guest, carried on its handlers'
/// runtime by the process that holds it. Cheap to clone; every clone is
/// the same set of forwards.
#[derive(Clone)]
pub(crate) struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: tokio::runtime::Handle,
    recorder: Recorder,
    dir: SandboxDir,
    forwards: Mutex<Vec<PortForward>>,
    closed: AtomicBool,
    /// Told once the sandbox stops: the forwards stop accepting.
    stop: tokio::sync::watch::Sender<bool>,
    /// Connections being carried (or being opened).
    active: AtomicUsize,
    slots: Arc<tokio::sync::Semaphore>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

/// Counts a connection as active while it lives.
struct Active(Arc<Inner>);

impl Active {
    fn new(inner: &Arc<Inner>) -> Active {
        inner.active.fetch_add(1, Ordering::AcqRel);
        Active(Arc::clone(inner))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Forwarder {
    /// Connections into the guest of the sandbox in `dir`, carried on
    /// `runtime` and recorded through `recorder`.
    pub(crate) fn new(runtime: tokio::runtime::Handle, recorder: Recorder, dir: &SandboxDir) -> Forwarder {
        let (stop, _) = tokio::sync::watch::channel(false);
        Forwarder {
            inner: Arc::new(Inner {
                runtime,
                recorder,
                dir: dir.clone(),
                forwards: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                stop,
                active: AtomicUsize::new(0),
                slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            }),
        }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Config("the sandbox is stopping: no new connections into it".into()));
        }
        Ok(())
    }

    /// The forwards running now.
    pub(crate) fn forwards(&self) -> Vec<PortForward> {
        self.inner.forwards.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Accept connections on `listener` (bound by the caller) until the
    /// sandbox stops, carrying each to the guest's `127.0.0.1:guest_port`.
    pub(crate) fn forward(&self, listener: TcpListener, guest_port: u16) -> Result<PortForward, Error> {
        self.check_open()?;
        if guest_port == 0 {
            return Err(Error::Config("a forward needs a guest port (1-65535)".into()));
        }
        let io = |what: &'static str| move |e| Error::Io(format!("port forward: {what}"), e);
        let host = listener.local_addr().map_err(io("read the listener's address"))?;
        listener.set_nonblocking(true).map_err(io("make the listener non-blocking"))?;
        let forward = PortForward { host, guest_port };
        {
            let mut forwards =
                self.inner.forwards.lock().map_err(|_| Error::Config("port forwards poisoned".into()))?;
            forwards.push(forward.clone());
            if let Err(e) = record_forwards(&self.inner.dir, &forwards) {
                forwards.pop();
                return Err(e);
            }
        }
        let inner = Arc::clone(&self.inner);
        let mut stop = self.inner.stop.subscribe();
        self.inner.runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(%host, "port forward: cannot use the listener: {e}");
                    return;
                }
            };
            let label = host.to_string();
            loop {
                let slot = tokio::select! {
                    slot = Arc::clone(&inner.slots).acquire_owned() => slot,
                    _ = stop.wait_for(|&stopped| stopped) => return,
                };
                let Ok(slot) = slot else { return };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.wait_for(|&stopped| stopped) => return,
                };
                match accepted {
                    Ok((client, peer)) => {
                        let origin = Origin { listener: label.clone(), peer: Some(peer.to_string()) };
                        let active = Active::new(&inner);
                        let inner = Arc::clone(&inner);
                        tokio::spawn(async move {
                            let _slot = slot;
                            carry(&inner, client, guest_port, origin, |_| {}).await;
                            drop(active);
                        });
                    }
                    Err(e) => {
                        // Out of descriptors, say: wait a little rather than spin.
                        tracing::warn!(%host, "port forward: accept: {e}");
                        drop(slot);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(%host, guest_port, "port forward added");
        Ok(forward)
    }

    /// Open a connection to the guest's `127.0.0.1:guest_port` for a
    /// caller: `pair` is a connected pair of sockets made by the caller's
    /// thread (in a confined holder only its own filter may make one), the
    /// first end the caller's. `done` gets the caller's end once the guest
    /// has accepted, or the error; the other end is carried to the guest
    /// until either side closes, and recorded.
    pub(crate) fn open(
        &self,
        guest_port: u16,
        peer: Option<String>,
        pair: (UnixStream, UnixStream),
        done: impl FnOnce(Result<UnixStream, Error>) + Send + 'static,
    ) {
        if let Err(e) = self.check_open() {
            return done(Err(e));
        }
        if guest_port == 0 {
            return done(Err(Error::Config("connect_port needs a guest port (1-65535)".into())));
        }
        let (theirs, ours) = pair;
        let inner = Arc::clone(&self.inner);
        let active = Active::new(&inner);
        self.inner.runtime.spawn(async move {
            let _active = active;
            let Ok(_slot) = Arc::clone(&inner.slots).acquire_owned().await else {
                return done(Err(Error::Config("the sandbox is stopping".into())));
            };
            let ours = match ours.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(ours)) {
                Ok(ours) => ours,
                Err(e) => return done(Err(Error::Io("connect_port: use the socket pair".into(), e))),
            };
            let origin = Origin { listener: CONNECT_PORT_LISTENER.into(), peer };
            let mut done = Some(done);
            let mut theirs = Some(theirs);
            carry(&inner, ours, guest_port, origin, |result| {
                if let (Some(done), Some(theirs)) = (done.take(), theirs.take()) {
                    done(result.map(|()| theirs));
                }
            })
            .await;
        });
    }

    /// [`Self::open`], waiting for the result on this thread.
    pub(crate) fn connect(&self, guest_port: u16, peer: Option<String>) -> Result<UnixStream, Error> {
        let pair = UnixStream::pair().map_err(|e| Error::Io("connect_port: make a socket pair".into(), e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.open(guest_port, peer, pair, move |result| {
            let _ = tx.send(result);
        });
        rx.recv_timeout(GUEST_CONNECT_TIMEOUT + Duration::from_secs(10))
            .map_err(|_| Error::Config("the sandbox stopped before the guest answered".into()))?
    }

    /// Stop accepting, forget the forwards, and give the connections still
    /// open (which end as the VM goes) a moment to record their rows.
    pub(crate) fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.inner.stop.send(true);
        if let Ok(mut forwards) = self.inner.forwards.lock() {
            forwards.clear();
        }
        let _ = std::fs::remove_file(self.inner.dir.ports_file());
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.inner.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Carry `client` to the guest's `127.0.0.1:guest_port`: reserve the row,
/// ask the guest, tell `connected` how that went, then copy both ways until
/// both directions end (or either fails), and record the row.
async fn carry<S>(
    inner: &Inner,
    client: S,
    guest_port: u16,
    origin: Origin,
    mut connected: impl FnMut(Result<(), Error>),
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = SystemTime::now();
    // Room for the row first: a connection that cannot be recorded is refused.
    let slot = match inner.recorder.reserve_to_act().await {
        Ok(slot) => slot,
        Err(e) => {
            tracing::warn!(listener = %origin.listener, guest_port, "refusing a connection into the guest: {e}");
            connected(Err(e.into()));
            return;
        }
    };
    let vsock: PathBuf = inner.dir.vsock_socket();
    let guest = tokio::task::spawn_blocking(move || {
        let stream = crate::agent::AgentConn::open_port(&vsock, guest_port, GUEST_CONNECT_TIMEOUT)?;
        stream.set_nonblocking(true)?;
        Ok::<_, crate::AgentError>(stream)
    })
    .await;
    let guest = match guest {
        Ok(Ok(stream)) => tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the connecting task failed: {e}")),
    };
    let (decision, error, to_guest, from_guest) = match guest {
        Err(e) => {
            tracing::debug!(listener = %origin.listener, guest_port, "connection into the guest refused: {e}");
            connected(Err(Error::Agent(crate::AgentError::Remote(e.clone()))));
            (Outcome::Error, Some(e), 0, 0)
        }
        Ok(guest) => {
            connected(Ok(()));
            let (to_guest, from_guest, error) = splice(client, guest, inner.stop.subscribe()).await;
            (Outcome::Allowed, error, to_guest, from_guest)
        }
    };
    let event = InboundEvent {
        started,
        finished: SystemTime::now(),
        listener: origin.listener,
        peer: origin.peer,
        guest_port,
        decision,
        bytes_to_guest: to_guest,
        bytes_from_guest: from_guest,
        error,
    };
    match slot {
        Some(slot) => slot.record_inbound(event),
        // The writer failed and the sandbox is set to serve on without rows.
        None => {
            let _ = inner.recorder.record_inbound(event);
        }
    }
}

/// Copy `from` to `to` until `from` ends, then pass the end on (a
/// half-close). Counts what was written.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    count: &mut u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // The other side may be gone already; its end is no error here.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// Carry bytes between `client` and `guest` until both directions have
/// ended, either fails (which ends both), or the sandbox stops (`stop`:
/// a client that keeps its side open must not keep the row from being
/// written). Returns the bytes sent to the guest, the bytes it sent, and
/// the failure.
async fn splice<A, B>(client: A, guest: B, mut stop: tokio::sync::watch::Receiver<bool>) -> (u64, u64, Option<String>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut guest_read, mut guest_write) = tokio::io::split(guest);
    let (mut to_guest, mut from_guest) = (0u64, 0u64);
    let error = {
        let up = pump(&mut client_read, &mut guest_write, &mut to_guest);
        let down = pump(&mut guest_read, &mut client_write, &mut from_guest);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let mut error = None;
        while !(up_done && down_done) {
            tokio::select! {
                result = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = result {
                        error = Some(format!("from the client: {e}"));
                        break;
                    }
                }
                result = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(e) = result {
                        error = Some(format!("from the guest: {e}"));
                        break;
                    }
                }
                _ = stop.wait_for(|&stopped| stopped) => {
                    error = Some("the sandbox stopped".into());
                    break;
                }
            }
        }
        error
    };
    (to_guest, from_guest, error)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use guest_protocol::agent::{read_frame, write_frame, GuestMessage, HostMessage, VERSION};
    use telemetry::query::{LogOptions, LogReader, LogRow};
    use telemetry::SessionDb;

    use super::*;

    #[test]
    fn specs_parse_as_docker_takes_them() {
        let spec = |s: &str| s.parse::<PortSpec>();
        assert_eq!(spec("8080:80").unwrap(), PortSpec::loopback(8080, 80));
        assert_eq!(spec("0:80").unwrap(), PortSpec::loopback(0, 80));
        assert_eq!(spec("0.0.0.0:8080:80").unwrap().host, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(spec("127.0.0.2:1:65535").unwrap().guest_port, 65535);
        assert_eq!(spec("[::1]:8080:80").unwrap().host, "[::1]:8080".parse().unwrap());
        assert_eq!(spec("::1:8080:80").unwrap().host, "[::1]:8080".parse().unwrap());
        assert_eq!(spec("[::1]:8080:80").unwrap().to_string(), "[::1]:8080:80");
        assert_eq!(spec("8080:80").unwrap().to_string(), "127.0.0.1:8080:80");
        for bad in
            ["", "80", "8080:", ":80", "8080:0", "8080:65536", "70000:80", "localhost:8080:80", "a:b", "1.2.3:1:2"]
        {
            let err = spec(bad).unwrap_err().to_string();
            assert!(err.contains("HOST_PORT:GUEST_PORT"), "{bad}: {err}");
        }
    }

    /// A VMM-and-agent stand-in: answers every `Connect` to port 7 with an
    /// echo of what it is sent (upper-cased), and refuses any other port.
    pub(crate) fn fake_guest(dir: &std::path::Path) {
        let listener = UnixListener::bind(dir.join("vsock.sock")).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut s = stream.unwrap();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    assert_eq!(line, b"CONNECT 5000");
                    s.write_all(b"OK 1\n").unwrap();
                    assert_eq!(
                        read_frame::<HostMessage>(&mut s).unwrap(),
                        Some(HostMessage::Hello { version: VERSION })
                    );
                    write_frame(&mut s, &GuestMessage::Hello { version: VERSION }).unwrap();
                    match read_frame::<HostMessage>(&mut s).unwrap() {
                        Some(HostMessage::Connect { port: 7 }) => {
                            write_frame(&mut s, &GuestMessage::Connected).unwrap();
                            let mut buf = [0u8; 4096];
                            loop {
                                let n = s.read(&mut buf).unwrap();
                                if n == 0 {
                                    break;
                                }
                                s.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
                            }
                            s.shutdown(std::net::Shutdown::Write).unwrap();
                        }
                        Some(HostMessage::Connect { port }) => {
                            let e = format!("connecting to 127.0.0.1:{port} in the guest: Connection refused");
                            write_frame(&mut s, &GuestMessage::Error(e)).unwrap();
                        }
                        other => panic!("{other:?}"),
                    }
                });
            }
        });
    }

    fn inbound_rows(db: &std::path::Path) -> Vec<telemetry::query::InboundRow> {
        let mut reader = LogReader::open(db, &LogOptions { inbound: true, ..LogOptions::default() }).unwrap();
        let (rows, _) = reader.read_new().unwrap();
        rows.into_iter().filter_map(|r| if let LogRow::Inbound(i) = r { Some(i) } else { None }).collect()
    }

    #[test]
    fn forwards_carry_connections_record_each_and_end_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox_dir = SandboxDir::new(dir.path());
        fake_guest(dir.path());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let session = SessionDb::open(&sandbox_dir.session_db()).unwrap();
        let forwarder = Forwarder::new(runtime.handle().clone(), session.recorder(), &sandbox_dir);

        // A forward: its listener is the caller's, with the port it chose.
        let listener = PortSpec::loopback(0, 7).bind().unwrap();
        let forward = forwarder.forward(listener, 7).unwrap();
        assert_eq!(forward.host.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(forward.host.port(), 0);
        assert_eq!(recorded(&sandbox_dir), std::slice::from_ref(&forward));
        assert_eq!(forwarder.forwards(), std::slice::from_ref(&forward));

        let mut client = std::net::TcpStream::connect(forward.host).unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).unwrap();
        assert_eq!(back, "HELLO");
        let peer = client.local_addr().unwrap().to_string();

        // A forward to a port nothing listens on: the client sees a clean close.
        let refused = forwarder.forward(PortSpec::loopback(0, 9).bind().unwrap(), 9).unwrap();
        let mut client = std::net::TcpStream::connect(refused.host).unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);

        // connect_port: a stream, and a clear error for a closed port.
        let mut stream = forwarder.connect(7, Some("api".into())).unwrap();
        stream.write_all(b"abc").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).unwrap();
        assert_eq!(back, "ABC");
        let err = forwarder.connect(9, None).unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:9") && err.contains("refused"), "{err}");
        assert!(forwarder.connect(0, None).is_err());

        // A client that keeps its side open: close ends it, and its row is written.
        let mut open = std::net::TcpStream::connect(forward.host).unwrap();
        open.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).unwrap();
        let started = Instant::now();
        forwarder.close();
        assert!(started.elapsed() < DRAIN_TIMEOUT, "close waited for the open connection");
        assert!(recorded(&sandbox_dir).is_empty() && !sandbox_dir.ports_file().exists());
        assert!(forwarder.forward(PortSpec::loopback(0, 7).bind().unwrap(), 7).is_err());
        assert!(forwarder.connect(7, None).is_err());
        // The listeners are gone with the forwards (the task drops them).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(forward.host).is_ok() {
            assert!(Instant::now() < deadline, "the forward still accepts");
            std::thread::sleep(Duration::from_millis(20));
        }

        runtime.block_on(session.close()).unwrap();
        let rows = inbound_rows(&sandbox_dir.session_db());
        let summary: Vec<_> = rows
            .iter()
            .map(|r| (r.listener.clone(), r.guest_port, r.decision.as_str(), r.bytes_to_guest, r.bytes_from_guest))
            .collect();
        let host = forward.host.to_string();
        assert_eq!(
            summary,
            [
                (host.clone(), 7, "allowed", 5, 5),
                (refused.host.to_string(), 9, "error", 0, 0),
                (CONNECT_PORT_LISTENER.to_string(), 7, "allowed", 3, 3),
                (CONNECT_PORT_LISTENER.to_string(), 9, "error", 0, 0),
                (host.clone(), 7, "allowed", 1, 1),
            ]
        );
        assert_eq!(rows[4].error.as_deref(), Some("the sandbox stopped"));
        assert_eq!(rows[0].peer.as_deref(), Some(peer.as_str()));
        assert_eq!(rows[2].peer.as_deref(), Some("api"));
        assert!(rows[1].error.as_deref().is_some_and(|e| e.contains("refused")), "{:?}", rows[1]);
    }
}
