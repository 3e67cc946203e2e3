//! Clients as `auth` sees them: a registered client, what an officer gives to register or
//! change one (validated), the checks every request makes of its client, and the
//! registration, update, enable/disable, deletion and lockdown calls of the [`Authenticator`].
//! Clients are stored through `store` only; a new secret comes from the token's RNG through
//! `hsm`.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::credentials::SECRET_PREFIX;
use super::{
    AuthError, Authenticator, BlockRequest, ClientSecret, IpPolicy, Scope, Scopes, block_for,
    unix_now,
};
use crate::audit;
use crate::store::{AdminGuard, ClientFields, ClientRow, ClientState, SourceBlock, StoreError};

/// A registered client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Where it may call from.
    pub ip_policy: IpPolicy,
    /// What it may be granted.
    pub scopes: Scopes,
    /// Its P-256 public key for private_key_jwt (SPKI PEM).
    pub public_key_pem: Option<String>,
    /// Whether it may authenticate.
    pub active: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    pub(super) tokens_not_before: i64,
}

impl TryFrom<ClientRow> for Client {
    type Error = AuthError;

    fn try_from(row: ClientRow) -> Result<Self, AuthError> {
        let corrupt = |_| AuthError::Store(StoreError::Corrupt("client row"));
        Ok(Self {
            id: row.id,
            name: row.name,
            ip_policy: IpPolicy::parse(&row.ip_mode, &row.allowed_cidrs)
                .map_err(|_| AuthError::Store(StoreError::Corrupt("client ip policy")))?,
            scopes: Scopes::parse(&row.scopes.join(" ")).map_err(corrupt)?,
            public_key_pem: row.public_key_pem,
            active: row.state == ClientState::Active,
            created_at: row.created_at,
            updated_at: row.updated_at,
            tokens_not_before: row.tokens_not_before,
        })
    }
}

impl Client {
    /// Its stored state (what the admin API and the CLI show).
    pub fn state(&self) -> ClientState {
        if self.active {
            ClientState::Active
        } else {
            ClientState::Disabled
        }
    }

    /// The checks every request makes of its client once the credential itself (a token, a
    /// console session) is proven: the client is active, the credential dates from after the
    /// client was last disabled (re-enabling never brings old ones back), and the source
    /// address is allowed.
    ///
    /// # Errors
    /// [`AuthError::ClientDisabled`], [`AuthError::InvalidToken`], [`AuthError::IpNotAllowed`].
    pub(super) fn admit(&self, issued_at: i64, source: IpAddr) -> Result<(), AuthError> {
        if !self.active {
            return Err(AuthError::ClientDisabled);
        }
        if issued_at < self.tokens_not_before {
            return Err(AuthError::InvalidToken(
                "credential issued before the client was disabled",
            ));
        }
        if !self.ip_policy.allows(source) {
            return Err(AuthError::IpNotAllowed);
        }
        Ok(())
    }
}

/// What an officer gives to register or update a client, validated.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Display name, 1 to 200 characters.
    pub name: String,
    /// Where it may call from.
    pub ip_policy: IpPolicy,
    /// What it may be granted (at least one).
    pub scopes: Scopes,
    /// Its P-256 public key (SPKI PEM), checked to parse.
    pub public_key_pem: Option<String>,
}

impl Authenticator {
    /// Registers a client: a new id (UUID v4) and a high-entropy secret from the token's RNG,
    /// returned once. Postgres keeps only the token's HMAC of the secret.
    ///
    /// # Errors
    /// [`AuthError::IpAlreadyRegistered`], or an outage.
    pub async fn register(&self, spec: ClientSpec) -> Result<(Client, ClientSecret), AuthError> {
        let id = Uuid::new_v4();
        let random = self.hsm.run(|t| t.random(32)).await?;
        let secret = SecretString::from(format!(
            "{SECRET_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(&*random)
        ));
        let mac = self.secret_mac(id, secret.expose_secret()).await?;
        let row = self
            .store
            .insert_client(id, &fields(&spec), &mac, &audit::meta())
            .await?;
        Ok((Client::try_from(row)?, ClientSecret(secret)))
    }

    /// Replaces a client's name, addresses, scopes and key.
    ///
    /// # Errors
    /// [`AuthError::ClientNotFound`], [`AuthError::IpAlreadyRegistered`],
    /// [`AuthError::LastAdmin`] when `admin` would leave the last active admin, or an outage.
    pub async fn update(
        &self,
        id: Uuid,
        spec: ClientSpec,
        guard: AdminGuard,
    ) -> Result<Client, AuthError> {
        Client::try_from(
            self.store
                .update_client(id, &fields(&spec), guard, &audit::meta())
                .await?,
        )
    }

