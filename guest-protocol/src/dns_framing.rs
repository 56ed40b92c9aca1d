//! DNS over a byte stream: RFC 1035 TCP framing, each message preceded by
//! its length as a 2-byte big-endian number.
//!
//! On vsock port [`DNS_PORT`](crate::ports::DNS_PORT) the guest's dns-proxy
//! sends queries framed this way (pipelined on one connection, RFC 7766) and
//! the host's DNS handler reads them and sends its answers back in the same
//! framing. The dns-proxy's own TCP listener uses it too, as any DNS client
//! over TCP does.

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 2;

/// Longest message a frame can carry.
pub const MAX_MESSAGE_LEN: usize = u16::MAX as usize;

/// The length prefix of a message of `len` bytes; `None` if it is longer
/// than [`MAX_MESSAGE_LEN`].
pub fn length_prefix(len: usize) -> Option<[u8; PREFIX_LEN]> {
    u16::try_from(len).ok().map(u16::to_be_bytes)
}

/// The length of the message a prefix announces.
pub fn message_len(prefix: [u8; PREFIX_LEN]) -> usize {
    usize::from(u16::from_be_bytes(prefix))
}

/// Append `message` to `out`, framed. Returns false, appending nothing, if it
/// is longer than [`MAX_MESSAGE_LEN`].
pub fn push_frame(out: &mut Vec<u8>, message: &[u8]) -> bool {
    let Some(prefix) = length_prefix(message.len()) else { return false };
    out.extend_from_slice(&prefix);
    out.extend_from_slice(message);
    true
}

/// Remove the first complete frame from the front of `buf` and return its
/// message, if `buf` holds a complete one.
pub fn take_frame(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let prefix = buf.get(..PREFIX_LEN)?;
    let len = message_len([prefix[0], prefix[1]]);
    let message = buf.get(PREFIX_LEN..PREFIX_LEN + len)?.to_vec();
    buf.drain(..PREFIX_LEN + len);
    Some(message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_complete_input() {
        let mut buf = Vec::new();
        assert!(push_frame(&mut buf, b"first"));
        assert!(push_frame(&mut buf, b""));
        assert!(!push_frame(&mut buf, &vec![0; 70_000]));
        buf.extend_from_slice(&[0, 9, b'p']);
        assert_eq!(take_frame(&mut buf).unwrap(), b"first");
        assert_eq!(take_frame(&mut buf).unwrap(), b"");
        assert_eq!(take_frame(&mut buf), None);
        assert_eq!(buf, [0, 9, b'p']);
    }

    #[test]
    fn prefix_is_big_endian_and_bounded() {
        assert_eq!(length_prefix(0x0102), Some([1, 2]));
        assert_eq!(message_len([1, 2]), 0x0102);
        assert_eq!(length_prefix(MAX_MESSAGE_LEN), Some([0xff, 0xff]));
        assert_eq!(length_prefix(MAX_MESSAGE_LEN + 1), None);
    }
}
