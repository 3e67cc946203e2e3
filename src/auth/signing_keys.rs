//! The keys that sign access tokens: which versions sign and which replaced ones stay published
//! (kept in Postgres, read through `store`), their public keys (read from the token through
//! `hsm`; the private keys never leave it), rotation and retirement, and the JWKS document.
//! Signing and verifying tokens with them is in `tokens`.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash,
};

use super::{AuthError, Authenticator, read, unix_now};
use crate::audit;
use crate::hsm::HsmError;
use crate::store::SigningKeyState;

/// One of our signing keys: its JWK (with `kid` = RFC 7638 thumbprint) and verifier.
pub(super) struct SigningKey {
    pub(super) kid: String,
    jwk: Jwk,
    pub(super) decoding: DecodingKey,
}

/// A signing key this broker publishes: the one that signs (first), or a replaced one whose
/// tokens may still be live (until `published_until`, unix seconds).
pub(super) struct PublishedKey {
    pub(super) label: String,
    pub(super) key: Arc<SigningKey>,
    published_until: Option<i64>,
}

impl PublishedKey {
    pub(super) fn live_at(&self, now: i64) -> bool {
        self.published_until.is_none_or(|until| now < until)
    }
}

/// How long, beyond a token's lifetime and leeway, a replaced signing key stays published: other
/// brokers pick up a rotation at their next refresh, and may sign with the old key until then.
const SIGNING_KEY_REFRESH_MARGIN: i64 = 60;

/// How often an unknown `kid` may make a broker re-read the signing keys (another broker may
/// have rotated): at most once per this many seconds.
const UNKNOWN_KID_REFRESH_SECS: i64 = 2;

impl SigningKey {
    fn from_ec_point(ec_point: &[u8]) -> Result<Self, HsmError> {
        let (x, y) = ec_point_coordinates(ec_point)
            .ok_or(HsmError::Unexpected("the signing key is not a P-256 point"))?;
        let mut jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::ES256),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x,
                y,
            }),
        };
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|_| HsmError::Unexpected("cannot compute the key thumbprint"))?;
        jwk.common.key_id = Some(kid.clone());
        let decoding = DecodingKey::from_jwk(&jwk)
            .map_err(|_| HsmError::Unexpected("cannot build a verifier for the signing key"))?;
        Ok(Self { kid, jwk, decoding })
    }
}

/// The x and y coordinates (base64url) of a P-256 CKA_EC_POINT, which tokens give either raw
/// (`04 || x || y`) or wrapped in a DER OCTET STRING (`04 41 04 || x || y`).
pub fn ec_point_coordinates(ec_point: &[u8]) -> Option<(String, String)> {
    let raw = match ec_point {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        raw if raw.len() == 65 => raw,
        _ => return None,
    };
    // Parsing checks the point is on the curve.
    let key = p256::PublicKey::from_sec1_bytes(raw).ok()?;
    let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
    Some((
        URL_SAFE_NO_PAD.encode(point.x()?),
        URL_SAFE_NO_PAD.encode(point.y()?),
    ))
}