    /// Disables (every live token stops working at once) or enables a client.
    ///
    /// # Errors
    /// [`AuthError::ClientNotFound`], [`AuthError::IpAlreadyRegistered`] on enable,
    /// [`AuthError::LastAdmin`] on disable, or an outage.
    pub async fn set_active(
        &self,
        id: Uuid,
        active: bool,
        guard: AdminGuard,
    ) -> Result<Client, AuthError> {
        Client::try_from(
            self.store
                .set_client_active(id, active, guard, &audit::meta())
                .await?,
        )
    }

    /// Deletes a client; its tokens stop working at once.
    ///
    /// # Errors
    /// [`AuthError::ClientNotFound`], [`AuthError::LastAdmin`], or an outage.
    pub async fn delete(&self, id: Uuid, guard: AdminGuard) -> Result<(), AuthError> {
        Ok(self.store.delete_client(id, guard, &audit::meta()).await?)
    }

    /// Lockdown: disables the client (every live token refused from its next request) and,
    /// when `block` is given, blocks some of its own networks for a while (see
    /// [`block_for`]). Returns the client and what was blocked.
    ///
    /// # Errors
    /// [`AuthError::ClientNotFound`], [`AuthError::LastAdmin`], [`AuthError::InvalidBlock`],
    /// or an outage.
    pub async fn lock_down(
        &self,
        id: Uuid,
        reason: &str,
        block: Option<BlockRequest<'_>>,
        guard: AdminGuard,
    ) -> Result<(Client, Option<SourceBlock>), AuthError> {
        let client = self.client(id).await?;
        let block = block
            .map(|b| block_for(&client.ip_policy, b, unix_now()))
            .transpose()?;
        self.store
            .lock_down_client(id, reason, block.as_ref(), guard, &audit::meta())
            .await?;
        Ok((self.client(id).await?, block))
    }

    /// One client.
    ///
    /// # Errors
    /// [`AuthError::ClientNotFound`], or an outage.
    pub async fn client(&self, id: Uuid) -> Result<Client, AuthError> {
        self.store
            .client(id)
            .await?
            .ok_or(AuthError::ClientNotFound)?
            .try_into()
    }

    /// A page of clients after `after`, by id.
    ///
    /// # Errors
    /// An outage.
    pub async fn clients(&self, after: Option<Uuid>, limit: u32) -> Result<Vec<Client>, AuthError> {
        self.store
            .clients(after, i64::from(limit))
            .await?
            .into_iter()
            .map(Client::try_from)
            .collect()
    }

    /// Registers the first admin client, if no client exists yet (the officer's bootstrap).
    ///
    /// # Errors
    /// An outage.
    pub async fn bootstrap_admin(&self) -> Result<Option<(Client, ClientSecret)>, AuthError> {
        if self.store.any_client().await? {
            return Ok(None);
        }
        let spec = ClientSpec {
            name: "bootstrap-admin".to_owned(),
            ip_policy: IpPolicy::Any,
            scopes: Scopes(Scope::ALL.into_iter().collect()),
            public_key_pem: None,
        };
        self.register(spec).await.map(Some)
    }
}

impl ClientSpec {
    /// Validates registration input.
    ///
    /// # Errors
    /// [`AuthError::InvalidClientSpec`] saying what is wrong.
    pub fn new(
        name: String,
        ip_mode: &str,
        addresses: &[String],
        scopes: &str,
        public_key_pem: Option<String>,
    ) -> Result<Self, AuthError> {
        let invalid = |m: String| AuthError::InvalidClientSpec(m);
        // Counted before trimming, and only ASCII whitespace trimmed: the published schema says
        // exactly this (a length and a pattern), and a name of other characters is a name.
        let trimmed = name.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.is_empty() || name.chars().count() > 200 {
            return Err(invalid(
                "name must be 1 to 200 characters, not only spaces".to_owned(),
            ));
        }
        let name = trimmed.to_owned();
        let ip_policy = IpPolicy::parse(ip_mode, addresses)
            .and_then(|p| p.check_registrable().map(|()| p))
            .map_err(|e| invalid(e.to_string()))?;
        let scopes = Scopes::parse(scopes).map_err(|e| invalid(e.to_string()))?;
        if scopes.is_empty() {
            return Err(invalid("at least one scope is required".to_owned()));
        }
        if let Some(pem) = &public_key_pem {
            let key = <p256::PublicKey as p256::pkcs8::DecodePublicKey>::from_public_key_pem(pem);
            if key.is_err() {
                return Err(invalid(
                    "public_key must be a P-256 public key in SPKI PEM".to_owned(),
                ));
            }
        }
        Ok(Self {
            name,
            ip_policy,
            scopes,
            public_key_pem,
        })
    }
}

fn fields(spec: &ClientSpec) -> ClientFields {
    ClientFields {
        name: spec.name.clone(),
        ip_mode: spec.ip_policy.mode().to_owned(),
        allowed_cidrs: spec.ip_policy.cidrs(),
        scopes: spec.scopes.names(),
        public_key_pem: spec.public_key_pem.clone(),
    }
}
