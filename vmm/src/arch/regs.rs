//! Initial vCPU state for the PVH entry point.
//!
//! The PVH ABI starts the kernel in 32-bit protected mode with paging off:
//! flat 4 GiB code and data segments, `CR0.PE` set, `%ebx` = physical address
//! of `hvm_start_info`, `EFLAGS` = 0x2. The segments are described by a small
//! GDT in guest memory so that they match what the hidden segment registers
//! hold. Every vCPU also gets a sane FPU state and local APIC LINT0/LINT1
//! wiring (ExtINT and NMI), as firmware would leave them; only the bootstrap
//! vCPU gets entry registers, the others wait for INIT/SIPI in the in-kernel APIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{kvm, Error, Result};
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, PVH_INFO_START};

const CR0_PE: u64 = 1;
const EFLAGS_RESERVED: u64 = 1 << 1;

/// Access byte and flags (`0xc09b`: 4 KiB granularity, 32-bit, present,
/// ring 0, code execute/read accessed) of the flat code segment.
const CODE_FLAGS: u16 = 0xc09b;
/// Flat data segment: as above with type read/write accessed.
const DATA_FLAGS: u16 = 0xc093;
/// 32-bit busy TSS, byte granular.
const TSS_FLAGS: u16 = 0x008b;

/// The boot GDT: null, code (selector 0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(CODE_FLAGS, 0, 0xffff_ffff),
    gdt_entry(DATA_FLAGS, 0, 0xffff_ffff),
    gdt_entry(TSS_FLAGS, 0, 0x67),
];

/// Encodes a segment descriptor. `flags` holds the access byte in bits 0-7 and
/// the G/DB/L/AVL nibble in bits 12-15; `limit` is the raw 20-bit limit field
/// (in pages when G is set).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of GDT entry `index` of `table`, as the CPU would load it.
pub fn segment_from_gdt(table: &[u64], index: usize) -> kvm_segment {
    let entry = table.get(index).copied().unwrap_or(0);
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and a null IDT entry into guest memory.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<()> {
    let write_err = |source| Error::GuestMemoryWrite { what: "boot GDT", source };
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64)).map_err(write_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(write_err)
}

/// Special registers for the 32-bit PVH entry, starting from the vCPU's current ones.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(&GDT, 1);
    let data = segment_from_gdt(&GDT, 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(&GDT, 3);
    sregs.cr0 = CR0_PE;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for the PVH entry at `entry`.
pub fn pvh_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs { rip: entry.0, rbx: PVH_INFO_START, rflags: EFLAGS_RESERVED, ..Default::default() }
}

/// Power-on FPU state: x87 control word 0x37f, MXCSR 0x1f80 (all exceptions masked).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| state.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = byte as _;
    }
}

/// Sets LINT0 to ExtINT (the PIC) and LINT1 to NMI, keeping the other bits.
pub fn wire_lints(state: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

/// Applies FPU and LAPIC state to any vCPU, and the PVH entry state when `entry` is given.
pub fn setup(vcpu: &VcpuFd, entry: Option<GuestAddress>) -> Result<()> {
    vcpu.set_fpu(&initial_fpu()).map_err(kvm("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    wire_lints(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    if let Some(entry) = entry {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&pvh_sregs(sregs)).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&pvh_regs(entry)).map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(GDT[0], 0);
        assert_eq!(GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x0000_8b00_0000_0067);
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 0x120a_9334_5678_bcde);
    }

    #[test]
    fn flat_code_segment_decodes_to_4_gib_32_bit_ring_0() {
        let cs = segment_from_gdt(&GDT, 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x08));
        assert_eq!((cs.type_, cs.s, cs.dpl, cs.present), (0xb, 1, 0, 1));
        assert_eq!((cs.db, cs.l, cs.g, cs.unusable), (1, 0, 1, 0));
        let ds = segment_from_gdt(&GDT, 2);
        assert_eq!((ds.selector, ds.type_, ds.limit), (0x10, 0x3, 0xffff_ffff));
        let tr = segment_from_gdt(&GDT, 3);
        assert_eq!((tr.selector, tr.type_, tr.limit, tr.s, tr.g), (0x18, 0xb, 0x67, 0, 0));
        let null = segment_from_gdt(&GDT, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
        assert_eq!(segment_from_gdt(&GDT, 99).unusable, 1);
    }

    #[test]
    fn decoding_inverts_encoding_for_base_and_byte_limit() {
        let seg = segment_from_gdt(&[0, gdt_entry(0x0093, 0x8765_4321, 0x1_2345)], 1);
        assert_eq!((seg.base, seg.limit, seg.g), (0x8765_4321, 0x1_2345, 0));
    }

    #[test]
    fn pvh_entry_state_is_32_bit_protected_mode_without_paging() {
        let sregs = pvh_sregs(kvm_sregs { cr0: 0x6000_0010, cr4: 0x20, efer: 0x500, ..Default::default() });
        assert_eq!((sregs.cr0, sregs.cr4, sregs.efer), (CR0_PE, 0, 0));
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.ss.selector, 0x10);
        let regs = pvh_regs(GuestAddress(0x100_0abc));
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0abc, PVH_INFO_START, 2));
    }

    #[test]
    fn gdt_and_idt_land_at_their_layout_addresses() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xffff_ffff_ffff_ffffu64, GuestAddress(BOOT_IDT_START)).unwrap();
        write_gdt_and_idt(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, GDT[1]);
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn lints_get_extint_and_nmi_delivery_modes() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0700);
        set_lapic_reg(&mut state, APIC_LVT1, 0x0001_0000);
        wire_lints(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&state, APIC_LVT1), 0x0001_0400);
        set_lapic_reg(&mut state, APIC_LVT0, 0);
        wire_lints(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x700);
    }
}
