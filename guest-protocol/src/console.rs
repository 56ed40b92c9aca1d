//! Markers init writes on the serial console, and the host-side demultiplexer.
//!
//! Everything before [`START`] is the kernel's log; between [`START`] and the
//! exit marker is the command's output; the exit marker carries the status.
//! [`READY`], in the log, says that the guest agent listens.
//! Markers are delimited by two ASCII record separators (0x1e), which text
//! output does not contain; any other bytes pass through unchanged.

/// Written by init just before the command starts.
pub const START: &[u8] = b"\x1e\x1esandbox:start\x1e\x1e";

/// Written by init once the agent listens on its vsock port, so that the
/// host connects then instead of knocking while the guest boots (each
/// knock costs a booting guest an interrupt and a reset). Only a hint: the
/// host still checks by connecting, and a forged one costs nothing.
pub const READY: &[u8] = b"\x1e\x1esandbox:ready\x1e\x1e";

const DELIM: &[u8] = b"\x1e\x1e";
const EXIT_PREFIX: &[u8] = b"sandbox:exit:";
/// Longest marker body the demultiplexer waits for before giving up on it.
const MAX_BODY: usize = 32;

/// Written by init when the command has ended with `status` (shell convention:
/// 0..=255, 128+N for a signal).
pub fn exit_marker(status: i32) -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(DELIM);
    m.extend_from_slice(EXIT_PREFIX);
    m.extend_from_slice(status.to_string().as_bytes());
    m.extend_from_slice(DELIM);
    m
}

/// A piece of the console stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Kernel or init log (before the command started, or after it ended).
    Log(Vec<u8>),
    /// The command's output.
    Output(Vec<u8>),
    /// The guest agent listens ([`READY`], outside the command's output).
    AgentReady,
    /// The command started.
    Started,
    /// The command ended with this status.
    Exited(i32),
}

/// Splits the console byte stream into [`Piece`]s, across arbitrary chunking.
#[derive(Debug, Default)]
pub struct Demux {
    running: bool,
    pending: Vec<u8>,
}

impl Demux {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes from the console; returns the pieces now complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut data = Vec::new();
        let mut i = 0;
        let buf = std::mem::take(&mut self.pending);
        while i < buf.len() {
            let rest = &buf[i..];
            if !rest.starts_with(&DELIM[..rest.len().min(DELIM.len())]) {
                data.push(buf[i]);
                i += 1;
                continue;
            }
            // `rest` starts with (a prefix of) the delimiter.
            match self.marker(rest) {
                Marker::Incomplete => {
                    self.pending = rest.to_vec();
                    break;
                }
                Marker::None => {
                    data.push(buf[i]);
                    i += 1;
                }
                Marker::Found(len, piece) => {
                    self.flush(&mut data, &mut out);
                    match piece {
                        Piece::Started => self.running = true,
                        Piece::Exited(_) => self.running = false,
                        _ => {}
                    }
                    out.push(piece);
                    i += len;
                }
            }
        }
        self.flush(&mut data, &mut out);
        out
    }

    /// Bytes held back because they might start a marker; call at end of stream.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut data = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        self.flush(&mut data, &mut out);
        out
    }

    fn flush(&self, data: &mut Vec<u8>, out: &mut Vec<Piece>) {
        if data.is_empty() {
            return;
        }
        let bytes = std::mem::take(data);
        out.push(if self.running { Piece::Output(bytes) } else { Piece::Log(bytes) });
    }

    fn marker(&self, rest: &[u8]) -> Marker {
        if rest.len() < DELIM.len() {
            return Marker::Incomplete;
        }
        let body = &rest[DELIM.len()..];
        let Some(end) = body.windows(DELIM.len()).position(|w| w == DELIM) else {
            return if body.len() < MAX_BODY + DELIM.len() { Marker::Incomplete } else { Marker::None };
        };
        if end > MAX_BODY {
            return Marker::None;
        }
        let len = DELIM.len() * 2 + end;
        let body = &body[..end];
        if rest.starts_with(START) {
            return Marker::Found(len, Piece::Started);
        }
        // The command's own output passes through whatever it prints.
        if !self.running && rest.starts_with(READY) {
            return Marker::Found(len, Piece::AgentReady);
        }
        let status = body
            .strip_prefix(EXIT_PREFIX)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<i32>().ok());
        match status {
            Some(code) => Marker::Found(len, Piece::Exited(code)),
            None => Marker::None,
        }
    }
}

enum Marker {
    Incomplete,
    None,
    Found(usize, Piece),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut s = b"[ 0.1] booting\n".to_vec();
        s.extend_from_slice(READY);
        s.extend_from_slice(START);
        s.extend_from_slice(b"hello\x1e world\n\x1e\x1enot a marker\x1e\x1e");
        s.extend_from_slice(READY);
        s.extend_from_slice(&exit_marker(3));
        s.extend_from_slice(b"reboot: Restarting system\n");
        s
    }

    fn collect(pieces: Vec<Piece>) -> (Vec<u8>, Vec<u8>, Vec<Piece>) {
        let (mut log, mut output, mut events) = (Vec::new(), Vec::new(), Vec::new());
        for p in pieces {
            match p {
                Piece::Log(b) => log.extend(b),
                Piece::Output(b) => output.extend(b),
                other => events.push(other),
            }
        }
        (log, output, events)
    }

    #[test]
    fn splits_log_output_and_status_for_every_chunking() {
        let s = stream();
        for chunk in 1..=s.len() {
            let mut d = Demux::new();
            let mut pieces = Vec::new();
            for c in s.chunks(chunk) {
                pieces.extend(d.feed(c));
            }
            pieces.extend(d.finish());
            let (log, output, events) = collect(pieces);
            assert_eq!(log, b"[ 0.1] booting\nreboot: Restarting system\n", "chunk {chunk}");
            let mut expected = b"hello\x1e world\n\x1e\x1enot a marker\x1e\x1e".to_vec();
            expected.extend_from_slice(READY);
            assert_eq!(output, expected, "chunk {chunk}");
            assert_eq!(events, vec![Piece::AgentReady, Piece::Started, Piece::Exited(3)], "chunk {chunk}");
        }
    }

    #[test]
    fn an_unterminated_marker_is_passed_through() {
        let mut d = Demux::new();
        let mut pieces = d.feed(START);
        pieces.extend(d.feed(b"\x1e\x1esandbox:exit:"));
        pieces.extend(d.finish());
        let (_, output, events) = collect(pieces);
        assert_eq!(events, vec![Piece::Started]);
        assert_eq!(output, b"\x1e\x1esandbox:exit:");
    }

    #[test]
    fn negative_and_large_statuses_parse() {
        let mut d = Demux::new();
        let mut m = exit_marker(-1);
        m.extend(exit_marker(255));
        let events: Vec<_> = d.feed(&m).into_iter().filter(|p| matches!(p, Piece::Exited(_))).collect();
        assert_eq!(events, vec![Piece::Exited(-1), Piece::Exited(255)]);
    }
}
