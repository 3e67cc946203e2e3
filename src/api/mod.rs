//! `api` is the only module that knows HTTP: the axum router, thin handlers that parse requests
//! into validated types, the one [`ApiError`] that picks every status and error code, and the
//! OpenAPI document. Business logic lives in `broker`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;
use utoipa::{OpenApi, ToSchema};
use zeroize::Zeroizing;

use crate::auth::{AuthError, Authenticator, Caller, Scope, source_ip, unix_now};
use crate::broker::{BlobRequest, Broker, BrokerError, DataKeyRequest, Operation, WrapRequest};
use crate::crypto::{BlobError, EncryptionContext, KeyMaterial, WrappedBlob};
use crate::hsm::HsmError;

pub mod admin;
mod console;
mod custody;
pub mod keys;
pub mod limits;
mod metrics;
pub mod oauth;
mod openapi;
pub mod random;
mod request_log;
mod schema;

pub use request_log::RequestLog;

use admin::{
    delete_client, disable_client, enable_client, get_client, list_clients, register_client,
    update_client,
};
use oauth::{jwks, oauth_introspect, oauth_revoke, oauth_token};

const REQUEST_ID: &str = "x-request-id";

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The crypto use cases.
    pub broker: Arc<Broker>,
    /// Clients and tokens.
    pub auth: Arc<Authenticator>,
    /// Where each request's log row goes.
    pub request_log: RequestLog,
    /// Rate limits and blocked sources.
    pub limiter: Arc<limits::Limiter>,
}

