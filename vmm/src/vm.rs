//! Assembling a VM from a [`VmConfig`] and running it.
//!
//! [`Vm::create`] validates the configuration, then builds everything before
//! any guest code runs: guest memory, the KVM VM, the devices (serial console,
//! i8042 reset line, one virtio-mmio block device per disk, the optional vsock
//! device), the kernel and its boot information, and the vCPUs. [`Vm::run`]
//! starts one thread per vCPU and runs the device event loop on the calling
//! thread until the VM is asked to end; it then stops and joins the vCPU
//! threads, and everything the VM owned (threads, file descriptors, guest
//! memory) is gone when it returns.
//!
//! [`Vm::restore`] builds the same VM from a snapshot instead of a kernel:
//! guest memory mapped copy-on-write from the snapshot's memory file, the
//! same devices created from the current configuration and given their
//! saved state, the vCPUs and the VM-wide KVM state set before any vCPU
//! runs. It then runs like a booted VM. While it runs, a [`VmController`]
//! can snapshot it (see [`crate::snapshot`]).

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use tracing::info;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch;
use crate::cmdline::{self, MmioDeviceArgs};
use crate::config::{ThreadFilters, VmConfig};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{Serial, SerialInput, SerialSnapshot};
use crate::devices::virtio::block::disk::DiskImage;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::error::{io, kvm, Error, Result};
use crate::layout::{self, I8042_PORT, I8042_PORT_COUNT, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_COUNT, VIRTIO_MMIO_SIZE};
use crate::snapshot::{
    self, format, AfterSnapshot, ControlShared, ControlSubscriber, DeviceSnapshot, Digests, Request, SnapshotFiles,
    SnapshotHeader, SnapshotInfo, VirtioSnapshot, VmController, VmState,
};
use crate::vstate::exit::{ExitReason, ExitSignal, ExitSubscriber, StopHandle};
use crate::vstate::kvm as kvm_setup;
use crate::vstate::state;
use crate::vstate::vcpu::{self, Vcpu, VcpuSetup, VcpuThreads};
use crate::{config::OpenedFiles, lock};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A created, not yet running VM.
pub struct Vm {
    // Fields drop in order: vCPUs and devices before the VM fd, and all of
    // them before the guest memory they refer to.
    vcpus: Vec<Vcpu>,
    events: EventManager<Subscriber>,
    serial: Arc<Mutex<Serial>>,
    /// The UART's FIFO-drained event, until serial input is attached.
    serial_drained: Option<EventFd>,
    virtio: Vec<AttachedVirtio>,
    exit: Arc<ExitSignal>,
    control: Arc<ControlShared>,
    seccomp: ThreadFilters,
    memory_mib: u32,
    vm: VmFd,
    memory: GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("vcpus", &self.vcpus.len()).finish_non_exhaustive()
    }
}

/// A virtio device on its MMIO window, as a snapshot sees it.
struct AttachedVirtio {
    /// What kind of device, with what a restore checks (a vsock device's
    /// next host port changes as it runs: [`Self::snapshot`] reads it).
    device: DeviceSnapshot,
    transport: Arc<Mutex<MmioTransport>>,
    /// The vsock device itself (for the transport reset after a restore).
    vsock: Option<Arc<Mutex<Vsock>>>,
}

impl AttachedVirtio {
    /// What a snapshot saves of the device beyond its transport.
    fn snapshot(&self) -> DeviceSnapshot {
        match (&self.device, &self.vsock) {
            (DeviceSnapshot::Vsock { guest_cid, .. }, Some(vsock)) => {
                DeviceSnapshot::Vsock { guest_cid: *guest_cid, next_host_port: lock(vsock).next_host_port() }
            }
            (device, _) => device.clone(),
        }
    }
}

/// Devices being put on the buses while the VM is assembled.
struct DeviceSetup<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: Bus,
    events: &'a mut EventManager<Subscriber>,
    cmdline_devices: Vec<MmioDeviceArgs>,
    attached: Vec<AttachedVirtio>,
}

