//! Saving and restoring the KVM state of vCPUs and of the VM, as the
//! snapshot probe (`vmm/tests/snapshot_probe.rs`, `docs/snapshots-probe.md`)
//! established works on the test bed.
//!
//! A vCPU is saved on its own thread while it is paused (after a KVM_RUN with
//! `immediate_exit`, so that a pending port or MMIO access is complete):
//! mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, the MSRs, the CPUID
//! it was given, the TSC frequency, and the vCPU events last (as QEMU does:
//! other GETs may change what is pending). It is restored into a vCPU that
//! has never run, in Firecracker's order: CPUID, mp_state, regs, sregs,
//! xsave, xcrs, debugregs, lapic (after sregs for the APIC base, before the
//! MSRs for the TSC deadline), MSRs, vcpu_events (last: SET_REGS clears
//! pending exceptions), then the TSC frequency. The VM-wide state (PIC master
//! and slave, IOAPIC, PIT, kvmclock) is restored after every vCPU.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

use crate::error::{kvm, Error, Result};

/// MSRs that KVM_GET_MSR_INDEX_LIST may leave out but a snapshot needs (the
/// probe read and wrote all of them): APIC base, MTRRdefType, the first
/// variable MTRR pair, two fixed MTRRs, TSC_AUX, SPEC_CTRL.
pub const UNLISTED_MSRS: [u32; 8] = [0x1b, 0x2ff, 0x200, 0x201, 0x250, 0x258, 0xc000_0103, 0x48];

/// Words in the legacy 4 KiB XSAVE area (`kvm_xsave.region`).
const XSAVE_REGION_WORDS: usize = 1024;

/// What a snapshot saves of one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index.
    pub id: u8,
    /// The CPUID it was given (restored as it is, so the guest sees the same CPU).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The XSAVE area as 32-bit words: the legacy 4 KiB region, then what
    /// KVM_GET_XSAVE2 returns beyond it on hosts that have more.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every readable MSR KVM lists, plus [`UNLISTED_MSRS`].
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// What a snapshot saves of the VM besides its vCPUs and devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit2: kvm_pit_state2,
    /// kvmclock, with the flags KVM_GET_CLOCK returned.
    pub clock: kvm_clock_data,
}

/// The MSR indices to save: what KVM lists, plus [`UNLISTED_MSRS`]. Read on
/// the thread that creates the VM (a /dev/kvm ioctl), before any filter.
pub fn msrs_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>> {
    let list = kvm_fd.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices = list.as_slice().to_vec();
    for index in UNLISTED_MSRS {
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    indices.truncate(KVM_MAX_MSR_ENTRIES);
    Ok(indices)
}

/// The size KVM_GET_XSAVE2 needs on this host (0 when it lacks the
/// capability, in which case KVM_GET_XSAVE's 4 KiB are the whole state).
pub fn xsave_size(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0)
}

/// Reads the MSRs in `indices` that this vCPU can read. KVM_GET_MSRS stops
/// at the first MSR it cannot read; that one is skipped and the rest read on.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::KvmCapability("room for the saved MSRs"))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(rest.len())]);
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Reads the XSAVE area (see [`VcpuState::xsave`]).
fn get_xsave(fd: &VcpuFd, xsave_size: usize) -> Result<Vec<u32>> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    if xsave_size <= legacy {
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let extra_words = (xsave_size - legacy).div_ceil(std::mem::size_of::<<kvm_xsave2 as FamStruct>::Entry>());
    let mut xsave = Xsave::new(extra_words).map_err(|_| Error::KvmCapability("room for the XSAVE area"))?;
    // SAFETY: `xsave` has room for the size KVM_CAP_XSAVE2 reported.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Writes the XSAVE area back.
fn set_xsave(fd: &VcpuFd, words: &[u32]) -> Result<()> {
    let (region, extra) = words.split_at(words.len().min(XSAVE_REGION_WORDS));
    if region.len() != XSAVE_REGION_WORDS {
        return Err(Error::SnapshotCorrupt { reason: format!("XSAVE area of {} words", words.len()) });
    }
    if extra.is_empty() {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(region);
        // SAFETY: a legacy-sized area, as KVM_GET_XSAVE returned it on the
        // saving host; KVM_SET_XSAVE reads only that much.
        return unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::from_entries(extra).map_err(|_| Error::KvmCapability("room for the XSAVE area"))?;
    // SAFETY: only the fixed-size header of the FAM struct is touched.
    unsafe { xsave.as_mut_fam_struct() }.xsave.region.copy_from_slice(region);
    // SAFETY: the area is as large as KVM_GET_XSAVE2 returned it on the
    // saving host; KVM reads what this host's XSAVE size covers.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))
}

/// Saves a paused vCPU's state (on its own thread).
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32], xsave_size: usize) -> Result<VcpuState> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = get_xsave(fd, xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?.as_slice().to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    let msrs = get_msrs(fd, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { id, cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, vcpu_events, tsc_khz })
}

/// Restores `state` into a vCPU that has never run.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| Error::SnapshotCorrupt { reason: format!("{} CPUID entries", state.cpuid.len()) })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    set_xsave(fd, &state.xsave)?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs)
        .map_err(|_| Error::SnapshotCorrupt { reason: format!("{} MSRs", state.msrs.len()) })?;
    let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if let Some(refused) = state.msrs.get(written) {
        return Err(Error::KvmMsr(refused.index));
    }
    fd.set_vcpu_events(&state.vcpu_events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    if let Some(khz) = state.tsc_khz {
        // Same frequency as the saving host: KVM accepts it. On another
        // host a different rate is refused, and the guest keeps this one's.
        if let Err(e) = fd.set_tsc_khz(khz) {
            tracing::warn!(
                "vcpu{}: KVM_SET_TSC_KHZ({khz}) refused: {e}; the guest keeps this host's TSC rate",
                state.id
            );
        }
    }
    Ok(())
}

/// Saves the VM-wide state while every vCPU is paused.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let pit2 = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(VmKvmState { irqchips, pit2, clock })
}

/// Restores the VM-wide state, after every vCPU. kvmclock resumes at the
/// saved value (flags 0, not KVM_CLOCK_REALTIME): the guest sees no time
/// pass while the snapshot was on disk. With KVM_CLOCK_REALTIME, KVM would
/// advance the clock by the wall time since the save, and the guest kernel
/// would see every CPU silent for that long at once: a real guest restored
/// a minute after its snapshot answered after seconds instead of a quarter
/// of a second, and one restored after two and a half minutes was stuck in
/// RCU stall reports on its emulated console. The guest's wall clock is to
/// be set by whoever hands the restored VM out.
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<()> {
    vm.set_pit2(&state.pit2).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data { flags: 0, ..state.clock };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
