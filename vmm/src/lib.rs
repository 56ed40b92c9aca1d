//! A KVM virtual machine monitor for sandbox guests.
//!
//! It boots an uncompressed Linux `vmlinux` through its PVH entry point on
//! 1..N vCPUs, with exactly these devices: a 16550 serial console routed to a
//! host sink, the i8042 reset line (the guest's way to power off), and
//! virtio-mmio block devices for a read-only root image and optional further
//! disks (read-only images, writable scratch), and an optional virtio-vsock device whose host end
//! is Unix sockets. There is no network device.
//!
//! ```no_run
//! # fn main() -> Result<(), vmm::Error> {
//! let config = vmm::VmConfig {
//!     kernel: "vmlinux".into(),
//!     cmdline: format!("{} root=/dev/vda ro rootfstype=erofs init=/init", vmm::cmdline::base_args()),
//!     memory_mib: 128,
//!     vcpus: 1,
//!     root_disk: "root.erofs".into(),
//!     extra_disks: Vec::new(),
//!     vsock: None,
//!     serial: Box::new(std::io::stdout()),
//!     seccomp: Default::default(),
//! };
//! let vm = vmm::Vm::create(config)?;
//! let stop = vm.stop_handle(); // may be moved to another thread
//! let reason = vm.run()?;
//! # drop(stop); let _ = reason;
//! # Ok(())
//! # }
//! ```
//!
//! A running VM can be snapshotted through its [`VmController`] and
//! restored with [`Vm::restore`]; see [`snapshot`].
//!
//! Layout: [`layout`] is the guest address map; `arch` sets up x86 CPU
//! state and boot structures; `vstate` holds KVM VM and vCPU handling;
//! [`devices`] holds the devices, one directory per virtio device type.

mod arch;
pub mod cmdline;
mod config;
pub mod devices;
mod error;
pub mod layout;
pub mod snapshot;
mod vm;
mod vstate;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use config::{ExtraDisk, ThreadFilters, VmConfig, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
pub use devices::virtio::vsock::VsockConfig;
pub use error::{Error, Result};
pub use snapshot::{AfterSnapshot, Digests, SnapshotFiles, SnapshotInfo, VmController};
pub use vm::Vm;
pub use vstate::exit::{ExitReason, StopHandle};

/// Locks a mutex, carrying on with the data if another thread panicked while
/// holding it (device state stays usable; a panic is reported elsewhere).
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// Compile-time checks: a VM can be created on one thread and run on another,
// and stop handles are shared between threads.
const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send::<Vm>();
    send::<VmConfig>();
    send_sync::<Error>();
    send_sync::<StopHandle>();
    send_sync::<VmController>();
};
