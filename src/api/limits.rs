//! The rate-limit layers: `limit_by_source` refuses blocked source addresses and applies the
//! per-address limit before anything else, and `enforce` turns a limiter's verdict into the
//! 429 (or 403 for an officer's block) and its coalesced audit event. The limiter itself, with
//! its policy and state, is `super::limiter`; its types are re-exported here.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, request_source};
use crate::broker::NewAuditEvent;

pub use super::limiter::{Clock, Limiter, Source, Verdict, system_clock};

/// Applies a verdict: nothing when allowed; otherwise the 429 and, once a minute per source
/// (or on a new block), an audit event written off the request path.
pub(super) fn enforce(state: &AppState, source: Source, verdict: Verdict) -> Result<(), ApiError> {
    let (event, error) = match verdict {
        Verdict::Allowed => return Ok(()),
        Verdict::Limited { retry_after, audit } => (
            audit.then_some("rate_limit_exceeded"),
            ApiError::RateLimited { retry_after },
        ),
        Verdict::Blocked { retry_after, newly } => (
            newly.then_some("source_blocked"),
            ApiError::SourceBlocked {
                retry_after: Some(retry_after),
            },
        ),
    };
    if let Some(name) = event {
        let mut event = NewAuditEvent::info(name).severity("warning");
        event = match source {
            Source::Ip(ip) => event.subject(ip.to_string()),
            Source::Client(id) => event.client(id).subject(id.to_string()),
        };
        state.broker.record_security_event(event);
    }
    Err(error)
}

/// Refuses blocked source addresses and applies the per-address limit, before anything else.
pub(super) async fn limit_by_source(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    // Health checks are neither blocked nor limited: a load balancer probing must not be refused
    // (it would take the node out of service for everyone behind the same address).
    if matches!(parts.uri.path(), "/healthz" | "/readyz") {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ip = request_source(&parts, &state);
    if state.limiter.is_blocked_source(ip) {
        return ApiError::SourceBlocked { retry_after: None }.into_response();
    }
    if let Err(e) = enforce(&state, Source::Ip(ip), state.limiter.check(Source::Ip(ip))) {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}
