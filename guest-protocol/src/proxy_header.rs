//! The PROXY protocol v1 line in front of every connection on vsock port
//! [`MITM_PORT`](crate::ports::MITM_PORT) (HAProxy spec, section 2.1):
//! `PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n`, at most 107 bytes.
//!
//! The guest's net-proxy sends it ([`ProxyHeader::new`] and `Display`), naming
//! the guest program's address and where it was connecting; the host's MITM
//! handler receives it ([`ProxyHeader::parse`], [`ProxyHeader::parse_received`]).
//!
//! The guest writes it, so on the host it is hostile input: the parser accepts
//! exactly the grammar of the spec (TCP4/TCP6, canonical addresses, decimal
//! ports without leading zeros) and nothing else. `PROXY UNKNOWN` is refused:
//! the handler needs the original destination port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ProtocolError;

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
    /// The header for a connection from `source` to `destination`, with
    /// IPv4-mapped IPv6 addresses written as IPv4 (so two of them make a
    /// TCP4 line). The line is TCP6 if either address is still IPv6, the
    /// other one then mapped.
    pub fn new(source: SocketAddr, destination: SocketAddr) -> ProxyHeader {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        ProxyHeader { source: canonical(source), destination: canonical(destination) }
    }

    /// Parse one complete line, CRLF included.
    pub fn parse(line: &[u8]) -> Result<ProxyHeader, ProtocolError> {
        if line.len() > MAX_LEN {
            return Err(ProtocolError::ProxyHeader("longer than 107 bytes"));
        }
        let text = line.strip_suffix(b"\r\n").ok_or(ProtocolError::ProxyHeader("not terminated by CRLF"))?;
        let text = std::str::from_utf8(text).map_err(|_| ProtocolError::ProxyHeader("not ASCII"))?;
        let mut fields = text.split(' ');
        if fields.next() != Some("PROXY") {
            return Err(ProtocolError::ProxyHeader("does not start with \"PROXY \""));
        }
        let v6 = match fields.next() {
            Some("TCP4") => false,
            Some("TCP6") => true,
            Some("UNKNOWN") => return Err(ProtocolError::ProxyHeader("UNKNOWN protocol carries no destination")),
            _ => return Err(ProtocolError::ProxyHeader("protocol is not TCP4 or TCP6")),
        };
        let (Some(src), Some(dst), Some(sport), Some(dport), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(ProtocolError::ProxyHeader("wrong number of fields"));
        };
        let (src, dst) = (parse_ip(src, v6)?, parse_ip(dst, v6)?);
        Ok(ProxyHeader {
            source: SocketAddr::new(src, parse_port(sport)?),
            destination: SocketAddr::new(dst, parse_port(dport)?),
        })
    }

    /// Parse what a reader got from the start of a stream when it read at
    /// most [`MAX_LEN`] bytes, stopping after the first `\n`: empty (the
    /// stream ended before the line), without a line end (ended inside it, or
    /// no line end within the limit), or the line.
    pub fn parse_received(received: &[u8]) -> Result<ProxyHeader, ProtocolError> {
        if received.is_empty() {
            return Err(ProtocolError::ProxyHeader("connection closed before it"));
        }
        if received.last() != Some(&b'\n') {
            if received.len() < MAX_LEN {
                return Err(ProtocolError::ProxyHeader("connection closed inside it"));
            }
            return Err(ProtocolError::ProxyHeader("no line end within 107 bytes"));
        }
        Self::parse(received)
    }
}

/// The line, CRLF included: TCP4 if both addresses are IPv4, otherwise TCP6
/// with any IPv4 address mapped.
impl std::fmt::Display for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sport, dport) = (self.source.port(), self.destination.port());
        match (self.source.ip(), self.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => write!(f, "PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
            (s, d) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                write!(f, "PROXY TCP6 {} {} {sport} {dport}\r\n", v6(s), v6(d))
            }
        }
    }
}

fn parse_ip(text: &str, v6: bool) -> Result<IpAddr, ProtocolError> {
    let ip = if v6 { text.parse::<Ipv6Addr>().map(IpAddr::V6) } else { text.parse::<Ipv4Addr>().map(IpAddr::V4) };
    ip.map_err(|_| ProtocolError::ProxyHeader("address does not match the protocol"))
}

fn parse_port(text: &str) -> Result<u16, ProtocolError> {
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(ProtocolError::ProxyHeader("port is not a plain decimal number"));
    }
    text.parse().map_err(|_| ProtocolError::ProxyHeader("port out of range"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(source: &str, destination: &str) -> String {
        ProxyHeader::new(source.parse().unwrap(), destination.parse().unwrap()).to_string()
    }

    #[test]
    fn header_for_ipv4() {
        assert_eq!(line("10.0.0.1:40000", "93.184.216.34:443"), "PROXY TCP4 10.0.0.1 93.184.216.34 40000 443\r\n");
    }

    #[test]
    fn header_for_mapped_and_ipv6_addresses() {
        assert_eq!(line("[::ffff:10.0.0.1]:1", "[::ffff:1.2.3.4]:443"), "PROXY TCP4 10.0.0.1 1.2.3.4 1 443\r\n");
        assert_eq!(line("[fd00::1]:65535", "1.2.3.4:443"), "PROXY TCP6 fd00::1 ::ffff:1.2.3.4 65535 443\r\n");
    }

    #[test]
    fn longest_header_fits_the_spec_limit() {
        let v4 = line("255.255.255.255:65535", "255.255.255.255:65535");
        let v6 =
            line("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        assert!(v4.len() <= MAX_LEN && v6.len() <= MAX_LEN, "{} {}", v4.len(), v6.len());
    }

    #[test]
    fn what_the_guest_sends_the_host_parses() {
        for (source, destination) in [("10.0.0.1:40000", "93.184.216.34:443"), ("[fd00::1]:1", "[2001:db8::1]:8443")] {
            let sent = ProxyHeader::new(source.parse().unwrap(), destination.parse().unwrap());
            assert_eq!(ProxyHeader::parse(sent.to_string().as_bytes()).unwrap(), sent);
        }
    }

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
        let h = ProxyHeader::parse(b"PROXY TCP6 ::ffff:10.0.0.2 ::ffff:1.2.3.4 5 443\r\n").unwrap();
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

    #[test]
    fn received_bytes_without_a_line_are_refused() {
        let err = ProxyHeader::parse_received(&[b'A'; MAX_LEN]).unwrap_err();
        assert!(err.to_string().contains("within 107"), "{err}");
        let err = ProxyHeader::parse_received(b"").unwrap_err();
        assert!(err.to_string().contains("closed before"), "{err}");
        let err = ProxyHeader::parse_received(b"PROXY TCP4 1.2").unwrap_err();
        assert!(err.to_string().contains("closed inside"), "{err}");
        assert!(ProxyHeader::parse_received(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n").is_err());
        let h = ProxyHeader::parse_received(b"PROXY TCP4 10.0.0.2 1.2.3.4 5 443\r\n").unwrap();
        assert_eq!(h.destination.port(), 443);
    }
}
