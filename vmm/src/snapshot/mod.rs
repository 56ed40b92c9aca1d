//! VM snapshots: pause a running VM, save its state and memory, and restore
//! them into a new VM ([`crate::Vm::restore`]).
//!
//! A snapshot is two files ([`SnapshotFiles`]):
//! - the **state file** ([`format`]): a versioned header ([`SnapshotHeader`]:
//!   VMM version and build, memory size, vCPU count, kernel and disk
//!   digests) and a checksummed payload with every vCPU's KVM state, the
//!   VM's interrupt controllers, PIT and clock, and every device's state;
//! - the **memory file**: guest RAM, its regions one after the other, as a
//!   sparse file (pages that are all zero are holes). A restore maps it
//!   `MAP_PRIVATE`: the guest's writes stay in the restoring process, and
//!   every VM restored from one file shares its unmodified pages through the
//!   page cache.
//!
//! [`VmController::snapshot`] asks a running [`crate::Vm::run`] loop to take
//! one: the loop pauses every vCPU (each saves its own registers on its
//! thread), saves the VM and device state between two device events, writes
//! both files and then resumes or stops the VM, as the caller chose.

pub mod format;

/// Saving and restoring KVM state, usable on bare KVM file descriptors
/// (the snapshot probe, `vmm/tests/snapshot_probe.rs`, drives its VMs
/// with these).
pub mod kvm {
    pub use crate::vstate::state::{
        msrs_to_save, restore_vcpu, restore_vm, save_vcpu, save_vm, xsave_size, VcpuState, VmKvmState, UNLISTED_MSRS,
    };
}

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::mmio::MmioSnapshot;
use crate::error::{io, Error, Result};
use crate::lock;
use crate::vstate::state::{VcpuState, VmKvmState};

pub use format::FORMAT_VERSION;

/// This VMM's version, recorded in every snapshot; a restore refuses a
/// snapshot written by another version.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What identifies this build beyond its version: `SANDBOX_BUILD_ID` at
/// compile time (a packager sets it, e.g. to the commit), else "dev".
/// Recorded for diagnostics; the format version and [`VMM_VERSION`] decide
/// compatibility.
pub const VMM_BUILD: &str = match option_env!("SANDBOX_BUILD_ID") {
    Some(id) => id,
    None => "dev",
};

/// Where a snapshot's two files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state file (header, KVM and device state).
    pub state: PathBuf,
    /// The guest memory file.
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// `vm.state` and `vm.mem` in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self { state: dir.join("vm.state"), memory: dir.join("vm.mem") }
    }
}

/// What the VM does once its snapshot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Run on, as if nothing happened (the guest lost only the pause).
    Resume,
    /// Stop: [`crate::Vm::run`] returns [`crate::ExitReason::StopRequested`].
    Stop,
}

/// SHA-256 digests (lower-case hex) of the files a VM was built from. The
/// caller computes them (see [`sha256_file`]) and they are recorded in the
/// snapshot; on restore, a digest given on both sides must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    /// The kernel image.
    pub kernel: Option<String>,
    /// The disks in attachment order: the root disk first.
    pub disks: Vec<Option<String>>,
}

/// The header of a state file, readable without the payload ([`read_header`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// [`VMM_VERSION`] of the VMM that wrote it.
    pub vmm_version: String,
    /// [`VMM_BUILD`] of the VMM that wrote it.
    pub vmm_build: String,
    /// When it was written (seconds since the Unix epoch).
    pub created_unix: u64,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Size the memory file must have.
    pub memory_file_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Digests of the kernel and disks the VM was built from.
    pub digests: Digests,
}

/// What a snapshot saves of a virtio device beyond its transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    /// A block device: its size and mode must match the disk it is restored onto.
    Block {
        /// Capacity in 512-byte sectors.
        sectors: u64,
        /// Attached read-only.
        read_only: bool,
    },
    /// The vsock device. Its connections are not saved: on restore the
    /// guest is told to reset them.
    Vsock {
        /// The guest's CID when the snapshot was taken.
        guest_cid: u32,
        /// The host port of the next host-initiated connection: a restored
        /// VMM goes on from there, so that no new connection reuses the
        /// port of one the guest may not have closed yet.
        next_host_port: u32,
    },
}

