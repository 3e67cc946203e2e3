//! The store's errors: what went wrong in Postgres, and [`Violation::of`], the one place that
//! names the constraints a request can violate.

use super::states::UnknownState;

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
    /// A row holds a state this build does not know.
    #[error("the database holds an invalid value: {0}")]
    UnknownState(#[from] UnknownState),
    /// A write broke a named constraint that a request can break (see [`Violation`]).
    #[error("{0}")]
    Violated(Violation, #[source] sqlx::Error),
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

/// A named constraint that a request can break, by what it means. A constraint not named here
/// stays a [`StoreError::Query`]: an internal error, never guessed to be one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// `keys_name_per_client`: the client already has a live managed key of that name.
    #[error("the client has a live key of that name")]
    KeyNameTaken,
    /// `secrets_name_per_client`: the client already has a live secret of that name (another
    /// writer created it first).
    #[error("the client has a live secret of that name")]
    SecretNameTaken,
    /// `master_keys_pkey`, `master_keys_token_label_key`, `master_keys_one_pending`,
    /// `master_keys_one_active`: another broker recorded that version, or another pending or
    /// active one, first (rotations run under a cluster lock, so this means a bug or a hand
    /// edit).
    #[error("another master key version was recorded first")]
    MasterKeyRecorded,
    /// `signing_keys_pkey`, `signing_keys_token_label_key`, `signing_keys_one_active`: as
    /// [`Violation::MasterKeyRecorded`], for signing keys.
    #[error("another signing key version was recorded first")]
    SigningKeyRecorded,
    /// `rewrap_jobs_one_running`: another rewrap job is running (starts run under a lock).
    #[error("another rewrap job is running")]
    RewrapJobRunning,
    /// `console_sessions_client_id_fkey`: the client was deleted while a console session was
    /// being opened for it.
    #[error("the client no longer exists")]
    ClientGone,
    /// A CHECK on a value the caller chose (the error's source names the constraint). The layers
    /// above validate these first, so reaching one means their validation and the schema
    /// disagree.
    #[error("the database refused a value")]
    ValueRefused,
}

/// Every constraint a request can break, by name, with what breaking it means. The names are
/// Postgres's: `<table>_<column>_check`, `<table>_<column>_key`, `<table>_pkey`, or the index's
/// own name for a unique index.
const CONSTRAINTS: &[(&str, Violation)] = &[
    ("keys_name_per_client", Violation::KeyNameTaken),
    ("secrets_name_per_client", Violation::SecretNameTaken),
    ("master_keys_pkey", Violation::MasterKeyRecorded),
    ("master_keys_token_label_key", Violation::MasterKeyRecorded),
    ("master_keys_one_pending", Violation::MasterKeyRecorded),
    ("master_keys_one_active", Violation::MasterKeyRecorded),
    ("signing_keys_pkey", Violation::SigningKeyRecorded),
    (
        "signing_keys_token_label_key",
        Violation::SigningKeyRecorded,
    ),
    ("signing_keys_one_active", Violation::SigningKeyRecorded),
    ("rewrap_jobs_one_running", Violation::RewrapJobRunning),
    ("console_sessions_client_id_fkey", Violation::ClientGone),
    ("clients_name_check", Violation::ValueRefused),
    ("keys_name_check", Violation::ValueRefused),
    ("keys_length_check", Violation::ValueRefused),
    ("keys_rotation_period_days_check", Violation::ValueRefused),
    // The table's unnamed CHECK: `auto` rotation needs a period.
    ("keys_check", Violation::ValueRefused),
    ("secrets_name_check", Violation::ValueRefused),
    ("request_log_user_agent_check", Violation::ValueRefused),
];

impl Violation {
    /// What breaking `constraint` means; `None` for a constraint no request should break.
    pub fn of(constraint: &str) -> Option<Self> {
        CONSTRAINTS
            .iter()
            .find(|(name, _)| *name == constraint)
            .map(|(_, violation)| *violation)
    }

    /// Every constraint name [`Violation::of`] knows (a test checks the schema has each).
    pub fn constraint_names() -> impl Iterator<Item = &'static str> {
        CONSTRAINTS.iter().map(|(name, _)| *name)
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
        // A state column holding text no enum variant has (see `states`).
        if let sqlx::Error::ColumnDecode { source, .. } = &err
            && let Some(unknown) = source.downcast_ref::<UnknownState>()
        {
            return Self::UnknownState(unknown.clone());
        }
        let violation = match &err {
            sqlx::Error::Database(db) => db.constraint().and_then(Violation::of),
            _ => None,
        };
        if let Some(violation) = violation {
            Self::Violated(violation, err)
        } else if unavailable {
            Self::Unavailable(err)
        } else if unstorable {
            Self::UnstorableText(err)
        } else {
            Self::Query(err)
        }
    }
}

/// Why a write to a managed key (`S` = [`KeyState`]) or a secret (`S` = [`SecretState`]) was
/// refused. A name already taken is a [`StoreError::Violated`] inside [`ItemWriteError::Store`].
///
/// [`KeyState`]: super::KeyState
/// [`SecretState`]: super::SecretState
#[derive(Debug, thiserror::Error)]
pub enum ItemWriteError<S> {
    /// No such item for this client.
    #[error("no such item")]
    NotFound,
    /// The item is not in a state that allows the change (its current state is given).
    #[error("the item is {0}")]
    WrongState(S),
    /// Another writer changed the item first (e.g. a concurrent rotation).
    #[error("the item changed concurrently")]
    Conflict,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<S> ItemWriteError<S> {
    /// Whether the write broke `violation`.
    pub fn violated(&self, violation: Violation) -> bool {
        matches!(self, Self::Store(StoreError::Violated(v, _)) if *v == violation)
    }
}

impl<S> From<sqlx::Error> for ItemWriteError<S> {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_are_classified_by_name_and_unknown_ones_stay_internal() {
        assert_eq!(
            Violation::of("keys_name_per_client"),
            Some(Violation::KeyNameTaken)
        );
        assert_eq!(
            Violation::of("secrets_name_per_client"),
            Some(Violation::SecretNameTaken)
        );
        assert_eq!(
            Violation::of("keys_length_check"),
            Some(Violation::ValueRefused)
        );
        // Not guessed from a resemblance: a unique violation elsewhere is not a name taken.
        assert_eq!(Violation::of("key_versions_pkey"), None);
        assert_eq!(Violation::of("keys_name_per_client2"), None);
        assert_eq!(Violation::of(""), None);
        let names: Vec<&str> = Violation::constraint_names().collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(names.len(), unique.len(), "each constraint is named once");
    }
}
