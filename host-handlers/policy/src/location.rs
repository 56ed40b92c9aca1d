//! Positions in profile text: every profile error names `file:line:column`.
//!
//! Lines and columns count from 1; columns count characters, not bytes.
//! Conditions are CEL text inside TOML strings, so a position inside a
//! condition is mapped back through the string's quoting and escapes to the
//! exact place in the file.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ProfileError;

/// A place in a profile: file, line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The profile's file (or `builtin:<name>`, or the name given to profile text).
    pub file: Arc<Path>,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl Location {
    /// An error at this place.
    pub(crate) fn error(&self, message: impl Into<String>) -> ProfileError {
        ProfileError::Invalid {
            file: PathBuf::from(&*self.file),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// The text of one profile, with its name, for turning byte offsets into
/// locations.
#[derive(Debug)]
pub(crate) struct SourceText {
    pub name: Arc<Path>,
    pub text: String,
}

impl SourceText {
    /// The location of a byte offset (clamped to the text).
    pub fn location(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Location {
            file: self.name.clone(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// An error at a byte offset.
    pub fn error(&self, offset: usize, message: impl Into<String>) -> ProfileError {
        self.location(offset).error(message)
    }

    /// Maps a byte offset inside the value of the TOML string written at
    /// `span` to its byte offset in the file. Offsets past the end of the
    /// value map to the closing quote.
    pub fn string_offset(&self, span: &Range<usize>, value_offset: usize) -> usize {
        let Some(raw) = self.text.get(span.clone()) else {
            return span.start;
        };
        let (open, close, literal) = if raw.starts_with("'''") {
            (3, 3, true)
        } else if raw.starts_with("\"\"\"") {
            (3, 3, false)
        } else if raw.starts_with('\'') {
            (1, 1, true)
        } else {
            (1, 1, false)
        };
        let multiline = open == 3;
        let Some(content) = raw.get(open..raw.len().saturating_sub(close)) else {
            return span.start;
        };
        let mut start = span.start + open;
        let mut content = content;
        // A newline right after the opening delimiter of a multi-line string is trimmed.
        if multiline {
            if let Some(rest) = content.strip_prefix("\r\n") {
                start += 2;
                content = rest;
            } else if let Some(rest) = content.strip_prefix('\n') {
                start += 1;
                content = rest;
            }
        }
        if literal {
            return start + value_offset.min(content.len());
        }
        start + basic_string_offset(content, value_offset)
    }
}

/// Walks the raw content of a TOML basic string, decoding escapes, until
/// `value_offset` bytes of the value have been produced; returns the raw
/// offset reached.
fn basic_string_offset(raw: &str, value_offset: usize) -> usize {
    let bytes = raw.as_bytes();
    let mut raw_at = 0;
    let mut produced = 0;
    loop {
        // Line-ending backslash: the backslash and all whitespace after it vanish.
        if bytes.get(raw_at) == Some(&b'\\')
            && bytes.get(raw_at + 1).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            raw_at += 1;
            while raw_at < bytes.len() && bytes[raw_at].is_ascii_whitespace() {
                raw_at += 1;
            }
            continue;
        }
        if raw_at >= bytes.len() || produced >= value_offset {
            break;
        }
        if bytes[raw_at] != b'\\' {
            let len = raw.get(raw_at..).and_then(|rest| rest.chars().next()).map_or(1, char::len_utf8);
            raw_at += len;
            produced += len;
            continue;
        }
        match bytes.get(raw_at + 1).copied() {
            Some(escape @ (b'u' | b'U')) => {
                let digits = if escape == b'u' { 4 } else { 8 };
                let hex = raw.get(raw_at + 2..raw_at + 2 + digits).unwrap_or("");
                let decoded = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32).map_or(1, char::len_utf8);
                raw_at += 2 + digits;
                produced += decoded;
            }
            _ => {
                raw_at += 2;
                produced += 1;
            }
        }
    }
    raw_at.min(raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> SourceText {
        SourceText { name: Arc::from(Path::new("p.toml")), text: text.to_owned() }
    }

    #[test]
    fn locations_count_lines_and_characters_from_one() {
        let src = source("ab\nçd = 1\n");
        assert_eq!(src.location(0).to_string(), "p.toml:1:1");
        assert_eq!(src.location(3).to_string(), "p.toml:2:1");
        // 'ç' is two bytes but one column
        assert_eq!(src.location(5).to_string(), "p.toml:2:2");
        assert_eq!(src.location(999).to_string(), "p.toml:3:1");
    }

    #[test]
    fn string_offsets_follow_quoting_and_escapes() {
        let text = r#"a = 'xyz'
b = "x\ty\u00e9z"
c = '''
xyz'''
d = """x\
    yz"""
"#;
        let src = source(text);
        let span = |needle: &str| {
            let start = text.find(needle).unwrap_or(0);
            start..start + needle.len()
        };
        let a = span("'xyz'");
        assert_eq!(&text[src.string_offset(&a, 2)..][..1], "z");
        let b = span(r#""x\ty\u00e9z""#);
        // value "x\ty\u{e9}z": 'z' is at value offset 5 (é is two bytes)
        assert_eq!(&text[src.string_offset(&b, 5)..][..1], "z");
        assert_eq!(&text[src.string_offset(&b, 2)..][..1], "y");
        let c = span("'''\nxyz'''");
        assert_eq!(&text[src.string_offset(&c, 1)..][..1], "y");
        let d = span("\"\"\"x\\\n    yz\"\"\"");
        assert_eq!(&text[src.string_offset(&d, 1)..][..1], "y");
        // past the end: the closing quote
        assert_eq!(&text[src.string_offset(&a, 99)..][..1], "'");
    }
}
