//! A sandbox in a process of its own: the holder (see the README's "The
//! process that holds a sandbox").
//!
//! [`crate::SandboxBuilder::spawn`] is the starting side. It chooses the
//! sandbox's id, creates its directory, and starts a holder program (this
//! crate's `sandbox-holder`, or `sandbox holder`) in a session of its own:
//! the [`HolderSpec`] goes to its standard input as one JSON document (the
//! spec may hold proxy credentials, so it is never written to disk), its
//! standard error is the sandbox's `sandbox.log`, and its standard output
//! is a pipe on which it reports once, in one JSON line: `{"ready": "<id>"}`
//! when the guest agent answers, or `{"error": "..."}`.
//!
//! The holder ([`main`]) builds the sandbox from the spec and starts it,
//! confining itself first unless the spec says not to (it is
//! single-threaded then, as confinement needs). It reports, then holds the
//! VM until [`crate::Sandbox::stop`] (SIGTERM), the guest powers off, its
//! command (if the spec has one; output in `output.log`) ends, or its
//! timeout passes. Meanwhile it serves its control socket (see
//! `crate::control`): [`crate::Sandbox::snapshot`] asks it there.

use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use guest_protocol::sandbox_dir::SandboxDir;
use net::NetConfig;
use policy::{Layer, ProfileSource};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::command::Command;
use crate::control::{ControlCall, ControlReply, ControlRequest};
use crate::{AfterSnapshot, Error, Image, Jail, Sandbox, SandboxBuilder};

/// The environment variable naming the holder program when
/// [`crate::SandboxBuilder::holder_program`] does not.
pub const HOLDER_VAR: &str = "SANDBOX_HOLDER";
/// The holder program's file name, looked for beside the running program
/// and then on `PATH`.
pub const HOLDER_PROGRAM: &str = "sandbox-holder";
/// The longest spec a holder reads.
const MAX_SPEC_BYTES: u64 = 1 << 20;
/// How long a holder may take from its start until it reports (an OCI
/// image already pulled by the starting side; a boot on a loaded host).
const REPORT_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything a holder needs to build and start its sandbox.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HolderSpec {
    pub id: String,
    pub data_dir: PathBuf,
    pub image: Image,
    pub kernel: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub disk_mib: Option<u32>,
    pub profiles: Vec<(Layer, ProfileSource)>,
    pub net: NetConfig,
    /// `None`: unconfined.
    pub jail: Option<Jail>,
    pub label: Vec<String>,
    /// The command the holder runs once the sandbox is ready; the sandbox
    /// stops when it ends.
    pub command: Option<CommandSpec>,
    /// The sandbox stops this long after it is ready.
    pub timeout: Option<Duration>,
    /// Restore the sandbox from the snapshot in this directory instead of
    /// booting it (image, memory and vCPUs are then the snapshot's).
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
}

/// The parts of a [`Command`] that cross to another process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CommandSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
    entrypoint: bool,
}

impl CommandSpec {
    pub(crate) fn of(command: &Command) -> CommandSpec {
        CommandSpec {
            argv: command.argv.clone(),
            env: command.env.clone(),
            cwd: command.cwd.clone(),
            user: command.user.clone(),
            entrypoint: command.entrypoint,
        }
    }

    fn command(self) -> Command {
        let mut command = Command::from_argv(self.argv);
        command.env = self.env;
        command.cwd = self.cwd;
        command.user = self.user;
        command.entrypoint = self.entrypoint;
        command
    }
}

/// What the holder says on its report pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Report {
    Ready(String),
    Error(String),
}

/// A program that holds sandboxes: run as `program args...`, with the spec
/// on its standard input.
#[derive(Debug, Clone)]
pub(crate) struct HolderProgram {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl HolderProgram {
    /// `$SANDBOX_HOLDER`, else `sandbox-holder` beside the running program,
    /// else on `PATH`.
    pub fn find() -> Result<HolderProgram, Error> {
        let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(HOLDER_PROGRAM)));
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|d| d.join(HOLDER_PROGRAM)).collect::<Vec<_>>())
            .unwrap_or_default();
        let program = std::env::var_os(HOLDER_VAR)
            .map(PathBuf::from)
            .or_else(|| beside.into_iter().chain(on_path).find(|p| p.is_file()))
            .ok_or_else(|| {
                Error::Config(format!(
                    "no holder program: build it (cargo build --bin {HOLDER_PROGRAM}) and put it beside this program or on PATH, or set {HOLDER_VAR}"
                ))
            })?;
        Ok(HolderProgram { program, args: Vec::new() })
    }
}

/// Start a holder for `spec` and wait for its report: the sandbox, running.
/// When it fails before the sandbox had a state file, nothing of it is left.
pub(crate) fn spawn(program: &HolderProgram, spec: &HolderSpec) -> Result<Sandbox, Error> {
    let dir = SandboxDir::new(crate::paths::sandboxes_in(&spec.data_dir).join(&spec.id));
    let result = start_holder(program, spec, &dir);
    if result.is_err() && !dir.state_file().exists() {
        let _ = std::fs::remove_dir_all(dir.path());
    }
    result
}

