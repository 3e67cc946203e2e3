//! The administration API for clients (scope `admin`): register, list, get, update, disable,
//! enable, delete.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::SecretText;
use super::{ApiError, ApiJson, ApiPath, AppState, ErrorBody, schema};
use crate::auth::AdminGuard;
use crate::auth::{AuthError, Caller, Client, ClientSpec, Scope};

/// `POST /v1/admin/clients` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterClientBody {
    /// Display name, 1 to 200 characters.
    #[schema(schema_with = schema::client_name)]
    pub name: String,
    /// `strict`: only from `ips`; `none`: from anywhere.
    #[schema(value_type = IpMode)]
    pub ip_mode: String,
    /// Addresses or CIDRs (`127.0.0.1`, `10.0.0.0/8`, `::1`); required in strict mode. In strict
    /// mode no two active clients may share an address.
    #[serde(default)]
    #[schema(schema_with = strict_networks)]
    pub ips: Vec<String>,
    /// Scopes: `datakey`, `wrap`, `unwrap`, `rewrap`, `random`, `keys:create`, `keys:read`,
    /// `keys:rotate`, `keys:manage`, `secrets:read`, `secrets:write`, `admin`, or the families
    /// `keys:*`, `secrets:*`.
    #[schema(schema_with = schema::scope_list)]
    pub scopes: Vec<String>,
    /// A P-256 public key (SPKI PEM) for `private_key_jwt`.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// `PATCH /v1/admin/clients/{id}` request: the fields to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClientBody {
    /// New display name.
    #[schema(schema_with = schema::client_name_or_null)]
    pub name: Option<String>,
    /// New address mode.
    #[schema(value_type = Option<IpMode>)]
    pub ip_mode: Option<String>,
    /// New addresses or CIDRs (replace the old ones).
    #[schema(schema_with = strict_networks_or_null)]
    pub ips: Option<Vec<String>>,
    /// New scopes (replace the old ones); live tokens lose what is taken away at once.
    #[schema(schema_with = schema::scope_list_or_null)]
    pub scopes: Option<Vec<String>>,
    /// New public key; an empty string removes it.
    pub public_key: Option<String>,
}

/// Where a client may call from. Only the schema uses it; the body keeps the text.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum IpMode {
    /// Only from the client's `ips`.
    Strict,
    /// From anywhere.
    None,
}

fn strict_networks() -> utoipa::openapi::schema::Array {
    networks(false)
}

fn strict_networks_or_null() -> utoipa::openapi::schema::Array {
    networks(true)
}

fn networks(nullable: bool) -> utoipa::openapi::schema::Array {
    // At most 64 distinct networks once repeats and networks inside others are dropped: a
    // rule on the list's meaning, not its length, so no `maxItems`.
    schema::network_list(
        nullable,
        "Addresses or CIDRs (`127.0.0.1`, `10.0.0.0/8`, `::1`), at most 64 distinct; required in strict \
         mode, where no two active clients may share an address and no network may be wider \
         than a /8 (IPv4) or /32 (IPv6).",
    )
}

/// The scopes of a request body as the space-separated list `ClientSpec` parses: each item
/// must be one scope word, as the schema's enum says (a space inside an item would otherwise
/// smuggle in a second scope).
fn scope_text(items: &[String]) -> Result<String, AuthError> {
    if items
        .iter()
        .any(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(AuthError::InvalidClientSpec(
            "each scope is one word, e.g. \"datakey\" or \"keys:*\"".to_owned(),
        ));
    }
    Ok(items.join(" "))
}

/// A client as the API shows it. There is no secret in it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClientBody {
    /// The client id (UUID v4).
    pub client_id: Uuid,
    /// Display name.
    pub name: String,
    /// `strict` or `none`.
    pub ip_mode: String,
    /// Allowed networks (strict mode).
    pub ips: Vec<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// The registered public key, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// `active` or `disabled`.
    pub state: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

impl From<Client> for ClientBody {
    fn from(c: Client) -> Self {
        Self {
            state: c.state().as_str().to_owned(),
            client_id: c.id,
            name: c.name,
            ip_mode: c.ip_policy.mode().to_owned(),
            ips: c.ip_policy.cidrs(),
            scopes: c.scopes.names(),
            public_key: c.public_key_pem,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// `POST /v1/admin/clients` response: the client and its secret, shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisteredClientBody {
    /// The client.
    pub client: ClientBody,
    /// The client secret. Only an HMAC of it is kept: it cannot be shown again.
    #[schema(value_type = String)]
    pub client_secret: SecretText,
}

/// `GET /v1/admin/clients` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClientListBody {
    /// Clients ordered by id.
    pub items: Vec<ClientBody>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<Uuid>,
}

/// `GET /v1/admin/clients` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1 to 500 (default 100).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    #[param(nullable = false)]
    pub after: Option<Uuid>,
}

pub(super) fn client_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| AuthError::ClientNotFound.into())
}

