//! Host side of the guest agent: connects through the VMM's vsock Unix
//! socket (`CONNECT 5000\n` -> `OK <hostport>\n`, Firecracker's convention)
//! and speaks `guest_protocol::agent` over it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use guest_protocol::agent::{read_frame, write_frame, Exec, FrameError, GuestMessage, HostMessage, WinSize, AGENT_PORT, CHUNK, VERSION};

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
    #[error("guest agent sent {0} where it was not expected")]
    Unexpected(String),
}

/// One connection to the agent, after the version handshake.
#[derive(Debug)]
pub struct AgentConn {
    stream: UnixStream,
}

impl AgentConn {
    /// Connect through `vsock.sock` to the agent's port and say hello.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let connect_err = |source| AgentError::Connect { path: uds.display().to_string(), source };
        let mut stream = UnixStream::connect(uds).map_err(connect_err)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        // Read the reply byte by byte: what follows it belongs to the agent.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 {
            if stream.read(&mut byte)? == 0 {
                break;
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
        write_frame(&mut stream, &HostMessage::Hello { version: VERSION })?;
        match read_frame::<GuestMessage>(&mut stream)? {
            Some(GuestMessage::Hello { version }) if version == VERSION => {}
            Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e)),
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        stream.set_read_timeout(None)?;
        Ok(Self { stream })
    }

    /// Run a command; feed it `stdin` (when given), stream its output to
    /// `stdout` / `stderr`, return its status.
    pub fn exec(
        mut self,
        exec: Exec,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, AgentError> {
        write_frame(&mut self.stream, &HostMessage::Exec(exec))?;
        let mut input = self.stream.try_clone()?;
        let feeder = stdin.map(|mut src| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match src.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if write_frame(&mut input, &HostMessage::Stdin(buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = write_frame(&mut input, &HostMessage::StdinEof);
            })
        });
        if feeder.is_none() {
            write_frame(&mut self.stream, &HostMessage::StdinEof)?;
        }
        let status = loop {
            match read_frame::<GuestMessage>(&mut self.stream)? {
                Some(GuestMessage::Started { .. }) => {}
                Some(GuestMessage::Stdout(b)) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(GuestMessage::Stderr(b)) => {
                    stderr.write_all(&b)?;
                    stderr.flush()?;
                }
                Some(GuestMessage::Exited { status }) => break status,
                Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e)),
                Some(other) => return Err(AgentError::Unexpected(format!("{other:?}"))),
                None => return Err(AgentError::Io(io::ErrorKind::UnexpectedEof.into())),
            }
        };
        // The feeder may be blocked reading a terminal; it ends with the process.
        drop(feeder);
        Ok(status)
    }

    /// A handle to send signals and resizes to the running command.
    pub fn controller(&self) -> Result<Controller, AgentError> {
        Ok(Controller { stream: self.stream.try_clone()? })
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

    /// Copy `path` from the guest into `dst`.
    pub fn get_file(mut self, path: &str, dst: &mut dyn Write) -> Result<u64, AgentError> {
        write_frame(&mut self.stream, &HostMessage::GetFile { path: path.into() })?;
        let mut total = 0u64;
        loop {
            match read_frame::<GuestMessage>(&mut self.stream)? {
                Some(GuestMessage::Data(b)) => {
                    total += b.len() as u64;
                    dst.write_all(&b)?;
                }
                Some(GuestMessage::DataEnd) => return Ok(total),
                Some(GuestMessage::Error(e)) => return Err(AgentError::Remote(e)),
                other => return Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Make the guest trust `pem` (the sandbox CA certificate).
    pub fn trust_ca(mut self, pem: &str) -> Result<(), AgentError> {
        write_frame(&mut self.stream, &HostMessage::TrustCa(pem.into()))?;
        match read_frame::<GuestMessage>(&mut self.stream)? {
            Some(GuestMessage::DataEnd) => Ok(()),
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

/// Sends signals and terminal resizes to a running exec.
#[derive(Debug)]
pub struct Controller {
    stream: UnixStream,
}

impl Controller {
    pub fn signal(&mut self, sig: i32) -> Result<(), AgentError> {
        Ok(write_frame(&mut self.stream, &HostMessage::Signal(sig))?)
    }
    pub fn resize(&mut self, size: WinSize) -> Result<(), AgentError> {
        Ok(write_frame(&mut self.stream, &HostMessage::Resize(size))?)
    }
}

/// Wait until the agent answers through `uds`, or `timeout` passes.
pub fn wait_ready(uds: &Path, timeout: Duration, mut alive: impl FnMut() -> bool) -> Result<(), AgentError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match AgentConn::connect(uds, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline || !alive() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Read `CONNECT <port>\n` as the VMM side would (for tests of this module).
#[cfg(test)]
fn read_connect(stream: &mut UnixStream) -> io::Result<String> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A VMM-and-agent stand-in that answers one connection with `script`.
    fn fake(script: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, std::path::PathBuf) {
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
    fn exec_sends_stdin_and_collects_separated_output_and_status() {
        let (_dir, path) = fake(|mut s| {
            assert!(matches!(read_frame::<HostMessage>(&mut s).unwrap(), Some(HostMessage::Exec(e)) if e.argv == ["cat"]));
            let mut input = Vec::new();
            loop {
                match read_frame::<HostMessage>(&mut s).unwrap().unwrap() {
                    HostMessage::Stdin(b) => input.extend(b),
                    HostMessage::StdinEof => break,
                    other => panic!("{other:?}"),
                }
            }
            write_frame(&mut s, &GuestMessage::Started { pid: 9 }).unwrap();
            write_frame(&mut s, &GuestMessage::Stdout(input)).unwrap();
            write_frame(&mut s, &GuestMessage::Stderr(b"err".to_vec())).unwrap();
            write_frame(&mut s, &GuestMessage::Exited { status: 4 }).unwrap();
        });
        let conn = AgentConn::connect(&path, Duration::from_secs(5)).unwrap();
        let exec = Exec { argv: vec!["cat".into()], env: vec![], cwd: "/".into(), user: None, tty: None };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = conn.exec(exec, Some(Box::new(&b"input bytes"[..])), &mut out, &mut err).unwrap();
        assert_eq!((status, out.as_slice(), err.as_slice()), (4, &b"input bytes"[..], &b"err"[..]));
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
}
