//! The sandbox CA and the leaf certificates the MITM handler presents.
//!
//! A CA is an ECDSA P-256 key and self-signed certificate. By default every
//! sandbox gets a fresh one ([`SandboxCa::generate`]): its key exists only in
//! the memory of the process holding the sandbox, so no two sandboxes (two
//! restored from one snapshot included) trust each other's CA, and nothing is
//! left to steal once the sandbox is gone. Only the certificate goes into the
//! guest, and into `<sandbox dir>/ca.pem` for users to see.
//!
//! An embedder or a test may pin one persistent CA instead
//! ([`SandboxCa::load_or_create`], [`crate::NetConfig::ca_dir`]): created on
//! first use in one file, `<dir>/ca.pem` (certificate then PKCS#8 key, mode
//! 0600, in a directory of mode 0700), and shared by every sandbox started
//! with that directory.
//!
//! Leaves are minted per SNI name: ECDSA P-256, valid 24 hours, signed by the CA,
//! and cached until an hour before they expire.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// Name of the file holding a persistent CA's certificate and key.
pub const CA_FILE: &str = "ca.pem";
/// Validity of a newly created CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a leaf certificate.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is replaced when less than this much of its validity is left.
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Certificates start this long in the past, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(300);
/// Most leaves kept in the cache.
const LEAF_CACHE_MAX: usize = 4096;

/// A sandbox certificate authority: the certificate a guest trusts and the
/// key that signs the MITM handler's leaves.
pub struct SandboxCa {
    /// The file a persistent CA lives in; `None` for one generated in memory.
    path: Option<PathBuf>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A new CA, in memory only: its key is never written anywhere.
    pub fn generate() -> Result<SandboxCa> {
        let (cert, key) = new_ca()?;
        let cert_der = cert.der().clone();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let cert_pem = pem_block("CERTIFICATE", &cert_der);
        Ok(SandboxCa { path: None, cert_pem, cert_der, issuer })
    }

    /// Load the CA from `dir`, creating it if there is none. Concurrent callers
    /// agree on one CA: creation publishes the file with a hard link, which fails
    /// if another process got there first.
    pub fn load_or_create(dir: &Path) -> Result<SandboxCa> {
        let path = dir.join(CA_FILE);
        if path.exists() {
            return Self::load(&path);
        }
        create_private_dir(dir)?;
        let tmp = write_new_ca(dir)?;
        let published = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match published {
            Ok(()) => tracing::info!(path = %path.display(), "created sandbox CA"),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(Error::File { path, source }),
        }
        Self::load(&path)
    }

