//! Legacy PC devices on port I/O: the serial console and the i8042 reset line.

pub mod i8042;
pub mod serial;
