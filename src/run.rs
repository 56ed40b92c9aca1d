//! The library API: configure a sandbox, boot it, run one command in it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::agent::{Exec, WinSize};
use sandbox_net::NetConfig;
use sandbox_policy::{Engine, Layer, Policy, ProfileSource};

use crate::instance::{Instance, InstanceConfig};
use crate::{paths, Error, Image, MEMORY_MIB_RANGE, VCPUS_RANGE};

/// How the guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It exited with this status (0..=255; 128 + N when killed by signal N;
    /// 127 when the command was not found, 126 when it could not be executed).
    Exited(i32),
    /// It was still running at the timeout; the VM was stopped.
    TimedOut,
}

/// How many bytes of each of standard output and standard error
/// [`SandboxBuilder::run`] collects by default (16 MiB); see
/// [`SandboxBuilder::output_limit`].
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// What a finished sandbox run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub status: Status,
    /// The command's standard output, unless streamed with [`SandboxBuilder::stdout`]:
    /// its first [`SandboxBuilder::output_limit`] bytes.
    pub stdout: Vec<u8>,
    /// The command's standard error, unless streamed with [`SandboxBuilder::stderr`]:
    /// its first [`SandboxBuilder::output_limit`] bytes.
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

/// Entry point of the library API.
#[derive(Debug)]
pub struct Sandbox;

impl Sandbox {
    /// A sandbox booting `image`, with default resources and the `deny-all` profile.
    pub fn builder(image: Image) -> SandboxBuilder {
        SandboxBuilder {
            image,
            memory_mib: 256,
            vcpus: 1,
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: None,
            timeout: None,
            stdin: None,
            stdout: None,
            stderr: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            console: None,
            kernel: None,
            profiles: Vec::new(),
            command: Vec::new(),
            terminal: false,
            policy: None,
            net: NetConfig::default(),
            boot: None,
        }
    }
}

/// Configures and runs one sandbox.
pub struct SandboxBuilder {
    image: Image,
    memory_mib: u32,
    vcpus: u8,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
    tty: Option<WinSize>,
    timeout: Option<Duration>,
    stdin: Option<Box<dyn Read + Send>>,
    stdout: Option<Box<dyn Write + Send>>,
    stderr: Option<Box<dyn Write + Send>>,
    output_limit: usize,
    console: Option<Box<dyn Write + Send>>,
    kernel: Option<PathBuf>,
    profiles: Vec<(Layer, ProfileSource)>,
    /// What [`Self::run`] runs (recorded for `sandbox ps`).
    command: Vec<String>,
    terminal: bool,
    policy: Option<Policy>,
    net: NetConfig,
    boot: Option<crate::image::BootImage>,
}

impl std::fmt::Debug for SandboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxBuilder")
            .field("image", &self.image)
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("timeout", &self.timeout)
            .field("profiles", &self.profiles)
            .finish_non_exhaustive()
    }
}

