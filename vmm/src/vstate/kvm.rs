//! Opening `/dev/kvm` and creating the VM.
//!
//! The VM gets KVM's in-kernel PIC + IOAPIC + local APICs (so interrupts from
//! irqfds and timers never leave the kernel), the in-kernel PIT with its
//! speaker port stubbed, the two pages of address space Intel KVM needs for
//! real-mode emulation, and one memory slot per guest RAM region.

use std::ffi::CStr;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{kvm, Error, Result};
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

/// Capabilities this VMM relies on, with their names for error messages.
const REQUIRED_CAPS: [(Cap, &str); 8] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Opens `/dev/kvm`, telling a missing device apart from a permission problem.
pub fn open() -> Result<Kvm> {
    open_at(c"/dev/kvm")
}

fn open_at(path: &CStr) -> Result<Kvm> {
    Kvm::new_with_path(path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(e),
    })
}

/// Fails with the name of the first capability the host KVM lacks.
pub fn check_capabilities(kvm_fd: &Kvm) -> Result<()> {
    match REQUIRED_CAPS.iter().find(|(cap, _)| !kvm_fd.check_extension(*cap)) {
        Some((_, name)) => Err(Error::KvmCapability(name)),
        None => Ok(()),
    }
}

/// Creates the VM with its interrupt controllers, PIT and guest memory.
pub fn create_vm(kvm_fd: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd> {
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_START as usize).map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START).map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

    for (slot, region) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| Error::KvmCapability("enough memory slots"))?,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region describes a live mapping owned by `mem`; the VM
        // owner keeps that mapping alive until the VM and its vCPUs are closed.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_reported_as_no_kvm() {
        assert!(matches!(open_at(c"/nonexistent/kvm"), Err(Error::KvmMissing)));
    }

    #[test]
    fn other_open_failures_keep_the_os_error() {
        // Opening a directory read-write fails with EISDIR.
        let err = open_at(c"/").unwrap_err();
        assert!(matches!(err, Error::KvmOpen(_)), "{err}");
        assert!(err.to_string().contains("/dev/kvm"));
    }
}
