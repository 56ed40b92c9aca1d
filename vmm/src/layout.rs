//! The guest's physical address map and interrupt numbers, in one place.
//!
//! ```text
//! 0x0000_0500  GDT used for the 32-bit PVH entry (4 entries)
//! 0x0000_0520  IDT (a single null entry)
//! 0x0000_6000  PVH hvm_start_info
//! 0x0000_7000  PVH memory map (e820-style entries)
//! 0x0002_0000  kernel command line (COMMAND_LINE_SIZE bytes)
//! 0x0009_fc00  MP table (start of the EBDA; not RAM in the memory map)
//! 0x0010_0000  high memory: the kernel ELF is loaded here or above
//!   ...        RAM up to MMIO_GAP_START
//! 0xd000_0000  virtio-mmio devices, one 4 KiB window each
//! 0xfec0_0000  IOAPIC          (in-kernel)
//! 0xfee0_0000  local APICs     (in-kernel)
//! 0xfffb_c000  KVM identity-map page, 0xfffb_d000 KVM TSS (3 pages)
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than fits below the gap
//! ```
//!
//! Port I/O: the 16550 serial console at 0x3f8 (IRQ 4) and the i8042 command
//! port at 0x64, used by the guest to reboot. PIC, PIT and speaker port are
//! emulated in the kernel (KVM irqchip and PIT2).

use vm_memory::GuestAddress;

/// GDT with the flat 32-bit segments the PVH entry point expects.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT holding one null entry, so the guest faults cleanly before it installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// `struct hvm_start_info`, handed to the kernel in `%ebx`.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map that `hvm_start_info.memmap_paddr` points at.
pub const MEMMAP_START: u64 = 0x7000;
/// Maximum number of memory map entries (room between `MEMMAP_START` and the command line).
pub const MEMMAP_MAX_ENTRIES: usize = 128;
/// The NUL-terminated kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the kernel looks for the MP table
/// ("last KiB of base memory", 639 KiB).
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the EBDA / start of the legacy VGA and ROM hole.
pub const EBDA_END: u64 = 0xa_0000;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// First address of high memory; the kernel must be loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit hole below 4 GiB that holds device windows and no RAM.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit hole (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO base (emulated by KVM).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base (emulated by KVM).
pub const APIC_START: u64 = 0xfee0_0000;
/// One page KVM needs for real-mode emulation on Intel (KVM_SET_IDENTITY_MAP_ADDR).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// Three pages KVM needs for the TSS on Intel (KVM_SET_TSS_ADDR).
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// The 16550 UART's base port (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of UART registers.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// COM1's ISA interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard controller's data port; the command port is `I8042_PORT + 4`.
pub const I8042_PORT: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_COUNT: u16 = 5;

/// Interrupt line of the first virtio-mmio device; device `n` uses `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IOAPIC input (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// Maximum number of virtio-mmio devices: one interrupt line each.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;

/// Window and interrupt line of virtio-mmio device number `index`, if there is room for it.
pub fn virtio_mmio_slot(index: usize) -> Option<(GuestAddress, u32)> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    let index32 = u32::try_from(index).ok()?;
    Some((GuestAddress(VIRTIO_MMIO_START + u64::from(index32) * VIRTIO_MMIO_SIZE), VIRTIO_IRQ_BASE + index32))
}

/// The guest RAM regions for `size` bytes of memory: one region from 0, split
/// around the MMIO gap when it does not fit below it.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)]
    }
}

// The map's invariants, checked at compile time: boot structures do not
// overlap and sit below the EBDA; KVM's private pages fit in the gap.
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_INFO_START + 56 <= MEMMAP_START);
    assert!(MEMMAP_START + 24 * MEMMAP_MAX_ENTRIES as u64 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START < EBDA_END && EBDA_END <= HIMEM_START);
    assert!(MPTABLE_START.is_multiple_of(16), "the MP floating pointer must be 16-byte aligned");
    assert!(KVM_IDENTITY_MAP_START + 0x1000 <= KVM_TSS_START);
    assert!(KVM_TSS_START + 3 * 0x1000 <= MMIO_GAP_END);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_private_pages_and_apics_lie_in_the_gap_without_overlap() {
        for addr in [IOAPIC_START, APIC_START, KVM_IDENTITY_MAP_START, KVM_TSS_START] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
        }
        let (last, _) = virtio_mmio_slot(MAX_VIRTIO_DEVICES - 1).unwrap();
        assert!(last.0 + VIRTIO_MMIO_SIZE <= IOAPIC_START);
    }

    #[test]
    fn virtio_slots_use_consecutive_windows_and_irqs_up_to_the_last_ioapic_pin() {
        assert_eq!(virtio_mmio_slot(0), Some((GuestAddress(0xd000_0000), VIRTIO_IRQ_BASE)));
        assert_eq!(virtio_mmio_slot(1), Some((GuestAddress(0xd000_1000), VIRTIO_IRQ_BASE + 1)));
        assert_eq!(virtio_mmio_slot(MAX_VIRTIO_DEVICES - 1).unwrap().1, IRQ_MAX);
        assert_eq!(virtio_mmio_slot(MAX_VIRTIO_DEVICES), None);
        assert_ne!(VIRTIO_IRQ_BASE, SERIAL_IRQ);
    }

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(GuestAddress(0), MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_is_split_around_the_gap() {
        let size = 4u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)]
        );
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), size);
    }
}