impl SandboxBuilder {
    /// Guest RAM in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Number of vCPUs (default 1).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }
    /// Add an environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Working directory of the command (default: the OCI image's, else `/`).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    /// Run the command as this user (a name in the image's /etc/passwd, or a uid).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
    /// Run the command on a pseudo-terminal of this size.
    pub fn tty(mut self, size: WinSize) -> Self {
        self.tty = Some(size);
        self
    }
    /// The command this sandbox is for, as `sandbox ps` shows it ([`Self::run`] sets it).
    pub fn command<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.command = argv.into_iter().map(Into::into).collect();
        self
    }
    /// Attach the command to this process's terminal, as `docker run -it`
    /// does: a guest pseudo-terminal of the same size that follows resizes,
    /// this terminal in raw mode (Ctrl-C reaches the guest process), and
    /// standard input and output connected to it. Needs a terminal on stdin.
    pub fn terminal(mut self) -> Self {
        self.terminal = true;
        self
    }
    /// Stop the VM if the command has not ended after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Feed the command's standard input from here (default: empty).
    pub fn stdin(mut self, src: impl Read + Send + 'static) -> Self {
        self.stdin = Some(Box::new(src));
        self
    }
    /// Stream the command's standard output here instead of collecting it.
    pub fn stdout(mut self, sink: impl Write + Send + 'static) -> Self {
        self.stdout = Some(Box::new(sink));
        self
    }
    /// Stream the command's standard error here instead of collecting it.
    pub fn stderr(mut self, sink: impl Write + Send + 'static) -> Self {
        self.stderr = Some(Box::new(sink));
        self
    }
    /// Collect at most this many bytes of each of standard output and
    /// standard error (default [`DEFAULT_OUTPUT_LIMIT`], 16 MiB). Beyond it
    /// the command runs on, its further output is discarded and
    /// [`RunOutput::stdout_truncated`] / [`RunOutput::stderr_truncated`] say so.
    /// Streams given to [`Self::stdout`] / [`Self::stderr`] get everything.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }
    /// Stream the guest console log (kernel messages) here as it arrives.
    pub fn console(mut self, sink: impl Write + Send + 'static) -> Self {
        self.console = Some(Box::new(sink));
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

    fn check(&self) -> Result<(), Error> {
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return Err(Error::Config(format!(
                "memory must be between {} and {} MiB, not {}",
                MEMORY_MIB_RANGE.start(),
                MEMORY_MIB_RANGE.end(),
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
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::Config("the timeout must be longer than zero".into()));
        }
        if let Some(cwd) = self.cwd.as_ref().filter(|c| !c.starts_with('/')) {
            return Err(Error::Config(format!("the working directory must be absolute, not {cwd:?}")));
        }
        Ok(())
    }

    /// Boot the sandbox and return it running, for several commands.
    pub fn start(&mut self) -> Result<Instance, Error> {
        self.check()?;
        let policy = match self.policy.take() {
            Some(p) => p,
            None if self.profiles.is_empty() => Policy::new(Engine::builtin("deny-all")?),
            None => Policy::new(Engine::load_layers(&self.profiles)?),
        };
        let kernel = match self.kernel.take() {
            Some(k) => k,
            None => paths::kernel()?,
        };
        let boot = match self.boot.take() {
            Some(b) => b,
            None => self.image.boot()?,
        };
        let mut cmdline = format!(
            "{} root=/dev/vda ro rootfstype={} init=/sbin/sandbox-init",
            vmm::cmdline::base_args(),
            boot.rootfs.kernel_name()
        );
        if boot.image_disk.is_some() {
            // guest-init overlays the second disk as the root (see guest-init/src/mounts.rs).
            cmdline.push_str(" sandbox.image=/dev/vdb");
        }
        Instance::start(InstanceConfig {
            image_name: self.image.to_string(),
            command: self.command.clone(),
            kernel,
            root_disk: boot.root_disk,
            extra_disks: boot.image_disk.into_iter().collect(),
            cmdline,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            policy,
            net: self.net.clone(),
            console: self.console.take(),
        })
    }

    /// The command `argv` as it runs in this sandbox, with the environment,
    /// directory and user set here; with an OCI image, the image's config
    /// applies as [`Self::run`] says. Resolves (and if needed pulls) the image.
    pub fn exec_for_image(&mut self, argv: Vec<String>) -> Result<Exec, Error> {
        self.check()?;
        let boot = match self.boot.take() {
            Some(b) => b,
            None => self.image.boot()?,
        };
        let mut argv = argv;
        let mut env = self.env.clone();
        let mut cwd = self.cwd.clone();
        let mut user = self.user.clone();
        if let Some(config) = &boot.config {
            argv = config.argv(&argv);
            let mut merged = config.env_pairs();
            merged.retain(|(k, _)| !env.iter().any(|(mine, _)| mine == k));
            merged.append(&mut env);
            env = merged;
            if cwd.is_none() && !config.working_dir.is_empty() {
                cwd = Some(config.working_dir.clone());
            }
            if user.is_none() && !config.user.is_empty() {
                user = Some(config.user.clone());
            }
        }
        self.boot = Some(boot);
        if argv.first().is_none_or(String::is_empty) {
            return Err(Error::Config("no command given (and the image has no Cmd or Entrypoint)".into()));
        }
        Ok(Exec { argv, env, cwd: cwd.unwrap_or_else(|| "/".into()), user, tty: self.tty })
    }

    /// Boot the sandbox, run `argv` in it, power it off.
    ///
    /// With an OCI image, its config applies as `docker run` applies it: the
    /// entrypoint goes before `argv` (`Cmd` when `argv` is empty), its `Env`
    /// comes first (variables set here win), and its `WorkingDir` and `User`
    /// hold unless set here.
    pub fn run<I, S>(mut self, argv: I) -> Result<RunOutput, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let exec = self.exec_for_image(argv.into_iter().map(Into::into).collect())?;
        let argv = exec.argv.clone();
        let started = Instant::now();
        self.command.clone_from(&argv);
        let instance = self.start()?;
        let timed_out = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let watchdog = self.timeout.map(|timeout| {
            let stop = instance.stop_handle();
            let timed_out = Arc::clone(&timed_out);
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    timed_out.store(true, Ordering::SeqCst);
                    stop.stop();
                }
            })
        });

        let collected_out = Arc::new(Mutex::new(Collected::new(self.output_limit)));
        let collected_err = Arc::new(Mutex::new(Collected::new(self.output_limit)));
        let mut stdout: Box<dyn Write + Send> = self.stdout.take().unwrap_or_else(|| Box::new(Collect(Arc::clone(&collected_out))));
        let mut stderr: Box<dyn Write + Send> = self.stderr.take().unwrap_or_else(|| Box::new(Collect(Arc::clone(&collected_err))));
        let result = if self.terminal {
            instance.agent().map_err(Error::from).and_then(|conn| crate::terminal::exec_on_terminal(conn, exec))
        } else {
            instance.exec(exec, self.stdin.take(), &mut stdout, &mut stderr)
        };
        drop(done_tx);
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        let id = instance.id().to_string();
        let session_db = instance.dir().join("session.db");
        let boot_time = instance.boot_time();
        let status = match result {
            _ if timed_out.load(Ordering::SeqCst) => Status::TimedOut,
            Ok(code) => Status::Exited(code),
            Err(e) => {
                let _ = instance.shutdown();
                return Err(e);
            }
        };
        let console = instance.shutdown()?;
        let take = |v: &Arc<Mutex<Collected>>| v.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let (out, err) = (take(&collected_out), take(&collected_err));
        Ok(RunOutput {
            status,
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            console,
            id,
            session_db,
            boot_time,
            total_time: started.elapsed(),
        })
    }
}

