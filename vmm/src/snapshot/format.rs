//! The state file: a fixed prefix, a JSON header, a postcard payload and a
//! SHA-256 trailer.
//!
//! ```text
//! offset 0   magic  "SBXVMSNP"                         8 bytes
//!        8   format version                            u32 LE
//!       12   header length H                           u32 LE
//!       16   payload length P                          u64 LE
//!       24   header: JSON (SnapshotHeader)             H bytes
//!   24 + H   payload: postcard (VmState)               P bytes
//! 24 + H + P SHA-256 of every byte before it           32 bytes
//! ```
//!
//! Reading checks, in this order, and stops at the first failure with its
//! own error: the magic (a foreign file), the version, the lengths against
//! their bounds and against the file's size (a truncated file), the
//! checksum (any flipped byte past the version), and only then decodes the
//! header and the payload. Nothing is decoded from bytes the checksum did
//! not vouch for, and every length is bounded before anything is allocated.

use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SBXVMSNP";
/// The format this build writes and the only one it reads. Bump it whenever
/// the header or the payload changes shape or meaning.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes before the header.
pub const PREFIX_LEN: usize = 24;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 32;
/// Largest header accepted.
pub const MAX_HEADER_LEN: u32 = 64 << 10;
/// Largest payload accepted (a VM with the most vCPUs needs a few MiB).
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;

/// Encodes a state file from its header and payload.
pub fn encode<H: Serialize, P: Serialize>(header: &H, payload: &P) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(header)
        .map_err(|e| Error::SnapshotCorrupt { reason: format!("cannot encode the header: {e}") })?;
    let payload = postcard::to_stdvec(payload)
        .map_err(|e| Error::SnapshotCorrupt { reason: format!("cannot encode the state: {e}") })?;
    frame(&header, &payload)
}

/// Frames an encoded header and payload as a state file: prefix, both, and
/// the checksum. (Also lets a fuzzer reach the decoders past the checksum.)
pub fn frame(header: &[u8], payload: &[u8]) -> Result<Vec<u8>> {
    let header_len = u32::try_from(header.len()).ok().filter(|&n| n <= MAX_HEADER_LEN);
    let payload_len = u64::try_from(payload.len()).ok().filter(|&n| n <= MAX_PAYLOAD_LEN);
    let (Some(header_len), Some(payload_len)) = (header_len, payload_len) else {
        return Err(Error::SnapshotCorrupt { reason: "the state is too large for the format".into() });
    };
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    Ok(out)
}

