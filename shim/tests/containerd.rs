//! End to end: Debian's containerd, started by the test with its own root,
//! state directory and socket, runs tasks through the built
//! `containerd-shim-sandbox-v2` (`ctr run --runtime io.containerd.sandbox.v2`)
//! on a busybox image the test builds and imports: output and exit status,
//! a missing command (127) and a bad profile annotation (create fails),
//! `ctr task exec`, a blocked TLS connection logged in the task's
//! `session.db`, `ctr task kill`, and nothing left running afterwards.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/vm.rs"]
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rootfs::fixtures::{ImageBuilder, LayerBuilder};
use sandbox::{LogRow, Sandbox};

const RUNTIME: &str = "io.containerd.sandbox.v2";
const IMAGE: &str = "docker.io/library/test:latest";
const NAMESPACE: &str = "shimtest";

/// The shim beside which `sandbox-holder` must be, or the release one.
fn holder_program(shim: &Path) -> Option<PathBuf> {
    let dir = shim.parent()?;
    [dir.join("sandbox-holder"), dir.join("../release/sandbox-holder")].into_iter().find(|p| p.is_file())
}

/// What this test needs beyond a VM: containerd, ctr, the holder.
fn missing(shim: &Path) -> Vec<String> {
    let mut why = Vec::new();
    for e in [sandbox::paths::kernel().err(), sandbox::paths::default_image().err()].into_iter().flatten() {
        why.push(e.to_string());
    }
    for tool in ["containerd", "ctr"] {
        if Command::new(tool).arg("--version").output().is_err() {
            why.push(format!("{tool} is missing: apt-get install containerd (./test.sh installs it)"));
        }
    }
    if holder_program(shim).is_none() {
        why.push("sandbox-holder is not built: cargo build --bin sandbox-holder (or ./setup.sh)".into());
    }
    why
}

/// A containerd of the test's own, and what it leaves: stopped, unmounted
/// and removed when dropped, whether the test passed or not.
struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    data: PathBuf,
}

