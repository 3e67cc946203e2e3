//! The token operations keybroker runs on a pooled session ([`TokenSession`]): random bytes,
//! AES-GCM seal and open storing the IV the token used, whoever chose it ([`IvSource`]), the
//! self-test of each master key and its control values, ECDSA signatures and the HMAC. It
//! finds keys through `objects` and never opens, closes or logs in a session.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{ObjectClass, ObjectHandle};
use zeroize::Zeroizing;

use crate::crypto::{GCM_IV_LEN, GCM_TAG_LEN, MasterKeyVersion};

use super::error::classify;
use super::objects::AUDIT_KEY_LABEL;
use super::session::PooledSession;
use super::{Hsm, HsmError, Inner, lock, read, worker, write};

/// The AAD of the self-test's seal: no blob is ever sealed with it.
const SELF_TEST_AAD: &[u8] = b"keybroker self-test";

/// Who chooses the IV of an AES-GCM seal. PKCS#11 leaves it to the token: SoftHSM2 and Kryoptic
/// use the caller's; AWS CloudHSM ignores it, makes its own and writes it back into the
/// parameters; tokens in a FIPS-approved mode refuse a caller's IV and make one from a zeroed
/// buffer. Either way the IV stored is the one read back after `C_Encrypt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum IvSource {
    /// We draw the IV from the token's RNG and pass it; the token uses it.
    Caller = 0,
    /// We pass a zeroed buffer; the token fills in the IV it used.
    Token = 1,
}

/// A random value sealed under one master key by the self-test, with the AAD
/// [`SELF_TEST_AAD`]. Not secret: nothing else is ever sealed with that AAD, and the value is
/// used for nothing but opening it again.
pub(super) struct Control {
    sealed: Vec<u8>,
    plain: Zeroizing<Vec<u8>>,
}

impl Hsm {
    /// The start-up self-test: seals a random value under each of `versions` and opens it
    /// again, as every seal will. The versions are remembered and tested again after every
    /// re-initialisation of the module (and a version first sealed under later is tested then).
    ///
    /// # Errors
    /// [`HsmError::SelfTest`] naming the token, the version and what went wrong, or an outage.
    pub async fn self_test(&self, versions: &[MasterKeyVersion]) -> Result<(), HsmError> {
        lock(&self.inner.in_use).extend(versions.iter().copied());
        let versions = versions.to_vec();
        self.run(move |s| {
            for version in &versions {
                s.verify(*version)?;
            }
            Ok(())
        })
        .await
    }
}

impl Inner {
    /// Who chooses the GCM IV, as far as we know.
    fn iv_source(&self) -> IvSource {
        if self.iv_source.load(Ordering::Acquire) == IvSource::Token as u8 {
            IvSource::Token
        } else {
            IvSource::Caller
        }
    }

    /// Records what the token showed about GCM IVs; logged when it changes.
    fn learn_iv_source(&self, source: IvSource, why: &'static str) {
        let before = self.iv_source.swap(source as u8, Ordering::AcqRel);
        if before != source as u8 {
            tracing::info!(target: "keybroker::hsm", token = %self.token_label, why, "AES-GCM IVs: {}", match source {
                IvSource::Caller => "keybroker draws them from the token's RNG",
                IvSource::Token => "the token makes them; keybroker stores the IV it returns",
            });
        }
    }
}

/// A logged-in session lent to one [`Hsm::run`] call, in a worker's pass.
pub struct TokenSession<'a> {
    pub(super) inner: &'a Inner,
    pub(super) pooled: &'a mut PooledSession,
    /// The random bytes of the pass: every draw of the pass's calls comes from it.
    pub(super) random: &'a mut worker::PassRandom,
}

