//! The interface between the vsock device and its host side.
//!
//! The device moves packets between the guest's queues and a
//! [`VsockBackend`]; the backend decides where they go on the host. The
//! production backend is the Unix-socket [`Muxer`](super::Muxer); tests use
//! fakes to drive the device's queue handling without host sockets.

use std::os::fd::AsRawFd;

use super::packet::Header;

/// The host side of a vsock device, as in Firecracker's `VsockBackend`.
///
/// The backend's descriptor ([`AsRawFd`]) is polled by the device's event
/// loop; when it is readable the device calls
/// [`process_events`](VsockBackend::process_events) and then offers the
/// guest whatever became pending.
pub trait VsockBackend: AsRawFd + Send {
    /// Handles a packet from the guest.
    fn send_pkt(&mut self, header: &Header, payload: &[u8]);
    /// Handles a packet from the guest whose header was readable but whose
    /// payload was not (too long, or cut short).
    fn reject_pkt(&mut self, header: &Header);
    /// The next packet for the guest, its payload (at most `buf.len()`
    /// bytes) in `buf`; `None` if nothing is waiting.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(Header, usize)>;
    /// Whether a packet is waiting for an rx buffer.
    fn has_pending_rx(&self) -> bool;
    /// Whether the device should stop taking tx packets until rx drains.
    fn rx_backlogged(&self) -> bool {
        false
    }
    /// Handles whatever made the descriptor readable.
    fn process_events(&mut self);
    /// Forgets every connection (the driver reset the device).
    fn reset(&mut self);
}
