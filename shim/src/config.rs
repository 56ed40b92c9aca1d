//! The shim's configuration file and the policy profiles of a task.
//!
//! The file is `$SANDBOX_SHIM_CONFIG`, else `/etc/sandbox/shim.toml` (no
//! file there: no profile directory and no corporate profile):
//!
//! ```toml
//! # Profiles a pod may name in its `sandbox.dev/profile` annotation:
//! # `sandbox.dev/profile: ci` is /etc/sandbox/profiles/ci.toml.
//! profile_dir = "/etc/sandbox/profiles"
//! # Loaded in the corporate layer, under every task's own profile: their
//! # locks bind it, so a pod cannot unlock what they block.
//! corporate_profiles = ["/etc/sandbox/corporate.toml"]
//! ```

use std::path::{Path, PathBuf};

use sandbox::policy::{Engine, Layer, ProfileSource};
use serde::Deserialize;

use crate::Error;

/// The annotation naming a task's policy profile.
pub const PROFILE_ANNOTATION: &str = "sandbox.dev/profile";
/// The profile of a task without the annotation.
pub const DEFAULT_PROFILE: &str = "deny-all";
/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SANDBOX_SHIM_CONFIG";
/// The configuration file when the variable is not set.
pub const DEFAULT_CONFIG: &str = "/etc/sandbox/shim.toml";
/// The longest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The shim's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    /// Where the profile files pods may name are (`<name>.toml`).
    #[serde(default)]
    pub profile_dir: Option<PathBuf>,
    /// Profiles in the corporate layer of every task.
    #[serde(default)]
    pub corporate_profiles: Vec<PathBuf>,
}

impl ShimConfig {
    /// The configuration containerd's environment names, else the default
    /// file when there is one.
    pub fn load() -> Result<ShimConfig, Error> {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Self::load_from(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG).exists() => Self::load_from(Path::new(DEFAULT_CONFIG)),
            None => Ok(ShimConfig::default()),
        }
    }

    /// Read and check the file at `path`.
    pub fn load_from(path: &Path) -> Result<ShimConfig, Error> {
        let file = std::fs::File::open(path)
            .map_err(Error::io(format!("open the shim's configuration {} ({CONFIG_ENV})", path.display())))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG_BYTES), &mut text)
            .map_err(Error::io(format!("read {}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!("the shim's configuration {} is not valid: {e}", path.display()))
        })
    }

    /// The profiles of a task whose `sandbox.dev/profile` annotation is
    /// `annotation`, in their layers, checked: the corporate profiles, then
    /// the named one (a built-in profile's name or a file of the profile
    /// directory; `deny-all` when there is no annotation).
    pub fn profiles(&self, annotation: Option<&str>) -> Result<Vec<(Layer, ProfileSource)>, Error> {
        let mut layers: Vec<(Layer, ProfileSource)> =
            self.corporate_profiles.iter().map(|p| (Layer::Corporate, ProfileSource::File(p.clone()))).collect();
        let name = annotation.map(str::trim).unwrap_or(DEFAULT_PROFILE);
        layers.push((Layer::User, self.named_profile(name)?));
        Engine::load_layers(&layers).map_err(|e| {
            Error::InvalidArgument(format!(
                "the policy for annotation {PROFILE_ANNOTATION}={name:?} does not load: {e}"
            ))
        })?;
        Ok(layers)
    }

    /// A built-in profile, or `<profile_dir>/<name>.toml`; an error naming
    /// the profiles there are.
    fn named_profile(&self, name: &str) -> Result<ProfileSource, Error> {
        if sandbox::policy::builtin_profile(name).is_some() {
            return Ok(ProfileSource::Builtin(name.to_string()));
        }
        // A name, never a path: a pod must not make the shim read a file
        // outside the profile directory.
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if let (true, Some(dir)) = (plain, &self.profile_dir) {
            let file = dir.join(format!("{name}.toml"));
            if file.is_file() {
                return Ok(ProfileSource::File(file));
            }
        }
        Err(Error::InvalidArgument(format!(
            "annotation {PROFILE_ANNOTATION}={name:?} names no policy profile; use one of: {}",
            self.known_profiles().join(", ")
        )))
    }

    /// The built-in profiles' names, then the profile directory's.
    fn known_profiles(&self) -> Vec<String> {
        let mut names: Vec<String> = sandbox::policy::BUILTIN_PROFILES.iter().map(|(n, _)| n.to_string()).collect();
        let mut files: Vec<String> = self
            .profile_dir
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
            .collect();
        files.sort();
        names.extend(files);
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPORATE: &str = r#"
[security]
locks = ["dns"]
"#;
    const ALLOWS_DNS: &str = r#"
[security.rules.dns.any]
on = "dns.request"
decision = "allow"
"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_missing_annotation_is_deny_all_and_a_builtin_name_is_that_profile() {
        let config = ShimConfig::default();
        assert_eq!(config.profiles(None).unwrap(), [(Layer::User, ProfileSource::Builtin("deny-all".into()))]);
        assert_eq!(config.profiles(Some(" dev ")).unwrap(), [(Layer::User, ProfileSource::Builtin("dev".into()))]);
    }

    #[test]
    fn a_name_is_a_file_of_the_profile_directory_never_a_path() {
        let profiles = dir_with(&[("ci.toml", ALLOWS_DNS)]);
        let config = ShimConfig { profile_dir: Some(profiles.path().into()), ..Default::default() };
        assert_eq!(
            config.profiles(Some("ci")).unwrap(),
            [(Layer::User, ProfileSource::File(profiles.path().join("ci.toml")))]
        );
        for bad in ["nope", "../ci", "/etc/passwd", "ci/../ci", ".ci", ""] {
            let err = config.profiles(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("names no policy profile") && err.contains("deny-all, dev, ci"), "{bad}: {err}");
        }
        // Without a profile directory, only built-in names.
        let err = ShimConfig::default().profiles(Some("ci")).unwrap_err().to_string();
        assert!(err.contains("use one of: deny-all, dev"), "{err}");
    }

    #[test]
    fn corporate_locks_bind_the_pods_profile() {
        let profiles = dir_with(&[("ci.toml", ALLOWS_DNS), ("corp.toml", CORPORATE)]);
        let config = ShimConfig {
            profile_dir: Some(profiles.path().into()),
            corporate_profiles: vec![profiles.path().join("corp.toml")],
        };
        let layers = config.profiles(None).unwrap();
        assert_eq!(layers[0], (Layer::Corporate, ProfileSource::File(profiles.path().join("corp.toml"))));
        let err = config.profiles(Some("ci")).unwrap_err().to_string();
        assert!(err.contains("locked") && err.contains("ci.toml"), "{err}");
    }

    #[test]
    fn the_file_is_read_and_checked() {
        let dir = dir_with(&[
            ("good.toml", "profile_dir = \"/p\"\ncorporate_profiles = [\"/c.toml\"]\n"),
            ("typo.toml", "profiles_dir = \"/p\"\n"),
        ]);
        let config = ShimConfig::load_from(&dir.path().join("good.toml")).unwrap();
        assert_eq!(config.profile_dir.as_deref(), Some(Path::new("/p")));
        assert_eq!(config.corporate_profiles, [PathBuf::from("/c.toml")]);
        let err = ShimConfig::load_from(&dir.path().join("typo.toml")).unwrap_err().to_string();
        assert!(err.contains("profiles_dir"), "{err}");
        let err = ShimConfig::load_from(&dir.path().join("absent.toml")).unwrap_err().to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }
}
