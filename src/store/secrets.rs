//! Secrets and their versions.

use uuid::Uuid;

use super::audit::append;
use super::keys::{context_hash, ts};
use super::{AuditMeta, ItemWriteError, NewAuditEvent, SecretState, Store, StoreError, Violation};

/// A secret as stored. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SecretRow {
    /// Secret id.
    pub id: Uuid,
    /// Owner.
    pub client_id: Uuid,
    /// Name, unique per client among live secrets.
    pub name: String,
    /// Its state.
    pub state: SecretState,
    /// The latest version.
    pub current_version: i32,
    /// When a scheduled destruction happens.
    pub deletion_due: Option<i64>,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// One stored version of a secret (`None` parts once destroyed).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SecretVersionRow {
    /// The master-key version that sealed the data key.
    pub mk_version: i32,
    /// The data key, sealed by the token.
    pub wrapped_dek: Option<Vec<u8>>,
    /// The value, sealed in-process under the data key.
    pub sealed: Option<Vec<u8>>,
    /// Canonical context JSON it was stored with.
    pub context: String,
    /// Creation time.
    pub created_at: i64,
}

/// A new secret version, sealed for (`secret_id`, `version`).
#[derive(Debug, Clone)]
pub struct NewSecretVersion {
    /// The secret's id (new or existing).
    pub secret_id: Uuid,
    /// The version sealed for: 1 for a new secret, else current + 1.
    pub version: i32,
    /// Owner.
    pub client_id: Uuid,
    /// Name.
    pub name: String,
    /// The master-key version that sealed the data key.
    pub mk_version: i32,
    /// The sealed data key.
    pub wrapped_dek: Vec<u8>,
    /// The sealed value.
    pub sealed: Vec<u8>,
    /// Canonical context JSON.
    pub context: String,
    /// Now.
    pub now: i64,
}

const SECRET_COLUMNS: &str = "id, client_id, name, state, current_version,
    floor(extract(epoch FROM deletion_due))::bigint AS deletion_due,
    floor(extract(epoch FROM created_at))::bigint AS created_at,
    floor(extract(epoch FROM updated_at))::bigint AS updated_at";

