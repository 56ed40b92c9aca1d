//! Reading the guest's TLS ClientHello before choosing a certificate.
//!
//! rustls' [`Acceptor`](rustls::server::Acceptor) (through tokio-rustls'
//! `LazyConfigAcceptor`) parses the hello and keeps the bytes it consumed, so the
//! handshake continues from the same state once a leaf for the SNI is ready.
//! rustls drops SNI values that are IP addresses or not valid DNS names: those
//! connections count as having no SNI.

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use crate::error::{Error, Result};

/// What the handler needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    /// The SNI host name, lower case; `None` when absent or not a DNS name.
    pub sni: Option<String>,
    /// The ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
}

/// Read the ClientHello from `io`. The returned handshake continues the TLS
/// session with a configuration chosen for the hello.
pub async fn read_client_hello<IO>(io: IO) -> Result<(HelloInfo, StartHandshake<IO>)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(Acceptor::default(), io).await.map_err(Error::ClientHello)?;
    let hello = start.client_hello();
    let info = HelloInfo {
        sni: hello.server_name().map(|name| name.to_ascii_lowercase()),
        alpn: hello.alpn().map(|protocols| protocols.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
    };
    Ok((info, start))
}

/// The longest ClientHello read by [`peek_server_name`].
pub const MAX_HELLO_LEN: usize = 64 * 1024;

/// Read the ClientHello from `io` without taking part in the handshake: the
/// SNI (as [`read_client_hello`] gives it) and every byte read, which a
/// connection spliced through undecrypted must pass on first.
pub async fn peek_server_name<IO>(io: &mut IO) -> Result<(Option<String>, Vec<u8>)>
where
    IO: AsyncRead + Unpin,
{
    let mut acceptor = Acceptor::default();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = io.read(&mut chunk).await.map_err(Error::ClientHello)?;
        if read == 0 {
            return Err(Error::ClientHello(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside the ClientHello",
            )));
        }
        raw.extend_from_slice(&chunk[..read]);
        if raw.len() > MAX_HELLO_LEN {
            return Err(Error::ClientHello(std::io::Error::other("ClientHello longer than 64 KiB")));
        }
        let mut fed = &chunk[..read];
        while !fed.is_empty() {
            acceptor.read_tls(&mut fed).map_err(Error::ClientHello)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(|name| name.to_ascii_lowercase());
                return Ok((sni, raw));
            }
            Ok(None) => {}
            Err((err, _alert)) => return Err(Error::ClientHello(std::io::Error::other(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a rustls client for `name`.
    fn client_hello_bytes(name: &str) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(crate::crypto_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    async fn read(bytes: Vec<u8>) -> Result<HelloInfo> {
        let io = tokio::io::join(std::io::Cursor::new(bytes), tokio::io::sink());
        read_client_hello(io).await.map(|(info, _)| info)
    }

    #[tokio::test]
    async fn extracts_sni_and_alpn() {
        let info = read(client_hello_bytes("API.Example.com")).await.unwrap();
        assert_eq!(info.sni.as_deref(), Some("api.example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[tokio::test]
    async fn peeking_keeps_every_byte() {
        let bytes = client_hello_bytes("Pinned.Example");
        let mut reader = std::io::Cursor::new([bytes.clone(), b"after".to_vec()].concat());
        let (sni, raw) = peek_server_name(&mut reader).await.unwrap();
        assert_eq!(sni.as_deref(), Some("pinned.example"));
        assert!(raw.starts_with(&bytes), "the hello bytes are kept in order");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!([raw, rest].concat(), [bytes, b"after".to_vec()].concat());
        let err = peek_server_name(&mut std::io::Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec())).await;
        assert!(err.is_err());
        let err = peek_server_name(&mut std::io::Cursor::new(vec![0x16, 3, 1, 0xff, 0xff])).await;
        assert!(err.is_err(), "a truncated hello is an error, not a hang");
    }

    #[tokio::test]
    async fn ip_address_means_no_sni() {
        let info = read(client_hello_bytes("127.0.0.1")).await.unwrap();
        assert_eq!(info.sni, None);
    }

    #[tokio::test]
    async fn hello_split_in_small_pieces_is_read() {
        let bytes = client_hello_bytes("split.test");
        let (mut client, server) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in bytes.chunks(7) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let (info, _) = read_client_hello(server).await.unwrap();
        assert_eq!(info.sni.as_deref(), Some("split.test"));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let err = read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await.unwrap_err();
        assert!(err.to_string().starts_with("no TLS ClientHello"), "{err}");
        let mut cut = client_hello_bytes("cut.test");
        cut.truncate(cut.len() / 2);
        assert!(read(cut).await.is_err());
        assert!(read(Vec::new()).await.is_err());
    }
}
