//! `broker` holds the use cases: data keys, wrap, unwrap, rewrap, random (single and batch),
//! managed keys, secrets, background maintenance, usage counts, master-key set-up and rotation,
//! readiness, and security policy (`security`). It orders calls to the token (`hsm`) and the
//! database (`store`), which are its own (no accessor hands them out), and knows nothing of
//! HTTP.

mod budget;
mod custody_gauges;
mod keys;
mod maintenance;
mod master_keys;
mod random;
mod secrets;
pub(crate) mod security;
mod usage;

pub use crate::store::{
    AuditFilter, AuditRow, ClientState, KeyState, MasterKeyState, NewAuditEvent, RequestLogRow,
    RewrapJob, RewrapJobState, RewrapStart, SecretState, SigningKeyState, UsageRow,
};
pub use custody_gauges::{CustodySnapshot, CustodyVersion, DatabaseHalf, TokenHalf};
pub use keys::{KeyDetails, KeySpec, ManagedKey, Rotation};
pub use maintenance::MaintenanceReport;
pub use master_keys::{
    MasterKeyPolicy, MasterKeyView, REWRAP_BATCH, RewrapProgress, RotationReason,
};
pub use random::{RandomMaterial, RandomRequest};
pub use secrets::{MAX_SECRET_LEN, SecretName, StoredSecret};
pub use security::{MAX_BURST, MAX_RATE, MIN_RATE, SecuritySettings};
pub use usage::Operation;

use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::crypto::{Aad, DEK_LEN, EncryptionContext, KeyMaterial, MasterKeyVersion, WrappedBlob};
use crate::hsm::{Hsm, HsmError, InitReport, TokenSession};
use crate::store::{ItemWriteError, Store, StoreError, Violation};
use budget::{Load, Refreshed, SealBudget};

/// How long a broker keeps sealing under the active version it last read before asking Postgres
/// again. Another node's rotation takes effect here within this time; a seal made under the
/// previous version in between stays valid (that version is decrypt-only, not gone).
const ACTIVE_VERSION_TTL: Duration = Duration::from_secs(1);

