//! Health, readiness and the OpenAPI document's endpoint.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, AppState, openapi};

/// `GET /healthz` and `GET /readyz` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `unavailable` (readyz only).
    pub status: String,
    /// Per part (`token`, `database`): `ok` or the error code (readyz only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(super) async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".to_owned(),
        checks: BTreeMap::new(),
    })
}

/// Readiness: a token session and Postgres both answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Token or database unavailable; `checks` says which", body = HealthResponse),
    ))]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.broker.readiness().await;
    let mut checks = BTreeMap::new();
    let mut ready = true;
    for (part, result) in [("token", readiness.token), ("database", readiness.database)] {
        let verdict = match result {
            Ok(()) => "ok".to_owned(),
            Err(err) => {
                ready = false;
                let err = ApiError::from(err);
                tracing::warn!(target: "keybroker::api", part, error = %err, "not ready");
                err.status_and_code().1.to_owned()
            }
        };
        checks.insert(part.to_owned(), verdict);
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = HealthResponse {
        status: word.to_owned(),
        checks,
    };
    (status, Json(body)).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub(super) async fn openapi(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(openapi::document(openapi::DocumentLimits {
        max_batch: state.broker.max_batch(),
    }))
}
