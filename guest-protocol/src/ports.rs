//! The addresses host and guest agree on: vsock context ids, the vsock ports
//! of the host's handlers and of the guest agent, and the guest-local ports
//! the guest's proxies listen on.
//!
//! The guest has no network device: every byte that leaves it goes over
//! virtio-vsock, to the host ([`HOST_CID`]) on one of the ports below. On the
//! host side the VMM hands a guest-initiated connection to host port P to the
//! Unix socket named by [`crate::sandbox_dir::vsock_port_socket_name`].

/// The host's vsock context id, as every guest sees it (`VMADDR_CID_HOST`).
/// The guest's proxies connect to it; the VMM drops packets to any other CID.
pub const HOST_CID: u32 = 2;

/// The guest's vsock context id. The host configures the VMM's vsock device
/// with it; every sandbox uses the same value, since each VM has its own
/// in-process vsock device and nothing routes between sandboxes.
pub const GUEST_CID: u32 = 3;

/// Guest vsock port of the agent. The guest's init listens on it; the host
/// connects to it (`CONNECT 5000` on the VMM's `vsock.sock`).
pub const AGENT_PORT: u32 = 5000;

/// Host vsock port of the connection (MITM) handler. The guest's net-proxy
/// connects to it once per redirected TCP connection and sends a
/// [`crate::proxy_header`] line first; the host's MITM handler receives it.
pub const MITM_PORT: u32 = 5002;

/// Host vsock port of the DNS handler. The guest's dns-proxy keeps one
/// connection to it and pipelines queries on it in [`crate::dns_framing`];
/// the host's DNS handler answers in the same framing.
pub const DNS_PORT: u32 = 5007;

/// Guest-local port of dns-proxy (UDP and TCP on 127.0.0.1). The guest's init
/// redirects port 53 here with nftables, binds it, and hands the sockets to
/// dns-proxy ([`DNS_UDP_SOCKET_FD`], [`DNS_TCP_SOCKET_FD`]).
pub const DNS_PROXY_PORT: u16 = 1053;

/// Guest-local port of net-proxy (TCP on 127.0.0.1). The guest's init
/// redirects port 443, and any other TCP leaving through the uplink, here,
/// binds it, and hands the listener to net-proxy ([`NET_SOCKET_FD`]).
pub const NET_PROXY_PORT: u16 = 10443;

/// Where `sandbox-proxy` (dns-proxy and net-proxy in one process) finds the
/// listening sockets init bound for it before starting it: the UDP socket on
/// [`DNS_PROXY_PORT`]. Init keeps the sockets, so what the guest sends while
/// the proxy starts, or restarts, waits in them instead of being refused.
pub const DNS_UDP_SOCKET_FD: std::os::fd::RawFd = 3;
/// The TCP listener on [`DNS_PROXY_PORT`] (see [`DNS_UDP_SOCKET_FD`]).
pub const DNS_TCP_SOCKET_FD: std::os::fd::RawFd = 4;
/// The TCP listener on [`NET_PROXY_PORT`] (see [`DNS_UDP_SOCKET_FD`]).
pub const NET_SOCKET_FD: std::os::fd::RawFd = 5;
/// The write end of a pipe to init: `sandbox-proxy` writes one byte to it
/// once it serves its sockets, and closes it.
pub const PROXY_READY_FD: std::os::fd::RawFd = 6;
