//! The changes that authentication depends on, as Postgres announces them (LISTEN/NOTIFY on the
//! channel the triggers of migration 0010 notify), and the reads that reload a node-local cache
//! of them. Knows nothing of what the cache does with them.

use std::sync::{RwLock, Weak};

use sqlx::postgres::{PgListener, PgPoolOptions};
use uuid::Uuid;

use super::clients::CLIENT_COLUMNS;
use super::{ClientRow, Store, StoreError};

/// The channel the triggers notify.
const AUTH_CHANNEL: &str = "keybroker_auth";
/// How the listener's connection shows in `pg_stat_activity`, for operators (and tests) to find.
pub const AUTH_LISTENER_APPLICATION: &str = "keybroker-auth-listener";

/// One change announced on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthChange {
    /// A client row was inserted, updated or deleted.
    Client(Uuid),
    /// An access token was revoked (its `jti`).
    Revoked(Uuid),
    /// The security settings changed.
    Settings,
    /// A source block was added, changed or lifted.
    Blocks,
    /// A payload this build does not know (a newer broker's): whoever hears it must assume
    /// anything may have changed.
    Unknown,
}

impl AuthChange {
    fn parse(payload: &str) -> Self {
        let id = |text: &str| Uuid::parse_str(text).ok();
        match payload.split_once(':') {
            Some(("client", text)) => id(text).map_or(Self::Unknown, Self::Client),
            Some(("revoked", text)) => id(text).map_or(Self::Unknown, Self::Revoked),
            None if payload == "settings" => Self::Settings,
            None if payload == "blocks" => Self::Blocks,
            _ => Self::Unknown,
        }
    }
}

/// Hears, synchronously, of each change this process commits, before the write returns. (The
/// NOTIFY of the same change reaches every broker, this one included, a moment later; without
/// this, a request that follows an officer's change on the same broker could beat it.)
pub trait AuthChangeSink: Send + Sync {
    /// Called after the change's transaction committed.
    fn changed(&self, change: AuthChange);
}

/// The sinks of one store (shared by its clones). Dead ones are dropped as they are found.
#[derive(Default)]
pub(super) struct LocalSinks(RwLock<Vec<Weak<dyn AuthChangeSink>>>);

/// A connection of its own (not one of the pool's) listening on the channel.
pub struct AuthListener {
    listener: PgListener,
}

impl AuthListener {
    /// The next change. `Ok(None)` when the connection was lost: notifications sent meanwhile
    /// are gone, so whoever listens must reload everything before trusting what it holds, and
    /// open a new listener (this one does not reconnect by itself).
    ///
    /// # Errors
    /// Any other failure of the connection (it should be dropped as well).
    pub async fn next(&mut self) -> Result<Option<AuthChange>, StoreError> {
        Ok(self
            .listener
            .try_recv()
            .await?
            .map(|n| AuthChange::parse(n.payload())))
    }

    /// Whether the connection still answers (one round trip; notifications that arrive
    /// meanwhile are kept for [`AuthListener::next`]).
    ///
    /// # Errors
    /// The connection failed, or did not answer within a few seconds.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        let ping = sqlx::query("SELECT 1").execute(&mut self.listener);
        match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
            Ok(result) => result.map(|_| ()).map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::ErrorKind::TimedOut.into(),
            ))),
        }
    }
}

impl Store {
    /// Makes `sink` hear of every change this process commits through this store or its clones,
    /// for as long as it lives.
    pub fn subscribe_auth_changes(&self, sink: Weak<dyn AuthChangeSink>) {
        let mut sinks = self
            .auth_sinks
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sinks.retain(|s| s.strong_count() > 0);
        sinks.push(sink);
    }

    /// Tells this process's sinks of a change just committed.
    pub(super) fn announce(&self, change: AuthChange) {
        let sinks = self
            .auth_sinks
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for sink in sinks.iter().filter_map(Weak::upgrade) {
            sink.changed(change);
        }
    }

    /// Opens a dedicated connection and listens on the channel. Everything committed after this
    /// returns is announced on it.
    ///
    /// # Errors
    /// An outage.
    pub async fn listen_auth_changes(&self) -> Result<AuthListener, StoreError> {
        let options = (*self.pool.connect_options())
            .clone()
            .application_name(AUTH_LISTENER_APPLICATION);
        // A pool of one that never reconnects by itself: a lost connection must be seen.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        listener.listen(AUTH_CHANNEL).await?;
        Ok(AuthListener { listener })
    }

    /// The `jti` of every revoked token that has not expired yet.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn revoked_token_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        let ids = sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE expires_at > now()")
            .fetch_all(&self.pool)
            .await?;
        Ok(ids)
    }

    /// The clients among `ids` that exist.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn clients_by_id(&self, ids: &[Uuid]) -> Result<Vec<ClientRow>, StoreError> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = ANY($1)"
        )))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_anything_else_is_unknown() {
        let id = Uuid::new_v4();
        assert_eq!(
            AuthChange::parse(&format!("client:{id}")),
            AuthChange::Client(id)
        );
        assert_eq!(
            AuthChange::parse(&format!("revoked:{id}")),
            AuthChange::Revoked(id)
        );
        assert_eq!(AuthChange::parse("settings"), AuthChange::Settings);
        assert_eq!(AuthChange::parse("blocks"), AuthChange::Blocks);
        for other in [
            "",
            "client:",
            "client:nope",
            "revoked",
            "settings:1",
            "keys",
        ] {
            assert_eq!(AuthChange::parse(other), AuthChange::Unknown, "{other}");
        }
    }
}
