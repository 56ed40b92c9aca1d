//! A command running in a sandbox, as `std::process::Child` is one running
//! on this host: wait for it, signal it, resize its terminal, write its
//! standard input and read its output while it runs.
//!
//! Each process has its own connection to the guest agent. A thread reads
//! the guest's frames and hands the output to the process's readers (or to
//! the writers the [`Command`] named) and its exit status to [`Process::wait`].
//! As with pipes, output waits (and the guest command with it) until it is
//! read: read standard output and error while the command runs, or leave
//! them untaken and they are discarded.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_protocol::agent::{Exec, FrameReader, FrameWriter, GuestMessage, HostMessage, WinSize, CHUNK};

use crate::agent::{AgentConn, AgentError};
use crate::command::{OutputSink, StdinSource};
use crate::Error;

/// Output chunks (of up to 64 KiB) buffered per stream before the guest waits.
const OUTPUT_QUEUE: usize = 16;

/// The half of the agent connection that sends frames, shared by the stdin
/// writer and the controls so that their frames never interleave.
#[derive(Debug)]
struct Sender {
    frames: Mutex<(UnixStream, FrameWriter)>,
    /// Whether the guest started the command, set by the reader thread.
    launch: Mutex<Launch>,
    launched: Condvar,
}

/// What the guest said of starting the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// Nothing yet.
    Pending,
    /// Started, with this guest pid.
    Started(u32),
    /// The connection ended (with an exit status or an error) before the
    /// guest reported a start: the command never ran.
    NotStarted,
}

impl Sender {
    fn send(&self, msg: &HostMessage) -> Result<(), Error> {
        let mut guard = self
            .frames
            .lock()
            .map_err(|_| Error::Io("send to the guest agent".into(), io::Error::other("a sender panicked")))?;
        let (stream, writer) = &mut *guard;
        writer.write(stream, msg).map_err(|e| Error::Agent(AgentError::Frame(e)))
    }

    fn launch(&self) -> std::sync::MutexGuard<'_, Launch> {
        self.launch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record what the guest said, once: a later word does not undo a start.
    fn set_launch(&self, launch: Launch) {
        let mut guard = self.launch();
        if *guard == Launch::Pending {
            *guard = launch;
            self.launched.notify_all();
        }
    }
}

/// Sends signals and terminal resizes to a [`Process`] from any thread.
#[derive(Debug, Clone)]
pub struct ProcessControl {
    sender: Arc<Sender>,
}

impl ProcessControl {
    /// Send signal `sig` (e.g. `libc::SIGTERM`) to the command.
    pub fn signal(&self, sig: i32) -> Result<(), Error> {
        self.sender.send(&HostMessage::Signal(sig))
    }
    /// Kill the command (SIGKILL).
    pub fn kill(&self) -> Result<(), Error> {
        self.signal(libc::SIGKILL)
    }
    /// Resize the command's terminal (for a command run with [`crate::Command::tty`]).
    pub fn resize(&self, size: WinSize) -> Result<(), Error> {
        self.sender.send(&HostMessage::Resize(size))
    }
    /// The command's pid in the guest, once the guest reported it started.
    pub fn pid(&self) -> Option<u32> {
        match *self.sender.launch() {
            Launch::Started(pid) => Some(pid),
            Launch::Pending | Launch::NotStarted => None,
        }
    }

    /// Wait, at most `timeout`, for the guest to start the command: its
    /// guest pid, or `Ok(None)` when it ended without starting (a program
    /// the image lacks or cannot execute: [`Process::wait`] then gives 127
    /// or 126, and the command's standard error says why).
    pub fn wait_started(&self, timeout: Duration) -> Result<Option<u32>, Error> {
        let guard = self.sender.launch();
        let (guard, _) = self
            .sender
            .launched
            .wait_timeout_while(guard, timeout, |l| *l == Launch::Pending)
            .unwrap_or_else(|p| p.into_inner());
        match *guard {
            Launch::Started(pid) => Ok(Some(pid)),
            Launch::NotStarted => Ok(None),
            Launch::Pending => Err(Error::Io(
                "wait for the command to start".into(),
                io::Error::new(io::ErrorKind::TimedOut, format!("the guest did not start it within {timeout:?}")),
            )),
        }
    }
}

