//! The 16550 UART console (COM1): vm-superio's register model on the port
//! I/O bus, its interrupt on an irqfd, output to a host sink, and optional
//! host input fed from a file descriptor by the event loop.
//!
//! Input flow control: the UART has a 64-byte receive FIFO. The event loop
//! reads at most as many bytes as fit; when the FIFO is full it stops polling
//! the input until the guest has drained it, which the UART reports through
//! an eventfd.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::layout::SERIAL_PORT_COUNT;
use crate::lock;

/// Raises the UART's interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqEvent(pub EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the input pump when the guest has emptied the receive FIFO.
#[derive(Debug)]
pub struct FifoDrained(pub EventFd);

impl SerialEvents for FifoDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            warn!("serial: cannot signal the input pump: {e}");
        }
    }
}

type Uart = vm_superio::Serial<IrqEvent, FifoDrained, Box<dyn Write + Send>>;

/// The UART on the port I/O bus.
pub struct Serial {
    uart: Uart,
    sink_failed: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").field("sink_failed", &self.sink_failed).finish_non_exhaustive()
    }
}

/// What a snapshot saves of the UART: its registers and the bytes in its
/// receive FIFO (vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Serial {
    /// A UART that interrupts through `irq`, writes guest output to `sink`,
    /// and signals `drained` whenever its receive FIFO becomes empty.
    pub fn new(irq: EventFd, drained: EventFd, sink: Box<dyn Write + Send>) -> Self {
        Self { uart: vm_superio::Serial::with_events(IrqEvent(irq), FifoDrained(drained), sink), sink_failed: false }
    }

    /// A UART in the state a snapshot saved, otherwise as [`Serial::new`].
    /// Fails if the saved receive FIFO holds more than a FIFO.
    pub fn restored(
        saved: &SerialSnapshot,
        irq: EventFd,
        drained: EventFd,
        sink: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let uart = vm_superio::Serial::from_state(&SerialState::from(saved), IrqEvent(irq), FifoDrained(drained), sink)
            .map_err(|e| format!("{e:?}"))?;
        Ok(Self { uart, sink_failed: false })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Free space in the receive FIFO.
    fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                debug!("serial: input not queued: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) if u16::from(offset) < SERIAL_PORT_COUNT => {
                *byte = self.uart.read(offset);
            }
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        match self.uart.write(offset, *value) {
            Ok(()) => self.sink_failed = false,
            Err(vm_superio::serial::Error::IOError(e)) => {
                if !self.sink_failed {
                    warn!("serial: console output lost: {e}");
                    self.sink_failed = true;
                }
            }
            Err(e) => warn!("serial: {e:?}"),
        }
    }
}

