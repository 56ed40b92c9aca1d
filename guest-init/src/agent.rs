//! The guest agent: serves the host's requests on vsock port 5000 (see
//! `guest_protocol::agent`). Each connection runs on its own thread and
//! carries one request; garbage or an oversized frame ends that connection
//! with a logged error and never disturbs the others.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::agent::{
    read_frame, write_frame, Exec, FrameError, FrameReader, FrameWriter, GuestMessage, HostMessage, WinSize, CHUNK,
    VERSION,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{command, reaper};

/// A stream the agent can serve: a vsock connection, or a Unix socket in tests.
pub(crate) trait Connection: Read + Write + Send + 'static {
    /// A second handle on the same connection (for a writer thread).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>>;
    /// Close both directions, waking a reader blocked on it.
    fn shutdown_conn(&self);
    /// The socket's descriptor (to poll it and to close one direction).
    fn fd(&self) -> RawFd;
}

impl Connection for std::os::unix::net::UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// A vsock connection.
struct VsockConn(std::fs::File);

impl Read for VsockConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockConn {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(VsockConn(self.0.try_clone()?)))
    }
    fn shutdown_conn(&self) {
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// How long the answer to an identity waits for the network proxy to
/// serve (it starts at boot, and takes seconds where guest kernel code is
/// emulated).
const PROXY_START_LIMIT: Duration = Duration::from_secs(20);

/// Listen on vsock `port` and serve every connection on its own thread.
pub(crate) fn listen(port: u32, shutdown: Sender<()>) -> io::Result<()> {
    use nix::sys::socket::{
        accept, bind, listen as sock_listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    sock_listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
    std::thread::Builder::new().name("agent".into()).spawn(move || loop {
        match accept(fd.as_raw_fd()) {
            Ok(conn) => {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
                let shutdown = shutdown.clone();
                let spawned = std::thread::Builder::new()
                    .name("agent-conn".into())
                    .spawn(move || serve(Box::new(VsockConn(std::fs::File::from(conn))), &shutdown));
                if let Err(e) = spawned {
                    crate::log(&format!("agent: cannot start a connection thread: {e}"));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                crate::log(&format!("agent: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })?;
    Ok(())
}

/// Shared writer for the frames of one connection.
type Writer = Arc<Mutex<(Box<dyn Connection>, FrameWriter)>>;

fn send(w: &Writer, msg: &GuestMessage) -> Result<(), FrameError> {
    let mut w = w.lock().map_err(|_| FrameError::Io(io::Error::other("writer poisoned")))?;
    let (conn, frames) = &mut *w;
    frames.write(conn, msg)
}

/// Serve one connection to its end. `shutdown` is told when the host asks
/// to power off.
pub(crate) fn serve(conn: Box<dyn Connection>, shutdown: &Sender<()>) {
    if let Err(e) = serve_request(conn, shutdown) {
        crate::log(&format!("agent connection: {e}"));
    }
}

fn serve_request(mut conn: Box<dyn Connection>, shutdown: &Sender<()>) -> Result<(), FrameError> {
    match read_frame::<HostMessage>(&mut conn)? {
        Some(HostMessage::Hello { version }) if version == VERSION => {}
        Some(HostMessage::Hello { version }) => {
            let msg = format!("protocol version {version} is not supported (agent speaks {VERSION})");
            write_frame(&mut conn, &GuestMessage::Error(msg.clone()))?;
            // The host may have sent its request with its Hello: let it
            // close first, so that the error is not lost in a reset.
            let mut frames = FrameReader::default();
            while let Ok(Some(_)) = frames.read::<HostMessage>(&mut conn) {}
            return Err(FrameError::Io(io::Error::other(msg)));
        }
        Some(other) => return Err(FrameError::Io(io::Error::other(format!("expected Hello, got {other:?}")))),
        None => return Ok(()),
    }
    write_frame(&mut conn, &GuestMessage::Hello { version: VERSION })?;
    let request = read_frame::<HostMessage>(&mut conn)?;
    match request {
        Some(HostMessage::Exec(exec)) => exec_command(conn, exec),
        Some(HostMessage::PutFile { path, mode }) => {
            let result = put_file(&mut conn, &path, mode);
            reply_result(&mut conn, result, GuestMessage::DataEnd)
        }
        Some(HostMessage::GetFile { path }) => {
            let result = get_file(&mut conn, &path);
            reply_result(&mut conn, result, GuestMessage::DataEnd)
        }
        Some(HostMessage::SetIdentity(identity)) => {
            let result = crate::identity::apply(&identity);
            // The host counts the sandbox ready when this is answered: the
            // commands it runs then, and a snapshot it takes, find the
            // network proxy serving instead of still starting.
            if !crate::supervise::wait_until_serving(PROXY_START_LIMIT) {
                crate::log(&format!("the network proxy does not serve after {PROXY_START_LIMIT:?}; going on"));
            }
            reply_result(&mut conn, result, GuestMessage::DataEnd)
        }
        Some(HostMessage::Fs(request)) => {
            let mut frames = FrameWriter::default();
            let mut send =
                |msg: GuestMessage| frames.write(&mut conn, &msg).map_err(|e| io::Error::other(e.to_string()));
            let reply = match crate::fs::serve(request, &mut send) {
                Ok(()) => GuestMessage::DataEnd,
                Err(e) => e.into_message(),
            };
            write_frame(&mut conn, &reply)
        }
        Some(HostMessage::Shutdown) => {
            write_frame(&mut conn, &GuestMessage::DataEnd)?;
            let _ = shutdown.send(());
            Ok(())
        }
        Some(HostMessage::Connect { port }) => connect_port(conn, port),
        Some(other) => Err(FrameError::Io(io::Error::other(format!("unexpected request {other:?}")))),
        None => Ok(()),
    }
}

fn reply_result(
    conn: &mut Box<dyn Connection>,
    result: Result<(), String>,
    ok: GuestMessage,
) -> Result<(), FrameError> {
    match result {
        Ok(()) => write_frame(conn, &ok),
        Err(e) => write_frame(conn, &GuestMessage::Error(e)),
    }
}

/// Receive `Data` frames into `path` (written beside it, then renamed).
fn put_file(conn: &mut Box<dyn Connection>, path: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = format!("{path}.sandbox-partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(&tmp)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut frames = FrameReader::default();
    let result = loop {
        match frames.read::<HostMessage>(conn) {
            Ok(Some(HostMessage::Data(bytes))) => {
                if let Err(e) = file.write_all(&bytes) {
                    break Err(format!("{path}: {e}"));
                }
            }
            Ok(Some(HostMessage::DataEnd)) => break file.sync_all().map_err(|e| format!("{path}: {e}")),
            Ok(Some(other)) => break Err(format!("unexpected {other:?} during a file transfer")),
            Ok(None) => break Err("connection closed during a file transfer".into()),
            Err(e) => break Err(e.to_string()),
        }
    };
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}")),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn get_file(conn: &mut Box<dyn Connection>, path: &str) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut frames = FrameWriter::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        let msg = GuestMessage::Data(buf);
        frames.write(conn, &msg).map_err(|e| e.to_string())?;
        buf = reclaim(msg);
    }
}

/// The byte buffer of a data message, back for the next read (sized
/// [`CHUNK`] again; its memory is kept: see [`FrameWriter`]).
fn reclaim(msg: GuestMessage) -> Vec<u8> {
    let mut buf = match msg {
        GuestMessage::Data(b) | GuestMessage::Stdout(b) | GuestMessage::Stderr(b) => b,
        _ => Vec::new(),
    };
    buf.resize(CHUNK, 0);
    buf
}

/// A command's output stream and the message that carries its bytes.
type OutputPump = (std::fs::File, fn(Vec<u8>) -> GuestMessage);

/// How long the status waits, after the command exited, for output still
/// coming from processes it left behind.
const LINGER: Duration = Duration::from_millis(200);

/// What the host can reach of a running command.
struct Running {
    pid: Pid,
    stdin: Option<Box<dyn Write + Send>>,
    pty: Option<OwnedFd>,
}

fn exec_command(conn: Box<dyn Connection>, exec: Exec) -> Result<(), FrameError> {
    let writer: Writer = Arc::new(Mutex::new((conn.try_clone_conn()?, FrameWriter::default())));
    let mut reader = conn;
    let mut env = crate::trust::ca_env();
    env.extend(exec.env.iter().cloned());
    let mut cmd = match command::build(&exec.argv, &env, &exec.cwd, exec.user.as_deref(), &exec.groups, &exec.rlimits) {
        Ok(cmd) => cmd,
        Err(e) => return send(&writer, &GuestMessage::Error(e)),
    };
    let mut outputs: Vec<OutputPump> = Vec::new();
    let pty = match exec.tty {
        Some(size) => {
            let pty = open_pty(size).map_err(FrameError::Io)?;
            let slave = pty.slave.as_raw_fd();
            cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave));
            // SAFETY: the closure runs in the child between fork and exec and
            // only calls async-signal-safe functions (setsid, ioctl).
            unsafe {
                cmd.pre_exec(move || {
                    nix::unistd::setsid().map_err(io::Error::from)?;
                    if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(pty.master)
        }
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
            None
        }
    };
    let (mut child, status, pidfd) = match reaper::spawn_with_pidfd(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            send(&writer, &GuestMessage::Stderr(format!("{}: {e}\n", exec.argv[0]).into_bytes()))?;
            send(&writer, &GuestMessage::Exited { status: command::spawn_error_status(&e) })?;
            // Let the host close first, once it has read the status: closing
            // here, over bytes it sent that were never read, resets the
            // connection, and the reset can overtake the status.
            while let Ok(Some(_)) = read_frame::<HostMessage>(&mut reader) {}
            return Ok(());
        }
    };
    drop(cmd); // closes the parent's copies of the pty slave
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let mut running = Running { pid, stdin: None, pty: None };
    match pty {
        Some(master) => {
            outputs.push((std::fs::File::from(master.try_clone()?), GuestMessage::Stdout));
            running.stdin = Some(Box::new(std::fs::File::from(master.try_clone()?)));
            running.pty = Some(master);
        }
        None => {
            if let Some(out) = child.stdout.take() {
                outputs.push((OwnedFd::from(out).into(), GuestMessage::Stdout));
            }
            if let Some(err) = child.stderr.take() {
                outputs.push((OwnedFd::from(err).into(), GuestMessage::Stderr));
            }
            running.stdin = child.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>);
        }
    }
    send(&writer, &GuestMessage::Started { pid: child.id() })?;

    // One thread carries the output and the exit status (threads are
    // costly in the guest: each new stack is page faults run by emulated
    // kernel code); this one reads the host's frames.
    let output = {
        let writer = Arc::clone(&writer);
        std::thread::Builder::new().name("agent-output".into()).spawn(move || {
            let code = pump_outputs(outputs, &writer, pidfd, &status);
            let sent = send(&writer, &GuestMessage::Exited { status: code });
            // Wakes this connection's reader (below) blocked on it.
            if let Ok(w) = writer.lock() {
                w.0.shutdown_conn();
            }
            sent
        })?
    };
    handle_input(&mut reader, &mut running);
    output.join().unwrap_or_else(|_| Err(FrameError::Io(io::Error::other("output thread panicked"))))
}

/// Send the command's output as it comes until the command has exited and
/// its streams are closed; returns its status. Output still in the pipes is
/// sent before the status; a background process holding them open does not
/// hold the status back for more than [`LINGER`].
fn pump_outputs(outputs: Vec<OutputPump>, writer: &Writer, pidfd: Option<OwnedFd>, status: &Receiver<i32>) -> i32 {
    let mut open: Vec<Option<OutputPump>> = outputs.into_iter().map(Some).collect();
    let mut pidfd = pidfd;
    let mut code = None;
    let mut deadline: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK];
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(open.len() + 1);
    while open.iter().any(Option::is_some) {
        let timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX),
                _ => break,
            },
            None => -1,
        };
        fds.clear();
        let pollfd = |fd: i32| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // Closed streams stay in the set as -1 (ignored by poll), keeping indices.
        fds.extend(open.iter().map(|o| pollfd(o.as_ref().map_or(-1, |(f, _)| f.as_raw_fd()))));
        fds.push(pollfd(pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd)));
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a live array of `nfds` initialised pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            crate::log(&format!("agent: poll: {}", io::Error::last_os_error()));
            break;
        }
        if rc == 0 {
            break; // the linger time after the exit has passed
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            pidfd = None;
            code = Some(status.recv().unwrap_or(command::NOT_EXECUTABLE));
            deadline = Some(Instant::now() + LINGER);
        }
        for (slot, p) in open.iter_mut().zip(&fds) {
            let Some((src, wrap)) = slot.as_mut().filter(|_| p.revents != 0) else { continue };
            buf.resize(CHUNK, 0);
            // EIO on a pty master means the slave side is gone.
            match src.read(&mut buf) {
                Ok(0) | Err(_) => *slot = None,
                Ok(n) => {
                    buf.truncate(n);
                    let msg = wrap(std::mem::take(&mut buf));
                    let sent = send(writer, &msg);
                    buf = reclaim(msg);
                    if sent.is_err() {
                        *slot = None;
                    }
                }
            }
        }
    }
    code.unwrap_or_else(|| status.recv().unwrap_or(command::NOT_EXECUTABLE))
}

