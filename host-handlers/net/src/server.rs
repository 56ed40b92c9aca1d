//! The Unix-socket accept loop shared by the handlers: one task per connection,
//! a cap on concurrent connections, refusal while telemetry is unhealthy (fail
//! closed), survival of accept errors and of panicking connection tasks, and a
//! clean shutdown that removes the socket file.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};

/// What a handler does with connections.
pub(crate) trait ConnectionHandler: Send + Sync + 'static {
    /// Serve one guest connection to the end. Must record what happened.
    fn serve(self: Arc<Self>, stream: UnixStream) -> impl Future<Output = ()> + Send;
    /// Whether new connections may be served (telemetry healthy, or configured to keep serving).
    fn accepting(&self) -> bool;
    /// Record a connection that was closed without being served.
    fn refused(&self, reason: &str);
    /// The server stopped and its connections ended: record what is pending.
    fn stopped(&self) {}
}

/// A running handler. Dropping it also stops it (without waiting or removing
/// the socket file); [`Server::shutdown`] is the clean way.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    pub(crate) fn bind<H: ConnectionHandler>(path: &Path, max_connections: usize, handler: Arc<H>) -> Result<Server> {
        let listener = bind_unix(path)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, max_connections, handler, stopped));
        Ok(Server { path: path.to_owned(), stop, task })
    }

    /// The socket path served.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, end every open connection (each still records its row)
    /// and remove the socket file.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::error!(%err, "handler task failed");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `path`, replacing a stale socket file nobody listens on.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    let listen_error = |source| Error::Listen { path: path.to_owned(), source };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(listen_error(err));
            }
            std::fs::remove_file(path).map_err(listen_error)?;
            UnixListener::bind(path).map_err(listen_error)
        }
        Err(err) => Err(listen_error(err)),
    }
}

async fn accept_loop<H: ConnectionHandler>(
    listener: UnixListener,
    max_connections: usize,
    handler: Arc<H>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = done {
                    if err.is_panic() {
                        tracing::error!(%err, "connection task panicked");
                    }
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !handler.accepting() {
            handler.refused("telemetry is not recording; refusing connections (fail closed)");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            handler.refused("too many concurrent connections");
            continue;
        };
        let handler = handler.clone();
        connections.spawn(async move {
            handler.serve(stream).await;
            drop(slot);
        });
    }
    connections.shutdown().await;
    handler.stopped();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    #[derive(Default)]
    struct Counting {
        served: AtomicUsize,
        refused: AtomicUsize,
        accepting: std::sync::atomic::AtomicBool,
    }

    impl ConnectionHandler for Counting {
        async fn serve(self: Arc<Self>, stream: UnixStream) {
            self.served.fetch_add(1, Ordering::SeqCst);
            if self.served.load(Ordering::SeqCst) == 1 {
                panic!("the first connection's task panics");
            }
            drop(stream);
        }
        fn accepting(&self) -> bool {
            self.accepting.load(Ordering::SeqCst)
        }
        fn refused(&self, _reason: &str) {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn closed(path: &Path) -> bool {
        let mut stream = UnixStream::connect(path).await.unwrap();
        let mut buf = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn serves_survives_panics_refuses_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = guest_protocol::sandbox_dir::SandboxDir::new(dir.path()).vsock_port_socket(crate::MITM_PORT);
        // A stale socket file from an earlier run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let handler = Arc::new(Counting::default());
        handler.accepting.store(true, Ordering::SeqCst);
        let server = Server::bind(&path, 4, handler.clone()).unwrap();
        assert!(closed(&path).await);
        assert!(closed(&path).await);
        assert_eq!(handler.served.load(Ordering::SeqCst), 2, "the panic did not stop the server");
        // A live socket is not stolen (the probe is one more connection).
        assert!(matches!(Server::bind(&path, 4, handler.clone()), Err(Error::Listen { .. })));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(handler.served.load(Ordering::SeqCst), 3);

        handler.accepting.store(false, Ordering::SeqCst);
        assert!(closed(&path).await);
        assert_eq!(handler.refused.load(Ordering::SeqCst), 1);
        assert_eq!(handler.served.load(Ordering::SeqCst), 3);

        server.shutdown().await;
        assert!(!path.exists());
    }
}
