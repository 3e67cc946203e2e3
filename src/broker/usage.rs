//! Usage counts: operations per client, key and day, kept in memory and added to Postgres in one
//! statement per flush (the background worker flushes every tick, and readers flush first), so
//! counting costs no query per request. A crash loses at most one tick of counts.

use std::collections::HashMap;
use std::sync::Mutex;

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
            Self::KeyCreate => "key.create",
            Self::KeyRead => "key.read",
            Self::KeyRotate => "key.rotate",
            Self::SecretWrite => "secret.write",
            Self::SecretRead => "secret.read",
        }
    }
}

type Counts = HashMap<(Uuid, Uuid, Operation, i64), i64>;

/// Counts not yet in Postgres.
#[derive(Default)]
pub(super) struct UsageCounter(Mutex<Counts>);

impl UsageCounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one operation (`key` nil for stateless calls) on the day of `now`.
    pub(super) fn record(&self, client: Uuid, key: Uuid, op: Operation, now: i64) {
        self.add(client, key, op, now, 1);
    }

    /// Counts `n` operations.
    pub(super) fn add(&self, client: Uuid, key: Uuid, op: Operation, now: i64, n: i64) {
        *self
            .lock()
            .entry((client, key, op, now - now.rem_euclid(DAY)))
            .or_default() += n;
    }

    fn take(&self) -> Vec<UsageRow> {
        std::mem::take(&mut *self.lock())
            .into_iter()
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
        let mut counts = self.lock();
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

const ALL_OPERATIONS: [Operation; 9] = [
    Operation::Datakey,
    Operation::Wrap,
    Operation::Unwrap,
    Operation::Rewrap,
    Operation::KeyCreate,
    Operation::KeyRead,
    Operation::KeyRotate,
    Operation::SecretWrite,
    Operation::SecretRead,
];

impl Broker {
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
