//! keybroker's token objects: their labels, the templates that make every secret key
//! sensitive and never extractable, finding, checking, creating and destroying master,
//! signing and audit keys (the officer commands of [`Hsm`]), `hsm status`, and the cached
//! handles and session copies an operation uses. No cryptographic operation happens here
//! (see `operations`).

use std::collections::HashMap;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::crypto::MasterKeyVersion;

use super::error::classify;
use super::{Hsm, HsmError, TokenSession, lock, write};

/// Label of keybroker's ES256 token-signing key pair (both halves), version 1.
pub const SIGNING_KEY_LABEL: &str = "keybroker-sign-v1";
/// Label prefix of the token-signing key pairs: `keybroker-sign-v<N>`.
const SIGNING_KEY_PREFIX: &str = "keybroker-sign-v";

/// The label of token-signing key pair `version`.
pub fn signing_key_label(version: u32) -> String {
    format!("{SIGNING_KEY_PREFIX}{version}")
}
/// Label of keybroker's HMAC-SHA256 audit/pepper key, version 1.
pub const AUDIT_KEY_LABEL: &str = "keybroker-audit-v1";
/// Every object keybroker creates has a label with this prefix.
const LABEL_PREFIX: &str = "keybroker-";
/// DER of the OID of NIST P-256 (prime256v1), the CKA_EC_PARAMS of the signing key.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

