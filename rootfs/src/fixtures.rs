//! Test fixtures: build images (as tar layers, OCI layouts or `docker save`
//! archives) and serve them from a real `docker-registry` on 127.0.0.1,
//! optionally behind token auth issued by a small token server.
//!
//! Needs Debian's `docker-registry` and `skopeo` (installed by `test.sh`).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;

use crate::Digest;

type FixtureResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Builds one layer (an uncompressed tar stream).
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBuilder").finish_non_exhaustive()
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder { tar: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    /// An entry whose name is written as given, unchecked (for hostile layers).
    pub fn raw(mut self, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Self {
        let mut h = Self::header(kind, 0o644, 0, 0, data.len() as u64);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    /// A header claiming `size` bytes, followed by only `data` (truncated or absurd).
    pub fn lying_size(mut self, name: &str, size: u64, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0, 0, size);
        h.set_path(name).unwrap();
        h.set_cksum();
        let out = self.tar.get_mut();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        self
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(mut self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, content.len() as u64);
        self.tar.append_data(&mut h, path, content).unwrap();
        self
    }

    /// A file with extended attributes (PAX `SCHILY.xattr.*` records).
    pub fn file_with_xattrs(mut self, path: &str, content: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        self.file(path, content, 0o644, 0, 0)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// Remove `path` of the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.file(&wh, b"", 0o644, 0, 0)
    }

    /// Hide what the layers below have in `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644, 0, 0)
    }

    /// The tar stream (with its end-of-archive blocks).
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }

    /// The tar stream without end-of-archive blocks (for truncated layers).
    pub fn finish_unterminated(mut self) -> Vec<u8> {
        std::mem::take(self.tar.get_mut())
    }
}

/// Gzip `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One image: layers (uncompressed tar + the blob as stored) and run settings.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    layers: Vec<(Vec<u8>, Vec<u8>)>,
    env: Vec<String>,
    working_dir: Option<String>,
    cmd: Vec<String>,
    entrypoint: Vec<String>,
    user: Option<String>,
    /// Replace the blob of layer N by these bytes after digests are computed.
    tamper: Option<(usize, Vec<u8>)>,
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        ImageBuilder::default()
    }
    /// A gzip-compressed layer.
    pub fn layer(mut self, tar: Vec<u8>) -> Self {
        let blob = gzip(&tar);
        self.layers.push((tar, blob));
        self
    }
    /// An uncompressed layer.
    pub fn layer_uncompressed(mut self, tar: Vec<u8>) -> Self {
        self.layers.push((tar.clone(), tar));
        self
    }
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn entrypoint(mut self, ep: &[&str]) -> Self {
        self.entrypoint = ep.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }
    /// Store other bytes than the digests say for layer `index`.
    pub fn tamper_layer(mut self, index: usize, bytes: Vec<u8>) -> Self {
        self.tamper = Some((index, bytes));
        self
    }

    fn config_json(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(|(tar, _)| Digest::of(tar).to_string()).collect();
        let mut config = json!({"Env": self.env});
        if let Some(w) = &self.working_dir {
            config["WorkingDir"] = json!(w);
        }
        if !self.cmd.is_empty() {
            config["Cmd"] = json!(self.cmd);
        }
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = json!(self.entrypoint);
        }
        if let Some(u) = &self.user {
            config["User"] = json!(u);
        }
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// Write an OCI image layout to `dir`, tagged `tag`; returns the manifest digest.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> FixtureResult<Digest> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        let put = |bytes: &[u8]| -> FixtureResult<Digest> {
            let d = Digest::of(bytes);
            std::fs::write(blobs.join(d.hex()), bytes)?;
            Ok(d)
        };
        let config = self.config_json();
        let config_digest = put(&config)?;
        let mut layer_descs = Vec::new();
        for (i, (_, blob)) in self.layers.iter().enumerate() {
            let d = put(blob)?;
            let compressed = blob.starts_with(&[0x1f, 0x8b]);
            layer_descs.push(json!({
                "mediaType": if compressed { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" },
                "digest": d.to_string(),
                "size": blob.len(),
            }));
            if let Some((n, bytes)) = &self.tamper {
                if *n == i {
                    std::fs::write(blobs.join(d.hex()), bytes)?;
                }
            }
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
            "layers": layer_descs,
        }))?;
        let manifest_digest = put(&manifest)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest.to_string(),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(manifest_digest)
    }

    /// Write what `docker save` writes (uncompressed layers, `manifest.json`).
    pub fn write_docker_archive(&self, file: &Path) -> FixtureResult<()> {
        let mut tar = tar::Builder::new(std::fs::File::create(file)?);
        let mut add = |name: &str, data: &[u8]| -> FixtureResult<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data)?;
            Ok(())
        };
        let config = self.config_json();
        let config_name = format!("{}.json", Digest::of(&config).hex());
        add(&config_name, &config)?;
        let mut names = Vec::new();
        for (tar_bytes, _) in &self.layers {
            let name = format!("{}/layer.tar", Digest::of(tar_bytes).hex());
            add(&name, tar_bytes)?;
            names.push(name);
        }
        let manifest = json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": names}]);
        add("manifest.json", &serde_json::to_vec(&manifest)?)?;
        tar.into_inner()?.flush()?;
        Ok(())
    }
}

