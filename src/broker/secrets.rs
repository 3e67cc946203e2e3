//! Secrets (e.g. a third-party API key): each version's value is sealed in this process with
//! AES-256-GCM under a fresh data key from the token's RNG, and the data key is sealed by the
//! token under the active master key. The owner, the secret id and version, and the caller's
//! context are bound as AAD of both layers.

use uuid::Uuid;
use zeroize::Zeroizing;

use super::keys::{check_name, context_json, deletion_due, stored_blob_error};
use super::{Broker, BrokerError, Operation};
use crate::crypto::envelope::{self, DataKey, NONCE_LEN};
use crate::crypto::{Aad, DEK_LEN, EncryptionContext, MasterKeyVersion};
use crate::hsm::HsmError;
use crate::store::{ItemWriteError, NewAuditEvent, NewSecretVersion, SecretRow, SecretState};

/// Largest secret value: 64 KiB.
pub const MAX_SECRET_LEN: usize = 64 * 1024;
/// Attempts at a write that lost a race with a concurrent write of the same secret.
const WRITE_ATTEMPTS: usize = 3;

/// A validated secret name: 1 to 200 characters of letters, digits and `._-/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretName(String);

impl SecretName {
    /// Validates a name.
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`].
    pub fn new(name: &str) -> Result<Self, BrokerError> {
        check_name(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A secret's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    /// Name.
    pub name: String,
    /// `active` or `pending_deletion` (a destroyed secret is not found).
    pub state: SecretState,
    /// The latest version.
    pub current_version: u32,
    /// Scheduled destruction (unix seconds).
    pub deletion_due: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

impl From<SecretRow> for StoredSecret {
    fn from(row: SecretRow) -> Self {
        Self {
            name: row.name,
            state: row.state,
            current_version: u32::try_from(row.current_version).unwrap_or(0),
            deletion_due: row.deletion_due,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

fn secret_error(err: ItemWriteError<SecretState>) -> BrokerError {
    match err {
        ItemWriteError::NotFound => BrokerError::SecretNotFound,
        ItemWriteError::WrongState(state) => BrokerError::SecretState(state),
        ItemWriteError::Conflict => BrokerError::Busy,
        ItemWriteError::Store(e) => e.into(),
    }
}

/// The two AADs of a secret version: the token's seal of the data key, and this process's seal
/// of the value.
pub(super) fn aads(
    mk: MasterKeyVersion,
    owner: &str,
    id: Uuid,
    version: u32,
    context: &EncryptionContext,
) -> (Vec<u8>, Vec<u8>) {
    let dek_ref = format!("secret:{id}:v{version}:dek");
    let value_ref = format!("secret:{id}:v{version}:value");
    let aad = |key_ref: &str| {
        Aad {
            mk_version: mk,
            client_id: Some(owner),
            key_ref: Some(key_ref),
            context,
        }
        .bytes()
    };
    (aad(&dek_ref), aad(&value_ref))
}

impl Broker {
    /// Stores `value` as a new version of `owner`'s secret `name` (creating it at version 1).
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`] over 64 KiB, [`BrokerError::SecretState`] while pending
    /// deletion, [`BrokerError::Busy`] after repeated concurrent writes, or an outage.
    pub async fn put_secret(
        &self,
        owner: Uuid,
        name: &SecretName,
        value: Zeroizing<Vec<u8>>,
        context: EncryptionContext,
        now: i64,
    ) -> Result<StoredSecret, BrokerError> {
        if value.len() > MAX_SECRET_LEN {
            return Err(BrokerError::InvalidSpec(
                "a secret value may be at most 64 KiB".into(),
            ));
        }
        let value = std::sync::Arc::new(value);
        for _ in 0..WRITE_ATTEMPTS {
            let existing = self.store.secret(owner, name.as_str()).await?;
            let (id, version) = match &existing {
                Some(s) if s.state != SecretState::Active => {
                    return Err(BrokerError::SecretState(s.state));
                }
                Some(s) => (s.id, u32::try_from(s.current_version).unwrap_or(0) + 1),
                None => (Uuid::new_v4(), 1),
            };
            let mk = self.reserve_seals(1).await?;
            let (dek_aad, value_aad) = aads(mk, &owner.to_string(), id, version, &context);
            let plaintext = value.clone();
            let (wrapped_dek, sealed) = self
                .hsm
                .run(move |token| {
                    let dek = token.random(DEK_LEN)?;
                    let nonce = token.random(NONCE_LEN)?;
                    let mut nonce_bytes = [0u8; NONCE_LEN];
                    nonce_bytes.copy_from_slice(&nonce);
                    let key = DataKey::from_bytes(&dek)
                        .map_err(|_| HsmError::Unexpected("data key of the wrong size"))?;
                    let sealed = envelope::seal(&key, nonce_bytes, &value_aad, &plaintext)
                        .map_err(|_| HsmError::Unexpected("in-process seal failed"))?;
                    let wrapped = token.seal(mk, &dek, &dek_aad)?;
                    Ok((wrapped, sealed))
                })
                .await?;
            let written = self
                .store
                .put_secret_version(
                    &NewSecretVersion {
                        secret_id: id,
                        version: i32::try_from(version).unwrap_or(i32::MAX),
                        client_id: owner,
                        name: name.as_str().to_owned(),
                        mk_version: i32::try_from(mk.get()).unwrap_or(i32::MAX),
                        wrapped_dek,
                        sealed,
                        context: context_json(&context),
                        now,
                    },
                    &crate::audit::meta(),
                )
                .await;
            match written {
                Ok(row) => {
                    self.usage.record(owner, id, Operation::SecretWrite, now);
                    return Ok(row.into());
                }
                // Another write took this version number: seal again for the next one.
                Err(ItemWriteError::Conflict) => continue,
                Err(e) => return Err(secret_error(e)),
            }
        }
        Err(BrokerError::Busy)
    }

    /// The value of the latest (or a given) version, opened with the caller's context.
    ///
    /// # Errors
    /// [`BrokerError::SecretNotFound`], [`BrokerError::SecretState`] while pending deletion,
    /// [`BrokerError::NotAuthentic`] for another context (or another client's data), or an
    /// outage.
    pub async fn get_secret(
        &self,
        owner: Uuid,
        name: &SecretName,
        version: Option<u32>,
        context: EncryptionContext,
        now: i64,
    ) -> Result<(StoredSecret, u32, Zeroizing<Vec<u8>>), BrokerError> {
        let row = self
            .store
            .secret(owner, name.as_str())
            .await?
            .ok_or(BrokerError::SecretNotFound)?;
        if row.state != SecretState::Active {
            return Err(BrokerError::SecretState(row.state));
        }
        let id = row.id;
        let version = version.unwrap_or(u32::try_from(row.current_version).unwrap_or(0));
        let stored = self
            .store
            .secret_version(id, i32::try_from(version).unwrap_or(i32::MAX))
            .await?
            .ok_or(BrokerError::SecretNotFound)?;
        let (Some(wrapped), Some(sealed)) = (stored.wrapped_dek, stored.sealed) else {
            return Err(BrokerError::SecretState(SecretState::Destroyed));
        };
        let mk = super::keys::mk_version(stored.mk_version)?;
        let (dek_aad, value_aad) = aads(mk, &owner.to_string(), id, version, &context);
        let value = self
            .hsm
            .run(move |token| {
                let dek = token.unseal(mk, &wrapped, &dek_aad)?;
                let key = DataKey::from_bytes(&dek)
                    .map_err(|_| HsmError::Unexpected("data key of the wrong size"))?;
                envelope::open(&key, &value_aad, &sealed).map_err(|_| HsmError::NotAuthentic)
            })
            .await
            .map_err(stored_blob_error);
        // A read is served only once it is on the record; a refused one is recorded too.
        let event = match &value {
            Ok(_) => Some(NewAuditEvent::info("secret.read")),
            Err(BrokerError::NotAuthentic) => {
                Some(NewAuditEvent::info("unauthorized_key_access").severity("warning"))
            }
            Err(_) => None,
        };
        if let Some(event) = event {
            let event = event
                .client(owner)
                .key(id)
                .subject(name.as_str().to_owned())
                .details(serde_json::json!({ "operation": "secret.read", "version": version }));
            self.store.audit(&crate::audit::meta(), &[event]).await?;
            if matches!(value, Err(BrokerError::NotAuthentic)) {
                super::security::respond_to_refusal(&self.store, owner).await?;
            }
        }
        let value = value?;
        self.usage.record(owner, id, Operation::SecretRead, now);
        Ok((row.into(), version, value))
    }

    /// Schedules destruction of every version after a pending window (default 7 days, 1 to 30).
    ///
    /// # Errors
    /// [`BrokerError::SecretNotFound`], [`BrokerError::SecretState`], or an outage.
    pub async fn delete_secret(
        &self,
        owner: Uuid,
        name: &SecretName,
        window_days: Option<u32>,
        now: i64,
    ) -> Result<StoredSecret, BrokerError> {
        let due = deletion_due(window_days, now)?;
        self.store
            .transition_secret(
                owner,
                name.as_str(),
                &[SecretState::Active],
                SecretState::PendingDeletion,
                now,
                Some(due),
                &crate::audit::meta(),
            )
            .await
            .map(Into::into)
            .map_err(secret_error)
    }

    /// Cancels a scheduled destruction.
    ///
    /// # Errors
    /// [`BrokerError::SecretNotFound`], [`BrokerError::SecretState`], or an outage.
    pub async fn cancel_secret_deletion(
        &self,
        owner: Uuid,
        name: &SecretName,
        now: i64,
    ) -> Result<StoredSecret, BrokerError> {
        self.store
            .transition_secret(
                owner,
                name.as_str(),
                &[SecretState::PendingDeletion],
                SecretState::Active,
                now,
                None,
                &crate::audit::meta(),
            )
            .await
            .map(Into::into)
            .map_err(secret_error)
    }
}