/// The whole HTTP API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let request_id = axum::http::HeaderName::from_static(REQUEST_ID);
    Router::new()
        .route("/v1/datakey", post(datakey))
        .route("/v1/datakey/batch", post(datakey_batch))
        .route("/v1/wrap", post(wrap))
        .route("/v1/wrap/batch", post(wrap_batch))
        .route("/v1/unwrap", post(unwrap))
        .route("/v1/unwrap/batch", post(unwrap_batch))
        .route("/v1/rewrap", post(rewrap))
        .route("/v1/rewrap/batch", post(rewrap_batch))
        .route("/v1/random", post(random::random))
        .route("/v1/random/batch", post(random::random_batch))
        .route("/v1/oauth/token", post(oauth_token))
        .route("/v1/oauth/introspect", post(oauth_introspect))
        .route("/v1/oauth/revoke", post(oauth_revoke))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/admin/clients", post(register_client).get(list_clients))
        .route(
            "/v1/admin/clients/{id}",
            get(get_client).patch(update_client).delete(delete_client),
        )
        .route("/v1/admin/clients/{id}/disable", post(disable_client))
        .route("/v1/admin/clients/{id}/enable", post(enable_client))
        .route(
            "/v1/admin/clients/{id}/lockdown",
            post(admin::lockdown_client),
        )
        .route(
            "/v1/admin/clients/{id}/unblock",
            post(admin::unblock_client),
        )
        .route(
            "/v1/admin/security-settings",
            get(admin::get_security_settings).put(admin::put_security_settings),
        )
        .route("/v1/admin/audit", get(admin::audit_events))
        .route("/v1/admin/audit/verify", get(admin::audit_verify))
        .route("/v1/keys", post(keys::create_key).get(keys::list_keys))
        .route("/v1/keys/{id}", get(keys::get_key).delete(keys::delete_key))
        .route("/v1/keys/{id}/plaintext", post(keys::read_key))
        .route("/v1/keys/{id}/rotate", post(keys::rotate_key))
        .route("/v1/keys/{id}/refresh", post(keys::refresh_key))
        .route("/v1/keys/{id}/disable", post(keys::disable_key))
        .route("/v1/keys/{id}/enable", post(keys::enable_key))
        .route(
            "/v1/keys/{id}/cancel-deletion",
            post(keys::cancel_key_deletion),
        )
        .route(
            "/v1/secrets/{name}",
            axum::routing::put(keys::put_secret)
                .get(keys::get_secret)
                .delete(keys::delete_secret),
        )
        .route(
            "/v1/secrets/{name}/cancel-deletion",
            post(keys::cancel_secret_deletion),
        )
        .route("/v1/usage", get(keys::own_usage))
        .route("/v1/admin/usage", get(keys::admin_usage))
        .route("/v1/admin/keys/due", get(keys::keys_due))
        .route("/v1/admin/master-keys", get(custody::list_master_keys))
        .route(
            "/v1/admin/master-keys/rotate",
            post(custody::rotate_master_key),
        )
        .route(
            "/v1/admin/master-keys/rewrap",
            post(custody::start_rewrap).get(custody::get_rewrap),
        )
        .route(
            "/v1/admin/master-keys/{version}/retire",
            post(custody::retire_master_key),
        )
        .route(
            "/v1/admin/signing-keys/rotate",
            post(custody::rotate_signing_key),
        )
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(self::openapi))
        .merge(console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(move |request, next| {
            read_body_first(max_body_bytes, request, next)
        }))
        // Inside the audit scope (its refusals are recorded with the request's context) and
        // inside the request log (refused requests get their row too).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::limit_by_source,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), audit_scope))
        .layer(middleware::from_fn(attach_request_id))
        // Inside SetRequestIdLayer, so the request id is there; outside attach_request_id, whose
        // rebuilt response keeps the ErrorBody extension the row's error code comes from.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_log::record,
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http())
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(middleware::from_fn(sanitise_request_id))
        // On every response, refusals included. Nothing we answer may sit in a cache: data keys,
        // plaintexts, secrets and tokens are in bodies, and a shared cache keyed by URL is never
        // right for an API whose answers depend on the bearer. Browsers must use HTTPS only.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ))
        // Outermost of the layers that use it: the source address is worked out once here.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            resolve_source,
        ))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors

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
    fn status_and_code(&self) -> (StatusCode, &'static str) {
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
    fn body(&self) -> ErrorBody {
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

/// Keeps a caller's own `x-request-id` only when it is a short plain token (1-128 of
/// `A-Za-z0-9._-`); otherwise drops it, and a fresh UUID is used. The id ends up in logs, the
/// request log and the audit trail, so it must not be arbitrary text.
async fn sanitise_request_id(mut request: Request, next: Next) -> Response {
    let acceptable = request.headers().get(REQUEST_ID).is_none_or(|v| {
        let bytes = v.as_bytes();
        (1..=128).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    if !acceptable {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

/// Runs the request with its audit context (request id, source address; the `Caller`
/// extractor adds the client), so every event it records says who and from where.
async fn audit_scope(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = request.into_parts();
    let source = request_source(&parts, &state).to_string();
    let request = Request::from_parts(parts, body);
    crate::audit::scope(
        crate::audit::Context::request(request_id, Some(source)),
        next.run(request),
    )
    .await
}

/// Adds the request id to every error body, so a caller can quote it to an operator.
async fn attach_request_id(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = next.run(request).await;
    let (Some(request_id), Some(body)) = (request_id, response.extensions().get::<ErrorBody>())
    else {
        return response;
    };
    let mut body = body.clone();
    body.error.request_id = Some(request_id);
    let (mut parts, _) = response.into_parts();
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Reads a request's whole body (up to the body limit) before anything answers it. A handler
/// that refuses a request early (a bad token, a missing scope) would leave the body unread, and
/// a connection closed with unread bytes in it is reset: a client still sending would see the
/// reset instead of the answer (seen with bodies of 100 KB and a bad token). Every body the API
/// takes is a JSON document or a form that its handler reads whole anyway. Inside the source
/// limits: a blocked or rate-limited source is refused without its body being read.
async fn read_body_first(max_body_bytes: usize, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, max_body_bytes).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(e) if is_over_limit(&e) => ApiError::PayloadTooLarge.into_response(),
        // The client stopped sending mid-body: nobody will read an answer.
        Err(_) => ApiError::InvalidJson.into_response(),
    }
}

fn is_over_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `Json<T>` whose rejections are [`ApiError`]s, so malformed input gets our error shape. Public
/// so the fuzz target drives this very extractor.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Every request body is a JSON object: serde would otherwise fill a struct from an
        // array by position, which no client means.
        let Json(mut value) = Json::<serde_json::Value>::from_request(req, state).await?;
        integral_numbers_as_integers(&mut value);
        if !value.is_object() {
            return Err(ApiError::InvalidRequest(
                "the request body must be a JSON object".to_owned(),
            ));
        }
        serde_path_to_error::deserialize(value)
            .map(Self)
            .map_err(|e| {
                ApiError::InvalidRequest(describe_mismatch(
                    &e.path().to_string(),
                    &e.inner().to_string(),
                    "body",
                ))
            })
    }
}

/// JSON has one kind of number: `34.0` is the integer 34, as JSON Schema's `integer` says. serde
/// would refuse it for an integer field, so a number with no fractional part that fits a 64-bit
/// integer is made one before the body is read into its type (a float field takes it either way).
fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::{Number, Value};
    match value {
        Value::Number(n) if n.is_f64() => {
            let Some(f) = n.as_f64() else { return };
            if f.fract() != 0.0 {
                return;
            }
            // 2^64 and -2^63: the bounds of u64 and i64, exactly representable as f64.
            if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                *n = Number::from(f as u64);
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                *n = Number::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

/// `Path<T>` whose rejections (a segment that is not UTF-8 once percent-decoded) are
/// [`ApiError`]s, so they get our error shape too.
pub(super) struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|e| ApiError::InvalidRequest(path_message(&e)))
    }
}

/// Our words for a path segment that does not parse, never the parser's.
fn path_message(rejection: &axum::extract::rejection::PathRejection) -> String {
    use axum::extract::path::ErrorKind;
    use axum::extract::rejection::PathRejection;
    match rejection {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::ParseErrorAtKey { key, .. } => {
                format!("the path segment `{key}` is not valid")
            }
            ErrorKind::InvalidUtf8InPathParam { key } => {
                format!("the path segment `{key}` is not UTF-8 text")
            }
            _ => "a path segment is not valid".to_owned(),
        },
        _ => "a path segment is not valid".to_owned(),
    }
}

/// Our words for a JSON body or query string that is well-formed but does not fit the
/// request's schema: which field, and whether it is missing, unknown, or of the wrong type or
/// value. Never the parser's own sentence ("invalid digit found in string", "expected u32").
pub(super) fn mismatch_message(rejection: &dyn std::error::Error, what: &str) -> String {
    let mut source = rejection.source();
    while let Some(err) = source {
        if let Some(e) = err.downcast_ref::<serde_path_to_error::Error<serde_json::Error>>() {
            return describe_mismatch(&e.path().to_string(), &e.inner().to_string(), what);
        }
        if let Some(e) = err.downcast_ref::<serde_path_to_error::Error<serde::de::value::Error>>() {
            return describe_mismatch(&e.path().to_string(), &e.inner().to_string(), what);
        }
        source = err.source();
    }
    format!("the {what} does not fit this request's schema")
}

fn describe_mismatch(path: &str, inner: &str, what: &str) -> String {
    // serde words these two cases with fixed prefixes (serde::de::Error's provided methods);
    // we take only the field name from them.
    let named = |rest: &str| rest.split('`').nth(1).map(str::to_owned);
    let at = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!(" in `{path}`")
    };
    if let Some(name) = inner.strip_prefix("missing field ").and_then(named) {
        return format!("the {what} lacks the required field `{name}`{at}");
    }
    if let Some(name) = inner.strip_prefix("unknown field ").and_then(named) {
        return format!("the {what} has a field this request does not accept: `{name}`{at}");
    }
    if at.is_empty() {
        return format!("the {what} does not have the shape this request documents");
    }
    let kind = if inner.starts_with("invalid type") {
        "has the wrong type"
    } else {
        "has a value out of range or of the wrong form"
    };
    format!("the field `{path}` of the {what} {kind}")
}

