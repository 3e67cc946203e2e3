//! Extractors: JSON bodies and path segments whose rejections are [`ApiError`]s, the
//! authenticated [`Caller`], and the request's source address (worked out once per request).
//! They parse and check; they decide nothing a handler or the broker decides.

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use crate::auth::{Caller, source_ip};

use super::{ApiError, AppState, limits, request_log};

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
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::InvalidJson
                }
            })?;
        super::json_body::parse(&bytes).map(Self)
    }
}

/// Whether the request says its body is JSON: `application/json` or `application/*+json`, with
/// any parameters (the rule axum's `Json` applies).
fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<mime::Mime>().ok())
        .is_some_and(|mime| {
            mime.type_() == "application"
                && (mime.subtype() == "json" || mime.suffix().is_some_and(|name| name == "json"))
        })
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

pub(super) fn describe_mismatch(path: &str, inner: &str, what: &str) -> String {
    // serde words these cases with fixed prefixes (serde::de::Error's provided methods); we
    // take only the field name from them.
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
    if let Some(name) = inner.strip_prefix("duplicate field ").and_then(named) {
        return format!("the {what} has the field `{name}` more than once{at}");
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
/// (see [`crate::auth::Authenticator::authenticate`]).
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
pub(super) fn admit(parts: &Parts, state: &AppState, caller: Caller) -> Result<Caller, ApiError> {
    if let Some(facts) = parts.extensions.get::<request_log::RequestFacts>() {
        facts.set_client(caller.client_id);
    }
    crate::audit::set_actor(caller.client_id);
    let source = limits::Source::Client(caller.client_id);
    limits::enforce(state, source, state.limiter.check(source))?;
    Ok(caller)
}

pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The request's source address as [`resolve_source`] worked it out, for the layers and
/// extractors inside it (the request log, the audit scope, the limiter, `Caller`, `Source`).
pub(super) fn request_source(parts: &Parts, state: &AppState) -> std::net::IpAddr {
    // Worked out here only for a request that did not pass the layer (never, when served).
    resolved_source(&parts.extensions)
        .unwrap_or_else(|| source_of(peer_of(parts), &parts.headers, state))
}

/// The source address, once per request: `X-Forwarded-For` parsing against the trusted proxies
/// is done here, and every later reader gets the same answer from the request's extensions.
pub(super) async fn resolve_source(
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
pub(super) struct Source(pub(super) std::net::IpAddr);

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
