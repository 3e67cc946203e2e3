//! `private_key_jwt` client authentication (RFC 7523): parsing a compact JWS, the ES256 check
//! of its signature against the client's registered key, the claims RFC 7523 requires, and the
//! replay check of its `jti`. Parsing and verifying do no I/O (the fuzz target drives them);
//! only the replay check reaches Postgres, through `store`. It never touches the token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use uuid::Uuid;

use super::{AuthError, Authenticator, Client};

/// `client_assertion_type` of RFC 7523 private_key_jwt.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Longest lifetime a client assertion may claim (RFC 7523 leaves it to the server).
const MAX_ASSERTION_LIFETIME: i64 = 300;

/// ES256 verification (ECDSA P-256 over SHA-256, signature `r || s` as JWS uses it). This is
/// the check client assertions go through; it is tested against the Wycheproof vectors.
pub fn verify_es256(key: &p256::ecdsa::VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    use p256::ecdsa::signature::Verifier;
    let Ok(signature) = p256::ecdsa::Signature::from_slice(signature) else {
        return false;
    };
    key.verify(message, &signature).is_ok()
}

/// A compact JWS split into its parts; nothing is verified here.
pub(super) struct CompactJws {
    header: JwsHeader,
    pub(super) payload: Vec<u8>,
    signature: Vec<u8>,
    signing_input: String,
}

#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
}

impl CompactJws {
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Self {
            header: serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?,
            payload: URL_SAFE_NO_PAD.decode(payload).ok()?,
            signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
            signing_input: format!("{header}.{payload}"),
        })
    }
}

/// `aud` may be a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims RFC 7523 requires of a client assertion.
#[derive(Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    jti: String,
}

impl AssertionClaims {
    /// Checks the claims at `now` (a parameter, so tests set the time).
    fn check(
        &self,
        client: &str,
        token_endpoint: &str,
        now: i64,
        leeway: i64,
    ) -> Result<(), &'static str> {
        if self.iss != client || self.sub != client {
            return Err("assertion iss/sub is not the client");
        }
        let audience_ok = match &self.aud {
            Audience::One(a) => a == token_endpoint,
            Audience::Many(all) => all.iter().any(|a| a == token_endpoint),
        };
        if !audience_ok {
            return Err("assertion aud is not the token endpoint");
        }
        if self.exp.saturating_add(leeway) <= now {
            return Err("assertion expired");
        }
        if self.exp > now + MAX_ASSERTION_LIFETIME + leeway {
            return Err("assertion lives too long");
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err("assertion not yet valid");
        }
        if self.jti.is_empty() || self.jti.len() > 200 {
            return Err("assertion jti missing or too long");
        }
        Ok(())
    }
}

/// A `private_key_jwt` client assertion (RFC 7523), parsed but not yet trusted: the token
/// endpoint parses it, looks up the client its `sub` names, then [`ClientAssertion::verify`]s it
/// with that client's key. Neither step does I/O, so the fuzz target drives both.
pub struct ClientAssertion {
    jws: CompactJws,
    claims: AssertionClaims,
    client: Uuid,
}

impl ClientAssertion {
    /// Parses a compact JWS whose header says ES256 and whose payload has the claims RFC 7523
    /// requires, with `sub` a client id equal to `client_id` when that was sent.
    ///
    /// # Errors
    /// [`AuthError::InvalidClient`] saying what is wrong.
    pub fn parse(client_id: Option<&str>, assertion: &str) -> Result<Self, AuthError> {
        let jws = CompactJws::parse(assertion)
            .ok_or(AuthError::InvalidClient("assertion is not a compact JWS"))?;
        if jws.header.alg != "ES256" {
            return Err(AuthError::InvalidClient("assertion algorithm is not ES256"));
        }
        let claims: AssertionClaims = serde_json::from_slice(&jws.payload)
            .map_err(|_| AuthError::InvalidClient("assertion lacks iss/sub/aud/exp/jti"))?;
        let client = Uuid::parse_str(&claims.sub)
            .map_err(|_| AuthError::InvalidClient("assertion sub is not a client id"))?;
        if client_id.is_some_and(|c| c != claims.sub) {
            return Err(AuthError::InvalidClient(
                "client_id differs from assertion sub",
            ));
        }
        Ok(Self {
            jws,
            claims,
            client,
        })
    }

    /// The client the assertion claims to come from (its `sub`).
    pub fn client(&self) -> Uuid {
        self.client
    }

