//! The Master keys page: the versions, rotation, the rewrap job (its progress polled by htmx
//! while it runs) and retirement, each through the custody API's own handler.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};

use super::overview::{master_key_table, unavailable};
use super::session::Submitted;
use super::{ConsoleError, Notice, Officer, fragment, respond, state_badge};
use crate::api::custody::{self, RewrapJobBody};
use crate::api::{ApiError, ApiPath, AppState};
use crate::broker::{MasterKeyState, RewrapJobState};

/// Master keys.
#[utoipa::path(get, path = "/console/master-keys", tag = "console",
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The master keys page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
) -> Result<Response, ConsoleError> {
    Ok(render(&state, &officer, None).await)
}

/// Rotate: a new master-key version becomes active for new seals.
#[utoipa::path(post, path = "/console/master-keys/rotate", tag = "console",
    request_body(content = super::session::CsrfForm, content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Rotated: the master keys page", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing changed", content_type = "text/html"),
    ))]
pub(super) async fn rotate(
    State(state): State<AppState>,
    Submitted { officer, .. }: Submitted,
) -> Result<Response, ConsoleError> {
    let result = custody::rotate_master_key(State(state.clone()), officer.caller.clone()).await;
    let notice = Notice::of(result, |Json(body)| {
        let active = body
            .master_keys
            .iter()
            .find(|mk| mk.state == MasterKeyState::Active.as_str())
            .map(|mk| mk.version);
        html! {
            "Rotated: " @if let Some(v) = active { "v" (v) " is active. " }
            "Start a rewrap to move the stored blobs to it."
        }
    });
    Ok(render(&state, &officer, Some(notice)).await)
}

/// Start moving every stored blob to the active version (or join the running job).
#[utoipa::path(post, path = "/console/master-keys/rewrap", tag = "console",
    request_body(content = super::session::CsrfForm, content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Started (or already done): the master keys page, its progress updating", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing changed", content_type = "text/html"),
    ))]
pub(super) async fn start_rewrap(
    State(state): State<AppState>,
    Submitted { officer, .. }: Submitted,
) -> Result<Response, ConsoleError> {
    let result = custody::start_rewrap(State(state.clone()), officer.caller.clone()).await;
    let notice = Notice::of(result, |(_, Json(job))| {
        html! { "Rewrap job " (job.id) " " (job.state) "." }
    });
    Ok(render(&state, &officer, Some(notice)).await)
}

/// The rewrap job's progress: an HTML fragment that asks to be fetched again each second while
/// the job runs.
#[utoipa::path(get, path = "/console/master-keys/rewrap", tag = "console",
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The progress fragment", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn progress(
    State(state): State<AppState>,
    officer: Officer,
) -> Result<Response, ConsoleError> {
    Ok(fragment(rewrap_progress(&state, &officer).await))
}

/// Retire a decrypt-only version no stored blob uses any more.
#[utoipa::path(post, path = "/console/master-keys/{version}/retire", tag = "console",
    params(("version" = u32, Path, minimum = 1, description = "Master-key version")),
    request_body(content = super::session::CsrfForm, content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Retired: the master keys page", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing changed", content_type = "text/html"),
        (status = 404, description = "`mk_version_not_found`", content_type = "text/html"),
        (status = 409, description = "`mk_version_state` or `mk_version_in_use`", content_type = "text/html"),
    ))]
pub(super) async fn retire(
    State(state): State<AppState>,
    Path(version): Path<String>,
    Submitted { officer, .. }: Submitted,
) -> Result<Response, ConsoleError> {
    let result = custody::retire_master_key(
        State(state.clone()),
        officer.caller.clone(),
        ApiPath(version.clone()),
    )
    .await;
    let notice = Notice::of(result, |_| html! { "Retired v" (version) "." });
    Ok(render(&state, &officer, Some(notice)).await)
}

async fn render(state: &AppState, officer: &Officer, notice: Option<Notice>) -> Response {
    let master_keys = custody::list_master_keys(State(state.clone()), officer.caller.clone())
        .await
        .map(|Json(body)| body);
    let retirable: Vec<u32> = master_keys
        .as_ref()
        .map(|b| {
            b.master_keys
                .iter()
                .filter(|mk| {
                    mk.state == MasterKeyState::DecryptOnly.as_str() && mk.stored_blobs == 0
                })
                .map(|mk| mk.version)
                .collect()
        })
        .unwrap_or_default();
    let content = html! {
        section.card {
            h2 { "Versions" }
            (master_key_table(&master_keys))
            div.actions {
                form.inline method="post" action="/console/master-keys/rotate" {
                    (officer.csrf_field())
                    button type="submit" { "Rotate master key" }
                }
                form.inline method="post" action="/console/master-keys/rewrap" {
                    (officer.csrf_field())
                    button.secondary type="submit" { "Start rewrap" }
                }
                @for v in &retirable {
                    form.inline method="post" action=(format!("/console/master-keys/{v}/retire")) {
                        (officer.csrf_field())
                        button.danger type="submit" { "Retire v" (v) }
                    }
                }
            }
        }
        section.card {
            h2 { "Rewrap" }
            (rewrap_progress(state, officer).await)
        }
    };
    respond(
        officer,
        "Master keys",
        "/console/master-keys",
        notice.as_ref(),
        content,
    )
}

async fn rewrap_progress(state: &AppState, officer: &Officer) -> Markup {
    match custody::get_rewrap(State(state.clone()), officer.caller.clone()).await {
        Ok(Json(job)) => job_markup(&job),
        Err(ApiError::NoRewrapJob) => html! {
            div #rewrap { p.muted { "No rewrap job has run yet." } }
        },
        Err(e) => html! { div #rewrap { (unavailable(&e)) } },
    }
}

/// The job's progress; while it runs, htmx replaces it with a fresh copy every second.
fn job_markup(job: &RewrapJobBody) -> Markup {
    let body = html! {
        p.progress {
            "Job " (job.id) ": " span #rewrap-state { (state_badge(&job.state)) } " · "
            (job.rewrapped) " of " (job.total) " stored blobs moved, " (job.remaining) " remaining"
        }
        progress max=(job.total.max(1)) value=(if job.total == 0 { 1 } else { job.rewrapped }) {}
        p.muted { "Started " (job.started_at) " by " span.mono { (job.started_by) }
            @if let Some(done) = &job.finished_at { "; finished " (done) } }
    };
    if job.state == RewrapJobState::Running.as_str() {
        html! {
            div #rewrap hx-get="/console/master-keys/rewrap" hx-trigger="every 1s" hx-swap="outerHTML" { (body) }
        }
    } else {
        html! { div #rewrap { (body) } }
    }
}
