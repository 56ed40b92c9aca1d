//! The part of the i8042 keyboard controller the guest uses to reboot.
//!
//! With `reboot=k` Linux resets the machine by writing the "pulse reset line"
//! command (0xfe) to the command port 0x64, after polling the status register
//! until the controller's input buffer is empty. The status register therefore
//! always reads 0 (nothing pending), the data port reads 0, and the reset
//! command asks the VMM to end the VM. Everything else is ignored: the guest
//! has no keyboard.

use crate::devices::bus::BusDevice;

/// Offset of the command/status port from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
/// Command byte: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; calls `on_reset` when the guest asks for a CPU reset.
pub struct I8042<F: FnMut() + Send> {
    on_reset: F,
}

impl<F: FnMut() + Send> std::fmt::Debug for I8042<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl<F: FnMut() + Send> I8042<F> {
    /// A controller that reports reset requests to `on_reset`.
    pub fn new(on_reset: F) -> Self {
        Self { on_reset }
    }
}

impl<F: FnMut() + Send> BusDevice for I8042<F> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_on_the_command_port_resets() {
        let mut resets = 0;
        {
            let mut dev = I8042::new(|| resets += 1);
            dev.write(0, &[CMD_RESET_CPU]);
            dev.write(COMMAND_OFFSET, &[0xd1]);
            dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
            dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        }
        assert_eq!(resets, 1);
    }

    #[test]
    fn status_reads_as_idle_so_the_guest_does_not_wait() {
        let mut dev = I8042::new(|| {});
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
