//! Managed keys: material from the token's RNG in a chosen format, stored only sealed under a
//! master key (one row per version), with expiry, manual or scheduled rotation, disable/enable
//! and destruction after a pending window (AWS KMS style). Time is a parameter (`now`, unix
//! seconds) wherever a state depends on it.

use uuid::Uuid;
use zeroize::Zeroizing;

use super::{Broker, BrokerError};
use crate::crypto::formats::{KeyFormat, render};
use crate::crypto::{Aad, EncryptionContext, MasterKeyVersion};
use crate::hsm::HsmError;
use crate::store::{KeyRow, KeyState, KeyVersionRow, NewKey, RotationRow};

/// Smallest and largest pending window before destruction, in days (as AWS KMS).
pub const DELETION_WINDOW_DAYS: std::ops::RangeInclusive<u32> = 1..=30;
/// The window when none is asked for.
pub const DEFAULT_DELETION_WINDOW_DAYS: u32 = 7;
const DAY: i64 = 86_400;

/// How a key rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Only when asked.
    Manual,
    /// By the background worker every `period_days`.
    Auto {
        /// The period.
        period_days: u32,
    },
}

/// What to create.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// Unique per client among live keys, 1 to 200 characters.
    pub name: String,
    /// The material's format.
    pub format: KeyFormat,
    /// Length in the format's unit (resolved by [`KeyFormat::resolve_length`]).
    pub length: usize,
    /// Unix seconds, in the future.
    pub expires_at: Option<i64>,
    /// Rotation policy.
    pub rotation: Rotation,
    /// Bound into every version's AAD; reads must give the same one.
    pub context: EncryptionContext,
}

/// A managed key's metadata (never its material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedKey {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Format.
    pub format: KeyFormat,
    /// Length in the format's unit.
    pub length: usize,
    /// State at the time asked.
    pub state: KeyState,
    /// The version read by default.
    pub current_version: u32,
    /// Rotation policy.
    pub rotation: Rotation,
    /// When `auto` rotation is next due (unix seconds).
    pub next_rotation_at: Option<i64>,
    /// Expiry (unix seconds).
    pub expires_at: Option<i64>,
    /// Scheduled destruction (unix seconds).
    pub deletion_due: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// When its material was erased.
    pub destroyed_at: Option<i64>,
}

/// A key with its versions and rotation history.
#[derive(Debug, Clone)]
pub struct KeyDetails {
    /// The key.
    pub key: ManagedKey,
    /// Every version (no material).
    pub versions: Vec<KeyVersionRow>,
    /// Every rotation.
    pub rotations: Vec<RotationRow>,
}

impl ManagedKey {
    fn from_row(row: KeyRow, now: i64) -> Result<Self, BrokerError> {
        let corrupt = |what| BrokerError::Store(crate::store::StoreError::Corrupt(what));
        let state = match (row.state, row.expires_at) {
            (KeyState::Active, Some(expiry)) if expiry <= now => KeyState::Expired,
            (state, _) => state,
        };
        let rotation = match (row.rotation.as_str(), row.rotation_period_days) {
            ("auto", Some(days)) => Rotation::Auto {
                period_days: u32::try_from(days).map_err(|_| corrupt("rotation period"))?,
            },
            ("manual", _) => Rotation::Manual,
            _ => return Err(corrupt("key rotation")),
        };
        Ok(Self {
            id: row.id,
            name: row.name,
            format: KeyFormat::parse(&row.format).ok_or_else(|| corrupt("key format"))?,
            length: usize::try_from(row.length).map_err(|_| corrupt("key length"))?,
            state,
            current_version: u32::try_from(row.current_version)
                .map_err(|_| corrupt("key version"))?,
            rotation,
            next_rotation_at: row.next_rotation_at,
            expires_at: row.expires_at,
            deletion_due: row.deletion_due,
            created_at: row.created_at,
            updated_at: row.updated_at,
            destroyed_at: row.destroyed_at,
        })
    }

    /// Refuses a use unless the key is active.
    fn usable(&self) -> Result<(), BrokerError> {
        match self.state {
            KeyState::Active => Ok(()),
            other => Err(BrokerError::KeyState(other)),
        }
    }
}

/// A stored row as a key, its state as at `now`.
pub(super) fn managed(row: KeyRow, now: i64) -> Result<ManagedKey, BrokerError> {
    ManagedKey::from_row(row, now)
}

