//! Conversion throughput: an OCI layout (three gzip layers with whiteouts, an
//! opaque directory and links) -> the cached erofs image, beside `mkfs.erofs`
//! of the same final tree from a directory, in the same run.
//!
//!   cargo bench -p rootfs --bench convert
//!
//! Prints MB of layers (compressed and uncompressed) per second and the ratio
//! of the whole conversion's time to mkfs.erofs's alone. Needs root and
//! erofs-utils.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use rootfs::fixtures::{ImageBuilder, LayerBuilder};
use rootfs::{ImageSource, PullOptions, Store};

const RUNS: usize = 3;

/// Deterministic, moderately compressible bytes.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|i| {
            if i % 4 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            if i % 3 == 0 {
                b'a' + (x % 16) as u8
            } else {
                (x >> (8 * (i % 4))) as u8
            }
        })
        .collect()
}

fn image() -> (ImageBuilder, u64) {
    let mut total = 0u64;
    let mut layers = Vec::new();
    for l in 0..3u64 {
        let mut b = LayerBuilder::new();
        for d in 0..20 {
            b = b.dir(&format!("usr/share/d{l}_{d}"), 0o755, 0, 0);
            for f in 0..60u64 {
                // Sizes from 1 KiB to ~300 KiB, like a distribution's files.
                let len = 1024 + ((f * 7919 + d * 104_729 + l) % 300) as usize * 1024 / (1 + (f % 5) as usize);
                total += len as u64;
                b = b.file(&format!("usr/share/d{l}_{d}/f{f}"), &content(l * 10_000 + d * 100 + f, len), 0o644, 0, 0);
            }
            b = b.symlink(&format!("usr/share/d{l}_{d}/link"), "f0");
        }
        if l > 0 {
            b = b.whiteout(&format!("usr/share/d{}_0/f1", l - 1)).opaque(&format!("usr/share/d{}_1", l - 1));
            b = b.hardlink(&format!("usr/share/d{l}_2/hard"), &format!("usr/share/d{l}_2/f3"));
        }
        layers.push(b.finish());
    }
    let mut img = ImageBuilder::new();
    for layer in layers {
        img = img.layer(layer);
    }
    (img, total)
}

fn best(mut f: impl FnMut() -> Duration) -> Duration {
    (0..RUNS).map(|_| f()).min().unwrap()
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (img, file_bytes) = image();
    img.write_oci_layout(&layout, "bench").unwrap();
    let blobs: u64 =
        std::fs::read_dir(layout.join("blobs/sha256")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let source = ImageSource::parse(&format!("oci:{}:bench", layout.display())).unwrap();

    let mut layers_size = 0;
    let mut image_path = None;
    let convert = best(|| {
        let cache = work.path().join("cache");
        let _ = std::fs::remove_dir_all(&cache);
        let t = Instant::now();
        let (rec, path) = Store::new(&cache).pull(&source, &PullOptions::default()).unwrap();
        let elapsed = t.elapsed();
        layers_size = rec.layers_size;
        let keep = work.path().join("image.erofs");
        std::fs::rename(&path, &keep).unwrap();
        image_path = Some(keep);
        elapsed
    });

    // The same final tree as a directory: copied out of the image (not timed).
    let tree = work.path().join("tree");
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let image_path = image_path.unwrap();
    assert!(Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(&image_path)
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    let copied = Command::new("cp").arg("-a").arg(&mnt).arg(&tree).status().unwrap().success();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(copied);
    let mkfs = best(|| {
        let out = work.path().join("ref.erofs");
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        assert!(Command::new("mkfs.erofs").arg("--quiet").arg(&out).arg(&tree).status().unwrap().success());
        t.elapsed()
    });

    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "layers: 3, {:.1} MB compressed, {:.1} MB uncompressed tar, {:.1} MB of file data",
        mb(blobs),
        mb(layers_size),
        mb(file_bytes)
    );
    println!(
        "conversion (verify + gunzip + apply + mkfs.erofs): {:.3} s = {:.1} MB/s of compressed layers, {:.1} MB/s uncompressed",
        convert.as_secs_f64(),
        mb(blobs) / convert.as_secs_f64(),
        mb(layers_size) / convert.as_secs_f64()
    );
    println!(
        "mkfs.erofs of the same tree from a directory: {:.3} s = {:.1} MB/s",
        mkfs.as_secs_f64(),
        mb(layers_size) / mkfs.as_secs_f64()
    );
    println!(
        "ratio conversion / mkfs.erofs alone: {:.2} (best of {RUNS} each)",
        convert.as_secs_f64() / mkfs.as_secs_f64()
    );
}
