//! Managed keys, secrets, maintenance and usage over HTTPS (and through the broker where time
//! must move): every format's alphabet and length, uniformity of the sampled alphabets, reads
//! bound to the context and the owner, rotation history, every state transition and every
//! refused one with its exact status and code, expiry, the pending window and destruction (down
//! to the NULLs in Postgres), scheduled rotation (also with two brokers racing), the due report,
//! secrets, usage counts, scopes, and a whole session's log holding no key or secret value.
//!
//! Time is a parameter: nothing here sleeps to wait for a window. Keys are created over HTTP at
//! the real time (or through the broker at a chosen time), and the broker's maintenance is run
//! at a chosen future time; what it stores is what HTTP then shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keybroker::auth::{IpPolicy, unix_now};
use keybroker::broker::{Broker, BrokerError, KeySpec, KeyState, Limits, Rotation};
use keybroker::crypto::EncryptionContext;
use keybroker::crypto::formats::KeyFormat;
use keybroker::hsm::Hsm;
use keybroker::store::Store;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{self, TestClient, TestServer, b64, error_code, send_json, unb64};

const DAY: i64 = 86_400;
/// A secret version's stored data key and value, `None` once destroyed.
type SecretMaterial = (Option<Vec<u8>>, Option<Vec<u8>>);
/// Every managed-key and secret scope.
const MANAGED_SCOPES: [&str; 6] = [
    "keys:create",
    "keys:read",
    "keys:rotate",
    "keys:manage",
    "secrets:read",
    "secrets:write",
];
const DIGITS: &[u8] = b"0123456789";
const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

// ---------------------------------------------------------------------------------------------
// Helpers

fn owner(client: &TestClient) -> Uuid {
    Uuid::parse_str(&client.id).unwrap()
}

fn context(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
    .unwrap()
}

/// The context most keys here are created with, as JSON (`spec` gives the broker the same).
fn app_context() -> Value {
    json!({"app": "billing"})
}

fn spec(name: &str, format: KeyFormat, length: usize, rotation: Rotation) -> KeySpec {
    KeySpec {
        name: name.to_owned(),
        format,
        length,
        expires_at: None,
        rotation,
        context: context(&[("app", "billing")]),
    }
}

async fn put_as(server: &TestServer, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let url = format!("{}{path}", server.base);
    send_json(&server.client, reqwest::Method::PUT, url, token, Some(body)).await
}

async fn delete_as(server: &TestServer, token: &str, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", server.base);
    send_json(&server.client, reqwest::Method::DELETE, url, token, None).await
}

/// Asserts an answer's status and error code.
fn assert_error(answer: &(u16, Value), status: u16, code: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{what}: {body}");
    assert_eq!(error_code(body), code, "{what}: {body}");
}

/// POST /v1/keys as main; asserts 201 and returns the body.
async fn create(server: &TestServer, body: Value) -> Value {
    let (status, reply) = server.post("/v1/keys", &body).await;
    assert_eq!(status, 201, "{body} -> {reply}");
    reply
}

fn id_of(created: &Value) -> String {
    created["key"]["id"].as_str().unwrap().to_owned()
}

/// POST /v1/keys/{id}/plaintext as `token`.
async fn read_key(
    server: &TestServer,
    token: &str,
    id: &str,
    context: &Value,
    version: Option<u32>,
) -> (u16, Value) {
    let mut body = json!({"context": context});
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    server
        .post_as(token, &format!("/v1/keys/{id}/plaintext"), &body)
        .await
}

/// The plaintext of a version read as main (asserting success).
async fn plaintext(server: &TestServer, id: &str, context: &Value, version: Option<u32>) -> String {
    let (status, body) = read_key(server, &server.main.token, id, context, version).await;
    assert_eq!(status, 200, "read {id} v{version:?}: {body}");
    if let Some(v) = version {
        assert_eq!(body["version"], v, "{body}");
    }
    body["plaintext"].as_str().unwrap().to_owned()
}

/// GET /v1/keys/{id} as main.
async fn details(server: &TestServer, id: &str) -> Value {
    let (status, body) = server.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn state_of(server: &TestServer, id: &str) -> String {
    details(server, id).await["key"]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The active master-key version of the server's database.
async fn active_mk(server: &TestServer) -> i64 {
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (v,): (i32,) = sqlx::query_as("SELECT version FROM master_keys WHERE state = 'active'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    i64::from(v)
}

/// The operations on a key, for the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Rotate,
    Disable,
    Enable,
    Refresh,
    Delete,
    Cancel,
}

const ALL_OPS: [Op; 7] = [
    Op::Read,
    Op::Rotate,
    Op::Disable,
    Op::Enable,
    Op::Refresh,
    Op::Delete,
    Op::Cancel,
];

async fn key_op(server: &TestServer, id: &str, op: Op) -> (u16, Value) {
    let path = |action: &str| format!("/v1/keys/{id}/{action}");
    match op {
        Op::Read => read_key(server, &server.main.token, id, &app_context(), None).await,
        Op::Rotate => server.post(&path("rotate"), &json!({})).await,
        Op::Disable => server.post(&path("disable"), &json!({})).await,
        Op::Enable => server.post(&path("enable"), &json!({})).await,
        Op::Refresh => {
            server
                .post(&path("refresh"), &json!({"ttl_days": 30}))
                .await
        }
        Op::Delete => delete_as(server, &server.main.token, &format!("/v1/keys/{id}")).await,
        Op::Cancel => server.post(&path("cancel-deletion"), &json!({})).await,
    }
}

/// Every op in `ops` is refused with `status`/`code`, and the key stays in `state`.
async fn assert_refused(server: &TestServer, id: &str, ops: &[Op], status: u16, code: &str) {
    let before = details(server, id).await;
    for &op in ops {
        let answer = key_op(server, id, op).await;
        assert_error(&answer, status, code, &format!("{op:?} on a {code} key"));
    }
    let after = details(server, id).await;
    assert_eq!(before["key"], after["key"], "a refused op changed the key");
    assert_eq!(before["versions"], after["versions"]);
}

/// A transition that works; returns the key body.
async fn assert_moves(server: &TestServer, id: &str, op: Op, to: &str) -> Value {
    let (status, body) = key_op(server, id, op).await;
    assert_eq!(status, 200, "{op:?} -> {to}: {body}");
    assert_eq!(body["state"], to, "{op:?}: {body}");
    assert_eq!(state_of(server, id).await, to);
    body
}

/// Chi-square statistic of `counts` against the uniform distribution.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// Creates `keys` keys of `format`/`length` through the broker (a few tasks at a time) and
/// counts each symbol of `alphabet` over all their material.
async fn pooled_counts(
    broker: &Arc<Broker>,
    owner: Uuid,
    format: KeyFormat,
    length: usize,
    keys: usize,
    alphabet: &'static [u8],
) -> Vec<u64> {
    const TASKS: usize = 8;
    let now = unix_now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let broker = broker.clone();
        tasks.spawn(async move {
            let mut counts = vec![0u64; alphabet.len()];
            for i in 0..keys / TASKS + usize::from(t < keys % TASKS) {
                let name = format!("{}-{t}-{i}", format.as_str());
                let (key, material) = broker
                    .create_key(
                        owner,
                        spec(&name, format, length, Rotation::Manual),
                        true,
                        now,
                    )
                    .await
                    .unwrap();
                assert_eq!(key.length, length);
                let material = material.unwrap();
                assert_eq!(material.len(), length, "{name}");
                for c in material.iter() {
                    let i = alphabet
                        .iter()
                        .position(|a| a == c)
                        .unwrap_or_else(|| panic!("{name}: {c:#04x} outside the alphabet"));
                    counts[i] += 1;
                }
            }
            counts
        });
    }
    let mut counts = vec![0u64; alphabet.len()];
    while let Some(result) = tasks.join_next().await {
        for (total, n) in counts.iter_mut().zip(result.unwrap()) {
            *total += n;
        }
    }
    counts
}

/// Usage rows of a /v1/usage answer as (key id, operation) → count, checking every row's
/// client and day.
fn usage_map(body: &Value, client: &str, days: &[i64]) -> BTreeMap<(String, String), i64> {
    let mut map = BTreeMap::new();
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["client_id"], client, "{item}");
        let day = item["day"].as_i64().unwrap();
        assert!(days.contains(&day), "day {day} is not today: {item}");
        *map.entry((
            item["key_id"].as_str().unwrap().to_owned(),
            item["operation"].as_str().unwrap().to_owned(),
        ))
        .or_insert(0) += item["count"].as_i64().unwrap();
    }
    map
}

// ---------------------------------------------------------------------------------------------
// 1. Creation: formats, lengths, validation