/// The canonical JSON of a context, as stored (keys sorted: a BTreeMap serialises in order).
pub(super) fn context_json(context: &EncryptionContext) -> String {
    let map: std::collections::BTreeMap<&str, &str> = context.entries().collect();
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

/// The context back from its stored JSON.
pub(super) fn context_from_json(json: &str) -> Result<EncryptionContext, BrokerError> {
    let corrupt = || BrokerError::Store(crate::store::StoreError::Corrupt("stored context"));
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|_| corrupt())?;
    EncryptionContext::new(map).map_err(|_| corrupt())
}

/// A stored blob's master key missing from the token is an outage, not the caller's mistake.
pub(super) fn stored_blob_error(err: HsmError) -> BrokerError {
    match err {
        HsmError::UnknownMasterKey(v) => {
            BrokerError::HsmUnavailable(HsmError::ObjectMissing(v.token_label()))
        }
        other => other.into(),
    }
}

pub(super) fn key_ref(id: Uuid, version: u32) -> String {
    format!("key:{id}:v{version}")
}

/// A master-key version read from Postgres.
pub(super) fn mk_version(n: i32) -> Result<MasterKeyVersion, BrokerError> {
    MasterKeyVersion::from_stored(n).ok_or(BrokerError::Store(crate::store::StoreError::Corrupt(
        "master key version",
    )))
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Checks a key or secret name: 1 to 200 characters, letters, digits and `._-/`.
pub(super) fn check_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidSpec(
            "name must be 1 to 200 characters of letters, digits and . _ - /".to_owned(),
        ))
    }
}

/// The furthest expiry accepted: 100 years ahead (Postgres timestamps end in year 294276;
/// an out-of-range value would otherwise fail the query instead of the request).
const MAX_EXPIRY_SECS: i64 = 100 * 366 * DAY;

/// An expiry must lie in the future and within [`MAX_EXPIRY_SECS`].
fn check_expiry(expires_at: Option<i64>, now: i64) -> Result<(), BrokerError> {
    match expires_at {
        Some(at) if at <= now => Err(BrokerError::InvalidSpec(
            "expires_at must be in the future".into(),
        )),
        Some(at) if at > now.saturating_add(MAX_EXPIRY_SECS) => Err(BrokerError::InvalidSpec(
            "expires_at must be at most 100 years ahead".into(),
        )),
        _ => Ok(()),
    }
}

/// The destruction time for a window of `days` (default 7, 1 to 30).
pub(super) fn deletion_due(days: Option<u32>, now: i64) -> Result<i64, BrokerError> {
    let days = days.unwrap_or(DEFAULT_DELETION_WINDOW_DAYS);
    if !DELETION_WINDOW_DAYS.contains(&days) {
        return Err(BrokerError::InvalidSpec(
            "pending_window_days must be 1 to 30".to_owned(),
        ));
    }
    Ok(now + i64::from(days) * DAY)
}

