//! The officer's console: HTML pages under `/console/`, rendered on the server (maud), on the
//! broker's own HTTPS listener. It owns the pages, the session cookie and the CSRF check; every
//! action calls the JSON API's own handler with the officer's client as the caller, so the same
//! checks and audit events happen and no rule lives here a second time.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

mod audit;
mod clients;
mod keys;
mod master_keys;
mod overview;
mod session;
mod settings;
mod usage;

pub(super) use session::Officer;

/// The console's routes, merged into the API's router (so the same source limits, request log
/// and audit context apply), each answer with the console's security headers.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(to_overview))
        .route("/console/", get(overview::page))
        .route(
            "/console/sign-in",
            get(session::sign_in_page).post(session::sign_in),
        )
        .route("/console/sign-out", post(session::sign_out))
        .route(
            "/console/clients",
            get(clients::page).post(clients::register),
        )
        .route("/console/clients/{id}/{action}", post(clients::act))
        .route("/console/keys", get(keys::page))
        .route("/console/keys/{id}/{action}", post(keys::act))
        .route("/console/master-keys", get(master_keys::page))
        .route("/console/master-keys/rotate", post(master_keys::rotate))
        .route(
            "/console/master-keys/rewrap",
            get(master_keys::progress).post(master_keys::start_rewrap),
        )
        .route(
            "/console/master-keys/{version}/retire",
            post(master_keys::retire),
        )
        .route("/console/audit", get(audit::page))
        .route("/console/audit/verify", get(audit::verify))
        .route(
            "/console/settings",
            get(settings::page).post(settings::save),
        )
        .route("/console/usage", get(usage::page))
        .route("/console/assets/{file}", get(asset))
        // Anything else under /console/ is the console's own 404, with its headers.
        .route("/console/{*rest}", any(not_found))
        .layer(middleware::from_fn(security_headers))
}

/// The console's OpenAPI paths (tag `console`): HTML for people, listed because every endpoint
/// is; `scripts/contract.sh` leaves them out of the fuzzer's run.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        to_overview, overview::page, session::sign_in_page, session::sign_in, session::sign_out,
        clients::page, clients::register, clients::act, keys::page, keys::act,
        master_keys::page, master_keys::rotate, master_keys::progress, master_keys::start_rewrap,
        master_keys::retire, audit::page, audit::verify, settings::page, settings::save,
        usage::page, asset
    ),
    modifiers(&CookieAuth),
    tags((name = "console", description = "The officer's console: HTML pages for people (a session cookie from signing in with an admin client's credentials; every form carries a CSRF token)")),
)]
pub(super) struct ConsoleDoc;

/// Declares the `console_session` cookie security scheme the console paths refer to.
struct CookieAuth;

impl utoipa::Modify for CookieAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "console_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                session::COOKIE,
                "The console's session cookie, set by POST /console/sign-in",
            ))),
        );
    }
}

/// Every console answer: no framing, no referrer, nothing but our own origin for scripts,
/// styles, images and form targets, and no inline script or style at all (CSP `default-src
/// 'self'` has no `'unsafe-inline'`). Pages are not cached; assets say otherwise themselves.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Errors

/// What a console request can fail with. Each variant's doc says what the officer gets.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConsoleError {
    /// 303 to the sign-in page: no live session (none, expired, signed out).
    #[error("not signed in")]
    SignedOut,
    /// 403: a state-changing form without this session's CSRF token; nothing was changed.
    #[error("the form's CSRF token is missing or belongs to another session; nothing was changed")]
    Csrf,
    /// 400: a form that is not a form, or lacks a field the action needs.
    #[error("{0}")]
    BadForm(&'static str),
    /// 500: the operating system gave no randomness for a session id.
    #[error("internal error; the request id identifies it in the server log")]
    NoRandomness,
    /// Whatever the JSON API answers to the same request, shown as a page.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<crate::auth::AuthError> for ConsoleError {
    fn from(e: crate::auth::AuthError) -> Self {
        Self::Api(e.into())
    }
}

