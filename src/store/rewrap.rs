//! The rewrap job in Postgres: starting or joining it, its progress, and its batches of stored
//! blobs moved to the active master-key version.

use sqlx::{Postgres, Transaction};

use super::audit::{self, AuditMeta, NewAuditEvent};
use super::{MasterKeyState, RewrapJobState, Store, StoreError, from_version, to_version};
use crate::crypto::MasterKeyVersion;

/// The transaction-scoped advisory-lock key that serialises starting a rewrap job with finishing
/// one ("kbrw"), so a start never misses a job that another broker is just finishing.
const REWRAP_JOB_LOCK: i64 = 0x6b62_7277;

/// A rewrap job, as the admin API, the CLI and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapJob {
    /// Its id.
    pub id: i64,
    /// Its state.
    pub state: RewrapJobState,
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
        let remaining = match self.master_key_in_state(MasterKeyState::Active).await? {
            Some(active) => remaining_outside(&mut conn, active).await?,
            None => 0,
        };
        Ok(Some(row.with_remaining(remaining)))
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

/// A rewrap job's row, before its live `remaining` is counted.
#[derive(sqlx::FromRow)]
struct JobRow(
    i64,
    RewrapJobState,
    String,
    String,
    Option<String>,
    i64,
    i64,
);

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
    Ok(sqlx::query_as(
        "SELECT id, state, started_by, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), total, rewrapped
         FROM rewrap_jobs ORDER BY (state = 'running') DESC, id DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?)
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
