//! End to end: pods through containerd's CRI plugin, driven as kubelet
//! drives it (the CRI gRPC API, with the `k8s-cri` crate). Debian's
//! containerd, started by the test with its own root, state, sockets and
//! configuration, has the runtime handler `sandbox` on
//! `containerd-shim-sandbox-v2`, and the shim a configuration with a profile
//! directory and a corporate profile.
//!
//! RunPodSandbox (its sandbox container gets no VM), CreateContainer,
//! StartContainer, the container's log as CRI writes it, ExecSync with an
//! exit status and the container's user, groups and rlimits, container
//! stats, the pod's profile file in force (a DNS block it adds);
//! a profile that tries to unlock what the corporate profile locked, and
//! one that does not exist, fail RunPodSandbox; a container whose image
//! lacks its command fails StartContainer with the reason in its status;
//! a shim killed mid-run leaves its container exited and its VM stopped;
//! StopPodSandbox and RemovePodSandbox leave nothing running.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{busybox_archive, holder_program, missing, rows_of, text, vm, Containerd, Setup, IMAGE};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, Int64Value, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use sandbox::Sandbox;
use tonic::transport::{Channel, Endpoint, Uri};

/// The corporate profile locks DNS: pods may only add blocks there.
const CORPORATE: &str = r#"
[security]
locks = ["dns"]
"#;

/// A pod profile the corporate lock allows: it only adds a block.
const CI: &str = r#"
[security.rules.dns.no_blocked_test]
on = "dns.request"
if = 'dns.request.qname == "blocked.test"'
decision = "block"
"#;

/// A pod profile that tries to allow DNS names, which the lock forbids.
const UNLOCK: &str = r#"
[security.rules.dns.everything]
on = "dns.request"
decision = "allow"
"#;

type Cri = RuntimeServiceClient<Channel>;

async fn connect(socket: &Path) -> Cri {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    RuntimeServiceClient::new(channel)
}

fn pod_config(name: &str, profile: Option<&str>, logs: &Path) -> PodSandboxConfig {
    let mut annotations = HashMap::new();
    if let Some(profile) = profile {
        annotations.insert("sandbox.dev/profile".to_string(), profile.to_string());
    }
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.join(name).to_string_lossy().into_owned(),
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Node as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(cri: &mut Cri, config: &PodSandboxConfig) -> Result<String, tonic::Status> {
    let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "sandbox".into() };
    Ok(cri.run_pod_sandbox(request).await?.into_inner().pod_sandbox_id)
}

/// A container of the test's image running `cmd` as uid and gid 65534
/// with the supplementary group 1234.
async fn create_container(cri: &mut Cri, pod: &str, pod_config: &PodSandboxConfig, name: &str, cmd: &[&str]) -> String {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 65534 }),
                run_as_group: Some(Int64Value { value: 65534 }),
                supplemental_groups: vec![1234],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    };
    cri.create_container(request).await.unwrap().into_inner().container_id
}

async fn status(cri: &mut Cri, container: &str) -> ContainerStatus {
    let request = ContainerStatusRequest { container_id: container.into(), verbose: false };
    cri.container_status(request).await.unwrap().into_inner().status.unwrap()
}

/// Wait up to `secs` for the container to be in `state`.
async fn wait_state(cri: &mut Cri, container: &str, state: ContainerState, secs: u64) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let status = status(cri, container).await;
        if status.state == state as i32 {
            return status;
        }
        assert!(Instant::now() < deadline, "container {container} is not {state:?} after {secs} s: {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn exec_sync(cri: &mut Cri, container: &str, cmd: &[&str]) -> ExecSyncResponse {
    let request = ExecSyncRequest {
        container_id: container.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 60,
    };
    cri.exec_sync(request).await.unwrap().into_inner()
}

async fn stop_and_remove(cri: &mut Cri, pod: &str) {
    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.into() }).await.unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.into() }).await.unwrap();
}

