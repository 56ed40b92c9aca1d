//! The guest kernel command line: the arguments every sandbox guest needs, and
//! the composition of the caller's command line with the device arguments the
//! VMM adds itself.

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::error::{Error, Result};
use crate::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_SIZE};

/// Kernel arguments for a fast, quiet boot under KVM, including on hosts where
/// KVM emulates guest kernel code instruction by instruction. Callers add the
/// root device and init (`root=/dev/vda ro rootfstype=erofs init=/init`).
pub const BASE_ARGS: &[&str] = &[
    // Kernel messages on the 16550 UART at 0x3f8, the VMM's serial console.
    "console=ttyS0",
    // Only warnings and errors: every byte on the console is a VM exit.
    "quiet",
    // Reboot through the i8042 (0xfe to port 0x64); the VMM treats that as
    // power-off, since without ACPI a power-off only halts the CPUs.
    "reboot=k",
    // Trust the TSC: no clocksource watchdog comparing it with kvm-clock
    // twice a second. That timer was most of what woke an idle guest (5.7
    // local timer interrupts a second without this, 2.4 with it). The
    // clocksource stays kvm-clock.
    "tsc=reliable",
    // Reboot (and so stop the VM) at once on a kernel panic instead of hanging.
    "panic=-1",
    // Skip marking kernel data read-only: about a second of page-table work
    // when kernel code is emulated.
    "rodata=off",
    // Do not use XSAVE/XRSTOR (and so none of the AVX family), which KVM's
    // instruction emulator cannot execute.
    "noxsave",
    // Hide instructions the emulator cannot execute (popcnt, cmpxchg16b, ...),
    // SMAP (the emulator fails on `clac`), and ERMS/FSRM/FSRS so that memcpy
    // and memset do not use `rep movsb`, which is emulated byte by byte.
    // 395 is X86_FEATURE_FSRS, which has no name. The kernel reads at most 128
    // bytes of this value.
    "clearcpuid=popcnt,cx16,fsgsbase,movbe,rdrand,rdseed,smap,smep,pcid,invpcid,serialize,rdpid,abm,bmi1,bmi2,erms,fsrm,395",
    // Per-CPU areas in 4 KiB pages instead of one 2 MiB block per CPU,
    // which the kernel sets up and partly frees again: where kernel code is
    // emulated, that step of the boot took 0.4 s instead of 1.9 s.
    "percpu_alloc=page",
    // Do not create /sys/module/<built-in>/parameters (kernel-config patch
    // 0004): about a second at boot.
    "no_builtin_param_sysfs",
    // 32 KiB vsock receive buffers instead of 4 KiB (kernel-config patch
    // 0005): each buffer costs the guest kernel an skb to allocate, queue and
    // free, and where that code is emulated this set host-to-guest throughput.
    "vmw_vsock_virtio_transport.rx_buf_size=32768",
];

/// [`BASE_ARGS`] as one space-separated string.
pub fn base_args() -> String {
    BASE_ARGS.join(" ")
}

/// A virtio-mmio device the kernel must be told about: its window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceArgs {
    /// Guest-physical base of the device's register window.
    pub base: GuestAddress,
    /// The device's interrupt line.
    pub irq: u32,
}

/// The caller's command line plus `virtio_mmio.device=<size>@<addr>:<irq>` for
/// each device, in device order (so the first block device is `/dev/vda`).
/// Device arguments go before any `--`, after which arguments belong to init.
pub fn compose(user: &str, devices: &[MmioDeviceArgs]) -> Result<Cmdline> {
    // Printable ASCII only: the kernel has no use for anything else, and a
    // NUL would cut the line short.
    if !user.chars().all(|c| matches!(c, ' '..='~')) {
        return Err(Error::Cmdline(linux_loader::cmdline::Error::InvalidAscii));
    }
    let mut cmdline = Cmdline::try_from(user, CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    for device in devices {
        cmdline.add_virtio_mmio_device(VIRTIO_MMIO_SIZE, device.base, device.irq, None).map_err(Error::Cmdline)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(cmdline: &Cmdline) -> String {
        cmdline.as_cstring().unwrap().into_string().unwrap()
    }

    const TWO_DISKS: [MmioDeviceArgs; 2] = [
        MmioDeviceArgs { base: GuestAddress(0xd000_0000), irq: 5 },
        MmioDeviceArgs { base: GuestAddress(0xd000_1000), irq: 6 },
    ];

    #[test]
    fn base_args_are_the_documented_list_and_fit_the_kernel_limits() {
        let args = base_args();
        assert_eq!(args.split(' ').count(), BASE_ARGS.len());
        assert!(args.starts_with("console=ttyS0 "));
        assert!(args.contains(" reboot=k "));
        let clear = BASE_ARGS.iter().find_map(|a| a.strip_prefix("clearcpuid=")).unwrap();
        assert!(clear.len() < 128, "the kernel truncates clearcpuid= at 128 bytes");
        assert!(clear.split(',').any(|f| f == "smap"));
        compose(&args, &[]).unwrap();
    }

    #[test]
    fn devices_are_appended_in_order() {
        let cmdline = compose("console=ttyS0 root=/dev/vda", &TWO_DISKS).unwrap();
        assert_eq!(
            text(&cmdline),
            "console=ttyS0 root=/dev/vda virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn devices_go_before_init_arguments() {
        let cmdline = compose("quiet init=/init -- --flag value", &TWO_DISKS[..1]).unwrap();
        assert_eq!(text(&cmdline), "quiet init=/init virtio_mmio.device=4K@0xd0000000:5 -- --flag value");
    }

    #[test]
    fn over_long_command_lines_are_rejected() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(compose(&long, &[]), Err(Error::Cmdline(_))));
        // Fits alone, but not with the device arguments added.
        let almost = "a".repeat(CMDLINE_MAX_SIZE - 20);
        compose(&almost, &[]).unwrap();
        assert!(matches!(compose(&almost, &TWO_DISKS), Err(Error::Cmdline(_))));
    }

    #[test]
    fn invalid_characters_are_rejected() {
        for bad in ["console=ttyS0\nroot=/dev/vda", "init=/init\0x", "name=caf\u{e9}"] {
            assert!(matches!(compose(bad, &[]), Err(Error::Cmdline(_))), "{bad:?}");
        }
    }
}
