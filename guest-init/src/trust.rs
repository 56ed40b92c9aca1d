//! Trusting the sandbox CA inside the guest: its certificate (never its key)
//! is added to the system bundle, kept as its own file, appended to Python's
//! certifi bundles, and named in the environment of every later command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The system bundle most TLS clients read.
pub(crate) const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The CA on its own, where update-ca-certificates would look for it.
pub(crate) const CA_FILE: &str = "/usr/local/share/ca-certificates/sandbox-ca.crt";

static CA_ENV: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Environment variables pointing TLS clients at the bundle (empty until a CA is installed).
pub(crate) fn ca_env() -> Vec<(String, String)> {
    CA_ENV.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Install `pem` under `root` (`/` in the guest). Returns the files changed.
pub(crate) fn install_ca(root: &Path, pem: &str) -> Result<Vec<PathBuf>, String> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") || pem.contains("PRIVATE KEY") {
        return Err("not a PEM certificate (or it holds a private key)".into());
    }
    let pem = if pem.ends_with('\n') { pem.to_string() } else { format!("{pem}\n") };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let mut changed = Vec::new();
    let ca_file = at(CA_FILE);
    write_new(&ca_file, &pem)?;
    changed.push(ca_file);
    let bundle = at(SYSTEM_BUNDLE);
    append(&bundle, &pem)?;
    changed.push(bundle);
    for certifi in certifi_bundles(root) {
        append(&certifi, &pem)?;
        changed.push(certifi);
    }
    *CA_ENV.lock().unwrap_or_else(PoisonError::into_inner) = vec![
        ("SSL_CERT_FILE".into(), SYSTEM_BUNDLE.into()),
        ("REQUESTS_CA_BUNDLE".into(), SYSTEM_BUNDLE.into()),
        ("CURL_CA_BUNDLE".into(), SYSTEM_BUNDLE.into()),
        ("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into()),
    ];
    Ok(changed)
}

fn write_new(path: &Path, pem: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, pem).map_err(|e| format!("{}: {e}", path.display()))
}

fn append(path: &Path, pem: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|s| s.contains(pem.trim())) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(format!("\n{pem}").as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// certifi's cacert.pem in the usual Python locations.
fn certifi_bundles(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for lib in ["usr/lib", "usr/local/lib"] {
        let Ok(entries) = std::fs::read_dir(root.join(lib)) else { continue };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            for packages in ["site-packages", "dist-packages"] {
                let pem = entry.path().join(packages).join("certifi/cacert.pem");
                if pem.is_file() {
                    found.push(pem);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_ca_reaches_every_bundle_once_and_the_environment() {
        let root = tempfile::tempdir().unwrap();
        let certifi = root.path().join("usr/lib/python3.11/site-packages/certifi/cacert.pem");
        std::fs::create_dir_all(certifi.parent().unwrap()).unwrap();
        std::fs::write(&certifi, "existing\n").unwrap();
        install_ca(root.path(), PEM).unwrap();
        install_ca(root.path(), PEM).unwrap();
        let bundle = std::fs::read_to_string(root.path().join("etc/ssl/certs/ca-certificates.crt")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
        let certifi = std::fs::read_to_string(certifi).unwrap();
        assert!(certifi.starts_with("existing\n") && certifi.contains(PEM));
        assert_eq!(
            std::fs::read_to_string(root.path().join("usr/local/share/ca-certificates/sandbox-ca.crt")).unwrap(),
            PEM
        );
        let env = ca_env();
        for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
            assert!(env.iter().any(|(k, _)| k == var), "{var} missing");
        }
    }

    #[test]
    fn keys_and_garbage_are_refused() {
        let root = tempfile::tempdir().unwrap();
        assert!(install_ca(root.path(), "hello").is_err());
        assert!(install_ca(root.path(), "-----BEGIN CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----").is_err());
    }
}
