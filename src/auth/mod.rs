//! `auth` owns who a caller is: client registration and secrets, OAuth2 client credentials
//! (secret or `private_key_jwt`), ES256 access tokens signed inside the token and verified
//! against its public key, scopes and the source-IP policy. It reaches Postgres only through
//! `store` and the token only through `hsm`; it knows nothing of HTTP.
//!
//! This file keeps the [`Authenticator`] itself, [`AuthError`] and [`AuthConfig`]; each concern
//! has a file of its own, re-exported here so that every `auth::X` path stays as it was:
//! `scopes`, `ip_policy` (address policy, lockdown blocks, source address), `credentials`
//! (client secrets and their HMAC), `assertions` (`private_key_jwt`), `tokens` (issue, verify,
//! introspect, revoke), `verified` (the verified-token cache), `signing_keys` (rotation, JWKS),
//! `clients` (registration, changes, lockdown), `console_sessions` (the officer console's
//! sessions), `refusals` (handing a refused client to the
//! automatic response, and the coalesced refusal audit) and `cache` (client state and
//! revocations, kept coherent with Postgres).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

mod assertions;
mod cache;
mod clients;
mod console_sessions;
mod credentials;
mod ip_policy;
mod refusals;
mod scopes;
mod signing_keys;
mod tokens;
mod verified;

pub use crate::store::AdminGuard;
pub use assertions::{ClientAssertion, JWT_BEARER_ASSERTION, verify_es256};
pub use cache::{AuthCache, DEFAULT_MAX_AGE as DEFAULT_CACHE_MAX_AGE};
pub use clients::{Client, ClientSpec};
pub use credentials::{ClientCredentials, ClientSecret, constant_time_eq};
pub use ip_policy::{
    BlockError, BlockRequest, DEFAULT_BLOCK_SECS, IpPolicy, IpPolicyError, MAX_BLOCK_SECS,
    MAX_CLIENT_NETWORKS, STRICT_MIN_PREFIX_V4, STRICT_MIN_PREFIX_V6, block_for, source_ip,
};
pub use scopes::{Scope, Scopes, UnknownScope};
pub use signing_keys::ec_point_coordinates;
pub use tokens::{
    AccessClaims, Caller, Introspection, IssuedToken, parse_ids, verify_access_token,
};

use crate::audit;
use crate::hsm::{Hsm, HsmError};
use crate::store::{ClientWriteError, Store, StoreError};
use signing_keys::PublishedKey;
use verified::VerifiedCache;

// ---------------------------------------------------------------------------------------------
// Errors

