//! The VM's serial console as the host sees it: the guest kernel's log, and,
//! for a command started from the kernel command line, its output and status.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::console::{Demux, Piece};

/// How much console log a sandbox keeps.
const CONSOLE_KEEP: usize = 64 * 1024;

/// What the console said so far.
#[derive(Debug, Default)]
pub(crate) struct ConsoleState {
    pub output: Vec<u8>,
    pub console: Vec<u8>,
    pub status: Option<i32>,
    pub boot_time: Option<Duration>,
}

/// The VM's serial port sink: splits the stream into log, output and status.
pub(crate) struct ConsoleSink {
    demux: Demux,
    started: Instant,
    state: Arc<Mutex<ConsoleState>>,
    output: Option<Box<dyn Write + Send>>,
    console: Option<Box<dyn Write + Send>>,
}

impl ConsoleSink {
    pub(crate) fn new(
        started: Instant,
        state: Arc<Mutex<ConsoleState>>,
        output: Option<Box<dyn Write + Send>>,
        console: Option<Box<dyn Write + Send>>,
    ) -> Self {
        Self { demux: Demux::new(), started, state, output, console }
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
                    None => state.output.extend_from_slice(&bytes),
                },
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
