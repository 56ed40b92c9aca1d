//! PVH boot information: `hvm_start_info` and the memory map.
//!
//! The kernel's PVH entry point (`pvh_start_xen`) receives the physical
//! address of an `hvm_start_info` in `%ebx`; from it, it takes the command line
//! and an e820-style memory map. The map lists only RAM the kernel may use:
//! base memory below the EBDA (the MP table lives in the EBDA) and everything
//! from 1 MiB up, split around the MMIO gap. The kernel itself reserves the
//! legacy 640 KiB - 1 MiB hole.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_start_info, XEN_HVM_MEMMAP_TYPE_RAM, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MEMMAP_START, PVH_INFO_START};

/// The memory map for the given RAM regions (as from [`crate::layout::ram_regions`]).
pub fn memory_map(ram: &[(GuestAddress, u64)]) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, end: u64| hvm_memmap_table_entry {
        addr,
        size: end - addr,
        type_: XEN_HVM_MEMMAP_TYPE_RAM,
        reserved: 0,
    };
    let mut map = vec![entry(0, EBDA_START)];
    for &(start, size) in ram {
        let end = start.0.saturating_add(size);
        let start = start.0.max(HIMEM_START);
        if end > start {
            map.push(entry(start, end));
        }
    }
    map
}

/// The `hvm_start_info` pointing at the command line and a memory map of `entries` entries.
pub fn start_info(entries: usize) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: u32::try_from(entries).unwrap_or(u32::MAX),
        ..Default::default()
    }
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`] and the memory map at [`MEMMAP_START`].
pub fn write(mem: &GuestMemoryMmap, ram: &[(GuestAddress, u64)]) -> Result<()> {
    let map = memory_map(ram);
    let info = start_info(map.len());
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootConfig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_regions, MEMMAP_MAX_ENTRIES, MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::Bytes;

    #[test]
    fn small_guest_has_base_memory_and_high_memory() {
        let map = memory_map(&ram_regions(128 << 20));
        assert_eq!(map.len(), 2);
        assert_eq!((map[0].addr, map[0].size), (0, EBDA_START));
        assert_eq!((map[1].addr, map[1].size), (HIMEM_START, (128 << 20) - HIMEM_START));
        assert!(map.iter().all(|e| e.type_ == XEN_HVM_MEMMAP_TYPE_RAM));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 5u64 << 30;
        let map = memory_map(&ram_regions(size));
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2].addr, MMIO_GAP_END);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_END + size - MMIO_GAP_START);
        assert!(map.len() <= MEMMAP_MAX_ENTRIES);
    }

    #[test]
    fn the_ebda_and_legacy_hole_are_never_ram() {
        for size in [32u64 << 20, 5 << 30] {
            for e in memory_map(&ram_regions(size)) {
                let end = e.addr + e.size;
                assert!(end <= EBDA_START || e.addr >= HIMEM_START, "{e:?}");
            }
        }
    }

    #[test]
    fn start_info_is_written_where_the_kernel_is_told() {
        let ram = ram_regions(64 << 20);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write(&mem, &ram).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_paddr, MEMMAP_START);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 0);

        let second: hvm_memmap_table_entry = mem.read_obj(GuestAddress(MEMMAP_START + 24)).unwrap();
        assert_eq!(second.addr, HIMEM_START);
        assert_eq!(second.addr + second.size, 64 << 20);
    }
}
