//! Rate limits, blocking, lockdown and the automatic response, over the real stack (SoftHSM2,
//! Postgres, HTTPS): a client or an address gets exactly its burst, then 429 `rate_limited`
//! with an honest `Retry-After`, until its bucket refills (the limiter's clock is moved, never
//! waited for); a source that keeps going over is blocked for the whole period and no longer;
//! settings changed through the admin API reach every broker (another limiter on the same
//! database, and a real `keybroker serve` child within its refresh interval), govern the very
//! next requests (governor's limiters are rebuilt with the new quota), and bad settings
//! are refused without touching the stored ones; a lockdown (API or CLI) kills live tokens at
//! their next request and blocks the client's addresses until lifted; and repeated refusals
//! (denied unwraps, address mismatches, failed authentications) disable a client with a
//! critical audit event, until an officer enables it again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keybroker::api::limits::{Limiter, Source, Verdict, system_clock};
use keybroker::auth::IpPolicy;
use keybroker::broker::Limits;
use keybroker::broker::SecuritySettings;
use keybroker::store::{AuditFilter, AuditRow, Store};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::child::ChildServer;
use crate::common::{self, TestServer, error_code};

const SETTINGS: &str = "/v1/admin/security-settings";

// ---------------------------------------------------------------------------------------------
// Helpers

/// What one request gave back.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    /// The `Retry-After` header, in seconds.
    retry_after: Option<u64>,
}

async fn send(
    http: &reqwest::Client,
    method: Method,
    url: String,
    token: &str,
    body: Option<&Value>,
) -> Reply {
    let mut request = http.request(method, url);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    reply_of(request.send().await.unwrap()).await
}

/// Status, body and `Retry-After` (whole seconds) of a response.
async fn reply_of(response: reqwest::Response) -> Reply {
    let retry_after = response.headers().get("retry-after").map(|v| {
        v.to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("Retry-After is not a number of seconds: {v:?}"))
    });
    let (status, body) = common::read(response).await;
    Reply {
        status,
        body,
        retry_after,
    }
}

