//! `sandbox cp`: copy one file into or out of a running sandbox.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sandbox::Sandbox;

use crate::exit::Outcome;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `<id>:<guest path>` or a local file.
    src: String,
    /// `<id>:<guest path>` or a local file.
    dst: String,
}

/// `<id>:<path>` (a guest path must be absolute, so `./a:b` stays local).
fn guest_path(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (sandbox::valid_id(id) && path.starts_with('/')).then_some((id, path))
}

/// Copy one file into or out of a running sandbox.
pub fn cp(args: CpArgs) -> Outcome {
    match (guest_path(&args.src), guest_path(&args.dst)) {
        (Some((id, src)), None) => {
            let sandbox = Sandbox::find(id)?;
            let mut dst = PathBuf::from(&args.dst);
            if dst.is_dir() {
                let name = src.rsplit('/').next().filter(|n| !n.is_empty()).context("the guest path names no file")?;
                dst.push(name);
            }
            let n = sandbox.copy_out(src, &dst)?;
            tracing::info!(bytes = n, "copied {}:{src} to {}", sandbox.id(), dst.display());
        }
        (None, Some((id, dst))) => {
            let sandbox = Sandbox::find(id)?;
            let n = sandbox.copy_in(std::path::Path::new(&args.src), dst)?;
            tracing::info!(bytes = n, "copied {} to {}:{dst}", args.src, sandbox.id());
        }
        (Some(_), Some(_)) => {
            return Err(
                anyhow::anyhow!("copying between two sandboxes is not supported; copy through a local file").into()
            )
        }
        (None, None) => {
            return Err(anyhow::anyhow!(
                "one side must be <sandbox id>:<absolute guest path>, e.g. sandbox cp ./a.txt 3f2a9c:/tmp/a.txt"
            )
            .into())
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_need_an_id_and_an_absolute_path() {
        assert_eq!(guest_path("3f2a:/tmp/x"), Some(("3f2a", "/tmp/x")));
        assert_eq!(guest_path("./a:b"), None);
        assert_eq!(guest_path("3f2a:tmp/x"), None);
        assert_eq!(guest_path("/tmp/x"), None);
        assert_eq!(guest_path("c:/x"), Some(("c", "/x")));
    }
}
