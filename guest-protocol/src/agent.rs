//! The agent protocol: what the host and the guest agent (vsock port [`AGENT_PORT`])
//! say to each other.
//!
//! Each message is a frame: a 4-byte big-endian payload length, then the
//! payload, a postcard-encoded [`HostMessage`] or [`GuestMessage`]. Frames
//! above [`MAX_FRAME`] are refused before anything is allocated. A connection
//! opens with a [`HostMessage::Hello`] answered by [`GuestMessage::Hello`]
//! (both carry [`VERSION`]), then carries one request: an exec, a file
//! transfer, a file system operation, the sandbox's identity, a shutdown,
//! or a connection to a port inside the guest. Concurrent requests use
//! concurrent connections.
//!
//! A [`HostMessage::Connect`] is answered by [`GuestMessage::Connected`]
//! (or an [`GuestMessage::Error`], and the connection ends); after
//! `Connected` the connection stops being framed and carries the bytes of
//! the guest's TCP connection to `127.0.0.1:<port>` both ways, each
//! direction closed on its own (a half-close reaches the other side as one).
//! Only the host asks: nothing in the guest can open a listener on the host.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Protocol version; the agent refuses a different one.
pub const VERSION: u32 = 4;
/// Largest frame payload, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk a sender puts in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Guest vsock port of the agent (defined with the other ports).
pub use crate::ports::AGENT_PORT;

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// A resource limit of a command: `setrlimit(resource, {soft, hard})`,
/// `resource` a Linux `RLIMIT_*` number (`u64::MAX`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// User name or numeric uid; `None` runs as root.
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr merged).
    pub tty: Option<WinSize>,
    /// Supplementary group ids (empty: none, as for any user change).
    pub groups: Vec<u32>,
    /// Resource limits, set before the user changes.
    pub rlimits: Vec<Rlimit>,
}

/// Who a sandbox is, given to its guest once it is up, after a boot or a
/// restore from a snapshot, before any command runs in it: a restored
/// guest must not keep the identity of the guest the snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The sandbox CA certificate (PEM) the guest trusts from now on, in
    /// place of any sandbox CA it trusted before.
    pub ca_pem: String,
    /// Fresh host entropy: mixed into the guest kernel's pool, which is
    /// then reseeded, so that two guests restored from one snapshot never
    /// produce the same random bytes.
    pub entropy: Vec<u8>,
    /// The host's wall clock: seconds and nanoseconds since the Unix epoch.
    pub time: (i64, u32),
    /// The guest's hostname; `None` keeps the one it has.
    pub hostname: Option<String>,
}

/// A file system operation in the guest. The guest answers with zero or
/// more [`GuestMessage::Entries`] frames and a [`GuestMessage::DataEnd`],
/// or with a [`GuestMessage::FsFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsRequest {
    /// The entry at `path` (symbolic links are not followed).
    Stat { path: String },
    /// The entries under the directory `path`, down to `depth` levels
    /// (1: its own entries), at most [`MAX_LIST_ENTRIES`].
    List { path: String, depth: u32 },
    /// Make the directory `path` and any missing parents; answers with the
    /// new directory's entry (an existing directory is `AlreadyExists`).
    MakeDir { path: String },
    /// Remove `path`, a directory with everything in it.
    Remove { path: String },
    /// Rename `from` to `to`; answers with the entry at `to`.
    Rename { from: String, to: String },
}

/// The most entries one [`FsRequest::List`] answers with.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// The most entries the guest puts in one [`GuestMessage::Entries`] frame.
pub const ENTRIES_PER_FRAME: usize = 256;

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    /// A device, socket or FIFO.
    Other,
}

/// One file system entry, as `lstat` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The last component of `path`.
    pub name: String,
    /// The absolute path.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// The owner's and the group's names (numbers when the guest has no name for them).
    pub owner: String,
    pub group: String,
    /// Last modification: seconds and nanoseconds since the Unix epoch.
    pub modified: (i64, u32),
    /// Where a symbolic link points.
    pub symlink_target: Option<String>,
}

