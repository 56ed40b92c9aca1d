//! The sandboxes on this machine, running or not.
//!
//! Every sandbox's private directory (`<data dir>/sandboxes/<id>/`) holds a
//! `state.json` written when it boots: what it runs, and which host process
//! holds its VM. A sandbox is running while that process is alive (checked
//! with its start time, so a recycled pid does not count) and its
//! `vsock.sock` exists. Any process can then drive it through that socket:
//! run commands, copy files, stop it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_protocol::agent::Exec;
use serde::{Deserialize, Serialize};

use crate::agent::AgentConn;
use crate::{paths, Error};

/// The command-line flag that marks the background process of `run -d`.
pub const BACKGROUND_FLAG: &str = "--detached-child";

/// How long to wait for the agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        }
    }

    /// Write `state.json` into `dir` (atomically: a reader sees the old or the new file).
    pub(crate) fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join("state.json");
        let tmp = dir.join("state.json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Io("encode state.json".into(), e.into()))?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Io(format!("write {}", path.display()), e))
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is `id` a sandbox id (and so safe to join to a path)?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A sandbox on this machine, found by its id.
#[derive(Debug, Clone)]
pub struct SandboxRef {
    dir: PathBuf,
    state: SandboxState,
}

/// Every sandbox with a `state.json`, newest first.
pub fn list() -> Result<Vec<SandboxRef>, Error> {
    list_in(&paths::sandboxes_dir())
}

fn list_in(root: &Path) -> Result<Vec<SandboxRef>, Error> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io(format!("read {}", root.display()), e)),
    };
    let mut found: Vec<SandboxRef> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().filter(|n| valid_id(n)).map(str::to_string))
        .filter_map(|id| match SandboxRef::find_in(root, &id) {
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

impl SandboxRef {
    pub(crate) fn new(dir: PathBuf, state: SandboxState) -> Self {
        SandboxRef { dir, state }
    }

    /// The sandbox `id`, or a unique prefix of one (as `docker` allows).
    pub fn find(id: &str) -> Result<SandboxRef, Error> {
        Self::find_in(&paths::sandboxes_dir(), id)
    }

    fn find_in(root: &Path, id: &str) -> Result<SandboxRef, Error> {
        if !valid_id(id) {
            return Err(Error::Config(format!("not a sandbox id: {id:?}")));
        }
        let dir = root.join(id);
        let dir = if dir.join("state.json").is_file() {
            dir
        } else {
            let matches: Vec<PathBuf> = std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(id)))
                .map(|e| e.path())
                .filter(|p| p.join("state.json").is_file())
                .collect();
            match matches.as_slice() {
                [one] => one.clone(),
                [] => return Err(Error::NoSuchSandbox(id.to_string())),
                _ => return Err(Error::Config(format!("{id:?} is the start of more than one sandbox id; give more of it"))),
            }
        };
        let path = dir.join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::Io(format!("read {}", path.display()), e))?;
        let state: SandboxState = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Io(format!("parse {}", path.display()), std::io::Error::other(e)))?;
        Ok(SandboxRef { dir, state })
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// The sandbox's private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its `session.db`.
    pub fn session_db(&self) -> PathBuf {
        self.dir.join("session.db")
    }

    /// Is the VM running: its holder alive, and its VMM accepting
    /// connections on `vsock.sock`?
    pub fn is_running(&self) -> bool {
        self.holder_alive() && std::os::unix::net::UnixStream::connect(self.dir.join("vsock.sock")).is_ok()
    }

    fn holder_alive(&self) -> bool {
        self.state.pid != 0 && process_start(self.state.pid) == Some(self.state.pid_start)
    }

    /// Is the holder the background process of `sandbox run -d` (and not,
    /// say, an application embedding the library, which must not be
    /// signalled)?
    fn held_in_background(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.state.pid))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == BACKGROUND_FLAG.as_bytes()))
            && self.holder_alive()
    }

    fn require_running(&self) -> Result<(), Error> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::NotRunning(self.state.id.clone()))
        }
    }

    /// A new connection to the guest agent.
    pub fn agent(&self) -> Result<AgentConn, Error> {
        self.require_running()?;
        Ok(AgentConn::connect(&self.dir.join("vsock.sock"), CONNECT_TIMEOUT)?)
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
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let io = |what: &str, e| Error::Io(format!("{what} {}", dst.display()), e);
        let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| io("create", e))?;
        let n = self.agent()?.get_file(src, &mut tmp)?;
        tmp.persist(dst).map_err(|e| io("write", e.error))?;
        Ok(n)
    }

    /// Stop the sandbox: ask the guest to power off and wait until the VM
    /// is gone (with the background process of `run -d`, if that holds it).
    /// After `timeout`, a background holder is killed; any other holder (an
    /// application using the library) is left alone and this is an error.
    /// Stopping a stopped sandbox does nothing.
    pub fn stop(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        if self.is_running() {
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
                let pid = nix::unistd::Pid::from_raw(i32::try_from(self.state.pid).unwrap_or(0));
                match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => return Err(Error::Io(format!("kill process {pid} holding sandbox {}", self.state.id), e.into())),
                }
                while self.holder_alive() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::Io(format!("remove {}", self.dir.display()), e))
    }
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

    fn write_state(root: &Path, id: &str, pid: u32, pid_start: u64, created: u64) -> PathBuf {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = SandboxState::new(id, "default", &["true".to_string()], 256, 1);
        (state.pid, state.pid_start, state.created) = (pid, pid_start, created);
        state.save(&dir).unwrap();
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
        let all = list_in(root.path()).unwrap();
        let ids: Vec<&str> = all.iter().map(SandboxRef::id).collect();
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

        assert_eq!(SandboxRef::find_in(root.path(), "aaaa2").unwrap().id(), "aaaa2222");
        let err = SandboxRef::find_in(root.path(), "aaaa").unwrap_err().to_string();
        assert!(err.contains("more than one"), "{err}");
        assert!(matches!(SandboxRef::find_in(root.path(), "cccc"), Err(Error::NoSuchSandbox(_))));
        assert!(SandboxRef::find_in(root.path(), "../etc").is_err());
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
        let held = SandboxRef::find_in(root.path(), "app01").unwrap();
        let err = held.remove(false).unwrap_err().to_string();
        assert!(err.contains("is running"), "{err}");
        let err = held.stop(Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("holds it"), "{err}");
        std::fs::remove_file(dir.join("vsock.sock")).unwrap();
        held.stop(Duration::from_secs(1)).unwrap();
        held.remove(false).unwrap();
        assert!(!dir.exists());

        // A background holder is killed after the timeout.
        let mut child = std::process::Command::new("sh")
            // `; :` keeps the shell (with the flag in its argv) from
            // replacing itself with sleep.
            .args(["-c", "sleep 30; :", BACKGROUND_FLAG])
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = process_start(pid).unwrap();
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        let dir = write_state(root.path(), "bg01", pid, start, 1);
        unresponsive_vmm(&dir.join("vsock.sock"));
        let background = SandboxRef::find_in(root.path(), "bg01").unwrap();
        // Until the child has called exec, its command line is this test's.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !background.held_in_background() {
            assert!(Instant::now() < deadline, "the shell never showed the flag");
            std::thread::sleep(Duration::from_millis(10));
        }
        background.stop(Duration::from_millis(300)).unwrap();
        assert!(!reaper.join().unwrap().success(), "the holder was killed");
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
