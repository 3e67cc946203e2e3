//! [`ApiError`]: the one place that picks every status and error code, and the error shape
//! ([`ErrorBody`]) every endpoint answers with. Server-side detail goes to the log, never to
//! the client.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::broker::BrokerError;
use crate::crypto::BlobError;
use crate::hsm::HsmError;

use super::extract::mismatch_message;

/// Every error the API returns. Each variant's doc says its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not JSON.
    #[error("the request body is not valid JSON")]
    InvalidJson,
    /// 415 `unsupported_media_type`: no `Content-Type: application/json`.
    #[error("the request body must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 413 `payload_too_large`: over the configured body limit.
    #[error("the request body is larger than the configured limit")]
    PayloadTooLarge,
    /// 422 `invalid_request`: valid JSON of the wrong shape (types, unknown or missing fields).
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `invalid_base64`: a field that must be standard padded base64 is not.
    #[error("field `{0}` is not valid base64 (standard alphabet, with padding)")]
    InvalidBase64(&'static str),
    /// 422 `invalid_key_length`: key material outside 16..=64 bytes.
    #[error("key material must be 16 to 64 bytes")]
    InvalidKeyLength,
    /// 422 `invalid_context`: an encryption context over the limits.
    #[error("{0}")]
    InvalidContext(crate::crypto::ContextError),
    /// 400 `invalid_blob` or `unsupported_blob_version`: a string that is not a blob we read.
    #[error("{0}")]
    InvalidBlob(BlobError),
    /// 422 `batch_too_large` / `empty_batch`, `unknown_mk_version`, `context_mismatch`; 503
    /// `hsm_unavailable`, `hsm_timeout`, `database_unavailable`, `no_active_key`; 500
    /// `internal_error`.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// 401 `invalid_token`; 403 `insufficient_scope`, `ip_not_allowed`, `client_disabled`;
    /// 404 `client_not_found`; 409 `ip_already_registered`, `last_admin`; 422
    /// `invalid_client_metadata`, `block_not_allowed`; 429 `rate_limited`.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 422 `invalid_request`: a query string of the wrong shape.
    #[error("{0}")]
    InvalidQuery(String),
    /// 400 `invalid_request`: a form body of the wrong shape.
    #[error("the body must be an application/x-www-form-urlencoded form with a `token` field")]
    InvalidForm,
    /// 429 `rate_limited`, with `Retry-After`.
    #[error("too many requests; retry after {retry_after} s")]
    RateLimited {
        /// Seconds.
        retry_after: u64,
    },
    /// 429 `source_blocked` for repeated violations (with `Retry-After`), or 403
    /// `source_blocked` for a source an officer blocked (a lockdown).
    #[error("this source is blocked")]
    SourceBlocked {
        /// Seconds, when the block ends by itself.
        retry_after: Option<u64>,
    },
    /// 404 `not_found`.
    #[error("no such endpoint")]
    NotFound,
    /// 404 `no_rewrap_job`.
    #[error("no rewrap job was ever started")]
    NoRewrapJob,
    /// 500 `internal_error`: the metrics could not be written out.
    #[error("the metrics could not be encoded")]
    MetricsEncoding,
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
}

