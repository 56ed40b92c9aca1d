//! Layers -> one directory tree -> one erofs image.
//!
//! erofs-utils 1.5 (Debian 12) cannot read tar streams (`mkfs.erofs --tar`
//! came with 1.7), so the layers are applied, in order, to a private staging
//! directory (mode 0700, inside the cache) and `mkfs.erofs` then builds the
//! image from it. Keeping owners and device nodes that way needs root.
//!
//! Each layer is hostile input. Every path is resolved inside the staging
//! root as the image would see it: `..` and absolute names are refused,
//! symlinks met on the way are followed only inside the tree (an absolute
//! target means the image's `/`; a target that climbs above the root is an
//! error), and the final component is never followed: whatever is there is
//! replaced, never written through. Hard links must name an existing
//! non-directory inside the tree. Sizes, entry counts and metadata records
//! are bounded by [`Limits`]; a layer whose compressed bytes or uncompressed
//! tar stream do not match their digests is an error.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;
use nix::sys::stat::{Mode, SFlag};
use tar::EntryType;

use crate::digest::{Hashing, LimitExceeded};
use crate::{Digest, Error};

/// Bounds on what a layer set may contain.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Layers per image.
    pub max_layers: usize,
    /// Tar entries over all layers.
    pub max_entries: u64,
    /// Uncompressed bytes over all layers.
    pub max_bytes: u64,
    /// One metadata record (PAX header, GNU long name).
    pub max_metadata: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_layers: 128, max_entries: 2_000_000, max_bytes: 32 << 30, max_metadata: 1 << 20 }
    }
}

const MAX_PATH: usize = 4096;
const MAX_SYMLINK_HOPS: u32 = 40;

/// One layer blob to apply: a byte range of a local file.
#[derive(Debug, Clone)]
pub(crate) struct LayerInput {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    /// Digest of the (possibly compressed) blob; `None` when the source does
    /// not name one (docker-archive), then only `diff_id` is checked.
    pub(crate) digest: Option<Digest>,
    /// Digest of the uncompressed tar stream (the config's `rootfs.diff_ids`).
    pub(crate) diff_id: Digest,
}

impl LayerInput {
    fn name(&self) -> String {
        self.digest.as_ref().unwrap_or(&self.diff_id).to_string()
    }
}

/// Applies layers to a staging tree.
#[derive(Debug)]
pub(crate) struct Converter {
    root: PathBuf,
    limits: Limits,
    entries: u64,
    bytes: u64,
    layers: usize,
}

/// Metadata of the entry being applied, PAX and GNU records merged in.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    size: Option<u64>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Per-layer bookkeeping for whiteouts and opaque directories.
#[derive(Default)]
struct LayerState {
    /// Staged paths (relative to the root) this layer wrote.
    written: HashSet<PathBuf>,
    /// Their ancestors.
    ancestors: HashSet<PathBuf>,
    /// Directories this layer marked opaque.
    opaque: Vec<PathBuf>,
}

