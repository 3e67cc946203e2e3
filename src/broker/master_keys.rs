//! Master-key lifecycle: rotation that a crash at any point leaves resumable, the rewrap job
//! that moves every stored blob to the active version inside the token, retirement, destruction,
//! and the automatic rotation policy.
//!
//! Every change takes the cluster-wide master-key lock in Postgres (an advisory lock that dies
//! with its connection), so two brokers or officers asking at once make one new version; the
//! rewrap job itself needs no lock: its batches lock their rows `FOR UPDATE SKIP LOCKED`.

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::{
    Broker, BrokerError, MasterKeyState, keys::context_from_json, keys::key_ref, secrets::aads,
};
use crate::crypto::envelope::{self, DataKey};
use crate::crypto::{Aad, MasterKeyVersion};
use crate::hsm::HsmError;
use crate::store::{
    MasterKeyChangeError, MasterKeyStatus, RewrapJob, RewrapStart, RewrappedKey, RewrappedSecret,
};

/// How many blobs one rewrap batch moves (one transaction, one token call).
pub const REWRAP_BATCH: i64 = 200;

/// When the broker rotates the master key by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterKeyPolicy {
    /// Rotate when the active version is this many days old (0: never by age).
    pub rotation_period_days: u32,
    /// Rotate when the active version has done this many seals. GCM with random 96-bit IVs is
    /// safe for 2^32 seals under one key (NIST SP 800-38D); the default stays far below.
    pub max_seals: u64,
}

impl Default for MasterKeyPolicy {
    fn default() -> Self {
        Self {
            rotation_period_days: 365,
            max_seals: 1 << 30,
        }
    }
}

/// A version as the overview shows it, with whether the token holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyView {
    /// What Postgres records.
    pub recorded: Option<MasterKeyStatus>,
    /// The version.
    pub version: MasterKeyVersion,
    /// Whether the token holds it.
    pub on_token: bool,
}

/// Why the broker rotated by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationReason {
    /// The active version reached the age limit.
    Age,
    /// The active version reached the seal limit.
    Seals,
}

/// Progress of one rewrap batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewrapProgress {
    /// Blobs moved by the job so far.
    pub rewrapped: i64,
    /// Blobs still outside the active version.
    pub remaining: i64,
    /// Blobs this batch could not open (left where they are, and logged).
    pub failed: usize,
}

/// In debug builds, `KEYBROKER_CRASH_AT=<name>` makes the process kill itself with SIGKILL when
/// it reaches the crash point `name`: the crash-safety tests stop the real binary at each step of
/// a rotation or a rewrap exactly as `kill -9` would. Release builds ignore it.
pub(crate) fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("KEYBROKER_CRASH_AT").is_ok_and(|at| at == name) {
        tracing::warn!(target: "keybroker::broker", crash_point = name, "KEYBROKER_CRASH_AT: killing this process");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(60));
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

impl Broker {
    /// Creates master key v(N+1) on the token and makes it active for new seals; older versions
    /// stay decrypt-only. A rotation that stopped half-way (a pending version) is finished
    /// instead, and one that another broker finished while this one waited for the lock counts
    /// as done: racing rotations make one new version. Returns the active version.
    ///
    /// # Errors
    /// A token or database failure (the rotation stays pending and the next attempt finishes it).
    pub async fn rotate_master_key(&self) -> Result<MasterKeyVersion, BrokerError> {
        let seen = self
            .store
            .master_key_in_state(MasterKeyState::Active)
            .await?;
        let _lock = self.store.lock_master_keys().await?;
        let version = match self
            .store
            .master_key_in_state(MasterKeyState::Pending)
            .await?
        {
            Some(pending) => pending,
            None => {
                let active = self
                    .store
                    .master_key_in_state(MasterKeyState::Active)
                    .await?;
                if let Some(active) = active
                    && active != seen.unwrap_or(active)
                {
                    return Ok(active);
                }
                let next = self.next_master_key_version().await?;
                self.store.record_pending_master_key(next).await?;
                crash_point("rotate:recorded");
                next
            }
        };
        self.hsm.ensure_master_key(version).await?;
        // A version that would seal what it cannot open never becomes active.
        self.hsm.self_test(&[version]).await?;
        crash_point("rotate:on-token");
        self.store
            .activate_pending_master_key(version, &crate::audit::meta())
            .await?;
        self.expire_seal_budget().await;
        self.custody_token_changed(version, true);
        Ok(version)
    }

