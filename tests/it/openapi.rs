//! The served OpenAPI document covers every endpoint, request, response and error shape.

use crate::common::TestServer;

/// Every route the router serves, with its method.
const ENDPOINTS: [(&str, &str); 75] = [
    ("/metrics", "get"),
    ("/v1/admin/master-keys", "get"),
    ("/v1/admin/master-keys/rotate", "post"),
    ("/v1/admin/master-keys/rewrap", "post"),
    ("/v1/admin/master-keys/rewrap", "get"),
    ("/v1/admin/master-keys/{version}/retire", "post"),
    ("/v1/admin/signing-keys/rotate", "post"),
    ("/v1/admin/clients/{id}/lockdown", "post"),
    ("/v1/admin/clients/{id}/unblock", "post"),
    ("/v1/admin/security-settings", "get"),
    ("/v1/admin/security-settings", "put"),
    ("/v1/admin/audit", "get"),
    ("/v1/admin/audit/verify", "get"),
    ("/v1/keys", "post"),
    ("/v1/keys", "get"),
    ("/v1/keys/{id}", "get"),
    ("/v1/keys/{id}", "delete"),
    ("/v1/keys/{id}/plaintext", "post"),
    ("/v1/keys/{id}/rotate", "post"),
    ("/v1/keys/{id}/refresh", "post"),
    ("/v1/keys/{id}/disable", "post"),
    ("/v1/keys/{id}/enable", "post"),
    ("/v1/keys/{id}/cancel-deletion", "post"),
    ("/v1/secrets/{name}", "put"),
    ("/v1/secrets/{name}", "get"),
    ("/v1/secrets/{name}", "delete"),
    ("/v1/secrets/{name}/cancel-deletion", "post"),
    ("/v1/usage", "get"),
    ("/v1/admin/usage", "get"),
    ("/v1/admin/keys/due", "get"),
    ("/v1/datakey", "post"),
    ("/v1/datakey/batch", "post"),
    ("/v1/wrap", "post"),
    ("/v1/wrap/batch", "post"),
    ("/v1/unwrap", "post"),
    ("/v1/unwrap/batch", "post"),
    ("/v1/rewrap", "post"),
    ("/v1/rewrap/batch", "post"),
    ("/v1/random", "post"),
    ("/v1/random/batch", "post"),
    ("/v1/oauth/token", "post"),
    ("/v1/oauth/introspect", "post"),
    ("/v1/oauth/revoke", "post"),
    ("/.well-known/jwks.json", "get"),
    ("/v1/admin/clients", "post"),
    ("/v1/admin/clients", "get"),
    ("/v1/admin/clients/{id}", "get"),
    ("/v1/admin/clients/{id}", "patch"),
    ("/v1/admin/clients/{id}", "delete"),
    ("/v1/admin/clients/{id}/disable", "post"),
    ("/v1/admin/clients/{id}/enable", "post"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/openapi.json", "get"),
    ("/console", "get"),
    ("/console/", "get"),
    ("/console/sign-in", "get"),
    ("/console/sign-in", "post"),
    ("/console/sign-out", "post"),
    ("/console/clients", "get"),
    ("/console/clients", "post"),
    ("/console/clients/{id}/{action}", "post"),
    ("/console/keys", "get"),
    ("/console/keys/{id}/{action}", "post"),
    ("/console/master-keys", "get"),
    ("/console/master-keys/rotate", "post"),
    ("/console/master-keys/rewrap", "get"),
    ("/console/master-keys/rewrap", "post"),
    ("/console/master-keys/{version}/retire", "post"),
    ("/console/audit", "get"),
    ("/console/audit/verify", "get"),
    ("/console/settings", "get"),
    ("/console/settings", "post"),
    ("/console/usage", "get"),
    ("/console/assets/{file}", "get"),
];

const CRYPTO: [&str; 10] = [
    "/v1/datakey",
    "/v1/datakey/batch",
    "/v1/wrap",
    "/v1/wrap/batch",
    "/v1/unwrap",
    "/v1/unwrap/batch",
    "/v1/rewrap",
    "/v1/rewrap/batch",
    "/v1/random",
    "/v1/random/batch",
];

fn schema_ref(response: &serde_json::Value) -> Option<&str> {
    response["content"]["application/json"]["schema"]["$ref"].as_str()
}

#[tokio::test]
async fn the_document_describes_every_endpoint_and_error() {
    let server = TestServer::start().await;
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    let served: std::collections::BTreeSet<(&str, &str)> = ENDPOINTS.into_iter().collect();
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let served_owned: std::collections::BTreeSet<(String, String)> = served
        .iter()
        .map(|(p, m)| ((*p).to_owned(), (*m).to_owned()))
        .collect();
    assert_eq!(documented, served_owned);

    for (path, method) in ENDPOINTS {
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object().unwrap();
        // The console's sign-in, sign-out and front door succeed with a redirect.
        assert!(
            responses.keys().any(
                |code| code.starts_with('2') || (path.starts_with("/console") && code == "303")
            ),
            "{method} {path} has no success response"
        );
        if path.starts_with("/console") {
            // HTML for people, under its own tag; every page and form behind the session cookie.
            assert_eq!(
                op["tags"],
                serde_json::json!(["console"]),
                "{method} {path}"
            );
            if let Some(ok) = responses.get("200") {
                assert!(
                    ok["content"]
                        .as_object()
                        .is_some_and(|c| c.keys().all(|t| t.starts_with("text/"))),
                    "{method} {path}: {ok}"
                );
            }
            let open = ["/console", "/console/sign-in", "/console/assets/{file}"];
            if !open.contains(&path) {
                assert_eq!(
                    op["security"][0]["console_session"],
                    serde_json::json!([]),
                    "{method} {path}"
                );
            }
            if method == "post" && !["/console/sign-in"].contains(&path) {
                assert!(
                    op["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object(),
                    "{method} {path}"
                );
            }
        }
        let protected = path.starts_with("/v1/") && path != "/v1/oauth/token";
        if protected {
            assert_eq!(
                op["security"][0]["bearer"],
                serde_json::json!([]),
                "{method} {path}"
            );
            for code in ["401", "503"] {
                assert_eq!(
                    schema_ref(&responses[code]),
                    Some("#/components/schemas/ErrorBody"),
                    "{method} {path} {code}"
                );
            }
        }
    }
    for path in CRYPTO {
        let op = &doc["paths"][path]["post"];
        for code in ["400", "401", "403", "413", "415", "422", "500", "503"] {
            assert_eq!(
                schema_ref(&op["responses"][code]),
                Some("#/components/schemas/ErrorBody"),
                "{path} {code}"
            );
        }
        assert!(
            op["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string(),
            "{path}"
        );
    }
    // The token endpoint answers in the OAuth error shape, as RFC 6749 §5.2 has it.
    let token = &doc["paths"]["/v1/oauth/token"]["post"];
    assert!(token["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object());
    for code in ["400", "401", "503"] {
        assert_eq!(
            schema_ref(&token["responses"][code]),
            Some("#/components/schemas/OAuthError"),
            "token {code}"
        );
    }
    assert_eq!(
        schema_ref(&doc["paths"]["/readyz"]["get"]["responses"]["503"]),
        Some("#/components/schemas/HealthResponse")
    );
    let cookie = &doc["components"]["securitySchemes"]["console_session"];
    assert_eq!(
        (
            cookie["type"].as_str(),
            cookie["in"].as_str(),
            cookie["name"].as_str()
        ),
        (Some("apiKey"), Some("cookie"), Some("kb_console"))
    );
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ErrorBody",
        "ErrorDetail",
        "DataKeyBody",
        "DataKeyResponse",
        "WrapBody",
        "WrappedResponse",
        "BlobBody",
        "UnwrapResponse",
        "DataKeyBatchBody",
        "WrapBatchBody",
        "BlobBatchBody",
        "DataKeyBatchResponse",
        "WrappedBatchResponse",
        "UnwrapBatchResponse",
        "HealthResponse",
        "TokenForm",
        "TokenResponse",
        "OAuthError",
        "TokenParam",
        "IntrospectionResponse",
        "RegisterClientBody",
        "UpdateClientBody",
        "ClientBody",
        "RegisteredClientBody",
        "ClientListBody",
        "CreateKeyBody",
        "KeyBody",
        "CreatedKeyBody",
        "KeyDetailsBody",
        "KeyListBody",
        "ReadKeyBody",
        "KeyPlaintextBody",
        "RefreshKeyBody",
        "PutSecretBody",
        "SecretBody",
        "SecretValueBody",
        "UsageBody",
        "DueKeysBody",
        "LockdownBody",
        "BlockBody",
        "LockdownResultBody",
        "SecuritySettings",
        "RandomBody",
        "RandomBytesBody",
        "RandomFormatBody",
        "RandomFormat",
        "RandomResponse",
        "RandomBatchBody",
        "RandomBatchResponse",
    ] {
        assert!(
            schemas.contains_key(name),
            "schema {name} missing: {:?}",
            schemas.keys().collect::<Vec<_>>()
        );
    }
    // Step 7's answers are documented where they happen.
    let paths = &doc["paths"];
    let description = |path: &str, method: &str, code: &str| {
        paths[path][method]["responses"][code]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} does not document {code}"))
            .to_owned()
    };
    for (path, method) in [
        ("/v1/admin/clients/{id}/disable", "post"),
        ("/v1/admin/clients/{id}/lockdown", "post"),
        ("/v1/admin/clients/{id}", "delete"),
        ("/v1/admin/clients/{id}", "patch"),
    ] {
        assert!(
            description(path, method, "409").contains("last_admin"),
            "{method} {path}"
        );
    }
    assert!(
        description("/v1/admin/clients/{id}/lockdown", "post", "422").contains("block_not_allowed")
    );
    let throttled = description("/v1/oauth/token", "post", "429");
    assert!(throttled.contains("rate_limited"), "{throttled}");
    assert!(
        paths["/v1/oauth/token"]["post"]["responses"]["429"]["headers"]["Retry-After"].is_object()
    );
    // The random calls: both request shapes with their bounds, and every refusal a client meets.
    for path in ["/v1/random", "/v1/random/batch"] {
        assert_eq!(
            schema_ref(&paths[path]["post"]["responses"]["429"]),
            Some("#/components/schemas/ErrorBody"),
            "{path} 429"
        );
    }
    let shapes: Vec<&str> = schemas["RandomBody"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["$ref"].as_str().unwrap())
        .collect();
    assert_eq!(
        shapes,
        [
            "#/components/schemas/RandomBytesBody",
            "#/components/schemas/RandomFormatBody"
        ]
    );
    let bytes = &schemas["RandomBytesBody"];
    assert_eq!(bytes["properties"]["bytes"]["minimum"], 1, "{bytes}");
    assert_eq!(bytes["properties"]["bytes"]["maximum"], 1024, "{bytes}");
    assert_eq!(bytes["additionalProperties"], false, "{bytes}");
    assert_eq!(schemas["RandomFormatBody"]["additionalProperties"], false);
    assert_eq!(
        schemas["RandomFormat"]["enum"],
        serde_json::json!(["raw", "base64", "hex", "uuid", "alphanumeric", "numeric"])
    );
    let settings = &schemas["SecuritySettings"]["properties"];
    for field in [
        "auth_failures_per_client",
        "auth_failures_per_source",
        "auth_delay_max_secs",
        "block_min_prefix_v4",
        "block_min_prefix_v6",
    ] {
        assert!(settings[field].is_object(), "SecuritySettings.{field}");
    }
    server.stop().await;
}

/// The document as recorded in `tests/openapi.json`. The restructuring of step 12 must not change a
/// byte of it; a deliberate API change re-records it with `KB_RECORD_OPENAPI=1`.
const RECORDED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openapi.json");

#[tokio::test]
async fn the_served_document_is_byte_identical_to_the_recorded_one() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = response.bytes().await.unwrap();
    if std::env::var_os("KB_RECORD_OPENAPI").is_some() {
        std::fs::write(RECORDED, &served).unwrap();
    }
    let recorded = std::fs::read(RECORDED).unwrap();
    assert!(
        served.as_ref() == recorded.as_slice(),
        "the served OpenAPI document ({} bytes) differs from tests/openapi.json ({} bytes); \
         if the change is meant, re-record it with KB_RECORD_OPENAPI=1",
        served.len(),
        recorded.len()
    );
    server.stop().await;
}
