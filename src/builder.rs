//! Configure a sandbox's VM (image, resources, policy, network, data
//! directory) and start it; or boot one, run one command, power it off.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use net::NetConfig;
use policy::{Engine, Layer, Policy, ProfileSource};

use crate::command::{Command, Status};
use crate::image::BootImage;
use crate::instance::{Instance, InstanceConfig};
use crate::{paths, Error, Image, MEMORY_MIB_RANGE, VCPUS_RANGE};

/// What [`SandboxBuilder::run`] produced.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOutput {
    pub status: Status,
    /// The command's standard output, unless streamed with [`Command::stdout_to`]:
    /// its first [`Command::output_limit`] bytes.
    pub stdout: Vec<u8>,
    /// The command's standard error, likewise.
    pub stderr: Vec<u8>,
    /// The command wrote more to standard output than the limit; the rest was
    /// read from the guest and discarded (the command was not stopped).
    pub stdout_truncated: bool,
    /// The same for standard error.
    pub stderr_truncated: bool,
    /// The guest kernel's and init's console log (the last 64 KiB).
    pub console: Vec<u8>,
    /// The sandbox's id (its directory and `session.db` are kept under it).
    pub id: String,
    /// The sandbox's `session.db`: every DNS query and connection attempt.
    pub session_db: PathBuf,
    /// From power-on until the guest agent answered.
    pub boot_time: Duration,
    /// From power-on until the VM stopped.
    pub total_time: Duration,
}

/// Configures a sandbox's VM: [`Self::start`] boots it and returns it
/// running; [`Self::run`] boots it for one command. What runs in it, and
/// how, is a [`Command`].
pub struct SandboxBuilder {
    image: Image,
    memory_mib: u32,
    vcpus: u8,
    kernel: Option<PathBuf>,
    profiles: Vec<(Layer, ProfileSource)>,
    policy: Option<Policy>,
    net: NetConfig,
    console: Option<Box<dyn Write + Send>>,
    data_dir: Option<PathBuf>,
    label: Vec<String>,
    detached: bool,
    disk_mib: Option<u32>,
    jail: Option<crate::Jail>,
    boot: Option<BootImage>,
}

