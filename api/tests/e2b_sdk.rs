//! The official `e2b` Python SDK, pinned in `tests/e2b/requirements.txt`,
//! runs its flow against a real server booting real VMs (needs root,
//! /dev/kvm, ./setup.sh's kernel and image, and python3 with venv): the
//! pytest suite `tests/e2b/test_e2b_sdk.py`, sync and async clients. The
//! SDK is installed once into a virtual environment in the cache
//! (`$SANDBOX_CACHE/python/`), from PyPI, by `tests/e2b/venv.sh`.
// The helpers unwrap like the tests they serve.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtual environment with the pinned SDK (`tests/e2b/venv.sh`
/// makes it once).
pub fn venv(here: &Path) -> PathBuf {
    let out = Command::new(here.join("venv.sh")).stderr(std::process::Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "tests/e2b/venv.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_e2b_sdk_runs_unchanged() {
    if !common::vm_available() {
        return;
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b");
    let venv = tokio::task::spawn_blocking({
        let here = here.clone();
        move || venv(&here)
    })
    .await
    .unwrap();

    let data = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup(data.path().to_path_buf());
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
