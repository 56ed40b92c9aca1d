//! What a task runs, read from its OCI bundle's `config.json`: the
//! process (arguments, environment, directory, user, terminal), the VM's
//! memory and vCPUs (from `linux.resources`) and the policy profile (the
//! `sandbox.dev/profile` annotation).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{PosixRlimitType, Process, Spec};

use crate::Error;

use crate::config::PROFILE_ANNOTATION;

/// CRI's annotation saying whether a task is a pod's sandbox (pause)
/// container (`sandbox`) or one of its containers (`container`).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// CRI's annotations naming the pod and the container.
const POD_NAMESPACE_ANNOTATION: &str = "io.kubernetes.cri.sandbox-namespace";
const POD_NAME_ANNOTATION: &str = "io.kubernetes.cri.sandbox-name";
const CONTAINER_NAME_ANNOTATION: &str = "io.kubernetes.cri.container-name";
/// The longest `config.json` read (containerd's are a few KiB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// One process to run in the sandbox (the task's, or an exec's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
    /// `user.additionalGids`.
    pub groups: Vec<u32>,
    /// `rlimits`: Linux `RLIMIT_*` number, soft, hard.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub terminal: bool,
}

/// The task as the bundle describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub process: ProcessSpec,
    /// From `linux.resources.memory.limit`; `None`: the library's default.
    pub memory_mib: Option<u32>,
    /// From `linux.resources.cpu` quota and period; `None`: the default.
    pub vcpus: Option<u8>,
    /// The `sandbox.dev/profile` annotation, when there is one.
    pub profile: Option<String>,
    /// `root.path`, relative to the bundle unless absolute.
    pub root: PathBuf,
    /// A pod's sandbox (pause) container, as CRI creates one.
    pub pod_sandbox: bool,
    /// `<pod namespace>/<pod name>/<container name>` for a CRI container.
    pub pod_container: Option<String>,
}

impl TaskSpec {
    /// Read and check `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<TaskSpec, Error> {
        let path = bundle.join("config.json");
        let file = std::fs::File::open(&path).map_err(Error::io(format!("open the bundle's {}", path.display())))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG_BYTES), &mut text)
            .map_err(Error::io(format!("read {}", path.display())))?;
        Self::parse(&text, bundle)
    }

    /// Parse a `config.json`'s text; `bundle` resolves a relative root.
    pub fn parse(json: &str, bundle: &Path) -> Result<TaskSpec, Error> {
        let spec: Spec = serde_json::from_str(json)
            .map_err(|e| Error::InvalidArgument(format!("the bundle's config.json is not an OCI runtime spec: {e}")))?;
        let annotation = |key: &str| spec.annotations().as_ref().and_then(|a| a.get(key)).cloned();
        let profile = annotation(PROFILE_ANNOTATION);
        let pod_sandbox = annotation(CONTAINER_TYPE_ANNOTATION).as_deref() == Some("sandbox");
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the bundle's config.json has no process to run".into()))
            .and_then(ProcessSpec::of);
        // A pod's sandbox container runs nothing: its process (pause) is
        // only kept for `state`.
        let process = match process {
            Err(_) if pod_sandbox => ProcessSpec::nothing(),
            process => process?,
        };
        let pod_container = match (
            annotation(POD_NAMESPACE_ANNOTATION),
            annotation(POD_NAME_ANNOTATION),
            annotation(CONTAINER_NAME_ANNOTATION),
        ) {
            (Some(ns), Some(pod), Some(name)) if !pod_sandbox => Some(format!("{ns}/{pod}/{name}")),
            _ => None,
        };
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let memory_mib = match resources.and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()) {
            Some(limit) if limit > 0 => Some(memory_mib(limit)?),
            _ => None,
        };
        let vcpus = resources.and_then(|r| r.cpu().as_ref()).and_then(|cpu| vcpus(cpu.quota(), cpu.period()));
        let root = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("rootfs"));
        let root = if root.is_absolute() { root } else { bundle.join(root) };
        Ok(TaskSpec { process, memory_mib, vcpus, profile, root, pod_sandbox, pod_container })
    }
}

