//! Access tokens: the client-credentials grant that issues them (signed inside the token
//! through `hsm`, audited before they are handed out), their verification on every protected
//! request (signature, claims, then the client's state from `AuthCache`), the console
//! session's equivalent, introspection (RFC 7662) and revocation (RFC 7009). It reaches
//! Postgres only through `store` and the cache; it knows nothing of HTTP.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::verified::VerifiedHit;
use super::{
    AuthConfig, AuthError, Authenticator, Client, ClientCredentials, Scope, Scopes, read, unix_now,
};
use crate::audit;
use crate::hsm::HsmError;
use crate::store::{ClientState, NewAuditEvent};

/// Why the token endpoint refused a client calling from an address it may not use.
const IP_REFUSED: &str = "source address not allowed";

/// The claims of our access tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// The broker.
    pub iss: String,
    /// The client id.
    pub sub: String,
    /// The configured audience.
    pub aud: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Not before, unix seconds.
    pub nbf: i64,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Token id, a UUID.
    pub jti: String,
    /// Granted scopes, space-separated.
    pub scope: String,
}

/// An access token as the token endpoint answers it.
#[derive(Debug)]
pub struct IssuedToken {
    /// The client it was issued to.
    pub client_id: Uuid,
    /// Its `jti`.
    pub jti: String,
    /// The compact JWS.
    pub access_token: String,
    /// Seconds until expiry.
    pub expires_in: u64,
    /// Granted scopes.
    pub scope: Scopes,
}

/// The authenticated caller of a protected request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client.
    pub client_id: Uuid,
    /// What the token grants, narrowed to what the client still holds.
    pub scopes: Scopes,
}

impl Caller {
    /// Checks the token grants `scope`.
    ///
    /// # Errors
    /// [`AuthError::InsufficientScope`].
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(AuthError::InsufficientScope(scope.as_str()))
        }
    }

    /// The client id as bound into blob AAD.
    pub fn aad_id(&self) -> String {
        self.client_id.to_string()
    }
}

/// What introspection (RFC 7662) tells.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Introspection {
    /// Whether the token is valid now.
    pub active: bool,
    /// The claims, when active.
    #[serde(flatten)]
    pub claims: Option<AccessClaims>,
}

impl Authenticator {
    // -- token endpoint ----------------------------------------------------------------------

    /// The client-credentials grant: authenticates the client, checks its address and the
    /// scope asked for, and signs an access token inside the token.
    ///
    /// # Errors
    /// [`AuthError::InvalidClient`] (one answer for every authentication failure),
    /// [`AuthError::InvalidScope`], or an outage.
    pub async fn issue(
        &self,
        credentials: ClientCredentials,
        requested: Option<&str>,
        source: IpAddr,
        now: i64,
    ) -> Result<IssuedToken, AuthError> {
        let claimed = credentials.claimed_id();
        let result = self
            .issue_unaudited(credentials, requested, source, now)
            .await;
        let event = match &result {
            Ok(issued) => NewAuditEvent::info("token.issued")
                .client(issued.client_id)
                .subject(issued.jti.clone())
                .details(serde_json::json!({
                    "scope": issued.scope.to_string(),
                    "expires_in": issued.expires_in,
                })),
            // No client id at all: nothing to attach a row to; counted and coalesced. An id
            // nobody registered is audited like a known one: answering it any faster would tell
            // a guesser which ids exist. The throttle bounds both.
            Err(AuthError::InvalidClient(reason)) if claimed.is_none() => {
                self.refused(source, reason, None);
                return result;
            }
            Err(AuthError::InvalidClient(reason)) => {
                let name = if *reason == IP_REFUSED {
                    "ip_mismatch"
                } else {
                    "auth.failed"
                };
                let event = NewAuditEvent::info(name)
                    .severity("warning")
                    .details(serde_json::json!({ "endpoint": "token", "reason": reason }));
                match claimed {
                    Some(id) => event.client(id).subject(id.to_string()),
                    None => event,
                }
            }
            Err(_) => return result,
        };
        // A token is handed out only once its issuance is on the record. Only an address refusal
        // follows valid credentials; any other failure may come from anyone who knows the id.
        let refused_client =
            matches!(&result, Err(AuthError::InvalidClient(r)) if *r == IP_REFUSED)
                .then_some(claimed)
                .flatten();
        if let Err(e) = self.store.audit(&audit::meta(), &[event]).await {
            return Err(match result {
                Ok(_) => e.into(),
                Err(original) => {
                    tracing::warn!(target: "keybroker::audit", error = %e, "authentication failure not audited");
                    original
                }
            });
        }
        if let Some(client) = refused_client {
            self.respond_to_refusal(client).await;
        }
        result
    }