    /// Finishes a rotation that stopped half-way, if one did and no one else is at it. The
    /// maintenance pass runs this, so a crashed rotation completes without an officer.
    ///
    /// # Errors
    /// A token or database failure.
    pub async fn finish_interrupted_rotation(
        &self,
    ) -> Result<Option<MasterKeyVersion>, BrokerError> {
        let Some(_lock) = self.store.try_lock_master_keys().await? else {
            return Ok(None);
        };
        let Some(version) = self
            .store
            .master_key_in_state(MasterKeyState::Pending)
            .await?
        else {
            return Ok(None);
        };
        self.hsm.ensure_master_key(version).await?;
        self.store
            .activate_pending_master_key(version, &crate::audit::meta())
            .await?;
        self.expire_seal_budget().await;
        self.custody_token_changed(version, true);
        Ok(Some(version))
    }

    /// The next version: above every version recorded in Postgres and every version on the
    /// token (one created there but never recorded is not reused).
    async fn next_master_key_version(&self) -> Result<MasterKeyVersion, BrokerError> {
        let on_token = self.hsm.master_key_versions().await?;
        let recorded = self.store.master_keys().await?;
        on_token
            .iter()
            .copied()
            .chain(recorded.iter().map(|row| row.version))
            .max()
            .map_or(Some(MasterKeyVersion::FIRST), MasterKeyVersion::next)
            .ok_or(BrokerError::Hsm(HsmError::Unexpected(
                "master key versions exhausted",
            )))
    }

    /// Seal under the new active version from the next call on (on this node at once; other
    /// nodes within the active-version refresh interval).
    async fn expire_seal_budget(&self) {
        self.budget.expire();
    }

    /// Every version recorded in Postgres or present on the token, ascending, with its state,
    /// seals and the stored blobs under it. A version on the token but not recorded shows with
    /// `recorded: None` (created by a rotation whose database was restored, or by hand).
    ///
    /// # Errors
    /// A token or database failure.
    pub async fn master_key_overview(&self) -> Result<Vec<MasterKeyView>, BrokerError> {
        let on_token = self.hsm.master_key_versions().await?;
        let recorded = self.store.master_key_overview().await?;
        let mut versions: Vec<MasterKeyVersion> = on_token
            .iter()
            .copied()
            .chain(recorded.iter().map(|r| r.version))
            .collect();
        versions.sort_unstable();
        versions.dedup();
        Ok(versions
            .into_iter()
            .map(|version| MasterKeyView {
                recorded: recorded.iter().find(|r| r.version == version).cloned(),
                version,
                on_token: on_token.contains(&version),
            })
            .collect())
    }

    /// The self-test before serving: seals a random value under every master-key version that
    /// blobs may be sealed or opened under (active and decrypt-only, on the token) and opens it
    /// again. A recorded version the token lacks is logged, not tested: its blobs cannot be
    /// opened on this token whatever the test says. Returns the versions tested.
    ///
    /// # Errors
    /// [`BrokerError::HsmUnavailable`] holding [`HsmError::SelfTest`] when a round trip fails
    /// (the message names the token, the mechanism and what went wrong); any other token or
    /// database failure.
    pub async fn self_test(&self) -> Result<Vec<MasterKeyVersion>, BrokerError> {
        let mut versions = Vec::new();
        for view in self.master_key_overview().await? {
            let Some(recorded) = &view.recorded else {
                continue;
            };
            if !matches!(
                recorded.state,
                MasterKeyState::Active | MasterKeyState::DecryptOnly
            ) {
                continue;
            }
            if !view.on_token {
                tracing::warn!(
                    target: "keybroker::broker",
                    version = %view.version,
                    token = %self.hsm.token_label(),
                    state = %recorded.state,
                    "master key is recorded but not on the token; blobs under it cannot be opened here"
                );
                continue;
            }
            versions.push(view.version);
        }
        self.hsm.self_test(&versions).await?;
        Ok(versions)
    }

    /// Starts the rewrap job, joins the one running, or (nothing left to move) returns the
    /// latest, done. Any broker's maintenance pass works on a running job;
    /// [`Broker::run_rewrap`] drives it to the end.
    ///
    /// # Errors
    /// [`BrokerError::NoActiveKey`] or a database failure.
    pub async fn start_rewrap(
        &self,
        started_by: &str,
    ) -> Result<(RewrapJob, RewrapStart), BrokerError> {
        let started = self
            .store
            .start_rewrap_job(started_by, &crate::audit::meta())
            .await?;
        self.custody_changed();
        Ok(started)
    }

    /// The running rewrap job, else the latest.
    ///
    /// # Errors
    /// A database failure.
    pub async fn rewrap_job(&self) -> Result<Option<RewrapJob>, BrokerError> {
        Ok(self.store.rewrap_job().await?)
    }

