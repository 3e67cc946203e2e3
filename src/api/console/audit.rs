//! The Audit page: events with filters and paging, and the chain verification, both through
//! the admin API's own handlers.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;
use serde::Deserialize;
use uuid::Uuid;

use super::overview::unavailable;
use super::{ConsoleError, Notice, Officer, respond, state_badge, utc};
use crate::api::audit::{self, AuditQuery};
use crate::api::{ApiError, AppState};

/// Events a page shows.
const PAGE: u32 = 50;
const SEVERITIES: [&str; 4] = ["info", "warning", "error", "critical"];

/// `GET /console/audit` query: the filter form's fields (blank means any).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditFilterQuery {
    /// One event name, e.g. `client.disabled`.
    event: Option<String>,
    /// `info`, `warning`, `error` or `critical`.
    severity: Option<String>,
    /// Events concerning this client.
    client_id: Option<String>,
    /// Events concerning this key or secret.
    key_id: Option<String>,
    /// The last position of the previous page.
    after_seq: Option<i64>,
}

/// Audit.
#[utoipa::path(get, path = "/console/audit", tag = "console", params(AuditFilterQuery),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The audit page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
    query: Result<Query<AuditFilterQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    Ok(render(&state, &officer, query, None).await)
}

/// Verify the audit chain: intact, or the first broken row.
#[utoipa::path(get, path = "/console/audit/verify", tag = "console",
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The audit page with the verdict", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn verify(
    State(state): State<AppState>,
    officer: Officer,
) -> Result<Response, ConsoleError> {
    let verdict = audit::audit_verify(State(state.clone()), officer.caller.clone()).await;
    let notice = match verdict {
        Ok(Json(v)) if v.intact => Notice::Done(html! {
            span #chain-verdict { (state_badge("intact")) " The audit chain is intact: "
                (v.rows) " rows verified." }
        }),
        Ok(Json(v)) => Notice::Done(html! {
            span #chain-verdict { (state_badge("broken")) " The audit chain is broken at row "
                strong { (v.first_broken_seq.unwrap_or_default()) } ": "
                (v.reason.unwrap_or_default()) " (" (v.rows) " rows checked)." }
        }),
        Err(e) => Notice::of::<()>(Err(e), |()| html! {}),
    };
    Ok(render(&state, &officer, AuditFilterQuery::default(), Some(notice)).await)
}

async fn render(
    state: &AppState,
    officer: &Officer,
    q: AuditFilterQuery,
    notice: Option<Notice>,
) -> Response {
    let blank = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let event = blank(&q.event);
    let severity = blank(&q.severity);
    let client_id = blank(&q.client_id);
    let key_id = blank(&q.key_id);
    let uuid = |v: &Option<String>, what: &str| match v {
        Some(text) => Uuid::parse_str(text)
            .map(Some)
            .map_err(|_| ApiError::InvalidQuery(format!("{what} must be a UUID"))),
        None => Ok(None),
    };
    let events = async {
        let query = AuditQuery {
            from: None,
            to: None,
            client_id: uuid(&client_id, "client_id")?,
            key_id: uuid(&key_id, "key_id")?,
            event: event.clone(),
            severity: severity.clone(),
            after_seq: q.after_seq,
            limit: Some(PAGE),
        };
        audit::audit_events(
            State(state.clone()),
            officer.caller.clone(),
            Ok(Query(query)),
        )
        .await
        .map(|Json(page)| page)
    }
    .await;
    let next_link = |next: i64| {
        let mut link = format!("/console/audit?after_seq={next}");
        for (name, value) in [
            ("event", &event),
            ("severity", &severity),
            ("client_id", &client_id),
            ("key_id", &key_id),
        ] {
            if let Some(v) = value {
                link.push_str(&format!("&{name}={}", form_encode(v)));
            }
        }
        link
    };
    let content = html! {
        section.card {
            form method="get" action="/console/audit/verify" {
                button #verify-chain type="submit" { "Verify chain" }
                " " span.muted { "Checks every row's MAC and link, in the token." }
            }
        }
        section.card {
            h2 { "Events" }
            form.filters method="get" action="/console/audit" {
                label { "Event" input type="text" name="event" value=(event.as_deref().unwrap_or("")) placeholder="e.g. client.disabled"; }
                label { "Severity"
                    select name="severity" {
                        option value="" { "any" }
                        @for s in SEVERITIES {
                            option value=(s) selected[severity.as_deref() == Some(s)] { (s) }
                        }
                    }
                }
                label { "Client id" input type="text" name="client_id" value=(client_id.as_deref().unwrap_or("")); }
                label { "Key id" input type="text" name="key_id" value=(key_id.as_deref().unwrap_or("")); }
                button.secondary type="submit" { "Filter" }
            }
            @match &events {
                Ok(page) if page.items.is_empty() => p.muted { "No events." },
                Ok(page) => {
                    table #audit-events {
                        tr {
                            th.num { "#" } th { "When (UTC)" } th { "Severity" } th { "Event" }
                            th { "Actor" } th { "Subject" } th { "Source" } th { "Details" }
                        }
                        @for e in &page.items {
                            tr {
                                td.num { (e.seq) }
                                td.mono.nowrap { (utc(e.at_us.div_euclid(1_000_000))) }
                                td { (state_badge(&e.severity)) }
                                td.mono { (e.event) }
                                td.mono.id { (e.actor) }
                                td.mono.id { (e.subject.as_deref().unwrap_or("")) }
                                td.mono { (e.source_ip.as_deref().unwrap_or("")) }
                                td.mono.details { (e.details) }
                            }
                        }
                    }
                    @if let Some(next) = page.next_after_seq {
                        p.pager { a href=(next_link(next)) { "Next page" } }
                    }
                },
                Err(e) => (unavailable(e)),
            }
        }
    };
    respond(officer, "Audit", "/console/audit", notice.as_ref(), content)
}

/// Percent-encodes a query value (everything but unreserved characters).
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(form_encode("key.rotated"), "key.rotated");
        assert_eq!(form_encode("a&b=c d"), "a%26b%3Dc%20d");
    }
}