    async fn issue_unaudited(
        &self,
        credentials: ClientCredentials,
        requested: Option<&str>,
        source: IpAddr,
        now: i64,
    ) -> Result<IssuedToken, AuthError> {
        let client = match credentials {
            ClientCredentials::Secret { client_id, secret } => {
                self.check_secret(&client_id, &secret).await?
            }
            ClientCredentials::Assertion {
                client_id,
                assertion,
            } => {
                self.check_assertion(client_id.as_deref(), &assertion, now)
                    .await?
            }
        };
        if !client.active {
            return Err(AuthError::InvalidClient("client disabled"));
        }
        if !client.ip_policy.allows(source) {
            return Err(AuthError::InvalidClient(IP_REFUSED));
        }
        let scope = match requested {
            Some(text) => {
                // RFC 6749 §3.3: scope words separated by single spaces, as the schema says.
                if text
                    .split(' ')
                    .any(|w| w.is_empty() || w.contains(char::is_whitespace))
                {
                    return Err(AuthError::InvalidScope);
                }
                let asked = Scopes::parse(text).map_err(|_| AuthError::InvalidScope)?;
                if asked.is_empty() || !asked.is_subset(&client.scopes) {
                    return Err(AuthError::InvalidScope);
                }
                asked
            }
            None => client.scopes.clone(),
        };
        let ttl = i64::try_from(self.config.token_ttl.as_secs()).unwrap_or(300);
        // A client disabled and re-enabled within this second has `tokens_not_before` rounded up
        // to the next second; a token issued now must not be dead on arrival, so it is dated
        // from then (well inside the `nbf` leeway).
        let issued_at = now.max(client.tokens_not_before);
        let claims = AccessClaims {
            iss: self.config.issuer.clone(),
            sub: client.id.to_string(),
            aud: self.config.audience.clone(),
            iat: issued_at,
            nbf: issued_at,
            exp: issued_at + ttl,
            jti: Uuid::new_v4().to_string(),
            scope: scope.to_string(),
        };
        let access_token = self.sign(&claims).await?;
        Ok(IssuedToken {
            client_id: client.id,
            jti: claims.jti.clone(),
            access_token,
            expires_in: self.config.token_ttl.as_secs(),
            scope,
        })
    }

    /// Builds and signs a compact JWS (ES256) inside the token.
    async fn sign(&self, claims: &AccessClaims) -> Result<String, AuthError> {
        let (label, kid) = read(&self.keys)
            .first()
            .map(|k| (k.label.clone(), k.key.kid.clone()))
            .ok_or(HsmError::Unexpected("no signing key"))?;
        let header = serde_json::json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(
                serde_json::to_vec(claims)
                    .map_err(|_| HsmError::Unexpected("claims do not serialise"))?
            )
        );
        let digest: [u8; 32] = Sha256::digest(signing_input.as_bytes()).into();
        let signature = self
            .hsm
            .run(move |t| t.sign_digest(&label, &digest))
            .await?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    // -- protected requests ------------------------------------------------------------------

