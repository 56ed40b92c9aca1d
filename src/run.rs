//! Booting a sandbox, running one command in it, and collecting the result.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use guest_protocol::console::{Demux, Piece};
use guest_protocol::LaunchSpec;

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

/// What a finished sandbox run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub status: Status,
    /// The command's output (stdout and stderr interleaved), unless it was
    /// streamed to a writer given with [`SandboxBuilder::output`].
    pub output: Vec<u8>,
    /// The guest kernel's and init's console log (the last 64 KiB).
    pub console: Vec<u8>,
    /// From starting the VM to the command starting in the guest.
    pub boot_time: Option<Duration>,
    /// From starting the VM to the VM stopping.
    pub total_time: Duration,
}

/// Entry point of the library API.
#[derive(Debug)]
pub struct Sandbox;

impl Sandbox {
    /// A sandbox booting `image`, with default resources.
    pub fn builder(image: Image) -> SandboxBuilder {
        SandboxBuilder {
            image,
            memory_mib: 256,
            vcpus: 1,
            env: Vec::new(),
            cwd: "/".into(),
            hostname: "sandbox".into(),
            timeout: None,
            output: None,
            console: None,
            kernel: None,
        }
    }
}

/// Configures and runs one sandbox.
pub struct SandboxBuilder {
    image: Image,
    memory_mib: u32,
    vcpus: u8,
    env: Vec<(String, String)>,
    cwd: String,
    hostname: String,
    timeout: Option<Duration>,
    output: Option<Box<dyn Write + Send>>,
    console: Option<Box<dyn Write + Send>>,
    kernel: Option<PathBuf>,
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
    /// Working directory of the command (default `/`).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = dir.into();
        self
    }
    /// Guest hostname (default `sandbox`).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }
    /// Stop the VM if the command has not ended after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Stream the command's output here as it arrives instead of collecting it.
    pub fn output(mut self, sink: impl Write + Send + 'static) -> Self {
        self.output = Some(Box::new(sink));
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

    /// Boot the VM, run `argv` in it, wait for it to end.
    pub fn run<I, S>(self, argv: I) -> Result<RunOutput, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
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
        let spec = LaunchSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: self.env,
            cwd: self.cwd,
            hostname: self.hostname,
        };
        let launch_arg = spec.to_cmdline_arg()?;
        let kernel = match self.kernel {
            Some(k) => k,
            None => paths::kernel()?,
        };
        let (root_disk, rootfs) = self.image.resolve()?;
        let cmdline = format!(
            "{} root=/dev/vda ro rootfstype={} init=/sbin/sandbox-init {launch_arg}",
            vmm::cmdline::base_args(),
            rootfs.kernel_name()
        );

        let state = Arc::new(Mutex::new(ConsoleState::default()));
        let started = Instant::now();
        let sink = ConsoleSink {
            demux: Demux::new(),
            started,
            state: Arc::clone(&state),
            output: self.output,
            console: self.console,
        };
        let vm = vmm::Vm::create(vmm::VmConfig {
            kernel,
            cmdline,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            root_disk,
            scratch_disk: None,
            serial: Box::new(sink),
        })?;

        let (done_tx, done_rx) = mpsc::channel::<()>();
        let watchdog = self.timeout.map(|timeout| {
            let stop = vm.stop_handle();
            std::thread::spawn(move || {
                let expired = matches!(done_rx.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Timeout));
                if expired {
                    stop.stop();
                }
                expired
            })
        });
        let result = vm.run();
        drop(done_tx);
        let timed_out = watchdog.map(|w| w.join().unwrap_or(false)).unwrap_or(false);
        let total_time = started.elapsed();
        let exit = result?;

        let mut state = state.lock().map_err(|_| Error::NoExitStatus("console state poisoned".into()))?;
        let state = std::mem::take(&mut *state);
        let status = match (state.status, timed_out, exit) {
            (Some(code), _, _) => Status::Exited(code),
            (None, true, _) | (None, _, vmm::ExitReason::StopRequested) => Status::TimedOut,
            (None, false, vmm::ExitReason::GuestShutdown) => {
                let log = String::from_utf8_lossy(&state.console);
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(Error::NoExitStatus(tail.join("\n")));
            }
        };
        Ok(RunOutput {
            status,
            output: state.output,
            console: state.console,
            boot_time: state.boot_time,
            total_time,
        })
    }
}

/// How much console log a run keeps.
const CONSOLE_KEEP: usize = 64 * 1024;

#[derive(Debug, Default)]
struct ConsoleState {
    output: Vec<u8>,
    console: Vec<u8>,
    status: Option<i32>,
    boot_time: Option<Duration>,
}

/// The VM's serial port sink: splits the stream into log, output and status.
struct ConsoleSink {
    demux: Demux,
    started: Instant,
    state: Arc<Mutex<ConsoleState>>,
    output: Option<Box<dyn Write + Send>>,
    console: Option<Box<dyn Write + Send>>,
}

impl ConsoleSink {
    fn handle(&mut self, pieces: Vec<Piece>) -> std::io::Result<()> {
        let Ok(mut state) = self.state.lock() else {
            return Err(std::io::Error::other("console state poisoned"));
        };
        for piece in pieces {
            match piece {
                Piece::Log(bytes) => {
                    if let Some(c) = self.console.as_mut() {
                        c.write_all(&bytes)?;
                        c.flush()?;
                    }
                    state.console.extend_from_slice(&bytes);
                    let excess = state.console.len().saturating_sub(CONSOLE_KEEP);
                    state.console.drain(..excess);
                }
                Piece::Output(bytes) => match self.output.as_mut() {
                    Some(out) => {
                        out.write_all(&bytes)?;
                        out.flush()?;
                    }
                    None => state.output.extend_from_slice(&bytes),
                },
                Piece::Started => state.boot_time = Some(self.started.elapsed()),
                Piece::Exited(code) => state.status = Some(code),
            }
        }
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pieces = self.demux.feed(buf);
        self.handle(pieces)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        let pieces = self.demux.finish();
        let _ = self.handle(pieces);
    }
}
