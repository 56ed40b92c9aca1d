//! How a running VM is asked to end, and why it ended.
//!
//! Anything may ask: the guest (reboot through the i8042, a triple fault), a
//! vCPU that hit a fatal KVM error, or the host through a [`StopHandle`]. The
//! first request decides the outcome; it sets a flag the vCPU threads check
//! between exits and wakes the event loop through an eventfd, which then
//! kicks the vCPUs out of KVM_RUN and joins them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{io, Error, Result};
use crate::lock;

/// Why [`crate::Vm::run`] returned without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or rebooted (a reboot is treated as power-off).
    GuestShutdown,
    /// The host asked the VM to stop through a [`StopHandle`].
    StopRequested,
}

/// The shared "this VM is ending" state.
#[derive(Debug)]
pub struct ExitSignal {
    event: EventFd,
    stopping: AtomicBool,
    outcome: Mutex<Option<Result<ExitReason>>>,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> Result<Self> {
        Ok(Self {
            event: EventFd::new(EFD_NONBLOCK).map_err(io("creating the exit eventfd"))?,
            stopping: AtomicBool::new(false),
            outcome: Mutex::new(None),
        })
    }

    /// Asks the VM to end; the first outcome requested is the one reported.
    pub fn request(&self, outcome: Result<ExitReason>) {
        {
            let mut slot = lock(&self.outcome);
            if slot.is_none() {
                *slot = Some(outcome);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            warn!("cannot wake the event loop to stop the VM: {e}");
        }
    }

    /// Whether the VM has been asked to end.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The requested outcome (taken once).
    pub fn take_outcome(&self) -> Option<Result<ExitReason>> {
        lock(&self.outcome).take()
    }
}

/// Wakes the event loop when the VM is asked to end.
#[derive(Debug)]
pub struct ExitSubscriber(pub Arc<ExitSignal>);

impl MutEventSubscriber for ExitSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            // Without the eventfd the loop would never wake up to stop.
            self.0.request(Err(Error::EventLoop(e)));
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event.read();
    }
}

/// Asks a VM to stop from any thread. Does nothing once the VM is gone.
#[derive(Clone, Debug)]
pub struct StopHandle(Weak<ExitSignal>);

impl StopHandle {
    pub(crate) fn new(signal: &Arc<ExitSignal>) -> Self {
        Self(Arc::downgrade(signal))
    }

    /// Stops the VM: [`crate::Vm::run`] returns [`ExitReason::StopRequested`]
    /// unless the VM was already ending for another reason.
    pub fn stop(&self) {
        if let Some(signal) = self.0.upgrade() {
            signal.request(Ok(ExitReason::StopRequested));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins_and_wakes_the_loop() {
        let signal = Arc::new(ExitSignal::new().unwrap());
        assert!(!signal.is_stopping());
        let handle = StopHandle::new(&signal);
        handle.stop();
        signal.request(Ok(ExitReason::GuestShutdown));
        assert!(signal.is_stopping());
        assert_eq!(signal.event.read().unwrap(), 2);
        assert!(matches!(signal.take_outcome(), Some(Ok(ExitReason::StopRequested))));
        assert!(signal.take_outcome().is_none());
    }

    #[test]
    fn errors_are_kept_as_outcomes() {
        let signal = ExitSignal::new().unwrap();
        signal.request(Err(Error::VcpuPanic(3)));
        signal.request(Ok(ExitReason::GuestShutdown));
        assert!(matches!(signal.take_outcome(), Some(Err(Error::VcpuPanic(3)))));
    }

    #[test]
    fn a_stop_handle_outliving_its_vm_does_nothing() {
        let signal = Arc::new(ExitSignal::new().unwrap());
        let handle = StopHandle::new(&signal);
        let clone = handle.clone();
        drop(signal);
        handle.stop();
        clone.stop();
    }

    #[test]
    fn stop_handles_work_from_other_threads() {
        let signal = Arc::new(ExitSignal::new().unwrap());
        let handle = StopHandle::new(&signal);
        std::thread::spawn(move || handle.stop()).join().unwrap();
        assert!(signal.is_stopping());
    }
}