impl Containerd {
    fn start(shim: &Path, holder: &Path) -> Containerd {
        let dir = tempfile::Builder::new().prefix("shim-e2e-").tempdir_in("/var/tmp").unwrap();
        let socket = dir.path().join("containerd.sock");
        let data = dir.path().join("data");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
# The CRI plugin is the next step (pods); ctr talks to the task API only.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
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
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let containerd = Containerd { child: Some(child), dir, socket, data };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not answer in 30 s; its log:\n{}", containerd.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        containerd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr` that must succeed; its stdout.
    fn ctr_ok(&self, args: &[&str]) -> String {
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

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The sandbox a task runs in (the shim labels it `containerd:<ns>/<id>`).
    fn sandbox_of(&self, task: &str) -> Sandbox {
        let label = format!("containerd:{NAMESPACE}/{task}");
        Sandbox::list_in(&self.data)
            .unwrap()
            .into_iter()
            .find(|s| s.state().command == [label.clone()])
            .unwrap_or_else(|| panic!("no sandbox labelled {label} under {}", self.data.display()))
    }

    /// Processes whose command line names this test's directory (shims).
    fn own_processes(&self) -> Vec<(i32, String)> {
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

    fn stop(&mut self) {
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn busybox_archive(file: &Path) {
    let busybox = std::fs::read("/bin/busybox").expect("Debian's busybox-static (/bin/busybox)");
    let mut layer = LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .file("bin/busybox", &busybox, 0o755, 0, 0)
        .dir("etc", 0o755, 0, 0)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644, 0, 0)
        .dir("root", 0o700, 0, 0)
        .dir("tmp", 0o1777, 0, 0);
    for applet in ["sh", "echo", "sleep", "nc", "cat", "true"] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    ImageBuilder::new().layer(layer.finish()).env("PATH=/bin").write_docker_archive(file).unwrap();
}

#[test]
fn ctr_runs_tasks_in_sandboxes() {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-sandbox-v2"));
    if !vm::vm_available(missing(&shim)) {
        return;
    }
    let holder = holder_program(&shim).unwrap();
    let mut containerd = Containerd::start(&shim, &holder);
    let archive = containerd.dir.path().join("busybox.tar");
    busybox_archive(&archive);
    containerd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(containerd.ctr_ok(&["image", "ls", "-q"]).contains(IMAGE));

    // A task's output and exit status, as with runc.
    let started = Instant::now();
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", IMAGE, "t1", "sh", "-c", "echo hi; exit 3"]);
    eprintln!("t1 (first task: root image, warm snapshot, run): {:?}", started.elapsed());
    assert_eq!(text(&out.stdout).trim(), "hi", "stderr: {}\n{}", text(&out.stderr), containerd.log());
    assert_eq!(out.status.code(), Some(3), "stderr: {}\n{}", text(&out.stderr), containerd.log());

    // A command the image does not have: the shell's 127, as the status.
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", IMAGE, "t3", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "stderr: {}\n{}", text(&out.stderr), containerd.log());
    // A profile that does not exist: create fails, naming it and the ones there are.
    let annotation = "sandbox.dev/profile=no-such-profile";
    let out = containerd.ctr(&["run", "--runtime", RUNTIME, "--rm", "--annotation", annotation, IMAGE, "t4", "true"]);
    let said = text(&out.stderr);
    assert!(!out.status.success(), "a bad profile was accepted: {said}");
    assert!(said.contains("no-such-profile") && said.contains("deny-all"), "{said}");
    let _ = containerd.ctr(&["container", "rm", "t4"]);

    // A long-running task, an exec in it, a blocked request, a kill.
    let started = Instant::now();
    containerd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "t2", "sleep", "300"]);
    eprintln!("t2 started in {:?}", started.elapsed());
    let started = Instant::now();
    let out = containerd.ctr_ok(&["task", "exec", "--exec-id", "e1", "t2", "echo", "from-exec"]);
    eprintln!("exec in {:?}", started.elapsed());
    assert_eq!(out.trim(), "from-exec");
    let out = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "t2",
        "sh",
        "-c",
        // A TLS connection to an address of TEST-NET-1 (RFC 5737), never
        // routed: it goes no further than the host's handler. (Not wget:
        // Debian's busybox 1.35 wget segfaults with -T, on the host too,
        // and without a timeout a hung request would hang the test.)
        "printf '\\026\\003\\001\\000\\001\\001' | nc -w 20 192.0.2.1 443 2>&1; echo rc=$?",
    ]);
    let said = text(&out.stdout);
    eprintln!("in t2: {said}");
    assert!(said.contains("rc="), "the exec did not run: {said}");
    let sandbox = containerd.sandbox_of("t2");
    let mut events = sandbox.events().unwrap();
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match events.next_timeout(Duration::from_secs(1)) {
            Ok(Some(row)) => rows.push(row),
            Err(e) => panic!("reading {}: {e}", sandbox.session_db().display()),
            Ok(None) if rows.iter().any(mentions_example) => break,
            Ok(None) => {}
        }
    }
    let blocked = rows.iter().filter(|r| mentions_example(r)).collect::<Vec<_>>();
    assert!(!blocked.is_empty(), "no row for 192.0.2.1 in {}: {rows:?}", sandbox.session_db().display());
    for row in &blocked {
        assert!(row.to_text().contains(" denied "), "192.0.2.1 was not denied: {}", row.to_text());
    }

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "t2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = containerd.ctr_ok(&["task", "ls"]);
        if tasks.lines().any(|l| l.starts_with("t2 ") && l.contains("STOPPED")) {
            break;
        }
        assert!(Instant::now() < deadline, "t2 did not stop after SIGKILL: {tasks}");
        std::thread::sleep(Duration::from_millis(500));
    }
    containerd.ctr_ok(&["task", "rm", "t2"]);
    containerd.ctr_ok(&["container", "rm", "t2"]);
    assert!(!sandbox.is_running(), "t2's sandbox still runs");

    // Nothing left: every sandbox stopped, the shims gone with their tasks.
    containerd.stop();
    for sandbox in Sandbox::list_in(&containerd.data).unwrap() {
        assert!(!sandbox.is_running(), "sandbox {} still runs", sandbox.id());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containerd.own_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(containerd.own_processes(), Vec::<(i32, String)>::new(), "processes left running");
}

fn mentions_example(row: &LogRow) -> bool {
    row.to_text().contains("192.0.2.1")
}
