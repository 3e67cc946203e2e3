//! Managed keys over HTTP: create, list, read, rotate, refresh, disable, enable, delete and
//! cancel a deletion, with their wire types. Handlers parse and check the scope; `broker` does
//! the work.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use uuid::Uuid;

use super::SecretText;
use super::{ApiError, ApiJson, ApiPath, AppState, ContextMap, ErrorBody, parse_context};
use crate::auth::{Caller, Scope, unix_now};
use crate::broker::{BrokerError, KeySpec, KeyState, Rotation};
use crate::crypto::formats::{KeyFormat, present};

mod bodies;

pub use bodies::*;

pub(super) const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------------
// Parsing

fn key_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| BrokerError::KeyNotFound.into())
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::InvalidQuery(super::mismatch_message(&e, "query string")))
}

/// Expiry from `expires_at` or `ttl_days` (not both).
pub fn expiry(
    expires_at: Option<i64>,
    ttl_days: Option<u32>,
    now: i64,
) -> Result<Option<i64>, ApiError> {
    match (expires_at, ttl_days) {
        (Some(_), Some(_)) => {
            Err(BrokerError::InvalidSpec("give expires_at or ttl_days, not both".into()).into())
        }
        (Some(at), None) => Ok(Some(at)),
        (None, Some(days)) if (1..=36_500).contains(&days) => Ok(Some(now + i64::from(days) * DAY)),
        (None, Some(_)) => {
            Err(BrokerError::InvalidSpec("ttl_days must be 1 to 36500".into()).into())
        }
        (None, None) => Ok(None),
    }
}

pub fn key_spec(body: CreateKeyBody, now: i64) -> Result<KeySpec, ApiError> {
    let invalid = |m: String| ApiError::from(BrokerError::InvalidSpec(m));
    let format = KeyFormat::parse(&body.format).ok_or_else(|| {
        invalid("format must be raw, hex, uuid, alphanumeric or numeric".to_owned())
    })?;
    let length = format
        .resolve_length(body.length)
        .map_err(|e| invalid(e.to_string()))?;
    let rotation = match (
        body.rotation.as_deref().unwrap_or("manual"),
        body.rotation_period_days,
    ) {
        ("manual", None) => Rotation::Manual,
        ("manual", Some(_)) => {
            return Err(invalid(
                "rotation_period_days needs rotation auto".to_owned(),
            ));
        }
        ("auto", None) => return Err(BrokerError::RotationPeriodRequired.into()),
        ("auto", Some(days)) if (1..=3650).contains(&days) => Rotation::Auto { period_days: days },
        ("auto", Some(_)) => {
            return Err(invalid("rotation_period_days must be 1 to 3650".to_owned()));
        }
        _ => return Err(invalid("rotation must be manual or auto".to_owned())),
    };
    Ok(KeySpec {
        name: body.name,
        format,
        length,
        expires_at: expiry(body.expires_at, body.ttl_days, now)?,
        rotation,
        context: parse_context(body.context)?,
    })
}

/// `?context.<key>=<value>` pairs of a query string, as an encryption context.
/// The entry name in a `context[<name>]` query parameter (OpenAPI's `deepObject` style).
pub(super) fn context_entry_name(parameter: &str) -> Option<&str> {
    parameter.strip_prefix("context[")?.strip_suffix(']')
}

pub(super) fn query_context(
    params: &HashMap<String, String>,
) -> Result<crate::crypto::EncryptionContext, ApiError> {
    let map: BTreeMap<String, String> = params
        .iter()
        .filter_map(|(k, v)| context_entry_name(k).map(|k| (k.to_owned(), v.clone())))
        .collect();
    parse_context(Some(ContextMap(map)))
}

// ---------------------------------------------------------------------------------------------
// Managed keys

/// Create a managed key.
///
/// Material comes from the token's RNG (no modulo bias in any alphabet) and is stored only
/// sealed by the token; the plaintext is in this response only if `return_plaintext`.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = CreatedKeyBody),
        (status = 409, description = "`key_name_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_request`, `rotation_period_required`, `invalid_context`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateKeyBody>,
) -> Result<(StatusCode, Json<CreatedKeyBody>), ApiError> {
    caller.require(Scope::KeysCreate)?;
    let now = unix_now();
    let return_plaintext = body.return_plaintext.unwrap_or(false);
    let spec = key_spec(body, now)?;
    let (key, plaintext) = state
        .broker
        .create_key(caller.client_id, spec, return_plaintext, now)
        .await?;
    let plaintext = plaintext.map(|p| present(key.format, &p).to_string());
    Ok((
        StatusCode::CREATED,
        Json(CreatedKeyBody {
            key: key.into(),
            plaintext: plaintext.map(SecretText::from),
        }),
    ))
}

/// List your managed keys.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(KeyListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of keys", body = KeyListBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<KeyListQuery>, QueryRejection>,
) -> Result<Json<KeyListBody>, ApiError> {
    caller.require(Scope::KeysRead)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1 to 500".to_owned()));
    }
    let filter = match q.state.as_deref() {
        Some(s) => Some(
            KeyState::parse(s).ok_or_else(|| ApiError::InvalidQuery("unknown state".to_owned()))?,
        ),
        None => None,
    };
    let page = state
        .broker
        .keys(
            caller.client_id,
            filter,
            q.name.as_deref(),
            q.after,
            limit + 1,
            unix_now(),
        )
        .await?;
    let more = page.len() > limit as usize;
    let items: Vec<KeyBody> = page
        .into_iter()
        .take(limit as usize)
        .map(Into::into)
        .collect();
    let next_after = more.then(|| items.last().map(|k| k.id)).flatten();
    Ok(Json(KeyListBody { items, next_after }))
}

