//! Emulated devices: legacy port I/O devices and virtio devices on MMIO.

pub mod bus;
pub mod legacy;
pub mod virtio;
