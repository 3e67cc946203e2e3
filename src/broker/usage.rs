//! Usage counts: operations per client, key and day, kept in memory and added to Postgres in one
//! statement per flush (the background worker flushes every tick, and readers flush first), so
//! counting costs no query per request. A crash loses at most one tick of counts. Also the
//! request log's rows, written in the batches the API's writer gathers.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use uuid::Uuid;

use super::{Broker, BrokerError};
use crate::store::UsageRow;

const DAY: i64 = 86_400;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `datakey` (per item).
    Datakey,
    /// `wrap` (per item).
    Wrap,
    /// `unwrap` (per item).
    Unwrap,
    /// `rewrap` (per item).
    Rewrap,
    /// `random` (per item).
    Random,
    /// Managed key created.
    KeyCreate,
    /// Managed key plaintext read.
    KeyRead,
    /// Managed key rotated.
    KeyRotate,
    /// Secret written.
    SecretWrite,
    /// Secret read.
    SecretRead,
}

impl Operation {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Datakey => "datakey",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::Rewrap => "rewrap",
            Self::Random => "random",
            Self::KeyCreate => "key.create",
            Self::KeyRead => "key.read",
            Self::KeyRotate => "key.rotate",
            Self::SecretWrite => "secret.write",
            Self::SecretRead => "secret.read",
        }
    }
}

type Counts = HashMap<(Uuid, Uuid, Operation, i64), i64>;

/// How many stripes the counts are spread over: more than the worker threads of any machine we
/// expect, so two threads rarely share one.
const STRIPES: usize = 32;

thread_local! {
    /// This thread's stripe, handed out round-robin on first use.
    static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

fn my_stripe() -> usize {
    STRIPE.with(|stripe| {
        stripe.get().unwrap_or_else(|| {
            let mine = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            stripe.set(Some(mine));
            mine
        })
    })
}

/// Counts not yet in Postgres, striped by thread: each worker thread adds to its own stripe, so
/// a hot client or key is never one lock every request waits on; a flush takes every stripe.
pub(super) struct UsageCounter([Mutex<Counts>; STRIPES]);

impl Default for UsageCounter {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Mutex::default()))
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl UsageCounter {
    /// Counts one operation (`key` nil for stateless calls) on the day of `now`.
    pub(super) fn record(&self, client: Uuid, key: Uuid, op: Operation, now: i64) {
        self.add(client, key, op, now, 1);
    }

    /// Counts `n` operations.
    pub(super) fn add(&self, client: Uuid, key: Uuid, op: Operation, now: i64, n: i64) {
        *lock(&self.0[my_stripe()])
            .entry((client, key, op, now - now.rem_euclid(DAY)))
            .or_default() += n;
    }

    fn take(&self) -> Vec<UsageRow> {
        let mut all = Counts::new();
        for stripe in &self.0 {
            // Swapped out under the stripe's lock, merged outside it.
            let counts = std::mem::take(&mut *lock(stripe));
            for (key, n) in counts {
                *all.entry(key).or_default() += n;
            }
        }
        all.into_iter()
            .map(|((client_id, key_id, op, day), count)| UsageRow {
                client_id,
                key_id,
                operation: op.as_str().to_owned(),
                day,
                count,
            })
            .collect()
    }

    fn give_back(&self, rows: Vec<UsageRow>) {
        let mut counts = lock(&self.0[my_stripe()]);
        for row in rows {
            let op = ALL_OPERATIONS
                .iter()
                .copied()
                .find(|o| o.as_str() == row.operation);
            if let Some(op) = op {
                *counts
                    .entry((row.client_id, row.key_id, op, row.day))
                    .or_default() += row.count;
            }
        }
    }
}

const ALL_OPERATIONS: [Operation; 10] = [
    Operation::Datakey,
    Operation::Wrap,
    Operation::Unwrap,
    Operation::Rewrap,
    Operation::Random,
    Operation::KeyCreate,
    Operation::KeyRead,
    Operation::KeyRotate,
    Operation::SecretWrite,
    Operation::SecretRead,
];

impl Broker {
    /// Writes rows of the request log (one insert for all of them).
    ///
    /// # Errors
    /// An outage: nothing was written.
    pub async fn write_request_log(
        &self,
        rows: &[crate::store::RequestLogRow],
    ) -> Result<(), BrokerError> {
        Ok(self.store.insert_request_log(rows).await?)
    }

    /// Counts `n` stateless operations for `client`.
    pub fn count(&self, client: Uuid, op: Operation, n: usize, now: i64) {
        self.usage.add(
            client,
            Uuid::nil(),
            op,
            now,
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }

    /// Writes the counts gathered so far to Postgres; on failure they are kept for the next try.
    ///
    /// # Errors
    /// An outage.
    pub async fn flush_usage(&self) -> Result<(), BrokerError> {
        let rows = self.usage.take();
        if let Err(e) = self.store.add_usage(&rows).await {
            self.usage.give_back(rows);
            return Err(e.into());
        }
        Ok(())
    }

    /// Operation counts since `days` days before `now`, for one client and/or one key (a nil key
    /// id stands for stateless calls).
    ///
    /// # Errors
    /// An outage.
    pub async fn usage(
        &self,
        client: Option<Uuid>,
        key: Option<Uuid>,
        days: u32,
        now: i64,
    ) -> Result<Vec<UsageRow>, BrokerError> {
        self.flush_usage().await?;
        Ok(self
            .store
            .usage(client, key, now - i64::from(days) * DAY)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up_exactly() {
        let counter = std::sync::Arc::new(UsageCounter::default());
        let clients: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let counter = counter.clone();
                let clients = clients.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000_i64 {
                        let client = clients[(i as usize + t) % clients.len()];
                        // Two days, so the day bucket is part of the key.
                        counter.record(client, Uuid::nil(), Operation::Datakey, i % 2 * DAY);
                        counter.add(client, Uuid::nil(), Operation::Unwrap, 0, 2);
                    }
                })
            })
            .collect();
        // A flush in the middle takes what is there; what comes later is in the next one.
        let mut rows = counter.take();
        for thread in threads {
            thread.join().unwrap();
        }
        rows.extend(counter.take());
        let total = |op: &str| -> i64 {
            rows.iter()
                .filter(|r| r.operation == op)
                .map(|r| r.count)
                .sum()
        };
        assert_eq!(total("datakey"), 8 * 5_000);
        assert_eq!(total("unwrap"), 8 * 5_000 * 2);
        let per_day: i64 = rows
            .iter()
            .filter(|r| r.operation == "datakey" && r.day == DAY)
            .map(|r| r.count)
            .sum();
        assert_eq!(per_day, 8 * 2_500);
        assert!(counter.take().is_empty());
    }

    #[test]
    fn counts_handed_back_are_flushed_again_once() {
        let counter = UsageCounter::default();
        let client = Uuid::new_v4();
        counter.add(client, Uuid::nil(), Operation::Wrap, 10, 3);
        let rows = counter.take();
        counter.give_back(rows);
        counter.add(client, Uuid::nil(), Operation::Wrap, 20, 4);
        let rows = counter.take();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].count, 7);
    }
}