/// Why a file system operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsErrorKind {
    NotFound,
    AlreadyExists,
    PermissionDenied,
    /// A path that is not a directory where one is needed, or the reverse.
    NotADirectory,
    InvalidInput,
    Other,
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    Hello {
        version: u32,
    },
    Exec(Exec),
    Stdin(Vec<u8>),
    /// End of standard input.
    StdinEof,
    Signal(i32),
    Resize(WinSize),
    /// Write a file: `Data` frames follow, then `DataEnd`.
    PutFile {
        path: String,
        mode: u32,
    },
    /// Read a file: the guest answers with `Data` frames and `DataEnd`.
    GetFile {
        path: String,
    },
    Data(Vec<u8>),
    DataEnd,
    /// Take on this identity: trust its CA (system bundle, certifi, and the
    /// TLS environment variables of every later command), reseed, set the
    /// clock and the hostname. Answered once the guest's network proxy
    /// serves (it may still be starting after a boot), or after 20 s.
    SetIdentity(Identity),
    /// Stop every process and power the VM off.
    Shutdown,
    /// A file system operation.
    Fs(FsRequest),
    /// Connect to `127.0.0.1:port` in the guest; once `Connected`, the
    /// connection carries that TCP connection's bytes, unframed.
    Connect {
        port: u16,
    },
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    Hello {
        version: u32,
    },
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Shell convention: 0..=255, 128+N for signal N, 127 not found, 126 not executable.
    Exited {
        status: i32,
    },
    /// File contents (for `GetFile`) or `PutFile` acknowledgement (`DataEnd`).
    Data(Vec<u8>),
    DataEnd,
    /// The request failed; the connection ends.
    Error(String),
    /// File system entries (for an [`FsRequest`]); `DataEnd` ends them.
    Entries(Vec<Entry>),
    /// A file system operation failed; the connection ends.
    FsFailed {
        kind: FsErrorKind,
        message: String,
    },
    /// The guest connected to the port a `Connect` named: raw bytes follow.
    Connected,
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes frames into one buffer kept from frame to frame, so that a
/// stream of frames allocates nothing once warm. (In the guest every fresh
/// page costs a page fault run by emulated kernel code: reusing buffers is
/// most of the speed of a file transfer.)
#[derive(Debug, Default)]
pub struct FrameWriter {
    buf: Vec<u8>,
}

impl FrameWriter {
    /// Write one message as a frame.
    pub fn write<T: Serialize>(&mut self, w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        let mut buf = postcard::to_extend(msg, buf)?;
        let len = buf.len() - 4;
        let result = match u32::try_from(len) {
            Ok(n) if len <= MAX_FRAME => {
                buf[..4].copy_from_slice(&n.to_be_bytes());
                w.write_all(&buf).and_then(|()| w.flush()).map_err(FrameError::from)
            }
            _ => Err(FrameError::TooLarge(len)),
        };
        self.buf = buf;
        result
    }
}

/// Decodes frames through one payload buffer kept from frame to frame.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Read one frame; `Ok(None)` on a clean end of stream between frames.
    pub fn read<T: DeserializeOwned>(&mut self, r: &mut impl Read) -> Result<Option<T>, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        r.read_exact(&mut self.buf)?;
        Ok(Some(postcard::from_bytes(&self.buf)?))
    }
}

/// Write one message as a frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    FrameWriter::default().write(w, msg)
}

/// Read one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>, FrameError> {
    FrameReader::default().read(r)
}

