//! The request log: a layer that records one row per HTTP request (refused ones included), and
//! counts it in the `/metrics` request counters and latency histograms with the same timing,
//! and the background writer that stores those rows in batches. The same layer opens each
//! request's `request` span (request id, method, route, then the client once authenticated), so
//! every log line written while the request runs carries them, and writes one access line per
//! request (target `keybroker::access`, level INFO) with its status and latency. Requests never wait for Postgres:
//! rows go through a bounded queue, and when it is full a row is dropped and counted rather
//! than the request slowed or failed. [`RequestLog::shutdown`] writes whatever is queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use super::metrics::{HttpMetrics, UNMATCHED, method_label};
use super::{AppState, ErrorBody, REQUEST_ID, error_chain, request_source};
use crate::broker::{Broker, RequestLogRow};

/// Rows waiting for the writer; beyond this, new rows are dropped.
const QUEUE: usize = 10_000;
/// Rows per insert.
const BATCH: usize = 500;
/// Rows the writer keeps while Postgres is unreachable; beyond this the oldest are dropped.
const MAX_HELD: usize = 100_000;
/// First and longest pause after a failed insert.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long the writer keeps trying to write what is left once stopped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long [`RequestLog::shutdown`] waits for the writer: its own limit, plus one slow insert.
const SHUTDOWN_BACKSTOP: Duration = Duration::from_secs(15);

/// The target of the access lines and request spans (for routing them apart, or off).
pub const ACCESS: &str = "keybroker::access";

const MAX_USER_AGENT: usize = 512;
const MAX_HOST: usize = 255;
const MAX_REQUEST_ID: usize = 128;
const MAX_METHOD: usize = 32;

/// The handle to the request-log writer. Cheap to clone; every clone feeds the same writer.
#[derive(Clone)]
pub struct RequestLog {
    shared: Arc<Shared>,
}

struct Shared {
    queue: mpsc::Sender<RequestLogRow>,
    /// Rows lost: queue full or closed, or held too long while Postgres was down.
    dropped: Arc<AtomicU64>,
    /// Taken by the first [`RequestLog::shutdown`].
    writer: Mutex<Option<Writer>>,
    /// Requests by route, method and status, and their latency, for `/metrics`. Here because
    /// the layer that writes the rows already times every request.
    http: HttpMetrics,
}

struct Writer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl RequestLog {
    /// Starts the writer task on the current Tokio runtime (call it from within one). It writes
    /// what it has every `flush_every`, and at once whenever a batch of 500 rows is ready.
    pub fn start(broker: Arc<Broker>, flush_every: Duration) -> Self {
        let (queue, rows) = mpsc::channel(QUEUE);
        let (stop, stopped) = oneshot::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        // A zero period would make the timer panic; a millisecond is as good as immediate.
        let flush_every = flush_every.max(Duration::from_millis(1));
        let task = tokio::spawn(write(broker, flush_every, rows, stopped, dropped.clone()));
        Self {
            shared: Arc::new(Shared {
                queue,
                dropped,
                writer: Mutex::new(Some(Writer { stop, task })),
                http: HttpMetrics::default(),
            }),
        }
    }

    /// The request counters and latency histograms `/metrics` shows.
    pub(super) fn http_metrics(&self) -> &HttpMetrics {
        &self.shared.http
    }

    /// How many rows were lost since start (queue full, or Postgres down for too long).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Stops taking rows and waits (about 10 s at most) until every queued row is written. Call it
    /// after the HTTP server has drained, so in-flight requests get their rows. Later calls, and
    /// calls on other clones, return at once.
    pub async fn shutdown(self) {
        let writer = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Writer { stop, mut task }) = writer else {
            return;
        };
        // The writer may have ended already; then there is nothing left to wait for.
        let _ = stop.send(());
        match tokio::time::timeout(SHUTDOWN_BACKSTOP, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(target: "keybroker::request_log", error = %e, "request log writer failed");
            }
            Err(_) => {
                task.abort();
                tracing::error!(
                    target: "keybroker::request_log",
                    "request log rows not written within the shutdown wait; they are lost"
                );
            }
        }
    }

    /// Queues a row without waiting; a full or closed queue drops it.
    fn submit(&self, row: RequestLogRow) {
        if self.shared.queue.try_send(row).is_err() {
            count_dropped(&self.shared.dropped, 1, "request log queue full or closed");
        }
    }
}

