//! The router: every route and the layers around them (request ids, the source address, the
//! audit scope, the request log, the body limit, the response headers every answer carries).
//! It must not hold a handler's logic: each route names a handler in its resource's file.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use super::extract::{request_source, resolve_source};
use super::{
    ApiError, AppState, ErrorBody, admin, audit, console, crypto, custody, keys, limits, metrics,
    oauth, operations, random, request_log, secrets, security, usage,
};

pub(super) const REQUEST_ID: &str = "x-request-id";

/// The whole HTTP API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let request_id = axum::http::HeaderName::from_static(REQUEST_ID);
    Router::new()
        .route("/v1/datakey", post(crypto::datakey))
        .route("/v1/datakey/batch", post(crypto::datakey_batch))
        .route("/v1/wrap", post(crypto::wrap))
        .route("/v1/wrap/batch", post(crypto::wrap_batch))
        .route("/v1/unwrap", post(crypto::unwrap))
        .route("/v1/unwrap/batch", post(crypto::unwrap_batch))
        .route("/v1/rewrap", post(crypto::rewrap))
        .route("/v1/rewrap/batch", post(crypto::rewrap_batch))
        .route("/v1/random", post(random::random))
        .route("/v1/random/batch", post(random::random_batch))
        .route("/v1/oauth/token", post(oauth::oauth_token))
        .route("/v1/oauth/introspect", post(oauth::oauth_introspect))
        .route("/v1/oauth/revoke", post(oauth::oauth_revoke))
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route(
            "/v1/admin/clients",
            post(admin::register_client).get(admin::list_clients),
        )
        .route(
            "/v1/admin/clients/{id}",
            get(admin::get_client)
                .patch(admin::update_client)
                .delete(admin::delete_client),
        )
        .route(
            "/v1/admin/clients/{id}/disable",
            post(admin::disable_client),
        )
        .route("/v1/admin/clients/{id}/enable", post(admin::enable_client))
        .route(
            "/v1/admin/clients/{id}/lockdown",
            post(security::lockdown_client),
        )
        .route(
            "/v1/admin/clients/{id}/unblock",
            post(security::unblock_client),
        )
        .route(
            "/v1/admin/security-settings",
            get(security::get_security_settings).put(security::put_security_settings),
        )
        .route("/v1/admin/audit", get(audit::audit_events))
        .route("/v1/admin/audit/verify", get(audit::audit_verify))
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
            axum::routing::put(secrets::put_secret)
                .get(secrets::get_secret)
                .delete(secrets::delete_secret),
        )
        .route(
            "/v1/secrets/{name}/cancel-deletion",
            post(secrets::cancel_secret_deletion),
        )
        .route("/v1/usage", get(usage::own_usage))
        .route("/v1/admin/usage", get(usage::admin_usage))
        .route("/v1/admin/keys/due", get(usage::keys_due))
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
        .route("/healthz", get(operations::healthz))
        .route("/readyz", get(operations::readyz))
        .route("/openapi.json", get(operations::openapi))
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