    fn load(path: &Path) -> Result<SandboxCa> {
        let bad = |message: String| Error::Ca { path: path.to_owned(), message };
        let file = |source| Error::File { path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(file)?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!("mode {:o} lets others read the key; it must be 0600", meta.mode() & 0o777)));
        }
        let text = fs::read_to_string(path).map_err(file)?;
        let mut cert = None;
        let mut key = None;
        for item in rustls_pemfile::read_all(&mut text.as_bytes()) {
            match item.map_err(|e| bad(format!("unreadable PEM: {e}")))? {
                rustls_pemfile::Item::X509Certificate(der) if cert.is_none() => cert = Some(der),
                rustls_pemfile::Item::Pkcs8Key(der) if key.is_none() => key = Some(der),
                _ => return Err(bad("expected one certificate and one PKCS#8 key".into())),
            }
        }
        let (Some(cert_der), Some(key_der)) = (cert, key) else {
            return Err(bad("expected one certificate and one PKCS#8 key".into()));
        };
        let key = KeyPair::try_from(&key_der).map_err(|e| bad(format!("key: {e}")))?;
        CertifiedKey::from_der(vec![cert_der.clone()], PrivateKeyDer::Pkcs8(key_der), &crate::crypto_provider())
            .map_err(|e| bad(format!("certificate and key do not belong together: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(format!("certificate: {e}")))?;
        let cert_pem = pem_block("CERTIFICATE", &cert_der);
        Ok(SandboxCa { path: Some(path.to_owned()), cert_pem, cert_der, issuer })
    }

    /// The CA certificate in PEM, to install in a guest's trust store.
    pub fn ca_cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The file a persistent CA lives in; `None` for one made by [`Self::generate`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Mint a leaf certificate for `name`, valid [`LEAF_LIFETIME`] from now.
    pub fn mint_leaf(&self, name: &str) -> Result<(CertifiedKey, SystemTime)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = not_before + LEAF_LIFETIME;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(vec![cert.der().clone()], key_der, &crate::crypto_provider())?;
        Ok((certified, not_after))
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let file = |source| Error::File { path: dir.to_owned(), source };
    fs::create_dir_all(dir).map_err(file)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(file)
}

/// A new CA key and self-signed certificate.
fn new_ca() -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sandbox");
    dn.push(DnType::CommonName, "sandbox MITM CA");
    params.distinguished_name = dn;
    let not_before = SystemTime::now() - BACKDATE;
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_before + CA_LIFETIME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// Generate a CA and write it to a fresh temporary file in `dir` (mode 0600).
fn write_new_ca(dir: &Path) -> Result<PathBuf> {
    let (cert, key) = new_ca()?;
    let text = format!("{}{}", cert.pem(), key.serialize_pem());

    let nonce = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{CA_FILE}.{}.{nonce}", std::process::id()));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| Error::File { path: tmp.clone(), source })?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|source| Error::File { path: tmp.clone(), source })?;
    Ok(tmp)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Leaves by SNI name, minted on demand and reused until near expiry.
#[derive(Debug)]
pub struct LeafCache {
    ca: Arc<SandboxCa>,
    leaves: Mutex<HashMap<String, (Arc<CertifiedKey>, SystemTime)>>,
}

impl LeafCache {
    /// A cache of leaves signed by `ca`.
    pub fn new(ca: Arc<SandboxCa>) -> Self {
        Self { ca, leaves: Mutex::new(HashMap::new()) }
    }

    /// The leaf for `name` (lower case), minting one if none is cached or the
    /// cached one expires within the hour.
    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>> {
        let now = SystemTime::now();
        let usable = |expires: SystemTime| now + LEAF_RENEW_BEFORE < expires;
        if let Some((leaf, expires)) = self.lock().get(name) {
            if usable(*expires) {
                return Ok(leaf.clone());
            }
        }
        let (leaf, expires) = self.ca.mint_leaf(name)?;
        let leaf = Arc::new(leaf);
        let mut leaves = self.lock();
        if leaves.len() >= LEAF_CACHE_MAX {
            leaves.retain(|_, (_, expires)| usable(*expires));
            if leaves.len() >= LEAF_CACHE_MAX {
                leaves.clear();
            }
        }
        leaves.insert(name.to_owned(), (leaf.clone(), expires));
        Ok(leaf)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<CertifiedKey>, SystemTime)>> {
        match self.leaves.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::{ServerName, UnixTime};

    fn verify_leaf(
        ca: &SandboxCa,
        leaf: &CertifiedKey,
        name: &str,
        at: SystemTime,
    ) -> std::result::Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(crate::crypto_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &ServerName::try_from(name.to_owned()).unwrap(), &[], now)
            .map(|_| ())
    }

    #[test]
    fn created_once_with_private_modes_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = SandboxCa::load_or_create(&ca_dir).unwrap();
        let file = ca_dir.join(CA_FILE);
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&ca_dir).unwrap().mode() & 0o777, 0o700);
        assert!(ca.ca_cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(!ca.ca_cert_pem().contains("PRIVATE KEY"));
        let again = SandboxCa::load_or_create(&ca_dir).unwrap();
        assert_eq!(again.ca_cert_der(), ca.ca_cert_der());
        assert_eq!(fs::read_dir(&ca_dir).unwrap().count(), 1, "no temporary files left");
    }

    #[test]
    fn generated_cas_are_distinct_in_memory_and_sign_leaves_only_they_verify() {
        let a = SandboxCa::generate().unwrap();
        let b = SandboxCa::generate().unwrap();
        assert_eq!(a.path(), None);
        assert_ne!(a.ca_cert_der(), b.ca_cert_der());
        assert!(a.ca_cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(!a.ca_cert_pem().contains("PRIVATE KEY"));
        let parsed = match rustls_pemfile::read_one(&mut a.ca_cert_pem().as_bytes()).unwrap() {
            Some(rustls_pemfile::Item::X509Certificate(der)) => der,
            other => panic!("not a certificate: {other:?}"),
        };
        assert_eq!(&parsed, a.ca_cert_der(), "the PEM is the certificate");
        let (leaf, _) = a.mint_leaf("example.com").unwrap();
        assert!(verify_leaf(&a, &leaf, "example.com", SystemTime::now()).is_ok());
        assert!(verify_leaf(&b, &leaf, "example.com", SystemTime::now()).is_err());
    }

    #[test]
    fn a_persistent_ca_signs_leaves_a_generated_one_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = SandboxCa::load_or_create(dir.path()).unwrap();
        assert_eq!(pinned.path(), Some(dir.path().join(CA_FILE).as_path()));
        let fresh = SandboxCa::generate().unwrap();
        assert_ne!(pinned.ca_cert_der(), fresh.ca_cert_der());
        let (leaf, _) = pinned.mint_leaf("example.com").unwrap();
        assert!(verify_leaf(&pinned, &leaf, "example.com", SystemTime::now()).is_ok());
        assert!(verify_leaf(&fresh, &leaf, "example.com", SystemTime::now()).is_err());
    }

    #[test]
    fn refuses_readable_or_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        SandboxCa::load_or_create(dir.path()).unwrap();
        let file = dir.path().join(CA_FILE);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SandboxCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("0600"), "{err}");

        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let text = fs::read_to_string(&file).unwrap();
        let cert_only: String = text.split_inclusive('\n').take_while(|l| !l.contains("PRIVATE")).collect();
        fs::write(&file, cert_only).unwrap();
        let err = SandboxCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("one certificate and one PKCS#8 key"), "{err}");

        let other = tempfile::tempdir().unwrap();
        SandboxCa::load_or_create(other.path()).unwrap();
        let other_text = fs::read_to_string(other.path().join(CA_FILE)).unwrap();
        let cert: String = text.split_inclusive('\n').take_while(|l| !l.contains("PRIVATE")).collect();
        let key: String = other_text.split_inclusive('\n').skip_while(|l| !l.contains("PRIVATE")).collect();
        fs::write(&file, format!("{cert}{key}")).unwrap();
        let err = SandboxCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("do not belong together"), "{err}");
    }

    #[test]
    fn leaves_are_p256_valid_for_a_day_for_their_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SandboxCa::load_or_create(dir.path()).unwrap();
        let (leaf, expires) = ca.mint_leaf("api.example.com").unwrap();
        assert_eq!(leaf.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        let now = SystemTime::now();
        assert!(verify_leaf(&ca, &leaf, "api.example.com", now).is_ok());
        assert!(verify_leaf(&ca, &leaf, "other.example.com", now).is_err());
        assert!(verify_leaf(&ca, &leaf, "api.example.com", now + Duration::from_secs(23 * 3600)).is_ok());
        assert!(verify_leaf(&ca, &leaf, "api.example.com", now + Duration::from_secs(24 * 3600 + 1)).is_err());
        let lifetime = expires.duration_since(now).unwrap();
        assert!(lifetime <= LEAF_LIFETIME && lifetime > LEAF_LIFETIME - BACKDATE - Duration::from_secs(60));
    }

    #[test]
    fn cache_reuses_leaves_per_name() {
        let cache = LeafCache::new(Arc::new(SandboxCa::generate().unwrap()));
        let a = cache.get("a.test").unwrap();
        assert!(Arc::ptr_eq(&a, &cache.get("a.test").unwrap()));
        assert!(!Arc::ptr_eq(&a, &cache.get("b.test").unwrap()));
    }
}