impl Hsm {
    /// Checks that the token answers: a session can be had and keybroker's audit key can be
    /// found on the token itself (not in a cache).
    ///
    /// # Errors
    /// Any [`HsmError`]; [`HsmError::is_unavailable`] tells whether the token is unreachable.
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run(|s| {
            find_one(&s.pooled.session, ObjectClass::SECRET_KEY, AUDIT_KEY_LABEL)?
                .map(|_| ())
                .ok_or_else(|| HsmError::ObjectMissing(AUDIT_KEY_LABEL.to_owned()))
        })
        .await
    }

    /// CKA_EC_POINT of the token-signing public key, as the token gives it (usually a DER OCTET
    /// STRING around the uncompressed point).
    ///
    /// # Errors
    /// [`HsmError::ObjectMissing`] when the key pair is not on the token; any token failure.
    pub async fn signing_public_key(&self, label: &str) -> Result<Vec<u8>, HsmError> {
        let label = label.to_owned();
        self.run(move |s| {
            let session = &s.pooled.session;
            let handle = find_one(session, ObjectClass::PUBLIC_KEY, &label)?
                .ok_or_else(|| HsmError::ObjectMissing(label.clone()))?;
            let attrs = session
                .get_attributes(handle, &[AttributeType::EcPoint])
                .map_err(classify)?;
            attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(point) => Some(point),
                    _ => None,
                })
                .ok_or(HsmError::Unexpected("the signing key has no CKA_EC_POINT"))
        })
        .await
    }

    /// Makes sure the token holds everything keybroker needs: master key v1 (if no master key
    /// exists yet), the ES256 signing key pair and the audit HMAC key. Existing objects are
    /// checked, never replaced. Returns the master-key versions on the token, ascending.
    ///
    /// # Errors
    /// [`HsmError::UnsafeObject`] when an existing keybroker key is extractable or not
    /// sensitive; any token failure.
    pub async fn ensure_keys(&self) -> Result<InitReport, HsmError> {
        self.admin(|session| {
            let mut report = InitReport::default();
            for (label, handle) in find_labelled(session, ObjectClass::SECRET_KEY)? {
                check_secret_is_safe(session, handle, &label)?;
            }
            for (label, handle) in find_labelled(session, ObjectClass::PRIVATE_KEY)? {
                check_secret_is_safe(session, handle, &label)?;
            }
            let mut versions = master_key_versions(session)?;
            if versions.is_empty() {
                create_master_key(session, MasterKeyVersion::FIRST)?;
                report.created.push(MasterKeyVersion::FIRST.token_label());
                versions.push(MasterKeyVersion::FIRST);
            }
            if signing_key_versions(session)?.is_empty() {
                create_signing_key(session, SIGNING_KEY_LABEL)?;
                report.created.push(SIGNING_KEY_LABEL.to_owned());
            }
            if find_one(session, ObjectClass::SECRET_KEY, AUDIT_KEY_LABEL)?.is_none() {
                create_audit_key(session, AUDIT_KEY_LABEL)?;
                report.created.push(AUDIT_KEY_LABEL.to_owned());
            }
            report.master_keys = versions;
            Ok(report)
        })
        .await
    }

    /// Master key `version` on the token: created from the template unless it is there
    /// already (from a rotation that stopped half-way), in which case it is checked. Returns
    /// whether this call created it.
    ///
    /// # Errors
    /// [`HsmError::UnsafeObject`] for an existing key that is extractable or not sensitive; any
    /// token failure.
    pub async fn ensure_master_key(&self, version: MasterKeyVersion) -> Result<bool, HsmError> {
        self.admin(move |session| {
            ensure_object(
                session,
                ObjectClass::SECRET_KEY,
                &version.token_label(),
                |s| create_master_key(s, version),
            )
        })
        .await
    }

    /// Removes master key `version` from the token (every object with its label), and drops
    /// this process's handles and session copies of it. Returns whether anything was there.
    ///
    /// # Errors
    /// Any token failure.
    pub async fn destroy_master_key(&self, version: MasterKeyVersion) -> Result<bool, HsmError> {
        let found = self
            .admin(move |session| {
                let handles = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::Token(true),
                        Attribute::Label(version.token_label().into_bytes()),
                    ])
                    .map_err(classify)?;
                for handle in &handles {
                    session.destroy_object(*handle).map_err(classify)?;
                }
                Ok(!handles.is_empty())
            })
            .await?;
        self.forget_master_keys(&[version]);
        Ok(found)
    }

    /// Drops this process's handles and session copies of the given master-key versions (which
    /// another broker destroyed): the pool starts afresh if it held any of them.
    pub fn forget_master_keys(&self, versions: &[MasterKeyVersion]) {
        {
            let mut in_use = lock(&self.inner.in_use);
            let mut verified = write(&self.inner.verified);
            let mut controls = write(&self.inner.controls);
            for version in versions {
                in_use.remove(version);
                verified.remove(version);
                controls.remove(version);
            }
        }
        let held = {
            let handles = lock(&self.inner.mk_handles);
            versions.iter().any(|v| handles.contains_key(v))
        };
        if held {
            self.inner.invalidate();
        }
    }

    /// Token-signing key pair `version`: created from the template unless it is there already.
    /// Returns whether this call created it.
    ///
    /// # Errors
    /// [`HsmError::UnsafeObject`] for an existing private key that is extractable or not
    /// sensitive; any token failure.
    pub async fn ensure_signing_key(&self, version: u32) -> Result<bool, HsmError> {
        self.admin(move |session| {
            let label = signing_key_label(version);
            ensure_object(session, ObjectClass::PRIVATE_KEY, &label, |s| {
                create_signing_key(s, &label)
            })
        })
        .await
    }

    /// The token-signing key-pair versions on the token, ascending.
    ///
    /// # Errors
    /// Any token failure.
    pub async fn signing_key_versions(&self) -> Result<Vec<u32>, HsmError> {
        self.admin(signing_key_versions).await
    }

    /// The master-key versions present on the token, ascending.
    ///
    /// # Errors
    /// Any token failure.
    pub async fn master_key_versions(&self) -> Result<Vec<MasterKeyVersion>, HsmError> {
        self.admin(master_key_versions).await
    }

    /// Describes every keybroker object on the token: labels and flags, never a value.
    ///
    /// # Errors
    /// Any token failure.
    pub async fn status(&self) -> Result<Vec<ObjectInfo>, HsmError> {
        self.admin(|session| {
            let mut out = Vec::new();
            for class in [
                ObjectClass::SECRET_KEY,
                ObjectClass::PRIVATE_KEY,
                ObjectClass::PUBLIC_KEY,
            ] {
                for (label, handle) in find_labelled(session, class)? {
                    out.push(describe(session, handle, label, class)?);
                }
            }
            out.sort_by(|a, b| a.label.cmp(&b.label).then(a.class.cmp(b.class)));
            Ok(out)
        })
        .await
    }
}