impl DeviceSetup<'_> {
    /// Puts a virtio device on the next MMIO window and interrupt line: its
    /// queue notifications become ioeventfds, its interrupt an irqfd, and the
    /// device joins the event loop.
    fn attach_virtio<D>(&mut self, device: D, kind: DeviceSnapshot) -> Result<Arc<Mutex<D>>>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (base, irq) = layout::virtio_mmio_slot(self.cmdline_devices.len()).ok_or(Error::TooManyDevices)?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(io("creating a device irqfd"))?;
        self.vm.register_irqfd(&irqfd, irq).map_err(kvm("KVM_IRQFD"))?;
        for (queue, event) in device.queue_events().iter().enumerate() {
            self.vm
                .register_ioevent(event, &IoEventAddress::Mmio(base.0 + reg::QUEUE_NOTIFY), queue as u32)
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let device = Arc::new(Mutex::new(device));
        let transport =
            Arc::new(Mutex::new(MmioTransport::new(device.clone(), self.mem.clone(), Arc::new(Interrupt::new(irqfd)))));
        self.mmio.insert(transport.clone(), base.0, VIRTIO_MMIO_SIZE).map_err(|_| Error::TooManyDevices)?;
        self.events.add_subscriber(device.clone());
        self.cmdline_devices.push(MmioDeviceArgs { base, irq });
        self.attached.push(AttachedVirtio { device: kind, transport, vsock: None });
        Ok(device)
    }

    fn attach_block(&mut self, disk: DiskImage) -> Result<()> {
        let kind = DeviceSnapshot::Block { sectors: disk.sectors(), read_only: disk.read_only() };
        let device = Block::new(disk).map_err(io("creating a block device"))?;
        self.attach_virtio(device, kind).map(drop)
    }

    fn attach_vsock(&mut self, config: &VsockConfig) -> Result<()> {
        let device = Vsock::new(config).map_err(|source| Error::File {
            what: "vsock socket",
            path: config.uds_path.clone(),
            source,
        })?;
        let kind = DeviceSnapshot::Vsock { guest_cid: config.guest_cid, next_host_port: device.next_host_port() };
        let device = self.attach_virtio(device, kind)?;
        if let Some(last) = self.attached.last_mut() {
            last.vsock = Some(device);
        }
        Ok(())
    }
}

/// What `Vm::create` and `Vm::restore` build alike.
struct Assembled {
    kvm_fd: kvm_ioctls::Kvm,
    vm: VmFd,
    events: EventManager<Subscriber>,
    serial: Arc<Mutex<Serial>>,
    serial_drained: EventFd,
    exit: Arc<ExitSignal>,
    control: Arc<ControlShared>,
    pio: Bus,
    mmio: Bus,
    cmdline_devices: Vec<MmioDeviceArgs>,
    attached: Vec<AttachedVirtio>,
}

/// Opens KVM, checks it can run `config`, and creates the VM on `mem` with
/// every device of `config`; the serial console starts in `serial_state`
/// when given.
fn assemble(
    config: &mut VmConfig,
    (root, extra): (DiskImage, Vec<DiskImage>),
    mem: &GuestMemoryMmap,
    serial_state: Option<&SerialSnapshot>,
) -> Result<Assembled> {
    let kvm_fd = kvm_setup::open()?;
    kvm_setup::check_capabilities(&kvm_fd)?;
    let max_vcpus = kvm_fd.get_max_vcpus();
    if usize::from(config.vcpus) > max_vcpus {
        return Err(Error::VcpuCount { got: config.vcpus, max: u8::try_from(max_vcpus).unwrap_or(u8::MAX) });
    }
    let vm = kvm_setup::create_vm(&kvm_fd, mem)?;
    let exit = Arc::new(ExitSignal::new()?);
    let control = Arc::new(ControlShared::new(u64::from(config.memory_mib) << 20)?);
    let mut events = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(ExitSubscriber(exit.clone()))));
    events.add_subscriber(Arc::new(Mutex::new(ControlSubscriber(control.clone()))));

    // Serial console and i8042 on the port I/O bus.
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io("creating the serial irqfd"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm("KVM_IRQFD"))?;
    let serial_drained = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
    let drained = serial_drained.try_clone().map_err(io("duplicating an eventfd"))?;
    let sink = std::mem::replace(&mut config.serial, Box::new(std::io::sink()));
    let serial = match serial_state {
        None => Serial::new(serial_irq, drained, sink),
        Some(saved) => Serial::restored(saved, serial_irq, drained, sink)
            .map_err(|reason| Error::DeviceRestore { device: "the serial console".into(), reason })?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset_exit = exit.clone();
    let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(move || {
        info!("guest requested a reset: stopping the VM");
        reset_exit.request(Ok(ExitReason::GuestShutdown));
    })));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), u64::from(SERIAL_PORT_COUNT))
        .and_then(|()| pio.insert(i8042, u64::from(I8042_PORT), u64::from(I8042_PORT_COUNT)))
        .map_err(|_| Error::TooManyDevices)?;

    // Block devices: the root image first so the guest names it /dev/vda.
    let mut devices = DeviceSetup {
        vm: &vm,
        mem,
        mmio: Bus::new(),
        events: &mut events,
        cmdline_devices: Vec::new(),
        attached: Vec::new(),
    };
    devices.attach_block(root)?;
    for disk in extra {
        devices.attach_block(disk)?;
    }
    if let Some(vsock) = &config.vsock {
        devices.attach_vsock(vsock)?;
    }
    let DeviceSetup { mmio, cmdline_devices, attached, .. } = devices;
    Ok(Assembled { kvm_fd, vm, events, serial, serial_drained, exit, control, pio, mmio, cmdline_devices, attached })
}