impl Broker {
    /// Creates a key for `owner`: material from the token's RNG, sealed by the token under the
    /// active master key with the owner, key id, version and context bound as AAD. Returns the
    /// plaintext too when `return_plaintext` (only ever at creation or through
    /// [`Broker::key_plaintext`]).
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`], [`BrokerError::KeyNameTaken`], or an outage.
    pub async fn create_key(
        &self,
        owner: Uuid,
        spec: KeySpec,
        return_plaintext: bool,
        now: i64,
    ) -> Result<(ManagedKey, Option<Zeroizing<Vec<u8>>>), BrokerError> {
        check_name(&spec.name)?;
        check_expiry(spec.expires_at, now)?;
        let id = Uuid::new_v4();
        let (version, material, sealed) = self
            .seal_new_material(owner, id, 1, spec.format, spec.length, &spec.context)
            .await?;
        let (rotation, period) = match spec.rotation {
            Rotation::Manual => ("manual", None),
            Rotation::Auto { period_days } => ("auto", Some(to_i32(period_days))),
        };
        let row = self
            .store
            .insert_key(
                &NewKey {
                    id,
                    client_id: owner,
                    name: spec.name,
                    format: spec.format.as_str().to_owned(),
                    length: i32::try_from(spec.length).unwrap_or(i32::MAX),
                    context: context_json(&spec.context),
                    rotation: rotation.to_owned(),
                    rotation_period_days: period,
                    expires_at: spec.expires_at,
                    mk_version: to_i32(version.get()),
                    sealed,
                    now,
                },
                &crate::audit::meta(),
            )
            .await?;
        self.usage
            .record(owner, id, super::Operation::KeyCreate, now);
        let key = ManagedKey::from_row(row, now)?;
        Ok((key, return_plaintext.then_some(material)))
    }

    /// Generates material of `format`/`length` and seals it for (`owner`, `id`, `version`),
    /// in one token call.
    async fn seal_new_material(
        &self,
        owner: Uuid,
        id: Uuid,
        version: u32,
        format: KeyFormat,
        length: usize,
        context: &EncryptionContext,
    ) -> Result<(MasterKeyVersion, Zeroizing<Vec<u8>>, Vec<u8>), BrokerError> {
        let mk = self.reserve_seals(1).await?;
        let owner = owner.to_string();
        let key_ref = key_ref(id, version);
        let context = context.clone();
        let (material, sealed) = self
            .hsm
            .run(move |token| {
                let mut want = format.random_bytes_hint(length);
                let material = loop {
                    let random = token.random(want)?;
                    if let Some(material) = render(format, length, &random) {
                        break material;
                    }
                    want *= 2;
                };
                let aad = Aad {
                    mk_version: mk,
                    client_id: Some(&owner),
                    key_ref: Some(&key_ref),
                    context: &context,
                };
                let sealed = token.seal(mk, &material, &aad.bytes())?;
                Ok((material, sealed))
            })
            .await?;
        Ok((mk, material, sealed))
    }

    /// A key's metadata, versions and rotation history.
    ///
    /// # Errors
    /// [`BrokerError::KeyNotFound`], or an outage.
    pub async fn key(&self, owner: Uuid, id: Uuid, now: i64) -> Result<KeyDetails, BrokerError> {
        let row = self
            .store
            .key(owner, id)
            .await?
            .ok_or(BrokerError::KeyNotFound)?;
        let (versions, rotations) =
            tokio::try_join!(self.store.key_versions(id), self.store.key_rotations(id))?;
        Ok(KeyDetails {
            key: ManagedKey::from_row(row, now)?,
            versions,
            rotations,
        })
    }

    /// A page of `owner`'s keys by id, optionally in one state or with one name.
    ///
    /// # Errors
    /// An outage.
    pub async fn keys(
        &self,
        owner: Uuid,
        state: Option<KeyState>,
        name: Option<&str>,
        after: Option<Uuid>,
        limit: u32,
        now: i64,
    ) -> Result<Vec<ManagedKey>, BrokerError> {
        self.store
            .keys(owner, state, name, after, i64::from(limit), now)
            .await?
            .into_iter()
            .map(|row| ManagedKey::from_row(row, now))
            .collect()
    }

    /// The plaintext of the current (or a given) version, opened by the token with the context
    /// the key was created with.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] unless active (410 when destroyed),
    /// [`BrokerError::NotAuthentic`] for another context, [`BrokerError::KeyVersionNotFound`],
    /// or an outage.
    pub async fn key_plaintext(
        &self,
        owner: Uuid,
        id: Uuid,
        version: Option<u32>,
        context: EncryptionContext,
        now: i64,
    ) -> Result<(ManagedKey, u32, Zeroizing<Vec<u8>>), BrokerError> {
        let row = self
            .store
            .key(owner, id)
            .await?
            .ok_or(BrokerError::KeyNotFound)?;
        let key = ManagedKey::from_row(row, now)?;
        key.usable()?;
        let version = version.unwrap_or(key.current_version);
        let (mk, sealed) = self
            .store
            .key_material(id, to_i32(version))
            .await?
            .ok_or(BrokerError::KeyVersionNotFound)?;
        let sealed = sealed.ok_or(BrokerError::KeyState(KeyState::Destroyed))?;
        let mk = mk_version(mk)?;
        let owner_text = owner.to_string();
        let key_ref = key_ref(id, version);
        let plaintext = self
            .hsm
            .run(move |token| {
                let aad = Aad {
                    mk_version: mk,
                    client_id: Some(&owner_text),
                    key_ref: Some(&key_ref),
                    context: &context,
                };
                token.unseal(mk, &sealed, &aad.bytes())
            })
            .await
            .map_err(stored_blob_error);
        let plaintext = match plaintext {
            Err(BrokerError::NotAuthentic) => {
                let event = crate::store::NewAuditEvent::info("unauthorized_key_access")
                    .severity("warning")
                    .client(owner)
                    .key(id)
                    .subject(key.name.clone())
                    .details(serde_json::json!({ "operation": "key.read", "version": version }));
                self.store.audit(&crate::audit::meta(), &[event]).await?;
                super::security::respond_to_refusal(&self.store, owner).await?;
                return Err(BrokerError::NotAuthentic);
            }
            other => other?,
        };
        // Material is handed out only once the read is on the record.
        let event = crate::store::NewAuditEvent::info("key.read")
            .client(owner)
            .key(id)
            .subject(key.name.clone())
            .details(serde_json::json!({ "version": version }));
        self.store.audit(&crate::audit::meta(), &[event]).await?;
        self.usage.record(owner, id, super::Operation::KeyRead, now);
        Ok((key, version, plaintext))
    }

    /// Adds a new version (new material, sealed under the active master key) and makes it
    /// current; old versions stay readable. `actor` is a client id or `scheduler`.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] unless active, [`BrokerError::Busy`] if another rotation won,
    /// or an outage.
    pub async fn rotate_key(
        &self,
        owner: Uuid,
        id: Uuid,
        scheduled: bool,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        let row = self
            .store
            .key(owner, id)
            .await?
            .ok_or(BrokerError::KeyNotFound)?;
        let key = ManagedKey::from_row(row.clone(), now)?;
        key.usable()?;
        self.add_version(owner, &row, scheduled, now).await
    }

    /// Seals the next version of `row` and stores it.
    pub(super) async fn add_version(
        &self,
        owner: Uuid,
        row: &KeyRow,
        scheduled: bool,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        let key = ManagedKey::from_row(row.clone(), now)?;
        let context = context_from_json(&row.context)?;
        let next = key.current_version + 1;
        let (mk, _material, sealed) = self
            .seal_new_material(owner, row.id, next, key.format, key.length, &context)
            .await?;
        let (reason, actor) = if scheduled {
            ("scheduled", "scheduler".to_owned())
        } else {
            ("manual", owner.to_string())
        };
        let updated = self
            .store
            .add_key_version(
                row.id,
                row.current_version,
                to_i32(mk.get()),
                &sealed,
                reason,
                &actor,
                now,
                &crate::audit::meta(),
            )
            .await?;
        self.usage
            .record(owner, row.id, super::Operation::KeyRotate, now);
        ManagedKey::from_row(updated, now)
    }

    /// Moves the expiry (unix seconds, in the future; `None` = never). An expired key becomes
    /// active again; a disabled one stays disabled.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] when pending deletion or destroyed, or an outage.
    pub async fn refresh_key(
        &self,
        owner: Uuid,
        id: Uuid,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        check_expiry(expires_at, now)?;
        let current = self.key(owner, id, now).await?.key.state;
        let to = match current {
            KeyState::Disabled => KeyState::Disabled,
            KeyState::Active | KeyState::Expired => KeyState::Active,
            other => return Err(BrokerError::KeyState(other)),
        };
        let row = self
            .store
            .transition_key(
                owner,
                id,
                &[current],
                to,
                now,
                None,
                Some(expires_at),
                &crate::audit::meta(),
            )
            .await?;
        ManagedKey::from_row(row, now)
    }

    /// Disables an active key: every use is refused until it is enabled.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] unless active, or an outage.
    pub async fn disable_key(
        &self,
        owner: Uuid,
        id: Uuid,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        self.move_key(
            owner,
            id,
            &[KeyState::Active],
            KeyState::Disabled,
            now,
            None,
        )
        .await
    }

    /// Enables a disabled key.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] unless disabled, or an outage.
    pub async fn enable_key(
        &self,
        owner: Uuid,
        id: Uuid,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        self.move_key(
            owner,
            id,
            &[KeyState::Disabled],
            KeyState::Active,
            now,
            None,
        )
        .await
    }

    /// Schedules destruction after a pending window (default 7 days, 1 to 30); cancellable
    /// until then.
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`] for a bad window, [`BrokerError::KeyState`] when already
    /// pending or destroyed, or an outage.
    pub async fn schedule_key_deletion(
        &self,
        owner: Uuid,
        id: Uuid,
        window_days: Option<u32>,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        let due = deletion_due(window_days, now)?;
        self.move_key(
            owner,
            id,
            &[KeyState::Active, KeyState::Disabled, KeyState::Expired],
            KeyState::PendingDeletion,
            now,
            Some(due),
        )
        .await
    }

    /// Cancels a scheduled destruction; the key comes back disabled (as in AWS KMS), for an
    /// officer to enable deliberately.
    ///
    /// # Errors
    /// [`BrokerError::KeyState`] unless pending deletion, or an outage.
    pub async fn cancel_key_deletion(
        &self,
        owner: Uuid,
        id: Uuid,
        now: i64,
    ) -> Result<ManagedKey, BrokerError> {
        self.move_key(
            owner,
            id,
            &[KeyState::PendingDeletion],
            KeyState::Disabled,
            now,
            None,
        )
        .await
    }

    async fn move_key(
        &self,
        owner: Uuid,
        id: Uuid,
        from: &[KeyState],
        to: KeyState,
        now: i64,
        deletion_due: Option<i64>,
    ) -> Result<ManagedKey, BrokerError> {
        let row = self
            .store
            .transition_key(
                owner,
                id,
                from,
                to,
                now,
                deletion_due,
                None,
                &crate::audit::meta(),
            )
            .await?;
        ManagedKey::from_row(row, now)
    }
}
