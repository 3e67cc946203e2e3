//! The OAuth 2.0 endpoints: client-credentials token (RFC 6749 §4.4, with
//! `client_secret_basic`, `client_secret_post` and RFC 7523 `private_key_jwt`), introspection
//! (RFC 7662), revocation (RFC 7009) and the JWKS document. Token-endpoint errors use the RFC's
//! own shape, which OAuth client libraries expect.

use axum::Json;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SecretText;
use super::{ApiError, AppState, ErrorBody, Source, error_chain};
use crate::auth::{
    AuthError, Caller, ClientCredentials, Introspection, JWT_BEARER_ASSERTION, unix_now,
};

/// `POST /v1/oauth/token` form fields. Its schema (below) says which fields go together.
#[derive(Debug, Default, Deserialize)]
pub struct TokenForm {
    /// Must be `client_credentials`.
    pub grant_type: Option<String>,
    /// Space-separated scopes; default: all the client holds.
    pub scope: Option<String>,
    /// `client_secret_post` (with `client_secret`) or `private_key_jwt` (optional there).
    pub client_id: Option<String>,
    /// `client_secret_post`.
    pub client_secret: Option<SecretText>,
    /// `urn:ietf:params:oauth:client-assertion-type:jwt-bearer` for `private_key_jwt`.
    pub client_assertion_type: Option<String>,
    /// The ES256 client assertion for `private_key_jwt`.
    pub client_assertion: Option<SecretText>,
}

/// The token form as one of three shapes, one per client authentication method (RFC 6749
/// §2.3: exactly one): `client_secret_post`, `private_key_jwt`, or none in the form (HTTP Basic,
/// or no credentials at all, which is answered 401).
impl utoipa::PartialSchema for TokenForm {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let scope = serde_json::json!({
            "type": "string",
            "pattern": super::schema::scope_sentence_pattern(),
            "description": "Space-separated scopes the client holds; default: all of them",
        });
        let grant_type = serde_json::json!({"type": "string", "enum": ["client_credentials"]});
        let shape = |name: &str, required: &[&str], extra: serde_json::Value| {
            let mut properties = serde_json::json!({
                "grant_type": grant_type,
                "scope": scope,
                "client_id": {"type": "string", "description": "The client id"},
            });
            if let (Some(all), Some(more)) = (properties.as_object_mut(), extra.as_object()) {
                all.extend(more.clone());
            }
            serde_json::json!({
                "title": name,
                "type": "object",
                "required": required,
                "properties": properties,
                "additionalProperties": false,
            })
        };
        super::schema::from_json(serde_json::json!({
            "description": "`POST /v1/oauth/token` form fields: `grant_type=client_credentials` \
                and exactly one client authentication method.",
            "oneOf": [
                shape("client_secret_post", &["grant_type", "client_id", "client_secret"],
                    serde_json::json!({"client_secret": {"type": "string"}})),
                shape("private_key_jwt", &["grant_type", "client_assertion_type", "client_assertion"],
                    serde_json::json!({
                        "client_assertion_type": {"type": "string", "enum": [JWT_BEARER_ASSERTION]},
                        "client_assertion": {"type": "string", "description": "An ES256 JWT signed with the client's registered key"},
                    })),
                shape("client_secret_basic", &["grant_type"], serde_json::json!({})),
            ],
        }))
    }
}

impl ToSchema for TokenForm {}

/// A successful token response (RFC 6749 §5.1).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// An ES256 JWT signed inside the token.
    #[schema(value_type = String)]
    pub access_token: SecretText,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until expiry.
    pub expires_in: u64,
    /// Granted scopes, space-separated.
    pub scope: String,
}

/// A token-endpoint error (RFC 6749 §5.2): `invalid_request`, `invalid_client`,
/// `invalid_grant`, `invalid_scope`, `unsupported_grant_type`; outages answer
/// `temporarily_unavailable` (503) and bugs `server_error` (500).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OAuthError {
    /// The RFC 6749 error code.
    pub error: String,
    /// Human-readable; never says which check failed for `invalid_client`.
    pub error_description: String,
}

