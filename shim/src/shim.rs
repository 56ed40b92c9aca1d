//! The shim's lifecycle as containerd drives it: `start` (spawn the
//! long-lived shim daemon, print its socket), `delete` (clean up after a
//! shim that died) and the daemon's task service.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::{api, publisher::RemotePublisher, Config, ExitSignal, Flags, StartOpts};

use crate::service::{cleanup_bundle, now, Service};

/// The shim, as `containerd_shim::run` sees it.
pub struct Shim {
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shim").field("namespace", &self.namespace).field("bundle", &self.bundle).finish()
    }
}

/// The crate's settings: the library waits for the holder processes it
/// starts, so the shim must not reap children behind its back; holders
/// outlive a crashed shim, so it is no subreaper either.
pub fn config() -> Config {
    Config { no_reaper: true, no_sub_reaper: true, ..Default::default() }
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Shim { namespace: args.namespace.clone(), bundle, exit: Arc::new(ExitSignal::default()) }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<api::DeleteResponse, containerd_shim::Error> {
        cleanup_bundle(&self.bundle, &crate::data_dir());
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(now()).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service::new(publisher, self.namespace.clone(), self.exit.clone(), crate::data_dir())
    }
}