/// Refuses a snapshot that does not fit `config` and `digests`.
fn check_snapshot(header: &SnapshotHeader, saved: &VmState, config: &VmConfig, digests: &Digests) -> Result<()> {
    let mismatch = |what: &str, snapshot: String, current: String| {
        Err(Error::SnapshotMismatch { what: what.to_string(), snapshot, current })
    };
    if header.vmm_version != snapshot::VMM_VERSION {
        return mismatch("the VMM version", header.vmm_version.clone(), snapshot::VMM_VERSION.into());
    }
    if header.memory_mib != config.memory_mib {
        return mismatch("the memory size", format!("{} MiB", header.memory_mib), format!("{} MiB", config.memory_mib));
    }
    if header.vcpus != config.vcpus {
        return mismatch("the vCPU count", header.vcpus.to_string(), config.vcpus.to_string());
    }
    if header.memory_file_bytes != u64::from(header.memory_mib) << 20 {
        return Err(Error::SnapshotCorrupt {
            reason: format!("{} MiB of memory in a {}-byte memory file", header.memory_mib, header.memory_file_bytes),
        });
    }
    let ids: Vec<u8> = saved.vcpus.iter().map(|v| v.id).collect();
    if ids != (0..header.vcpus).collect::<Vec<u8>>() {
        return Err(Error::SnapshotCorrupt { reason: format!("vCPUs {ids:?} for a {}-vCPU VM", header.vcpus) });
    }
    if let (Some(saved), Some(current)) = (&header.digests.kernel, &digests.kernel) {
        if saved != current {
            return mismatch("the kernel's SHA-256", saved.clone(), current.clone());
        }
    }
    for (index, (saved, current)) in header.digests.disks.iter().zip(&digests.disks).enumerate() {
        if let (Some(saved), Some(current)) = (saved, current) {
            if saved != current {
                return mismatch(&format!("the SHA-256 of disk {index}"), saved.clone(), current.clone());
            }
        }
    }
    Ok(())
}

