//! Master-key lifecycle in Postgres: the rotation lock and its pending → active steps, the
//! overview with the stored blobs under each version, retirement and destruction, and the
//! rewrap job with its batches.

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Transaction};

use super::audit::{self, AuditMeta, NewAuditEvent};
use super::{Store, StoreError, from_version, to_version};
use crate::crypto::MasterKeyVersion;

/// The advisory-lock key that serialises master-key changes across brokers ("kbmk").
const MASTER_KEY_LOCK: i64 = 0x6b62_6d6b;
/// The advisory-lock key that serialises signing-key rotations ("kbsk").
const SIGNING_KEY_LOCK: i64 = 0x6b62_736b;
/// The transaction-scoped advisory-lock key that serialises starting a rewrap job with finishing
/// one ("kbrw"), so a start never misses a job that another broker is just finishing.
const REWRAP_JOB_LOCK: i64 = 0x6b62_7277;

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
    /// `pending`, `active`, `decrypt_only`, `retired` or `destroyed`.
    pub state: String,
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
    WrongState(MasterKeyVersion, String),
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

/// A rewrap job, as the admin API, the CLI and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapJob {
    /// Its id.
    pub id: i64,
    /// `running` or `done`.
    pub state: String,
    /// `officer`, `scheduler` or an admin client's id.
    pub started_by: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once done.
    pub finished_at: Option<String>,
    /// Blobs outside the active version when it started.
    pub total: i64,
    /// Blobs it has moved so far.
    pub rewrapped: i64,
    /// Blobs still outside the active version now.
    pub remaining: i64,
}

/// What a request to start a rewrap did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewrapStart {
    /// It recorded a new job.
    Started,
    /// A job was already running; the request joined it.
    Joined,
    /// Nothing was left outside the active version and no job was running: no job was started,
    /// and the job returned is the latest one, already done.
    NothingToDo,
}

/// A stored managed-key version to move: what its AAD needs, and the sealed material.
#[derive(Debug)]
pub struct KeyBlob {
    /// The key.
    pub key_id: uuid::Uuid,
    /// The key version.
    pub version: i32,
    /// The owning client.
    pub client_id: uuid::Uuid,
    /// The key's creation context, canonical JSON.
    pub context: String,
    /// The master-key version it is sealed under now.
    pub mk_version: i32,
    /// iv ‖ ciphertext ‖ tag.
    pub sealed: Vec<u8>,
}

/// A stored secret version to move: its data key sealed by the token, and its value sealed
/// in-process (whose AAD names the master-key version too).
#[derive(Debug)]
pub struct SecretBlob {
    /// The secret.
    pub secret_id: uuid::Uuid,
    /// The secret version.
    pub version: i32,
    /// The owning client.
    pub client_id: uuid::Uuid,
    /// The context it was stored with, canonical JSON.
    pub context: String,
    /// The master-key version its data key is sealed under now.
    pub mk_version: i32,
    /// The sealed data key.
    pub wrapped_dek: Vec<u8>,
    /// The sealed value.
    pub sealed: Vec<u8>,
}

/// One batch of blobs to move to `target`, locked (`FOR UPDATE SKIP LOCKED`) in an open
/// transaction until [`RewrapBatch::commit`]: a concurrent destruction or another broker's
/// batch cannot touch the same rows meanwhile.
pub struct RewrapBatch {
    tx: Transaction<'static, Postgres>,
    job_id: i64,
    /// The active version, which every blob of the batch moves to. Its seal counter already
    /// counts the batch.
    pub target: MasterKeyVersion,
    /// Managed-key versions.
    pub keys: Vec<KeyBlob>,
    /// Secret versions.
    pub secrets: Vec<SecretBlob>,
}

/// A moved managed-key version.
pub struct RewrappedKey {
    /// The key.
    pub key_id: uuid::Uuid,
    /// The key version.
    pub version: i32,
    /// Sealed under the batch's target.
    pub sealed: Vec<u8>,
}

