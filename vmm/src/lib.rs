//! KVM virtual machine monitor for sandbox guests.