impl Converter {
    /// Start an empty tree at `root` (which must not exist yet).
    pub(crate) fn new(root: PathBuf, limits: Limits) -> Result<Converter, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::Permission(
                "converting an OCI image keeps its file owners and device nodes, which needs root: run as root".into(),
            ));
        }
        fs::create_dir(&root).map_err(Error::io("create the staging directory", &root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).map_err(Error::io("chmod", &root))?;
        Ok(Converter { root, limits, entries: 0, bytes: 0, layers: 0 })
    }

    /// Uncompressed bytes applied so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Apply one layer on top of what is there.
    pub(crate) fn apply(&mut self, layer: &LayerInput, progress: &ProgressBar) -> Result<(), Error> {
        self.layers += 1;
        if self.layers > self.limits.max_layers {
            return Err(Error::Limit(format!("more than {} layers", self.limits.max_layers)));
        }
        let name = layer.name();
        let lerr = |reason: String| Error::Layer { layer: name.clone(), reason };
        let mut file = File::open(&layer.path).map_err(Error::io("open layer", &layer.path))?;
        file.seek(SeekFrom::Start(layer.offset)).map_err(Error::io("seek in", &layer.path))?;
        let mut compressed = Hashing::new(file.take(layer.size), u64::MAX);
        let remaining = self.limits.max_bytes.saturating_sub(self.bytes);
        let mut state = LayerState::default();
        let applied = (|| -> Result<(Digest, u64), Error> {
            let mut buf = BufReader::with_capacity(256 << 10, &mut compressed);
            let head = buf.fill_buf().map_err(|e| lerr(format!("cannot read: {e}")))?;
            let decoder: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::bufread::MultiGzDecoder::new(buf))
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Box::new(
                    ruzstd::decoding::StreamingDecoder::new(buf).map_err(|e| lerr(format!("bad zstd stream: {e}")))?,
                )
            } else {
                Box::new(buf)
            };
            let mut tar_stream = Hashing::new(decoder, remaining);
            self.apply_tar(&mut tar_stream, &name, &mut state, progress)?;
            let (diff_id, len) = tar_stream.finish().map_err(|e| read_error(&lerr, &e, remaining))?;
            Ok((diff_id, len))
        })();
        let (diff_id, len) = match applied {
            Ok(v) => v,
            Err(e) => {
                // A short blob explains most read errors: say so.
                if let Ok((_, n)) = compressed.finish() {
                    if n < layer.size {
                        return Err(Error::SizeMismatch {
                            what: "layer".into(),
                            digest: name,
                            expected: layer.size,
                            actual: n,
                        });
                    }
                }
                return Err(e);
            }
        };
        let (digest, n) = compressed.finish().map_err(|e| lerr(format!("cannot read: {e}")))?;
        if n != layer.size {
            return Err(Error::SizeMismatch { what: "layer".into(), digest: name, expected: layer.size, actual: n });
        }
        if let Some(expected) = &layer.digest {
            if digest != *expected {
                return Err(Error::DigestMismatch {
                    what: "layer".into(),
                    digest: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        if diff_id != layer.diff_id {
            return Err(Error::DigestMismatch {
                what: "uncompressed layer (config diff_id)".into(),
                digest: layer.diff_id.to_string(),
                actual: diff_id.to_string(),
            });
        }
        self.bytes += len;
        self.finish_layer(&state).map_err(|e| lerr(e.to_string()))?;
        Ok(())
    }

    fn apply_tar<R: Read>(
        &mut self,
        stream: &mut Hashing<R>,
        layer: &str,
        state: &mut LayerState,
        progress: &ProgressBar,
    ) -> Result<(), Error> {
        let remaining = self.limits.max_bytes.saturating_sub(self.bytes);
        let lerr = |reason: String| Error::Layer { layer: layer.to_string(), reason };
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(|e| lerr(e.to_string()))?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(|e| read_error(&lerr, &e, remaining))?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(Error::Limit(format!("more than {} files in the layers", self.limits.max_entries)));
            }
            let kind = entry.header().entry_type();
            match kind {
                EntryType::XHeader => {
                    let data = self.read_metadata(&mut entry, layer)?;
                    parse_pax(&data, &mut pending).map_err(|r| lerr(format!("bad PAX header: {r}")))?;
                    continue;
                }
                EntryType::XGlobalHeader => {
                    self.read_metadata(&mut entry, layer)?;
                    continue;
                }
                EntryType::GNULongName => {
                    pending.path = Some(trim_nul(self.read_metadata(&mut entry, layer)?));
                    continue;
                }
                EntryType::GNULongLink => {
                    pending.link = Some(trim_nul(self.read_metadata(&mut entry, layer)?));
                    continue;
                }
                _ => {}
            }
            let meta = std::mem::take(&mut pending);
            let raw_path = meta.path.clone().unwrap_or_else(|| entry.header().path_bytes().into_owned());
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let eerr = |reason: String| Error::Entry { layer: layer.to_string(), path: shown.clone(), reason };
            let size = entry.header().entry_size().map_err(|e| eerr(e.to_string()))?;
            if meta.size.is_some_and(|s| s != size) {
                return Err(eerr("PAX size differs from the header's size".into()));
            }
            if size > remaining {
                return Err(Error::Limit(format!(
                    "entry {shown:?} of layer {layer} claims {size} bytes, more than the {} left",
                    remaining
                )));
            }
            self.apply_entry(kind, &raw_path, meta, &mut entry, state).map_err(|e| match e {
                Step::Refused(reason) => eerr(reason),
                Step::Io(what, err) => {
                    if let Some(limit) = err.get_ref().and_then(|i| i.downcast_ref::<LimitExceeded>()) {
                        Error::Limit(format!("the layers expand to more than {} bytes", limit.0))
                    } else {
                        eerr(format!("{what}: {err}"))
                    }
                }
            })?;
            progress.set_position(entry.raw_file_position());
        }
        Ok(())
    }

    fn read_metadata<R: Read>(&self, entry: &mut tar::Entry<'_, R>, layer: &str) -> Result<Vec<u8>, Error> {
        let size = entry.header().entry_size().unwrap_or(u64::MAX);
        if size > self.limits.max_metadata {
            return Err(Error::Limit(format!(
                "a metadata record in layer {layer} is {size} bytes, more than {}",
                self.limits.max_metadata
            )));
        }
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        entry.read_to_end(&mut data).map_err(|e| Error::Layer {
            layer: layer.to_string(),
            reason: format!("truncated metadata record: {e}"),
        })?;
        Ok(data)
    }

    fn apply_entry<R: Read>(
        &self,
        kind: EntryType,
        raw_path: &[u8],
        meta: Pending,
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState,
    ) -> Result<(), Step> {
        let Some(rel) = clean(raw_path)? else {
            // The root directory itself: only its metadata.
            if kind == EntryType::Directory {
                self.set_metadata(&self.root, entry.header(), &meta, false)?;
            }
            return Ok(());
        };
        let name = rel.file_name().unwrap_or_default().to_owned();
        let name_bytes = name.as_bytes();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));

        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                if let Some(dir) = self.resolve_dir(parent_rel, false)? {
                    state.opaque.push(dir);
                }
            } else if !hidden.starts_with(b".wh.") && !hidden.is_empty() {
                if let Some(dir) = self.resolve_dir(parent_rel, false)? {
                    let target = dir.join(OsStr::from_bytes(hidden));
                    if !state.written.contains(&target) {
                        remove_any(&self.root.join(&target)).map_err(|e| Step::Io("remove the whited-out path", e))?;
                    }
                }
            }
            return Ok(());
        }

        let dir = self.resolve_dir(parent_rel, true)?.unwrap_or_default();
        let staged_rel = dir.join(&name);
        if !state.written.insert(staged_rel.clone()) {
            return Err(Step::Refused("duplicate entry: the layer has this path twice".into()));
        }
        let mut a = staged_rel.parent();
        while let Some(p) = a.filter(|p| !p.as_os_str().is_empty()) {
            if !state.ancestors.insert(p.to_path_buf()) {
                break;
            }
            a = p.parent();
        }
        let full = self.root.join(&staged_rel);
        let existing = fs::symlink_metadata(&full).ok();
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| Step::Refused(format!("bad mode: {e}")))?;
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        if kind == EntryType::Directory {
            if !existing.as_ref().is_some_and(fs::Metadata::is_dir) {
                remove_any(&full).map_err(|e| Step::Io("replace", e))?;
                fs::create_dir(&full).map_err(|e| Step::Io("mkdir", e))?;
            }
            return self.set_metadata(&full, &header, &meta, false);
        }
        if existing.is_some() {
            remove_any(&full).map_err(|e| Step::Io("replace", e))?;
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|e| Step::Io("create", e))?;
                io::copy(entry, &mut f).map_err(|e| Step::Io("write", e))?;
                self.set_metadata(&full, &header, &meta, false)
            }
            EntryType::Symlink => {
                let target =
                    meta.link.clone().or_else(|| header.link_name_bytes().map(|l| l.into_owned())).unwrap_or_default();
                if target.is_empty() || target.len() > MAX_PATH {
                    return Err(Step::Refused("symlink with an empty or over-long target".into()));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full).map_err(|e| Step::Io("symlink", e))?;
                self.set_metadata(&full, &header, &meta, true)
            }
            EntryType::Link => {
                let target =
                    meta.link.clone().or_else(|| header.link_name_bytes().map(|l| l.into_owned())).unwrap_or_default();
                let target_rel =
                    clean(&target)?.ok_or_else(|| Step::Refused("hard link to the root directory".into()))?;
                let target_dir = self
                    .resolve_dir(target_rel.parent().unwrap_or(Path::new("")), false)?
                    .ok_or_else(|| Step::Refused(format!("hard link to {:?}, which does not exist", target_rel)))?;
                let source = self.root.join(target_dir).join(target_rel.file_name().unwrap_or_default());
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_dir() => return Err(Step::Refused("hard link to a directory".into())),
                    Ok(_) => {}
                    Err(_) => {
                        return Err(Step::Refused(format!("hard link to {:?}, which does not exist", target_rel)))
                    }
                }
                fs::hard_link(&source, &full).map_err(|e| Step::Io("hard link", e))
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                nix::sys::stat::mknod(&full, sflag, perm, nix::sys::stat::makedev(major.into(), minor.into()))
                    .map_err(|e| Step::Io("mknod", e.into()))?;
                self.set_metadata(&full, &header, &meta, false)
            }
            other => Err(Step::Refused(format!("unsupported entry type {other:?}"))),
        }
    }

    /// Owner, then mode (chown clears setuid bits), xattrs, mtime.
    fn set_metadata(&self, full: &Path, header: &tar::Header, meta: &Pending, symlink: bool) -> Result<(), Step> {
        let uid = meta.uid.or_else(|| header.uid().ok()).unwrap_or(0);
        let gid = meta.gid.or_else(|| header.gid().ok()).unwrap_or(0);
        let uid = u32::try_from(uid).map_err(|_| Step::Refused(format!("uid {uid} out of range")))?;
        let gid = u32::try_from(gid).map_err(|_| Step::Refused(format!("gid {gid} out of range")))?;
        std::os::unix::fs::lchown(full, Some(uid), Some(gid)).map_err(|e| Step::Io("chown", e))?;
        if !symlink {
            let mode = header.mode().map_err(|e| Step::Refused(format!("bad mode: {e}")))? & 0o7777;
            fs::set_permissions(full, fs::Permissions::from_mode(mode)).map_err(|e| Step::Io("chmod", e))?;
        }
        for (name, value) in &meta.xattrs {
            xattr::set(full, name, value).map_err(|e| Step::Io("set xattr", e))?;
        }
        let mtime = meta.mtime.or_else(|| header.mtime().ok().and_then(|m| i64::try_from(m).ok())).unwrap_or(0);
        let ts = nix::sys::time::TimeSpec::new(mtime, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            full,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Step::Io("set mtime", e.into()))?;
        Ok(())
    }

    /// The staged directory (relative to the root) that `rel` names, symlinks
    /// resolved inside the tree. Missing directories are created when
    /// `create`, else `None` is returned.
    fn resolve_dir(&self, rel: &Path, create: bool) -> Result<Option<PathBuf>, Step> {
        let mut todo: Vec<OsString> = rel.components().rev().map(|c| c.as_os_str().to_owned()).collect();
        let mut cur = PathBuf::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            if c == "." || c.is_empty() {
                continue;
            }
            if c == ".." {
                if !cur.pop() {
                    return Err(Step::Refused("a symlink on the way points out of the image".into()));
                }
                continue;
            }
            let next = cur.join(&c);
            let full = self.root.join(&next);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => cur = next,
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Step::Refused("too many levels of symlinks".into()));
                    }
                    let target = fs::read_link(&full).map_err(|e| Step::Io("readlink", e))?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    todo.extend(target.components().rev().filter_map(|c| match c {
                        Component::RootDir => None,
                        c => Some(c.as_os_str().to_owned()),
                    }));
                }
                Ok(_) => return Err(Step::Refused(format!("{} is not a directory", next.display()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&full).map_err(|e| Step::Io("mkdir", e))?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755)).map_err(|e| Step::Io("chmod", e))?;
                    cur = next;
                }
                Err(e) => return Err(Step::Io("stat", e)),
            }
        }
        Ok(Some(cur))
    }

    /// Opaque directories hide everything the lower layers put in them.
    fn finish_layer(&self, state: &LayerState) -> io::Result<()> {
        for dir in &state.opaque {
            self.hide_lower(dir, state)?;
        }
        Ok(())
    }

    fn hide_lower(&self, dir: &Path, state: &LayerState) -> io::Result<()> {
        for child in fs::read_dir(self.root.join(dir))? {
            let child = child?;
            let rel = dir.join(child.file_name());
            let is_dir = child.file_type()?.is_dir();
            if state.written.contains(&rel) || state.ancestors.contains(&rel) {
                if is_dir {
                    self.hide_lower(&rel, state)?;
                }
            } else {
                remove_any(&self.root.join(&rel))?;
            }
        }
        Ok(())
    }
}

