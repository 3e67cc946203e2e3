//! Every kind of bad input gets a 4xx with the error shape and a stable code, never a 5xx, and
//! leaves the server working.

use serde_json::json;

use crate::common::{TestServer, b64, error_code, send_json};
use keybroker::broker::Limits;

#[tokio::test]
async fn malformed_bodies_get_their_codes() {
    let server = TestServer::start().await;
    let key16 = b64(&[7u8; 16]);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        // not JSON
        (
            "/v1/datakey",
            "application/json",
            b"{".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/v1/wrap",
            "application/json",
            b"plaintext=abc".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/v1/unwrap",
            "application/json",
            b"".to_vec(),
            400,
            "invalid_json",
        ),
        // wrong content type
        (
            "/v1/datakey",
            "text/plain",
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        // wrong types
        (
            "/v1/datakey",
            "application/json",
            br#"{"plaintext": "yes"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/datakey",
            "application/json",
            br#"{"context": ["a"]}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/datakey",
            "application/json",
            br#"{"context": {"a": 1}}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/wrap",
            "application/json",
            br#"{"plaintext": 5}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/unwrap",
            "application/json",
            br#"{"wrapped": null}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/datakey",
            "application/json",
            br#""a string""#.to_vec(),
            422,
            "invalid_request",
        ),
        // unknown fields
        (
            "/v1/datakey",
            "application/json",
            br#"{"contxt": {}}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/unwrap",
            "application/json",
            br#"{"wrapped": "x", "plaintext": "y"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        // missing fields
        (
            "/v1/wrap",
            "application/json",
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/unwrap",
            "application/json",
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/rewrap",
            "application/json",
            br#"{"context": {}}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "/v1/unwrap/batch",
            "application/json",
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        // bad base64 (URL-safe alphabet, missing padding, garbage)
        (
            "/v1/wrap",
            "application/json",
            br#"{"plaintext": "not base64!"}"#.to_vec(),
            400,
            "invalid_base64",
        ),
        (
            "/v1/wrap",
            "application/json",
            br#"{"plaintext": "AAAAAAAAAAAAAAAAAAAAAA"}"#.to_vec(),
            400,
            "invalid_base64",
        ),
        (
            "/v1/wrap",
            "application/json",
            br#"{"plaintext": "_-__-__-__-__-__-__-__w=="}"#.to_vec(),
            400,
            "invalid_base64",
        ),
        // key material of a wrong length
        (
            "/v1/wrap",
            "application/json",
            json!({"plaintext": b64(&[1u8; 15])})
                .to_string()
                .into_bytes(),
            422,
            "invalid_key_length",
        ),
        (
            "/v1/wrap",
            "application/json",
            json!({"plaintext": b64(&[1u8; 65])})
                .to_string()
                .into_bytes(),
            422,
            "invalid_key_length",
        ),
        (
            "/v1/wrap",
            "application/json",
            json!({"plaintext": ""}).to_string().into_bytes(),
            422,
            "invalid_key_length",
        ),
        // blobs
        (
            "/v1/unwrap",
            "application/json",
            br#"{"wrapped": "vault:v1:abc"}"#.to_vec(),
            400,
            "invalid_blob",
        ),
        (
            "/v1/unwrap",
            "application/json",
            br#"{"wrapped": "kb:v7:1:AAAA"}"#.to_vec(),
            400,
            "unsupported_blob_version",
        ),
        (
            "/v1/rewrap",
            "application/json",
            json!({"wrapped": format!("kb:v1:4242:{}", "A".repeat(80))})
                .to_string()
                .into_bytes(),
            422,
            "unknown_mk_version",
        ),
        // contexts over the limits
        (
            "/v1/datakey",
            "application/json",
            json!({"context": {"": "v"}}).to_string().into_bytes(),
            422,
            "invalid_context",
        ),
        (
            "/v1/datakey",
            "application/json",
            json!({"context": {"k": "v".repeat(300)}})
                .to_string()
                .into_bytes(),
            422,
            "invalid_context",
        ),
        // batches
        (
            "/v1/datakey/batch",
            "application/json",
            br#"{"items": []}"#.to_vec(),
            422,
            "empty_batch",
        ),
        (
            "/v1/wrap/batch",
            "application/json",
            json!({"items": [{"plaintext": key16, "extra": 1}]})
                .to_string()
                .into_bytes(),
            422,
            "invalid_request",
        ),
    ];
    for (path, content_type, body, want_status, want_code) in cases {
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(80)
            .collect::<String>();
        let (status, response) = server.post_raw(path, content_type, body).await;
        assert_eq!(
            (status, error_code(&response)),
            (want_status, want_code),
            "{path} {shown}: {response}"
        );
    }
    // Nothing of the above hurt the server.
    let (status, _) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_error_shape() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/v1/nothing-here").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = server.get("/v1/datakey").await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    server.stop().await;
}

#[tokio::test]
async fn oversized_bodies_and_batches_are_refused() {
    let server = TestServer::start_with(Limits { max_batch: 5 }, 64 * 1024).await;
    let huge = json!({"context": {"k": "x".repeat(70 * 1024)}});
    let (status, body) = server.post_oversized("/v1/datakey", &huge).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));

    let items: Vec<_> = (0..6).map(|_| json!({})).collect();
    let (status, body) = server
        .post("/v1/datakey/batch", &json!({ "items": items }))
        .await;
    assert_eq!((status, error_code(&body)), (422, "batch_too_large"));
    let (status, body) = server
        .post(
            "/v1/unwrap/batch",
            &json!({ "items": (0..6).map(|_| json!({"wrapped": "x"})).collect::<Vec<_>>() }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (422, "batch_too_large"));

    let items: Vec<_> = (0..5).map(|_| json!({})).collect();
    let (status, body) = server
        .post("/v1/datakey/batch", &json!({ "items": items }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn default_limits_are_one_mebibyte_and_a_thousand_items() {
    let server = TestServer::start().await;
    let just_over = json!({"context": {"k": "x".repeat(1024 * 1024)}});
    let (status, body) = server.post_oversized("/v1/datakey", &just_over).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));
    let items: Vec<_> = (0..1001).map(|_| json!({"plaintext": false})).collect();
    let (status, body) = server
        .post("/v1/datakey/batch", &json!({ "items": items }))
        .await;
    assert_eq!((status, error_code(&body)), (422, "batch_too_large"));
    let items: Vec<_> = (0..1000).map(|_| json!({"plaintext": false})).collect();
    let (status, body) = server
        .post("/v1/datakey/batch", &json!({ "items": items }))
        .await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn expiry_times_beyond_any_calendar_are_refused_not_failed() {
    let server = TestServer::start().await;
    for expires_at in [i64::MAX, 9_000_000_000_000_000, 253_402_300_800_000] {
        let (status, body) = server
            .post(
                "/v1/keys",
                &json!({"name": "far", "format": "hex", "expires_at": expires_at}),
            )
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (422, "invalid_request"),
            "{expires_at}"
        );
    }
    let (status, created) = server
        .post("/v1/keys", &json!({"name": "near", "format": "hex"}))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["key"]["id"].as_str().unwrap();
    let (status, body) = server
        .post(
            &format!("/v1/keys/{id}/refresh"),
            &json!({"expires_at": i64::MAX}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (422, "invalid_request"));
    server.stop().await;
}

#[tokio::test]
async fn text_postgres_cannot_store_and_odd_path_segments_get_a_4xx_not_a_500() {
    let server = TestServer::start().await;
    // A NUL character in a context (no context may hold one; jsonb could not store it):
    // refused, nothing kept.
    let (status, body) = server
        .post(
            "/v1/keys",
            &json!({"name": "nul", "format": "hex", "context": {"a": "x\u{0}y"}}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_context"),
        "{body}"
    );
    assert!(
        body["error"]["message"].as_str().unwrap().contains("NUL"),
        "{body}"
    );
    let (status, listed) = server.get("/v1/keys?name=nul").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["items"], json!([]), "{listed}");
    let (status, body) = send_json(
        &server.client,
        reqwest::Method::PUT,
        format!("{}/v1/secrets/nul", server.base),
        &server.main.token,
        Some(&json!({"value": b64(b"v"), "context": {"\u{0}": "x"}})),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_context"),
        "{body}"
    );
    // In a query filter (text refuses a NUL byte).
    for path in ["/v1/keys?name=%00", "/v1/admin/audit?event=%00"] {
        let (status, body) = server.get(path).await;
        assert_eq!(
            (status, error_code(&body)),
            (422, "invalid_request"),
            "{path}: {body}"
        );
    }
    // In a client's name (the admin API answers in its usual shape).
    let (status, body) = server
        .post(
            "/v1/admin/clients",
            &json!({"name": "a\u{0}b", "ip_mode": "none", "scopes": ["datakey"]}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_request"),
        "{body}"
    );
    // A master-key version past what Postgres stores names no version.
    let (status, body) = server
        .post("/v1/admin/master-keys/2147483648/retire", &json!({}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "mk_version_not_found"),
        "{body}"
    );
    // A path segment that is not UTF-8 once decoded gets the JSON shape, not axum's text.
    for path in ["/v1/keys/%FF", "/v1/admin/clients/%C0"] {
        let (status, body) = server.get(path).await;
        assert_eq!(
            (status, error_code(&body)),
            (422, "invalid_request"),
            "{path}: {body}"
        );
    }
    // And the server goes on working.
    let (status, body) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}
