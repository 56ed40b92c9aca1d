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
            match OpenOptions::new().write(true).open(PathBuf::from(&path)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_its_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = fifo.to_string_lossy().into_owned();
        let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
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
