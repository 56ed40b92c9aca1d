//! Incremental, bounded parser for `text/event-stream` (server-sent events).
//!
//! Follows the WHATWG event-stream interpretation: lines end in CRLF, LF or
//! CR (also when split across chunks); `data` lines of one event are joined
//! with LF; `event` names the event; comment lines start with `:`; a blank
//! line dispatches. An initial byte-order mark is skipped.
//!
//! Memory is bounded by `max_event_bytes` for the current line plus the same
//! for the event's data: an event (or a line) over the limit is skipped as a
//! whole and reported as [`SseItem::Oversized`] when it ends, so a hostile
//! upstream cannot make the parser accumulate without end.

/// Longest event name kept.
const MAX_EVENT_NAME: usize = 128;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What the parser produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// A complete event. `event` is empty when the stream did not name it.
    Event { event: String, data: String },
    /// An event that was larger than the limit; its content was discarded.
    Oversized,
}

/// The parser state between chunks.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// The current, unfinished line.
    line: Vec<u8>,
    line_too_long: bool,
    /// The previous chunk ended in CR: a LF starting the next one belongs to it.
    after_cr: bool,
    first_line: bool,
    event: String,
    data: Vec<u8>,
    has_data: bool,
    oversized: bool,
}

impl SseParser {
    /// A parser that skips events whose data (or any single line) exceeds
    /// `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> SseParser {
        SseParser {
            max_event_bytes,
            line: Vec::new(),
            line_too_long: false,
            after_cr: false,
            first_line: true,
            event: String::new(),
            data: Vec::new(),
            has_data: false,
            oversized: false,
        }
    }

    /// Parse the next chunk; complete events are appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseItem>) {
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.extend_line(&rest[..end]);
            let was_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if was_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(out);
        }
        self.extend_line(rest);
    }

    /// The end of the stream. An event whose data lines are complete but that
    /// was not yet dispatched by a blank line is dispatched; returns true if
    /// the stream ended inside a line or an event (it was cut).
    pub fn finish(&mut self, out: &mut Vec<SseItem>) -> bool {
        let mid_line = !self.line.is_empty() || self.line_too_long;
        let mid_event = self.has_data || self.oversized || !self.event.is_empty();
        self.line.clear();
        self.line_too_long = false;
        if self.has_data || self.oversized {
            self.dispatch(out);
        }
        mid_line || mid_event
    }

    fn extend_line(&mut self, bytes: &[u8]) {
        if self.line_too_long || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.max_event_bytes {
            self.line_too_long = true;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, out: &mut Vec<SseItem>) {
        if self.line_too_long {
            self.line_too_long = false;
            self.oversized = true;
            self.first_line = false;
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if self.first_line {
            self.first_line = false;
            if line.starts_with(BOM) {
                line.drain(..BOM.len());
            }
        }
        self.process_line(&line, out);
        // Keep a modest allocation for the next line.
        line.clear();
        line.shrink_to(64 * 1024);
        self.line = line;
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseItem>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.oversized {
                    return;
                }
                let separator = usize::from(self.has_data);
                if self.data.len() + separator + value.len() > self.max_event_bytes {
                    self.oversized = true;
                    self.data = Vec::new();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                let name = String::from_utf8_lossy(value);
                self.event = crate::preview::truncate_str(&name, MAX_EVENT_NAME).to_owned();
            }
            // `id` and `retry` matter to reconnecting clients, not to us.
            _ => {}
        }
    }

    /// A blank line: hand out the event, if there is one, and start afresh.
    fn dispatch(&mut self, out: &mut Vec<SseItem>) {
        if self.oversized {
            out.push(SseItem::Oversized);
        } else if self.has_data {
            let data = String::from_utf8_lossy(&self.data).into_owned();
            out.push(SseItem::Event { event: std::mem::take(&mut self.event), data });
        }
        self.event.clear();
        self.data.clear();
        self.data.shrink_to(64 * 1024);
        self.has_data = false;
        self.oversized = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize, max: usize) -> (Vec<SseItem>, bool) {
        let mut parser = SseParser::new(max);
        let mut out = Vec::new();
        for chunk in input.chunks(piece.max(1)) {
            parser.feed(chunk, &mut out);
        }
        let cut = parser.finish(&mut out);
        (out, cut)
    }

    fn event(name: &str, data: &str) -> SseItem {
        SseItem::Event { event: name.into(), data: data.into() }
    }

    #[test]
    fn events_survive_any_chunking_and_line_ending() {
        let input = "\u{feff}: comment\r\nevent: ping\r\ndata: {\"a\":1}\r\n\r\n\
                     data: line one\ndata:line two\nid: 7\nretry: 10\n\n\
                     event: é\rdata\r\r";
        let expected = vec![event("ping", "{\"a\":1}"), event("", "line one\nline two"), event("é", "")];
        for piece in 1..input.len() {
            let (items, cut) = parse_in_pieces(input.as_bytes(), piece, 1024);
            assert_eq!(items, expected, "piece size {piece}");
            assert!(!cut, "piece size {piece}");
        }
    }

    #[test]
    fn an_event_without_data_is_not_dispatched() {
        let (items, _) = parse_in_pieces(b"event: x\n\n:only a comment\n\n", 3, 1024);
        assert!(items.is_empty());
    }

    #[test]
    fn oversized_events_are_skipped_and_reported() {
        let big = "x".repeat(100);
        let input = format!("data: {big}\n\ndata: a\ndata: {big}\n\ndata: small\n\n");
        for piece in [1, 7, 1000] {
            let (items, _) = parse_in_pieces(input.as_bytes(), piece, 64);
            assert_eq!(items, vec![SseItem::Oversized, SseItem::Oversized, event("", "small")]);
        }
    }

    #[test]
    fn a_cut_stream_is_reported_and_complete_data_lines_are_kept() {
        let (items, cut) = parse_in_pieces(b"data: {\"x\":1}\n\ndata: {\"y\":2}\ndata: {\"z\"", 5, 1024);
        assert!(cut);
        assert_eq!(items, vec![event("", "{\"x\":1}"), event("", "{\"y\":2}")]);
        let (items, cut) = parse_in_pieces(b"data: done\n\n", 5, 1024);
        assert!(!cut);
        assert_eq!(items, vec![event("", "done")]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let (items, _) = parse_in_pieces(b"data: \xff\xfe ok\n\n", 2, 1024);
        assert_eq!(items, vec![event("", "\u{fffd}\u{fffd} ok")]);
    }
}