    /// Checks a bearer token and its client for one request: signature (ES256 only), `exp`,
    /// `nbf`, `iss`, `aud`, not revoked, issued after the client was last disabled, client
    /// active, source address allowed.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`], [`AuthError::ClientDisabled`], [`AuthError::IpNotAllowed`],
    /// or an outage.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        source: IpAddr,
    ) -> Result<Caller, AuthError> {
        let Some(token) = token else {
            self.refused(source, "no bearer token", None);
            return Err(AuthError::MissingToken);
        };
        let result = self.authenticate_unaudited(token, source).await;
        let reason = match &result {
            Err(AuthError::IpNotAllowed) => None,
            Err(AuthError::InvalidToken(reason)) => Some(*reason),
            Err(AuthError::ClientDisabled) => Some("client disabled"),
            _ => return result,
        };
        // Whose token it is, when its signature verified (a forgery is not verified again).
        let client = self
            .verified_claims(token)
            .and_then(|c| parse_ids(&c).ok())
            .map(|(client, _)| client);
        if let Some(reason) = reason {
            // Nothing proven about the holder: counted, and audited once a window per source.
            self.refused(source, reason, client);
            return result;
        }
        // An address refusal follows a valid token: on the record at once, and counted by the
        // automatic response.
        let mut event = NewAuditEvent::info("ip_mismatch").severity("warning");
        if let Some(client) = client {
            event = event.client(client).subject(client.to_string());
        }
        if let Err(e) = self.store.audit(&audit::meta(), &[event]).await {
            tracing::warn!(target: "keybroker::audit", error = %e, "refusal not audited");
        }
        if let Some(client) = client {
            self.respond_to_refusal(client).await;
        }
        result
    }

    async fn authenticate_unaudited(
        &self,
        token: &str,
        source: IpAddr,
    ) -> Result<Caller, AuthError> {
        let claims = match self.verify(token) {
            // Another broker may have rotated the signing key: look again, now and then.
            Err(AuthError::InvalidToken("unknown kid")) if self.may_refresh_for_unknown_kid() => {
                self.refresh_signing_keys(unix_now()).await?;
                self.verify(token)?
            }
            other => other?,
        };
        let (client_id, jti) = parse_ids(&claims)?;
        let state = self.cache.client_state(client_id, jti).await?;
        let client = state
            .client
            .ok_or(AuthError::InvalidToken("client no longer exists"))?;
        if state.revoked {
            return Err(AuthError::InvalidToken("token revoked"));
        }
        client.admit(claims.iat, source)?;
        let granted =
            Scopes::parse(&claims.scope).map_err(|_| AuthError::InvalidToken("bad scope claim"))?;
        Ok(Caller {
            client_id,
            scopes: granted.intersection(&client.scopes),
        })
    }

    /// The caller behind an officer's console session begun at `session_start` (unix seconds),
    /// checked on every console request as a bearer token is on every API request: the client
    /// still exists, is active, was not disabled since the session began, may call from
    /// `source`, and still holds `admin`.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`], [`AuthError::ClientDisabled`], [`AuthError::IpNotAllowed`],
    /// [`AuthError::InsufficientScope`], or an outage.
    pub async fn session_caller(
        &self,
        client_id: Uuid,
        session_start: i64,
        source: IpAddr,
    ) -> Result<Caller, AuthError> {
        let client: Client = self
            .store
            .client(client_id)
            .await?
            .ok_or(AuthError::InvalidToken("client no longer exists"))?
            .try_into()?;
        client.admit(session_start, source)?;
        let caller = Caller {
            client_id,
            scopes: client.scopes,
        };
        caller.require(Scope::Admin)?;
        Ok(caller)
    }

    /// The claims of a token whose signature verified before, from the cache only.
    fn verified_claims(&self, token: &str) -> Option<AccessClaims> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.verified.get(&digest)
    }

    /// Verifies a token's signature and standard claims; nothing in Postgres is consulted.
    fn verify(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let leeway = i64::try_from(self.config.leeway).unwrap_or(0);
        match self.verified.live(&digest, unix_now() - leeway) {
            VerifiedHit::Live(claims) => return Ok(claims),
            VerifiedHit::Expired => {
                return Err(AuthError::InvalidToken("signature or claims do not verify"));
            }
            VerifiedHit::Missing => {}
        }
        let claims = self.verify_uncached(token)?;
        self.verified.insert(digest, claims.clone());
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let now = unix_now();
        let keys = read(&self.keys);
        verify_access_token(
            token,
            |kid| {
                keys.iter()
                    .find(|k| k.key.kid == kid && k.live_at(now))
                    .map(|k| &k.key.decoding)
            },
            &self.config,
        )
    }

    /// RFC 7662: what `token` is, for an admin or for the client it was issued to; inactive
    /// for anyone else and for any invalid token.
    ///
    /// # Errors
    /// An outage.
    pub async fn introspect(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<Introspection, AuthError> {
        let inactive = Introspection {
            active: false,
            claims: None,
        };
        let Ok(claims) = self.verify(token) else {
            return Ok(inactive);
        };
        let Ok((client_id, jti)) = parse_ids(&claims) else {
            return Ok(inactive);
        };
        if !caller.scopes.contains(Scope::Admin) && caller.client_id != client_id {
            return Ok(inactive);
        }
        let active = match self.store.client_auth_state(client_id, jti).await? {
            Some(state) => {
                !state.revoked
                    && state.client.state == ClientState::Active
                    && claims.iat >= state.client.tokens_not_before
            }
            None => false,
        };
        Ok(if active {
            Introspection {
                active,
                claims: Some(claims),
            }
        } else {
            inactive
        })
    }

    /// RFC 7009: revokes `token` if the caller is an admin or the client it was issued to.
    /// Unknown or invalid tokens are not an error (the RFC says to answer 200 either way).
    ///
    /// # Errors
    /// An outage.
    pub async fn revoke(&self, caller: &Caller, token: &str) -> Result<(), AuthError> {
        let Ok(claims) = self.verify(token) else {
            return Ok(());
        };
        let Ok((client_id, jti)) = parse_ids(&claims) else {
            return Ok(());
        };
        if caller.scopes.contains(Scope::Admin) || caller.client_id == client_id {
            self.store
                .revoke_token(jti, client_id, claims.exp, &audit::meta())
                .await?;
        }
        Ok(())
    }
}

