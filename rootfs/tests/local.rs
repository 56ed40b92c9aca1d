//! Images from local disk: OCI layouts and `docker save` archives, and the
//! cache's bookkeeping (prune).

mod common;

use common::{check_layered, layered_image, Mounted};
use rootfs::fixtures::{ImageBuilder, LayerBuilder};
use rootfs::{Error, ImageSource, PullOptions, Store};

#[test]
fn oci_layout_and_docker_archive_give_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let image = layered_image();
    let digest = image.write_oci_layout(&layout, "v1").unwrap();
    let archive = dir.path().join("image.tar");
    image.write_docker_archive(&archive).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());

    let src = ImageSource::parse(&format!("oci:{}:v1", layout.display())).unwrap();
    let (rec, path) = store.pull(&src, &PullOptions::default()).unwrap();
    assert_eq!(rec.digest, digest.to_string());
    check_layered(&Mounted::new(&path));
    // Cached: the same record, same file.
    let (again, _) = store.ensure(&src, &PullOptions::default()).unwrap();
    assert_eq!((again.digest, again.created), (rec.digest.clone(), rec.created));

    let src = ImageSource::parse(&format!("docker-archive:{}", archive.display())).unwrap();
    let (rec2, path2) = store.pull(&src, &PullOptions::default()).unwrap();
    assert_ne!(rec2.digest, rec.digest, "keyed by the config digest");
    check_layered(&Mounted::new(&path2));
    assert_eq!(rec2.config.working_dir, "/home/user");

    let err = store
        .pull(&ImageSource::parse(&format!("oci:{}:nope", layout.display())).unwrap(), &PullOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("no image tagged"), "{err}");
}

#[test]
fn tampered_layout_blob_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layer = LayerBuilder::new().file("a", b"aaaa", 0o644, 0, 0).finish();
    let mut other = layer.clone();
    let n = other.len() - 1100;
    other[n] ^= 1;
    let image = ImageBuilder::new().layer_uncompressed(layer).tamper_layer(0, other);
    image.write_oci_layout(dir.path(), "t").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());
    let err = store
        .pull(&ImageSource::parse(&format!("oci:{}:t", dir.path().display())).unwrap(), &PullOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(cache.path().join("images")).unwrap().count(), 0);
}

#[test]
fn prune_removes_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new(cache.path());
    let mut sizes = Vec::new();
    for i in 0..3u8 {
        let layout = dir.path().join(format!("l{i}"));
        let data = vec![i; 200_000 + usize::from(i)];
        ImageBuilder::new()
            .layer(LayerBuilder::new().file("data", &data, 0o644, 0, 0).finish())
            .write_oci_layout(&layout, "t")
            .unwrap();
        let (rec, _) = store
            .pull(&ImageSource::parse(&format!("oci:{}:t", layout.display())).unwrap(), &PullOptions::default())
            .unwrap();
        sizes.push(rec.size);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // Use the oldest again: the middle one is now least recently used.
    store.get(&ImageSource::parse(&format!("oci:{}:t", dir.path().join("l0").display())).unwrap()).unwrap().unwrap();
    let total = store.size().unwrap();
    let removed = store.prune(total - 1).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(removed[0].references[0].contains("/l1:"), "{:?}", removed[0].references);
    assert_eq!(store.list().unwrap().len(), 2);
    assert!(store.prune(0).unwrap().len() == 2 && store.list().unwrap().is_empty());
}
