//! Usage statistics and the keys-due report over HTTP, with their wire types.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::keys::{KeyBody, query};
use super::{ApiError, AppState, ErrorBody};
use crate::auth::{Caller, Scope, unix_now};
use crate::broker::UsageRow;

/// Operation counts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageBody {
    /// One row per client, key (nil UUID for stateless calls), operation and day.
    pub items: Vec<UsageItem>,
}

/// Operations of one kind on one day.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageItem {
    /// Client.
    pub client_id: Uuid,
    /// Managed key or secret id; nil for stateless calls.
    pub key_id: Uuid,
    /// `datakey`, `wrap`, `unwrap`, `rewrap`, `random`, `key.create`, `key.read`, `key.rotate`,
    /// `secret.write`, `secret.read`.
    pub operation: String,
    /// The day, unix seconds at 00:00 UTC.
    pub day: i64,
    /// How many.
    pub count: i64,
}

fn usage_body(rows: Vec<UsageRow>) -> UsageBody {
    UsageBody {
        items: rows
            .into_iter()
            .map(|r| UsageItem {
                client_id: r.client_id,
                key_id: r.key_id,
                operation: r.operation,
                day: r.day,
                count: r.count,
            })
            .collect(),
    }
}

/// `GET /v1/usage` query: the caller's own counts.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OwnUsageQuery {
    /// Days back, 1 to 366 (30).
    #[param(nullable = false, minimum = 1, maximum = 366)]
    pub days: Option<u32>,
    /// One key or secret id (nil UUID: stateless calls).
    #[param(nullable = false)]
    pub key_id: Option<Uuid>,
}

/// `GET /v1/admin/usage` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Days back, 1 to 366 (30).
    #[param(nullable = false, minimum = 1, maximum = 366)]
    pub days: Option<u32>,
    /// One key or secret id (nil UUID: stateless calls).
    #[param(nullable = false)]
    pub key_id: Option<Uuid>,
    /// One client.
    #[param(nullable = false)]
    pub client_id: Option<Uuid>,
}

/// Report query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DueQuery {
    /// Horizon in days, 0 to 366 (30).
    #[param(nullable = false, minimum = 0, maximum = 366)]
    pub within_days: Option<u32>,
}

/// A key due for rotation or expiry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DueKeyBody {
    /// Owning client.
    pub client_id: Uuid,
    /// The key.
    pub key: KeyBody,
}

/// `GET /v1/admin/keys/due` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DueKeysBody {
    /// Keys due, soonest first.
    pub items: Vec<DueKeyBody>,
}

// ---------------------------------------------------------------------------------------------
// Usage and reports

fn usage_days(days: Option<u32>) -> Result<u32, ApiError> {
    let days = days.unwrap_or(30);
    if (1..=366).contains(&days) {
        Ok(days)
    } else {
        Err(ApiError::InvalidQuery("days must be 1 to 366".to_owned()))
    }
}

/// Your own operation counts per key and day.
#[utoipa::path(get, path = "/v1/usage", tag = "keys", params(OwnUsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Counts", body = UsageBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn own_usage(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<OwnUsageQuery>, QueryRejection>,
) -> Result<Json<UsageBody>, ApiError> {
    let q = query(q)?;
    let rows = state
        .broker
        .usage(
            Some(caller.client_id),
            q.key_id,
            usage_days(q.days)?,
            unix_now(),
        )
        .await?;
    Ok(Json(usage_body(rows)))
}

/// Operation counts of any client and key (admin).
#[utoipa::path(get, path = "/v1/admin/usage", tag = "admin", params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Counts", body = UsageBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn admin_usage(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let q = query(q)?;
    let rows = state
        .broker
        .usage(q.client_id, q.key_id, usage_days(q.days)?, unix_now())
        .await?;
    Ok(Json(usage_body(rows)))
}

/// Keys of every client due for rotation or expiry within N days (admin).
#[utoipa::path(get, path = "/v1/admin/keys/due", tag = "admin", params(DueQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Keys due", body = DueKeysBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn keys_due(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<DueQuery>, QueryRejection>,
) -> Result<Json<DueKeysBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let q = query(q)?;
    let days = q.within_days.unwrap_or(30);
    if days > 366 {
        return Err(ApiError::InvalidQuery(
            "within_days must be 0 to 366".to_owned(),
        ));
    }
    let due = state.broker.keys_due(days, unix_now()).await?;
    Ok(Json(DueKeysBody {
        items: due
            .into_iter()
            .map(|(client_id, key)| DueKeyBody {
                client_id,
                key: key.into(),
            })
            .collect(),
    }))
}