/// A decoded state file.
#[derive(Debug)]
pub struct Decoded<H, P> {
    /// The header.
    pub header: H,
    /// The payload, if it was asked for.
    pub payload: Option<P>,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Largest state file accepted.
pub const MAX_FILE_LEN: u64 = (PREFIX_LEN + CHECKSUM_LEN) as u64 + MAX_HEADER_LEN as u64 + MAX_PAYLOAD_LEN;

/// Reads and checks the state file at `path` (see the module docs); decodes
/// the payload only when `with_payload`. A file larger than any state file
/// is refused before it is read.
pub fn read<H: DeserializeOwned, P: DeserializeOwned>(path: &Path, with_payload: bool) -> Result<Decoded<H, P>> {
    let file_error = |source| Error::File { what: "snapshot state file", path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(file_error)?;
    let len = file.metadata().map_err(file_error)?.len();
    let mut bytes = Vec::new();
    // One byte more than the limit is enough to tell a file that is too large.
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes).map_err(file_error)?;
    if bytes.len() as u64 != len.min(MAX_FILE_LEN + 1) {
        return Err(Error::SnapshotTruncated { path: path.to_path_buf(), expected: len, got: bytes.len() as u64 });
    }
    decode(&bytes, path, with_payload)
}

/// Checks and decodes a state file's bytes (see the module docs); `path`
/// only names it in errors. Never panics, whatever the bytes.
pub fn decode<H: DeserializeOwned, P: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    with_payload: bool,
) -> Result<Decoded<H, P>> {
    let len = bytes.len() as u64;
    let truncated = |expected: u64| Error::SnapshotTruncated { path: path.to_path_buf(), expected, got: len };
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes.is_empty() || bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::SnapshotForeign { path: path.to_path_buf() });
    }
    if bytes.len() < PREFIX_LEN {
        return Err(truncated(PREFIX_LEN as u64));
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(Error::SnapshotVersion { path: path.to_path_buf(), found: version, supported: FORMAT_VERSION });
    }
    let header_len = u32_at(bytes, 12);
    let mut payload_len = [0u8; 8];
    payload_len.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(payload_len);
    if header_len > MAX_HEADER_LEN || payload_len > MAX_PAYLOAD_LEN {
        return Err(Error::SnapshotCorrupt {
            reason: format!(
                "{}: header of {header_len} or state of {payload_len} bytes is beyond the limits",
                path.display()
            ),
        });
    }
    let expected = (PREFIX_LEN + CHECKSUM_LEN) as u64 + u64::from(header_len) + payload_len;
    if len < expected {
        return Err(truncated(expected));
    }
    if len > expected {
        return Err(Error::SnapshotCorrupt {
            reason: format!("{}: {} bytes after the end of the snapshot", path.display(), len - expected),
        });
    }
    let body_end = bytes.len() - CHECKSUM_LEN;
    if Sha256::digest(&bytes[..body_end]).as_slice() != &bytes[body_end..] {
        return Err(Error::SnapshotChecksum { path: path.to_path_buf() });
    }
    let header_end = PREFIX_LEN + header_len as usize;
    let header = serde_json::from_slice(&bytes[PREFIX_LEN..header_end])
        .map_err(|e| Error::SnapshotCorrupt { reason: format!("{}: header: {e}", path.display()) })?;
    let payload = if with_payload {
        Some(
            postcard::from_bytes(&bytes[header_end..body_end])
                .map_err(|e| Error::SnapshotCorrupt { reason: format!("{}: state: {e}", path.display()) })?,
        )
    } else {
        None
    };
    Ok(Decoded { header, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct H {
        name: String,
        size: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct P {
        words: Vec<u32>,
        flag: bool,
    }

    fn sample() -> (H, P) {
        (H { name: "vm".into(), size: 128 << 20 }, P { words: (0..300).collect(), flag: true })
    }

    fn written(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let (h, p) = sample();
        let bytes = encode(&h, &p).unwrap();
        let path = dir.join("state");
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    fn read_back(path: &Path) -> Result<Decoded<H, P>> {
        read::<H, P>(path, true)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = written(dir.path());
        assert_eq!(&bytes[..8], b"SBXVMSNP");
        let decoded = read_back(&path).unwrap();
        let (h, p) = sample();
        assert_eq!(decoded.header, h);
        assert_eq!(decoded.payload, Some(p));
        let header_only = read::<H, P>(&path, false).unwrap();
        assert!(header_only.payload.is_none());
    }

    #[test]
    fn every_flipped_byte_past_the_magic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = written(dir.path());
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let err = read_back(&path).unwrap_err();
            let expected = match at {
                0..8 => matches!(err, Error::SnapshotForeign { .. }),
                8..12 => matches!(err, Error::SnapshotVersion { .. }),
                // A length one larger reads as truncated; one smaller as
                // trailing bytes or, for the header, a broken checksum.
                12..24 => matches!(
                    err,
                    Error::SnapshotTruncated { .. } | Error::SnapshotCorrupt { .. } | Error::SnapshotChecksum { .. }
                ),
                _ => matches!(err, Error::SnapshotChecksum { .. }),
            };
            assert!(expected, "byte {at}: {err}");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = written(dir.path());
        for len in 0..bytes.len() {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = read_back(&path).unwrap_err();
            let ok = match len {
                0 => matches!(err, Error::SnapshotForeign { .. }),
                _ => matches!(err, Error::SnapshotTruncated { got, .. } if got == len as u64),
            };
            assert!(ok, "length {len}: {err}");
        }
        let mut longer = bytes;
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotCorrupt { .. }));
    }

    #[test]
    fn other_versions_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(dir.path());
        let other = FORMAT_VERSION + 1;
        bytes[8..12].copy_from_slice(&other.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = read_back(&path).unwrap_err();
        assert!(
            matches!(err, Error::SnapshotVersion { found, supported: FORMAT_VERSION, .. } if found == other),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("version {other}")));

        std::fs::write(&path, b"\x7fELF and then some more bytes than a prefix").unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotForeign { .. }));
        let missing = dir.path().join("missing");
        assert!(matches!(read_back(&missing).unwrap_err(), Error::File { .. }));
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = written(dir.path());
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotCorrupt { .. }));
        let (path, mut bytes) = written(dir.path());
        bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotCorrupt { .. }));
    }

    #[test]
    fn a_checksummed_but_undecodable_payload_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        // The right header, but a payload of another type.
        let bytes = encode(&sample().0, &"not the payload").unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotCorrupt { .. }));
        let bytes = encode(&"not the header", &sample().1).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_back(&path).unwrap_err(), Error::SnapshotCorrupt { .. }));
    }
}
