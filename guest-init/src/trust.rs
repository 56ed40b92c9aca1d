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

/// Install `pem` under `root` (`/` in the guest), in place of the sandbox
/// CA trusted before, if any (a guest restored from a snapshot trusts the
/// CA of the sandbox the snapshot was taken from). Returns the files changed.
pub(crate) fn install_ca(root: &Path, pem: &str) -> Result<Vec<PathBuf>, String> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") || pem.contains("PRIVATE KEY") {
        return Err("not a PEM certificate (or it holds a private key)".into());
    }
    let pem = if pem.ends_with('\n') { pem.to_string() } else { format!("{pem}\n") };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let ca_file = at(CA_FILE);
    let bundles: Vec<PathBuf> = std::iter::once(at(SYSTEM_BUNDLE)).chain(certifi_bundles(root)).collect();
    let old = std::fs::read_to_string(&ca_file).ok().filter(|old| old.trim() != pem.trim() && !old.trim().is_empty());
    if let Some(old) = old {
        for bundle in &bundles {
            remove(bundle, &old)?;
        }
    }
    let mut changed = Vec::new();
    write_new(&ca_file, &pem)?;
    changed.push(ca_file);
    for bundle in bundles {
        append(&bundle, &pem)?;
        changed.push(bundle);
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

/// Take `pem` (as [`append`] added it) out of the bundle at `path`.
fn remove(path: &Path, pem: &str) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept = text.replace(&format!("\n{pem}"), "").replace(pem, "");
    if kept.len() == text.len() {
        return Ok(());
    }
    std::fs::write(path, kept).map_err(|e| format!("{}: {e}", path.display()))
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
    fn a_new_ca_takes_the_place_of_the_one_trusted_before() {
        const OTHER: &str = "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n";
        let root = tempfile::tempdir().unwrap();
        let certifi = root.path().join("usr/local/lib/python3.12/dist-packages/certifi/cacert.pem");
        std::fs::create_dir_all(certifi.parent().unwrap()).unwrap();
        std::fs::write(&certifi, "existing\n").unwrap();
        let bundle = root.path().join("etc/ssl/certs/ca-certificates.crt");
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::fs::write(&bundle, "system roots\n").unwrap();
        install_ca(root.path(), PEM).unwrap();
        install_ca(root.path(), OTHER).unwrap();
        for file in [&bundle, &certifi] {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(!text.contains("MIIB"), "the old CA is still trusted in {}: {text}", file.display());
            assert_eq!(text.matches("MIIC").count(), 1, "{text}");
            assert!(text.starts_with("system roots\n") || text.starts_with("existing\n"), "{text}");
        }
        assert_eq!(std::fs::read_to_string(root.path().join(CA_FILE.trim_start_matches('/'))).unwrap(), OTHER);
    }

    #[test]
    fn keys_and_garbage_are_refused() {
        let root = tempfile::tempdir().unwrap();
        assert!(install_ca(root.path(), "hello").is_err());
        assert!(install_ca(root.path(), "-----BEGIN CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----").is_err());
    }
}
