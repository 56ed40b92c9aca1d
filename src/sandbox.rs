//! A sandbox on this machine, running or not: [`Sandbox`], the one handle
//! for driving it, whether this process holds its VM ([`crate::Instance`]
//! derefs to it) or another one does.
//!
//! Every sandbox's private directory (`<data dir>/sandboxes/<id>/`) holds a
//! `state.json` written when it boots: what it runs, and which host process
//! holds its VM. A sandbox is running while that process is alive (checked
//! with its start time, so a recycled pid does not count) and its
//! `vsock.sock` exists. Any process can then drive it through that socket:
//! run commands, copy files, stop it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_protocol::sandbox_dir::SandboxDir;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::agent::{AgentConn, AgentError};
use guest_protocol::agent::{Entry, FsRequest, HostMessage};

use crate::command::{Command, Output, OutputSink};
use crate::control::{ControlReply, ControlRequest};
use crate::events::Events;
use crate::ports::{Forwarder, PortForward, PortSpec};
use crate::process::{Collect, Collected, Process, ProcessControl};
use crate::{paths, AfterSnapshot, Error, Image, SandboxBuilder, Snapshot, Status};

/// How long killed holder processes may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a refused agent connection is tried.
const REFUSED_ATTEMPTS: u32 = 4;

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SandboxState {
    pub id: String,
    /// The image as it was named.
    pub image: String,
    /// The command the sandbox was started with (empty for an idle one).
    pub command: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The host process holding the VM, and its start time in clock ticks
    /// since boot (field 22 of `/proc/<pid>/stat`).
    pub pid: u32,
    pub pid_start: u64,
    /// The holder is a process that exists only to hold this sandbox (the
    /// background process of `sandbox run -d`): [`Sandbox::stop`] may kill
    /// it. An application embedding the library is never signalled.
    #[serde(default)]
    pub detached: bool,
    /// The OCI image's run settings (environment, directory, user), which
    /// every command gets unless it sets its own.
    #[serde(default)]
    pub image_config: Option<rootfs::ImageConfig>,
    /// The policy profiles it was started with, in their layers (empty: a
    /// policy object, or the default `deny-all`). A fork of it gets them.
    #[serde(default)]
    pub profiles: Vec<(policy::Layer, policy::ProfileSource)>,
}

impl SandboxState {
    pub(crate) fn new(id: &str, image: &str, command: &[String], memory_mib: u32, vcpus: u8) -> Self {
        let pid = std::process::id();
        SandboxState {
            id: id.to_string(),
            image: image.to_string(),
            command: command.to_vec(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            memory_mib,
            vcpus,
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            detached: false,
            image_config: None,
            profiles: Vec::new(),
        }
    }

    /// Write `state.json` into `dir` (atomically: a reader sees the old or the new file).
    pub(crate) fn save(&self, dir: &SandboxDir) -> Result<(), Error> {
        let path = dir.state_file();
        let tmp = dir.state_tmp_file();
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Io("encode state.json".into(), e.into()))?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Io(format!("write {}", path.display()), e))
    }
}

/// What a sandbox's host processes use: its holder and every process under
/// it (the confined VMM, whose resident memory includes the guest's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// CPU time, user and system, since the processes started.
    pub cpu: Duration,
    /// Proportional set size: private pages whole, shared ones (a
    /// snapshot's memory file in the page cache) divided among the
    /// processes that map them.
    pub memory_bytes: u64,
    /// How many processes.
    pub processes: u32,
}

/// The CPU time and proportional set size of process `pid` and its
/// descendants (those that exist while they are read).
fn tree_usage(pid: u32) -> HostUsage {
    // SAFETY: sysconf reads a constant of the system; no memory is shared.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0).unwrap_or(100);
    let mut usage = HostUsage::default();
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        // utime and stime (fields 14 and 15), in clock ticks.
        let Some(stat) = ProcStat::read(pid) else { continue };
        let field = |n| stat.field(n).and_then(|v| v.parse::<u64>().ok());
        let (Some(user), Some(system)) = (field(14), field(15)) else { continue };
        let times = user + system;
        usage.cpu += Duration::from_nanos(times.saturating_mul(1_000_000_000) / ticks);
        usage.memory_bytes += proportional_set_size(pid).unwrap_or(0);
        usage.processes += 1;
        pending.extend(children(pid));
    }
    usage
}