impl DeviceSnapshot {
    /// The device's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSnapshot::Block { .. } => "block",
            DeviceSnapshot::Vsock { .. } => "vsock",
        }
    }
}

/// A virtio device and its transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// The device-specific part.
    pub device: DeviceSnapshot,
    /// The transport, with the queues.
    pub transport: MmioSnapshot,
}

/// The payload of a state file. (The i8042 has no state: it only forwards
/// the guest's reset command.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmKvmState,
    /// The serial console.
    pub serial: SerialSnapshot,
    /// The virtio devices, in window order.
    pub virtio: Vec<VirtioSnapshot>,
}

/// What a snapshot produced, and how long the guest was paused for it.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    /// The files written.
    pub files: SnapshotFiles,
    /// The header written.
    pub header: SnapshotHeader,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Size of the memory file (the guest's memory size).
    pub memory_bytes: u64,
    /// Bytes of memory actually written (pages that are not all zero).
    pub memory_written_bytes: u64,
    /// From the request until every vCPU was paused.
    pub pause_took: Duration,
    /// How long the vCPUs stayed paused (saving, writing both files).
    pub paused_for: Duration,
}

/// Reads the header of a state file (checking magic, version, size and
/// checksum, but not decoding the state).
pub fn read_header(path: &Path) -> Result<SnapshotHeader> {
    Ok(format::read::<SnapshotHeader, VmState>(path, false)?.header)
}

/// Checks and decodes the bytes of a state file, header and state (the
/// parser [`crate::Vm::restore`] uses; never panics, whatever the bytes).
pub fn decode_state(bytes: &[u8]) -> Result<(SnapshotHeader, VmState)> {
    let decoded = format::decode::<SnapshotHeader, VmState>(bytes, Path::new("(bytes)"), true)?;
    match decoded.payload {
        Some(state) => Ok((decoded.header, state)),
        None => Err(Error::SnapshotCorrupt { reason: "no state".into() }),
    }
}

/// Reads a whole state file.
pub(crate) fn read_state(path: &Path) -> Result<(SnapshotHeader, VmState)> {
    let decoded = format::read::<SnapshotHeader, VmState>(path, true)?;
    match decoded.payload {
        Some(state) => Ok((decoded.header, state)),
        None => Err(Error::SnapshotCorrupt { reason: "no state".into() }),
    }
}

