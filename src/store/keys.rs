//! Managed keys, their versions and rotation history, and usage counters.

use uuid::Uuid;

use super::audit::append;
use super::{AuditMeta, ItemWriteError, KeyState, NewAuditEvent, Store, StoreError};

/// A managed key as stored. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRow {
    /// Key id.
    pub id: Uuid,
    /// Owning client.
    pub client_id: Uuid,
    /// Name, unique per client among live keys.
    pub name: String,
    /// `raw`, `hex`, `uuid`, `alphanumeric` or `numeric`.
    pub format: String,
    /// Length in the format's unit.
    pub length: i32,
    /// The encryption context, canonical JSON.
    pub context: String,
    /// Stored state (`active` may be past its expiry until the worker marks it).
    pub state: KeyState,
    /// The version reads get by default.
    pub current_version: i32,
    /// `manual` or `auto`.
    pub rotation: String,
    /// Period of `auto` rotation.
    pub rotation_period_days: Option<i32>,
    /// When `auto` rotation is next due.
    pub next_rotation_at: Option<i64>,
    /// When the key expires, if ever.
    pub expires_at: Option<i64>,
    /// When a scheduled destruction happens.
    pub deletion_due: Option<i64>,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// When its material was erased.
    pub destroyed_at: Option<i64>,
}

/// One version of a key, without its material.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyVersionRow {
    /// The version.
    pub version: i32,
    /// The master-key version that sealed it.
    pub mk_version: i32,
    /// Whether its material still exists.
    pub has_material: bool,
    /// Creation time.
    pub created_at: i64,
}

/// One rotation.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RotationRow {
    /// The version before.
    pub from_version: i32,
    /// The version after.
    pub to_version: i32,
    /// `manual` or `scheduled`.
    pub reason: String,
    /// Client id, or `scheduler`.
    pub actor: String,
    /// When.
    pub rotated_at: i64,
}

/// A key to insert, with its first version already sealed.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Key id.
    pub id: Uuid,
    /// Owner.
    pub client_id: Uuid,
    /// Name.
    pub name: String,
    /// Format name.
    pub format: String,
    /// Length.
    pub length: i32,
    /// Canonical context JSON.
    pub context: String,
    /// `manual` or `auto`.
    pub rotation: String,
    /// Period of `auto` rotation.
    pub rotation_period_days: Option<i32>,
    /// Expiry.
    pub expires_at: Option<i64>,
    /// The master-key version that sealed version 1.
    pub mk_version: i32,
    /// Version 1, sealed.
    pub sealed: Vec<u8>,
    /// Now.
    pub now: i64,
}

const KEY_COLUMNS: &str = "id, client_id, name, format, length, context::text AS context, state,
    current_version, rotation, rotation_period_days,
    floor(extract(epoch FROM next_rotation_at))::bigint AS next_rotation_at,
    floor(extract(epoch FROM expires_at))::bigint AS expires_at,
    floor(extract(epoch FROM deletion_due))::bigint AS deletion_due,
    floor(extract(epoch FROM created_at))::bigint AS created_at,
    floor(extract(epoch FROM updated_at))::bigint AS updated_at,
    floor(extract(epoch FROM destroyed_at))::bigint AS destroyed_at";

/// How long a broker holds a claimed scheduled rotation before another may take it over.
pub const ROTATION_CLAIM_SECS: i64 = 300;

