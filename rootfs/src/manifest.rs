//! OCI / Docker v2 manifests and indexes, as far as pulling needs them.

use std::collections::HashMap;

use serde::Deserialize;

use crate::{Digest, Error};

pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;

pub(crate) const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
pub(crate) const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) annotations: HashMap<String, String>,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
}

/// A manifest or an index: which one is told by its fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Document {
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    #[serde(default)]
    pub(crate) manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub(crate) config: Option<Descriptor>,
    #[serde(default)]
    pub(crate) layers: Option<Vec<Descriptor>>,
}

/// A single-platform image manifest.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

pub(crate) enum Parsed {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<Parsed, Error> {
    let bad = |reason: String| Error::Manifest { what: what.to_string(), reason };
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let media = doc.media_type.as_deref().unwrap_or_default();
    if let Some(manifests) = doc.manifests {
        if !media.is_empty() && !INDEX_TYPES.contains(&media) {
            return Err(bad(format!("unsupported media type {media}")));
        }
        return Ok(Parsed::Index(manifests));
    }
    if !media.is_empty() && !MANIFEST_TYPES.contains(&media) {
        return Err(bad(format!("unsupported media type {media}")));
    }
    let (Some(config), Some(layers)) = (doc.config, doc.layers) else {
        return Err(bad("neither an image manifest nor an index".into()));
    };
    for d in layers.iter().chain([&config]) {
        Digest::parse(&d.digest)?;
    }
    if let Some(l) = layers.iter().find(|l| !l.media_type.is_empty() && !l.media_type.contains("tar")) {
        return Err(bad(format!("layer {} has media type {}, not a tar layer", l.digest, l.media_type)));
    }
    Ok(Parsed::Manifest(Manifest { config, layers }))
}

/// The linux/amd64 entry of an index.
pub(crate) fn pick_platform<'a>(entries: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, Error> {
    entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        .or_else(|| match entries {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| Error::NoPlatform(what.to_string()))
}

/// Check bytes against a descriptor's digest and size.
pub(crate) fn verify(bytes: &[u8], desc: &Descriptor, what: &str) -> Result<Digest, Error> {
    let expected = Digest::parse(&desc.digest)?;
    if bytes.len() as u64 != desc.size {
        return Err(Error::SizeMismatch {
            what: what.into(),
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of(bytes);
    if actual != expected {
        return Err(Error::DigestMismatch {
            what: what.into(),
            digest: desc.digest.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(actual)
}
