//! Clients in Postgres: registration, changes, enable/disable, deletion, the per-request auth
//! state, token revocation and used assertions, with the address and last-admin checks.

use super::audit::{self, AuditMeta, NewAuditEvent};
use super::keys::ts;
use super::{AuthChange, ClientState, Store, StoreError};

/// The audit event of a client registration or change: ids and settings, never the secret.
fn client_event(
    event: &'static str,
    severity: &'static str,
    id: uuid::Uuid,
    fields: &ClientFields,
) -> NewAuditEvent {
    NewAuditEvent::info(event)
        .severity(severity)
        .client(id)
        .subject(id.to_string())
        .details(serde_json::json!({
            "name": fields.name,
            "ip_mode": fields.ip_mode,
            "cidrs": fields.allowed_cidrs,
            "scopes": fields.scopes,
            "has_public_key": fields.public_key_pem.is_some(),
        }))
}

/// A client as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ClientRow {
    /// The client id.
    pub id: uuid::Uuid,
    /// Display name.
    pub name: String,
    /// `strict` or `none`.
    pub ip_mode: String,
    /// Allowed CIDRs, canonical text.
    pub allowed_cidrs: Vec<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// SPKI PEM for private_key_jwt.
    pub public_key_pem: Option<String>,
    /// Whether it may authenticate.
    pub state: ClientState,
    /// Unix seconds before which issued tokens are refused.
    pub tokens_not_before: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A new or changed client, as the caller validated it.
#[derive(Debug, Clone)]
pub struct ClientFields {
    /// Display name.
    pub name: String,
    /// `strict` or `none`.
    pub ip_mode: String,
    /// Allowed CIDRs, canonical text.
    pub allowed_cidrs: Vec<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// SPKI PEM for private_key_jwt.
    pub public_key_pem: Option<String>,
}

/// What a request's access token needs checked against the database, in one query.
#[derive(Debug, Clone)]
pub struct ClientAuthState {
    /// The client as stored.
    pub client: ClientRow,
    /// Whether the token's jti is revoked.
    pub revoked: bool,
}

/// Why a client write was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientWriteError {
    /// Another active strict-mode client already has one of these addresses.
    #[error("an address is already registered to another active strict-mode client")]
    IpAlreadyRegistered,
    /// No such client.
    #[error("no such client")]
    NotFound,
    /// The change would leave no active client with the `admin` scope.
    #[error("this is the last active client with the admin scope")]
    LastAdmin,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether a client write may leave the broker with no active client holding `admin`. Through
/// the API never: the last administrator could lock everyone out of the API for good. An officer
/// at the CLI may, explicitly (`--allow-no-admin`), since the CLI needs no client to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminGuard {
    /// Refuse a change that removes the last active admin ([`ClientWriteError::LastAdmin`]).
    KeepOne,
    /// Allow it.
    AllowNone,
}

impl From<sqlx::Error> for ClientWriteError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err.into())
    }
}

/// Token `iat`s are whole seconds: `tokens_not_before` is rounded up, so a token issued in the
/// same second as a disable is refused too (its client asks again a second later).
pub(super) const CLIENT_COLUMNS: &str =
    "id, name, ip_mode, allowed_cidrs, scopes, public_key_pem, state,
    ceil(extract(epoch FROM tokens_not_before))::bigint AS tokens_not_before,
    floor(extract(epoch FROM created_at))::bigint AS created_at,
    floor(extract(epoch FROM updated_at))::bigint AS updated_at";

/// A client row and one more column.
#[derive(sqlx::FromRow)]
struct ClientWith<T> {
    #[sqlx(flatten)]
    client: ClientRow,
    extra: T,
}

