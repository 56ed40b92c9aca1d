//! The agent's frame decoder, on both sides: any bytes give messages or an
//! error, never a panic or an allocation past the frame limit.
#![no_main]

use guest_protocol::agent::{decode_all, GuestMessage, HostMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_all::<HostMessage>(data);
    let _ = decode_all::<GuestMessage>(data);
});