/// A moved secret version.
pub struct RewrappedSecret {
    /// The secret.
    pub secret_id: uuid::Uuid,
    /// The secret version.
    pub version: i32,
    /// The data key sealed under the batch's target.
    pub wrapped_dek: Vec<u8>,
    /// The value sealed again with the new AAD.
    pub sealed: Vec<u8>,
}

impl Store {
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

    /// The version in `state` (`active` or `pending`; there is at most one of each).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn master_key_in_state(
        &self,
        state: &str,
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
            String,
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
        lock_unreferenced(&mut tx, version, &["decrypt_only"]).await?;
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
        lock_unreferenced(&mut tx, version, &["retired", "destroyed"]).await?;
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

    /// Starts a rewrap job, joins the one already running, or, when nothing is left outside the
    /// active version, returns the latest job. The first start on a store with nothing to move
    /// records a job that is done at once, so the answer is always a job.
    ///
    /// # Errors
    /// [`StoreError::NoActiveMasterKey`], or any database failure.
    pub async fn start_rewrap_job(
        &self,
        started_by: &str,
        meta: &AuditMeta,
    ) -> Result<(RewrapJob, RewrapStart), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        // Taken before anything is read: a batch that finishes the running job holds it too, so
        // this transaction sees either that job running or everything it moved.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(REWRAP_JOB_LOCK)
            .execute(&mut *tx)
            .await?;
        let active = active_in(&mut tx).await?;
        let total = remaining_outside(&mut tx, active).await?;
        let (running, any_job): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM rewrap_jobs WHERE state = 'running'),
                    EXISTS (SELECT 1 FROM rewrap_jobs)",
        )
        .fetch_one(&mut *tx)
        .await?;
        let outcome = if running {
            RewrapStart::Joined
        } else if total == 0 && any_job {
            RewrapStart::NothingToDo
        } else {
            let done = total == 0;
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO rewrap_jobs (state, started_by, total, finished_at)
                 VALUES (CASE WHEN $3 THEN 'done' ELSE 'running' END, $1, $2,
                         CASE WHEN $3 THEN now() END)
                 RETURNING id",
            )
            .bind(started_by)
            .bind(total)
            .bind(done)
            .fetch_one(&mut *tx)
            .await?;
            let mut events = vec![
                NewAuditEvent::info("master_key.rewrap_started")
                    .subject(active.token_label())
                    .details(serde_json::json!({ "job": id, "blobs": total })),
            ];
            if done {
                events.push(
                    NewAuditEvent::info("master_key.rewrap_finished")
                        .subject(active.token_label())
                        .details(serde_json::json!({ "job": id, "rewrapped": 0 })),
                );
            }
            audit::append(&mut tx, signer, meta, &events).await?;
            RewrapStart::Started
        };
        let row = latest_job(&mut tx)
            .await?
            .ok_or(StoreError::Corrupt("rewrap job vanished"))?;
        tx.commit().await?;
        // Under the lock no batch committed since `total` was counted.
        Ok((row.with_remaining(total), outcome))
    }

    /// The running rewrap job, else the latest one.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn rewrap_job(&self) -> Result<Option<RewrapJob>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let Some(row) = latest_job(&mut conn).await? else {
            return Ok(None);
        };
        let remaining = match self.master_key_in_state("active").await? {
            Some(active) => remaining_outside(&mut conn, active).await?,
            None => 0,
        };
        Ok(Some(row.with_remaining(remaining)))
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

    /// Locks up to `limit` blobs outside the active version for the running job. `None` when no
    /// job is running.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn rewrap_batch(&self, limit: i64) -> Result<Option<RewrapBatch>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let job: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM rewrap_jobs WHERE state = 'running'")
                .fetch_optional(&mut *tx)
                .await?;
        let Some((job_id,)) = job else {
            return Ok(None);
        };
        let target = active_in(&mut tx).await?;
        let target_i = from_version(target)?;
        type KeyRow = (uuid::Uuid, i32, uuid::Uuid, String, i32, Vec<u8>);
        let keys: Vec<KeyRow> = sqlx::query_as(
            "SELECT v.key_id, v.version, k.client_id, k.context::text, v.mk_version, v.sealed
             FROM key_versions v JOIN keys k ON k.id = v.key_id
             WHERE v.mk_version <> $1 AND v.sealed IS NOT NULL
             ORDER BY v.mk_version, v.key_id, v.version
             LIMIT $2 FOR UPDATE OF v SKIP LOCKED",
        )
        .bind(target_i)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let left = limit - i64::try_from(keys.len()).unwrap_or(limit);
        type SecretRow = (uuid::Uuid, i32, uuid::Uuid, String, i32, Vec<u8>, Vec<u8>);
        let secrets: Vec<SecretRow> = if left > 0 {
            sqlx::query_as(
                "SELECT v.secret_id, v.version, s.client_id, v.context::text, v.mk_version,
                        v.wrapped_dek, v.sealed
                 FROM secret_versions v JOIN secrets s ON s.id = v.secret_id
                 WHERE v.mk_version <> $1 AND v.wrapped_dek IS NOT NULL AND v.sealed IS NOT NULL
                 ORDER BY v.mk_version, v.secret_id, v.version
                 LIMIT $2 FOR UPDATE OF v SKIP LOCKED",
            )
            .bind(target_i)
            .bind(left)
            .fetch_all(&mut *tx)
            .await?
        } else {
            Vec::new()
        };
        Ok(Some(RewrapBatch {
            tx,
            job_id,
            target,
            keys: keys
                .into_iter()
                .map(|r| KeyBlob {
                    key_id: r.0,
                    version: r.1,
                    client_id: r.2,
                    context: r.3,
                    mk_version: r.4,
                    sealed: r.5,
                })
                .collect(),
            secrets: secrets
                .into_iter()
                .map(|r| SecretBlob {
                    secret_id: r.0,
                    version: r.1,
                    client_id: r.2,
                    context: r.3,
                    mk_version: r.4,
                    wrapped_dek: r.5,
                    sealed: r.6,
                })
                .collect(),
        }))
    }
}

