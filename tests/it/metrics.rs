//! `/metrics` reads memory only: a scrape answers, with the custody gauges of the broker's last
//! snapshot, while the token is unreachable (and asks the token nothing), and the request
//! counters and latency histograms move by route template, never by raw path.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{PATIENCE, TestServer};
use crate::faults::FaultyToken;

/// One scrape, as Prometheus does it (no bearer token); its text.
async fn scrape(client: &reqwest::Client, base: &str) -> String {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// The active master-key version's `on_token` sample line, and its `seals` series name.
fn active_version(text: &str) -> Option<(String, String)> {
    let line = text.lines().find(|l| {
        l.starts_with("keybroker_master_key_on_token{") && l.contains("state=\"active\"}")
    })?;
    let labels = line
        .strip_prefix("keybroker_master_key_on_token")?
        .rsplit_once(' ')?
        .0;
    Some((
        line.to_owned(),
        format!("keybroker_master_key_seals{labels}"),
    ))
}

#[tokio::test]
async fn a_scrape_answers_from_the_snapshot_while_the_token_is_unreachable() {
    // Only the start-up maintenance pass runs (it checks the token); the custody gauges' own
    // task reads Postgres every second.
    let token = FaultyToken::start_with_control(
        "metrics-token-gone",
        None,
        &[
            ("KEYBROKER_MAINTENANCE_INTERVAL_SECS", "3600"),
            ("KEYBROKER_METRICS_REFRESH_SECS", "1"),
        ],
    )
    .await;
    let server = &token.server;
    server.wait_for_log("maintenance pass finished").await;
    let (status, key) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{key}");
    let (client, base) = server.endpoint();

    // The snapshot shows the active version on the token, with the data key's seal counted.
    let start = Instant::now();
    let (before, on_token, seals) = loop {
        let text = scrape(&client, &base).await;
        if let Some((on_token, seals)) = active_version(&text)
            && on_token.ends_with(" 1")
            && value(&text, &seals).is_some_and(|n| n >= 1.0)
        {
            break (text, on_token, seals);
        }
        assert!(start.elapsed() < PATIENCE, "no custody gauges in\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read_at = |text: &str| value(text, "keybroker_custody_database_read_timestamp_seconds");
    let checked_at = |text: &str| value(text, "keybroker_custody_token_checked_timestamp_seconds");
    let (read_before, checked_before) = (read_at(&before).unwrap(), checked_at(&before).unwrap());

    // The token goes away: every call to it fails.
    token.inject("rv = CKR_DEVICE_REMOVED\n");
    server
        .assert_token_outage(&key["wrapped"], "device removed")
        .await;
    let injected = token.injected();
    assert!(injected > 0);

    for _ in 0..5 {
        let text = scrape(&client, &base).await;
        assert!(
            text.lines().any(|l| l == on_token),
            "{on_token} not in\n{text}"
        );
        assert!(value(&text, &seals).is_some_and(|n| n >= 1.0), "{text}");
        assert_eq!(checked_at(&text), Some(checked_before), "{text}");
        // The refused calls are counted too.
        let refused =
            r#"keybroker_http_requests_total{route="/v1/datakey",method="POST",status="503"}"#;
        assert!(value(&text, refused).is_some_and(|n| n >= 1.0), "{text}");
    }
    // Not one call reached the token for those scrapes: the module injected nothing more.
    assert_eq!(token.injected(), injected);

    // Meanwhile the database half keeps being read in the background.
    let start = Instant::now();
    loop {
        let text = scrape(&client, &base).await;
        if read_at(&text).unwrap() > read_before {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the snapshot was not re-read:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    token.heal();
    server.wait_for("/readyz", 200).await;
    token.server.stop().await;
}

#[tokio::test]
async fn request_counters_and_latency_move_by_route_template_never_the_raw_path() {
    let server = TestServer::start().await;
    let (status, created) = server
        .post("/v1/keys", &json!({"name": "metered", "format": "hex"}))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let unknown = uuid::Uuid::new_v4().to_string();
    let stray = format!("/no-such-endpoint/{}", uuid::Uuid::new_v4());

    let before = scrape(&server.client, &server.base).await;
    for _ in 0..2 {
        let (status, body) = server.get(&format!("/v1/keys/{id}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = server.get(&format!("/v1/keys/{unknown}")).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get(&stray).await;
    assert_eq!(status, 404, "{body}");
    // Counted before the response leaves the layer, so the next scrape sees them all.
    let after = scrape(&server.client, &server.base).await;

    let delta =
        |series: &str| value(&after, series).unwrap_or(0.0) - value(&before, series).unwrap_or(0.0);
    let route = r#"route="/v1/keys/{id}",method="GET""#;
    assert_eq!(
        delta(&format!(
            "keybroker_http_requests_total{{{route},status=\"200\"}}"
        )),
        2.0,
        "{after}"
    );
    assert_eq!(
        delta(&format!(
            "keybroker_http_requests_total{{{route},status=\"404\"}}"
        )),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(&format!(
            "keybroker_http_request_duration_seconds_count{{{route}}}"
        )),
        3.0,
        "{after}"
    );
    assert!(
        delta(&format!(
            "keybroker_http_request_duration_seconds_sum{{{route}}}"
        )) > 0.0,
        "{after}"
    );
    assert_eq!(
        delta(r#"keybroker_http_requests_total{route="(unmatched)",method="GET",status="404"}"#),
        1.0,
        "{after}"
    );
    // The earlier scrape counts under its own route.
    assert!(
        value(
            &after,
            r#"keybroker_http_requests_total{route="/metrics",method="GET",status="200"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{after}"
    );
    // Templates only: no id and no raw path in any label.
    for raw in [&id, &unknown, &stray] {
        assert!(!after.contains(raw.as_str()), "{raw} in\n{after}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_served_openapi_document_names_every_metric() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = response.json().await.unwrap();
    let described = doc["paths"]["/metrics"]["get"]["responses"]["200"]["description"]
        .as_str()
        .unwrap();
    for name in [
        "keybroker_master_key_seals",
        "keybroker_master_key_stored_blobs",
        "keybroker_master_key_on_token",
        "keybroker_rewrap_running",
        "keybroker_rewrap_blobs_total",
        "keybroker_rewrap_blobs_rewrapped",
        "keybroker_rewrap_blobs_remaining",
        "keybroker_custody_database_read_timestamp_seconds",
        "keybroker_custody_token_checked_timestamp_seconds",
        "keybroker_http_requests_total",
        "keybroker_http_request_duration_seconds",
    ] {
        assert!(described.contains(name), "{name} not in: {described}");
    }
    // A scrape no longer depends on the token or Postgres: no 503 is documented.
    assert!(doc["paths"]["/metrics"]["get"]["responses"]["503"].is_null());
    server.stop().await;
}
