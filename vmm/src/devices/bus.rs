//! Dispatch of guest port I/O and MMIO accesses to devices by address range.
//!
//! A bus is built once before the vCPUs start and is then shared read-only
//! between vCPU threads; each device sits behind its own mutex.

use std::sync::{Arc, Mutex};

use crate::lock;

/// A device that answers guest reads and writes within its address range.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device already placed on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Error adding a device to a bus.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
pub struct Overlap {
    /// Base of the rejected range.
    pub base: u64,
    /// Length of the rejected range.
    pub len: u64,
}

/// Devices by non-overlapping address ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|r| (r.base, r.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Overlap> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Overlap { base, len })?;
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((range, offset))
    }

    /// Forwards a read to the device covering it; returns false (and leaves
    /// `data` alone) if no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Forwards a write to the device covering it; returns false if none does.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(lock(&dev).last_write, Some((0xe, vec![1, 2])));
    }

    #[test]
    fn accesses_outside_or_straddling_the_range_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10).unwrap();
        let mut data = [0xaau8; 4];
        assert!(!bus.read(0xff, &mut data[..1]));
        assert!(!bus.read(0x110, &mut data[..1]));
        assert!(!bus.read(0x10e, &mut data));
        assert!(!bus.write(u64::MAX, &[0; 4]));
        assert_eq!(data, [0xaa; 4]);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(dev(), 0x100, 0x10).unwrap();
        bus.insert(dev(), 0x80, 0x80).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x10f, 2).is_err());
        assert!(bus.insert(dev(), 0x0, 0x81).is_err());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        let mut data = [0u8; 1];
        assert!(bus.read(0x80, &mut data));
        assert!(bus.read(0x11f, &mut data));
        assert_eq!(data, [0xf]);
    }
}
