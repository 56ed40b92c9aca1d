//! The parts of an image's config that decide how its command runs.

use serde::{Deserialize, Serialize};

use crate::{Digest, Error};

/// What the image says about running it (OCI image config `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`: prepended to the command.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`: the command when none is given.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` strings.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`; empty means `/`.
    #[serde(default)]
    pub working_dir: String,
    /// `User`: a name, uid, or `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
}

impl ImageConfig {
    /// The command to run: the entrypoint, then `args` if given, else `Cmd`
    /// (Docker's rule).
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone();
        argv.extend_from_slice(if args.is_empty() { &self.cmd } else { args });
        argv
    }

    /// `Env` as pairs (entries without `=` are skipped).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }
}

/// An image config blob, as far as the conversion needs it.
#[derive(Debug)]
pub(crate) struct ParsedConfig {
    pub(crate) config: ImageConfig,
    /// The digests of the uncompressed layers, in order.
    pub(crate) diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RawRun>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRun {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

const MAX_CONFIG_BYTES: usize = 4 << 20;

pub(crate) fn parse(bytes: &[u8]) -> Result<ParsedConfig, Error> {
    let bad = |reason: String| Error::Manifest { what: "config".into(), reason };
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(bad(format!("{} bytes, more than the {MAX_CONFIG_BYTES} accepted", bytes.len())));
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if let Some(os) = raw.os.as_deref().filter(|os| *os != "linux") {
        return Err(bad(format!("the image is for {os}, not linux")));
    }
    if let Some(arch) = raw.architecture.as_deref().filter(|a| *a != "amd64") {
        return Err(bad(format!("the image is for {arch}, not amd64")));
    }
    if raw.rootfs.kind != "layers" {
        return Err(bad(format!("rootfs type {:?}, not \"layers\"", raw.rootfs.kind)));
    }
    let diff_ids = raw.rootfs.diff_ids.iter().map(|d| Digest::parse(d)).collect::<Result<_, _>>()?;
    let run = raw.config.unwrap_or_default();
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
        },
        diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_run_settings() {
        let d = Digest::of(b"");
        let json = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin","A=b=c","junk"],"WorkingDir":"/app","User":"1000:1000"}},"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let p = parse(json.as_bytes()).unwrap();
        assert_eq!(p.diff_ids, vec![d]);
        assert_eq!(p.config.working_dir, "/app");
        assert_eq!(p.config.user, "1000:1000");
        assert_eq!(p.config.env_pairs(), vec![("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]);
        assert_eq!(p.config.argv(&[]), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(p.config.argv(&["ls".into()]), ["/bin/sh", "-c", "ls"]);
    }

    #[test]
    fn refuses_other_platforms_and_garbage() {
        let arm = r#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(parse(arm.as_bytes()).unwrap_err().to_string().contains("arm64"));
        assert!(parse(b"{}").is_err());
        assert!(parse(br#"{"rootfs":{"type":"layers","diff_ids":["md5:00"]}}"#).is_err());
    }
}
