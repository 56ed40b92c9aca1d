//! Pulling from OCI / Docker v2 registries (oci-client): anonymous or token
//! auth with credentials from Docker's config, index -> linux/amd64,
//! parallel resumable layer downloads, every blob checked against its digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use crate::digest::Hasher;
use crate::manifest::{self, Descriptor, Parsed, MAX_MANIFEST_BYTES};
use crate::source::is_loopback_registry;
use crate::{Digest, Error};

/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;
/// Attempts per blob; later attempts resume where the last one stopped.
const ATTEMPTS: u32 = 3;

pub(crate) struct Remote {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
}

/// A resolved single-platform manifest.
pub(crate) struct Resolved {
    pub(crate) digest: Digest,
    pub(crate) manifest: manifest::Manifest,
}

impl Remote {
    pub(crate) fn new(reference: Reference, docker_config: Option<&Path>) -> Remote {
        // reqwest is built without a bundled crypto provider: use ring, as the rest of the workspace does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = reference.resolve_registry().to_string();
        let protocol = if is_loopback_registry(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(60)),
            platform_resolver: None,
            ..ClientConfig::default()
        });
        let auth = credentials(reference.registry(), docker_config);
        Remote { client, auth, reference }
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Registry { reference: self.reference.whole(), message: e.to_string() }
    }

    /// Fetch the manifest (through an index if there is one) and check digests.
    pub(crate) async fn resolve(&self) -> Result<Resolved, Error> {
        let accepted: Vec<&str> = manifest::INDEX_TYPES.iter().chain(manifest::MANIFEST_TYPES).copied().collect();
        let mut reference = self.reference.clone();
        for _ in 0..3 {
            let (bytes, _) =
                self.client.pull_manifest_raw(&reference, &self.auth, &accepted).await.map_err(|e| self.err(e))?;
            if bytes.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(Error::Limit(format!(
                    "manifest of {} is larger than {MAX_MANIFEST_BYTES} bytes",
                    reference.whole()
                )));
            }
            let digest = Digest::of(&bytes);
            if let Some(pinned) = reference.digest() {
                if digest.to_string() != pinned {
                    return Err(Error::DigestMismatch {
                        what: "manifest".into(),
                        digest: pinned.to_string(),
                        actual: digest.to_string(),
                    });
                }
            }
            match manifest::parse(&bytes, &reference.whole())? {
                Parsed::Manifest(manifest) => return Ok(Resolved { digest, manifest }),
                Parsed::Index(entries) => {
                    let chosen = manifest::pick_platform(&entries, &reference.whole())?;
                    Digest::parse(&chosen.digest)?;
                    reference = reference.clone_with_digest(chosen.digest.clone());
                }
            }
        }
        Err(self.err("image indexes nested too deep"))
    }

    /// A small blob (the config) into memory, checked.
    pub(crate) async fn small_blob(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, Error> {
        if desc.size > MAX_MANIFEST_BYTES {
            return Err(Error::Limit(format!(
                "{what} {} is {} bytes, more than {MAX_MANIFEST_BYTES}",
                desc.digest, desc.size
            )));
        }
        let mut stream =
            self.client.pull_blob_stream(&self.reference, desc.digest.as_str()).await.map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err(e))?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > desc.size {
                break;
            }
        }
        manifest::verify(&out, desc, what)?;
        Ok(out)
    }

    /// Download every layer into `dir` (as `<hex>`), a few at a time.
    pub(crate) async fn download_layers(
        self: &Arc<Self>,
        layers: &[Descriptor],
        dir: &Path,
        progress: &MultiProgress,
    ) -> Result<(), Error> {
        let gate = Arc::new(tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS));
        let mut tasks = tokio::task::JoinSet::new();
        let style = ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        for desc in layers {
            let digest = Digest::parse(&desc.digest)?;
            let bar = progress.add(ProgressBar::new(desc.size).with_style(style.clone()).with_prefix(short(&digest)));
            let remote = Arc::clone(self);
            let gate = Arc::clone(&gate);
            let size = desc.size;
            let dir = dir.to_path_buf();
            tasks.spawn(async move {
                let _permit = gate.acquire().await;
                let result = remote.download(&digest, size, &dir, &bar).await;
                bar.finish();
                result
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| self.err(format!("download task failed: {e}")))??;
        }
        Ok(())
    }

    async fn download(&self, digest: &Digest, size: u64, dir: &Path, bar: &ProgressBar) -> Result<PathBuf, Error> {
        let done = dir.join(digest.hex());
        if std::fs::metadata(&done).is_ok_and(|m| m.len() == size) {
            bar.set_position(size);
            return Ok(done);
        }
        let partial = dir.join(format!("{}.partial", digest.hex()));
        let mut hasher = Hasher::default();
        let mut have = 0u64;
        // Resume: what an earlier, interrupted pull fetched counts.
        if let Ok(existing) = std::fs::read(&partial) {
            if existing.len() as u64 <= size {
                hasher.update(&existing);
                have = existing.len() as u64;
            }
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .await
            .map_err(Error::io("open", &partial))?;
        if have == 0 {
            file.set_len(0).await.map_err(Error::io("truncate", &partial))?;
        }
        let mut last_error = None;
        for attempt in 0..ATTEMPTS {
            if have == size {
                break;
            }
            if attempt > 0 {
                tracing::warn!(%digest, have, "download interrupted, resuming: {}", last_error.as_deref().unwrap_or_default());
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            let response = match self
                .client
                .pull_blob_stream_partial(&self.reference, digest.to_string().as_str(), have, None)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            let mut stream = match response {
                BlobResponse::Partial(s) => s,
                BlobResponse::Full(s) => {
                    // The registry ignored the range: start over.
                    file.set_len(0).await.map_err(Error::io("truncate", &partial))?;
                    hasher = Hasher::default();
                    have = 0;
                    s
                }
            };
            bar.set_position(have);
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        last_error = Some(e.to_string());
                        break;
                    }
                };
                have += chunk.len() as u64;
                if have > size {
                    drop(file);
                    let _ = std::fs::remove_file(&partial);
                    return Err(Error::SizeMismatch {
                        what: "layer".into(),
                        digest: digest.to_string(),
                        expected: size,
                        actual: have,
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(Error::io("write", &partial))?;
                bar.set_position(have);
            }
        }
        file.flush().await.map_err(Error::io("write", &partial))?;
        drop(file);
        if have != size {
            return Err(match last_error {
                Some(e) => self.err(format!("layer {digest}: {e} (after {ATTEMPTS} attempts; pull again to resume)")),
                None => Error::SizeMismatch {
                    what: "layer".into(),
                    digest: digest.to_string(),
                    expected: size,
                    actual: have,
                },
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            let _ = std::fs::remove_file(&partial);
            return Err(Error::DigestMismatch {
                what: "layer".into(),
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        std::fs::rename(&partial, &done).map_err(Error::io("rename", &partial))?;
        Ok(done)
    }
}

fn short(d: &Digest) -> String {
    d.hex().chars().take(12).collect()
}

/// Credentials for `registry` from Docker's config (`$DOCKER_CONFIG` or
/// `~/.docker/config.json`, or the given directory): user and password or
/// a credential helper's answer. None found means anonymous.
fn credentials(registry: &str, docker_config: Option<&Path>) -> RegistryAuth {
    let server = if registry == "docker.io" { "https://index.docker.io/v1/" } else { registry };
    let found = match docker_config {
        Some(dir) => std::fs::File::open(dir.join("config.json"))
            .map_err(|e| e.to_string())
            .and_then(|f| docker_credential::get_credential_from_reader(f, server).map_err(|e| e.to_string())),
        None => docker_credential::get_credential(server).map_err(|e| e.to_string()),
    };
    match found {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            RegistryAuth::Basic(user, password)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
            tracing::warn!(registry, "identity tokens in the Docker config are not supported; pulling anonymously");
            RegistryAuth::Anonymous
        }
        Err(e) => {
            tracing::debug!(registry, "no credentials: {e}");
            RegistryAuth::Anonymous
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"}}}"#)
            .unwrap();
        let auth = credentials("127.0.0.1:5000", Some(dir.path()));
        assert!(matches!(auth, RegistryAuth::Basic(u, p) if u == "user" && p == "pass"));
        assert!(matches!(credentials("other:5000", Some(dir.path())), RegistryAuth::Anonymous));
        let missing = dir.path().join("nothing");
        assert!(matches!(credentials("127.0.0.1:5000", Some(&missing)), RegistryAuth::Anonymous));
    }
}
