//! The key-custody snapshot that `/metrics` reads: per master-key version its state, seals,
//! stored blobs and presence on the token, and the rewrap job's progress. The broker keeps it
//! up to date in the background; reading it costs memory only, never a token session or a
//! query, so a scrape answers while the token (or Postgres) is unreachable.
//!
//! Two halves, each refreshed on its own and stamped with when it was read:
//! - the database half (recorded versions, seals, stored blobs, rewrap job): read by
//!   [`Broker::spawn_custody_refresher`]'s task every period, and within a second of a custody
//!   change this broker makes (rotation, rewrap progress, retirement, destruction);
//! - the token half (which master-key versions the token holds): read at start-up and by every
//!   maintenance pass, which talk to the token anyway, and updated in memory when this broker
//!   creates or destroys a version. The periodic task never touches the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Broker, BrokerError};
use crate::crypto::MasterKeyVersion;
use crate::store::{MasterKeyStatus, RewrapJob};

/// The shortest pause between two database reads of the refresher: a rewrap moving thousands
/// of batches nudges it at every batch, and the counting query is not free.
const MIN_GAP: Duration = Duration::from_secs(1);
/// How long a token check may take before it is abandoned (the snapshot keeps the last one).
const TOKEN_CHECK_LIMIT: Duration = Duration::from_secs(10);

/// What Postgres recorded, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseHalf {
    /// Every recorded version with its state, seals and stored blobs, ascending.
    pub versions: Vec<MasterKeyStatus>,
    /// The running rewrap job, else the latest.
    pub rewrap: Option<RewrapJob>,
    /// When it was read (Unix seconds).
    pub read_at: i64,
}

/// Which master-key versions the token holds, as last checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHalf {
    /// Ascending.
    pub versions: Vec<MasterKeyVersion>,
    /// When the token was asked, or this broker last changed it (Unix seconds).
    pub checked_at: i64,
}

/// One version as the snapshot shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodyVersion {
    /// The version.
    pub version: MasterKeyVersion,
    /// What Postgres records; `None` for a version only on the token.
    pub recorded: Option<MasterKeyStatus>,
    /// Whether the token holds it; `None` before the first token check.
    pub on_token: Option<bool>,
}

/// The custody snapshot: each half as last read, `None` until first read.
#[derive(Debug, Clone, Default)]
pub struct CustodySnapshot {
    /// The database half.
    pub database: Option<Arc<DatabaseHalf>>,
    /// The token half.
    pub token: Option<Arc<TokenHalf>>,
}

impl CustodySnapshot {
    /// Every version recorded or on the token, ascending (the shape of the admin overview).
    pub fn versions(&self) -> Vec<CustodyVersion> {
        let recorded = self.database.as_ref().map_or(&[][..], |d| &d.versions);
        let on_token = self.token.as_ref().map(|t| &t.versions);
        let mut versions: Vec<MasterKeyVersion> = recorded
            .iter()
            .map(|r| r.version)
            .chain(on_token.into_iter().flatten().copied())
            .collect();
        versions.sort_unstable();
        versions.dedup();
        versions
            .into_iter()
            .map(|version| CustodyVersion {
                version,
                recorded: recorded.iter().find(|r| r.version == version).cloned(),
                on_token: on_token.map(|t| t.contains(&version)),
            })
            .collect()
    }
}

/// The snapshot and what keeps it fresh. Reads take a read lock for the time of two `Arc`
/// clones; nothing on the request path touches it.
#[derive(Debug, Default)]
pub(super) struct CustodyGauges {
    current: RwLock<CustodySnapshot>,
    /// Orders the reads of each half: a slow read finishing after a newer one is dropped.
    reads: AtomicU64,
    database_seq: AtomicU64,
    token_seq: AtomicU64,
    /// Wakes the refresher early after a custody change.
    changed: Notify,
}

impl CustodyGauges {
    fn snapshot(&self) -> CustodySnapshot {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn next_read(&self) -> u64 {
        self.reads.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn publish_database(&self, seq: u64, half: DatabaseHalf) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if self.database_seq.load(Ordering::Relaxed) < seq {
            self.database_seq.store(seq, Ordering::Relaxed);
            current.database = Some(Arc::new(half));
        }
    }

    fn publish_token(&self, seq: u64, half: TokenHalf) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if self.token_seq.load(Ordering::Relaxed) < seq {
            self.token_seq.store(seq, Ordering::Relaxed);
            current.token = Some(Arc::new(half));
        }
    }

    /// Records a change this broker made on the token, without asking the token.
    fn token_holds(&self, version: MasterKeyVersion, held: bool) {
        let seq = self.next_read();
        let Some(mut half) = self.snapshot().token.map(|t| (*t).clone()) else {
            // Never checked: the next check says it all.
            return;
        };
        half.versions.retain(|v| *v != version);
        if held {
            half.versions.push(version);
            half.versions.sort_unstable();
        }
        half.checked_at = crate::auth::unix_now();
        self.publish_token(seq, half);
    }
}

impl Broker {
    /// The custody snapshot as last refreshed. Memory only: no token session, no query.
    pub fn custody_snapshot(&self) -> CustodySnapshot {
        self.custody.snapshot()
    }

    /// Reads the database half of the snapshot now (two queries, no token call).
    ///
    /// # Errors
    /// A database failure; the snapshot keeps its previous database half.
    pub async fn refresh_custody_database(&self) -> Result<(), BrokerError> {
        let seq = self.custody.next_read();
        let versions = self.store.master_key_overview().await?;
        let rewrap = self.store.rewrap_job().await?;
        self.custody.publish_database(
            seq,
            DatabaseHalf {
                versions,
                rewrap,
                read_at: crate::auth::unix_now(),
            },
        );
        Ok(())
    }