    /// Moves one batch of stored blobs to the active version inside the token: each is opened
    /// and sealed again in one token call; the plaintext exists only in zeroizing buffers of this
    /// process meanwhile and is never returned or logged. Nothing is stored unless the whole
    /// batch was sealed. `None` when no job is running.
    ///
    /// # Errors
    /// A token or database failure (the batch is left as it was).
    pub async fn rewrap_step(&self, limit: i64) -> Result<Option<RewrapProgress>, BrokerError> {
        let Some(mut batch) = self.store.rewrap_batch(limit).await? else {
            return Ok(None);
        };
        let target = batch.target;
        let empty = batch.is_empty();
        let keys = Arc::new(std::mem::take(&mut batch.keys));
        let secrets = Arc::new(std::mem::take(&mut batch.secrets));
        let (moved_keys, moved_secrets, failed) = if empty {
            (Vec::new(), Vec::new(), 0)
        } else {
            // Counted before sealing, so that a crash can only overcount.
            self.store
                .count_seals(target, keys.len() + secrets.len())
                .await?;
            self.hsm
                .run(move |token| {
                    let mut moved_keys = Vec::with_capacity(keys.len());
                    let mut moved_secrets = Vec::with_capacity(secrets.len());
                    let mut failed = 0;
                    for key in keys.iter() {
                        match rewrap_key(token, key, target) {
                            Ok(moved) => moved_keys.push(moved),
                            Err(e) if e.is_unavailable() => return Err(e),
                            Err(e) => {
                                failed += 1;
                                tracing::error!(target: "keybroker::broker", key = %key.key_id, version = key.version, error = %e, "a stored key version cannot be rewrapped");
                            }
                        }
                    }
                    for secret in secrets.iter() {
                        match rewrap_secret(token, secret, target) {
                            Ok(moved) => moved_secrets.push(moved),
                            Err(e) if e.is_unavailable() => return Err(e),
                            Err(e) => {
                                failed += 1;
                                tracing::error!(target: "keybroker::broker", secret = %secret.secret_id, version = secret.version, error = %e, "a stored secret version cannot be rewrapped");
                            }
                        }
                    }
                    Ok((moved_keys, moved_secrets, failed))
                })
                .await?
        };
        crash_point("rewrap:sealed");
        let (rewrapped, remaining) = batch
            .commit(
                moved_keys,
                moved_secrets,
                &self.store,
                &crate::audit::meta(),
            )
            .await?;
        crash_point("rewrap:committed");
        self.custody_changed();
        Ok(Some(RewrapProgress {
            rewrapped,
            remaining,
            failed,
        }))
    }