/// Register a client.
#[utoipa::path(post, path = "/v1/admin/clients", tag = "admin",
    request_body = RegisterClientBody, security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered; the secret is shown only here", body = RegisteredClientBody),
        (status = 409, description = "`ip_already_registered`", body = ErrorBody),
        (status = 422, description = "`invalid_client_metadata` or `invalid_request`", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn register_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RegisterClientBody>,
) -> Result<(StatusCode, Json<RegisteredClientBody>), ApiError> {
    caller.require(Scope::Admin)?;
    let spec = register_spec(body)?;
    let (client, secret) = state.auth.register(spec).await?;
    Ok((
        StatusCode::CREATED,
        Json(RegisteredClientBody {
            client: client.into(),
            client_secret: SecretText::from(secret.expose().to_owned()),
        }),
    ))
}

/// The validated client a registration asks for.
///
/// # Errors
/// [`AuthError::InvalidClientSpec`] saying what is wrong.
pub fn register_spec(body: RegisterClientBody) -> Result<ClientSpec, AuthError> {
    ClientSpec::new(
        body.name,
        &body.ip_mode,
        &body.ips,
        &scope_text(&body.scopes)?,
        body.public_key,
    )
}

/// List clients, a page at a time.
#[utoipa::path(get, path = "/v1/admin/clients", tag = "admin",
    params(ListQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of clients", body = ClientListBody),
        (status = 422, description = "`invalid_request`: bad query", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn list_clients(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ClientListBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let Query(query) =
        query.map_err(|e| ApiError::InvalidQuery(super::mismatch_message(&e, "query string")))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1 to 500".to_owned()));
    }
    let page = state.auth.clients(query.after, limit + 1).await?;
    let more = page.len() > limit as usize;
    let items: Vec<ClientBody> = page
        .into_iter()
        .take(limit as usize)
        .map(Into::into)
        .collect();
    let next_after = more.then(|| items.last().map(|c| c.client_id)).flatten();
    Ok(Json(ClientListBody { items, next_after }))
}

/// Get a client.
#[utoipa::path(get, path = "/v1/admin/clients/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The client", body = ClientBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn get_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ClientBody>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(state.auth.client(client_id(&id)?).await?.into()))
}

/// Change a client's name, addresses, scopes or public key.
#[utoipa::path(patch, path = "/v1/admin/clients/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")),
    request_body = UpdateClientBody, security(("bearer" = [])),
    responses(
        (status = 200, description = "The changed client", body = ClientBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        (status = 409, description = "`ip_already_registered`, or `last_admin`: the change would take `admin` from the last active admin client", body = ErrorBody),
        (status = 422, description = "`invalid_client_metadata` or `invalid_request`", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn update_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateClientBody>,
) -> Result<Json<ClientBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = client_id(&id)?;
    let current = ClientBody::from(state.auth.client(id).await?);
    let public_key = match body.public_key {
        Some(pem) if pem.is_empty() => None,
        Some(pem) => Some(pem),
        None => current.public_key,
    };
    let spec = ClientSpec::new(
        body.name.unwrap_or(current.name),
        &body.ip_mode.unwrap_or(current.ip_mode),
        &body.ips.unwrap_or(current.ips),
        &scope_text(&body.scopes.unwrap_or(current.scopes))?,
        public_key,
    )?;
    Ok(Json(
        state
            .auth
            .update(id, spec, AdminGuard::KeepOne)
            .await?
            .into(),
    ))
}

/// Disable a client: every live token of it stops working at once, for good.
#[utoipa::path(post, path = "/v1/admin/clients/{id}/disable", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The disabled client", body = ClientBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        (status = 409, description = "`last_admin`: the last active client with the admin scope", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn disable_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ClientBody>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        state
            .auth
            .set_active(client_id(&id)?, false, AdminGuard::KeepOne)
            .await?
            .into(),
    ))
}

/// Enable a client again (its old tokens stay invalid; it gets new ones).
#[utoipa::path(post, path = "/v1/admin/clients/{id}/enable", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The enabled client", body = ClientBody),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        (status = 409, description = "`ip_already_registered`: another active strict client took its address", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn enable_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ClientBody>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        state
            .auth
            .set_active(client_id(&id)?, true, AdminGuard::KeepOne)
            .await?
            .into(),
    ))
}

/// Delete a client; its tokens stop working at once.
#[utoipa::path(delete, path = "/v1/admin/clients/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "Client id")), security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`client_not_found`", body = ErrorBody),
        (status = 409, description = "`last_admin`: the last active client with the admin scope", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn delete_client(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    state
        .auth
        .delete(client_id(&id)?, AdminGuard::KeepOne)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The error answers every admin endpoint can give.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(super) enum AdminErrorResponses {
    /// `invalid_token`: missing, expired, revoked or otherwise bad access token
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `insufficient_scope` (needs `admin`), `ip_not_allowed` or `client_disabled`
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `internal_error`
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `hsm_unavailable`, `hsm_timeout` or `database_unavailable`
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
