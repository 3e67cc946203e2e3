//! Console sessions: sign-in (through the token endpoint's own authentication and throttle),
//! the session cookie, the [`Officer`] every page extracts, the CSRF check every
//! state-changing form passes ([`Submitted`]), and sign-out.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use maud::{Markup, html};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::SecretString;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ConsoleError, page_markup, redirect};
use crate::api::{AppState, Source, admit, oauth, request_source};
use crate::auth::{AuthError, Caller, ClientCredentials, constant_time_eq};

/// The session cookie's name.
pub(super) const COOKIE: &str = "kb_console";
/// The hidden field that carries the CSRF token back.
pub(super) const CSRF_FIELD: &str = "csrf_token";

/// A signed-in officer: the admin client behind a live console session, checked on this
/// request like a bearer token (see [`crate::auth::Authenticator::session_caller`]).
pub(in crate::api) struct Officer {
    /// The officer's client, as the JSON handlers take it.
    pub caller: Caller,
    /// This session's CSRF token.
    csrf: String,
    /// SHA-256 of the session id (the row's key).
    session: [u8; 32],
}

impl Officer {
    /// The hidden field every state-changing form of this session carries.
    pub(super) fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name=(CSRF_FIELD) value=(self.csrf); }
    }
}

impl FromRequestParts<AppState> for Officer {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ConsoleError> {
        let id = session_cookie(&parts.headers).ok_or(ConsoleError::SignedOut)?;
        let session = digest(id);
        let row = state
            .auth
            .touch_console_session(&session)
            .await?
            .ok_or(ConsoleError::SignedOut)?;
        let source = request_source(parts, state);
        let caller = match state
            .auth
            .session_caller(row.client_id, row.created_at, source)
            .await
        {
            Ok(caller) => caller,
            // The session is over for good: its client is gone, or was disabled since.
            Err(AuthError::InvalidToken(_) | AuthError::ClientDisabled) => {
                if let Err(e) = state.auth.end_console_session(&session).await {
                    tracing::warn!(target: "keybroker::api", error = %e, "dead console session not deleted");
                }
                return Err(ConsoleError::SignedOut);
            }
            Err(e) => return Err(e.into()),
        };
        let caller = admit(parts, state, caller)?;
        Ok(Self {
            caller,
            csrf: row.csrf_token,
            session,
        })
    }
}

/// A state-changing form from a signed-in officer whose CSRF token is this session's: the
/// only way a console handler gets a submitted form, so none can skip the check.
pub(super) struct Submitted {
    pub officer: Officer,
    pub fields: Fields,
}

impl FromRequest<AppState> for Submitted {
    type Rejection = ConsoleError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ConsoleError> {
        let (mut parts, body) = request.into_parts();
        let officer = Officer::from_request_parts(&mut parts, state).await?;
        let request = Request::from_parts(parts, body);
        let Form(pairs) = Form::<Vec<(String, String)>>::from_request(request, state)
            .await
            .map_err(|_| {
                ConsoleError::BadForm("the body must be an application/x-www-form-urlencoded form")
            })?;
        let fields = Fields(pairs);
        let valid = fields
            .get(CSRF_FIELD)
            .is_some_and(|sent| constant_time_eq(sent.as_bytes(), officer.csrf.as_bytes()));
        if !valid {
            tracing::warn!(target: "keybroker::security", client = %officer.caller.client_id,
                "console form refused: CSRF token missing or not this session's");
            return Err(ConsoleError::Csrf);
        }
        Ok(Self { officer, fields })
    }
}

/// A submitted form's fields, in order (a field may repeat: checkboxes).
pub(super) struct Fields(Vec<(String, String)>);

impl Fields {
    /// The first value of `name`, if sent.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, trimmed, if sent and not blank.
    pub(super) fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    /// Every value of `name`.
    pub(super) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

/// The sign-in form's fields.
#[derive(Deserialize, utoipa::ToSchema)]
pub(super) struct SignInForm {
    /// An admin client's id.
    client_id: String,
    /// Its secret.
    client_secret: String,
}

/// The sign-in page.
#[utoipa::path(get, path = "/console/sign-in", tag = "console",
    responses((status = 200, description = "The sign-in form", content_type = "text/html")))]
pub(super) async fn sign_in_page() -> Response {
    sign_in_form(StatusCode::OK, None)
}

