//! The store's errors: what went wrong in Postgres, and the one place that names the constraints
//! a request can violate.

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
    /// A value from the caller is text Postgres cannot store (a NUL character, in `text` or in
    /// `jsonb`): the caller's mistake, not the database's.
    #[error("text fields cannot contain NUL characters")]
    UnstorableText(#[source] sqlx::Error),
    /// A row holds a value this build cannot represent.
    #[error("the database holds an invalid value: {0}")]
    Corrupt(&'static str),
    /// No audit signer was installed, so an audited write cannot be recorded.
    #[error("no audit signer is installed")]
    NoAuditSigner,
    /// The token could not MAC an audit event (so the change it records is not made either).
    #[error("the audit event could not be signed")]
    AuditSign(#[source] crate::hsm::HsmError),
}

impl StoreError {
    /// Whether Postgres itself is unreachable (as opposed to a query being wrong).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the token, not Postgres, failed (an audit MAC could not be made).
    pub fn hsm_failure(&self) -> Option<&crate::hsm::HsmError> {
        match self {
            Self::AuditSign(e) => Some(e),
            _ => None,
        }
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
        // 22021: a NUL byte in a text parameter; 22P05: `\u0000` in jsonb.
        let unstorable = matches!(&err, sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c == "22021" || c == "22P05"));
        if unavailable {
            Self::Unavailable(err)
        } else if unstorable {
            Self::UnstorableText(err)
        } else {
            Self::Query(err)
        }
    }
}

/// Why a write to a managed key or secret was refused.
#[derive(Debug, thiserror::Error)]
pub enum ItemWriteError {
    /// The client already has a live item of that name.
    #[error("the name is taken")]
    NameTaken,
    /// No such item for this client.
    #[error("no such item")]
    NotFound,
    /// The item is not in a state that allows the change (the current state is given).
    #[error("the item is {0}")]
    WrongState(String),
    /// Another writer changed the item first (e.g. a concurrent rotation).
    #[error("the item changed concurrently")]
    Conflict,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ItemWriteError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            return Self::NameTaken;
        }
        Self::Store(err.into())
    }
}