/// Host frames for a running command: stdin, signals, resizes.
fn handle_input(reader: &mut Box<dyn Connection>, running: &mut Running) {
    let mut frames = FrameReader::default();
    loop {
        match frames.read::<HostMessage>(reader) {
            Ok(Some(HostMessage::Stdin(bytes))) => {
                if let Some(stdin) = running.stdin.as_mut() {
                    if stdin.write_all(&bytes).and_then(|()| stdin.flush()).is_err() {
                        running.stdin = None;
                    }
                }
            }
            Ok(Some(HostMessage::StdinEof)) => {
                if running.pty.is_some() {
                    // On a terminal, end of input is the EOF character.
                    if let Some(stdin) = running.stdin.as_mut() {
                        let _ = stdin.write_all(&[4]);
                    }
                } else {
                    running.stdin = None;
                }
            }
            Ok(Some(HostMessage::Signal(sig))) => match Signal::try_from(sig) {
                Ok(sig) => {
                    // The command leads its own process group (or session, on a pty).
                    let _ = kill(Pid::from_raw(-running.pid.as_raw()), sig);
                }
                Err(_) => crate::log(&format!("agent: ignoring unknown signal {sig}")),
            },
            Ok(Some(HostMessage::Resize(size))) => {
                if let Some(master) = running.pty.as_ref() {
                    if let Err(e) = set_window_size(master, size) {
                        crate::log(&format!("agent: resize: {e}"));
                    }
                }
            }
            Ok(Some(other)) => {
                crate::log(&format!("agent: unexpected {other:?} during exec; closing"));
                return;
            }
            Ok(None) => return,
            Err(e) => {
                crate::log(&format!("agent: {e}"));
                return;
            }
        }
    }
}