/// What [`Hsm::ensure_keys`] found and did.
#[derive(Debug, Default, Clone)]
pub struct InitReport {
    /// Labels of the objects created by this call.
    pub created: Vec<String>,
    /// Master-key versions on the token, ascending.
    pub master_keys: Vec<MasterKeyVersion>,
}

/// One keybroker object on the token, as `hsm status` shows it. There is no value field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID, hex.
    pub id: String,
    /// `secret-key`, `private-key` or `public-key`.
    pub class: &'static str,
    /// `aes`, `ec`, `generic-secret` or `other`.
    pub key_type: &'static str,
    /// CKA_SENSITIVE (secret and private keys).
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE (secret and private keys).
    pub extractable: Option<bool>,
    /// CKA_NEVER_EXTRACTABLE (secret and private keys).
    pub never_extractable: Option<bool>,
    /// CKA_WRAP.
    pub wrap: Option<bool>,
    /// CKA_UNWRAP.
    pub unwrap: Option<bool>,
    /// CKA_ENCRYPT.
    pub encrypt: Option<bool>,
    /// CKA_DECRYPT.
    pub decrypt: Option<bool>,
}

impl TokenSession<'_> {
    /// The token-object handle of a fixed keybroker key, looked up once.
    pub(super) fn named_key(
        &mut self,
        class: ObjectClass,
        label: &str,
    ) -> Result<ObjectHandle, HsmError> {
        if let Some(handle) = lock(&self.inner.key_handles).get(label) {
            return Ok(*handle);
        }
        let handle = find_one(&self.pooled.session, class, label)?
            .ok_or_else(|| HsmError::ObjectMissing(label.to_owned()))?;
        lock(&self.inner.key_handles).insert(label.to_owned(), handle);
        Ok(handle)
    }

    /// Finds master key `version` on the token itself, bypassing every cache.
    fn find_master_key(&mut self, version: MasterKeyVersion) -> Result<ObjectHandle, HsmError> {
        find_one(
            &self.pooled.session,
            ObjectClass::SECRET_KEY,
            &version.token_label(),
        )?
        .ok_or(HsmError::UnknownMasterKey(version))
    }

    /// The handle to use for master key `version` in this session: its session copy if one
    /// could be made, else the token object.
    pub(super) fn master_key(
        &mut self,
        version: MasterKeyVersion,
    ) -> Result<ObjectHandle, HsmError> {
        if let Some(handle) = self.pooled.mk_copies.get(&version) {
            return Ok(*handle);
        }
        let cached = lock(&self.inner.mk_handles).get(&version).copied();
        let token_handle = match cached {
            Some(handle) => handle,
            None => {
                let handle = self.find_master_key(version)?;
                lock(&self.inner.mk_handles).insert(version, handle);
                handle
            }
        };
        let handle = match self
            .pooled
            .session
            .copy_object(token_handle, &[Attribute::Token(false)])
        {
            Ok(copy) => copy,
            Err(e) => match classify(e) {
                fault @ HsmError::Unavailable(_) => return Err(fault),
                // Some HSMs forbid copies (CKA_COPYABLE=false); the token object works, slower.
                other => {
                    tracing::debug!(target: "keybroker::hsm", error = %other, "no session copy of the master key");
                    token_handle
                }
            },
        };
        self.pooled.mk_copies.insert(version, handle);
        Ok(handle)
    }
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(classify)?;
    Ok(found.into_iter().next())
}