impl Authenticator {
    /// Re-reads which signing keys sign and are published at `now`, fetching the public key of
    /// any new one from the token. Brokers call it each maintenance pass, and when a token names
    /// a `kid` they do not know (at most every few seconds).
    ///
    /// # Errors
    /// A token or database failure (the keys in use stay as they were).
    pub async fn refresh_signing_keys(&self, now: i64) -> Result<(), AuthError> {
        let mut rows = self.store.signing_keys().await?;
        if rows.is_empty() {
            let on_token = self.hsm.signing_key_versions().await?;
            self.store.adopt_signing_keys(&on_token).await?;
            rows = self.store.signing_keys().await?;
        }
        rows.retain(|row| {
            row.state == SigningKeyState::Active
                || (row.state == SigningKeyState::Retiring
                    && row.published_until.is_some_and(|u| now < u))
        });
        // The signing key first.
        rows.sort_by_key(|row| {
            (
                row.state != SigningKeyState::Active,
                std::cmp::Reverse(row.version),
            )
        });
        let mut fresh = Vec::with_capacity(rows.len());
        for row in rows {
            let label = crate::hsm::signing_key_label(row.version);
            let known = read(&self.keys)
                .iter()
                .find(|k| k.label == label)
                .map(|k| k.key.clone());
            let key = match known {
                Some(key) => key,
                None => Arc::new(SigningKey::from_ec_point(
                    &self.hsm.signing_public_key(&label).await?,
                )?),
            };
            fresh.push(PublishedKey {
                label,
                key,
                published_until: (row.state == SigningKeyState::Retiring)
                    .then_some(row.published_until)
                    .flatten(),
            });
        }
        if fresh.first().is_none_or(|k| k.published_until.is_some()) {
            return Err(HsmError::ObjectMissing(crate::hsm::SIGNING_KEY_LABEL.to_owned()).into());
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A key that is no longer published takes its verified tokens with it.
        if keys
            .iter()
            .any(|old| !fresh.iter().any(|k| k.label == old.label))
        {
            self.verified.clear();
        }
        *keys = fresh;
        Ok(())
    }

    /// Rotates the token-signing key: creates `keybroker-sign-v<N+1>` on the token, makes it
    /// sign from now on, and keeps the previous one published (JWKS, verification) until every
    /// token it signed has expired. Racing rotations on several brokers make one new key each
    /// in turn; a rotation that stopped after creating the key on the token reuses it. Returns
    /// the new version.
    ///
    /// # Errors
    /// A token or database failure.
    pub async fn rotate_signing_key(&self, now: i64) -> Result<u32, AuthError> {
        let _lock = self.store.lock_signing_keys().await?;
        let recorded = self.store.signing_keys().await?;
        let next = recorded.iter().map(|row| row.version).max().unwrap_or(0) + 1;
        self.hsm.ensure_signing_key(next).await?;
        let ttl = i64::try_from(self.config.token_ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let leeway = i64::try_from(self.config.leeway).unwrap_or(0);
        let until = now + ttl + leeway + SIGNING_KEY_REFRESH_MARGIN;
        self.store
            .activate_signing_key(next, until, &audit::meta())
            .await?;
        self.refresh_signing_keys(now).await?;
        Ok(next)
    }

    /// Retires the replaced signing keys whose tokens have all expired, and re-reads the keys.
    /// Run by each maintenance pass.
    ///
    /// # Errors
    /// A token or database failure.
    pub async fn maintain_signing_keys(&self, now: i64) -> Result<(), AuthError> {
        self.store.retire_signing_keys(now).await?;
        self.refresh_signing_keys(now).await
    }

    /// The `kid` of the key that signs now.
    pub fn signing_kid(&self) -> Option<String> {
        read(&self.keys).first().map(|k| k.key.kid.clone())
    }

    /// The JWKS document: every key whose tokens may still be live.
    pub fn jwks(&self) -> JwkSet {
        let now = unix_now();
        JwkSet {
            keys: read(&self.keys)
                .iter()
                .filter(|k| k.live_at(now))
                .map(|k| k.key.jwk.clone())
                .collect(),
        }
    }

    /// Whether an unknown `kid` may make us re-read the signing keys now (at most every
    /// [`UNKNOWN_KID_REFRESH_SECS`], so forged kids cannot make every request query Postgres).
    pub(super) fn may_refresh_for_unknown_kid(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = unix_now();
        let last = self.last_kid_refresh.load(Ordering::Relaxed);
        now - last >= UNKNOWN_KID_REFRESH_SECS
            && self
                .last_kid_refresh
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ec_points_in_both_encodings() {
        // The generator of P-256.
        let x = hex("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296");
        let y = hex("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5");
        let raw: Vec<u8> = [vec![4u8], x.clone(), y.clone()].concat();
        let wrapped: Vec<u8> = [vec![4u8, 0x41], raw.clone()].concat();
        let want = (URL_SAFE_NO_PAD.encode(&x), URL_SAFE_NO_PAD.encode(&y));
        assert_eq!(ec_point_coordinates(&raw), Some(want.clone()));
        assert_eq!(ec_point_coordinates(&wrapped), Some(want));
        let mut off_curve = raw.clone();
        off_curve[64] ^= 1;
        assert_eq!(ec_point_coordinates(&off_curve), None);
        assert_eq!(ec_point_coordinates(&raw[..64]), None);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
