//! Bounded copies of untrusted bytes and text for storage.
//!
//! Body previews keep the first [`PREVIEW_LIMIT`] bytes. A preview that is
//! UTF-8 text is stored as SQLite TEXT, cut on a character boundary (a body
//! cut by the handler in the middle of a character is still text); anything
//! else is stored as a BLOB and flagged, so nobody has to guess which it is.

/// Bytes kept of a request or response body.
pub const PREVIEW_LIMIT: usize = 4096;

/// A body preview as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preview<'a> {
    /// No body.
    Empty,
    Text(&'a str),
    Binary(&'a [u8]),
}

/// The stored preview of `body`: at most [`PREVIEW_LIMIT`] bytes.
pub fn body_preview(body: &[u8]) -> Preview<'_> {
    let head = &body[..body.len().min(PREVIEW_LIMIT)];
    if head.is_empty() {
        return Preview::Empty;
    }
    let text = match std::str::from_utf8(head) {
        Ok(text) => Some(text),
        // Only an incomplete character at the very end: the body was cut there.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    match text {
        Some(text) if !text.contains('\0') => Preview::Text(text),
        _ => Preview::Binary(head),
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Append `more` to `text` without letting it grow past `max` bytes.
pub fn push_bounded(text: &mut String, more: &str, max: usize) {
    let room = max.saturating_sub(text.len());
    text.push_str(truncate_str(more, room));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_kept_as_text_up_to_the_limit() {
        assert_eq!(body_preview(b""), Preview::Empty);
        assert_eq!(body_preview(b"{\"a\":1}"), Preview::Text("{\"a\":1}"));
        let long = "x".repeat(PREVIEW_LIMIT + 10);
        assert_eq!(body_preview(long.as_bytes()), Preview::Text(&long[..PREVIEW_LIMIT]));
    }

    #[test]
    fn text_is_cut_on_a_character_boundary() {
        // 4095 ASCII bytes then a 3-byte character straddling the limit.
        let mut body = "a".repeat(PREVIEW_LIMIT - 1);
        body.push('€');
        body.push_str("tail");
        assert_eq!(body_preview(body.as_bytes()), Preview::Text(&body[..PREVIEW_LIMIT - 1]));
        // A body that the handler already cut inside a character.
        let cut = &"héllo".as_bytes()[..2];
        assert_eq!(body_preview(cut), Preview::Text("h"));
    }

    #[test]
    fn binary_is_flagged() {
        assert_eq!(body_preview(&[0xff, 0xfe, 0x00, 0x01]), Preview::Binary(&[0xff, 0xfe, 0x00, 0x01]));
        assert_eq!(body_preview(b"text\0with nul"), Preview::Binary(b"text\0with nul"));
        let gzip = [0x1f, 0x8b, 0x08, 0x00, 0xc3, 0x28];
        assert!(matches!(body_preview(&gzip), Preview::Binary(_)));
        let big = vec![0x80u8; PREVIEW_LIMIT * 2];
        assert_eq!(body_preview(&big), Preview::Binary(&big[..PREVIEW_LIMIT]));
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_str("añb", 2), "a");
        assert_eq!(truncate_str("añb", 3), "añ");
        assert_eq!(truncate_str("abc", 10), "abc");
        let mut s = String::from("ab");
        push_bounded(&mut s, "cñd", 4);
        assert_eq!(s, "abc");
        push_bounded(&mut s, "zzz", 4);
        assert_eq!(s, "abcz");
    }
}
