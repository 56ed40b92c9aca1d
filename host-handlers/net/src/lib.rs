//! Host handlers on the vsock ports.
