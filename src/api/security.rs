//! Security over HTTP (scope `admin`): locking a client down (with or without blocking its
//! addresses), lifting the blocks, and the security settings. The policy is `broker::security`.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::{AdminErrorResponses, ClientBody, client_id};
use super::{ApiError, ApiJson, ApiPath, AppState, ErrorBody, schema};
use crate::auth::AdminGuard;
use crate::auth::{BlockRequest, Caller, DEFAULT_BLOCK_SECS, Scope};
use crate::broker::SecuritySettings;

/// `POST /v1/admin/clients/{id}/lockdown` request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LockdownBody {
    /// Why, for the audit trail.
    #[schema(pattern = "^[^\\u0000]*$")]
    pub reason: Option<String>,
    /// Also block addresses (a separate choice: by default a lockdown blocks none). Only the
    /// client's own registered networks, or parts of them, for a limited time.
    pub block: Option<BlockBody>,
}

/// Which addresses a lockdown blocks, and for how long.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockBody {
    /// Networks to block, each within one of the client's registered networks and no wider
    /// than the `block_min_prefix_v4`/`_v6` security settings; default: all of the client's.
    #[schema(schema_with = lockdown_networks)]
    pub cidrs: Option<Vec<String>>,
    /// For how long, 1 to 604800 seconds; default 3600.
    #[schema(minimum = 1, maximum = 604800)]
    pub secs: Option<u64>,
}

/// `POST /v1/admin/clients/{id}/lockdown` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LockdownResultBody {
    /// The client, now disabled.
    pub client: ClientBody,
    /// The addresses now blocked (empty unless a block was asked for).
    pub blocked: Vec<String>,
    /// When the block ends by itself (unix seconds), if addresses were blocked.
    pub blocked_until: Option<i64>,
}

/// Lock a client down at once: disabled (every live token refused from its next request) and a
/// critical audit event. Blocking its addresses is a separate choice (`block`), limited to its
/// own registered networks and in time. `/healthz` and `/readyz` are never blocked. The last
/// active admin cannot be locked down (409 `last_admin`).
#[utoipa::path(post, path = "/v1/admin/clients/{id}/lockdown", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), request_body = LockdownBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Locked down", body = LockdownResultBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        (status = 409, description = "`last_admin`: the last active client with the admin scope", body = ErrorBody),
        (status = 422, description = "`block_not_allowed`: a block wider than the client's own networks or the configured prefix, for a client without registered addresses, or of a bad duration", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn lockdown_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<LockdownBody>,
) -> Result<Json<LockdownResultBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = client_id(&id)?;
    let reason = body.reason.unwrap_or_else(|| "lockdown".to_owned());
    let settings = state.limiter.settings();
    let block = body.block.as_ref().map(|b| BlockRequest {
        cidrs: b.cidrs.as_deref(),
        secs: b.secs.unwrap_or(DEFAULT_BLOCK_SECS),
        min_prefix_v4: settings.block_min_prefix_v4,
        min_prefix_v6: settings.block_min_prefix_v6,
    });
    let (client, block) = state
        .auth
        .lock_down(id, &reason, block, AdminGuard::KeepOne)
        .await?;
    if block.is_some() {
        // This broker blocks at once; the others within their next refresh.
        if let Err(e) = state.limiter.refresh(&state.broker).await {
            tracing::warn!(target: "keybroker::security", error = %e, "limiter not refreshed after lockdown");
        }
    }
    Ok(Json(LockdownResultBody {
        client: client.into(),
        blocked_until: block.as_ref().map(|b| b.until),
        blocked: block.map(|b| b.cidrs).unwrap_or_default(),
    }))
}

/// Lift the address blocks of a client's lockdown (the client stays disabled until enabled).
#[utoipa::path(post, path = "/v1/admin/clients/{id}/unblock", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "Blocks lifted", body = ClientBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn unblock_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ClientBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = client_id(&id)?;
    let client = state.auth.client(id).await?;
    state.broker.unblock_client_sources(id).await?;
    if let Err(e) = state.limiter.refresh(&state.broker).await {
        tracing::warn!(target: "keybroker::security", error = %e, "limiter not refreshed after unblock");
    }
    Ok(Json(client.into()))
}

/// The rate limits and automatic-response settings in force.
#[utoipa::path(get, path = "/v1/admin/security-settings", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "The settings", body = SecuritySettings),
        AdminErrorResponses,
    ))]
pub(super) async fn get_security_settings(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SecuritySettings>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.broker.security_settings().await?))
}

/// Replace the rate limits and automatic-response settings; every broker applies them within
/// a few seconds (this one at once).
#[utoipa::path(put, path = "/v1/admin/security-settings", tag = "admin",
    request_body = SecuritySettings, security(("bearer" = [])),
    responses(
        (status = 200, description = "The new settings", body = SecuritySettings),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn put_security_settings(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(settings): ApiJson<SecuritySettings>,
) -> Result<Json<SecuritySettings>, ApiError> {
    caller.require(Scope::Admin)?;
    state.broker.set_security_settings(&settings).await?;
    if let Err(e) = state.limiter.refresh(&state.broker).await {
        tracing::warn!(target: "keybroker::security", error = %e, "limiter not refreshed");
    }
    Ok(Json(settings))
}

fn lockdown_networks() -> utoipa::openapi::schema::Array {
    schema::network_list(
        true,
        "Networks to block, each within one of the client's registered networks and no wider \
         than the `block_min_prefix_v4`/`_v6` security settings; default: all of the client's.",
    )
}
