//! Pure code with no I/O: the wrapped-blob format, the AAD that binds a blob to its owner and
//! context, and the validated request types built from them. This is what fuzzers target.

pub mod envelope;
pub mod formats;

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

/// The first field of every blob.
pub const BLOB_PREFIX: &str = "kb";
/// The only blob format this build writes and reads.
pub const BLOB_FORMAT_V1: &str = "v1";
/// GCM IV length: 96 bits, as NIST SP 800-38D recommends for random IVs.
pub const GCM_IV_LEN: usize = 12;
/// GCM tag length: 128 bits.
pub const GCM_TAG_LEN: usize = 16;
/// Length of a data-encryption key made by `datakey`: AES-256.
pub const DEK_LEN: usize = 32;
/// Smallest key material a caller may wrap.
pub const MIN_WRAP_LEN: usize = 16;
/// Largest key material a caller may wrap.
pub const MAX_WRAP_LEN: usize = 64;
/// Largest payload a v1 blob can carry: IV, the largest wrappable key, tag.
const MAX_PAYLOAD_LEN: usize = GCM_IV_LEN + MAX_WRAP_LEN + GCM_TAG_LEN;
/// Smallest payload: IV, the smallest wrappable key, tag.
const MIN_PAYLOAD_LEN: usize = GCM_IV_LEN + MIN_WRAP_LEN + GCM_TAG_LEN;
/// The payload lengths a v1 blob may have, in bytes (for the API's published pattern).
pub const BLOB_PAYLOAD_LEN: (usize, usize) = (MIN_PAYLOAD_LEN, MAX_PAYLOAD_LEN);
/// The most entries an encryption context may have (AAD stays small and bounded).
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// The longest key or value of an encryption context, in characters.
pub const MAX_CONTEXT_FIELD_LEN: usize = 256;

/// Why a string is not a blob this build can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Not `kb:<format>:<mk_version>:<payload>`.
    #[error("the wrapped blob is not of the form kb:v1:<mk_version>:<payload>")]
    Malformed,
    /// A `kb:` blob of a format this build does not know.
    #[error("the wrapped blob format is not supported")]
    UnsupportedFormat,
    /// The master-key version field is not a positive decimal number.
    #[error("the master-key version of the wrapped blob is invalid")]
    BadMasterKeyVersion,
    /// The payload is not canonical unpadded base64url.
    #[error("the payload of the wrapped blob is not valid base64url")]
    BadEncoding,
    /// The payload is too short or too long to hold IV, key and tag.
    #[error("the payload of the wrapped blob has an impossible length")]
    BadLength,
}

/// A parsed `kb:v1:<mk_version>:<base64url(iv || ciphertext || tag)>` blob.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedBlob {
    mk_version: MasterKeyVersion,
    payload: Vec<u8>,
}

impl WrappedBlob {
    /// Builds a blob from what the token returned: `iv || ciphertext || tag`.
    pub fn new(mk_version: MasterKeyVersion, payload: Vec<u8>) -> Self {
        Self {
            mk_version,
            payload,
        }
    }

    /// Parses the string form.
    ///
    /// # Errors
    /// A [`BlobError`] saying which part is wrong; nothing is decrypted here.
    pub fn parse(text: &str) -> Result<Self, BlobError> {
        let mut parts = text.split(':');
        let (Some(prefix), Some(format), Some(version), Some(payload), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(BlobError::Malformed);
        };
        if prefix != BLOB_PREFIX {
            return Err(BlobError::Malformed);
        }
        if format != BLOB_FORMAT_V1 {
            return Err(BlobError::UnsupportedFormat);
        }
        let mk_version = MasterKeyVersion::parse(version).ok_or(BlobError::BadMasterKeyVersion)?;
        if payload.len() > MAX_PAYLOAD_LEN.div_ceil(3) * 4 {
            return Err(BlobError::BadLength);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| BlobError::BadEncoding)?;
        if !(MIN_PAYLOAD_LEN..=MAX_PAYLOAD_LEN).contains(&payload.len()) {
            return Err(BlobError::BadLength);
        }
        Ok(Self {
            mk_version,
            payload,
        })
    }

    /// The master-key version that sealed this blob.
    pub fn mk_version(&self) -> MasterKeyVersion {
        self.mk_version
    }

    /// `iv || ciphertext || tag`.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl fmt::Display for WrappedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{BLOB_PREFIX}:{BLOB_FORMAT_V1}:{}:{}",
            self.mk_version,
            URL_SAFE_NO_PAD.encode(&self.payload)
        )
    }
}

