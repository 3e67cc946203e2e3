//! The Clients page: the list, registration (the secret shown once), disable and enable, lock
//! down and unblock, and each client's scopes and address policy. Every action is the admin
//! API's own handler, called with the officer's client.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::overview::unavailable;
use super::session::Submitted;
use super::{ConsoleError, Notice, Officer, respond, state_badge, time};
use crate::api::admin::{
    self, ClientBody, ClientListBody, ListQuery, RegisterClientBody, UpdateClientBody,
};
use crate::api::security::{self, BlockBody, LockdownBody};
use crate::api::{ApiError, ApiJson, ApiPath, AppState};
use crate::auth::Scope;
use crate::broker::ClientState;

/// How many clients a page lists.
const PAGE: u32 = 100;

/// `GET /console/clients` query: paging.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ClientsQuery {
    /// The last client id of the previous page.
    after: Option<Uuid>,
}

/// Clients.
#[utoipa::path(get, path = "/console/clients", tag = "console", params(ClientsQuery),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The clients page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
    query: Result<Query<ClientsQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let after = query.map(|Query(q)| q.after).unwrap_or_default();
    Ok(render(&state, &officer, after, None).await)
}

/// Register a client; the page shows its secret this once.
#[utoipa::path(post, path = "/console/clients", tag = "console",
    request_body(content = inline(RegisterForm), content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Registered: the clients page with the new secret", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing registered", content_type = "text/html"),
        (status = 409, description = "`ip_already_registered`", content_type = "text/html"),
        (status = 422, description = "`invalid_client_metadata`", content_type = "text/html"),
    ))]
pub(super) async fn register(
    State(state): State<AppState>,
    Submitted { officer, fields }: Submitted,
) -> Result<Response, ConsoleError> {
    let body = RegisterClientBody {
        name: fields.text("name").unwrap_or_default(),
        ip_mode: fields.text("ip_mode").unwrap_or_else(|| "none".to_owned()),
        ips: networks(fields.get("ips")),
        scopes: fields.all("scopes"),
        public_key: fields.text("public_key"),
    };
    let result =
        admin::register_client(State(state.clone()), officer.caller.clone(), ApiJson(body)).await;
    let notice = Notice::of(result, |(_, Json(registered))| {
        html! {
            p { "Registered " strong { (registered.client.name) } " with client id "
                code #new-client-id { (registered.client.client_id) } "." }
            p { "Its secret, shown only now (only an HMAC of it is kept):" }
            code.secret #new-client-secret { (registered.client_secret.expose()) }
        }
    });
    Ok(render(&state, &officer, None, Some(notice)).await)
}

/// The form fields of a registration.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct RegisterForm {
    /// This session's CSRF token.
    csrf_token: String,
    /// Display name.
    name: String,
    /// `strict` or `none`.
    ip_mode: String,
    /// Addresses or CIDRs, separated by commas, spaces or lines.
    ips: Option<String>,
    /// One field per scope granted.
    scopes: Vec<String>,
    /// A P-256 public key (SPKI PEM) for `private_key_jwt`.
    public_key: Option<String>,
}

/// Disable, enable, lock down, unblock, or change a client's scopes and addresses.
#[utoipa::path(post, path = "/console/clients/{id}/{action}", tag = "console",
    params(
        ("id" = Uuid, Path, description = "Client id"),
        ("action" = String, Path, description = "`disable`, `enable`, `lockdown`, `unblock` or `update`"),
    ),
    request_body(content = inline(ClientActionForm), content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Done: the clients page saying so", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing changed", content_type = "text/html"),
        (status = 404, description = "`client_not_found`, or no such action", content_type = "text/html"),
        (status = 409, description = "`last_admin` or `ip_already_registered`", content_type = "text/html"),
        (status = 422, description = "`invalid_client_metadata` or `block_not_allowed`", content_type = "text/html"),
    ))]
pub(super) async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    Submitted { officer, fields }: Submitted,
) -> Result<Response, ConsoleError> {
    let caller = officer.caller.clone();
    let s = || State(state.clone());
    let path = || ApiPath(id.clone());
    let result: Result<(ClientBody, String), ApiError> = match action.as_str() {
        "disable" => admin::disable_client(s(), caller, path())
            .await
            .map(|Json(c)| (c, "disabled: its tokens stopped working".to_owned())),
        "enable" => admin::enable_client(s(), caller, path())
            .await
            .map(|Json(c)| (c, "enabled".to_owned())),
        "lockdown" => {
            let block = fields.get("block").is_some().then(|| BlockBody {
                cidrs: None,
                secs: fields.text("block_secs").and_then(|s| s.parse().ok()),
            });
            let body = LockdownBody {
                reason: fields.text("reason"),
                block,
            };
            security::lockdown_client(s(), caller, path(), ApiJson(body))
                .await
                .map(|Json(r)| {
                    let blocked = if r.blocked.is_empty() {
                        "no addresses blocked".to_owned()
                    } else {
                        format!("blocked {}", r.blocked.join(", "))
                    };
                    (r.client, format!("locked down ({blocked})"))
                })
        }
        "unblock" => security::unblock_client(s(), caller, path())
            .await
            .map(|Json(c)| (c, "unblocked: its address blocks are lifted".to_owned())),
        "update" => {
            let body = UpdateClientBody {
                name: None,
                ip_mode: fields.text("ip_mode"),
                ips: Some(networks(fields.get("ips"))),
                scopes: Some(fields.all("scopes")),
                public_key: None,
            };
            admin::update_client(s(), caller, path(), ApiJson(body))
                .await
                .map(|Json(c)| (c, "changed".to_owned()))
        }
        _ => Err(ApiError::NotFound),
    };
    let notice = Notice::of(result, |(client, what)| {
        html! { "Client " strong { (client.name) } " " (what) "." }
    });
    Ok(render(&state, &officer, None, Some(notice)).await)
}

