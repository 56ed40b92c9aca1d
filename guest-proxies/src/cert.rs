//! Describing a server certificate for people and tests: who it names and
//! who issued it. The DER comes from a TLS peer, so it is parsed without
//! trusting it (x509-parser never panics on bad input).

use x509_parser::prelude::{FromDer, X509Certificate};

/// `certificate: subject=<DN>; issuer=<DN>`, or why the bytes could not be read.
pub fn describe(der: &[u8]) -> String {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => format!("certificate: subject={}; issuer={}", cert.subject(), cert.issuer()),
        Err(e) => format!("certificate: unreadable ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_subject_and_issuer_and_survives_garbage() {
        let ca = net::fixtures::TestCa::new("describe test CA").unwrap();
        let (chain, _) = ca.issue(&["leaf.test"]).unwrap();
        let line = describe(&chain[0]);
        assert!(line.contains("issuer=CN=describe test CA"), "{line}");
        assert!(describe(b"\x30\x03garbage").starts_with("certificate: unreadable"));
        assert!(describe(&[]).starts_with("certificate: unreadable"));
    }
}