/// Maps the memory file privately (copy-on-write) as the guest RAM regions
/// for `memory_mib` MiB, at consecutive offsets.
fn map_memory_file(path: &std::path::Path, memory_mib: u32) -> Result<(GuestMemoryMmap, Arc<std::fs::File>)> {
    let file_error = |source| Error::File { what: "snapshot memory file", path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(file_error)?;
    let len = file.metadata().map_err(file_error)?.len();
    let expected = u64::from(memory_mib) << 20;
    if len < expected {
        return Err(Error::SnapshotTruncated { path: path.to_path_buf(), expected, got: len });
    }
    if len > expected {
        return Err(Error::SnapshotMismatch {
            what: format!("the memory file {}", path.display()),
            snapshot: format!("{len} bytes"),
            current: format!("{expected} bytes for {memory_mib} MiB"),
        });
    }
    let file = Arc::new(file);
    let ram = layout::ram_regions(expected);
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ram.len());
    for &(start, size) in &ram {
        let size_usize = usize::try_from(size).map_err(|_| Error::MemorySize { got: memory_mib, min: 0, max: 0 })?;
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            size_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::File {
            what: "snapshot memory file (mapping)",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or(Error::SnapshotCorrupt { reason: "a memory region overflows the guest address space".into() })?;
        regions.push(region);
        offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::File {
        what: "snapshot memory file (regions)",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    Ok((mem, file))
}

impl Vm {
    /// Validates `config` and builds the VM; no guest code runs yet.
    pub fn create(mut config: VmConfig) -> Result<Vm> {
        config.validate_sizes()?;
        let OpenedFiles { kernel, root, extra } = config.open_files()?;

        let ram = layout::ram_regions(u64::from(config.memory_mib) << 20);
        let ranges: Vec<(GuestAddress, usize)> = ram.iter().map(|&(start, size)| (start, size as usize)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(Error::GuestMemoryAlloc)?;
        let parts = assemble(&mut config, (root, extra), &mem, None)?;

        let cmdline = cmdline::compose(&config.cmdline, &parts.cmdline_devices)?;
        let entry = arch::load_kernel(&mem, &config.kernel, kernel)?;
        arch::write_boot_info(&mem, &ram, &cmdline, config.vcpus)?;

        let supported_cpuid = arch::cpuid::supported(&parts.kvm_fd)?;
        if !arch::cpuid::has_kvm_leaves(&supported_cpuid) {
            tracing::warn!("KVM reports no hypervisor CPUID leaves; the guest will not use kvm-clock");
        }
        let msr_indices: Arc<[u32]> = state::msrs_to_save(&parts.kvm_fd)?.into();
        let setup = VcpuSetup {
            vm: &parts.vm,
            count: config.vcpus,
            supported_cpuid: &supported_cpuid,
            entry,
            pio: Arc::new(parts.pio),
            mmio: Arc::new(parts.mmio),
            mem: mem.clone(),
            msr_indices,
        };
        let vcpus = (0..config.vcpus).map(|id| Vcpu::new(&setup, id)).collect::<Result<Vec<_>>>()?;
        vcpu::install_kick_handler()?;

        Ok(Vm {
            vcpus,
            events: parts.events,
            serial: parts.serial,
            serial_drained: Some(parts.serial_drained),
            virtio: parts.attached,
            exit: parts.exit,
            control: parts.control,
            seccomp: config.seccomp,
            memory_mib: config.memory_mib,
            vm: parts.vm,
            memory: mem,
        })
    }

    /// Builds a VM from the snapshot in `files`, ready to [`run`](Vm::run)
    /// on from where the snapshot was taken.
    ///
    /// `config` must describe the VM the snapshot was taken of: the same
    /// memory size and vCPU count, the same disks (same sizes and modes;
    /// where `digests` and the snapshot both have a disk's or the kernel's
    /// digest, they must be equal), and a vsock device if it had one. Its
    /// host side may differ: disk paths, the vsock socket path and CID, the
    /// serial sink, the seccomp filters. The kernel is not loaded and the
    /// command line is not used.
    ///
    /// Memory is the snapshot's memory file mapped `MAP_PRIVATE`: the guest
    /// writes into private copies, never into the file. Open vsock
    /// connections are not restored: the vsock device tells the guest to
    /// reset its connections (listening sockets keep listening).
    pub fn restore(mut config: VmConfig, files: &SnapshotFiles, digests: &Digests) -> Result<Vm> {
        config.validate_sizes()?;
        let (header, saved) = snapshot::read_state(&files.state)?;
        check_snapshot(&header, &saved, &config, digests)?;
        let opened = config.open_disks()?;
        let (mem, memory_file) = map_memory_file(&files.memory, config.memory_mib)?;
        let parts = assemble(&mut config, opened, &mem, Some(&saved.serial))?;
        parts.control.set_source_memory(&memory_file)?;

        // The devices: the same ones, in the same windows, each given its state.
        let kinds =
            |list: &mut dyn Iterator<Item = &DeviceSnapshot>| list.map(|d| d.kind()).collect::<Vec<_>>().join(", ");
        if parts.attached.len() != saved.virtio.len()
            || parts.attached.iter().zip(&saved.virtio).any(|(a, s)| a.device.kind() != s.device.kind())
        {
            return Err(Error::SnapshotMismatch {
                what: "the virtio devices".into(),
                snapshot: kinds(&mut saved.virtio.iter().map(|v| &v.device)),
                current: kinds(&mut parts.attached.iter().map(|a| &a.device)),
            });
        }
        for (index, (attached, saved)) in parts.attached.iter().zip(&saved.virtio).enumerate() {
            if let (DeviceSnapshot::Block { .. }, DeviceSnapshot::Block { .. }) = (&attached.device, &saved.device) {
                if attached.device != saved.device {
                    return Err(Error::SnapshotMismatch {
                        what: format!("disk {index}"),
                        snapshot: format!("{:?}", saved.device),
                        current: format!("{:?}", attached.device),
                    });
                }
            }
            lock(&attached.transport).restore(&saved.transport).map_err(|reason| Error::DeviceRestore {
                device: format!("virtio-mmio device {index} ({})", saved.device.kind()),
                reason,
            })?;
        }

        // vCPUs, then the VM-wide state, before any vCPU runs.
        let unused_cpuid = kvm_bindings::CpuId::new(0).map_err(|_| Error::KvmCapability("an empty CPUID"))?;
        let msr_indices: Arc<[u32]> = state::msrs_to_save(&parts.kvm_fd)?.into();
        let setup = VcpuSetup {
            vm: &parts.vm,
            count: config.vcpus,
            supported_cpuid: &unused_cpuid,
            entry: GuestAddress(0),
            pio: Arc::new(parts.pio),
            mmio: Arc::new(parts.mmio),
            mem: mem.clone(),
            msr_indices,
        };
        let vcpus = saved.vcpus.iter().map(|v| Vcpu::restored(&setup, v)).collect::<Result<Vec<_>>>()?;
        state::restore_vm(&parts.vm, &saved.vm)?;
        vcpu::install_kick_handler()?;

        // Now that the interrupt controllers hold their saved state, tell
        // the guest its vsock connections are gone.
        for (attached, saved) in parts.attached.iter().zip(&saved.virtio) {
            if let (Some(vsock), DeviceSnapshot::Vsock { next_host_port, .. }) = (&attached.vsock, &saved.device) {
                let mut vsock = lock(vsock);
                vsock.continue_host_ports_from(*next_host_port);
                vsock.send_transport_reset();
            }
        }
        info!(
            "restored a {}-vCPU, {} MiB VM from {} (written by VMM {} build {})",
            header.vcpus,
            header.memory_mib,
            files.state.display(),
            header.vmm_version,
            header.vmm_build
        );
        Ok(Vm {
            vcpus,
            events: parts.events,
            serial: parts.serial,
            serial_drained: Some(parts.serial_drained),
            virtio: parts.attached,
            exit: parts.exit,
            control: parts.control,
            seccomp: config.seccomp,
            memory_mib: config.memory_mib,
            vm: parts.vm,
            memory: mem,
        })
    }

    /// A handle that stops this VM from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle::new(&self.exit)
    }

    /// A handle that snapshots this VM from any thread while it runs.
    pub fn controller(&self) -> VmController {
        VmController::new(&self.control)
    }

    /// Feeds the guest's serial console from `input` (a pipe, terminal or
    /// socket; read when it is readable). Without it the console has no
    /// input. Can be called once.
    pub fn set_serial_input(&mut self, input: OwnedFd) -> Result<()> {
        let drained = self.serial_drained.take().ok_or(Error::Io {
            what: "attaching serial input",
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the serial console already has an input"),
        })?;
        self.events.add_subscriber(Arc::new(Mutex::new(SerialInput::new(self.serial.clone(), input, drained))));
        Ok(())
    }

    /// Runs the VM until the guest shuts down, the host stops it, or a fatal
    /// error occurs. All threads are joined before this returns. vCPU threads
    /// are interrupted with `SIGRTMIN`, for which [`Vm::create`] installs an
    /// empty handler: the embedding process must not use that signal.
    /// Snapshot requests from a [`VmController`] are served on this thread,
    /// between two device events.
    pub fn run(self) -> Result<ExitReason> {
        let Vm { vcpus, mut events, exit, control, seccomp, serial, virtio, vm, memory, memory_mib, .. } = self;

        let threads = VcpuThreads::start(vcpus, &exit, seccomp.vcpu);
        // After the vCPU threads exist (they must not inherit it), before
        // the first device event.
        if let Some(filter) = &seccomp.event_loop {
            if let Err(source) = seccompiler::apply_filter(filter) {
                exit.request(Err(Error::Seccomp { thread: "event loop".into(), source }));
            }
        }
        let parts = Running {
            threads: &threads,
            exit: &exit,
            vm: &vm,
            memory: &memory,
            serial: &serial,
            virtio: &virtio,
            memory_mib,
        };
        while !exit.is_stopping() {
            if let Err(e) = events.run() {
                exit.request(Err(Error::EventLoop(e)));
            }
            if let Some(request) = control.take() {
                let reply = request.reply.clone();
                let result = parts.snapshot(request);
                if let Err(e) = &result {
                    tracing::warn!("snapshot failed: {e}");
                }
                let _ = reply.send(result);
            }
        }
        drop(threads);
        exit.take_outcome().unwrap_or(Ok(ExitReason::StopRequested))
    }
}

/// What a running VM's event loop has at hand to take a snapshot.
struct Running<'a> {
    threads: &'a VcpuThreads,
    exit: &'a Arc<ExitSignal>,
    vm: &'a VmFd,
    memory: &'a GuestMemoryMmap,
    serial: &'a Arc<Mutex<Serial>>,
    virtio: &'a [AttachedVirtio],
    memory_mib: u32,
}

impl Running<'_> {
    /// Pauses the vCPUs, saves everything into the request's files, and
    /// resumes or stops the VM.
    fn snapshot(&self, request: Request) -> Result<SnapshotInfo> {
        let started = Instant::now();
        let vcpus = self.threads.pause()?;
        let pause_took = started.elapsed();
        let result = self.save(&request, vcpus);
        let paused_for = started.elapsed().saturating_sub(pause_took);
        if result.is_ok() && request.then == AfterSnapshot::Stop {
            self.exit.request(Ok(ExitReason::StopRequested));
        }
        self.threads.resume();
        let (header, state_bytes, memory_written_bytes) = result?;
        info!(
            "snapshot written to {} and {} in {:.1} ms (vCPUs paused after {:.1} ms)",
            request.files.state.display(),
            request.files.memory.display(),
            paused_for.as_secs_f64() * 1e3,
            pause_took.as_secs_f64() * 1e3
        );
        Ok(SnapshotInfo {
            files: request.files,
            memory_bytes: header.memory_file_bytes,
            header,
            state_bytes,
            memory_written_bytes,
            pause_took,
            paused_for,
        })
    }

    fn save(&self, request: &Request, vcpus: Vec<state::VcpuState>) -> Result<(SnapshotHeader, u64, u64)> {
        let state = VmState {
            vcpus,
            vm: state::save_vm(self.vm)?,
            serial: lock(self.serial).snapshot(),
            virtio: self
                .virtio
                .iter()
                .map(|d| VirtioSnapshot { device: d.snapshot(), transport: lock(&d.transport).snapshot() })
                .collect(),
        };
        let header = SnapshotHeader {
            vmm_version: snapshot::VMM_VERSION.into(),
            vmm_build: snapshot::VMM_BUILD.into(),
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            memory_mib: self.memory_mib,
            memory_file_bytes: u64::from(self.memory_mib) << 20,
            vcpus: u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX),
            digests: request.digests.clone(),
        };
        let bytes = format::encode(&header, &state)?;
        let written = snapshot::write_memory(self.memory, &request.memory)?;
        (&request.state).write_all(&bytes).map_err(io("writing the snapshot state file"))?;
        Ok((header, bytes.len() as u64, written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    /// A guest larger than the space below the MMIO gap has two RAM
    /// regions: the memory file holds them one after the other, and a
    /// restore maps each from its offset, privately. (Nothing here touches
    /// more than a few pages of the 3.3 GiB.)
    #[test]
    fn memory_files_map_each_region_from_its_offset_and_stay_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.mem");
        let memory_mib = 3400;
        let len = u64::from(memory_mib) << 20;
        let open = |p: &std::path::Path| {
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(p).unwrap()
        };
        let file = open(&path);
        file.set_len(len).unwrap();
        let below_gap = layout::MMIO_GAP_START;
        file.write_all_at(b"low", 0x1000).unwrap();
        file.write_all_at(b"high", below_gap + 16).unwrap();
        file.write_all_at(b"end", len - 3).unwrap();

        let (mem, _) = map_memory_file(&path, memory_mib).unwrap();
        let read = |addr: u64, n: usize| {
            let mut buf = vec![0u8; n];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        };
        assert_eq!(read(0x1000, 3), b"low");
        assert_eq!(read(layout::MMIO_GAP_END + 16, 4), b"high");
        assert_eq!(read(layout::MMIO_GAP_END + (len - below_gap) - 3, 3), b"end");

        // The guest's writes stay private. (write_memory's offsets are
        // checked in the snapshot module, on memory small enough to scan.)
        mem.write_slice(b"HIGH", GuestAddress(layout::MMIO_GAP_END + 16)).unwrap();
        assert_eq!(read(layout::MMIO_GAP_END + 16, 4), b"HIGH");
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, below_gap + 16).unwrap();
        assert_eq!(&on_disk, b"high");

        // A memory file of another size is refused.
        assert!(matches!(map_memory_file(&path, memory_mib + 1), Err(Error::SnapshotTruncated { .. })));
        assert!(matches!(map_memory_file(&path, memory_mib - 1), Err(Error::SnapshotMismatch { .. })));
    }
}