/// The command's standard input ([`crate::Command::stdin_piped`]); dropping
/// it (or [`ProcessStdin::close`]) sends end of file.
#[derive(Debug)]
pub struct ProcessStdin {
    sender: Arc<Sender>,
    open: bool,
}

impl ProcessStdin {
    /// Send end of file.
    pub fn close(mut self) -> Result<(), Error> {
        self.open = false;
        self.sender.send(&HostMessage::StdinEof)
    }
}

impl Write for ProcessStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK);
        self.sender.send(&HostMessage::Stdin(buf[..n].to_vec())).map_err(io::Error::other)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ProcessStdin {
    fn drop(&mut self) {
        if self.open {
            let _ = self.sender.send(&HostMessage::StdinEof);
        }
    }
}

/// One of the command's output streams, read as it arrives; end of file
/// when the command has ended.
#[derive(Debug)]
pub struct ProcessOutput {
    chunks: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ProcessOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.chunks.recv() {
                Ok(chunk) => (self.chunk, self.pos) = (chunk, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Where the reader thread puts one output stream.
enum Sink {
    Queue(SyncSender<Vec<u8>>),
    Writer(Box<dyn Write + Send>),
    Discard,
}

impl Sink {
    fn put(&mut self, bytes: Vec<u8>) {
        let kept = match self {
            Sink::Queue(queue) => queue.send(bytes).is_ok(),
            Sink::Writer(w) => match w.write_all(&bytes).and_then(|()| w.flush()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("command output writer failed, discarding the rest: {e}");
                    false
                }
            },
            Sink::Discard => true,
        };
        if !kept {
            *self = Sink::Discard;
        }
    }
}

/// A command running in a sandbox.
#[derive(Debug)]
pub struct Process {
    control: ProcessControl,
    stdin: Option<ProcessStdin>,
    stdout: Option<ProcessOutput>,
    stderr: Option<ProcessOutput>,
    exit: Receiver<Result<i32, Error>>,
    status: Option<i32>,
    /// Restores this process's terminal when the command ends (see
    /// [`crate::Command::attach_terminal`]).
    terminal: Option<crate::terminal::Attached>,
}

impl Process {
    /// Start `exec` over a fresh agent connection, which `connect` opens
    /// sending the request (and, for no input, its end) with the hello.
    pub(crate) fn start(
        connect: impl FnOnce(&[HostMessage]) -> Result<AgentConn, Error>,
        exec: Exec,
        stdin: StdinSource,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> Result<Process, Error> {
        let mut first = vec![HostMessage::Exec(exec)];
        if matches!(stdin, StdinSource::Null) {
            first.push(HostMessage::StdinEof);
        }
        let stream = connect(&first)?.into_stream();
        let reader = stream.try_clone().map_err(|e| Error::Io("clone the agent connection".into(), e))?;
        let sender = Arc::new(Sender {
            frames: Mutex::new((stream, FrameWriter::default())),
            launch: Mutex::new(Launch::Pending),
            launched: Condvar::new(),
        });

        let mut piped_stdin = None;
        match stdin {
            StdinSource::Null => {}
            StdinSource::Piped => piped_stdin = Some(ProcessStdin { sender: Arc::clone(&sender), open: true }),
            StdinSource::Reader(src) => feed(src, ProcessStdin { sender: Arc::clone(&sender), open: true }),
        }
        let (out_sink, out_reader) = sink(stdout);
        let (err_sink, err_reader) = sink(stderr);
        let (exit_tx, exit) = mpsc::sync_channel(1);
        let pid_sender = Arc::clone(&sender);
        std::thread::Builder::new()
            .name("sandbox-process".into())
            .spawn(move || {
                let status = pump(reader, out_sink, err_sink, &pid_sender);
                pid_sender.set_launch(Launch::NotStarted);
                let _ = exit_tx.send(status);
            })
            .map_err(|e| Error::Io("start the process reader thread".into(), e))?;
        Ok(Process {
            control: ProcessControl { sender },
            stdin: piped_stdin,
            stdout: out_reader,
            stderr: err_reader,
            exit,
            status: None,
            terminal: None,
        })
    }

    pub(crate) fn with_terminal(mut self, attached: crate::terminal::Attached) -> Self {
        self.terminal = Some(attached);
        self
    }

    /// A handle that signals and resizes this command from any thread.
    pub fn control(&self) -> ProcessControl {
        self.control.clone()
    }
    /// See [`ProcessControl::signal`].
    pub fn signal(&self, sig: i32) -> Result<(), Error> {
        self.control.signal(sig)
    }
    /// See [`ProcessControl::kill`].
    pub fn kill(&self) -> Result<(), Error> {
        self.control.kill()
    }
    /// See [`ProcessControl::resize`].
    pub fn resize(&self, size: WinSize) -> Result<(), Error> {
        self.control.resize(size)
    }
    /// See [`ProcessControl::pid`].
    pub fn pid(&self) -> Option<u32> {
        self.control.pid()
    }
    /// See [`ProcessControl::wait_started`].
    pub fn wait_started(&self, timeout: Duration) -> Result<Option<u32>, Error> {
        self.control.wait_started(timeout)
    }
    /// The command's standard input, when it was piped (once).
    pub fn take_stdin(&mut self) -> Option<ProcessStdin> {
        self.stdin.take()
    }
    /// The command's standard output, when it was piped (once).
    pub fn take_stdout(&mut self) -> Option<ProcessOutput> {
        self.stdout.take()
    }
    /// The command's standard error, when it was piped (once).
    pub fn take_stderr(&mut self) -> Option<ProcessOutput> {
        self.stderr.take()
    }

    /// Wait for the command to end and return its status (0..=255; 128 + N
    /// when killed by signal N; 127 not found; 126 not executable). Closes
    /// standard input and discards output streams not taken.
    pub fn wait(&mut self) -> Result<i32, Error> {
        self.wait_until(None)?.ok_or_else(reader_stopped)
    }

    /// [`Self::wait`], giving up after `timeout` (`Ok(None)`: still running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<i32>, Error> {
        self.wait_until(Some(timeout))
    }

    fn wait_until(&mut self, timeout: Option<Duration>) -> Result<Option<i32>, Error> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        let result = match timeout {
            None => self.exit.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => self.exit.recv_timeout(t),
        };
        let status = match result {
            Ok(status) => status?,
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Err(RecvTimeoutError::Disconnected) => return Err(reader_stopped()),
        };
        self.terminal = None;
        self.status = Some(status);
        Ok(Some(status))
    }
}

fn sink(output: OutputSink) -> (Sink, Option<ProcessOutput>) {
    match output {
        OutputSink::Writer(w) => (Sink::Writer(w), None),
        OutputSink::Piped => {
            let (tx, rx) = mpsc::sync_channel(OUTPUT_QUEUE);
            (Sink::Queue(tx), Some(ProcessOutput { chunks: rx, chunk: Vec::new(), pos: 0 }))
        }
    }
}

/// Feed `src` to the command's standard input, then end of file (when
/// `stdin` drops). The thread may stay blocked reading `src` (a terminal)
/// after the command ended.
fn feed(mut src: Box<dyn Read + Send>, mut stdin: ProcessStdin) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdin.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// The reader thread ended without an exit status (it panicked).
fn reader_stopped() -> Error {
    Error::Io("wait for the command".into(), io::Error::other("its reader thread stopped without a status"))
}

/// Read the guest's frames until the exit status.
fn pump(mut stream: UnixStream, mut stdout: Sink, mut stderr: Sink, sender: &Sender) -> Result<i32, Error> {
    let mut frames = FrameReader::default();
    loop {
        match frames.read::<GuestMessage>(&mut stream).map_err(AgentError::from)? {
            Some(GuestMessage::Started { pid }) => sender.set_launch(Launch::Started(pid)),
            Some(GuestMessage::Stdout(b)) => stdout.put(b),
            Some(GuestMessage::Stderr(b)) => stderr.put(b),
            Some(GuestMessage::Exited { status }) => return Ok(status),
            Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e).into()),
            Some(other) => return Err(AgentError::Unexpected(format!("{other:?}")).into()),
            None => {
                return Err(AgentError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the guest agent closed the connection before the command's exit status (did the sandbox stop?)",
                ))
                .into())
            }
        }
    }
}