/// `POST /v1/oauth/introspect` and `/revoke` form fields (a `token_type_hint` is accepted and
/// ignored: we issue only access tokens).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenParam {
    /// The access token in question.
    #[schema(value_type = String)]
    pub token: SecretText,
}

/// Introspection answer (RFC 7662): `active`, and the token's claims when active.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IntrospectionResponse {
    /// Whether the token is valid now.
    pub active: bool,
    /// Issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Client id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Client id (RFC 7662 name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Audience.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issued at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Token id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Granted scopes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `Bearer` when active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
}

impl From<Introspection> for IntrospectionResponse {
    fn from(i: Introspection) -> Self {
        let c = i.claims;
        Self {
            active: i.active,
            iss: c.as_ref().map(|c| c.iss.clone()),
            client_id: c.as_ref().map(|c| c.sub.clone()),
            sub: c.as_ref().map(|c| c.sub.clone()),
            aud: c.as_ref().map(|c| c.aud.clone()),
            iat: c.as_ref().map(|c| c.iat),
            nbf: c.as_ref().map(|c| c.nbf),
            exp: c.as_ref().map(|c| c.exp),
            jti: c.as_ref().map(|c| c.jti.clone()),
            scope: c.as_ref().map(|c| c.scope.clone()),
            token_type: c.as_ref().map(|_| "Bearer".to_owned()),
        }
    }
}

/// The token endpoint's error, with whether the client used HTTP Basic (RFC 6749 §5.2 then
/// asks for a `WWW-Authenticate: Basic` challenge on 401).
struct TokenError {
    error: AuthError,
    used_basic: bool,
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let (status, code, description) = match &self.error {
            AuthError::InvalidClient(reason) => {
                // One answer for every failure; the reason is for the operator only.
                tracing::debug!(target: "keybroker::auth", reason, "client authentication refused");
                (
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client authentication failed".to_owned(),
                )
            }
            AuthError::UnsupportedGrantType => (
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                self.error.to_string(),
            ),
            AuthError::InvalidScope => (
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                self.error.to_string(),
            ),
            AuthError::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                self.error.to_string(),
            ),
            AuthError::Throttled { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                self.error.to_string(),
            ),
            other => {
                let unavailable = matches!(other, AuthError::Hsm(e) if e.is_unavailable())
                    || matches!(other, AuthError::Store(e) if e.is_unavailable());
                tracing::error!(target: "keybroker::auth", error = %error_chain(other), "token endpoint failed");
                if unavailable {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                        "the broker cannot issue tokens right now; retry later".to_owned(),
                    )
                } else {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "internal error".to_owned(),
                    )
                }
            }
        };
        let mut response = (
            status,
            Json(OAuthError {
                error: code.to_owned(),
                error_description: description,
            }),
        )
            .into_response();
        response
            .extensions_mut()
            .insert(super::request_log::ErrorCode(code));
        if let AuthError::Throttled { retry_after } = &self.error
            && let Ok(value) = HeaderValue::from_str(&retry_after.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED && self.used_basic {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keybroker\""),
            );
        }
        no_store(response)
    }
}

/// Token responses must not be cached (RFC 6749 §5.1).
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Get an access token (OAuth 2.0 client credentials).
///
/// Authenticate with HTTP Basic (`client_secret_basic`), with `client_id` and `client_secret`
/// in the form (`client_secret_post`), or with an ES256 `client_assertion` signed by the
/// client's registered key (`private_key_jwt`: `aud` = this endpoint's URL, `exp` at most
/// 5 minutes ahead, `jti` single-use). Machine clients get a new token this way when theirs
/// expires; there are no refresh tokens (RFC 6749 §4.4.3).
#[utoipa::path(post, path = "/v1/oauth/token", tag = "oauth",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The access token", body = TokenResponse),
        (status = 400, description = "`invalid_request`, `invalid_scope`, `unsupported_grant_type`", body = OAuthError),
        (status = 401, description = "`invalid_client`: unknown client, wrong secret, bad or replayed assertion, disabled client or refused address, all alike", body = OAuthError),
        (status = 429, description = "`rate_limited`: too many failed authentications from this source for this client id (or from this source); `Retry-After` says when to try again. The client itself is never disabled by failed authentications", body = OAuthError,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "`server_error`", body = OAuthError),
        (status = 503, description = "`temporarily_unavailable`: token or database down", body = OAuthError),
    ))]
