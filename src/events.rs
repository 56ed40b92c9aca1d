//! A sandbox's events, live: the rows of its `session.db` (DNS queries,
//! connections, model calls) as the host handlers record them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use telemetry::query::{LogOptions, LogReader, LogRow};

use crate::{Error, Sandbox};

/// How often [`Events`] looks for new rows.
const POLL: Duration = Duration::from_millis(100);

/// The rows of a sandbox's `session.db`, oldest first, then new ones as
/// they are committed. As an iterator it blocks until the next row, and ends
/// once the sandbox has stopped and every row was returned.
#[derive(Debug)]
pub struct Events {
    sandbox: Sandbox,
    reader: LogReader,
    pending: VecDeque<LogRow>,
}

impl Events {
    pub(crate) fn open(sandbox: Sandbox) -> Result<Events, Error> {
        let reader = LogReader::open(&sandbox.session_db(), &LogOptions::default())?;
        Ok(Events { sandbox, reader, pending: VecDeque::new() })
    }

    /// The next row, waiting at most `timeout` for one (`Ok(None)`: none
    /// came, or the sandbox stopped and every row was returned).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<LogRow>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(row) = self.pending.pop_front() {
                return Ok(Some(row));
            }
            // Whether it ran before reading: rows committed before it
            // stopped are all read on this round.
            let running = self.sandbox.is_running();
            let (rows, _more) = self.reader.read_new()?;
            self.pending.extend(rows);
            if !self.pending.is_empty() {
                continue;
            }
            let now = Instant::now();
            if !running || now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
}

impl Iterator for Events {
    type Item = Result<LogRow, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_timeout(Duration::from_secs(3600)) {
                Ok(Some(row)) => return Some(Ok(row)),
                Ok(None) if !self.sandbox.is_running() => return None,
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
