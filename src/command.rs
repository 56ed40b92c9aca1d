//! A command to run in a sandbox, configured the way `std::process::Command`
//! is: [`Command`] says what to run and how, [`crate::Sandbox::spawn`] starts
//! it and returns a [`crate::Process`].

use std::io::{Read, Write};
use std::time::Duration;

use guest_protocol::agent::{Exec, Rlimit, WinSize};

use crate::Error;
use rootfs::ImageConfig;

/// How many bytes of each of standard output and standard error
/// [`crate::Sandbox::output`] collects by default (16 MiB); see
/// [`Command::output_limit`].
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It exited with this status (0..=255; 128 + N when killed by signal N;
    /// 127 when the command was not found, 126 when it could not be executed).
    Exited(i32),
    /// It was still running at its timeout and was stopped.
    TimedOut,
}

/// What a finished command produced ([`crate::Sandbox::output`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Output {
    pub status: Status,
    /// Standard output (its first [`Command::output_limit`] bytes), unless
    /// streamed with [`Command::stdout_to`].
    pub stdout: Vec<u8>,
    /// Standard error, likewise.
    pub stderr: Vec<u8>,
    /// The command wrote more to standard output than the limit; the rest
    /// was read from the guest and discarded (the command was not stopped).
    pub stdout_truncated: bool,
    /// The same for standard error.
    pub stderr_truncated: bool,
}

/// Where a command's standard input comes from.
pub(crate) enum StdinSource {
    /// Nothing: the command reads end of file at once.
    Null,
    /// Written through [`crate::Process::take_stdin`].
    Piped,
    /// Fed from this reader until it ends.
    Reader(Box<dyn Read + Send>),
}

/// Where one of a command's output streams goes.
pub(crate) enum OutputSink {
    /// Read through [`crate::Process::take_stdout`] / [`crate::Process::take_stderr`].
    Piped,
    /// Written to this writer as it arrives.
    Writer(Box<dyn Write + Send>),
}