/// The first `limit` bytes of a stream, and whether there were more.
#[derive(Debug, Default)]
struct Collected {
    bytes: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Collected {
    fn new(limit: usize) -> Self {
        Self { bytes: Vec::new(), limit, truncated: false }
    }

    fn push(&mut self, buf: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        let take = buf.len().min(room);
        self.bytes.extend_from_slice(&buf[..take]);
        if take < buf.len() {
            if !self.truncated {
                tracing::warn!(limit = self.limit, "command output exceeds the collection limit; the rest is discarded");
            }
            self.truncated = true;
        }
    }
}

/// Collects a stream into shared memory, up to its limit.
struct Collect(Arc<Mutex<Collected>>);

impl Write for Collect {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Bytes past the limit are accepted and discarded, so the guest's
        // stream keeps flowing and the command is not blocked or failed.
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item2b_collected_output_is_bounded() {
        // The builder's default is stated and applies to what `run` collects.
        let builder = Sandbox::builder(Image::Default);
        assert_eq!(builder.output_limit, DEFAULT_OUTPUT_LIMIT);
        let shared = Arc::new(Mutex::new(Collected::new(builder.output_limit)));
        let mut sink: Box<dyn Write + Send> = Box::new(Collect(Arc::clone(&shared)));
        // A guest printing 64 MiB (4 x the limit), in the agent's chunk size.
        let chunk = vec![b'z'; guest_protocol::agent::CHUNK];
        let mut written = 0usize;
        while written < 4 * DEFAULT_OUTPUT_LIMIT {
            sink.write_all(&chunk).unwrap();
            written += chunk.len();
        }
        let got = std::mem::take(&mut *shared.lock().unwrap());
        assert_eq!(got.bytes.len(), DEFAULT_OUTPUT_LIMIT);
        assert!(got.truncated);

        // A configured limit, and output that fits it, are kept whole.
        let builder = Sandbox::builder(Image::Default).output_limit(10);
        let shared = Arc::new(Mutex::new(Collected::new(builder.output_limit)));
        let mut sink = Collect(Arc::clone(&shared));
        sink.write_all(b"0123456789").unwrap();
        assert!(!shared.lock().unwrap().truncated);
        sink.write_all(b"abc").unwrap();
        let got = shared.lock().unwrap();
        assert_eq!((got.bytes.as_slice(), got.truncated), (&b"0123456789"[..], true));
    }
}
