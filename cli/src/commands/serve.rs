//! `sandbox serve`: the HTTP API (crate `api`) on a Unix socket, or on a
//! TCP address with an API key. Sandboxes it starts are held by this
//! program, as `sandbox holder`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::exit::{Failure, Outcome};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on this TCP address (e.g. 127.0.0.1:8080) instead of the Unix
    /// socket; needs --api-key-file.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The Unix socket to listen on (default: <data dir>/api.sock); mode 0600.
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// A file holding the API key every request must present
    /// (`Authorization: Bearer <key>` or `X-API-Key: <key>`).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The domain E2B clients build a sandbox port's host name in,
    /// `<port>-<sandbox id>.<domain>` (default with --listen:
    /// `localhost:<its port>`, which curl and browsers resolve to loopback).
    #[arg(long, value_name = "DOMAIN", requires = "listen")]
    domain: Option<String>,
    /// Where sandboxes and snapshots live (default: $SANDBOX_DATA, else ~/.local/share/sandbox).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

pub fn serve(args: ServeArgs) -> Outcome {
    if let (Some(addr), None) = (args.listen, &args.api_key_file) {
        return Err(Failure::Usage(format!(
            "--listen {addr} needs --api-key-file (only the Unix socket may go without a key)"
        )));
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(sandbox::paths::data_dir);
    create_private_dir(&data_dir)?;
    let key = args.api_key_file.as_deref().map(api::ApiKey::read).transpose()?;
    let exe = std::env::current_exe().context("find the sandbox executable")?;
    let config = api::Config::new(&data_dir).holder(exe, ["holder"]).api_key(key);
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        match args.listen {
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
                let local = listener.local_addr()?;
                let domain = args.domain.clone().unwrap_or_else(|| format!("localhost:{}", local.port()));
                let app = api::router(config.e2b_domain(Some(domain)));
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        "listening on {addr}, beyond this host: anyone who has the key drives its sandboxes, \
                         and anyone who reaches it reaches the ports of the sandboxes E2B clients use"
                    );
                }
                eprintln!("sandbox: serving the API on http://{local}");
                api::serve_tcp(listener, app, api::shutdown_signal()).await?;
            }
            None => {
                let socket = args.socket.unwrap_or_else(|| data_dir.join("api.sock"));
                eprintln!("sandbox: serving the API on {}", socket.display());
                api::serve_unix(&socket, api::router(config), api::shutdown_signal()).await?;
            }
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The data directory, created mode 0700 if missing.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}