fn start_holder(program: &HolderProgram, spec: &HolderSpec, dir: &SandboxDir) -> Result<Sandbox, Error> {
    crate::instance::private_dir(dir.path())?;
    let log_path = dir.sandbox_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::Io(format!("create {}", log_path.display()), e))?;
    let json = serde_json::to_vec(spec).map_err(|e| Error::Io("encode the holder's spec".into(), e.into()))?;

    let mut command = std::process::Command::new(&program.program);
    command.args(&program.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent. A session of its own keeps the caller's terminal signals
    // (hangup, Ctrl-C) away from the sandbox.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child =
        command.spawn().map_err(|e| Error::Io(format!("start the holder program {}", program.program.display()), e))?;
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(&json));
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Some(stdout) = stdout {
            let _ = std::io::BufReader::new(stdout.take(64 * 1024)).read_line(&mut line);
        }
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(REPORT_TIMEOUT).ok();
    let report = line.as_deref().and_then(|l| serde_json::from_str::<Report>(l.trim()).ok());
    if let Some(Report::Ready(id)) = &report {
        if *id == spec.id {
            // The holder runs on; reap it when it ends (it is not this
            // process's to wait for otherwise).
            std::thread::spawn(move || child.wait());
            return Sandbox::find_in(&spec.data_dir, id);
        }
    }
    if line.is_none() {
        tracing::error!(id = %spec.id, "the holder did not report within {REPORT_TIMEOUT:?}; killing it");
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| Error::Io("wait for the holder program".into(), e))?;
    let why = match (report, written) {
        (Some(Report::Error(message)), _) => message,
        (_, Some(Err(e))) => format!("it did not take its spec ({e}); it exited with {status}"),
        _ => format!("it exited with {status} without saying why; its log: {}", last_lines(&log_path, 5)),
    };
    Err(Error::Holder(why))
}

/// The last `n` lines of the file at `path`.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The holder program: read the spec on standard input, start the sandbox,
/// report on standard output, hold it. The caller sets up `tracing` (to
/// standard error, the sandbox's log).
pub fn main() -> ExitCode {
    let mut report = std::io::stdout();
    let spec = match read_spec(std::io::stdin()) {
        Ok(spec) => spec,
        Err(e) => {
            send(&mut report, &Report::Error(e.to_string()));
            return ExitCode::from(2);
        }
    };
    let id = spec.id.clone();
    match hold(spec, &mut report) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(%id, "{e}");
            send(&mut report, &Report::Error(e.to_string()));
            ExitCode::from(125)
        }
    }
}

fn read_spec(input: impl Read) -> Result<HolderSpec, Error> {
    let mut json = Vec::new();
    input.take(MAX_SPEC_BYTES).read_to_end(&mut json).map_err(|e| Error::Io("read the holder's spec".into(), e))?;
    let spec: HolderSpec = serde_json::from_slice(&json)
        .map_err(|e| Error::Config(format!("the holder's spec (on its standard input) is not valid: {e}")))?;
    if !crate::valid_id(&spec.id) {
        return Err(Error::Config(format!("the holder's spec names no valid sandbox id: {:?}", spec.id)));
    }
    Ok(spec)
}

