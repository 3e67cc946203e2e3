//! Token-signing key versions: which one signs, and until when a replaced one stays published.

use super::audit::{self, AuditMeta, NewAuditEvent};
use super::{SigningKeyState, Store, StoreError};

/// One signing key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    /// The version (`keybroker-sign-v<version>` on the token).
    pub version: u32,
    /// Its state.
    pub state: SigningKeyState,
    /// Unix seconds until which a retiring key stays in the JWKS and verifies tokens.
    pub published_until: Option<i64>,
}

impl Store {
    /// Every signing key version, ascending.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>, StoreError> {
        let rows: Vec<(i32, SigningKeyState, Option<f64>)> = sqlx::query_as(
            "SELECT version, state, extract(epoch FROM published_until)::float8
             FROM signing_keys ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(version, state, until)| {
                Ok(SigningKeyRow {
                    version: u32::try_from(version)
                        .map_err(|_| StoreError::Corrupt("signing key version"))?,
                    state,
                    published_until: until.map(|t| t as i64),
                })
            })
            .collect()
    }

    /// Records the signing keys found on the token when none is recorded yet (a database that
    /// predates versioned signing keys, or a fresh one): the highest signs, the others are
    /// retired. Running it again changes nothing.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn adopt_signing_keys(&self, versions: &[u32]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let (recorded,): (i64,) = sqlx::query_as("SELECT count(*) FROM signing_keys")
            .fetch_one(&mut *tx)
            .await?;
        if recorded == 0
            && let Some(highest) = versions.iter().max()
        {
            for version in versions {
                sqlx::query(
                    "INSERT INTO signing_keys (version, token_label, state) VALUES ($1, $2, $3)",
                )
                .bind(i32::try_from(*version).map_err(|_| StoreError::Corrupt("version"))?)
                .bind(crate::hsm::signing_key_label(*version))
                .bind(if version == highest {
                    SigningKeyState::Active
                } else {
                    SigningKeyState::Retired
                })
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Makes `version` (already on the token) the signing key; the previous one stays published
    /// until `published_until` (unix seconds), when every token it signed has expired.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn activate_signing_key(
        &self,
        version: u32,
        published_until: i64,
        meta: &AuditMeta,
    ) -> Result<(), StoreError> {
        let signer = self.signer()?;
        let mut tx = self.pool.begin().await?;
        let previous: Option<(i32,)> = sqlx::query_as(
            "UPDATE signing_keys SET state = 'retiring', published_until = to_timestamp($1)
             WHERE state = 'active' RETURNING version",
        )
        .bind(published_until as f64)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO signing_keys (version, token_label, state) VALUES ($1, $2, 'active')",
        )
        .bind(i32::try_from(version).map_err(|_| StoreError::Corrupt("version"))?)
        .bind(crate::hsm::signing_key_label(version))
        .execute(&mut *tx)
        .await?;
        let event = NewAuditEvent::info("signing_key.rotated")
            .subject(crate::hsm::signing_key_label(version))
            .details(serde_json::json!({
                "version": version,
                "previous": previous.map(|(v,)| v),
                "previous_published_until": published_until,
            }));
        audit::append(&mut tx, signer, meta, &[event]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Retires the replaced signing keys whose tokens have all expired by `now`; returns how
    /// many.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn retire_signing_keys(&self, now: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE signing_keys SET state = 'retired'
             WHERE state = 'retiring' AND published_until <= to_timestamp($1)",
        )
        .bind(now as f64)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
