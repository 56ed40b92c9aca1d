//! Building guest commands (environment, working directory, user) and
//! running the launch-spec command to its end.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use guest_protocol::LaunchSpec;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::reaper;

/// Environment every command starts with; the request's variables override it.
const DEFAULT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("TERM", "linux"),
    ("LANG", "C.UTF-8"),
];

/// Status for a command that could not be found (as a shell reports it).
pub(crate) const NOT_FOUND: i32 = 127;
/// Status for a command that was found but could not be executed.
pub(crate) const NOT_EXECUTABLE: i32 = 126;

/// Pass the command's bytes to the serial console unchanged (no `\n` to
/// `\r\n` translation), so the host sees exactly what the command wrote.
pub(crate) fn raw_console_output() -> nix::Result<()> {
    use nix::sys::termios::{tcgetattr, tcsetattr, OutputFlags, SetArg};
    let stdout = std::io::stdout();
    let mut t = tcgetattr(&stdout)?;
    t.output_flags.remove(OutputFlags::OPOST);
    tcsetattr(&stdout, SetArg::TCSANOW, &t)
}

/// A command with init's default environment, the given variables, the
/// working directory and, if named, the user (from /etc/passwd, or a number).
pub(crate) fn build(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    user: Option<&str>,
) -> Result<Command, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command given".into());
    };
    // std starts a command with posix_spawn (vfork: no copy of this
    // process's page tables, no copy-on-write faults after it) unless it
    // must run code of its own in the child. Two settings would force a
    // fork: a PATH in the new environment with a bare program name (std
    // then searches it in the child), and a working directory (the static
    // musl build does not find posix_spawn_file_actions_addchdir_np). So
    // the program is looked up here, and the directory is only set when
    // it is not init's own.
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .or_else(|| DEFAULT_ENV.iter().find(|(k, _)| *k == "PATH").map(|(_, v)| *v));
    let mut cmd = match resolve(program, path, cwd) {
        Some(found) => {
            let mut cmd = Command::new(found);
            cmd.arg0(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .env_clear()
        .envs(DEFAULT_ENV.iter().copied())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if !is_current_dir(cwd) {
        cmd.current_dir(cwd);
    }
    if let Some(user) = user {
        let (uid, gid, home) = lookup_user(user)?;
        cmd.uid(uid).gid(gid);
        if !env.iter().any(|(k, _)| k == "HOME") {
            cmd.env("HOME", home);
        }
    }
    Ok(cmd)
}

/// The file `program` names through `path` (the command's PATH), as
/// execvp would find it; `None` for a name with a slash, or not found
/// (std then reports the error as it would have).
/// Relative entries are taken from `cwd`, where the command starts.
fn resolve(program: &str, path: Option<&str>, cwd: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.is_empty() || program.contains('/') {
        return None;
    }
    path?
        .split(':')
        .map(|dir| std::path::Path::new(cwd).join(if dir.is_empty() { "." } else { dir }).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Is `dir` init's working directory already (so a child starts there anyway)?
fn is_current_dir(dir: &str) -> bool {
    static CWD: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let cwd = CWD.get_or_init(|| std::env::current_dir().ok());
    cwd.as_deref().is_some_and(|cwd| cwd == std::path::Path::new(dir))
}

/// uid, gid and home of `user`: a name in /etc/passwd, or a numeric uid,
/// optionally `:group` (a name in /etc/group or a gid), as images write it.
fn lookup_user(user: &str) -> Result<(u32, u32, String), String> {
    if let Some((user, group)) = user.split_once(':') {
        let (uid, _, home) = lookup_user(user)?;
        return Ok((uid, lookup_group(group)?, home));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if let [name, _, uid, gid, _, home, ..] = fields[..] {
            if name == user || uid == user {
                let uid = uid.parse().map_err(|_| format!("bad uid for {name} in /etc/passwd"))?;
                let gid = gid.parse().map_err(|_| format!("bad gid for {name} in /etc/passwd"))?;
                return Ok((uid, gid, home.to_string()));
            }
        }
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok((uid, uid, "/".into())),
        Err(_) => Err(format!("unknown user {user:?}")),
    }
}

fn lookup_group(group: &str) -> Result<u32, String> {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for line in groups.lines() {
        if let [name, _, gid, ..] = line.split(':').collect::<Vec<_>>()[..] {
            if name == group {
                return gid.parse().map_err(|_| format!("bad gid for {name} in /etc/group"));
            }
        }
    }
    group.parse().map_err(|_| format!("unknown group {group:?}"))
}

/// Shell status for a command that could not be started.
pub(crate) fn spawn_error_status(e: &std::io::Error) -> i32 {
    match e.kind() {
        std::io::ErrorKind::NotFound => NOT_FOUND,
        _ => NOT_EXECUTABLE,
    }
}

/// Run the launch-spec command on init's console to its end; returns its status.
pub(crate) fn run(spec: &LaunchSpec) -> i32 {
    let mut cmd = match build(&spec.argv, &spec.env, &spec.cwd, None) {
        Ok(cmd) => cmd,
        Err(e) => {
            crate::log(&e);
            return NOT_EXECUTABLE;
        }
    };
    cmd.stdin(Stdio::null()).process_group(0);
    match reaper::spawn(&mut cmd) {
        Ok((_child, status)) => status.recv().unwrap_or(NOT_EXECUTABLE),
        Err(e) => {
            crate::log(&format!("{}: {e}", spec.argv[0]));
            spawn_error_status(&e)
        }
    }
}

/// Kill every process but init and reap them.
pub(crate) fn kill_all() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_applies_environment_directory_and_user() {
        let mut cmd = build(
            &["/bin/sh".into(), "-c".into(), "echo $PATH $X $HOME; pwd; id -u".into()],
            &[("X".into(), "y".into())],
            "/tmp",
            Some("0"),
        )
        .unwrap();
        cmd.stdout(Stdio::piped());
        let (mut child, status) = reaper::spawn(&mut cmd).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert_eq!(status.recv().unwrap(), 0);
        assert_eq!(out, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin y /root\n/tmp\n0\n");
    }

    #[test]
    fn unknown_users_and_empty_commands_are_errors() {
        assert!(build(&[], &[], "/", None).is_err());
        let err = build(&["true".into()], &[], "/", Some("no-such-user")).unwrap_err();
        assert!(err.contains("no-such-user"), "{err}");
        let err = build(&["true".into()], &[], "/", Some("0:no-such-group")).unwrap_err();
        assert!(err.contains("no-such-group"), "{err}");
        assert_eq!(lookup_user("0:7").unwrap().1, 7);
    }

    #[test]
    fn bare_names_are_found_on_the_command_path_and_keep_their_argv0() {
        let path = Some("/no/such/dir::/bin");
        assert_eq!(resolve("sh", path, "/"), Some(std::path::PathBuf::from("/bin/sh")));
        assert_eq!(resolve("/bin/sh", path, "/"), None);
        assert_eq!(resolve("no-such-program-here", path, "/"), None);
        let mut cmd = build(&["sh".into(), "-c".into(), "echo $0".into()], &[], "/", None).unwrap();
        cmd.stdout(Stdio::piped());
        let (mut child, status) = reaper::spawn(&mut cmd).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert_eq!(status.recv().unwrap(), 0);
        assert_eq!(out, "sh\n");
    }
}