impl std::fmt::Debug for SandboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxBuilder")
            .field("image", &self.image)
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("profiles", &self.profiles)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl SandboxBuilder {
    pub(crate) fn new(image: Image) -> Self {
        SandboxBuilder {
            image,
            memory_mib: 256,
            vcpus: 1,
            kernel: None,
            profiles: Vec::new(),
            policy: None,
            net: NetConfig::default(),
            console: None,
            data_dir: None,
            label: Vec::new(),
            detached: false,
            disk_mib: None,
            jail: None,
            boot: None,
        }
    }

    /// Guest RAM in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Size of the guest's writable root layer in MiB (default: half the
    /// guest memory). It is a tmpfs in guest RAM, so it can be no larger
    /// than the memory; nothing the guest writes reaches the host's disk.
    pub fn disk_mib(mut self, mib: u32) -> Self {
        self.disk_mib = Some(mib);
        self
    }
    /// Number of vCPUs (default 1).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }
    /// Boot this kernel instead of the built one.
    pub fn kernel(mut self, vmlinux: impl Into<PathBuf>) -> Self {
        self.kernel = Some(vmlinux.into());
        self
    }
    /// Add a policy profile (a file path or a built-in name such as `dev`) at
    /// the user layer. Without any, the built-in `deny-all` applies.
    pub fn profile(mut self, profile: &str) -> Self {
        self.profiles.push((Layer::User, ProfileSource::from_arg(profile)));
        self
    }
    /// Add a profile at a given layer (corporate profiles can lock sections).
    pub fn profile_at(mut self, layer: Layer, source: ProfileSource) -> Self {
        self.profiles.push((layer, source));
        self
    }
    /// Use this policy (for example one with an `ask` callback) instead of profiles.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }
    /// Network handler settings: upstream DNS, extra roots, allowed internal networks.
    pub fn net_config(mut self, net: NetConfig) -> Self {
        self.net = net;
        self
    }
    /// Stream the guest console log (kernel messages) here as it arrives.
    pub fn console(mut self, sink: impl Write + Send + 'static) -> Self {
        self.console = Some(Box::new(sink));
        self
    }
    /// Keep the sandbox's directory (sockets, `session.db`) under this data
    /// directory instead of the default ([`paths::data_dir`]:
    /// `$SANDBOX_DATA`, else `~/.local/share/sandbox`). The sandbox CA stays
    /// where [`NetConfig::ca_dir`] says.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }
    /// What `sandbox ps` shows as this sandbox's command ([`Self::run`] sets it).
    pub fn label<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.label = argv.into_iter().map(Into::into).collect();
        self
    }
    /// This process exists only to hold the sandbox (as the background
    /// process of `sandbox run -d` does): [`crate::Sandbox::stop`] from
    /// another process may kill it when the guest does not power off.
    /// Never set this in an application that does other work.
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Confine the process that holds the sandbox: its own uid, namespaces,
    /// file system, cgroup limits, no capabilities, seccomp filters (see
    /// [`crate::Jail`] and the README's threat model). Needs root.
    ///
    /// Only for a process that exists to hold this one sandbox, such as the
    /// `sandbox` CLI: [`Self::start`] must be called while the process has a
    /// single thread; it forks, and returns only in the confined child. The
    /// calling process waits for that child and exits as it does. An
    /// application that does other work must not use this.
    pub fn jail(mut self, jail: crate::Jail) -> Self {
        self.jail = Some(jail);
        self
    }

    fn check(&self) -> Result<(), Error> {
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return Err(Error::Config(format!(
                "memory must be between {} and {} MiB, not {}",
                MEMORY_MIB_RANGE.start(),
                MEMORY_MIB_RANGE.end(),
                self.memory_mib
            )));
        }
        if let Some(disk) = self.disk_mib.filter(|&d| d == 0 || d > self.memory_mib) {
            return Err(Error::Config(format!(
                "the writable layer ({disk} MiB) lives in guest memory: give it between 1 and {} MiB",
                self.memory_mib
            )));
        }
        if !VCPUS_RANGE.contains(&self.vcpus) {
            return Err(Error::Config(format!(
                "vCPUs must be between {} and {}, not {}",
                VCPUS_RANGE.start(),
                VCPUS_RANGE.end(),
                self.vcpus
            )));
        }
        Ok(())
    }

    /// The image to boot, resolved (and, for an OCI image, pulled) once.
    fn boot_image(&mut self) -> Result<&BootImage, Error> {
        if self.boot.is_none() {
            self.boot = Some(self.image.boot()?);
        }
        self.boot.as_ref().ok_or_else(|| Error::Config("no boot image".into()))
    }

    /// Boot the sandbox and return it running, once its agent answers.
    pub fn start(mut self) -> Result<Instance, Error> {
        self.check()?;
        self.boot_image()?;
        let policy = match self.policy.take() {
            Some(p) => p,
            None if self.profiles.is_empty() => Policy::new(Engine::builtin("deny-all")?),
            None => Policy::new(Engine::load_layers(&self.profiles)?),
        };
        let kernel = match self.kernel.take() {
            Some(k) => k,
            None => paths::kernel()?,
        };
        let boot = self.boot.take().ok_or_else(|| Error::Config("no boot image".into()))?;
        let mut cmdline = format!(
            "{} root=/dev/vda ro rootfstype={} init=/sbin/sandbox-init",
            vmm::cmdline::base_args(),
            boot.rootfs.kernel_name()
        );
        if let Some(disk) = self.disk_mib {
            cmdline.push_str(&format!(" sandbox.disk={disk}"));
        }
        if boot.image_disk.is_some() {
            // guest-init overlays the second disk as the root (see guest-init/src/mounts.rs).
            cmdline.push_str(" sandbox.image=/dev/vdb");
        }
        Instance::start(InstanceConfig {
            image_name: self.image.to_string(),
            label: self.label,
            image_config: boot.config,
            detached: self.detached,
            data_dir: self.data_dir.unwrap_or_else(paths::data_dir),
            kernel,
            root_disk: boot.root_disk,
            extra_disks: boot.image_disk.into_iter().collect(),
            cmdline,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            policy,
            net: self.net,
            console: self.console,
            jail: self.jail,
        })
    }

    /// Boot the sandbox, run `command` in it to its end, power it off.
    ///
    /// With an OCI image its config applies as `docker run` applies it: the
    /// entrypoint goes before the command's arguments (`Cmd` when there are
    /// none), its `Env` comes first (variables set on the command win), and
    /// its `WorkingDir` and `User` hold unless set on the command. Past the
    /// command's [`Command::timeout`] the VM is stopped and the status is
    /// [`Status::TimedOut`].
    pub fn run(mut self, command: Command) -> Result<RunOutput, Error> {
        self.check()?;
        let command = command.image_entrypoint();
        // A command that cannot run is refused before anything boots.
        let argv = command.to_exec(self.boot_image()?.config.as_ref())?.argv;
        if self.label.is_empty() {
            self.label = argv;
        }
        let instance = self.start()?;
        let stop = instance.stop_handle();
        let output = instance.collect(command, |_| {
            stop.stop();
            Ok(())
        });
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                let _ = instance.shutdown();
                return Err(e);
            }
        };
        let (id, session_db, boot_time) = (instance.id().to_string(), instance.session_db(), instance.boot_time());
        let powered_on = instance.started_at();
        let console = instance.shutdown()?;
        let total_time = powered_on.elapsed();
        Ok(RunOutput {
            status: output.status,
            stdout: output.stdout,
            stderr: output.stderr,
            stdout_truncated: output.stdout_truncated,
            stderr_truncated: output.stderr_truncated,
            console,
            id,
            session_db,
            boot_time,
            total_time,
        })
    }
}
