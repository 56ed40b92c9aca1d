//! Pulls from a real docker-registry on 127.0.0.1, with images these tests
//! build and push themselves (skopeo). Conversion needs root (owners,
//! device nodes) and inspecting the result mounts it (loop, erofs).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{check_layered, layered_image, Mounted};
use rootfs::fixtures::{ImageBuilder, LayerBuilder, Registry};
use rootfs::{Digest, Error, ImageSource, Limits, PullOptions, Store};

fn push(registry: &Registry, image: &ImageBuilder, repo: &str, tag: &str) -> Digest {
    let layout = tempfile::tempdir().unwrap();
    let digest = image.write_oci_layout(layout.path(), "t").unwrap();
    registry.push(layout.path(), "t", repo, tag).unwrap();
    digest
}

fn source(s: &str) -> ImageSource {
    ImageSource::parse(s).unwrap()
}

fn nothing_left(store: &Store) {
    let images: Vec<_> =
        std::fs::read_dir(store.root().join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(images.is_empty(), "a failed pull left {images:?}");
    let tmp: Vec<_> = std::fs::read_dir(store.root().join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(tmp.is_empty(), "a failed pull left {tmp:?} in tmp/");
}

#[test]
fn pull_by_tag_then_by_digest_keeps_every_file_property() {
    let registry = Registry::start().unwrap();
    push(&registry, &layered_image(), "layered", "v1");
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());

    let by_tag = source(&format!("{}/layered:v1", registry.addr()));
    let (rec, path) = store.pull(&by_tag, &PullOptions::default()).unwrap();
    // skopeo may rewrite the manifest on the way in: the registry's digest counts.
    let digest = Digest::parse(&rec.digest).unwrap();
    assert_eq!(rec.config.working_dir, "/home/user");
    assert_eq!(rec.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(rec.config.cmd, ["/bin/tool"]);
    check_layered(&Mounted::new(&path));
    // Layers are not kept once converted.
    assert_eq!(std::fs::read_dir(cache.path().join("blobs")).unwrap().count(), 0);

    // By digest: the cached image, without downloading layers again.
    let gets_before = registry.log().lines().filter(|l| l.contains("/blobs/")).count();
    let by_digest = source(&format!("{}/layered@{digest}", registry.addr()));
    let (again, path2) = store.pull(&by_digest, &PullOptions::default()).unwrap();
    assert_eq!((again.digest.as_str(), path2.as_path()), (rec.digest.as_str(), path.as_path()));
    assert_eq!(registry.log().lines().filter(|l| l.contains("/blobs/")).count(), gets_before);
    assert!(store.get(&by_digest).unwrap().is_some());
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].references.len(), 2, "{:?}", listed[0].references);

    // By digest into an empty cache: a real pull by digest.
    let other = tempfile::tempdir().unwrap();
    let (fresh, _) = Store::new(other.path()).pull(&by_digest, &PullOptions::default()).unwrap();
    assert_eq!(fresh.digest, digest.to_string());

    // A wrong digest for an existing tag's repository.
    let wrong = source(&format!("{}/layered@{}", registry.addr(), Digest::of(b"nothing")));
    assert!(Store::new(other.path()).pull(&wrong, &PullOptions::default()).is_err());

    // rmi, prune.
    let removed = store.remove(&format!("{}/layered:v1", registry.addr())).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(!path.exists());
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(store.remove("nothing:here"), Err(Error::NotCached(_))));
}

#[test]
fn token_auth_with_docker_config_credentials() {
    let registry = Registry::start_with_token_auth("alice", "s3cret").unwrap();
    let image = ImageBuilder::new().layer(LayerBuilder::new().file("hello", b"hi", 0o644, 0, 0).finish());
    push(&registry, &image, "private/app", "latest");
    assert!(registry.tokens_issued() > 0, "skopeo did not use the token server");
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());
    let reference = source(&format!("{}/private/app", registry.addr()));

    // Anonymous: refused.
    let empty = tempfile::tempdir().unwrap();
    let anonymous = PullOptions { docker_config: Some(empty.path().to_path_buf()), ..PullOptions::default() };
    let err = store.pull(&reference, &anonymous).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("auth") || err.contains("401"), "{err}");

    // With ~/.docker/config.json-style credentials.
    let docker = tempfile::tempdir().unwrap();
    let auth = base64_encode(b"alice:s3cret");
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr()),
    )
    .unwrap();
    let tokens = registry.tokens_issued();
    let opts = PullOptions { docker_config: Some(docker.path().to_path_buf()), ..PullOptions::default() };
    let (_, path) = store.pull(&reference, &opts).unwrap();
    assert!(registry.tokens_issued() > tokens, "the pull did not fetch a token");
    let m = Mounted::new(&path);
    assert_eq!(std::fs::read(m.path("hello")).unwrap(), b"hi");
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn two_concurrent_pulls_download_once() {
    let registry = Registry::start().unwrap();
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let layer = LayerBuilder::new().file("big", &big, 0o644, 0, 0).finish();
    let layer_digest = Digest::of(&rootfs::fixtures::gzip(&layer));
    let image = ImageBuilder::new().layer(layer);
    push(&registry, &image, "shared", "latest");
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/shared:latest", registry.addr());
    let pulls: Vec<_> = (0..2)
        .map(|_| {
            let store = Store::new(cache.path());
            let reference = reference.clone();
            std::thread::spawn(move || {
                store.pull(&ImageSource::parse(&reference).unwrap(), &PullOptions::default()).map(|(r, _)| r.digest)
            })
        })
        .collect();
    let digests: Vec<String> = pulls.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        registry.blob_gets("shared", &layer_digest),
        1,
        "the layer was downloaded more than once:\n{}",
        registry.log()
    );
    assert_eq!(Store::new(cache.path()).list().unwrap().len(), 1);
}