impl From<crate::broker::BrokerError> for ConsoleError {
    fn from(e: crate::broker::BrokerError) -> Self {
        Self::Api(e.into())
    }
}

impl ConsoleError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::SignedOut => (StatusCode::SEE_OTHER, "signed_out"),
            Self::Csrf => (StatusCode::FORBIDDEN, "csrf_refused"),
            Self::BadForm(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::NoRandomness => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            Self::Api(e) => e.status_and_code(),
        }
    }

    /// What the officer reads: the API's own message (server failures say only what failed).
    fn message(&self) -> String {
        match self {
            Self::Api(e) => e.body().error.message,
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        if let Self::SignedOut = self {
            return redirect("/console/sign-in");
        }
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            let detail = match &self {
                Self::Api(e) => super::error_chain(e),
                other => other.to_string(),
            };
            tracing::error!(target: "keybroker::api", code, error = %detail, "console request failed");
        } else {
            tracing::debug!(target: "keybroker::api", code, "console request refused");
        }
        let body = html! {
            div.notice.error role="alert" {
                strong { (status.as_u16()) " " (code) } ": " (self.message())
            }
            p { a href="/console/" { "Back to the console" } }
        };
        let mut response = html_page(status, page_markup("Refused", None, "", body));
        response
            .extensions_mut()
            .insert(super::request_log::ErrorCode(code));
        response
    }
}

/// A notice above a page's content: what an action did, or why it was refused.
pub(super) enum Notice {
    /// Done.
    Done(Markup),
    /// Refused by the API's rules (its code and message).
    Refused(StatusCode, &'static str, String),
}

impl Notice {
    /// The notice for an action's result, and the status the page is answered with.
    pub(super) fn of<T>(result: Result<T, ApiError>, done: impl FnOnce(T) -> Markup) -> Self {
        match result {
            Ok(value) => Self::Done(done(value)),
            Err(e) => Self::refused(&ConsoleError::Api(e)),
        }
    }

    fn refused(e: &ConsoleError) -> Self {
        let (status, code) = e.status_and_code();
        if status.is_server_error() {
            tracing::error!(target: "keybroker::api", code, error = %e, "console action failed");
        }
        Self::Refused(status, code, e.message())
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            Self::Done(_) => StatusCode::OK,
            Self::Refused(status, ..) => *status,
        }
    }

