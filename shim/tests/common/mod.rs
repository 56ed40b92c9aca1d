//! A containerd of a test's own (its own root, state directory, sockets
//! and configuration), the busybox image the tests import, and what the
//! shim tests share.
#![allow(dead_code)]

#[allow(dead_code)]
#[path = "../../../tests/common/vm.rs"]
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rootfs::fixtures::{ImageBuilder, LayerBuilder};
use sandbox::Sandbox;

pub const RUNTIME: &str = "io.containerd.sandbox.v2";
pub const IMAGE: &str = "docker.io/library/test:latest";
/// The namespace of `ctr`'s tasks.
pub const NAMESPACE: &str = "shimtest";
/// The namespace of CRI's pods and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The shim beside which `sandbox-holder` must be, or the release one.
pub fn holder_program(shim: &Path) -> Option<PathBuf> {
    let dir = shim.parent()?;
    [dir.join("sandbox-holder"), dir.join("../release/sandbox-holder")].into_iter().find(|p| p.is_file())
}

/// What this test needs beyond a VM: containerd, ctr, the holder.
pub fn missing(shim: &Path) -> Vec<String> {
    let mut why = Vec::new();
    for e in [sandbox::paths::kernel().err(), sandbox::paths::default_image().err()].into_iter().flatten() {
        why.push(e.to_string());
    }
    for (tool, package) in [("containerd", "containerd"), ("ctr", "containerd"), ("skopeo", "skopeo")] {
        if Command::new(tool).arg("--version").output().is_err() {
            why.push(format!("{tool} is missing: apt-get install {package} (./test.sh installs it)"));
        }
    }
    if !Path::new("/usr/bin/docker-registry").exists() {
        why.push("docker-registry is missing: apt-get install docker-registry (./test.sh installs it)".into());
    }
    if holder_program(shim).is_none() {
        why.push("sandbox-holder is not built: cargo build --bin sandbox-holder (or ./setup.sh)".into());
    }
    why
}

/// A containerd of the test's own, and what it leaves: stopped, unmounted
/// and removed when dropped, whether the test passed or not.
pub struct Containerd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The shim's data directory (`SANDBOX_DATA`).
    pub data: PathBuf,
    /// The namespace `ctr` uses.
    namespace: &'static str,
}

/// How a test's containerd is set up.
#[derive(Debug, Default)]
pub struct Setup {
    /// The CRI plugin, on, with the runtime handler `sandbox` (else off:
    /// `ctr` talks to the task API only).
    pub cri: bool,
    /// The shim's configuration file's text (`SANDBOX_SHIM_CONFIG`).
    pub shim_config: Option<String>,
}

impl Containerd {
    pub fn start(shim: &Path, holder: &Path, setup: Setup) -> Containerd {
        let dir = tempfile::Builder::new().prefix("shim-e2e-").tempdir_in("/var/tmp").unwrap();
        let socket = dir.path().join("containerd.sock");
        let data = dir.path().join("data");
        let config = dir.path().join("config.toml");
        let plugins = if setup.cri {
            // No CNI: the tests' pods use the host's network namespace
            // (their sandboxes have no network device either way). The
            // pods' sandbox image is the test's busybox; AppArmor is off
            // (the host may have no apparmor_parser).
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "sandbox"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.sandbox]
    runtime_type = "{RUNTIME}"
    pod_annotations = ["sandbox.dev/*"]
    container_annotations = ["sandbox.dev/*"]
"#,
                cni = dir.path().join("cni").display(),
            )
        } else {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]
"#
            .to_string()
        };
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
{plugins}[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{debug}"
"#,
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                socket = socket.display(),
                debug = dir.path().join("debug.sock").display(),
            ),
        )
        .unwrap();
        let shim_config = dir.path().join("shim.toml");
        std::fs::write(&shim_config, setup.shim_config.unwrap_or_default()).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        // containerd finds containerd-shim-sandbox-v2 on its PATH; the shim
        // gets containerd's environment (its data directory, its holder).
        let path = format!("{}:{}", shim.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("SANDBOX_DATA", &data)
            .env("SANDBOX_HOLDER", holder)
            .env("SANDBOX_SHIM_CONFIG", &shim_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let namespace = if setup.cri { CRI_NAMESPACE } else { NAMESPACE };
        let containerd = Containerd { child: Some(child), dir, socket, data, namespace };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not answer in 30 s; its log:\n{}", containerd.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        containerd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr` that must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}\ncontainerd log:\n{}",
            out.status,
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The sandbox a task runs in (the shim labels it `containerd:<ns>/<id>`).
    pub fn sandbox_of(&self, task: &str) -> Sandbox {
        let label = format!("containerd:{}/{task}", self.namespace);
        Sandbox::list_in(&self.data)
            .unwrap()
            .into_iter()
            .find(|s| s.state().command.first() == Some(&label))
            .unwrap_or_else(|| panic!("no sandbox labelled {label} under {}", self.data.display()))
    }

    /// Processes whose command line names this test's directory (shims).
    pub fn own_processes(&self) -> Vec<(i32, String)> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = text(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && pid != std::process::id() as i32 {
                found.push((pid, cmdline));
            }
        }
        found
    }

    /// The hard RLIMIT_NOFILE of a task's bundle (`config.json`), if it sets one.
    pub fn bundle_nofile(&self, task: &str) -> Option<u64> {
        let bundle = self.dir.path().join("state/io.containerd.runtime.v2.task").join(self.namespace).join(task);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
        config["process"]["rlimits"]
            .as_array()?
            .iter()
            .find(|r| r["type"] == "RLIMIT_NOFILE")
            .and_then(|r| r["hard"].as_u64())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for sandbox in Sandbox::list_in(&self.data).unwrap_or_default() {
            if sandbox.is_running() {
                let _ = sandbox.stop(Duration::from_secs(10));
            }
        }
        self.stop();
        // Shims of this containerd (started for this test) that are still there.
        for (pid, _) in self.own_processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mut points: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&prefix)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The tests' image: Debian's static busybox with a few applets, `Cmd sh`.
pub fn busybox_image() -> ImageBuilder {
    let busybox = std::fs::read("/bin/busybox").expect("Debian's busybox-static (/bin/busybox)");
    let mut layer = LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .file("bin/busybox", &busybox, 0o755, 0, 0)
        .dir("etc", 0o755, 0, 0)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644, 0, 0)
        .dir("root", 0o700, 0, 0)
        .dir("tmp", 0o1777, 0, 0);
    for applet in ["sh", "echo", "sleep", "nc", "cat", "true", "nslookup", "id"] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    // Cmd as in the real busybox image (CRI refuses a pod sandbox image without one).
    ImageBuilder::new().layer(layer.finish()).env("PATH=/bin").cmd(&["sh"])
}

/// [`busybox_image`] as a `docker save` archive at `file`.
pub fn busybox_archive(file: &Path) {
    busybox_image().write_docker_archive(file).unwrap();
}

/// Wait for the rows of `sandbox`'s session.db that `wanted` picks, up to 20 s.
pub fn rows_of(sandbox: &Sandbox, wanted: impl Fn(&sandbox::LogRow) -> bool) -> Vec<sandbox::LogRow> {
    let mut events = sandbox.events().unwrap();
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match events.next_timeout(Duration::from_secs(1)) {
            Ok(Some(row)) => rows.push(row),
            Err(e) => panic!("reading {}: {e}", sandbox.session_db().display()),
            Ok(None) if rows.iter().any(&wanted) => break,
            Ok(None) => {}
        }
    }
    rows.into_iter().filter(wanted).collect()
}