impl fmt::Debug for WrappedBlob {
    // A blob is not secret, but it is long; the version is what a log reader needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedBlob")
            .field("mk_version", &self.mk_version)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A master-key version number: 1, 2, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MasterKeyVersion(u32);

impl MasterKeyVersion {
    /// The first version, made by `hsm init`.
    pub const FIRST: Self = Self(1);

    /// A version from a number; `None` for zero.
    pub fn new(n: u32) -> Option<Self> {
        (n > 0).then_some(Self(n))
    }

    /// A version as Postgres stores it (an `integer` column); `None` for zero or a negative.
    pub fn from_stored(n: i32) -> Option<Self> {
        u32::try_from(n).ok().and_then(Self::new)
    }

    /// Parses canonical decimal digits (no sign, no leading zero).
    fn parse(text: &str) -> Option<Self> {
        if text.is_empty() || text.len() > 10 || text.starts_with('0') {
            return None;
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().and_then(Self::new)
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The next version.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }

    /// The label of this version's key object on the token.
    pub fn token_label(self) -> String {
        format!("keybroker-mk-v{}", self.0)
    }
}

impl fmt::Display for MasterKeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why an encryption context was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// More entries than we bind.
    #[error("the encryption context has more than {MAX_CONTEXT_ENTRIES} entries")]
    TooManyEntries,
    /// A key that is empty, a key or value that is too long, or one with a NUL character.
    #[error(
        "encryption context keys must be 1 to {MAX_CONTEXT_FIELD_LEN} characters and values at most {MAX_CONTEXT_FIELD_LEN}, without NUL characters"
    )]
    BadField,
}

/// The caller's encryption context: a string map bound into the AAD, canonicalised by sorted
/// keys (a `BTreeMap` iterates in byte order of its keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates a context from a request.
    ///
    /// # Errors
    /// [`ContextError`] when it is too large or has an empty key.
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, ContextError> {
        if map.len() > MAX_CONTEXT_ENTRIES {
            return Err(ContextError::TooManyEntries);
        }
        // Characters, not bytes, as the published schema's `maxLength` counts them; no NUL,
        // which the contexts Postgres keeps (managed keys, secrets) could not hold.
        let field_ok = |s: &str, allow_empty: bool| {
            (allow_empty || !s.is_empty())
                && s.chars().count() <= MAX_CONTEXT_FIELD_LEN
                && !s.contains('\0')
        };
        if !map
            .iter()
            .all(|(k, v)| field_ok(k, false) && field_ok(v, true))
        {
            return Err(ContextError::BadField);
        }
        Ok(Self(map))
    }

    /// The entries, in canonical order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Everything a sealed blob is bound to. Its [`Aad::bytes`] are the GCM additional data.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// The master-key version that seals (or sealed) the blob.
    pub mk_version: MasterKeyVersion,
    /// The owning client. Every blob the API seals carries one.
    pub client_id: Option<&'a str>,
    /// The managed key and its version, when the DEK belongs to one.
    pub key_ref: Option<&'a str>,
    /// The caller's encryption context.
    pub context: &'a EncryptionContext,
}

impl Aad<'_> {
    /// The canonical AAD: a domain tag, then every field length-prefixed, so that no two
    /// different bindings give the same bytes (a value cannot spill into the next field).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put_field(&mut out, b"keybroker-aad");
        put_field(&mut out, BLOB_FORMAT_V1.as_bytes());
        out.extend_from_slice(&self.mk_version.get().to_be_bytes());
        put_field(&mut out, self.client_id.unwrap_or("").as_bytes());
        put_field(&mut out, self.key_ref.unwrap_or("").as_bytes());
        let count = u32::try_from(self.context.0.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (k, v) in self.context.entries() {
            put_field(&mut out, k.as_bytes());
            put_field(&mut out, v.as_bytes());
        }
        out
    }
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    // Fields are bounded far below 4 GiB by the request limits; saturate rather than wrap.
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

/// The fields of one audit event that its MAC covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFields<'a> {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Microseconds since the epoch.
    pub at_us: i64,
    /// `info`, `warning`, `error` or `critical`.
    pub severity: &'a str,
    /// The event name.
    pub event: &'a str,
    /// Who.
    pub actor: &'a str,
    /// What it was done to.
    pub subject: Option<&'a str>,
    /// The client concerned (UUID text).
    pub client_id: Option<&'a str>,
    /// The key concerned (UUID text).
    pub key_id: Option<&'a str>,
    /// Where from.
    pub source_ip: Option<&'a str>,
    /// The HTTP request.
    pub request_id: Option<&'a str>,
    /// Canonical JSON.
    pub details: &'a str,
    /// The previous row's MAC (32 zero bytes before the first row).
    pub prev_mac: &'a [u8],
}

