//! The Settings page: the security settings (rate limits, failed-authentication throttle,
//! automatic response) as a form, read and saved through the admin API's own handlers (which
//! validate and audit them).

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use maud::html;
use serde_json::{Map, Value};

use super::overview::unavailable;
use super::session::Submitted;
use super::{ConsoleError, Notice, Officer, respond};
use crate::api::{ApiError, ApiJson, AppState, security};
use crate::broker::BrokerError;
use crate::broker::SecuritySettings;

/// Settings.
#[utoipa::path(get, path = "/console/settings", tag = "console",
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The security settings form", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
) -> Result<Response, ConsoleError> {
    Ok(render(&state, &officer, None).await)
}

/// Save the security settings (every field of the form; see `PUT /v1/admin/security-settings`).
#[utoipa::path(post, path = "/console/settings", tag = "console",
    request_body(content = SecuritySettings, description = "The settings' fields as form fields, with `csrf_token`", content_type = "application/x-www-form-urlencoded"),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "Saved: the form with the new settings", content_type = "text/html"),
        (status = 403, description = "CSRF token missing or another session's; nothing changed", content_type = "text/html"),
        (status = 422, description = "`invalid_request`: a value out of range", content_type = "text/html"),
    ))]
pub(super) async fn save(
    State(state): State<AppState>,
    Submitted { officer, fields }: Submitted,
) -> Result<Response, ConsoleError> {
    // The settings' own names and types decide which fields are read and how.
    let template = serde_json::to_value(SecuritySettings::default()).unwrap_or_default();
    let mut submitted = Map::new();
    if let Value::Object(template) = template {
        for (name, example) in template {
            let Some(text) = fields.text(&name) else {
                continue;
            };
            let value = if example.is_u64() {
                text.parse::<u64>().ok().map(Value::from)
            } else {
                text.parse::<f64>().ok().map(Value::from)
            };
            let Some(value) = value else {
                let e =
                    ApiError::from(BrokerError::InvalidSpec(format!("{name} must be a number")));
                return Ok(render(
                    &state,
                    &officer,
                    Some(Notice::of::<()>(Err(e), |()| html! {})),
                )
                .await);
            };
            submitted.insert(name, value);
        }
    }
    let result = match serde_json::from_value::<SecuritySettings>(Value::Object(submitted)) {
        Ok(settings) => {
            security::put_security_settings(
                State(state.clone()),
                officer.caller.clone(),
                ApiJson(settings),
            )
            .await
        }
        Err(_) => Err(ApiError::from(BrokerError::InvalidSpec(
            "a setting is out of its type's range".to_owned(),
        ))),
    };
    let notice = Notice::of(
        result,
        |_| html! { "Saved: every broker applies them within a few seconds." },
    );
    Ok(render(&state, &officer, Some(notice)).await)
}

async fn render(state: &AppState, officer: &Officer, notice: Option<Notice>) -> Response {
    let current = security::get_security_settings(State(state.clone()), officer.caller.clone())
        .await
        .map(|Json(s)| serde_json::to_value(s).unwrap_or_default());
    let content = html! {
        section.card {
            @match &current {
                Ok(Value::Object(fields)) => form.stack #settings method="post" action="/console/settings" {
                    (officer.csrf_field())
                    @for (name, value) in fields {
                        label for=(name) { (name) }
                        input id=(name) type="number" name=(name) value=(value)
                            step=(if value.is_u64() { "1" } else { "any" }) required;
                    }
                    p { button type="submit" { "Save settings" } }
                },
                Ok(_) => p.muted { "No settings." },
                Err(e) => (unavailable(e)),
            }
        }
    };
    respond(
        officer,
        "Settings",
        "/console/settings",
        notice.as_ref(),
        content,
    )
}
