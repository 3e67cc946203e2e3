//! The stateless crypto endpoints over HTTPS: round trips, context binding, tampering, batches.

use serde_json::{Value, json};

use crate::common::{TestServer, b64, error_code, unb64};

fn blob_parts(blob: &str) -> Vec<String> {
    blob.split(':').map(str::to_owned).collect()
}

#[tokio::test]
async fn datakey_then_unwrap_returns_the_same_key() {
    let server = TestServer::start().await;
    let context = json!({"tenant": "acme", "purpose": "invoices"});
    let (status, body) = server
        .post("/v1/datakey", &json!({ "context": context }))
        .await;
    assert_eq!(status, 200, "{body}");
    let plaintext = unb64(body["plaintext"].as_str().unwrap());
    assert_eq!(plaintext.len(), 32);
    let wrapped = body["wrapped"].as_str().unwrap();
    let mk_version = body["mk_version"].as_u64().unwrap();
    assert!(
        wrapped.starts_with(&format!("kb:v1:{mk_version}:")),
        "{wrapped}"
    );

    // Context key order does not matter: it is canonicalised by sorted keys.
    let (status, body) = server
        .post(
            "/v1/unwrap",
            &json!({"wrapped": wrapped, "context": {"purpose": "invoices", "tenant": "acme"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unb64(body["plaintext"].as_str().unwrap()), plaintext);

    // Two data keys are never the same.
    let (_, other) = server.post("/v1/datakey", &json!({})).await;
    assert_ne!(unb64(other["plaintext"].as_str().unwrap()), plaintext);
    server.stop().await;
}

#[tokio::test]
async fn datakey_without_plaintext_returns_only_the_blob() {
    let server = TestServer::start().await;
    let (status, body) = server
        .post("/v1/datakey", &json!({"plaintext": false}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("plaintext").is_none(), "{body}");
    let (status, body) = server
        .post("/v1/unwrap", &json!({"wrapped": body["wrapped"]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unb64(body["plaintext"].as_str().unwrap()).len(), 32);
    server.stop().await;
}

#[tokio::test]
async fn wrap_then_unwrap_returns_the_callers_material() {
    let server = TestServer::start().await;
    for len in [16usize, 32, 48, 64] {
        let material: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let (status, body) = server
            .post(
                "/v1/wrap",
                &json!({"plaintext": b64(&material), "context": {"k": "v"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["mk_version"].as_u64().unwrap() >= 1);
        let (status, body) = server
            .post(
                "/v1/unwrap",
                &json!({"wrapped": body["wrapped"], "context": {"k": "v"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(unb64(body["plaintext"].as_str().unwrap()), material);
    }
    server.stop().await;
}

#[tokio::test]
async fn rewrap_after_a_new_master_key_yields_a_blob_of_the_new_version() {
    let server = TestServer::start().await;
    let context = json!({"app": "rewrap"});
    let (_, original) = server
        .post("/v1/datakey", &json!({ "context": context }))
        .await;
    let old_blob = original["wrapped"].as_str().unwrap().to_owned();
    let old_version = original["mk_version"].as_u64().unwrap();

    let new_version = server.broker.rotate_master_key().await.unwrap();
    assert!(u64::from(new_version.get()) > old_version);

    // The active version can be cached for up to a second by the broker; rewrap must land on
    // the new one, which this node learnt at once because it did the rotation.
    let (status, rewrapped) = server
        .post(
            "/v1/rewrap",
            &json!({"wrapped": old_blob, "context": context}),
        )
        .await;
    assert_eq!(status, 200, "{rewrapped}");
    assert_eq!(
        rewrapped["mk_version"].as_u64().unwrap(),
        u64::from(new_version.get())
    );
    let new_blob = rewrapped["wrapped"].as_str().unwrap();
    assert!(
        new_blob.starts_with(&format!("kb:v1:{new_version}:")),
        "{new_blob}"
    );
    assert!(
        rewrapped.get("plaintext").is_none(),
        "rewrap must not return plaintext"
    );

    for blob in [old_blob.as_str(), new_blob] {
        let (status, body) = server
            .post("/v1/unwrap", &json!({"wrapped": blob, "context": context}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["plaintext"], original["plaintext"]);
    }

    // New data keys are sealed under the new version.
    let (_, fresh) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(
        fresh["mk_version"].as_u64().unwrap(),
        u64::from(new_version.get())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_blob_only_opens_with_its_own_context() {
    let server = TestServer::start().await;
    let context = json!({"tenant": "acme"});
    let (_, key) = server
        .post("/v1/datakey", &json!({ "context": context }))
        .await;
    let wrapped = key["wrapped"].clone();
    for wrong in [
        json!({"tenant": "other"}),
        json!({}),
        json!({"tenant": "acme", "extra": "x"}),
        json!({"Tenant": "acme"}),
    ] {
        let (status, body) = server
            .post("/v1/unwrap", &json!({"wrapped": wrapped, "context": wrong}))
            .await;
        assert_eq!(status, 422, "{wrong}: {body}");
        assert_eq!(error_code(&body), "context_mismatch");
        let (status, body) = server
            .post("/v1/rewrap", &json!({"wrapped": wrapped, "context": wrong}))
            .await;
        assert_eq!(status, 422, "{wrong}: {body}");
        assert_eq!(error_code(&body), "context_mismatch");
    }
    let (status, _) = server
        .post("/v1/unwrap", &json!({"wrapped": wrapped}))
        .await;
    assert_eq!(status, 422);
    // The failures left the blob usable.
    let (status, body) = server
        .post(
            "/v1/unwrap",
            &json!({"wrapped": wrapped, "context": context}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plaintext"], key["plaintext"]);
    server.stop().await;
}

#[tokio::test]
async fn every_single_bit_flip_of_the_payload_is_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let server = TestServer::start().await;
    // 480 refused opens in a row would (rightly) trip the automatic disabling of the client.
    let (status, _) = server
        .client
        .put(format!("{}/v1/admin/security-settings", server.base))
        .bearer_auth(&server.main.token)
        .json(&json!({ "anomaly_refusals": 0 }))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 200);
    let (_, key) = server.post("/v1/datakey", &json!({})).await;
    let wrapped = key["wrapped"].as_str().unwrap();
    let parts = blob_parts(wrapped);
    let payload = URL_SAFE_NO_PAD.decode(&parts[3]).unwrap();
    assert_eq!(payload.len(), 12 + 32 + 16, "iv || ciphertext || tag");

    // IV, ciphertext and tag: every bit of each, in batches of one item per flip.
    let mut items = Vec::new();
    for byte in 0..payload.len() {
        for bit in 0..8 {
            let mut tampered = payload.clone();
            tampered[byte] ^= 1 << bit;
            let blob = format!("kb:v1:{}:{}", parts[2], URL_SAFE_NO_PAD.encode(&tampered));
            items.push(json!({ "wrapped": blob }));
        }
    }
    for chunk in items.chunks(250) {
        let (status, body) = server
            .post("/v1/unwrap/batch", &json!({ "items": chunk }))
            .await;
        assert_eq!(status, 200, "{body}");
        let results = body["items"].as_array().unwrap();
        assert_eq!(results.len(), chunk.len());
        for result in results {
            assert_eq!(result["error"]["code"], "context_mismatch", "{result}");
        }
    }
    // The untouched blob still opens.
    let (status, _) = server
        .post("/v1/unwrap", &json!({ "wrapped": wrapped }))
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn tampering_with_each_text_field_is_refused_with_its_code() {
    let server = TestServer::start().await;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let (_, key) = server.post("/v1/datakey", &json!({})).await;
    let wrapped = key["wrapped"].as_str().unwrap();
    let parts = blob_parts(wrapped);
    let payload = &parts[3];
    let bytes = URL_SAFE_NO_PAD.decode(payload).unwrap();
    let truncated = |n: usize| URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - n]);
    let cases: Vec<(String, u16, &str)> = vec![
        // prefix: "kb" with one bit flipped
        (format!("jb:v1:{}:{payload}", parts[2]), 400, "invalid_blob"),
        // format version
        (
            format!("kb:w1:{}:{payload}", parts[2]),
            400,
            "unsupported_blob_version",
        ),
        (
            format!("kb:v2:{}:{payload}", parts[2]),
            400,
            "unsupported_blob_version",
        ),
        // MK version: unknown, zero, not a number
        (format!("kb:v1:999999:{payload}"), 422, "unknown_mk_version"),
        (format!("kb:v1:0:{payload}"), 400, "invalid_blob"),
        (format!("kb:v1:x:{payload}"), 400, "invalid_blob"),
        // payload: truncated by one byte (still long enough to parse), then by a lot
        (
            format!("kb:v1:{}:{}", parts[2], truncated(1)),
            422,
            "context_mismatch",
        ),
        (
            format!("kb:v1:{}:{}", parts[2], truncated(16)),
            422,
            "context_mismatch",
        ),
        (
            format!("kb:v1:{}:{}", parts[2], truncated(40)),
            400,
            "invalid_blob",
        ),
        // payload characters outside base64url, and padding
        (
            format!("kb:v1:{}:{}+", parts[2], &payload[..payload.len() - 1]),
            400,
            "invalid_blob",
        ),
        (format!("{wrapped}="), 400, "invalid_blob"),
        // structure
        (format!("{wrapped}:x"), 400, "invalid_blob"),
        ("".to_owned(), 400, "invalid_blob"),
    ];
    for (blob, want_status, want_code) in cases {
        let (status, body) = server.post("/v1/unwrap", &json!({ "wrapped": blob })).await;
        assert_eq!(
            (status, error_code(&body)),
            (want_status, want_code),
            "{blob}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_changed_master_key_version_field_does_not_authenticate() {
    let server = TestServer::start().await;
    // Make sure two versions exist, then move a v(N) blob to v(N-1) and the other way.
    let newer = server.broker.rotate_master_key().await.unwrap();
    let (_, key) = server.post("/v1/datakey", &json!({})).await;
    let parts = blob_parts(key["wrapped"].as_str().unwrap());
    assert_eq!(parts[2], newer.to_string());
    let older = newer.get() - 1;
    let moved = format!("kb:v1:{older}:{}", parts[3]);
    let (status, body) = server
        .post("/v1/unwrap", &json!({ "wrapped": moved }))
        .await;
    assert_eq!((status, error_code(&body)), (422, "context_mismatch"));
    server.stop().await;
}

#[tokio::test]
async fn batches_keep_order_and_report_errors_per_item() {
    let server = TestServer::start().await;
    let (status, body) = server
        .post(
            "/v1/datakey/batch",
            &json!({"items": [{"context": {"i": "0"}}, {"plaintext": false}, {"context": {"i": "2"}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let keys = body["items"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 3);
    assert!(keys[1].get("plaintext").is_none());

    let material = b64(&[9u8; 24]);
    let (status, wrapped) = server
        .post(
            "/v1/wrap/batch",
            &json!({"items": [
                {"plaintext": material},
                {"plaintext": "not base64!"},
                {"plaintext": b64(&[1u8; 8])},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{wrapped}");
    let wrapped = wrapped["items"].as_array().unwrap().clone();
    assert!(wrapped[0]["wrapped"].is_string());
    assert_eq!(wrapped[1]["error"]["code"], "invalid_base64");
    assert_eq!(wrapped[2]["error"]["code"], "invalid_key_length");

    let unwrap_items: Vec<Value> = vec![
        json!({"wrapped": keys[0]["wrapped"], "context": {"i": "0"}}),
        json!({"wrapped": keys[2]["wrapped"], "context": {"i": "wrong"}}),
        json!({"wrapped": "garbage"}),
        json!({"wrapped": wrapped[0]["wrapped"]}),
        json!({"wrapped": keys[2]["wrapped"], "context": {"i": "2"}}),
    ];
    let (status, body) = server
        .post("/v1/unwrap/batch", &json!({ "items": unwrap_items }))
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["items"].as_array().unwrap();
    assert_eq!(results[0]["plaintext"], keys[0]["plaintext"]);
    assert_eq!(results[1]["error"]["code"], "context_mismatch");
    assert_eq!(results[2]["error"]["code"], "invalid_blob");
    assert_eq!(results[3]["plaintext"], json!(material));
    assert_eq!(results[4]["plaintext"], keys[2]["plaintext"]);

    let (status, body) = server
        .post(
            "/v1/rewrap/batch",
            &json!({"items": [{"wrapped": keys[1]["wrapped"]}, {"wrapped": "kb:v9:1:AAAA"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["items"].as_array().unwrap();
    assert!(
        results[0]["wrapped"]
            .as_str()
            .unwrap()
            .starts_with("kb:v1:")
    );
    assert_eq!(results[1]["error"]["code"], "unsupported_blob_version");
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["token"], "ok");
    assert_eq!(body["checks"]["database"], "ok");
    server.stop().await;
}
