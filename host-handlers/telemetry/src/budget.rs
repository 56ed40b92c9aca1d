//! The size budget of `session.db`: a guest that makes many requests must not
//! fill the host's disk (which would take every sandbox on it down).
//!
//! The writer measures the database (pages in use, including the open
//! transaction) before each row. Three stages, never going back:
//!
//! 1. **Full rows** until the database reaches the budget minus a reserve for
//!    summaries (an eighth of the budget, at least [`MIN_SUMMARY_RESERVE`]).
//! 2. **Summaries**: each event only counts towards an `event_summaries` row
//!    keyed by its second, kind (`dns`, `net`), decision and host (query name
//!    or domain). At most [`MAX_HOSTS_PER_SECOND`] hosts a second get their
//!    own row; the others are counted under host `*`.
//! 3. **Totals**: from [`TOTALS_MARGIN`] below the budget, events are counted
//!    in one row per kind and decision (`second_ms` = 0, host `*`), updated in
//!    place, so the file stops growing.
//!
//! Entering stage 2 sets the flag behind [`crate::Recorder::over_budget`] and
//! logs a warning; entering stage 3 logs another.

use std::collections::{BTreeMap, HashMap, HashSet};

use rusqlite::{params, Transaction};

use crate::preview::truncate_str;

/// Smallest part of the budget kept for summary rows.
pub(crate) const MIN_SUMMARY_RESERVE: u64 = 512 * 1024;
/// Summaries stop this far below the budget; beyond it only totals change.
pub(crate) const TOTALS_MARGIN: u64 = 128 * 1024;
/// Hosts a second with a summary row of their own.
pub(crate) const MAX_HOSTS_PER_SECOND: usize = 32;
/// A transaction is committed once it has grown the database by this much, so
/// that the WAL (which holds a transaction's pages until a checkpoint) stays small.
pub(crate) const MAX_TRANSACTION_BYTES: u64 = 4 * 1024 * 1024;
/// The WAL is truncated to this size after checkpoints (`journal_size_limit`).
pub(crate) const WAL_SIZE_LIMIT: i64 = 8 * 1024 * 1024;
/// Longest host stored in a summary row.
const MAX_HOST: usize = 255;
/// Seconds of per-second host sets kept for the cap.
const HOST_SETS_KEPT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Full,
    Summaries,
    Totals,
}

/// What one event counts as in a summary.
pub(crate) struct Counted<'a> {
    pub(crate) time_ms: i64,
    pub(crate) kind: &'static str,
    pub(crate) decision: &'static str,
    pub(crate) host: &'a str,
}

type Key = (i64, &'static str, &'static str, String);

#[derive(Debug)]
pub(crate) struct Budget {
    page_size: u64,
    full_limit: u64,
    summary_limit: u64,
    stage: Stage,
    /// Hosts with their own row, per second.
    hosts: HashMap<i64, HashSet<String>>,
    /// Counts of the open transaction, written by [`Budget::write_counts`].
    pending: BTreeMap<Key, u64>,
}

impl Budget {
    pub(crate) fn new(max_bytes: u64, page_size: u64) -> Budget {
        let reserve = (max_bytes / 8).max(MIN_SUMMARY_RESERVE);
        Budget {
            page_size: page_size.max(512),
            full_limit: max_bytes.saturating_sub(reserve),
            summary_limit: max_bytes.saturating_sub(TOTALS_MARGIN),
            stage: Stage::Full,
            hosts: HashMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Bytes the database uses now, including the open transaction.
    ///
    /// Not cheap: SQLite runs a PRAGMA statement only once per preparation,
    /// so the cached statement is parsed and planned again at every call.
    /// The writer asks once per stored row.
    pub(crate) fn used(&self, tx: &Transaction<'_>) -> rusqlite::Result<u64> {
        let pages: i64 = tx.prepare_cached("PRAGMA page_count")?.query_row([], |row| row.get(0))?;
        Ok(u64::try_from(pages).unwrap_or(0) * self.page_size)
    }

    /// Whether a row of about `row_bytes` may still be stored in full in a
    /// database of `used` bytes ([`Budget::used`]); moves on to summaries
    /// when not. Returns the stage entered, if it changed.
    pub(crate) fn admit(&mut self, used: u64, row_bytes: u64) -> (bool, Option<Stage>) {
        if self.stage != Stage::Full {
            return (false, None);
        }
        if used.saturating_add(row_bytes) <= self.full_limit {
            return (true, None);
        }
        self.stage = Stage::Summaries;
        (false, Some(Stage::Summaries))
    }

    /// Count an event that is not stored in full.
    pub(crate) fn count(&mut self, event: &Counted<'_>) {
        let second = event.time_ms.div_euclid(1000) * 1000;
        let host = truncate_str(event.host, MAX_HOST);
        let seen = self.hosts.entry(second).or_default();
        let host = if seen.contains(host) {
            host.to_owned()
        } else if seen.len() < MAX_HOSTS_PER_SECOND {
            seen.insert(host.to_owned());
            host.to_owned()
        } else {
            "*".to_owned()
        };
        if self.hosts.len() > HOST_SETS_KEPT {
            if let Some(oldest) = self.hosts.keys().min().copied() {
                self.hosts.remove(&oldest);
            }
        }
        *self.pending.entry((second, event.kind, event.decision, host)).or_default() += 1;
    }

    /// Write the counts of this transaction: per second while below the
    /// summary limit, into the running totals beyond it. Returns the stage
    /// entered, if it changed.
    pub(crate) fn write_counts(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<Option<Stage>> {
        let mut entered = None;
        let pending = std::mem::take(&mut self.pending);
        for ((second, kind, decision, host), count) in pending {
            if self.stage == Stage::Summaries && self.used(tx)? >= self.summary_limit {
                self.stage = Stage::Totals;
                entered = Some(Stage::Totals);
            }
            let (second, host) = if self.stage == Stage::Totals { (0, "*".to_owned()) } else { (second, host) };
            tx.prepare_cached(
                "INSERT INTO event_summaries (second_ms, kind, decision, host, count) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (second_ms, kind, decision, host) DO UPDATE SET count = count + excluded.count",
            )?
            .execute(params![second, kind, decision, host, i64::try_from(count).unwrap_or(i64::MAX)])?;
        }
        Ok(entered)
    }

    /// Forget counts of a transaction that was not committed.
    pub(crate) fn discard_pending(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_full_rows_until_the_reserve_then_never_again() {
        let mut budget = Budget::new(8 * 1024 * 1024, 4096);
        let full_limit = 7 * 1024 * 1024;
        assert_eq!(budget.admit(0, 1000), (true, None));
        assert_eq!(budget.admit(full_limit - 1000, 1000), (true, None));
        assert_eq!(budget.admit(full_limit - 999, 1000), (false, Some(Stage::Summaries)));
        // Summaries stay, even for a smaller database or row.
        assert_eq!(budget.admit(0, 1), (false, None));
    }
}