/// The pid of the shim serving `container` (its command line names it).
fn shim_of(containerd: &Containerd, container: &str) -> Option<i32> {
    containerd
        .own_processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-sandbox-v2") && cmd.contains(&format!("-id {container}")))
        .map(|(pid, _)| pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_through_cri_in_sandboxes() {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-sandbox-v2"));
    if !vm::vm_available(missing(&shim)) {
        return;
    }
    let holder = holder_program(&shim).unwrap();
    let work = tempfile::Builder::new().prefix("cri-e2e-").tempdir_in("/var/tmp").unwrap();
    let profiles = work.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(profiles.join("ci.toml"), CI).unwrap();
    std::fs::write(profiles.join("unlock.toml"), UNLOCK).unwrap();
    std::fs::write(work.path().join("corporate.toml"), CORPORATE).unwrap();
    let shim_config = format!(
        "profile_dir = \"{}\"\ncorporate_profiles = [\"{}\"]\n",
        profiles.display(),
        work.path().join("corporate.toml").display()
    );
    let mut containerd = Containerd::start(&shim, &holder, Setup { cri: true, shim_config: Some(shim_config) });
    let archive = containerd.dir.path().join("busybox.tar");
    busybox_archive(&archive);
    containerd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    let logs = work.path().join("logs");
    let mut cri = connect(&containerd.socket).await;
    // The CRI service answers once the plugin has started.
    let deadline = Instant::now() + Duration::from_secs(30);
    let version = loop {
        match cri.version(VersionRequest { version: "v1".into() }).await {
            Ok(v) => break v.into_inner(),
            Err(e) if Instant::now() < deadline => eprintln!("CRI not ready: {}", e.message()),
            Err(e) => panic!("CRI did not answer in 30 s: {e:?}\n{}", containerd.log()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("CRI: {} {}", version.runtime_name, version.runtime_version);

    // A pod whose profile would unlock DNS, and one naming no profile: refused.
    let err = run_pod(&mut cri, &pod_config("unlock", Some("unlock"), &logs)).await.unwrap_err();
    assert!(err.message().contains("locked") && err.message().contains("unlock.toml"), "{err:?}");
    let err = run_pod(&mut cri, &pod_config("typo", Some("no-such"), &logs)).await.unwrap_err();
    assert!(err.message().contains("no-such") && err.message().contains("ci"), "{err:?}");

    // A pod, its container, its log, an exec.
    let started = Instant::now();
    let pod_cfg = pod_config("web", Some("ci"), &logs);
    let pod = run_pod(&mut cri, &pod_cfg).await.unwrap();
    eprintln!("RunPodSandbox: {:?}", started.elapsed());
    let started = Instant::now();
    let c1 =
        create_container(&mut cri, &pod, &pod_cfg, "c1", &["sh", "-c", "echo hello-from-pod; exec sleep 300"]).await;
    cri.start_container(StartContainerRequest { container_id: c1.clone() }).await.unwrap();
    eprintln!("CreateContainer + StartContainer: {:?}", started.elapsed());
    wait_state(&mut cri, &c1, ContainerState::ContainerRunning, 30).await;
    let log = logs.join("web/c1.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("hello-from-pod") {
        assert!(Instant::now() < deadline, "no output in {}: {:?}", log.display(), std::fs::read_to_string(&log));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // CRI's log format: time, stream, tag, line.
    let line = std::fs::read_to_string(&log).unwrap();
    assert!(line.contains(" stdout F hello-from-pod"), "{line}");

    let started = Instant::now();
    let out = exec_sync(&mut cri, &c1, &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"]).await;
    eprintln!("ExecSync: {:?}", started.elapsed());
    assert_eq!((text(&out.stdout).trim(), text(&out.stderr).trim(), out.exit_code), ("exec-out", "exec-err", 3));

    // The process's user, supplementary groups and RLIMIT_NOFILE (the
    // bundle's, else the guest's own 4096).
    let out = exec_sync(&mut cri, &c1, &["sh", "-c", "id -u; id -G; ulimit -Hn"]).await;
    let said = text(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.first(), Some(&"65534"), "{said} {}", text(&out.stderr));
    assert!(lines.get(1).is_some_and(|g| g.split(' ').any(|g| g == "1234")), "{said}");
    let nofile = containerd.bundle_nofile(&c1).unwrap_or(4096).to_string();
    assert_eq!(lines.get(2), Some(&nofile.as_str()), "{said}");

    // Stats: the CPU time and memory of the processes holding c1's VM.
    let stats = cri.container_stats(ContainerStatsRequest { container_id: c1.clone() }).await.unwrap().into_inner();
    let stats = stats.stats.unwrap();
    let cpu = stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value).unwrap_or(0);
    let memory = stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value).unwrap_or(0);
    eprintln!("c1 stats: cpu {cpu} ns, working set {memory} bytes");
    assert!(cpu > 0 && memory > 1 << 20, "{cpu} {memory}");

    // The pod's profile is in force: its block is a `blocked` row of this
    // container's session.db, under the corporate layer.
    let out = exec_sync(&mut cri, &c1, &["nslookup", "blocked.test", "10.0.0.1"]).await;
    eprintln!("nslookup blocked.test: {} {}", text(&out.stdout), text(&out.stderr));
    let sandbox = containerd.sandbox_of(&c1);
    assert!(sandbox.state().command.iter().any(|l| l == "pod:default/web/c1"), "{:?}", sandbox.state().command);
    let rows = rows_of(&sandbox, |r| r.to_text().contains("blocked.test"));
    assert!(!rows.is_empty(), "no row for blocked.test in {}", sandbox.session_db().display());
    assert!(rows.iter().all(|r| r.to_text().contains("dns.no_blocked_test")), "{rows:?}");

    // An image without the container's command: StartContainer fails, and
    // the container's status says why.
    let c2 = create_container(&mut cri, &pod, &pod_cfg, "c2", &["/no/such/program"]).await;
    let err = cri.start_container(StartContainerRequest { container_id: c2.clone() }).await.unwrap_err();
    assert!(err.message().contains("could not be started"), "{err:?}");
    let st = wait_state(&mut cri, &c2, ContainerState::ContainerExited, 30).await;
    assert_eq!(st.reason, "StartError", "{st:?}");
    assert!(st.message.contains("/no/such/program"), "{st:?}");

    // A shim killed mid-run: containerd cleans up after it (the shim's
    // `delete` stops the VM) and reports the container exited.
    let c3 = create_container(&mut cri, &pod, &pod_cfg, "c3", &["sleep", "300"]).await;
    cri.start_container(StartContainerRequest { container_id: c3.clone() }).await.unwrap();
    let c3_sandbox = containerd.sandbox_of(&c3);
    assert!(c3_sandbox.is_running());
    let shim_pid =
        shim_of(&containerd, &c3).unwrap_or_else(|| panic!("no shim for {c3}: {:?}", containerd.own_processes()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim_pid), nix::sys::signal::SIGKILL).unwrap();
    let st = wait_state(&mut cri, &c3, ContainerState::ContainerExited, 60).await;
    eprintln!("c3 after its shim was killed: exit {} {}", st.exit_code, st.reason);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c3_sandbox.is_running() {
        assert!(Instant::now() < deadline, "c3's sandbox {} still runs after its shim died", c3_sandbox.id());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Stop and remove the pod: nothing of it is left.
    stop_and_remove(&mut cri, &pod).await;
    let pods = cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    assert!(pods.is_empty(), "{pods:?}");
    let containers = cri.list_containers(ListContainersRequest { filter: None }).await.unwrap().into_inner().containers;
    assert!(containers.is_empty(), "{containers:?}");
    for sandbox in Sandbox::list_in(&containerd.data).unwrap() {
        assert!(!sandbox.is_running(), "sandbox {} ({:?}) still runs", sandbox.id(), sandbox.state().command);
    }
    drop(cri);
    containerd.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containerd.own_processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(containerd.own_processes(), Vec::<(i32, String)>::new(), "processes left running");
}
