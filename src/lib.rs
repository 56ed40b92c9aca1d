//! The sandbox runtime: run commands in a KVM microVM whose only way out is
//! what the host allows.
//!
//! [`SandboxBuilder`] configures the VM (image, resources, policy, network,
//! data directory); [`SandboxBuilder::start`] boots it and returns an
//! [`Instance`], which derefs to the [`Sandbox`] handle. A [`Command`] says
//! what to run; [`Sandbox::spawn`] starts it as a [`Process`] (wait,
//! signal, resize, stream its input and output) and [`Sandbox::output`]
//! runs it to its end. [`Sandbox::events`] follows what the guest tried to
//! reach. [`Sandbox::find`] gives the same handle for a sandbox another
//! process holds.
//!
//! ```no_run
//! use std::io::Read;
//! use sandbox::{Command, Image, Sandbox};
//!
//! let instance = Sandbox::builder(Image::Default).memory_mib(256).profile("dev").start()?;
//! let out = instance.output(Command::new("uname").arg("-a"))?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//!
//! let mut tail = instance.spawn(Command::new("sh").args(["-c", "echo started; sleep 600"]))?;
//! let mut line = [0u8; 8];
//! tail.take_stdout().expect("piped").read_exact(&mut line)?;
//! tail.signal(libc::SIGTERM)?;
//! assert_eq!(tail.wait()?, 128 + libc::SIGTERM);
//! for event in instance.events()?.take(1) {
//!     println!("{}", event?.to_text());
//! }
//! instance.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod agent;
mod builder;
mod command;
mod confine;
mod console;
mod control;
mod error;
mod events;
pub mod holder;
mod image;
mod instance;
pub mod paths;
mod pool;
mod ports;
mod process;
mod sandbox;
pub mod snapshot;
pub mod terminal;
pub mod verify;
pub mod warm;

pub use agent::AgentError;
pub use builder::{RunOutput, SandboxBuilder};
pub use command::{Command, Output, Status, DEFAULT_OUTPUT_LIMIT};
pub use confine::{Jail, DEFAULT_MEMORY_OVERHEAD_MIB};
pub use error::Error;
pub use events::Events;
pub use guest_protocol::agent::{Entry, EntryKind, FsErrorKind, WinSize};
pub use image::{image_store, Image, RootFs};
pub use instance::Instance;
pub use jail::host::HostSupport;
pub use net::{NetConfig, UpstreamProxy};
pub use policy;
pub use pool::Pool;
pub use ports::{PortForward, PortSpec, CONNECT_PORT_LISTENER};
pub use process::{Process, ProcessControl, ProcessOutput, ProcessStdin};
pub use rootfs;
pub use sandbox::{valid_id, HostUsage, Sandbox, SandboxState};
pub use snapshot::Snapshot;
pub use telemetry::query::{InboundRow, LogRow};
pub use vmm::AfterSnapshot;

/// Guest memory bounds, in MiB (the VMM's).
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = vmm::MIN_MEMORY_MIB..=vmm::MAX_MEMORY_MIB;
/// vCPU count bounds (the VMM's).
pub const VCPUS_RANGE: std::ops::RangeInclusive<u8> = 1..=vmm::MAX_VCPUS;
