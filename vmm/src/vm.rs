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

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use tracing::info;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch;
use crate::cmdline::{self, MmioDeviceArgs};
use crate::config::{ThreadFilters, VmConfig};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{Serial, SerialInput};
use crate::devices::virtio::block::disk::DiskImage;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::error::{io, kvm, Error, Result};
use crate::layout::{self, I8042_PORT, I8042_PORT_COUNT, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_COUNT, VIRTIO_MMIO_SIZE};
use crate::vstate::exit::{ExitReason, ExitSignal, ExitSubscriber, StopHandle};
use crate::vstate::kvm as kvm_setup;
use crate::vstate::vcpu::{self, Vcpu, VcpuSetup, VcpuThreads};

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
    exit: Arc<ExitSignal>,
    seccomp: ThreadFilters,
    _vm: VmFd,
    _memory: GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("vcpus", &self.vcpus.len()).finish_non_exhaustive()
    }
}

/// Devices being put on the buses while the VM is assembled.
struct DeviceSetup<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: Bus,
    events: &'a mut EventManager<Subscriber>,
    cmdline_devices: Vec<MmioDeviceArgs>,
}

impl DeviceSetup<'_> {
    /// Puts a virtio device on the next MMIO window and interrupt line: its
    /// queue notifications become ioeventfds, its interrupt an irqfd, and the
    /// device joins the event loop.
    fn attach_virtio<D>(&mut self, device: D) -> Result<()>
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
        let transport = MmioTransport::new(device.clone(), self.mem.clone(), Arc::new(Interrupt::new(irqfd)));
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base.0, VIRTIO_MMIO_SIZE)
            .map_err(|_| Error::TooManyDevices)?;
        self.events.add_subscriber(device);
        self.cmdline_devices.push(MmioDeviceArgs { base, irq });
        Ok(())
    }

    fn attach_block(&mut self, disk: DiskImage) -> Result<()> {
        let device = Block::new(disk).map_err(io("creating a block device"))?;
        self.attach_virtio(device)
    }

    fn attach_vsock(&mut self, config: &VsockConfig) -> Result<()> {
        let device = Vsock::new(config).map_err(|source| Error::File {
            what: "vsock socket",
            path: config.uds_path.clone(),
            source,
        })?;
        self.attach_virtio(device)
    }
}

impl Vm {
    /// Validates `config` and builds the VM; no guest code runs yet.
    pub fn create(config: VmConfig) -> Result<Vm> {
        config.validate_sizes()?;
        let files = config.open_files()?;
        let kvm_fd = kvm_setup::open()?;
        kvm_setup::check_capabilities(&kvm_fd)?;
        let max_vcpus = kvm_fd.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(Error::VcpuCount { got: config.vcpus, max: u8::try_from(max_vcpus).unwrap_or(u8::MAX) });
        }

        let ram = layout::ram_regions(u64::from(config.memory_mib) << 20);
        let ranges: Vec<(GuestAddress, usize)> = ram.iter().map(|&(start, size)| (start, size as usize)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(Error::GuestMemoryAlloc)?;
        let vm = kvm_setup::create_vm(&kvm_fd, &mem)?;
        let exit = Arc::new(ExitSignal::new()?);
        let mut events = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        events.add_subscriber(Arc::new(Mutex::new(ExitSubscriber(exit.clone()))));

        // Serial console and i8042 on the port I/O bus.
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io("creating the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm("KVM_IRQFD"))?;
        let serial_drained = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            serial_drained.try_clone().map_err(io("duplicating an eventfd"))?,
            config.serial,
        )));
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
        let mut devices =
            DeviceSetup { vm: &vm, mem: &mem, mmio: Bus::new(), events: &mut events, cmdline_devices: Vec::new() };
        devices.attach_block(files.root)?;
        for disk in files.extra {
            devices.attach_block(disk)?;
        }
        if let Some(vsock) = &config.vsock {
            devices.attach_vsock(vsock)?;
        }
        let DeviceSetup { mmio, cmdline_devices, .. } = devices;

        let cmdline = cmdline::compose(&config.cmdline, &cmdline_devices)?;
        let entry = arch::load_kernel(&mem, &config.kernel, files.kernel)?;
        arch::write_boot_info(&mem, &ram, &cmdline, config.vcpus)?;

        let supported_cpuid = arch::cpuid::supported(&kvm_fd)?;
        if !arch::cpuid::has_kvm_leaves(&supported_cpuid) {
            tracing::warn!("KVM reports no hypervisor CPUID leaves; the guest will not use kvm-clock");
        }
        let setup = VcpuSetup {
            vm: &vm,
            count: config.vcpus,
            supported_cpuid: &supported_cpuid,
            entry,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            mem: mem.clone(),
        };
        let vcpus = (0..config.vcpus).map(|id| Vcpu::new(&setup, id)).collect::<Result<Vec<_>>>()?;
        vcpu::install_kick_handler()?;

        Ok(Vm {
            vcpus,
            events,
            serial,
            serial_drained: Some(serial_drained),
            exit,
            seccomp: config.seccomp,
            _vm: vm,
            _memory: mem,
        })
    }

    /// A handle that stops this VM from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle::new(&self.exit)
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
    pub fn run(self) -> Result<ExitReason> {
        let Vm { vcpus, mut events, exit, seccomp, .. } = self;

        let threads = VcpuThreads::start(vcpus, &exit, seccomp.vcpu);
        // After the vCPU threads exist (they must not inherit it), before
        // the first device event.
        if let Some(filter) = &seccomp.event_loop {
            if let Err(source) = seccompiler::apply_filter(filter) {
                exit.request(Err(Error::Seccomp { thread: "event loop".into(), source }));
            }
        }
        while !exit.is_stopping() {
            if let Err(e) = events.run() {
                exit.request(Err(Error::EventLoop(e)));
            }
        }
        drop(threads);
        exit.take_outcome().unwrap_or(Ok(ExitReason::StopRequested))
    }
}
