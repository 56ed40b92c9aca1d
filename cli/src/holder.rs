//! `sandbox run -d`: a sandbox that outlives the command that started it.
//!
//! `run -d` starts this same program again as a background process in its
//! own session (`run --holder ...`), which boots the sandbox (its state file
//! records that this process exists only to hold it), prints
//! its id on standard output once the guest agent answers, and from then on
//! writes its own log to `<sandbox dir>/sandbox.log`. The first process
//! relays the id (or the error) and exits. The background process holds the
//! VM until `sandbox stop` (SIGTERM), the guest powers off, or the command
//! given to `run -d` ends; that command's output goes to `output.log`.
//! `sandbox stop` asks the guest to power off through its agent, and kills
//! this process only if it does not end in time.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use guest_protocol::sandbox_dir::SandboxDir;
use sandbox::{Command, SandboxBuilder};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::exit::{Failure, Outcome, SandboxFailure};

/// Start the background process and print the sandbox id it reports.
pub fn start() -> Outcome {
    let id = spawn_child().or_sandbox_failure()?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

fn spawn_child() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("find the sandbox executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let run_at = args.iter().position(|a| a == "run").context("run -d outside `sandbox run`")?;
    args.insert(run_at + 1, "--holder".into());
    let mut command = std::process::Command::new(exe);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; it detaches the child from this terminal's session, so the
    // terminal's hangup and Ctrl-C do not reach the sandbox.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = command.spawn().context("start the background sandbox process")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        std::io::BufReader::new(stdout).read_line(&mut line).context("read the sandbox id")?;
    }
    let id = line.trim().to_string();
    if sandbox::valid_id(&id) {
        // The child keeps running; its pipes are closed once it has moved
        // its output to its log.
        return Ok(id);
    }
    let status = child.wait().context("wait for the background sandbox process")?;
    let errors = errors.join().unwrap_or_default();
    anyhow::bail!("the sandbox did not start ({status}): {}", errors.trim().trim_start_matches("sandbox: "))
}

/// Why the background process stops its sandbox.
enum Stop {
    Signal(i32),
    CommandEnded(Result<i32, sandbox::Error>),
}

/// The background process: boot, report the id, hold the VM.
pub fn serve(builder: SandboxBuilder, command: Command, timeout: Option<Duration>) -> Outcome {
    let instance = builder.start().or_sandbox_failure()?;
    // After the start: a confined holder closes every descriptor it did not
    // open itself (a signal during the boot ends the process; confined, the
    // process that waits for it forwards the signal and stops it later).
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot handle signals")
        .or_sandbox_failure()?;
    let dir = SandboxDir::new(instance.dir());
    println!("{}", instance.id());
    let _ = std::io::stdout().flush();
    if let Err(e) = redirect_output(&dir.sandbox_log()) {
        tracing::warn!("cannot write {}: {e}", dir.sandbox_log().display());
    }
    tracing::info!(id = %instance.id(), "sandbox running in the background");

    let (tx, rx) = mpsc::channel();
    let on_signal = tx.clone();
    let handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = on_signal.send(Stop::Signal(sig));
        }
    });
    // The command, as the image's config makes it (none: the sandbox just runs).
    let has_command =
        !command.argv().is_empty() || instance.state().image_config.as_ref().is_some_and(|c| !c.argv(&[]).is_empty());
    if has_command {
        let log = dir.output_log();
        let started = (|| {
            let out =
                std::fs::File::create(&log).map_err(|e| sandbox::Error::Io(format!("create {}", log.display()), e))?;
            let err = out.try_clone().map_err(|e| sandbox::Error::Io("duplicate the output log".into(), e))?;
            instance.spawn(command.stdout_to(out).stderr_to(err))
        })();
        match started {
            Ok(mut process) => {
                std::thread::spawn(move || {
                    let _ = tx.send(Stop::CommandEnded(process.wait()));
                });
            }
            Err(e) => {
                let _ = tx.send(Stop::CommandEnded(Err(e)));
            }
        }
    }
    let started = Instant::now();
    let reason = loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Stop::Signal(sig)) => break format!("signal {sig}"),
            Ok(Stop::CommandEnded(Ok(code))) => break format!("the command exited with status {code}"),
            Ok(Stop::CommandEnded(Err(e))) => break format!("the command failed: {e}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break "nothing left to wait for".into(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !instance.is_running() {
                    break "the guest powered off".into();
                }
                if timeout.is_some_and(|t| started.elapsed() >= t) {
                    break "the timeout passed".into();
                }
            }
        }
    };
    handle.close();
    tracing::info!(id = %instance.id(), "stopping: {reason}");
    instance.shutdown().map_err(|e| {
        tracing::error!("shutdown: {e}");
        Failure::Sandbox(e.into())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Point standard output and error at `log` (closing the pipes to the
/// process that started us, which is waiting for them to close).
fn redirect_output(log: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 on two open descriptors: `file` lives across the call
        // and the standard descriptors always exist in this process.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