/// Sign in with an admin client's id and secret. They are checked exactly as the token
/// endpoint checks them (the same throttle, failure counting and audit events); only an
/// active client with the `admin` scope, calling from an allowed address, gets a session.
#[utoipa::path(post, path = "/console/sign-in", tag = "console",
    request_body(content = SignInForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Signed in: the session cookie (`kb_console`; HttpOnly, Secure, SameSite=Strict, Path=/console), and on to the overview",
            headers(("Set-Cookie" = String, description = "The session cookie"))),
        (status = 400, description = "Not a form with `client_id` and `client_secret`", content_type = "text/html"),
        (status = 401, description = "Sign-in failed (unknown client, wrong secret, disabled, refused address: all alike)", content_type = "text/html"),
        (status = 403, description = "The client does not hold the `admin` scope", content_type = "text/html"),
        (status = 429, description = "Too many failed sign-ins or token requests from here; `Retry-After` says when to try again", content_type = "text/html"),
        (status = 503, description = "The token or the database is unavailable", content_type = "text/html"),
    ))]
pub(super) async fn sign_in(
    State(state): State<AppState>,
    Source(source): Source,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return sign_in_form(
            StatusCode::BAD_REQUEST,
            Some("Enter a client id and its secret."),
        );
    };
    let credentials = ClientCredentials::Secret {
        client_id: form.client_id.trim().to_owned(),
        secret: SecretString::from(form.client_secret),
    };
    let issued = match oauth::authenticate_client(&state, source, credentials, Some("admin")).await
    {
        Ok(issued) => issued,
        Err(AuthError::InvalidClient(_)) => {
            return sign_in_form(
                StatusCode::UNAUTHORIZED,
                Some("Sign-in failed: check the client id and secret."),
            );
        }
        Err(AuthError::InvalidScope) => {
            return sign_in_form(
                StatusCode::FORBIDDEN,
                Some("This client does not hold the admin scope: the console is for officers."),
            );
        }
        Err(AuthError::Throttled { retry_after }) => {
            let mut response = sign_in_form(
                StatusCode::TOO_MANY_REQUESTS,
                Some("Too many failed attempts from here: wait, then try again."),
            );
            if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
        Err(e) => return ConsoleError::from(e).into_response(),
    };
    // The token proved the sign-in; the session, not the token, carries it from here.
    drop(issued.access_token);
    let (Some(id), Some(csrf)) = (random_token(), random_token()) else {
        tracing::error!(target: "keybroker::api", "no randomness from the operating system for a console session");
        return ConsoleError::NoRandomness.into_response();
    };
    if let Some(old) = session_cookie(&headers)
        && let Err(e) = state.auth.end_console_session(&digest(old)).await
    {
        tracing::warn!(target: "keybroker::api", error = %e, "replaced console session not deleted");
    }
    if let Err(e) = state
        .auth
        .begin_console_session(&digest(&id), issued.client_id, &csrf)
        .await
    {
        return ConsoleError::from(e).into_response();
    }
    let mut response = redirect("/console/");
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/console"
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Sign out: the session's row is deleted, so the session ends on every broker at once.
#[utoipa::path(post, path = "/console/sign-out", tag = "console",
    request_body(content = CsrfForm, content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 303, description = "Signed out; on to the sign-in page"),
        (status = 403, description = "The form's CSRF token is missing or another session's", content_type = "text/html"),
    ))]
pub(super) async fn sign_out(State(state): State<AppState>, submitted: Submitted) -> Response {
    if let Err(e) = state
        .auth
        .end_console_session(&submitted.officer.session)
        .await
    {
        return ConsoleError::from(e).into_response();
    }
    let mut response = redirect("/console/sign-in");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "kb_console=; HttpOnly; Secure; SameSite=Strict; Path=/console; Max-Age=0",
        ),
    );
    response
}

/// The fields every state-changing console form carries.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct CsrfForm {
    /// This session's CSRF token (a hidden field of every form).
    csrf_token: String,
}

fn sign_in_form(status: StatusCode, message: Option<&str>) -> Response {
    let body = html! {
        section.card.signin {
            @if let Some(message) = message {
                div.notice.error role="alert" { (message) }
            }
            p.muted { "Sign in with the id and secret of a client that holds the admin scope." }
            form.stack method="post" action="/console/sign-in" {
                label for="client_id" { "Client id" }
                input #client_id type="text" name="client_id" required autocomplete="username" spellcheck="false";
                label for="client_secret" { "Client secret" }
                input #client_secret type="password" name="client_secret" required autocomplete="current-password";
                p { button type="submit" { "Sign in" } }
            }
        }
    };
    super::html_page(status, page_markup("Sign in", None, "", body))
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The session id from the `kb_console` cookie, if sent.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == COOKIE && !value.is_empty())
        .map(|(_, value)| value)
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// 32 bytes from the operating system's CSPRNG, base64url without padding.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; kb_console=abc"),
        );
        assert_eq!(session_cookie(&headers), Some("abc"));
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("kb_console=; x=2"));
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn session_ids_are_32_random_bytes() {
        let a = random_token().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, random_token().unwrap());
    }
}
