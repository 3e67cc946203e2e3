//! The audit trail over the real stack (SoftHSM2, Postgres, HTTPS): every event recorded with
//! who, what, where and which request, and found again through each filter and page of
//! `GET /v1/admin/audit`; the MAC chain verifies on an untouched log and breaks, at the right
//! row, after each kind of tampering done with plain SQL (through the API and the CLI);
//! concurrent writers on two brokers leave one unbroken chain; a change whose event cannot be
//! recorded is not made; and no audit or request-log row holds key material, a secret value, a
//! client secret, an access token or the PIN.
//!
//! Tampering tests work on their own database: they snapshot the chain into plain tables, break
//! it, check the verdict, and put the snapshot back (after which it must verify again).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use keybroker::auth::{IpPolicy, unix_now};
use keybroker::broker::{Broker, Limits};
use keybroker::hsm::Hsm;
use keybroker::store::{AuditMeta, NewAuditEvent, Store};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::common::{self, TestServer, count, error_code};

const DAY: i64 = 86_400;
/// Where the test clients connect from.
const LOCAL: &str = "127.0.0.1";

/// The verdicts' reasons, one per kind of broken link.
const MISSING: &str = "a row is missing or out of place";
const PREV: &str = "the previous-row MAC does not match";
const CONTENT: &str = "the row's MAC does not match its content";
const TAIL: &str = "rows at the end of the chain are missing";

// ---------------------------------------------------------------------------------------------
// HTTP helpers

/// What one request gave back, with the `x-request-id` its events must carry.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    request_id: String,
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id on a {status} answer"))
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "status {status}: body is not JSON: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    Reply {
        status,
        body,
        request_id,
    }
}

/// A request with a bearer token and an optional JSON body, from 127.0.0.1.
async fn call(
    server: &TestServer,
    method: Method,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> Reply {
    call_with(&server.client, &server.base, method, token, path, body).await
}

async fn call_with(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    token: &str,
    path: &str,
    body: Option<&Value>,
) -> Reply {
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    send(request).await
}

/// `client_credentials` with a client secret, over `http`.
async fn token_request(
    server: &TestServer,
    http: &reqwest::Client,
    id: &str,
    secret: &str,
) -> Reply {
    send(http.post(format!("{}/v1/oauth/token", server.base)).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", id),
        ("client_secret", secret),
    ]))
    .await
}

/// RFC 7009 revocation of `token` by the holder of `caller`.
async fn revoke(server: &TestServer, caller: &str, token: &str) -> Reply {
    send(
        server
            .client
            .post(format!("{}/v1/oauth/revoke", server.base))
            .bearer_auth(caller)
            .form(&[("token", token)]),
    )
    .await
}

/// The `jti` of one of our access tokens (read, not verified).
fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .to_owned()
}

fn now_us() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

/// 32 bytes from the OS's generator (two v4 UUIDs).
fn random_bytes() -> Vec<u8> {
    let mut bytes = Uuid::new_v4().as_bytes().to_vec();
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Audit helpers

/// One page of `GET /v1/admin/audit?{query}` as the admin; asserts 200.
async fn audit_page(server: &TestServer, query: &str) -> Value {
    let (status, body) = server.get(&format!("/v1/admin/audit?{query}")).await;
    assert_eq!(status, 200, "audit?{query}: {body}");
    assert!(body["items"].is_array(), "audit?{query}: {body}");
    body
}

/// Every event matching `query` (pages of 1000 followed to the end).
async fn audit_all(server: &TestServer, query: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let mut q = "limit=1000".to_owned();
        if !query.is_empty() {
            q = format!("{q}&{query}");
        }
        if let Some(after) = after {
            q = format!("{q}&after_seq={after}");
        }
        let page = audit_page(server, &q).await;
        events.extend(page["items"].as_array().unwrap().iter().cloned());
        match page.get("next_after_seq") {
            Some(next) => after = Some(next.as_i64().unwrap()),
            None => break,
        }
    }
    events
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

/// The one event request `request_id` recorded.
fn caused_by<'a>(events: &'a [Value], request_id: &str) -> &'a Value {
    let found: Vec<&Value> = events
        .iter()
        .filter(|e| e["request_id"] == request_id)
        .collect();
    assert_eq!(found.len(), 1, "events of request {request_id}: {found:#?}");
    found[0]
}

/// Asserts each field of `expected` (`null`: absent); `details` is compared key by key.
fn assert_event(event: &Value, expected: &Value) {
    for (field, want) in expected.as_object().unwrap() {
        if field == "details" {
            for (key, want) in want.as_object().unwrap() {
                assert_eq!(&event["details"][key], want, "details.{key} of {event:#}");
            }
        } else {
            assert_eq!(&event[field], want, "{field} of {event:#}");
        }
    }
}

/// `GET /v1/admin/audit/verify` as the admin.
async fn verification(server: &TestServer) -> Value {
    let (status, body) = server.get("/v1/admin/audit/verify").await;
    assert_eq!(status, 200, "verify: {body}");
    body
}

async fn assert_intact(server: &TestServer, rows: i64, what: &str) {
    let verdict = verification(server).await;
    assert_eq!(
        verdict,
        json!({"intact": true, "rows": rows}),
        "{what}: {verdict}"
    );
}

async fn assert_broken_at(server: &TestServer, seq: i64, reason: &str, what: &str) {
    let verdict = verification(server).await;
    assert_eq!(verdict["intact"], false, "{what}: {verdict}");
    assert_eq!(verdict["first_broken_seq"], seq, "{what}: {verdict}");
    assert_eq!(verdict["reason"], reason, "{what}: {verdict}");
}

/// Runs statements as they come (plain SQL, as an intruder with database access would).
async fn sql(pool: &PgPool, statements: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
}

