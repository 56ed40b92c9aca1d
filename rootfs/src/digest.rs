//! Content digests (`sha256:<64 hex>`) and readers that check them.

use std::io::Read;

use sha2::{Digest as _, Sha256};

use crate::Error;

/// A sha256 content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parse `sha256:<64 lower-case hex digits>`; other algorithms are refused.
    pub fn parse(s: &str) -> Result<Digest, Error> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| Error::Digest(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::Digest(s.to_string()));
        }
        Ok(Digest { hex: hex.to_string() })
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest { hex: hex::encode(Sha256::digest(data)) }
    }

    /// The 64 hex digits (safe as a file name).
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Hashes and counts what is read through it.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
}

impl<R: Read> Hashing<R> {
    /// Reading past `limit` bytes is an error (`InvalidData`, "over the limit").
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Hashing { inner, hasher: Sha256::new(), count: 0, limit }
    }

    /// Read the rest and return the digest and the byte count.
    pub(crate) fn finish(mut self) -> std::io::Result<(Digest, u64)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((Digest { hex: hex::encode(self.hasher.finalize()) }, self.count))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, LimitExceeded(self.limit)));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The error inside an `io::Error` when a [`Hashing`] reader passes its limit.
#[derive(Debug)]
pub(crate) struct LimitExceeded(pub(crate) u64);

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} bytes (over the limit)", self.0)
    }
}

impl std::error::Error for LimitExceeded {}

/// Incremental sha256 for data that arrives in pieces.
#[derive(Default)]
pub(crate) struct Hasher(Sha256);

impl Hasher {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub(crate) fn finish(self) -> Digest {
        Digest { hex: hex::encode(self.0.finalize()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_sha256() {
        let d = Digest::of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        for bad in [
            "sha512:00",
            "sha256:XYZ",
            "e3b0",
            "sha256:../../etc/passwd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_reader_counts_and_limits() {
        let h = Hashing::new(&b"abc"[..], 10);
        let (d, n) = h.finish().unwrap();
        assert_eq!((d, n), (Digest::of(b"abc"), 3));
        let h = Hashing::new(&b"abcdef"[..], 4);
        let err = h.finish().unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }
}
