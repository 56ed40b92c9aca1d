//! The console demultiplexer: whatever the guest writes on the serial port,
//! splitting it at any point gives the same pieces, and no bytes are lost.
#![no_main]

use guest_protocol::console::{Demux, Piece};
use libfuzzer_sys::fuzz_target;

fn bytes(pieces: &[Piece]) -> usize {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Log(b) | Piece::Output(b) => b.len(),
            _ => 0,
        })
        .sum()
}

fuzz_target!(|data: &[u8]| {
    let mut whole = Demux::new();
    let mut a = whole.feed(data);
    a.extend(whole.finish());
    let split = data.first().map_or(0, |b| usize::from(*b)) % (data.len() + 1);
    let mut parts = Demux::new();
    let mut b = parts.feed(&data[..split]);
    b.extend(parts.feed(&data[split..]));
    b.extend(parts.finish());
    assert_eq!(bytes(&a), bytes(&b));
    assert!(bytes(&a) <= data.len());
});