impl RewrapBatch {
    /// Whether the batch found nothing to move.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.secrets.is_empty()
    }

    /// Stores the moved blobs, advances the job, and finishes it (with its audit event) when
    /// nothing is left outside the target. Returns the job's moved count and what remains.
    ///
    /// # Errors
    /// Any database failure; then nothing of the batch is stored.
    pub async fn commit(
        mut self,
        keys: Vec<RewrappedKey>,
        secrets: Vec<RewrappedSecret>,
        store: &Store,
        meta: &AuditMeta,
    ) -> Result<(i64, i64), StoreError> {
        let target = from_version(self.target)?;
        // Serialised with job starts and with other batches' commits (taken before the job row,
        // as a start takes it); the count of what remains is a fresh statement after it, so it
        // sees every batch committed before.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(REWRAP_JOB_LOCK)
            .execute(&mut *self.tx)
            .await?;
        for key in &keys {
            sqlx::query(
                "UPDATE key_versions SET mk_version = $3, sealed = $4
                 WHERE key_id = $1 AND version = $2 AND sealed IS NOT NULL",
            )
            .bind(key.key_id)
            .bind(key.version)
            .bind(target)
            .bind(&key.sealed)
            .execute(&mut *self.tx)
            .await?;
        }
        for secret in &secrets {
            sqlx::query(
                "UPDATE secret_versions SET mk_version = $3, wrapped_dek = $4, sealed = $5
                 WHERE secret_id = $1 AND version = $2 AND wrapped_dek IS NOT NULL",
            )
            .bind(secret.secret_id)
            .bind(secret.version)
            .bind(target)
            .bind(&secret.wrapped_dek)
            .bind(&secret.sealed)
            .execute(&mut *self.tx)
            .await?;
        }
        let moved = i64::try_from(keys.len() + secrets.len()).unwrap_or(i64::MAX);
        let (rewrapped,): (i64,) = sqlx::query_as(
            "UPDATE rewrap_jobs SET rewrapped = rewrapped + $2 WHERE id = $1 RETURNING rewrapped",
        )
        .bind(self.job_id)
        .bind(moved)
        .fetch_one(&mut *self.tx)
        .await?;
        let remaining = remaining_outside(&mut self.tx, self.target).await?;
        if remaining == 0 {
            sqlx::query(
                "UPDATE rewrap_jobs SET state = 'done', finished_at = now()
                 WHERE id = $1 AND state = 'running'",
            )
            .bind(self.job_id)
            .execute(&mut *self.tx)
            .await?;
            let event = NewAuditEvent::info("master_key.rewrap_finished")
                .subject(self.target.token_label())
                .details(serde_json::json!({ "job": self.job_id, "rewrapped": rewrapped }));
            audit::append(&mut self.tx, store.signer()?, meta, &[event]).await?;
        }
        self.tx.commit().await?;
        Ok((rewrapped, remaining))
    }
}

