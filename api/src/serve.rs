//! Listening: on a Unix socket (mode 0600) or a TCP address.

use std::path::Path;

use axum::Router;
use tokio::net::{TcpListener, UnixListener};

use crate::error::Error;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// A Unix socket at `path`, mode 0600 from the start: it is bound in a new
/// private directory beside `path` and renamed into place, so no other user
/// can connect in between. A stale socket (nothing answers on it) is
/// replaced; a live one is an error.
pub fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |what: &str, e| Error::Io(format!("{what} {}", path.display()), e);
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io("refusing to replace", std::io::Error::other("it exists and is not a socket")));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io("listen on", std::io::Error::from(std::io::ErrorKind::AddrInUse)));
        }
        std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
    }
    let private = tempfile::Builder::new().prefix(".api-sock-").tempdir_in(parent).map_err(|e| io("bind", e))?;
    let tmp = private.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("chmod", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("bind", e))?;
    listener.set_nonblocking(true).map_err(|e| io("listen on", e))?;
    UnixListener::from_std(listener).map_err(|e| io("listen on", e))
}

/// Serve `app` on the Unix socket `path` until `shutdown` resolves; the
/// socket is removed then.
pub async fn serve_unix(
    path: &Path,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = bind_unix(path)?;
    tracing::info!("listening on {}", path.display());
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    let _ = std::fs::remove_file(path);
    served.map_err(|e| Error::Io(format!("serve on {}", path.display()), e))
}

/// Serve `app` on `listener` until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(|e| Error::Io("listen".into(), e))?;
    tracing::info!("listening on {addr}");
    // The peer's address reaches the handlers (a sandbox port records who connected).
    axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Io(format!("serve on {addr}"), e))
}
