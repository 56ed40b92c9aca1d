//! A pool of ready sandboxes, for a platform that hands one out per task
//! and cannot wait for it to start.
//!
//! A [`Pool`] keeps a number of sandboxes running, each started the same
//! way (typically restored from one snapshot in a holder of its own, see
//! [`Pool::from_snapshot`]). [`Pool::take`] hands one out at once when one
//! is ready, and a thread of the pool starts another in its place. A
//! sandbox handed out is the caller's: it runs until the caller stops it.
//! Dropping the pool stops the ones still in it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Sandbox, SandboxBuilder, Snapshot};

/// How long the pool waits before trying again after a sandbox failed to start.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a sandbox left in the pool may take to stop when it is dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts one sandbox of the pool.
type Make = Box<dyn Fn() -> Result<Sandbox, Error> + Send + Sync>;

struct State {
    ready: VecDeque<Sandbox>,
    /// Why the last start failed, until a start succeeds or a caller is told.
    failed: Option<Error>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    size: usize,
    make: Make,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sandboxes started ahead of need (see the module documentation).
pub struct Pool {
    shared: Arc<Shared>,
    filler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("size", &self.shared.size).field("ready", &self.ready()).finish()
    }
}

impl Pool {
    /// Keep `size` sandboxes made by `make` ready. `make` returns a running
    /// sandbox held by another process (for example
    /// [`SandboxBuilder::spawn`]); it is called from the pool's thread, one
    /// sandbox at a time.
    pub fn new(size: usize, make: impl Fn() -> Result<Sandbox, Error> + Send + Sync + 'static) -> Pool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { ready: VecDeque::new(), failed: None, closing: false }),
            changed: Condvar::new(),
            size: size.max(1),
            make: Box::new(make),
        });
        let filler = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("sandbox-pool".into()).spawn(move || fill(&shared)).ok()
        };
        Pool { shared, filler }
    }

    /// Keep `size` sandboxes restored from `snapshot` ready, each in a
    /// confined holder, configured by `configure` (profiles, network, data
    /// directory, jail...) before [`SandboxBuilder::spawn`].
    pub fn from_snapshot(
        snapshot: Snapshot,
        size: usize,
        configure: impl Fn(SandboxBuilder) -> SandboxBuilder + Send + Sync + 'static,
    ) -> Pool {
        Pool::new(size, move || configure(Sandbox::from_snapshot(snapshot.clone())).spawn())
    }

    /// How many sandboxes are ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// A running sandbox: one that is ready, else the next one started
    /// (waiting at most `timeout`). When starting one failed and none is
    /// ready, that error.
    pub fn take(&self, timeout: Duration) -> Result<Sandbox, Error> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            while let Some(sandbox) = state.ready.pop_front() {
                self.shared.changed.notify_all();
                // One whose holder has gone (it crashed, or its guest powered off) is dropped.
                if sandbox.is_running() {
                    return Ok(sandbox);
                }
                tracing::warn!(id = %sandbox.id(), "a pooled sandbox stopped before it was taken");
            }
            if let Some(e) = state.failed.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Config(format!("no pooled sandbox was ready within {timeout:?}")));
            }
            state = self.shared.changed.wait_timeout(state, left).map(|(s, _)| s).unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// The pool's thread: start sandboxes until `size` are ready, then wait
/// until one is taken or the pool closes.
fn fill(shared: &Shared) {
    loop {
        {
            let mut state = shared.lock();
            while !state.closing && state.ready.len() >= shared.size {
                state = shared.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if state.closing {
                return;
            }
        }
        let made = (shared.make)();
        let mut state = shared.lock();
        match made {
            Ok(sandbox) if state.closing => {
                drop(state);
                let _ = sandbox.stop(STOP_TIMEOUT);
                return;
            }
            Ok(sandbox) => {
                state.ready.push_back(sandbox);
                state.failed = None;
                shared.changed.notify_all();
            }
            Err(e) => {
                tracing::warn!("starting a pooled sandbox: {e}");
                state.failed = Some(e);
                shared.changed.notify_all();
                let _ = shared.changed.wait_timeout(state, RETRY_AFTER);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(filler) = self.filler.take() {
            let _ = filler.join();
        }
        let left: Vec<Sandbox> = self.shared.lock().ready.drain(..).collect();
        for sandbox in left {
            if let Err(e) = sandbox.stop(STOP_TIMEOUT) {
                tracing::warn!(id = %sandbox.id(), "stopping a pooled sandbox: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_pool_that_cannot_start_sandboxes_says_why_and_closes() {
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&tries);
        let pool = Pool::new(2, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(Error::Config("no kernel".into()))
        });
        let err = pool.take(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.contains("no kernel"), "{err}");
        assert_eq!(pool.ready(), 0);
        // It keeps trying, a second apart, until it is dropped.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(tries.load(Ordering::SeqCst) >= 2);
        let started = Instant::now();
        drop(pool);
        assert!(started.elapsed() < Duration::from_secs(2), "dropping waited for the retry");
    }

    #[test]
    fn taking_from_an_empty_pool_times_out() {
        let pool = Pool::new(1, || {
            std::thread::sleep(Duration::from_millis(300));
            Err(Error::Config("slow".into()))
        });
        // The first failure comes after 300 ms; a shorter wait sees nothing.
        let err = pool.take(Duration::from_millis(50)).unwrap_err().to_string();
        assert!(err.contains("no pooled sandbox was ready"), "{err}");
    }
}
