//! Boots the real guest kernel on KVM with a tiny erofs root image (static
//! busybox and a shell-script init) and checks what the guest does.
//!
//! Needs /dev/kvm, the kernel built by `kernel-config/build.sh` (or the path
//! in SANDBOX_KERNEL), Debian's busybox-static and erofs-utils. Without KVM
//! or the kernel the test skips (with `SANDBOX_REQUIRE_VM=1`, as ./test.sh
//! sets, it fails); another missing prerequisite fails the test with the
//! command that provides it.
//!
//! Everything runs in one test function, one VM after the other, so that the
//! process's thread and file descriptor counts can be compared before and after.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/vm.rs"]
mod vm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{ExitReason, Vm, VmConfig};

fn kernel() -> PathBuf {
    std::env::var_os("SANDBOX_KERNEL").map_or_else(
        || {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            Path::new(&home).join(".cache/sandbox/kernel/vmlinux")
        },
        PathBuf::from,
    )
}

/// Whether this test can boot the guest kernel here (see `vm::vm_available`).
fn vm_available() -> bool {
    vm::vm_available(vm::missing_file(
        &kernel(),
        "build the guest kernel with kernel-config/build.sh (or set SANDBOX_KERNEL)",
    ))
}

/// An erofs image holding busybox and `init` (a busybox shell script).
fn root_image(dir: &Path, init: &str) -> PathBuf {
    let root = dir.join("root");
    for sub in ["bin", "dev", "proc"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    assert!(Path::new("/bin/busybox").exists(), "/bin/busybox is missing: apt-get install busybox-static");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("hello.txt"), "read from the root image\n").unwrap();
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    std::fs::set_permissions(&init_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = dir.join("root.erofs");
    let status = Command::new("mkfs.erofs")
        .args(["--quiet", "--all-root"])
        .arg(&image)
        .arg(&root)
        .status()
        .expect("mkfs.erofs is missing: apt-get install erofs-utils");
    assert!(status.success(), "mkfs.erofs failed");
    image
}

/// A prompt line, the answer to type when it appears, and where to type it.
type Reply = Option<(&'static str, &'static [u8], std::io::PipeWriter)>;

/// Serial output with the time each line was completed; types `answer` on
/// the console's input when the guest prints the line `prompt`.
#[derive(Clone)]
struct Console {
    start: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    partial: Arc<Mutex<Vec<u8>>>,
    reply: Arc<Mutex<Reply>>,
}

impl Console {
    fn new() -> Self {
        Self { start: Instant::now(), lines: Arc::default(), partial: Arc::default(), reply: Arc::default() }
    }

    /// The console's input, which receives `answer` after the guest prints `prompt`.
    fn input(&self, prompt: &'static str, answer: &'static [u8]) -> std::os::fd::OwnedFd {
        let (reader, writer) = std::io::pipe().unwrap();
        *self.reply.lock().unwrap() = Some((prompt, answer, writer));
        reader.into()
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut out: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        out.push_str(&String::from_utf8_lossy(&self.partial.lock().unwrap()));
        out
    }

    /// When the first line containing `needle` was printed.
    fn time_of(&self, needle: &str) -> Option<Duration> {
        self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t)
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut partial = self.partial.lock().unwrap();
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&partial).trim_end_matches('\r').to_string();
                let mut reply = self.reply.lock().unwrap();
                if reply.as_ref().is_some_and(|(prompt, _, _)| line == *prompt) {
                    if let Some((_, answer, mut writer)) = reply.take() {
                        writer.write_all(answer)?;
                    }
                }
                self.lines.lock().unwrap().push((self.start.elapsed(), line));
                partial.clear();
            } else {
                partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn config(image: &Path, scratch: Option<PathBuf>, vcpus: u8, console: &Console) -> VmConfig {
    VmConfig {
        kernel: kernel(),
        cmdline: format!("{} root=/dev/vda ro rootfstype=erofs init=/init", vmm::cmdline::base_args()),
        memory_mib: 128,
        vcpus,
        root_disk: image.to_path_buf(),
        extra_disks: scratch.map(vmm::ExtraDisk::writable).into_iter().collect(),
        vsock: None,
        serial: Box::new(console.clone()),
        seccomp: Default::default(),
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

const INIT: &str = r#"#!/bin/busybox sh
echo "init: started"
/bin/busybox mount -t devtmpfs dev /dev
echo "cpus: $(/bin/busybox nproc)"
/bin/busybox cat /hello.txt
echo "scratch-ok" | /bin/busybox dd of=/dev/vdb conv=fsync 2>/dev/null && echo "scratch written"
echo "x" | /bin/busybox dd of=/dev/vda 2>/dev/null || echo "root write refused"
echo "serial: waiting for input"
read -t 60 line && echo "serial input: $line"
/bin/busybox reboot -f
"#;

/// Boots, runs init, checks device behaviour, and shuts down through the
/// guest's reboot; then boots again and stops the guest from the host.
#[test]
fn guest_boots_runs_init_and_shuts_down() {
    if !vm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = root_image(dir.path(), INIT);
    let scratch = dir.path().join("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();

    let threads_before = thread_count();
    let fds_before = fd_count();

    // Guest-initiated shutdown.
    let console = Console::new();
    let mut vm = Vm::create(config(&image, Some(scratch.clone()), 2, &console)).unwrap();
    vm.set_serial_input(console.input("serial: waiting for input", b"hello guest\n")).unwrap();
    let started = Instant::now();
    let reason = vm.run();
    let total = started.elapsed();
    let log = console.text();
    println!("--- guest console ---\n{log}---");
    let reason = reason.unwrap_or_else(|e| panic!("VM failed: {e}\nconsole:\n{log}"));
    assert_eq!(reason, ExitReason::GuestShutdown, "console:\n{log}");
    let init_at = console.time_of("init: started").unwrap_or_else(|| panic!("init never ran; console:\n{log}"));
    println!(
        "boot time: first line from /init after {:.2} s; guest shut down after {:.2} s",
        init_at.as_secs_f64(),
        total.as_secs_f64()
    );
    assert!(log.contains("cpus: 2"), "both vCPUs are online");
    assert!(log.contains("read from the root image"));
    assert!(log.contains("scratch written"));
    assert!(log.contains("root write refused"));
    assert!(log.contains("serial input: hello guest"), "host input reached the guest");
    let scratch_content = std::fs::read(&scratch).unwrap();
    assert!(scratch_content.starts_with(b"scratch-ok\n"), "scratch disk holds the guest's write");

    assert_eq!(thread_count(), threads_before, "no vCPU thread left behind");
    assert_eq!(fd_count(), fds_before, "no file descriptor left behind");

    // Host-initiated stop, while the guest kernel is still booting.
    let console = Console::new();
    let vm = Vm::create(config(&image, None, 1, &console)).unwrap();
    let stop = vm.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        stop.stop();
        stop
    });
    let started = Instant::now();
    let reason = vm.run().unwrap();
    let stopped_after = started.elapsed();
    let stop = stopper.join().unwrap();
    stop.stop(); // the VM is gone: does nothing
    assert_eq!(reason, ExitReason::StopRequested);
    assert!(stopped_after < Duration::from_secs(10), "stop took {stopped_after:?}");
    assert_eq!(thread_count(), threads_before, "no vCPU thread left behind");
    assert_eq!(fd_count(), fds_before, "no file descriptor left behind");
}