/// The authenticated caller, from `Authorization: Bearer …`, checked on every protected request
/// (see [`Authenticator::authenticate`]).
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let source = request_source(parts, state);
        let caller = state
            .auth
            .authenticate(bearer_token(&parts.headers), source)
            .await?;
        admit(parts, state, caller)
    }
}

/// What follows authentication on every request, whichever way the caller proved itself (a
/// bearer token, a console session): the request log and the audit trail name the client, and
/// the client's own rate limit applies.
fn admit(parts: &Parts, state: &AppState, caller: Caller) -> Result<Caller, ApiError> {
    if let Some(facts) = parts.extensions.get::<request_log::RequestFacts>() {
        facts.set_client(caller.client_id);
    }
    crate::audit::set_actor(caller.client_id);
    let source = limits::Source::Client(caller.client_id);
    limits::enforce(state, source, state.limiter.check(source))?;
    Ok(caller)
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The request's source address as [`resolve_source`] worked it out, for the layers and
/// extractors inside it (the request log, the audit scope, the limiter, `Caller`, `Source`).
fn request_source(parts: &Parts, state: &AppState) -> std::net::IpAddr {
    // Worked out here only for a request that did not pass the layer (never, when served).
    resolved_source(&parts.extensions)
        .unwrap_or_else(|| source_of(peer_of(parts), &parts.headers, state))
}

/// The source address, once per request: `X-Forwarded-For` parsing against the trusted proxies
/// is done here, and every later reader gets the same answer from the request's extensions.
async fn resolve_source(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let source = source_of(peer, request.headers(), &state);
    request.extensions_mut().insert(ResolvedSource(source));
    next.run(request).await
}

/// What [`resolve_source`] leaves in the request's extensions.
#[derive(Debug, Clone, Copy)]
struct ResolvedSource(std::net::IpAddr);

fn resolved_source(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions.get::<ResolvedSource>().map(|r| r.0)
}

fn peer_of(parts: &Parts) -> Option<std::net::IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The request's source address (see [`source_of`]), for handlers that authenticate
/// themselves (the token endpoint).
struct Source(std::net::IpAddr);

impl FromRequestParts<AppState> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(request_source(parts, state)))
    }
}

