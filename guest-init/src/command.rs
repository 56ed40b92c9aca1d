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
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(DEFAULT_ENV.iter().copied())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd);
    if let Some(user) = user {
        let (uid, gid, home) = lookup_user(user)?;
        cmd.uid(uid).gid(gid);
        if !env.iter().any(|(k, _)| k == "HOME") {
            cmd.env("HOME", home);
        }
    }
    Ok(cmd)
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
}
