//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `memory_mib` is outside the supported range.
    #[error("guest memory must be between {min} and {max} MiB, got {got} MiB")]
    MemorySize {
        /// Requested size.
        got: u32,
        /// Smallest supported size.
        min: u32,
        /// Largest supported size.
        max: u32,
    },
    /// `memory_mib` is larger than the host's physical memory.
    #[error("guest memory of {got} MiB is more than this host's {host} MiB of RAM")]
    MemoryExceedsHost {
        /// Requested size.
        got: u32,
        /// Host RAM.
        host: u64,
    },
    /// `vcpus` is outside the supported range.
    #[error("vCPU count must be between 1 and {max}, got {got}")]
    VcpuCount {
        /// Requested count.
        got: u8,
        /// Largest supported count.
        max: u8,
    },
    /// A file named in the configuration cannot be used.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// Which file ("kernel", "root disk image", ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A disk image is smaller than one sector.
    #[error("{what} {} is empty (smaller than one 512-byte sector)", path.display())]
    EmptyDisk {
        /// Which disk.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this machine offers no KVM (enable virtualization or load the kvm module)")]
    KvmMissing,
    /// `/dev/kvm` exists but cannot be opened by this user.
    #[error("permission denied opening /dev/kvm: run as root or add this user to the group owning /dev/kvm")]
    KvmPermission,
    /// `/dev/kvm` cannot be opened for another reason.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The host KVM lacks something this VMM needs.
    #[error("KVM on this host lacks {0}")]
    KvmCapability(&'static str),
    /// KVM refused to set a boot MSR.
    #[error("KVM refused to set MSR {0:#x}")]
    KvmMsr(u32),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl or operation.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    GuestMemoryAlloc(#[source] vm_memory::mmap::FromRangesError),
    /// A boot structure could not be written into guest memory.
    #[error("cannot write the {what} into guest memory: {source}")]
    GuestMemoryWrite {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel image could not be loaded.
    #[error("cannot load kernel {}: {source}", path.display())]
    KernelLoad {
        /// The kernel image.
        path: PathBuf,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// The kernel ELF has no PVH entry point note.
    #[error("kernel {} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y", path.display())]
    NoPvhEntry {
        /// The kernel image.
        path: PathBuf,
    },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written into guest memory.
    #[error("cannot write the kernel command line into guest memory: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The PVH boot information could not be written.
    #[error("cannot write the PVH boot information: {0}")]
    BootConfig(#[source] linux_loader::configurator::Error),
    /// More devices than interrupt lines.
    #[error("no interrupt line left for another virtio device")]
    TooManyDevices,
    /// A vCPU stopped because KVM could not emulate an instruction.
    #[error("vCPU {vcpu}: KVM internal error {suberror} (1 = instruction emulation failure), data (hex) {data:x?}; {registers}")]
    EmulationFailure {
        /// The vCPU.
        vcpu: u8,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// `kvm_run.internal.data`.
        data: Vec<u64>,
        /// Register dump and the bytes at RIP.
        registers: String,
    },
    /// KVM failed to enter the guest.
    #[error("vCPU {vcpu}: KVM could not enter the guest (hardware reason {reason:#x}); {registers}")]
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// Register dump.
        registers: String,
    },
    /// A vCPU exited for a reason this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}; {registers}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u8,
        /// The exit, as debug text.
        exit: String,
        /// Register dump.
        registers: String,
    },
    /// KVM_RUN itself failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    VcpuRun {
        /// The vCPU.
        vcpu: u8,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {0} thread panicked")]
    VcpuPanic(u8),
    /// An operating-system resource (eventfd, thread, epoll) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A thread could not install its seccomp filter.
    #[error("installing the seccomp filter of the {thread} thread: {source}")]
    Seccomp {
        /// Which thread ("vCPU 0", "event loop").
        thread: String,
        /// The error.
        source: seccompiler::Error,
    },
    /// The device event loop failed.
    #[error("device event loop: {0}")]
    EventLoop(#[source] event_manager::Error),
    /// The VM a controller belongs to is not running (it has ended, or it
    /// ended while the request was being served).
    #[error("the VM is not running")]
    VmNotRunning,
    /// Another snapshot of the same VM is under way.
    #[error("a snapshot of this VM is already being taken")]
    SnapshotBusy,
    /// A file is not a snapshot state file of this VMM (wrong magic).
    #[error("{} is not a sandbox VM snapshot (no snapshot header)", path.display())]
    SnapshotForeign {
        /// The file.
        path: PathBuf,
    },
    /// A snapshot written in a format version this VMM does not read.
    #[error("snapshot {} has format version {found}; this VMM reads version {supported}", path.display())]
    SnapshotVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A snapshot file is shorter than its header says.
    #[error("snapshot {} is truncated: {got} bytes, expected {expected}", path.display())]
    SnapshotTruncated {
        /// The file.
        path: PathBuf,
        /// Its expected length.
        expected: u64,
        /// Its actual length.
        got: u64,
    },
    /// A snapshot state file's checksum does not match its content.
    #[error("snapshot {} is corrupt: its SHA-256 checksum does not match its content", path.display())]
    SnapshotChecksum {
        /// The file.
        path: PathBuf,
    },
    /// A snapshot's content cannot be decoded or used although its checksum
    /// matched (written by a faulty or hostile writer).
    #[error("snapshot is invalid: {reason}")]
    SnapshotCorrupt {
        /// What is wrong.
        reason: String,
    },
    /// A snapshot does not fit the VM it is restored into (memory size,
    /// vCPU count, devices, kernel or disk digests, VMM version).
    #[error("snapshot does not match this VM: {what} is {snapshot} in the snapshot but {current} here")]
    SnapshotMismatch {
        /// What differs.
        what: String,
        /// Its value in the snapshot.
        snapshot: String,
        /// Its value for this VM.
        current: String,
    },
    /// A device's saved state cannot be restored.
    #[error("cannot restore the state of {device}: {reason}")]
    DeviceRestore {
        /// The device ("virtio-mmio device 2", "serial").
        device: String,
        /// Why.
        reason: String,
    },
}

/// Shorthand for results with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a mapper from a KVM error to [`Error::Kvm`] naming the operation.
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Builds a mapper from an I/O error to [`Error::Io`] naming the operation.
pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}
