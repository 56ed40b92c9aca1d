//! Images on local disk: OCI layout directories and `docker save` archives.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config;
use crate::convert::LayerInput;
use crate::manifest::{self, Descriptor, Parsed, MAX_MANIFEST_BYTES};
use crate::{Digest, Error};

/// What converting an image needs: its cache key, config and layers.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The manifest digest (for docker-archive: the config digest, the image ID).
    pub(crate) key: Digest,
    pub(crate) config: config::ParsedConfig,
    pub(crate) layers: Vec<LayerInput>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
pub(crate) fn oci_layout(dir: &Path, tag: Option<&str>) -> Result<Plan, Error> {
    let what = format!("OCI layout {}", dir.display());
    let index = read_limited(&dir.join("index.json"), MAX_MANIFEST_BYTES)?;
    let Parsed::Index(entries) = manifest::parse(&index, &format!("{what}/index.json"))? else {
        return Err(Error::Manifest { what, reason: "index.json is not an image index".into() });
    };
    let chosen = match tag {
        Some(tag) => entries
            .iter()
            .find(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == tag))
            .ok_or_else(|| Error::Manifest { what: what.clone(), reason: format!("no image tagged {tag:?}") })?,
        None => match entries.as_slice() {
            [only] => only,
            [] => return Err(Error::Manifest { what, reason: "index.json lists no image".into() }),
            _ => return Err(Error::Manifest { what, reason: "several images: name one with oci:<dir>:<tag>".into() }),
        },
    };
    let (key, manifest) = resolve(dir, chosen, &what, 0)?;
    let config_bytes = blob(dir, &manifest.config, "config", MAX_MANIFEST_BYTES)?;
    let config = config::parse(&config_bytes)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(Error::Manifest {
            what,
            reason: "the config's diff_ids do not match the manifest's layers".into(),
        });
    }
    let layers = manifest
        .layers
        .iter()
        .zip(&config.diff_ids)
        .map(|(d, diff_id)| {
            let digest = Digest::parse(&d.digest)?;
            Ok(LayerInput {
                path: dir.join("blobs/sha256").join(digest.hex()),
                offset: 0,
                size: d.size,
                digest: Some(digest),
                diff_id: diff_id.clone(),
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Plan { key, config, layers })
}

fn resolve(dir: &Path, desc: &Descriptor, what: &str, depth: u8) -> Result<(Digest, manifest::Manifest), Error> {
    let bytes = blob(dir, desc, "manifest", MAX_MANIFEST_BYTES)?;
    match manifest::parse(&bytes, what)? {
        Parsed::Manifest(m) => Ok((Digest::parse(&desc.digest)?, m)),
        Parsed::Index(entries) if depth < 2 => resolve(dir, manifest::pick_platform(&entries, what)?, what, depth + 1),
        Parsed::Index(_) => Err(Error::Manifest { what: what.to_string(), reason: "indexes nested too deep".into() }),
    }
}

fn blob(dir: &Path, desc: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, Error> {
    let digest = Digest::parse(&desc.digest)?;
    if desc.size > limit {
        return Err(Error::Limit(format!("{what} {} is {} bytes, more than {limit}", desc.digest, desc.size)));
    }
    let bytes = read_limited(&dir.join("blobs/sha256").join(digest.hex()), limit)?;
    manifest::verify(&bytes, desc, what)?;
    Ok(bytes)
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let f = File::open(path).map_err(Error::io("open", path))?;
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out).map_err(Error::io("read", path))?;
    if out.len() as u64 > limit {
        return Err(Error::Limit(format!("{} is larger than {limit} bytes", path.display())));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    layers: Vec<String>,
}

enum Member {
    File { offset: u64, size: u64 },
    Symlink(String),
}

const MAX_ARCHIVE_MEMBERS: usize = 100_000;

/// A `docker save` archive: `manifest.json`, the config and layer tars.
pub(crate) fn docker_archive(path: &Path) -> Result<Plan, Error> {
    let bad = |reason: String| Error::Manifest { what: format!("docker archive {}", path.display()), reason };
    let file = File::open(path).map_err(Error::io("open", path))?;
    let mut members = HashMap::new();
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(format!("not a tar archive, or truncated: {e}")))?;
        if members.len() >= MAX_ARCHIVE_MEMBERS {
            return Err(Error::Limit(format!("more than {MAX_ARCHIVE_MEMBERS} members in the archive")));
        }
        let name = normalise(&String::from_utf8_lossy(&entry.path_bytes()));
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Member::File { offset: entry.raw_file_position(), size: entry.size() }
            }
            tar::EntryType::Symlink => {
                let target =
                    entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
                Member::Symlink(target)
            }
            _ => continue,
        };
        members.insert(name, member);
    }
    let lookup = |name: &str| -> Result<(u64, u64), Error> {
        let mut name = normalise(name);
        for _ in 0..8 {
            match members.get(&name) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Symlink(target)) => {
                    let base = name.rsplit_once('/').map_or("", |(d, _)| d);
                    name = normalise(&format!("{base}/{target}"));
                }
                None => break,
            }
        }
        Err(bad(format!("member {name:?} is missing")))
    };
    let read_member = |name: &str| -> Result<Vec<u8>, Error> {
        let (offset, size) = lookup(name)?;
        if size > MAX_MANIFEST_BYTES {
            return Err(Error::Limit(format!("{name} is larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let mut f = File::open(path).map_err(Error::io("open", path))?;
        f.seek(SeekFrom::Start(offset)).map_err(Error::io("seek in", path))?;
        let mut out = Vec::new();
        f.take(size).read_to_end(&mut out).map_err(Error::io("read", path))?;
        Ok(out)
    };
    let images: Vec<ArchiveImage> =
        serde_json::from_slice(&read_member("manifest.json")?).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let image = match images.as_slice() {
        [one] => one,
        [] => return Err(bad("manifest.json lists no image".into())),
        _ => return Err(bad("the archive holds several images; save one image per archive".into())),
    };
    let config_bytes = read_member(&image.config)?;
    let key = Digest::of(&config_bytes);
    let config = config::parse(&config_bytes)?;
    if config.diff_ids.len() != image.layers.len() {
        return Err(bad("the config's diff_ids do not match the listed layers".into()));
    }
    let layers = image
        .layers
        .iter()
        .zip(&config.diff_ids)
        .map(|(name, diff_id)| {
            let (offset, size) = lookup(name)?;
            Ok(LayerInput { path: path.to_path_buf(), offset, size, digest: None, diff_id: diff_id.clone() })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Plan { key, config, layers })
}

/// `./a//b/../c` -> `a/c` (names inside an archive, never used as host paths).
fn normalise(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Where a layer lives for a registry pull (the store's blob directory).
pub(crate) fn blob_path(blobs: &Path, digest: &Digest) -> PathBuf {
    blobs.join(digest.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names() {
        assert_eq!(normalise("./a//b/../c"), "a/c");
        assert_eq!(normalise("../../x"), "x");
    }
}
