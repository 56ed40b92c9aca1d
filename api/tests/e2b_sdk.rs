//! The official `e2b` Python SDK, pinned in `tests/e2b/requirements.txt`,
//! runs its flow against a real server booting real VMs (needs root,
//! /dev/kvm, ./setup.sh's kernel and image, and python3 with venv): the
//! pytest suite `tests/e2b/test_e2b_sdk.py`, sync and async clients. The
//! SDK is installed once into a virtual environment in the cache
//! (`$SANDBOX_CACHE/python/`), from PyPI.
// The helpers unwrap like the tests they serve.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Stops whatever sandboxes a failed run left in the data directory.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for sandbox in sandbox::Sandbox::list_in(&self.0).unwrap_or_default() {
            let _ = sandbox.stop(Duration::from_secs(30));
        }
    }
}

/// The virtual environment with the pinned requirements, made if missing
/// (in a temporary directory renamed into place, so a failed install is
/// never taken for a good one).
fn venv(requirements: &Path) -> PathBuf {
    let pins = std::fs::read_to_string(requirements).unwrap();
    let key = pins.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect::<Vec<_>>().join("-");
    let key: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    let cache = sandbox::paths::cache_dir().join("python");
    let venv = cache.join(key);
    if venv.join("bin/pytest").exists() {
        return venv;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let tmp = tempfile::Builder::new().prefix("tmp-venv-").tempdir_in(&cache).unwrap();
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let made = Command::new(python).args(["-m", "venv"]).arg(tmp.path()).status().unwrap();
    assert!(made.success(), "{python} -m venv failed (Debian: apt-get install python3-venv)");
    eprintln!("installing {} into {}", requirements.display(), venv.display());
    let pip = Command::new(tmp.path().join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(requirements)
        .status()
        .unwrap();
    assert!(pip.success(), "pip install -r {} failed", requirements.display());
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another run made it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_e2b_sdk_runs_unchanged() {
    if !common::vm_available() {
        return;
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b");
    let venv = tokio::task::spawn_blocking({
        let requirements = here.join("requirements.txt");
        move || venv(&requirements)
    })
    .await
    .unwrap();

    let data = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup(data.path().to_path_buf());
    let key = "e2b-sdk-test-key";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = api::Config::new(data.path())
        .holder(common::holder(), std::iter::empty::<String>())
        .api_key(Some(api::ApiKey::new(key.as_bytes())))
        .e2b_domain(Some(format!("localhost:{}", addr.port())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(async move { api::serve_tcp(listener, api::router(config), async { drop(stopped.await) }).await });

    let url = format!("http://{addr}");
    let status = tokio::task::spawn_blocking(move || {
        // `python -m pytest`: the scripts of a moved virtual environment
        // name the old path, its python finds its packages wherever it is.
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pytest",
                "-v",
                "-x",
                "-o",
                "asyncio_default_fixture_loop_scope=function",
                "-p",
                "no:cacheprovider",
                "--asyncio-mode=strict",
            ])
            .arg(here.join("test_e2b_sdk.py"))
            .env("E2B_API_URL", &url)
            .env("E2B_SANDBOX_URL", &url)
            .env("E2B_API_KEY", key)
            .env_remove("E2B_DOMAIN")
            .env_remove("E2B_DEBUG")
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    drop(stop);
    server.await.unwrap().unwrap();
    assert!(status.success(), "the e2b SDK's suite failed: {status}");
}