/// Every token object of `class` whose label starts with keybroker's prefix.
fn find_labelled(
    session: &Session,
    class: ObjectClass,
) -> Result<Vec<(String, ObjectHandle)>, HsmError> {
    let handles = session
        .find_objects(&[Attribute::Class(class), Attribute::Token(true)])
        .map_err(classify)?;
    let mut out = Vec::new();
    for handle in handles {
        let attrs = session
            .get_attributes(handle, &[AttributeType::Label])
            .map_err(classify)?;
        for attr in attrs {
            if let Attribute::Label(bytes) = attr {
                let label = String::from_utf8_lossy(&bytes).into_owned();
                if label.starts_with(LABEL_PREFIX) {
                    out.push((label, handle));
                }
            }
        }
    }
    Ok(out)
}

fn master_key_versions(session: &Session) -> Result<Vec<MasterKeyVersion>, HsmError> {
    let mut versions: Vec<MasterKeyVersion> = find_labelled(session, ObjectClass::SECRET_KEY)?
        .into_iter()
        .filter_map(|(label, _)| {
            let n = label.strip_prefix("keybroker-mk-v")?.parse().ok()?;
            let version = MasterKeyVersion::new(n)?;
            // Only canonical labels count: "keybroker-mk-v01" is not version 1.
            (version.token_label() == label).then_some(version)
        })
        .collect();
    versions.sort();
    versions.dedup();
    Ok(versions)
}

fn bool_attrs(
    session: &Session,
    handle: ObjectHandle,
    types: &[AttributeType],
) -> Result<HashMap<AttributeType, bool>, HsmError> {
    let attrs = session.get_attributes(handle, types).map_err(classify)?;
    let mut out = HashMap::new();
    for attr in attrs {
        let (ty, value) = match attr {
            Attribute::Sensitive(v) => (AttributeType::Sensitive, v),
            Attribute::Extractable(v) => (AttributeType::Extractable, v),
            Attribute::NeverExtractable(v) => (AttributeType::NeverExtractable, v),
            Attribute::Wrap(v) => (AttributeType::Wrap, v),
            Attribute::Unwrap(v) => (AttributeType::Unwrap, v),
            Attribute::Encrypt(v) => (AttributeType::Encrypt, v),
            Attribute::Decrypt(v) => (AttributeType::Decrypt, v),
            _ => continue,
        };
        out.insert(ty, value);
    }
    Ok(out)
}

fn check_secret_is_safe(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
) -> Result<(), HsmError> {
    let flags = bool_attrs(
        session,
        handle,
        &[AttributeType::Sensitive, AttributeType::Extractable],
    )?;
    let unsafe_object = |why| HsmError::UnsafeObject {
        label: label.to_owned(),
        why,
    };
    if flags.get(&AttributeType::Sensitive) != Some(&true) {
        return Err(unsafe_object("not sensitive"));
    }
    if flags.get(&AttributeType::Extractable) != Some(&false) {
        return Err(unsafe_object("extractable"));
    }
    Ok(())
}

