//! `GET /metrics`: Prometheus (OpenMetrics text) gauges of key custody, read from Postgres and
//! the token at scrape time: per master-key version its seals, stored blobs and presence on the
//! token, and the rewrap job's progress. Counts and versions only: no id, name or key material.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{ApiError, AppState, ErrorBody};

type Labels = Vec<(String, String)>;

/// Key-custody gauges in the OpenMetrics text format, for Prometheus. Unauthenticated, like
/// `/healthz`: it holds counts and version numbers only.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text: `keybroker_master_key_seals`, `keybroker_master_key_stored_blobs`, `keybroker_master_key_on_token` (by `version` and `state`), `keybroker_rewrap_running`, `keybroker_rewrap_blobs_total`, `keybroker_rewrap_blobs_rewrapped`, `keybroker_rewrap_blobs_remaining`",
            body = String, content_type = "application/openmetrics-text"),
        (status = 503, description = "`hsm_unavailable`, `hsm_timeout` or `database_unavailable`", body = ErrorBody),
    ))]
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let versions = state.broker.master_key_overview().await?;
    let job = state.broker.rewrap_job().await?;

    let mut registry = Registry::with_prefix("keybroker");
    let seals = Family::<Labels, Gauge>::default();
    let blobs = Family::<Labels, Gauge>::default();
    let on_token = Family::<Labels, Gauge>::default();
    for view in &versions {
        let state = view
            .recorded
            .as_ref()
            .map_or("unrecorded", |row| row.state.as_str());
        let labels = vec![
            ("version".to_owned(), view.version.get().to_string()),
            ("state".to_owned(), state.to_owned()),
        ];
        if let Some(row) = &view.recorded {
            seals.get_or_create(&labels).set(row.seals);
            blobs.get_or_create(&labels).set(row.stored_blobs);
        }
        on_token
            .get_or_create(&labels)
            .set(i64::from(view.on_token));
    }
    registry.register(
        "master_key_seals",
        "Seals done under each master-key version (an upper bound)",
        seals,
    );
    registry.register(
        "master_key_stored_blobs",
        "Stored blobs sealed under each master-key version",
        blobs,
    );
    registry.register(
        "master_key_on_token",
        "Whether the token holds each master-key version",
        on_token,
    );
    let gauge = |value: i64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        gauge
    };
    let running = job.as_ref().is_some_and(|j| j.state == "running");
    registry.register(
        "rewrap_running",
        "Whether a rewrap job is running",
        gauge(i64::from(running)),
    );
    registry.register(
        "rewrap_blobs_total",
        "Blobs outside the active version when the latest rewrap job started",
        gauge(job.as_ref().map_or(0, |j| j.total)),
    );
    registry.register(
        "rewrap_blobs_rewrapped",
        "Blobs the latest rewrap job has moved",
        gauge(job.as_ref().map_or(0, |j| j.rewrapped)),
    );
    registry.register(
        "rewrap_blobs_remaining",
        "Stored blobs outside the active master-key version",
        gauge(job.as_ref().map_or(0, |j| j.remaining)),
    );
    let mut body = String::new();
    encode(&mut body, &registry).map_err(|_| ApiError::MetricsEncoding)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
