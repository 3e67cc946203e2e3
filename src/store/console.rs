//! Sessions of the officer's console: created at sign-in, checked (and their idle clock reset)
//! on every console request, deleted at sign-out. Only a SHA-256 of the session id is stored.
//! Expiry is decided here, in SQL, against the database's clock, so every broker agrees.

use uuid::Uuid;

use super::{Store, StoreError};

/// A live console session, as [`Store::touch_console_session`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSessionRow {
    /// The officer's client.
    pub client_id: Uuid,
    /// The session's CSRF token.
    pub csrf_token: String,
    /// When the session began (unix seconds).
    pub created_at: i64,
}

impl Store {
    /// Records a new session, and forgets every session that has expired by either clock (so
    /// the table holds only live sessions and the few that died since the last sign-in).
    ///
    /// # Errors
    /// Any database failure (a client deleted meanwhile fails the foreign key).
    pub async fn create_console_session(
        &self,
        id_sha256: &[u8; 32],
        client_id: Uuid,
        csrf_token: &str,
        idle_secs: i64,
        absolute_secs: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM console_sessions
             WHERE last_seen_at <= now() - make_interval(secs => $1)
                OR created_at <= now() - make_interval(secs => $2)",
        )
        .bind(idle_secs as f64)
        .bind(absolute_secs as f64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, client_id, csrf_token) VALUES ($1, $2, $3)",
        )
        .bind(&id_sha256[..])
        .bind(client_id)
        .bind(csrf_token)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The session with this id hash if it is still live (used within `idle_secs` and begun
    /// within `absolute_secs`), its idle clock reset by this use; `None` otherwise. An expired
    /// session's row is deleted on the spot.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn touch_console_session(
        &self,
        id_sha256: &[u8; 32],
        idle_secs: i64,
        absolute_secs: i64,
    ) -> Result<Option<ConsoleSessionRow>, StoreError> {
        let row: Option<(Uuid, String, f64)> = sqlx::query_as(
            "UPDATE console_sessions SET last_seen_at = now()
             WHERE id_sha256 = $1
               AND last_seen_at > now() - make_interval(secs => $2)
               AND created_at > now() - make_interval(secs => $3)
             RETURNING client_id, csrf_token, extract(epoch FROM created_at)::float8",
        )
        .bind(&id_sha256[..])
        .bind(idle_secs as f64)
        .bind(absolute_secs as f64)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((client_id, csrf_token, created_at)) => Ok(Some(ConsoleSessionRow {
                client_id,
                csrf_token,
                created_at: created_at as i64,
            })),
            None => {
                self.delete_console_session(id_sha256).await?;
                Ok(None)
            }
        }
    }

    /// Ends a session (sign-out, or found expired). Returns whether there was one.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn delete_console_session(&self, id_sha256: &[u8; 32]) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
            .bind(&id_sha256[..])
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
