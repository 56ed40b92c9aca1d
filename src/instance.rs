//! A running sandbox: the VM on its own thread, the host handlers on their
//! vsock sockets, the session database, and the guest agent to drive it.
//!
//! Every sandbox has a private directory (mode 0700) under
//! `<data dir>/sandboxes/<id>/` holding the VMM's `vsock.sock` (and the
//! handlers' `vsock.sock_5002`, `vsock.sock_5007`) while it runs, and its
//! `session.db` and `ca.pem` (the certificate of its own CA, which its guest
//! trusts) for good. Each VM has its own in-process vsock device, so
//! every guest can use the same CID: nothing routes between sandboxes.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_protocol::ports::GUEST_CID;
use guest_protocol::sandbox_dir::{is_vsock_socket_name, SandboxDir};
use net::{HandlerFiles, Handlers, NetConfig};
use telemetry::SessionDb;

use crate::agent::ReadySignal;
use crate::confine::{confine, HostFiles};
use crate::console::{ConsoleSink, ConsoleState};
use crate::ports::Forwarder;
use crate::sandbox::{Sandbox, SandboxState};
use crate::snapshot::Snapshot;
use crate::{paths, Error};

/// How long a guest may take from power-on until its agent answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Most threads the handlers' runtime starts for blocking work (each counts
/// against a confined sandbox's pids limit).
const MAX_BLOCKING_THREADS: usize = 16;
/// How long a guest may take to power off when asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// What an [`Instance`] is built from.
pub(crate) struct InstanceConfig {
    /// The sandbox's id, when the caller chose it (else a fresh one).
    pub id: Option<String>,
    /// The image as the user named it, and the command (for `sandbox ps`).
    pub image_name: String,
    pub label: Vec<String>,
    pub image_config: Option<rootfs::ImageConfig>,
    pub detached: bool,
    pub data_dir: PathBuf,
    pub kernel: PathBuf,
    pub root_disk: PathBuf,
    /// Further read-only disks (`/dev/vdb`, ...): an OCI image to overlay.
    pub extra_disks: Vec<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub policy: policy::Policy,
    /// Where the policy came from (recorded in `state.json`).
    pub profiles: Vec<(policy::Layer, policy::ProfileSource)>,
    pub net: NetConfig,
    pub console: Option<Box<dyn Write + Send>>,
    /// Confine this process to hold the sandbox (it must exist for that alone).
    pub jail: Option<crate::Jail>,
    /// Restore the VM from this snapshot instead of booting it (the kernel
    /// and disks above are the snapshot's).
    pub restore: Option<Snapshot>,
    /// Port forwards to start once the sandbox is ready: listeners bound by
    /// the caller (kept open through confinement), and their guest ports.
    pub forwards: Vec<(std::net::TcpListener, u16)>,
}

/// A sandbox this process holds: its VM runs on a thread of this process,
/// its host handlers on a runtime of their own. It derefs to [`Sandbox`]
/// for running commands, copying files and reading events. Dropping it
/// stops the VM; [`Instance::shutdown`] lets the guest power off first.
///
/// Nothing here blocks on an async runtime, so an `Instance` can be
/// started, used and dropped from inside one (blocking calls belong in
/// `spawn_blocking` there, as for any blocking I/O).
pub struct Instance {
    sandbox: Sandbox,
    started: Instant,
    boot_time: Duration,
    stop: vmm::StopHandle,
    controller: vmm::VmController,
    /// The kernel and disks (root first) the VM was built from.
    kernel: PathBuf,
    disks: Vec<PathBuf>,
    /// Their digests, when known (those of the snapshot it was restored from).
    digests: Option<vmm::Digests>,
    vm: Option<JoinHandle<Result<vmm::ExitReason, vmm::Error>>>,
    handlers: Option<HandlerHost>,
    console: Arc<Mutex<ConsoleState>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("id", &self.id()).field("dir", &self.dir()).finish_non_exhaustive()
    }
}

impl std::ops::Deref for Instance {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// `n` bytes from the host's random source.
fn random_bytes(n: usize) -> Result<Vec<u8>, Error> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Io("read /dev/urandom".into(), e))?;
    Ok(bytes)
}

