//! Master-key versions in Postgres: adoption at start-up, seal reservations, the cluster locks,
//! the pending → active steps of a rotation, the overview with the stored blobs under each
//! version, retirement and destruction.

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Transaction};

use super::audit::{self, AuditMeta, NewAuditEvent};
use super::{MasterKeyState, Store, StoreError, from_version, to_i64, to_version};
use crate::crypto::MasterKeyVersion;

/// The advisory-lock key that serialises master-key changes across brokers ("kbmk").
const MASTER_KEY_LOCK: i64 = 0x6b62_6d6b;
/// The advisory-lock key that serialises signing-key rotations ("kbsk").
const SIGNING_KEY_LOCK: i64 = 0x6b62_736b;
/// How often [`Store::reserve_seals`] looks for the active version when rotations race it.
const RESERVE_ATTEMPTS: usize = 3;

/// A master-key row, as `hsm status` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRow {
    /// The version.
    pub version: MasterKeyVersion,
    /// Its state.
    pub state: MasterKeyState,
    /// Upper bound on the seals done under this version.
    pub seals_reserved: i64,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// When it became active, unix seconds.
    pub activated_at: Option<i64>,
}

/// Holds a cluster-wide lock (master keys, or signing keys): a Postgres session lock on a
/// connection of its own, which is closed (never returned to the pool) when this is dropped. A
/// broker that dies holding it loses its connection, and Postgres releases the lock.
pub struct ClusterLock {
    _conn: PoolConnection<Postgres>,
}

/// One master-key version, as `GET /v1/admin/master-keys` and `hsm status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyStatus {
    /// The version.
    pub version: MasterKeyVersion,
    /// Its state.
    pub state: MasterKeyState,
    /// Upper bound on the seals done under it.
    pub seals: i64,
    /// Stored blobs (key versions, secret data keys) still sealed under it.
    pub stored_blobs: i64,
    /// RFC 3339 times.
    pub created_at: String,
    /// When it became active.
    pub activated_at: Option<String>,
    /// When it was retired.
    pub retired_at: Option<String>,
    /// When it was removed from the token.
    pub destroyed_at: Option<String>,
}

/// Why a master-key state change was refused.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyChangeError {
    /// No such version is recorded.
    #[error("master key version {0} is not recorded")]
    NotFound(MasterKeyVersion),
    /// The version is in a state that does not allow the change (the state is given).
    #[error("master key version {0} is {1}")]
    WrongState(MasterKeyVersion, MasterKeyState),
    /// Stored blobs are still sealed under it (their number is given).
    #[error("{1} stored blobs are still sealed under master key version {0}")]
    InUse(MasterKeyVersion, i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for MasterKeyChangeError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err.into())
    }
}