/// Build the erofs image `out` from the tree at `root` (uncompressed: in the
/// guest, decompression is kernel code, slow where it is emulated).
pub(crate) fn mkfs_erofs(root: &Path, out: &Path) -> Result<(), Error> {
    let output = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(out)
        .arg(root)
        .output()
        .map_err(|e| Error::Mkfs { status: "could not start".into(), stderr: e.to_string() })?;
    if !output.status.success() {
        return Err(Error::Mkfs {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Why one entry could not be applied.
enum Step {
    Refused(String),
    Io(&'static str, io::Error),
}

/// A relative path with `.` and empty components dropped; `None` for the
/// root itself. `..`, absolute paths, NUL bytes and over-long names are refused.
fn clean(raw: &[u8]) -> Result<Option<PathBuf>, Step> {
    if raw.len() > MAX_PATH {
        return Err(Step::Refused(format!("path longer than {MAX_PATH} bytes")));
    }
    if raw.contains(&0) {
        return Err(Step::Refused("NUL byte in the path".into()));
    }
    if raw.first() == Some(&b'/') {
        return Err(Step::Refused("absolute path".into()));
    }
    let mut out = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(Step::Refused("path with `..` (leaves the image)".into())),
            p => out.push(OsStr::from_bytes(p)),
        }
    }
    Ok(if out.as_os_str().is_empty() { None } else { Some(out) })
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn parse_pax(data: &[u8], out: &mut Pending) -> Result<(), String> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| e.to_string())?;
        let key = ext.key().map_err(|e| e.to_string())?;
        let value = ext.value_bytes();
        let num =
            || std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("bad {key}"));
        match key {
            "path" => out.path = Some(value.to_vec()),
            "linkpath" => out.link = Some(value.to_vec()),
            "uid" => out.uid = Some(num()?),
            "gid" => out.gid = Some(num()?),
            "size" => out.size = Some(num()?),
            "mtime" => {
                let text = std::str::from_utf8(value).map_err(|_| "bad mtime")?;
                let secs = text.split('.').next().unwrap_or_default();
                out.mtime = Some(secs.parse::<i64>().map_err(|_| "bad mtime")?);
            }
            k if k.starts_with("GNU.sparse") => return Err("sparse files are not supported".into()),
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    if out.xattrs.len() >= 128 {
                        return Err("more than 128 xattrs on one entry".into());
                    }
                    out.xattrs.push((OsString::from_vec(name.as_bytes().to_vec()), value.to_vec()));
                }
            }
        }
    }
    Ok(())
}

