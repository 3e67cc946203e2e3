//! [`HsmError`], what went wrong at the token, and [`classify`], which sorts a raw cryptoki
//! error into the variants callers act on (an outage, a refused PIN, anything else). Only
//! types and the sorting: it calls no token.

use std::path::PathBuf;
use std::time::Duration;

use cryptoki::error::{Error as CkError, RvError};

use crate::crypto::MasterKeyVersion;

/// What went wrong at the token.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load or initialise the PKCS#11 module {path}")]
    Module {
        /// The module path.
        path: PathBuf,
        /// What cryptoki said.
        #[source]
        source: CkError,
    },
    /// The token lacks mechanisms keybroker needs (named).
    #[error("the token lacks what keybroker needs: {}", .0.join(", "))]
    MissingMechanisms(Vec<&'static str>),
    /// No slot holds a token with the configured label.
    #[error("no token labelled {0:?} is present")]
    TokenNotFound(String),
    /// The token refused the PIN (wrong, locked or expired).
    #[error("the token refused the PIN")]
    PinRefused,
    /// The blob names a master-key version that is not on the token.
    #[error("master key version {0} is not on the token")]
    UnknownMasterKey(MasterKeyVersion),
    /// A GCM decryption failed: the ciphertext, tag, IV or AAD is not the one sealed.
    #[error("the ciphertext does not authenticate")]
    NotAuthentic,
    /// An existing keybroker object does not have the attributes keybroker requires.
    #[error("token object {label} is unsafe: {why}")]
    UnsafeObject {
        /// The object's label.
        label: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An object keybroker is about to create already exists.
    #[error("token object {0} already exists")]
    AlreadyExists(String),
    /// The token, its slot or our session is gone (device removed, token not present,
    /// session closed, …), even after one retry on a fresh session.
    #[error("the token is unreachable")]
    Unavailable(#[source] CkError),
    /// No session became free, or the token did not answer, within the deadline.
    #[error("the token did not answer within {0:?}")]
    Timeout(Duration),
    /// A keybroker object that must be on the token cannot be found there: the token was
    /// replaced, emptied or lost its storage. An outage, not a caller's mistake.
    #[error("token object {0} is missing")]
    ObjectMissing(String),
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 call failed")]
    Pkcs11(#[source] CkError),
    /// The token answered with something impossible (e.g. a ciphertext of the wrong size).
    #[error("unexpected answer from the token: {0}")]
    Unexpected(&'static str),
    /// The worker that ran the call panicked, or the pool's workers are gone.
    #[error("the token worker stopped")]
    Worker,
    /// Sealing a random value and opening it again failed: blobs sealed on this token could not
    /// be opened, so keybroker refuses to use it.
    #[error(
        "self-test failed on token {token:?}: CKM_AES_GCM seal and open under master key \
         v{version}: {problem}; refusing to use this token, because what it seals could not be \
         opened again"
    )]
    SelfTest {
        /// The token's label.
        token: String,
        /// The master-key version tested.
        version: MasterKeyVersion,
        /// What went wrong.
        problem: String,
    },
}

impl HsmError {
    /// Whether the token or its session is at fault (503). All but a failed self-test are
    /// retried on a fresh session first: a fresh session cannot mend a token that loses data.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_)
                | Self::Timeout(_)
                | Self::TokenNotFound(_)
                | Self::ObjectMissing(_)
                | Self::Worker
                | Self::SelfTest { .. }
        )
    }
}

/// Sorts a raw cryptoki error into the variants callers act on. The decrypt path refines
/// authentication failures itself (see [`TokenSession::unseal`](super::TokenSession::unseal)).
pub(super) fn classify(err: CkError) -> HsmError {
    match &err {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::DeviceRemoved
            | RvError::DeviceError
            // "Some horrible, unrecoverable error": the token's, not the caller's. (A failed GCM
            // tag is also CKR_GENERAL_ERROR on SoftHSM2; `unseal` sorts that out before this.)
            | RvError::GeneralError
            // An operation left open on a session by a failure mid-call: that session is spoilt.
            | RvError::OperationActive
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SessionCount
            | RvError::SlotIdInvalid
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            // A cached handle that no longer resolves: the token was re-inserted or re-loaded.
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid => HsmError::Unavailable(err),
            RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired => {
                HsmError::PinRefused
            }
            _ => HsmError::Pkcs11(err),
        },
        _ => HsmError::Pkcs11(err),
    }
}