impl TokenSession<'_> {
    /// `len` bytes from the token's RNG, from the pass's draw (see `worker::PassRandom`).
    ///
    /// # Errors
    /// Any token failure.
    pub fn random(&mut self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        self.random.take(&self.pooled.session, &mut out)?;
        Ok(out)
    }

    /// AES-256-GCM under master key `version` with a 128-bit tag and a fresh 96-bit IV: drawn
    /// from the token's RNG, or made by the token itself if it insists (see `IvSource`).
    /// Returns `iv || ciphertext || tag`, with the IV the token says it used. The first seal
    /// under a version (per module initialisation) is preceded by its self-test.
    ///
    /// # Errors
    /// [`HsmError::ObjectMissing`] when the token lacks the version, [`HsmError::SelfTest`], or
    /// any token failure.
    pub fn seal(
        &mut self,
        version: MasterKeyVersion,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let key = self.sealing_key(version)?;
        let verified = read(&self.inner.verified).contains(&version);
        if !verified {
            self.verify(version)?;
            lock(&self.inner.in_use).insert(version);
        }
        self.seal_with(key, plaintext, aad)
    }

    /// The handle of master key `version` for sealing. The version comes from our own records,
    /// so its absence from the token is an outage, not a caller's mistake.
    fn sealing_key(&mut self, version: MasterKeyVersion) -> Result<ObjectHandle, HsmError> {
        self.master_key(version).map_err(|e| match e {
            HsmError::UnknownMasterKey(v) => HsmError::ObjectMissing(v.token_label()),
            other => other,
        })
    }

    /// One AES-GCM encryption under `key`; the IV stored is the one the parameters hold after
    /// `C_Encrypt`, whoever wrote it. At most two tries: the second after the token showed that
    /// it follows the other IV convention.
    fn seal_with(
        &mut self,
        key: ObjectHandle,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        for _ in 0..2 {
            let source = self.inner.iv_source();
            let mut iv = [0u8; GCM_IV_LEN];
            if source == IvSource::Caller {
                self.random.take(&self.pooled.session, &mut iv)?;
            }
            let passed = iv;
            let encrypted = {
                let params = GcmParams::new(&mut iv, aad, (GCM_TAG_LEN as u64 * 8).into())
                    .map_err(|_| HsmError::Unexpected("GCM parameters rejected"))?;
                self.pooled
                    .session
                    .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            };
            let sealed = match encrypted {
                Ok(sealed) => sealed,
                // A token that makes every IV itself (a FIPS-mode HSM) refuses ours.
                Err(CkError::Pkcs11(RvError::MechanismParamInvalid, _))
                    if source == IvSource::Caller =>
                {
                    self.inner
                        .learn_iv_source(IvSource::Token, "the token refused a caller's IV");
                    continue;
                }
                Err(e) => return Err(classify(e)),
            };
            if iv == [0u8; GCM_IV_LEN] {
                // The zeroed buffer came back as it went: this token uses the caller's IV, and
                // would use the zero IV for every seal. The ciphertext is dropped unseen.
                self.inner
                    .learn_iv_source(IvSource::Caller, "the token kept a zeroed IV");
                continue;
            }
            if source == IvSource::Caller && iv != passed {
                self.inner
                    .learn_iv_source(IvSource::Token, "the token replaced the caller's IV");
            }
            if sealed.len() != plaintext.len() + GCM_TAG_LEN {
                return Err(HsmError::Unexpected("GCM output has the wrong length"));
            }
            let mut out = Vec::with_capacity(GCM_IV_LEN + sealed.len());
            out.extend_from_slice(&iv);
            out.extend_from_slice(&sealed);
            return Ok(out);
        }
        Err(HsmError::Unexpected(
            "the token neither keeps a caller's GCM IV nor makes its own",
        ))
    }

    /// Opens what [`TokenSession::seal`] made.
    ///
    /// # Errors
    /// [`HsmError::NotAuthentic`] when the payload or AAD differ from what was sealed;
    /// [`HsmError::UnknownMasterKey`]; any token failure.
    pub fn unseal(
        &mut self,
        version: MasterKeyVersion,
        payload: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if payload.len() < GCM_IV_LEN + GCM_TAG_LEN {
            return Err(HsmError::NotAuthentic);
        }
        let key = self.master_key(version)?;
        match self.unseal_with(key, payload, aad) {
            Err(HsmError::NotAuthentic) => self.confirm_not_authentic(version, key, payload, aad),
            other => other,
        }
    }

    /// The token refused to open a blob. A bad tag and a token that fails its decryptions can
    /// look the same (SoftHSM2 answers `CKR_GENERAL_ERROR` to both), and only the first is the
    /// caller's doing: so open the version's control value. If that fails too, the token is
    /// sick (an outage, never counted against the caller); if it opens, try the blob once more
    /// (the failure may have been transient) and only then call the blob not authentic.
    fn confirm_not_authentic(
        &mut self,
        version: MasterKeyVersion,
        key: ObjectHandle,
        payload: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let control = match read(&self.inner.controls).get(&version).cloned() {
            Some(control) => control,
            None => {
                // Not tested in this process yet (a version only ever opened): make one.
                let plain = self.random(32)?;
                let sealed = self.seal_with(key, &plain, SELF_TEST_AAD)?;
                let control = Arc::new(Control { sealed, plain });
                write(&self.inner.controls).insert(version, control.clone());
                control
            }
        };
        match self.unseal_with(key, &control.sealed, SELF_TEST_AAD) {
            Ok(opened) if opened == control.plain => {}
            Ok(_) | Err(HsmError::NotAuthentic) => {
                tracing::warn!(target: "keybroker::hsm", version = %version,
                    "the token fails to open a value it opened before: treating it as unavailable");
                return Err(HsmError::Unavailable(CkError::Pkcs11(
                    RvError::GeneralError,
                    cryptoki::context::Function::Decrypt,
                )));
            }
            Err(e) => return Err(e),
        }
        self.unseal_with(key, payload, aad)
    }

    fn unseal_with(
        &mut self,
        key: ObjectHandle,
        payload: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let (iv, sealed) = payload.split_at(GCM_IV_LEN);
        let mut iv_param = [0u8; GCM_IV_LEN];
        iv_param.copy_from_slice(iv);
        let params = GcmParams::new(&mut iv_param, aad, (GCM_TAG_LEN as u64 * 8).into())
            .map_err(|_| HsmError::Unexpected("GCM parameters rejected"))?;
        match self
            .pooled
            .session
            .decrypt(&Mechanism::AesGcm(params), key, sealed)
        {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            // A bad tag is CKR_GENERAL_ERROR on SoftHSM2 and CKR_ENCRYPTED_DATA_INVALID on
            // others; both mean "does not authenticate", whatever the vendor.
            Err(CkError::Pkcs11(
                RvError::GeneralError
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid,
                _,
            )) => Err(HsmError::NotAuthentic),
            Err(e) => Err(classify(e)),
        }
    }

    /// The self-test of master key `version`: seals a random value exactly as [`seal`] does and
    /// opens it again. A token that reports another IV than it used (or garbles the ciphertext)
    /// fails here instead of silently writing blobs nobody can open.
    ///
    /// [`seal`]: TokenSession::seal
    ///
    /// # Errors
    /// [`HsmError::SelfTest`] naming what went wrong; an outage as itself.
    fn verify(&mut self, version: MasterKeyVersion) -> Result<(), HsmError> {
        let inner = self.inner;
        let failed = |problem: String| {
            let e = HsmError::SelfTest {
                token: inner.token_label.clone(),
                version,
                problem,
            };
            tracing::error!(target: "keybroker::hsm", error = %e, "self-test failed");
            e
        };
        let key = self.sealing_key(version)?;
        let probe = self.random(32)?;
        let sealed = match self.seal_with(key, &probe, SELF_TEST_AAD) {
            Ok(sealed) => sealed,
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => return Err(failed(format!("the seal failed: {e}"))),
        };
        match self.unseal_with(key, &sealed, SELF_TEST_AAD) {
            Ok(opened) if opened == probe => {}
            Ok(_) => return Err(failed("it opened to a different value".to_owned())),
            Err(HsmError::NotAuthentic) => {
                return Err(failed(
                    "what it sealed does not open: the IV or ciphertext it returned is not the one it used"
                        .to_owned(),
                ));
            }
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => return Err(failed(format!("the open failed: {e}"))),
        }
        write(&self.inner.verified).insert(version);
        write(&self.inner.controls).insert(
            version,
            Arc::new(Control {
                sealed,
                plain: probe,
            }),
        );
        Ok(())
    }

    /// Re-runs the self-test of every master key in use when the module was (re-)initialised
    /// since it last passed: a token that comes back from a failover may not be the one tested.
    pub(super) fn verify_in_use(&mut self) -> Result<(), HsmError> {
        let epoch = self.inner.module.epoch.load(Ordering::Acquire);
        if self.inner.verified_epoch.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        let versions: Vec<MasterKeyVersion> = lock(&self.inner.in_use).iter().copied().collect();
        write(&self.inner.verified).clear();
        for version in versions {
            match self.verify(version) {
                Ok(()) => {}
                // Destroyed meanwhile (by another broker): nothing is sealed or opened under it.
                Err(HsmError::ObjectMissing(_)) => {
                    lock(&self.inner.in_use).remove(&version);
                }
                // The epoch stays unverified: the next call tries again.
                Err(e) => return Err(e),
            }
        }
        self.inner.verified_epoch.store(epoch, Ordering::Release);
        Ok(())
    }

    /// ECDSA P-256 with the token-signing key over a SHA-256 digest the caller computed
    /// (CKM_ECDSA is raw ECDSA; tokens rarely offer CKM_ECDSA_SHA256). Returns `r || s`, which is
    /// the JWS ES256 signature format.
    ///
    /// # Errors
    /// [`HsmError::ObjectMissing`] without a signing key; any token failure.
    pub fn sign_digest(&mut self, label: &str, digest: &[u8; 32]) -> Result<[u8; 64], HsmError> {
        let key = self.named_key(ObjectClass::PRIVATE_KEY, label)?;
        let signature = self
            .pooled
            .session
            .sign(&Mechanism::Ecdsa, key, digest)
            .map_err(classify)?;
        signature
            .try_into()
            .map_err(|_| HsmError::Unexpected("ECDSA signature is not 64 bytes"))
    }

    /// HMAC-SHA256 with keybroker's pepper/audit key, inside the token.
    ///
    /// # Errors
    /// [`HsmError::ObjectMissing`] without the key; any token failure.
    pub fn hmac(&mut self, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let key = self.named_key(ObjectClass::SECRET_KEY, AUDIT_KEY_LABEL)?;
        let mac = self
            .pooled
            .session
            .sign(&Mechanism::Sha256Hmac, key, data)
            .map_err(classify)?;
        mac.try_into()
            .map_err(|_| HsmError::Unexpected("HMAC-SHA256 is not 32 bytes"))
    }
}
