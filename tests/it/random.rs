//! `POST /v1/random` and its batch form over HTTPS: lengths, formats, bounds, scope, batches,
//! usage counts, and a request log that never holds the output.

use keybroker::auth::IpPolicy;
use keybroker::broker::Limits;
use serde_json::{Value, json};

use crate::common::{TestServer, error_code, unb64};

const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The `random` count in a `/v1/usage` answer (stateless calls are under the nil key).
fn random_count(usage: &Value) -> i64 {
    usage["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["operation"] == "random")
        .map(|i| i["count"].as_i64().unwrap())
        .sum()
}

fn is_uuid_v4(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        && groups[2].starts_with('4')
        && groups[3].starts_with(['8', '9', 'a', 'b'])
}

#[tokio::test]
async fn random_bytes_and_formats_follow_their_rules_and_differ_between_calls() {
    let server = TestServer::start().await;
    for n in [1usize, 16, 33, 1024] {
        let (status, first) = server.post("/v1/random", &json!({ "bytes": n })).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["format"], "raw", "{first}");
        assert_eq!(unb64(first["plaintext"].as_str().unwrap()).len(), n);
        if n >= 16 {
            let (_, second) = server.post("/v1/random", &json!({ "bytes": n })).await;
            assert_ne!(first["plaintext"], second["plaintext"], "{n} bytes twice");
        }
    }
    // (request, format answered, check of the text)
    type Rule = fn(&str) -> bool;
    let cases: Vec<(Value, &str, Rule)> = vec![
        (json!({"format": "raw"}), "raw", |s| unb64(s).len() == 32),
        (json!({"format": "raw", "length": 256}), "raw", |s| {
            unb64(s).len() == 256
        }),
        (json!({"format": "base64", "length": 16}), "raw", |s| {
            unb64(s).len() == 16 && s.len() == 24
        }),
        (json!({"format": "hex"}), "hex", |s| {
            s.len() == 64
                && s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        }),
        (json!({"format": "hex", "length": 17}), "hex", |s| {
            s.len() == 17
                && s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        }),
        (json!({"format": "uuid"}), "uuid", is_uuid_v4),
        (json!({"format": "uuid", "length": 36}), "uuid", is_uuid_v4),
        (
            json!({"format": "alphanumeric", "length": 256}),
            "alphanumeric",
            |s| s.len() == 256 && s.bytes().all(|c| ALPHANUMERIC.contains(&c)),
        ),
        (json!({"format": "alphanumeric"}), "alphanumeric", |s| {
            s.len() == 32 && s.bytes().all(|c| ALPHANUMERIC.contains(&c))
        }),
        (json!({"format": "numeric"}), "numeric", |s| {
            s.len() == 16 && s.bytes().all(|c| c.is_ascii_digit())
        }),
        (json!({"format": "numeric", "length": 4}), "numeric", |s| {
            s.len() == 4 && s.bytes().all(|c| c.is_ascii_digit())
        }),
    ];
    for (request, format, rule) in cases {
        let (status, first) = server.post("/v1/random", &request).await;
        assert_eq!(status, 200, "{request}: {first}");
        assert_eq!(first["format"], format, "{request}: {first}");
        let text = first["plaintext"].as_str().unwrap();
        assert!(rule(text), "{request}: {text:?} breaks the format's rules");
        let (_, second) = server.post("/v1/random", &request).await;
        // Numeric length 4 has 10^4 values: a repeat is possible, so it is not compared.
        if request["length"] != 4 {
            assert_ne!(first["plaintext"], second["plaintext"], "{request} twice");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn random_refuses_bad_requests_with_our_error_shape() {
    let server = TestServer::start().await;
    for body in [
        json!({"bytes": 0}),
        json!({"bytes": 1025}),
        json!({"bytes": 1_000_000_000_000u64}),
        json!({"bytes": 32, "format": "hex"}),
        json!({"bytes": 32, "length": 32}),
        json!({}),
        json!({"length": 32}),
        json!({"bytes": 32, "extra": true}),
        json!({"format": "hex", "extra": true}),
        json!({"bytes": "32"}),
        json!({"bytes": -1}),
        json!({"bytes": 1.5}),
        json!({"bytes": null}),
        json!({"format": 5}),
        json!({"format": "base32"}),
        json!({"format": "HEX"}),
        json!({"format": "hex", "length": "64"}),
        json!({"format": "hex", "length": 15}),
        json!({"format": "hex", "length": 513}),
        json!({"format": "raw", "length": 15}),
        json!({"format": "uuid", "length": 16}),
        json!({"format": "numeric", "length": 65}),
        json!({"format": "alphanumeric", "length": 7}),
        json!([{"bytes": 32}]),
        json!("bytes"),
    ] {
        let (status, answer) = server.post("/v1/random", &body).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(error_code(&answer), "invalid_request", "{body}: {answer}");
    }
    // A refusal's message names the rule, in our words.
    let (_, answer) = server.post("/v1/random", &json!({"bytes": 1025})).await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 to 1024"),
        "{answer}"
    );
    let (status, answer) = server
        .post_raw("/v1/random", "application/json", b"{\"bytes\":".to_vec())
        .await;
    assert_eq!((status, error_code(&answer)), (400, "invalid_json"));
    let (status, answer) = server
        .post_raw("/v1/random", "text/plain", b"{\"bytes\":16}".to_vec())
        .await;
    assert_eq!(
        (status, error_code(&answer)),
        (415, "unsupported_media_type")
    );
    for path in ["/v1/random", "/v1/random/batch"] {
        let (status, answer) = server.post_as("", path, &json!({"bytes": 16})).await;
        assert_eq!(
            (status, error_code(&answer)),
            (401, "invalid_token"),
            "{path}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn random_needs_the_random_scope() {
    let server = TestServer::start().await;
    let other = server
        .register(
            "no-random",
            IpPolicy::Any,
            "datakey wrap unwrap rewrap keys:*",
        )
        .await;
    let (status, answer) = server
        .post_as(&other.token, "/v1/random", &json!({"bytes": 16}))
        .await;
    assert_eq!((status, error_code(&answer)), (403, "insufficient_scope"));
    let (status, answer) = server
        .post_as(
            &other.token,
            "/v1/random/batch",
            &json!({"items": [{"bytes": 16}]}),
        )
        .await;
    assert_eq!((status, error_code(&answer)), (403, "insufficient_scope"));
    // The scope alone is enough.
    let only = server
        .register("only-random", IpPolicy::Any, "random")
        .await;
    let (status, answer) = server
        .post_as(&only.token, "/v1/random", &json!({"format": "uuid"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_random_batch_keeps_order_and_errors_in_place_and_is_counted() {
    let server = TestServer::start_with(Limits { max_batch: 6 }, 1024 * 1024).await;
    let (status, before) = server.get("/v1/usage").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(random_count(&before), 0, "{before}");

    let items = json!([
        {"bytes": 16},
        {"bytes": 0},
        {"format": "uuid"},
        {"format": "hex", "length": 3},
        {"format": "numeric", "length": 10},
        {"bytes": 1024},
    ]);
    let (status, body) = server
        .post("/v1/random/batch", &json!({ "items": items }))
        .await;
    assert_eq!(status, 200, "{body}");
    let out = body["items"].as_array().unwrap();
    assert_eq!(out.len(), 6, "{body}");
    assert_eq!(unb64(out[0]["plaintext"].as_str().unwrap()).len(), 16);
    assert_eq!(out[0]["format"], "raw");
    assert_eq!(out[1]["error"]["code"], "invalid_request", "{body}");
    assert!(is_uuid_v4(out[2]["plaintext"].as_str().unwrap()), "{body}");
    assert_eq!(out[2]["format"], "uuid");
    assert_eq!(out[3]["error"]["code"], "invalid_request", "{body}");
    let digits = out[4]["plaintext"].as_str().unwrap();
    assert!(
        digits.len() == 10 && digits.bytes().all(|c| c.is_ascii_digit()),
        "{body}"
    );
    assert_eq!(unb64(out[5]["plaintext"].as_str().unwrap()).len(), 1024);

    // The whole batch is refused before any draw when its size is wrong.
    let (status, answer) = server.post("/v1/random/batch", &json!({"items": []})).await;
    assert_eq!((status, error_code(&answer)), (422, "empty_batch"));
    let seven: Vec<Value> = (0..7).map(|_| json!({"bytes": 8})).collect();
    let (status, answer) = server
        .post("/v1/random/batch", &json!({ "items": seven }))
        .await;
    assert_eq!((status, error_code(&answer)), (422, "batch_too_large"));
    let (status, answer) = server
        .post(
            "/v1/random/batch",
            &json!({"items": [{"bytes": 8}], "x": 1}),
        )
        .await;
    assert_eq!((status, error_code(&answer)), (422, "invalid_request"));

    // One single call, then the batch's four successes; refusals are not counted.
    let (status, _) = server.post("/v1/random", &json!({"bytes": 8})).await;
    assert_eq!(status, 200);
    let (_, after) = server.get("/v1/usage").await;
    assert_eq!(random_count(&after), 5, "{after}");
    let (_, report) = server
        .get(&format!("/v1/admin/usage?client_id={}", server.main.id))
        .await;
    assert_eq!(random_count(&report), 5, "{report}");
    server.stop().await;
}

#[tokio::test]
async fn the_request_log_never_holds_random_output() {
    let server = TestServer::start().await;
    let mut outputs = Vec::new();
    for body in [
        json!({"bytes": 64}),
        json!({"format": "hex", "length": 40}),
        json!({"format": "alphanumeric", "length": 40}),
    ] {
        let (status, answer) = server.post("/v1/random", &body).await;
        assert_eq!(status, 200, "{answer}");
        outputs.push(answer["plaintext"].as_str().unwrap().to_owned());
    }
    let (_, batch) = server
        .post(
            "/v1/random/batch",
            &json!({"items": [{"format": "numeric", "length": 64}]}),
        )
        .await;
    outputs.push(batch["items"][0]["plaintext"].as_str().unwrap().to_owned());
    let database_url = server.database_url.clone();
    // Stopping writes the queued request-log rows.
    server.stop().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as("SELECT row_to_json(r)::text FROM request_log r")
        .fetch_all(&pool)
        .await
        .unwrap();
    let random_rows = rows.iter().filter(|(r,)| r.contains("/v1/random")).count();
    assert_eq!(random_rows, 4, "{rows:?}");
    for (row,) in &rows {
        for output in &outputs {
            assert!(!row.contains(output.as_str()), "output in the log: {row}");
        }
    }
    let audit: Vec<(String,)> = sqlx::query_as("SELECT row_to_json(a)::text FROM audit_events a")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (row,) in &audit {
        for output in &outputs {
            assert!(
                !row.contains(output.as_str()),
                "output in the audit trail: {row}"
            );
        }
    }
    pool.close().await;
}
