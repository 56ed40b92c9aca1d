//! Reaching upstreams through a corporate HTTP proxy: an HTTP `CONNECT`
//! tunnel per upstream connection (RFC 9110 section 9.3.6), with optional
//! Basic proxy credentials.
//!
//! The handlers still resolve and guard every upstream name themselves and
//! ask the proxy for the checked address (`CONNECT 93.184.216.34:443`), not
//! the name: a proxy inside a corporate network that resolved the name again
//! could be steered by the guest's DNS to an internal address nothing
//! checked. TLS still names and verifies the host. DNS queries of the guest
//! do not go through the proxy.
//! Inspected, passthrough and tcp connections all use the tunnel; a
//! TLS-inspecting proxy's CA is trusted through `extra_root_files`.

use std::fmt;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// The longest proxy response head read.
const MAX_HEAD: usize = 16 * 1024;

/// An HTTP proxy that upstream connections go through.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamProxy {
    /// `host:port` of the proxy.
    pub address: String,
    /// `user:password` for Basic proxy authentication, if the proxy needs it.
    pub credentials: Option<String>,
}

/// Credentials never show.
impl fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamProxy")
            .field("address", &self.address)
            .field("credentials", &self.credentials.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl UpstreamProxy {
    /// Parse `http://host:port` (a trailing `/` is allowed).
    pub fn parse(url: &str) -> std::result::Result<UpstreamProxy, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: the upstream proxy must be an http:// URL (http://host:port)"))?;
        let address = rest.trim_end_matches('/');
        if address.contains(['/', '@', '?', '#']) || address.is_empty() {
            return Err(format!("{url}: expected http://host:port, without a path or credentials"));
        }
        let port = address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!("{url}: the upstream proxy needs a port (http://host:port)"));
        }
        Ok(UpstreamProxy { address: address.to_owned(), credentials: None })
    }

    /// Open a tunnel through the proxy to `target` (`host:port`, or an
    /// address and port).
    pub async fn connect(&self, target: &str) -> Result<TcpStream> {
        let failed = |message: String| Error::Proxy { proxy: self.address.clone(), target: target.to_owned(), message };
        let mut stream = TcpStream::connect(&self.address).await.map_err(|e| failed(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| failed(format!("send CONNECT: {e}")))?;
        let head = read_head(&mut stream).await.map_err(|e| failed(format!("read the answer: {e}")))?;
        let status = parse_status(&head).ok_or_else(|| failed("the answer is not HTTP".into()))?;
        if !(200..300).contains(&status) {
            let line = head.lines().next().unwrap_or_default().to_owned();
            return Err(failed(format!("CONNECT refused: {line}")));
        }
        Ok(stream)
    }
}

/// Read the response head up to the blank line, one byte at a time so that
/// nothing of the tunnel behind it is taken (a server may speak first).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::other("response head longer than 16 KiB"));
        }
        let byte = stream.read_u8().await?;
        head.push(byte);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(head: &str) -> Option<u16> {
    let mut parts = head.lines().next()?.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_status_lines() {
        let proxy = UpstreamProxy::parse("http://proxy.corp:3128/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(proxy.address, "proxy.corp:3128");
        for bad in ["https://p:1", "http://p", "http://p:x", "http://u:p@p:1", "http://p:1/x", "http://:1"] {
            assert!(UpstreamProxy::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_status("HTTP/1.1 200 Connection established\r\n\r\n"), Some(200));
        assert_eq!(parse_status("HTTP/1.0 407 Proxy Authentication Required\r\n"), Some(407));
        assert_eq!(parse_status("SSH-2.0-x\r\n"), None);
        let secret = UpstreamProxy { address: "p:1".into(), credentials: Some("u:hunter2".into()) };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
