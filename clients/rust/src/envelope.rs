//! The envelope format of `clients/ENVELOPE.md`, version 1: pure code (no I/O, no broker), so
//! the known answers of `clients/envelope-vectors.json` test it byte for byte.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::Error;

/// ASCII `kbe`.
const MAGIC: &[u8; 3] = b"kbe";
/// The one format version this library writes and reads.
const VERSION: u8 = 1;
/// GCM nonce length.
pub(crate) const NONCE_LEN: usize = 12;
/// GCM tag length.
const TAG_LEN: usize = 16;
/// An AES-256 key.
pub(crate) const KEY_LEN: usize = 32;

/// An envelope split into its parts; borrowed from the bytes it was parsed from.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    /// Bytes `0 .. 6+W`, which the AAD covers.
    pub header: &'a [u8],
    /// The wrapped DEK, as the broker returned it.
    pub wrapped: &'a str,
    pub nonce: &'a [u8],
    /// Ciphertext then tag.
    pub sealed: &'a [u8],
}

/// Splits an envelope, refusing (before any key is needed) another magic, another version, a
/// wrapped DEK that is not text, and anything too short to hold a nonce and a tag.
pub(crate) fn parse(envelope: &[u8]) -> Result<Parsed<'_>, Error> {
    if envelope.len() < 6 {
        return Err(Error::Envelope("shorter than the envelope header"));
    }
    if &envelope[..3] != MAGIC {
        return Err(Error::Envelope("not a keybroker envelope (magic)"));
    }
    if envelope[3] != VERSION {
        return Err(Error::Envelope("unsupported envelope version"));
    }
    let w = usize::from(u16::from_be_bytes([envelope[4], envelope[5]]));
    if w == 0 {
        return Err(Error::Envelope("empty wrapped key"));
    }
    if envelope.len() < 6 + w + NONCE_LEN + TAG_LEN {
        return Err(Error::Envelope("truncated envelope"));
    }
    let wrapped = std::str::from_utf8(&envelope[6..6 + w])
        .map_err(|_| Error::Envelope("the wrapped key is not text"))?;
    Ok(Parsed {
        header: &envelope[..6 + w],
        wrapped,
        nonce: &envelope[6 + w..6 + w + NONCE_LEN],
        sealed: &envelope[6 + w + NONCE_LEN..],
    })
}

