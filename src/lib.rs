//! The sandbox runtime: library API.
