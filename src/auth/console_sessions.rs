//! The officer console's sessions: begun after a sign-in, found again (and kept alive) on each
//! request, ended at sign-out or when their client is gone. Only digests of session ids reach
//! Postgres, through `store`; the cookie and HTTP are the console's (`api::console`).

use super::{AuthError, Authenticator};
use crate::store::ConsoleSessionRow;

/// Whole seconds of `d`, for the store's interval arguments.
fn seconds(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Authenticator {
    /// Begins a session whose id has the SHA-256 `id_sha256`, for `client_id`, with its CSRF
    /// token; it lasts the configured idle and absolute times.
    ///
    /// # Errors
    /// An outage.
    pub async fn begin_console_session(
        &self,
        id_sha256: &[u8; 32],
        client_id: uuid::Uuid,
        csrf_token: &str,
    ) -> Result<(), AuthError> {
        Ok(self
            .store
            .create_console_session(
                id_sha256,
                client_id,
                csrf_token,
                seconds(self.config.console_idle),
                seconds(self.config.console_absolute),
            )
            .await?)
    }

    /// The live session with this id digest, its idle time restarted; `None` when there is
    /// none, or it timed out.
    ///
    /// # Errors
    /// An outage.
    pub async fn touch_console_session(
        &self,
        id_sha256: &[u8; 32],
    ) -> Result<Option<ConsoleSessionRow>, AuthError> {
        Ok(self
            .store
            .touch_console_session(
                id_sha256,
                seconds(self.config.console_idle),
                seconds(self.config.console_absolute),
            )
            .await?)
    }

    /// Ends the session with this id digest on every broker at once; whether there was one.
    ///
    /// # Errors
    /// An outage.
    pub async fn end_console_session(&self, id_sha256: &[u8; 32]) -> Result<bool, AuthError> {
        Ok(self.store.delete_console_session(id_sha256).await?)
    }
}