/// The header: magic, version, length of the wrapped DEK, the wrapped DEK.
fn header(wrapped: &str) -> Result<Vec<u8>, Error> {
    let w = u16::try_from(wrapped.len())
        .ok()
        .filter(|w| *w > 0)
        .ok_or(Error::Envelope("the wrapped key must be 1 to 65535 bytes"))?;
    let mut out = Vec::with_capacity(6 + wrapped.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(wrapped.as_bytes());
    Ok(out)
}

/// `u32 count`, then per entry in ascending byte order of keys: `u32 len || key || u32 len ||
/// value`. A `BTreeMap<String, _>` iterates in exactly that order (`str` orders by bytes).
pub(crate) fn context_encoding(context: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let empty = BTreeMap::new();
    let context = context.unwrap_or(&empty);
    let mut out = Vec::new();
    // Lengths beyond u32 cannot reach here: the broker refuses such contexts long before.
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len32(context.len()));
    for (k, v) in context {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&len32(v.len()));
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn aad(header: &[u8], context: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(&context_encoding(context));
    aad
}

fn cipher(dek: &[u8]) -> Result<Aes256Gcm, Error> {
    if dek.len() != KEY_LEN {
        return Err(Error::InvalidDataKey);
    }
    Aes256Gcm::new_from_slice(dek).map_err(|_| Error::InvalidDataKey)
}

/// Seals `plaintext` under `dek` with this `nonce` into an envelope carrying `wrapped`. The
/// nonce must be fresh for every call with the same key: [`crate::Client::encrypt`] draws it
/// from the operating system; only the known-answer tests pass their own.
///
/// # Errors
/// [`Error::InvalidDataKey`] for a key that is not 32 bytes, [`Error::Envelope`] for a wrapped
/// key that does not fit the format.
#[doc(hidden)]
pub fn seal_with(
    dek: &[u8],
    nonce: &[u8; NONCE_LEN],
    wrapped: &str,
    plaintext: &[u8],
    context: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>, Error> {
    let cipher = cipher(dek)?;
    let header = header(wrapped)?;
    let aad = aad(&header, context);
    let sealed = cipher
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        // aes-gcm refuses only messages over GCM's 64 GiB limit.
        .map_err(|_| Error::Envelope("the message is too long for AES-GCM"))?;
    let mut out = header;
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a parsed envelope with its DEK.
pub(crate) fn open_parsed(
    dek: &[u8],
    parsed: &Parsed<'_>,
    context: Option<&BTreeMap<String, String>>,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = cipher(dek)?;
    let aad = aad(parsed.header, context);
    let nonce: [u8; NONCE_LEN] = parsed
        .nonce
        .try_into()
        .map_err(|_| Error::Envelope("truncated envelope"))?;
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: parsed.sealed,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::EnvelopeAuthentication)
}

/// Opens `envelope` with `dek` (the key its wrapped DEK holds), without a broker.
///
/// # Errors
/// [`Error::Envelope`] for bytes that are not a version 1 envelope,
/// [`Error::EnvelopeAuthentication`] when GCM refuses it (another key, another context, or
/// altered bytes).
#[doc(hidden)]
pub fn open_with(
    dek: &[u8],
    envelope: &[u8],
    context: Option<&BTreeMap<String, String>>,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    open_parsed(dek, &parse(envelope)?, context)
}

/// A fresh nonce from the operating system's CSPRNG.
pub(crate) fn fresh_nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).map_err(|_| Error::Random)?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::Value;

    const VECTORS: &str = include_str!("../../envelope-vectors.json");

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn context(v: &Value) -> BTreeMap<String, String> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect()
    }

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).unwrap()
    }

    #[test]
    fn known_answers_encrypt_to_the_exact_envelope_and_back() {
        let all = vectors();
        let list = all["vectors"].as_array().unwrap();
        assert_eq!(list.len(), 3);
        for v in list {
            let name = v["name"].as_str().unwrap();
            let dek = hex(v["dek_hex"].as_str().unwrap());
            let nonce: [u8; NONCE_LEN] = hex(v["nonce_hex"].as_str().unwrap()).try_into().unwrap();
            let ctx = context(&v["context"]);
            let plaintext = hex(v["plaintext_hex"].as_str().unwrap());
            let wrapped = v["wrapped"].as_str().unwrap();
            let expected = STANDARD
                .decode(v["envelope_b64"].as_str().unwrap())
                .unwrap();

            let header = header(wrapped).unwrap();
            assert_eq!(
                aad(&header, Some(&ctx)),
                hex(v["aad_hex"].as_str().unwrap()),
                "{name}: AAD"
            );
            let envelope = seal_with(&dek, &nonce, wrapped, &plaintext, Some(&ctx)).unwrap();
            assert_eq!(envelope, expected, "{name}: envelope");
            let opened = open_with(&dek, &expected, Some(&ctx)).unwrap();
            assert_eq!(*opened, plaintext, "{name}: plaintext");
            assert_eq!(
                parse(&expected).unwrap().wrapped,
                wrapped,
                "{name}: wrapped"
            );
        }
    }

    #[test]
    fn no_context_is_the_empty_context() {
        assert_eq!(context_encoding(None), vec![0, 0, 0, 0]);
        assert_eq!(context_encoding(Some(&BTreeMap::new())), vec![0, 0, 0, 0]);
    }

    #[test]
    fn invalid_envelopes_are_refused_before_any_key_is_needed() {
        let all = vectors();
        let list = all["invalid"].as_array().unwrap();
        assert_eq!(list.len(), 3);
        for v in list {
            let envelope = STANDARD
                .decode(v["envelope_b64"].as_str().unwrap())
                .unwrap();
            let err = parse(&envelope).unwrap_err();
            assert!(matches!(err, Error::Envelope(_)), "{}: {err:?}", v["name"]);
        }
        for short in [&b""[..], b"kb", b"kbe\x01\x00", b"kbe\x01\x00\x00"] {
            assert!(matches!(parse(short), Err(Error::Envelope(_))));
        }
    }

    #[test]
    fn tampered_envelopes_fail_gcm() {
        let all = vectors();
        let list = all["tampered"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        for v in list {
            let dek = hex(v["dek_hex"].as_str().unwrap());
            let envelope = STANDARD
                .decode(v["envelope_b64"].as_str().unwrap())
                .unwrap();
            let err = open_with(&dek, &envelope, Some(&context(&v["context"]))).unwrap_err();
            assert!(
                matches!(err, Error::EnvelopeAuthentication),
                "{}: {err:?}",
                v["name"]
            );
        }
    }

    #[test]
    fn a_key_of_the_wrong_length_is_refused() {
        let err = seal_with(&[0u8; 16], &[0u8; NONCE_LEN], "kb:v1:1:x", b"m", None).unwrap_err();
        assert!(matches!(err, Error::InvalidDataKey));
    }

    #[test]
    fn fresh_nonces_differ() {
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
    }
}
