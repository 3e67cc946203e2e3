//! Scopes: what an access token allows, their wire names and how a space-separated list of
//! them parses and prints. Pure: no token, no database, no clock.

use std::collections::BTreeSet;
use std::fmt;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `POST /v1/datakey`.
    Datakey,
    /// `POST /v1/wrap`.
    Wrap,
    /// `POST /v1/unwrap`.
    Unwrap,
    /// `POST /v1/rewrap`.
    Rewrap,
    /// `POST /v1/random`.
    Random,
    /// Create managed keys.
    KeysCreate,
    /// Read managed keys.
    KeysRead,
    /// Rotate managed keys.
    KeysRotate,
    /// Disable, enable, delete managed keys.
    KeysManage,
    /// Read secrets.
    SecretsRead,
    /// Write and delete secrets.
    SecretsWrite,
    /// The administration API.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 12] = [
        Scope::Datakey,
        Scope::Wrap,
        Scope::Unwrap,
        Scope::Rewrap,
        Scope::Random,
        Scope::KeysCreate,
        Scope::KeysRead,
        Scope::KeysRotate,
        Scope::KeysManage,
        Scope::SecretsRead,
        Scope::SecretsWrite,
        Scope::Admin,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Datakey => "datakey",
            Scope::Wrap => "wrap",
            Scope::Unwrap => "unwrap",
            Scope::Rewrap => "rewrap",
            Scope::Random => "random",
            Scope::KeysCreate => "keys:create",
            Scope::KeysRead => "keys:read",
            Scope::KeysRotate => "keys:rotate",
            Scope::KeysManage => "keys:manage",
            Scope::SecretsRead => "secrets:read",
            Scope::SecretsWrite => "secrets:write",
            Scope::Admin => "admin",
        }
    }
}

/// A set of scopes, written space-separated (RFC 6749 §3.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(pub(super) BTreeSet<Scope>);

/// A scope name this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}")]
pub struct UnknownScope(pub String);

impl Scopes {
    /// Parses space-separated names; `keys:*` and `secrets:*` expand to their family.
    ///
    /// # Errors
    /// [`UnknownScope`] for a name that is not a scope.
    pub fn parse(text: &str) -> Result<Self, UnknownScope> {
        let mut set = BTreeSet::new();
        for word in text.split_ascii_whitespace() {
            match word {
                "keys:*" => set.extend([
                    Scope::KeysCreate,
                    Scope::KeysRead,
                    Scope::KeysRotate,
                    Scope::KeysManage,
                ]),
                "secrets:*" => set.extend([Scope::SecretsRead, Scope::SecretsWrite]),
                _ => {
                    let scope = Scope::ALL
                        .into_iter()
                        .find(|s| s.as_str() == word)
                        .ok_or_else(|| UnknownScope(word.to_owned()))?;
                    set.insert(scope);
                }
            }
        }
        Ok(Self(set))
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: Scope) -> bool {
        self.0.contains(&scope)
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes in both.
    pub fn intersection(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.intersection(&other.0).copied().collect())
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_owned()).collect()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn scopes_parse_expand_and_print() {
        let s = Scopes::parse("wrap  keys:* random datakey").unwrap();
        assert!(s.contains(Scope::KeysRotate) && s.contains(Scope::Wrap));
        assert!(s.contains(Scope::Random));
        assert!(!s.contains(Scope::Admin));
        assert_eq!(
            s.to_string(),
            "datakey wrap random keys:create keys:read keys:rotate keys:manage"
        );
        assert_eq!(
            Scopes::parse("wrap bogus"),
            Err(UnknownScope("bogus".into()))
        );
        assert!(Scopes::parse("wrap").unwrap().is_subset(&s));
    }
}
