//! The task service: one shim process per container, one sandbox per task.
//!
//! `create` reads the bundle, builds the root image and boots the sandbox
//! (in a confined holder process: the shim itself only drives it);
//! `start` runs the bundle's process in it; `exec` adds processes. The
//! sandbox stops when the task's process ends, and `delete` removes what the
//! shim made for it (its `session.db` stays, under the shim's data dir).
//!
//! A pod's sandbox (pause) container, as CRI creates one, gets no VM: the
//! shim holds its place, running nothing, until it is killed. Each of the
//! pod's containers is a task with a sandbox of its own.
//!
//! The task table's lock is not held across a call into a guest, so a
//! guest that does not answer stalls only the requests about it.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::api;
use containerd_shim::protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use sandbox::policy::{Layer, ProfileSource};
use sandbox::{Image, ProcessControl, Sandbox, WinSize};

use crate::bundle::{ProcessSpec, TaskSpec};
use crate::config::ShimConfig;
use crate::stdio::{copy_output, copy_stdin, SharedStdin, Stdio};
use crate::{rootfs, Error};

/// How long the guest gets to power off when a task's sandbox stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to start a process.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a process's standard error a failed start reports.
const START_ERROR_BYTES: u64 = 4096;
/// The file in the bundle naming the task's sandbox (for `shim delete`
/// after a crash).
pub const SANDBOX_ID_FILE: &str = "sandbox-id";

/// A process's exit: its status as runc reports it, and when.
#[derive(Debug, Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

/// Set once when the process ends; waited on by `wait`.
#[derive(Debug, Default)]
struct ExitCell {
    exit: Mutex<Option<Exit>>,
    changed: Condvar,
}

impl ExitCell {
    fn set(&self, status: u32) -> Exit {
        let mut guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let exit = guard.get_or_insert_with(|| Exit { status, at: now() }).clone();
        self.changed.notify_all();
        exit
    }
    fn get(&self) -> Option<Exit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn wait(&self, timeout: Option<Duration>) -> Option<Exit> {
        let guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let guard = match timeout {
            None => self.changed.wait_while(guard, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()),
            Some(t) => self.changed.wait_timeout_while(guard, t, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()).0,
        };
        guard.clone()
    }
}

/// A process running in the guest.
struct Running {
    control: ProcessControl,
    pid: u32,
    stdin: SharedStdin,
}

/// The task's process or an exec.
struct Proc {
    spec: ProcessSpec,
    stdio: Stdio,
    /// `start` was called (the process may still be starting).
    started: bool,
    /// The guest process, once it runs (never for a pod's sandbox).
    running: Option<Running>,
    exit: Arc<ExitCell>,
}

impl Proc {
    fn new(spec: ProcessSpec, stdio: Stdio) -> Proc {
        Proc { spec, stdio, started: false, running: None, exit: Arc::new(ExitCell::default()) }
    }

    fn status(&self) -> api::Status {
        match (self.started, self.exit.get()) {
            (_, Some(_)) => api::Status::STOPPED,
            (true, None) => api::Status::RUNNING,
            (false, None) => api::Status::CREATED,
        }
    }
}

/// A container's microVM, and the root image it boots.
struct Vm {
    sandbox: Sandbox,
    image: rootfs::RootImage,
}

struct Task {
    bundle: PathBuf,
    /// `None` for a pod's sandbox (pause) container: nothing runs for it.
    vm: Option<Vm>,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Task {
    /// The task's pid: the host process holding its sandbox (the shim's
    /// own for a pod's sandbox container).
    fn pid(&self) -> u32 {
        match &self.vm {
            Some(vm) => vm.sandbox.state().pid,
            None => std::process::id(),
        }
    }
    fn sandbox(&self) -> Option<&Sandbox> {
        self.vm.as_ref().map(|vm| &vm.sandbox)
    }
    fn process(&self, exec_id: &str) -> Result<&Proc, Error> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| Error::NotFound(format!("no exec process {exec_id:?} in this task")))
    }
    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Proc, Error> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| Error::NotFound(format!("no exec process {exec_id:?} in this task")))
    }
    fn process_pid(&self, exec_id: &str, proc: &Proc) -> u32 {
        if exec_id.is_empty() {
            self.pid()
        } else {
            proc.running.as_ref().map(|r| r.pid).unwrap_or(0)
        }
    }
}

/// The task service of one shim process.
#[derive(Clone)]
pub struct Service {
    tasks: Arc<Mutex<HashMap<String, Task>>>,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    exit: Arc<ExitSignal>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("namespace", &self.namespace).field("data_dir", &self.data_dir).finish()
    }
}

