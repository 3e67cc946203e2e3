//! The Keys page: the officer's own managed keys (the API's ownership rule: a client sees and
//! changes its own keys) with a state filter, every client's keys due for rotation or expiry,
//! and rotate and disable, each through the keys API's own handler.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::html;
use serde::Deserialize;

use super::overview::unavailable;
use super::session::Submitted;
use super::{ConsoleError, Notice, Officer, respond, state_badge, time};
use crate::api::keys::{self, KeyBody, KeyListQuery};
use crate::api::usage::{self, DueQuery};
use crate::api::{ApiError, ApiPath, AppState};
use crate::broker::KeyState;

/// `GET /console/keys` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct KeysQuery {
    /// Only keys in this state (empty: all).
    state: Option<String>,
    /// The report's horizon in days (30).
    within_days: Option<u32>,
}

/// Keys.
#[utoipa::path(get, path = "/console/keys", tag = "console", params(KeysQuery),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The keys page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
    query: Result<Query<KeysQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    Ok(render(&state, &officer, query, None).await)
}

/// Rotate or disable one of the officer's keys.
#[utoipa::path(post, path = "/console/keys/{id}/{action}", tag = "console",
    params(
        ("id" = uuid::Uuid, Path, description = "Key id"),
        ("action" = String, Path, description = "`rotate` or `disable`"),
    ),
    request_body(content = super::session::CsrfForm, content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Done: the keys page saying so", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's (nothing changed), or `insufficient_scope`", content_type = "text/html"),
        (status = 404, description = "`key_not_found`, or no such action", content_type = "text/html"),
        (status = 409, description = "The key's state forbids it", content_type = "text/html"),
    ))]
pub(super) async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    Submitted { officer, .. }: Submitted,
) -> Result<Response, ConsoleError> {
    let s = State(state.clone());
    let caller = officer.caller.clone();
    let result: Result<(KeyBody, &str), ApiError> = match action.as_str() {
        "rotate" => keys::rotate_key(s, caller, ApiPath(id))
            .await
            .map(|Json(k)| (k, "rotated")),
        "disable" => keys::disable_key(s, caller, ApiPath(id))
            .await
            .map(|Json(k)| (k, "disabled")),
        _ => Err(ApiError::NotFound),
    };
    let notice = Notice::of(result, |(key, what)| {
        html! { "Key " strong { (key.name) } " " (what) " (now version " (key.current_version) ")." }
    });
    Ok(render(&state, &officer, KeysQuery::default(), Some(notice)).await)
}

async fn render(
    state: &AppState,
    officer: &Officer,
    query: KeysQuery,
    notice: Option<Notice>,
) -> Response {
    let filter = query.state.filter(|s| !s.is_empty());
    let list = keys::list_keys(
        State(state.clone()),
        officer.caller.clone(),
        Ok(Query(KeyListQuery {
            state: filter.clone(),
            name: None,
            limit: Some(500),
            after: None,
        })),
    )
    .await
    .map(|Json(list)| list);
    let within_days = query.within_days.unwrap_or(30);
    let due = usage::keys_due(
        State(state.clone()),
        officer.caller.clone(),
        Ok(Query(DueQuery {
            within_days: Some(within_days),
        })),
    )
    .await
    .map(|Json(due)| due);
    let content = html! {
        section.card {
            h2 { "Managed keys of this client" }
            form.filters method="get" action="/console/keys" {
                label { "State"
                    select name="state" {
                        option value="" { "any" }
                        @for s in KeyState::ALL.iter().map(|s| s.as_str()) {
                            option value=(s) selected[filter.as_deref() == Some(s)] { (s) }
                        }
                    }
                }
                button.secondary type="submit" { "Filter" }
            }
            @match &list {
                Ok(list) if list.items.is_empty() => p.muted { "No keys." },
                Ok(list) => table #keys {
                    tr {
                        th { "Name" } th { "Id" } th { "State" } th { "Version" } th { "Format" }
                        th { "Rotation" } th { "Next rotation" } th { "Expires" } th { "Actions" }
                    }
                    @for k in &list.items {
                        tr {
                            td { (k.name) } td.mono { (k.id) } td { (state_badge(&k.state)) }
                            td.num { (k.current_version) } td { (k.format) " " (k.length) }
                            td { (k.rotation) @if let Some(days) = k.rotation_period_days { " / " (days) " d" } }
                            td { (time(k.next_rotation_at)) } td { (time(k.expires_at)) }
                            td {
                                @if k.state == KeyState::Active.as_str() {
                                    div.actions {
                                        form.inline method="post" action=(format!("/console/keys/{}/rotate", k.id)) {
                                            (officer.csrf_field())
                                            button.secondary type="submit" { "Rotate" }
                                        }
                                        form.inline method="post" action=(format!("/console/keys/{}/disable", k.id)) {
                                            (officer.csrf_field())
                                            button.secondary type="submit" { "Disable" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                },
                Err(e) => (unavailable(e)),
            }
        }
        section.card {
            h2 { "Due for rotation or expiry within " (within_days) " days (every client)" }
            @match &due {
                Ok(due) if due.items.is_empty() => p.muted { "Nothing due." },
                Ok(due) => table #keys-due {
                    tr { th { "Client" } th { "Key" } th { "State" } th { "Next rotation" } th { "Expires" } }
                    @for d in &due.items {
                        tr {
                            td.mono { (d.client_id) } td { (d.key.name) } td { (state_badge(&d.key.state)) }
                            td { (time(d.key.next_rotation_at)) } td { (time(d.key.expires_at)) }
                        }
                    }
                },
                Err(e) => (unavailable(e)),
            }
        }
    };
    respond(officer, "Keys", "/console/keys", notice.as_ref(), content)
}
