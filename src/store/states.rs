//! The persisted states, one enum per table that has a `state` column, and their conversion to
//! and from the Postgres text column: the only place that spells a state's text. Each enum
//! lists exactly what its table's CHECK constraint allows (`tests/it/states.rs` compares them).

use sqlx::Postgres;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};

/// Postgres holds a state this build does not know (a newer build wrote it, or a hand edit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state {value:?}")]
pub struct UnknownState {
    /// Which state: `client`, `key`, ...
    pub kind: &'static str,
    /// The text found.
    pub value: String,
}

/// Defines a state enum with its text, `FromStr`, `Display`, and its sqlx text encoding.
macro_rules! stored_state {
    (
        $(#[$meta:meta])*
        $name:ident ($kind:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every state, in the order the CHECK constraint lists them.
            pub const ALL: &'static [Self] = &[$( Self::$variant ),+];

            /// The stored text (also what the API and the CLI show).
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }

            /// From the stored text; `None` for text this build does not know.
            pub fn parse(text: &str) -> Option<Self> {
                text.parse().ok()
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;

            fn from_str(text: &str) -> Result<Self, UnknownState> {
                match text {
                    $( $text => Ok(Self::$variant), )+
                    other => Err(UnknownState { kind: $kind, value: other.to_owned() }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // `pad`, not `write_str`: the CLI's tables give states a width.
                f.pad(self.as_str())
            }
        }

        // Stored as plain `text` (not a Postgres enum type), so the column, its CHECK and SQL
        // literals such as `state = 'active'` stay as the migrations made them.
        impl sqlx::Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                // An unknown text becomes `UnknownState`, which `StoreError` recognises.
                Ok(<&str as sqlx::Decode<Postgres>>::decode(value)?.parse::<Self>()?)
            }
        }
    };
}

stored_state! {
    /// A client's state (`clients.state`).
    ClientState("client") {
        /// May authenticate and call.
        Active = "active",
        /// Refused; its tokens issued before were revoked when it was disabled.
        Disabled = "disabled",
    }
}

stored_state! {
    /// A managed key's state (`keys.state`). `Expired` is also what an `active` key past its
    /// expiry is, before the background worker records it.
    KeyState("key") {
        /// Usable.
        Active = "active",
        /// Refused until enabled.
        Disabled = "disabled",
        /// Past its expiry; a refresh brings it back.
        Expired = "expired",
        /// Scheduled for destruction; cancellable.
        PendingDeletion = "pending_deletion",
        /// Material erased; the row is a tombstone.
        Destroyed = "destroyed",
    }
}

stored_state! {
    /// A secret's state (`secrets.state`).
    SecretState("secret") {
        /// Readable and writable.
        Active = "active",
        /// Scheduled for destruction; cancellable.
        PendingDeletion = "pending_deletion",
        /// Erased; the row is a tombstone.
        Destroyed = "destroyed",
    }
}

stored_state! {
    /// A master-key version's state (`master_keys.state`).
    MasterKeyState("master key") {
        /// Recorded by a rotation under way, not yet (or not yet known to be) on the token.
        Pending = "pending",
        /// Seals new blobs; at most one.
        Active = "active",
        /// Opens the blobs still sealed under it; seals nothing new.
        DecryptOnly = "decrypt_only",
        /// No stored blob under it; may be destroyed.
        Retired = "retired",
        /// Removed from the token.
        Destroyed = "destroyed",
    }
}

stored_state! {
    /// A token-signing key version's state (`signing_keys.state`).
    SigningKeyState("signing key") {
        /// Signs new tokens; at most one.
        Active = "active",
        /// Replaced, still published (and verifying) until its tokens have expired.
        Retiring = "retiring",
        /// No longer published.
        Retired = "retired",
    }
}

stored_state! {
    /// A rewrap job's state (`rewrap_jobs.state`).
    RewrapJobState("rewrap job") {
        /// Moving blobs; at most one.
        Running = "running",
        /// Finished.
        Done = "done",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant's text parses back to it, and the texts are the ones the migrations use.
    fn round_trip<S>(all: &[S], texts: &[&str])
    where
        S: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr,
    {
        let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(shown, texts);
        for state in all {
            let back: Result<S, _> = state.to_string().parse();
            assert!(back.ok() == Some(*state), "{state} does not round-trip");
        }
    }

    #[test]
    fn every_state_round_trips_through_its_text() {
        round_trip(ClientState::ALL, &["active", "disabled"]);
        round_trip(
            KeyState::ALL,
            &[
                "active",
                "disabled",
                "expired",
                "pending_deletion",
                "destroyed",
            ],
        );
        round_trip(
            SecretState::ALL,
            &["active", "pending_deletion", "destroyed"],
        );
        round_trip(
            MasterKeyState::ALL,
            &["pending", "active", "decrypt_only", "retired", "destroyed"],
        );
        round_trip(SigningKeyState::ALL, &["active", "retiring", "retired"]);
        round_trip(RewrapJobState::ALL, &["running", "done"]);
    }

    #[test]
    fn display_honours_width_as_the_cli_tables_need() {
        assert_eq!(format!("{:<10}|", ClientState::Active), "active    |");
        assert_eq!(
            format!("{:<13}|", MasterKeyState::DecryptOnly),
            "decrypt_only |"
        );
    }

    #[test]
    fn as_str_and_parse_agree() {
        assert_eq!(KeyState::PendingDeletion.as_str(), "pending_deletion");
        assert_eq!(KeyState::parse("expired"), Some(KeyState::Expired));
        assert_eq!(
            MasterKeyState::parse("decrypt_only"),
            Some(MasterKeyState::DecryptOnly)
        );
        assert_eq!(
            SecretState::parse("Active"),
            None,
            "the text is case-sensitive"
        );
    }

    #[test]
    fn unknown_text_is_an_error_naming_the_kind_and_the_text() {
        let err = "paused".parse::<ClientState>().err();
        assert_eq!(
            err,
            Some(UnknownState {
                kind: "client",
                value: "paused".to_owned()
            })
        );
        assert_eq!(
            "".parse::<KeyState>().map_err(|e| e.to_string()),
            Err("unknown key state \"\"".to_owned())
        );
        assert!("expired".parse::<SecretState>().is_err());
        assert!("decrypt-only".parse::<MasterKeyState>().is_err());
        assert!("pending".parse::<SigningKeyState>().is_err());
        assert!("failed".parse::<RewrapJobState>().is_err());
    }
}