#[tokio::test]
async fn each_format_is_created_over_http_with_its_alphabet_and_length() {
    let server = TestServer::start().await;
    let is_hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let is_alnum = |s: &str| s.bytes().all(|c| c.is_ascii_alphanumeric());
    let is_digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());

    // (format, requested length, the length it gets, check of the plaintext)
    type Check = Box<dyn Fn(&str) -> bool>;
    let cases: Vec<(&str, Option<usize>, usize, Check)> = vec![
        ("raw", Some(48), 48, Box::new(|p| unb64(p).len() == 48)),
        ("raw", None, 32, Box::new(|p| unb64(p).len() == 32)),
        ("raw", Some(16), 16, Box::new(|p| unb64(p).len() == 16)),
        ("raw", Some(256), 256, Box::new(|p| unb64(p).len() == 256)),
        (
            "hex",
            Some(33),
            33,
            Box::new(move |p| p.len() == 33 && is_hex(p)),
        ),
        (
            "hex",
            None,
            64,
            Box::new(move |p| p.len() == 64 && is_hex(p)),
        ),
        (
            "hex",
            Some(512),
            512,
            Box::new(move |p| p.len() == 512 && is_hex(p)),
        ),
        ("uuid", None, 36, Box::new(|_| true)),
        ("uuid", Some(36), 36, Box::new(|_| true)),
        (
            "alphanumeric",
            None,
            32,
            Box::new(move |p| p.len() == 32 && is_alnum(p)),
        ),
        (
            "alphanumeric",
            Some(8),
            8,
            Box::new(move |p| p.len() == 8 && is_alnum(p)),
        ),
        (
            "alphanumeric",
            Some(256),
            256,
            Box::new(move |p| p.len() == 256 && is_alnum(p)),
        ),
        (
            "numeric",
            None,
            16,
            Box::new(move |p| p.len() == 16 && is_digits(p)),
        ),
        (
            "numeric",
            Some(4),
            4,
            Box::new(move |p| p.len() == 4 && is_digits(p)),
        ),
        (
            "numeric",
            Some(64),
            64,
            Box::new(move |p| p.len() == 64 && is_digits(p)),
        ),
    ];
    let mut seen = BTreeSet::new();
    for (i, (format, length, want, check)) in cases.iter().enumerate() {
        let mut body = json!({"name": format!("k{i}"), "format": format, "return_plaintext": true});
        if let Some(length) = length {
            body["length"] = json!(length);
        }
        let reply = create(&server, body).await;
        let key = &reply["key"];
        assert_eq!(key["format"], *format, "{reply}");
        assert_eq!(key["length"], *want, "{reply}");
        assert_eq!(key["state"], "active");
        assert_eq!(key["current_version"], 1);
        assert_eq!(key["rotation"], "manual");
        assert!(key.get("expires_at").is_none(), "{reply}");
        let text = reply["plaintext"].as_str().unwrap();
        assert!(check(text), "{format} {length:?}: {text:?}");
        assert!(seen.insert(text.to_owned()), "the same material twice");
        if *format == "uuid" {
            let parsed = Uuid::parse_str(text).unwrap();
            assert_eq!(parsed.get_version_num(), 4, "{text}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{text}");
            // Canonical: lowercase, hyphenated, 36 characters.
            assert_eq!(text, parsed.hyphenated().to_string(), "{text}");
        }
    }

    // Without return_plaintext (or with it false) there is no plaintext in the answer.
    for (name, extra) in [
        ("quiet1", json!({})),
        ("quiet2", json!({"return_plaintext": false})),
    ] {
        let mut body = json!({"name": name, "format": "hex"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let reply = create(&server, body).await;
        assert!(reply.get("plaintext").is_none(), "{reply}");
        assert!(reply["key"].get("plaintext").is_none(), "{reply}");
    }

    // Refusals: each with its exact status and code, and nothing created.
    let past = unix_now() - 10;
    let too_many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let invalid = [
        json!({"name": "r", "format": "raw", "length": 15}),
        json!({"name": "r", "format": "raw", "length": 257}),
        json!({"name": "r", "format": "hex", "length": 15}),
        json!({"name": "r", "format": "hex", "length": 513}),
        json!({"name": "r", "format": "alphanumeric", "length": 7}),
        json!({"name": "r", "format": "alphanumeric", "length": 257}),
        json!({"name": "r", "format": "numeric", "length": 3}),
        json!({"name": "r", "format": "numeric", "length": 65}),
        json!({"name": "r", "format": "numeric", "length": 0}),
        json!({"name": "r", "format": "uuid", "length": 32}),
        json!({"name": "r", "format": "base64"}),
        json!({"name": "r", "format": "HEX"}),
        json!({"name": "r", "format": "hex", "rotation": "auto", "rotation_period_days": 0}),
        json!({"name": "r", "format": "hex", "rotation": "auto", "rotation_period_days": 3651}),
        json!({"name": "r", "format": "hex", "rotation_period_days": 30}),
        json!({"name": "r", "format": "hex", "rotation": "weekly"}),
        json!({"name": "has space", "format": "hex"}),
        json!({"name": "", "format": "hex"}),
        json!({"name": "ünïcode", "format": "hex"}),
        json!({"name": "x".repeat(201), "format": "hex"}),
        json!({"name": "r", "format": "hex", "expires_at": past}),
        json!({"name": "r", "format": "hex", "ttl_days": 0}),
        json!({"name": "r", "format": "hex", "ttl_days": 36_501}),
        json!({"name": "r", "format": "hex", "ttl_days": 1, "expires_at": past + 10 * DAY}),
        json!({"name": "r", "format": "hex", "surprise": 1}),
        json!({"name": "r", "format": "hex", "context": {"a": 1}}),
        json!({"name": "r", "format": "hex", "return_plaintext": "yes"}),
        json!({"format": "hex"}),
    ];
    let refused = invalid
        .into_iter()
        .map(|body| (body, 422, "invalid_request"))
        .chain([
            (
                json!({"name": "r", "format": "hex", "rotation": "auto"}),
                422,
                "rotation_period_required",
            ),
            (
                json!({"name": "r", "format": "hex", "context": {"": "empty key"}}),
                422,
                "invalid_context",
            ),
            (
                json!({"name": "r", "format": "hex", "context": too_many}),
                422,
                "invalid_context",
            ),
            (
                json!({"name": "k0", "format": "hex"}),
                409,
                "key_name_taken",
            ),
            (
                json!({"name": "k0", "format": "raw"}),
                409,
                "key_name_taken",
            ),
        ]);
    for (body, status, code) in refused {
        let answer = server.post("/v1/keys", &body).await;
        assert_error(&answer, status, code, &body.to_string());
    }
    let (status, list) = server.get("/v1/keys?limit=500").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        cases.len() + 2,
        "a refused request created a key: {list}"
    );
    // The edges of the ranges are accepted, and an explicit expiry is kept to the second.
    let at = unix_now() + 3 * DAY + 17;
    let reply = create(
        &server,
        json!({"name": "at", "format": "hex", "expires_at": at}),
    )
    .await;
    assert_eq!(reply["key"]["expires_at"], at, "{reply}");
    let before = unix_now();
    let reply = create(
        &server,
        json!({"name": "ttl", "format": "hex", "ttl_days": 36_500}),
    )
    .await;
    let expires = reply["key"]["expires_at"].as_i64().unwrap();
    assert!((before + 36_500 * DAY..=unix_now() + 36_500 * DAY).contains(&expires));
    let reply = create(
        &server,
        json!({"name": "slow", "format": "hex", "rotation": "auto", "rotation_period_days": 3650}),
    )
    .await;
    assert_eq!(reply["key"]["rotation_period_days"], 3650);
    let mut ctx32 = too_many.clone();
    ctx32.remove("k0");
    let reply = create(
        &server,
        json!({"name": "ctx32", "format": "hex", "context": ctx32, "return_plaintext": true}),
    )
    .await;
    let (status, _) = read_key(
        &server,
        &server.main.token,
        &id_of(&reply),
        &Value::Object(ctx32),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // Pages of the list, by id, cover every key once.
    let (_, all) = server.get("/v1/keys?limit=500").await;
    let all: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    let mut paged = Vec::new();
    let mut path = "/v1/keys?limit=4".to_owned();
    loop {
        let (status, page) = server.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 4);
        paged.extend(items.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match page["next_after"].as_str() {
            Some(after) => path = format!("/v1/keys?limit=4&after={after}"),
            None => break,
        }
    }
    assert_eq!(paged, all);
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "ordered by id");
    let (_, named) = server.get("/v1/keys?name=k7").await;
    assert_eq!(named["items"].as_array().unwrap().len(), 1, "{named}");
    assert_eq!(named["items"][0]["format"], "uuid");
    for query in ["limit=0", "limit=501", "state=gone", "colour=red"] {
        let answer = server.get(&format!("/v1/keys?{query}")).await;
        assert_error(&answer, 422, "invalid_request", query);
    }

    // A 200-character name is fine; the name is taken per client only.
    create(&server, json!({"name": "x".repeat(200), "format": "hex"})).await;
    create(&server, json!({"name": "a.b_c-d/e", "format": "hex"})).await;
    let other = server
        .register("other", IpPolicy::Any, "keys:create keys:read")
        .await;
    let (status, body) = server
        .post_as(
            &other.token,
            "/v1/keys",
            &json!({"name": "k0", "format": "hex"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn numeric_and_alphanumeric_material_pass_a_chi_square_uniformity_test() {
    const NUMERIC_KEYS: usize = 1600;
    const ALPHANUMERIC_KEYS: usize = 200;
    let server = TestServer::start().await;
    let main = owner(&server.main);
    // 1600 × 64 digits and 200 × 256 characters, through the real token: 102 400 and 51 200
    // symbols, enough for modulo bias (digits 0-5 by 26/256, A-H by 5/256) to stand out.
    let digits = pooled_counts(
        &server.broker,
        main,
        KeyFormat::Numeric,
        64,
        NUMERIC_KEYS,
        DIGITS,
    )
    .await;
    let letters = pooled_counts(
        &server.broker,
        main,
        KeyFormat::Alphanumeric,
        256,
        ALPHANUMERIC_KEYS,
        ALPHANUMERIC,
    )
    .await;
    assert_eq!(digits.iter().sum::<u64>(), NUMERIC_KEYS as u64 * 64);
    assert_eq!(letters.iter().sum::<u64>(), ALPHANUMERIC_KEYS as u64 * 256);
    // Critical values at p = 0.001: 27.88 for 9 degrees of freedom, 100.9 for 61.
    let (x_digits, x_letters) = (chi_square(&digits), chi_square(&letters));
    assert!(
        x_digits < 27.88,
        "numeric material is not uniform: chi2 = {x_digits:.2}, counts {digits:?}"
    );
    assert!(
        x_letters < 100.9,
        "alphanumeric material is not uniform: chi2 = {x_letters:.2}, counts {letters:?}"
    );
    // Aimed at modulo bias: the symbols `byte % n` would favour (the first 256 % n) are no
    // more frequent than their share (|z| < 4, p < 0.0001).
    for (counts, favoured, what) in [(&digits, 6, "digits 0-5"), (&letters, 8, "letters A-H")] {
        let total = counts.iter().sum::<u64>() as f64;
        let share = favoured as f64 / counts.len() as f64;
        let got = counts[..favoured].iter().sum::<u64>() as f64;
        let z = (got - total * share) / (total * share * (1.0 - share)).sqrt();
        assert!(z.abs() < 4.0, "{what}: z = {z:.2}, counts {counts:?}");
    }
    // Every symbol occurs (a missing one would be an alphabet bug even if chi2 passed).
    assert!(digits.iter().chain(&letters).all(|&c| c > 0));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Reading material

#[tokio::test]
async fn key_material_reads_back_with_its_context_only_and_only_for_its_owner() {
    let server = TestServer::start().await;
    let ctx = json!({"tenant": "acme", "env": "prod"});
    let mut created = Vec::new();
    for (name, format) in [("hex", "hex"), ("raw", "raw"), ("num", "numeric")] {
        let reply = create(
            &server,
            json!({"name": name, "format": format, "context": ctx, "return_plaintext": true}),
        )
        .await;
        created.push((
            id_of(&reply),
            format,
            reply["plaintext"].as_str().unwrap().to_owned(),
        ));
    }
    let other = server.register("other", IpPolicy::Any, "keys:*").await;
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    for (id, format, original) in &created {
        // The creation context (in another key order) opens it, giving the same plaintext.
        let (status, body) = read_key(
            &server,
            &server.main.token,
            id,
            &json!({"env": "prod", "tenant": "acme"}),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["plaintext"], original.as_str());
        assert_eq!(body["version"], 1);
        assert_eq!(body["format"], *format);
        assert_eq!(body["id"], id.as_str());
        assert_eq!(&plaintext(&server, id, &ctx, Some(1)).await, original);

        for wrong in [
            json!({"tenant": "acme"}),
            json!({"tenant": "acme", "env": "dev"}),
            json!({"tenant": "acme", "env": "prod", "x": "y"}),
            json!({}),
        ] {
            let answer = read_key(&server, &server.main.token, id, &wrong, None).await;
            assert_error(&answer, 422, "context_mismatch", &wrong.to_string());
        }
        let (status, body) = server
            .post(&format!("/v1/keys/{id}/plaintext"), &json!({}))
            .await;
        assert_eq!((status, error_code(&body)), (422, "context_mismatch"));

        // Another client, with every key scope, sees no such key, whatever it does.
        let answer = read_key(&server, &other.token, id, &ctx, None).await;
        assert_error(&answer, 404, "key_not_found", "another client's read");
        let answer = server.get_as(&other.token, &format!("/v1/keys/{id}")).await;
        assert_error(&answer, 404, "key_not_found", "another client's get");
        for action in ["rotate", "disable", "enable", "cancel-deletion"] {
            let answer = server
                .post_as(&other.token, &format!("/v1/keys/{id}/{action}"), &json!({}))
                .await;
            assert_error(&answer, 404, "key_not_found", action);
        }
        let answer = delete_as(&server, &other.token, &format!("/v1/keys/{id}")).await;
        assert_error(&answer, 404, "key_not_found", "another client's delete");

        for version in [0, 2, 1000] {
            let answer = read_key(&server, &server.main.token, id, &ctx, Some(version)).await;
            assert_error(
                &answer,
                404,
                "key_version_not_found",
                &format!("v{version}"),
            );
        }

        // Postgres holds the material only sealed.
        let key_id = Uuid::parse_str(id).unwrap();
        let (sealed,): (Vec<u8>,) =
            sqlx::query_as("SELECT sealed FROM key_versions WHERE key_id = $1 AND version = 1")
                .bind(key_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        let bytes = if *format == "raw" {
            unb64(original)
        } else {
            original.as_bytes().to_vec()
        };
        assert!(
            !sealed.windows(bytes.len()).any(|w| w == bytes.as_slice()),
            "plaintext stored in the clear"
        );
    }
    // Its own list does not hold main's keys; unknown and malformed ids are simply not found.
    let (status, list) = server.get_as(&other.token, "/v1/keys").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["items"], json!([]));
    let unknown = Uuid::new_v4().to_string();
    for id in [unknown.as_str(), "not-a-uuid"] {
        let answer = read_key(&server, &server.main.token, id, &ctx, None).await;
        assert_error(&answer, 404, "key_not_found", id);
        let answer = server.get(&format!("/v1/keys/{id}")).await;
        assert_error(&answer, 404, "key_not_found", id);
    }
    pool.close().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Manual rotation

#[tokio::test]
async fn manual_rotation_keeps_every_version_readable_and_records_history() {
    let server = TestServer::start().await;
    let ctx = json!({"svc": "mail"});
    let created = create(
        &server,
        json!({"name": "rot", "format": "alphanumeric", "length": 40, "context": ctx,
               "return_plaintext": true}),
    )
    .await;
    let id = id_of(&created);
    let v1 = created["plaintext"].as_str().unwrap().to_owned();
    for expected in [2, 3] {
        let (status, body) = server
            .post(&format!("/v1/keys/{id}/rotate"), &json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["current_version"], expected, "{body}");
        assert_eq!(body["state"], "active");
        assert!(body.get("plaintext").is_none(), "rotate shows no material");
    }
    let versions = [
        plaintext(&server, &id, &ctx, Some(1)).await,
        plaintext(&server, &id, &ctx, Some(2)).await,
        plaintext(&server, &id, &ctx, Some(3)).await,
    ];
    assert_eq!(versions[0], v1, "version 1 is what creation returned");
    assert_ne!(versions[0], versions[1]);
    assert_ne!(versions[1], versions[2]);
    assert_ne!(versions[0], versions[2]);
    for v in &versions {
        assert_eq!(v.len(), 40);
        assert!(v.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
    assert_eq!(
        plaintext(&server, &id, &ctx, None).await,
        versions[2],
        "default: current"
    );
    let answer = read_key(&server, &server.main.token, &id, &ctx, Some(4)).await;
    assert_error(&answer, 404, "key_version_not_found", "v4");
    // A wrong context opens no version.
    for v in 1..=3 {
        let answer = read_key(
            &server,
            &server.main.token,
            &id,
            &json!({"svc": "x"}),
            Some(v),
        )
        .await;
        assert_error(
            &answer,
            422,
            "context_mismatch",
            "old version, wrong context",
        );
    }

    let body = details(&server, &id).await;
    assert_eq!(body["key"]["current_version"], 3);
    let mk = active_mk(&server).await;
    let versions = body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 3, "{body}");
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["version"], i + 1, "{body}");
        assert_eq!(v["mk_version"], mk, "{body}");
        assert_eq!(v["has_material"], true, "{body}");
        assert!(v.get("plaintext").is_none() && v.get("sealed").is_none());
    }
    let rotations = body["rotations"].as_array().unwrap();
    assert_eq!(rotations.len(), 2, "{body}");
    for (i, r) in rotations.iter().enumerate() {
        assert_eq!(r["from_version"], i + 1, "{body}");
        assert_eq!(r["to_version"], i + 2, "{body}");
        assert_eq!(r["reason"], "manual", "{body}");
        assert_eq!(r["actor"], server.main.id.as_str(), "{body}");
        assert!((r["rotated_at"].as_i64().unwrap() - unix_now()).abs() < 60);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. States: every transition and every refusal

#[tokio::test]
async fn disable_enable_delete_cancel_move_the_state_and_everything_else_is_refused() {
    let server = TestServer::start().await;
    let id = id_of(
        &create(
            &server,
            json!({"name": "sm", "format": "hex", "context": app_context()}),
        )
        .await,
    );

    // active: enable and cancel-deletion are refused; read and rotate work.
    assert_refused(&server, &id, &[Op::Enable, Op::Cancel], 409, "key_active").await;
    assert_eq!(key_op(&server, &id, Op::Read).await.0, 200);
    assert_eq!(key_op(&server, &id, Op::Rotate).await.0, 200);

    // active → disabled: every use and the same move again are refused with key_disabled.
    assert_moves(&server, &id, Op::Disable, "disabled").await;
    assert_refused(
        &server,
        &id,
        &[Op::Read, Op::Rotate, Op::Disable, Op::Cancel],
        409,
        "key_disabled",
    )
    .await;
    let answer = read_key(&server, &server.main.token, &id, &app_context(), Some(1)).await;
    assert_error(
        &answer,
        409,
        "key_disabled",
        "an old version of a disabled key",
    );
    // A disabled key's expiry can be moved; it stays disabled.
    let body = assert_moves(&server, &id, Op::Refresh, "disabled").await;
    let expires = body["expires_at"].as_i64().unwrap();
    assert!((expires - (unix_now() + 30 * DAY)).abs() < 60, "{body}");

    // disabled → active, and enable again is refused.
    assert_moves(&server, &id, Op::Enable, "active").await;
    assert_refused(&server, &id, &[Op::Enable], 409, "key_active").await;
    assert_eq!(key_op(&server, &id, Op::Read).await.0, 200);
    let (status, body) = server
        .post(
            &format!("/v1/keys/{id}/refresh"),
            &json!({"never_expires": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("expires_at").is_none(), "{body}");

    // Refresh needs exactly one of its fields, and a future expiry.
    for bad in [
        json!({}),
        json!({"ttl_days": 0}),
        json!({"expires_at": unix_now() - 5}),
        json!({"ttl_days": 3, "expires_at": unix_now() + DAY}),
        json!({"never_expires": true, "ttl_days": 3}),
    ] {
        let answer = server.post(&format!("/v1/keys/{id}/refresh"), &bad).await;
        assert_error(&answer, 422, "invalid_request", &bad.to_string());
    }

    // Bad pending windows are refused before anything changes.
    for window in ["0", "31", "-1", "x"] {
        let answer = delete_as(
            &server,
            &server.main.token,
            &format!("/v1/keys/{id}?pending_window_days={window}"),
        )
        .await;
        assert_error(&answer, 422, "invalid_request", window);
        assert_eq!(state_of(&server, &id).await, "active");
    }
    let answer = delete_as(
        &server,
        &server.main.token,
        &format!("/v1/keys/{id}?days=7"),
    )
    .await;
    assert_error(&answer, 422, "invalid_request", "unknown query parameter");

    // active → pending_deletion, with the window asked for.
    let before = unix_now();
    let (status, body) = delete_as(
        &server,
        &server.main.token,
        &format!("/v1/keys/{id}?pending_window_days=7"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "pending_deletion");
    let due = body["deletion_due"].as_i64().unwrap();
    assert!(
        (before + 7 * DAY..=unix_now() + 7 * DAY).contains(&due),
        "deletion_due {due} is not now + 7 days"
    );
    assert_refused(
        &server,
        &id,
        &[
            Op::Read,
            Op::Rotate,
            Op::Disable,
            Op::Enable,
            Op::Refresh,
            Op::Delete,
        ],
        409,
        "key_pending_deletion",
    )
    .await;

    // Cancel: back disabled (AWS KMS semantics), the deletion date gone; then enable works.
    let body = assert_moves(&server, &id, Op::Cancel, "disabled").await;
    assert!(body.get("deletion_due").is_none(), "{body}");
    assert_refused(&server, &id, &[Op::Cancel], 409, "key_disabled").await;
    assert_moves(&server, &id, Op::Enable, "active").await;
    assert_eq!(key_op(&server, &id, Op::Read).await.0, 200);

    // A disabled key can be scheduled for deletion too (default window 7 days), and cancelled.
    assert_moves(&server, &id, Op::Disable, "disabled").await;
    let before = unix_now();
    let body = assert_moves(&server, &id, Op::Delete, "pending_deletion").await;
    let due = body["deletion_due"].as_i64().unwrap();
    assert!(
        (before + 7 * DAY..=unix_now() + 7 * DAY).contains(&due),
        "default window"
    );
    assert_moves(&server, &id, Op::Cancel, "disabled").await;
    assert_moves(&server, &id, Op::Enable, "active").await;
    assert_eq!(details(&server, &id).await["key"]["current_version"], 2);
    server.stop().await;
}

#[tokio::test]
async fn expiry_refuses_use_and_refresh_brings_the_key_back() {
    let server = TestServer::start().await;
    let main = owner(&server.main);
    let now = unix_now();

    // Created through the broker to expire in a minute: usable now, over HTTP at the real time.
    let mut expiring = spec("expiring", KeyFormat::Hex, 64, Rotation::Manual);
    expiring.expires_at = Some(now + 60);
    let (key, material) = server
        .broker
        .create_key(main, expiring, true, now)
        .await
        .unwrap();
    let material = String::from_utf8(material.unwrap().to_vec()).unwrap();
    let id = key.id.to_string();
    assert_eq!(state_of(&server, &id).await, "active");
    assert_eq!(
        plaintext(&server, &id, &app_context(), None).await,
        material
    );

    // An hour later the broker refuses it, though nothing was stored yet.
    let later = server
        .broker
        .key_plaintext(
            main,
            key.id,
            None,
            context(&[("app", "billing")]),
            now + 3600,
        )
        .await;
    assert!(
        matches!(later, Err(BrokerError::KeyState(KeyState::Expired))),
        "{:?}",
        later.map(|(k, v, _)| (k, v))
    );
    // The boundary: usable one second before its expiry, expired at it.
    let ctx = || context(&[("app", "billing")]);
    let edge = server
        .broker
        .key_plaintext(main, key.id, None, ctx(), now + 59)
        .await;
    assert_eq!(edge.unwrap().2.as_slice(), material.as_bytes());
    let edge = server
        .broker
        .key_plaintext(main, key.id, None, ctx(), now + 60)
        .await;
    assert!(matches!(
        edge,
        Err(BrokerError::KeyState(KeyState::Expired))
    ));
    let later = server
        .broker
        .rotate_key(main, key.id, false, now + 3600)
        .await;
    assert!(matches!(
        later,
        Err(BrokerError::KeyState(KeyState::Expired))
    ));

    // Maintenance an hour later marks it expired; HTTP then shows it and refuses its use.
    let report = server.broker.run_maintenance(now + 3600).await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(state_of(&server, &id).await, "expired");
    assert_refused(
        &server,
        &id,
        &[Op::Read, Op::Rotate, Op::Disable, Op::Enable, Op::Cancel],
        409,
        "key_expired",
    )
    .await;
    let (status, list) = server.get("/v1/keys?state=expired").await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["id"], id.as_str(), "{list}");

    // Refresh: active and readable again, the same material, the new expiry.
    let before = unix_now();
    let (status, body) = server
        .post(&format!("/v1/keys/{id}/refresh"), &json!({"ttl_days": 10}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active", "{body}");
    let expires = body["expires_at"].as_i64().unwrap();
    assert!((before + 10 * DAY..=unix_now() + 10 * DAY).contains(&expires));
    assert_eq!(
        plaintext(&server, &id, &app_context(), None).await,
        material
    );
    assert_eq!(key_op(&server, &id, Op::Rotate).await.0, 200);

    // A key whose expiry passed but that no worker has marked yet is expired all the same.
    let mut stale = spec("stale", KeyFormat::Numeric, 16, Rotation::Manual);
    stale.expires_at = Some(now - 100);
    let (stale, _) = server
        .broker
        .create_key(main, stale, false, now - 1000)
        .await
        .unwrap();
    let stale = stale.id.to_string();
    assert_eq!(state_of(&server, &stale).await, "expired");
    assert_refused(
        &server,
        &stale,
        &[Op::Read, Op::Rotate, Op::Disable, Op::Enable, Op::Cancel],
        409,
        "key_expired",
    )
    .await;
    // An expired key can be scheduled for deletion, and comes back disabled on cancel.
    assert_moves(&server, &stale, Op::Delete, "pending_deletion").await;
    assert_moves(&server, &stale, Op::Cancel, "disabled").await;
    let (status, body) = server
        .post(
            &format!("/v1/keys/{stale}/refresh"),
            &json!({"never_expires": true}),
        )
        .await;
    assert_eq!(
        (status, &body["state"]),
        (200, &json!("disabled")),
        "{body}"
    );
    assert_moves(&server, &stale, Op::Enable, "active").await;
    assert_eq!(key_op(&server, &stale, Op::Read).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn destruction_after_the_window_erases_every_version_and_frees_the_name() {
    let server = TestServer::start().await;
    let created = create(
        &server,
        json!({"name": "doomed", "format": "raw", "context": app_context(),
               "return_plaintext": true}),
    )
    .await;
    let id = id_of(&created);
    let key_id = Uuid::parse_str(&id).unwrap();
    assert_eq!(key_op(&server, &id, Op::Rotate).await.0, 200);
    // A bystander, not scheduled: maintenance must leave it alone.
    let keeper = id_of(
        &create(
            &server,
            json!({"name": "keeper", "format": "raw", "context": app_context()}),
        )
        .await,
    );

    let now = unix_now();
    assert_moves(&server, &id, Op::Delete, "pending_deletion").await;
    // While pending, the name is still taken.
    let answer = server
        .post("/v1/keys", &json!({"name": "doomed", "format": "raw"}))
        .await;
    assert_error(&answer, 409, "key_name_taken", "the name of a pending key");

    // Six days on: still pending, material intact.
    let report = server.broker.run_maintenance(now + 6 * DAY).await.unwrap();
    assert!(report.destroyed_keys.is_empty(), "{report:?}");
    assert_eq!(state_of(&server, &id).await, "pending_deletion");
    let body = details(&server, &id).await;
    assert!(
        body["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["has_material"] == true)
    );

    // One second before the deletion date: still there.
    let due = details(&server, &id).await["key"]["deletion_due"]
        .as_i64()
        .unwrap();
    let report = server.broker.run_maintenance(due - 1).await.unwrap();
    assert!(report.destroyed_keys.is_empty(), "{report:?}");
    assert_eq!(state_of(&server, &id).await, "pending_deletion");

    // Eight days on: destroyed.
    let report = server.broker.run_maintenance(now + 8 * DAY).await.unwrap();
    assert_eq!(report.destroyed_keys, vec![key_id], "{report:?}");
    let body = details(&server, &id).await;
    assert_eq!(body["key"]["state"], "destroyed", "{body}");
    assert!(body["key"]["destroyed_at"].as_i64().is_some(), "{body}");
    let versions = body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "the versions stay as tombstones: {body}");
    assert!(
        versions.iter().all(|v| v["has_material"] == false),
        "{body}"
    );
    assert_eq!(body["rotations"].as_array().unwrap().len(), 1);

    // Everything is refused with 410, and reads of any version too.
    assert_refused(&server, &id, &ALL_OPS, 410, "key_destroyed").await;
    for v in [1, 2] {
        let answer = read_key(&server, &server.main.token, &id, &app_context(), Some(v)).await;
        assert_error(&answer, 410, "key_destroyed", &format!("v{v}"));
    }

    // In Postgres, no version of it has material left; the bystander keeps its own.
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let rows: Vec<(i32, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT version, sealed FROM key_versions WHERE key_id = $1")
            .bind(key_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|(_, sealed)| sealed.is_none()), "{rows:?}");
    let (kept,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM key_versions WHERE key_id = $1 AND sealed IS NOT NULL",
    )
    .bind(Uuid::parse_str(&keeper).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, 1);
    pool.close().await;
    assert_eq!(state_of(&server, &keeper).await, "active");
    assert_eq!(key_op(&server, &keeper, Op::Read).await.0, 200);

    // Another pass destroys nothing more.
    let report = server.broker.run_maintenance(now + 9 * DAY).await.unwrap();
    assert!(report.destroyed_keys.is_empty(), "{report:?}");

    // The name is free again: a new key, new material.
    let again = create(
        &server,
        json!({"name": "doomed", "format": "raw", "context": app_context(),
               "return_plaintext": true}),
    )
    .await;
    assert_ne!(id_of(&again), id);
    assert_ne!(again["plaintext"], created["plaintext"]);
    assert_eq!(
        plaintext(&server, &id_of(&again), &app_context(), None).await,
        again["plaintext"].as_str().unwrap()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Scheduled rotation

#[tokio::test]
async fn scheduled_rotation_happens_after_the_period_and_not_before() {
    let server = TestServer::start().await;
    let ctx = json!({"job": "nightly"});
    let now = unix_now();
    let created = create(
        &server,
        json!({"name": "auto", "format": "hex", "rotation": "auto", "rotation_period_days": 30,
               "context": ctx, "return_plaintext": true}),
    )
    .await;
    let id = id_of(&created);
    let key_id = Uuid::parse_str(&id).unwrap();
    assert_eq!(created["key"]["rotation"], "auto");
    assert_eq!(created["key"]["rotation_period_days"], 30);
    let next = created["key"]["next_rotation_at"].as_i64().unwrap();
    assert!(
        (now + 30 * DAY..=unix_now() + 30 * DAY).contains(&next),
        "{created}"
    );
    // A manual key is never rotated by the scheduler.
    let manual = id_of(&create(&server, json!({"name": "manual", "format": "hex"})).await);

    let report = server.broker.run_maintenance(now + 29 * DAY).await.unwrap();
    assert!(report.rotated.is_empty(), "{report:?}");
    assert_eq!(details(&server, &id).await["key"]["current_version"], 1);

    let report = server.broker.run_maintenance(next - 1).await.unwrap();
    assert!(report.rotated.is_empty(), "a second early: {report:?}");

    let at = now + 31 * DAY;
    let report = server.broker.run_maintenance(at).await.unwrap();
    assert_eq!(report.rotated, vec![key_id], "{report:?}");
    let body = details(&server, &id).await;
    assert_eq!(body["key"]["current_version"], 2, "{body}");
    assert_eq!(body["key"]["next_rotation_at"], at + 30 * DAY, "{body}");
    let rotations = body["rotations"].as_array().unwrap();
    assert_eq!(rotations.len(), 1, "{body}");
    assert_eq!(rotations[0]["reason"], "scheduled");
    assert_eq!(rotations[0]["actor"], "scheduler");
    assert_eq!(rotations[0]["from_version"], 1);
    assert_eq!(rotations[0]["to_version"], 2);
    assert_eq!(rotations[0]["rotated_at"], at);
    let v1 = plaintext(&server, &id, &ctx, Some(1)).await;
    let v2 = plaintext(&server, &id, &ctx, Some(2)).await;
    assert_eq!(v1, created["plaintext"].as_str().unwrap());
    assert_ne!(v1, v2);
    assert_eq!(v2.len(), 64);
    assert_eq!(plaintext(&server, &id, &ctx, None).await, v2);
    assert_eq!(details(&server, &manual).await["key"]["current_version"], 1);

    // Not again within the next period; again after it.
    let report = server.broker.run_maintenance(at + 29 * DAY).await.unwrap();
    assert!(report.rotated.is_empty(), "{report:?}");
    let report = server.broker.run_maintenance(at + 30 * DAY).await.unwrap();
    assert_eq!(report.rotated, vec![key_id], "{report:?}");
    assert_eq!(details(&server, &id).await["key"]["current_version"], 3);

    // A manual rotation of an auto key restarts its period.
    let before = unix_now();
    let (status, body) = server
        .post(&format!("/v1/keys/{id}/rotate"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let next = body["next_rotation_at"].as_i64().unwrap();
    assert!(
        (before + 30 * DAY..=unix_now() + 30 * DAY).contains(&next),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test]
async fn scheduled_rotation_skips_disabled_and_expired_keys() {
    let server = TestServer::start().await;
    let main = owner(&server.main);
    let now = unix_now();
    let auto = Rotation::Auto { period_days: 30 };
    let (disabled, _) = server
        .broker
        .create_key(main, spec("disabled", KeyFormat::Raw, 32, auto), false, now)
        .await
        .unwrap();
    server
        .broker
        .disable_key(main, disabled.id, now)
        .await
        .unwrap();
    let mut expiring = spec("expiring", KeyFormat::Raw, 32, auto);
    expiring.expires_at = Some(now + 10 * DAY);
    let (expiring, _) = server
        .broker
        .create_key(main, expiring, false, now)
        .await
        .unwrap();
    let (pending, _) = server
        .broker
        .create_key(main, spec("pending", KeyFormat::Raw, 32, auto), false, now)
        .await
        .unwrap();
    server
        .broker
        .schedule_key_deletion(main, pending.id, Some(30), now)
        .await
        .unwrap();
    let report = server.broker.run_maintenance(now + 31 * DAY).await.unwrap();
    assert!(report.rotated.is_empty(), "{report:?}");
    // A pass rotates before it destroys: the pending key (due at 30 days) is destroyed, never
    // rotated; the expiring one is marked expired.
    assert_eq!(report.destroyed_keys, vec![pending.id], "{report:?}");
    assert_eq!(report.expired, 1, "{report:?}");
    for key in [disabled.id, expiring.id, pending.id] {
        let body = details(&server, &key.to_string()).await;
        assert_eq!(body["key"]["current_version"], 1, "{body}");
    }
    // Enabled again, the overdue key is rotated on the next pass.
    server
        .broker
        .enable_key(main, disabled.id, now)
        .await
        .unwrap();
    let report = server.broker.run_maintenance(now + 32 * DAY).await.unwrap();
    assert_eq!(report.rotated, vec![disabled.id], "{report:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_racing_maintenance_rotate_each_due_key_exactly_once() {
    let server = TestServer::start().await;
    let main = owner(&server.main);
    let now = unix_now();
    // More than one maintenance batch (100 claims) of due keys, so that each broker claims
    // several times and the two interleave.
    const KEYS: usize = 230;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let broker = server.broker.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in (t..KEYS).step_by(8) {
                let format = KeyFormat::ALL[i % KeyFormat::ALL.len()];
                let length = format.resolve_length(None).unwrap();
                let auto = Rotation::Auto { period_days: 30 };
                let name = format!("due-{i}");
                let (key, _) = broker
                    .create_key(main, spec(&name, format, length, auto), false, now)
                    .await
                    .unwrap();
                ids.push(key.id);
            }
            ids
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(created) = tasks.join_next().await {
        ids.extend(created.unwrap());
    }
    assert_eq!(ids.len(), KEYS);
    let other = Arc::new(Broker::new(
        Hsm::connect(common::hsm_config()).await.unwrap(),
        Store::connect_lazy(&server.database_url, 4).unwrap(),
        Limits { max_batch: 10 },
    ));
    let at = now + 31 * DAY;
    let (a, b) = {
        let (first, second) = (server.broker.clone(), other.clone());
        tokio::join!(
            tokio::spawn(async move { first.run_maintenance(at).await }),
            tokio::spawn(async move { second.run_maintenance(at).await }),
        )
    };
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    let a_set: BTreeSet<Uuid> = a.rotated.iter().copied().collect();
    let b_set: BTreeSet<Uuid> = b.rotated.iter().copied().collect();
    assert_eq!(
        a_set.len(),
        a.rotated.len(),
        "a key twice in one report: {a:?}"
    );
    assert_eq!(
        b_set.len(),
        b.rotated.len(),
        "a key twice in one report: {b:?}"
    );
    assert!(
        a_set.is_disjoint(&b_set),
        "both brokers rotated {:?}",
        a_set.intersection(&b_set)
    );
    let union: BTreeSet<Uuid> = a_set.union(&b_set).copied().collect();
    assert_eq!(union, ids, "not every due key was rotated");

    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (at_two,): (i64,) = sqlx::query_as("SELECT count(*) FROM keys WHERE current_version = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(at_two, KEYS as i64, "every key at exactly version 2");
    let (rotations, rotated_keys): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT key_id) FROM key_rotations
         WHERE reason = 'scheduled' AND actor = 'scheduler' AND from_version = 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rotations, rotated_keys), (KEYS as i64, KEYS as i64));
    // Over HTTP, for a sample: the history, and both versions readable.
    for id in ids.iter().step_by(23) {
        let body = details(&server, &id.to_string()).await;
        assert_eq!(body["key"]["current_version"], 2, "{body}");
        assert_eq!(body["versions"].as_array().unwrap().len(), 2, "{body}");
        let rotations = body["rotations"].as_array().unwrap();
        assert_eq!(rotations.len(), 1, "{body}");
        assert_eq!(rotations[0]["reason"], "scheduled");
        assert_eq!(rotations[0]["actor"], "scheduler");
        let ctx = app_context();
        plaintext(&server, &id.to_string(), &ctx, Some(1)).await;
        plaintext(&server, &id.to_string(), &ctx, Some(2)).await;
    }
    let (versions,): (i64,) = sqlx::query_as("SELECT count(*) FROM key_versions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(versions, 2 * KEYS as i64);
    pool.close().await;

    // Both again at the same moment: nothing is due any more.
    let (a, b) = tokio::join!(server.broker.run_maintenance(at), other.run_maintenance(at));
    assert!(a.unwrap().rotated.is_empty());
    assert!(b.unwrap().rotated.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_admin_due_report_lists_rotations_and_expiries_within_the_horizon() {
    fn auto(name: &str, days: u32) -> Value {
        json!({"name": name, "format": "hex", "rotation": "auto", "rotation_period_days": days})
    }
    let server = TestServer::start().await;
    let auto30 = id_of(&create(&server, auto("auto30", 30)).await);
    let ttl10 = id_of(
        &create(
            &server,
            json!({"name": "t10", "format": "hex", "ttl_days": 10}),
        )
        .await,
    );
    let forever = id_of(&create(&server, json!({"name": "forever", "format": "hex"})).await);
    let ttl50 = id_of(
        &create(
            &server,
            json!({"name": "t50", "format": "hex", "ttl_days": 50}),
        )
        .await,
    );
    let auto60 = id_of(&create(&server, auto("auto60", 60)).await);
    // Another client's key expiring in 5 days is in the admin's report too.
    let other = server.register("other", IpPolicy::Any, "keys:*").await;
    let (status, body) = server
        .post_as(
            &other.token,
            "/v1/keys",
            &json!({"name": "theirs", "format": "uuid", "ttl_days": 5}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let theirs = id_of(&body);

    let (status, body) = server.get("/v1/admin/keys/due?within_days=40").await;
    assert_eq!(status, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    let listed: Vec<(&str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["key"]["id"].as_str().unwrap(),
                i["client_id"].as_str().unwrap(),
            )
        })
        .collect();
    // Soonest first: 5 days, 10 days, 30 days.
    assert_eq!(
        listed,
        vec![
            (theirs.as_str(), other.id.as_str()),
            (ttl10.as_str(), server.main.id.as_str()),
            (auto30.as_str(), server.main.id.as_str()),
        ],
        "{body}"
    );
    for absent in [&forever, &ttl50, &auto60] {
        assert!(
            !listed.iter().any(|(id, _)| id == absent),
            "{absent} listed"
        );
    }
    // A shorter horizon drops the auto key; a longer one takes every one but the eternal key.
    let (_, body) = server.get("/v1/admin/keys/due?within_days=20").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 2, "{body}");
    let (_, body) = server.get("/v1/admin/keys/due?within_days=366").await;
    let ids: BTreeSet<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            theirs.as_str(),
            ttl10.as_str(),
            auto30.as_str(),
            ttl50.as_str(),
            auto60.as_str()
        ])
    );
    let answer = server.get("/v1/admin/keys/due?within_days=367").await;
    assert_error(&answer, 422, "invalid_request", "horizon too long");
    let answer = server.get("/v1/admin/keys/due?horizon=3").await;
    assert_error(&answer, 422, "invalid_request", "unknown parameter");
    let answer = server.get_as(&other.token, "/v1/admin/keys/due").await;
    assert_error(&answer, 403, "insufficient_scope", "not an admin");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotations_and_secret_writes_never_lose_or_share_a_version() {
    let server = Arc::new(TestServer::start().await);
    let ctx = app_context();
    let id = id_of(
        &create(
            &server,
            json!({"name": "hot", "format": "raw", "context": ctx}),
        )
        .await,
    );

    // Eight manual rotations at once: each either makes its own version or is told to retry.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (server, id) = (server.clone(), id.clone());
        tasks.spawn(async move { key_op(&server, &id, Op::Rotate).await });
    }
    let mut made = BTreeSet::new();
    while let Some(answer) = tasks.join_next().await {
        let (status, body) = answer.unwrap();
        match status {
            200 => assert!(
                made.insert(body["current_version"].as_u64().unwrap()),
                "{body}"
            ),
            _ => assert_error(&(status, body), 409, "concurrent_update", "a lost rotation"),
        }
    }
    assert!(!made.is_empty());
    let body = details(&server, &id).await;
    let current = body["key"]["current_version"].as_u64().unwrap();
    assert_eq!(current, made.len() as u64 + 1, "{body}");
    assert_eq!(made, (2..=current).collect(), "versions are contiguous");
    assert_eq!(body["versions"].as_array().unwrap().len() as u64, current);
    assert_eq!(body["rotations"].as_array().unwrap().len(), made.len());
    let mut seen = BTreeSet::new();
    for v in 1..=current {
        let v = u32::try_from(v).unwrap();
        assert!(seen.insert(plaintext(&server, &id, &ctx, Some(v)).await));
    }

    // Eight writes of one new secret at once: every success names its own version, and that
    // version holds its value.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let server = server.clone();
        tasks.spawn(async move {
            let value = vec![i; 24];
            let answer = put_as(
                &server,
                &server.main.token,
                "/v1/secrets/hot",
                &json!({"value": b64(&value)}),
            )
            .await;
            (value, answer)
        });
    }
    let mut written = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        let (value, (status, body)) = result.unwrap();
        match status {
            200 => {
                let version = body["current_version"].as_u64().unwrap();
                assert!(
                    written.insert(version, value).is_none(),
                    "version {version} twice"
                );
            }
            _ => assert_error(&(status, body), 409, "concurrent_update", "a lost write"),
        }
    }
    assert!(!written.is_empty());
    let latest = *written.keys().max().unwrap();
    assert_eq!(
        written.keys().copied().collect::<Vec<_>>(),
        (1..=latest).collect::<Vec<_>>(),
        "versions are contiguous"
    );
    for (version, value) in &written {
        let (status, body) = server
            .get(&format!("/v1/secrets/hot?version={version}"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            &unb64(body["value"].as_str().unwrap()),
            value,
            "version {version}"
        );
    }
    let (_, body) = server.get("/v1/secrets/hot").await;
    assert_eq!(body["version"], latest);
    match Arc::try_unwrap(server) {
        Ok(server) => server.stop().await,
        Err(_) => unreachable!("every task has finished"),
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Secrets

#[tokio::test]
async fn secrets_keep_versions_bound_to_their_context_and_owner() {
    let server = TestServer::start().await;
    let token = server.main.token.clone();
    let first = b"sk_live_first-value".to_vec();
    let second = b"sk_live_second-value".to_vec();
    let path = "/v1/secrets/stripe.api-key";
    let ctx = json!({"env": "prod"});

    let (status, body) = put_as(
        &server,
        &token,
        path,
        &json!({"value": b64(&first), "context": ctx}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "stripe.api-key");
    assert_eq!(body["state"], "active");
    assert_eq!(body["current_version"], 1);
    assert!(body.get("value").is_none(), "{body}");
    let (status, body) = put_as(
        &server,
        &token,
        path,
        &json!({"value": b64(&second), "context": ctx}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["current_version"], 2);

    let (status, body) = server.get(&format!("{path}?context[env]=prod")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    assert_eq!(body["name"], "stripe.api-key");
    assert_eq!(unb64(body["value"].as_str().unwrap()), second);
    let (status, body) = server
        .get(&format!("{path}?version=1&context[env]=prod"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(unb64(body["value"].as_str().unwrap()), first);
    let (_, body) = server
        .get(&format!("{path}?context[env]=prod&version=2"))
        .await;
    assert_eq!(unb64(body["value"].as_str().unwrap()), second);

    for (query, status, code) in [
        ("?context[env]=dev", 422, "context_mismatch"),
        ("?version=1&context[env]=dev", 422, "context_mismatch"),
        (
            "?context[env]=prod&context[region]=eu",
            422,
            "context_mismatch",
        ),
        ("", 422, "context_mismatch"),
        ("?version=1", 422, "context_mismatch"),
        ("?version=3&context[env]=prod", 404, "secret_not_found"),
        ("?version=0&context[env]=prod", 404, "secret_not_found"),
        ("?version=x&context[env]=prod", 422, "invalid_request"),
        ("?context[env]=prod&env=prod", 422, "invalid_request"),
        ("?context[env]=prod&verbose=1", 422, "invalid_request"),
        ("?context[]=prod", 422, "invalid_context"),
    ] {
        let answer = server.get(&format!("{path}{query}")).await;
        assert_error(&answer, status, code, query);
    }
    let answer = server.get("/v1/secrets/missing?context[env]=prod").await;
    assert_error(&answer, 404, "secret_not_found", "no such secret");

    // Another client (with every secret scope) has no such secret, and its own of the same
    // name is another secret.
    let other = server.register("other", IpPolicy::Any, "secrets:*").await;
    let answer = server
        .get_as(&other.token, &format!("{path}?context[env]=prod"))
        .await;
    assert_error(&answer, 404, "secret_not_found", "another client's read");
    let answer = delete_as(&server, &other.token, path).await;
    assert_error(&answer, 404, "secret_not_found", "another client's delete");
    let (status, body) = put_as(
        &server,
        &other.token,
        path,
        &json!({"value": b64(b"theirs"), "context": ctx}),
    )
    .await;
    assert_eq!(
        (status, &body["current_version"]),
        (200, &json!(1)),
        "{body}"
    );
    let (_, body) = server.get(&format!("{path}?context[env]=prod")).await;
    assert_eq!(
        unb64(body["value"].as_str().unwrap()),
        second,
        "main's secret untouched"
    );
    let (_, body) = server
        .get_as(&other.token, &format!("{path}?context[env]=prod"))
        .await;
    assert_eq!(unb64(body["value"].as_str().unwrap()), b"theirs");

    // Sizes, encodings, names, shapes.
    let max = vec![0xa5u8; 64 * 1024];
    let (status, body) = put_as(
        &server,
        &token,
        "/v1/secrets/big",
        &json!({"value": b64(&max)}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.get("/v1/secrets/big").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unb64(body["value"].as_str().unwrap()), max);
    let (status, body) = put_as(&server, &token, "/v1/secrets/empty", &json!({"value": ""})).await;
    assert_eq!(status, 200, "an empty value is a value: {body}");
    let too_big = vec![0x5au8; 64 * 1024 + 1];
    for (name, body, status, code) in [
        (
            "big",
            json!({"value": b64(&too_big)}),
            422,
            "invalid_request",
        ),
        (
            "new",
            json!({"value": b64(&too_big)}),
            422,
            "invalid_request",
        ),
        (
            "new",
            json!({"value": "not base64!"}),
            400,
            "invalid_base64",
        ),
        (
            "new",
            json!({"value": "AAEC"[..3].to_owned()}),
            400,
            "invalid_base64",
        ),
        ("new", json!({"value": 5}), 422, "invalid_request"),
        ("new", json!({"context": ctx}), 422, "invalid_request"),
        (
            "new",
            json!({"value": "AAEC", "extra": true}),
            422,
            "invalid_request",
        ),
        (
            "bad%20name",
            json!({"value": "AAEC"}),
            422,
            "invalid_request",
        ),
    ] {
        let answer = put_as(&server, &token, &format!("/v1/secrets/{name}"), &body).await;
        assert_error(&answer, status, code, &format!("{name} {body}"));
    }
    let answer = server.get("/v1/secrets/new").await;
    assert_error(
        &answer,
        404,
        "secret_not_found",
        "refused writes created nothing",
    );
    let (_, body) = server.get("/v1/secrets/big").await;
    assert_eq!(body["version"], 1, "a refused write added no version");

    // Postgres holds neither value in the clear.
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let rows: Vec<SecretMaterial> =
        sqlx::query_as("SELECT wrapped_dek, sealed FROM secret_versions")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (dek, sealed) in rows {
        for stored in [dek.unwrap(), sealed.unwrap()] {
            for value in [&first, &second] {
                assert!(!stored.windows(value.len()).any(|w| w == value.as_slice()));
            }
        }
    }
    pool.close().await;
    server.stop().await;
}

#[tokio::test]
async fn secret_deletion_can_be_cancelled_and_destruction_erases_every_version() {
    let server = TestServer::start().await;
    let token = server.main.token.clone();
    let path = "/v1/secrets/db-password";
    let get = format!("{path}?context[env]=prod");
    for value in [b"hunter2-v1".as_slice(), b"hunter2-v2"] {
        let (status, body) = put_as(
            &server,
            &token,
            path,
            &json!({"value": b64(value), "context": {"env": "prod"}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    for window in ["0", "31"] {
        let answer = delete_as(
            &server,
            &token,
            &format!("{path}?pending_window_days={window}"),
        )
        .await;
        assert_error(&answer, 422, "invalid_request", window);
    }
    let answer = server
        .post(&format!("{path}/cancel-deletion"), &json!({}))
        .await;
    assert_error(&answer, 409, "secret_active", "cancel on an active secret");

    let before = unix_now();
    let (status, body) = delete_as(&server, &token, path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "pending_deletion");
    let due = body["deletion_due"].as_i64().unwrap();
    assert!(
        (before + 7 * DAY..=unix_now() + 7 * DAY).contains(&due),
        "{body}"
    );
    let answer = server.get(&get).await;
    assert_error(
        &answer,
        409,
        "secret_pending_deletion",
        "read while pending",
    );
    let answer = put_as(
        &server,
        &token,
        path,
        &json!({"value": "AAEC", "context": {"env": "prod"}}),
    )
    .await;
    assert_error(
        &answer,
        409,
        "secret_pending_deletion",
        "write while pending",
    );
    let answer = delete_as(&server, &token, path).await;
    assert_error(
        &answer,
        409,
        "secret_pending_deletion",
        "delete while pending",
    );

    let (status, body) = server
        .post(&format!("{path}/cancel-deletion"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active");
    assert!(body.get("deletion_due").is_none(), "{body}");
    assert_eq!(body["current_version"], 2);
    let (status, body) = server.get(&get).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unb64(body["value"].as_str().unwrap()), b"hunter2-v2");

    // Deleted for good: a window of 2 days, and maintenance after it.
    let now = unix_now();
    let (status, _) = delete_as(&server, &token, &format!("{path}?pending_window_days=2")).await;
    assert_eq!(status, 200);
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (secret_id,): (Uuid,) = sqlx::query_as("SELECT id FROM secrets WHERE name = 'db-password'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let report = server.broker.run_maintenance(now + DAY).await.unwrap();
    assert!(report.destroyed_secrets.is_empty(), "{report:?}");
    let report = server.broker.run_maintenance(now + 8 * DAY).await.unwrap();
    assert_eq!(report.destroyed_secrets, vec![secret_id], "{report:?}");

    let answer = server.get(&get).await;
    assert_error(
        &answer,
        404,
        "secret_not_found",
        "a destroyed secret is not live",
    );
    let answer = server.get(&format!("{get}&version=1")).await;
    assert_error(&answer, 404, "secret_not_found", "nor any of its versions");
    let answer = server
        .post(&format!("{path}/cancel-deletion"), &json!({}))
        .await;
    assert_error(&answer, 404, "secret_not_found", "cancel after destruction");
    let answer = delete_as(&server, &token, path).await;
    assert_error(&answer, 404, "secret_not_found", "delete after destruction");
    let rows: Vec<SecretMaterial> = sqlx::query_as(
        "SELECT wrapped_dek, sealed FROM secret_versions WHERE secret_id = $1 ORDER BY version",
    )
    .bind(secret_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|(dek, sealed)| dek.is_none() && sealed.is_none()),
        "material left after destruction: {rows:?}"
    );
    let (state,): (String,) = sqlx::query_as("SELECT state FROM secrets WHERE id = $1")
        .bind(secret_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "destroyed");

    // The name can be used again: a new secret from version 1.
    let (status, body) = put_as(
        &server,
        &token,
        path,
        &json!({"value": b64(b"fresh"), "context": {"env": "prod"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["current_version"], 1);
    assert_eq!(body["state"], "active");
    let (status, body) = server.get(&get).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unb64(body["value"].as_str().unwrap()), b"fresh");
    let answer = server.get(&format!("{get}&version=2")).await;
    assert_error(
        &answer,
        404,
        "secret_not_found",
        "old versions are not the new secret's",
    );
    let (live,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM secrets WHERE name = 'db-password' AND state <> 'destroyed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live, 1);
    pool.close().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Usage statistics

#[tokio::test]
async fn usage_counts_each_operation_per_key_for_the_caller_and_for_the_admin() {
    let server = TestServer::start().await;
    let nil = Uuid::nil().to_string();
    let today = |t: i64| t - t.rem_euclid(DAY);
    let start_day = today(unix_now());

    // main: 2 datakey + a batch of 3, 2 unwraps (and one refused), a key created, read 3 times
    // (and once refused), rotated once; a secret written twice and read once.
    let mut blobs = Vec::new();
    for _ in 0..2 {
        let (status, body) = server
            .post("/v1/datakey", &json!({"context": {"a": "b"}}))
            .await;
        assert_eq!(status, 200, "{body}");
        blobs.push(body["wrapped"].clone());
    }
    let (status, _) = server
        .post("/v1/datakey/batch", &json!({"items": [{}, {}, {}]}))
        .await;
    assert_eq!(status, 200);
    for blob in &blobs {
        let (status, _) = server
            .post(
                "/v1/unwrap",
                &json!({"wrapped": blob, "context": {"a": "b"}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = server
        .post(
            "/v1/unwrap",
            &json!({"wrapped": blobs[0], "context": {"a": "x"}}),
        )
        .await;
    assert_eq!(status, 422);
    let key = id_of(
        &create(
            &server,
            json!({"name": "counted", "format": "hex", "context": app_context()}),
        )
        .await,
    );
    for _ in 0..3 {
        plaintext(&server, &key, &app_context(), None).await;
    }
    let answer = read_key(&server, &server.main.token, &key, &json!({}), None).await;
    assert_eq!(answer.0, 422);
    assert_eq!(key_op(&server, &key, Op::Rotate).await.0, 200);
    for value in ["djE=", "djI="] {
        let (status, _) = put_as(
            &server,
            &server.main.token,
            "/v1/secrets/counted",
            &json!({"value": value}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = server.get("/v1/secrets/counted").await;
    assert_eq!(status, 200);

    // other: 1 datakey, 1 unwrap.
    let other = server
        .register("other", IpPolicy::Any, "datakey unwrap keys:read")
        .await;
    let (_, body) = server
        .post_as(&other.token, "/v1/datakey", &json!({}))
        .await;
    let (status, _) = server
        .post_as(
            &other.token,
            "/v1/unwrap",
            &json!({"wrapped": body["wrapped"]}),
        )
        .await;
    assert_eq!(status, 200);

    let days = [start_day, today(unix_now())];
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (secret,): (Uuid,) = sqlx::query_as("SELECT id FROM secrets WHERE name = 'counted'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let secret = secret.to_string();
    let entry = |k: &str, op: &str, n: i64| ((k.to_owned(), op.to_owned()), n);

    let (status, body) = server.get("/v1/usage").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        usage_map(&body, &server.main.id, &days),
        BTreeMap::from([
            entry(&nil, "datakey", 5),
            entry(&nil, "unwrap", 2),
            entry(&key, "key.create", 1),
            entry(&key, "key.read", 3),
            entry(&key, "key.rotate", 1),
            entry(&secret, "secret.write", 2),
            entry(&secret, "secret.read", 1),
        ]),
        "{body}"
    );
    let (status, body) = server.get(&format!("/v1/usage?key_id={key}&days=1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        usage_map(&body, &server.main.id, &days),
        BTreeMap::from([
            entry(&key, "key.create", 1),
            entry(&key, "key.read", 3),
            entry(&key, "key.rotate", 1),
        ]),
        "{body}"
    );
    let (status, body) = server.get(&format!("/v1/usage?key_id={nil}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        usage_map(&body, &server.main.id, &days),
        BTreeMap::from([entry(&nil, "datakey", 5), entry(&nil, "unwrap", 2)]),
        "stateless calls only: {body}"
    );
    // Asking again adds nothing (reading flushes; it does not count twice).
    let (_, again) = server.get("/v1/usage").await;
    assert_eq!(
        usage_map(&again, &server.main.id, &days).get(&(nil.clone(), "datakey".to_owned())),
        Some(&5)
    );

    // The admin sees the other client's counts, and only those when it asks for that client.
    let (status, body) = server
        .get(&format!("/v1/admin/usage?client_id={}", other.id))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        usage_map(&body, &other.id, &days),
        BTreeMap::from([entry(&nil, "datakey", 1), entry(&nil, "unwrap", 1)]),
        "{body}"
    );
    let (status, body) = server.get("/v1/admin/usage").await;
    assert_eq!(status, 200, "{body}");
    let clients: BTreeSet<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        clients,
        BTreeSet::from([server.main.id.as_str(), other.id.as_str()])
    );

    // The other client sees its own only; the admin view and others' counts are refused.
    let (status, body) = server.get_as(&other.token, "/v1/usage").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(usage_map(&body, &other.id, &days).len(), 2, "{body}");
    let answer = server.get_as(&other.token, "/v1/admin/usage").await;
    assert_error(&answer, 403, "insufficient_scope", "non-admin admin usage");
    let answer = server
        .get_as(
            &other.token,
            &format!("/v1/admin/usage?client_id={}", other.id),
        )
        .await;
    assert_error(&answer, 403, "insufficient_scope", "non-admin, own id");
    let answer = server
        .get_as(
            &other.token,
            &format!("/v1/usage?client_id={}", server.main.id),
        )
        .await;
    assert_error(&answer, 422, "invalid_request", "another client's usage");
    for query in ["days=0", "days=367", "days=x", "op=datakey"] {
        let answer = server.get(&format!("/v1/usage?{query}")).await;
        assert_error(&answer, 422, "invalid_request", query);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Scopes

#[tokio::test]
async fn every_managed_endpoint_requires_its_scope() {
    let server = TestServer::start().await;
    let now = unix_now();
    for missing in MANAGED_SCOPES {
        let scopes: Vec<&str> = MANAGED_SCOPES
            .iter()
            .copied()
            .filter(|s| *s != missing)
            .collect();
        let client = server
            .register(
                &format!("without-{missing}"),
                IpPolicy::Any,
                &scopes.join(" "),
            )
            .await;
        let me = owner(&client);
        // The client's own key and secret, made through the broker: only the scope stands in
        // the way.
        let (key, _) = server
            .broker
            .create_key(
                me,
                spec("mine", KeyFormat::Hex, 64, Rotation::Manual),
                false,
                now,
            )
            .await
            .unwrap();
        let id = key.id;
        let name = keybroker::broker::SecretName::new("mine").unwrap();
        server
            .broker
            .put_secret(
                me,
                &name,
                zeroize::Zeroizing::new(b"value".to_vec()),
                EncryptionContext::default(),
                now,
            )
            .await
            .unwrap();
        let t = client.token.as_str();
        let key_path = |action: &str| format!("/v1/keys/{id}/{action}");
        let mut refused: Vec<(String, (u16, Value))> = Vec::new();
        match missing {
            "keys:create" => {
                refused.push((
                    "create".into(),
                    server
                        .post_as(t, "/v1/keys", &json!({"name": "new", "format": "hex"}))
                        .await,
                ));
            }
            "keys:read" => {
                refused.push(("list".into(), server.get_as(t, "/v1/keys").await));
                refused.push((
                    "get".into(),
                    server.get_as(t, &format!("/v1/keys/{id}")).await,
                ));
                refused.push((
                    "read".into(),
                    read_key(&server, t, &id.to_string(), &app_context(), None).await,
                ));
            }
            "keys:rotate" => {
                refused.push((
                    "rotate".into(),
                    server.post_as(t, &key_path("rotate"), &json!({})).await,
                ));
            }
            "keys:manage" => {
                for action in ["disable", "enable", "cancel-deletion"] {
                    refused.push((
                        action.into(),
                        server.post_as(t, &key_path(action), &json!({})).await,
                    ));
                }
                refused.push((
                    "refresh".into(),
                    server
                        .post_as(t, &key_path("refresh"), &json!({"ttl_days": 3}))
                        .await,
                ));
                refused.push((
                    "delete".into(),
                    delete_as(&server, t, &format!("/v1/keys/{id}")).await,
                ));
            }
            "secrets:read" => {
                refused.push((
                    "get secret".into(),
                    server.get_as(t, "/v1/secrets/mine").await,
                ));
            }
            "secrets:write" => {
                refused.push((
                    "put secret".into(),
                    put_as(&server, t, "/v1/secrets/mine", &json!({"value": "AAEC"})).await,
                ));
                refused.push((
                    "delete secret".into(),
                    delete_as(&server, t, "/v1/secrets/mine").await,
                ));
                refused.push((
                    "cancel secret deletion".into(),
                    server
                        .post_as(t, "/v1/secrets/mine/cancel-deletion", &json!({}))
                        .await,
                ));
            }
            _ => unreachable!(),
        }
        for (what, answer) in &refused {
            assert_error(
                answer,
                403,
                "insufficient_scope",
                &format!("{what} without {missing}"),
            );
        }
        // Nothing changed, and what the client does hold still works.
        let stored = server.broker.key(me, id, unix_now()).await.unwrap().key;
        assert_eq!(stored.state, KeyState::Active, "without {missing}");
        assert_eq!(stored.current_version, 1, "without {missing}");
        assert!(stored.expires_at.is_none(), "without {missing}");
        let (secret, version, value) = server
            .broker
            .get_secret(me, &name, None, EncryptionContext::default(), unix_now())
            .await
            .unwrap();
        assert_eq!(
            (secret.state.as_str(), version),
            ("active", 1),
            "without {missing}"
        );
        assert_eq!(value.as_slice(), b"value");
        if missing != "keys:read" {
            let (status, body) = read_key(&server, t, &id.to_string(), &app_context(), None).await;
            assert_eq!(status, 200, "without {missing}: {body}");
        }
        if missing != "secrets:read" {
            let (status, body) = server.get_as(t, "/v1/secrets/mine").await;
            assert_eq!(status, 200, "without {missing}: {body}");
        }
        // No admin scope: the admin reports are refused.
        for path in ["/v1/admin/usage", "/v1/admin/keys/due"] {
            let answer = server.get_as(t, path).await;
            assert_error(&answer, 403, "insufficient_scope", path);
        }
    }
    // A crypto-only client reaches none of the managed endpoints.
    let crypto = server.register("crypto", IpPolicy::Any, "datakey").await;
    let answer = server
        .post_as(
            &crypto.token,
            "/v1/keys",
            &json!({"name": "n", "format": "hex"}),
        )
        .await;
    assert_error(&answer, 403, "insufficient_scope", "datakey-only create");
    let answer = server.get_as(&crypto.token, "/v1/secrets/mine").await;
    assert_error(
        &answer,
        403,
        "insufficient_scope",
        "datakey-only secret read",
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. No key or secret value in the log of a whole session (the real binary as a child)

/// The forms a value could take in a log: as shown, base64 (both alphabets) and hex of its bytes.
fn forms(shown: &str, bytes: &[u8]) -> Vec<String> {
    vec![
        shown.to_owned(),
        b64(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        bytes.iter().map(|b| format!("{b:02x}")).collect(),
    ]
}

#[tokio::test]
async fn a_session_of_managed_keys_and_secrets_logs_no_plaintext_and_no_secret_value() {
    use reqwest::Method;
    let token = crate::token::PrivateToken::copy();
    let server = crate::child::ChildServer::start(
        token.env(),
        common::scratch_dir("managed-logs").join("server.log"),
    )
    .await;
    let mut hidden: Vec<String> = Vec::new();
    let ctx = json!({"tenant": "acme"});

    // Keys of every format, shown at creation, read back, rotated, read again (both versions).
    for (name, format, length) in [
        ("raw", "raw", 48),
        ("hex", "hex", 64),
        ("uuid", "uuid", 36),
        ("alnum", "alphanumeric", 48),
        ("num", "numeric", 40),
    ] {
        let mut body = json!({"name": name, "format": format, "context": ctx,
                              "return_plaintext": true});
        if format != "uuid" {
            body["length"] = json!(length);
        }
        let (status, created) = server.send(Method::POST, "/v1/keys", Some(&body)).await;
        assert_eq!(status, 201, "{created}");
        let id = created["key"]["id"].as_str().unwrap().to_owned();
        let (status, _) = server
            .send(Method::POST, &format!("/v1/keys/{id}/rotate"), None)
            .await;
        assert_eq!(status, 200);
        for version in [1, 2] {
            let (status, read) = server
                .send(
                    Method::POST,
                    &format!("/v1/keys/{id}/plaintext"),
                    Some(&json!({"context": ctx, "version": version})),
                )
                .await;
            assert_eq!(status, 200, "{read}");
            let shown = read["plaintext"].as_str().unwrap();
            if version == 1 {
                assert_eq!(created["plaintext"], shown);
            }
            let bytes = if format == "raw" {
                unb64(shown)
            } else {
                shown.as_bytes().to_vec()
            };
            hidden.extend(forms(shown, &bytes));
        }
        // A refused read (wrong context) of the same key.
        let (status, _) = server
            .send(
                Method::POST,
                &format!("/v1/keys/{id}/plaintext"),
                Some(&json!({"context": {"tenant": "evil"}})),
            )
            .await;
        assert_eq!(status, 422);
    }

    // Secrets: written (twice), read (latest and by version), and refused writes carrying a
    // value in the wrong place.
    let values = [
        "correct-horse-battery-staple-0x5eed",
        "sk_live_51Habc1234567890QWERTYuiop",
    ];
    for value in values {
        let (status, body) = server
            .send(
                Method::PUT,
                "/v1/secrets/payments.api-key",
                Some(&json!({"value": b64(value.as_bytes()), "context": ctx})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        hidden.extend(forms(value, value.as_bytes()));
    }
    for query in ["context[tenant]=acme", "version=1&context[tenant]=acme"] {
        let (status, body) = server
            .send(
                Method::GET,
                &format!("/v1/secrets/payments.api-key?{query}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let odd = "tr0ub4dor&3-never-logged-value";
    hidden.extend(forms(odd, odd.as_bytes()));
    for body in [
        json!({"value": b64(odd.as_bytes()), "unexpected": true}),
        json!({"value": b64(odd.as_bytes()), "context": 5}),
        json!({"value": odd}),
        json!({"value": [b64(odd.as_bytes())]}),
    ] {
        let (status, _) = server
            .send(Method::PUT, "/v1/secrets/odd", Some(&body))
            .await;
        assert!((400..500).contains(&status), "{body}");
    }
    let (status, _) = server
        .send(Method::DELETE, "/v1/secrets/payments.api-key", None)
        .await;
    assert_eq!(status, 200);

    hidden.push(server.token.clone());
    let log = server.stop().await;
    assert!(log.contains("serving https"), "the log was captured: {log}");
    assert!(
        log.contains("/v1/keys"),
        "requests are logged at trace level"
    );
    assert!(
        !log.contains(&common::user_pin()),
        "the PIN appears in the log"
    );
    for value in &hidden {
        assert!(
            !log.contains(value.as_str()),
            "a key or secret value appears in the log: {value}"
        );
    }
}

#[tokio::test]
async fn a_claimed_rotation_whose_broker_died_is_done_by_the_next_pass_exactly_once() {
    let server = TestServer::start().await;
    let owner = Uuid::parse_str(&server.main.id).unwrap();
    let now = unix_now();
    let (key, _) = server
        .broker
        .create_key(
            owner,
            spec(
                "claimed",
                KeyFormat::Hex,
                32,
                Rotation::Auto { period_days: 30 },
            ),
            false,
            now,
        )
        .await
        .unwrap();
    let due = now + 31 * 86_400;
    // A broker claims the due rotation and dies before storing the new version.
    let claimed = server.store.claim_due_rotations(due, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![key.id]
    );
    // While its claim holds, no other pass takes the key.
    let report = server.broker.run_maintenance(due + 60).await.unwrap();
    assert!(report.rotated.is_empty(), "{report:?}");
    // Once the claim lapses, the next pass rotates it, once.
    let later = due + keybroker::store::ROTATION_CLAIM_SECS + 1;
    let report = server.broker.run_maintenance(later).await.unwrap();
    assert_eq!(report.rotated, vec![key.id]);
    let report = server.broker.run_maintenance(later + 1).await.unwrap();
    assert!(report.rotated.is_empty(), "{report:?}");
    let details = server.broker.key(owner, key.id, later).await.unwrap();
    assert_eq!(details.key.current_version, 2);
    assert_eq!(details.rotations.len(), 1);
    assert_eq!(details.rotations[0].reason, "scheduled");
    assert_eq!(details.key.next_rotation_at, Some(later + 30 * 86_400));
    server.stop().await;
}