/// What a use case can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The blob names a master-key version the token does not hold.
    #[error("master key version {0} is unknown")]
    UnknownMasterKey(MasterKeyVersion),
    /// The blob does not authenticate: another context, or it was altered.
    #[error("the wrapped blob does not authenticate under this context")]
    NotAuthentic,
    /// A batch with more items than allowed.
    #[error("a batch may hold at most {max} items")]
    BatchTooLarge {
        /// The configured maximum.
        max: usize,
    },
    /// A batch with no items.
    #[error("a batch must hold at least one item")]
    EmptyBatch,
    /// No master key is active in the database.
    #[error("no master key version is active")]
    NoActiveKey,
    /// The token is unreachable.
    #[error("the HSM is unavailable")]
    HsmUnavailable(#[source] HsmError),
    /// Postgres is unreachable.
    #[error("the database is unavailable")]
    DatabaseUnavailable(#[source] StoreError),
    /// A token failure that is not an outage (a bug, a misconfigured token).
    #[error("HSM operation failed")]
    Hsm(#[source] HsmError),
    /// A database failure that is not an outage.
    #[error("database operation failed")]
    Store(#[source] StoreError),
    /// The request describes a key or secret badly (format, length, expiry, window, name).
    #[error("{0}")]
    InvalidSpec(String),
    /// `auto` rotation without a period.
    #[error("rotation auto needs rotation_period_days")]
    RotationPeriodRequired,
    /// The caller has no such key.
    #[error("no such key")]
    KeyNotFound,
    /// The key has no such version.
    #[error("the key has no such version")]
    KeyVersionNotFound,
    /// The caller already has a live key of that name.
    #[error("a key of that name exists")]
    KeyNameTaken,
    /// The key's state forbids the operation; 410 when destroyed, else 409.
    #[error("the key is {}", .0.as_str())]
    KeyState(KeyState),
    /// The caller has no such secret (or no such version).
    #[error("no such secret")]
    SecretNotFound,
    /// The secret's state forbids the operation; 410 when destroyed, else 409.
    #[error("the secret is {0}")]
    SecretState(SecretState),
    /// Another writer changed the item at the same moment, more than once in a row.
    #[error("the item changed concurrently; retry")]
    Busy,
    /// No such master-key version is recorded.
    #[error("master key version {0} is not recorded")]
    MasterKeyNotFound(MasterKeyVersion),
    /// The master-key version's state forbids the change (the state is given).
    #[error("master key version {0} is {1}")]
    MasterKeyState(MasterKeyVersion, MasterKeyState),
    /// Stored blobs are still sealed under the master-key version (their number is given).
    #[error("{1} stored blobs are still sealed under master key version {0}")]
    MasterKeyInUse(MasterKeyVersion, i64),
    /// A rewrap job cannot finish: the given number of stored blobs do not open (see the log).
    #[error("{0} stored blobs cannot be rewrapped; see the server log")]
    RewrapStuck(i64),
}

/// A managed key's write (secrets map theirs in `secrets`: not found and busy differ there).
impl From<ItemWriteError<KeyState>> for BrokerError {
    fn from(err: ItemWriteError<KeyState>) -> Self {
        match err {
            ItemWriteError::NotFound => Self::KeyNotFound,
            ItemWriteError::WrongState(state) => Self::KeyState(state),
            ItemWriteError::Conflict => Self::Busy,
            ItemWriteError::Store(e) => e.into(),
        }
    }
}

impl From<HsmError> for BrokerError {
    fn from(err: HsmError) -> Self {
        match err {
            HsmError::UnknownMasterKey(v) => Self::UnknownMasterKey(v),
            HsmError::NotAuthentic => Self::NotAuthentic,
            // A refused PIN at run time means the token locked us out: an outage for callers.
            e if e.is_unavailable() || matches!(e, HsmError::PinRefused) => Self::HsmUnavailable(e),
            e => Self::Hsm(e),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NoActiveMasterKey => Self::NoActiveKey,
            StoreError::Violated(Violation::KeyNameTaken, _) => Self::KeyNameTaken,
            // Another writer created the secret at the same moment.
            StoreError::Violated(Violation::SecretNameTaken, _) => Self::Busy,
            e @ StoreError::UnstorableText(_) => Self::InvalidSpec(e.to_string()),
            // The token could not MAC the audit event, so the change was not made either.
            StoreError::AuditSign(e) => e.into(),
            e if e.is_unavailable() => Self::DatabaseUnavailable(e),
            e => Self::Store(e),
        }
    }
}

/// Limits the broker enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items in one batch call.
    pub max_batch: usize,
}

/// A data key: the blob, and the plaintext when the caller asked for it.
pub struct DataKey {
    /// The DEK sealed under the active master key.
    pub wrapped: WrappedBlob,
    /// The DEK itself, zeroized on drop.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

/// One `datakey` request.
#[derive(Debug, Clone)]
pub struct DataKeyRequest {
    /// Bound into the AAD.
    pub context: EncryptionContext,
    /// Whether to return the plaintext DEK as well.
    pub with_plaintext: bool,
}

/// One `wrap` request.
#[derive(Debug)]
pub struct WrapRequest {
    /// The caller's key material.
    pub key: KeyMaterial,
    /// Bound into the AAD.
    pub context: EncryptionContext,
}

/// One `unwrap` or `rewrap` request.
#[derive(Debug, Clone)]
pub struct BlobRequest {
    /// The blob.
    pub wrapped: WrappedBlob,
    /// The context it was sealed with.
    pub context: EncryptionContext,
}

/// Readiness of the parts the broker depends on.
#[derive(Debug)]
pub struct Readiness {
    /// `Ok` when a token session answers.
    pub token: Result<(), BrokerError>,
    /// `Ok` when Postgres answers.
    pub database: Result<(), BrokerError>,
}

/// Reads the destroyed master-key versions and drops this process's copies of them.
struct DestroyedVersions {
    store: Store,
    hsm: Hsm,
}

impl Load for DestroyedVersions {
    type Value = Vec<MasterKeyVersion>;

    async fn load(&self) -> Result<Vec<MasterKeyVersion>, StoreError> {
        let versions: Vec<MasterKeyVersion> = self
            .store
            .master_keys()
            .await?
            .into_iter()
            .filter(|row| row.state == MasterKeyState::Destroyed)
            .map(|row| row.version)
            .collect();
        self.hsm.forget_master_keys(&versions);
        Ok(versions)
    }
}

/// The use cases. Cheap to share behind an `Arc`.
pub struct Broker {
    hsm: Hsm,
    store: Store,
    limits: Limits,
    /// The active master-key version this broker seals under, with seals reserved in Postgres
    /// (see [`SealBudget`]); re-read at least every [`ACTIVE_VERSION_TTL`].
    budget: Arc<SealBudget<Store>>,
    usage: usage::UsageCounter,
    master_key_policy: MasterKeyPolicy,
    /// The destroyed master-key versions, as last read (at most [`ACTIVE_VERSION_TTL`] ago).
    destroyed: Arc<Refreshed<DestroyedVersions>>,
    /// What `/metrics` shows of key custody, kept fresh in the background.
    custody: Arc<custody_gauges::CustodyGauges>,
}

impl Broker {
    /// Combines a token pool and a database.
    pub fn new(hsm: Hsm, store: Store, limits: Limits) -> Self {
        crate::audit::install(&store, &hsm);
        Self {
            budget: Arc::new(SealBudget::new(store.clone(), ACTIVE_VERSION_TTL)),
            destroyed: Arc::new(Refreshed::new(
                DestroyedVersions {
                    store: store.clone(),
                    hsm: hsm.clone(),
                },
                ACTIVE_VERSION_TTL,
            )),
            hsm,
            store,
            limits,
            usage: usage::UsageCounter::default(),
            master_key_policy: MasterKeyPolicy::default(),
            custody: Arc::default(),
        }
    }

    /// Sets when the maintenance pass rotates the master key by itself.
    pub fn with_master_key_policy(mut self, policy: MasterKeyPolicy) -> Self {
        self.master_key_policy = policy;
        self
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The label of the token this broker uses.
    pub fn token_label(&self) -> &str {
        self.hsm.token_label()
    }

    /// What the token holds of ours (labels and the attributes that matter), for `hsm status`
    /// and the console.
    ///
    /// # Errors
    /// The token is unavailable.
    pub async fn token_objects(&self) -> Result<Vec<crate::hsm::ObjectInfo>, BrokerError> {
        Ok(self.hsm.status().await?)
    }

    /// The authenticator of clients and tokens, on this broker's token and database.
    ///
    /// # Errors
    /// The token or the database is unavailable, or the token-signing key is missing.
    pub async fn authenticator(
        &self,
        config: crate::auth::AuthConfig,
    ) -> Result<crate::auth::Authenticator, crate::auth::AuthError> {
        crate::auth::Authenticator::load(self.hsm.clone(), self.store.clone(), config).await
    }

    /// `hsm init`: creates what is missing on the token (never a second MK v1), then records the
    /// token's master-key versions in Postgres, making the highest active if none is.
    ///
    /// # Errors
    /// An unsafe existing key, a token failure or a database failure.
    pub async fn initialise(&self) -> Result<InitReport, BrokerError> {
        let report = self.hsm.ensure_keys().await?;
        self.store.adopt_master_keys(&report.master_keys).await?;
        let events: Vec<crate::store::NewAuditEvent> = report
            .created
            .iter()
            .map(|label| {
                crate::store::NewAuditEvent::info("hsm.key_created")
                    .subject(label.clone())
                    .details(serde_json::json!({ "token": self.hsm.token_label() }))
            })
            .collect();
        self.store.audit(&crate::audit::meta(), &events).await?;
        Ok(report)
    }

    /// Checks the token and the database, each on its own.
    pub async fn readiness(&self) -> Readiness {
        let (token, database) = tokio::join!(self.hsm.ping(), self.store.ping());
        Readiness {
            token: token.map_err(BrokerError::from),
            database: database.map_err(BrokerError::from),
        }
    }

    /// New data keys from the token's RNG, each sealed under the active master key for `owner`
    /// (a client id, bound into the AAD: no other client can open the blob).
    ///
    /// # Errors
    /// Whole-call failures (batch size, outages); each item has its own result.
    pub async fn datakeys(
        &self,
        owner: &str,
        items: Vec<DataKeyRequest>,
    ) -> Result<Vec<Result<DataKey, BrokerError>>, BrokerError> {
        self.check_batch(items.len())?;
        let version = self.reserve_seals(items.len()).await?;
        let owner = owner.to_owned();
        self.each_item(items, move |token, item| {
            let dek = token.random(DEK_LEN)?;
            let aad = Aad {
                mk_version: version,
                client_id: Some(&owner),
                key_ref: None,
                context: &item.context,
            };
            let payload = token.seal(version, &dek, &aad.bytes())?;
            Ok(DataKey {
                wrapped: WrappedBlob::new(version, payload),
                plaintext: item.with_plaintext.then_some(dek),
            })
        })
        .await
    }

    /// Seals callers' key material under the active master key.
    ///
    /// # Errors
    /// Whole-call failures (batch size, outages); each item has its own result.
    pub async fn wrap(
        &self,
        owner: &str,
        items: Vec<WrapRequest>,
    ) -> Result<Vec<Result<WrappedBlob, BrokerError>>, BrokerError> {
        self.check_batch(items.len())?;
        let version = self.reserve_seals(items.len()).await?;
        let owner = owner.to_owned();
        self.each_item(items, move |token, item| {
            let aad = Aad {
                mk_version: version,
                client_id: Some(&owner),
                key_ref: None,
                context: &item.context,
            };
            let payload = token.seal(version, item.key.expose(), &aad.bytes())?;
            Ok(WrappedBlob::new(version, payload))
        })
        .await
    }

    /// Opens blobs with the context they were sealed with.
    ///
    /// # Errors
    /// Whole-call failures (batch size, outages); each item has its own result.
    pub async fn unwrap(
        &self,
        owner: &str,
        items: Vec<BlobRequest>,
    ) -> Result<Vec<Result<Zeroizing<Vec<u8>>, BrokerError>>, BrokerError> {
        self.check_batch(items.len())?;
        let destroyed = self.destroyed_master_keys().await?;
        let owner_text = owner.to_owned();
        let results = self
            .each_item(items, move |token, item| {
                refuse_destroyed(&destroyed, item)?;
                open(token, &owner_text, item)
            })
            .await?;
        self.audit_refused_opens(owner, "unwrap", &results).await?;
        self.explain_missing_versions(results).await
    }

    /// Re-seals blobs under the active master key inside this process: the plaintext exists only
    /// in a zeroizing buffer between the two token calls and is never returned.
    ///
    /// # Errors
    /// Whole-call failures (batch size, outages); each item has its own result.
    pub async fn rewrap(
        &self,
        owner: &str,
        items: Vec<BlobRequest>,
    ) -> Result<Vec<Result<WrappedBlob, BrokerError>>, BrokerError> {
        self.check_batch(items.len())?;
        let destroyed = self.destroyed_master_keys().await?;
        let version = self.reserve_seals(items.len()).await?;
        let owner_text = owner.to_owned();
        let results = self
            .each_item(items, move |token, item| {
                refuse_destroyed(&destroyed, item)?;
                let plaintext = open(token, &owner_text, item)?;
                let aad = Aad {
                    mk_version: version,
                    client_id: Some(&owner_text),
                    key_ref: None,
                    context: &item.context,
                };
                let payload = token.seal(version, &plaintext, &aad.bytes())?;
                Ok(WrappedBlob::new(version, payload))
            })
            .await?;
        self.audit_refused_opens(owner, "rewrap", &results).await?;
        self.explain_missing_versions(results).await
    }

    /// A blob's master-key version that the token does not hold is the caller's mistake only
    /// if we never had that version; a version we recorded and did not destroy is missing
    /// because the token is not the one it should be, which is an outage.
    /// Records refused opens (another client's blob, another context, an altered blob) as
    /// `unauthorized_key_access`, one event per call with the count.
    async fn audit_refused_opens<T>(
        &self,
        owner: &str,
        operation: &'static str,
        results: &[Result<T, BrokerError>],
    ) -> Result<(), BrokerError> {
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(BrokerError::NotAuthentic)))
            .count();
        if refused == 0 {
            return Ok(());
        }
        let mut event = crate::store::NewAuditEvent::info("unauthorized_key_access")
            .severity("warning")
            .details(serde_json::json!({ "operation": operation, "refused": refused }));
        let client = uuid::Uuid::parse_str(owner).ok();
        if let Some(client) = client {
            event = event.client(client).subject(client.to_string());
        }
        self.store.audit(&crate::audit::meta(), &[event]).await?;
        if let Some(client) = client {
            security::respond_to_refusal(&self.store, client).await?;
        }
        Ok(())
    }

    async fn explain_missing_versions<T>(
        &self,
        mut results: Vec<Result<T, BrokerError>>,
    ) -> Result<Vec<Result<T, BrokerError>>, BrokerError> {
        let missing =
            |r: &Result<T, BrokerError>| matches!(r, Err(BrokerError::UnknownMasterKey(_)));
        if !results.iter().any(missing) {
            return Ok(results);
        }
        let recorded = self.store.master_keys().await?;
        for result in &mut results {
            if let Err(BrokerError::UnknownMasterKey(v)) = result {
                let version = *v;
                if recorded
                    .iter()
                    .any(|row| row.version == version && row.state != MasterKeyState::Destroyed)
                {
                    *result = Err(BrokerError::HsmUnavailable(HsmError::ObjectMissing(
                        version.token_label(),
                    )));
                }
            }
        }
        Ok(results)
    }

    /// The most items one batch call may carry.
    pub fn max_batch(&self) -> usize {
        self.limits.max_batch
    }

    /// Checks a batch's size against the limits.
    ///
    /// # Errors
    /// [`BrokerError::EmptyBatch`] or [`BrokerError::BatchTooLarge`].
    pub fn check_batch(&self, len: usize) -> Result<(), BrokerError> {
        if len == 0 {
            return Err(BrokerError::EmptyBatch);
        }
        if len > self.limits.max_batch {
            return Err(BrokerError::BatchTooLarge {
                max: self.limits.max_batch,
            });
        }
        Ok(())
    }

    /// Runs `op` over every item in one token call. A token outage aborts the whole call (the
    /// HSM layer then retries it once on a fresh session); any other failure is the item's own.
    async fn each_item<I, O, F>(
        &self,
        items: Vec<I>,
        op: F,
    ) -> Result<Vec<Result<O, BrokerError>>, BrokerError>
    where
        I: Send + Sync + 'static,
        O: Send + 'static,
        F: Fn(&mut TokenSession<'_>, &I) -> Result<O, HsmError> + Send + Sync + 'static,
    {
        let items = Arc::new(items);
        let op = Arc::new(op);
        let results = self
            .hsm
            .run(move |token| {
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    match op(token, item) {
                        Err(e) if e.is_unavailable() => return Err(e),
                        other => out.push(other),
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(results
            .into_iter()
            .map(|r| r.map_err(BrokerError::from))
            .collect())
    }

    /// The destroyed master-key versions, re-read at most every [`ACTIVE_VERSION_TTL`]: an
    /// officer's `destroy-master` on any broker takes effect on this one within that time, and
    /// its copies of the key are dropped.
    async fn destroyed_master_keys(&self) -> Result<Arc<Vec<MasterKeyVersion>>, BrokerError> {
        Ok(self.destroyed.get(Instant::now()).await?)
    }

    /// Reserves `n` seals and returns the version to seal under (see [`SealBudget`]).
    async fn reserve_seals(&self, n: usize) -> Result<MasterKeyVersion, BrokerError> {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        Ok(self.budget.reserve(n, Instant::now()).await?)
    }
}

/// A blob under a destroyed master-key version is refused as if the token had never held it,
/// even where this process still holds a session copy of that key.
fn refuse_destroyed(destroyed: &[MasterKeyVersion], item: &BlobRequest) -> Result<(), HsmError> {
    let version = item.wrapped.mk_version();
    if destroyed.contains(&version) {
        return Err(HsmError::UnknownMasterKey(version));
    }
    Ok(())
}

/// Opens a blob sealed for `owner` (the client id bound into its AAD).
fn open(
    token: &mut TokenSession<'_>,
    owner: &str,
    item: &BlobRequest,
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    let version = item.wrapped.mk_version();
    let aad = Aad {
        mk_version: version,
        client_id: Some(owner),
        key_ref: None,
        context: &item.context,
    };
    token.unseal(version, item.wrapped.payload(), &aad.bytes())
}