pub(super) async fn oauth_token(
    State(state): State<AppState>,
    Source(source): Source,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let basic = basic_credentials(&headers);
    let used_basic = basic.is_some();
    let result = async {
        let (form, credentials) = token_request(basic, form)?;
        authenticate_client(&state, source, credentials, form.scope.as_deref()).await
    }
    .await;
    match result {
        Ok(issued) => no_store(
            Json(TokenResponse {
                access_token: SecretText::from(issued.access_token),
                token_type: "Bearer".to_owned(),
                expires_in: issued.expires_in,
                scope: issued.scope.to_string(),
            })
            .into_response(),
        ),
        Err(error) => TokenError { error, used_basic }.into_response(),
    }
}

/// Authenticates a client and issues it a token, under the failed-authentication throttle:
/// the one path for every client sign-in (the token endpoint, the officer's console), so a
/// failure anywhere counts, delays and is audited alike.
///
/// # Errors
/// [`AuthError::Throttled`] before the credentials are looked at, else as
/// [`crate::auth::Authenticator::issue`].
pub(super) async fn authenticate_client(
    state: &AppState,
    source: std::net::IpAddr,
    credentials: ClientCredentials,
    scope: Option<&str>,
) -> Result<crate::auth::IssuedToken, AuthError> {
    let claimed = credentials.claimed_id();
    // Too many failures from here for this id (or from here at all): refused before the
    // credentials are looked at, known id or not alike.
    if let Some(retry_after) = state.limiter.auth_delay(source, claimed) {
        return Err(AuthError::Throttled { retry_after });
    }
    let result = state
        .auth
        .issue(credentials, scope, source, unix_now())
        .await;
    match &result {
        Ok(_) => state.limiter.auth_succeeded(source, claimed),
        Err(AuthError::InvalidClient(_)) => {
            if let Some(secs) = state.limiter.auth_failed(source, claimed) {
                tracing::warn!(target: "keybroker::security", %source, delay_secs = secs,
                    "failed client authentications: further attempts delayed");
            }
        }
        Err(_) => {}
    }
    result
}

/// A token request's form and its one client authentication, checked before any credential
/// is: a form, `grant_type=client_credentials`, exactly one authentication method.
///
/// # Errors
/// `invalid_request`, `unsupported_grant_type` or `invalid_client`, as RFC 6749 §5.2 names them.
pub fn token_request(
    basic: Option<Result<(String, SecretString), AuthError>>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Result<(TokenForm, ClientCredentials), AuthError> {
    let Form(form) =
        form.map_err(|_| AuthError::InvalidRequest("the body must be a form with grant_type"))?;
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        None => return Err(AuthError::InvalidRequest("grant_type is required")),
        Some(_) => return Err(AuthError::UnsupportedGrantType),
    }
    let credentials = credentials(basic, &form)?;
    Ok((form, credentials))
}

/// `Authorization: Basic base64(client_id:client_secret)`, if sent.
pub fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, SecretString), AuthError>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bad = AuthError::InvalidClient("malformed Basic credentials");
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let Some(decoded) = decoded else {
        return Some(Err(bad));
    };
    let decoded = zeroize::Zeroizing::new(decoded);
    Some(match decoded.split_once(':') {
        Some((id, secret)) => Ok((id.to_owned(), SecretString::from(secret.to_owned()))),
        None => Err(bad),
    })
}