impl ProcessSpec {
    /// The parts of an OCI process the sandbox applies.
    pub fn of(process: &Process) -> Result<ProcessSpec, Error> {
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(Error::InvalidArgument("the process has no arguments: give the command to run".into()));
        }
        let env = process
            .env()
            .iter()
            .flatten()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(Error::InvalidArgument(format!("environment entry {kv:?} is not KEY=VALUE"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = process.cwd().to_string_lossy().into_owned();
        let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };
        if !cwd.starts_with('/') {
            return Err(Error::InvalidArgument(format!("the process's cwd {cwd:?} is not an absolute path")));
        }
        let user = format!("{}:{}", process.user().uid(), process.user().gid());
        let groups = process.user().additional_gids().clone().unwrap_or_default();
        let rlimits = process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| {
                if r.soft() > r.hard() {
                    return Err(Error::InvalidArgument(format!(
                        "rlimit {:?}: the soft limit {} is above the hard limit {}",
                        r.typ(),
                        r.soft(),
                        r.hard()
                    )));
                }
                Ok((rlimit_number(r.typ()), r.soft(), r.hard()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProcessSpec { args, env, cwd, user, groups, rlimits, terminal: process.terminal().unwrap_or(false) })
    }

    /// The process of a task that runs none (a pod's sandbox container).
    pub fn nothing() -> ProcessSpec {
        ProcessSpec {
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            user: "0:0".into(),
            groups: Vec::new(),
            rlimits: Vec::new(),
            terminal: false,
        }
    }

    /// Parse an exec's process (the JSON containerd sends in the request).
    pub fn parse(json: &[u8]) -> Result<ProcessSpec, Error> {
        let process: Process = serde_json::from_slice(json)
            .map_err(|e| Error::InvalidArgument(format!("the exec's process spec is not an OCI process: {e}")))?;
        Self::of(&process)
    }

    /// The library's command for it (streams are set by the caller).
    pub fn command(&self) -> sandbox::Command {
        let mut command = sandbox::Command::from_argv(self.args.iter().cloned())
            .cwd(&self.cwd)
            .user(&self.user)
            .groups(self.groups.iter().copied());
        for (k, v) in &self.env {
            command = command.env(k, v);
        }
        for &(resource, soft, hard) in &self.rlimits {
            command = command.rlimit(resource, soft, hard);
        }
        command
    }
}

/// Linux's number for an rlimit (`RLIMIT_*` in <sys/resource.h>, x86-64).
fn rlimit_number(typ: PosixRlimitType) -> u32 {
    match typ {
        PosixRlimitType::RlimitCpu => 0,
        PosixRlimitType::RlimitFsize => 1,
        PosixRlimitType::RlimitData => 2,
        PosixRlimitType::RlimitStack => 3,
        PosixRlimitType::RlimitCore => 4,
        PosixRlimitType::RlimitRss => 5,
        PosixRlimitType::RlimitNproc => 6,
        PosixRlimitType::RlimitNofile => 7,
        PosixRlimitType::RlimitMemlock => 8,
        PosixRlimitType::RlimitAs => 9,
        PosixRlimitType::RlimitLocks => 10,
        PosixRlimitType::RlimitSigpending => 11,
        PosixRlimitType::RlimitMsgqueue => 12,
        PosixRlimitType::RlimitNice => 13,
        PosixRlimitType::RlimitRtprio => 14,
        PosixRlimitType::RlimitRttime => 15,
    }
}

/// Guest memory for a memory limit in bytes: whole MiB, within the range
/// the VMM boots.
fn memory_mib(limit: i64) -> Result<u32, Error> {
    let range = sandbox::MEMORY_MIB_RANGE;
    let mib = u32::try_from(limit / (1024 * 1024)).unwrap_or(u32::MAX);
    if !range.contains(&mib) {
        return Err(Error::InvalidArgument(format!(
            "the memory limit ({limit} bytes) is outside what a sandbox VM can have: {} to {} MiB",
            range.start(),
            range.end()
        )));
    }
    Ok(mib)
}

/// vCPUs for a CFS quota and period: the quota rounded up to whole CPUs,
/// within the range the VMM runs. No quota: `None`.
fn vcpus(quota: Option<i64>, period: Option<u64>) -> Option<u8> {
    let quota = u64::try_from(quota?).ok().filter(|q| *q > 0)?;
    let period = period.filter(|p| *p > 0).unwrap_or(100_000);
    let cpus = quota.div_ceil(period);
    let range = sandbox::VCPUS_RANGE;
    Some(u8::try_from(cpus).unwrap_or(u8::MAX).clamp(*range.start(), *range.end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(process: &str, extra: &str) -> String {
        format!(r#"{{"ociVersion":"1.0.2","process":{process},"root":{{"path":"rootfs"}}{extra}}}"#)
    }

    const PROCESS: &str = r#"{"terminal":false,"user":{"uid":1000,"gid":100,"additionalGids":[10,20]},"args":["sh","-c","echo hi"],"env":["PATH=/bin","A=b=c"],"cwd":"/work","rlimits":[{"type":"RLIMIT_NOFILE","hard":4096,"soft":1024},{"type":"RLIMIT_NPROC","hard":100,"soft":50}]}"#;

    #[test]
    fn reads_the_process_resources_and_profile() {
        let json = config(
            PROCESS,
            r#","annotations":{"sandbox.dev/profile":"dev"},"linux":{"resources":{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000}}}"#,
        );
        let spec = TaskSpec::parse(&json, Path::new("/b")).unwrap();
        assert_eq!(spec.process.args, ["sh", "-c", "echo hi"]);
        assert_eq!(spec.process.env, [("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]);
        assert_eq!(spec.process.cwd, "/work");
        assert_eq!(spec.process.user, "1000:100");
        assert_eq!(spec.process.groups, [10, 20]);
        assert_eq!(spec.process.rlimits, [(7, 1024, 4096), (6, 50, 100)]);
        assert!(!spec.process.terminal);
        assert_eq!(spec.memory_mib, Some(512));
        assert_eq!(spec.vcpus, Some(2));
        assert_eq!(spec.profile.as_deref(), Some("dev"));
        assert_eq!(spec.root, Path::new("/b/rootfs"));
        assert!(!spec.pod_sandbox);
        assert_eq!(spec.pod_container, None);
    }

    #[test]
    fn defaults_without_resources_or_annotation() {
        let spec = TaskSpec::parse(&config(PROCESS, ""), Path::new("/b")).unwrap();
        assert_eq!(spec.memory_mib, None);
        assert_eq!(spec.vcpus, None);
        assert_eq!(spec.profile, None);
    }

    #[test]
    fn cri_annotations_say_pod_sandbox_or_container_and_which_pod() {
        let pause = config(
            PROCESS,
            r#","annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-name":"p","io.kubernetes.cri.sandbox-namespace":"ns"}"#,
        );
        let spec = TaskSpec::parse(&pause, Path::new("/b")).unwrap();
        assert!(spec.pod_sandbox);
        assert_eq!(spec.pod_container, None);
        // An image without a command makes a pause container that runs nothing.
        let bare = pause.replace(r#""args":["sh","-c","echo hi"],"#, "");
        assert_eq!(TaskSpec::parse(&bare, Path::new("/b")).unwrap().process, ProcessSpec::nothing());
        let container = config(
            PROCESS,
            r#","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-name":"p","io.kubernetes.cri.sandbox-namespace":"ns","io.kubernetes.cri.container-name":"c"}"#,
        );
        let spec = TaskSpec::parse(&container, Path::new("/b")).unwrap();
        assert!(!spec.pod_sandbox);
        assert_eq!(spec.pod_container.as_deref(), Some("ns/p/c"));
    }

    #[test]
    fn bad_bundles_are_clear_errors() {
        let err = TaskSpec::parse("{not json", Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("not an OCI runtime spec"), "{err}");
        let no_args = config(r#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#, "");
        let err = TaskSpec::parse(&no_args, Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("no arguments"), "{err}");
        let tiny = config(PROCESS, r#","linux":{"resources":{"memory":{"limit":1048576}}}"#);
        let err = TaskSpec::parse(&tiny, Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("memory limit"), "{err}");
        let bad_limit = config(
            r#"{"user":{"uid":0,"gid":0},"args":["x"],"cwd":"/","rlimits":[{"type":"RLIMIT_NOFILE","hard":1,"soft":2}]}"#,
            "",
        );
        let err = TaskSpec::parse(&bad_limit, Path::new("/b")).unwrap_err().to_string();
        assert!(err.contains("above the hard limit"), "{err}");
        let bad_env = config(r#"{"user":{"uid":0,"gid":0},"args":["x"],"env":["NOEQUALS"],"cwd":"/"}"#, "");
        assert!(TaskSpec::parse(&bad_env, Path::new("/b")).is_err());
    }

    #[test]
    fn cpu_quota_rounds_up_and_is_clamped() {
        assert_eq!(vcpus(Some(50_000), Some(100_000)), Some(1));
        assert_eq!(vcpus(Some(100_001), None), Some(2));
        assert_eq!(vcpus(Some(-1), Some(100_000)), None);
        assert_eq!(vcpus(None, Some(100_000)), None);
        assert_eq!(vcpus(Some(i64::MAX), Some(1)), Some(*sandbox::VCPUS_RANGE.end()));
    }

    #[test]
    fn an_exec_process_parses_from_its_json() {
        let p = ProcessSpec::parse(PROCESS.as_bytes()).unwrap();
        assert_eq!(p.args[0], "sh");
        assert!(ProcessSpec::parse(b"[]").is_err());
    }
}
