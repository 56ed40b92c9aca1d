//! virtio-vsock, emulated in the VMM process, with Unix sockets on the host.
//!
//! The guest's only channel to the host. There is no vhost-vsock on the
//! machines this runs on, so the device is emulated here, as Firecracker does:
//!
//! - [`packet`]: packets in guest memory (header and payload over any
//!   descriptor layout), with every chain validated.
//! - [`connection`]: one stream connection's state machine and credit-based
//!   flow control in both directions.
//! - [`muxer`]: the host side: connections keyed by (host port, guest port),
//!   Firecracker's `vsock.sock` / `vsock.sock_<port>` convention, and an
//!   epoll descriptor for the event loop.
//! - [`unix`]: non-blocking Unix connects and the `CONNECT <port>` handshake.
//! - [`VsockBackend`]: what the device needs from its host side (the muxer,
//!   or a fake in tests).
//! - [`Vsock`]: the virtio device (type 19; rx, tx and event queues; config
//!   space holds the guest CID).
//!
//! Everything from the guest is hostile: malformed chains are refused,
//! packets with a wrong source or destination CID are dropped, packets for
//! unknown connections are reset, and every buffer and table is bounded.

pub mod backend;
pub mod connection;
mod device;
pub mod muxer;
pub mod packet;
pub mod unix;

use std::path::PathBuf;

pub use backend::VsockBackend;
pub use device::{process_rx, process_tx, Vsock, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
pub use muxer::{Limits, Muxer};

/// A VM's vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more; each VM on a host needs its own).
    pub guest_cid: u32,
    /// The host socket for host-initiated connections (`<dir>/vsock.sock`);
    /// guest connections to host port `P` go to `<uds_path>_P`. The
    /// directory should be private to the sandbox (mode 0700).
    pub uds_path: PathBuf,
}
