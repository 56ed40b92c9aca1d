//! x86-64 specifics: CPUID, MSRs, initial registers, the MP table, and PVH
//! boot of an uncompressed `vmlinux` ELF.

pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod pvh;
pub mod regs;

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{CMDLINE_START, HIMEM_START};

/// Loads the kernel ELF into guest memory and returns its PVH entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, mut image: File) -> Result<GuestAddress> {
    let loaded = Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| Error::KernelLoad { path: path.to_path_buf(), source })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry),
        _ => Err(Error::NoPvhEntry { path: path.to_path_buf() }),
    }
}

/// Writes everything the kernel reads at boot besides itself: the command
/// line, `hvm_start_info` with the memory map, the MP table, and the boot GDT.
pub fn write_boot_info(mem: &GuestMemoryMmap, ram: &[(GuestAddress, u64)], cmdline: &Cmdline, vcpus: u8) -> Result<()> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(Error::CmdlineWrite)?;
    pvh::write(mem, ram)?;
    mptable::write(mem, vcpus)?;
    regs::write_gdt_and_idt(mem)
}
