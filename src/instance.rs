//! A running sandbox: the VM on its own thread, the host handlers on their
//! vsock sockets, the session database, and the guest agent to drive it.
//!
//! Every sandbox has a private directory (mode 0700) under
//! `<data dir>/sandboxes/<id>/` holding the VMM's `vsock.sock` (and the
//! handlers' `vsock.sock_5002`, `vsock.sock_5007`) while it runs, and its
//! `session.db` for good. Each VM has its own in-process vsock device, so
//! every guest can use the same CID: nothing routes between sandboxes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_protocol::agent::Exec;
use sandbox_net::{Handlers, NetConfig, Server};
use sandbox_telemetry::SessionDb;

use crate::agent::{AgentConn, AgentError};
use crate::console::{ConsoleSink, ConsoleState};
use crate::registry::{SandboxRef, SandboxState};
use crate::{paths, Error};

/// The guest's vsock CID (see the module docs for why one value serves all).
pub const GUEST_CID: u32 = 3;
/// How long a guest may take from power-on until its agent answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a guest may take to power off when asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// What an [`Instance`] is built from.
pub(crate) struct InstanceConfig {
    /// The image as the user named it, and the command (for `sandbox ps`).
    pub image_name: String,
    pub command: Vec<String>,
    pub kernel: PathBuf,
    pub root_disk: PathBuf,
    /// Further read-only disks (`/dev/vdb`, ...): an OCI image to overlay.
    pub extra_disks: Vec<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub policy: sandbox_policy::Policy,
    pub net: NetConfig,
    pub console: Option<Box<dyn Write + Send>>,
}

/// A booted sandbox.
pub struct Instance {
    id: String,
    dir: PathBuf,
    state: SandboxState,
    started: Instant,
    boot_time: Duration,
    stop: vmm::StopHandle,
    vm: Option<JoinHandle<Result<vmm::ExitReason, vmm::Error>>>,
    runtime: Option<tokio::runtime::Runtime>,
    servers: Vec<Server>,
    session: Option<SessionDb>,
    console: Arc<Mutex<ConsoleState>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("id", &self.id).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A fresh random sandbox id (12 hex digits).
fn new_id() -> Result<String, Error> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Io("read /dev/urandom".into(), e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Create `dir` with mode 0700 (and its parents).
fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Io(format!("create {}", dir.display()), e))
}

impl Instance {
    /// Boot a sandbox and wait until its agent answers.
    pub(crate) fn start(config: InstanceConfig) -> Result<Instance, Error> {
        let id = new_id()?;
        let dir = paths::sandboxes_dir().join(&id);
        private_dir(&dir)?;
        let state = SandboxState::new(&id, &config.image_name, &config.command, config.memory_mib, config.vcpus);
        state.save(&dir)?;
        let session = SessionDb::open(&dir.join("session.db"))?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sandbox-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Io("start the handler runtime".into(), e))?;
        let handlers = Handlers::new(config.net, config.policy, session.recorder())?;
        let ca_pem = handlers.ca().ca_cert_pem().to_string();
        let servers = {
            let _enter = runtime.enter();
            let (dns, mitm) = handlers.serve_vsock_dir(&dir)?;
            vec![dns, mitm]
        };