/// The SHA-256 of a file, in lower-case hex (for [`Digests`]).
pub fn sha256_file(path: &Path) -> Result<String> {
    let file_error = |source| Error::File { what: "file to digest", path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(file_error)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(file_error)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Size of the pages compared against zero when memory is written.
const PAGE: usize = 4096;

/// Writes guest memory into `file` (already sized to the memory's length)
/// at consecutive offsets, region after region, skipping pages that are all
/// zero (they stay holes). Returns the bytes written.
pub(crate) fn write_memory(mem: &GuestMemoryMmap, file: &File) -> Result<u64> {
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len())
            .map_err(|_| Error::SnapshotCorrupt { reason: "a memory region larger than the address space".into() })?;
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`, and every vCPU is paused, so nothing writes it meanwhile.
        // It is only read here.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let mut at = 0;
        while at < len {
            // Skip zero pages, then write the run of pages that follows.
            while at < len && is_zero(&bytes[at..(at + PAGE).min(len)]) {
                at = (at + PAGE).min(len);
            }
            let start = at;
            while at < len && !is_zero(&bytes[at..(at + PAGE).min(len)]) {
                at = (at + PAGE).min(len);
            }
            if at > start {
                file.write_all_at(&bytes[start..at], offset + start as u64)
                    .map_err(io("writing the snapshot memory file"))?;
                written += (at - start) as u64;
            }
        }
        offset += len as u64;
    }
    Ok(written)
}

/// Whether `bytes` are all zero, compared 16 bytes at a time.
fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128; align_to only reinterprets
    // the aligned middle of the slice.
    let (head, words, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The files of a snapshot being taken, opened by the caller.
#[derive(Debug)]
pub(crate) struct Request {
    pub files: SnapshotFiles,
    pub state: File,
    pub memory: File,
    pub then: AfterSnapshot,
    pub digests: Digests,
    pub reply: mpsc::SyncSender<Result<SnapshotInfo>>,
}

/// Shared between a VM's run loop and its controllers.
#[derive(Debug)]
pub(crate) struct ControlShared {
    request: Mutex<Option<Request>>,
    event: EventFd,
    memory_bytes: u64,
    /// The memory file this VM's RAM is mapped from (device, inode), if it
    /// was restored: a snapshot must not be written over it.
    source_memory: Mutex<Option<(u64, u64)>>,
}

impl ControlShared {
    pub(crate) fn new(memory_bytes: u64) -> Result<Self> {
        Ok(Self {
            request: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK).map_err(io("creating the control eventfd"))?,
            memory_bytes,
            source_memory: Mutex::new(None),
        })
    }

    /// Records the memory file a restored VM's RAM is mapped from.
    pub(crate) fn set_source_memory(&self, file: &File) -> Result<()> {
        let meta = file.metadata().map_err(io("reading the snapshot memory file's metadata"))?;
        *lock(&self.source_memory) = Some((meta.dev(), meta.ino()));
        Ok(())
    }

    /// The pending request, if any (for the run loop).
    pub(crate) fn take(&self) -> Option<Request> {
        lock(&self.request).take()
    }
}

/// Wakes the event loop when a controller has placed a request.
#[derive(Debug)]
pub(crate) struct ControlSubscriber(pub Arc<ControlShared>);

impl MutEventSubscriber for ControlSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            warn!("cannot poll the VM control eventfd: {e}; snapshots will wait for another device event");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event.read();
    }
}

/// Controls a VM from any thread: takes snapshots of it while
/// [`crate::Vm::run`] runs it. Cloneable; does nothing useful once the VM
/// has ended ([`Error::VmNotRunning`]).
#[derive(Clone, Debug)]
pub struct VmController(Weak<ControlShared>);

impl VmController {
    pub(crate) fn new(shared: &Arc<ControlShared>) -> Self {
        Self(Arc::downgrade(shared))
    }

    /// Pauses the VM, writes its snapshot to `files` (created or replaced),
    /// then resumes or stops it as `then` says. A restored VM refuses to
    /// write over the memory file it runs from; other VMs restored from a
    /// memory file cannot be protected that way: never replace the files
    /// of a snapshot that VMs run from (truncating a memory file makes
    /// their guests' untouched pages vanish). `digests` are recorded in
    /// the header. Blocks until the files are written. If the VM is created
    /// but not yet running, the snapshot is taken as soon as it runs.
    ///
    /// On an error the VM resumes (unless it was ending anyway), and the
    /// files may be incomplete: a restore refuses them.
    pub fn snapshot(&self, files: &SnapshotFiles, then: AfterSnapshot, digests: Digests) -> Result<SnapshotInfo> {
        let shared = self.0.upgrade().ok_or(Error::VmNotRunning)?;
        // Truncating the file this VM's memory is mapped from would pull
        // the guest's memory from under it (SIGBUS on the next access).
        if let (Ok(target), Some(source)) = (std::fs::metadata(&files.memory), *lock(&shared.source_memory)) {
            if (target.dev(), target.ino()) == source {
                return Err(Error::File {
                    what: "snapshot memory file",
                    path: files.memory.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "this VM's memory is mapped from it: write the snapshot to another file",
                    ),
                });
            }
        }
        let create = |what: &'static str, path: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|source| Error::File { what, path: path.to_path_buf(), source })
        };
        let state = create("snapshot state file", &files.state)?;
        let memory = create("snapshot memory file", &files.memory)?;
        // Sized up front (a sparse file): the run loop only writes pages.
        memory.set_len(shared.memory_bytes).map_err(|source| Error::File {
            what: "snapshot memory file",
            path: files.memory.clone(),
            source,
        })?;
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let mut slot = lock(&shared.request);
            if slot.is_some() {
                return Err(Error::SnapshotBusy);
            }
            *slot = Some(Request { files: files.clone(), state, memory, then, digests, reply });
        }
        shared.event.write(1).map_err(io("waking the VM's event loop"))?;
        // Only the VM keeps the shared state alive: when it ends, a request
        // it did not serve is dropped with it, and the wait below ends.
        drop(shared);
        answer.recv().unwrap_or(Err(Error::VmNotRunning))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stand-in for the fuzz target (fuzz/fuzz_targets/
    /// vmm_snapshot_state.rs): garbage framed with a valid checksum reaches
    /// the decoders and is refused, never a panic.
    #[test]
    fn garbage_past_the_checksum_is_refused_without_panicking() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..2000 {
            let len = (next() % 600) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let at = (next() as usize) % (len + 1);
            let framed = format::frame(&bytes[..at], &bytes[at..]).unwrap();
            assert!(decode_state(&framed).is_err(), "round {round}");
            assert!(decode_state(&bytes).is_err(), "round {round}");
        }
        // A valid header over a garbage state.
        let header = SnapshotHeader {
            vmm_version: VMM_VERSION.into(),
            vmm_build: VMM_BUILD.into(),
            created_unix: 0,
            memory_mib: 32,
            memory_file_bytes: 32 << 20,
            vcpus: 1,
            digests: Digests::default(),
        };
        let json = serde_json::to_vec(&header).unwrap();
        for len in 0..300 {
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let err = decode_state(&format::frame(&json, &payload).unwrap()).unwrap_err();
            assert!(matches!(err, Error::SnapshotCorrupt { .. }), "{err}");
        }
    }

    #[test]
    fn the_header_is_readable_alone_and_files_are_named_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::in_dir(dir.path());
        assert_eq!(files.state, dir.path().join("vm.state"));
        assert_eq!(files.memory, dir.path().join("vm.mem"));
        let header = SnapshotHeader {
            vmm_version: VMM_VERSION.into(),
            vmm_build: VMM_BUILD.into(),
            created_unix: 1,
            memory_mib: 64,
            memory_file_bytes: 64 << 20,
            vcpus: 2,
            digests: Digests { kernel: Some("ab".repeat(32)), disks: vec![None, Some("cd".repeat(32))] },
        };
        std::fs::write(&files.state, format::encode(&header, &"a state that is not read").unwrap()).unwrap();
        assert_eq!(read_header(&files.state).unwrap(), header);
        assert!(read_state(&files.state).is_err());
    }

    #[test]
    fn sha256_of_a_file_is_lower_case_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(matches!(sha256_file(&dir.path().join("missing")), Err(Error::File { .. })));
    }

    #[test]
    fn memory_is_written_sparsely_at_region_offsets() {
        use vm_memory::{Bytes, GuestAddress};
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10_0000), 0x3000)]).unwrap();
        mem.write_obj(0x11u8, GuestAddress(0x1001)).unwrap();
        mem.write_obj(0x22u8, GuestAddress(0x10_2fff)).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.set_len(0x7000).unwrap();
        assert_eq!(write_memory(&mem, &file).unwrap(), 2 * PAGE as u64);
        let mut all = vec![0u8; 0x7000];
        file.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(all[0x1001], 0x11);
        assert_eq!(all[0x4000 + 0x2fff], 0x22);
        assert_eq!(all.iter().filter(|&&b| b != 0).count(), 2);
    }
}
