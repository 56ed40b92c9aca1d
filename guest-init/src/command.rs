//! Running the guest command: environment, working directory, reaping and
//! the exit status in shell convention.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use guest_protocol::LaunchSpec;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Environment every command starts with; the spec's variables override it.
const DEFAULT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("TERM", "linux"),
    ("LANG", "C.UTF-8"),
];

/// Status for a command that could not be found (as a shell reports it).
const NOT_FOUND: i32 = 127;
/// Status for a command that was found but could not be executed.
const NOT_EXECUTABLE: i32 = 126;

/// Pass the command's bytes to the serial console unchanged (no `\n` to
/// `\r\n` translation), so the host sees exactly what the command wrote.
pub(crate) fn raw_console_output() -> nix::Result<()> {
    use nix::sys::termios::{tcgetattr, tcsetattr, OutputFlags, SetArg};
    let stdout = std::io::stdout();
    let mut t = tcgetattr(&stdout)?;
    t.output_flags.remove(OutputFlags::OPOST);
    tcsetattr(&stdout, SetArg::TCSANOW, &t)
}

/// Run the command to its end, reaping every other process that exits
/// meanwhile; returns its status (0..=255, or 128 + signal number).
pub(crate) fn run(spec: &LaunchSpec) -> i32 {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(DEFAULT_ENV.iter().copied())
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .process_group(0);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let status = match e.kind() {
                std::io::ErrorKind::NotFound => NOT_FOUND,
                _ => NOT_EXECUTABLE,
            };
            crate::log(&format!("{}: {e}", spec.argv[0]));
            return status;
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // `child` is not waited on through std: init reaps with waitpid(-1).
    drop(child);
    loop {
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return code,
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                crate::log(&format!("waiting for the command: {e}"));
                return NOT_EXECUTABLE;
            }
        }
    }
}

/// Kill every process but init and reap them.
pub(crate) fn kill_all() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::__WALL)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}
