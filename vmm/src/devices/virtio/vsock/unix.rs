//! The Unix-socket side of the host end: connecting to a handler's socket
//! without blocking, and the `CONNECT <port>\n` handshake on `vsock.sock`.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Longest handshake line accepted, newline included. `CONNECT 4294967295\n`
/// is 19 bytes; the slack allows extra spaces.
pub const MAX_CONNECT_LINE: usize = 32;

/// Connects a non-blocking stream socket to the Unix socket at `path`.
///
/// A Unix-domain connect never waits for the peer to accept: it succeeds if
/// the listener has room in its backlog and fails at once otherwise
/// (`EAGAIN` when the backlog is full, `ECONNREFUSED` or `ENOENT` when nobody
/// listens), so the event loop never blocks here.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    // Leave room for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is empty, too long or contains a NUL byte",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and
    // `len` does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len as libc::socklen_t)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Why a handshake line is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The line is not `CONNECT <port>`.
    #[error("expected `CONNECT <port>`, got {0:?}")]
    Malformed(String),
    /// The line did not end within [`MAX_CONNECT_LINE`] bytes.
    #[error("handshake line longer than {MAX_CONNECT_LINE} bytes")]
    TooLong,
    /// The client closed the connection before finishing the line.
    #[error("client closed the connection before the handshake ended")]
    Closed,
    /// Reading the line failed.
    #[error("reading the handshake: {0}")]
    Io(String),
}

/// Parses a handshake line (without its newline): `CONNECT <port>`, the
/// keyword in any case, surrounded by optional whitespace.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut words = text.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(keyword), Some(port), None) if keyword.eq_ignore_ascii_case("CONNECT") => {
            port.parse::<u32>().map_err(|_| malformed())
        }
        _ => Err(malformed()),
    }
}

/// A `CONNECT` line being read from a client of `vsock.sock`.
///
/// The line is read one byte at a time so that bytes the client sends after
/// it stay in the socket for the guest.
#[derive(Debug, Default)]
pub struct ConnectLine {
    buf: Vec<u8>,
}

impl ConnectLine {
    /// Reads what is available. `Ok(Some(port))` once the line is complete,
    /// `Ok(None)` if more is needed.
    pub fn read_from(&mut self, stream: &mut impl Read) -> Result<Option<u32>, HandshakeError> {
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) if byte[0] == b'\n' => return parse_connect_line(&self.buf).map(Some),
                Ok(_) => {
                    if self.buf.len() + 1 >= MAX_CONNECT_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                    self.buf.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect_line(b"CONNECT 5000"), Ok(5000));
        assert_eq!(parse_connect_line(b"connect  52 "), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Ok(u32::MAX));
        for bad in
            [&b""[..], b"CONNECT", b"CONNECT 4294967296", b"CONNECT -1", b"CONNECT 1 2", b"LISTEN 1", b"CONNECT\xff 1"]
        {
            assert!(matches!(parse_connect_line(bad), Err(HandshakeError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn connect_line_is_read_in_pieces_and_leaves_later_bytes() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut line = ConnectLine::default();
        client.write_all(b"CONN").unwrap();
        assert_eq!(line.read_from(&mut server), Ok(None));
        client.write_all(b"ECT 77\nhello").unwrap();
        assert_eq!(line.read_from(&mut server), Ok(Some(77)));
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn endless_or_cut_lines_are_refused() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        client.write_all(&[b'A'; 100]).unwrap();
        assert_eq!(ConnectLine::default().read_from(&mut server), Err(HandshakeError::TooLong));
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(b"CONNECT 1").unwrap();
        drop(client);
        assert_eq!(ConnectLine::default().read_from(&mut server), Err(HandshakeError::Closed));
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener_and_fails_fast_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        stream.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // Non-blocking: nothing to read yet.
        assert_eq!(stream.read(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        assert!(connect_nonblocking(&path).is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(connect_nonblocking(&long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
