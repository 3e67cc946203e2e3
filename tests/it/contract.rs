//! The served document is the contract (step 10): what it adds to every operation, the limits it
//! takes from the configuration, its links, and the server keeping to the rules it states. The
//! fuzzing side of the contract is `scripts/contract.sh` (schemathesis).

use serde_json::{Value, json};

use crate::common::{TestServer, error_code};
use keybroker::broker::Limits;

fn lists_error(response: &Value) -> bool {
    let schema = &response["content"]["application/json"]["schema"];
    let ours = json!({"$ref": "#/components/schemas/ErrorBody"});
    *schema == ours
        || schema["oneOf"]
            .as_array()
            .is_some_and(|alternatives| alternatives.contains(&ours))
}

#[tokio::test]
async fn every_operation_lists_the_refusals_in_front_of_it_and_links_lead_on() {
    let server = TestServer::start_with(Limits { max_batch: 7 }, 1024 * 1024).await;
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let what = format!("{method} {path}");
            let responses = &op["responses"];
            if !matches!(path.as_str(), "/healthz" | "/readyz") {
                for code in ["403", "429"] {
                    assert!(lists_error(&responses[code]), "{what} {code}");
                }
                assert!(
                    responses["429"]["headers"]["Retry-After"].is_object(),
                    "{what}"
                );
            }
            if op["requestBody"]["content"]["application/json"].is_object() {
                for code in ["400", "413", "415", "422"] {
                    assert!(lists_error(&responses[code]), "{what} {code}");
                }
            }
            for parameter in op["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().unwrap();
                // A parameter said to be in the path is in the path's template, and the
                // others are in the query: no query parameter passes for a path one.
                match parameter["in"].as_str().unwrap() {
                    "path" => assert!(path.contains(&format!("{{{name}}}")), "{what} {name}"),
                    "query" => assert!(!path.contains(&format!("{{{name}}}")), "{what} {name}"),
                    other => panic!("{what}: {name} in {other}"),
                }
                // The console's pages answer a parameter that does not parse with an HTML
                // page of their own (or ignore a bad filter), not with the API's error shape.
                if !path.starts_with("/console") {
                    assert!(lists_error(&responses["422"]), "{what} 422 for {name}");
                }
                // utoipa's int32/int64 formats would imply bounds the server does not have.
                assert!(
                    parameter["schema"]["format"] != "int32",
                    "{what} {name}: {}",
                    parameter["schema"]
                );
            }
        }
    }
    assert!(operations >= 54, "{operations}");

    // Batches: 1 to the configured maximum, items that are objects.
    let schemas = &doc["components"]["schemas"];
    for name in [
        "DataKeyBatchBody",
        "WrapBatchBody",
        "BlobBatchBody",
        "RandomBatchBody",
    ] {
        let items = &schemas[name]["properties"]["items"];
        assert_eq!(
            (&items["minItems"], &items["maxItems"]),
            (&json!(1), &json!(7)),
            "{name}"
        );
    }
    // A managed key's length depends on its format, with the format's own range.
    let branches = schemas["CreateKeyBody"]["oneOf"].as_array().unwrap();
    let numeric = branches
        .iter()
        .find(|b| b["properties"]["format"]["enum"] == json!(["numeric"]))
        .unwrap();
    assert_eq!(
        (
            &numeric["properties"]["length"]["minimum"],
            &numeric["properties"]["length"]["maximum"]
        ),
        (&json!(4), &json!(64))
    );
    // The context's limits, the token form's grant type.
    let context = &schemas["EncryptionContext"];
    assert_eq!(context["maxProperties"], 32, "{context}");
    assert_eq!(context["propertyNames"]["minLength"], 1, "{context}");
    let shapes = schemas["TokenForm"]["oneOf"].as_array().unwrap();
    assert_eq!(shapes.len(), 3);
    for shape in shapes {
        assert_eq!(
            shape["properties"]["grant_type"]["enum"],
            json!(["client_credentials"])
        );
    }

    // Links from each create operation to those that take what it made.
    let paths = &doc["paths"];
    let operation_ids: Vec<&str> = paths
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    for (path, method, status, link, parameter) in [
        ("/v1/keys", "post", "201", "RotateKey", "id"),
        ("/v1/keys", "post", "201", "CancelKeyDeletion", "id"),
        (
            "/v1/secrets/{name}",
            "put",
            "200",
            "CancelSecretDeletion",
            "name",
        ),
        ("/v1/admin/clients", "post", "201", "LockdownClient", "id"),
        (
            "/v1/admin/master-keys/rotate",
            "post",
            "200",
            "RetireMasterKey",
            "version",
        ),
    ] {
        let link = &paths[path][method]["responses"][status]["links"][link];
        let target = link["operationId"].as_str().unwrap_or_default();
        assert!(operation_ids.contains(&target), "{path} -> {link}");
        assert!(
            link["parameters"][parameter]
                .as_str()
                .is_some_and(|e| e.starts_with("$response.body#/")),
            "{link}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_server_keeps_to_the_rules_the_document_states() {
    let server = TestServer::start().await;
    // JSON has one kind of number: 34.0 is the integer 34.
    let (status, body) = server
        .post("/v1/random", &json!({"format": "numeric", "length": 34.0}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plaintext"].as_str().unwrap().len(), 34);
    let (status, body) = server
        .post("/v1/random", &json!({"format": "numeric", "length": 34.5}))
        .await;
    assert_eq!((status, error_code(&body)), (422, "invalid_request"));

    // Batch items are objects; an array is not read by position into one.
    let (status, body) = server
        .post("/v1/datakey/batch", &json!({"items": [[null, null]]}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_request"),
        "{body}"
    );

    // Context limits count characters, and no context holds a NUL.
    let wide = "€".repeat(256);
    let (status, body) = server
        .post("/v1/datakey", &json!({"context": {"k": wide}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post("/v1/datakey", &json!({"context": {"k": "a\u{0}b"}}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_context"),
        "{body}"
    );

    // A scope list is words separated by single spaces (RFC 6749 §3.3).
    for scope in ["datakey  wrap", "datakey\twrap", " datakey", ""] {
        let response = server
            .client
            .post(format!("{}/v1/oauth/token", server.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", server.main.id.as_str()),
                ("client_secret", server.main.secret.as_str()),
                ("scope", scope),
            ])
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("invalid_scope")),
            "{scope:?}"
        );
    }

    // A registration's scopes are one word each, its name not only spaces (ASCII whitespace
    // trimmed, as the schema's pattern says).
    let register = |body: Value| {
        let server = &server;
        async move { server.post("/v1/admin/clients", &body).await }
    };
    let (status, body) =
        register(json!({"name": "a", "ip_mode": "none", "scopes": ["datakey wrap"]})).await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_client_metadata"),
        "{body}"
    );
    let (status, body) =
        register(json!({"name": " \t\n", "ip_mode": "none", "scopes": ["datakey"]})).await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_client_metadata"),
        "{body}"
    );
    let (status, body) =
        register(json!({"name": " padded\t", "ip_mode": "none", "scopes": ["datakey"]})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["client"]["name"], "padded");

    // The caller's own usage takes no client_id; the admin's does.
    let own = format!("/v1/usage?client_id={}", server.main.id);
    let (status, body) = server.get(&own).await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "invalid_request"),
        "{body}"
    );
    let (status, body) = server
        .get(&format!("/v1/admin/usage?client_id={}", server.main.id))
        .await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_request_refused_before_its_body_is_read_still_gets_its_answer() {
    // A bad token refuses a request before its handler reads the body. The server reads the
    // body anyway, so the connection is not reset under a client that sends its whole body and
    // only then reads (as Python's requests does over HTTP/1.1): each of these gets its 401, none
    // a transport error. (An HTTP/2 client, or one that reads while it sends, never saw this.)
    let server = TestServer::start().await;
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    for attempt in 0..10 {
        let answer = tokio::task::spawn_blocking(move || send_then_read(port, 200_000))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "attempt {attempt}: {}",
            answer.lines().next().unwrap_or_default()
        );
        assert!(
            answer.contains("invalid_token"),
            "attempt {attempt}: {answer}"
        );
    }
    server.stop().await;
}

/// One HTTP/1.1 request over TLS with a bad token and `padding` bytes of body, written whole
/// before the answer is read.
fn send_then_read(port: u16, padding: usize) -> std::io::Result<String> {
    use std::io::{Read, Write};
    keybroker::tls::install_crypto_provider();
    let ca_pem = std::fs::read(crate::common::dev_certificate().ca)?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let socket = std::net::TcpStream::connect(("127.0.0.1", port))?;
    socket.set_read_timeout(Some(crate::common::PATIENCE))?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    let body = json!({"context": {"k": "v"}, "padding": "x".repeat(padding)}).to_string();
    let head = format!(
        "POST /v1/datakey HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer not-a-token\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())?;
    tls.write_all(body.as_bytes())?;
    tls.flush()?;
    // A client that takes its time to read, as a busy one does. Had the server closed the
    // connection over the unread body, the reset would by now have discarded its answer (on
    // Linux, a reset drops what the socket had received); a server that read the body keeps
    // the connection, and the answer waits however long the client takes.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A keep-alive request, as clients send them: read until the error body is in.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"request_id\"") {
        match tls.read(&mut chunk)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
