//! Security settings (rate limits, automatic response), blocked sources and the counts the
//! automatic response decides on.

use uuid::Uuid;

use super::audit::append;
use super::keys::ts;
use super::{AuditMeta, ClientWriteError, NewAuditEvent, Store, StoreError};

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
        Ok(())
    }

    /// Sources blocked at `now` (unix seconds), as CIDR text.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn blocked_sources(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT cidr FROM blocked_sources
             WHERE until IS NULL OR until > to_timestamp($1)",
        )
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(c,)| c).collect())
    }

    /// Lockdown, in one transaction: the client is disabled (every live token refused from the
    /// next request on), its registered addresses are blocked until an officer lifts the block,
    /// and a critical audit event records it.
    ///
    /// # Errors
    /// [`ClientWriteError::NotFound`], or any database failure.
    pub async fn lock_down_client(
        &self,
        id: Uuid,
        reason: &str,
        meta: &AuditMeta,
    ) -> Result<Vec<String>, ClientWriteError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let cidrs: Option<(Vec<String>,)> = sqlx::query_as(
            "UPDATE clients SET state = 'disabled', tokens_not_before = now(), updated_at = now()
             WHERE id = $1 RETURNING allowed_cidrs",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let (cidrs,) = cidrs.ok_or(ClientWriteError::NotFound)?;
        for cidr in &cidrs {
            sqlx::query(
                "INSERT INTO blocked_sources (cidr, reason, client_id) VALUES ($1, $2, $3)",
            )
            .bind(cidr)
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let event = NewAuditEvent::info("client.lockdown")
            .severity("critical")
            .client(id)
            .subject(id.to_string())
            .details(serde_json::json!({ "reason": reason, "blocked": cidrs }));
        append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(cidrs)
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
        Ok(lifted)
    }

    /// How many refusals (denied unwraps, address mismatches, authentication failures) the
    /// audit trail holds for `client` since `since_us`.
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
               AND event IN ('unauthorized_key_access', 'ip_mismatch', 'auth.failed')",
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
    /// Any database failure.
    pub async fn auto_disable_client(
        &self,
        id: Uuid,
        refusals: i64,
        window_secs: u64,
        meta: &AuditMeta,
    ) -> Result<bool, StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE clients SET state = 'disabled', tokens_not_before = now(), updated_at = now()
             WHERE id = $1 AND state = 'active'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
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
        Ok(changed == 1)
    }
}