/// The form fields of a client action (each action reads its own).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct ClientActionForm {
    /// This session's CSRF token.
    csrf_token: String,
    /// `lockdown`: why, for the audit trail.
    reason: Option<String>,
    /// `lockdown`: present to also block the client's own networks.
    block: Option<String>,
    /// `lockdown`: for how many seconds (default 3600).
    block_secs: Option<u64>,
    /// `update`: `strict` or `none`.
    ip_mode: Option<String>,
    /// `update`: addresses or CIDRs.
    ips: Option<String>,
    /// `update`: one field per scope granted.
    scopes: Vec<String>,
}

/// Addresses typed into a box: separated by commas, spaces or lines.
fn networks(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn render(
    state: &AppState,
    officer: &Officer,
    after: Option<Uuid>,
    notice: Option<Notice>,
) -> Response {
    let query = ListQuery {
        limit: Some(PAGE),
        after,
    };
    let list = admin::list_clients(
        State(state.clone()),
        officer.caller.clone(),
        Ok(Query(query)),
    )
    .await
    .map(|Json(list)| list);
    let content = html! {
        section.card {
            h2 { "Registered clients" }
            (client_table(officer, &list))
        }
        section.card {
            h2 { "Register a client" }
            form.stack #register method="post" action="/console/clients" {
                (officer.csrf_field())
                label for="name" { "Name" }
                input #name type="text" name="name" required maxlength="200";
                label for="ip_mode" { "Address policy" }
                select #ip_mode name="ip_mode" {
                    option value="none" { "none: from anywhere" }
                    option value="strict" { "strict: only from the addresses below" }
                }
                label for="ips" { "Addresses or CIDRs (strict)" }
                input #ips type="text" name="ips" placeholder="10.0.0.0/24, 192.0.2.7";
                (scope_boxes("register", &[]))
                p { button type="submit" { "Register" } }
            }
        }
    };
    respond(
        officer,
        "Clients",
        "/console/clients",
        notice.as_ref(),
        content,
    )
}

fn client_table(officer: &Officer, list: &Result<ClientListBody, ApiError>) -> Markup {
    html! {
        @match list {
            Ok(list) => {
                table #clients {
                    tr {
                        th { "Name" } th { "Client id" } th { "State" } th { "Scopes" }
                        th { "Addresses" } th { "Created" } th { "Actions" }
                    }
                    @for c in &list.items {
                        tr data-client-id=(c.client_id) {
                            td { (c.name) }
                            td.mono { (c.client_id) }
                            td.client-state { (state_badge(&c.state)) }
                            td { (c.scopes.join(" ")) }
                            td { (c.ip_mode) @if !c.ips.is_empty() { ": " span.mono { (c.ips.join(", ")) } } }
                            td { (time(Some(c.created_at))) }
                            td { (client_actions(officer, c)) }
                        }
                    }
                }
                @if let Some(next) = list.next_after {
                    p.pager { a href=(format!("/console/clients?after={next}")) { "Next page" } }
                }
            },
            Err(e) => (unavailable(e)),
        }
    }
}

fn client_actions(officer: &Officer, c: &ClientBody) -> Markup {
    let action = |name: &str| format!("/console/clients/{}/{name}", c.client_id);
    html! {
        div.actions {
            @if c.state == ClientState::Active.as_str() {
                form.inline method="post" action=(action("disable")) {
                    (officer.csrf_field())
                    button.secondary type="submit" { "Disable" }
                }
            } @else {
                form.inline method="post" action=(action("enable")) {
                    (officer.csrf_field())
                    button.secondary type="submit" { "Enable" }
                }
            }
            form.inline method="post" action=(action("unblock")) {
                (officer.csrf_field())
                button.secondary type="submit" { "Unblock" }
            }
        }
        details {
            summary { "Lock down" }
            form.stack method="post" action=(action("lockdown")) {
                (officer.csrf_field())
                label { "Reason" }
                input type="text" name="reason" placeholder="why, for the audit trail";
                label { input type="checkbox" name="block" value="1"; " Also block its own networks for" }
                input type="number" name="block_secs" value="3600" min="1" max="604800";
                p { button.danger type="submit" { "Lock down" } }
            }
        }
        details {
            summary { "Scopes and addresses" }
            form.stack method="post" action=(action("update")) {
                (officer.csrf_field())
                label { "Address policy" }
                select name="ip_mode" {
                    option value="none" selected[c.ip_mode == "none"] { "none" }
                    option value="strict" selected[c.ip_mode == "strict"] { "strict" }
                }
                label { "Addresses or CIDRs" }
                input type="text" name="ips" value=(c.ips.join(", "));
                (scope_boxes(&c.client_id.to_string(), &c.scopes))
                p { button type="submit" { "Save" } }
            }
        }
    }
}

/// A checkbox per scope, ticked for those held.
fn scope_boxes(prefix: &str, held: &[String]) -> Markup {
    html! {
        fieldset {
            legend { "Scopes" }
            @for scope in Scope::ALL {
                @let name = scope.as_str();
                @let id = format!("{prefix}-scope-{}", name.replace(':', "-"));
                label for=(id) {
                    input id=(id) type="checkbox" name="scopes" value=(name) checked[held.iter().any(|h| h == name)];
                    " " (name)
                }
            }
        }
    }
}