/// `Pss` of `/proc/<pid>/smaps_rollup`, in bytes.
fn proportional_set_size(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `/proc/<pid>/stat`, read once.
struct ProcStat(Vec<String>);

impl ProcStat {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 1..];
        Some(Self(rest.split_whitespace().map(str::to_string).collect()))
    }

    /// Field `n`, counted from 1 as proc(5) does (3 or later).
    fn field(&self, n: usize) -> Option<&str> {
        self.0.get(n.checked_sub(3)?).map(String::as_str)
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
fn process_start(pid: u32) -> Option<u64> {
    ProcStat::read(pid)?.field(22)?.parse().ok()
}

/// Has process `pid` ended, its status not yet collected by its parent?
fn zombie(pid: u32) -> bool {
    ProcStat::read(pid).is_some_and(|stat| stat.field(3) == Some("Z"))
}

/// The children of process `pid` (none if it is gone).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Send `sig` to process `pid`; one that is gone already is no error. A
/// pid that names no single process (0, or past `i32::MAX`, which `kill`
/// would take as a process group) is never signalled.
fn signal(pid: u32, sig: Signal) -> Result<(), nix::errno::Errno> {
    let Some(pid) = i32::try_from(pid).ok().filter(|&p| p > 0) else {
        return Ok(());
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Is `id` a sandbox id (and so safe to join to a path)?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A sandbox: run commands in it, copy files, follow its events, stop it.
///
/// Get one from [`crate::Instance`] (which derefs to it) after
/// [`SandboxBuilder::start`], or find one that another process holds with
/// [`Sandbox::find`] / [`Sandbox::list`]. Every method works the same way
/// on both, through the sandbox's vsock socket.
#[derive(Debug, Clone)]
pub struct Sandbox {
    dir: SandboxDir,
    state: SandboxState,
    /// This process holds the VM (a confined holder cannot see the pid in
    /// its state, which is that of the process outside its PID namespace).
    held_here: bool,
    /// The connections into the guest, when this process holds the VM.
    forwarder: Option<Forwarder>,
}

/// Every sandbox under `root` (a sandboxes directory), newest first.
fn list_under(root: &Path) -> Result<Vec<Sandbox>, Error> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io(format!("read {}", root.display()), e)),
    };
    let mut found: Vec<Sandbox> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().filter(|n| valid_id(n)).map(str::to_string))
        .filter_map(|id| match find_under(root, &id) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(%id, error = %e, "skipping a sandbox directory");
                None
            }
        })
        .collect();
    found.sort_by(|a, b| b.state.created.cmp(&a.state.created).then_with(|| a.state.id.cmp(&b.state.id)));
    Ok(found)
}

/// The sandbox `id` (or a unique prefix of one) under `root`.
fn find_under(root: &Path, id: &str) -> Result<Sandbox, Error> {
    if !valid_id(id) {
        return Err(Error::Config(format!("not a sandbox id: {id:?}")));
    }
    let dir = SandboxDir::new(root.join(id));
    let dir = if dir.state_file().is_file() {
        dir
    } else {
        let matches: Vec<SandboxDir> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(id)))
            .map(|e| e.path())
            .map(SandboxDir::new)
            .filter(|d| d.state_file().is_file())
            .collect();
        match matches.as_slice() {
            [one] => one.clone(),
            [] => return Err(Error::NoSuchSandbox(id.to_string())),
            _ => {
                return Err(Error::Config(format!("{id:?} is the start of more than one sandbox id; give more of it")))
            }
        }
    };
    let path = dir.state_file();
    let bytes = std::fs::read(&path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
    let state: SandboxState = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Io(format!("parse {}", path.display()), std::io::Error::other(e)))?;
    Ok(Sandbox { dir, state, held_here: false, forwarder: None })
}

impl Sandbox {
    /// A sandbox booting `image`, with default resources and the `deny-all`
    /// profile: configure it, then [`SandboxBuilder::start`] or
    /// [`SandboxBuilder::run`].
    pub fn builder(image: Image) -> SandboxBuilder {
        SandboxBuilder::new(image)
    }

