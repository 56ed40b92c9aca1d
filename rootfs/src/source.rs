//! Where an image comes from: a registry reference, an OCI layout directory
//! or a `docker save` archive.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{Digest, Error};

/// An image named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `[registry[:port]/]repository[:tag][@sha256:…]`, Docker's grammar:
    /// no registry means Docker Hub, no namespace there means `library/`,
    /// no tag and no digest means `latest`.
    Registry(oci_client::Reference),
    /// `oci:<dir>[:tag]`: an OCI image layout directory.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:<file>`: what `docker save` writes.
    DockerArchive(PathBuf),
}

impl ImageSource {
    /// Parse a reference; local paths are made absolute.
    pub fn parse(s: &str) -> Result<ImageSource, Error> {
        let bad = |reason: &str| Error::Reference { reference: s.to_string(), reason: reason.to_string() };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') => (dir, Some(tag.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("expected oci:<dir>[:tag]"));
            }
            return Ok(ImageSource::OciLayout { dir: absolute(Path::new(dir)).map_err(|e| bad(&e))?, tag });
        }
        if let Some(file) = s.strip_prefix("docker-archive:") {
            if file.is_empty() {
                return Err(bad("expected docker-archive:<file>"));
            }
            return Ok(ImageSource::DockerArchive(absolute(Path::new(file)).map_err(|e| bad(&e))?));
        }
        if s.is_empty() || s.len() > 1024 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("not a registry reference"));
        }
        let reference = oci_client::Reference::from_str(s).map_err(|e| bad(&e.to_string()))?;
        if let Some(d) = reference.digest() {
            Digest::parse(d)?;
        }
        Ok(ImageSource::Registry(reference))
    }

    /// The canonical name the cache records (`docker.io/library/alpine:3`,
    /// `oci:/abs/dir:tag`, `docker-archive:/abs/file`).
    pub fn canonical(&self) -> String {
        match self {
            ImageSource::Registry(r) => r.whole(),
            ImageSource::OciLayout { dir, tag: Some(tag) } => format!("oci:{}:{tag}", dir.display()),
            ImageSource::OciLayout { dir, tag: None } => format!("oci:{}", dir.display()),
            ImageSource::DockerArchive(file) => format!("docker-archive:{}", file.display()),
        }
    }

    /// The manifest digest the reference pins, if any.
    pub fn pinned_digest(&self) -> Option<Digest> {
        match self {
            ImageSource::Registry(r) => r.digest().and_then(|d| Digest::parse(d).ok()),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.canonical())
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Registries on loopback are spoken to over plain HTTP, as Docker treats
/// `localhost` registries as insecure by default.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_are_normalised() {
        let s = ImageSource::parse("python:3.12-slim").unwrap();
        assert_eq!(s.canonical(), "docker.io/library/python:3.12-slim");
        let s = ImageSource::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!(s.canonical(), "127.0.0.1:5000/team/app:latest");
        let d = Digest::of(b"x");
        let s = ImageSource::parse(&format!("localhost:5000/app@{d}")).unwrap();
        assert_eq!(s.pinned_digest(), Some(d));
    }

    #[test]
    fn local_sources() {
        assert_eq!(
            ImageSource::parse("oci:/tmp/layout:v1").unwrap(),
            ImageSource::OciLayout { dir: "/tmp/layout".into(), tag: Some("v1".into()) }
        );
        assert_eq!(
            ImageSource::parse("oci:/tmp/layout").unwrap(),
            ImageSource::OciLayout { dir: "/tmp/layout".into(), tag: None }
        );
        assert_eq!(
            ImageSource::parse("docker-archive:/tmp/a.tar").unwrap(),
            ImageSource::DockerArchive("/tmp/a.tar".into())
        );
        let rel = ImageSource::parse("oci:layout").unwrap();
        assert!(matches!(rel, ImageSource::OciLayout { dir, .. } if dir.is_absolute()));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "oci:", "docker-archive:", "team/App", "a b", "app@sha256:1234", "app@md5:00"] {
            assert!(ImageSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_registries() {
        for r in ["127.0.0.1:5000", "localhost:5000", "localhost", "[::1]:5000", "127.0.0.2"] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in ["docker.io", "10.0.0.1:5000", "registry.local:5000", "localhost.evil.com"] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }
}