/// A fresh random sandbox id (12 hex digits).
pub(crate) fn new_id() -> Result<String, Error> {
    Ok(random_bytes(6)?.iter().map(|b| format!("{b:02x}")).collect())
}

/// A guest identity: the sandbox CA `ca_pem`, 64 bytes of fresh host
/// entropy, the host's clock, and `hostname` (the sandbox id, as Docker
/// names a container's host).
fn identity(ca_pem: String, hostname: &str) -> Result<guest_protocol::agent::Identity, Error> {
    let entropy = random_bytes(64)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Ok(guest_protocol::agent::Identity {
        ca_pem,
        entropy,
        time: (i64::try_from(now.as_secs()).unwrap_or(i64::MAX), now.subsec_nanos()),
        hostname: Some(hostname.to_owned()),
    })
}

/// Publish the certificate of the sandbox's CA as `<dir>/ca.pem` (the key
/// stays in this process), for users to see what the guest trusts.
fn write_ca_cert(dir: &SandboxDir, pem: &str) -> Result<(), Error> {
    let path = dir.ca_cert();
    std::fs::write(&path, pem).map_err(|e| Error::Io(format!("write {}", path.display()), e))
}

/// Create `dir` with mode 0700 (and its parents).
pub(crate) fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Io(format!("create {}", dir.display()), e))
}

/// `path` with every symbolic link resolved (a confined holder sees each
/// file at its real path).
fn canonical(path: &Path) -> Result<PathBuf, Error> {
    path.canonicalize().map_err(|e| Error::Io(format!("find {}", path.display()), e))
}

/// The seccomp filters of a confined holder's threads, compiled before any
/// of them starts.
struct Filters {
    vmm: vmm::ThreadFilters,
    handlers: seccompiler::BpfProgram,
}

impl Filters {
    fn compile() -> Result<Filters, Error> {
        use jail::seccomp::{filter, ThreadKind};
        Ok(Filters {
            vmm: vmm::ThreadFilters {
                vcpu: Some(filter(ThreadKind::Vcpu)?),
                event_loop: Some(filter(ThreadKind::Vmm)?),
            },
            handlers: filter(ThreadKind::Handlers)?,
        })
    }
}

/// Open the session database. With `filter` (the handlers' seccomp
/// filter), from a thread that installs it first: the database's writer
/// thread, started there, inherits it.
fn open_session(path: &Path, filter: Option<seccompiler::BpfProgram>) -> Result<SessionDb, Error> {
    let Some(filter) = filter else {
        return Ok(SessionDb::open(path)?);
    };
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("session-db-open".into())
        .spawn(move || {
            seccompiler::apply_filter(&filter).map_err(|e| {
                Error::Io("install the session database's seccomp filter".into(), std::io::Error::other(e))
            })?;
            Ok(SessionDb::open(&path)?)
        })
        .map_err(|e| Error::Io("start the session database".into(), e))?
        .join()
        .map_err(|_| Error::Boot("opening the session database panicked".into()))?
}