/// A key's metadata, versions and rotation history (never its material).
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The key", body = KeyDetailsBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyDetailsBody>, ApiError> {
    caller.require(Scope::KeysRead)?;
    let details = state
        .broker
        .key(caller.client_id, key_id(&id)?, unix_now())
        .await?;
    Ok(Json(details.into()))
}

/// Read a key's material (current or given version), opened by the token with the key's context.
#[utoipa::path(post, path = "/v1/keys/{id}/plaintext", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), request_body = ReadKeyBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The material", body = KeyPlaintextBody),
        (status = 404, description = "`key_not_found`, `key_version_not_found`", body = ErrorBody),
        (status = 409, description = "`key_disabled`, `key_expired`, `key_pending_deletion`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        (status = 422, description = "`context_mismatch`, `invalid_context`, `invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn read_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ReadKeyBody>,
) -> Result<Json<KeyPlaintextBody>, ApiError> {
    caller.require(Scope::KeysRead)?;
    let context = parse_context(body.context)?;
    let (key, version, material) = state
        .broker
        .key_plaintext(
            caller.client_id,
            key_id(&id)?,
            body.version,
            context,
            unix_now(),
        )
        .await?;
    Ok(Json(KeyPlaintextBody {
        id: key.id,
        version,
        format: key.format.as_str().to_owned(),
        plaintext: SecretText::from(present(key.format, &material).to_string()),
    }))
}

/// Rotate: new material as a new current version; old versions stay readable.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The rotated key", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_disabled`, `key_expired`, `key_pending_deletion`, `concurrent_update`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn rotate_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysRotate)?;
    let key = state
        .broker
        .rotate_key(caller.client_id, key_id(&id)?, false, unix_now())
        .await?;
    Ok(Json(key.into()))
}

/// Move a key's expiry (an expired key becomes active again).
#[utoipa::path(post, path = "/v1/keys/{id}/refresh", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), request_body = RefreshKeyBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The refreshed key", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_pending_deletion`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn refresh_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RefreshKeyBody>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysManage)?;
    let now = unix_now();
    let expires_at = refreshed_expiry(&body, now)?;
    let key = state
        .broker
        .refresh_key(caller.client_id, key_id(&id)?, expires_at, now)
        .await?;
    Ok(Json(key.into()))
}

/// The new expiry a refresh asks for: a time, or `None` for `never_expires`.
///
/// # Errors
/// `invalid_request` unless exactly one of the three is given.
pub fn refreshed_expiry(body: &RefreshKeyBody, now: i64) -> Result<Option<i64>, ApiError> {
    match (
        body.never_expires,
        expiry(body.expires_at, body.ttl_days, now)?,
    ) {
        (Some(true), None) => Ok(None),
        (Some(true), Some(_)) => Err(BrokerError::InvalidSpec(
            "never_expires excludes expires_at and ttl_days".into(),
        )
        .into()),
        (_, Some(at)) => Ok(Some(at)),
        (_, None) => Err(BrokerError::InvalidSpec(
            "give expires_at, ttl_days or never_expires".into(),
        )
        .into()),
    }
}

/// Disable a key: every use is refused until it is enabled.
#[utoipa::path(post, path = "/v1/keys/{id}/disable", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The disabled key", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_disabled`, `key_expired`, `key_pending_deletion`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn disable_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysManage)?;
    let key = state
        .broker
        .disable_key(caller.client_id, key_id(&id)?, unix_now())
        .await?;
    Ok(Json(key.into()))
}

/// Enable a disabled key.
#[utoipa::path(post, path = "/v1/keys/{id}/enable", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The enabled key", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_active`, `key_expired`, `key_pending_deletion`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn enable_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysManage)?;
    let key = state
        .broker
        .enable_key(caller.client_id, key_id(&id)?, unix_now())
        .await?;
    Ok(Json(key.into()))
}

/// Schedule a key's destruction after a pending window (1-30 days, default 7); cancellable.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id"), DeletionQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "The key, pending deletion", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_pending_deletion`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        (status = 422, description = "`invalid_request`: window outside 1-30 days", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<DeletionQuery>, QueryRejection>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysManage)?;
    let q = query(q)?;
    let key = state
        .broker
        .schedule_key_deletion(
            caller.client_id,
            key_id(&id)?,
            q.pending_window_days,
            unix_now(),
        )
        .await?;
    Ok(Json(key.into()))
}

/// Cancel a scheduled destruction; the key comes back disabled.
#[utoipa::path(post, path = "/v1/keys/{id}/cancel-deletion", tag = "keys",
    params(("id" = Uuid, Path, description = "Key id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The key, disabled", body = KeyBody),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 409, description = "`key_active`, `key_disabled`, `key_expired`", body = ErrorBody),
        (status = 410, description = "`key_destroyed`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn cancel_key_deletion(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyBody>, ApiError> {
    caller.require(Scope::KeysManage)?;
    let key = state
        .broker
        .cancel_key_deletion(caller.client_id, key_id(&id)?, unix_now())
        .await?;
    Ok(Json(key.into()))
}
