//! The PROXY protocol v1 line the guest's net-proxy puts in front of every
//! connection on vsock port 5002 (HAProxy spec, section 2.1):
//! `PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n`, at most 107 bytes.
//!
//! The guest writes it, so it is hostile input: the parser accepts exactly the
//! grammar of the spec (TCP4/TCP6, canonical addresses, decimal ports without
//! leading zeros) and nothing else. `PROXY UNKNOWN` is refused: the handler needs
//! the original destination port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use crate::error::{Error, Result};

/// Longest v1 line allowed by the spec, CRLF included.
pub const MAX_LEN: usize = 107;

/// The addresses announced by the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The guest application's address.
    pub source: SocketAddr,
    /// Where the guest application was connecting (SO_ORIGINAL_DST).
    pub destination: SocketAddr,
}

impl ProxyHeader {
    /// Parse one complete line, CRLF included.
    pub fn parse(line: &[u8]) -> Result<ProxyHeader> {
        if line.len() > MAX_LEN {
            return Err(Error::ProxyHeader("longer than 107 bytes"));
        }
        let text = line
            .strip_suffix(b"\r\n")
            .ok_or(Error::ProxyHeader("not terminated by CRLF"))?;
        let text = std::str::from_utf8(text).map_err(|_| Error::ProxyHeader("not ASCII"))?;
        let mut fields = text.split(' ');
        if fields.next() != Some("PROXY") {
            return Err(Error::ProxyHeader("does not start with \"PROXY \""));
        }
        let v6 = match fields.next() {
            Some("TCP4") => false,
            Some("TCP6") => true,
            Some("UNKNOWN") => return Err(Error::ProxyHeader("UNKNOWN protocol carries no destination")),
            _ => return Err(Error::ProxyHeader("protocol is not TCP4 or TCP6")),
        };
        let (Some(src), Some(dst), Some(sport), Some(dport), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::ProxyHeader("wrong number of fields"));
        };
        let (src, dst) = (parse_ip(src, v6)?, parse_ip(dst, v6)?);
        Ok(ProxyHeader {
            source: SocketAddr::new(src, parse_port(sport)?),
            destination: SocketAddr::new(dst, parse_port(dport)?),
        })
    }

    /// Read the header line from the start of a stream, consuming exactly the
    /// line: the bytes after it stay in `reader` for the TLS layer.
    pub async fn read<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<ProxyHeader> {
        let mut line = Vec::with_capacity(MAX_LEN);
        let mut limited = reader.take(MAX_LEN as u64);
        limited
            .read_until(b'\n', &mut line)
            .await
            .map_err(|_| Error::ProxyHeader("connection failed while reading it"))?;
        if line.is_empty() {
            return Err(Error::ProxyHeader("connection closed before it"));
        }
        if line.last() != Some(&b'\n') {
            if line.len() < MAX_LEN {
                return Err(Error::ProxyHeader("connection closed inside it"));
            }
            return Err(Error::ProxyHeader("no line end within 107 bytes"));
        }
        Self::parse(&line)
    }
}

impl std::fmt::Display for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.source.is_ipv4() { "TCP4" } else { "TCP6" };
        write!(
            f,
            "PROXY {proto} {} {} {} {}\r\n",
            self.source.ip(),
            self.destination.ip(),
            self.source.port(),
            self.destination.port()
        )
    }
}

fn parse_ip(text: &str, v6: bool) -> Result<IpAddr> {
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| Error::ProxyHeader("address does not match the protocol"))
}

fn parse_port(text: &str) -> Result<u16> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(Error::ProxyHeader("port is not a plain decimal number"));
    }
    text.parse().map_err(|_| Error::ProxyHeader("port out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp4_and_tcp6() {
        let h = ProxyHeader::parse(b"PROXY TCP4 10.0.0.2 93.184.216.34 40000 443\r\n").unwrap();
        assert_eq!(h.source, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(h.destination, "93.184.216.34:443".parse().unwrap());
        let h = ProxyHeader::parse(b"PROXY TCP6 fd00::2 2001:db8::1 1 65535\r\n").unwrap();
        assert_eq!(h.destination, "[2001:db8::1]:65535".parse().unwrap());
    }

    #[test]
    fn display_round_trips() {
        let h = ProxyHeader::parse(b"PROXY TCP4 10.0.0.2 1.2.3.4 5 443\r\n").unwrap();
        assert_eq!(ProxyHeader::parse(h.to_string().as_bytes()).unwrap(), h);
    }

    #[test]
    fn rejects_malformed_lines() {
        let longest_ok = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert!(longest_ok.len() <= MAX_LEN);
        assert!(ProxyHeader::parse(longest_ok).is_ok());
        let cases: &[(&[u8], &str)] = &[
            (b"", "CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4"),
            (b"PROXY UNKNOWN\r\n", "UNKNOWN"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "number of fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "number of fields"),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "number of fields"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "protocol"),
            (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "protocol"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "decimal"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "decimal"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "range"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n", "ASCII"),
        ];
        for (line, expected) in cases {
            let err = ProxyHeader::parse(line).unwrap_err().to_string();
            assert!(err.contains(expected), "{line:?}: {err}");
        }
        let mut long = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec();
        long.resize(MAX_LEN + 10, b' ');
        long.extend_from_slice(b"\r\n");
        assert!(ProxyHeader::parse(&long).unwrap_err().to_string().contains("107"));
    }

    #[tokio::test]
    async fn read_stops_at_line_end() {
        let data = b"PROXY TCP4 10.0.0.2 1.2.3.4 5 443\r\n\x16\x03\x01rest".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(16, &data[..]);
        let h = ProxyHeader::read(&mut reader).await.unwrap();
        assert_eq!(h.destination.port(), 443);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"\x16\x03\x01rest");
    }

    #[tokio::test]
    async fn read_refuses_endless_and_missing_lines() {
        let endless = vec![b'A'; 4096];
        let err = ProxyHeader::read(&mut &endless[..]).await.unwrap_err();
        assert!(err.to_string().contains("within 107"), "{err}");
        let err = ProxyHeader::read(&mut &b""[..]).await.unwrap_err();
        assert!(err.to_string().contains("closed before"), "{err}");
        let err = ProxyHeader::read(&mut &b"PROXY TCP4 1.2"[..]).await.unwrap_err();
        assert!(err.to_string().contains("closed inside"), "{err}");
        let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n".to_vec();
        assert!(ProxyHeader::read(&mut &garbage[..]).await.is_err());
    }
}
