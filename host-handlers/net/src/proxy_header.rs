//! Reading the PROXY protocol v1 line the guest's net-proxy puts in front of
//! every connection on vsock port [`MITM_PORT`](guest_protocol::ports::MITM_PORT).
//! The line's format and its strict parser are in [`guest_protocol::proxy_header`],
//! shared with the guest that writes it; this is only the I/O.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use guest_protocol::ProtocolError;

use crate::error::Result;

pub use guest_protocol::proxy_header::{ProxyHeader, MAX_LEN};

/// Read the header line from the start of a stream, consuming exactly the
/// line: the bytes after it stay in `reader` for the TLS layer.
pub async fn read<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<ProxyHeader> {
    let mut line = Vec::with_capacity(MAX_LEN);
    let mut limited = reader.take(MAX_LEN as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|_| ProtocolError::ProxyHeader("connection failed while reading it"))?;
    Ok(ProxyHeader::parse_received(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_stops_at_line_end() {
        let data = b"PROXY TCP4 10.0.0.2 1.2.3.4 5 443\r\n\x16\x03\x01rest".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(16, &data[..]);
        let h = read(&mut reader).await.unwrap();
        assert_eq!(h.destination.port(), 443);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"\x16\x03\x01rest");
    }

    #[tokio::test]
    async fn read_refuses_endless_and_missing_lines() {
        let endless = vec![b'A'; 4096];
        let err = read(&mut &endless[..]).await.unwrap_err();
        assert!(err.to_string().contains("within 107"), "{err}");
        let err = read(&mut &b""[..]).await.unwrap_err();
        assert!(err.to_string().contains("closed before"), "{err}");
        let err = read(&mut &b"PROXY TCP4 1.2"[..]).await.unwrap_err();
        assert!(err.to_string().contains("closed inside"), "{err}");
        let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n".to_vec();
        assert!(read(&mut &garbage[..]).await.is_err());
    }
}
