//! End to end: an OCI image the test builds (busybox, its own Env,
//! WorkingDir and User), pushed to a docker-registry on 127.0.0.1, pulled by
//! reference, booted, and a command run in it. Needs /dev/kvm, the artefacts
//! of ./setup.sh, docker-registry and skopeo (test.sh installs them), and root.
//! Without /dev/kvm or ./setup.sh's artefacts it skips, or fails with
//! `SANDBOX_REQUIRE_VM=1` (./test.sh).

mod common;

use std::time::Duration;

use rootfs::fixtures::{ImageBuilder, LayerBuilder, Registry};
use sandbox::{Command as SandboxCommand, Image, Sandbox, Status};

fn busybox_image() -> ImageBuilder {
    let busybox = std::fs::read("/bin/busybox").expect("Debian's busybox-static (/bin/busybox)");
    let mut base = LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .file("bin/busybox", &busybox, 0o755, 0, 0)
        .dir("etc", 0o755, 0, 0)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/work:/bin/sh\n", 0o644, 0, 0)
        .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644, 0, 0)
        .file("etc/gone", b"removed by the top layer", 0o644, 0, 0)
        // An image's resolv.conf is often a symlink; init must replace it, not write through it.
        .symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf");
    for applet in ["sh", "cat", "id", "ls", "pwd", "stat", "test", "grep"] {
        base = base.symlink(&format!("bin/{applet}"), "busybox");
    }
    let top = LayerBuilder::new()
        .dir("work", 0o755, 1000, 1000)
        .file("work/data", b"layer data\n", 0o644, 1000, 1000)
        .whiteout("etc/gone")
        .hardlink("bin/busybox-link", "bin/busybox");
    ImageBuilder::new()
        .layer(base.finish())
        .layer(top.finish())
        .env("PATH=/bin")
        .env("GREETING=from-image")
        .env("OVERRIDDEN=image")
        .working_dir("/work")
        .user("app")
        .cmd(&["sh", "-c", "echo default cmd"])
}

#[test]
fn a_pulled_image_runs_with_its_own_env_workdir_and_user() {
    common::require_vm!();
    let registry = Registry::start().unwrap();
    let layout = tempfile::tempdir().unwrap();
    busybox_image().write_oci_layout(layout.path(), "e2e").unwrap();
    registry.push(layout.path(), "e2e", "sandbox/e2e", "v1").unwrap();
    let reference = format!("{}/sandbox/e2e:v1", registry.addr());

    let script = r#"
        echo "cwd=$(pwd) greeting=$GREETING overridden=$OVERRIDDEN uid=$(id -u) gid=$(id -g)"
        cat data
        test -e /etc/gone || echo "whiteout applied"
        echo "links=$(stat -c %h /bin/busybox)"
        echo written > mine && cat mine
        ls /.sandbox
        cat /etc/resolv.conf
    "#;
    let run = Sandbox::builder(Image::parse(&reference))
        .memory_mib(128)
        .run(
            SandboxCommand::from_argv(["sh", "-c", script]).env("OVERRIDDEN", "flag").timeout(Duration::from_secs(300)),
        )
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!("boot to agent: {:?}, whole run: {:?}\n--- output ---\n{out}", run.boot_time, run.total_time);
    assert_eq!(
        run.status,
        Status::Exited(0),
        "stderr: {}\nconsole:\n{}",
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&run.console)
    );
    assert!(out.contains("cwd=/work greeting=from-image overridden=flag uid=1000 gid=1000\n"), "{out}");
    assert!(out.contains("layer data\nwhiteout applied\nlinks=2\nwritten\n"), "{out}");
    assert!(out.contains("sandbox-proxy\n"), "the sandbox's programs are not at /.sandbox: {out}");
    assert!(out.contains("nameserver 10.0.0.1"), "{out}");

    // The CLI lists it; rmi removes it again.
    let images = common::sandbox(&["images"]);
    assert!(common::text(&images.stdout).contains(&reference), "{}", common::text(&images.stdout));
    let rmi = common::sandbox(&["rmi", &reference]);
    assert!(rmi.status.success(), "{}", common::text(&rmi.stderr));
}