#[test]
fn corrupt_blobs_in_the_registry_are_refused() {
    let registry = Registry::start().unwrap();
    let layer = LayerBuilder::new().file("data", &[7u8; 100_000], 0o644, 0, 0).finish();
    let blob = rootfs::fixtures::gzip(&layer);
    let layer_digest = Digest::of(&blob);
    let image = ImageBuilder::new().layer(layer);
    push(&registry, &image, "tampered", "latest");
    push(&registry, &image, "truncated", "latest");
    let file = registry.blob_file(&layer_digest);
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());

    // Same length, other bytes: the digest check catches it.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let err = store.pull(&source(&format!("{}/tampered", registry.addr())), &PullOptions::default()).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    nothing_left(&store);

    // Truncated: never accepted.
    std::fs::write(&file, &bytes[..mid]).unwrap();
    let err = store.pull(&source(&format!("{}/truncated", registry.addr())), &PullOptions::default()).unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. } | Error::Registry { .. } | Error::DigestMismatch { .. }), "{err}");
    nothing_left(&store);
}

/// Each hostile layer, pushed to the registry, and the error it must give.
fn hostile_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        ("dotdot", LayerBuilder::new().raw(b"../../escaped", tar::EntryType::Regular, b"", b"x").finish(), "`..`"),
        ("absolute", LayerBuilder::new().raw(b"/etc/escaped", tar::EntryType::Regular, b"", b"x").finish(), "absolute"),
        (
            "symlink-out",
            LayerBuilder::new()
                .raw(b"evil", tar::EntryType::Symlink, b"../../../../../../tmp", b"")
                .raw(b"evil/escaped", tar::EntryType::Regular, b"", b"x")
                .finish(),
            "points out of the image",
        ),
        (
            "hardlink-out",
            LayerBuilder::new().raw(b"link", tar::EntryType::Link, b"../../../etc/passwd", b"").finish(),
            "`..`",
        ),
        ("hardlink-missing", LayerBuilder::new().hardlink("link", "no/such/file").finish(), "does not exist"),
        (
            "duplicate",
            LayerBuilder::new().file("twice", b"1", 0o644, 0, 0).file("twice", b"2", 0o644, 0, 0).finish(),
            "duplicate",
        ),
        ("absurd-size", LayerBuilder::new().lying_size("huge", 1 << 50, b"x").finish_unterminated(), "claims"),
        ("truncated", LayerBuilder::new().lying_size("short", 10_000, &[1u8; 512]).finish_unterminated(), "truncated"),
    ]
}

#[test]
fn hostile_layers_are_rejected() {
    let registry = Registry::start().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());
    for (name, layer, expected) in hostile_cases() {
        let image = ImageBuilder::new().layer(layer);
        push(&registry, &image, &format!("hostile/{name}"), "latest");
        let err =
            store.pull(&source(&format!("{}/hostile/{name}", registry.addr())), &PullOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expected), "{name}: expected {expected:?} in: {text}");
        nothing_left(&store);
    }
    assert!(!Path::new("/tmp/escaped").exists() && !Path::new("/etc/escaped").exists());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // Too many entries.
    let mut many = LayerBuilder::new();
    for i in 0..50 {
        many = many.file(&format!("f{i}"), b"", 0o644, 0, 0);
    }
    push(&registry, &ImageBuilder::new().layer(many.finish()), "hostile/many", "latest");
    let opts = PullOptions { limits: Limits { max_entries: 20, ..Limits::default() }, ..PullOptions::default() };
    let err = store.pull(&source(&format!("{}/hostile/many", registry.addr())), &opts).unwrap_err();
    assert!(matches!(err, Error::Limit(_)), "{err}");
    nothing_left(&store);

    // A gzip bomb: small blob, more uncompressed bytes than allowed.
    let bomb = LayerBuilder::new().file("zeros", &vec![0u8; 8 << 20], 0o644, 0, 0).finish();
    push(&registry, &ImageBuilder::new().layer(bomb), "hostile/bomb", "latest");
    let opts = PullOptions { limits: Limits { max_bytes: 1 << 20, ..Limits::default() }, ..PullOptions::default() };
    let err = store.pull(&source(&format!("{}/hostile/bomb", registry.addr())), &opts).unwrap_err();
    assert!(matches!(err, Error::Limit(_)), "{err}");
    nothing_left(&store);
}
