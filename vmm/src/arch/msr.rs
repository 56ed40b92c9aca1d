//! Model-specific registers every vCPU starts with: the system-call MSRs
//! cleared, the TSC at zero, fast strings on, and MTRRs enabled with
//! write-back as the default memory type (there are no variable ranges).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::error::{kvm, Error, Result};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// The boot MSRs as (index, value).
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
];

fn entries() -> Vec<kvm_msr_entry> {
    BOOT_MSRS.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect()
}

/// Writes [`BOOT_MSRS`]; fails naming the first MSR KVM refused.
pub fn setup(vcpu: &VcpuFd) -> Result<()> {
    let entries = entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::KvmCapability("room for the boot MSRs"))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    match entries.get(written) {
        None => Ok(()),
        Some(refused) => Err(Error::KvmMsr(refused.index)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_distinct_and_enable_write_back_mtrrs() {
        let mut indices: Vec<u32> = BOOT_MSRS.iter().map(|m| m.0).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), BOOT_MSRS.len());
        let def_type = BOOT_MSRS.iter().find(|m| m.0 == 0x2ff).map(|m| m.1);
        assert_eq!(def_type, Some(0x806));
        assert_eq!(entries().len(), BOOT_MSRS.len());
    }
}