impl Service {
    pub fn new(publisher: RemotePublisher, namespace: String, exit: Arc<ExitSignal>, data_dir: PathBuf) -> Service {
        Service { tasks: Arc::default(), publisher: Arc::new(publisher), namespace, exit, data_dir }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Task>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(Context::default(), topic, &self.namespace, event) {
            containerd_shim::warn!("publishing {topic}: {e}");
        }
    }

    /// Publish a process's exit.
    fn publish_exit(&self, task_id: &str, exec_id: &str, pid: u32, exit: Exit) {
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: task_id.to_string(),
                id: if exec_id.is_empty() { task_id.to_string() } else { exec_id.to_string() },
                pid,
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            }),
        );
    }

    fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, Error> {
        if req.id.is_empty() || req.bundle.is_empty() {
            return Err(Error::InvalidArgument("create needs a task id and a bundle directory".into()));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unsupported("restoring a task from a checkpoint"));
        }
        if self.tasks().contains_key(&req.id) {
            return Err(Error::FailedPrecondition(format!("task {} exists already", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = TaskSpec::load(&bundle)?;
        // Checked for a pod's sandbox container too, so that a pod with a
        // bad annotation fails at once.
        let profiles = ShimConfig::load()?.profiles(spec.profile.as_deref())?;
        let vm = if spec.pod_sandbox { None } else { Some(self.boot(req, &spec, profiles)?) };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || spec.process.terminal,
        };
        let task = Task { bundle, vm, init: Proc::new(spec.process, stdio), execs: HashMap::new() };
        let pid = task.pid();
        self.tasks().insert(req.id.clone(), task);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    /// Build a container's root image and start its sandbox.
    fn boot(
        &self,
        req: &api::CreateTaskRequest,
        spec: &TaskSpec,
        profiles: Vec<(Layer, ProfileSource)>,
    ) -> Result<Vm, Error> {
        let task_name = format!("{}/{}", self.namespace, req.id);
        let image = rootfs::prepare(&spec.root, &req.rootfs, &self.data_dir.join("images"), &task_name)?;
        let mut label = vec![format!("containerd:{task_name}")];
        if let Some(pod) = &spec.pod_container {
            label.push(format!("pod:{pod}"));
        }
        let mut builder = Sandbox::builder(Image::Rootfs(image.path.clone())).data_dir(&self.data_dir).label(label);
        for (layer, source) in profiles {
            builder = builder.profile_at(layer, source);
        }
        if let Some(mib) = spec.memory_mib {
            builder = builder.memory_mib(mib);
        }
        if let Some(n) = spec.vcpus {
            builder = builder.vcpus(n);
        }
        if std::env::var_os("SANDBOX_SHIM_COLD").is_none_or(|v| v.is_empty()) {
            builder = builder.warm();
        }
        let sandbox = match builder.spawn() {
            Ok(sandbox) => sandbox,
            Err(e) => {
                if !image.cached {
                    let _ = std::fs::remove_file(&image.path);
                }
                return Err(Error::sandbox(format!("starting the sandbox for task {}", req.id))(e));
            }
        };
        let id_file = Path::new(&req.bundle).join(SANDBOX_ID_FILE);
        if let Err(e) = std::fs::write(&id_file, sandbox.id()) {
            containerd_shim::warn!("writing {}: {e}", id_file.display());
        }
        containerd_shim::info!("task {} runs in sandbox {}", req.id, sandbox.id());
        Ok(Vm { sandbox, image })
    }

    fn start_process(&self, id: &str, exec_id: &str) -> Result<u32, Error> {
        // Claimed under the lock, started without it.
        let mut tasks = self.tasks();
        let task = tasks.get_mut(id).ok_or_else(|| not_found(id))?;
        let sandbox = task.sandbox().cloned();
        let proc = task.process_mut(exec_id)?;
        if proc.started || proc.exit.get().is_some() {
            return Err(Error::FailedPrecondition(format!("process {exec_id:?} of task {id} was started already")));
        }
        proc.started = true;
        let Some(sandbox) = sandbox else {
            // A pod's sandbox container: running from now until killed.
            let pid = task.pid();
            drop(tasks);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: id.to_string(), pid, ..Default::default() }),
            );
            return Ok(pid);
        };
        let (spec, stdio, exit) = (proc.spec.clone(), proc.stdio.clone(), proc.exit.clone());
        drop(tasks);

        let (mut process, guest_pid) = match start_in_guest(&sandbox, &spec, &stdio, &exit) {
            Ok(started) => started,
            Err(e) => {
                // It never ran: a task's sandbox ends with it.
                if exec_id.is_empty() {
                    stop_sandbox(&sandbox);
                }
                return Err(e);
            }
        };
        let stdin: SharedStdin = Arc::new(Mutex::new(process.take_stdin()));
        if !stdio.stdin.is_empty() {
            copy_stdin(stdio.stdin.clone(), stdin.clone());
        }
        let outputs: Vec<_> = [
            copy_output(process.take_stdout(), stdio.stdout.clone()),
            copy_output(process.take_stderr(), stdio.stderr.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let pid = {
            let mut tasks = self.tasks();
            let task = tasks.get_mut(id);
            let pid = match (&task, exec_id.is_empty()) {
                (Some(task), true) => task.pid(),
                _ => guest_pid,
            };
            if let Some(proc) = task.and_then(|t| t.process_mut(exec_id).ok()) {
                proc.running = Some(Running { control: process.control(), pid: guest_pid, stdin });
            }
            pid
        };
        if exit.get().is_some() {
            // Killed (or deleted) while it was starting: it ends now.
            let _ = process.kill();
        }

        let service = self.clone();
        let (task_id, process_id) = (id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let status = match process.wait() {
                Ok(code) => u32::try_from(code).unwrap_or(255),
                Err(e) => {
                    containerd_shim::warn!("waiting for process {process_id:?} of task {task_id}: {e}");
                    128 + libc::SIGKILL as u32
                }
            };
            for output in outputs {
                let _ = output.join();
            }
            service.publish_exit(&task_id, &process_id, pid, exit.set(status));
            if process_id.is_empty() {
                // The task's process ended: so does its sandbox.
                stop_sandbox(&sandbox);
            }
        });
        if exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: id.to_string(), pid, ..Default::default() }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(pid)
    }

    fn kill_process(&self, req: &api::KillRequest) -> Result<(), Error> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Error::InvalidArgument(format!("{} is not a signal number", req.signal)))?;
        let tasks = self.tasks();
        let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let proc = task.process(&req.exec_id)?;
        if proc.exit.get().is_some() {
            return Err(Error::NotFound(format!("process {:?} of task {} has already exited", req.exec_id, req.id)));
        }
        let is_init = req.exec_id.is_empty();
        let (control, exit, sandbox) =
            (proc.running.as_ref().map(|r| r.control.clone()), proc.exit.clone(), task.sandbox().cloned());
        let (started, pid) = (proc.started, task.process_pid(&req.exec_id, proc));
        drop(tasks);
        match (control, &sandbox) {
            (Some(control), _) => {
                control.signal(signal).map_err(Error::sandbox(format!("sending signal {signal}")))?;
            }
            (None, None) if started => {
                // A pod's sandbox container ends as pause does: 0 on
                // SIGINT or SIGTERM, else killed by the signal.
                let status = if matches!(signal, libc::SIGINT | libc::SIGTERM) { 0 } else { 128 + req.signal };
                self.publish_exit(&req.id, &req.exec_id, pid, exit.set(status));
            }
            // Never started: it ends here, as a created runc container
            // does. (Or still starting: the start then kills it.)
            (None, _) => {
                exit.set(128 + req.signal);
            }
        }
        if let (true, Some(sandbox)) = (is_init && (signal == libc::SIGKILL || !started), sandbox) {
            // SIGKILL of the task's process stops its sandbox, even if the
            // guest does not answer.
            std::thread::spawn(move || {
                exit.wait(Some(Duration::from_secs(5)));
                stop_sandbox(&sandbox);
                exit.set(128 + libc::SIGKILL as u32);
            });
        }
        Ok(())
    }

    fn delete_process(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, Error> {
        let mut tasks = self.tasks();
        let task = tasks.get_mut(id).ok_or_else(|| not_found(id))?;
        let proc = task.process(exec_id)?;
        let pid = task.process_pid(exec_id, proc);
        let exit = match (proc.exit.get(), proc.started) {
            (Some(exit), _) => exit,
            // Never started: a `wait` on it ends now too.
            (None, false) => proc.exit.set(0),
            (None, true) => {
                return Err(Error::FailedPrecondition(format!(
                    "process {exec_id:?} of task {id} is still running: kill it first"
                )))
            }
        };
        let response = api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at.clone()).into(),
            ..Default::default()
        };
        if !exec_id.is_empty() {
            task.execs.remove(exec_id);
            return Ok(response);
        }
        let Some(task) = tasks.remove(id) else { return Err(not_found(id)) };
        drop(tasks);
        // (The root was unmounted once its image was built: nothing of the
        // shim's is mounted there, and what is belongs to someone else.)
        if let Some(vm) = &task.vm {
            stop_sandbox(&vm.sandbox);
            if !vm.image.cached {
                let _ = std::fs::remove_file(&vm.image.path);
            }
        }
        let _ = std::fs::remove_file(task.bundle.join(SANDBOX_ID_FILE));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.to_string(),
                pid,
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            }),
        );
        Ok(response)
    }
}

