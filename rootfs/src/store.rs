//! The image cache: one erofs file per manifest digest, shared by every
//! sandbox.
//!
//! ```text
//! <root>/images/<hex>.erofs   the image (read-only, never modified)
//! <root>/images/<hex>.json    its record: references, run settings, sizes, last use
//! <root>/blobs/<hex>[.partial] layers while a pull runs (resumable)
//! <root>/tmp/                 staging trees and images being written
//! <root>/locks/               flock files: one pull per image, one writer per record
//! ```
//!
//! An image appears in `images/` only complete (written to `tmp/`, then
//! renamed). Two pulls of one image wait for each other on its lock, so the
//! second finds it cached and downloads nothing.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::convert::{mkfs_erofs, Converter, LayerInput};
use crate::local::{self, Plan};
use crate::registry::Remote;
use crate::{config, Digest, Error, ImageConfig, ImageSource, Limits};

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest digest (`sha256:…`; for a docker-archive, the config digest).
    pub digest: String,
    /// The names it was pulled as (canonical form), most recent first.
    pub references: Vec<String>,
    /// How the image wants its command run.
    pub config: ImageConfig,
    /// Size of the erofs image in bytes.
    pub size: u64,
    /// Size of the uncompressed layers in bytes.
    pub layers_size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last pull or run.
    pub last_used: u64,
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Show progress bars on stderr (only drawn on a terminal).
    pub progress: bool,
    /// Directory holding Docker's `config.json`; default `$DOCKER_CONFIG` or `~/.docker`.
    pub docker_config: Option<PathBuf>,
    /// Bounds on what the layers may contain.
    pub limits: Limits,
    /// After a pull, remove least recently used images until the cache is at most this big.
    pub max_cache_bytes: Option<u64>,
}

