//! `sandbox-init`: PID 1 of the sandbox guest.
//!
//! Boot sequence: a writable overlay root on tmpfs over the read-only image,
//! the pseudo filesystems, the hostname, then the command from the host's
//! [`LaunchSpec`]. Init reaps every orphan while the command runs, reports the
//! command's status, stops what is left and powers the VM off (a reboot, which
//! the VMM treats as power-off: the guest boots with `reboot=k`).
//!
//! Init must never panic (a dead PID 1 is a kernel panic): every step returns
//! an error that is printed on the console before the VM is powered off, and
//! the host reports a guest that stopped without an exit status.

mod agent;
mod command;
mod fs;
mod identity;
mod mounts;
mod network;
mod nft_watch;
mod reaper;
mod supervise;
mod trust;

use std::io::Write;

use guest_protocol::agent::AGENT_PORT;
use guest_protocol::{console, LaunchSpec};

fn main() {
    if let Err(err) = run() {
        log(&format!("error: {err}"));
    }
    power_off();
}

fn run() -> Result<(), InitError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .or_else(|_| {
            // /proc is not mounted yet the first time: mount it where the
            // read-only image has the directory, read, and let mounts redo it.
            mounts::mount_proc("/proc")?;
            std::fs::read_to_string("/proc/cmdline")
        })
        .map_err(|e| InitError::step("read /proc/cmdline", e))?;
    // With a launch spec, init runs that command on the console and powers
    // off; without one, the host drives the guest through the agent.
    let spec = match LaunchSpec::from_cmdline(&cmdline) {
        Ok(spec) => Some(spec),
        Err(guest_protocol::ProtocolError::Missing) => None,
        Err(e) => return Err(InitError::step("read the launch spec", e)),
    };
    let hostname = spec.as_ref().map_or("sandbox", |s| s.hostname.as_str());
    let image = mounts::image_device(&cmdline).map_err(|e| InitError::step("read the image device", e))?;

    let disk = mounts::disk_mib(&cmdline).map_err(|e| InitError::step("read the writable layer's size", e))?;
    mounts::overlay_root(image, disk).map_err(|e| InitError::step("set up the writable root", e))?;
    mounts::pseudo_filesystems().map_err(|e| InitError::step("mount /proc, /sys, /dev, /tmp", e))?;
    nix::unistd::sethostname(hostname).map_err(|e| InitError::step("set the hostname", e))?;
    replace_file("/etc/hostname", format!("{hostname}\n").as_bytes())
        .map_err(|e| InitError::step("write /etc/hostname", e))?;
    command::raw_console_output().map_err(|e| InitError::step("configure the console", e))?;
    network::setup().map_err(|e| InitError::step("build the guest network", e))?;
    if let Err(e) = nft_watch::watch() {
        log(&format!("cannot watch the nftables rules: {e}"));
    }
    replace_file("/etc/resolv.conf", network::resolv_conf().as_bytes())
        .map_err(|e| InitError::step("write /etc/resolv.conf", e))?;
    let programs = if image.is_some() { mounts::OWN_PROGRAMS } else { mounts::BOOT_PROGRAMS };
    let proxy = format!("{programs}/{}", supervise::PROXY);
    if std::path::Path::new(&proxy).exists() {
        let sockets =
            supervise::ProxySockets::bind().map_err(|e| InitError::step("bind the guest proxy's sockets", e))?;
        supervise::supervise(proxy, sockets).map_err(|e| InitError::step("start the guest proxy", e))?;
    } else {
        log(&format!("{proxy} is not in this image: no network access"));
    }

    let (shutdown_tx, shutdown_rx) = std::sync::mpsc::channel();
    let agent = agent::listen(AGENT_PORT, shutdown_tx);
    if agent.is_ok() {
        // The host connects when it reads this, instead of knocking.
        console_marker(console::READY);
    }
    let Some(spec) = spec else {
        agent.map_err(|e| InitError::step("start the agent on vsock port 5000", e))?;
        // Serve until the host asks for a shutdown.
        let _ = shutdown_rx.recv();
        return Ok(());
    };
    if let Err(e) = agent {
        log(&format!("agent not available (no vsock device?): {e}"));
    }

    console_marker(console::START);
    let status = command::run(&spec);
    console_marker(&console::exit_marker(status));
    Ok(())
}

/// Write one of the markers the host reads on the console (stdout).
fn console_marker(marker: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(marker);
    let _ = out.flush();
}

/// Write a file of the writable root, replacing what is there: an image's
/// symlink (`/etc/resolv.conf -> ../run/...`) is replaced, not followed.
fn replace_file(path: &str, contents: &[u8]) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, contents)
}

/// Stop every process, flush filesystems and reboot (= power off for the VMM).
fn power_off() -> ! {
    command::kill_all();
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A line on the console, where the host shows it as guest log.
pub(crate) fn log(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "sandbox-init: {msg}");
}

/// A boot step that failed.
#[derive(Debug)]
pub(crate) struct InitError {
    step: &'static str,
    cause: String,
}

impl InitError {
    pub(crate) fn step(step: &'static str, cause: impl std::fmt::Display) -> Self {
        Self { step, cause: cause.to_string() }
    }
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.cause)
    }
}