/// Row-locks `version` for the rest of the transaction and checks that it is in one of `states`
/// and that no stored blob is sealed under it.
async fn lock_unreferenced(
    tx: &mut Transaction<'static, Postgres>,
    version: MasterKeyVersion,
    states: &[&str],
) -> Result<(), MasterKeyChangeError> {
    // A number past what the column holds (a caller's typo) names no recorded version.
    let stored =
        i32::try_from(version.get()).map_err(|_| MasterKeyChangeError::NotFound(version))?;
    let row: Option<(String,)> =
        sqlx::query_as("SELECT state FROM master_keys WHERE version = $1 FOR UPDATE")
            .bind(stored)
            .fetch_optional(&mut **tx)
            .await?;
    let (state,) = row.ok_or(MasterKeyChangeError::NotFound(version))?;
    if !states.contains(&state.as_str()) {
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

/// A rewrap job's row, before its live `remaining` is counted.
struct JobRow(i64, String, String, String, Option<String>, i64, i64);

impl JobRow {
    fn with_remaining(self, remaining: i64) -> RewrapJob {
        RewrapJob {
            id: self.0,
            state: self.1,
            started_by: self.2,
            started_at: self.3,
            finished_at: self.4,
            total: self.5,
            rewrapped: self.6,
            remaining,
        }
    }
}

/// The running rewrap job, else the latest one.
async fn latest_job(conn: &mut sqlx::PgConnection) -> Result<Option<JobRow>, StoreError> {
    type Row = (i64, String, String, String, Option<String>, i64, i64);
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, state, started_by, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), total, rewrapped
         FROM rewrap_jobs ORDER BY (state = 'running') DESC, id DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| JobRow(r.0, r.1, r.2, r.3, r.4, r.5, r.6)))
}

/// Stored blobs sealed under any version but `active`.
async fn remaining_outside(
    conn: &mut sqlx::PgConnection,
    active: MasterKeyVersion,
) -> Result<i64, StoreError> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM key_versions WHERE mk_version <> $1 AND sealed IS NOT NULL)
              + (SELECT count(*) FROM secret_versions
                  WHERE mk_version <> $1 AND wrapped_dek IS NOT NULL)",
    )
    .bind(from_version(active)?)
    .fetch_one(conn)
    .await?;
    Ok(n)
}

async fn active_in(conn: &mut sqlx::PgConnection) -> Result<MasterKeyVersion, StoreError> {
    let row: Option<(i32,)> =
        sqlx::query_as("SELECT version FROM master_keys WHERE state = 'active'")
            .fetch_optional(conn)
            .await?;
    let (version,) = row.ok_or(StoreError::NoActiveMasterKey)?;
    to_version(version)
}
