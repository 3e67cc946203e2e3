//! `store` owns Postgres and is the only user of `sqlx`: the pool, the embedded migrations and one
//! function per query. It never calls the token.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::crypto::MasterKeyVersion;

/// What went wrong in Postgres.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres cannot be reached (refused, reset, pool timed out, shutting down).
    #[error("the database is unreachable")]
    Unavailable(#[source] sqlx::Error),
    /// Postgres answered with an error.
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
    /// The migrations could not be applied.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// No master-key version is active: `keybroker hsm init` has not run on this database.
    #[error("no master key version is active")]
    NoActiveMasterKey,
    /// A row holds a value this build cannot represent.
    #[error("the database holds an invalid value: {0}")]
    Corrupt(&'static str),
}

impl StoreError {
    /// Whether Postgres itself is unreachable (as opposed to a query being wrong).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            // SQLSTATE class 08 (connection exception), 57P01-57P03 (shutting down or starting
            // up) and 53300 (too many connections) are outages, not bad queries.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
            _ => false,
        };
        if unavailable {
            Self::Unavailable(err)
        } else {
            Self::Query(err)
        }
    }
}

/// A master-key row, as `hsm status` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRow {
    /// The version.
    pub version: MasterKeyVersion,
    /// `active`, `decrypt_only`, `retired` or `destroyed`.
    pub state: String,
    /// Upper bound on the seals done under this version.
    pub seals_reserved: i64,
    /// Creation time, RFC 3339.
    pub created_at: String,
}

/// The connection pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
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
        Ok(Self { pool })
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

    /// Every master-key version recorded, ascending.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn master_keys(&self) -> Result<Vec<MasterKeyRow>, StoreError> {
        let rows: Vec<(i32, String, i64, String)> = sqlx::query_as(
            "SELECT version, state, seals_reserved,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM master_keys ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(version, state, seals_reserved, created_at)| {
                Ok(MasterKeyRow {
                    version: to_version(version)?,
                    state,
                    seals_reserved,
                    created_at,
                })
            })
            .collect()
    }

    /// Records the master-key versions found on the token that this database does not know yet
    /// (a fresh database on an initialised token), and makes the highest one active when none is.
    /// Running it again changes nothing.
    ///
    /// # Errors
    /// Any database failure.
    pub async fn adopt_master_keys(&self, versions: &[MasterKeyVersion]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Serialise with other brokers doing the same at start-up.
        sqlx::query("LOCK TABLE master_keys IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        for version in versions {
            sqlx::query(
                "INSERT INTO master_keys (version, token_label, state)
                 VALUES ($1, $2, 'decrypt_only') ON CONFLICT (version) DO NOTHING",
            )
            .bind(from_version(*version)?)
            .bind(version.token_label())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE master_keys SET state = 'active', activated_at = now()
             WHERE version = (SELECT max(version) FROM master_keys WHERE state = 'decrypt_only')
               AND NOT EXISTS (SELECT 1 FROM master_keys WHERE state = 'active')",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records `version` (already created on the token) and makes it the active one; the
    /// previous active version becomes decrypt-only.
    ///
    /// # Errors
    /// Any database failure, e.g. a version that is already recorded.
    pub async fn activate_new_master_key(
        &self,
        version: MasterKeyVersion,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE master_keys SET state = 'decrypt_only' WHERE state = 'active'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO master_keys (version, token_label, state, activated_at)
             VALUES ($1, $2, 'active', now())",
        )
        .bind(from_version(version)?)
        .bind(version.token_label())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Hands back `unused` seals reserved under a version earlier, then reserves `want` seals
    /// under the active version, in one transaction. Returns the active version.
    ///
    /// # Errors
    /// [`StoreError::NoActiveMasterKey`], or any database failure.
    pub async fn reserve_seals(
        &self,
        unused: Option<(MasterKeyVersion, u64)>,
        want: u64,
    ) -> Result<MasterKeyVersion, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some((version, count)) = unused.filter(|(_, count)| *count > 0) {
            sqlx::query(
                "UPDATE master_keys SET seals_reserved = greatest(seals_reserved - $2, 0)
                 WHERE version = $1",
            )
            .bind(from_version(version)?)
            .bind(to_i64(count))
            .execute(&mut *tx)
            .await?;
        }
        let active: Option<(i32,)> = sqlx::query_as(
            "UPDATE master_keys SET seals_reserved = seals_reserved + $1
             WHERE state = 'active' RETURNING version",
        )
        .bind(to_i64(want))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let (version,) = active.ok_or(StoreError::NoActiveMasterKey)?;
        to_version(version)
    }
}

fn to_version(n: i32) -> Result<MasterKeyVersion, StoreError> {
    u32::try_from(n)
        .ok()
        .and_then(MasterKeyVersion::new)
        .ok_or(StoreError::Corrupt("master key version out of range"))
}

fn from_version(v: MasterKeyVersion) -> Result<i32, StoreError> {
    i32::try_from(v.get()).map_err(|_| StoreError::Corrupt("master key version out of range"))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