/// A `docker-registry` process on 127.0.0.1, storing under a temp directory.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
    token: Option<TokenServer>,
}

impl Registry {
    /// An open registry (anonymous pulls and pushes).
    pub fn start() -> FixtureResult<Registry> {
        Self::start_inner(None)
    }

    /// A registry that wants a bearer token from a token server, which
    /// grants one for `user`/`password` (HTTP basic auth).
    pub fn start_with_token_auth(user: &str, password: &str) -> FixtureResult<Registry> {
        Self::start_inner(Some((user.to_string(), password.to_string())))
    }

    fn start_inner(auth: Option<(String, String)>) -> FixtureResult<Registry> {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.exists() {
            return Err(
                "docker-registry is not installed (apt-get install docker-registry; test.sh installs it)".into()
            );
        }
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut auth_yaml = String::new();
        let token = match auth {
            Some((user, password)) => {
                let server = TokenServer::start(&user, &password)?;
                let bundle = dir.path().join("token.pem");
                std::fs::write(&bundle, &server.cert_pem)?;
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: sandbox-test\n    issuer: sandbox-test-issuer\n    rootcertbundle: {}\n",
                    server.addr,
                    bundle.display()
                );
                Some(server)
            }
            None => None,
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth_yaml}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let registry = Registry { child, addr, dir, token };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&self) -> FixtureResult<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = write!(s, "GET /v2/ HTTP/1.0\r\n\r\n");
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("HTTP/") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("docker-registry did not come up on {}; its log:\n{}", self.addr, self.log()).into())
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the registry logged (one access-log line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many times a blob was requested with GET.
    pub fn blob_gets(&self, repo: &str, digest: &Digest) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Tokens the token server issued.
    pub fn tokens_issued(&self) -> usize {
        self.token.as_ref().map_or(0, |t| t.issued.load(Ordering::SeqCst))
    }

    /// Copy an OCI layout's image to `<addr>/<repo>:<tag>` with skopeo.
    pub fn push(&self, layout: &Path, layout_tag: &str, repo: &str, tag: &str) -> FixtureResult<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(t) = &self.token {
            cmd.arg(format!("--dest-creds={}:{}", t.user, t.password));
        }
        let out = cmd
            .arg(format!("oci:{}:{layout_tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()?;
        if !out.status.success() {
            return Err(format!("skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    }

    /// The file where the registry keeps a blob (to tamper with it).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> FixtureResult<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Issues registry bearer tokens (ES256 JWTs with an `x5c` chain) for one
/// user, as Docker's token authentication specifies.
#[derive(Debug)]
struct TokenServer {
    addr: String,
    cert_pem: String,
    user: String,
    password: String,
    issued: Arc<AtomicUsize>,
}

impl TokenServer {
    fn start(user: &str, password: &str) -> FixtureResult<TokenServer> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "sandbox test token issuer");
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .map_err(|e| format!("token key: {e}"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let issued = Arc::new(AtomicUsize::new(0));
        let expected =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let counter = Arc::clone(&issued);
        let user_name = user.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve_token(stream, &expected, &user_name, &signer, &rng, &cert_der, &counter);
            }
        });
        Ok(TokenServer { addr, cert_pem: cert.pem(), user: user.to_string(), password: password.to_string(), issued })
    }
}

fn serve_token(
    mut stream: TcpStream,
    expected_auth: &str,
    user: &str,
    signer: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    cert_der: &[u8],
    issued: &AtomicUsize,
) -> FixtureResult<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") && value.trim() == expected_auth {
                authorized = true;
            }
        }
    }
    if !authorized {
        stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = percent_decode(scope);
            let parts: Vec<&str> = scope.split(':').collect();
            if let [kind, name, actions] = parts.as_slice() {
                access.push(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
            }
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header =
        json!({"typ": "JWT", "alg": "ES256", "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)]});
    let claims = json!({
        "iss": "sandbox-test-issuer", "sub": user, "aud": "sandbox-test",
        "exp": now + 600, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", issued.load(Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!("{}.{}", b64(&serde_json::to_vec(&header)?), b64(&serde_json::to_vec(&claims)?));
    let sig = signer.sign(rng, signing_input.as_bytes()).map_err(|e| format!("sign: {e}"))?;
    let token = format!("{signing_input}.{}", b64(sig.as_ref()));
    let body = serde_json::to_vec(&json!({"token": token, "access_token": token, "expires_in": 600}))?;
    issued.fetch_add(1, Ordering::SeqCst);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
