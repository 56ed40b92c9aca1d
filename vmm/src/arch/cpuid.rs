//! The CPUID a vCPU sees: what KVM supports on this host
//! (KVM_GET_SUPPORTED_CPUID), plus the TSC-deadline timer that KVM emulates
//! but reports only as a capability, with the per-vCPU topology filled in and
//! the KVM hypervisor leaves present, so the guest finds kvm-clock and the
//! other paravirtual features.
//!
//! The invariant-TSC bit is hidden, as in QEMU's default CPU models. With it,
//! Linux prefers the TSC to kvm-clock and switches clocksource during boot
//! (a stop_machine) and then runs the clocksource watchdog; without it the
//! guest keeps kvm-clock, itself TSC-based. Boots measured about 10% faster
//! this way where guest kernel code is emulated.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::error::{kvm, Result};

/// Leaf 1: family/model, APIC ID, feature flags.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: deterministic cache parameters (Intel).
const LEAF_CACHE: u32 = 0x4;
/// Leaf 0xb: extended topology.
const LEAF_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1f: V2 extended topology.
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0007: advanced power management, including the invariant TSC.
const LEAF_POWER_MANAGEMENT: u32 = 0x8000_0007;
/// KVM's signature leaf.
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_INVARIANT_TSC: u32 = 1 << 8;
const EDX_HTT: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// The host's supported CPUID, including KVM's hypervisor leaves.
pub fn supported(kvm_fd: &Kvm) -> Result<CpuId> {
    let mut cpuid = kvm_fd.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm_fd.check_extension(Cap::TscDeadlineTimer) {
        set_tsc_deadline(cpuid.as_mut_slice());
    }
    Ok(cpuid)
}

/// Announces the TSC-deadline mode of the local APIC timer.
fn set_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Number of APIC-ID bits needed to number `count` processors.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1) - 1).checked_ilog2().map_or(0, |log| log + 1)
}

/// Adjusts `entries` for vCPU `id` of `count` (one socket, one thread per core).
pub fn adjust_for_vcpu(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    let id32 = u32::from(id);
    let count32 = u32::from(count);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0xffff) | (id32 << 24) | (count32 << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing
                // this cache - 1 (only the last level is shared between cores).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = id32;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = count32;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_POWER_MANAGEMENT => entry.edx &= !EDX_INVARIANT_TSC,
            LEAF_KVM_SIGNATURE => {
                entry.eax = entry.eax.max(LEAF_KVM_FEATURES);
                [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
}

/// The CPUID for vCPU `id` of `count`, from the host's supported CPUID.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    adjust_for_vcpu(cpuid.as_mut_slice(), id, count);
    cpuid
}

/// Whether `cpuid` has KVM's signature and feature leaves.
pub fn has_kvm_leaves(cpuid: &CpuId) -> bool {
    let has = |function| cpuid.as_slice().iter().any(|e| e.function == function);
    has(LEAF_KVM_SIGNATURE) && has(LEAF_KVM_FEATURES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn signature_spells_kvm() {
        let bytes: Vec<u8> = KVM_SIGNATURE.iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn id_bits_rounds_up_to_a_power_of_two() {
        let got: Vec<u32> = [1u8, 2, 3, 4, 5, 8, 9, 32].iter().map(|&c| id_bits(c)).collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4, 5]);
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let mut entries = [kvm_cpuid_entry2 { function: LEAF_FEATURES, ebx: 0xaabb_0800, ..Default::default() }];
        adjust_for_vcpu(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx, 0x0304_0800);
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & EDX_HTT, 0);
        adjust_for_vcpu(&mut entries, 0, 1);
        assert_eq!(entries[0].ebx, 0x0001_0800);
        assert_eq!(entries[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_is_set_in_leaf_1_only() {
        let mut entries = [entry(LEAF_FEATURES, 0), entry(0x7, 0)];
        set_tsc_deadline(&mut entries);
        assert_eq!(entries[0].ecx, ECX_TSC_DEADLINE);
        assert_eq!(entries[1].ecx, 0);
    }

    #[test]
    fn topology_leaf_describes_one_socket_of_single_thread_cores() {
        let mut entries = [entry(LEAF_TOPOLOGY, 0), entry(LEAF_TOPOLOGY, 1), entry(LEAF_TOPOLOGY, 2)];
        adjust_for_vcpu(&mut entries, 2, 3);
        assert!(entries.iter().all(|e| e.edx == 2));
        assert_eq!((entries[0].eax, entries[0].ebx, entries[0].ecx), (0, 1, 0x100));
        assert_eq!((entries[1].eax, entries[1].ebx, entries[1].ecx), (2, 3, 0x201));
        assert_eq!((entries[2].eax, entries[2].ebx, entries[2].ecx), (0, 0, 2));
    }

    #[test]
    fn cache_leaf_shares_only_the_last_level() {
        let l1 = kvm_cpuid_entry2 { function: LEAF_CACHE, eax: (1 << 5) | 0x1 | (7 << 26), ..Default::default() };
        let l3 = kvm_cpuid_entry2 {
            function: LEAF_CACHE,
            index: 3,
            eax: (3 << 5) | 0x3 | (0xfff << 14),
            ..Default::default()
        };
        let mut entries = [l1, l3];
        adjust_for_vcpu(&mut entries, 0, 2);
        assert_eq!(entries[0].eax, (1 << 5) | 0x1 | (1 << 26));
        assert_eq!(entries[1].eax, (3 << 5) | 0x3 | (1 << 14) | (1 << 26));
    }

    #[test]
    fn invariant_tsc_is_hidden() {
        let mut entries =
            [kvm_cpuid_entry2 { function: LEAF_POWER_MANAGEMENT, edx: EDX_INVARIANT_TSC | 0x1, ..Default::default() }];
        adjust_for_vcpu(&mut entries, 0, 1);
        assert_eq!(entries[0].edx, 0x1);
    }

    #[test]
    fn kvm_signature_leaf_is_filled_in() {
        let mut entries = [entry(LEAF_KVM_SIGNATURE, 0)];
        adjust_for_vcpu(&mut entries, 0, 1);
        assert_eq!(entries[0].eax, LEAF_KVM_FEATURES);
        assert_eq!([entries[0].ebx, entries[0].ecx, entries[0].edx], KVM_SIGNATURE);
    }

    #[test]
    fn other_leaves_are_untouched() {
        let original = kvm_cpuid_entry2 { function: 0x7, ebx: 0x1234, ecx: 0x5678, ..Default::default() };
        let mut entries = [original];
        adjust_for_vcpu(&mut entries, 1, 2);
        assert_eq!(entries[0], original);
    }

    #[test]
    fn for_vcpu_adjusts_a_copy_and_detects_kvm_leaves() {
        let base =
            CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(LEAF_KVM_SIGNATURE, 0), entry(LEAF_KVM_FEATURES, 0)])
                .unwrap();
        let mine = for_vcpu(&base, 1, 2);
        assert_eq!(mine.as_slice()[0].ebx >> 24, 1);
        assert_eq!(base.as_slice()[0].ebx, 0);
        assert!(has_kvm_leaves(&mine));
        let without = CpuId::from_entries(&[entry(LEAF_FEATURES, 0)]).unwrap();
        assert!(!has_kvm_leaves(&without));
    }
}