/// The caller's address: the socket peer, or `X-Forwarded-For` when the peer is a trusted
/// proxy. Without a peer (never, when served) it is the unspecified address, which no strict
/// policy allows.
fn source_of(
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    state: &AppState,
) -> std::net::IpAddr {
    let peer = peer.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    source_ip(peer, forwarded, &state.auth.config().trusted_proxies)
}

// ---------------------------------------------------------------------------------------------
// Wire types

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

/// Encryption context: a string map bound into the blob's AAD; keys are sorted before binding.
/// Its schema (`EncryptionContext`) states the limits `crypto::EncryptionContext` enforces.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct ContextMap(pub BTreeMap<String, String>);

/// One item of a batch request. Items are JSON objects, as the schema says: serde alone would
/// also fill a struct from an array by position, which no client means.
#[derive(Debug)]
pub struct BatchRequestItem<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for BatchRequestItem<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                // The item's own fields are read through the same map access, so an error
                // keeps its path (`items[2].context`).
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Self)
    }
}

/// `POST /v1/datakey` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataKeyBody {
    /// Bound as AAD; the same map must be given to unwrap.
    #[serde(default)]
    pub context: Option<ContextMap>,
    /// Whether to return the plaintext DEK as well (default true).
    #[serde(default)]
    pub plaintext: Option<bool>,
}

/// `POST /v1/datakey` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DataKeyResponse {
    /// `kb:v1:<mk_version>:<base64url(iv||ciphertext||tag)>`.
    #[schema(example = "kb:v1:1:3q2-7wAAAAAAAAAA...")]
    pub wrapped: String,
    /// The 32-byte DEK, standard base64; absent when `plaintext: false` was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    /// The master-key version that sealed the DEK.
    pub mk_version: u32,
}

/// `POST /v1/wrap` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WrapBody {
    /// 16 to 64 bytes of key material, standard base64 with padding.
    #[schema(schema_with = schema::wrappable_base64)]
    pub plaintext: String,
    /// Bound as AAD.
    #[serde(default)]
    pub context: Option<ContextMap>,
}

