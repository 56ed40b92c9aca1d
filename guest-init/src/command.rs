//! Building guest commands (environment, working directory, user) and
//! running the launch-spec command to its end.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use guest_protocol::agent::Rlimit;
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
/// working directory, if named, the user (from /etc/passwd, or a number),
/// and the supplementary groups and resource limits.
pub(crate) fn build(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    user: Option<&str>,
    groups: &[u32],
    rlimits: &[Rlimit],
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
    let ids = match user {
        Some(user) => {
            let (uid, gid, home) = lookup_user(user)?;
            if !env.iter().any(|(k, _)| k == "HOME") {
                cmd.env("HOME", home);
            }
            Some((uid, gid))
        }
        None => None,
    };
    match ids {
        // std drops the supplementary groups when it changes the user.
        Some((uid, gid)) if groups.is_empty() && rlimits.is_empty() => {
            cmd.uid(uid).gid(gid);
        }
        None if groups.is_empty() && rlimits.is_empty() => {}
        ids => set_credentials(&mut cmd, ids, groups, rlimits),
    }
    Ok(cmd)
}

/// Set the limits, then the groups, then the ids in the child before it
/// executes the program: the limits while the child may still raise them,
/// the groups while it may still set them. (std's own uid and gid would be
/// set before this runs.)
fn set_credentials(cmd: &mut Command, ids: Option<(u32, u32)>, groups: &[u32], rlimits: &[Rlimit]) {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let limits: Vec<(Rlimit, libc::rlimit)> =
        rlimits.iter().map(|r| (*r, libc::rlimit { rlim_cur: r.soft, rlim_max: r.hard })).collect();
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls on memory it owns (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            for (r, limit) in &limits {
                // `limit` is a valid rlimit.
                check(libc::setrlimit(r.resource as _, limit))?;
            }
            // `groups` is a valid array of its length.
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            if let Some((uid, gid)) = ids {
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
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
    let mut cmd = match build(&spec.argv, &spec.env, &spec.cwd, None, &[], &[]) {
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

    /// Run `cmd` to its end: its standard output (its status must be 0).
    fn output_of(mut cmd: Command) -> String {
        cmd.stdout(Stdio::piped());
        let (mut child, status) = reaper::spawn(&mut cmd).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert_eq!(status.recv().unwrap(), 0);
        out
    }

    #[test]
    fn build_applies_environment_directory_and_user() {
        let cmd = build(
            &["/bin/sh".into(), "-c".into(), "echo $PATH $X $HOME; pwd; id -u".into()],
            &[("X".into(), "y".into())],
            "/tmp",
            Some("0"),
            &[],
            &[],
        )
        .unwrap();
        let out = output_of(cmd);
        assert_eq!(out, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin y /root\n/tmp\n0\n");
    }

    #[test]
    fn groups_and_limits_are_set_before_the_user_changes() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: changing user needs root");
            return;
        }
        // Below this process's hard limit (raising it needs CAP_SYS_RESOURCE,
        // which the guest's init has and a test host may not).
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        let hard: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        let hard = hard - 1;
        let limits = [Rlimit { resource: 7, soft: 77, hard }]; // 7: RLIMIT_NOFILE
        let script = "id -u; id -G; ulimit -n; ulimit -Hn";
        let argv = ["sh".into(), "-c".into(), script.into()];
        let cmd = build(&argv, &[], "/", Some("65534:65534"), &[10, 20], &limits).unwrap();
        let out = output_of(cmd);
        assert_eq!(out, format!("65534\n65534 10 20\n77\n{hard}\n"));

        // Without groups or limits, none are added.
        let cmd = build(&["id".into(), "-G".into()], &[], "/", Some("65534:65534"), &[], &[]).unwrap();
        let out = output_of(cmd);
        assert_eq!(out, "65534\n");
    }

    #[test]
    fn unknown_users_and_empty_commands_are_errors() {
        assert!(build(&[], &[], "/", None, &[], &[]).is_err());
        let err = build(&["true".into()], &[], "/", Some("no-such-user"), &[], &[]).unwrap_err();
        assert!(err.contains("no-such-user"), "{err}");
        let err = build(&["true".into()], &[], "/", Some("0:no-such-group"), &[], &[]).unwrap_err();
        assert!(err.contains("no-such-group"), "{err}");
        assert_eq!(lookup_user("0:7").unwrap().1, 7);
    }

    #[test]
    fn bare_names_are_found_on_the_command_path_and_keep_their_argv0() {
        let path = Some("/no/such/dir::/bin");
        assert_eq!(resolve("sh", path, "/"), Some(std::path::PathBuf::from("/bin/sh")));
        assert_eq!(resolve("/bin/sh", path, "/"), None);
        assert_eq!(resolve("no-such-program-here", path, "/"), None);
        let cmd = build(&["sh".into(), "-c".into(), "echo $0".into()], &[], "/", None, &[], &[]).unwrap();
        let out = output_of(cmd);
        assert_eq!(out, "sh\n");
    }
}