/// The bytes an audit row's MAC is computed over: a domain tag, then every field
/// length-prefixed (absent and empty differ), then the previous MAC, so that no two rows or
/// positions give the same input.
pub fn audit_mac_input(f: &AuditFields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + f.details.len());
    put_field(&mut out, b"keybroker-audit-v1");
    out.extend_from_slice(&f.seq.to_be_bytes());
    out.extend_from_slice(&f.at_us.to_be_bytes());
    for field in [f.severity, f.event, f.actor] {
        put_field(&mut out, field.as_bytes());
    }
    for field in [f.subject, f.client_id, f.key_id, f.source_ip, f.request_id] {
        match field {
            Some(value) => {
                out.push(1);
                put_field(&mut out, value.as_bytes());
            }
            None => out.push(0),
        }
    }
    put_field(&mut out, f.details.as_bytes());
    put_field(&mut out, f.prev_mac);
    out
}

/// Key material a caller asks us to wrap: 16 to 64 bytes, zeroized on drop, never printed.
pub struct KeyMaterial(Zeroizing<Vec<u8>>);

/// Key material of a length we do not wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key material must be {MIN_WRAP_LEN} to {MAX_WRAP_LEN} bytes")]
pub struct KeyLengthError;

impl KeyMaterial {
    /// Takes ownership of the bytes after checking their length.
    ///
    /// # Errors
    /// [`KeyLengthError`] outside 16..=64 bytes.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Result<Self, KeyLengthError> {
        if (MIN_WRAP_LEN..=MAX_WRAP_LEN).contains(&bytes.len()) {
            Ok(Self(bytes))
        } else {
            Err(KeyLengthError)
        }
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample_blob() -> WrappedBlob {
        WrappedBlob::new(MasterKeyVersion::new(3).unwrap(), (0u8..60).collect())
    }

    #[test]
    fn blob_round_trips_through_text() {
        let blob = sample_blob();
        let text = blob.to_string();
        assert!(text.starts_with("kb:v1:3:"));
        assert_eq!(WrappedBlob::parse(&text).unwrap(), blob);
    }

    #[test]
    fn blob_parse_names_the_broken_part() {
        let text = sample_blob().to_string();
        let payload = text.rsplit(':').next().unwrap();
        assert_eq!(WrappedBlob::parse("kb:v1:3"), Err(BlobError::Malformed));
        assert_eq!(
            WrappedBlob::parse(&format!("kx:v1:3:{payload}")),
            Err(BlobError::Malformed)
        );
        assert_eq!(
            WrappedBlob::parse(&format!("kb:v2:3:{payload}")),
            Err(BlobError::UnsupportedFormat)
        );
        for bad in ["0", "03", "-1", "x", "", "99999999999"] {
            assert_eq!(
                WrappedBlob::parse(&format!("kb:v1:{bad}:{payload}")),
                Err(BlobError::BadMasterKeyVersion),
                "{bad}"
            );
        }
        assert_eq!(
            WrappedBlob::parse(&format!("kb:v1:3:{payload}=")),
            Err(BlobError::BadEncoding)
        );
        assert_eq!(
            WrappedBlob::parse(&format!("kb:v1:3:{}", &payload[..20])),
            Err(BlobError::BadLength)
        );
        assert_eq!(
            WrappedBlob::parse(&format!("kb:v1:3:{payload}:extra")),
            Err(BlobError::Malformed)
        );
    }

    #[test]
    fn blob_parse_rejects_non_canonical_base64() {
        // 60 bytes encode to 80 characters with no spare bits, so use 61 bytes (2 spare bits).
        let blob = WrappedBlob::new(MasterKeyVersion::FIRST, vec![0u8; 61]);
        let text = blob.to_string();
        let mut chars: Vec<char> = text.chars().collect();
        let last = chars.len() - 1;
        chars[last] = 'B'; // sets a bit that the decoder must not ignore
        let tampered: String = chars.into_iter().collect();
        assert_eq!(WrappedBlob::parse(&tampered), Err(BlobError::BadEncoding));
    }