impl Store {
    /// Every master-key version recorded, ascending.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError> {
        let rows: Vec<(i32, MasterKeyState, i64, String, Option<f64>)> = sqlx::query_as(
            "SELECT version, state, seals_reserved,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM activated_at)::float8
             FROM master_keys ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(version, state, seals_reserved, created_at, activated_at)| {
                    Ok(MasterKeyRow {
                        version: to_version(version)?,
                        state,
                        seals_reserved,
                        created_at,
                        activated_at: activated_at.map(|t| t as i64),
                    })
                },
            )
            .collect()
    }

    /// Records the master-key versions found on the token that this database does not know yet
    /// (a fresh database on an initialised token), and makes the highest one active when none is.
    /// Running it again changes nothing.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn adopt_master_keys(&self, versions: &[MasterKeyVersion]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Serialise with other brokers doing the same at start-up.
        sqlx::query("LOCK TABLE master_keys IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        for version in versions {
            sqlx::query(
                "INSERT INTO master_keys (version, token_label, state)
                 VALUES ($1, $2, 'decrypt_only') ON CONFLICT (version) DO NOTHING",
            )
            .bind(from_version(*version)?)
            .bind(version.token_label())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE master_keys SET state = 'active', activated_at = now()
             WHERE version = (SELECT max(version) FROM master_keys WHERE state = 'decrypt_only')
               AND NOT EXISTS (SELECT 1 FROM master_keys WHERE state = 'active')",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Hands back `unused` seals reserved under a version earlier, then reserves `want` seals
    /// under the active version, in one transaction. Returns the active version.
    ///
    /// # Errors
    /// [`StoreError::NoActiveMasterKey`], or any database failure.
    pub async fn reserve_seals(
        &self,
        unused: Option<(MasterKeyVersion, u64)>,
        want: u64,
    ) -> Result<MasterKeyVersion, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some((version, count)) = unused.filter(|(_, count)| *count > 0) {
            sqlx::query(
                "UPDATE master_keys SET seals_reserved = greatest(seals_reserved - $2, 0)
                 WHERE version = $1",
            )
            .bind(from_version(version)?)
            .bind(to_i64(count))
            .execute(&mut *tx)
            .await?;
        }
        // A rotation committing while this UPDATE waits on the old active row leaves it matching
        // nothing: the row it found is decrypt-only now, and the new active row was pending in
        // its snapshot. A fresh statement sees the rotation, so that case is tried again.
        let mut active = None;
        for _ in 0..RESERVE_ATTEMPTS {
            active = sqlx::query_as::<_, (i32,)>(
                "UPDATE master_keys SET seals_reserved = seals_reserved + $1
                 WHERE state = 'active' RETURNING version",
            )
            .bind(to_i64(want))
            .fetch_optional(&mut *tx)
            .await?;
            if active.is_some() {
                break;
            }
        }
        tx.commit().await?;
        let (version,) = active.ok_or(StoreError::NoActiveMasterKey)?;
        to_version(version)
    }

    /// Takes the cluster-wide master-key lock, waiting for another holder to finish.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn lock_master_keys(&self) -> Result<ClusterLock, StoreError> {
        self.advisory_lock(MASTER_KEY_LOCK).await
    }

    /// Takes the cluster-wide signing-key lock (as [`Store::lock_master_keys`]).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn lock_signing_keys(&self) -> Result<ClusterLock, StoreError> {
        self.advisory_lock(SIGNING_KEY_LOCK).await
    }

    async fn advisory_lock(&self, key: i64) -> Result<ClusterLock, StoreError> {
        let mut conn = self.pool.acquire().await?;
        conn.close_on_drop();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(ClusterLock { _conn: conn })
    }

    /// The lock if nobody holds it, else `None` (for background work that can wait a pass).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn try_lock_master_keys(&self) -> Result<Option<ClusterLock>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        conn.close_on_drop();
        let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(MASTER_KEY_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        Ok(locked.then_some(ClusterLock { _conn: conn }))
    }

    /// The version in `state` (there is at most one active and one pending).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn master_key_in_state(
        &self,
        state: MasterKeyState,
    ) -> Result<Option<MasterKeyVersion>, StoreError> {
        let row: Option<(i32,)> =
            sqlx::query_as("SELECT version FROM master_keys WHERE state = $1")
                .bind(state)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(v,)| to_version(v)).transpose()
    }

    /// Records `version` as the pending next master key (step 1 of a rotation; committed before
    /// the token is touched).
    ///
    /// # Errors
    /// Any database failure, e.g. another pending version.
    pub async fn record_pending_master_key(
        &self,
        version: MasterKeyVersion,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO master_keys (version, token_label, state) VALUES ($1, $2, 'pending')",
        )
        .bind(from_version(version)?)
        .bind(version.token_label())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes the pending `version` (now on the token) active and the previous active one
    /// decrypt-only, with its audit event. Returns false when `version` was not pending (another
    /// broker finished this rotation first).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn activate_pending_master_key(
        &self,
        version: MasterKeyVersion,
        meta: &AuditMeta,
    ) -> Result<bool, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let pending: Option<(i32,)> = sqlx::query_as(
            "SELECT version FROM master_keys WHERE version = $1 AND state = 'pending' FOR UPDATE",
        )
        .bind(from_version(version)?)
        .fetch_optional(&mut *tx)
        .await?;
        if pending.is_none() {
            return Ok(false);
        }
        let previous: Option<(i32,)> = sqlx::query_as(
            "UPDATE master_keys SET state = 'decrypt_only' WHERE state = 'active' RETURNING version",
        )
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE master_keys SET state = 'active', activated_at = now() WHERE version = $1",
        )
        .bind(from_version(version)?)
        .execute(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("master_key.rotated")
            .subject(version.token_label())
            .details(serde_json::json!({
                "mk_version": version.get(),
                "previous": previous.map(|(v,)| v),
            }));
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every recorded version with its seal count and the stored blobs under it, ascending.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn master_key_overview(&self) -> Result<Vec<MasterKeyStatus>, StoreError> {
        type Row = (
            i32,
            MasterKeyState,
            i64,
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT m.version, m.state, m.seals_reserved,
                    (SELECT count(*) FROM key_versions k
                      WHERE k.mk_version = m.version AND k.sealed IS NOT NULL)
                  + (SELECT count(*) FROM secret_versions s
                      WHERE s.mk_version = m.version AND s.wrapped_dek IS NOT NULL),
                    to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(m.activated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(m.retired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(m.destroyed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM master_keys m ORDER BY m.version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(MasterKeyStatus {
                    version: to_version(row.0)?,
                    state: row.1,
                    seals: row.2,
                    stored_blobs: row.3,
                    created_at: row.4,
                    activated_at: row.5,
                    retired_at: row.6,
                    destroyed_at: row.7,
                })
            })
            .collect()
    }

    /// Retires a decrypt-only version that no stored blob references any more: it seals nothing
    /// and holds nothing, and may then be destroyed.
    ///
    /// # Errors
    /// [`MasterKeyChangeError`] for an unknown version, the wrong state or remaining blobs.
    pub async fn retire_master_key(
        &self,
        version: MasterKeyVersion,
        meta: &AuditMeta,
    ) -> Result<(), MasterKeyChangeError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_unreferenced(&mut tx, version, &[MasterKeyState::DecryptOnly]).await?;
        sqlx::query(
            "UPDATE master_keys SET state = 'retired', retired_at = now() WHERE version = $1",
        )
        .bind(from_version(version)?)
        .execute(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("master_key.retired")
            .subject(version.token_label())
            .details(serde_json::json!({ "mk_version": version.get() }));
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks that `version` may be removed from the token: retired (or destroyed already, by
    /// a run that stopped before recording it) and referenced by no stored blob.
    ///
    /// # Errors
    /// [`MasterKeyChangeError`] for an unknown version, the wrong state or remaining blobs.
    pub async fn check_master_key_destroyable(
        &self,
        version: MasterKeyVersion,
    ) -> Result<(), MasterKeyChangeError> {
        let mut tx = self.pool.begin().await?;
        lock_unreferenced(
            &mut tx,
            version,
            &[MasterKeyState::Retired, MasterKeyState::Destroyed],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records that `version` is gone from the token.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn record_master_key_destroyed(
        &self,
        version: MasterKeyVersion,
        meta: &AuditMeta,
    ) -> Result<(), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE master_keys SET state = 'destroyed', destroyed_at = now()
             WHERE version = $1 AND state = 'retired'",
        )
        .bind(from_version(version)?)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed > 0 {
            let event = NewAuditEvent::info("master_key.destroyed")
                .severity("warning")
                .subject(version.token_label())
                .details(serde_json::json!({ "mk_version": version.get() }));
            audit::append(&mut tx, signer, meta, &[event]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Adds `n` seals done under `version` to its counter.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn count_seals(&self, version: MasterKeyVersion, n: usize) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE master_keys SET seals_reserved = seals_reserved + $2 WHERE version = $1",
        )
        .bind(from_version(version)?)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Row-locks `version` for the rest of the transaction and checks that it is in one of `states`
/// and that no stored blob is sealed under it.
async fn lock_unreferenced(
    tx: &mut Transaction<'static, Postgres>,
    version: MasterKeyVersion,
    states: &[MasterKeyState],
) -> Result<(), MasterKeyChangeError> {
    // A number past what the column holds (a caller's typo) names no recorded version.
    let stored =
        i32::try_from(version.get()).map_err(|_| MasterKeyChangeError::NotFound(version))?;
    let row: Option<(MasterKeyState,)> =
        sqlx::query_as("SELECT state FROM master_keys WHERE version = $1 FOR UPDATE")
            .bind(stored)
            .fetch_optional(&mut **tx)
            .await?;
    let (state,) = row.ok_or(MasterKeyChangeError::NotFound(version))?;
    if !states.contains(&state) {
        return Err(MasterKeyChangeError::WrongState(version, state));
    }
    let (blobs,): (i64,) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM key_versions WHERE mk_version = $1 AND sealed IS NOT NULL)
              + (SELECT count(*) FROM secret_versions
                  WHERE mk_version = $1 AND wrapped_dek IS NOT NULL)",
    )
    .bind(stored)
    .fetch_one(&mut **tx)
    .await?;
    if blobs > 0 {
        return Err(MasterKeyChangeError::InUse(version, blobs));
    }
    Ok(())
}