impl Store {
    /// Whether any client exists (the bootstrap admin is made only on an empty table).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn any_client(&self) -> Result<bool, StoreError> {
        let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM clients)")
            .fetch_one(&self.pool)
            .await?;
        Ok(exists)
    }

    /// Inserts a client. In strict mode its addresses must not overlap those of another active
    /// strict-mode client; the check and the insert are one transaction under a table lock, so
    /// two registrations racing for one address cannot both win.
    ///
    /// # Errors
    /// [`ClientWriteError::IpAlreadyRegistered`], or any database failure.
    pub async fn insert_client(
        &self,
        id: uuid::Uuid,
        fields: &ClientFields,
        secret_mac: &[u8],
        meta: &AuditMeta,
    ) -> Result<ClientRow, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        check_ip_free(&mut tx, id, fields).await?;
        let row: ClientRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO clients (id, name, secret_mac, ip_mode, allowed_cidrs, scopes,
                                  public_key_pem, state)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'active') RETURNING {CLIENT_COLUMNS}"
        )))
        .bind(id)
        .bind(&fields.name)
        .bind(secret_mac)
        .bind(&fields.ip_mode)
        .bind(&fields.allowed_cidrs)
        .bind(&fields.scopes)
        .bind(&fields.public_key_pem)
        .fetch_one(&mut *tx)
        .await?;
        let event = client_event("client.registered", "info", id, fields);
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Client(id));
        Ok(row)
    }

    /// Replaces a client's fields (not its secret or state), with the same address check.
    ///
    /// # Errors
    /// [`ClientWriteError::NotFound`], [`ClientWriteError::IpAlreadyRegistered`], or any
    /// database failure.
    pub async fn update_client(
        &self,
        id: uuid::Uuid,
        fields: &ClientFields,
        guard: AdminGuard,
        meta: &AuditMeta,
    ) -> Result<ClientRow, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        let had_admin = any_active_admin(&mut tx).await?;
        let state: Option<(ClientState,)> =
            sqlx::query_as("SELECT state FROM clients WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (state,) = state.ok_or(ClientWriteError::NotFound)?;
        if state == ClientState::Active {
            check_ip_free(&mut tx, id, fields).await?;
        }
        let row: ClientRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE clients SET name = $2, ip_mode = $3, allowed_cidrs = $4, scopes = $5,
                    public_key_pem = $6, updated_at = now()
             WHERE id = $1 RETURNING {CLIENT_COLUMNS}"
        )))
        .bind(id)
        .bind(&fields.name)
        .bind(&fields.ip_mode)
        .bind(&fields.allowed_cidrs)
        .bind(&fields.scopes)
        .bind(&fields.public_key_pem)
        .fetch_one(&mut *tx)
        .await?;
        keep_an_admin(&mut tx, had_admin, guard).await?;
        let event = client_event("client.updated", "info", id, fields);
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Client(id));
        Ok(row)
    }

    /// Disables a client (its live tokens stop working at once, for good) or enables it again
    /// (after the same address check as a registration).
    ///
    /// # Errors
    /// [`ClientWriteError::NotFound`], [`ClientWriteError::IpAlreadyRegistered`], or any
    /// database failure.
    pub async fn set_client_active(
        &self,
        id: uuid::Uuid,
        active: bool,
        guard: AdminGuard,
        meta: &AuditMeta,
    ) -> Result<ClientRow, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        let had_admin = any_active_admin(&mut tx).await?;
        let current = client_in(&mut tx, id)
            .await?
            .ok_or(ClientWriteError::NotFound)?;
        if active {
            let fields = ClientFields {
                name: current.name.clone(),
                ip_mode: current.ip_mode.clone(),
                allowed_cidrs: current.allowed_cidrs.clone(),
                scopes: current.scopes.clone(),
                public_key_pem: current.public_key_pem.clone(),
            };
            check_ip_free(&mut tx, id, &fields).await?;
        }
        let sql = if active {
            "UPDATE clients SET state = 'active', updated_at = now() WHERE id = $1"
        } else {
            "UPDATE clients SET state = 'disabled', tokens_not_before = now(), updated_at = now()
             WHERE id = $1"
        };
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        keep_an_admin(&mut tx, had_admin, guard).await?;
        let row = client_in(&mut tx, id)
            .await?
            .ok_or(ClientWriteError::NotFound)?;
        let event = if active {
            NewAuditEvent::info("client.enabled")
        } else {
            NewAuditEvent::info("client.disabled").severity("warning")
        };
        let event = event.client(id).subject(id.to_string());
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Client(id));
        Ok(row)
    }

    /// Deletes a client and its revocation rows.
    ///
    /// # Errors
    /// [`ClientWriteError::NotFound`], or any database failure.
    pub async fn delete_client(
        &self,
        id: uuid::Uuid,
        guard: AdminGuard,
        meta: &AuditMeta,
    ) -> Result<(), ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        let had_admin = any_active_admin(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM clients WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(ClientWriteError::NotFound);
        }
        keep_an_admin(&mut tx, had_admin, guard).await?;
        sqlx::query("DELETE FROM used_assertions WHERE client_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let event = NewAuditEvent::info("client.deleted")
            .severity("warning")
            .client(id)
            .subject(id.to_string());
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Client(id));
        Ok(())
    }

    /// One client.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn client(&self, id: uuid::Uuid) -> Result<Option<ClientRow>, StoreError> {
        let row: Option<ClientRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// A client and its stored secret MAC, in one query (the token endpoint's cost must not
    /// depend on whether the client exists).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn client_secret_mac(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<(ClientRow, Vec<u8>)>, StoreError> {
        let row: Option<ClientWith<Vec<u8>>> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS}, secret_mac AS extra FROM clients WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.client, r.extra)))
    }

    /// A page of clients ordered by id, after `after`.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn clients(
        &self,
        after: Option<uuid::Uuid>,
        limit: i64,
    ) -> Result<Vec<ClientRow>, StoreError> {
        let rows: Vec<ClientRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS} FROM clients
             WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The client behind an access token and whether the token's jti is revoked: what every
    /// protected request checks, in one round trip.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn client_auth_state(
        &self,
        id: uuid::Uuid,
        jti: uuid::Uuid,
    ) -> Result<Option<ClientAuthState>, StoreError> {
        let row: Option<ClientWith<bool>> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS},
                    EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $2) AS extra
             FROM clients WHERE id = $1"
        )))
        .bind(id)
        .bind(jti)
        .fetch_optional(&self.pool)
        .await?;
        let row = row.map(|r| (r.client, r.extra));
        Ok(row.map(|(client, revoked)| ClientAuthState { client, revoked }))
    }

    /// Records a revoked token until `expires_at` (unix seconds).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn revoke_token(
        &self,
        jti: uuid::Uuid,
        client_id: uuid::Uuid,
        expires_at: i64,
        meta: &AuditMeta,
    ) -> Result<(), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, client_id, expires_at)
             VALUES ($1, $2, to_timestamp($3)) ON CONFLICT (jti) DO NOTHING",
        )
        .bind(jti)
        .bind(client_id)
        .bind(expires_at as f64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if revoked == 1 {
            let event = NewAuditEvent::info("token.revoked")
                .client(client_id)
                .subject(jti.to_string());
            audit::append(&mut tx, signer, meta, &[event]).await?;
        }
        tx.commit().await?;
        self.announce(AuthChange::Revoked(jti));
        Ok(())
    }

    /// Records a private_key_jwt assertion's jti; `false` when it was used before.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn use_assertion(
        &self,
        client_id: uuid::Uuid,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO used_assertions (client_id, jti, expires_at)
             VALUES ($1, $2, to_timestamp($3)) ON CONFLICT DO NOTHING",
        )
        .bind(client_id)
        .bind(jti)
        .bind(expires_at as f64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }
}