/// Connect to `127.0.0.1:port` in the guest for the host, answer
/// `Connected` (or the error), then carry the bytes both ways.
fn connect_port(mut conn: Box<dyn Connection>, port: u16) -> Result<(), FrameError> {
    let tcp = match std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)) {
        Ok(tcp) => tcp,
        Err(e) => {
            let msg = format!("connecting to 127.0.0.1:{port} in the guest: {e}");
            write_frame(&mut conn, &GuestMessage::Error(msg))?;
            return Ok(());
        }
    };
    write_frame(&mut conn, &GuestMessage::Connected)?;
    splice(conn.fd(), tcp.as_raw_fd()).map_err(FrameError::Io)
}

/// One direction of a [`splice`]: bytes read from `from` and not yet
/// written to `to`, in a buffer kept for the connection's life.
struct Direction {
    from: RawFd,
    to: RawFd,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `from` reached its end (or failed).
    eof: bool,
    /// The end was passed on: `to` was shut down for writing.
    done: bool,
}

impl Direction {
    fn new(from: RawFd, to: RawFd) -> Direction {
        Direction { from, to, buf: vec![0; CHUNK], start: 0, end: 0, eof: false, done: false }
    }

    /// What to poll for: the source while the buffer is empty, else the sink.
    fn interest(&self) -> (RawFd, libc::c_short) {
        if self.done {
            (-1, 0)
        } else if self.start < self.end {
            (self.to, libc::POLLOUT)
        } else if self.eof {
            (-1, 0)
        } else {
            (self.from, libc::POLLIN)
        }
    }

