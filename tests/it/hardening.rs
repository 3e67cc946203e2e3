//! Step 7's smaller edges, seen from outside: response headers that keep key material out of
//! caches and browsers on HTTPS, client-facing messages in our words rather than a parser's,
//! and a TLS peer that cannot fill the log.

use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::{TestServer, error_code, scratch_dir};
use crate::token::shared_env;

/// Status, the two headers, and the body of one request as the main client.
async fn headers_of(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Option<String>, Option<String>) {
    let mut request = server
        .client
        .request(method, format!("{}{path}", server.base));
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (cache, hsts) = (header("cache-control"), header("strict-transport-security"));
    (response.status().as_u16(), cache, hsts)
}

#[tokio::test]
async fn every_response_forbids_caching_and_insists_on_https() {
    let server = TestServer::start().await;
    let token = server.main.token.clone();
    let (status, made) = server
        .post("/v1/datakey", &json!({"plaintext": true}))
        .await;
    assert_eq!(status, 200, "{made}");
    let unwrap_body = json!({"wrapped": made["wrapped"]});
    let (ask_plaintext, empty) = (json!({"plaintext": true}), json!({}));
    let secret = json!({"value": "c2VjcmV0", "context": {}});
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;
    let cases: Vec<(reqwest::Method, &str, &str, Option<&Value>, u16)> = vec![
        (
            post.clone(),
            "/v1/datakey",
            &token,
            Some(&ask_plaintext),
            200,
        ),
        (post.clone(), "/v1/unwrap", &token, Some(&unwrap_body), 200),
        (put, "/v1/secrets/hdr-test", &token, Some(&secret), 200),
        (get.clone(), "/v1/secrets/hdr-test", &token, None, 200),
        (post.clone(), "/v1/datakey", "", Some(&empty), 401),
        (get.clone(), "/v1/nowhere", "", None, 404),
        (get.clone(), "/healthz", "", None, 200),
        (get.clone(), "/openapi.json", "", None, 200),
    ];
    for (method, path, token, body, expected) in cases {
        let (status, cache, hsts) = headers_of(&server, method, path, token, body).await;
        // (A secret read answers whatever its context says; only its headers matter here.)
        assert!(
            status == expected || path == "/v1/secrets/hdr-test",
            "{path}: {status}"
        );
        assert_eq!(cache.as_deref(), Some("no-store"), "{path}");
        assert_eq!(hsts.as_deref(), Some("max-age=31536000"), "{path}");
    }
    // The JWKS holds public keys only and is meant to be cached briefly; it keeps its own
    // Cache-Control, and HSTS like every response.
    let (status, cache, hsts) = headers_of(
        &server,
        reqwest::Method::GET,
        "/.well-known/jwks.json",
        "",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(cache.as_deref(), Some("public, max-age=60"));
    assert_eq!(hsts.as_deref(), Some("max-age=31536000"));
    // The token endpoint too (RFC 6749 §5.1 asks for no-store there in any case).
    let response = server
        .client
        .post(format!("{}/v1/oauth/token", server.base))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", server.main.id.as_str()),
            ("client_secret", server.main.secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    server.stop().await;
}

/// Words of serde's and axum's own messages that must not reach a client.
const PARSER_WORDS: [&str; 8] = [
    "invalid digit",
    "expected",
    "invalid type",
    "Failed to",
    "deserialize",
    "at line",
    "column",
    "Cannot parse",
];

fn assert_our_words(body: &Value, must_name: &str) {
    let message = body["error"]["message"].as_str().unwrap();
    for word in PARSER_WORDS {
        assert!(
            !message.contains(word),
            "parser wording {word:?} in {message:?}"
        );
    }
    assert!(
        message.contains(must_name),
        "{message:?} does not name {must_name:?}"
    );
}

#[tokio::test]
async fn schema_mismatches_are_explained_in_our_words() {
    let server = TestServer::start().await;
    for (path, body, names) in [
        ("/v1/datakey", json!({"plaintext": "yes"}), "`plaintext`"),
        ("/v1/datakey", json!({"context": {"a": 5}}), "`context.a`"),
        ("/v1/wrap", json!({}), "`plaintext`"),
        (
            "/v1/wrap",
            json!({"plaintext": "AAAA", "bogus": 1}),
            "`bogus`",
        ),
        (
            "/v1/unwrap/batch",
            json!({"items": [{"wrapped": 7}]}),
            "`items[0].wrapped`",
        ),
        (
            "/v1/keys",
            json!({"name": "k", "format": "raw", "length": -1}),
            "`length`",
        ),
    ] {
        let (status, reply) = server.post(path, &body).await;
        assert_eq!(status, 422, "{path} {body}: {reply}");
        assert_eq!(error_code(&reply), "invalid_request", "{reply}");
        assert_our_words(&reply, names);
    }
    // A body that is not an object at all.
    let (status, reply) = server.post("/v1/datakey", &json!([1, 2])).await;
    assert!(status == 422 || status == 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        !PARSER_WORDS.iter().any(|w| message.contains(w)),
        "{message}"
    );
    // Query strings.
    for (path, names) in [
        ("/v1/keys?limit=abc", "`limit`"),
        ("/v1/admin/clients?limit=1e99", "`limit`"),
        ("/v1/admin/audit?limit=-3", "`limit`"),
    ] {
        let (status, reply) = server.get(path).await;
        assert_eq!(status, 422, "{path}: {reply}");
        assert_our_words(&reply, names);
    }
    server.stop().await;
}

#[tokio::test]
async fn handshakes_with_an_address_as_sni_log_one_warning_a_minute() {
    let server = ChildServer::start(shared_env(), scratch_dir("sni").join("server.log")).await;
    let (_, base) = server.endpoint();
    let port = base.rsplit(':').next().unwrap().to_owned();
    let ca = crate::common::dev_certificate().ca;
    for _ in 0..8 {
        let (port, ca) = (port.clone(), ca.clone());
        // `-servername` with an address: OpenSSL sends it as SNI, which RFC 6066 forbids.
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("timeout")
                .args(["20", "openssl", "s_client", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-servername", "127.0.0.1", "-CAfile"])
                .arg(&ca)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("BEGIN CERTIFICATE")
                || output.status.success(),
            "{output:?}"
        );
    }
    // The server still answers, and its log holds the warning once, not eight times.
    assert_eq!(server.request("/healthz", None).await.0, 200);
    let log = server.stop().await;
    let warnings = log.lines().filter(|l| l.contains("Illegal SNI")).count();
    assert_eq!(warnings, 1, "{warnings} SNI warnings in the log");
}