    #[test]
    fn aad_differs_for_every_field() {
        let empty = EncryptionContext::default();
        let ctx = EncryptionContext::new(BTreeMap::from([("a".into(), "b".into())])).unwrap();
        let v1 = MasterKeyVersion::FIRST;
        let base = Aad {
            mk_version: v1,
            client_id: None,
            key_ref: None,
            context: &empty,
        };
        let variants = [
            Aad {
                mk_version: v1.next().unwrap(),
                ..base
            },
            Aad {
                client_id: Some("c"),
                ..base
            },
            Aad {
                key_ref: Some("c"),
                ..base
            },
            Aad {
                context: &ctx,
                ..base
            },
        ];
        let mut all: Vec<Vec<u8>> = variants.iter().map(Aad::bytes).collect();
        all.push(base.bytes());
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
    }

    #[test]
    fn aad_is_unambiguous_across_entry_boundaries() {
        let one = EncryptionContext::new(BTreeMap::from([("ab".into(), "c".into())])).unwrap();
        let two = EncryptionContext::new(BTreeMap::from([("a".into(), "bc".into())])).unwrap();
        let aad = |c| {
            Aad {
                mk_version: MasterKeyVersion::FIRST,
                client_id: None,
                key_ref: None,
                context: c,
            }
            .bytes()
        };
        assert_ne!(aad(&one), aad(&two));
    }

    #[test]
    fn context_order_does_not_matter() {
        let a = EncryptionContext::new(BTreeMap::from([
            ("x".into(), "1".into()),
            ("a".into(), "2".into()),
        ]))
        .unwrap();
        let b = EncryptionContext::new(BTreeMap::from([
            ("a".into(), "2".into()),
            ("x".into(), "1".into()),
        ]))
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn context_limits() {
        let big: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(
            EncryptionContext::new(big),
            Err(ContextError::TooManyEntries)
        );
        assert_eq!(
            EncryptionContext::new(BTreeMap::from([(String::new(), "v".into())])),
            Err(ContextError::BadField)
        );
        assert_eq!(
            EncryptionContext::new(BTreeMap::from([("k".into(), "v".repeat(257))])),
            Err(ContextError::BadField)
        );
        // Characters count, not bytes: 256 three-byte characters fit, as the schema says.
        assert!(EncryptionContext::new(BTreeMap::from([("k".into(), "€".repeat(256))])).is_ok());
        assert!(EncryptionContext::new(BTreeMap::from([("€".repeat(256), "v".into())])).is_ok());
        for (k, v) in [("a\0", "v"), ("k", "x\0y")] {
            assert_eq!(
                EncryptionContext::new(BTreeMap::from([(k.into(), v.into())])),
                Err(ContextError::BadField)
            );
        }
    }

    #[test]
    fn audit_mac_input_tells_every_field_apart() {
        let base = AuditFields {
            seq: 1,
            at_us: 2,
            severity: "info",
            event: "e",
            actor: "a",
            subject: None,
            client_id: None,
            key_id: None,
            source_ip: None,
            request_id: None,
            details: "{}",
            prev_mac: &[0; 32],
        };
        let variants = [
            AuditFields {
                seq: 2,
                ..base.clone()
            },
            AuditFields {
                at_us: 3,
                ..base.clone()
            },
            AuditFields {
                severity: "warning",
                ..base.clone()
            },
            AuditFields {
                event: "f",
                ..base.clone()
            },
            AuditFields {
                actor: "b",
                ..base.clone()
            },
            AuditFields {
                subject: Some(""),
                ..base.clone()
            },
            AuditFields {
                client_id: Some("c"),
                ..base.clone()
            },
            AuditFields {
                key_id: Some("k"),
                ..base.clone()
            },
            AuditFields {
                source_ip: Some("1"),
                ..base.clone()
            },
            AuditFields {
                request_id: Some("r"),
                ..base.clone()
            },
            AuditFields {
                details: "{\"a\":1}",
                ..base.clone()
            },
            AuditFields {
                prev_mac: &[1; 32],
                ..base.clone()
            },
        ];
        let mut all: Vec<Vec<u8>> = variants.iter().map(audit_mac_input).collect();
        all.push(audit_mac_input(&base));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn key_material_length_and_debug() {
        assert!(KeyMaterial::new(Zeroizing::new(vec![0; 15])).is_err());
        assert!(KeyMaterial::new(Zeroizing::new(vec![0; 65])).is_err());
        let key = KeyMaterial::new(Zeroizing::new(vec![0x41; 16])).unwrap();
        assert_eq!(format!("{key:?}"), "KeyMaterial([REDACTED; 16])");
    }
}
