//! `store` owns Postgres and is the only user of `sqlx`: the pool, the embedded migrations and one
//! function per query. It never calls the token.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::crypto::MasterKeyVersion;

mod audit;
mod clients;
mod console;
mod error;
mod keys;
mod master_keys;
mod notify;
mod request_log;
mod rewrap;
mod secrets;
mod security;
mod signing_keys;
mod states;
mod usage;

pub use audit::{AuditFilter, AuditMeta, AuditRow, AuditSigner, NewAuditEvent};
pub use clients::{AdminGuard, ClientAuthState, ClientFields, ClientRow, ClientWriteError};
pub use console::ConsoleSessionRow;
pub use error::{ItemWriteError, StoreError, Violation};
pub use keys::{KeyRow, KeyVersionRow, NewKey, ROTATION_CLAIM_SECS, RotationRow};
pub use master_keys::{ClusterLock, MasterKeyChangeError, MasterKeyRow, MasterKeyStatus};
pub use notify::{AUTH_LISTENER_APPLICATION, AuthChange, AuthChangeSink, AuthListener};
pub use request_log::RequestLogRow;
pub use rewrap::{
    KeyBlob, RewrapBatch, RewrapJob, RewrapStart, RewrappedKey, RewrappedSecret, SecretBlob,
};
pub use secrets::{NewSecretVersion, SecretRow, SecretVersionRow};
pub use security::SourceBlock;
pub use signing_keys::SigningKeyRow;
pub use states::{
    ClientState, KeyState, MasterKeyState, RewrapJobState, SecretState, SigningKeyState,
    UnknownState,
};
pub use usage::UsageRow;

/// The connection pool and the audit signer. Cheap to clone (clones share both).
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    audit_signer: Arc<OnceLock<Arc<dyn AuditSigner>>>,
    auth_sinks: Arc<notify::LocalSinks>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Makes a pool that connects on first use, so that a broker started while Postgres is down
    /// comes up, reports not-ready, and recovers by itself.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the URL cannot be parsed.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Self {
            pool,
            audit_signer: Arc::new(OnceLock::new()),
            auth_sinks: Arc::default(),
        })
    }

    /// Applies the migrations in `migrations/` (embedded at build time).
    ///
    /// # Errors
    /// [`StoreError::Migrate`] or an outage.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Checks that Postgres answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

fn to_version(n: i32) -> Result<MasterKeyVersion, StoreError> {
    MasterKeyVersion::from_stored(n).ok_or(StoreError::Corrupt("master key version out of range"))
}

fn from_version(v: MasterKeyVersion) -> Result<i32, StoreError> {
    i32::try_from(v.get()).map_err(|_| StoreError::Corrupt("master key version out of range"))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
