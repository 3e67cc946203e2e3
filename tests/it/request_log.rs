//! The request log: a row for every request, refused ones included, with the route template
//! and never the raw path; none lost when the server stops gracefully; purge by age.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keybroker::auth::IpPolicy;
use keybroker::store::RequestLogRow;
use serde_json::{Value, json};
use sqlx::Row;

use crate::child::ChildServer;
use crate::common::{PATIENCE, TestServer, scratch_dir};
use crate::token::PrivateToken;

const AGENT: &str = "request-log-test/1.0";

/// What the client saw of one request.
#[derive(Debug)]
struct Seen {
    request_id: String,
    status: u16,
}

/// Sends a request with our user agent; returns the status and the `x-request-id` header.
async fn send(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Seen {
    let mut request = server
        .client
        .request(method, format!("{}{path}", server.base))
        .header("user-agent", AGENT);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    Seen {
        request_id,
        status: response.status().as_u16(),
    }
}

/// One row as the test reads it back.
#[derive(Debug, PartialEq)]
struct Logged {
    client_id: Option<uuid::Uuid>,
    source_ip: String,
    user_agent: Option<String>,
    host: Option<String>,
    method: String,
    path: String,
    status: i16,
    error_code: Option<String>,
    latency_us: i64,
    at: f64,
}

/// Every row of these request ids, by request id (several rows per id would be a bug).
async fn rows_for(database_url: &str, ids: &[String]) -> HashMap<String, Vec<Logged>> {
    let pool = sqlx::PgPool::connect(database_url).await.unwrap();
    let rows = sqlx::query(
        "SELECT request_id, client_id, host(source_ip) AS source_ip, user_agent, host, method,
                path, status, error_code, latency_us,
                extract(epoch FROM at)::float8 AS at
         FROM request_log WHERE request_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut by_id: HashMap<String, Vec<Logged>> = HashMap::new();
    for row in rows {
        by_id
            .entry(row.get("request_id"))
            .or_default()
            .push(Logged {
                client_id: row.get("client_id"),
                source_ip: row.get("source_ip"),
                user_agent: row.get("user_agent"),
                host: row.get("host"),
                method: row.get("method"),
                path: row.get("path"),
                status: row.get("status"),
                error_code: row.get("error_code"),
                latency_us: row.get("latency_us"),
                at: row.get("at"),
            });
    }
    by_id
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn every_request_has_one_row_with_its_route_template_status_and_code() {
    let server = TestServer::start().await;
    let main_id: uuid::Uuid = server.main.id.parse().unwrap();
    let wrap_only = server.register("wrap-only", IpPolicy::Any, "wrap").await;
    let wrap_only_id: uuid::Uuid = wrap_only.id.parse().unwrap();
    let main = Some(server.main.token.as_str());
    let unknown_key = uuid::Uuid::new_v4();
    let started = unix_now_f64();

    use reqwest::Method;
    // (what the client saw, what the row must say: client, method, path, status, code)
    type Expected = (
        Option<uuid::Uuid>,
        &'static str,
        &'static str,
        i16,
        Option<&'static str>,
    );
    let mut cases: Vec<(Seen, Expected)> = Vec::new();
    cases.push((
        send(&server, Method::POST, "/v1/datakey", main, Some(json!({}))).await,
        (Some(main_id), "POST", "/v1/datakey", 200, None),
    ));
    cases.push((
        send(&server, Method::GET, "/v1/keys", main, None).await,
        (Some(main_id), "GET", "/v1/keys", 200, None),
    ));
    cases.push((
        send(
            &server,
            Method::GET,
            &format!("/v1/keys/{unknown_key}"),
            main,
            None,
        )
        .await,
        (
            Some(main_id),
            "GET",
            "/v1/keys/{id}",
            404,
            Some("key_not_found"),
        ),
    ));
    cases.push((
        send(&server, Method::POST, "/v1/datakey", None, Some(json!({}))).await,
        (None, "POST", "/v1/datakey", 401, Some("invalid_token")),
    ));
    cases.push((
        send(
            &server,
            Method::POST,
            "/v1/datakey",
            Some("not-a-token"),
            Some(json!({})),
        )
        .await,
        (None, "POST", "/v1/datakey", 401, Some("invalid_token")),
    ));
    cases.push((
        send(
            &server,
            Method::POST,
            "/v1/datakey",
            Some(&wrap_only.token),
            Some(json!({})),
        )
        .await,
        (
            Some(wrap_only_id),
            "POST",
            "/v1/datakey",
            403,
            Some("insufficient_scope"),
        ),
    ));
    cases.push((
        send(
            &server,
            Method::GET,
            &format!("/v1/no/such/{unknown_key}"),
            main,
            None,
        )
        .await,
        (None, "GET", "(unmatched)", 404, Some("not_found")),
    ));
    cases.push((
        send(&server, Method::DELETE, "/v1/datakey", main, None).await,
        (
            None,
            "DELETE",
            "/v1/datakey",
            405,
            Some("method_not_allowed"),
        ),
    ));
    cases.push((
        send(
            &server,
            Method::POST,
            "/v1/wrap",
            main,
            Some(json!({"plaintext": 5})),
        )
        .await,
        (
            Some(main_id),
            "POST",
            "/v1/wrap",
            422,
            Some("invalid_request"),
        ),
    ));
    // The token endpoint answers in RFC 6749's shape; its code is logged all the same.
    let refused_token = server
        .client
        .post(format!("{}/v1/oauth/token", server.base))
        .header("user-agent", AGENT)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", server.main.id.as_str()),
            ("client_secret", "wrong"),
        ])
        .send()
        .await
        .unwrap();
    cases.push((
        Seen {
            request_id: refused_token.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
            status: refused_token.status().as_u16(),
        },
        (None, "POST", "/v1/oauth/token", 401, Some("invalid_client")),
    ));

    // Stopping drains the server and then writes the queued rows: no waiting on a timer.
    let database_url = server.database_url.clone();
    let host = server.base.trim_start_matches("https://").to_owned();
    server.stop().await;
    let finished = unix_now_f64();

    let ids: Vec<String> = cases
        .iter()
        .map(|(seen, _)| seen.request_id.clone())
        .collect();
    let logged = rows_for(&database_url, &ids).await;
    for (seen, (client_id, method, path, status, code)) in &cases {
        assert_eq!(seen.status, *status as u16, "{seen:?}");
        let rows = logged
            .get(&seen.request_id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert_eq!(
            rows.len(),
            1,
            "one row for {seen:?} ({method} {path}): {rows:?}"
        );
        let row = &rows[0];
        assert_eq!(row.client_id, *client_id, "{row:?}");
        assert_eq!(row.method, *method, "{row:?}");
        assert_eq!(row.path, *path, "{row:?}");
        assert_eq!(row.status, *status, "{row:?}");
        assert_eq!(row.error_code.as_deref(), *code, "{row:?}");
        assert_eq!(row.source_ip, "127.0.0.1", "{row:?}");
        assert_eq!(row.user_agent.as_deref(), Some(AGENT), "{row:?}");
        assert_eq!(row.host.as_deref(), Some(host.as_str()), "{row:?}");
        assert!(row.latency_us > 0, "{row:?}");
        // Postgres keeps microseconds; the clock read may round the other way by one.
        assert!(
            row.at >= started - 0.001 && row.at <= finished + 0.001,
            "{row:?} not within {started}..{finished}"
        );
    }
    // Nothing with an id in the raw path reaches the log.
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let (raw,): (i64,) = sqlx::query_as("SELECT count(*) FROM request_log WHERE path LIKE $1")
        .bind(format!("%{unknown_key}%"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(raw, 0);
    // The set-up's own requests (its token requests) are logged too, each once.
    let (all, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT request_id) FROM request_log")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(all, distinct);
    assert!(
        all > cases.len() as i64,
        "{all} rows for {} requests",
        cases.len()
    );
    pool.close().await;
}

#[tokio::test]
async fn no_row_is_lost_when_the_real_binary_stops_on_sigterm() {
    let token = PrivateToken::copy();
    // No timed writes: whatever reaches Postgres, the shutdown flush wrote.
    let server = ChildServer::start_with_env(
        token.env(),
        scratch_dir("request-log").join("server.log"),
        &[("KEYBROKER_REQUEST_LOG_FLUSH_MS", "3600000")],
    )
    .await;
    let database_url = server.database_url.clone();
    let (client, base) = server.endpoint();
    const REQUESTS: usize = 300;
    let answered = Arc::new(AtomicUsize::new(0));
    let some_answered = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let (client, base, token) = (client.clone(), base.clone(), server.token.clone());
        let (answered, some_answered) = (answered.clone(), some_answered.clone());
        tasks.push(tokio::spawn(async move {
            // Token work, refusals and cheap probes, all in flight together.
            let request = match i % 3 {
                0 => client.get(format!("{base}/healthz")),
                1 => client
                    .post(format!("{base}/v1/datakey"))
                    .bearer_auth(token)
                    .json(&json!({})),
                _ => client.post(format!("{base}/v1/datakey")).json(&json!({})),
            };
            let response = request.send().await.ok()?;
            let request_id = response
                .headers()
                .get("x-request-id")?
                .to_str()
                .ok()?
                .to_owned();
            let status = response.status().as_u16();
            // Only a whole answer counts as received.
            response.bytes().await.ok()?;
            if answered.fetch_add(1, Ordering::SeqCst) + 1 == REQUESTS / 10 {
                some_answered.notify_one();
            }
            Some(Seen { request_id, status })
        }));
    }
    // SIGTERM while most requests are still queued or in flight.
    tokio::time::timeout(PATIENCE, some_answered.notified())
        .await
        .expect("no answers from the server");
    let log = server.stop().await;
    let mut seen = Vec::new();
    for task in tasks {
        if let Some(answer) = task.await.unwrap() {
            seen.push(answer);
        }
    }
    assert!(seen.len() >= REQUESTS / 10, "only {} answers", seen.len());
    assert!(seen.iter().any(|s| s.status == 200));
    assert!(seen.iter().any(|s| s.status == 401));

    let ids: Vec<String> = seen.iter().map(|s| s.request_id.clone()).collect();
    let logged = rows_for(&database_url, &ids).await;
    let missing: Vec<&Seen> = seen
        .iter()
        .filter(|s| logged.get(&s.request_id).map_or(0, Vec::len) != 1)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests without exactly one row: {:?}",
        missing.len(),
        seen.len(),
        &missing[..missing.len().min(5)]
    );
    for answer in &seen {
        let row = &logged[&answer.request_id][0];
        assert_eq!(row.status as u16, answer.status, "{row:?}");
    }
    assert!(!log.contains("request log rows dropped"), "rows dropped");
    assert!(!log.contains("request log rows lost"), "rows lost");
}

#[tokio::test]
async fn the_purge_keeps_the_retention_period_at_a_chosen_time() {
    const DAY: i64 = 86_400;
    let server = TestServer::start().await;
    let now = keybroker::auth::unix_now();
    let prefix = format!("purge-{}", uuid::Uuid::new_v4().simple());
    let row = |name: &str, at: i64| RequestLogRow {
        at_us: at * 1_000_000,
        request_id: format!("{prefix}-{name}"),
        client_id: None,
        source_ip: "192.0.2.7".parse().unwrap(),
        user_agent: None,
        host: None,
        method: "GET".to_owned(),
        path: "/healthz".to_owned(),
        status: 200,
        error_code: None,
        latency_us: 1,
    };
    server
        .store
        .insert_request_log(&[
            row("8-days", now - 8 * DAY),
            row("7-days-and-1s", now - 7 * DAY - 1),
            row("7-days", now - 7 * DAY),
            row("6-days", now - 6 * DAY),
            row("now", now),
        ])
        .await
        .unwrap();
    let left = || async {
        let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT request_id FROM request_log WHERE request_id LIKE $1 ORDER BY at",
        )
        .bind(format!("{prefix}-%"))
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows.into_iter()
            .map(|(id,)| id.trim_start_matches(&format!("{prefix}-")).to_owned())
            .collect::<Vec<_>>()
    };

    // The default retention, 7 days: older rows go, the boundary stays.
    assert_eq!(server.broker.purge_request_log(now, 7).await.unwrap(), 2);
    assert_eq!(left().await, ["7-days", "6-days", "now"]);
    // Running it again at the same time finds nothing.
    assert_eq!(server.broker.purge_request_log(now, 7).await.unwrap(), 0);
    // Time is a parameter: a day later, the 7-day-old row is 8 days old.
    assert_eq!(
        server.broker.purge_request_log(now + DAY, 7).await.unwrap(),
        1
    );
    assert_eq!(left().await, ["6-days", "now"]);
    // A shorter retention purges sooner.
    assert_eq!(server.broker.purge_request_log(now, 5).await.unwrap(), 1);
    assert_eq!(left().await, ["now"]);
    server.stop().await;
}

#[tokio::test]
async fn rows_are_written_while_serving_not_only_at_shutdown() {
    let test = TestServer::start().await;
    // A second listener on the same broker, whose log writes every 20 ms as a served one does.
    let cert = crate::common::dev_certificate();
    let state = keybroker::api::AppState {
        broker: test.broker.clone(),
        auth: test.auth.clone(),
        request_log: keybroker::api::RequestLog::start(
            test.broker.clone(),
            Duration::from_millis(20),
        ),
        limiter: test.limiter.clone(),
    };
    let server = keybroker::server::RunningServer::start(
        state,
        "127.0.0.1:0".parse().unwrap(),
        keybroker::tls::server_config(&cert.cert, &cert.key).unwrap(),
        1024 * 1024,
    )
    .await
    .unwrap();
    let response = test
        .client
        .get(format!("https://127.0.0.1:{}/healthz", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // Polled like a readiness probe: the row must show up while the server still runs.
    let ids = [request_id];
    let start = std::time::Instant::now();
    loop {
        if rows_for(&test.database_url, &ids)
            .await
            .contains_key(&ids[0])
        {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "no row while serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
    let rows = rows_for(&test.database_url, &ids).await;
    assert_eq!(rows[&ids[0]].len(), 1, "written twice: {rows:?}");
    assert_eq!(rows[&ids[0]][0].path, "/healthz");
    test.stop().await;
}