    /// Move what can be moved without blocking. An error writing ends the
    /// whole splice (the peer is gone); one reading is the end of that side.
    fn pump(&mut self) -> io::Result<()> {
        loop {
            if self.start < self.end {
                // SAFETY: writes from the live buffer's initialised range `start..end`.
                let n = unsafe { libc::write(self.to, self.buf[self.start..].as_ptr().cast(), self.end - self.start) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(()),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(e),
                    };
                }
                self.start += n.unsigned_abs();
                continue;
            }
            if self.eof {
                if !self.done {
                    self.done = true;
                    // A half-close: the other side sees the end of this direction.
                    // SAFETY: shutdown on a descriptor this connection owns.
                    unsafe { libc::shutdown(self.to, libc::SHUT_WR) };
                }
                return Ok(());
            }
            // SAFETY: reads into the live buffer, at most its length.
            let n = unsafe { libc::read(self.from, self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => self.eof = true,
                }
            } else if n == 0 {
                self.eof = true;
            } else {
                (self.start, self.end) = (0, n.unsigned_abs());
            }
        }
    }
}

/// Set `O_NONBLOCK` on `fd`.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller keeps open; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Carry bytes between the sockets `a` and `b` both ways, on this thread,
/// until each direction has ended (each end passed on as a half-close) or
/// a write fails. Non-blocking, so that neither direction waits on the
/// other; one buffer per direction, kept to the end.
fn splice(a: RawFd, b: RawFd) -> io::Result<()> {
    set_nonblocking(a)?;
    set_nonblocking(b)?;
    let mut dirs = [Direction::new(a, b), Direction::new(b, a)];
    while !dirs.iter().all(|d| d.done) {
        let mut fds = dirs.each_ref().map(|d| {
            let (fd, events) = d.interest();
            libc::pollfd { fd, events, revents: 0 }
        });
        // SAFETY: `fds` is a live array of two initialised pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (dir, p) in dirs.iter_mut().zip(&fds) {
            if p.revents != 0 {
                dir.pump()?;
            }
        }
        // A direction with nothing to poll for passes its end on at once.
        for dir in dirs.iter_mut().filter(|d| d.eof && !d.done && d.start == d.end) {
            dir.pump()?;
        }
    }
    Ok(())
}

struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn winsize(size: WinSize) -> nix::pty::Winsize {
    nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 }
}

fn open_pty(size: WinSize) -> io::Result<Pty> {
    let pty = nix::pty::openpty(Some(&winsize(size)), None).map_err(io::Error::from)?;
    Ok(Pty { master: pty.master, slave: pty.slave })
}

fn set_window_size(master: &OwnedFd, size: WinSize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which
    // points to a live, initialised value; the fd is an open pty master.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    /// An agent serving one end of a socket pair; the other end is the host's.
    fn agent() -> (UnixStream, std::sync::mpsc::Receiver<()>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || serve(Box::new(guest), &tx));
        (host, rx)
    }

    fn hello(host: &mut UnixStream) {
        write_frame(host, &HostMessage::Hello { version: VERSION }).unwrap();
        assert_eq!(read_frame::<GuestMessage>(host).unwrap(), Some(GuestMessage::Hello { version: VERSION }));
    }

    fn exec(argv: &[&str], tty: Option<WinSize>) -> Exec {
        Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: "/".into(),
            user: None,
            tty,
            groups: vec![],
            rlimits: vec![],
        }
    }

    /// Collect (stdout, stderr, status) until the command exits.
    fn collect(host: &mut UnixStream) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match read_frame::<GuestMessage>(host).unwrap().unwrap() {
                GuestMessage::Started { .. } => {}
                GuestMessage::Stdout(b) => out.extend(b),
                GuestMessage::Stderr(b) => err.extend(b),
                GuestMessage::Exited { status } => return (out, err, status),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn exec_streams_stdin_and_separates_stdout_stderr_and_status() {
        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Exec(exec(&["/bin/sh", "-c", "tr a-z A-Z; echo oops >&2; exit 7"], None)))
            .unwrap();
        write_frame(&mut host, &HostMessage::Stdin(b"hello ".to_vec())).unwrap();
        write_frame(&mut host, &HostMessage::Stdin(b"world\n".to_vec())).unwrap();
        write_frame(&mut host, &HostMessage::StdinEof).unwrap();
        let (out, err, status) = collect(&mut host);
        assert_eq!((out.as_slice(), err.as_slice(), status), (&b"HELLO WORLD\n"[..], &b"oops\n"[..], 7));
    }

    #[test]
    fn a_missing_command_is_127_and_a_signal_reaches_the_command() {
        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Exec(exec(&["/no/such/program"], None))).unwrap();
        let (_, err, status) = collect(&mut host);
        assert_eq!(status, 127);
        assert!(String::from_utf8_lossy(&err).contains("/no/such/program"));

        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Exec(exec(&["/bin/sh", "-c", "echo ready; sleep 30"], None))).unwrap();
        assert!(matches!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::Started { .. })));
        assert_eq!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::Stdout(b"ready\n".to_vec())));
        write_frame(&mut host, &HostMessage::Signal(libc::SIGTERM)).unwrap();
        let (_, _, status) = collect(&mut host);
        assert_eq!(status, 128 + libc::SIGTERM);
    }

    #[test]
    fn a_tty_exec_sees_a_terminal_of_the_requested_size() {
        let (mut host, _) = agent();
        hello(&mut host);
        let size = WinSize { rows: 33, cols: 101 };
        write_frame(
            &mut host,
            &HostMessage::Exec(exec(&["/bin/sh", "-c", "stty size; test -t 0 && echo tty"], Some(size))),
        )
        .unwrap();
        let (out, _, status) = collect(&mut host);
        let out = String::from_utf8_lossy(&out);
        assert_eq!(status, 0, "{out}");
        assert!(out.contains("33 101"), "{out}");
        assert!(out.contains("tty"), "{out}");
    }

    #[test]
    fn files_go_in_and_come_out_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin").to_str().unwrap().to_string();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::PutFile { path: path.clone(), mode: 0o640 }).unwrap();
        for chunk in data.chunks(CHUNK) {
            write_frame(&mut host, &HostMessage::Data(chunk.to_vec())).unwrap();
        }
        write_frame(&mut host, &HostMessage::DataEnd).unwrap();
        assert_eq!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::DataEnd));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);

        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::GetFile { path }).unwrap();
        let mut back = Vec::new();
        loop {
            match read_frame::<GuestMessage>(&mut host).unwrap().unwrap() {
                GuestMessage::Data(b) => back.extend(b),
                GuestMessage::DataEnd => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, data);

        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::GetFile { path: "/no/such/file".into() }).unwrap();
        assert!(
            matches!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::Error(e)) if e.contains("/no/such/file"))
        );
    }

    #[test]
    fn a_connect_carries_bytes_both_ways_and_passes_each_end_on() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // An echo server that answers once its input has ended, then closes.
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(b"got:").unwrap();
            s.write_all(&got).unwrap();
        });
        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Connect { port }).unwrap();
        assert_eq!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::Connected));
        // More than a buffer's worth, in both directions.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&data).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert_eq!(&back[..4], b"got:");
        assert_eq!(&back[4..], &data[..]);
        echo.join().unwrap();
    }

    #[test]
    fn a_connect_to_a_closed_port_is_an_error_reply() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut host, _) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Connect { port }).unwrap();
        let reply = read_frame::<GuestMessage>(&mut host).unwrap();
        assert!(
            matches!(&reply, Some(GuestMessage::Error(e)) if e.contains(&format!("127.0.0.1:{port}"))),
            "{reply:?}"
        );
        assert!(read_frame::<GuestMessage>(&mut host).unwrap().is_none());
    }

    #[test]
    fn garbage_closes_only_that_connection_and_shutdown_is_reported() {
        let (mut host, _) = agent();
        host.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        assert!(read_frame::<GuestMessage>(&mut host).unwrap().is_none(), "connection closed without a reply");

        let (mut host, _) = agent();
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(read_frame::<GuestMessage>(&mut host).unwrap().is_none());

        let (mut host, _) = agent();
        write_frame(&mut host, &HostMessage::Hello { version: VERSION + 1 }).unwrap();
        assert!(
            matches!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::Error(e)) if e.contains("not supported"))
        );

        let (mut host, shutdown) = agent();
        hello(&mut host);
        write_frame(&mut host, &HostMessage::Shutdown).unwrap();
        assert_eq!(read_frame::<GuestMessage>(&mut host).unwrap(), Some(GuestMessage::DataEnd));
        assert!(shutdown.recv_timeout(Duration::from_secs(5)).is_ok());
    }
}