        let console = Arc::new(Mutex::new(ConsoleState::default()));
        let started = Instant::now();
        let sink = ConsoleSink::new(started, Arc::clone(&console), None, config.console);
        let uds = dir.join("vsock.sock");
        let vm = vmm::Vm::create(vmm::VmConfig {
            kernel: config.kernel,
            cmdline: config.cmdline,
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            root_disk: config.root_disk,
            extra_disks: config.extra_disks.into_iter().map(vmm::ExtraDisk::read_only).collect(),
            serial: Box::new(sink),
            vsock: Some(vmm::devices::virtio::vsock::VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() }),
        })?;
        let stop = vm.stop_handle();
        let vm = std::thread::Builder::new()
            .name(format!("vm-{id}"))
            .spawn(move || vm.run())
            .map_err(|e| Error::Io("start the VM thread".into(), e))?;

        let mut instance = Instance {
            id,
            dir,
            state,
            started,
            boot_time: Duration::ZERO,
            stop,
            vm: Some(vm),
            runtime: Some(runtime),
            servers,
            session: Some(session),
            console,
        };
        let ready = {
            let vm = instance.vm.as_ref();
            crate::agent::wait_ready(&uds, BOOT_TIMEOUT, || vm.is_some_and(|t| !t.is_finished()))
        };
        if let Err(e) = ready {
            let tail = instance.console_tail();
            let _ = instance.finish();
            return Err(Error::Boot(format!("{e}; last console lines:\n{tail}")));
        }
        instance.boot_time = instance.started.elapsed();
        instance.agent()?.trust_ca(&ca_pem)?;
        tracing::debug!(id = %instance.id, boot = ?instance.boot_time, "sandbox ready");
        Ok(instance)
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox's private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// From power-on until the agent answered.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// A new connection to the guest agent.
    pub fn agent(&self) -> Result<AgentConn, AgentError> {
        AgentConn::connect(&self.dir.join("vsock.sock"), Duration::from_secs(30))
    }

    /// This sandbox as other processes see it (see [`crate::registry`]).
    pub fn sandbox_ref(&self) -> SandboxRef {
        SandboxRef::new(self.dir.clone(), self.state.clone())
    }

    /// Is the VM still running? (The guest may power itself off.)
    pub fn is_running(&self) -> bool {
        self.vm.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Copy a local file into the guest; see [`SandboxRef::copy_in`].
    pub fn copy_in(&self, src: &Path, dst: &str) -> Result<u64, Error> {
        self.sandbox_ref().copy_in(src, dst)
    }

    /// Copy a guest file out; see [`SandboxRef::copy_out`].
    pub fn copy_out(&self, src: &str, dst: &Path) -> Result<u64, Error> {
        self.sandbox_ref().copy_out(src, dst)
    }

    /// A handle that stops the VM from any thread.
    pub fn stop_handle(&self) -> vmm::StopHandle {
        self.stop.clone()
    }

    /// Run a command; see [`AgentConn::exec`].
    pub fn exec(
        &self,
        exec: Exec,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, Error> {
        Ok(self.agent()?.exec(exec, stdin, stdout, stderr)?)
    }

    /// What the guest wrote to its serial console after the start marker:
    /// the last 64 KiB, after a line saying how many earlier bytes were
    /// dropped (the host keeps no more, however much the guest writes).
    pub fn console_output(&self) -> Vec<u8> {
        self.console.lock().map(|s| s.output_tail()).unwrap_or_default()
    }

    fn console_tail(&self) -> String {
        let state = self.console.lock().map(|s| s.console.clone()).unwrap_or_default();
        let log = String::from_utf8_lossy(&state);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Ask the guest to power off, wait for it (stopping it if it does not),
    /// stop the handlers and flush the session database. Returns the console log.
    pub fn shutdown(mut self) -> Result<Vec<u8>, Error> {
        if let Ok(agent) = self.agent() {
            let _ = agent.shutdown();
        }
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<u8>, Error> {
        let mut result = Ok(());
        if let Some(vm) = self.vm.take() {
            let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
            while !vm.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !vm.is_finished() {
                tracing::warn!(id = %self.id, "guest did not power off in time; stopping it");
                self.stop.stop();
            }
            result = match vm.join() {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Error::Vmm(e)),
                Err(_) => Err(Error::Boot("the VM thread panicked".into())),
            };
        }
        let servers = std::mem::take(&mut self.servers);
        if let Err(e) = stop_handlers(self.runtime.take(), servers, self.session.take()) {
            tracing::error!(id = %self.id, error = %e, "the session database was not closed cleanly");
            if result.is_ok() {
                result = Err(e);
            }
        }
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("vsock.sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let console = self.console.lock().map(|s| s.console.clone()).unwrap_or_default();
        result.map(|()| console)
    }
}

/// Stop the handlers, then commit every row they queued and close the
/// session database, waiting for its writer (dropping it would leave the
/// writer to finish on its own, and rows queued last could be lost when the
/// process exits), then stop the runtime.
fn stop_handlers(
    runtime: Option<tokio::runtime::Runtime>,
    servers: Vec<Server>,
    session: Option<SessionDb>,
) -> Result<(), Error> {
    let runtime = match runtime {
        Some(r) => r,
        None if servers.is_empty() && session.is_none() => return Ok(()),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Io("start a runtime to close the session database".into(), e))?,
    };
    let closed = runtime.block_on(async {
        for s in servers {
            s.shutdown().await;
        }
        match session {
            Some(session) => session.close().await.map(|committed| {
                tracing::debug!(committed, "session database closed");
            }),
            None => Ok(()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(closed?)
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.vm.is_some() {
            self.stop.stop();
            let _ = self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item7_session_db_rows_recorded_at_shutdown_are_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        let session = SessionDb::open(&path).unwrap();
        let recorder = session.recorder();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Rows the handlers queue just before the sandbox stops.
        const ROWS: usize = 10_000;
        for i in 0..ROWS {
            let event = sandbox_telemetry::DnsEvent {
                time: std::time::SystemTime::now(),
                qname: format!("q{i}.example"),
                qtype: "A".into(),
                rcode: "NXDOMAIN".into(),
                decision: sandbox_telemetry::Outcome::Denied,
                matched_rule: None,
                answers: Vec::new(),
                process_name: None,
                trace_id: None,
                error: None,
            };
            recorder.record_dns(event).unwrap();
        }
        // A handler still holding its recorder does not keep the close waiting.
        stop_handlers(Some(runtime), Vec::new(), Some(session)).unwrap();
        // Read at once, as the next process would after this one exited.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n: i64 = conn.query_row("SELECT count(*) FROM dns_events", [], |r| r.get(0)).unwrap();
        assert_eq!(n as usize, ROWS);
        drop(recorder);
    }
}