/// A request to the in-process broker over `http` (which may be bound to another address).
async fn call(
    server: &TestServer,
    http: &reqwest::Client,
    method: Method,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> Reply {
    send(http, method, format!("{}{path}", server.base), token, body).await
}

/// The cheapest authenticated request: the caller's own usage.
async fn usage(server: &TestServer, http: &reqwest::Client, token: &str) -> Reply {
    call(server, http, Method::GET, token, "/v1/usage", None).await
}

/// The main (admin) client, from 127.0.0.1.
async fn admin(server: &TestServer, method: Method, path: &str, body: Option<&Value>) -> Reply {
    call(
        server,
        &server.client,
        method,
        &server.main.token,
        path,
        body,
    )
    .await
}

/// An HTTPS client connecting from `ip` (any 127.0.0.0/8 address).
fn from(ip: &str) -> reqwest::Client {
    common::https_client_from(Some(ip.parse().unwrap()))
}

async fn put_settings(server: &TestServer, settings: &SecuritySettings) -> Reply {
    let body = serde_json::to_value(settings).unwrap();
    let reply = admin(server, Method::PUT, SETTINGS, Some(&body)).await;
    assert_eq!(reply.status, 200, "PUT settings: {}", reply.body);
    reply
}

/// Asserts an error answer: status, code, the error shape, and returns `Retry-After`.
fn refused(reply: &Reply, status: u16, code: &str) -> Option<u64> {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(error_code(&reply.body), code, "{}", reply.body);
    reply.retry_after
}

/// Moves the limiter's clock forward.
fn advance(server: &TestServer, ms: u64) {
    server
        .clock_offset_ms
        .fetch_add(i64::try_from(ms).unwrap(), Ordering::SeqCst);
}

/// Audit rows named `event` (concerning `client`, if given), read from the store directly so
/// that reading them is not itself rate-limited.
async fn events(server: &TestServer, event: &str, client: Option<&str>) -> Vec<AuditRow> {
    let filter = AuditFilter {
        event: Some(event.to_owned()),
        client_id: client.map(|c| Uuid::parse_str(c).unwrap()),
        ..AuditFilter::default()
    };
    server.store.audit_events(&filter, 1000).await.unwrap()
}

/// Polls until at least `n` rows named `event` whose subject is `subject` exist (rate-limit
/// events are written off the request path), then returns them all.
async fn wait_for_events(
    server: &TestServer,
    event: &str,
    client: Option<&str>,
    subject: &str,
    n: usize,
) -> Vec<AuditRow> {
    let start = Instant::now();
    loop {
        let rows: Vec<AuditRow> = events(server, event, client)
            .await
            .into_iter()
            .filter(|r| r.subject.as_deref() == Some(subject))
            .collect();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            start.elapsed() < common::PATIENCE,
            "only {} `{event}` events for {subject}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events through the admin API.
async fn audit_api(server: &TestServer, query: &str) -> Vec<Value> {
    let reply = admin(
        server,
        Method::GET,
        &format!("/v1/admin/audit?{query}"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["items"].as_array().unwrap().clone()
}

/// Registers a client through the admin API, pinned to `ip` (strict), and gets it a token from
/// that address; returns (id, secret, token, registered networks).
async fn register_pinned(
    server: &TestServer,
    name: &str,
    ip: &str,
    scopes: &[&str],
) -> (String, String, String, Vec<Value>) {
    let reply = admin(
        server,
        Method::POST,
        "/v1/admin/clients",
        Some(&json!({"name": name, "ip_mode": "strict", "ips": [ip], "scopes": scopes})),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let id = reply.body["client"]["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = reply.body["client_secret"].as_str().unwrap().to_owned();
    let ips = reply.body["client"]["ips"].as_array().unwrap().clone();
    let token = server.token_for(&id, &secret, &from(ip)).await;
    (id, secret, token, ips)
}

/// A GET at another server's `base`.
async fn get_at(http: &reqwest::Client, base: &str, path: &str, token: &str) -> Reply {
    send(http, Method::GET, format!("{base}{path}"), token, None).await
}

/// `client_credentials` with a secret, over `http`, at `base`.
async fn token_request(http: &reqwest::Client, base: &str, id: &str, secret: &str) -> Reply {
    let response = http
        .post(format!("{base}/v1/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
        ])
        .send()
        .await
        .unwrap();
    reply_of(response).await
}

async fn client_state(server: &TestServer, id: &str) -> String {
    let reply = admin(
        server,
        Method::GET,
        &format!("/v1/admin/clients/{id}"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["state"].as_str().unwrap().to_owned()
}

/// Settings that disable a client after `refusals` refusals within five minutes.
fn anomaly(refusals: u32) -> SecuritySettings {
    SecuritySettings {
        anomaly_refusals: refusals,
        anomaly_window_secs: 300,
        ..SecuritySettings::default()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Per-client budget

#[tokio::test]
async fn a_client_gets_exactly_its_burst_then_429_until_its_bucket_refills() {
    let server = TestServer::start().await;
    let limited = server.register("limited", IpPolicy::Any, "datakey").await;
    let other = server.register("other", IpPolicy::Any, "datakey").await;
    // Five requests, then a token every 1000 s: real time passing during the test (seconds at
    // most) refills nothing that counts, so the clock is as good as frozen.
    let settings = SecuritySettings {
        per_client_per_second: 0.001,
        per_client_burst: 5,
        ..SecuritySettings::default()
    };
    put_settings(&server, &settings).await;
    let http = &server.client;

    for i in 0..5 {
        let reply = usage(&server, http, &limited.token).await;
        assert_eq!(
            reply.status, 200,
            "request {i} within the burst: {}",
            reply.body
        );
    }
    let first = usage(&server, http, &limited.token).await;
    let retry = refused(&first, 429, "rate_limited").expect("no Retry-After on a 429");
    assert!((1..=1000).contains(&retry), "Retry-After {retry}");
    let message = first.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("{retry} s")), "{message}");
    // A flood: every one refused, every one with Retry-After.
    for _ in 0..50 {
        let reply = usage(&server, http, &limited.token).await;
        let again = refused(&reply, 429, "rate_limited").expect("no Retry-After");
        assert!(
            (1..=retry).contains(&again),
            "Retry-After {again} after {retry}"
        );
    }
    // Per client: another client (same address) is served.
    assert_eq!(usage(&server, http, &other.token).await.status, 200);

    // One warning on the record for the whole flood (coalesced), none for the other client.
    let rows = wait_for_events(
        &server,
        "rate_limit_exceeded",
        Some(&limited.id),
        &limited.id,
        1,
    )
    .await;
    assert_eq!(rows.len(), 1, "51 refusals within a minute: {rows:?}");
    assert_eq!(rows[0].severity, "warning");
    assert!(
        events(&server, "rate_limit_exceeded", Some(&other.id))
            .await
            .is_empty()
    );

    // After the Retry-After the caller was given, one request is served, and only one.
    advance(&server, retry * 1000);
    let reply = usage(&server, http, &limited.token).await;
    assert_eq!(reply.status, 200, "after Retry-After: {}", reply.body);
    refused(
        &usage(&server, http, &limited.token).await,
        429,
        "rate_limited",
    );
    // After the full refill time the whole burst again, exactly.
    advance(&server, 5 * 1000 * 1000);
    for i in 0..5 {
        let reply = usage(&server, http, &limited.token).await;
        assert_eq!(
            reply.status, 200,
            "request {i} after the refill: {}",
            reply.body
        );
    }
    refused(
        &usage(&server, http, &limited.token).await,
        429,
        "rate_limited",
    );

    // Generous limits again; the admin API shows the events with their client.
    put_settings(&server, &SecuritySettings::default()).await;
    let items = audit_api(
        &server,
        &format!("event=rate_limit_exceeded&client_id={}", limited.id),
    )
    .await;
    assert!(!items.is_empty());
    for item in &items {
        assert_eq!(item["client_id"], json!(limited.id), "{item}");
        assert_eq!(item["severity"], "warning", "{item}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Per-address budget

#[tokio::test]
async fn an_address_gets_exactly_its_burst_while_other_addresses_and_probes_are_served() {
    let server = TestServer::start().await;
    let far = server.register("far", IpPolicy::Any, "datakey").await;
    let settings = SecuritySettings {
        per_ip_per_second: 0.001,
        per_ip_burst: 5,
        ..SecuritySettings::default()
    };
    put_settings(&server, &settings).await;
    let two = from("127.0.0.2");

    // Probes are never limited, so they take nothing from the budget.
    for _ in 0..20 {
        let reply = call(&server, &two, Method::GET, "", "/healthz", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    for i in 0..5 {
        let reply = usage(&server, &two, &far.token).await;
        assert_eq!(
            reply.status, 200,
            "request {i} within the burst: {}",
            reply.body
        );
    }
    let retry = refused(&usage(&server, &two, &far.token).await, 429, "rate_limited")
        .expect("no Retry-After on a 429");
    assert!((1..=1000).contains(&retry), "Retry-After {retry}");
    // The address is limited, whoever calls from it, before any authentication.
    refused(&usage(&server, &two, "").await, 429, "rate_limited");
    refused(
        &usage(&server, &two, &server.main.token).await,
        429,
        "rate_limited",
    );
    for probe in ["/healthz", "/readyz"] {
        let reply = call(&server, &two, Method::GET, "", probe, None).await;
        assert_eq!(reply.status, 200, "{probe}: {}", reply.body);
    }
    // The admin, from 127.0.0.1, has its own bucket.
    let reply = admin(&server, Method::GET, SETTINGS, None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(reply.body).unwrap(),
        settings
    );

    // One warning for the address, naming it.
    let rows = wait_for_events(&server, "rate_limit_exceeded", None, "127.0.0.2", 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].severity, "warning");
    assert_eq!(rows[0].client_id, None);

    advance(&server, retry * 1000);
    let reply = usage(&server, &two, &far.token).await;
    assert_eq!(reply.status, 200, "after Retry-After: {}", reply.body);
    refused(&usage(&server, &two, &far.token).await, 429, "rate_limited");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Blocking repeated violators

#[tokio::test]
async fn a_source_that_keeps_going_over_is_blocked_for_the_whole_period_and_no_longer() {
    let server = TestServer::start().await;
    let far = server.register("far", IpPolicy::Any, "datakey").await;
    // Two requests, a token every 100 s (the bucket is full again when the block ends).
    let settings = SecuritySettings {
        per_ip_per_second: 0.01,
        per_ip_burst: 2,
        block_after_violations: 3,
        violation_window_secs: 60,
        block_secs: 900,
        ..SecuritySettings::default()
    };
    put_settings(&server, &settings).await;
    let two = from("127.0.0.2");

    for _ in 0..2 {
        assert_eq!(usage(&server, &two, &far.token).await.status, 200);
    }
    // Violations 1 and 2 are limited; the third blocks the source.
    for _ in 0..2 {
        let retry = refused(&usage(&server, &two, &far.token).await, 429, "rate_limited");
        assert!(retry.is_some_and(|r| (1..=100).contains(&r)), "{retry:?}");
    }
    let blocked = usage(&server, &two, &far.token).await;
    // The block began before this instant (when the request was checked).
    let block_seen = Instant::now();
    assert_eq!(refused(&blocked, 429, "source_blocked"), Some(900));
    let still = usage(&server, &two, &far.token).await;
    let retry = refused(&still, 429, "source_blocked").expect("no Retry-After");
    // (Some slack for a slow machine: a test must not fail because a request took seconds.)
    assert!((890..=900).contains(&retry), "Retry-After {retry}");
    // Blocked for everything from there, probes aside; other addresses are served.
    refused(&usage(&server, &two, "").await, 429, "source_blocked");
    assert_eq!(
        call(&server, &two, Method::GET, "", "/healthz", None)
            .await
            .status,
        200
    );
    assert_eq!(
        admin(&server, Method::GET, SETTINGS, None).await.status,
        200
    );

    // 890 s after the block (counting the real time the requests above took; 10 s of slack for
    // the request itself on a slow machine; the exact bound is a unit test) it is still
    // blocked, though the bucket alone would have let it through...
    let to_block_plus = |secs: u64| {
        let elapsed = u64::try_from(block_seen.elapsed().as_millis()).unwrap();
        let offset = u64::try_from(server.clock_offset_ms.load(Ordering::SeqCst)).unwrap();
        secs * 1000 - elapsed - offset
    };
    advance(&server, to_block_plus(890));
    let reply = usage(&server, &two, &far.token).await;
    let retry = refused(&reply, 429, "source_blocked");
    assert!(retry.is_some_and(|r| (1..=10).contains(&r)), "{retry:?}");
    // ... and 901 s after it, it is served again.
    advance(&server, to_block_plus(901));
    let reply = usage(&server, &two, &far.token).await;
    assert_eq!(reply.status, 200, "after the block: {}", reply.body);

    // The block is on the record once, naming the address.
    let rows = wait_for_events(&server, "source_blocked", None, "127.0.0.2", 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].severity, "warning");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Settings: stored, validated, picked up by every broker

fn changed_settings() -> SecuritySettings {
    SecuritySettings {
        // The admin (from 127.0.0.1) needs a few dozen requests here.
        per_ip_per_second: 0.5,
        per_ip_burst: 40,
        per_client_per_second: 40.5,
        per_client_burst: 600,
        block_after_violations: 7,
        violation_window_secs: 30,
        block_secs: 120,
        anomaly_refusals: 4,
        anomaly_window_secs: 90,
        auth_failures_per_client: 3,
        auth_failures_per_source: 30,
        auth_delay_max_secs: 60,
        block_min_prefix_v4: 24,
        block_min_prefix_v6: 64,
    }
}

#[tokio::test]
async fn settings_put_through_the_api_are_read_back_and_picked_up_by_another_broker() {
    let server = TestServer::start().await;
    // Another broker: its own connection to the same database, its own limiter.
    let store = Store::connect_lazy(&server.database_url, 2).unwrap();
    let hsm = keybroker::hsm::Hsm::connect(common::hsm_config())
        .await
        .unwrap();
    let broker = keybroker::broker::Broker::new(hsm, store, Limits { max_batch: 1000 });
    let other = Limiter::new(SecuritySettings::default(), system_clock());
    other.refresh(&broker).await.unwrap();
    assert_eq!(*other.settings(), SecuritySettings::default());

    // Nothing stored yet: the defaults.
    let reply = admin(&server, Method::GET, SETTINGS, None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(reply.body).unwrap(),
        SecuritySettings::default()
    );

    let new = changed_settings();
    let put = put_settings(&server, &new).await;
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(put.body).unwrap(),
        new
    );
    let reply = admin(&server, Method::GET, SETTINGS, None).await;
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(reply.body).unwrap(),
        new
    );
    // This broker at once; the other at its next refresh (every broker runs one every 2 s).
    assert_eq!(*server.limiter.settings(), new);
    assert_eq!(*other.settings(), SecuritySettings::default());
    other.refresh(&broker).await.unwrap();
    assert_eq!(*other.settings(), new);
    // ... and enforces them: exactly the new burst of an address.
    let ip = Source::Ip("192.0.2.7".parse().unwrap());
    for _ in 0..40 {
        assert_eq!(other.check(ip), Verdict::Allowed);
    }
    assert!(
        matches!(other.check(ip), Verdict::Limited { .. }),
        "41st request of a burst of 40"
    );
    // The change is on the record.
    let rows = events(&server, "security_settings.changed", None).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let details: Value = serde_json::from_str(&rows[0].details).unwrap();
    assert_eq!(details["per_client_burst"], 600, "{details}");

    // Bad settings are refused and change nothing, anywhere.
    let valid = serde_json::to_value(&new).unwrap();
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        (format!("{field} = {}", body[field]), body)
    };
    let bad = [
        with("per_ip_per_second", json!(0.0)),
        with("per_client_per_second", json!(0)),
        with("per_client_per_second", json!(-1.0)),
        with("per_ip_per_second", json!(2_000_000.0)),
        with("per_ip_burst", json!(0)),
        with("per_client_burst", json!(0)),
        with("per_client_burst", json!(-5)),
        with("per_ip_burst", json!("many")),
        with("block_after_violations", json!(0)),
        with("violation_window_secs", json!(0)),
        with("block_secs", json!(0)),
        with("block_secs", json!(7 * 86_400 + 1)),
        with("anomaly_window_secs", json!(0)),
        with("per_ip_burts", json!(5)),
    ];
    for (what, body) in &bad {
        let reply = admin(&server, Method::PUT, SETTINGS, Some(body)).await;
        assert_eq!(reply.status, 422, "{what}: {}", reply.body);
        assert_eq!(error_code(&reply.body), "invalid_request", "{what}");
    }
    let reply = admin(&server, Method::GET, SETTINGS, None).await;
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(reply.body).unwrap(),
        new
    );
    assert_eq!(*server.limiter.settings(), new);
    other.refresh(&broker).await.unwrap();
    assert_eq!(*other.settings(), new);
    assert_eq!(
        events(&server, "security_settings.changed", None)
            .await
            .len(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn settings_in_any_shape_but_an_object_are_refused() {
    let server = TestServer::start().await;
    let new = changed_settings();
    put_settings(&server, &new).await;
    // The settings are an object (unknown fields refused); a positional array is not one.
    for body in [
        json!([1, 2]),
        json!([0.5, 40, 40.5, 600, 7, 30, 120, 4, 90]),
        json!(null),
    ] {
        let reply = admin(&server, Method::PUT, SETTINGS, Some(&body)).await;
        assert_eq!(
            reply.status, 422,
            "{body} was taken for settings: {}",
            reply.body
        );
        assert_eq!(error_code(&reply.body), "invalid_request", "{body}");
    }
    let reply = admin(&server, Method::GET, SETTINGS, None).await;
    assert_eq!(
        serde_json::from_value::<SecuritySettings>(reply.body).unwrap(),
        new
    );
    server.stop().await;
}

#[tokio::test]
async fn a_running_broker_applies_a_change_made_on_another_within_seconds() {
    // The real binary (refreshing every 2 s) and an in-process broker on the same database.
    let child = ChildServer::start(
        crate::token::shared_env(),
        common::scratch_dir("limits").join("server.log"),
    )
    .await;
    let (_, child_base) = child.endpoint();
    let server =
        TestServer::start_on(&child.database_url, Limits { max_batch: 1000 }, 1 << 20).await;

    // A client pinned to 127.0.0.5 with a live token from the child.
    let five = from("127.0.0.5");
    let (id, secret, _, _) = register_pinned(&server, "pinned", "127.0.0.5", &["datakey"]).await;
    let issued = token_request(&five, &child_base, &id, &secret).await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    let token = issued.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        get_at(&five, &child_base, "/v1/usage", &token).await.status,
        200
    );

    // Locked down on the in-process broker: once the child heard of it (a Postgres
    // notification, within milliseconds), it refuses the token at its next request...
    let heard = child.log_lines_with(&format!("Client({id})"));
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{id}/lockdown"),
        Some(&json!({"block": {}})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    child
        .wait_for_log_lines(&format!("Client({id})"), heard + 1)
        .await;
    let here = common::https_client();
    refused(
        &get_at(&here, &child_base, "/v1/usage", &token).await,
        403,
        "client_disabled",
    );
    // ... and new limits set there too.
    put_settings(
        &server,
        &SecuritySettings {
            per_ip_per_second: 0.001,
            per_ip_burst: 3,
            ..SecuritySettings::default()
        },
    )
    .await;

    // The child blocks the address and applies the limits at its next refresh.
    let four = from("127.0.0.4");
    let start = Instant::now();
    let (mut blocked, mut limited) = (None, None);
    while blocked.is_none() || limited.is_none() {
        assert!(
            start.elapsed() < common::PATIENCE,
            "not applied: blocked {blocked:?}, limited {limited:?}"
        );
        if blocked.is_none() {
            let reply = get_at(&five, &child_base, "/v1/usage", "").await;
            if reply.status == 403 {
                assert_eq!(error_code(&reply.body), "source_blocked");
                blocked = Some(start.elapsed());
            }
        }
        // Four requests: the fourth is over a burst of 3 once the new settings are in force.
        for _ in 0..4 {
            if limited.is_some() {
                break;
            }
            let reply = get_at(&four, &child_base, "/v1/usage", "").await;
            if reply.status == 429 {
                assert_eq!(error_code(&reply.body), "rate_limited");
                limited = Some(start.elapsed());
            } else {
                assert_eq!(reply.status, 401, "{}", reply.body);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
    child.stop().await;
}

#[tokio::test]
async fn limits_an_officer_changes_govern_the_next_requests_and_refusals_stay_coalesced() {
    let server = TestServer::start().await;
    let c = server.register("changing", IpPolicy::Any, "datakey").await;
    // The client calls from 127.0.0.3; the officer (127.0.0.1) has its own address budget.
    let three = from("127.0.0.3");
    // Rates of a request every 1000 s or 100 s: real time passing during the test (seconds at
    // most) refills nothing that counts, so only `advance` moves the limiter's clock.
    let mut settings = SecuritySettings {
        per_client_per_second: 0.001,
        per_client_burst: 10,
        ..SecuritySettings::default()
    };
    put_settings(&server, &settings).await;
    for i in 0..4 {
        let reply = usage(&server, &three, &c.token).await;
        assert_eq!(reply.status, 200, "request {i} of 10: {}", reply.body);
    }

    // A lower burst: the very next requests get exactly the new burst, then 429.
    settings.per_client_burst = 3;
    put_settings(&server, &settings).await;
    for i in 0..3 {
        let reply = usage(&server, &three, &c.token).await;
        assert_eq!(reply.status, 200, "request {i} of 3: {}", reply.body);
    }
    let retry = refused(&usage(&server, &three, &c.token).await, 429, "rate_limited");
    assert!(
        retry.is_some_and(|r| (101..=1000).contains(&r)),
        "{retry:?}"
    );

    // A faster rate (and a burst of 2): Retry-After follows the new rate, and so does the refill.
    settings.per_client_per_second = 0.01;
    settings.per_client_burst = 2;
    put_settings(&server, &settings).await;
    for i in 0..2 {
        let reply = usage(&server, &three, &c.token).await;
        assert_eq!(reply.status, 200, "request {i} of 2: {}", reply.body);
    }
    let retry = refused(&usage(&server, &three, &c.token).await, 429, "rate_limited")
        .expect("no Retry-After on a 429");
    assert!((1..=100).contains(&retry), "Retry-After {retry} at 0.01/s");
    // The refusals under both settings, within a minute, are one coalesced event: the limiters
    // were rebuilt, the audit notes were not.
    let rows = wait_for_events(&server, "rate_limit_exceeded", Some(&c.id), &c.id, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    advance(&server, retry * 1000);
    assert_eq!(usage(&server, &three, &c.token).await.status, 200);
    refused(&usage(&server, &three, &c.token).await, 429, "rate_limited");

    // A per-address limit changed while the client's is not: the client's limiter carries on
    // (one request refilled after 100 s, not a fresh burst of 2), the address gets exactly its
    // new burst of 5.
    advance(&server, 100 * 1000);
    settings.per_ip_per_second = 0.001;
    settings.per_ip_burst = 5;
    put_settings(&server, &settings).await;
    assert_eq!(usage(&server, &three, &c.token).await.status, 200);
    refused(&usage(&server, &three, &c.token).await, 429, "rate_limited");
    // Two of the address's 5 are gone (the client's refusal came after the address's check).
    for i in 0..3 {
        let reply = usage(&server, &three, "").await;
        assert_eq!(
            reply.status, 401,
            "request {i} of the address's last 3: {}",
            reply.body
        );
    }
    refused(&usage(&server, &three, "").await, 429, "rate_limited");
    // Refused by the address now, before authentication: the client's refill does not help.
    advance(&server, 100 * 1000);
    refused(&usage(&server, &three, &c.token).await, 429, "rate_limited");
    // The address was refused in two different minutes (of the limiter's clock): two events.
    let rows = wait_for_events(&server, "rate_limit_exceeded", None, "127.0.0.3", 2).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Lockdown

#[tokio::test]
async fn lockdown_with_a_block_kills_the_live_token_and_blocks_the_address_until_lifted() {
    let server = TestServer::start().await;
    let two = from("127.0.0.2");
    let (id, secret, token, ips) =
        register_pinned(&server, "suspect", "127.0.0.2", &["datakey"]).await;
    let bystander = server.register("bystander", IpPolicy::Any, "datakey").await;
    assert_eq!(usage(&server, &two, &token).await.status, 200);
    assert_eq!(usage(&server, &two, &bystander.token).await.status, 200);

    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{id}/lockdown"),
        Some(&json!({"reason": "suspected compromise", "block": {}})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["client"]["state"], "disabled");
    assert_eq!(reply.body["blocked"], json!(ips), "{}", reply.body);
    // An hour by default.
    let until = reply.body["blocked_until"].as_i64().unwrap();
    let now = keybroker::auth::unix_now();
    assert!((now + 3590..=now + 3610).contains(&until), "{}", reply.body);
    assert!(
        ips.iter()
            .any(|n| n.as_str().unwrap().starts_with("127.0.0.2"))
    );

    // The live token fails at its next request: from its address the address is refused
    // outright (403, no Retry-After: an officer may lift it sooner); elsewhere the token.
    let reply = usage(&server, &two, &token).await;
    assert_eq!(refused(&reply, 403, "source_blocked"), None);
    refused(
        &usage(&server, &server.client, &token).await,
        403,
        "client_disabled",
    );
    // Nobody is served from the address: another client, the admin, the token endpoint.
    refused(
        &usage(&server, &two, &bystander.token).await,
        403,
        "source_blocked",
    );
    refused(
        &usage(&server, &two, &server.main.token).await,
        403,
        "source_blocked",
    );
    let reply = token_request(&two, &server.base, &id, &secret).await;
    refused(&reply, 403, "source_blocked");
    // Health checks from there still answer: a load balancer there must not take us out.
    for probe in ["/healthz", "/readyz"] {
        let reply = call(&server, &two, Method::GET, "", probe, None).await;
        assert_eq!(reply.status, 200, "{probe}: {}", reply.body);
    }
    // Other addresses are.
    assert_eq!(
        usage(&server, &server.client, &bystander.token)
            .await
            .status,
        200
    );
    assert_eq!(client_state(&server, &id).await, "disabled");

    // A critical event says who, why and what was blocked.
    let items = audit_api(&server, &format!("event=client.lockdown&client_id={id}")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["severity"], "critical");
    assert_eq!(items[0]["actor"], json!(server.main.id));
    assert_eq!(items[0]["details"]["reason"], "suspected compromise");
    assert_eq!(items[0]["details"]["blocked"], json!(ips));

    // Unblock lifts the address block; the client stays disabled.
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{id}/unblock"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["state"], "disabled");
    assert_eq!(usage(&server, &two, &bystander.token).await.status, 200);
    refused(&usage(&server, &two, &token).await, 403, "client_disabled");
    let reply = token_request(&two, &server.base, &id, &secret).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.body["error"], "invalid_client", "{}", reply.body);
    let items = audit_api(&server, &format!("event=client.unblocked&client_id={id}")).await;
    assert_eq!(items.len(), 1, "{items:?}");

    // Enabled again: the old token stays dead, a new one works.
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{id}/enable"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["state"], "active");
    let fresh = server.token_for(&id, &secret, &two).await;
    assert_eq!(usage(&server, &two, &fresh).await.status, 200);
    refused(&usage(&server, &two, &token).await, 401, "invalid_token");
    server.stop().await;
}

#[tokio::test]
async fn the_cli_lockdown_with_block_disables_the_client_and_blocks_its_addresses_until_unblock() {
    let server = TestServer::start().await;
    let three = from("127.0.0.3");
    let (id, _, token, ips) = register_pinned(&server, "suspect", "127.0.0.3", &["datakey"]).await;
    let bystander = server.register("bystander", IpPolicy::Any, "datakey").await;
    assert_eq!(usage(&server, &three, &token).await.status, 200);

    let url = server.database_url.clone();
    let output = cli(
        &url,
        &[
            "client",
            "lockdown",
            &id,
            "--reason",
            "cli drill",
            "--block",
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("disabled"), "{stdout}");
    assert!(stdout.contains("127.0.0.3"), "{stdout}");

    // The live token fails from the moment the broker hears of the change (the CLI is another
    // process: Postgres notifies the broker when the lockdown commits, within milliseconds).
    // One commit disables the client and blocks its address, and the broker's auth cache and
    // its rate limiter each hear of it: either refusal may come first.
    let start = Instant::now();
    loop {
        let reply = usage(&server, &three, &token).await;
        if reply.status != 200 {
            let code = error_code(&reply.body).to_owned();
            assert!(
                ["client_disabled", "source_blocked"].contains(&code.as_str()),
                "{}",
                reply.body
            );
            refused(&reply, 403, &code);
            break;
        }
        assert!(start.elapsed() < common::PATIENCE, "never refused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client_state(&server, &id).await, "disabled");
    let items = audit_api(&server, &format!("event=client.lockdown&client_id={id}")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["severity"], "critical");
    assert_eq!(items[0]["actor"], "officer");
    assert_eq!(items[0]["details"]["reason"], "cli drill");
    assert_eq!(items[0]["details"]["blocked"], json!(ips));

    // The address is blocked from the broker's next refresh on (on Postgres' notification, or
    // within 2 s); one run here makes sure it has happened.
    server.limiter.refresh(&server.broker).await.unwrap();
    refused(
        &usage(&server, &three, &bystander.token).await,
        403,
        "source_blocked",
    );
    assert_eq!(
        usage(&server, &server.client, &bystander.token)
            .await
            .status,
        200
    );
    // `client unblock` lifts it (from the broker's next refresh on).
    let output = cli(&url, &["client", "unblock", &id]).await;
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("lifted 1 block"),
        "{output:?}"
    );
    server.limiter.refresh(&server.broker).await.unwrap();
    assert_eq!(usage(&server, &three, &bystander.token).await.status, 200);
    assert_eq!(client_state(&server, &id).await, "disabled");
    let items = audit_api(&server, &format!("event=client.unblocked&client_id={id}")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["actor"], "officer");
    server.stop().await;
}

/// Runs the officer CLI against `database_url` (the token settings come from the
/// environment `scripts/test.sh` exports).
async fn cli(database_url: &str, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 6. Automatic response

#[tokio::test]
async fn repeated_denied_unwraps_disable_the_client_until_an_officer_enables_it() {
    let server = TestServer::start().await;
    put_settings(&server, &anomaly(3)).await;
    let owner = server
        .register("owner", IpPolicy::Any, "datakey unwrap")
        .await;
    let prober = server
        .register("prober", IpPolicy::Any, "datakey unwrap")
        .await;
    let http = &server.client;
    let context = json!({"tenant": "acme"});
    let made = call(
        &server,
        http,
        Method::POST,
        &owner.token,
        "/v1/datakey",
        Some(&json!({"context": context})),
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let blob = json!({"wrapped": made.body["wrapped"], "context": context});

    for i in 0..3 {
        let reply = call(
            &server,
            http,
            Method::POST,
            &prober.token,
            "/v1/unwrap",
            Some(&blob),
        )
        .await;
        assert_eq!(reply.status, 422, "unwrap {i}: {}", reply.body);
        assert_eq!(error_code(&reply.body), "context_mismatch");
    }
    // Disabled: its next request is refused.
    refused(
        &usage(&server, http, &prober.token).await,
        403,
        "client_disabled",
    );
    assert_eq!(client_state(&server, &prober.id).await, "disabled");
    // The owner is not.
    let reply = call(
        &server,
        http,
        Method::POST,
        &owner.token,
        "/v1/unwrap",
        Some(&blob),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(client_state(&server, &owner.id).await, "active");

    let denied = audit_api(
        &server,
        &format!("event=unauthorized_key_access&client_id={}", prober.id),
    )
    .await;
    assert_eq!(denied.len(), 3, "{denied:?}");
    let items = audit_api(
        &server,
        &format!("event=client.auto_disabled&client_id={}", prober.id),
    )
    .await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["severity"], "critical");
    assert_eq!(items[0]["details"]["refusals"], 3, "{}", items[0]);
    assert_eq!(items[0]["details"]["window_secs"], 300, "{}", items[0]);
    assert!(
        audit_api(
            &server,
            &format!("event=client.auto_disabled&client_id={}", owner.id)
        )
        .await
        .is_empty()
    );

    // An officer enables it again: a new token works, the old one stays dead.
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{}/enable", prober.id),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["state"], "active");
    let fresh = server.token_for(&prober.id, &prober.secret, http).await;
    assert_eq!(usage(&server, http, &fresh).await.status, 200);
    assert_eq!(client_state(&server, &prober.id).await, "active");
    refused(
        &usage(&server, http, &prober.token).await,
        401,
        "invalid_token",
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_an_officer_enabled_again_is_not_disabled_again_by_the_refusals_before() {
    let server = TestServer::start().await;
    put_settings(&server, &anomaly(3)).await;
    let two = from("127.0.0.2");
    let http = &server.client;
    let pinned = server
        .register(
            "pinned",
            IpPolicy::Strict(vec!["127.0.0.1/32".parse().unwrap()]),
            "datakey",
        )
        .await;
    for _ in 0..3 {
        refused(
            &usage(&server, &two, &pinned.token).await,
            403,
            "ip_not_allowed",
        );
    }
    assert_eq!(client_state(&server, &pinned.id).await, "disabled");

    // The officer has looked into it and enables the client; its workers get new tokens, and
    // one of them still sends its old token once (every old token is dead after a disable).
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{}/enable", pinned.id),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let fresh = server.token_for(&pinned.id, &pinned.secret, http).await;
    assert_eq!(usage(&server, http, &fresh).await.status, 200);
    refused(
        &usage(&server, http, &pinned.token).await,
        401,
        "invalid_token",
    );
    // That single refusal is not three within the window: the three before the officer's
    // decision were dealt with by it.
    let reply = usage(&server, http, &fresh).await;
    assert_eq!(
        reply.status, 200,
        "one stale token after the officer's enable disabled the client again: {}",
        reply.body
    );
    assert_eq!(client_state(&server, &pinned.id).await, "active");
    assert_eq!(
        events(&server, "client.auto_disabled", Some(&pinned.id))
            .await
            .len(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn repeated_address_mismatches_disable_the_client_and_failed_authentications_do_not() {
    let server = TestServer::start().await;
    put_settings(&server, &anomaly(3)).await;
    let two = from("127.0.0.2");

    // A client pinned to 127.0.0.1, its token used from 127.0.0.2.
    let pinned = server
        .register(
            "pinned",
            IpPolicy::Strict(vec!["127.0.0.1/32".parse().unwrap()]),
            "datakey",
        )
        .await;
    assert_eq!(
        usage(&server, &server.client, &pinned.token).await.status,
        200
    );
    for _ in 0..3 {
        refused(
            &usage(&server, &two, &pinned.token).await,
            403,
            "ip_not_allowed",
        );
    }
    refused(
        &usage(&server, &server.client, &pinned.token).await,
        403,
        "client_disabled",
    );
    assert_eq!(
        events(&server, "ip_mismatch", Some(&pinned.id)).await.len(),
        3
    );
    let rows = events(&server, "client.auto_disabled", Some(&pinned.id)).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].severity, "critical");

    // Failed authentications are not refusals of an authenticated caller: a client whose
    // secret is guessed at stays enabled (finding: anyone knowing an id could switch it off).
    let guessed = server.register("guessed", IpPolicy::Any, "datakey").await;
    for _ in 0..3 {
        let reply = token_request(&two, &server.base, &guessed.id, "wrong").await;
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert_eq!(reply.body["error"], "invalid_client");
    }
    assert_eq!(
        usage(&server, &server.client, &guessed.token).await.status,
        200
    );
    assert_eq!(client_state(&server, &guessed.id).await, "active");
    assert!(
        events(&server, "client.auto_disabled", Some(&guessed.id))
            .await
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test]
async fn with_anomaly_refusals_zero_no_client_is_disabled() {
    let server = TestServer::start().await;
    put_settings(&server, &anomaly(0)).await;
    let two = from("127.0.0.2");
    let http = &server.client;
    let owner = server
        .register("owner", IpPolicy::Any, "datakey unwrap")
        .await;
    let prober = server
        .register("prober", IpPolicy::Any, "datakey unwrap")
        .await;
    let pinned = server
        .register(
            "pinned",
            IpPolicy::Strict(vec!["127.0.0.1/32".parse().unwrap()]),
            "datakey",
        )
        .await;
    let made = call(
        &server,
        http,
        Method::POST,
        &owner.token,
        "/v1/datakey",
        Some(&json!({})),
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.body);
    let blob = json!({"wrapped": made.body["wrapped"]});
    for _ in 0..5 {
        let reply = call(
            &server,
            http,
            Method::POST,
            &prober.token,
            "/v1/unwrap",
            Some(&blob),
        )
        .await;
        assert_eq!(error_code(&reply.body), "context_mismatch");
        refused(
            &usage(&server, &two, &pinned.token).await,
            403,
            "ip_not_allowed",
        );
        let reply = token_request(http, &server.base, &owner.id, "wrong").await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    for client in [&owner, &prober, &pinned] {
        assert_eq!(usage(&server, http, &client.token).await.status, 200);
        assert_eq!(client_state(&server, &client.id).await, "active");
    }
    assert!(
        events(&server, "client.auto_disabled", None)
            .await
            .is_empty()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Nobody switches a client off but an officer

/// `client_credentials` with HTTP Basic, as most OAuth libraries send it.
async fn token_request_basic(http: &reqwest::Client, base: &str, id: &str, secret: &str) -> Reply {
    let response = http
        .post(format!("{base}/v1/oauth/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    reply_of(response).await
}

#[tokio::test]
async fn twenty_wrong_secrets_leave_the_client_enabled_and_throttle_only_the_guessing_source() {
    let server = TestServer::start().await;
    // The victim is pinned to 127.0.0.1; the guesses come from 127.0.0.7, both ways of sending
    // a secret.
    let victim = server
        .register(
            "victim",
            IpPolicy::Strict(vec!["127.0.0.1/32".parse().unwrap()]),
            "datakey",
        )
        .await;
    let attacker = from("127.0.0.7");
    let mut answers = Vec::new();
    for i in 0..20 {
        let reply = if i % 2 == 0 {
            token_request(&attacker, &server.base, &victim.id, "kbs_wrong").await
        } else {
            token_request_basic(&attacker, &server.base, &victim.id, "kbs_wrong").await
        };
        answers.push((reply.status, reply.retry_after));
        match reply.status {
            401 => assert_eq!(reply.body["error"], "invalid_client", "{}", reply.body),
            429 => {
                assert_eq!(reply.body["error"], "rate_limited", "{}", reply.body);
                assert!(reply.retry_after.is_some_and(|s| s >= 1), "{answers:?}");
            }
            other => panic!("attempt {i}: {other} {}", reply.body),
        }
    }
    // Five free failures, then a delay.
    assert!(answers[..5].iter().all(|(s, _)| *s == 401), "{answers:?}");
    assert!(answers.iter().any(|(s, _)| *s == 429), "{answers:?}");

    // The client is untouched: enabled, its live token works, its own address gets a token
    // with the right secret at once, and no automatic response was recorded.
    assert_eq!(client_state(&server, &victim.id).await, "active");
    assert_eq!(
        usage(&server, &server.client, &victim.token).await.status,
        200
    );
    let reply = token_request(&server.client, &server.base, &victim.id, &victim.secret).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        events(&server, "client.auto_disabled", Some(&victim.id))
            .await
            .is_empty()
    );
    assert_eq!(
        events(&server, "auth.failed", Some(&victim.id)).await.len(),
        answers.iter().filter(|(s, _)| *s == 401).count(),
        "every failure that was checked is on the record, no throttled one"
    );

    // From the guessing source even the right secret waits (it learns nothing there)...
    let reply = token_request(&attacker, &server.base, &victim.id, &victim.secret).await;
    let retry = refused_oauth(&reply, 429, "rate_limited");
    // ... until the delay has passed; a further failure doubles it.
    advance(&server, retry * 1000);
    let reply = token_request(&attacker, &server.base, &victim.id, "kbs_wrong").await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = token_request(&attacker, &server.base, &victim.id, "kbs_wrong").await;
    let longer = refused_oauth(&reply, 429, "rate_limited");
    assert!(
        longer > retry,
        "the delay did not grow: {retry} then {longer}"
    );
    assert_eq!(client_state(&server, &victim.id).await, "active");
    server.stop().await;
}

/// An OAuth-shaped refusal: status, `error`, and the `Retry-After` it carries.
fn refused_oauth(reply: &Reply, status: u16, error: &str) -> u64 {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.body["error"], error, "{}", reply.body);
    reply.retry_after.expect("no Retry-After")
}

#[tokio::test]
async fn known_and_unknown_client_ids_get_the_same_answers_and_take_the_same_time() {
    let server = TestServer::start().await;
    let known = server.register("known", IpPolicy::Any, "datakey").await;
    let unknown = Uuid::new_v4().to_string();

    // The same sequence of answers, throttle included, from two fresh sources.
    let (a, b) = (from("127.0.0.8"), from("127.0.0.9"));
    for i in 0..6 {
        let k = token_request(&a, &server.base, &known.id, "kbs_wrong").await;
        let u = token_request(&b, &server.base, &unknown, "kbs_wrong").await;
        assert_eq!((k.status, &k.body), (u.status, &u.body), "attempt {i}");
        assert_eq!(k.status, 401);
    }
    let mut throttled = (false, false);
    for _ in 0..5 {
        throttled.0 |= token_request(&a, &server.base, &known.id, "x").await.status == 429;
        throttled.1 |= token_request(&b, &server.base, &unknown, "x").await.status == 429;
    }
    assert_eq!(throttled, (true, true));

    // Timing: with the throttle out of the way, interleaved tries, medians compared. Before
    // step 7 a known id cost about twice an unknown one (its failure bookkeeping); a generous
    // bound still catches that.
    put_settings(
        &server,
        &SecuritySettings {
            auth_failures_per_client: 1_000_000,
            auth_failures_per_source: 1_000_000,
            ..SecuritySettings::default()
        },
    )
    .await;
    let http = from("127.0.0.10");
    let (mut unknown_ms, mut differences) = (Vec::new(), Vec::new());
    for i in 0..220 {
        let mut pair = [0.0; 2];
        for (slot, id) in [&known.id, &unknown].into_iter().enumerate() {
            let start = Instant::now();
            let reply = token_request(&http, &server.base, id, "kbs_wrong").await;
            assert_eq!(reply.status, 401, "{}", reply.body);
            pair[slot] = start.elapsed().as_secs_f64() * 1000.0;
        }
        // The first few warm connections and caches up.
        if i >= 20 {
            unknown_ms.push(pair[1]);
            differences.push(pair[0] - pair[1]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (u, d) = (median(&mut unknown_ms), median(&mut differences));
    println!(
        "token endpoint, wrong secret: unknown id median {u:.2} ms, known minus unknown (median of 200 pairs) {d:+.2} ms"
    );
    // Pairs side by side cancel the machine's drift; the bound is generous (15 % of a request,
    // at least 1 ms) and still well under the bookkeeping a known id used to cost.
    assert!(
        d.abs() <= (u * 0.15).max(1.0),
        "a known id takes {d:+.2} ms more than an unknown one ({u:.2} ms): the difference tells whether an id exists"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_last_admin_cannot_remove_itself_through_the_api_or_the_automatic_response() {
    let server = TestServer::start().await;
    let me = server.main.id.clone();
    let last_admin = |reply: &Reply| refused(reply, 409, "last_admin");

    // The four self-removals of the only admin.
    last_admin(
        &admin(
            &server,
            Method::POST,
            &format!("/v1/admin/clients/{me}/disable"),
            None,
        )
        .await,
    );
    last_admin(
        &admin(
            &server,
            Method::POST,
            &format!("/v1/admin/clients/{me}/lockdown"),
            Some(&json!({"reason": "oops"})),
        )
        .await,
    );
    last_admin(
        &admin(
            &server,
            Method::DELETE,
            &format!("/v1/admin/clients/{me}"),
            None,
        )
        .await,
    );
    let demote = json!({"name": "main", "ip_mode": "none", "scopes": ["datakey"]});
    last_admin(
        &admin(
            &server,
            Method::PATCH,
            &format!("/v1/admin/clients/{me}"),
            Some(&demote),
        )
        .await,
    );
    // Nothing changed: still active, still admin, its token still works.
    assert_eq!(client_state(&server, &me).await, "active");
    let reply = admin(
        &server,
        Method::GET,
        &format!("/v1/admin/clients/{me}"),
        None,
    )
    .await;
    assert!(
        reply.body["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("admin")),
        "{}",
        reply.body
    );
    assert!(
        events(&server, "client.disabled", Some(&me))
            .await
            .is_empty()
    );
    assert!(
        events(&server, "client.lockdown", Some(&me))
            .await
            .is_empty()
    );

    // With a second admin (pinned to 127.0.0.1), the first may step down; the second is then
    // the last one.
    put_settings(&server, &anomaly(3)).await;
    let (other, _, other_token, _) =
        register_pinned(&server, "second-admin", "127.0.0.1", &["admin", "datakey"]).await;
    let reply = admin(
        &server,
        Method::PATCH,
        &format!("/v1/admin/clients/{me}"),
        Some(&demote),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = call(
        &server,
        &server.client,
        Method::POST,
        &other_token,
        &format!("/v1/admin/clients/{other}/disable"),
        None,
    )
    .await;
    last_admin(&reply);
    assert_eq!(client_state_in_store(&server, &me).await, "active");

    // The automatic response does not switch the last admin off either: three address
    // mismatches (the threshold here) with its valid token.
    let two = from("127.0.0.2");
    for _ in 0..4 {
        refused(
            &usage(&server, &two, &other_token).await,
            403,
            "ip_not_allowed",
        );
    }
    assert_eq!(client_state_in_store(&server, &other).await, "active");
    assert_eq!(
        usage(&server, &server.client, &other_token).await.status,
        200
    );
    assert!(
        events(&server, "client.auto_disabled", Some(&other))
            .await
            .is_empty()
    );

    // The officer's CLI can, when told so explicitly.
    let url = server.database_url.clone();
    let output = cli(&url, &["client", "disable", &other]).await;
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("last active client with the admin scope"),
        "{output:?}"
    );
    assert_eq!(client_state_in_store(&server, &other).await, "active");
    let output = cli(&url, &["client", "disable", &other, "--allow-no-admin"]).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(client_state_in_store(&server, &other).await, "disabled");
    server.stop().await;
}

/// A client's state read from the store (the API may have no admin left to ask).
async fn client_state_in_store(server: &TestServer, id: &str) -> String {
    server
        .store
        .client(Uuid::parse_str(id).unwrap())
        .await
        .unwrap()
        .unwrap()
        .state
        .to_string()
}

#[tokio::test]
async fn a_lockdown_blocks_no_address_unless_asked_and_then_only_the_clients_own_for_a_while() {
    let server = TestServer::start().await;
    let two = from("127.0.0.2");
    // The suspect: one address and one wide private network.
    let reply = admin(
        &server,
        Method::POST,
        "/v1/admin/clients",
        Some(&json!({"name": "suspect", "ip_mode": "strict",
                     "ips": ["127.0.0.2", "10.16.0.0/12"], "scopes": ["datakey"]})),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let id = reply.body["client"]["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bystander = server.register("bystander", IpPolicy::Any, "datakey").await;
    let lockdown = |body: Value| {
        let path = format!("/v1/admin/clients/{id}/lockdown");
        let server = &server;
        async move { admin(server, Method::POST, &path, Some(&body)).await }
    };

    // A plain lockdown disables the client and blocks nothing: other clients and the health
    // checks on its address go on working.
    let reply = lockdown(json!({"reason": "drill"})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["client"]["state"], "disabled");
    assert_eq!(reply.body["blocked"], json!([]));
    assert_eq!(reply.body["blocked_until"], Value::Null);
    server.limiter.refresh(&server.broker).await.unwrap();
    assert_eq!(usage(&server, &two, &bystander.token).await.status, 200);
    assert_eq!(usage(&server, &two, &server.main.token).await.status, 200);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            call(&server, &two, Method::GET, "", probe, None)
                .await
                .status,
            200
        );
    }

    // Blocks are never wider than the client's own networks, nor than the configured prefix
    // (/16 for IPv4 by default), and always end.
    for (body, why) in [
        (
            json!({"block": {"cidrs": ["127.0.0.3"]}}),
            "not the client's",
        ),
        (
            json!({"block": {"cidrs": ["127.0.0.0/8"]}}),
            "wider than the client's",
        ),
        (json!({"block": {}}), "10.16.0.0/12 is wider than /16"),
        (
            json!({"block": {"cidrs": ["127.0.0.2"], "secs": 0}}),
            "no duration",
        ),
        (
            json!({"block": {"cidrs": ["127.0.0.2"], "secs": 604_801}}),
            "too long",
        ),
        (
            json!({"block": {"cidrs": ["not an address"]}}),
            "not an address",
        ),
    ] {
        let reply = lockdown(body).await;
        assert_eq!(reply.status, 422, "{why}: {}", reply.body);
        assert_eq!(
            error_code(&reply.body),
            "block_not_allowed",
            "{why}: {}",
            reply.body
        );
    }
    assert!(
        count_blocks(&server).await == 0,
        "a refused block left rows behind"
    );

    // A block of a part of its own, deduplicated, for two seconds.
    let reply = lockdown(json!({"block": {
        "cidrs": ["127.0.0.2", "127.0.0.2/32", "10.17.0.0/16"], "secs": 2}}))
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body["blocked"],
        json!(["127.0.0.2/32", "10.17.0.0/16"])
    );
    let until = reply.body["blocked_until"].as_i64().unwrap();
    assert!(until <= keybroker::auth::unix_now() + 2, "{}", reply.body);
    refused(
        &usage(&server, &two, &bystander.token).await,
        403,
        "source_blocked",
    );
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            call(&server, &two, Method::GET, "", probe, None)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        usage(&server, &server.client, &bystander.token)
            .await
            .status,
        200
    );
    // It ends by itself (each broker re-reads the blocks every few seconds; here by hand).
    let start = Instant::now();
    loop {
        server.limiter.refresh(&server.broker).await.unwrap();
        let reply = usage(&server, &two, &bystander.token).await;
        if reply.status == 200 {
            break;
        }
        refused(&reply, 403, "source_blocked");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the block never ended"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A client that may call from anywhere has nothing of its own to block.
    let reply = admin(
        &server,
        Method::POST,
        &format!("/v1/admin/clients/{}/lockdown", bystander.id),
        Some(&json!({"block": {}})),
    )
    .await;
    refused(&reply, 422, "block_not_allowed");
    server.stop().await;
}

async fn count_blocks(server: &TestServer) -> i64 {
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let n = common::count(&pool, "SELECT count(*) FROM blocked_sources").await;
    pool.close().await;
    n
}

#[tokio::test]
async fn registration_refuses_networks_that_mean_anywhere_and_keeps_one_copy_of_each() {
    let server = TestServer::start().await;
    let register = |ips: Value| {
        let server = &server;
        async move {
            admin(
                server,
                Method::POST,
                "/v1/admin/clients",
                Some(&json!({"name": "n", "ip_mode": "strict", "ips": ips, "scopes": ["datakey"]})),
            )
            .await
        }
    };
    for wide in [
        "0.0.0.0/0",
        "::/0",
        "128.0.0.0/1",
        "10.0.0.0/7",
        "2001::/31",
    ] {
        let reply = register(json!([wide])).await;
        refused(&reply, 422, "invalid_client_metadata");
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ip_mode none"),
            "{}",
            reply.body
        );
    }
    // 5,000 copies of one address, and networks inside another listed: one of each kept.
    let mut ips: Vec<Value> = vec![json!("192.0.2.7"); 5000];
    ips.push(json!("198.51.100.0/24"));
    ips.push(json!("198.51.100.9"));
    let reply = register(Value::Array(ips)).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(
        reply.body["client"]["ips"],
        json!(["192.0.2.7/32", "198.51.100.0/24"])
    );
    // The widest allowed are fine.
    let reply = register(json!(["11.0.0.0/8", "2001:db8::/32"])).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    server.stop().await;
}
