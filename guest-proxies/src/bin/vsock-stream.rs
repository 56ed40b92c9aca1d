//! `vsock-stream`: moves bytes over vsock between the guest and the host, to
//! check and measure the vsock device from inside a sandbox.
//!
//!   vsock-stream digest <port> [--conns N] [--bytes B]
//!       N concurrent connections to the host's port; each sends B bytes
//!       (different on every connection), shuts down its sending side, and
//!       expects the host to answer with the SHA-256 digest of what it
//!       received. Prints `ok ...` or fails. (Only a digest comes back:
//!       every byte through the guest kernel is copied by emulated code on
//!       our hosts, so echoing the data would double the run time.)
//!   vsock-stream send <port> --bytes B
//!       one connection to the host, sending B bytes; prints MB/s.
//!   vsock-stream serve <port> --bytes B [--count N]
//!       listens on the guest port, sends B bytes to each of N connections.
//!   vsock-stream refused <port>
//!       connects to a host port nobody listens on; succeeds (and prints how
//!       long the refusal took) only if the connection is refused.
//!   vsock-stream flood <port> [--unserved <port>] --count N
//!       N connection attempts one after another, each closed at once:
//!       alternately to <port> and to --unserved (all to <port> without it).
//!       Prints `attempts N ok A refused R errors E elapsed_ms T`; fails only
//!       on bad arguments, so the host can judge the counts.
//!
//! Exit status 0 on success, 1 when the check failed, 2 on bad arguments.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use guest_protocol::ports::HOST_CID;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

const CHUNK: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(name = "vsock-stream", about = "Check and measure vsock from inside a sandbox")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Concurrent connections to a host digest service.
    Digest {
        port: u32,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
    },
    /// Send bytes to a host port and report the rate.
    Send {
        port: u32,
        #[arg(long)]
        bytes: usize,
    },
    /// Listen on a guest port and send bytes to each connection.
    Serve {
        port: u32,
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Expect a connection to a host port to be refused.
    Refused { port: u32 },
    /// Open and close connections in a tight loop and count the outcomes.
    Flood {
        port: u32,
        /// Every other attempt goes to this port (one with no listener).
        #[arg(long)]
        unserved: Option<u32>,
        #[arg(long)]
        count: usize,
    },
}

/// The outcomes of a flood of connection attempts.
#[derive(Debug, Default)]
struct FloodCounts {
    ok: usize,
    refused: usize,
    errors: usize,
    first_error: Option<String>,
}

async fn flood(port: u32, unserved: Option<u32>, count: usize) -> FloodCounts {
    let mut counts = FloodCounts::default();
    for i in 0..count {
        let target = match unserved {
            Some(other) if i % 2 == 1 => other,
            _ => port,
        };
        match VsockStream::connect(VsockAddr::new(HOST_CID, target)).await {
            // Dropping the stream closes it at once.
            Ok(_) => counts.ok += 1,
            // A vsock peer refuses with a reset: the guest sees ECONNRESET.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::ECONNREFUSED)) => counts.refused += 1,
            Err(e) => {
                counts.errors += 1;
                counts.first_error.get_or_insert_with(|| format!("port {target}: {e}"));
            }
        }
    }
    counts
}

/// Deterministic bytes for connection `seed`: a cheap generator, so the data
/// differs between connections and positions.
fn pattern(seed: u64, offset: usize, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset as u64;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

async fn digest_one(port: u32, seed: u64, bytes: usize) -> anyhow::Result<()> {
    let mut stream = VsockStream::connect(VsockAddr::new(HOST_CID, port)).await.context("connect")?;
    let mut sent = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < bytes {
        let n = CHUNK.min(bytes - offset);
        pattern(seed, offset, &mut buf[..n]);
        sent.update(&buf[..n]);
        stream.write_all(&buf[..n]).await.context("send")?;
        offset += n;
    }
    stream.shutdown(std::net::Shutdown::Write).context("shut down the sending side")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.context("read the digest")?;
    if answer.as_slice() != sent.finalize().as_slice() {
        bail!("sent {bytes} bytes; the host's digest of them ({} bytes) does not match", answer.len());
    }
    Ok(())
}

/// Send `bytes` copies of `byte`, then shut down the sending side; returns the count.
async fn send_filler(stream: &mut VsockStream, byte: u8, bytes: usize) -> std::io::Result<usize> {
    let buf = vec![byte; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        let n = CHUNK.min(bytes - sent);
        stream.write_all(&buf[..n]).await?;
        sent += n;
    }
    VsockStream::shutdown(stream, std::net::Shutdown::Write)?;
    Ok(sent)
}

fn rate(bytes: usize, started: Instant) -> f64 {
    bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Digest { port, conns, bytes } => {
            let started = Instant::now();
            let tasks: Vec<_> = (0..conns).map(|i| tokio::spawn(digest_one(port, i as u64, bytes))).collect();
            let mut failed = Vec::new();
            for (i, task) in tasks.into_iter().enumerate() {
                if let Err(e) = task.await.context("connection task")? {
                    failed.push(format!("connection {i}: {e:#}"));
                }
            }
            if !failed.is_empty() {
                bail!("{} of {conns} connections failed: {}", failed.len(), failed.join("; "));
            }
            println!(
                "ok {conns} connections, {bytes} bytes each, digests match, {:.1} MB/s",
                rate(conns * bytes, started)
            );
        }
        Command::Send { port, bytes } => {
            let mut stream = VsockStream::connect(VsockAddr::new(HOST_CID, port)).await.context("connect")?;
            let started = Instant::now();
            let sent = send_filler(&mut stream, 0x5a, bytes).await?;
            // Wait for the host to close: then every byte has arrived.
            let mut rest = [0u8; 64];
            while stream.read(&mut rest).await? > 0 {}
            println!("sent {sent} bytes, {:.1} MB/s", rate(sent, started));
        }
        Command::Serve { port, bytes, count } => {
            let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)).context("listen")?;
            println!("listening on {port}");
            for _ in 0..count {
                let (mut stream, _) = listener.accept().await.context("accept")?;
                send_filler(&mut stream, 0xa5, bytes).await?;
            }
        }
        Command::Refused { port } => {
            let started = Instant::now();
            match VsockStream::connect(VsockAddr::new(HOST_CID, port)).await {
                Ok(_) => bail!("connected to host port {port}, which should have no listener"),
                Err(e) => println!("refused after {} ms: {e}", started.elapsed().as_millis()),
            }
        }
        Command::Flood { port, unserved, count } => {
            let started = Instant::now();
            let counts = flood(port, unserved, count).await;
            println!(
                "attempts {count} ok {} refused {} errors {} elapsed_ms {}",
                counts.ok,
                counts.refused,
                counts.errors,
                started.elapsed().as_millis()
            );
            if let Some(e) = counts.first_error {
                eprintln!("first error: {e}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vsock-stream: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-stream: {e:#}");
            ExitCode::FAILURE
        }
    }
}