/// Start `spec` in the guest: the process and its guest pid. When it could
/// not start (a program the image lacks: runc fails `start` then too), its
/// status goes to `exit` and the error says why.
fn start_in_guest(
    sandbox: &Sandbox,
    spec: &ProcessSpec,
    stdio: &Stdio,
    exit: &ExitCell,
) -> Result<(sandbox::Process, u32), Error> {
    let mut command = spec.command();
    if stdio.terminal {
        command = command.tty(WinSize { rows: 24, cols: 80 });
    }
    if !stdio.stdin.is_empty() {
        command = command.stdin_piped();
    }
    let killed = 128 + libc::SIGKILL as u32;
    let mut process = sandbox.spawn(command).map_err(|e| {
        exit.set(killed);
        Error::sandbox(format!("starting {:?}", spec.args))(e)
    })?;
    match process.wait_started(START_TIMEOUT) {
        Ok(Some(pid)) => Ok((process, pid)),
        Ok(None) => {
            let mut said = String::new();
            if let Some(stderr) = process.take_stderr() {
                let _ = stderr.take(START_ERROR_BYTES).read_to_string(&mut said);
            }
            let status = process.wait().ok().and_then(|s| u32::try_from(s).ok()).unwrap_or(killed);
            exit.set(status);
            Err(Error::FailedPrecondition(format!(
                "the container's command {:?} could not be started (status {status}): {}",
                spec.args[0],
                said.trim()
            )))
        }
        Err(e) => {
            let _ = process.kill();
            exit.set(killed);
            Err(Error::sandbox(format!("starting {:?}", spec.args))(e))
        }
    }
}