impl ApiError {
    pub(super) fn status_and_code(&self) -> (StatusCode, &'static str) {
        use BrokerError as B;
        match self {
            Self::InvalidJson => (StatusCode::BAD_REQUEST, "invalid_json"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Self::InvalidBase64(_) => (StatusCode::BAD_REQUEST, "invalid_base64"),
            Self::InvalidKeyLength => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_length"),
            Self::InvalidContext(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_context"),
            Self::InvalidBlob(BlobError::UnsupportedFormat) => {
                (StatusCode::BAD_REQUEST, "unsupported_blob_version")
            }
            Self::InvalidBlob(_) => (StatusCode::BAD_REQUEST, "invalid_blob"),
            Self::Broker(B::UnknownMasterKey(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "unknown_mk_version")
            }
            Self::Broker(B::NotAuthentic) => (StatusCode::UNPROCESSABLE_ENTITY, "context_mismatch"),
            Self::Broker(B::BatchTooLarge { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "batch_too_large")
            }
            Self::Broker(B::EmptyBatch) => (StatusCode::UNPROCESSABLE_ENTITY, "empty_batch"),
            Self::Broker(B::NoActiveKey) => (StatusCode::SERVICE_UNAVAILABLE, "no_active_key"),
            Self::Broker(B::HsmUnavailable(HsmError::Timeout(_))) => {
                (StatusCode::SERVICE_UNAVAILABLE, "hsm_timeout")
            }
            Self::Broker(B::HsmUnavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "hsm_unavailable")
            }
            Self::Broker(B::DatabaseUnavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::Broker(B::Hsm(_) | B::Store(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
            Self::Broker(B::InvalidSpec(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
            }
            Self::Broker(B::RotationPeriodRequired) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "rotation_period_required")
            }
            Self::Broker(B::KeyNotFound) => (StatusCode::NOT_FOUND, "key_not_found"),
            Self::Broker(B::KeyVersionNotFound) => (StatusCode::NOT_FOUND, "key_version_not_found"),
            Self::Broker(B::KeyNameTaken) => (StatusCode::CONFLICT, "key_name_taken"),
            Self::Broker(B::KeyState(state)) => key_state_status(*state),
            Self::Broker(B::SecretNotFound) => (StatusCode::NOT_FOUND, "secret_not_found"),
            Self::Broker(B::SecretState(state)) => {
                use crate::broker::SecretState as S;
                match state {
                    S::Destroyed => (StatusCode::GONE, "secret_destroyed"),
                    S::Active => (StatusCode::CONFLICT, "secret_active"),
                    S::PendingDeletion => (StatusCode::CONFLICT, "secret_pending_deletion"),
                }
            }
            Self::Broker(B::Busy) => (StatusCode::CONFLICT, "concurrent_update"),
            Self::Broker(B::MasterKeyNotFound(_)) => {
                (StatusCode::NOT_FOUND, "mk_version_not_found")
            }
            Self::Broker(B::MasterKeyState(..)) => (StatusCode::CONFLICT, "mk_version_state"),
            Self::Broker(B::MasterKeyInUse(..)) => (StatusCode::CONFLICT, "mk_version_in_use"),
            Self::Broker(B::RewrapStuck(_)) => (StatusCode::CONFLICT, "rewrap_stuck"),
            Self::Auth(e) => auth_status_and_code(e),
            Self::InvalidQuery(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Self::InvalidForm => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::SourceBlocked {
                retry_after: Some(_),
            } => (StatusCode::TOO_MANY_REQUESTS, "source_blocked"),
            Self::SourceBlocked { retry_after: None } => (StatusCode::FORBIDDEN, "source_blocked"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::NoRewrapJob => (StatusCode::NOT_FOUND, "no_rewrap_job"),
            Self::MetricsEncoding => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        }
    }

    /// The client-facing body. Server-side failures say only what kind of part failed: the
    /// detail (PKCS#11 return codes, SQL) goes to the log, never to the client.
    pub(super) fn body(&self) -> ErrorBody {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            match self {
                Self::Broker(BrokerError::HsmUnavailable(HsmError::Timeout(limit)))
                | Self::Auth(AuthError::Hsm(HsmError::Timeout(limit))) => format!(
                    "the HSM did not answer within the {} ms deadline; retry later",
                    limit.as_millis()
                ),
                // Said by the code the one mapping above chose, so a 500 never claims an outage.
                _ => match code {
                    "hsm_unavailable" => "the HSM is unavailable; retry later",
                    "database_unavailable" => "the database is unavailable; retry later",
                    "no_active_key" => {
                        "no master key is active; an officer must run `keybroker hsm init`"
                    }
                    _ => "internal error; the request id identifies it in the server log",
                }
                .to_owned(),
            }
        } else {
            self.to_string()
        };
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
                request_id: None,
            },
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::InvalidRequest(mismatch_message(&e, "body")),
            JsonRejection::JsonSyntaxError(_) => Self::InvalidJson,
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            _ => Self::InvalidJson,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            // The full chain of sources, for the operator; the client gets the body below.
            let detail = error_chain(&self);
            tracing::error!(target: "keybroker::api", code, error = %detail, "request failed");
        } else {
            tracing::debug!(target: "keybroker::api", code, "request refused");
        }
        let challenge = match &self {
            Self::Auth(AuthError::MissingToken) => Some("Bearer realm=\"keybroker\"".to_owned()),
            Self::Auth(AuthError::InvalidToken(reason)) => {
                // One answer for every token problem; the reason is for the operator only.
                tracing::debug!(target: "keybroker::auth", reason, "bearer token refused");
                Some("Bearer realm=\"keybroker\", error=\"invalid_token\"".to_owned())
            }
            Self::Auth(AuthError::InsufficientScope(scope)) => Some(format!(
                "Bearer realm=\"keybroker\", error=\"insufficient_scope\", scope=\"{scope}\""
            )),
            _ => None,
        };
        let body = self.body();
        let mut response = (status, Json(&body)).into_response();
        if let Self::RateLimited { retry_after }
        | Self::SourceBlocked {
            retry_after: Some(retry_after),
        } = &self
            && let Ok(value) = HeaderValue::from_str(&retry_after.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response.extensions_mut().insert(body);
        response
    }
}

/// A use or change refused by a key's state: 410 once destroyed, 409 otherwise.
fn key_state_status(state: crate::broker::KeyState) -> (StatusCode, &'static str) {
    use crate::broker::KeyState as S;
    match state {
        S::Active => (StatusCode::CONFLICT, "key_active"),
        S::Disabled => (StatusCode::CONFLICT, "key_disabled"),
        S::Expired => (StatusCode::CONFLICT, "key_expired"),
        S::PendingDeletion => (StatusCode::CONFLICT, "key_pending_deletion"),
        S::Destroyed => (StatusCode::GONE, "key_destroyed"),
    }
}

fn auth_status_and_code(err: &AuthError) -> (StatusCode, &'static str) {
    match err {
        AuthError::MissingToken | AuthError::InvalidToken(_) => {
            (StatusCode::UNAUTHORIZED, "invalid_token")
        }
        AuthError::InsufficientScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
        AuthError::IpNotAllowed => (StatusCode::FORBIDDEN, "ip_not_allowed"),
        AuthError::ClientDisabled => (StatusCode::FORBIDDEN, "client_disabled"),
        AuthError::ClientNotFound => (StatusCode::NOT_FOUND, "client_not_found"),
        AuthError::IpAlreadyRegistered => (StatusCode::CONFLICT, "ip_already_registered"),
        AuthError::LastAdmin => (StatusCode::CONFLICT, "last_admin"),
        AuthError::InvalidBlock(_) => (StatusCode::UNPROCESSABLE_ENTITY, "block_not_allowed"),
        AuthError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        AuthError::InvalidClientSpec(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_client_metadata")
        }
        // The token endpoint answers these in the OAuth shape (see `OAuthError`); elsewhere
        // they cannot occur, but if they did they would be the caller's fault.
        AuthError::InvalidClient(_) => (StatusCode::UNAUTHORIZED, "invalid_client"),
        AuthError::UnsupportedGrantType => (StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        AuthError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        AuthError::InvalidScope => (StatusCode::BAD_REQUEST, "invalid_scope"),
        AuthError::Hsm(HsmError::Timeout(_)) => (StatusCode::SERVICE_UNAVAILABLE, "hsm_timeout"),
        AuthError::Hsm(e) if e.is_unavailable() => {
            (StatusCode::SERVICE_UNAVAILABLE, "hsm_unavailable")
        }
        AuthError::Store(e) if e.is_unavailable() => {
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
        }
        AuthError::Store(e) if e.hsm_failure().is_some_and(|h| h.is_unavailable()) => {
            (StatusCode::SERVICE_UNAVAILABLE, "hsm_unavailable")
        }
        AuthError::Hsm(_) | AuthError::Store(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        }
    }
}

/// An error and its sources, `outer: inner: innermost`, for log lines and the CLI.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The error shape of every endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable machine code, a human message, and the request id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `context_mismatch`, `hsm_unavailable`.
    #[schema(example = "context_mismatch")]
    pub code: String,
    /// Human-readable explanation; never contains key material.
    pub message: String,
    /// The `x-request-id` of the request, also sent as a response header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