/// A command to run in a sandbox: the program, its arguments, environment,
/// directory, user, terminal and standard streams.
///
/// With an OCI image the image's config applies as `docker exec` applies
/// it: its `Env` first (variables set here win), its `WorkingDir` and `User`
/// unless set here. [`crate::SandboxBuilder::run`] also applies the image's
/// `Entrypoint` and `Cmd`, as `docker run` does.
pub struct Command {
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) groups: Vec<u32>,
    pub(crate) rlimits: Vec<Rlimit>,
    pub(crate) tty: Option<WinSize>,
    pub(crate) stdin: StdinSource,
    pub(crate) stdout: OutputSink,
    pub(crate) stderr: OutputSink,
    pub(crate) timeout: Option<Duration>,
    pub(crate) output_limit: usize,
    pub(crate) entrypoint: bool,
    pub(crate) terminal: bool,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("argv", &self.argv)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field("rlimits", &self.rlimits)
            .field("tty", &self.tty)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Command {
    /// Run `program` (a path, or a name looked up in the guest's `PATH`).
    pub fn new(program: impl Into<String>) -> Self {
        Self::from_argv(vec![program.into()])
    }

    /// Run `argv` (program first). With an OCI image `argv` may be empty in
    /// [`crate::SandboxBuilder::run`]: the image's `Cmd` is run.
    pub fn from_argv<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            groups: Vec::new(),
            rlimits: Vec::new(),
            tty: None,
            stdin: StdinSource::Null,
            stdout: OutputSink::Piped,
            stderr: OutputSink::Piped,
            timeout: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            entrypoint: false,
            terminal: false,
        }
    }

    /// Add an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.argv.push(arg.into());
        self
    }
    /// Add arguments.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }
    /// Set an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Working directory (absolute; default: the image's, else `/`).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    /// Run as this user (a name in the image's /etc/passwd, or a uid; default root).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
    /// Give the command these supplementary group ids (by default it has
    /// none).
    pub fn groups(mut self, gids: impl IntoIterator<Item = u32>) -> Self {
        self.groups = gids.into_iter().collect();
        self
    }
    /// Limit a resource of the command (`resource` a Linux `RLIMIT_*`
    /// number such as `libc::RLIMIT_NOFILE`; `u64::MAX` is unlimited), set
    /// before it changes user, so it may raise the hard limit.
    pub fn rlimit(mut self, resource: u32, soft: u64, hard: u64) -> Self {
        self.rlimits.retain(|r| r.resource != resource);
        self.rlimits.push(Rlimit { resource, soft, hard });
        self
    }
    /// Run on a pseudo-terminal of this size (standard output and error
    /// merged; resize it with [`crate::Process::resize`]).
    pub fn tty(mut self, size: WinSize) -> Self {
        self.tty = Some(size);
        self
    }
    /// Standard input written through [`crate::Process::take_stdin`]
    /// (default: none, the command reads end of file).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = StdinSource::Piped;
        self
    }
    /// Standard input fed from `src` until it ends.
    pub fn stdin_from(mut self, src: impl Read + Send + 'static) -> Self {
        self.stdin = StdinSource::Reader(Box::new(src));
        self
    }
    /// Write standard output to `sink` as it arrives (default: piped, read
    /// through [`crate::Process::take_stdout`] or collected by `output`).
    pub fn stdout_to(mut self, sink: impl Write + Send + 'static) -> Self {
        self.stdout = OutputSink::Writer(Box::new(sink));
        self
    }
    /// Write standard error to `sink` as it arrives.
    pub fn stderr_to(mut self, sink: impl Write + Send + 'static) -> Self {
        self.stderr = OutputSink::Writer(Box::new(sink));
        self
    }
    /// Stop the command after this long: [`crate::Sandbox::output`] kills it
    /// and reports [`crate::Status::TimedOut`]; [`crate::SandboxBuilder::run`]
    /// stops the whole VM.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Collect at most this many bytes of each of standard output and
    /// standard error in [`crate::Sandbox::output`] (default
    /// [`DEFAULT_OUTPUT_LIMIT`]). Beyond it the command runs on, its further
    /// output is discarded and the output says it was truncated.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// With an OCI image, run its `Entrypoint` before the arguments (and its
    /// `Cmd` when there are none), as `docker run` does. (Without this, the
    /// command runs as `docker exec` runs one.)
    pub fn image_entrypoint(mut self) -> Self {
        self.entrypoint = true;
        self
    }
    /// Attach the command to this process's terminal, as `docker run -it`
    /// does: a guest pseudo-terminal of the same size that follows resizes,
    /// this terminal in raw mode while the command runs (Ctrl-C reaches the
    /// guest's process), standard input read from it and standard output
    /// written to this process's (unless [`Self::stdout_to`] comes after).
    /// Standard input must be a terminal.
    pub fn attach_terminal(mut self) -> Self {
        self.terminal = true;
        self.stdin = StdinSource::Reader(Box::new(std::io::stdin()));
        self.stdout = OutputSink::Writer(Box::new(std::io::stdout()));
        self
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::Config("the timeout must be longer than zero".into()));
        }
        if let Some(cwd) = self.cwd.as_ref().filter(|c| !c.starts_with('/')) {
            return Err(Error::Config(format!("the working directory must be absolute, not {cwd:?}")));
        }
        if let Some(r) = self.rlimits.iter().find(|r| r.soft > r.hard) {
            return Err(Error::Config(format!(
                "resource limit {}: the soft limit {} is above the hard limit {}",
                r.resource, r.soft, r.hard
            )));
        }
        Ok(())
    }

    /// The wire request for this command, with the image's config applied
    /// (and its entrypoint, when `entrypoint`).
    pub(crate) fn to_exec(&self, image: Option<&ImageConfig>) -> Result<Exec, Error> {
        self.check()?;
        let entrypoint = self.entrypoint;
        let mut argv = self.argv.clone();
        let mut env = self.env.clone();
        let mut cwd = self.cwd.clone();
        let mut user = self.user.clone();
        if let Some(config) = image {
            if entrypoint {
                argv = config.argv(&argv);
            }
            let mut merged = config.env_pairs();
            merged.retain(|(k, _)| !env.iter().any(|(mine, _)| mine == k));
            merged.append(&mut env);
            env = merged;
            if cwd.is_none() && !config.working_dir.is_empty() {
                cwd = Some(config.working_dir.clone());
            }
            if user.is_none() && !config.user.is_empty() {
                user = Some(config.user.clone());
            }
        }
        if argv.first().is_none_or(String::is_empty) {
            return Err(Error::Config("no command given (and the image has no Cmd or Entrypoint)".into()));
        }
        Ok(Exec {
            argv,
            env,
            cwd: cwd.unwrap_or_else(|| "/".into()),
            user,
            tty: self.tty,
            groups: self.groups.clone(),
            rlimits: self.rlimits.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_becomes_its_wire_request() {
        let cmd = Command::new("sh").args(["-c", "true"]).env("A", "1").cwd("/tmp").user("nobody");
        let exec = cmd.to_exec(None).unwrap();
        assert_eq!(exec.argv, ["sh", "-c", "true"]);
        assert_eq!(
            (exec.env, exec.cwd.as_str(), exec.user.as_deref()),
            (vec![("A".into(), "1".into())], "/tmp", Some("nobody"))
        );
        assert!(Command::from_argv(Vec::<String>::new()).to_exec(None).is_err());
        assert!(Command::new("x").cwd("relative").to_exec(None).is_err());
        assert!(Command::new("x").timeout(Duration::ZERO).to_exec(None).is_err());
    }

    #[test]
    fn an_image_config_applies_as_docker_exec_and_docker_run_apply_it() {
        let config = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["A=image".into(), "B=image".into()],
            working_dir: "/app".into(),
            user: "1000".into(),
        };
        // As `docker exec`: the image's environment, directory and user, no entrypoint.
        let exec = Command::new("ls").env("B", "mine").to_exec(Some(&config)).unwrap();
        assert_eq!(exec.argv, ["ls"]);
        assert_eq!(exec.env, [("A".to_string(), "image".to_string()), ("B".to_string(), "mine".to_string())]);
        assert_eq!((exec.cwd.as_str(), exec.user.as_deref()), ("/app", Some("1000")));
        // As `docker run`: the entrypoint first, and Cmd when no arguments are given.
        let run = Command::from_argv(Vec::<String>::new()).image_entrypoint().to_exec(Some(&config)).unwrap();
        assert_eq!(run.argv, ["/entry", "serve"]);
        let run = Command::new("x").cwd("/w").user("root").image_entrypoint().to_exec(Some(&config)).unwrap();
        assert_eq!(
            (run.argv.as_slice(), run.cwd.as_str(), run.user.as_deref()),
            (&["/entry".to_string(), "x".to_string()][..], "/w", Some("root"))
        );
    }
}