/// Decode a buffer of frames (fuzzing entry point: any bytes, never a panic).
pub fn decode_all<T: DeserializeOwned>(mut bytes: &[u8]) -> Vec<Result<T, String>> {
    let mut out = Vec::new();
    loop {
        match read_frame::<T>(&mut bytes) {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e.to_string()));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = vec![
            HostMessage::Hello { version: VERSION },
            HostMessage::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "cat".into()],
                env: vec![("A".into(), "b".into())],
                cwd: "/".into(),
                user: Some("nobody".into()),
                tty: Some(WinSize { rows: 24, cols: 80 }),
                groups: vec![10, 100],
                rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: u64::MAX }],
            }),
            HostMessage::Stdin(vec![0, 1, 2, 255]),
            HostMessage::StdinEof,
            HostMessage::Signal(2),
            HostMessage::SetIdentity(Identity {
                ca_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
                entropy: vec![7; 64],
                time: (1_780_000_000, 999_999_999),
                hostname: Some("sandbox-1".into()),
            }),
            HostMessage::Fs(FsRequest::List { path: "/tmp".into(), depth: 2 }),
            HostMessage::Fs(FsRequest::Rename { from: "/a".into(), to: "/b".into() }),
            HostMessage::Connect { port: 8080 },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = wire.as_slice();
        let mut back = Vec::new();
        while let Some(m) = read_frame::<HostMessage>(&mut r).unwrap() {
            back.push(m);
        }
        assert_eq!(back, msgs);
    }

    #[test]
    fn file_system_replies_round_trip() {
        let entry = Entry {
            name: "b c".into(),
            path: "/a/b c".into(),
            kind: EntryKind::Symlink,
            size: 3,
            mode: 0o120_777,
            owner: "root".into(),
            group: "1000".into(),
            modified: (1_780_000_000, 5),
            symlink_target: Some("/etc".into()),
        };
        // A full frame of entries with long paths stays under the frame limit.
        let long = Entry { path: "/".repeat(3000), name: "n".repeat(255), ..entry.clone() };
        let msgs = [
            GuestMessage::Entries(vec![entry]),
            GuestMessage::Entries(vec![long; ENTRIES_PER_FRAME]),
            GuestMessage::FsFailed { kind: FsErrorKind::NotFound, message: "/x: no such file".into() },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let back: Vec<_> = decode_all::<GuestMessage>(&wire).into_iter().map(Result::unwrap).collect();
        assert_eq!(back, msgs);
    }

    #[test]
    fn a_connect_reply_is_followed_by_raw_bytes_left_unread() {
        // The reader takes exactly one frame: what follows `Connected` is
        // the guest connection's bytes, for the caller to read.
        let mut wire = Vec::new();
        write_frame(&mut wire, &GuestMessage::Connected).unwrap();
        wire.extend_from_slice(b"HTTP/1.0 200 OK\r\n");
        let mut r = wire.as_slice();
        assert_eq!(read_frame::<GuestMessage>(&mut r).unwrap(), Some(GuestMessage::Connected));
        assert_eq!(r, b"HTTP/1.0 200 OK\r\n");
    }

    #[test]
    fn new_variants_keep_the_encoding_of_older_ones() {
        // Variants are appended, so a message an older peer knows keeps its
        // bytes (the version check refuses mismatched peers anyway).
        let mut wire = Vec::new();
        write_frame(&mut wire, &HostMessage::Shutdown).unwrap();
        assert_eq!(wire, [0, 0, 0, 1, 11]);
        wire.clear();
        write_frame(&mut wire, &GuestMessage::Error(String::new())).unwrap();
        assert_eq!(wire, [0, 0, 0, 2, 7, 0]);
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut wire = u32::MAX.to_be_bytes().to_vec();
        wire.extend_from_slice(b"x");
        let err = read_frame::<GuestMessage>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == u32::MAX as usize));
        let huge = HostMessage::Data(vec![0; MAX_FRAME + 1]);
        assert!(matches!(write_frame(&mut Vec::new(), &huge), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn reused_buffers_frame_each_message_alone() {
        let msgs = [
            GuestMessage::Data(vec![7; CHUNK]),
            GuestMessage::Stdout(b"short".to_vec()),
            GuestMessage::Data(vec![9; 3]),
            GuestMessage::Exited { status: 2 },
        ];
        let (mut writer, mut wire) = (FrameWriter::default(), Vec::new());
        for m in &msgs {
            writer.write(&mut wire, m).unwrap();
        }
        // A refused message leaves the writer usable and writes nothing.
        let before = wire.len();
        assert!(matches!(
            writer.write(&mut wire, &GuestMessage::Data(vec![0; MAX_FRAME])),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(wire.len(), before);
        writer.write(&mut wire, &GuestMessage::DataEnd).unwrap();

        let (mut reader, mut r) = (FrameReader::default(), wire.as_slice());
        let mut back = Vec::new();
        while let Some(m) = reader.read::<GuestMessage>(&mut r).unwrap() {
            back.push(m);
        }
        assert_eq!(back[..4], msgs);
        assert_eq!(back[4], GuestMessage::DataEnd);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut wire = 3u32.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(read_frame::<HostMessage>(&mut wire.as_slice()), Err(FrameError::Decode(_))));
        let mut wire = 10u32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"abc");
        assert!(matches!(read_frame::<HostMessage>(&mut wire.as_slice()), Err(FrameError::Io(_))));
        assert!(matches!(read_frame::<HostMessage>(&mut [0u8, 0].as_slice()), Err(FrameError::Io(_))));
        assert!(read_frame::<HostMessage>(&mut [].as_slice()).unwrap().is_none());
    }
}
