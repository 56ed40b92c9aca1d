//! Splits a JSON body into its top-level objects as the bytes arrive.
//!
//! Two shapes occur: a single object (any non-streamed response; also a
//! sequence of objects) and an array of objects streamed element by element
//! (Gemini's `streamGenerateContent` without `alt=sse`). The first bracket
//! decides. The splitter only tracks nesting, strings and escapes; the
//! objects it hands out are parsed by serde_json, which reports any error.
//!
//! An object larger than the limit is skipped (its bytes are not kept) and
//! reported as [`JsonItem::Oversized`] when it closes.

/// What the splitter produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonItem {
    /// The bytes of one complete top-level value.
    Value(Vec<u8>),
    /// A value that exceeded the limit; its content was discarded.
    Oversized,
}

/// Splitter state between chunks.
#[derive(Debug)]
pub struct JsonSplitter {
    max_value_bytes: usize,
    /// Nesting depth at which items start: 0 for objects, 1 inside an array.
    item_depth: Option<u32>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    capturing: bool,
    oversized: bool,
    buf: Vec<u8>,
    array_closed: bool,
}

impl JsonSplitter {
    pub fn new(max_value_bytes: usize) -> JsonSplitter {
        JsonSplitter {
            max_value_bytes,
            item_depth: None,
            depth: 0,
            in_string: false,
            escaped: false,
            capturing: false,
            oversized: false,
            buf: Vec::new(),
            array_closed: false,
        }
    }

    /// Split the next chunk; complete items are appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<JsonItem>) {
        for &byte in chunk {
            if self.in_string {
                self.keep(byte);
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => {
                    self.in_string = true;
                    self.keep(byte);
                }
                b'{' | b'[' => {
                    let item_depth = *self.item_depth.get_or_insert(u32::from(byte == b'['));
                    if self.depth == item_depth && !self.capturing {
                        self.capturing = true;
                        self.oversized = false;
                        self.buf.clear();
                    }
                    self.keep(byte);
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    self.keep(byte);
                    self.depth = self.depth.saturating_sub(1);
                    if self.capturing && Some(self.depth) == self.item_depth {
                        self.capturing = false;
                        out.push(if self.oversized {
                            JsonItem::Oversized
                        } else {
                            JsonItem::Value(std::mem::take(&mut self.buf))
                        });
                    } else if self.depth == 0 && byte == b']' && self.item_depth == Some(1) {
                        self.array_closed = true;
                    }
                }
                _ => self.keep(byte),
            }
        }
    }

    /// True if the body was an array and its closing bracket has arrived.
    pub fn array_closed(&self) -> bool {
        self.array_closed
    }

    /// True if the input stopped inside an item.
    pub fn in_item(&self) -> bool {
        self.capturing
    }

    fn keep(&mut self, byte: u8) {
        if !self.capturing || self.oversized {
            return;
        }
        if self.buf.len() >= self.max_value_bytes {
            self.oversized = true;
            self.buf = Vec::new();
        } else {
            self.buf.push(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], piece: usize, max: usize) -> (Vec<JsonItem>, JsonSplitter) {
        let mut splitter = JsonSplitter::new(max);
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            splitter.feed(chunk, &mut out);
        }
        (out, splitter)
    }

    fn value(text: &str) -> JsonItem {
        JsonItem::Value(text.as_bytes().to_vec())
    }

    #[test]
    fn array_elements_come_out_one_by_one() {
        let input = "[{\"a\":\"}]\\\"{\"},\r\n{\"b\":[1,{\"c\":2}]}\n]";
        for piece in 1..input.len() {
            let (items, splitter) = split(input.as_bytes(), piece, 1024);
            assert_eq!(items, vec![value("{\"a\":\"}]\\\"{\"}"), value("{\"b\":[1,{\"c\":2}]}")], "piece {piece}");
            assert!(splitter.array_closed());
            assert!(!splitter.in_item());
        }
    }

    #[test]
    fn a_single_object_is_one_item() {
        let (items, splitter) = split(b"  {\"x\": [1, 2]}\n", 4, 1024);
        assert_eq!(items, vec![value("{\"x\": [1, 2]}")]);
        assert!(!splitter.array_closed());
    }

    #[test]
    fn cut_and_oversized_items() {
        let (items, splitter) = split(b"[{\"a\":1},{\"b\":", 3, 1024);
        assert_eq!(items, vec![value("{\"a\":1}")]);
        assert!(splitter.in_item() && !splitter.array_closed());
        let big = format!("[{{\"a\":\"{}\"}},{{\"b\":1}}]", "x".repeat(100));
        let (items, _) = split(big.as_bytes(), 5, 32);
        assert_eq!(items, vec![JsonItem::Oversized, value("{\"b\":1}")]);
    }

    #[test]
    fn stray_closers_do_not_underflow() {
        let (items, _) = split(b"]]}}{\"a\":1}", 2, 1024);
        assert_eq!(items, vec![JsonItem::Value(b"{\"a\":1}".to_vec())]);
    }
}