    pub(super) fn render(&self) -> Markup {
        match self {
            Self::Done(markup) => html! { div.notice.ok role="status" { (markup) } },
            Self::Refused(_, code, message) => html! {
                div.notice.error role="alert" { strong { (code) } ": " (message) }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

/// The pages of the navigation bar: path and link text.
const PAGES: [(&str, &str); 7] = [
    ("/console/", "Overview"),
    ("/console/clients", "Clients"),
    ("/console/keys", "Keys"),
    ("/console/master-keys", "Master keys"),
    ("/console/audit", "Audit"),
    ("/console/settings", "Settings"),
    ("/console/usage", "Usage"),
];

/// htmx settings: it must not add its indicator `<style>` (CSP), nor evaluate strings.
const HTMX_CONFIG: &str =
    r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;

/// A whole page: head, navigation (when signed in), the title and the content.
pub(super) fn page_markup(
    title: &str,
    officer: Option<&Officer>,
    current: &str,
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="htmx-config" content=(HTMX_CONFIG);
                meta name="referrer" content="no-referrer";
                title { (title) " · keybroker console" }
                link rel="stylesheet" href=(asset_url("console.css"));
                script src=(asset_url("htmx.min.js")) defer {}
            }
            body {
                header {
                    span.brand { "keybroker" }
                    @if let Some(officer) = officer {
                        nav aria-label="Console" {
                            @for (path, text) in PAGES {
                                @if path == current {
                                    a href=(path) aria-current="page" { (text) }
                                } @else {
                                    a href=(path) { (text) }
                                }
                            }
                        }
                        span.who.mono title="Signed in as this admin client" { (officer.caller.client_id) }
                        form method="post" action="/console/sign-out" {
                            (officer.csrf_field())
                            button.secondary type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

/// A page for a signed-in officer, answered 200 or with its notice's status.
pub(super) fn respond(
    officer: &Officer,
    title: &str,
    current: &str,
    notice: Option<&Notice>,
    content: Markup,
) -> Response {
    let status = notice.map_or(StatusCode::OK, Notice::status);
    let body = html! {
        @if let Some(notice) = notice { (notice.render()) }
        (content)
    };
    html_page(status, page_markup(title, Some(officer), current, body))
}

/// A whole page with its status.
pub(super) fn html_page(status: StatusCode, markup: Markup) -> Response {
    (status, axum::response::Html(markup.into_string())).into_response()
}

/// An HTML fragment (an htmx swap target).
pub(super) fn fragment(markup: Markup) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        markup.into_string(),
    )
        .into_response()
}

/// 303 See Other to a console path.
pub(super) fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// A state shown as a coloured word.
pub(super) fn state_badge(state: &str) -> Markup {
    html! { span class=(format!("state state-{state}")) { (state) } }
}

/// Unix seconds as UTC text (`2026-12-04 22:10:05Z`), or a dash.
pub(super) fn time(secs: Option<i64>) -> Markup {
    match secs {
        Some(s) => html! { span.mono { (utc(s)) } },
        None => html! { span.muted { "–" } },
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (proleptic Gregorian, UTC).
pub(super) fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Unix seconds as the date alone, `YYYY-MM-DD`.
pub(super) fn date(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 as a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// Assets

/// A file served from the binary, with its content type.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 2] = [
    Asset {
        name: "htmx.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/htmx.min.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("assets/console.css"),
    },
];

/// The first 16 hex digits of SHA-256 over every asset: part of each asset's URL, so a new
/// build's assets are fetched afresh despite their year-long cache lifetime.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hash = Sha256::new();
    for asset in &ASSETS {
        hash.update(asset.bytes);
    }
    hash.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
});

fn asset_url(name: &str) -> String {
    format!("/console/assets/{name}?v={}", *ASSET_VERSION)
}

/// The console's script (htmx) and style sheet.
#[utoipa::path(get, path = "/console/assets/{file}", tag = "console",
    params(("file" = String, Path, description = "`htmx.min.js` or `console.css`")),
    responses(
        (status = 200, description = "The file, cacheable for a year (its URL carries a version)", content_type = "text/css"),
        (status = 404, description = "No such asset", content_type = "text/html"),
    ))]
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(asset) => (
            [
                (header::CONTENT_TYPE, asset.content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            asset.bytes,
        )
            .into_response(),
        None => not_found().await,
    }
}

/// The console's front door: the overview.
#[utoipa::path(get, path = "/console", tag = "console",
    responses((status = 303, description = "To `/console/`")))]
async fn to_overview() -> Response {
    redirect("/console/")
}

async fn not_found() -> Response {
    let body = html! {
        p { "There is no such console page." }
        p { a href="/console/" { "Back to the console" } }
    };
    let mut response = html_page(
        StatusCode::NOT_FOUND,
        page_markup("Not found", None, "", body),
    );
    response
        .extensions_mut()
        .insert(super::request_log::ErrorCode("not_found"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_421_005), "2026-12-04 21:50:05Z");
        assert_eq!(date(-1), "1969-12-31");
    }

    #[test]
    fn asset_urls_carry_a_version() {
        let url = asset_url("console.css");
        assert!(url.starts_with("/console/assets/console.css?v="));
        assert_eq!(url.len(), "/console/assets/console.css?v=".len() + 16);
    }
}
