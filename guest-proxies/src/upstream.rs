//! The host end of a proxy: an AF_VSOCK address in the guest, a Unix socket in
//! host-side tests (the VMM delivers guest connections to host port P on the
//! Unix socket `<dir>/vsock.sock_P`, see
//! [`guest_protocol::sandbox_dir::SandboxDir::vsock_port_socket`], so a test
//! can listen there directly).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Error;

/// How long a connection to the host may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A byte stream to the host.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where to connect: `vsock:CID:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// AF_VSOCK, normally CID 2 (the host).
    Vsock {
        /// Context id of the peer.
        cid: u32,
        /// Port on the peer.
        port: u32,
    },
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl Upstream {
    /// Open a new connection.
    pub async fn connect(&self) -> Result<Box<dyn Stream>, Error> {
        let connect = async {
            Ok::<Box<dyn Stream>, io::Error>(match self {
                Self::Vsock { cid, port } => {
                    Box::new(tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?)
                }
                Self::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            })
        };
        let result = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        result.map_err(|source| Error::Connect { upstream: self.to_string(), source })
    }
}

impl FromStr for Upstream {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidUpstream(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("vsock:").ok_or_else(invalid)?;
        let (cid, port) = rest.split_once(':').ok_or_else(invalid)?;
        Ok(Self::Vsock { cid: cid.parse().map_err(|_| invalid())?, port: port.parse().map_err(|_| invalid())? })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_kinds() {
        for text in ["vsock:2:5007", "unix:/tmp/dir/vsock.sock_5002"] {
            assert_eq!(text.parse::<Upstream>().unwrap().to_string(), text);
        }
        assert_eq!("vsock:2:5002".parse::<Upstream>().unwrap(), Upstream::Vsock { cid: 2, port: 5002 });
    }

    #[test]
    fn rejects_malformed_values() {
        for text in ["", "vsock:2", "vsock:x:1", "vsock:2:99999999999", "unix:", "tcp:1.2.3.4:5", "/tmp/sock"] {
            assert!(text.parse::<Upstream>().is_err(), "{text:?} was accepted");
        }
    }
}
