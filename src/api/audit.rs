//! The audit trail over HTTP (scope `admin`): events a page at a time, with filters, and the
//! verification of its MAC chain. The trail itself is `audit`'s; reading it is `broker`'s.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::admin::AdminErrorResponses;
use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, Scope};

/// `GET /v1/admin/audit` query. Times are unix seconds.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// From (inclusive).
    #[param(nullable = false)]
    pub from: Option<i64>,
    /// Until (exclusive).
    #[param(nullable = false)]
    pub to: Option<i64>,
    /// Events concerning this client.
    #[param(nullable = false)]
    pub client_id: Option<Uuid>,
    /// Events concerning this key or secret.
    #[param(nullable = false)]
    pub key_id: Option<Uuid>,
    /// One event name, e.g. `key.rotated`.
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub event: Option<String>,
    /// `info`, `warning`, `error` or `critical`.
    #[param(nullable = false, value_type = Option<AuditSeverity>, inline)]
    pub severity: Option<String>,
    /// The `next_after_seq` of the previous page.
    #[param(nullable = false)]
    pub after_seq: Option<i64>,
    /// Page size 1-1000 (100).
    #[param(nullable = false, minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The severities of audit events. Only the schema uses it; the query keeps the text.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum AuditSeverity {
    /// Routine.
    Info,
    /// Worth a look.
    Warning,
    /// Something failed.
    Error,
    /// Needs action now.
    Critical,
}

/// One audit event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEventBody {
    /// Position in the chain.
    pub seq: i64,
    /// Microseconds since the epoch.
    pub at_us: i64,
    /// `info`, `warning`, `error` or `critical`.
    pub severity: String,
    /// Event name.
    pub event: String,
    /// Client id, `officer`, `scheduler` or `anonymous`.
    pub actor: String,
    /// What it was done to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The client concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Uuid>,
    /// The key or secret concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    /// Where from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    /// The HTTP request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Structured details (ids, versions, states, context hashes).
    pub details: serde_json::Value,
}

/// `GET /v1/admin/audit` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPageBody {
    /// Events, oldest first.
    pub items: Vec<AuditEventBody>,
    /// Pass as `after_seq` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<i64>,
}

/// `GET /v1/admin/audit/verify` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditVerificationBody {
    /// Whether the whole chain verified.
    pub intact: bool,
    /// Rows checked.
    pub rows: u64,
    /// The first broken position, when not intact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken_seq: Option<i64>,
    /// What is wrong there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Query the audit trail.
#[utoipa::path(get, path = "/v1/admin/audit", tag = "admin", params(AuditQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of events", body = AuditPageBody),
        (status = 422, description = "`invalid_request`: bad query", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn audit_events(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPageBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let Query(q) =
        query.map_err(|e| ApiError::InvalidQuery(super::mismatch_message(&e, "query string")))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1 to 1000".to_owned()));
    }
    if q.severity
        .as_deref()
        .is_some_and(|s| !["info", "warning", "error", "critical"].contains(&s))
    {
        return Err(ApiError::InvalidQuery(
            "severity must be info, warning, error or critical".to_owned(),
        ));
    }
    let filter = crate::broker::AuditFilter {
        from_us: q.from.map(|s| s.saturating_mul(1_000_000)),
        to_us: q.to.map(|s| s.saturating_mul(1_000_000)),
        client_id: q.client_id,
        key_id: q.key_id,
        event: q.event,
        severity: q.severity,
        after_seq: q.after_seq,
    };
    let rows = state
        .broker
        .audit_events(&filter, i64::from(limit) + 1)
        .await?;
    let more = rows.len() > limit as usize;
    let items: Vec<AuditEventBody> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| AuditEventBody {
            seq: r.seq,
            at_us: r.at_us,
            severity: r.severity,
            event: r.event,
            actor: r.actor,
            subject: r.subject,
            client_id: r.client_id,
            key_id: r.key_id,
            source_ip: r.source_ip,
            request_id: r.request_id,
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    let next_after_seq = more.then(|| items.last().map(|e| e.seq)).flatten();
    Ok(Json(AuditPageBody {
        items,
        next_after_seq,
    }))
}

/// Verify the audit trail's MAC chain and report the first broken link.
#[utoipa::path(get, path = "/v1/admin/audit/verify", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "The verdict", body = AuditVerificationBody),
        AdminErrorResponses,
    ))]
pub(super) async fn audit_verify(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AuditVerificationBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let verdict = state.broker.verify_audit().await?;
    Ok(Json(AuditVerificationBody {
        intact: verdict.first_broken.is_none(),
        rows: verdict.rows,
        first_broken_seq: verdict.first_broken.map(|(seq, _)| seq),
        reason: verdict.first_broken.map(|(_, why)| why.to_owned()),
    }))
}
