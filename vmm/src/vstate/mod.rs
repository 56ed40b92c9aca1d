//! KVM state: the VM file descriptor with its irqchip, PIT and memory slots,
//! the vCPUs and their threads, and how the VM is told to stop.

pub mod exit;
pub mod kvm;
pub mod state;
pub mod vcpu;