/// `POST /v1/wrap` and `POST /v1/rewrap` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WrappedResponse {
    /// The blob.
    pub wrapped: String,
    /// The master-key version that sealed it.
    pub mk_version: u32,
}

/// `POST /v1/unwrap` and `POST /v1/rewrap` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobBody {
    /// A blob from `datakey`, `wrap` or `rewrap`: `kb:v1:<mk_version>:<base64url payload>`.
    #[schema(schema_with = schema::blob)]
    pub wrapped: String,
    /// The context the blob was sealed with.
    #[serde(default)]
    pub context: Option<ContextMap>,
}

/// `POST /v1/unwrap` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnwrapResponse {
    /// The key material, standard base64.
    pub plaintext: String,
}

/// `POST /v1/datakey/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataKeyBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<DataKeyBody>)]
    pub items: Vec<BatchRequestItem<DataKeyBody>>,
}

/// `POST /v1/wrap/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WrapBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<WrapBody>)]
    pub items: Vec<BatchRequestItem<WrapBody>>,
}

/// `POST /v1/unwrap/batch` and `POST /v1/rewrap/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<BlobBody>)]
    pub items: Vec<BatchRequestItem<BlobBody>>,
}

/// One result of a batch: the single call's response, or its error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem<T> {
    /// The item succeeded.
    Ok(T),
    /// The item failed; the others are unaffected.
    Err(ErrorBody),
}

/// `POST /v1/datakey/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DataKeyBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<DataKeyResponse>>,
}

/// `POST /v1/wrap/batch` and `POST /v1/rewrap/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WrappedBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<WrappedResponse>>,
}

/// `POST /v1/unwrap/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnwrapBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<UnwrapResponse>>,
}

/// `GET /healthz` and `GET /readyz` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `unavailable` (readyz only).
    pub status: String,
    /// Per part (`token`, `database`): `ok` or the error code (readyz only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}

