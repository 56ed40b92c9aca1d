//! vsock throughput and exec latency in a real sandbox.
//!
//!   cargo bench --bench vsock        (VSOCK_BENCH_MIB=16 by default)
//!
//! Guest-to-host: `vsock-stream send` in the guest writes N MiB to a host
//! Unix socket behind `vsock.sock_6100`; host-to-guest: the host connects
//! through `vsock.sock` (`CONNECT 6101`) to `vsock-stream serve` and reads
//! N MiB. Both are timed on the host, from the first byte to the end of the
//! stream, and printed beside a plain Unix-socket copy of the same bytes in
//! this process (the ratio is the figure), and beside the rate at which the
//! guest kernel copies bytes at all (`dd` from /dev/zero to /dev/null: on
//! hosts where guest kernel code is emulated, that is the ceiling). Then
//! the round-trip latency of running `true` through the agent.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use sandbox::{Command, Image, Instance, Sandbox};

const CHUNK: usize = 64 * 1024;

/// Read a stream to its end; the time from its first byte, and the count.
fn drain(stream: &mut impl Read) -> (Duration, usize) {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    let mut first = None;
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n;
    }
    (first.map(|f| f.elapsed()).unwrap_or_default(), total)
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

fn exec(instance: &Instance, argv: &[&str], stdout: impl Write + Send + 'static) -> i32 {
    let command = Command::from_argv(argv.iter().copied()).stdout_to(stdout).stderr_to(std::io::stderr());
    instance.spawn(command).unwrap().wait().unwrap()
}

/// A Unix socket pair copying `bytes` from one thread to another.
fn unix_reference(bytes: usize) -> Duration {
    let (mut tx, mut rx) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        let buf = vec![0x5a_u8; CHUNK];
        let mut sent = 0;
        while sent < bytes {
            let n = CHUNK.min(bytes - sent);
            tx.write_all(&buf[..n]).unwrap();
            sent += n;
        }
    });
    let (took, total) = drain(&mut rx);
    writer.join().unwrap();
    assert_eq!(total, bytes);
    took
}

fn guest_to_host(instance: &Instance, bytes: usize) -> Duration {
    let listener = UnixListener::bind(instance.dir().join("vsock.sock_6100")).unwrap();
    let sink = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        drain(&mut stream)
    });
    let status = exec(instance, &["vsock-stream", "send", "6100", "--bytes", &bytes.to_string()], std::io::sink());
    assert_eq!(status, 0);
    let (took, total) = sink.join().unwrap();
    assert_eq!(total, bytes);
    took
}

fn host_to_guest(instance: &Instance, bytes: usize) -> Duration {
    let mut server = instance
        .spawn(
            Command::new("vsock-stream")
                .args(["serve", "6101", "--bytes", &bytes.to_string()])
                .stderr_to(std::io::stderr()),
        )
        .unwrap();
    let mut announced = String::new();
    std::io::BufReader::new(server.take_stdout().unwrap()).read_line(&mut announced).unwrap();
    assert_eq!(announced.trim(), "listening on 6101");
    let mut stream = UnixStream::connect(instance.dir().join("vsock.sock")).unwrap();
    stream.write_all(b"CONNECT 6101\n").unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let (took, total) = drain(&mut reader);
    assert_eq!(total, bytes);
    assert_eq!(server.wait().unwrap(), 0);
    took
}

fn main() {
    let mib: usize = std::env::var("VSOCK_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let bytes = mib << 20;
    let instance = Sandbox::builder(Image::Default).memory_mib(256).start().unwrap();
    println!("sandbox {} booted in {:?}; moving {mib} MiB each way", instance.id(), instance.boot_time());

    let reference = unix_reference(bytes);
    let g2h = guest_to_host(&instance, bytes);
    let h2g = host_to_guest(&instance, bytes);
    let unix = mb_per_s(bytes, reference);
    println!("{:<32} {:>10} {:>12}", "path", "MB/s", "vs unix");
    println!("{:<32} {:>10.1} {:>12}", "unix socket pair (host)", unix, "1");
    for (name, took) in [("vsock guest -> host", g2h), ("vsock host -> guest", h2g)] {
        let rate = mb_per_s(bytes, took);
        println!("{name:<32} {rate:>10.2} {:>12}", format!("1/{:.0}", unix / rate));
    }

    // What the guest kernel copies per second with no device involved: every
    // vsock byte is copied at least once by guest kernel code.
    let t = Instant::now();
    let status = exec(
        &instance,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=65536", &format!("count={}", bytes / 65536)],
        std::io::sink(),
    );
    assert_eq!(status, 0);
    println!("{:<32} {:>10.2}", "guest kernel copy (dd, no I/O)", mb_per_s(bytes, t.elapsed()));

    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(exec(&instance, &["true"], std::io::sink()), 0);
            t.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "exec `true` round trip over 20 runs: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        times[10].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3
    );
    instance.shutdown().unwrap();
}