fn send(out: &mut impl Write, report: &Report) {
    if let Ok(line) = serde_json::to_string(report) {
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

/// What the holder's main loop waits for.
enum Event {
    Signal(i32),
    CommandEnded(Result<i32, Error>),
    Control(ControlCall),
}

/// Carry out a control request. `Some(reason)`: the sandbox is to stop.
fn control(instance: &crate::Instance, request: ControlRequest) -> (ControlReply, Option<String>) {
    match request {
        // The control thread serves these itself.
        ControlRequest::Forward { .. } | ControlRequest::Connect { .. } => {
            (ControlReply::Error("not a request for the holder's main loop".into()), None)
        }
        ControlRequest::Snapshot { name, stop } => {
            if !crate::valid_id(&name) {
                return (ControlReply::Error(format!("not a snapshot directory name: {name:?}")), None);
            }
            let then = if stop { AfterSnapshot::Stop } else { AfterSnapshot::Resume };
            match instance.snapshot(instance.dir().join(&name), then) {
                Ok(_) => (ControlReply::Done, stop.then(|| "stopped after a snapshot".to_string())),
                Err(e) => (ControlReply::Error(format!("taking a snapshot: {e}")), None),
            }
        }
    }
}

fn hold(spec: HolderSpec, report: &mut impl Write) -> Result<(), Error> {
    let builder = match spec.snapshot {
        Some(dir) => SandboxBuilder::restoring(crate::Snapshot::load(dir)?),
        None => SandboxBuilder::new(spec.image).memory_mib(spec.memory_mib).vcpus(spec.vcpus),
    };
    let mut builder =
        builder.net_config(spec.net).data_dir(spec.data_dir).label(spec.label).detached(true).with_id(spec.id);
    for (layer, source) in spec.profiles {
        builder = builder.profile_at(layer, source);
    }
    if let Some(kernel) = spec.kernel {
        builder = builder.kernel(kernel);
    }
    if let Some(disk) = spec.disk_mib {
        builder = builder.disk_mib(disk);
    }
    if let Some(jail) = spec.jail {
        builder = builder.jail(jail);
    }
    let instance = builder.start()?;
    // After the start: a confined holder closes every descriptor it did not
    // open itself, the signal handler's included.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Error::Io("handle signals".into(), e))?;
    // Serving before the report: a caller may ask for a snapshot at once.
    let (tx, rx) = mpsc::channel();
    crate::control::serve(instance.dir(), tx.clone(), Event::Control, instance.forwarder().cloned())?;
    send(report, &Report::Ready(instance.id().to_string()));
    // The report pipe is done: standard output joins the log.
    // SAFETY: dup2 of two descriptors this process has open (standard error
    // and standard output always exist here).
    unsafe { libc::dup2(libc::STDERR_FILENO, std::io::stdout().as_raw_fd()) };
    tracing::info!(id = %instance.id(), "sandbox running");

    let on_signal = tx.clone();
    let handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = on_signal.send(Event::Signal(sig));
        }
    });

    // No arguments and no image Cmd: the sandbox just runs.
    let image_cmd = instance.state().image_config.as_ref().is_some_and(|c| !c.argv(&[]).is_empty());
    if let Some(command) = spec.command.filter(|c| !c.argv.is_empty() || image_cmd) {
        let dir = SandboxDir::new(instance.dir());
        let log = dir.output_log();
        let started = (|| {
            let out = std::fs::File::create(&log).map_err(|e| Error::Io(format!("create {}", log.display()), e))?;
            let err = out.try_clone().map_err(|e| Error::Io("duplicate the output log".into(), e))?;
            instance.spawn(command.command().stdout_to(out).stderr_to(err))
        })();
        match started {
            Ok(mut process) => {
                std::thread::spawn(move || {
                    let _ = tx.send(Event::CommandEnded(process.wait()));
                });
            }
            Err(e) => {
                let _ = tx.send(Event::CommandEnded(Err(e)));
            }
        }
    }
    let started = Instant::now();
    let reason = loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Event::Signal(sig)) => break format!("signal {sig}"),
            Ok(Event::CommandEnded(Ok(code))) => break format!("the command exited with status {code}"),
            Ok(Event::CommandEnded(Err(e))) => break format!("the command failed: {e}"),
            Ok(Event::Control(call)) => {
                let (reply, stop) = control(&instance, call.request);
                let _ = call.reply.send(reply);
                if let Some(reason) = stop {
                    break reason;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break "nothing left to wait for".into(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !instance.is_running() {
                    break "the guest powered off".into();
                }
                if spec.timeout.is_some_and(|t| started.elapsed() >= t) {
                    break "the timeout passed".into();
                }
            }
        }
    };
    handle.close();
    tracing::info!(id = %instance.id(), "stopping: {reason}");
    // Nothing in the guest needs a clean power off.
    instance.kill()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HolderSpec {
        HolderSpec {
            id: "0123abcd".into(),
            data_dir: "/tmp/data".into(),
            image: Image::Oci("python:3.12-slim".into()),
            kernel: None,
            memory_mib: 256,
            vcpus: 1,
            disk_mib: Some(64),
            profiles: vec![(Layer::Corporate, ProfileSource::File("/etc/corp.toml".into()))],
            net: NetConfig::default(),
            jail: Some(Jail::default()),
            label: vec!["sleep".into()],
            command: Some(CommandSpec::of(&Command::new("sleep").arg("1").env("A", "1").image_entrypoint())),
            timeout: Some(Duration::from_secs(5)),
            snapshot: None,
        }
    }

    #[test]
    fn a_spec_crosses_to_the_holder_whole() {
        let json = serde_json::to_vec(&spec()).unwrap();
        let back = read_spec(json.as_slice()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{:?}", spec()));
        let command = back.command.unwrap().command();
        assert_eq!(command.argv(), ["sleep", "1"]);
        assert!(command.entrypoint);
        assert_eq!(command.env, [("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_bad_spec_is_refused_with_a_reason() {
        let err = read_spec(&b"{\"id\": 1}"[..]).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        let mut bad = spec();
        bad.id = "../x".into();
        let err = read_spec(serde_json::to_vec(&bad).unwrap().as_slice()).unwrap_err().to_string();
        assert!(err.contains("no valid sandbox id"), "{err}");
        // A uid range that includes root is refused when read.
        let mut json: serde_json::Value = serde_json::to_value(spec()).unwrap();
        json["jail"]["uids"] = serde_json::json!([0, 10]);
        let err = read_spec(json.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("exclude 0"), "{err}");
    }

    #[test]
    fn the_holder_reports_in_one_json_line() {
        let mut out = Vec::new();
        send(&mut out, &Report::Ready("abc".into()));
        send(&mut out, &Report::Error("no kernel\nat all".into()));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, [r#"{"ready":"abc"}"#, r#"{"error":"no kernel\nat all"}"#]);
    }
}
