//! The Overview page: keybroker's objects on the token with their flags, the master-key
//! versions with their state, seals and stored blobs, and whether the token and the database
//! answer.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};

use super::{ConsoleError, Officer, respond, state_badge};
use crate::api::custody::{self, MasterKeysBody};
use crate::api::{ApiError, AppState};
use crate::auth::Scope;

/// Overview.
#[utoipa::path(get, path = "/console/", tag = "console", security(("console_session" = [])),
    responses(
        (status = 200, description = "The overview page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
) -> Result<Response, ConsoleError> {
    officer.caller.require(Scope::Admin)?;
    let readiness = state.broker.readiness().await;
    let objects = state.broker.token_objects().await.map_err(ApiError::from);
    let master_keys = custody::list_master_keys(State(state.clone()), officer.caller.clone())
        .await
        .map(|Json(body)| body);
    let content = html! {
        section.card {
            h2 { "Readiness" }
            table {
                tr { th { "Part" } th { "State" } }
                @for (part, result) in [("token", &readiness.token), ("database", &readiness.database)] {
                    tr {
                        td { (part) }
                        td { (state_badge(match result {
                            Ok(()) => "ok",
                            Err(_) => "unavailable",
                        })) }
                    }
                }
            }
        }
        section.card {
            h2 { "Master keys" }
            (master_key_table(&master_keys))
        }
        section.card {
            h2 { "Token objects" }
            @match &objects {
                Ok(objects) => table #token-objects {
                    tr {
                        th { "Label" } th { "Class" } th { "Key type" } th { "Sensitive" }
                        th { "Extractable" } th { "Never extractable" } th { "Wrap" }
                        th { "Unwrap" } th { "Encrypt" } th { "Decrypt" } th { "Id" }
                    }
                    @for o in objects {
                        tr {
                            td.mono { (o.label) } td { (o.class) } td { (o.key_type) }
                            td { (flag(o.sensitive)) } td { (flag(o.extractable)) }
                            td { (flag(o.never_extractable)) } td { (flag(o.wrap)) }
                            td { (flag(o.unwrap)) } td { (flag(o.encrypt)) }
                            td { (flag(o.decrypt)) } td.mono { (o.id) }
                        }
                    }
                },
                Err(e) => (unavailable(e)),
            }
        }
    };
    Ok(respond(&officer, "Overview", "/console/", None, content))
}

/// The master-key versions: state, whether the token holds each, seals and stored blobs.
pub(super) fn master_key_table(master_keys: &Result<MasterKeysBody, ApiError>) -> Markup {
    html! {
        @match master_keys {
            Ok(body) => table #master-keys {
                tr {
                    th { "Version" } th { "State" } th { "On token" }
                    th.num { "Seals" } th.num { "Stored blobs" } th { "Created" }
                    th { "Activated" } th { "Retired" }
                }
                @for mk in &body.master_keys {
                    tr {
                        td { "v" (mk.version) }
                        td { (state_badge(&mk.state)) }
                        td { (if mk.on_token { "yes" } else { "no" }) }
                        td.num { (mk.seals) }
                        td.num { (mk.stored_blobs) }
                        td.mono { (mk.created_at.as_deref().unwrap_or("–")) }
                        td.mono { (mk.activated_at.as_deref().unwrap_or("–")) }
                        td.mono { (mk.retired_at.as_deref().unwrap_or("–")) }
                    }
                }
            },
            Err(e) => (unavailable(e)),
        }
    }
}

/// A part of a page that could not be read, and why (the API's code and message).
pub(super) fn unavailable(e: &ApiError) -> Markup {
    let (_, code) = e.status_and_code();
    html! { p.notice.error { strong { (code) } ": " (e.body().error.message) } }
}

fn flag(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "–",
    }
}