/// A task's usage as containerd's cgroup v1 metrics, which CRI reads for
/// container stats: the CPU time and memory of the processes holding its
/// VM (the guest's memory as the host sees it), the VM's memory as limit.
fn metrics_any(usage: &sandbox::HostUsage, memory_mib: Option<u32>) -> Any {
    let nanos = u64::try_from(usage.cpu.as_nanos()).unwrap_or(u64::MAX);
    let metrics = Metrics {
        cpu: Some(CPUStat {
            usage: Some(CPUUsage { total: nanos, ..Default::default() }).into(),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            rss: usage.memory_bytes,
            total_rss: usage.memory_bytes,
            usage: Some(MemoryEntry {
                usage: usage.memory_bytes,
                limit: memory_mib.map(|m| u64::from(m) << 20).unwrap_or(0),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStat { current: u64::from(usage.processes), ..Default::default() }).into(),
        ..Default::default()
    };
    Any {
        type_url: "io.containerd.cgroups.v1.Metrics".to_string(),
        value: metrics.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

/// Stop a task's sandbox; its directory and `session.db` stay.
pub fn stop_sandbox(sandbox: &Sandbox) {
    if let Err(e) = sandbox.stop(STOP_TIMEOUT) {
        containerd_shim::warn!("stopping sandbox {}: {e}", sandbox.id());
    }
}

/// After a crash of the shim (`shim delete`): stop the sandbox named in the
/// bundle, unmount its root.
pub fn cleanup_bundle(bundle: &Path, data_dir: &Path) {
    if let Ok(id) = std::fs::read_to_string(bundle.join(SANDBOX_ID_FILE)) {
        if let Ok(sandbox) = Sandbox::find_in(data_dir, id.trim()) {
            stop_sandbox(&sandbox);
        }
        let _ = std::fs::remove_file(bundle.join(SANDBOX_ID_FILE));
    }
    rootfs::unmount(&bundle.join("rootfs"), rootfs::LEFT_MOUNTED_AT_MOST);
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no task {id:?} in this shim"))
}

/// The current time, as containerd's events and replies carry it.
pub fn now() -> Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl containerd_shim::Task for Service {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.create_task(&req).inspect_err(|e| containerd_shim::error!("create {}: {e}", req.id))?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.start_process(&req.id, &req.exec_id)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let tasks = self.tasks();
        let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let proc = task.process(&req.exec_id)?;
        let exit = proc.exit.get();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: task.bundle.to_string_lossy().into_owned(),
            pid: task.process_pid(&req.exec_id, proc),
            status: proc.status().into(),
            stdin: proc.stdio.stdin.clone(),
            stdout: proc.stdio.stdout.clone(),
            stderr: proc.stdio.stderr.clone(),
            terminal: proc.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let tasks = self.tasks();
        let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let mut processes = vec![ProcessInfo { pid: task.pid(), ..Default::default() }];
        for proc in task.execs.values() {
            if let (Some(running), None) = (&proc.running, proc.exit.get()) {
                processes.push(ProcessInfo { pid: running.pid, ..Default::default() });
            }
        }
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.kill_process(&req)?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if req.exec_id.is_empty() {
            return Err(Error::InvalidArgument("exec needs an exec id".into()).into());
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec needs a process spec".into()))
            .and_then(|any| ProcessSpec::parse(&any.value))?;
        let mut tasks = self.tasks();
        let task = tasks.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if task.sandbox().is_none() {
            return Err(Error::FailedPrecondition(format!(
                "task {} is a pod's sandbox container, which runs nothing: exec in one of the pod's containers",
                req.id
            ))
            .into());
        }
        if task.init.exit.get().is_some() {
            return Err(Error::FailedPrecondition(format!("task {} has exited: nothing to exec in", req.id)).into());
        }
        if task.execs.contains_key(&req.exec_id) {
            return Err(
                Error::FailedPrecondition(format!("exec id {:?} is in use in task {}", req.exec_id, req.id)).into()
            );
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || spec.terminal,
        };
        task.execs.insert(req.exec_id.clone(), Proc::new(spec, stdio));
        drop(tasks);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded { container_id: req.id, exec_id: req.exec_id, ..Default::default() }),
        );
        Ok(api::Empty::default())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let control = {
            let tasks = self.tasks();
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            let proc = task.process(&req.exec_id)?;
            let running =
                proc.running.as_ref().ok_or_else(|| Error::FailedPrecondition("the process has not started".into()))?;
            running.control.clone()
        };
        let size = WinSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        control.resize(size).map_err(Error::sandbox("resizing the terminal"))?;
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let stdin = {
            let tasks = self.tasks();
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            let proc = task.process(&req.exec_id)?;
            proc.running.as_ref().map(|r| r.stdin.clone())
        };
        let stdin = stdin.and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(stdin) = stdin {
            stdin.close().map_err(Error::sandbox("closing the process's stdin"))?;
        }
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = {
            let tasks = self.tasks();
            let task = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            task.process(&req.exec_id)?.exit.clone()
        };
        let exit = exit.wait(None).ok_or_else(|| Error::FailedPrecondition("the process did not exit".into()))?;
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: Some(exit.at).into(), ..Default::default() })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_process(&req.id, &req.exec_id)?)
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks().get(&req.id).map(Task::pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let sandboxes: Vec<Sandbox> = {
            let tasks = self.tasks();
            if !req.now && !tasks.is_empty() {
                return Ok(api::Empty::default());
            }
            tasks.values().filter_map(|t| t.sandbox().cloned()).collect()
        };
        for sandbox in &sandboxes {
            stop_sandbox(sandbox);
        }
        self.exit.signal();
        Ok(api::Empty::default())
    }

    fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("pause").into())
    }

    fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("resume").into())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("checkpoint").into())
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("update").into())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let sandbox = {
            let tasks = self.tasks();
            tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?.sandbox().cloned()
        };
        let memory_mib = sandbox.as_ref().map(|s| s.state().memory_mib);
        // A pod's sandbox container uses nothing of its own.
        let usage = match &sandbox {
            Some(sandbox) => sandbox.host_usage().map_err(Error::sandbox("reading the sandbox's host processes"))?,
            None => sandbox::HostUsage::default(),
        };
        Ok(api::StatsResponse { stats: Some(metrics_any(&usage, memory_mib)).into(), ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_becomes_cgroup_v1_metrics() {
        let usage = sandbox::HostUsage { cpu: Duration::from_millis(1500), memory_bytes: 30 << 20, processes: 2 };
        let any = metrics_any(&usage, Some(256));
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let metrics = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(metrics.cpu.usage.total, 1_500_000_000);
        assert_eq!((metrics.memory.usage.usage, metrics.memory.usage.limit), (30 << 20, 256 << 20));
        assert_eq!(metrics.pids.current, 2);
    }
}