/// Why authentication or authorisation failed. Variants say what the client is told; the
/// reason behind an `InvalidClient` or `InvalidToken` goes only to the debug log.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint could not authenticate the client (unknown, wrong secret, bad or
    /// replayed assertion, disabled, or calling from a refused address): one answer for all.
    #[error("client authentication failed")]
    InvalidClient(&'static str),
    /// The grant type is not `client_credentials`.
    #[error("only the client_credentials grant is supported")]
    UnsupportedGrantType,
    /// The request lacks a parameter or repeats one.
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The requested scope is unknown or not granted to the client.
    #[error("the requested scope is unknown or not granted to this client")]
    InvalidScope,
    /// No bearer token was sent.
    #[error("an access token is required")]
    MissingToken,
    /// The bearer token is bad: signature, algorithm, expiry, issuer, audience, revoked,
    /// issued before the client was disabled, or the client is gone.
    #[error("the access token is invalid")]
    InvalidToken(&'static str),
    /// The token lacks the scope this call needs.
    #[error("the access token lacks the scope {0}")]
    InsufficientScope(&'static str),
    /// The request comes from an address the client may not use.
    #[error("requests from this address are not allowed for this client")]
    IpNotAllowed,
    /// The client is disabled.
    #[error("the client is disabled")]
    ClientDisabled,
    /// Registration input is invalid.
    #[error("{0}")]
    InvalidClientSpec(String),
    /// Another active strict client has one of these addresses.
    #[error("an address is already registered to another active strict-mode client")]
    IpAlreadyRegistered,
    /// No such client.
    #[error("no such client")]
    ClientNotFound,
    /// The change would leave no active client with the `admin` scope.
    #[error(
        "this is the last active client with the admin scope; register or enable another admin first"
    )]
    LastAdmin,
    /// A lockdown's address block is not allowed.
    #[error("{0}")]
    InvalidBlock(BlockError),
    /// Too many failed authentications from this source for this client: wait.
    #[error("too many failed authentications; retry after {retry_after} s")]
    Throttled {
        /// Seconds.
        retry_after: u64,
    },
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AuthError {
    fn from(err: StoreError) -> Self {
        match err {
            // A NUL in a name, a reason or an assertion's `jti`: the caller's mistake.
            StoreError::UnstorableText(_) => {
                Self::InvalidRequest("text fields cannot contain NUL characters")
            }
            e => Self::Store(e),
        }
    }
}

impl From<ClientWriteError> for AuthError {
    fn from(err: ClientWriteError) -> Self {
        match err {
            ClientWriteError::IpAlreadyRegistered => Self::IpAlreadyRegistered,
            ClientWriteError::NotFound => Self::ClientNotFound,
            ClientWriteError::LastAdmin => Self::LastAdmin,
            ClientWriteError::Store(e) => e.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The authenticator and its configuration

/// Settings of the token issuer.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `iss` of our tokens: the broker's public base URL, e.g. `https://kms.example:8443`.
    pub issuer: String,
    /// `aud` of our tokens.
    pub audience: String,
    /// Lifetime of an access token.
    pub token_ttl: Duration,
    /// Clock skew allowed on `exp`/`nbf`, in seconds.
    pub leeway: u64,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Refusals before authentication are audited as one event per source per this window.
    pub refusal_window: Duration,
    /// The oldest the node-local cache of client state and revocations may be (a backstop to
    /// the change notifications; see [`AuthCache`]).
    pub cache_max_age: Duration,
    /// An officer's console session ends after this long without a request.
    pub console_idle: Duration,
    /// An officer's console session ends this long after sign-in, used or not.
    pub console_absolute: Duration,
}

impl AuthConfig {
    /// The token endpoint URL: the `aud` a client assertion must carry.
    pub fn token_endpoint(&self) -> String {
        format!("{}/v1/oauth/token", self.issuer.trim_end_matches('/'))
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Issues and checks access tokens, and registers clients.
pub struct Authenticator {
    hsm: Hsm,
    store: Store,
    config: AuthConfig,
    /// The signing key first, then the replaced ones still published.
    keys: RwLock<Vec<PublishedKey>>,
    /// When an unknown `kid` last made us re-read the keys (unix seconds).
    last_kid_refresh: std::sync::atomic::AtomicI64,
    /// Tokens whose signature and claims verified, by SHA-256 of the token. A signature stays
    /// valid, so this needs no coherence between nodes; expiry is checked again on every hit,
    /// and everything that can change (client state, revocation, address, scope) is checked on
    /// every request regardless, against [`AuthCache`]. It saves an ECDSA verification per
    /// request.
    verified: VerifiedCache,
    /// Refusals before authentication, audited coalesced (see [`audit::RefusalTally`]).
    refusals: Arc<audit::RefusalTally>,
    /// What requests read about their client, kept coherent with Postgres.
    cache: Arc<AuthCache>,
}

impl Authenticator {
    /// Reads the signing keys: which versions sign and are published (Postgres; the token's
    /// versions are adopted on first use), and their public keys (the token).
    ///
    /// # Errors
    /// A token or database failure, or a signing key that is not P-256.
    pub async fn load(hsm: Hsm, store: Store, config: AuthConfig) -> Result<Self, AuthError> {
        audit::install(&store, &hsm);
        let refusals = Arc::new(audit::RefusalTally::new(config.refusal_window));
        let cache = AuthCache::new(store.clone(), config.cache_max_age);
        let auth = Self {
            hsm,
            store,
            config,
            keys: RwLock::new(Vec::new()),
            last_kid_refresh: std::sync::atomic::AtomicI64::new(0),
            verified: VerifiedCache::default(),
            refusals,
            cache,
        };
        auth.refresh_signing_keys(unix_now()).await?;
        tokio::spawn(refusals::write_coalesced_refusals(
            Arc::downgrade(&auth.refusals),
            auth.store.clone(),
        ));
        Ok(auth)
    }

    /// Starts keeping the client cache coherent (a server does; a one-off command need not):
    /// until its listener has connected and loaded, every request reads Postgres.
    pub fn start_cache(&self) {
        self.cache.spawn_listener();
    }

    /// The client cache (for its state and the limiter's change signal).
    pub fn cache(&self) -> &Arc<AuthCache> {
        &self.cache
    }

    /// The settings.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