/// Counts lost rows, warning at the first and then at each power of two, so a flood of drops
/// does not become a flood of log lines.
fn count_dropped(dropped: &AtomicU64, n: u64, why: &'static str) {
    let before = dropped.fetch_add(n, Ordering::Relaxed);
    let after = before.saturating_add(n);
    let crossed = before
        .checked_add(1)
        .and_then(u64::checked_next_power_of_two)
        .is_some_and(|p| p <= after);
    if crossed {
        tracing::warn!(target: "keybroker::request_log", dropped = after, why, "request log rows dropped");
    }
}

/// The writer: gathers rows, inserts them in batches of [`BATCH`] every `flush_every` (or as
/// soon as a batch is full), backs off while Postgres fails, and on stop writes what remains.
async fn write(
    broker: Arc<Broker>,
    flush_every: Duration,
    mut rows: mpsc::Receiver<RequestLogRow>,
    mut stop: oneshot::Receiver<()>,
    dropped: Arc<AtomicU64>,
) {
    let mut held: Vec<RequestLogRow> = Vec::new();
    let mut ticks = tokio::time::interval(flush_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    let mut stopping = false;
    loop {
        tokio::select! {
            received = rows.recv_many(&mut held, BATCH) => {
                if received == 0 {
                    // Closed and empty: everything queued is now held.
                    break;
                }
                if held.len() > MAX_HELD {
                    let excess = held.len() - MAX_HELD;
                    held.drain(..excess);
                    count_dropped(&dropped, excess as u64, "request log backlog over its bound");
                }
                if held.len() >= BATCH && backoff.due() {
                    flush(&broker, &mut held, &mut backoff).await;
                }
            }
            _ = ticks.tick() => {
                if !held.is_empty() && backoff.due() {
                    flush(&broker, &mut held, &mut backoff).await;
                }
            }
            // A stop, or the handle gone without one: take no more rows, drain the queue.
            _ = &mut stop, if !stopping => {
                stopping = true;
                rows.close();
            }
        }
    }
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    while !held.is_empty() {
        if flush(&broker, &mut held, &mut backoff).await {
            break;
        }
        if Instant::now() + RETRY_MIN > deadline {
            let lost = held.len() as u64;
            count_dropped(&dropped, lost, "request log not written at shutdown");
            tracing::error!(target: "keybroker::request_log", lost, "request log rows lost at shutdown");
            break;
        }
        tokio::time::sleep(RETRY_MIN).await;
    }
}

/// Inserts the held rows batch by batch; stops at the first failure, keeping the rest for a
/// later try. Returns whether everything was written.
async fn flush(broker: &Broker, held: &mut Vec<RequestLogRow>, backoff: &mut Backoff) -> bool {
    while !held.is_empty() {
        let n = held.len().min(BATCH);
        match broker.write_request_log(&held[..n]).await {
            Ok(()) => {
                held.drain(..n);
                backoff.succeeded();
            }
            Err(e) => {
                tracing::warn!(
                    target: "keybroker::request_log",
                    error = %error_chain(&e),
                    held = held.len(),
                    "request log rows not written yet; retrying"
                );
                backoff.failed();
                return false;
            }
        }
    }
    true
}

/// When the writer may try Postgres again after a failure: a pause doubling up to a limit.
#[derive(Debug, Default)]
struct Backoff {
    wait: Option<Duration>,
    next: Option<Instant>,
}

impl Backoff {
    fn due(&self) -> bool {
        self.next.is_none_or(|at| Instant::now() >= at)
    }

    fn failed(&mut self) {
        let wait = self.wait.map_or(RETRY_MIN, |w| (w * 2).min(RETRY_MAX));
        self.wait = Some(wait);
        self.next = Some(Instant::now() + wait);
    }

    fn succeeded(&mut self) {
        self.wait = None;
        self.next = None;
    }
}

// ---------------------------------------------------------------------------------------------
// The layer

/// What handlers learn about a request that its log row needs: the client that authenticated.
/// The [`record`] layer puts one in each request's extensions; the `Caller` extractor fills it.
#[derive(Debug, Clone, Default)]
pub(super) struct RequestFacts(Arc<OnceLock<Uuid>>);

impl RequestFacts {
    /// Records the authenticated client (the first one set stays), in the row and in the
    /// request's span.
    pub(super) fn set_client(&self, id: Uuid) {
        if self.0.set(id).is_ok() {
            tracing::Span::current().record("client_id", tracing::field::display(id));
        }
    }

    fn client(&self) -> Option<Uuid> {
        self.0.get().copied()
    }
}

/// The stable error code of a response that does not carry an [`ErrorBody`] (the token
/// endpoint's RFC 6749 errors), as a response extension.
#[derive(Debug, Clone, Copy)]
pub(super) struct ErrorCode(pub(super) &'static str);

/// The layer: times the request and queues its row once the response head is ready.
pub(super) async fn record(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let at_us = crate::audit::now_us();
    let (mut parts, body) = request.into_parts();
    let facts = RequestFacts::default();
    parts.extensions.insert(facts.clone());
    let source_ip = request_source(&parts, &state);
    let request_id = header_text(parts.headers.get(REQUEST_ID), MAX_REQUEST_ID).unwrap_or_default();
    let user_agent = header_text(parts.headers.get(header::USER_AGENT), MAX_USER_AGENT);
    // HTTP/2 carries the host as the `:authority` pseudo-header, which lands in the URI.
    let host = header_text(parts.headers.get(header::HOST), MAX_HOST)
        .or_else(|| parts.uri.authority().map(|a| bounded(a.as_str(), MAX_HOST)));
    let method = bounded(parts.method.as_str(), MAX_METHOD);
    let method_label = method_label(&parts.method);
    let route = parts.extensions.get::<MatchedPath>().cloned();
    let path = route
        .as_ref()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();

    let span = tracing::info_span!(
        target: ACCESS,
        "request",
        request_id = %request_id,
        method = %method,
        route = %path,
        client_id = tracing::field::Empty,
    );
    let response = next
        .run(Request::from_parts(parts, body))
        .instrument(span)
        .await;

    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .request_log
        .http_metrics()
        .observe(route.as_ref(), method_label, status, elapsed);
    // Rounded up: a request always took some time.
    let latency_us = i64::try_from(elapsed.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX);
    let extensions = response.extensions();
    let error_code = extensions
        .get::<ErrorBody>()
        .map(|b| b.error.code.clone())
        .or_else(|| extensions.get::<ErrorCode>().map(|c| c.0.to_owned()));
    tracing::info!(
        target: ACCESS,
        request_id = %request_id,
        client_id = facts.client().map(tracing::field::display),
        method = %method,
        route = %path,
        status,
        // Microseconds, in milliseconds (a float that prints short).
        latency_ms = elapsed.as_micros() as f64 / 1000.0,
        error_code = error_code.as_deref(),
        "request"
    );
    state.request_log.submit(RequestLogRow {
        at_us,
        request_id,
        client_id: facts.client(),
        source_ip,
        user_agent,
        host,
        method,
        path,
        status: i16::try_from(status).unwrap_or(i16::MAX),
        error_code,
        latency_us,
    });
    response
}

/// A header's text (bytes that are not UTF-8 replaced), at most `max` characters.
fn header_text(value: Option<&HeaderValue>, max: usize) -> Option<String> {
    value.map(|v| bounded(&String::from_utf8_lossy(v.as_bytes()), max))
}

fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_counts_characters_not_bytes() {
        assert_eq!(bounded("ééé", 2), "éé");
        assert_eq!(bounded("ab", 5), "ab");
    }

    #[test]
    fn header_text_keeps_what_is_not_utf8() {
        let value = HeaderValue::from_bytes(b"agent/\xff1").ok();
        assert_eq!(
            header_text(value.as_ref(), 512).as_deref(),
            Some("agent/\u{fffd}1")
        );
        let long = HeaderValue::from_str(&"a".repeat(600)).ok();
        assert_eq!(header_text(long.as_ref(), 512).map(|s| s.len()), Some(512));
    }

    #[test]
    fn backoff_doubles_to_its_limit_and_resets() {
        let mut backoff = Backoff::default();
        assert!(backoff.due());
        backoff.failed();
        assert!(!backoff.due());
        assert_eq!(backoff.wait, Some(RETRY_MIN));
        for _ in 0..20 {
            backoff.failed();
        }
        assert_eq!(backoff.wait, Some(RETRY_MAX));
        backoff.succeeded();
        assert!(backoff.due());
        assert_eq!(backoff.wait, None);
    }

    #[test]
    fn drops_are_counted() {
        let dropped = AtomicU64::new(0);
        count_dropped(&dropped, 1, "test");
        count_dropped(&dropped, 5, "test");
        assert_eq!(dropped.load(Ordering::Relaxed), 6);
    }
}
