//! Confinement of the process that holds a sandbox (its VMM, vCPU threads
//! and host handlers): the layers that stand between a guest that has found
//! a bug in code parsing its bytes and the rest of the host.

pub mod cgroup;
mod error;
pub mod host;
pub mod namespaces;
pub mod privileges;
pub mod root;
pub mod seccomp;
pub mod uids;

pub use error::Error;
