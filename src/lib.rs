//! The sandbox runtime: run a command in a KVM microVM whose only way out is
//! what the host allows.
//!
//! ```no_run
//! use std::time::Duration;
//! use sandbox::{Image, Sandbox};
//!
//! let run = Sandbox::builder(Image::Default)
//!     .memory_mib(256)
//!     .vcpus(1)
//!     .env("GREETING", "hello")
//!     .timeout(Duration::from_secs(60))
//!     .run(["/bin/sh", "-c", "echo $GREETING; uname -a"])?;
//! print!("{}", String::from_utf8_lossy(&run.stdout));
//! assert_eq!(run.status, sandbox::Status::Exited(0));
//! # Ok::<(), sandbox::Error>(())
//! ```

mod error;
mod image;
pub mod paths;
pub mod agent;
pub mod ask;
mod console;
mod instance;
pub mod registry;
mod run;
pub mod terminal;
pub mod verify;

pub use error::Error;
pub use image::{image_store, Image, RootFs};
pub use sandbox_rootfs as rootfs;
pub use guest_protocol::agent::{Exec, WinSize};
pub use instance::Instance;
pub use registry::{SandboxRef, SandboxState};
pub use run::{RunOutput, Sandbox, SandboxBuilder, Status, DEFAULT_OUTPUT_LIMIT};
pub use sandbox_net::{NetConfig, UpstreamProxy};
pub use sandbox_policy as policy;

/// Guest memory bounds, in MiB (the VMM's).
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = vmm::MIN_MEMORY_MIB..=vmm::MAX_MEMORY_MIB;
/// vCPU count bounds (the VMM's).
pub const VCPUS_RANGE: std::ops::RangeInclusive<u8> = 1..=vmm::MAX_VCPUS;
