//! `GET /metrics`: Prometheus (OpenMetrics text). Two kinds of series, both read from memory
//! only, so a scrape opens no token session and sends no query, and answers while the token or
//! Postgres is unreachable:
//! - key custody, from the broker's snapshot (see `broker::custody_gauges`): per master-key
//!   version its seals, stored blobs and presence on the token, and the rewrap job's progress,
//!   with the time each half of the snapshot was read;
//! - HTTP requests by route template, method and status, and their latency, counted by the
//!   request-log layer ([`HttpMetrics`]).
//!
//! Counts, versions and route templates only: no id, name, raw path or key material.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{MatchedPath, State};
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::{ApiError, AppState, ErrorBody};

type Labels = Vec<(String, String)>;

/// The `route` of a request no route matched (its raw path may carry anything).
pub(super) const UNMATCHED: &str = "(unmatched)";

/// Upper bounds (seconds) of the latency buckets: from the sub-millisecond answers of a quiet
/// broker to the 10 s token deadline.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Key-custody gauges and HTTP request metrics in the OpenMetrics text format, for Prometheus.
/// Unauthenticated, like `/healthz`: it holds counts, version numbers and route templates only.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text, read from memory: a scrape opens no token session and sends no query, so it answers while the token or Postgres is down. \
Key custody, from a snapshot the broker keeps (its database half re-read every `KEYBROKER_METRICS_REFRESH_SECS`, 15 s by default, and within a second of a custody change on this broker; its token half read by every maintenance pass): \
`keybroker_master_key_seals`, `keybroker_master_key_stored_blobs`, `keybroker_master_key_on_token` (by `version` and `state`), `keybroker_rewrap_running`, `keybroker_rewrap_blobs_total`, `keybroker_rewrap_blobs_rewrapped`, `keybroker_rewrap_blobs_remaining`, \
`keybroker_custody_database_read_timestamp_seconds` and `keybroker_custody_token_checked_timestamp_seconds` (when each half was read; absent until first read). \
Requests: `keybroker_http_requests_total` (counter by `route`, `method`, `status`) and `keybroker_http_request_duration_seconds` (histogram by `route`, `method`), where `route` is the route template (`/v1/keys/{id}`), or `(unmatched)`.",
            body = String, content_type = "application/openmetrics-text"),
        (status = 500, description = "`internal_error`: the metrics could not be encoded", body = ErrorBody),
    ))]
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut registry = Registry::with_prefix("keybroker");
    register_custody(&mut registry, &state.broker.custody_snapshot());
    state.request_log.http_metrics().register(&mut registry);
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

/// The custody gauges, from the snapshot as it is (a half never read yet is left out).
fn register_custody(registry: &mut Registry, snapshot: &crate::broker::CustodySnapshot) {
    let seals = Family::<Labels, Gauge>::default();
    let blobs = Family::<Labels, Gauge>::default();
    let on_token = Family::<Labels, Gauge>::default();
    for view in snapshot.versions() {
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
        if let Some(held) = view.on_token {
            on_token.get_or_create(&labels).set(i64::from(held));
        }
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
        "Whether the token holds each master-key version, as of the last token check",
        on_token,
    );
    let gauge = |value: i64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        gauge
    };
    if let Some(token) = &snapshot.token {
        registry.register(
            "custody_token_checked_timestamp_seconds",
            "When the token was last asked which master-key versions it holds (each maintenance pass)",
            gauge(token.checked_at),
        );
    }
    let Some(database) = &snapshot.database else {
        return;
    };
    registry.register(
        "custody_database_read_timestamp_seconds",
        "When the custody gauges were last read from the database",
        gauge(database.read_at),
    );
    let job = database.rewrap.as_ref();
    let running = job.is_some_and(|j| j.state == crate::broker::RewrapJobState::Running);
    registry.register(
        "rewrap_running",
        "Whether a rewrap job is running",
        gauge(i64::from(running)),
    );
    registry.register(
        "rewrap_blobs_total",
        "Blobs outside the active version when the latest rewrap job started",
        gauge(job.map_or(0, |j| j.total)),
    );
    registry.register(
        "rewrap_blobs_rewrapped",
        "Blobs the latest rewrap job has moved",
        gauge(job.map_or(0, |j| j.rewrapped)),
    );
    registry.register(
        "rewrap_blobs_remaining",
        "Stored blobs outside the active master-key version",
        gauge(job.map_or(0, |j| j.remaining)),
    );
}

// ---------------------------------------------------------------------------------------------
// Request metrics

/// Request counts and latencies by route, kept by the request-log layer. Recording a request
/// takes the families' read locks (shared, never waited on once a series exists) and a few
/// relaxed atomic additions: no mutex on the request path.
#[derive(Debug, Clone, Default)]
pub(super) struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, LatencyHistogram>,
}

impl HttpMetrics {
    /// Counts one answered request. `route` is the matched route (`None`: no route matched),
    /// `method` from [`method_label`].
    pub(super) fn observe(
        &self,
        route: Option<&MatchedPath>,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let route = Route(route.cloned());
        self.latency
            .get_or_create(&RouteLabels {
                route: route.clone(),
                method,
            })
            .observe(elapsed);
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// Adds both families to a scrape's registry (they are shared handles: no copy is made).
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from the request reaching the broker to its response head, by route template and method",
            self.latency.clone(),
        );
    }
}

/// Methods outside the standard ones share one label, so a client cannot add series at will.
pub(super) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// A route template: the router's own string, shared (cloning it costs no allocation). Only
/// the router's templates and [`UNMATCHED`] ever appear, so the label set stays bounded.
#[derive(Debug, Clone)]
struct Route(Option<MatchedPath>);

impl Route {
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or(UNMATCHED, MatchedPath::as_str)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl Hash for Route {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
    method: &'static str,
}

/// A latency histogram of atomics (prometheus-client's own takes a write lock per observation).
/// A scrape may see a request in `count` and not yet in `sum`; Prometheus tolerates that.
#[derive(Debug, Clone, Default)]
struct LatencyHistogram(std::sync::Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Nanoseconds, so that the sum is an integer addition.
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_ns.fetch_add(nanos, Ordering::Relaxed);
        if let Some(counter) = self.0.buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sum (seconds), count and per-bucket counts, as prometheus-client's encoder takes them.
    fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = Duration::from_nanos(self.0.sum_ns.load(Ordering::Relaxed)).as_secs_f64();
        (sum, count, buckets)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.read();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let (sum, count, buckets) = histogram.read();
        assert_eq!(count, 3);
        assert!((sum - 60.0033).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets[LATENCY_BUCKETS.len()], (f64::MAX, 1));
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "OTHER");
    }

    #[test]
    fn requests_encode_by_route_template_method_and_status() {
        let metrics = HttpMetrics::default();
        metrics.observe(None, "GET", 404, Duration::from_millis(1));
        metrics.observe(None, "GET", 404, Duration::from_millis(2));
        let mut registry = Registry::with_prefix("keybroker");
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "keybroker_http_requests_total{route=\"(unmatched)\",method=\"GET\",status=\"404\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "keybroker_http_request_duration_seconds_count{route=\"(unmatched)\",method=\"GET\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("keybroker_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"(unmatched)\",method=\"GET\"} 2")
                || text.contains("keybroker_http_request_duration_seconds_bucket{route=\"(unmatched)\",method=\"GET\",le=\"+Inf\"} 2"),
            "{text}"
        );
    }
}