/// The cache of converted images.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// A cache rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// Where the cache lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The erofs image of a record.
    pub fn image_path(&self, record: &ImageRecord) -> PathBuf {
        let hex = record.digest.strip_prefix("sha256:").unwrap_or(&record.digest);
        self.root.join("images").join(format!("{hex}.erofs"))
    }

    fn dirs(&self) -> Result<(), Error> {
        for d in ["images", "blobs", "tmp", "locks"] {
            let p = self.root.join(d);
            fs::create_dir_all(&p).map_err(Error::io("create the image cache directory", &p))?;
        }
        let tmp = self.root.join("tmp");
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(Error::io("chmod", &tmp))?;
        Ok(())
    }

    fn lock(&self, name: &str) -> Result<Flock<File>, Error> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("open lock", &path))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io { what: "lock", path, source: e.into() })
    }

    fn try_lock(&self, name: &str) -> Option<Flock<File>> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
        Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
    }

    /// Every cached image, most recently used first.
    pub fn list(&self) -> Result<Vec<ImageRecord>, Error> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("read", &dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(Error::io("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(rec) = read_record(&path) {
                    if self.image_path(&rec).is_file() {
                        out.push(rec);
                    }
                }
            }
        }
        out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then_with(|| a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// The cached image `source` names, without any network access; marks it used.
    pub fn get(&self, source: &ImageSource) -> Result<Option<(ImageRecord, PathBuf)>, Error> {
        let name = source.canonical();
        let pinned = source.pinned_digest().map(|d| d.to_string());
        let found = self
            .list()?
            .into_iter()
            .find(|r| r.references.contains(&name) || pinned.as_ref().is_some_and(|d| *d == r.digest));
        match found {
            Some(rec) => {
                let rec = self.touch(&rec.digest, None)?.unwrap_or(rec);
                let path = self.image_path(&rec);
                Ok(Some((rec, path)))
            }
            None => Ok(None),
        }
    }

    /// The cached image for a registry reference, else pull it. Local
    /// sources (OCI layouts, archives) are always read again, so that a
    /// changed layout is noticed; their conversion is cached all the same.
    pub fn ensure(&self, source: &ImageSource, opts: &PullOptions) -> Result<(ImageRecord, PathBuf), Error> {
        if let ImageSource::Registry(_) = source {
            if let Some(found) = self.get(source)? {
                return Ok(found);
            }
        }
        self.pull(source, opts)
    }

    /// Fetch and convert the image (unless its manifest digest is cached).
    pub fn pull(&self, source: &ImageSource, opts: &PullOptions) -> Result<(ImageRecord, PathBuf), Error> {
        self.dirs()?;
        let progress = MultiProgress::with_draw_target(if opts.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let name = source.canonical();
        let record = match source {
            ImageSource::Registry(reference) => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(Error::io("start the download runtime", &self.root))?;
                let remote = Arc::new(Remote::new(reference.clone(), opts.docker_config.as_deref()));
                runtime.block_on(self.pull_remote(&remote, &name, opts, &progress))?
            }
            ImageSource::OciLayout { dir, tag } => {
                let plan = local::oci_layout(dir, tag.as_deref())?;
                self.convert_locked(plan, &name, opts, &progress)?
            }
            ImageSource::DockerArchive(file) => {
                let plan = local::docker_archive(file)?;
                self.convert_locked(plan, &name, opts, &progress)?
            }
        };
        if let Some(max) = opts.max_cache_bytes {
            self.prune_keeping(max, Some(&record.digest))?;
        }
        let path = self.image_path(&record);
        Ok((record, path))
    }

    async fn pull_remote(
        &self,
        remote: &Arc<Remote>,
        name: &str,
        opts: &PullOptions,
        progress: &MultiProgress,
    ) -> Result<ImageRecord, Error> {
        let resolved = remote.resolve().await?;
        let key = resolved.digest.clone();
        if let Some(rec) = self.touch(&key.to_string(), Some(name))? {
            return Ok(rec);
        }
        let _image_lock = self.lock(key.hex())?;
        // Another pull may have finished while we waited for the lock.
        if let Some(rec) = self.touch(&key.to_string(), Some(name))? {
            return Ok(rec);
        }
        let config_bytes = remote.small_blob(&resolved.manifest.config, "config").await?;
        let config = config::parse(&config_bytes)?;
        if config.diff_ids.len() != resolved.manifest.layers.len() {
            return Err(Error::Manifest {
                what: name.to_string(),
                reason: "the config's diff_ids do not match the manifest's layers".into(),
            });
        }
        if resolved.manifest.layers.len() > opts.limits.max_layers {
            return Err(Error::Limit(format!("more than {} layers", opts.limits.max_layers)));
        }
        let blobs = self.root.join("blobs");
        let mut digests: Vec<Digest> =
            resolved.manifest.layers.iter().map(|d| Digest::parse(&d.digest)).collect::<Result<_, _>>()?;
        digests.sort();
        digests.dedup();
        // Blob locks in a fixed order: pulls of images sharing a layer never deadlock.
        let mut blob_locks = Vec::new();
        for d in &digests {
            blob_locks.push(self.lock(&format!("blob-{}", d.hex()))?);
        }
        remote.download_layers(&resolved.manifest.layers, &blobs, progress).await?;
        let layers = resolved
            .manifest
            .layers
            .iter()
            .zip(&config.diff_ids)
            .map(|(d, diff_id)| {
                let digest = Digest::parse(&d.digest)?;
                Ok(LayerInput {
                    path: local::blob_path(&blobs, &digest),
                    offset: 0,
                    size: d.size,
                    digest: Some(digest),
                    diff_id: diff_id.clone(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let plan = Plan { key, config, layers };
        let record = self.convert(&plan, name, opts, progress);
        for d in &digests {
            let _ = fs::remove_file(local::blob_path(&blobs, d));
        }
        drop(blob_locks);
        record
    }

    fn convert_locked(
        &self,
        plan: Plan,
        name: &str,
        opts: &PullOptions,
        progress: &MultiProgress,
    ) -> Result<ImageRecord, Error> {
        if let Some(rec) = self.touch(&plan.key.to_string(), Some(name))? {
            return Ok(rec);
        }
        let _image_lock = self.lock(plan.key.hex())?;
        if let Some(rec) = self.touch(&plan.key.to_string(), Some(name))? {
            return Ok(rec);
        }
        self.convert(&plan, name, opts, progress)
    }

    /// Layers -> staging tree -> erofs; the caller holds the image's lock.
    fn convert(
        &self,
        plan: &Plan,
        name: &str,
        opts: &PullOptions,
        progress: &MultiProgress,
    ) -> Result<ImageRecord, Error> {
        let hex = plan.key.hex();
        let staging = self.root.join("tmp").join(hex);
        let out_tmp = self.root.join("tmp").join(format!("{hex}.erofs"));
        remove_any(&staging)?;
        remove_any(&out_tmp)?;
        let result = (|| {
            let mut conv = Converter::new(staging.clone(), opts.limits.clone())?;
            let bar = progress.add(
                ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            );
            for (i, layer) in plan.layers.iter().enumerate() {
                bar.set_message(format!("applying layer {}/{}", i + 1, plan.layers.len()));
                conv.apply(layer, &bar)?;
            }
            bar.set_message("writing the erofs image");
            mkfs_erofs(&staging, &out_tmp)?;
            bar.finish_and_clear();
            Ok::<u64, Error>(conv.bytes())
        })();
        let cleanup = remove_any(&staging);
        let layers_size = match result {
            Ok(n) => n,
            Err(e) => {
                let _ = remove_any(&out_tmp);
                return Err(e);
            }
        };
        cleanup?;
        let size = fs::metadata(&out_tmp).map_err(Error::io("stat", &out_tmp))?.len();
        let now = now();
        let record = ImageRecord {
            digest: plan.key.to_string(),
            references: vec![name.to_string()],
            config: plan.config.config.clone(),
            size,
            layers_size,
            created: now,
            last_used: now,
        };
        let final_path = self.image_path(&record);
        fs::rename(&out_tmp, &final_path).map_err(Error::io("rename", &out_tmp))?;
        let _records = self.lock("records")?;
        self.drop_reference(name, &record.digest)?;
        write_record(&self.record_path(&record.digest), &record)?;
        Ok(record)
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("images").join(format!("{hex}.json"))
    }

    /// Mark a cached image used (and add `name` to its references); `None` if not cached.
    fn touch(&self, digest: &str, name: Option<&str>) -> Result<Option<ImageRecord>, Error> {
        let path = self.record_path(digest);
        if !path.exists() {
            return Ok(None);
        }
        let _records = self.lock("records")?;
        let Some(mut rec) = read_record(&path) else { return Ok(None) };
        if !self.image_path(&rec).is_file() {
            return Ok(None);
        }
        if let Some(name) = name {
            self.drop_reference(name, digest)?;
            rec.references.retain(|r| r != name);
            rec.references.insert(0, name.to_string());
        }
        rec.last_used = now();
        write_record(&path, &rec)?;
        Ok(Some(rec))
    }

    /// A tag that now names another image no longer names the old one.
    fn drop_reference(&self, name: &str, keep: &str) -> Result<(), Error> {
        for mut rec in self.list()? {
            if rec.digest != keep && rec.references.iter().any(|r| r == name) {
                rec.references.retain(|r| r != name);
                write_record(&self.record_path(&rec.digest), &rec)?;
            }
        }
        Ok(())
    }

    /// Remove the images `name` matches (a reference as given or canonical,
    /// or a digest or a digest prefix of at least 12 hex digits).
    pub fn remove(&self, name: &str) -> Result<Vec<ImageRecord>, Error> {
        let canonical = ImageSource::parse(name).ok().map(|s| s.canonical());
        let hexname = name.strip_prefix("sha256:").unwrap_or(name);
        let matches: Vec<ImageRecord> = self
            .list()?
            .into_iter()
            .filter(|r| {
                r.references.iter().any(|x| x == name || Some(x) == canonical.as_ref())
                    || (hexname.len() >= 12 && r.digest.trim_start_matches("sha256:").starts_with(hexname))
            })
            .collect();
        if matches.is_empty() {
            return Err(Error::NotCached(name.to_string()));
        }
        for rec in &matches {
            self.delete(rec)?;
        }
        Ok(matches)
    }

    fn delete(&self, rec: &ImageRecord) -> Result<(), Error> {
        let _records = self.lock("records")?;
        let json = self.record_path(&rec.digest);
        fs::remove_file(&json).map_err(Error::io("remove", &json))?;
        // A running sandbox keeps its open image file; only the name goes.
        let img = self.image_path(rec);
        fs::remove_file(&img).map_err(Error::io("remove", &img))?;
        Ok(())
    }

    /// Total bytes of the cached images.
    pub fn size(&self) -> Result<u64, Error> {
        Ok(self.list()?.iter().map(|r| r.size).sum())
    }

    /// Remove least recently used images until the cache holds at most
    /// `max_bytes`, and leftovers of interrupted pulls.
    pub fn prune(&self, max_bytes: u64) -> Result<Vec<ImageRecord>, Error> {
        self.prune_keeping(max_bytes, None)
    }

    fn prune_keeping(&self, max_bytes: u64, keep: Option<&str>) -> Result<Vec<ImageRecord>, Error> {
        self.dirs()?;
        self.remove_leftovers()?;
        let mut images = self.list()?;
        let mut total: u64 = images.iter().map(|r| r.size).sum();
        let mut removed = Vec::new();
        // Oldest use first.
        images.sort_by_key(|r| r.last_used);
        for rec in images {
            if total <= max_bytes {
                break;
            }
            if Some(rec.digest.as_str()) == keep {
                continue;
            }
            // An image being pulled right now holds its lock: leave it.
            let hex = rec.digest.trim_start_matches("sha256:").to_string();
            let Some(_lock) = self.try_lock(&hex) else { continue };
            self.delete(&rec)?;
            total = total.saturating_sub(rec.size);
            removed.push(rec);
        }
        Ok(removed)
    }

    /// Staging trees, half-written images and partial layers whose pull is
    /// no longer running, and image files without a record.
    fn remove_leftovers(&self) -> Result<(), Error> {
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(Error::io("read", &tmp))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or_default().to_string();
            if let Some(_lock) = self.try_lock(&hex) {
                remove_any(&entry.path())?;
            }
        }
        let blobs = self.root.join("blobs");
        for entry in fs::read_dir(&blobs).map_err(Error::io("read", &blobs))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or_default().to_string();
            if let Some(_lock) = self.try_lock(&format!("blob-{hex}")) {
                remove_any(&entry.path())?;
            }
        }
        let images = self.root.join("images");
        for entry in fs::read_dir(&images).map_err(Error::io("read", &images))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "erofs") && !path.with_extension("json").exists() {
                let hex = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(_lock) = self.try_lock(&hex) {
                    remove_any(&path)?;
                }
            }
        }
        Ok(())
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn read_record(path: &Path) -> Option<ImageRecord> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_record(path: &Path, rec: &ImageRecord) -> Result<(), Error> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Io {
        what: "encode",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    fs::write(&tmp, bytes).map_err(Error::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename", &tmp))
}

fn remove_any(path: &Path) -> Result<(), Error> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(Error::io("remove", path))
}