impl Store {
    /// Deletes revoked-token and used-assertion rows whose tokens have expired anyway.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn purge_expired_token_rows(&self, now: i64) -> Result<u64, StoreError> {
        let revoked = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < to_timestamp($1)")
            .bind(ts(now))
            .execute(&self.pool)
            .await?
            .rows_affected();
        let assertions =
            sqlx::query("DELETE FROM used_assertions WHERE expires_at < to_timestamp($1)")
                .bind(ts(now))
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(revoked + assertions)
    }
}

/// Whether any active client holds the `admin` scope.
pub(super) async fn any_active_admin(tx: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    let (any,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM clients WHERE state = 'active' AND 'admin' = ANY (scopes))",
    )
    .fetch_one(tx)
    .await?;
    Ok(any)
}

/// After a change inside the clients lock: refuses it (the caller drops the transaction, which
/// rolls it back) when there was an active admin before and there is none now. Only a change
/// that removes the last one is refused: with none to begin with, other clients stay
/// manageable.
pub(super) async fn keep_an_admin(
    tx: &mut sqlx::PgConnection,
    had_admin: bool,
    guard: AdminGuard,
) -> Result<(), ClientWriteError> {
    if guard == AdminGuard::KeepOne && had_admin && !any_active_admin(tx).await? {
        return Err(ClientWriteError::LastAdmin);
    }
    Ok(())
}

/// Serialises client writes: the address check and the last-admin check each read other rows,
/// so two writers racing must not both pass on what the other is about to change.
pub(super) async fn lock_clients(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("LOCK TABLE clients IN SHARE ROW EXCLUSIVE MODE")
        .execute(tx)
        .await
        .map(|_| ())
}

async fn client_in(
    tx: &mut sqlx::PgConnection,
    id: uuid::Uuid,
) -> Result<Option<ClientRow>, sqlx::Error> {
    let row: Option<ClientRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(tx)
    .await?;
    Ok(row)
}

/// In strict mode, refuses addresses that overlap (`&&`: contains or is contained by) those of
/// another active strict-mode client.
async fn check_ip_free(
    tx: &mut sqlx::PgConnection,
    id: uuid::Uuid,
    fields: &ClientFields,
) -> Result<(), ClientWriteError> {
    if fields.ip_mode != "strict" || fields.allowed_cidrs.is_empty() {
        return Ok(());
    }
    let (taken,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (
             SELECT 1 FROM clients c, unnest(c.allowed_cidrs) AS theirs
             WHERE c.id <> $1 AND c.state = 'active' AND c.ip_mode = 'strict'
               AND theirs::cidr && ANY ($2::cidr[]))",
    )
    .bind(id)
    .bind(&fields.allowed_cidrs)
    .fetch_one(tx)
    .await?;
    if taken {
        Err(ClientWriteError::IpAlreadyRegistered)
    } else {
        Ok(())
    }
}