impl Store {
    /// `owner`'s live secret named `name`.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn secret(&self, owner: Uuid, name: &str) -> Result<Option<SecretRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SECRET_COLUMNS} FROM secrets
             WHERE client_id = $1 AND name = $2 AND state <> 'destroyed'"
        )))
        .bind(owner)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Stores a version sealed for `version`: version 1 creates the secret; a later one must
    /// follow the current version of an active secret (else [`ItemWriteError::Conflict`]: a
    /// concurrent writer won, seal again).
    ///
    /// # Errors
    /// [`ItemWriteError::Conflict`] (also when another writer created the secret first),
    /// [`ItemWriteError::WrongState`], or any database failure.
    pub async fn put_secret_version(
        &self,
        new: &NewSecretVersion,
        meta: &AuditMeta,
    ) -> Result<SecretRow, ItemWriteError<SecretState>> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let row: SecretRow = if new.version == 1 {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO secrets (id, client_id, name, state, current_version, created_at,
                                      updated_at)
                 VALUES ($1, $2, $3, 'active', 1, to_timestamp($4), to_timestamp($4))
                 RETURNING {SECRET_COLUMNS}"
            )))
            .bind(new.secret_id)
            .bind(new.client_id)
            .bind(&new.name)
            .bind(ts(new.now))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| match ItemWriteError::<SecretState>::from(e) {
                // Someone created it first: seal again for their version.
                e if e.violated(Violation::SecretNameTaken) => ItemWriteError::Conflict,
                other => other,
            })?
        } else {
            let state: Option<(SecretState, i32)> = sqlx::query_as(
                "SELECT state, current_version FROM secrets WHERE id = $1 AND client_id = $2
                 FOR UPDATE",
            )
            .bind(new.secret_id)
            .bind(new.client_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (state, current) = state.ok_or(ItemWriteError::Conflict)?;
            if state != SecretState::Active {
                return Err(ItemWriteError::WrongState(state));
            }
            if current + 1 != new.version {
                return Err(ItemWriteError::Conflict);
            }
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE secrets SET current_version = $2, updated_at = to_timestamp($3)
                 WHERE id = $1 RETURNING {SECRET_COLUMNS}"
            )))
            .bind(new.secret_id)
            .bind(new.version)
            .bind(ts(new.now))
            .fetch_one(&mut *tx)
            .await?
        };
        sqlx::query(
            "INSERT INTO secret_versions (secret_id, version, mk_version, wrapped_dek, sealed,
                                          context, created_at)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, to_timestamp($7))",
        )
        .bind(new.secret_id)
        .bind(new.version)
        .bind(new.mk_version)
        .bind(&new.wrapped_dek)
        .bind(&new.sealed)
        .bind(&new.context)
        .bind(ts(new.now))
        .execute(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("secret.written")
            .client(new.client_id)
            .key(new.secret_id)
            .subject(new.name.clone())
            .details(serde_json::json!({
                "version": new.version,
                "mk_version": new.mk_version,
                "context_hash": context_hash(&new.context),
            }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// One version of a secret.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn secret_version(
        &self,
        secret_id: Uuid,
        version: i32,
    ) -> Result<Option<SecretVersionRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT mk_version, wrapped_dek, sealed, context::text AS context,
                    floor(extract(epoch FROM created_at))::bigint AS created_at
             FROM secret_versions WHERE secret_id = $1 AND version = $2",
        )
        .bind(secret_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Moves `owner`'s live secret `name` to `to` if its state is one of `from`, setting or
    /// clearing `deletion_due`.
    ///
    /// # Errors
    /// [`ItemWriteError::NotFound`], [`ItemWriteError::WrongState`], or any database failure.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition_secret(
        &self,
        owner: Uuid,
        name: &str,
        from: &[SecretState],
        to: SecretState,
        now: i64,
        deletion_due: Option<i64>,
        meta: &AuditMeta,
    ) -> Result<SecretRow, ItemWriteError<SecretState>> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let current: Option<(Uuid, SecretState)> = sqlx::query_as(
            "SELECT id, state FROM secrets WHERE client_id = $1 AND name = $2
               AND state <> 'destroyed' FOR UPDATE",
        )
        .bind(owner)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let (id, state) = current.ok_or(ItemWriteError::NotFound)?;
        if !from.contains(&state) {
            return Err(ItemWriteError::WrongState(state));
        }
        let row: SecretRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE secrets SET state = $2, updated_at = to_timestamp($3),
                 deletion_due = to_timestamp($4)
             WHERE id = $1 RETURNING {SECRET_COLUMNS}"
        )))
        .bind(id)
        .bind(to)
        .bind(ts(now))
        .bind(deletion_due.map(ts))
        .fetch_one(&mut *tx)
        .await?;
        let (event, severity) = if to == SecretState::PendingDeletion {
            ("secret.deletion_scheduled", "warning")
        } else {
            ("secret.deletion_cancelled", "info")
        };
        let event = NewAuditEvent::info(event)
            .severity(severity)
            .client(owner)
            .key(id)
            .subject(name.to_owned())
            .details(serde_json::json!({ "deletion_due": row.deletion_due }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Destroys secrets whose pending window ended: every version's data key and value erased,
    /// the row kept as a tombstone. Returns the ids.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn destroy_due_secrets(
        &self,
        now: i64,
        meta: &AuditMeta,
    ) -> Result<Vec<Uuid>, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let destroyed: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "UPDATE secrets SET state = 'destroyed', destroyed_at = to_timestamp($1),
                 updated_at = to_timestamp($1)
             WHERE id IN (SELECT id FROM secrets WHERE state = 'pending_deletion'
                            AND deletion_due <= to_timestamp($1) FOR UPDATE SKIP LOCKED)
             RETURNING id, client_id, name",
        )
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = destroyed.iter().map(|(id, _, _)| *id).collect();
        let events: Vec<NewAuditEvent> = destroyed
            .iter()
            .map(|(id, client, name)| {
                NewAuditEvent::info("secret.destroyed")
                    .severity("warning")
                    .client(*client)
                    .key(*id)
                    .subject(name.clone())
            })
            .collect();
        append(&mut tx, signer, meta, &events).await?;
        sqlx::query(
            "UPDATE secret_versions SET wrapped_dek = NULL, sealed = NULL WHERE secret_id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids)
    }
}