/// Verifies an access token's signature and standard claims, with no cache and no I/O: ES256
/// only, with the key `key_for` gives for the token's `kid` (none: `unknown kid`), and `exp`,
/// `nbf`, `iss`, `aud` as `config` says. Public so the fuzz target drives this very path.
///
/// # Errors
/// [`AuthError::InvalidToken`] saying which check failed.
pub fn verify_access_token<'k>(
    token: &str,
    key_for: impl FnOnce(&str) -> Option<&'k DecodingKey>,
    config: &AuthConfig,
) -> Result<AccessClaims, AuthError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken("not a JWT"))?;
    // Pinned: only ES256, whatever the header says, so `none` and HS256-with-our-public-key
    // tricks fail here.
    if header.alg != Algorithm::ES256 {
        return Err(AuthError::InvalidToken("algorithm is not ES256"));
    }
    let kid = header.kid.ok_or(AuthError::InvalidToken("no kid"))?;
    let key = key_for(&kid).ok_or(AuthError::InvalidToken("unknown kid"))?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.leeway = config.leeway;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]);
    jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
        .map(|data| data.claims)
        .map_err(|e| {
            tracing::debug!(target: "keybroker::auth", error = %e, "access token refused");
            AuthError::InvalidToken("signature or claims do not verify")
        })
}

/// The client id (`sub`) and token id (`jti`) of verified claims.
///
/// # Errors
/// [`AuthError::InvalidToken`] when either is not a UUID.
pub fn parse_ids(claims: &AccessClaims) -> Result<(Uuid, Uuid), AuthError> {
    let client = Uuid::parse_str(&claims.sub).map_err(|_| AuthError::InvalidToken("bad sub"))?;
    let jti = Uuid::parse_str(&claims.jti).map_err(|_| AuthError::InvalidToken("bad jti"))?;
    Ok((client, jti))
}
