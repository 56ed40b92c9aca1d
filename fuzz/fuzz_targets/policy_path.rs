//! The path normalisation on arbitrary guest request paths: never a panic,
//! and always a path (or `*`) without empty segments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::normalise_path;

fuzz_target!(|raw: &str| {
    let path = normalise_path(raw);
    assert!(path == "*" || path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(!path.contains("//"), "{raw:?} -> {path:?}");
});