/// Output kept up to a limit (beyond it, accepted and dropped).
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub bytes: Vec<u8>,
    pub truncated: bool,
    limit: usize,
}

impl Collected {
    pub fn new(limit: usize) -> Self {
        Collected { bytes: Vec::new(), truncated: false, limit }
    }
    fn push(&mut self, buf: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..buf.len().min(room)]);
        if buf.len() > room {
            if !self.truncated {
                tracing::warn!(
                    limit = self.limit,
                    "command output exceeds the collection limit; the rest is discarded"
                );
            }
            self.truncated = true;
        }
    }
}

/// A writer into a shared [`Collected`].
pub(crate) struct Collect(pub Arc<Mutex<Collected>>);

impl Write for Collect {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bytes past the limit are accepted and discarded, so the guest's
        // stream keeps flowing and the command is not blocked or failed.
        self.0.lock().map_err(|_| io::Error::other("poisoned"))?.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use guest_protocol::agent::{read_frame, write_frame};

    use super::*;
    use crate::agent::tests::fake;

    fn start(path: &std::path::Path, stdin: StdinSource) -> Process {
        let connect = |first: &[HostMessage]| Ok(AgentConn::connect_with(path, Duration::from_secs(5), first)?);
        let exec = Exec {
            argv: vec!["cat".into()],
            env: vec![],
            cwd: "/".into(),
            user: None,
            tty: None,
            groups: vec![],
            rlimits: vec![],
        };
        Process::start(connect, exec, stdin, OutputSink::Piped, OutputSink::Piped).unwrap()
    }