    /// Asks the token which master-key versions it holds (one search on an officer session),
    /// giving up after 10 s. Start-up and the maintenance pass call it; a scrape never does.
    ///
    /// # Errors
    /// A token failure or the time limit; the snapshot keeps its previous token half.
    pub async fn refresh_custody_token(&self) -> Result<(), BrokerError> {
        let seq = self.custody.next_read();
        let versions = tokio::time::timeout(TOKEN_CHECK_LIMIT, self.hsm.master_key_versions())
            .await
            .map_err(|_| {
                BrokerError::HsmUnavailable(crate::hsm::HsmError::Timeout(TOKEN_CHECK_LIMIT))
            })??;
        self.custody.publish_token(
            seq,
            TokenHalf {
                versions,
                checked_at: crate::auth::unix_now(),
            },
        );
        Ok(())
    }

    /// Refreshes both halves (the token's first, so a token outage does not hold the database
    /// half back: each is refreshed on its own and failures are logged, not returned).
    pub async fn refresh_custody_snapshot(&self) {
        if let Err(e) = self.refresh_custody_token().await {
            tracing::warn!(target: "keybroker::broker", error = ?e, "custody gauges: token not checked; keeping the last check");
        }
        if let Err(e) = self.refresh_custody_database().await {
            tracing::warn!(target: "keybroker::broker", error = ?e, "custody gauges: database not read; keeping the last read");
        }
    }

    /// Starts the task that re-reads the database half every `every` (at least a second), and
    /// within a second of a custody change this broker makes. It never calls the token, and it
    /// ends when the broker is dropped.
    pub fn spawn_custody_refresher(self: &Arc<Self>, every: Duration) -> JoinHandle<()> {
        let broker = Arc::downgrade(self);
        let every = every.max(MIN_GAP);
        tokio::spawn(async move {
            loop {
                let Some(this) = broker.upgrade() else {
                    return;
                };
                if let Err(e) = this.refresh_custody_database().await {
                    tracing::warn!(target: "keybroker::broker", error = ?e, "custody gauges: database not read; keeping the last read");
                }
                let custody = this.custody.clone();
                // Not holding the broker while asleep, so dropping it ends the task.
                drop(this);
                tokio::time::sleep(MIN_GAP).await;
                tokio::select! {
                    () = tokio::time::sleep(every - MIN_GAP) => {}
                    () = custody.changed.notified() => {}
                }
            }
        })
    }

    /// A custody change this broker made: the refresher re-reads the database half soon.
    pub(super) fn custody_changed(&self) {
        self.custody.changed.notify_one();
    }

    /// A version this broker created on (`true`) or removed from (`false`) the token.
    pub(super) fn custody_token_changed(&self, version: MasterKeyVersion, held: bool) {
        self.custody.token_holds(version, held);
        self.custody_changed();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::MasterKeyState;

    fn status(version: u32, state: MasterKeyState) -> MasterKeyStatus {
        MasterKeyStatus {
            version: MasterKeyVersion::new(version).unwrap(),
            state,
            seals: 1,
            stored_blobs: 2,
            created_at: String::new(),
            activated_at: None,
            retired_at: None,
            destroyed_at: None,
        }
    }

    fn v(n: u32) -> MasterKeyVersion {
        MasterKeyVersion::new(n).unwrap()
    }

    #[test]
    fn versions_join_both_halves_and_say_when_the_token_was_never_checked() {
        let gauges = CustodyGauges::default();
        assert!(gauges.snapshot().versions().is_empty());
        let seq = gauges.next_read();
        gauges.publish_database(
            seq,
            DatabaseHalf {
                versions: vec![
                    status(1, MasterKeyState::DecryptOnly),
                    status(2, MasterKeyState::Active),
                ],
                rewrap: None,
                read_at: 1,
            },
        );
        let unknown = gauges.snapshot().versions();
        assert_eq!(unknown.len(), 2);
        assert!(unknown.iter().all(|c| c.on_token.is_none()));
        // A token change before any check is left to the first check.
        gauges.token_holds(v(3), true);
        assert!(gauges.snapshot().token.is_none());

        let seq = gauges.next_read();
        gauges.publish_token(
            seq,
            TokenHalf {
                versions: vec![v(2), v(3)],
                checked_at: 1,
            },
        );
        let joined = gauges.snapshot().versions();
        let seen: Vec<(u32, Option<&str>, Option<bool>)> = joined
            .iter()
            .map(|c| {
                (
                    c.version.get(),
                    c.recorded.as_ref().map(|r| r.state.as_str()),
                    c.on_token,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, Some("decrypt_only"), Some(false)),
                (2, Some("active"), Some(true)),
                (3, None, Some(true)),
            ]
        );
        gauges.token_holds(v(2), false);
        let token = gauges.snapshot().token.unwrap();
        assert_eq!(token.versions, [v(3)]);
    }

    #[test]
    fn a_read_that_finishes_late_does_not_replace_a_newer_one() {
        let gauges = CustodyGauges::default();
        let (older, newer) = (gauges.next_read(), gauges.next_read());
        let half = |read_at| DatabaseHalf {
            versions: Vec::new(),
            rewrap: None,
            read_at,
        };
        gauges.publish_database(newer, half(20));
        gauges.publish_database(older, half(10));
        assert_eq!(gauges.snapshot().database.unwrap().read_at, 20);
    }
}