impl Instance {
    /// Boot a sandbox and wait until its agent answers.
    pub(crate) fn start(mut config: InstanceConfig) -> Result<Instance, Error> {
        let id = match config.id.take() {
            Some(id) => id,
            None => new_id()?,
        };
        let dir = SandboxDir::new(paths::sandboxes_in(&config.data_dir).join(&id));
        private_dir(dir.path())?;
        let mut state = SandboxState::new(&id, &config.image_name, &config.label, config.memory_mib, config.vcpus);
        state.detached = config.detached;
        state.image_config = config.image_config.take();
        state.profiles = std::mem::take(&mut config.profiles);
        state.save(&dir)?;
        let files = HandlerFiles::load(&config.net)?;
        let ca_pem = files.ca().ca_cert_pem().to_string();
        write_ca_cert(&dir, &ca_pem)?;
        let seccomp = match config.jail.take() {
            Some(jail) => {
                config.kernel = canonical(&config.kernel)?;
                config.root_disk = canonical(&config.root_disk)?;
                config.extra_disks = config.extra_disks.iter().map(|d| canonical(d)).collect::<Result<_, _>>()?;
                let snapshot_files = config.restore.as_ref().map(|s| s.files());
                let files = HostFiles {
                    read_only: std::iter::once(&config.kernel)
                        .chain(std::iter::once(&config.root_disk))
                        .chain(&config.extra_disks)
                        .chain(snapshot_files.iter().flat_map(|f| [&f.state, &f.memory]))
                        .map(PathBuf::as_path)
                        .collect(),
                    keep_fds: config.forwards.iter().map(|(listener, _)| listener.as_raw_fd()).collect(),
                };
                confine(&jail, &id, &dir, config.memory_mib, files)?;
                Some(Filters::compile()?)
            }
            None => None,
        };
        let session = open_session(&dir.session_db(), seccomp.as_ref().map(|f| f.handlers.clone()))?;
        let recorder = session.recorder();
        let handlers = Handlers::with_files(files, config.net, config.policy, session.recorder());
        let handlers =
            HandlerHost::start(&id, dir.path(), handlers, session, seccomp.as_ref().map(|f| f.handlers.clone()))?;
        let forwarder = Forwarder::new(handlers.runtime.clone(), recorder, &dir);

        let console = Arc::new(Mutex::new(ConsoleState::default()));
        let started = Instant::now();
        let ready = Arc::new(ReadySignal::default());
        let sink = ConsoleSink::new(started, Arc::clone(&console), Arc::clone(&ready), None, config.console);
        let uds = dir.vsock_socket();
        let kernel = config.kernel.clone();
        let disks: Vec<PathBuf> = std::iter::once(&config.root_disk).chain(&config.extra_disks).cloned().collect();
        let vm_config = vmm::VmConfig {
            kernel: config.kernel,
            cmdline: config.cmdline,
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            root_disk: config.root_disk,
            extra_disks: config.extra_disks.into_iter().map(vmm::ExtraDisk::read_only).collect(),
            serial: Box::new(sink),
            seccomp: seccomp.map(|f| f.vmm).unwrap_or_default(),
            vsock: Some(vmm::devices::virtio::vsock::VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() }),
        };
        let restored = config.restore.is_some();
        if restored {
            // The snapshot was taken while the agent listened.
            ready.raise();
        }
        let vm = match &config.restore {
            Some(snapshot) => vmm::Vm::restore(vm_config, &snapshot.files(), &snapshot.digests),
            None => vmm::Vm::create(vm_config),
        };
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                let _ = handlers.stop();
                return Err(e.into());
            }
        };
        let stop = vm.stop_handle();
        let controller = vm.controller();
        let vm = std::thread::Builder::new()
            .name(format!("vm-{id}"))
            .spawn(move || vm.run())
            .map_err(|e| Error::Io("start the VM thread".into(), e))?;

        let mut instance = Instance {
            sandbox: Sandbox::held_here(dir, state, forwarder),
            started,
            boot_time: Duration::ZERO,
            stop,
            controller,
            kernel,
            disks,
            digests: config.restore.map(|s| s.digests),
            vm: Some(vm),
            handlers: Some(handlers),
            console,
        };
        let ready = {
            let vm = instance.vm.as_ref();
            crate::agent::wait_ready(&uds, BOOT_TIMEOUT, &ready, || vm.is_some_and(|t| !t.is_finished()))
        };
        let agent = match ready {
            Ok(agent) => agent,
            Err(e) => {
                let tail = instance.console_tail();
                let _ = instance.finish();
                return Err(Error::Boot(format!("{e}; last console lines:\n{tail}")));
            }
        };
        instance.boot_time = instance.started.elapsed();
        agent.set_identity(identity(ca_pem, &id)?)?;
        for (listener, guest_port) in config.forwards {
            instance.forward_listener(listener, guest_port)?;
        }
        tracing::debug!(id = %instance.id(), boot = ?instance.boot_time, restored, "sandbox ready");
        Ok(instance)
    }

    /// Save the running VM to a snapshot in `dir` (created; it must not
    /// exist), then let it run on or stop it, as `then` says. A sandbox
    /// restored from it ([`Sandbox::from_snapshot`]) goes on from this
    /// point, with an identity of its own.
    pub fn snapshot(&self, dir: impl AsRef<Path>, then: vmm::AfterSnapshot) -> Result<Snapshot, Error> {
        let dir = dir.as_ref();
        crate::snapshot::create_dir(dir)?;
        let digests = match &self.digests {
            Some(known) => known.clone(),
            None => crate::snapshot::digests(&self.kernel, &self.disks)?,
        };
        let state = self.state();
        let snapshot = Snapshot {
            dir: dir.to_path_buf(),
            source: state.id.clone(),
            image: state.image.clone(),
            kernel: self.kernel.clone(),
            disks: self.disks.clone(),
            memory_mib: state.memory_mib,
            vcpus: state.vcpus,
            image_config: state.image_config.clone(),
            digests: digests.clone(),
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs(),
        };
        let info = self.controller.snapshot(&snapshot.files(), then, digests)?;
        snapshot.save()?;
        tracing::info!(
            id = %self.id(),
            dir = %dir.display(),
            paused = ?info.paused_for,
            memory_written = info.memory_written_bytes,
            "snapshot written"
        );
        Ok(snapshot)
    }

    /// The sandbox, as a handle other code can keep (and clone).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Is the VM still running? (The guest may power itself off.) Unlike
    /// [`Sandbox::is_running`], which other processes use, this asks the VM
    /// thread and opens no connection.
    pub fn is_running(&self) -> bool {
        self.vm.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// From power-on until the agent answered.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// When the VM was powered on.
    pub(crate) fn started_at(&self) -> Instant {
        self.started
    }

    /// A handle that stops the VM from any thread (the guest is not asked).
    pub fn stop_handle(&self) -> vmm::StopHandle {
        self.stop.clone()
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
    /// stop the handlers and commit every row to the session database.
    /// Returns the console log.
    pub fn shutdown(mut self) -> Result<Vec<u8>, Error> {
        if let Ok(agent) = self.agent() {
            let _ = agent.shutdown();
        }
        self.finish()
    }

    /// Stop the VM at once, without asking the guest (nothing in it needs
    /// saving: its writable layer is in its memory), then stop the
    /// handlers and commit every row as [`Self::shutdown`] does. Returns
    /// the console log.
    pub fn kill(mut self) -> Result<Vec<u8>, Error> {
        self.stop.stop();
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
                tracing::warn!(id = %self.id(), "guest did not power off in time; stopping it");
                self.stop.stop();
            }
            result = match vm.join() {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Error::Vmm(e)),
                Err(_) => Err(Error::Boot("the VM thread panicked".into())),
            };
        }
        // The VM is gone: the forwards stop and the connections into it
        // end, and record their rows before the session database closes.
        if let Some(forwarder) = self.sandbox.forwarder() {
            forwarder.close();
        }
        if let Some(handlers) = self.handlers.take() {
            if let Err(e) = handlers.stop() {
                tracing::error!(id = %self.id(), error = %e, "the session database was not closed cleanly");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        for entry in std::fs::read_dir(self.dir()).into_iter().flatten().flatten() {
            if is_vsock_socket_name(&entry.file_name()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let console = self.console.lock().map(|s| s.console.clone()).unwrap_or_default();
        result.map(|()| console)
    }
}

/// The host handlers of one sandbox on a thread of their own, which owns
/// their tokio runtime. Stopping them never needs the caller's runtime (so
/// it works from inside one): the thread stops the servers, commits every
/// queued row and closes the session database (dropping it would leave the
/// writer to finish on its own, and rows queued last could be lost when
/// the process exits), then ends.
struct HandlerHost {
    /// The handlers' runtime, where connections into the guest are carried too.
    runtime: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<Result<(), Error>>,
}

impl HandlerHost {
    /// Serve `handlers` on the vsock sockets of `dir`, recording into `session`.
    /// With `filter`, every thread of the runtime installs it on itself first.
    fn start(
        id: &str,
        dir: &Path,
        handlers: Handlers,
        session: SessionDb,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<HandlerHost, Error> {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime
            .worker_threads(net::RUNTIME_WORKERS)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("net")
            .enable_all();
        let confined = filter.is_some();
        let own_filter = filter.clone();
        if let Some(filter) = filter {
            runtime.on_thread_start(move || {
                // A thread without its filter still has the holder's (inherited).
                if let Err(e) = seccompiler::apply_filter(&filter) {
                    tracing::error!("installing the handler threads' seccomp filter: {e}");
                }
            });
        }
        let runtime = runtime.build().map_err(|e| Error::Io("start the handler runtime".into(), e))?;
        let handle = runtime.handle().clone();
        let self_test = confined.then(|| std::env::var(crate::confine::SELF_TEST_VAR).ok()).flatten();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("handlers-{id}"))
            .spawn(move || {
                if let Some(filter) = own_filter {
                    if let Err(e) = seccompiler::apply_filter(&filter) {
                        tracing::error!("installing the handler threads' seccomp filter: {e}");
                    }
                }
                let result = runtime.block_on(async move {
                    let servers = match handlers.serve_vsock_dir(&dir) {
                        Ok((dns, mitm)) => vec![dns, mitm],
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return session.close().await.map(drop).map_err(Error::from);
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    if let Some(test) = self_test {
                        tokio::spawn(async move { crate::confine::self_test(&test) });
                    }
                    // A dropped sender (the instance is gone) stops them too.
                    let _ = stopped.await;
                    for s in servers {
                        s.shutdown().await;
                    }
                    let committed = session.close().await?;
                    tracing::debug!(committed, "session database closed");
                    Ok(())
                });
                runtime.shutdown_timeout(Duration::from_secs(5));
                result
            })
            .map_err(|e| Error::Io("start the handler thread".into(), e))?;
        let host = HandlerHost { runtime: handle, stop, thread };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(host),
            Ok(Err(e)) => {
                let _ = host.stop();
                Err(e.into())
            }
            Err(_) => Err(host.stop().err().unwrap_or_else(|| Error::Boot("the handler thread ended".into()))),
        }
    }

    /// Stop the handlers and close the session database; wait for both.
    fn stop(self) -> Result<(), Error> {
        let _ = self.stop.send(());
        self.thread.join().map_err(|_| Error::Boot("the handler thread panicked".into()))?
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.vm.is_some() || self.handlers.is_some() {
            self.stop.stop();
            let _ = self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows the handlers queue just before the sandbox stops are all in the
    /// file when stopping returns, and stopping works from inside an async
    /// runtime (where an embedding application lives).
    #[tokio::test]
    async fn rows_recorded_at_shutdown_are_in_the_file_when_stopped_from_async_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.db");
        let session = SessionDb::open(&path).unwrap();
        let recorder = session.recorder();
        let net = NetConfig::default();
        let policy = policy::Policy::new(policy::Engine::builtin("deny-all").unwrap());
        let handlers = Handlers::new(net, policy, session.recorder()).unwrap();
        let host = HandlerHost::start("test", dir.path(), handlers, session, None).unwrap();
        assert!(dir.path().join("vsock.sock_5002").exists());
        const ROWS: usize = 10_000;
        for i in 0..ROWS {
            let event = telemetry::DnsEvent {
                time: std::time::SystemTime::now(),
                qname: format!("q{i}.example"),
                qtype: "A".into(),
                rcode: "NXDOMAIN".into(),
                decision: telemetry::Outcome::Denied,
                matched_rule: None,
                answers: Vec::new(),
                process_name: None,
                trace_id: None,
                error: None,
            };
            recorder.record_dns(event).unwrap();
        }
        // A handler still holding its recorder does not keep the close waiting.
        host.stop().unwrap();
        // Read at once, as the next process would after this one exited.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let n: i64 = conn.query_row("SELECT count(*) FROM dns_events", [], |r| r.get(0)).unwrap();
        assert_eq!(n as usize, ROWS);
        drop(recorder);
    }
}