/// A short hash of a stored context, for audit details (shows sameness, reveals nothing).
pub(super) fn context_hash(context_json: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(context_json.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unix seconds as Postgres `to_timestamp` takes them.
pub(super) fn ts(seconds: i64) -> f64 {
    seconds as f64
}

impl Store {
    /// Inserts a key and its first version.
    ///
    /// # Errors
    /// [`StoreError::Violated`] ([`super::Violation::KeyNameTaken`]) inside
    /// [`ItemWriteError::Store`], or any database failure.
    pub async fn insert_key(
        &self,
        key: &NewKey,
        meta: &AuditMeta,
    ) -> Result<KeyRow, ItemWriteError<KeyState>> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let row: KeyRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO keys (id, client_id, name, format, length, context, state,
                               current_version, rotation, rotation_period_days, next_rotation_at,
                               expires_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'active', 1, $7, $8,
                     CASE WHEN $7 = 'auto' THEN to_timestamp($10) + make_interval(days => $8) END,
                     to_timestamp($9), to_timestamp($10), to_timestamp($10))
             RETURNING {KEY_COLUMNS}"
        )))
        .bind(key.id)
        .bind(key.client_id)
        .bind(&key.name)
        .bind(&key.format)
        .bind(key.length)
        .bind(&key.context)
        .bind(&key.rotation)
        .bind(key.rotation_period_days)
        .bind(key.expires_at.map(ts))
        .bind(ts(key.now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO key_versions (key_id, version, mk_version, sealed, created_at)
             VALUES ($1, 1, $2, $3, to_timestamp($4))",
        )
        .bind(key.id)
        .bind(key.mk_version)
        .bind(&key.sealed)
        .bind(ts(key.now))
        .execute(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("key.created")
            .client(key.client_id)
            .key(key.id)
            .subject(key.name.clone())
            .details(serde_json::json!({
                "format": key.format,
                "length": key.length,
                "rotation": key.rotation,
                "rotation_period_days": key.rotation_period_days,
                "expires_at": key.expires_at,
                "mk_version": key.mk_version,
                "context_hash": context_hash(&key.context),
            }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// One of `owner`'s keys.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn key(&self, owner: Uuid, id: Uuid) -> Result<Option<KeyRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE id = $1 AND client_id = $2"
        )))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A page of `owner`'s keys by id, optionally in one state (as of `now`) or of one name.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn keys(
        &self,
        owner: Uuid,
        state: Option<KeyState>,
        name: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
        now: i64,
    ) -> Result<Vec<KeyRow>, StoreError> {
        // The state filter applies to the state as of `now`: an active key past its expiry is
        // expired even before the worker records it (reading must not have to write).
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys
             WHERE client_id = $1
               AND ($2::text IS NULL OR $2 = CASE
                     WHEN state = 'active' AND expires_at <= to_timestamp($6) THEN 'expired'
                     ELSE state END)
               AND ($3::text IS NULL OR name = $3) AND ($4::uuid IS NULL OR id > $4)
             ORDER BY id LIMIT $5"
        )))
        .bind(owner)
        .bind(state)
        .bind(name)
        .bind(after)
        .bind(limit)
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?)
    }

    /// A key's versions, ascending.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn key_versions(&self, id: Uuid) -> Result<Vec<KeyVersionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT version, mk_version, sealed IS NOT NULL AS has_material,
                    floor(extract(epoch FROM created_at))::bigint AS created_at
             FROM key_versions WHERE key_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The master-key version and sealed material of one key version (`None` material once
    /// destroyed).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn key_material(
        &self,
        id: Uuid,
        version: i32,
    ) -> Result<Option<(i32, Option<Vec<u8>>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT mk_version, sealed FROM key_versions WHERE key_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A key's rotation history, oldest first.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn key_rotations(&self, id: Uuid) -> Result<Vec<RotationRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT from_version, to_version, reason, actor,
                    floor(extract(epoch FROM rotated_at))::bigint AS rotated_at
             FROM key_rotations WHERE key_id = $1 ORDER BY rotated_at, to_version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Adds version `from_version + 1` (already sealed) and makes it current, if the key is still
    /// active at `from_version`; records the rotation. A manual rotation of an `auto` key also
    /// restarts its period.
    ///
    /// # Errors
    /// [`ItemWriteError::WrongState`] or [`ItemWriteError::Conflict`] when the key moved on.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_key_version(
        &self,
        id: Uuid,
        from_version: i32,
        mk_version: i32,
        sealed: &[u8],
        reason: &str,
        actor: &str,
        now: i64,
        meta: &AuditMeta,
    ) -> Result<KeyRow, ItemWriteError<KeyState>> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let current: Option<(KeyState, i32)> =
            sqlx::query_as("SELECT state, current_version FROM keys WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (state, current) = current.ok_or(ItemWriteError::NotFound)?;
        if state != KeyState::Active {
            return Err(ItemWriteError::WrongState(state));
        }
        if current != from_version {
            return Err(ItemWriteError::Conflict);
        }
        let to_version = from_version + 1;
        sqlx::query(
            "INSERT INTO key_versions (key_id, version, mk_version, sealed, created_at)
             VALUES ($1, $2, $3, $4, to_timestamp($5))",
        )
        .bind(id)
        .bind(to_version)
        .bind(mk_version)
        .bind(sealed)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO key_rotations (key_id, from_version, to_version, reason, actor, rotated_at)
             VALUES ($1, $2, $3, $4, $5, to_timestamp($6))",
        )
        .bind(id)
        .bind(from_version)
        .bind(to_version)
        .bind(reason)
        .bind(actor)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let row: KeyRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE keys SET current_version = $2, updated_at = to_timestamp($3),
                 next_rotation_at = CASE WHEN rotation = 'auto'
                     THEN to_timestamp($3) + make_interval(days => rotation_period_days)
                     ELSE next_rotation_at END,
                 rotation_claimed_until = NULL
             WHERE id = $1 RETURNING {KEY_COLUMNS}"
        )))
        .bind(id)
        .bind(to_version)
        .bind(ts(now))
        .fetch_one(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("key.rotated")
            .client(row.client_id)
            .key(id)
            .subject(row.name.clone())
            .details(serde_json::json!({
                "from_version": from_version,
                "to_version": to_version,
                "reason": reason,
                "mk_version": mk_version,
            }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Moves one of `owner`'s keys to `to` if its state (after marking expiry at `now`) is one of
    /// `from`. `deletion_due` is set when given and cleared otherwise; `expires_at` is replaced
    /// when given (and an expired key whose new expiry is in the future becomes active).
    ///
    /// # Errors
    /// [`ItemWriteError::NotFound`], [`ItemWriteError::WrongState`], or any database failure.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition_key(
        &self,
        owner: Uuid,
        id: Uuid,
        from: &[KeyState],
        to: KeyState,
        now: i64,
        deletion_due: Option<i64>,
        expires_at: Option<Option<i64>>,
        meta: &AuditMeta,
    ) -> Result<KeyRow, ItemWriteError<KeyState>> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        // Record an expiry the worker has not recorded yet, with its own event.
        let expired: Option<(String,)> = sqlx::query_as(
            "UPDATE keys SET state = 'expired', updated_at = to_timestamp($3)
             WHERE id = $1 AND client_id = $2 AND state = 'active'
               AND expires_at <= to_timestamp($3)
             RETURNING name",
        )
        .bind(id)
        .bind(owner)
        .bind(ts(now))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((name,)) = expired {
            let event = NewAuditEvent::info("key.expired")
                .client(owner)
                .key(id)
                .subject(name);
            append(&mut tx, signer, meta, &[event]).await?;
        }
        let state: Option<(KeyState,)> =
            sqlx::query_as("SELECT state FROM keys WHERE id = $1 AND client_id = $2 FOR UPDATE")
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
        let (state,) = state.ok_or(ItemWriteError::NotFound)?;
        if !from.contains(&state) {
            return Err(ItemWriteError::WrongState(state));
        }
        let row: KeyRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE keys SET state = $2, updated_at = to_timestamp($3),
                 deletion_due = to_timestamp($4),
                 expires_at = CASE WHEN $5 THEN to_timestamp($6) ELSE expires_at END
             WHERE id = $1 RETURNING {KEY_COLUMNS}"
        )))
        .bind(id)
        .bind(to)
        .bind(ts(now))
        .bind(deletion_due.map(ts))
        .bind(expires_at.is_some())
        .bind(expires_at.flatten().map(ts))
        .fetch_one(&mut *tx)
        .await?;
        let (name, severity) = match (to, state) {
            _ if expires_at.is_some() => ("key.refreshed", "info"),
            (KeyState::PendingDeletion, _) => ("key.deletion_scheduled", "warning"),
            (KeyState::Disabled, KeyState::PendingDeletion) => ("key.deletion_cancelled", "info"),
            (KeyState::Disabled, _) => ("key.disabled", "warning"),
            _ => ("key.enabled", "info"),
        };
        let event = NewAuditEvent::info(name)
            .severity(severity)
            .client(owner)
            .key(id)
            .subject(row.name.clone())
            .details(serde_json::json!({
                "from_state": state.as_str(),
                "to_state": to.as_str(),
                "deletion_due": row.deletion_due,
                "expires_at": row.expires_at,
            }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Claims up to `limit` `auto` keys due for rotation at `now` for [`ROTATION_CLAIM_SECS`],
    /// under `FOR UPDATE SKIP LOCKED`, so no other broker claims them meanwhile. The due date
    /// moves only when [`Store::add_key_version`] stores the scheduled version; a claim whose
    /// broker died expires and the key is claimed again (the stale attempt, if it ever comes
    /// back, fails its version check): each due rotation happens exactly once.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn claim_due_rotations(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<KeyRow>, StoreError> {
        // The outer SELECT sees the rows as they were before the claim, which is all the
        // caller needs (id, current version, context).
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH due AS (
                 SELECT id FROM keys
                 WHERE rotation = 'auto' AND state = 'active'
                   AND next_rotation_at <= to_timestamp($1)
                   AND (expires_at IS NULL OR expires_at > to_timestamp($1))
                   AND (rotation_claimed_until IS NULL
                        OR rotation_claimed_until <= to_timestamp($1))
                 ORDER BY next_rotation_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             claimed AS (
                 UPDATE keys k SET rotation_claimed_until = to_timestamp($1) + make_interval(secs => $3)
                 FROM due WHERE k.id = due.id RETURNING k.id)
             SELECT {KEY_COLUMNS} FROM keys WHERE id IN (SELECT id FROM claimed)"
        )))
        .bind(ts(now))
        .bind(limit)
        .bind(ROTATION_CLAIM_SECS as f64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Marks active keys past their expiry as expired. Returns how many.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn expire_keys(&self, now: i64, meta: &AuditMeta) -> Result<u64, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let expired: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "UPDATE keys SET state = 'expired', updated_at = to_timestamp($1)
             WHERE id IN (SELECT id FROM keys WHERE state = 'active'
                            AND expires_at <= to_timestamp($1) FOR UPDATE SKIP LOCKED)
             RETURNING id, client_id, name",
        )
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<NewAuditEvent> = expired
            .iter()
            .map(|(id, client, name)| {
                NewAuditEvent::info("key.expired")
                    .client(*client)
                    .key(*id)
                    .subject(name.clone())
            })
            .collect();
        append(&mut tx, signer, meta, &events).await?;
        tx.commit().await?;
        Ok(expired.len() as u64)
    }

    /// Destroys keys whose pending window ended: material of every version erased, the row kept
    /// as a tombstone. Returns the ids.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn destroy_due_keys(
        &self,
        now: i64,
        meta: &AuditMeta,
    ) -> Result<Vec<Uuid>, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let destroyed: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "UPDATE keys SET state = 'destroyed', destroyed_at = to_timestamp($1),
                 updated_at = to_timestamp($1), next_rotation_at = NULL
             WHERE id IN (SELECT id FROM keys WHERE state = 'pending_deletion'
                            AND deletion_due <= to_timestamp($1) FOR UPDATE SKIP LOCKED)
             RETURNING id, client_id, name",
        )
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = destroyed.iter().map(|(id, _, _)| *id).collect();
        sqlx::query("UPDATE key_versions SET sealed = NULL WHERE key_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let events: Vec<NewAuditEvent> = destroyed
            .iter()
            .map(|(id, client, name)| {
                NewAuditEvent::info("key.destroyed")
                    .severity("warning")
                    .client(*client)
                    .key(*id)
                    .subject(name.clone())
            })
            .collect();
        append(&mut tx, signer, meta, &events).await?;
        tx.commit().await?;
        Ok(ids)
    }

    /// Live keys of every client due for rotation or expiring between `now` and `until`.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn keys_due(&self, now: i64, until: i64) -> Result<Vec<KeyRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys
             WHERE state IN ('active', 'disabled')
               AND ((rotation = 'auto' AND next_rotation_at <= to_timestamp($2))
                 OR (expires_at > to_timestamp($1) AND expires_at <= to_timestamp($2))
                 OR (expires_at <= to_timestamp($1)))
             ORDER BY least(next_rotation_at, expires_at), id LIMIT 1000"
        )))
        .bind(ts(now))
        .bind(ts(until))
        .fetch_all(&self.pool)
        .await?)
    }
}