/// The error answers of every crypto endpoint that are its own, all in the one error shape (the
/// refusals in front of every operation, 401, 413, 415 and 429 among them, are added to the
/// document by `openapi`). Only its OpenAPI description is used.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum CryptoErrorResponses {
    /// `invalid_json`, `invalid_base64`, `invalid_blob` or `unsupported_blob_version`
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `insufficient_scope`, `ip_not_allowed` or `client_disabled`
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `invalid_request` (wrong types, unknown or missing fields), `invalid_key_length`,
    /// `invalid_context`, `empty_batch`, `batch_too_large`, `unknown_mk_version`,
    /// `context_mismatch` (another context, or an altered blob)
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal_error`: a bug; the request id finds it in the server log
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `hsm_unavailable`, `hsm_timeout` (the token did not answer within the deadline),
    /// `database_unavailable` or `no_active_key`
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

// ---------------------------------------------------------------------------------------------
// Parsing at the edge

pub fn parse_context(map: Option<ContextMap>) -> Result<EncryptionContext, ApiError> {
    EncryptionContext::new(map.unwrap_or_default().0).map_err(ApiError::InvalidContext)
}

pub fn parse_datakey(body: DataKeyBody) -> Result<DataKeyRequest, ApiError> {
    Ok(DataKeyRequest {
        context: parse_context(body.context)?,
        with_plaintext: body.plaintext.unwrap_or(true),
    })
}

pub fn parse_wrap(body: WrapBody) -> Result<WrapRequest, ApiError> {
    // Decode into a zeroizing buffer: the caller's key must not linger in freed memory.
    let bytes = Zeroizing::new(
        STANDARD
            .decode(body.plaintext.as_bytes())
            .map_err(|_| ApiError::InvalidBase64("plaintext"))?,
    );
    let key = KeyMaterial::new(bytes).map_err(|_| ApiError::InvalidKeyLength)?;
    // The request's base64 copy of the key is wiped as well.
    let mut text = body.plaintext;
    zeroize::Zeroize::zeroize(&mut text);
    Ok(WrapRequest {
        key,
        context: parse_context(body.context)?,
    })
}

pub fn parse_blob(body: BlobBody) -> Result<BlobRequest, ApiError> {
    Ok(BlobRequest {
        wrapped: WrappedBlob::parse(&body.wrapped).map_err(ApiError::InvalidBlob)?,
        context: parse_context(body.context)?,
    })
}

fn datakey_response(key: crate::broker::DataKey) -> DataKeyResponse {
    DataKeyResponse {
        mk_version: key.wrapped.mk_version().get(),
        wrapped: key.wrapped.to_string(),
        plaintext: key.plaintext.map(|p| STANDARD.encode(p.as_slice())),
    }
}

fn wrapped_response(blob: WrappedBlob) -> WrappedResponse {
    WrappedResponse {
        mk_version: blob.mk_version().get(),
        wrapped: blob.to_string(),
    }
}

fn unwrap_response(plaintext: Zeroizing<Vec<u8>>) -> UnwrapResponse {
    UnwrapResponse {
        plaintext: STANDARD.encode(plaintext.as_slice()),
    }
}

/// Runs a batch: items that fail to parse get their error in place, the rest go to the broker
/// in one call, and the results come back in request order.
async fn run_batch<B, R, O, W, Fut>(
    bodies: Vec<BatchRequestItem<B>>,
    parse: impl Fn(B) -> Result<R, ApiError>,
    call: impl FnOnce(Vec<R>) -> Fut,
    respond: impl Fn(O) -> W,
) -> Result<Vec<BatchItem<W>>, ApiError>
where
    Fut: std::future::Future<Output = Result<Vec<Result<O, BrokerError>>, BrokerError>>,
{
    let parsed: Vec<Result<R, ApiError>> = bodies
        .into_iter()
        .map(|BatchRequestItem(body)| parse(body))
        .collect();
    let mut valid = Vec::new();
    let mut slots = Vec::with_capacity(parsed.len());
    for item in parsed {
        match item {
            Ok(request) => {
                valid.push(request);
                slots.push(None);
            }
            Err(e) => slots.push(Some(e)),
        }
    }
    let mut results = if valid.is_empty() {
        Vec::new().into_iter()
    } else {
        call(valid).await?.into_iter()
    };
    let mut out = Vec::with_capacity(slots.len());
    for slot in slots {
        let item = match slot {
            Some(err) => BatchItem::Err(err.body()),
            None => match results.next() {
                Some(Ok(value)) => BatchItem::Ok(respond(value)),
                Some(Err(err)) => BatchItem::Err(ApiError::from(err).body()),
                None => BatchItem::Err(ApiError::Broker(BrokerError::EmptyBatch).body()),
            },
        };
        out.push(item);
    }
    Ok(out)
}

/// Checks a batch's size before any item is parsed.
fn check_batch_size<T>(state: &AppState, items: &[T]) -> Result<(), ApiError> {
    Ok(state.broker.check_batch(items.len())?)
}

/// Counts a batch's successful items for usage statistics.
fn count_batch<T>(state: &AppState, caller: &Caller, op: Operation, items: &[BatchItem<T>]) {
    let ok = items
        .iter()
        .filter(|i| matches!(i, BatchItem::Ok(_)))
        .count();
    state.broker.count(caller.client_id, op, ok, unix_now());
}

/// A single call is a batch of one: the same path, and its one result or error.
fn single<T>(mut results: Vec<Result<T, BrokerError>>) -> Result<T, ApiError> {
    results
        .pop()
        .unwrap_or(Err(BrokerError::EmptyBatch))
        .map_err(ApiError::from)
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// Generate a data key.
///
/// A 256-bit DEK from the token's RNG, sealed by the token under the active master key
/// (AES-256-GCM, 96-bit random IV, 128-bit tag) with the context bound as AAD.
#[utoipa::path(post, path = "/v1/datakey", tag = "crypto",
    security(("bearer" = [])),
    request_body = DataKeyBody,
    responses(
        (status = 200, description = "The data key", body = DataKeyResponse),
        CryptoErrorResponses,
    ))]
async fn datakey(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DataKeyBody>,
) -> Result<Json<DataKeyResponse>, ApiError> {
    caller.require(Scope::Datakey)?;
    let request = parse_datakey(body)?;
    let key = single(
        state
            .broker
            .datakeys(&caller.aad_id(), vec![request])
            .await?,
    )?;
    state
        .broker
        .count(caller.client_id, Operation::Datakey, 1, unix_now());
    Ok(Json(datakey_response(key)))
}

/// Generate data keys in a batch.
#[utoipa::path(post, path = "/v1/datakey/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = DataKeyBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = DataKeyBatchResponse),
        CryptoErrorResponses,
    ))]
async fn datakey_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DataKeyBatchBody>,
) -> Result<Json<DataKeyBatchResponse>, ApiError> {
    caller.require(Scope::Datakey)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_datakey,
        |reqs| state.broker.datakeys(&owner, reqs),
        datakey_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Datakey, &items);
    Ok(Json(DataKeyBatchResponse { items }))
}

/// Wrap caller key material.
///
/// Seals 16 to 64 bytes under the active master key with the context bound as AAD.
#[utoipa::path(post, path = "/v1/wrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = WrapBody,
    responses(
        (status = 200, description = "The blob", body = WrappedResponse),
        CryptoErrorResponses,
    ))]
async fn wrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<WrapBody>,
) -> Result<Json<WrappedResponse>, ApiError> {
    caller.require(Scope::Wrap)?;
    let request = parse_wrap(body)?;
    let blob = single(state.broker.wrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Wrap, 1, unix_now());
    Ok(Json(wrapped_response(blob)))
}

/// Wrap caller key material in a batch.
#[utoipa::path(post, path = "/v1/wrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = WrapBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = WrappedBatchResponse),
        CryptoErrorResponses,
    ))]
async fn wrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<WrapBatchBody>,
) -> Result<Json<WrappedBatchResponse>, ApiError> {
    caller.require(Scope::Wrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_wrap,
        |reqs| state.broker.wrap(&owner, reqs),
        wrapped_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Wrap, &items);
    Ok(Json(WrappedBatchResponse { items }))
}

/// Unwrap a blob.
///
/// Opens a blob inside the token with the context it was sealed with.
#[utoipa::path(post, path = "/v1/unwrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBody,
    responses(
        (status = 200, description = "The key material", body = UnwrapResponse),
        CryptoErrorResponses,
    ))]
async fn unwrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBody>,
) -> Result<Json<UnwrapResponse>, ApiError> {
    caller.require(Scope::Unwrap)?;
    let request = parse_blob(body)?;
    let plaintext = single(state.broker.unwrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Unwrap, 1, unix_now());
    Ok(Json(unwrap_response(plaintext)))
}

/// Unwrap blobs in a batch.
#[utoipa::path(post, path = "/v1/unwrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = UnwrapBatchResponse),
        CryptoErrorResponses,
    ))]
async fn unwrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBatchBody>,
) -> Result<Json<UnwrapBatchResponse>, ApiError> {
    caller.require(Scope::Unwrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_blob,
        |reqs| state.broker.unwrap(&owner, reqs),
        unwrap_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Unwrap, &items);
    Ok(Json(UnwrapBatchResponse { items }))
}

/// Rewrap a blob under the active master key.
///
/// Decrypts and re-encrypts inside the broker; the plaintext is never returned.
#[utoipa::path(post, path = "/v1/rewrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBody,
    responses(
        (status = 200, description = "The new blob", body = WrappedResponse),
        CryptoErrorResponses,
    ))]
async fn rewrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBody>,
) -> Result<Json<WrappedResponse>, ApiError> {
    caller.require(Scope::Rewrap)?;
    let request = parse_blob(body)?;
    let blob = single(state.broker.rewrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Rewrap, 1, unix_now());
    Ok(Json(wrapped_response(blob)))
}

/// Rewrap blobs in a batch.
#[utoipa::path(post, path = "/v1/rewrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = WrappedBatchResponse),
        CryptoErrorResponses,
    ))]
async fn rewrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBatchBody>,
) -> Result<Json<WrappedBatchResponse>, ApiError> {
    caller.require(Scope::Rewrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_blob,
        |reqs| state.broker.rewrap(&owner, reqs),
        wrapped_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Rewrap, &items);
    Ok(Json(WrappedBatchResponse { items }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".to_owned(),
        checks: BTreeMap::new(),
    })
}

/// Readiness: a token session and Postgres both answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Token or database unavailable; `checks` says which", body = HealthResponse),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.broker.readiness().await;
    let mut checks = BTreeMap::new();
    let mut ready = true;
    for (part, result) in [("token", readiness.token), ("database", readiness.database)] {
        let verdict = match result {
            Ok(()) => "ok".to_owned(),
            Err(err) => {
                ready = false;
                let err = ApiError::from(err);
                tracing::warn!(target: "keybroker::api", part, error = %err, "not ready");
                err.status_and_code().1.to_owned()
            }
        };
        checks.insert(part.to_owned(), verdict);
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = HealthResponse {
        status: word.to_owned(),
        checks,
    };
    (status, Json(body)).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(openapi::document(openapi::DocumentLimits {
        max_batch: state.broker.max_batch(),
    }))
}

/// The OpenAPI document of every endpoint, request, response and error shape.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keybroker",
        description = "HSM-backed key broker: data keys generated, wrapped and unwrapped inside a PKCS#11 token. Every error is `{\"error\": {\"code\", \"message\", \"request_id\"}}`."
    ),
    paths(
        datakey, datakey_batch, wrap, wrap_batch, unwrap, unwrap_batch, rewrap, rewrap_batch,
        random::random, random::random_batch,
        oauth::oauth_token, oauth::oauth_introspect, oauth::oauth_revoke, oauth::jwks,
        admin::register_client, admin::list_clients, admin::get_client, admin::update_client,
        admin::disable_client, admin::enable_client, admin::delete_client,
        admin::audit_events, admin::audit_verify, admin::lockdown_client, admin::unblock_client,
        admin::get_security_settings, admin::put_security_settings,
        keys::create_key, keys::list_keys, keys::get_key, keys::read_key, keys::rotate_key,
        keys::refresh_key, keys::disable_key, keys::enable_key, keys::delete_key,
        keys::cancel_key_deletion, keys::put_secret, keys::get_secret, keys::delete_secret,
        keys::cancel_secret_deletion, keys::own_usage, keys::admin_usage, keys::keys_due,
        custody::list_master_keys, custody::rotate_master_key, custody::start_rewrap,
        custody::get_rewrap, custody::retire_master_key, custody::rotate_signing_key,
        metrics::metrics, healthz, readyz, openapi
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "crypto", description = "Stateless data-key operations"),
        (name = "oauth", description = "Client credentials, introspection, revocation, JWKS"),
        (name = "admin", description = "Client registration and lockdown (scope `admin`)"),
        (name = "keys", description = "Managed keys kept sealed in Postgres, and usage"),
        (name = "secrets", description = "Secrets under envelope encryption"),
        (name = "custody", description = "Master-key and token-signing key rotation, rewrap, retirement (scope `admin`)"),
        (name = "operations", description = "Health, readiness, this document"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the protected paths refer to.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An ES256 access token from POST /v1/oauth/token"))
                    .build(),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_resolved_source_is_read_back_not_worked_out_again() {
        let mut extensions = axum::http::Extensions::new();
        assert_eq!(resolved_source(&extensions), None);
        // The peer says one thing, the resolved source another: readers take the resolved one.
        extensions.insert(ConnectInfo(std::net::SocketAddr::from((
            [10, 0, 0, 1],
            443,
        ))));
        extensions.insert(ResolvedSource(std::net::IpAddr::from([192, 0, 2, 7])));
        assert_eq!(
            resolved_source(&extensions),
            Some(std::net::IpAddr::from([192, 0, 2, 7]))
        );
    }
}