/// Exactly one client authentication method (RFC 6749 §2.3).
fn credentials(
    basic: Option<Result<(String, SecretString), AuthError>>,
    form: &TokenForm,
) -> Result<ClientCredentials, AuthError> {
    let post = form.client_secret.is_some();
    let assertion = form.client_assertion.is_some() || form.client_assertion_type.is_some();
    if usize::from(basic.is_some()) + usize::from(post) + usize::from(assertion) > 1 {
        return Err(AuthError::InvalidRequest(
            "use exactly one client authentication method",
        ));
    }
    if let Some(basic) = basic {
        let (client_id, secret) = basic?;
        return Ok(ClientCredentials::Secret { client_id, secret });
    }
    if let Some(secret) = &form.client_secret {
        let client_id = form.client_id.clone().ok_or(AuthError::InvalidRequest(
            "client_id is required with client_secret",
        ))?;
        return Ok(ClientCredentials::Secret {
            client_id,
            secret: SecretString::from(secret.expose()),
        });
    }
    if assertion {
        if form.client_assertion_type.as_deref() != Some(JWT_BEARER_ASSERTION) {
            return Err(AuthError::InvalidRequest(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
        let assertion = form
            .client_assertion
            .as_ref()
            .map(|a| a.expose().to_owned())
            .ok_or(AuthError::InvalidRequest("client_assertion is required"))?;
        return Ok(ClientCredentials::Assertion {
            client_id: form.client_id.clone(),
            assertion,
        });
    }
    Err(AuthError::InvalidClient("no client authentication"))
}

/// Introspect an access token (RFC 7662).
///
/// For a caller with the `admin` scope, or the client the token was issued to; for anyone
/// else, and for any invalid token, the answer is `{"active": false}`.
#[utoipa::path(post, path = "/v1/oauth/introspect", tag = "oauth",
    request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "What the token is", body = IntrospectionResponse),
        (status = 400, description = "`invalid_request`: no `token` field", body = ErrorBody),
        (status = 401, description = "`invalid_token`: the caller's own token is bad", body = ErrorBody),
        (status = 503, description = "`hsm_unavailable`, `hsm_timeout` or `database_unavailable`", body = ErrorBody),
    ))]
pub(super) async fn oauth_introspect(
    State(state): State<AppState>,
    caller: Caller,
    form: Result<Form<TokenParam>, FormRejection>,
) -> Result<Json<IntrospectionResponse>, ApiError> {
    let Form(param) = form.map_err(|_| ApiError::InvalidForm)?;
    let answer = state.auth.introspect(&caller, param.token.expose()).await?;
    Ok(Json(answer.into()))
}

/// Revoke an access token (RFC 7009).
///
/// An admin may revoke any token, a client its own. The answer is 200 whether or not the token
/// was valid, as the RFC asks.
#[utoipa::path(post, path = "/v1/oauth/revoke", tag = "oauth",
    request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked, or nothing to revoke"),
        (status = 400, description = "`invalid_request`: no `token` field", body = ErrorBody),
        (status = 401, description = "`invalid_token`: the caller's own token is bad", body = ErrorBody),
        (status = 503, description = "`database_unavailable`", body = ErrorBody),
    ))]
pub(super) async fn oauth_revoke(
    State(state): State<AppState>,
    caller: Caller,
    form: Result<Form<TokenParam>, FormRejection>,
) -> Result<StatusCode, ApiError> {
    let Form(param) = form.map_err(|_| ApiError::InvalidForm)?;
    state.auth.revoke(&caller, param.token.expose()).await?;
    Ok(StatusCode::OK)
}

/// The token-signing public keys (JWKS).
///
/// Verify our access tokens with any standard JWT library: ES256, `kid` = RFC 7638 thumbprint.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "oauth",
    responses((status = 200, description = "The JWK set", content_type = "application/json")))]
pub(super) async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = Json(state.auth.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    response
}
