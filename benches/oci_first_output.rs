//! Time from `run` to the first byte of guest output, with an OCI image that
//! is already cached, beside the built-in default image in the same run.
//!
//!   cargo bench -p sandbox --bench oci_first_output
//!
//! Needs /dev/kvm, ./setup.sh's kernel and default image, and root (the
//! image is converted once before timing). On the project's test machines
//! guest kernel code is emulated, so absolute times are long; the ratio is
//! the figure to compare.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootfs::fixtures::{ImageBuilder, LayerBuilder};
use sandbox::{Command, Image, Sandbox, Status};

/// Records when the first byte arrives.
#[derive(Clone)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            let mut first = self.0.lock().unwrap();
            first.get_or_insert_with(Instant::now);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn time_to_first_output(image: Image) -> (Duration, Duration) {
    let first = FirstByte(Arc::new(Mutex::new(None)));
    let start = Instant::now();
    let run = Sandbox::builder(image)
        .memory_mib(128)
        .run(Command::from_argv(["sh", "-c", "echo first"]).timeout(Duration::from_secs(600)).stdout_to(first.clone()))
        .unwrap();
    assert_eq!(run.status, Status::Exited(0), "{}", String::from_utf8_lossy(&run.console));
    let at = first.0.lock().unwrap().unwrap();
    (at - start, start.elapsed())
}

fn main() {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let layout = tempfile::tempdir().unwrap();
    ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("bin", 0o755, 0, 0)
                .file("bin/busybox", &busybox, 0o755, 0, 0)
                .symlink("bin/sh", "busybox")
                .finish(),
        )
        .env("PATH=/bin")
        .write_oci_layout(layout.path(), "bench")
        .unwrap();
    let name = format!("oci:{}:bench", layout.path().display());
    let t = Instant::now();
    let (rec, _) =
        sandbox::image_store().ensure(&rootfs::ImageSource::parse(&name).unwrap(), &Default::default()).unwrap();
    println!("first pull and conversion: {:.2} s", t.elapsed().as_secs_f64());

    let (default_first, default_total) = time_to_first_output(Image::Default);
    let (oci_first, oci_total) = time_to_first_output(Image::parse(&name));
    println!(
        "default image: first output after {:.2} s (whole run {:.2} s)",
        default_first.as_secs_f64(),
        default_total.as_secs_f64()
    );
    println!(
        "cached OCI image: first output after {:.2} s (whole run {:.2} s)",
        oci_first.as_secs_f64(),
        oci_total.as_secs_f64()
    );
    println!("ratio OCI / default: {:.2}", oci_first.as_secs_f64() / default_first.as_secs_f64());
    let _ = sandbox::image_store().remove(&rec.digest);
}
