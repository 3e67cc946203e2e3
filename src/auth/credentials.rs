//! Client credentials at the token endpoint: the forms a client proves itself with, the client
//! secret (shown once) and the token's HMAC that stands for it in Postgres, and the check of a
//! presented secret. The HMAC is computed inside the token through `hsm`; the stored MAC is
//! read through `store`. Assertions (`private_key_jwt`) are checked in `assertions`.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use uuid::Uuid;

use super::assertions::CompactJws;
use super::{AuthError, Authenticator, Client};

/// Prefix of every client secret, so secret scanners can recognise a leaked one.
pub(super) const SECRET_PREFIX: &str = "kbs_";
/// Domain separation of the HMAC that stands for a client secret in the database.
const SECRET_MAC_DOMAIN: &[u8] = b"keybroker-client-secret-v1\0";

/// A client secret, shown once at registration.
pub struct ClientSecret(pub(super) SecretString);

impl ClientSecret {
    /// The secret text, to hand to the officer once.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([REDACTED])")
    }
}

/// How a client proves who it is at the token endpoint.
pub enum ClientCredentials {
    /// `client_secret_basic` or `client_secret_post`.
    Secret {
        /// The claimed client id.
        client_id: String,
        /// The secret.
        secret: SecretString,
    },
    /// `private_key_jwt` (RFC 7523).
    Assertion {
        /// The `client_id` parameter, if sent (must match the assertion's `sub`).
        client_id: Option<String>,
        /// The compact JWS.
        assertion: String,
    },
}

impl ClientCredentials {
    /// The client id the caller claims to be, unverified: the one given, or for an assertion
    /// without one, its `sub`. For the record and for throttling failures, never for trust.
    pub fn claimed_id(&self) -> Option<Uuid> {
        match self {
            Self::Secret { client_id, .. } => Uuid::parse_str(client_id).ok(),
            Self::Assertion {
                client_id: Some(id),
                ..
            } => Uuid::parse_str(id).ok(),
            Self::Assertion {
                client_id: None,
                assertion,
            } => {
                #[derive(Deserialize)]
                struct Sub {
                    sub: String,
                }
                let jws = CompactJws::parse(assertion)?;
                let claims: Sub = serde_json::from_slice(&jws.payload).ok()?;
                Uuid::parse_str(&claims.sub).ok()
            }
        }
    }
}

impl Authenticator {
    pub(super) async fn check_secret(
        &self,
        client_id: &str,
        secret: &SecretString,
    ) -> Result<Client, AuthError> {
        // Unknown ids and wrong secrets cost the same: a token HMAC and a comparison either way.
        let id = Uuid::parse_str(client_id).ok();
        let stored = match id {
            Some(id) => self.store.client_secret_mac(id).await?,
            None => None,
        };
        let mac = self
            .secret_mac(id.unwrap_or(Uuid::nil()), secret.expose_secret())
            .await?;
        match stored {
            Some((row, stored_mac)) if constant_time_eq(&mac, &stored_mac) => Client::try_from(row),
            Some(_) => Err(AuthError::InvalidClient("wrong secret")),
            None => Err(AuthError::InvalidClient("unknown client")),
        }
    }

    pub(super) async fn secret_mac(&self, id: Uuid, secret: &str) -> Result<[u8; 32], AuthError> {
        let mut input = Vec::with_capacity(SECRET_MAC_DOMAIN.len() + 16 + secret.len());
        input.extend_from_slice(SECRET_MAC_DOMAIN);
        input.extend_from_slice(id.as_bytes());
        input.extend_from_slice(secret.as_bytes());
        let input = zeroize::Zeroizing::new(input);
        Ok(self.hsm.run(move |t| t.hmac(&input)).await?)
    }
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
