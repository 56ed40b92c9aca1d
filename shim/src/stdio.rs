//! A process's standard streams through containerd's FIFOs.
//!
//! Each stream gets a thread that opens its FIFO (blocking until containerd
//! or `ctr` has the other end open, as runc's shim does) and copies. A
//! stream without a FIFO is read and discarded, so the guest command never
//! waits on output nobody reads.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sandbox::ProcessStdin;

/// The FIFO paths containerd gave for one process (empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The process's stdin, shared between its copier and `close_io`.
pub type SharedStdin = Arc<Mutex<Option<ProcessStdin>>>;

/// Copy the stdin FIFO into the process until end of file or `close_io`.
pub fn copy_stdin(path: String, stdin: SharedStdin) {
    std::thread::spawn(move || {
        let result = (|| -> io::Result<()> {
            let mut fifo = OpenOptions::new().read(true).open(&path)?;
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = fifo.read(&mut buf)?;
                let mut guard = stdin.lock().map_err(|_| io::Error::other("stdin lock poisoned"))?;
                let Some(writer) = guard.as_mut() else { return Ok(()) };
                if n == 0 {
                    if let Some(writer) = guard.take() {
                        let _ = writer.close();
                    }
                    return Ok(());
                }
                writer.write_all(&buf[..n])?;
                writer.flush()?;
            }
        })();
        if let Err(e) = result {
            containerd_shim::warn!("stdin {path}: {e}");
        }
    });
}

/// Copy one output stream to its FIFO (or discard it); the handle ends
/// when the stream does.
pub fn copy_output(output: Option<impl Read + Send + 'static>, path: String) -> Option<JoinHandle<()>> {
    let mut output = output?;
    Some(std::thread::spawn(move || {
        if !path.is_empty() {
            match open_writer(&path) {
                Ok(mut fifo) => match io::copy(&mut output, &mut fifo) {
                    Ok(_) => return,
                    Err(e) => containerd_shim::warn!("output to {path}: {e}; discarding the rest"),
                },
                Err(e) => containerd_shim::warn!("open {path}: {e}; discarding the output"),
            }
        }
        let _ = io::copy(&mut output, &mut io::sink());
    }))
}

/// Open a FIFO for writing without waiting for a reader: containerd opens
/// its end before it creates or starts the process, so no reader means
/// nobody will read (ENXIO), and the output is discarded instead of the
/// shim waiting forever.
fn open_writer(path: &str) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(PathBuf::from(path))?;
    let fd = std::os::fd::AsFd::as_fd(&file);
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(blocking)).map_err(io::Error::from)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn output_reaches_its_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = fifo.to_string_lossy().into_owned();
        // Opened without a reader: discarded, not waited for.
        let ended = copy_output(Some(io::Cursor::new(b"lost\n".to_vec())), path.clone()).unwrap();
        ended.join().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(fifo).unwrap();
            tx.send(()).unwrap();
            let mut out = Vec::new();
            loop {
                let mut buf = [0u8; 64];
                match f.read(&mut buf) {
                    Ok(0) if !out.is_empty() => return out,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        rx.recv().unwrap();
        let handle = copy_output(Some(io::Cursor::new(b"hello\n".to_vec())), path).unwrap();
        handle.join().unwrap();
        assert_eq!(reader.join().unwrap(), b"hello\n");
    }

    #[test]
    fn output_without_a_fifo_is_drained() {
        let handle = copy_output(Some(io::Cursor::new(vec![7u8; 1 << 20])), String::new()).unwrap();
        handle.join().unwrap();
        assert!(copy_output(None::<io::Empty>, "x".into()).is_none());
    }
}
