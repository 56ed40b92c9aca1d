//! Where `${secret:NAME}` placeholders in header values get their values.
//!
//! Secrets are filled in once, at load, so that the guest never sees them
//! (the host adds the header on the way out) and the engine never looks them
//! up per request. Values come from secrets files (a TOML table of strings,
//! `NAME = "value"`) and, unless disabled, the host's environment; files
//! take precedence, in the order added. A secret's value never appears in
//! `Debug` output, errors or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::location::SourceText;
use crate::ProfileError;

/// The secret values available to profiles.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, String>,
    files: Vec<PathBuf>,
    /// Whether [`Secrets::with_value`] added any.
    given: bool,
    environment: bool,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .field("files", &self.files)
            .field("given", &self.given)
            .field("environment", &self.environment)
            .finish()
    }
}

impl Secrets {
    /// Secrets from the host's environment (`${secret:TOKEN}` reads `$TOKEN`).
    pub fn from_env() -> Secrets {
        Secrets { environment: true, ..Secrets::default() }
    }

    /// No secrets at all: every placeholder is an error.
    pub fn none() -> Secrets {
        Secrets::default()
    }

    /// Adds the secrets of a file: a TOML table of strings, `NAME = "value"`.
    /// Values already known (from files added earlier) are kept.
    pub fn with_file(mut self, path: &Path) -> Result<Secrets, ProfileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProfileError::Io { file: path.to_owned(), source })?;
        let source = SourceText { name: Arc::from(path), text };
        let table: BTreeMap<toml::Spanned<String>, toml::Value> = toml::from_str(&source.text).map_err(|error| {
            source
                .error(error.span().map_or(0, |span| span.start), format!("invalid secrets file: {}", error.message()))
        })?;
        for (name, value) in table {
            let toml::Value::String(value) = value else {
                return Err(source.error(name.span().start, format!("secret `{}` must be a string", name.get_ref())));
            };
            self.values.entry(name.into_inner()).or_insert(value);
        }
        self.files.push(path.to_owned());
        Ok(self)
    }

    /// Adds one secret (for embedders and tests).
    pub fn with_value(mut self, name: impl Into<String>, value: impl Into<String>) -> Secrets {
        self.values.entry(name.into()).or_insert_with(|| value.into());
        self.given = true;
        self
    }

    /// The value of a secret.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        if let Some(value) = self.values.get(name) {
            return Some(value.clone());
        }
        if self.environment {
            return std::env::var(name).ok();
        }
        None
    }

    /// Where [`Secrets::get`] looks, for error messages.
    pub(crate) fn places(&self) -> String {
        let mut places: Vec<String> = self.files.iter().map(|file| file.display().to_string()).collect();
        if self.given {
            places.insert(0, "the secrets given to the engine".to_owned());
        }
        if self.environment {
            places.push("the environment".to_owned());
        }
        if places.is_empty() {
            "no secrets are configured".to_owned()
        } else {
            format!("looked in {}", places.join(" and "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_before_the_environment_and_debug_hides_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "API_TOKEN = \"t0ps3cret\"\nPATH = \"from-file\"\n").unwrap();
        let secrets = Secrets::from_env().with_file(&path).unwrap();
        assert_eq!(secrets.get("API_TOKEN").as_deref(), Some("t0ps3cret"));
        assert_eq!(secrets.get("PATH").as_deref(), Some("from-file"));
        assert_eq!(secrets.get("HOME"), std::env::var("HOME").ok());
        assert!(!format!("{secrets:?}").contains("t0ps3cret"));
        assert!(secrets.places().contains("secrets.toml and the environment"));
        assert_eq!(Secrets::none().get("HOME"), None);
    }

    #[test]
    fn bad_secrets_files_are_errors_with_places() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "A = \"x\"\nB = 5\n").unwrap();
        let error = Secrets::none().with_file(&path).unwrap_err().to_string();
        assert!(error.ends_with("secrets.toml:2:1: secret `B` must be a string"), "{error}");
        std::fs::write(&path, "A = \"x\nB").unwrap();
        let error = Secrets::none().with_file(&path).unwrap_err().to_string();
        assert!(error.contains("secrets.toml:1:") && error.contains("invalid secrets file"), "{error}");
    }
}