    /// Checks the signature with the client's registered key, then the claims at `now`.
    ///
    /// # Errors
    /// [`AuthError::InvalidClient`] saying which check failed.
    pub fn verify(
        &self,
        key: &p256::ecdsa::VerifyingKey,
        token_endpoint: &str,
        now: i64,
        leeway: i64,
    ) -> Result<(), AuthError> {
        if !verify_es256(key, self.jws.signing_input.as_bytes(), &self.jws.signature) {
            return Err(AuthError::InvalidClient(
                "assertion signature does not verify",
            ));
        }
        self.claims
            .check(&self.claims.sub, token_endpoint, now, leeway)
            .map_err(AuthError::InvalidClient)
    }
}

impl Authenticator {
    pub(super) async fn check_assertion(
        &self,
        client_id: Option<&str>,
        assertion: &str,
        now: i64,
    ) -> Result<Client, AuthError> {
        let assertion = ClientAssertion::parse(client_id, assertion)?;
        let id = assertion.client();
        let client: Client = self
            .store
            .client(id)
            .await?
            .ok_or(AuthError::InvalidClient("unknown client"))?
            .try_into()?;
        let pem = client
            .public_key_pem
            .as_deref()
            .ok_or(AuthError::InvalidClient("client has no registered key"))?;
        let key =
            <p256::ecdsa::VerifyingKey as p256::pkcs8::DecodePublicKey>::from_public_key_pem(pem)
                .map_err(|_| AuthError::InvalidClient("registered key does not parse"))?;
        let leeway = i64::try_from(self.config.leeway).unwrap_or(0);
        assertion.verify(&key, &self.config.token_endpoint(), now, leeway)?;
        if !self
            .store
            .use_assertion(id, &assertion.claims.jti, assertion.claims.exp)
            .await?
        {
            return Err(AuthError::InvalidClient("assertion replayed"));
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn assertion(aud: &str, exp: i64, nbf: Option<i64>, jti: &str) -> AssertionClaims {
        AssertionClaims {
            iss: "c".into(),
            sub: "c".into(),
            aud: Audience::One(aud.into()),
            exp,
            nbf,
            jti: jti.into(),
        }
    }

    #[test]
    fn assertion_claims_are_checked_at_the_given_time() {
        let endpoint = "https://kb.example/v1/oauth/token";
        let now = 1_000_000;
        assert_eq!(
            assertion(endpoint, now + 60, None, "j").check("c", endpoint, now, 0),
            Ok(())
        );
        let many = AssertionClaims {
            aud: Audience::Many(vec!["x".into(), endpoint.into()]),
            ..assertion(endpoint, now + 60, None, "j")
        };
        assert_eq!(many.check("c", endpoint, now, 0), Ok(()));
        assert!(
            assertion(endpoint, now + 60, None, "j")
                .check("other", endpoint, now, 0)
                .is_err()
        );
        assert!(
            assertion("https://elsewhere", now + 60, None, "j")
                .check("c", endpoint, now, 0)
                .is_err()
        );
        assert!(
            assertion(endpoint, now, None, "j")
                .check("c", endpoint, now, 0)
                .is_err()
        );
        assert_eq!(
            assertion(endpoint, now, None, "j").check("c", endpoint, now, 5),
            Ok(())
        );
        assert!(
            assertion(endpoint, now + 301, None, "j")
                .check("c", endpoint, now, 0)
                .is_err()
        );
        assert!(
            assertion(endpoint, now + 60, Some(now + 30), "j")
                .check("c", endpoint, now, 0)
                .is_err()
        );
        assert!(
            assertion(endpoint, now + 60, None, "")
                .check("c", endpoint, now, 0)
                .is_err()
        );
    }

    #[test]
    fn compact_jws_parsing() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
        let payload = URL_SAFE_NO_PAD.encode(b"{}");
        let sig = URL_SAFE_NO_PAD.encode([1u8; 64]);
        let jws = CompactJws::parse(&format!("{header}.{payload}.{sig}")).unwrap();
        assert_eq!(jws.header.alg, "ES256");
        assert_eq!(jws.signing_input, format!("{header}.{payload}"));
        assert_eq!(jws.signature, vec![1u8; 64]);
        assert!(CompactJws::parse(&format!("{header}.{payload}")).is_none());
        assert!(CompactJws::parse(&format!("{header}.{payload}.{sig}.x")).is_none());
        assert!(CompactJws::parse(&format!("{header}.{payload}.***")).is_none());
    }
}
