//! Secrets over HTTP: put, get, delete and cancel a deletion, with their wire types. Handlers
//! parse and check the scope; `broker` does the envelope encryption.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use super::SecretText;
use super::keys::{DeletionQuery, context_entry_name, query, query_context};
use super::{ApiError, ApiJson, ApiPath, AppState, ContextMap, ErrorBody, parse_context};
use crate::auth::{Caller, Scope, unix_now};
use crate::broker::{SecretName, StoredSecret};

/// `PUT /v1/secrets/{name}` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecretBody {
    /// The value, standard base64 (at most 64 KiB decoded).
    #[schema(schema_with = super::schema::secret_value)]
    pub value: SecretText,
    /// Bound into both layers' AAD: reads must give the same map.
    pub context: Option<ContextMap>,
}

/// A secret's metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretBody {
    /// Name.
    pub name: String,
    /// `active` or `pending_deletion`.
    pub state: String,
    /// Latest version.
    pub current_version: u32,
    /// Scheduled destruction (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_due: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

impl From<StoredSecret> for SecretBody {
    fn from(s: StoredSecret) -> Self {
        Self {
            name: s.name,
            state: s.state.as_str().to_owned(),
            current_version: s.current_version,
            deletion_due: s.deletion_due,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// `GET /v1/secrets/{name}` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretValueBody {
    /// Name.
    pub name: String,
    /// The version read.
    pub version: u32,
    /// The value, standard base64.
    #[schema(value_type = String)]
    pub value: SecretText,
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// Store a new version of a secret (envelope encryption; at most 64 KiB).
#[utoipa::path(put, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name: 1 to 200 letters, digits or `._-/`")), request_body = PutSecretBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Stored; `current_version` is the new version", body = SecretBody),
        (status = 400, description = "`invalid_base64`", body = ErrorBody),
        (status = 409, description = "`secret_pending_deletion`, `concurrent_update`", body = ErrorBody),
        (status = 422, description = "`invalid_request` (name, size), `invalid_context`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn put_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PutSecretBody>,
) -> Result<Json<SecretBody>, ApiError> {
    caller.require(Scope::SecretsWrite)?;
    let name = SecretName::new(&name)?;
    let (value, context) = secret_value(body)?;
    let secret = state
        .broker
        .put_secret(caller.client_id, &name, value, context, unix_now())
        .await?;
    Ok(Json(secret.into()))
}

/// A secret's value, decoded into a zeroizing buffer (the request's base64 copy is wiped), and
/// its context.
///
/// # Errors
/// `invalid_base64` or `invalid_context`.
pub fn secret_value(
    body: PutSecretBody,
) -> Result<(Zeroizing<Vec<u8>>, crate::crypto::EncryptionContext), ApiError> {
    let value = Zeroizing::new(
        STANDARD
            .decode(body.value.expose().as_bytes())
            .map_err(|_| ApiError::InvalidBase64("value"))?,
    );
    // The request's base64 copy is wiped when `body` is dropped (it is a `SecretText`).
    Ok((value, parse_context(body.context)?))
}

/// Read a secret (latest or `?version=`), with its context as `?context.<key>=<value>`.
#[utoipa::path(get, path = "/v1/secrets/{name}", tag = "secrets",
    params(
        ("name" = String, Path, description = "Secret name: 1 to 200 letters, digits or `._-/`"),
        ("version" = Option<u32>, Query, nullable = false, minimum = 1, description = "A version; default the latest"),
        ("context" = Option<ContextMap>, Query, style = DeepObject, explode, nullable = false,
            description = "The context the secret was stored with, one `context[<key>]=<value>` parameter per entry"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The value", body = SecretValueBody),
        (status = 404, description = "`secret_not_found`", body = ErrorBody),
        (status = 409, description = "`secret_pending_deletion`", body = ErrorBody),
        (status = 422, description = "`context_mismatch`, `invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn get_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<SecretValueBody>, ApiError> {
    caller.require(Scope::SecretsRead)?;
    let name = SecretName::new(&name)?;
    let params = query(q)?;
    if let Some(bad) = params
        .keys()
        .find(|k| k.as_str() != "version" && context_entry_name(k).is_none())
    {
        return Err(ApiError::InvalidQuery(format!(
            "unknown query parameter {bad:?}"
        )));
    }
    let version = match params.get("version") {
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| ApiError::InvalidQuery("version must be a positive number".into()))?,
        ),
        None => None,
    };
    let context = query_context(&params)?;
    let (secret, version, value) = state
        .broker
        .get_secret(caller.client_id, &name, version, context, unix_now())
        .await?;
    Ok(Json(SecretValueBody {
        name: secret.name,
        version,
        value: SecretText::from(STANDARD.encode(value.as_slice())),
    }))
}

/// Schedule a secret's destruction (every version) after a pending window (1-30 days, default 7).
#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name: 1 to 200 letters, digits or `._-/`"), DeletionQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Pending deletion", body = SecretBody),
        (status = 404, description = "`secret_not_found`", body = ErrorBody),
        (status = 409, description = "`secret_pending_deletion`", body = ErrorBody),
        (status = 422, description = "`invalid_request`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn delete_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<DeletionQuery>, QueryRejection>,
) -> Result<Json<SecretBody>, ApiError> {
    caller.require(Scope::SecretsWrite)?;
    let name = SecretName::new(&name)?;
    let q = query(q)?;
    let secret = state
        .broker
        .delete_secret(caller.client_id, &name, q.pending_window_days, unix_now())
        .await?;
    Ok(Json(secret.into()))
}

/// Cancel a secret's scheduled destruction.
#[utoipa::path(post, path = "/v1/secrets/{name}/cancel-deletion", tag = "secrets",
    params(("name" = String, Path, description = "Secret name: 1 to 200 letters, digits or `._-/`")), security(("bearer" = [])),
    responses(
        (status = 200, description = "Active again", body = SecretBody),
        (status = 404, description = "`secret_not_found`", body = ErrorBody),
        (status = 409, description = "`secret_active`", body = ErrorBody),
        super::admin::AdminErrorResponses,
    ))]
pub(super) async fn cancel_secret_deletion(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<SecretBody>, ApiError> {
    caller.require(Scope::SecretsWrite)?;
    let name = SecretName::new(&name)?;
    let secret = state
        .broker
        .cancel_secret_deletion(caller.client_id, &name, unix_now())
        .await?;
    Ok(Json(secret.into()))
}
