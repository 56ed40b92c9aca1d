//! The snapshot state file parser (`vmm::snapshot::decode_state`, what
//! `Vm::restore` reads): any bytes give a clear error or a state, never a
//! panic, a hang or an unbounded allocation. Half the inputs are framed with
//! a valid prefix and checksum (first byte odd: the rest is split into a
//! header and a payload at the second byte), so that the JSON header and
//! the postcard payload decoders are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data {
        [mode, split, rest @ ..] if mode % 2 == 1 => {
            let at = usize::from(*split).min(rest.len());
            if let Ok(framed) = vmm::snapshot::format::frame(&rest[..at], &rest[at..]) {
                let _ = vmm::snapshot::decode_state(&framed);
            }
        }
        _ => {
            let _ = vmm::snapshot::decode_state(data);
        }
    }
});
