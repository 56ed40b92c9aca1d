//! Configure a sandbox's VM (image, resources, policy, network, data
//! directory) and start it; or boot one, run one command, power it off.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use net::NetConfig;
use policy::{Engine, Layer, Policy, ProfileSource};

use crate::command::{Command, OutputSink, Status, StdinSource};
use crate::holder::{CommandSpec, HolderProgram, HolderSpec};
use crate::image::BootImage;
use crate::instance::{new_id, Instance, InstanceConfig};
use crate::snapshot::Snapshot;
use crate::{paths, Error, Image, Jail, Sandbox, MEMORY_MIB_RANGE, VCPUS_RANGE};

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

/// Configures a sandbox's VM: [`Self::spawn`] boots it in a confined
/// process of its own and returns it running; [`Self::start`] boots it in
/// this process; [`Self::run`] boots it here for one command. What runs in
/// it, and how, is a [`Command`].
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
    jail: Option<Jail>,
    unconfined: bool,
    holder: Option<HolderProgram>,
    timeout: Option<Duration>,
    id: Option<String>,
    restore: Option<Snapshot>,
    warm: bool,
    boot: Option<BootImage>,
    forwards: Vec<(std::net::TcpListener, u16)>,
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
            unconfined: false,
            holder: None,
            timeout: None,
            id: None,
            restore: None,
            warm: false,
            boot: None,
            forwards: Vec::new(),
        }
    }

    /// Forward connections to `listener` (bound by the caller: see
    /// [`crate::PortSpec::bind`]) to the guest's `127.0.0.1:guest_port`
    /// once the sandbox is ready, until it stops; repeatable. (For a
    /// running sandbox: [`Sandbox::forward_port`].)
    pub fn forward(mut self, listener: std::net::TcpListener, guest_port: u16) -> Self {
        self.forwards.push((listener, guest_port));
        self
    }

    /// A sandbox restored from `snapshot`: its image, memory and vCPUs are
    /// the snapshot's ([`crate::Sandbox::from_snapshot`]).
    pub(crate) fn restoring(snapshot: Snapshot) -> Self {
        let mut builder = SandboxBuilder::new(Image::parse(&snapshot.image));
        builder.memory_mib = snapshot.memory_mib;
        builder.vcpus = snapshot.vcpus;
        builder.restore = Some(snapshot);
        builder
    }

    /// The image the sandbox runs (a restored one: the snapshot's).
    pub fn image(&self) -> &Image {
        &self.image
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
    /// Use this policy (for example one with an `ask` callback) instead of
    /// profiles. Profiles given as well are only recorded (in `state.json`,
    /// for forks of the sandbox) as where the policy came from.
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
    /// Keep the sandbox's directory (sockets, `session.db`, its CA's
    /// certificate `ca.pem`) under this data directory instead of the
    /// default ([`paths::data_dir`]: `$SANDBOX_DATA`, else
    /// `~/.local/share/sandbox`). A CA pinned with [`NetConfig::ca_dir`]
    /// stays where that says.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }
    /// What `sandbox ps` shows as this sandbox's command ([`Self::run`] sets it).
    pub fn label<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.label = argv.into_iter().map(Into::into).collect();
        self
    }
    /// This process exists only to hold the sandbox (a holder):
    /// [`crate::Sandbox::stop`] from another process may kill it when the
    /// guest does not power off.
    pub(crate) fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Start the sandbox under this id (a holder's, chosen by [`Self::spawn`]).
    pub(crate) fn with_id(mut self, id: String) -> Self {
        self.id = Some(id);
        self
    }

    /// How the process that holds the sandbox confines itself (see
    /// [`Jail`] and the README's threat model); needs root.
    ///
    /// With [`Self::spawn`] this sets the holder's limits (without it, the
    /// holder gets [`Jail::default`]).
    ///
    /// With [`Self::start`] it confines *this* process, which must exist to
    /// hold this one sandbox (as the `sandbox` CLI's `run` does):
    /// [`Self::start`] must be called while the process has a single
    /// thread; it forks, and returns only in the confined child. The
    /// calling process waits for that child and exits as it does. An
    /// application that does other work uses [`Self::spawn`] instead.
    pub fn jail(mut self, jail: Jail) -> Self {
        self.jail = Some(jail);
        self
    }

    /// With [`Self::spawn`]: do not confine the holder; it runs with the
    /// caller's privileges. UNSAFE: a guest that finds a bug in the VMM or
    /// a network handler then owns the host. For debugging, or a host
    /// where confinement cannot work (`sandbox doctor` says why).
    pub fn unconfined(mut self) -> Self {
        self.unconfined = true;
        self
    }

    /// With [`Self::spawn`]: the program that holds the sandbox, and the
    /// arguments it needs (the `sandbox` CLI passes itself and `holder`).
    /// Default: `$SANDBOX_HOLDER`, else `sandbox-holder` beside the running
    /// program, else on `PATH`.
    pub fn holder_program<S: Into<OsString>>(
        mut self,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.holder = Some(HolderProgram { program: program.into(), args: args.into_iter().map(Into::into).collect() });
        self
    }

    /// With [`Self::spawn`]: stop the sandbox this long after it is ready.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Start from a snapshot of a freshly booted, idle sandbox of the same
    /// kernel, image, memory, vCPUs and writable-layer size, kept in the
    /// cache ([`crate::warm`]); when there is none, one is made first (a
    /// cold boot in a holder, confined as [`Self::spawn`] confines, so it
    /// needs the holder program and, unless [`Self::unconfined`], root).
    /// The sandbox then starts as from [`crate::Sandbox::from_snapshot`]:
    /// its guest has booted once, in the sandbox that made the snapshot,
    /// and gets its own identity when restored.
    pub fn warm(mut self) -> Self {
        self.warm = true;
        self
    }

    /// The kernel to boot: the one set, else the built one.
    fn kernel_path(&self) -> Result<PathBuf, Error> {
        match &self.kernel {
            Some(k) => Ok(k.clone()),
            None => paths::kernel(),
        }
    }

    /// The kernel command line for `boot`.
    fn cmdline(&self, boot: &BootImage) -> String {
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
        cmdline
    }

    /// With [`Self::warm`]: restore from the warm snapshot (made now if
    /// there is none).
    fn resolve_warm(&mut self) -> Result<(), Error> {
        if !self.warm || self.restore.is_some() {
            return Ok(());
        }
        let kernel = self.kernel_path()?;
        let boot = self.boot_image()?.clone();
        let disks: Vec<PathBuf> = std::iter::once(&boot.root_disk).chain(&boot.image_disk).cloned().collect();
        let cmdline = self.cmdline(&boot);
        let settings = crate::warm::WarmSettings {
            kernel: &kernel,
            disks: &disks,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disk_mib: self.disk_mib,
            cmdline: &cmdline,
        };
        let snapshot = crate::warm::snapshot(&settings, |data_dir| {
            let mut maker = SandboxBuilder::new(self.image.clone())
                .memory_mib(self.memory_mib)
                .vcpus(self.vcpus)
                .kernel(kernel.clone())
                .data_dir(data_dir);
            maker.disk_mib = self.disk_mib;
            maker.boot = Some(boot.clone());
            maker.holder = self.holder.clone();
            maker.jail = self.jail.clone();
            maker.unconfined = self.unconfined;
            maker.spawn()
        })?;
        self.restore = Some(snapshot);
        Ok(())
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
        self.resolve_warm()?;
        if self.restore.is_none() {
            self.boot_image()?;
        }
        let policy = match self.policy.take() {
            Some(p) => p,
            None if self.profiles.is_empty() => Policy::new(Engine::builtin("deny-all")?),
            None => Policy::new(Engine::load_layers(&self.profiles)?),
        };
        if let Some(snapshot) = self.restore.take() {
            return self.start_restored(policy, snapshot);
        }
        let kernel = self.kernel_path()?;
        let boot = self.boot.take().ok_or_else(|| Error::Config("no boot image".into()))?;
        let cmdline = self.cmdline(&boot);
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
            profiles: self.profiles,
            net: self.net,
            console: self.console,
            jail: self.jail,
            id: self.id,
            restore: None,
            forwards: self.forwards,
        })
    }

    fn start_restored(self, policy: Policy, snapshot: Snapshot) -> Result<Instance, Error> {
        snapshot.check_files()?;
        if self.memory_mib != snapshot.memory_mib || self.vcpus != snapshot.vcpus {
            return Err(Error::Config(format!(
                "a sandbox restored from {} has the snapshot's {} MiB and {} vCPUs",
                snapshot.dir.display(),
                snapshot.memory_mib,
                snapshot.vcpus
            )));
        }
        let (root_disk, extra_disks) = snapshot
            .disks
            .split_first()
            .map(|(root, extra)| (root.clone(), extra.to_vec()))
            .ok_or_else(|| Error::Config(format!("the snapshot {} has no disk", snapshot.dir.display())))?;
        Instance::start(InstanceConfig {
            image_name: snapshot.image.clone(),
            label: self.label,
            image_config: snapshot.image_config.clone(),
            detached: self.detached,
            data_dir: self.data_dir.unwrap_or_else(paths::data_dir),
            kernel: snapshot.kernel.clone(),
            root_disk,
            extra_disks,
            cmdline: String::new(),
            memory_mib: snapshot.memory_mib,
            vcpus: snapshot.vcpus,
            policy,
            profiles: self.profiles,
            net: self.net,
            console: self.console,
            jail: self.jail,
            id: self.id,
            restore: Some(snapshot),
            forwards: self.forwards,
        })
    }

    /// Boot the sandbox in a holder process of its own and return it once
    /// its agent answers. The holder is confined (its own uid, namespaces
    /// and file system, cgroup limits, no capabilities, seccomp filters;
    /// see [`Self::jail`]) unless [`Self::unconfined`], so this needs root.
    /// It runs until [`Sandbox::stop`], the guest powers off, or
    /// [`Self::timeout`] passes, whatever becomes of this process; its log
    /// is the sandbox's `sandbox.log`.
    ///
    /// The policy must come from profiles ([`Self::profile`],
    /// [`Self::profile_at`]): a [`Policy`] object (with an `ask` callback)
    /// cannot cross to another process, nor can a [`Self::console`] sink.
    pub fn spawn(self) -> Result<Sandbox, Error> {
        self.spawn_holder(None)
    }

    /// [`Self::spawn`], and the holder runs `command` once the sandbox is
    /// ready, its output in the sandbox's `output.log`; the sandbox stops
    /// when the command ends. The command's arguments, environment,
    /// directory, user and [`Command::image_entrypoint`] apply; its streams
    /// and terminal cannot be set.
    pub fn spawn_running(self, command: Command) -> Result<Sandbox, Error> {
        let streams_set = !matches!(command.stdin, StdinSource::Null)
            || !matches!(command.stdout, OutputSink::Piped)
            || !matches!(command.stderr, OutputSink::Piped)
            || command.tty.is_some()
            || command.terminal;
        if streams_set {
            return Err(Error::Config(
                "a spawned sandbox's command writes to its output.log: its streams and terminal cannot be set".into(),
            ));
        }
        command.check()?;
        self.spawn_holder(Some(CommandSpec::of(&command)))
    }

    fn spawn_holder(mut self, command: Option<CommandSpec>) -> Result<Sandbox, Error> {
        self.check()?;
        if self.policy.is_some() {
            return Err(Error::Config(
                "a spawned sandbox takes its policy from profiles (profile, profile_at), not a Policy object".into(),
            ));
        }
        if self.console.is_some() {
            return Err(Error::Config("a spawned sandbox cannot stream its console to this process".into()));
        }
        // Check the profiles, and pull and check the image, here, where
        // errors reach the caller.
        if !self.profiles.is_empty() {
            Engine::load_layers(&self.profiles)?;
        }
        self.resolve_warm()?;
        if self.restore.is_none() {
            self.boot_image()?;
        }
        let program = match self.holder.take() {
            Some(program) => program,
            None => HolderProgram::find()?,
        };
        let spec = HolderSpec {
            id: new_id()?,
            data_dir: self.data_dir.unwrap_or_else(paths::data_dir),
            image: self.image,
            kernel: self.kernel,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disk_mib: self.disk_mib,
            profiles: self.profiles,
            net: self.net,
            jail: if self.unconfined { None } else { Some(self.jail.unwrap_or_default()) },
            label: self.label,
            command,
            timeout: self.timeout,
            snapshot: self.restore.map(|s| s.dir),
        };
        let sandbox = crate::holder::spawn(&program, &spec)?;
        for (listener, guest_port) in self.forwards {
            if let Err(e) = sandbox.forward_listener(listener, guest_port) {
                let _ = sandbox.stop(Duration::from_secs(30));
                return Err(e);
            }
        }
        Ok(sandbox)
    }

    /// Boot the sandbox, run `command` in it to its end, stop it.
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
        let output = instance.collect(
            command,
            |_| {},
            |_| {
                stop.stop();
                Ok(())
            },
        );
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                let _ = instance.shutdown();
                return Err(e);
            }
        };
        let (id, session_db, boot_time) = (instance.id().to_string(), instance.session_db(), instance.boot_time());
        let powered_on = instance.started_at();
        // The command has ended: nothing in the guest needs a clean power off.
        let console = instance.kill()?;
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