    /// A sandbox restored from `snapshot` (see [`crate::Snapshot`]):
    /// configure its policy, network and data directory as for a boot,
    /// then start or spawn it. Its image, memory and vCPUs are the snapshot's.
    pub fn from_snapshot(snapshot: crate::Snapshot) -> SandboxBuilder {
        SandboxBuilder::restoring(snapshot)
    }

    /// The handle of the process that holds the sandbox.
    pub(crate) fn held_here(dir: SandboxDir, state: SandboxState, forwarder: Forwarder) -> Self {
        Sandbox { dir, state, held_here: true, forwarder: Some(forwarder) }
    }

    /// The connections into the guest, when this process holds the VM.
    pub(crate) fn forwarder(&self) -> Option<&Forwarder> {
        self.forwarder.as_ref()
    }

    /// The sandbox `id`, or a unique prefix of one (as `docker` allows), in
    /// the default data directory ([`paths::data_dir`]).
    pub fn find(id: &str) -> Result<Sandbox, Error> {
        Self::find_in(&paths::data_dir(), id)
    }

    /// [`Self::find`] in the data directory `data_dir`.
    pub fn find_in(data_dir: &Path, id: &str) -> Result<Sandbox, Error> {
        find_under(&paths::sandboxes_in(data_dir), id)
    }

    /// Every sandbox in the default data directory, newest first.
    pub fn list() -> Result<Vec<Sandbox>, Error> {
        Self::list_in(&paths::data_dir())
    }

    /// [`Self::list`] in the data directory `data_dir`.
    pub fn list_in(data_dir: &Path) -> Result<Vec<Sandbox>, Error> {
        list_under(&paths::sandboxes_in(data_dir))
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// The sandbox's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its `session.db`.
    pub fn session_db(&self) -> PathBuf {
        self.dir.session_db()
    }

    /// Its `ca.pem`: the certificate (never the key) of the sandbox's own
    /// CA, the one its guest trusts; written when the sandbox starts.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.ca_cert()
    }

    /// Is the VM running: its holder alive, and its VMM accepting
    /// connections on `vsock.sock`?
    pub fn is_running(&self) -> bool {
        self.holder_alive() && std::os::unix::net::UnixStream::connect(self.dir.vsock_socket()).is_ok()
    }

    /// The CPU time and memory its host processes use now; an error when
    /// its holder is gone. (For a sandbox held in this process, this
    /// process's own use.)
    pub fn host_usage(&self) -> Result<HostUsage, Error> {
        if !self.holder_alive() {
            return Err(Error::NotRunning(self.id().to_string()));
        }
        Ok(tree_usage(self.state.pid))
    }

    fn holder_alive(&self) -> bool {
        self.held_here || self.state.pid != 0 && process_start(self.state.pid) == Some(self.state.pid_start)
    }

    /// Is the holder a process that exists only to hold this sandbox (and
    /// not, say, an application embedding the library, which must not be
    /// signalled)?
    fn held_in_background(&self) -> bool {
        self.state.detached && self.holder_alive()
    }

    /// A new connection to the guest agent.
    pub(crate) fn agent(&self) -> Result<AgentConn, Error> {
        self.agent_with(&[])
    }