fn describe(
    session: &Session,
    handle: ObjectHandle,
    label: String,
    class: ObjectClass,
) -> Result<ObjectInfo, HsmError> {
    let attrs = session
        .get_attributes(handle, &[AttributeType::Id, AttributeType::KeyType])
        .map_err(classify)?;
    let mut id = String::new();
    let mut key_type = "other";
    for attr in attrs {
        match attr {
            Attribute::Id(bytes) => id = bytes.iter().map(|b| format!("{b:02x}")).collect(),
            Attribute::KeyType(kt) if kt == KeyType::AES => key_type = "aes",
            Attribute::KeyType(kt) if kt == KeyType::EC => key_type = "ec",
            Attribute::KeyType(kt) if kt == KeyType::GENERIC_SECRET => key_type = "generic-secret",
            _ => {}
        }
    }
    // Ask only for what the class defines: a private key has no CKA_WRAP, a public key no
    // CKA_SENSITIVE, and some tokens answer CKR_ATTRIBUTE_TYPE_INVALID for the others.
    let secret_flags = [
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::NeverExtractable,
    ];
    let wanted: Vec<AttributeType> = if class == ObjectClass::SECRET_KEY {
        let mut all = secret_flags.to_vec();
        all.extend([
            AttributeType::Wrap,
            AttributeType::Unwrap,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
        ]);
        all
    } else if class == ObjectClass::PRIVATE_KEY {
        let mut all = secret_flags.to_vec();
        all.extend([AttributeType::Unwrap, AttributeType::Decrypt]);
        all
    } else {
        vec![AttributeType::Wrap, AttributeType::Encrypt]
    };
    let flags = bool_attrs(session, handle, &wanted)?;
    let class_name = if class == ObjectClass::SECRET_KEY {
        "secret-key"
    } else if class == ObjectClass::PRIVATE_KEY {
        "private-key"
    } else {
        "public-key"
    };
    Ok(ObjectInfo {
        label,
        id,
        class: class_name,
        key_type,
        sensitive: flags.get(&AttributeType::Sensitive).copied(),
        extractable: flags.get(&AttributeType::Extractable).copied(),
        never_extractable: flags.get(&AttributeType::NeverExtractable).copied(),
        wrap: flags.get(&AttributeType::Wrap).copied(),
        unwrap: flags.get(&AttributeType::Unwrap).copied(),
        encrypt: flags.get(&AttributeType::Encrypt).copied(),
        decrypt: flags.get(&AttributeType::Decrypt).copied(),
    })
}

/// The attributes every keybroker secret key shares: on the token, private to the logged-in
/// user, sensitive, never extractable, and nothing allowed unless the caller says so. We spell
/// each one out because defaults differ by vendor (SoftHSM2 sets CKA_SIGN on AES keys).
fn locked_secret_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::Derive(false),
        Attribute::Unwrap(false),
    ]
}

/// The keybroker key of `class` labelled `label`: checked if it is on the token already (a run
/// that stopped half-way left it), else made by `create`. Returns whether it was created.
fn ensure_object(
    session: &Session,
    class: ObjectClass,
    label: &str,
    create: impl FnOnce(&Session) -> Result<(), HsmError>,
) -> Result<bool, HsmError> {
    match find_one(session, class, label)? {
        Some(handle) => {
            check_secret_is_safe(session, handle, label)?;
            Ok(false)
        }
        None => create(session).map(|()| true),
    }
}

/// The versions of the token-signing private keys on the token, ascending.
fn signing_key_versions(session: &Session) -> Result<Vec<u32>, HsmError> {
    let mut versions: Vec<u32> = find_labelled(session, ObjectClass::PRIVATE_KEY)?
        .into_iter()
        .filter_map(|(label, _)| label.strip_prefix(SIGNING_KEY_PREFIX)?.parse().ok())
        .filter(|v| *v > 0)
        .collect();
    versions.sort_unstable();
    versions.dedup();
    Ok(versions)
}

fn create_master_key(session: &Session, version: MasterKeyVersion) -> Result<(), HsmError> {
    let label = version.token_label();
    if find_one(session, ObjectClass::SECRET_KEY, &label)?.is_some() {
        return Err(HsmError::AlreadyExists(label));
    }
    let mut template = locked_secret_template(&label, label.as_bytes());
    template.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Wrap(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]);
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(classify)?;
    Ok(())
}

fn create_audit_key(session: &Session, label: &str) -> Result<(), HsmError> {
    let mut template = locked_secret_template(label, label.as_bytes());
    template.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Wrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
    ]);
    session
        .generate_key(&Mechanism::GenericSecretKeyGen, &template)
        .map_err(classify)?;
    Ok(())
}

fn create_signing_key(session: &Session, label: &str) -> Result<(), HsmError> {
    let id = label.as_bytes().to_vec();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let mut private = locked_secret_template(label, &id);
    private.extend([Attribute::Sign(true), Attribute::Decrypt(false)]);
    session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(classify)?;
    Ok(())
}
