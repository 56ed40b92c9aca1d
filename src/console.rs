//! The VM's serial console as the host sees it: the guest kernel's log, and,
//! for a command started from the kernel command line, its output and status.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::console::{Demux, Piece};

use crate::agent::ReadySignal;

/// How much console log a sandbox keeps.
const CONSOLE_KEEP: usize = 64 * 1024;
/// How much command output (after the start marker) a sandbox keeps when
/// nothing streams it: the last 64 KiB; older bytes are dropped and counted.
pub(crate) const OUTPUT_KEEP: usize = 64 * 1024;

/// What the console said so far.
#[derive(Debug, Default)]
pub(crate) struct ConsoleState {
    /// The last [`OUTPUT_KEEP`] bytes of command output (when not streamed).
    pub output: Vec<u8>,
    /// Output bytes dropped from the front of `output` to stay in bound.
    pub output_dropped: u64,
    pub console: Vec<u8>,
    pub status: Option<i32>,
    pub boot_time: Option<Duration>,
}

impl ConsoleState {
    /// Append command output, keeping only the last [`OUTPUT_KEEP`] bytes.
    fn keep_output(&mut self, bytes: &[u8]) {
        // A single piece larger than the bound only contributes its tail.
        let skip = bytes.len().saturating_sub(OUTPUT_KEEP);
        self.output.extend_from_slice(&bytes[skip..]);
        let excess = self.output.len().saturating_sub(OUTPUT_KEEP);
        self.output.drain(..excess);
        self.output_dropped = self.output_dropped.saturating_add((skip + excess) as u64);
    }

    /// The kept output, after a line saying how much was dropped (if any).
    pub fn output_tail(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.output.len() + 96);
        if self.output_dropped > 0 {
            let note = format!(
                "[sandbox: {} earlier bytes of console output dropped; the last {} KiB follow]\n",
                self.output_dropped,
                OUTPUT_KEEP / 1024
            );
            out.extend_from_slice(note.as_bytes());
        }
        out.extend_from_slice(&self.output);
        out
    }
}

/// The VM's serial port sink: splits the stream into log, output and status.
pub(crate) struct ConsoleSink {
    demux: Demux,
    started: Instant,
    state: Arc<Mutex<ConsoleState>>,
    ready: Arc<ReadySignal>,
    output: Option<Box<dyn Write + Send>>,
    console: Option<Box<dyn Write + Send>>,
}

impl ConsoleSink {
    pub(crate) fn new(
        started: Instant,
        state: Arc<Mutex<ConsoleState>>,
        ready: Arc<ReadySignal>,
        output: Option<Box<dyn Write + Send>>,
        console: Option<Box<dyn Write + Send>>,
    ) -> Self {
        Self { demux: Demux::new(), started, state, ready, output, console }
    }

    fn handle(&mut self, pieces: Vec<Piece>) -> std::io::Result<()> {
        let Ok(mut state) = self.state.lock() else {
            return Err(std::io::Error::other("console state poisoned"));
        };
        for piece in pieces {
            match piece {
                Piece::Log(bytes) => {
                    if let Some(c) = self.console.as_mut() {
                        c.write_all(&bytes)?;
                        c.flush()?;
                    }
                    state.console.extend_from_slice(&bytes);
                    let excess = state.console.len().saturating_sub(CONSOLE_KEEP);
                    state.console.drain(..excess);
                }
                Piece::Output(bytes) => match self.output.as_mut() {
                    Some(out) => {
                        out.write_all(&bytes)?;
                        out.flush()?;
                    }
                    None => state.keep_output(&bytes),
                },
                Piece::AgentReady => self.ready.raise(),
                Piece::Started => state.boot_time = Some(self.started.elapsed()),
                Piece::Exited(code) => state.status = Some(code),
            }
        }
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pieces = self.demux.feed(buf);
        self.handle(pieces)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        let pieces = self.demux.finish();
        let _ = self.handle(pieces);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_buffer_is_bounded() {
        let state = Arc::new(Mutex::new(ConsoleState::default()));
        let mut sink = ConsoleSink::new(Instant::now(), Arc::clone(&state), Arc::default(), None, None);
        sink.write_all(b"kernel says hi\n").unwrap();
        sink.write_all(guest_protocol::console::START).unwrap();
        // A detached guest writing to /dev/ttyS0 without end: 4 MiB in 4 KiB
        // writes, then one piece larger than the bound.
        let chunk = vec![b'x'; 4096];
        for _ in 0..1024 {
            sink.write_all(&chunk).unwrap();
        }
        let mut big = vec![b'y'; OUTPUT_KEEP * 2];
        big.extend_from_slice(b"the end");
        sink.write_all(&big).unwrap();
        let state = state.lock().unwrap();
        assert_eq!(state.output.len(), OUTPUT_KEEP);
        assert!(state.output.ends_with(b"the end"));
        assert_eq!(state.output_dropped, (4096 * 1024 + big.len() - OUTPUT_KEEP) as u64);
        let tail = state.output_tail();
        assert!(tail.starts_with(b"[sandbox: "), "{:?}", String::from_utf8_lossy(&tail[..80]));
        assert!(tail.ends_with(b"the end"));
        assert!(state.console.len() <= CONSOLE_KEEP);
    }
}
