//! The Intel MultiProcessor Specification 1.4 table.
//!
//! Without an ACPI MADT the kernel learns about CPUs, the IOAPIC and the
//! interrupt routing from this table; without it, it falls back to "virtual
//! wire" mode with one CPU, which also boots measurably slower. The table is
//! built as little-endian bytes (no `repr(packed)` structs) and placed at the
//! start of the EBDA, where the kernel scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{APIC_START, EBDA_END, IOAPIC_START, IRQ_MAX, MPTABLE_START};

const SPEC_REVISION: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 in the CPU signature field.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX FPU and APIC bits.
const CPU_FEATURES: u32 = 0x201;
const IOAPIC_USABLE: u8 = 1;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

/// Largest vCPU count whose table fits in the EBDA window.
pub const fn max_vcpus() -> u8 {
    let fixed = FLOATING_POINTER_LEN + HEADER_LEN + SHORT_ENTRY_LEN * (1 + 1 + IRQ_MAX as usize + 1 + 2);
    let room = (EBDA_END - MPTABLE_START) as usize - fixed;
    let n = room / PROCESSOR_ENTRY_LEN;
    if n > u8::MAX as usize {
        u8::MAX
    } else {
        n as u8
    }
}

/// The bytes of the floating pointer followed by the configuration table, as
/// they must appear at `base`.
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = vcpus.wrapping_add(1);
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;

    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;

    // ISA IRQ n is wired to IOAPIC pin n, with the bus's default polarity and trigger.
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        entry_count += 1;
    }

    // LINT0 of the bootstrap CPU takes the PIC's ExtINT; LINT1 of every CPU is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 1]);
    entry_count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"SANDBOX ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(SPEC_REVISION);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// Writes the MP table for `vcpus` processors at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<()> {
    mem.write_slice(&build(vcpus, MPTABLE_START), GuestAddress(MPTABLE_START))
        .map_err(|source| Error::GuestMemoryWrite { what: "MP table", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected size of the floating pointer plus table for `vcpus` processors.
    fn table_size(vcpus: u8) -> usize {
        FLOATING_POINTER_LEN
            + HEADER_LEN
            + usize::from(vcpus) * PROCESSOR_ENTRY_LEN
            + SHORT_ENTRY_LEN * (1 + 1 + IRQ_MAX as usize + 1 + 2)
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_zero() {
        for vcpus in [1, 2, 7, max_vcpus()] {
            let bytes = build(vcpus, MPTABLE_START);
            assert_eq!(bytes.len(), table_size(vcpus));
            assert_eq!(&bytes[..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(usize::from(u16_at(table, 4)), table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
        }
    }

    #[test]
    fn floating_pointer_points_at_the_table() {
        let bytes = build(2, 0x9fc00);
        assert_eq!(u32_at(&bytes, 4), 0x9fc10);
        assert_eq!(bytes[8], 1);
        assert_eq!(bytes[9], 4);
    }

    #[test]
    fn entries_describe_cpus_bus_ioapic_and_interrupts() {
        let vcpus = 3;
        let bytes = build(vcpus, MPTABLE_START);
        let table = &bytes[16..];
        assert_eq!(u32_at(table, 36), APIC_START as u32);
        let count = u16_at(table, 34);
        let mut at = HEADER_LEN;
        let mut cpus = Vec::new();
        let mut ioapic = None;
        let mut irqs = Vec::new();
        let mut lints = 0;
        for _ in 0..count {
            match table[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[at + 1], table[at + 3]));
                    at += PROCESSOR_ENTRY_LEN;
                }
                ENTRY_BUS => {
                    assert_eq!(&table[at + 2..at + 8], b"ISA   ");
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some((table[at + 1], u32_at(table, at + 4)));
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(table[at + 5], table[at + 7], "ISA irq n goes to pin n");
                    irqs.push(table[at + 5]);
                    at += SHORT_ENTRY_LEN;
                }
                ENTRY_LOCAL_INTERRUPT => {
                    lints += 1;
                    at += SHORT_ENTRY_LEN;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(at, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)], "cpu 0 is the bootstrap processor");
        assert_eq!(ioapic, Some((vcpus + 1, IOAPIC_START as u32)));
        assert_eq!(irqs, (0..=IRQ_MAX as u8).collect::<Vec<_>>());
        assert_eq!(lints, 2);
    }

    #[test]
    fn the_largest_table_fits_in_the_ebda() {
        let max = max_vcpus();
        assert!(max >= 16);
        assert!(MPTABLE_START + table_size(max) as u64 <= EBDA_END);
        assert!(MPTABLE_START + table_size(max + 1) as u64 > EBDA_END);
    }

    #[test]
    fn write_places_the_table_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&signature, b"_MP_");
        let too_small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(write(&too_small, 1), Err(Error::GuestMemoryWrite { .. })));
    }
}