    #[test]
    fn a_process_streams_stdin_and_output_and_takes_signals_while_it_runs() {
        let (_dir, path) = fake(|mut s| {
            assert!(
                matches!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::Exec(e)) if e.argv == ["cat"])
            );
            write_frame(&mut s, &GuestMessage::Started { pid: 9 }).unwrap();
            // Echo standard input as it comes, before it ends.
            match read_frame::<HostMessage>(&mut s).unwrap().unwrap() {
                HostMessage::Stdin(b) => write_frame(&mut s, &GuestMessage::Stdout(b)).unwrap(),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                read_frame::<HostMessage>(&mut s).unwrap(),
                Some(HostMessage::Resize(WinSize { rows: 5, cols: 6 }))
            );
            assert_eq!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::Signal(libc::SIGTERM)));
            write_frame(&mut s, &GuestMessage::Stderr(b"terminated".to_vec())).unwrap();
            assert_eq!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::StdinEof));
            write_frame(&mut s, &GuestMessage::Exited { status: 128 + libc::SIGTERM }).unwrap();
        });
        let mut process = start(&path, StdinSource::Piped);
        let (mut stdin, mut stdout, mut stderr) =
            (process.take_stdin().unwrap(), process.take_stdout().unwrap(), process.take_stderr().unwrap());
        assert!(process.take_stdin().is_none());
        stdin.write_all(b"ping").unwrap();
        let mut echoed = [0u8; 4];
        stdout.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"ping");
        assert_eq!(process.pid(), Some(9));
        process.resize(WinSize { rows: 5, cols: 6 }).unwrap();
        process.control().signal(libc::SIGTERM).unwrap();
        let mut err = String::new();
        let reading = std::thread::spawn(move || {
            stderr.read_to_string(&mut err).unwrap();
            err
        });
        stdin.close().unwrap();
        assert_eq!(process.wait().unwrap(), 128 + libc::SIGTERM);
        assert_eq!(reading.join().unwrap(), "terminated");
        // The status is kept.
        assert_eq!(process.wait().unwrap(), 128 + libc::SIGTERM);
    }

    #[test]
    fn a_lost_connection_is_an_error_and_a_slow_command_a_timeout() {
        let (_dir, path) = fake(|mut s| {
            let _ = read_frame::<HostMessage>(&mut s);
            assert_eq!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::StdinEof));
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut process = start(&path, StdinSource::Null);
        assert_eq!(process.wait_timeout(Duration::from_millis(50)).unwrap(), None);
        let err = process.wait().unwrap_err().to_string();
        assert!(err.contains("before the command's exit status"), "{err}");
    }

    #[test]
    fn wait_started_gives_the_pid_or_says_the_command_never_ran() {
        let (_dir, path) = fake(|mut s| {
            let _ = read_frame::<HostMessage>(&mut s);
            std::thread::sleep(Duration::from_millis(100));
            write_frame(&mut s, &GuestMessage::Started { pid: 42 }).unwrap();
            write_frame(&mut s, &GuestMessage::Exited { status: 0 }).unwrap();
            while let Ok(Some(_)) = read_frame::<HostMessage>(&mut s) {}
        });
        let mut process = start(&path, StdinSource::Null);
        assert_eq!(process.wait_started(Duration::from_secs(5)).unwrap(), Some(42));
        assert_eq!(process.wait().unwrap(), 0);
        // The start is kept after the end.
        assert_eq!(process.wait_started(Duration::ZERO).unwrap(), Some(42));

        // A program the guest cannot find: an exit status, no start.
        let (_dir, path) = fake(|mut s| {
            let _ = read_frame::<HostMessage>(&mut s);
            write_frame(&mut s, &GuestMessage::Stderr(b"nope: not found\n".to_vec())).unwrap();
            write_frame(&mut s, &GuestMessage::Exited { status: 127 }).unwrap();
            while let Ok(Some(_)) = read_frame::<HostMessage>(&mut s) {}
        });
        let mut process = start(&path, StdinSource::Null);
        assert_eq!(process.wait_started(Duration::from_secs(5)).unwrap(), None);
        assert_eq!(process.pid(), None);
        assert_eq!(process.wait().unwrap(), 127);

        // A guest that says nothing: a timeout, not a start.
        let (_dir, path) = fake(|mut s| {
            let _ = read_frame::<HostMessage>(&mut s);
            std::thread::sleep(Duration::from_millis(500));
        });
        let process = start(&path, StdinSource::Null);
        let err = process.wait_started(Duration::from_millis(50)).unwrap_err().to_string();
        assert!(err.contains("start"), "{err}");
    }

    #[test]
    fn collected_output_is_bounded() {
        let shared = Arc::new(Mutex::new(Collected::new(crate::DEFAULT_OUTPUT_LIMIT)));
        let mut sink: Box<dyn Write + Send> = Box::new(Collect(Arc::clone(&shared)));
        // A guest printing 64 MiB (4 x the limit), in the agent's chunk size.
        let chunk = vec![b'z'; CHUNK];
        let mut written = 0usize;
        while written < 4 * crate::DEFAULT_OUTPUT_LIMIT {
            sink.write_all(&chunk).unwrap();
            written += chunk.len();
        }
        let got = std::mem::take(&mut *shared.lock().unwrap());
        assert_eq!(got.bytes.len(), crate::DEFAULT_OUTPUT_LIMIT);
        assert!(got.truncated);

        // A configured limit, and output that fits it, are kept whole.
        let shared = Arc::new(Mutex::new(Collected::new(10)));
        let mut sink = Collect(Arc::clone(&shared));
        sink.write_all(b"0123456789").unwrap();
        assert!(!shared.lock().unwrap().truncated);
        sink.write_all(b"abc").unwrap();
        let got = shared.lock().unwrap();
        assert_eq!((got.bytes.as_slice(), got.truncated), (&b"0123456789"[..], true));
    }
}