/// Feeds bytes from a host file descriptor into the UART's receive FIFO.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: File,
    drained: EventFd,
    polling_input: bool,
    closed: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("input", &self.input)
            .field("polling_input", &self.polling_input)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Pumps `input` into `serial`; `drained` is the UART's FIFO-drained eventfd.
    pub fn new(serial: Arc<Mutex<Serial>>, input: OwnedFd, drained: EventFd) -> Self {
        Self { serial, input: File::from(input), drained, polling_input: false, closed: false }
    }

    fn set_polling(&mut self, ops: &mut EventOps, on: bool) {
        if self.polling_input == on {
            return;
        }
        let event = Events::new(&self.input, EventSet::IN);
        let result = if on { ops.add(event) } else { ops.remove(event) };
        match result {
            Ok(()) => self.polling_input = on,
            Err(e) => {
                warn!("serial: cannot change polling of the input: {e}; input closed");
                self.closed = true;
            }
        }
    }

    /// Moves what fits of the available input into the FIFO.
    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = lock(&self.serial);
        let room = serial.fifo_capacity();
        if room == 0 {
            drop(serial);
            self.set_polling(ops, false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                drop(serial);
                debug!("serial: input reached end of file");
                self.closed = true;
                self.set_polling(ops, false);
            }
            Ok(n) => {
                let queued = serial.enqueue(&buf[..n]);
                if queued < n {
                    debug!("serial: {} input bytes dropped", n - queued);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                drop(serial);
                warn!("serial: reading input failed: {e}; input closed");
                self.closed = true;
                self.set_polling(ops, false);
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            warn!("serial: cannot poll the FIFO-drained event: {e}");
        }
        self.set_polling(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if !self.closed {
                self.set_polling(ops, true);
            }
        } else if events.fd() == self.input.as_raw_fd() {
            if events.event_set().intersects(EventSet::IN) {
                self.pump(ops);
            } else {
                // Hang-up or error without data: the input is gone.
                self.closed = true;
                self.set_polling(ops, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;
    const LSR_THR_EMPTY: u8 = 0x20;

    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenSink;

    impl Write for BrokenSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn eventfd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn serial_with(sink: Box<dyn Write + Send>) -> (Serial, EventFd, EventFd) {
        let irq = eventfd();
        let drained = eventfd();
        let serial = Serial::new(irq.try_clone().unwrap(), drained.try_clone().unwrap(), sink);
        (serial, irq, drained)
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let sink = SharedSink::default();
        let (mut serial, _, _) = serial_with(Box::new(sink.clone()));
        for b in b"hello\n" {
            serial.write(DATA, &[*b]);
        }
        assert_eq!(&*lock(&sink.0), b"hello\n");
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn transmit_interrupt_fires_when_enabled() {
        let (mut serial, irq, _) = serial_with(Box::new(io::sink()));
        assert!(irq.read().is_err(), "no interrupt before IER is set");
        serial.write(IER, &[0x2]);
        serial.write(DATA, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn a_failing_sink_does_not_stop_the_uart() {
        let (mut serial, _, _) = serial_with(Box::new(BrokenSink));
        serial.write(DATA, b"a");
        serial.write(DATA, b"b");
        assert!(serial.sink_failed);
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn odd_sized_and_out_of_range_accesses_are_ignored() {
        let sink = SharedSink::default();
        let (mut serial, _, _) = serial_with(Box::new(sink.clone()));
        serial.write(DATA, b"ab");
        serial.write(0x1_0000, b"c");
        assert!(lock(&sink.0).is_empty());
        let mut wide = [0u8; 2];
        serial.read(DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut byte = [0u8];
        serial.read(u64::from(SERIAL_PORT_COUNT), &mut byte);
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn input_is_read_by_the_guest_and_draining_is_signalled() {
        let (mut serial, irq, drained) = serial_with(Box::new(io::sink()));
        serial.write(IER, &[0x1]);
        let _ = irq.read();
        assert_eq!(serial.enqueue(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_DATA_READY, 0);
        let mut got = Vec::new();
        for _ in 0..2 {
            let mut b = [0u8];
            serial.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"ok");
        assert!(drained.read().unwrap() >= 1);
        serial.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & LSR_DATA_READY, 0);
    }

    /// Reads everything the guest would see in the receive FIFO right now.
    fn drain(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut serial = lock(serial);
        loop {
            let mut lsr = [0u8];
            serial.read(LSR, &mut lsr);
            if lsr[0] & LSR_DATA_READY == 0 {
                return got;
            }
            let mut b = [0u8];
            serial.read(DATA, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn host_input_is_pumped_with_flow_control_until_end_of_file() {
        use event_manager::SubscriberOps;
        type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
        let (serial, _irq, drained) = serial_with(Box::new(io::sink()));
        let serial = Arc::new(Mutex::new(serial));
        let (reader, mut writer) = io::pipe().unwrap();
        let mut events = event_manager::EventManager::<Subscriber>::new().unwrap();
        let input = Arc::new(Mutex::new(SerialInput::new(serial.clone(), OwnedFd::from(reader), drained)));
        events.add_subscriber(input.clone());

        let sent: Vec<u8> = (0..100u8).collect();
        writer.write_all(&sent).unwrap();
        events.run_with_timeout(1000).unwrap();
        assert_eq!(lock(&serial).fifo_capacity(), 0, "the FIFO fills up");
        // With the FIFO full the input is not polled, although bytes wait in the pipe.
        events.run_with_timeout(1000).unwrap();
        assert!(!lock(&input).polling_input);

        let mut received = drain(&serial);
        assert_eq!(received.len(), 64);
        // Draining signals the pump, which resumes polling and moves the rest.
        events.run_with_timeout(1000).unwrap();
        events.run_with_timeout(1000).unwrap();
        received.extend(drain(&serial));
        assert_eq!(received, sent);

        drop(writer);
        events.run_with_timeout(1000).unwrap();
        let input = lock(&input);
        assert!(input.closed && !input.polling_input);
    }

    #[test]
    fn registers_and_unread_input_survive_a_snapshot() {
        let (mut serial, _, _) = serial_with(Box::new(io::sink()));
        serial.write(IER, &[0x1]);
        serial.write(7, &[0x5a]); // scratch register
        assert_eq!(serial.enqueue(b"abc"), 3);
        let saved = serial.snapshot();
        let sink = SharedSink::default();
        let mut restored = Serial::restored(&saved, eventfd(), eventfd(), Box::new(sink.clone())).unwrap();
        assert_eq!(restored.snapshot(), saved);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut b = [0u8];
            restored.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"abc");
        restored.write(DATA, b"z");
        assert_eq!(&*lock(&sink.0), b"z", "output goes to the new sink");

        let mut too_much = saved;
        too_much.in_buffer = vec![0; 65];
        assert!(Serial::restored(&too_much, eventfd(), eventfd(), Box::new(io::sink())).is_err());
    }

    #[test]
    fn input_beyond_the_fifo_is_not_queued() {
        let (mut serial, _, _) = serial_with(Box::new(io::sink()));
        let room = serial.fifo_capacity();
        assert_eq!(serial.enqueue(&vec![b'x'; room + 10]), room);
        assert_eq!(serial.fifo_capacity(), 0);
        assert_eq!(serial.enqueue(b"y"), 0);
    }
}
