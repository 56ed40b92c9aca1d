//! The host's parser of `sandbox-probe` output lines, which the guest
//! writes: any bytes, never a panic; a parsed line prints back to one that
//! parses to the same fields (line breaks in the detail become spaces).
#![no_main]

use guest_protocol::probe::ProbeLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Some(parsed) = ProbeLine::parse(line) else { continue };
        let reparsed = ProbeLine::parse(&parsed.to_string()).expect("a printed line parses");
        let expected = ProbeLine { detail: parsed.detail.replace(['\n', '\r'], " "), ..parsed };
        assert_eq!(reparsed, expected);
    }
});