    /// A new connection to the guest agent, `first` sent with the hello.
    /// (The VMM refusing the connection is what says that the VM is gone,
    /// so no connection is made just to ask whether it is running.)
    fn agent_with(&self, first: &[HostMessage]) -> Result<AgentConn, Error> {
        if !self.holder_alive() {
            return Err(Error::NotRunning(self.state.id.clone()));
        }
        let mut attempts = 1;
        loop {
            match AgentConn::connect_with(&self.dir.vsock_socket(), CONNECT_TIMEOUT, first) {
                Err(AgentError::Connect { .. }) => return Err(Error::NotRunning(self.state.id.clone())),
                // A guest just restored from a snapshot has now and then reset
                // a fresh connection to its agent: try again, briefly.
                Err(AgentError::Refused(reply)) if attempts < REFUSED_ATTEMPTS && self.holder_alive() => {
                    tracing::debug!(id = %self.state.id, attempts, ?reply, "the agent connection was refused; trying again");
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Start `command` and return it running. With an OCI image, the
    /// image's environment, directory and user apply (see [`Command`]).
    pub fn spawn(&self, command: Command) -> Result<Process, Error> {
        let mut exec = command.to_exec(self.state.image_config.as_ref())?;
        if command.terminal {
            exec.tty = Some(crate::terminal::attach_size()?);
        }
        let Command { stdin, stdout, stderr, terminal, .. } = command;
        let process = Process::start(|first| self.agent_with(first), exec, stdin, stdout, stderr)?;
        if terminal {
            let attached = crate::terminal::attach(process.control())?;
            return Ok(process.with_terminal(attached));
        }
        Ok(process)
    }

    /// Run `command` to its end and collect its output (up to its
    /// [`Command::output_limit`]; streams given to `stdout_to`/`stderr_to`
    /// get everything instead). Past its [`Command::timeout`] the command
    /// is killed and the status is [`Status::TimedOut`].
    pub fn output(&self, command: Command) -> Result<Output, Error> {
        self.collect(command, |_| {}, |process| process.kill())
    }

    /// [`Self::output`], handing `started` the command's [`ProcessControl`]
    /// as soon as it runs, so that other code can signal or kill it (say,
    /// when the client that asked for it goes away).
    pub fn output_with(&self, command: Command, started: impl FnOnce(ProcessControl)) -> Result<Output, Error> {
        self.collect(command, |process| started(process.control()), |process| process.kill())
    }

    /// [`Self::output`], telling `started` of the running command and doing
    /// `on_timeout` when its timeout passes.
    pub(crate) fn collect(
        &self,
        mut command: Command,
        started: impl FnOnce(&Process),
        on_timeout: impl FnOnce(&Process) -> Result<(), Error>,
    ) -> Result<Output, Error> {
        let out = Arc::new(Mutex::new(Collected::new(command.output_limit)));
        let err = Arc::new(Mutex::new(Collected::new(command.output_limit)));
        let timeout = command.timeout;
        if matches!(command.stdout, OutputSink::Piped) {
            command = command.stdout_to(Collect(Arc::clone(&out)));
        }
        if matches!(command.stderr, OutputSink::Piped) {
            command = command.stderr_to(Collect(Arc::clone(&err)));
        }
        let mut process = self.spawn(command)?;
        started(&process);
        let status = match timeout {
            None => Status::Exited(process.wait()?),
            Some(t) => match process.wait_timeout(t)? {
                Some(code) => Status::Exited(code),
                None => {
                    on_timeout(&process)?;
                    // Ends with the status, or with an error if the VM was stopped.
                    let _ = process.wait();
                    Status::TimedOut
                }
            },
        };
        let take = |c: &Arc<Mutex<Collected>>| c.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default();
        let (out, err) = (take(&out), take(&err));
        Ok(Output {
            status,
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
        })
    }

    /// The sandbox's events as they are recorded in its `session.db`: every
    /// DNS query, connection and model call, oldest first, then new ones as
    /// they come, until the sandbox has stopped.
    pub fn events(&self) -> Result<Events, Error> {
        Events::open(self.clone())
    }

    /// Copy the local file `src` to `dst` in the guest, keeping its mode.
    pub fn copy_in(&self, src: &Path, dst: &str) -> Result<u64, Error> {
        use std::os::unix::fs::PermissionsExt;
        let io = |e| Error::Io(format!("read {}", src.display()), e);
        let mut file = std::fs::File::open(src).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(Error::Config(format!("{} is not a regular file (only files can be copied)", src.display())));
        }
        Ok(self.agent()?.put_file(&mut file, dst, meta.permissions().mode() & 0o7777)?)
    }

    /// Copy `src` in the guest to the local file `dst` (written whole or not at all).
    pub fn copy_out(&self, src: &str, dst: &Path) -> Result<u64, Error> {
        self.copy_out_at_most(src, dst, u64::MAX)
    }

    /// [`Self::copy_out`], refusing a file of more than `max` bytes (the
    /// guest decides how many it sends: a device or a FIFO never ends).
    pub fn copy_out_at_most(&self, src: &str, dst: &Path, max: u64) -> Result<u64, Error> {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let io = |what: &str, e| Error::Io(format!("{what} {}", dst.display()), e);
        let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| io("create", e))?;
        let n = self.agent()?.get_file(src, &mut tmp, max)?;
        tmp.persist(dst).map_err(|e| io("write", e.error))?;
        Ok(n)
    }

    /// The guest's file system entry at `path` (absolute; a symbolic link
    /// is not followed).
    pub fn stat(&self, path: &str) -> Result<Entry, Error> {
        let entries = self.agent()?.fs(FsRequest::Stat { path: path.into() })?;
        first_entry(entries)
    }

    /// The entries under the guest directory `path`, down to `depth` levels
    /// (1: its own entries; at most 100,000 entries).
    pub fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<Entry>, Error> {
        Ok(self.agent()?.fs(FsRequest::List { path: path.into(), depth })?)
    }

    /// Make the guest directory `path` with any missing parents (an existing
    /// one is an error of kind `AlreadyExists`).
    pub fn make_dir(&self, path: &str) -> Result<Entry, Error> {
        let entries = self.agent()?.fs(FsRequest::MakeDir { path: path.into() })?;
        first_entry(entries)
    }

    /// Remove `path` in the guest: a file, or a directory with all it holds.
    pub fn remove_path(&self, path: &str) -> Result<(), Error> {
        self.agent()?.fs(FsRequest::Remove { path: path.into() })?;
        Ok(())
    }

    /// Rename `from` to `to` in the guest; the entry at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<Entry, Error> {
        let entries = self.agent()?.fs(FsRequest::Rename { from: from.into(), to: to.into() })?;
        first_entry(entries)
    }

    /// A byte stream to `127.0.0.1:guest_port` inside the guest: a TCP
    /// connection made there by the guest agent, carried over vsock by the
    /// process that holds the sandbox, which records it in `session.db`
    /// (an `inbound_events` row, listener `connect_port`). Reading gives
    /// what the guest's server sends; `shutdown(Write)` passes the end of
    /// the request on as a half-close. Nothing listening on the port is an
    /// error. See [`Self::connect_port_from`] to record who asked.
    pub fn connect_port(&self, guest_port: u16) -> Result<std::os::unix::net::UnixStream, Error> {
        self.connect_port_from(guest_port, None)
    }

    /// [`Self::connect_port`], recording `peer` (say, the address of the
    /// client an HTTP server opens it for) as the row's `peer`.
    pub fn connect_port_from(
        &self,
        guest_port: u16,
        peer: Option<&str>,
    ) -> Result<std::os::unix::net::UnixStream, Error> {
        let peer = peer.map(str::to_string);
        if let Some(forwarder) = &self.forwarder {
            return forwarder.connect(guest_port, peer);
        }
        self.check_holder_serves()?;
        let (reply, fd) =
            crate::control::call_with(self.dir.path(), &ControlRequest::Connect { guest_port, peer }, None)?;
        match (reply, fd) {
            (ControlReply::Done, Some(fd)) => Ok(std::os::unix::net::UnixStream::from(fd)),
            (other, _) => Err(Error::Holder(format!("unexpected reply to a connect request: {other:?}"))),
        }
    }

    /// Forward a host port to the guest: bind `spec.host` here (the
    /// caller's rights and choice of address; port 0 picks a free one) and
    /// carry every connection to it to the guest's
    /// `127.0.0.1:spec.guest_port`, each recorded in `session.db`, until
    /// the sandbox stops. Returns the forward with the address bound.
    pub fn forward_port(&self, spec: &PortSpec) -> Result<PortForward, Error> {
        self.forward_listener(spec.bind()?, spec.guest_port)
    }

    /// [`Self::forward_port`] with a listener the caller bound. For a
    /// sandbox a holder process holds, the listening socket is handed to
    /// it (on its control socket), which only accepts on it.
    pub fn forward_listener(&self, listener: std::net::TcpListener, guest_port: u16) -> Result<PortForward, Error> {
        use std::os::fd::AsRawFd;
        if guest_port == 0 {
            return Err(Error::Config("a forward needs a guest port (1-65535)".into()));
        }
        if let Some(forwarder) = &self.forwarder {
            return forwarder.forward(listener, guest_port);
        }
        self.check_holder_serves()?;
        let request = ControlRequest::Forward { guest_port };
        match crate::control::call_with(self.dir.path(), &request, Some(listener.as_raw_fd()))? {
            (ControlReply::Forwarding(forward), _) => Ok(forward),
            (other, _) => Err(Error::Holder(format!("unexpected reply to a forward request: {other:?}"))),
        }
    }

    /// The port forwards of the sandbox while it runs (none once it stopped).
    pub fn ports(&self) -> Vec<PortForward> {
        if let Some(forwarder) = &self.forwarder {
            return forwarder.forwards();
        }
        if !self.holder_alive() {
            return Vec::new();
        }
        crate::ports::recorded(&self.dir)
    }

    /// Is the sandbox held by a process that serves a control socket (a
    /// holder), which port requests need?
    fn check_holder_serves(&self) -> Result<(), Error> {
        if !self.holder_alive() {
            return Err(Error::NotRunning(self.state.id.clone()));
        }
        if !self.state.detached {
            return Err(Error::Config(format!(
                "sandbox {} is held by process {} (an application that started it with start()): only that process can carry connections into it",
                self.state.id, self.state.pid
            )));
        }
        Ok(())
    }

    /// Stop the sandbox and wait until the VM is gone. A holder process
    /// ([`SandboxBuilder::spawn`], `run -d`) is signalled and stops the VM
    /// at once; a sandbox an application holds in its own process is asked
    /// to power off. After `timeout`, a holder is killed; an application's
    /// process is left alone and this is an error.
    /// Stopping a stopped sandbox does nothing.
    pub fn stop(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        if self.held_in_background() {
            // A holder stops its VM at once when told to (nothing in a guest
            // needs a clean power off: its writable layer is its memory).
            signal(self.state.pid, Signal::SIGTERM)
                .map_err(|e| Error::Io(format!("signal the holder of sandbox {}", self.state.id), e.into()))?;
        } else if self.is_running() {
            if let Err(e) = self.agent().and_then(|agent| Ok(agent.shutdown()?)) {
                tracing::debug!(id = %self.state.id, "asking the guest to power off: {e}");
            }
        }
        while self.is_running() || self.held_in_background() {
            if Instant::now() >= deadline {
                if !self.held_in_background() {
                    return Err(Error::Config(format!(
                        "sandbox {} did not power off within {timeout:?}; process {} holds it and must stop it",
                        self.state.id, self.state.pid
                    )));
                }
                tracing::warn!(id = %self.state.id, pid = self.state.pid, "the sandbox did not stop in time; killing its process");
                self.kill_holder()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kill the holder and wait until it is gone. A confined holder is two
    /// processes: the one `state.json` names and the jailed one it waits
    /// for, which would die with it (`PR_SET_PDEATHSIG`) but not at once,
    /// so both are killed and waited for.
    fn kill_holder(&self) -> Result<(), Error> {
        let outer = self.state.pid;
        // The outer one first: killed after its child, it could see the
        // child end and exit as if all were well.
        let mut holders = vec![(outer, self.state.pid_start)];
        holders.extend(children(outer).into_iter().filter_map(|pid| process_start(pid).map(|start| (pid, start))));
        for &(pid, _) in &holders {
            signal(pid, Signal::SIGKILL)
                .map_err(|e| Error::Io(format!("kill process {pid} holding sandbox {}", self.state.id), e.into()))?;
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        while holders.iter().any(|&(pid, start)| process_start(pid) == Some(start) && !zombie(pid)) {
            if Instant::now() >= deadline {
                return Err(Error::Config(format!(
                    "the processes holding sandbox {} were killed but are still there after {KILL_TIMEOUT:?}",
                    self.state.id
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Save the sandbox to a snapshot in `dir` (created; it must not
    /// exist), then let it run on or stop it, as `then` says. The process
    /// that holds the sandbox writes it into the sandbox's directory, asked
    /// on its control socket, and it is then moved to `dir` (fastest on the
    /// data directory's file system); with [`AfterSnapshot::Stop`] it
    /// returns once the sandbox has stopped. For a sandbox this process holds,
    /// [`crate::Instance::snapshot`] does it directly.
    pub fn snapshot(&self, dir: impl AsRef<Path>, then: AfterSnapshot) -> Result<Snapshot, Error> {
        let dir = dir.as_ref();
        if self.held_here {
            return Err(Error::Config(format!(
                "this process holds sandbox {}: take its snapshot with Instance::snapshot",
                self.state.id
            )));
        }
        if !self.holder_alive() {
            return Err(Error::NotRunning(self.state.id.clone()));
        }
        if dir.exists() {
            return Err(Error::Config(format!("{} already exists", dir.display())));
        }
        let name = format!("snapshot{}", crate::instance::new_id()?);
        let request = ControlRequest::Snapshot { name: name.clone(), stop: then == AfterSnapshot::Stop };
        crate::control::call(self.dir.path(), &request)?;
        let snapshot = crate::snapshot::publish(&self.dir.path().join(name), dir)?;
        if then == AfterSnapshot::Stop {
            // Its VM has stopped; return once its holder is gone too.
            self.stop(KILL_TIMEOUT)?;
        }
        Ok(snapshot)
    }

    /// Start `count` copies of this running sandbox: it is snapshotted once
    /// (and runs on) into its data directory's snapshot store, then each
    /// copy is restored from that snapshot in a holder of its own, as
    /// [`SandboxBuilder::spawn`] starts one, with the source's profiles;
    /// `configure` sets the rest (holder program, jail, label, timeout).
    /// The snapshot is deleted once the copies have started. Each copy's
    /// result, in order: one that fails to start does not stop the others.
    pub fn fork(
        &self,
        count: usize,
        configure: impl Fn(SandboxBuilder) -> SandboxBuilder,
    ) -> Result<Vec<Result<Sandbox, Error>>, Error> {
        let data_dir = self.data_dir();
        let store = paths::snapshots_in(&data_dir);
        crate::snapshot::create_store(&store)?;
        let name = format!("fork-{}-{}", self.state.id, crate::instance::new_id()?);
        let snapshot = self.snapshot(store.join(name), AfterSnapshot::Resume)?;
        let copies = (0..count)
            .map(|_| {
                let mut builder = Sandbox::from_snapshot(snapshot.clone()).data_dir(&data_dir);
                for (layer, profile) in &self.state.profiles {
                    builder = builder.profile_at(*layer, profile.clone());
                }
                configure(builder).spawn()
            })
            .collect();
        snapshot.remove()?;
        Ok(copies)
    }

    /// The data directory the sandbox lives in (`<data dir>/sandboxes/<id>`).
    fn data_dir(&self) -> PathBuf {
        let dir = self.dir.path();
        dir.parent().and_then(Path::parent).map_or_else(|| dir.to_path_buf(), Path::to_path_buf)
    }

    /// Delete the sandbox's directory (its logs included). A running sandbox
    /// is refused unless `force`, which stops it first.
    pub fn remove(&self, force: bool) -> Result<(), Error> {
        if self.is_running() || self.held_in_background() {
            if !force {
                return Err(Error::Config(format!(
                    "sandbox {} is running; stop it first (sandbox stop {}) or remove it with --force",
                    self.state.id, self.state.id
                )));
            }
            self.stop(Duration::from_secs(40))?;
        }
        let dir = self.dir.path();
        std::fs::remove_dir_all(dir).map_err(|e| Error::Io(format!("remove {}", dir.display()), e))
    }
}

/// The one entry a file system operation answers with.
fn first_entry(entries: Vec<Entry>) -> Result<Entry, Error> {
    entries.into_iter().next().ok_or_else(|| AgentError::Unexpected("an answer without its entry".into()).into())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn the_start_time_of_this_process_is_read_and_stable() {
        let me = std::process::id();
        let start = process_start(me).unwrap();
        assert!(start > 0);
        assert_eq!(process_start(me), Some(start));
        assert_eq!(process_start(u32::MAX), None);
    }

    #[test]
    fn host_usage_counts_a_process_tree() {
        // A child that burns CPU, with a grandchild.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 3 & i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let pid = child.id();
        let usage = tree_usage(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert!(usage.processes >= 2, "{usage:?}");
        assert!(usage.cpu > Duration::from_millis(10), "{usage:?}");
        assert!(usage.memory_bytes > 0, "{usage:?}");
        assert_eq!(tree_usage(u32::MAX), HostUsage::default());
    }

    fn write_state(root: &Path, id: &str, pid: u32, pid_start: u64, created: u64) -> PathBuf {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = SandboxState::new(id, "default", &["true".to_string()], 256, 1);
        (state.pid, state.pid_start, state.created) = (pid, pid_start, created);
        state.save(&SandboxDir::new(&dir)).unwrap();
        dir
    }

    #[test]
    fn sandboxes_are_listed_newest_first_and_found_by_prefix() {
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let live = write_state(root.path(), "aaaa1111", me, process_start(me).unwrap(), 20);
        write_state(root.path(), "aaaa2222", me, 1, 10);
        std::fs::create_dir(root.path().join("bbbb")).unwrap();
        std::fs::write(root.path().join("last"), "aaaa1111").unwrap();
        let all = list_under(root.path()).unwrap();
        let ids: Vec<&str> = all.iter().map(Sandbox::id).collect();
        assert_eq!(ids, ["aaaa1111", "aaaa2222"]);

        // Running needs the live holder and a VMM listening on the socket.
        assert!(!all[0].is_running());
        let vmm = UnixListener::bind(live.join("vsock.sock")).unwrap();
        assert!(all[0].is_running());
        // A recycled pid (other start time) is not the holder.
        let _other = UnixListener::bind(root.path().join("aaaa2222/vsock.sock")).unwrap();
        assert!(!all[1].is_running());
        assert!(matches!(all[1].agent(), Err(Error::NotRunning(_))));
        // The socket file outlives the VMM: no longer running.
        drop(vmm);
        assert!(!all[0].is_running());

        assert_eq!(find_under(root.path(), "aaaa2").unwrap().id(), "aaaa2222");
        let err = find_under(root.path(), "aaaa").unwrap_err().to_string();
        assert!(err.contains("more than one"), "{err}");
        assert!(matches!(find_under(root.path(), "cccc"), Err(Error::NoSuchSandbox(_))));
        assert!(find_under(root.path(), "../etc").is_err());
    }

    /// A VMM stand-in that takes connections and drops them (so the agent
    /// cannot be reached and the guest never powers off). It is gone when
    /// its socket file is removed, as a stopped sandbox's is.
    fn unresponsive_vmm(path: &Path) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || for _ in listener.incoming() {});
    }

    #[test]
    fn a_stuck_sandbox_is_killed_only_when_held_in_the_background() {
        let root = tempfile::tempdir().unwrap();
        // An application's own process (this one) holds the first one.
        let me = std::process::id();
        let dir = write_state(root.path(), "app01", me, process_start(me).unwrap(), 1);
        unresponsive_vmm(&dir.join("vsock.sock"));
        let held = find_under(root.path(), "app01").unwrap();
        let err = held.remove(false).unwrap_err().to_string();
        assert!(err.contains("is running"), "{err}");
        let err = held.stop(Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("holds it"), "{err}");
        std::fs::remove_file(dir.join("vsock.sock")).unwrap();
        held.stop(Duration::from_secs(1)).unwrap();
        held.remove(false).unwrap();
        assert!(!dir.exists());

        // A background holder (its state file says so) that does not stop
        // when signalled is killed after the timeout, with the process it
        // waits for, as a confined holder does.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let inner: u32 = line.trim().parse().unwrap();
        let inner_start = process_start(inner).unwrap();
        let pid = child.id();
        let start = process_start(pid).unwrap();
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        let dir = write_state(root.path(), "bg01", pid, start, 1);
        let mut state = find_under(root.path(), "bg01").unwrap().state;
        state.detached = true;
        state.save(&SandboxDir::new(&dir)).unwrap();
        unresponsive_vmm(&dir.join("vsock.sock"));
        let background = find_under(root.path(), "bg01").unwrap();
        assert!(background.held_in_background());
        background.stop(Duration::from_millis(300)).unwrap();
        assert!(!reaper.join().unwrap().success(), "the holder was killed");
        assert!(process_start(inner) != Some(inner_start) || zombie(inner), "the holder's child outlived stop");
        background.remove(false).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn ids_are_alphanumeric() {
        assert!(valid_id("0123abcdef99"));
        for bad in ["", "../x", "a/b", "a b", ".", &"a".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
