//! Security settings (rate limits, automatic response), blocked sources and the counts the
//! automatic response decides on.

use uuid::Uuid;

use super::audit::append;
use super::clients::{any_active_admin, keep_an_admin, lock_clients};
use super::keys::ts;
use super::{
    AdminGuard, AuditMeta, AuthChange, ClientWriteError, NewAuditEvent, Store, StoreError,
};

/// Addresses an officer chose to block with a lockdown, until when (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceBlock {
    /// CIDRs, canonical text, already checked against the client's own networks.
    pub cidrs: Vec<String>,
    /// Unix seconds at which the block ends by itself.
    pub until: i64,
}

impl Store {
    /// The stored settings JSON, if an officer set any.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn security_settings(&self) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM security_settings")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(v,)| v))
    }

    /// Replaces the settings (canonical JSON), with an audit event.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn put_security_settings(
        &self,
        json: &str,
        meta: &AuditMeta,
    ) -> Result<(), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO security_settings (singleton, value, updated_at) VALUES (true, $1, now())
             ON CONFLICT (singleton) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        )
        .bind(json)
        .execute(&mut *tx)
        .await?;
        let details: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let event = NewAuditEvent::info("security_settings.changed").details(details);
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Settings);
        Ok(())
    }

    /// Sources blocked at `now` (unix seconds), as CIDR text.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn blocked_sources(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT cidr FROM blocked_sources WHERE until > to_timestamp($1)",
        )
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(c,)| c).collect())
    }

    /// Lockdown, in one transaction: the client is disabled (every live token refused from the
    /// next request on), and a critical audit event records it. Blocking addresses is a separate
    /// choice: `block`, when given, blocks those networks (the caller checked they lie within
    /// the client's own) until its end. Returns what was blocked.
    ///
    /// # Errors
    /// [`ClientWriteError::NotFound`], [`ClientWriteError::LastAdmin`], or any database failure.
    pub async fn lock_down_client(
        &self,
        id: Uuid,
        reason: &str,
        block: Option<&SourceBlock>,
        guard: AdminGuard,
        meta: &AuditMeta,
    ) -> Result<Vec<String>, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        let had_admin = any_active_admin(&mut tx).await?;
        let changed = sqlx::query(
            "UPDATE clients SET state = 'disabled', tokens_not_before = now(), updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(ClientWriteError::NotFound);
        }
        keep_an_admin(&mut tx, had_admin, guard).await?;
        let blocked = block.map(|b| b.cidrs.clone()).unwrap_or_default();
        if let Some(block) = block {
            sqlx::query(
                "INSERT INTO blocked_sources (cidr, reason, client_id, until)
                 SELECT c, $2, $3, to_timestamp($4) FROM unnest($1::text[]) AS c",
            )
            .bind(&block.cidrs)
            .bind(reason)
            .bind(id)
            .bind(ts(block.until))
            .execute(&mut *tx)
            .await?;
        }
        let event = NewAuditEvent::info("client.lockdown")
            .severity("critical")
            .client(id)
            .subject(id.to_string())
            .details(serde_json::json!({
                "reason": reason,
                "blocked": blocked,
                "blocked_until": block.map(|b| b.until),
            }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Client(id));
        if block.is_some() {
            self.announce(AuthChange::Blocks);
        }
        Ok(blocked)
    }

    /// Lifts the blocks of a client's lockdown (its addresses); the client stays disabled
    /// until enabled.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn unblock_client_sources(
        &self,
        id: Uuid,
        meta: &AuditMeta,
    ) -> Result<u64, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let lifted = sqlx::query("DELETE FROM blocked_sources WHERE client_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let event = NewAuditEvent::info("client.unblocked")
            .severity("warning")
            .client(id)
            .subject(id.to_string())
            .details(serde_json::json!({ "lifted": lifted }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        self.announce(AuthChange::Blocks);
        Ok(lifted)
    }

    /// How many refusals made to an authenticated caller (denied unwraps, address mismatches
    /// with valid credentials) the audit trail holds for `client` since `since_us`. Failed
    /// authentications do not count: anyone who knows a client id can fail to authenticate as
    /// it, and must not be able to switch it off that way (they are throttled instead).
    ///
    /// # Errors
    /// Any database failure.
    pub async fn security_refusals(&self, client: Uuid, since_us: i64) -> Result<i64, StoreError> {
        // Refusals before the client was last enabled do not count again, and a batch's
        // event counts each refused item.
        let (count,): (i64,) = sqlx::query_as(
            "SELECT coalesce(sum(coalesce((details::jsonb ->> 'refused')::bigint, 1)), 0)::bigint
             FROM audit_events
             WHERE client_id = $1
               AND at_us >= greatest($2, coalesce((SELECT max(at_us) FROM audit_events
                                                  WHERE client_id = $1
                                                    AND event = 'client.enabled'), 0) + 1)
               AND event IN ('unauthorized_key_access', 'ip_mismatch')",
        )
        .bind(client)
        .bind(since_us)
        .fetch_one(&self.pool)
        .await?;
        Ok(count)
    }

    /// Disables a client automatically, with a critical audit event saying why. Returns false
    /// when it was not active (nothing done).
    ///
    /// # Errors
    /// [`ClientWriteError::LastAdmin`] (nothing done: the last admin is never switched off
    /// automatically), or any database failure.
    pub async fn auto_disable_client(
        &self,
        id: Uuid,
        refusals: i64,
        window_secs: u64,
        meta: &AuditMeta,
    ) -> Result<bool, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        lock_clients(&mut tx).await?;
        let had_admin = any_active_admin(&mut tx).await?;
        let changed = sqlx::query(
            "UPDATE clients SET state = 'disabled', tokens_not_before = now(), updated_at = now()
             WHERE id = $1 AND state = 'active'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        keep_an_admin(&mut tx, had_admin, AdminGuard::KeepOne).await?;
        if changed == 1 {
            let event = NewAuditEvent::info("client.auto_disabled")
                .severity("critical")
                .client(id)
                .subject(id.to_string())
                .details(serde_json::json!({
                    "refusals": refusals,
                    "window_secs": window_secs,
                }));
            append(&mut tx, signer, meta, &[event]).await?;
        }
        tx.commit().await?;
        if changed == 1 {
            self.announce(AuthChange::Client(id));
        }
        Ok(changed == 1)
    }
}