/// Remove whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_error(lerr: &dyn Fn(String) -> Error, e: &io::Error, limit: u64) -> Error {
    if e.get_ref().and_then(|i| i.downcast_ref::<LimitExceeded>()).is_some() {
        Error::Limit(format!("the layers expand to more than {limit} bytes"))
    } else {
        lerr(format!("cannot read the tar stream (truncated or corrupt): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        let ok = |s: &str| clean(s.as_bytes()).ok().unwrap();
        assert_eq!(ok("./a/b/"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("a//./b"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("./"), None);
        for bad in ["/etc/passwd", "a/../../x", "..", "a/\0b"] {
            assert!(clean(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(clean(&vec![b'a'; MAX_PATH + 1]).is_err());
    }

    #[test]
    fn pax_records() {
        let mut p = Pending::default();
        let rec = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            if (n.to_string().len() + body.len()) != n {
                n = n.to_string().len() + body.len();
            }
            format!("{n}{body}")
        };
        let data = format!("{}{}{}", rec("path", "long/name"), rec("uid", "70000"), rec("SCHILY.xattr.user.k", "v"));
        parse_pax(data.as_bytes(), &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"long/name"[..]));
        assert_eq!(p.uid, Some(70000));
        assert_eq!(p.xattrs.len(), 1);
        let sparse = rec("GNU.sparse.map", "0,1");
        assert!(parse_pax(sparse.as_bytes(), &mut Pending::default()).is_err());
    }
}