    /// Runs rewrap batches of `batch_size` until the job is done, no job runs, or a batch moves nothing while
    /// blobs remain (they cannot be opened: see the log). `progress` sees each batch.
    ///
    /// # Errors
    /// A token or database failure, or [`BrokerError::RewrapStuck`].
    pub async fn run_rewrap(
        &self,
        batch_size: i64,
        mut progress: impl FnMut(&RewrapProgress),
    ) -> Result<(), BrokerError> {
        let mut last = None;
        while let Some(step) = self.rewrap_step(batch_size.max(1)).await? {
            progress(&step);
            if step.remaining == 0 {
                return Ok(());
            }
            if last == Some(step.rewrapped) {
                if step.failed > 0 {
                    return Err(BrokerError::RewrapStuck(step.remaining));
                }
                // Another broker holds the remaining rows for its batch: give it a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last = Some(step.rewrapped);
        }
        Ok(())
    }

    /// Retires a decrypt-only version that no stored blob references.
    ///
    /// # Errors
    /// [`BrokerError::MasterKeyNotFound`], [`BrokerError::MasterKeyState`] or
    /// [`BrokerError::MasterKeyInUse`].
    pub async fn retire_master_key(&self, version: MasterKeyVersion) -> Result<(), BrokerError> {
        let _lock = self.store.lock_master_keys().await?;
        self.store
            .retire_master_key(version, &crate::audit::meta())
            .await
            .map_err(master_key_error)?;
        self.custody_changed();
        Ok(())
    }

    /// Removes a retired version from the token for good, then records it destroyed. Refused
    /// while any stored blob references it. Blobs that clients hold under it can no longer be
    /// opened (`422 unknown_mk_version`).
    ///
    /// # Errors
    /// [`BrokerError::MasterKeyNotFound`], [`BrokerError::MasterKeyState`] (not retired) or
    /// [`BrokerError::MasterKeyInUse`]; a token failure.
    pub async fn destroy_master_key(&self, version: MasterKeyVersion) -> Result<(), BrokerError> {
        let _lock = self.store.lock_master_keys().await?;
        self.store
            .check_master_key_destroyable(version)
            .await
            .map_err(master_key_error)?;
        self.hsm.destroy_master_key(version).await?;
        crash_point("destroy:off-token");
        self.store
            .record_master_key_destroyed(version, &crate::audit::meta())
            .await?;
        self.custody_token_changed(version, false);
        Ok(())
    }

    /// The automatic rotation policy, checked by each maintenance pass: rotate when the active
    /// version is too old or has done too many seals, then start a rewrap job. Returns why it
    /// rotated, if it did.
    ///
    /// # Errors
    /// A token or database failure.
    pub async fn rotate_master_key_if_due(
        &self,
        now: i64,
    ) -> Result<Option<RotationReason>, BrokerError> {
        // The plain rows, not the overview: this runs every pass and needs no blob counts.
        let Some(active) = self
            .store
            .master_keys()
            .await?
            .into_iter()
            .find(|row| row.state == MasterKeyState::Active)
        else {
            return Ok(None);
        };
        let policy = self.master_key_policy;
        let age_limit = i64::from(policy.rotation_period_days) * 86_400;
        let activated = active.activated_at.unwrap_or(now);
        let reason = if u64::try_from(active.seals_reserved).unwrap_or(0) >= policy.max_seals {
            RotationReason::Seals
        } else if policy.rotation_period_days > 0 && now - activated >= age_limit {
            RotationReason::Age
        } else {
            return Ok(None);
        };
        let version = self.rotate_master_key().await?;
        tracing::info!(target: "keybroker::broker", mk_version = version.get(), ?reason, "master key rotated by policy");
        self.start_rewrap("scheduler").await?;
        Ok(Some(reason))
    }
}

fn master_key_error(err: MasterKeyChangeError) -> BrokerError {
    match err {
        MasterKeyChangeError::NotFound(v) => BrokerError::MasterKeyNotFound(v),
        MasterKeyChangeError::WrongState(v, state) => BrokerError::MasterKeyState(v, state),
        MasterKeyChangeError::InUse(v, blobs) => BrokerError::MasterKeyInUse(v, blobs),
        MasterKeyChangeError::Store(e) => e.into(),
    }
}

/// A managed-key version opened under its old version and sealed under `target`.
fn rewrap_key(
    token: &mut crate::hsm::TokenSession<'_>,
    key: &crate::store::KeyBlob,
    target: MasterKeyVersion,
) -> Result<RewrappedKey, HsmError> {
    let from = stored_version(key.mk_version)?;
    let context = context_from_json(&key.context)
        .map_err(|_| HsmError::Unexpected("a stored context does not parse"))?;
    let owner = key.client_id.to_string();
    let version = u32::try_from(key.version).map_err(|_| HsmError::Unexpected("key version"))?;
    let key_ref = key_ref(key.key_id, version);
    let aad = |mk_version| {
        Aad {
            mk_version,
            client_id: Some(&owner),
            key_ref: Some(&key_ref),
            context: &context,
        }
        .bytes()
    };
    let material: Zeroizing<Vec<u8>> = token.unseal(from, &key.sealed, &aad(from))?;
    let sealed = token.seal(target, &material, &aad(target))?;
    Ok(RewrappedKey {
        key_id: key.key_id,
        version: key.version,
        sealed,
    })
}

/// A secret version's data key moved to `target`, and its value sealed again under the same
/// data key with the new AAD (which names the master-key version too).
fn rewrap_secret(
    token: &mut crate::hsm::TokenSession<'_>,
    secret: &crate::store::SecretBlob,
    target: MasterKeyVersion,
) -> Result<RewrappedSecret, HsmError> {
    let from = stored_version(secret.mk_version)?;
    let context = context_from_json(&secret.context)
        .map_err(|_| HsmError::Unexpected("a stored context does not parse"))?;
    let owner = secret.client_id.to_string();
    let version =
        u32::try_from(secret.version).map_err(|_| HsmError::Unexpected("secret version"))?;
    let (old_dek_aad, old_value_aad) = aads(from, &owner, secret.secret_id, version, &context);
    let (new_dek_aad, new_value_aad) = aads(target, &owner, secret.secret_id, version, &context);
    let dek = token.unseal(from, &secret.wrapped_dek, &old_dek_aad)?;
    let key = DataKey::from_bytes(&dek)
        .map_err(|_| HsmError::Unexpected("data key of the wrong size"))?;
    let value =
        envelope::open(&key, &old_value_aad, &secret.sealed).map_err(|_| HsmError::NotAuthentic)?;
    let mut nonce = [0u8; envelope::NONCE_LEN];
    nonce.copy_from_slice(&token.random(envelope::NONCE_LEN)?);
    let sealed = envelope::seal(&key, nonce, &new_value_aad, &value)
        .map_err(|_| HsmError::Unexpected("in-process seal failed"))?;
    let wrapped_dek = token.seal(target, &dek, &new_dek_aad)?;
    Ok(RewrappedSecret {
        secret_id: secret.secret_id,
        version: secret.version,
        wrapped_dek,
        sealed,
    })
}

fn stored_version(version: i32) -> Result<MasterKeyVersion, HsmError> {
    MasterKeyVersion::from_stored(version).ok_or(HsmError::Unexpected(
        "a stored master key version is out of range",
    ))
}
