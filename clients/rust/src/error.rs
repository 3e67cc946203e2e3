//! The one error type of the library and the broker's stable error codes. Nothing here ever
//! holds a secret, a token or key material, so `Debug` and `Display` are safe to log.

use std::fmt;

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker answered with an error (the JSON error shape, or the OAuth one at the token
    /// endpoint).
    #[error("broker refused ({status} {code}): {message}{}", request_id.as_deref().map(|id| format!(" [request {id}]")).unwrap_or_default())]
    Broker {
        /// HTTP status.
        status: u16,
        /// The broker's stable code.
        code: ErrorCode,
        /// The broker's message (never a secret: the broker writes none into it).
        message: String,
        /// The request's `x-request-id`, which finds it in the broker's log.
        request_id: Option<String>,
    },
    /// Bytes that are not a version 1 envelope (magic, version, length); refused before any
    /// broker call.
    #[error("not a valid envelope: {0}")]
    Envelope(&'static str),
    /// AES-GCM refused the envelope: another data key, another context, or altered bytes.
    #[error("the envelope does not authenticate (altered, or another key or context)")]
    EnvelopeAuthentication,
    /// A data key that is not 32 bytes (or a `datakey` answer without one).
    #[error("the data key is not a 32-byte AES-256 key")]
    InvalidDataKey,
    /// The connection or the HTTP exchange failed (no answer, timeout, TLS).
    #[error("HTTP transport: {0}")]
    Transport(#[source] reqwest::Error),
    /// An answer the library cannot read (not the documented JSON shape).
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// The client could not be set up (URL, CA file, TLS).
    #[error("configuration: {0}")]
    Config(String),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random,
}

impl Error {
    /// The broker's code, for a broker error.
    #[must_use]
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Broker { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, for a broker error.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Broker { status, .. } => Some(*status),
            _ => None,
        }
    }
}

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $text:literal => $status:literal,)*) => {
        /// The broker's stable error codes (`src/api/mod.rs`, and RFC 6749's at the token
        /// endpoint); a code this version does not know is kept as [`ErrorCode::Other`].
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this library does not know yet.
            Other(String),
        }

        impl ErrorCode {
            /// The code as the broker writes it.
            #[must_use]
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(text) => text,
                }
            }

            /// The status the broker answers this code with (its usual one, where it has
            /// two); 0 for a code this library does not know. Batch items carry a code only:
            /// this is the status their errors report.
            #[must_use]
            pub fn usual_status(&self) -> u16 {
                match self {
                    $(Self::$variant => $status,)*
                    Self::Other(_) => 0,
                }
            }
        }

        impl From<&str> for ErrorCode {
            fn from(text: &str) -> Self {
                match text {
                    $($text => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }
    };
}

codes! {
    /// 400: the body is not JSON.
    InvalidJson = "invalid_json" => 400,
    /// 415.
    UnsupportedMediaType = "unsupported_media_type" => 415,
    /// 413.
    PayloadTooLarge = "payload_too_large" => 413,
    /// 422 (400 at the token endpoint): the request's shape is wrong.
    InvalidRequest = "invalid_request" => 422,
    /// 400.
    InvalidBase64 = "invalid_base64" => 400,
    /// 422: key material outside 16..=64 bytes.
    InvalidKeyLength = "invalid_key_length" => 422,
    /// 422: an encryption context over the limits.
    InvalidContext = "invalid_context" => 422,
    /// 400: not a blob the broker reads.
    InvalidBlob = "invalid_blob" => 400,
    /// 400.
    UnsupportedBlobVersion = "unsupported_blob_version" => 400,
    /// 422: a master-key version the broker does not know.
    UnknownMkVersion = "unknown_mk_version" => 422,
    /// 422: another context, another client, or an altered blob.
    ContextMismatch = "context_mismatch" => 422,
    /// 422.
    BatchTooLarge = "batch_too_large" => 422,
    /// 422.
    EmptyBatch = "empty_batch" => 422,
    /// 503.
    NoActiveKey = "no_active_key" => 503,
    /// 503.
    HsmTimeout = "hsm_timeout" => 503,
    /// 503.
    HsmUnavailable = "hsm_unavailable" => 503,
    /// 503.
    DatabaseUnavailable = "database_unavailable" => 503,
    /// 500.
    InternalError = "internal_error" => 500,
    /// 422.
    RotationPeriodRequired = "rotation_period_required" => 422,
    /// 404.
    KeyNotFound = "key_not_found" => 404,
    /// 404.
    KeyVersionNotFound = "key_version_not_found" => 404,
    /// 409.
    KeyNameTaken = "key_name_taken" => 409,
    /// 409.
    KeyActive = "key_active" => 409,
    /// 409.
    KeyDisabled = "key_disabled" => 409,
    /// 409.
    KeyExpired = "key_expired" => 409,
    /// 409.
    KeyPendingDeletion = "key_pending_deletion" => 409,
    /// 410.
    KeyDestroyed = "key_destroyed" => 410,
    /// 404.
    SecretNotFound = "secret_not_found" => 404,
    /// 410.
    SecretDestroyed = "secret_destroyed" => 410,
    /// 409.
    SecretActive = "secret_active" => 409,
    /// 409.
    SecretPendingDeletion = "secret_pending_deletion" => 409,
    /// 409.
    ConcurrentUpdate = "concurrent_update" => 409,
    /// 404.
    MkVersionNotFound = "mk_version_not_found" => 404,
    /// 409.
    MkVersionState = "mk_version_state" => 409,
    /// 409.
    MkVersionInUse = "mk_version_in_use" => 409,
    /// 409.
    RewrapStuck = "rewrap_stuck" => 409,
    /// 401: the access token is missing, expired or revoked.
    InvalidToken = "invalid_token" => 401,
    /// 403.
    InsufficientScope = "insufficient_scope" => 403,
    /// 403.
    IpNotAllowed = "ip_not_allowed" => 403,
    /// 403.
    ClientDisabled = "client_disabled" => 403,
    /// 404.
    ClientNotFound = "client_not_found" => 404,
    /// 409.
    IpAlreadyRegistered = "ip_already_registered" => 409,
    /// 409.
    LastAdmin = "last_admin" => 409,
    /// 422.
    BlockNotAllowed = "block_not_allowed" => 422,
    /// 422.
    InvalidClientMetadata = "invalid_client_metadata" => 422,
    /// 429, with `Retry-After`.
    RateLimited = "rate_limited" => 429,
    /// 429 (with `Retry-After`) or 403 (an officer's block).
    SourceBlocked = "source_blocked" => 429,
    /// 404.
    NotFound = "not_found" => 404,
    /// 404.
    NoRewrapJob = "no_rewrap_job" => 404,
    /// 405.
    MethodNotAllowed = "method_not_allowed" => 405,
    /// 401 at the token endpoint: the client id or secret is wrong (or the client disabled).
    InvalidClient = "invalid_client" => 401,
    /// 400 at the token endpoint.
    InvalidScope = "invalid_scope" => 400,
    /// 400 at the token endpoint.
    UnsupportedGrantType = "unsupported_grant_type" => 400,
    /// 400 at the token endpoint.
    InvalidGrant = "invalid_grant" => 400,
    /// 503 at the token endpoint.
    TemporarilyUnavailable = "temporarily_unavailable" => 503,
    /// 500 at the token endpoint.
    ServerError = "server_error" => 500,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_kept() {
        assert_eq!(
            ErrorCode::from("context_mismatch"),
            ErrorCode::ContextMismatch
        );
        assert_eq!(ErrorCode::RateLimited.as_str(), "rate_limited");
        assert_eq!(
            ErrorCode::from("brand_new"),
            ErrorCode::Other("brand_new".to_owned())
        );
        assert_eq!(ErrorCode::from("brand_new").to_string(), "brand_new");
    }

    #[test]
    fn a_broker_error_says_status_code_message_and_request_id() {
        let e = Error::Broker {
            status: 422,
            code: ErrorCode::ContextMismatch,
            message: "the blob does not open".to_owned(),
            request_id: Some("r-1".to_owned()),
        };
        assert_eq!(
            e.to_string(),
            "broker refused (422 context_mismatch): the blob does not open [request r-1]"
        );
        assert_eq!(e.status(), Some(422));
    }
}