/// `keybroker audit verify` on `database_url` (token settings and PIN from our environment).
async fn cli_verify(database_url: &str) -> std::process::Output {
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(["audit", "verify"])
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. What is recorded

#[tokio::test]
async fn every_event_is_recorded_with_who_what_where_and_which_request() {
    let started_us = now_us();
    let server = TestServer::start().await;
    let main = server.main.id.clone();
    let admin = server.main.token.clone();

    // The admin registers a client over HTTPS; it gets a token.
    let registered = call(
        &server,
        Method::POST,
        &admin,
        "/v1/admin/clients",
        Some(&json!({"name": "billing", "ip_mode": "none", "scopes": ["keys:*", "secrets:*"]})),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let app = text(&registered.body["client"]["client_id"]);
    let app_secret = text(&registered.body["client_secret"]);
    let issued = token_request(&server, &server.client, &app, &app_secret).await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    let app_token = text(&issued.body["access_token"]);

    // A key, bound to a context: created, rotated, read with the wrong context.
    let ctx = json!({"app": "billing"});
    let created = call(
        &server,
        Method::POST,
        &app_token,
        "/v1/keys",
        Some(&json!({"name": "payments", "format": "hex", "context": ctx})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let key = text(&created.body["key"]["id"]);
    let rotated = call(
        &server,
        Method::POST,
        &app_token,
        &format!("/v1/keys/{key}/rotate"),
        None,
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let refused = call(
        &server,
        Method::POST,
        &app_token,
        &format!("/v1/keys/{key}/plaintext"),
        Some(&json!({"context": {"app": "other"}})),
    )
    .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(error_code(&refused.body), "context_mismatch");

    // A secret with the same context: written, read.
    let value = common::b64(&random_bytes());
    let written = call(
        &server,
        Method::PUT,
        &app_token,
        "/v1/secrets/db-password",
        Some(&json!({"value": value, "context": ctx})),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let read = call(
        &server,
        Method::GET,
        &app_token,
        "/v1/secrets/db-password?context[app]=billing",
        None,
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["value"], value);

    // The key scheduled for deletion.
    let scheduled = call(
        &server,
        Method::DELETE,
        &app_token,
        &format!("/v1/keys/{key}"),
        None,
    )
    .await;
    assert_eq!(scheduled.status, 200, "{}", scheduled.body);
    assert_eq!(scheduled.body["state"], "pending_deletion");

    // A second token, revoked by the admin.
    let second = token_request(&server, &server.client, &app, &app_secret).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let second_token = text(&second.body["access_token"]);
    let revoked = revoke(&server, &admin, &second_token).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);

    // A wrong client secret at the token endpoint.
    let wrong = token_request(&server, &server.client, &app, "kbs_not-the-secret").await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);

    // A strict client's token used from another address.
    let strict = call(
        &server,
        Method::POST,
        &admin,
        "/v1/admin/clients",
        Some(
            &json!({"name": "edge", "ip_mode": "strict", "ips": ["127.0.0.1"],
                     "scopes": ["keys:read"]}),
        ),
    )
    .await;
    assert_eq!(strict.status, 201, "{}", strict.body);
    let strict_id = text(&strict.body["client"]["client_id"]);
    let strict_issued = token_request(
        &server,
        &server.client,
        &strict_id,
        &text(&strict.body["client_secret"]),
    )
    .await;
    assert_eq!(strict_issued.status, 200, "{}", strict_issued.body);
    let strict_token = text(&strict_issued.body["access_token"]);
    let from_2 = common::https_client_from(Some("127.0.0.2".parse().unwrap()));
    let mismatch = call_with(
        &from_2,
        &server.base,
        Method::GET,
        &strict_token,
        "/v1/keys",
        None,
    )
    .await;
    assert_eq!(mismatch.status, 403, "{}", mismatch.body);
    assert_eq!(error_code(&mismatch.body), "ip_not_allowed");

    // The admin disables the client; its token is refused from then on.
    let disabled = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/admin/clients/{app}/disable"),
        None,
    )
    .await;
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    let after_disable = call(&server, Method::GET, &app_token, "/v1/keys", None).await;
    assert!(
        [401, 403].contains(&after_disable.status),
        "{}",
        after_disable.body
    );
    // Refusals before authentication are audited coalesced, once a window per source: written
    // here now instead of at the end of the minute.
    server.auth.flush_refusals().await;

    // The scheduler destroys the key once its pending window is over.
    let report = server
        .broker
        .run_maintenance(unix_now() + 8 * DAY)
        .await
        .unwrap();
    assert_eq!(report.destroyed_keys, vec![Uuid::parse_str(&key).unwrap()]);
    let finished_us = now_us();

    let all = audit_all(&server, "").await;
    let n = i64::try_from(all.len()).unwrap();
    assert_eq!(seqs(&all), (1..=n).collect::<Vec<_>>(), "positions");
    for event in &all {
        let at = event["at_us"].as_i64().unwrap();
        assert!(
            (started_us..=finished_us).contains(&at),
            "at_us outside the test's run: {event}"
        );
        assert!(event["details"].is_object(), "{event}");
    }

    // The bootstrap: `main` registered through the library (the officer's path), its token
    // issued over HTTPS to an anonymous caller.
    assert_event(
        &all[0],
        &json!({"event": "client.registered", "severity": "info", "actor": "officer",
                "subject": main, "client_id": main, "key_id": null, "source_ip": null,
                "request_id": null, "details": {"name": "main", "has_public_key": false}}),
    );
    assert_event(
        &all[1],
        &json!({"event": "token.issued", "actor": "anonymous", "client_id": main,
                "subject": jti_of(&admin), "source_ip": LOCAL}),
    );
    assert!(all[1]["request_id"].is_string(), "{}", all[1]);

    // One event per request that changed or refused something, with its request id.
    assert_event(
        caused_by(&all, &registered.request_id),
        &json!({"event": "client.registered", "severity": "info", "actor": main,
                "subject": app, "client_id": app, "key_id": null, "source_ip": LOCAL,
                "details": {"name": "billing", "ip_mode": "none", "cidrs": [],
                            "scopes": registered.body["client"]["scopes"],
                            "has_public_key": false}}),
    );
    let token_issued = caused_by(&all, &issued.request_id);
    assert_event(
        token_issued,
        &json!({"event": "token.issued", "severity": "info", "actor": "anonymous",
                "subject": jti_of(&app_token), "client_id": app, "key_id": null,
                "source_ip": LOCAL, "details": {"expires_in": issued.body["expires_in"]}}),
    );
    assert_eq!(
        token_issued["details"]["scope"], issued.body["scope"],
        "{token_issued}"
    );
    let key_created = caused_by(&all, &created.request_id);
    assert_event(
        key_created,
        &json!({"event": "key.created", "severity": "info", "actor": app,
                "subject": "payments", "client_id": app, "key_id": key, "source_ip": LOCAL,
                "details": {"format": "hex", "length": 64, "rotation": "manual",
                            "rotation_period_days": null, "expires_at": null}}),
    );
    // Sealed under the database's active master key (the shared token holds many versions).
    let mk = key_created["details"]["mk_version"].clone();
    assert!(mk.as_i64().is_some_and(|v| v >= 1), "{key_created}");
    let context_hash = text(&key_created["details"]["context_hash"]);
    assert_eq!(context_hash.len(), 32, "{key_created}");
    assert!(context_hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        !key_created.to_string().contains("billing\""),
        "{key_created}"
    );
    assert_event(
        caused_by(&all, &rotated.request_id),
        &json!({"event": "key.rotated", "severity": "info", "actor": app,
                "subject": "payments", "client_id": app, "key_id": key, "source_ip": LOCAL,
                "details": {"from_version": 1, "to_version": 2, "reason": "manual",
                            "mk_version": mk}}),
    );
    assert_event(
        caused_by(&all, &refused.request_id),
        &json!({"event": "unauthorized_key_access", "severity": "warning", "actor": app,
                "subject": "payments", "client_id": app, "key_id": key, "source_ip": LOCAL,
                "details": {"operation": "key.read", "version": 2}}),
    );
    let secret_written = caused_by(&all, &written.request_id);
    let secret_id = text(&secret_written["key_id"]);
    assert_ne!(secret_id, key);
    assert_event(
        secret_written,
        &json!({"event": "secret.written", "severity": "info", "actor": app,
                "subject": "db-password", "client_id": app, "source_ip": LOCAL,
                // The same context hashes the same: comparable, not revealed.
                "details": {"version": 1, "mk_version": mk, "context_hash": context_hash}}),
    );
    assert_event(
        caused_by(&all, &read.request_id),
        &json!({"event": "secret.read", "severity": "info", "actor": app,
                "subject": "db-password", "client_id": app, "key_id": secret_id,
                "source_ip": LOCAL, "details": {"operation": "secret.read", "version": 1}}),
    );
    assert_event(
        caused_by(&all, &scheduled.request_id),
        &json!({"event": "key.deletion_scheduled", "severity": "warning", "actor": app,
                "subject": "payments", "client_id": app, "key_id": key, "source_ip": LOCAL,
                "details": {"from_state": "active", "to_state": "pending_deletion",
                            "deletion_due": scheduled.body["deletion_due"]}}),
    );
    assert_event(
        caused_by(&all, &second.request_id),
        &json!({"event": "token.issued", "actor": "anonymous", "client_id": app,
                "subject": jti_of(&second_token), "source_ip": LOCAL}),
    );
    assert_event(
        caused_by(&all, &revoked.request_id),
        &json!({"event": "token.revoked", "severity": "info", "actor": main,
                "subject": jti_of(&second_token), "client_id": app, "key_id": null,
                "source_ip": LOCAL}),
    );
    assert_event(
        caused_by(&all, &wrong.request_id),
        &json!({"event": "auth.failed", "severity": "warning", "actor": "anonymous",
                "subject": app, "client_id": app, "source_ip": LOCAL,
                "details": {"endpoint": "token", "reason": "wrong secret"}}),
    );
    assert_event(
        caused_by(&all, &strict.request_id),
        &json!({"event": "client.registered", "actor": main, "subject": strict_id,
                "client_id": strict_id, "source_ip": LOCAL,
                "details": {"name": "edge", "ip_mode": "strict",
                            "cidrs": strict.body["client"]["ips"]}}),
    );
    assert_event(
        caused_by(&all, &strict_issued.request_id),
        &json!({"event": "token.issued", "actor": "anonymous", "client_id": strict_id,
                "subject": jti_of(&strict_token), "source_ip": LOCAL}),
    );
    assert_event(
        caused_by(&all, &mismatch.request_id),
        &json!({"event": "ip_mismatch", "severity": "warning", "actor": "anonymous",
                "subject": strict_id, "client_id": strict_id, "key_id": null,
                "source_ip": "127.0.0.2"}),
    );
    assert_event(
        caused_by(&all, &disabled.request_id),
        &json!({"event": "client.disabled", "severity": "warning", "actor": main,
                "subject": app, "client_id": app, "source_ip": LOCAL}),
    );
    assert!(
        all.iter()
            .all(|e| e["request_id"] != after_disable.request_id),
        "a refusal before authentication has no row of its own"
    );
    let coalesced: Vec<&Value> = all
        .iter()
        .filter(|e| e["event"] == "auth.refused")
        .collect();
    assert_eq!(coalesced.len(), 1, "{coalesced:#?}");
    assert_event(
        coalesced[0],
        &json!({"event": "auth.refused", "severity": "warning", "actor": "anonymous",
                "subject": LOCAL, "client_id": null, "source_ip": LOCAL, "request_id": null,
                "details": {"count": 1, "reasons": {"client disabled": 1}, "clients": [app]}}),
    );
    // The scheduler's work: no request, no address.
    let destroyed: Vec<&Value> = all
        .iter()
        .filter(|e| e["event"] == "key.destroyed")
        .collect();
    assert_eq!(destroyed.len(), 1, "{destroyed:?}");
    assert_event(
        destroyed[0],
        &json!({"event": "key.destroyed", "severity": "warning", "actor": "scheduler",
                "subject": "payments", "client_id": app, "key_id": key, "source_ip": null,
                "request_id": null}),
    );
    // Nothing else: 2 at start-up, 15 requests, 1 coalesced refusal, 1 maintenance pass.
    assert_eq!(all.len(), 19, "{:#?}", names(&all));

    // Filters: by client, key (or secret), event, severity, several at once.
    let for_app = audit_all(&server, &format!("client_id={app}")).await;
    assert_eq!(
        names(&for_app),
        [
            "client.registered",
            "token.issued",
            "key.created",
            "key.rotated",
            "unauthorized_key_access",
            "secret.written",
            "secret.read",
            "key.deletion_scheduled",
            "token.issued",
            "token.revoked",
            "auth.failed",
            "client.disabled",
            "key.destroyed",
        ]
    );
    let local: Vec<Value> = all
        .iter()
        .filter(|e| e["client_id"] == app)
        .cloned()
        .collect();
    assert_eq!(for_app, local);
    let for_key = audit_all(&server, &format!("key_id={key}")).await;
    assert_eq!(
        names(&for_key),
        [
            "key.created",
            "key.rotated",
            "unauthorized_key_access",
            "key.deletion_scheduled",
            "key.destroyed",
        ]
    );
    let for_secret = audit_all(&server, &format!("key_id={secret_id}")).await;
    assert_eq!(names(&for_secret), ["secret.written", "secret.read"]);
    let rotations = audit_all(&server, "event=key.rotated").await;
    assert_eq!(
        rotations,
        vec![caused_by(&all, &rotated.request_id).clone()]
    );
    let warnings = audit_all(&server, "severity=warning").await;
    let local: Vec<Value> = all
        .iter()
        .filter(|e| e["severity"] == "warning")
        .cloned()
        .collect();
    assert_eq!(warnings, local);
    assert_eq!(
        names(&warnings).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "auth.failed",
            "auth.refused",
            "client.disabled",
            "ip_mismatch",
            "key.deletion_scheduled",
            "key.destroyed",
            "unauthorized_key_access",
        ])
    );
    assert!(audit_all(&server, "severity=critical").await.is_empty());
    assert!(audit_all(&server, "event=no.such.event").await.is_empty());
    assert!(
        audit_all(&server, &format!("client_id={}", Uuid::new_v4()))
            .await
            .is_empty()
    );
    let combined = audit_all(
        &server,
        &format!("client_id={app}&event=auth.failed&severity=warning"),
    )
    .await;
    assert_eq!(
        combined
            .iter()
            .map(|e| e["details"]["endpoint"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["token"]
    );
    let combined = audit_all(&server, &format!("client_id={strict_id}&key_id={key}")).await;
    assert!(combined.is_empty(), "{combined:?}");

    // Time range, in unix seconds: `from` inclusive, `to` exclusive.
    let cut = caused_by(&all, &rotated.request_id)["at_us"]
        .as_i64()
        .unwrap()
        / 1_000_000;
    let within = |from: Option<i64>, to: Option<i64>| -> Vec<Value> {
        all.iter()
            .filter(|e| {
                let at = e["at_us"].as_i64().unwrap();
                from.is_none_or(|f| at >= f * 1_000_000) && to.is_none_or(|t| at < t * 1_000_000)
            })
            .cloned()
            .collect()
    };
    for (from, to) in [
        (Some(cut), None),
        (None, Some(cut)),
        (None, Some(cut + 1)),
        (Some(cut), Some(cut + 1)),
        (Some(cut + 1), Some(finished_us / 1_000_000 + 1)),
    ] {
        let mut query = Vec::new();
        if let Some(from) = from {
            query.push(format!("from={from}"));
        }
        if let Some(to) = to {
            query.push(format!("to={to}"));
        }
        let query = query.join("&");
        assert_eq!(
            audit_all(&server, &query).await,
            within(from, to),
            "audit?{query}"
        );
    }
    assert!(
        !audit_all(&server, &format!("from={cut}&to={}", cut + 1))
            .await
            .is_empty()
    );
    let later = finished_us / 1_000_000 + 3600;
    assert!(
        audit_all(&server, &format!("from={later}"))
            .await
            .is_empty()
    );
    let earlier = started_us / 1_000_000;
    assert!(
        audit_all(&server, &format!("to={earlier}"))
            .await
            .is_empty()
    );
    assert_eq!(
        audit_all(
            &server,
            &format!("client_id={app}&from={earlier}&to={later}")
        )
        .await,
        for_app
    );

    // Pages: `next_after_seq` until the last page, which has none.
    for (filter, expected) in [("", &all), (&*format!("client_id={app}&"), &for_app)] {
        let mut walked = Vec::new();
        let mut after: Option<i64> = None;
        let mut pages = 0;
        loop {
            let mut query = format!("{filter}limit=4");
            if let Some(after) = after {
                query = format!("{query}&after_seq={after}");
            }
            let page = audit_page(&server, &query).await;
            let items = page["items"].as_array().unwrap();
            assert!(items.len() <= 4, "{page}");
            walked.extend(items.iter().cloned());
            pages += 1;
            match page.get("next_after_seq") {
                Some(next) => {
                    assert_eq!(items.len(), 4, "a short page before the last: {page}");
                    assert_eq!(next, &items[3]["seq"], "{page}");
                    after = next.as_i64();
                }
                None => break,
            }
            assert!(pages <= all.len(), "paging does not end");
        }
        assert_eq!(&walked, expected, "walked with {filter:?}");
        assert_eq!(pages, expected.len().div_ceil(4), "pages with {filter:?}");
    }
    let tail = audit_page(&server, "after_seq=17").await;
    assert_eq!(seqs(tail["items"].as_array().unwrap()), [18, 19]);
    assert!(tail.get("next_after_seq").is_none(), "{tail}");
    let exact = audit_page(&server, "limit=19").await;
    assert_eq!(exact["items"].as_array().unwrap().len(), 19);
    assert!(exact.get("next_after_seq").is_none(), "{exact}");
    let default = audit_page(&server, "").await;
    assert_eq!(default["items"].as_array().unwrap(), &all);

    // Bad queries, and callers without `admin`.
    for query in [
        "limit=0",
        "limit=1001",
        "severity=loud",
        "client_id=nobody",
        "key_id=1",
        "from=yesterday",
        "after_seq=x",
        "colour=red",
    ] {
        let (status, body) = server.get(&format!("/v1/admin/audit?{query}")).await;
        assert_eq!(status, 422, "audit?{query}: {body}");
        assert_eq!(error_code(&body), "invalid_request", "audit?{query}");
    }
    for path in ["/v1/admin/audit", "/v1/admin/audit/verify"] {
        let (status, body) = server.get_as(&strict_token, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(error_code(&body), "insufficient_scope", "{path}");
        let (status, body) = server.get_as("", path).await;
        assert_eq!(status, 401, "{path}: {body}");
    }

    assert_intact(&server, 19, "after the session").await;
    server.stop().await;
}

#[tokio::test]
async fn a_master_key_rotation_is_recorded_as_the_officers() {
    let server = TestServer::start().await;
    // The officer's command runs outside any request: no address, no request id.
    let version = server.broker.rotate_master_key().await.unwrap();
    let rotations = audit_all(&server, "event=master_key.rotated").await;
    assert_eq!(rotations.len(), 1, "{rotations:?}");
    assert_event(
        &rotations[0],
        &json!({"seq": 3, "severity": "info", "actor": "officer",
                "subject": version.token_label(), "client_id": null, "key_id": null,
                "source_ip": null, "request_id": null,
                "details": {"mk_version": version.get()}}),
    );
    // Seals from then on name the new version.
    let created = call(
        &server,
        Method::POST,
        &server.main.token,
        "/v1/keys",
        Some(&json!({"name": "after", "format": "hex"})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let event = caused_by(&audit_all(&server, "").await, &created.request_id).clone();
    assert_eq!(event["details"]["mk_version"], version.get(), "{event}");
    assert_intact(&server, 4, "after the rotation").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Verification and tampering

/// The events `history` records, in order (after the two of start-up).
const HISTORY: [&str; 10] = [
    "client.registered",
    "token.issued",
    "key.created",
    "key.created",
    "key.rotated",
    "secret.written",
    "secret.written",
    "secret.read",
    "key.deletion_scheduled",
    "client.registered",
];

/// A server whose chain holds ten rows of several kinds (see [`HISTORY`]), verified intact, and
/// a snapshot of it (`audit_backup`, `head_backup`) to restore after each tampering.
async fn history() -> (TestServer, PgPool, i64) {
    let server = TestServer::start().await;
    let admin = server.main.token.clone();
    let mut keys = Vec::new();
    for name in ["alpha", "beta"] {
        let created = call(
            &server,
            Method::POST,
            &admin,
            "/v1/keys",
            Some(&json!({"name": name, "format": "raw"})),
        )
        .await;
        assert_eq!(created.status, 201, "{}", created.body);
        keys.push(text(&created.body["key"]["id"]));
    }
    let rotated = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/keys/{}/rotate", keys[0]),
        None,
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    for _ in 0..2 {
        let body = json!({"value": common::b64(&random_bytes())});
        let written = call(&server, Method::PUT, &admin, "/v1/secrets/s", Some(&body)).await;
        assert_eq!(written.status, 200, "{}", written.body);
    }
    let read = call(&server, Method::GET, &admin, "/v1/secrets/s", None).await;
    assert_eq!(read.status, 200, "{}", read.body);
    let deleted = call(
        &server,
        Method::DELETE,
        &admin,
        &format!("/v1/keys/{}", keys[1]),
        None,
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let registered = call(
        &server,
        Method::POST,
        &admin,
        "/v1/admin/clients",
        Some(&json!({"name": "svc", "ip_mode": "none", "scopes": ["keys:read"]})),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);

    let all = audit_all(&server, "").await;
    assert_eq!(names(&all), HISTORY);
    let n = i64::try_from(all.len()).unwrap();
    assert_intact(&server, n, "untouched").await;
    let pool = PgPool::connect(&server.database_url).await.unwrap();
    sql(
        &pool,
        "CREATE TABLE audit_backup AS SELECT * FROM audit_events;
         CREATE TABLE head_backup AS SELECT * FROM audit_chain_head;",
    )
    .await;
    (server, pool, n)
}

/// Puts the snapshot back; the chain must verify again.
async fn restore(server: &TestServer, pool: &PgPool, n: i64) {
    sql(
        pool,
        "DELETE FROM audit_events; INSERT INTO audit_events SELECT * FROM audit_backup;
         DELETE FROM audit_chain_head; INSERT INTO audit_chain_head SELECT * FROM head_backup;",
    )
    .await;
    assert_intact(server, n, "restored").await;
}

#[tokio::test]
async fn an_untouched_chain_verifies_and_so_does_an_empty_one() {
    // Before anything but start-up: two rows.
    let server = TestServer::start().await;
    assert_intact(&server, 2, "at start-up").await;
    // A fresh database with no event at all.
    let pool = PgPool::connect(&server.database_url).await.unwrap();
    sql(
        &pool,
        "DELETE FROM audit_events;
         UPDATE audit_chain_head SET seq = 0, mac = '\\x0000000000000000000000000000000000000000000000000000000000000000';",
    )
    .await;
    assert_intact(&server, 0, "empty").await;
    server.stop().await;
}

#[tokio::test]
async fn editing_any_field_of_a_row_breaks_the_chain_at_that_row() {
    let (server, pool, n) = history().await;
    for (k, edit, reason) in [
        (5, "details = '{\"forged\":true}'", CONTENT),
        (5, "details = details || ' '", CONTENT),
        (3, "actor = 'officer'", CONTENT),
        (n, "at_us = at_us + 1", CONTENT),
        (1, "severity = 'critical'", CONTENT),
        (4, "event = 'key.enabled'", CONTENT),
        (6, "subject = 'someone-else'", CONTENT),
        (7, "client_id = NULL", CONTENT),
        (
            3,
            "key_id = '00000000-0000-0000-0000-000000000001'",
            CONTENT,
        ),
        (8, "source_ip = '10.9.8.7'", CONTENT),
        (2, "request_id = NULL", CONTENT),
        (1, "source_ip = '127.0.0.1'", CONTENT),
        (6, "prev_mac = mac", PREV),
        (9, "mac = '\\x00'", CONTENT),
    ] {
        sql(
            &pool,
            &format!("UPDATE audit_events SET {edit} WHERE seq = {k}"),
        )
        .await;
        assert_broken_at(&server, k, reason, &format!("{edit} on row {k}")).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn deleting_a_row_in_the_middle_breaks_the_chain_there() {
    let (server, pool, n) = history().await;
    for (statements, at, reason) in [
        ("DELETE FROM audit_events WHERE seq = 5", 5, MISSING),
        ("DELETE FROM audit_events WHERE seq = 1", 1, MISSING),
        (
            "DELETE FROM audit_events WHERE seq BETWEEN 4 AND 6",
            4,
            MISSING,
        ),
        // Closing the gap: the next row's link to the deleted one gives it away.
        (
            "DELETE FROM audit_events WHERE seq = 5;
             UPDATE audit_events SET seq = seq - 1 WHERE seq > 5;
             UPDATE audit_chain_head SET seq = seq - 1;",
            5,
            PREV,
        ),
    ] {
        sql(&pool, statements).await;
        assert_broken_at(&server, at, reason, statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn deleting_the_last_rows_is_caught_by_the_head() {
    let (server, pool, n) = history().await;
    for (statements, at) in [
        (format!("DELETE FROM audit_events WHERE seq = {n}"), n),
        (
            format!("DELETE FROM audit_events WHERE seq > {}", n - 3),
            n - 2,
        ),
        ("DELETE FROM audit_events".to_owned(), 1),
        // The head itself edited: pointing past the last row, or at another MAC.
        (
            "UPDATE audit_chain_head SET seq = seq + 1".to_owned(),
            n + 1,
        ),
        (
            "UPDATE audit_chain_head SET mac = (SELECT mac FROM audit_events WHERE seq = 2)"
                .to_owned(),
            n + 1,
        ),
    ] {
        sql(&pool, &statements).await;
        assert_broken_at(&server, at, TAIL, &statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn inserting_a_forged_row_breaks_the_chain_where_it_stands() {
    let (server, pool, n) = history().await;
    const COPY: &str =
        "at_us, severity, event, actor, subject, client_id, key_id, source_ip, request_id, details";
    for (statements, at, reason) in [
        // A copy of row 5 appended, links and all.
        (
            format!(
                "INSERT INTO audit_events SELECT {}, {COPY}, prev_mac, mac
                 FROM audit_events WHERE seq = 5",
                n + 1
            ),
            n + 1,
            PREV,
        ),
        // Appended and linked to the last row, with the head moved to it.
        (
            format!(
                "INSERT INTO audit_events SELECT {}, {COPY},
                     (SELECT mac FROM audit_events WHERE seq = {n}), mac
                 FROM audit_events WHERE seq = 5;
                 UPDATE audit_chain_head SET seq = {},
                     mac = (SELECT mac FROM audit_events WHERE seq = 5);",
                n + 1,
                n + 1
            ),
            n + 1,
            CONTENT,
        ),
        // Slipped in at position 4 (the rest shifted up), linked to row 3.
        (
            "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 4;
             UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1004;
             INSERT INTO audit_events SELECT 4, at_us, severity, 'client.enabled', actor,
                 subject, client_id, key_id, source_ip, request_id, details,
                 (SELECT mac FROM audit_events WHERE seq = 3), mac
             FROM audit_events WHERE seq = 5;
             UPDATE audit_chain_head SET seq = seq + 1;"
                .to_owned(),
            4,
            CONTENT,
        ),
        // Row 3 replayed right after itself.
        (
            format!(
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 4;
                 UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1004;
                 INSERT INTO audit_events SELECT 4, {COPY}, prev_mac, mac
                 FROM audit_events WHERE seq = 3;"
            ),
            4,
            PREV,
        ),
    ] {
        sql(&pool, &statements).await;
        assert_broken_at(&server, at, reason, &statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn reordering_rows_breaks_the_chain_at_the_first_moved_one() {
    let (server, pool, n) = history().await;
    const SWAP: &str = "UPDATE audit_events a SET at_us = b.at_us, severity = b.severity,
        event = b.event, actor = b.actor, subject = b.subject, client_id = b.client_id,
        key_id = b.key_id, source_ip = b.source_ip, request_id = b.request_id,
        details = b.details, prev_mac = b.prev_mac, mac = b.mac FROM audit_backup b";
    for (statements, at) in [
        (
            format!("{SWAP} WHERE (a.seq, b.seq) IN ((3, 6), (6, 3))"),
            3,
        ),
        (
            format!("{SWAP} WHERE (a.seq, b.seq) IN ((4, 5), (5, 4))"),
            4,
        ),
        (
            format!("{SWAP} WHERE (a.seq, b.seq) IN ((1, 2), (2, 1))"),
            1,
        ),
        // The positions swapped instead of the contents.
        (
            "UPDATE audit_events SET seq = seq + 1000 WHERE seq IN (2, 9);
             UPDATE audit_events SET seq = 9 WHERE seq = 1002;
             UPDATE audit_events SET seq = 2 WHERE seq = 1009;"
                .to_owned(),
            2,
        ),
    ] {
        sql(&pool, &statements).await;
        assert_broken_at(&server, at, PREV, &statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_row_carrying_another_rows_mac_breaks_the_chain_at_that_row() {
    let (server, pool, n) = history().await;
    for (statements, at) in [
        (
            "UPDATE audit_events SET mac = (SELECT mac FROM audit_backup WHERE seq = 7)
             WHERE seq = 4"
                .to_owned(),
            4,
        ),
        // The next row relinked to the borrowed MAC: still broken at the row that lies.
        (
            "UPDATE audit_events SET mac = (SELECT mac FROM audit_backup WHERE seq = 7)
             WHERE seq = 4;
             UPDATE audit_events SET prev_mac = (SELECT mac FROM audit_backup WHERE seq = 7)
             WHERE seq = 5;"
                .to_owned(),
            4,
        ),
        // The last row, with the head made to agree.
        (
            format!(
                "UPDATE audit_events SET mac = (SELECT mac FROM audit_backup WHERE seq = 2)
                 WHERE seq = {n};
                 UPDATE audit_chain_head SET mac = (SELECT mac FROM audit_backup WHERE seq = 2);"
            ),
            n,
        ),
    ] {
        sql(&pool, &statements).await;
        assert_broken_at(&server, at, CONTENT, &statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn verification_is_exact_across_its_pages() {
    // Past two of verification's 500-row pages: rows appended through the store's own path
    // (the token MACs each one), then broken on and around the page boundaries.
    let server = TestServer::start().await;
    let meta = AuditMeta {
        actor: "officer".to_owned(),
        source_ip: None,
        request_id: None,
        at_us: now_us(),
    };
    for batch in 0..11 {
        let events: Vec<NewAuditEvent> = (0..100)
            .map(|i| {
                NewAuditEvent::info("test.filler")
                    .subject(format!("row {batch}-{i}"))
                    .details(json!({"batch": batch, "i": i}))
            })
            .collect();
        server.store.audit(&meta, &events).await.unwrap();
    }
    let n = 1102;
    assert_intact(&server, n, "1102 rows").await;
    // The API's largest page.
    let page = audit_page(&server, "limit=1000").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1000);
    assert_eq!(page["next_after_seq"], 1000);
    assert_eq!(audit_all(&server, "").await.len(), 1102);

    let pool = PgPool::connect(&server.database_url).await.unwrap();
    sql(
        &pool,
        "CREATE TABLE audit_backup AS SELECT * FROM audit_events;
         CREATE TABLE head_backup AS SELECT * FROM audit_chain_head;",
    )
    .await;
    for (statements, at, reason) in [
        ("DELETE FROM audit_events WHERE seq = 500", 500, MISSING),
        ("DELETE FROM audit_events WHERE seq = 501", 501, MISSING),
        ("DELETE FROM audit_events WHERE seq = 1000", 1000, MISSING),
        (
            "UPDATE audit_events SET details = '{}' WHERE seq = 1001",
            1001,
            CONTENT,
        ),
        (
            "UPDATE audit_events SET at_us = at_us - 1 WHERE seq = 500",
            500,
            CONTENT,
        ),
        ("DELETE FROM audit_events WHERE seq = 1102", 1102, TAIL),
        (
            "UPDATE audit_events SET seq = seq + 5000 WHERE seq IN (500, 501);
             UPDATE audit_events SET seq = 501 WHERE seq = 5500;
             UPDATE audit_events SET seq = 500 WHERE seq = 5501;",
            500,
            PREV,
        ),
    ] {
        sql(&pool, statements).await;
        assert_broken_at(&server, at, reason, statements).await;
        restore(&server, &pool, n).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_cli_verifies_the_chain_and_names_the_first_broken_row() {
    let (server, pool, n) = history().await;
    let output = cli_verify(&server.database_url).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains(&format!("audit chain intact: {n} rows verified")),
        "{stdout}"
    );

    for (statements, at) in [
        (
            "UPDATE audit_events SET severity = 'error' WHERE seq = 4".to_owned(),
            4,
        ),
        (format!("DELETE FROM audit_events WHERE seq = {n}"), n),
    ] {
        sql(&pool, &statements).await;
        let output = cli_verify(&server.database_url).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{statements}: {output:?}");
        assert!(
            stdout.contains(&format!("audit chain BROKEN at row {at}")),
            "{statements}: {stdout}"
        );
        restore(&server, &pool, n).await;
    }
    // And intact again after the restore.
    let output = cli_verify(&server.database_url).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency

/// What one worker's requests did.
#[derive(Debug, Default)]
struct Done {
    created: i64,
    rotated: i64,
    disabled: i64,
    written: i64,
}

/// Ten operations: keys created, rotated (its own, and one every worker shares), disabled;
/// secrets written (its own, and one every worker shares). Shared ones may lose a race
/// (`409 concurrent_update`), which must leave no event.
async fn worker(
    http: reqwest::Client,
    base: String,
    token: String,
    shared_key: String,
    t: usize,
) -> Done {
    let mut done = Done::default();
    let mut own = String::new();
    for j in 0..10 {
        let reply = match j % 5 {
            0 => {
                let body = json!({"name": format!("w{t}-{j}"), "format": "hex"});
                let reply =
                    call_with(&http, &base, Method::POST, &token, "/v1/keys", Some(&body)).await;
                assert_eq!(reply.status, 201, "{}", reply.body);
                own = text(&reply.body["key"]["id"]);
                done.created += 1;
                continue;
            }
            1 => {
                let path = format!("/v1/keys/{own}/rotate");
                let reply = call_with(&http, &base, Method::POST, &token, &path, None).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                done.rotated += 1;
                continue;
            }
            2 => {
                let name = if j < 5 {
                    "shared".to_owned()
                } else {
                    format!("w{t}")
                };
                let body = json!({"value": common::b64(&random_bytes())});
                let path = format!("/v1/secrets/{name}");
                let reply = call_with(&http, &base, Method::PUT, &token, &path, Some(&body)).await;
                if reply.status == 200 {
                    done.written += 1;
                }
                reply
            }
            3 => {
                let path = format!("/v1/keys/{own}/disable");
                let reply = call_with(&http, &base, Method::POST, &token, &path, None).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                done.disabled += 1;
                continue;
            }
            _ => {
                let path = format!("/v1/keys/{shared_key}/rotate");
                let reply = call_with(&http, &base, Method::POST, &token, &path, None).await;
                if reply.status == 200 {
                    done.rotated += 1;
                }
                reply
            }
        };
        assert!(
            reply.status == 200
                || (reply.status == 409 && error_code(&reply.body) == "concurrent_update"),
            "{} {}",
            reply.status,
            reply.body
        );
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_two_brokers_leave_one_unbroken_chain() {
    const WORKERS: usize = 8;
    const AUTO_KEYS: usize = 12;
    const PASSES: i64 = 4;
    let server = TestServer::start().await;
    let admin = server.main.token.clone();
    let main = server.main.id.clone();
    // Keys the scheduler rotates every day, and one every worker rotates by hand.
    for i in 0..AUTO_KEYS {
        let body = json!({"name": format!("auto-{i}"), "format": "raw", "rotation": "auto",
                          "rotation_period_days": 1});
        let created = call(&server, Method::POST, &admin, "/v1/keys", Some(&body)).await;
        assert_eq!(created.status, 201, "{}", created.body);
    }
    let shared = call(
        &server,
        Method::POST,
        &admin,
        "/v1/keys",
        Some(&json!({"name": "shared", "format": "hex"})),
    )
    .await;
    assert_eq!(shared.status, 201, "{}", shared.body);
    let shared_key = text(&shared.body["key"]["id"]);
    let before = i64::try_from(audit_all(&server, "").await.len()).unwrap();

    // A second broker on the same database, with its own pool and token sessions.
    let other = Arc::new(Broker::new(
        Hsm::connect(common::hsm_config()).await.unwrap(),
        Store::connect_lazy(&server.database_url, 4).unwrap(),
        Limits { max_batch: 10 },
    ));
    let start = unix_now();
    let mut workers = tokio::task::JoinSet::new();
    for t in 0..WORKERS {
        workers.spawn(worker(
            server.client.clone(),
            server.base.clone(),
            admin.clone(),
            shared_key.clone(),
            t,
        ));
    }
    let mut schedulers = tokio::task::JoinSet::new();
    for broker in [server.broker.clone(), other.clone()] {
        schedulers.spawn(async move {
            let mut rotated = 0;
            for pass in 1..=PASSES {
                let report = broker
                    .run_maintenance(start + pass * 2 * DAY)
                    .await
                    .unwrap();
                rotated += i64::try_from(report.rotated.len()).unwrap();
            }
            rotated
        });
    }
    let mut done = Done::default();
    while let Some(result) = workers.join_next().await {
        let d = result.unwrap();
        done.created += d.created;
        done.rotated += d.rotated;
        done.disabled += d.disabled;
        done.written += d.written;
    }
    let mut scheduled = 0;
    while let Some(result) = schedulers.join_next().await {
        scheduled += result.unwrap();
    }
    assert!(
        scheduled >= i64::try_from(AUTO_KEYS).unwrap(),
        "{scheduled}"
    );

    // One chain: positions 1..=N without gaps or repeats, each row linked to the one before,
    // the head on the last, and the token's MACs all good.
    let pool = PgPool::connect(&server.database_url).await.unwrap();
    let chain: Vec<(i64, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT seq, prev_mac, mac FROM audit_events ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let n = i64::try_from(chain.len()).unwrap();
    assert_eq!(
        chain.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    let mut prev = vec![0u8; 32];
    for (seq, prev_mac, mac) in &chain {
        assert_eq!(
            prev_mac,
            &prev,
            "row {seq} is not linked to row {}",
            seq - 1
        );
        assert_eq!(mac.len(), 32, "row {seq}");
        prev.clone_from(mac);
    }
    let macs: BTreeSet<&Vec<u8>> = chain.iter().map(|(_, _, mac)| mac).collect();
    assert_eq!(macs.len(), chain.len(), "two rows with one MAC");
    let (head_seq, head_mac): (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, mac FROM audit_chain_head")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((head_seq, &head_mac), (n, &prev));
    assert_intact(&server, n, "after the concurrent run").await;

    // Exactly one event per change that was made, none for one that lost its race.
    let all = audit_all(&server, "").await;
    let events = |name: &str, actor: &str| -> i64 {
        i64::try_from(
            all.iter()
                .filter(|e| e["event"] == name && e["actor"] == actor)
                .count(),
        )
        .unwrap()
    };
    let worker_count = i64::try_from(WORKERS).unwrap();
    assert_eq!(
        n - before,
        done.created + done.rotated + done.disabled + done.written + scheduled
    );
    assert_eq!(
        events("key.created", &main),
        count(&pool, "SELECT count(*) FROM keys").await
    );
    assert_eq!(done.created, 2 * worker_count);
    assert_eq!(events("key.rotated", &main), done.rotated);
    assert_eq!(events("key.rotated", "scheduler"), scheduled);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM key_rotations WHERE actor = 'scheduler'"
        )
        .await,
        scheduled
    );
    assert_eq!(
        done.rotated + scheduled,
        count(
            &pool,
            "SELECT (SELECT count(*) FROM key_versions) - (SELECT count(*) FROM keys)"
        )
        .await
    );
    assert_eq!(events("key.disabled", &main), done.disabled);
    assert_eq!(done.disabled, 2 * worker_count);
    assert_eq!(events("secret.written", &main), done.written);
    assert_eq!(
        done.written,
        count(&pool, "SELECT count(*) FROM secret_versions").await
    );
    assert!(done.written >= worker_count, "{done:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. No secret material

/// Ways a value could be written down: as is, and its bytes in base64 (both alphabets, with and
/// without padding) and hex.
fn encodings(bytes: &[u8]) -> Vec<String> {
    vec![
        STANDARD.encode(bytes),
        STANDARD_NO_PAD.encode(bytes),
        URL_SAFE.encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        hex(bytes),
    ]
}

#[tokio::test]
async fn no_audit_or_log_row_holds_secret_material() {
    let server = TestServer::start().await;
    let admin = server.main.token.clone();
    let main = server.main.id.clone();
    // (what, text) that must appear nowhere; `material` is bytes whose encodings must not.
    let mut secrets: Vec<(String, String)> = vec![
        ("main client secret".into(), server.main.secret.clone()),
        ("main token".into(), admin.clone()),
        ("PIN".into(), common::user_pin().trim().to_owned()),
    ];
    let mut material: Vec<(String, Vec<u8>)> = Vec::new();

    // Managed keys in every format, shown at creation, rotated, read back (both versions).
    let ctx = json!({"tenant": "acme"});
    for format in ["raw", "hex", "uuid", "alphanumeric", "numeric"] {
        let created = call(
            &server,
            Method::POST,
            &admin,
            "/v1/keys",
            Some(
                &json!({"name": format!("k-{format}"), "format": format, "context": ctx,
                         "return_plaintext": true}),
            ),
        )
        .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = text(&created.body["key"]["id"]);
        let mut plaintexts = vec![text(&created.body["plaintext"])];
        let rotated = call(
            &server,
            Method::POST,
            &admin,
            &format!("/v1/keys/{id}/rotate"),
            None,
        )
        .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        for version in [1, 2] {
            let read = call(
                &server,
                Method::POST,
                &admin,
                &format!("/v1/keys/{id}/plaintext"),
                Some(&json!({"context": ctx, "version": version})),
            )
            .await;
            assert_eq!(read.status, 200, "{}", read.body);
            plaintexts.push(text(&read.body["plaintext"]));
        }
        assert_eq!(plaintexts[0], plaintexts[1]);
        assert_ne!(plaintexts[1], plaintexts[2]);
        for plaintext in plaintexts {
            let what = format!("{format} key plaintext");
            match format {
                "raw" => material.push((what.clone(), common::unb64(&plaintext))),
                "uuid" => secrets.push((what.clone(), plaintext.replace('-', ""))),
                "hex" => material.push((
                    what.clone(),
                    (0..plaintext.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&plaintext[i..i + 2], 16).unwrap())
                        .collect(),
                )),
                _ => {}
            }
            secrets.push((what, plaintext));
        }
        // A read with the wrong context is refused (and recorded) without the material.
        let refused = call(
            &server,
            Method::POST,
            &admin,
            &format!("/v1/keys/{id}/plaintext"),
            Some(&json!({"context": {"tenant": "other"}})),
        )
        .await;
        assert_eq!(refused.status, 422, "{}", refused.body);
    }

    // A data key, unwrapped again.
    let (status, datakey) = server.post("/v1/datakey", &json!({"context": ctx})).await;
    assert_eq!(status, 200, "{datakey}");
    let (status, unwrapped) = server
        .post(
            "/v1/unwrap",
            &json!({"wrapped": datakey["wrapped"], "context": ctx}),
        )
        .await;
    assert_eq!(status, 200, "{unwrapped}");
    assert_eq!(unwrapped["plaintext"], datakey["plaintext"]);
    material.push((
        "data key".into(),
        common::unb64(datakey["plaintext"].as_str().unwrap()),
    ));

    // Secrets, bytes and text, written twice and read.
    for (name, value) in [
        ("s-bytes", random_bytes()),
        (
            "s-text",
            format!("correct horse battery staple {}", Uuid::new_v4()).into_bytes(),
        ),
    ] {
        for value in [value.clone(), random_bytes()] {
            let body = json!({"value": common::b64(&value), "context": ctx});
            let path = format!("/v1/secrets/{name}");
            let written = call(&server, Method::PUT, &admin, &path, Some(&body)).await;
            assert_eq!(written.status, 200, "{}", written.body);
            material.push((format!("secret {name}"), value));
        }
        let read = call(
            &server,
            Method::GET,
            &admin,
            &format!("/v1/secrets/{name}?context[tenant]=acme&version=1"),
            None,
        )
        .await;
        assert_eq!(read.status, 200, "{}", read.body);
        assert_eq!(read.body["value"], common::b64(&value));
        if name == "s-text" {
            secrets.push((
                "text secret".into(),
                String::from_utf8(value.clone()).unwrap(),
            ));
        }
    }

    // Clients: over HTTPS (the secret shown once) and through the library; their tokens.
    let registered = call(
        &server,
        Method::POST,
        &admin,
        "/v1/admin/clients",
        Some(&json!({"name": "svc", "ip_mode": "none", "scopes": ["keys:read"]})),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let svc = text(&registered.body["client"]["client_id"]);
    let svc_secret = text(&registered.body["client_secret"]);
    let issued = token_request(&server, &server.client, &svc, &svc_secret).await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    let svc_token = text(&issued.body["access_token"]);
    let lib = server.register("lib", IpPolicy::Any, "keys:read").await;
    secrets.extend([
        ("svc client secret".into(), svc_secret.clone()),
        ("svc token".into(), svc_token.clone()),
        ("lib client secret".into(), lib.secret.clone()),
        ("lib token".into(), lib.token.clone()),
    ]);

    // Refusals that carry credentials: a near-miss secret, a forged token, a revoked token,
    // a disabled client's token.
    let near_miss = format!("{svc_secret}x");
    let wrong = token_request(&server, &server.client, &svc, &near_miss).await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let (signed, _) = admin.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
    let refused = call(&server, Method::GET, &forged, "/v1/keys", None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let revoked = revoke(&server, &admin, &lib.token).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    let refused = call(&server, Method::GET, &lib.token, "/v1/keys", None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let disabled = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/admin/clients/{svc}/disable"),
        None,
    )
    .await;
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    let refused = call(&server, Method::GET, &svc_token, "/v1/keys", None).await;
    assert!([401, 403].contains(&refused.status), "{}", refused.body);
    secrets.extend([
        ("near-miss secret".into(), near_miss),
        ("forged token".into(), forged),
    ]);

    // Everything the trail holds: each row with all its columns as text, its details alone,
    // and the API's view; then, once the server has flushed it, the request log.
    let pool = PgPool::connect(&server.database_url).await.unwrap();
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT seq, row_to_json(a)::text, details FROM audit_events a ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut haystacks: Vec<(String, String)> = Vec::new();
    for (seq, row, details) in rows {
        haystacks.push((format!("audit row {seq}"), row));
        haystacks.push((format!("audit row {seq} details"), details));
    }
    let api = audit_all(&server, "").await;
    let events = names(&api).into_iter().collect::<BTreeSet<_>>();
    for expected in [
        "key.created",
        "key.rotated",
        "unauthorized_key_access",
        "secret.written",
        "secret.read",
        "client.registered",
        "token.issued",
        "token.revoked",
        "auth.failed",
        "client.disabled",
    ] {
        assert!(events.contains(expected), "no {expected} in {events:?}");
    }
    haystacks.push(("audit API".into(), serde_json::to_string(&api).unwrap()));
    server.stop().await;
    let logged: Vec<(String,)> =
        sqlx::query_as("SELECT row_to_json(r)::text FROM request_log r ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(logged.len() > 30, "request log: {} rows", logged.len());
    for (i, (row,)) in logged.into_iter().enumerate() {
        haystacks.push((format!("request log row {i}"), row));
    }

    // The search sees what is there: the admin's id is, in the trail and the log alike.
    for place in ["audit row", "audit API", "request log"] {
        assert!(
            haystacks
                .iter()
                .any(|(p, h)| p.starts_with(place) && h.contains(&main)),
            "{main} not found in any {place}"
        );
    }
    let mut needles: Vec<(String, String)> = Vec::new();
    for (what, value) in secrets {
        needles.extend(
            encodings(value.as_bytes())
                .into_iter()
                .map(|e| (what.clone(), e)),
        );
        needles.push((what, value));
    }
    for (what, bytes) in material {
        needles.extend(encodings(&bytes).into_iter().map(|e| (what.clone(), e)));
    }
    for (what, needle) in &needles {
        assert!(needle.len() >= 12, "{what} is too short to look for");
    }
    for (place, haystack) in &haystacks {
        let lower = haystack.to_lowercase();
        for (what, needle) in &needles {
            assert!(
                !lower.contains(&needle.to_lowercase()),
                "{place} holds the {what}: {haystack}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A change and its event are one

#[tokio::test]
async fn a_change_whose_event_cannot_be_recorded_is_not_made() {
    let server = TestServer::start().await;
    let admin = server.main.token.clone();
    let created = call(
        &server,
        Method::POST,
        &admin,
        "/v1/keys",
        Some(&json!({"name": "kept", "format": "hex"})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let key = text(&created.body["key"]["id"]);
    let value = common::b64(&random_bytes());
    let written = call(
        &server,
        Method::PUT,
        &admin,
        "/v1/secrets/kept",
        Some(&json!({"value": value})),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let doomed = call(
        &server,
        Method::POST,
        &admin,
        "/v1/keys",
        Some(&json!({"name": "doomed", "format": "raw"})),
    )
    .await;
    assert_eq!(doomed.status, 201, "{}", doomed.body);
    let doomed = text(&doomed.body["key"]["id"]);
    let scheduled = call(
        &server,
        Method::DELETE,
        &admin,
        &format!("/v1/keys/{doomed}"),
        None,
    )
    .await;
    assert_eq!(scheduled.status, 200, "{}", scheduled.body);
    let other = server.register("other", IpPolicy::Any, "keys:read").await;

    let pool = PgPool::connect(&server.database_url).await.unwrap();
    let before = count(&pool, "SELECT count(*) FROM audit_events").await;
    let head = |pool: PgPool| async move {
        let head: (i64, Vec<u8>) = sqlx::query_as("SELECT seq, mac FROM audit_chain_head")
            .fetch_one(&pool)
            .await
            .unwrap();
        head
    };
    let head_before = head(pool.clone()).await;
    let clients = count(&pool, "SELECT count(*) FROM clients").await;
    // From now on the trail takes no new row (as a full disk or a broken table would): every
    // append fails inside the transaction of the change it records.
    sql(
        &pool,
        &format!(
            "ALTER TABLE audit_events ADD CONSTRAINT no_more_rows CHECK (seq <= {before}) NOT VALID"
        ),
    )
    .await;

    let assert_failed = |reply: &Reply, what: &str| {
        assert_eq!(reply.status, 500, "{what}: {}", reply.body);
    };
    let reply = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/keys/{key}/rotate"),
        None,
    )
    .await;
    assert_failed(&reply, "rotate");
    assert_eq!(error_code(&reply.body), "internal_error");
    let reply = call(
        &server,
        Method::POST,
        &admin,
        "/v1/keys",
        Some(&json!({"name": "never", "format": "hex", "return_plaintext": true})),
    )
    .await;
    assert_failed(&reply, "create");
    assert!(reply.body.get("plaintext").is_none(), "{}", reply.body);
    let reply = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/keys/{key}/disable"),
        None,
    )
    .await;
    assert_failed(&reply, "disable key");
    let reply = call(
        &server,
        Method::PUT,
        &admin,
        "/v1/secrets/kept",
        Some(&json!({"value": common::b64(&random_bytes())})),
    )
    .await;
    assert_failed(&reply, "put secret");
    // A read is served only once it is on the record.
    let reply = call(&server, Method::GET, &admin, "/v1/secrets/kept", None).await;
    assert_failed(&reply, "read secret");
    assert!(!reply.body.to_string().contains(&value), "{}", reply.body);
    let reply = call(
        &server,
        Method::POST,
        &admin,
        "/v1/admin/clients",
        Some(&json!({"name": "never", "ip_mode": "none", "scopes": ["keys:read"]})),
    )
    .await;
    assert_failed(&reply, "register client");
    assert!(reply.body.get("client_secret").is_none(), "{}", reply.body);
    let reply = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/admin/clients/{}/disable", other.id),
        None,
    )
    .await;
    assert_failed(&reply, "disable client");
    let reply = revoke(&server, &admin, &other.token).await;
    assert_failed(&reply, "revoke");
    // A token is handed out only once its issuance is on the record.
    let reply = token_request(&server, &server.client, &other.id, &other.secret).await;
    assert_failed(&reply, "token");
    assert!(reply.body.get("access_token").is_none(), "{}", reply.body);
    // The scheduler's destruction is refused too.
    assert!(
        server
            .broker
            .run_maintenance(unix_now() + 8 * DAY)
            .await
            .is_err()
    );

    // Nothing happened: not the changes, not their events.
    let key_row: (i32, String, i64) = sqlx::query_as(
        "SELECT current_version, state, (SELECT count(*) FROM key_versions WHERE key_id = $1)
         FROM keys WHERE id = $1",
    )
    .bind(Uuid::parse_str(&key).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(key_row, (1, "active".to_owned(), 1));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM keys WHERE name = 'never'").await,
        0
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM key_rotations").await, 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM secret_versions").await,
        1
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM clients").await, clients);
    assert_eq!(count(&pool, "SELECT count(*) FROM revoked_tokens").await, 0);
    let doomed_row: (String, i64) = sqlx::query_as(
        "SELECT state, (SELECT count(*) FROM key_versions WHERE key_id = $1 AND sealed IS NOT NULL)
         FROM keys WHERE id = $1",
    )
    .bind(Uuid::parse_str(&doomed).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doomed_row, ("pending_deletion".to_owned(), 1));
    // The other client still works, with its old token.
    let reply = call(&server, Method::GET, &other.token, "/v1/keys", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM audit_events").await,
        before
    );
    assert_eq!(head(pool.clone()).await, head_before);
    assert_intact(&server, before, "after the refused changes").await;

    // The trail takes rows again: the same change goes through, on the record.
    sql(
        &pool,
        "ALTER TABLE audit_events DROP CONSTRAINT no_more_rows",
    )
    .await;
    let reply = call(
        &server,
        Method::POST,
        &admin,
        &format!("/v1/keys/{key}/rotate"),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["current_version"], 2);
    let last = audit_page(&server, &format!("after_seq={before}")).await;
    assert_eq!(names(last["items"].as_array().unwrap()), ["key.rotated"]);
    assert_intact(&server, before + 1, "after the rotation").await;
    server.stop().await;
}
