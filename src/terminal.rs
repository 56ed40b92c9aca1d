//! Interactive sessions: a guest command on a pseudo-terminal, driven from
//! this process's terminal as `ssh` or `docker run -it` would. The host
//! terminal goes into raw mode, so every key (Ctrl-C included) reaches the
//! guest's terminal, whose line discipline turns it into a signal for the
//! guest's foreground process; window resizes follow the host terminal.

use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use guest_protocol::agent::WinSize;
use nix::sys::termios::{self, SetArg, Termios};
use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::Signals;

use crate::process::ProcessControl;
use crate::Error;

/// The size of the terminal on `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WinSize> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which
    // lives across the call; the fd is borrowed, so it is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WinSize { rows: ws.ws_row, cols: ws.ws_col })
}

/// The size a guest terminal gets when there is no terminal here to copy.
pub const DEFAULT_SIZE: WinSize = WinSize { rows: 24, cols: 80 };

/// The size of the terminal on standard output, or [`DEFAULT_SIZE`].
pub fn stdout_size() -> WinSize {
    window_size(io::stdout().as_fd()).unwrap_or(DEFAULT_SIZE)
}

/// The size of this process's terminal: standard output's, else standard input's.
fn current_size() -> Option<WinSize> {
    window_size(io::stdout().as_fd()).or_else(|| window_size(io::stdin().as_fd()))
}

/// Raw mode on a terminal until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// What [`crate::Command::attach_terminal`] holds while the command runs:
/// this terminal in raw mode, and a thread forwarding its resizes. Dropping
/// it restores the terminal.
pub(crate) struct Attached {
    raw: Option<RawMode>,
    resizes: signal_hook::iterator::Handle,
    forwarder: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached").finish_non_exhaustive()
    }
}

/// The guest terminal size for a command attached to this terminal, or an
/// error when standard input is not a terminal.
pub(crate) fn attach_size() -> Result<WinSize, Error> {
    if !io::stdin().is_terminal() {
        return Err(Error::Config("a terminal was asked for (-t) but standard input is not a terminal".into()));
    }
    Ok(current_size().unwrap_or(DEFAULT_SIZE))
}

/// Put this terminal in raw mode and forward its resizes to `control`.
pub(crate) fn attach(control: ProcessControl) -> Result<Attached, Error> {
    let mut signals = Signals::new([SIGWINCH]).map_err(|e| Error::Io("watch for terminal resizes".into(), e))?;
    let resizes = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for _ in signals.forever() {
            if let Some(size) = current_size() {
                if control.resize(size).is_err() {
                    break;
                }
            }
        }
    });
    let raw = RawMode::enable().map_err(|e| Error::Io("put the terminal in raw mode".into(), e))?;
    Ok(Attached { raw: Some(raw), resizes, forwarder: Some(forwarder) })
}

impl Drop for Attached {
    fn drop(&mut self) {
        drop(self.raw.take());
        let _ = io::stdout().flush();
        self.resizes.close();
        if let Some(f) = self.forwarder.take() {
            let _ = f.join();
        }
    }
}
