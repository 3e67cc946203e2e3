//! The served OpenAPI document covers every endpoint, request, response and error shape.

use crate::common::TestServer;

const ENDPOINTS: [(&str, &str); 11] = [
    ("/v1/datakey", "post"),
    ("/v1/datakey/batch", "post"),
    ("/v1/wrap", "post"),
    ("/v1/wrap/batch", "post"),
    ("/v1/unwrap", "post"),
    ("/v1/unwrap/batch", "post"),
    ("/v1/rewrap", "post"),
    ("/v1/rewrap/batch", "post"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/openapi.json", "get"),
];

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
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths.len(),
        ENDPOINTS.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, method) in ENDPOINTS {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing");
        let responses = op["responses"].as_object().unwrap();
        assert!(responses.contains_key("200"), "{path}");
        if method == "post" {
            for code in ["400", "413", "415", "422", "500", "503"] {
                let schema = &responses[code]["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema.as_str(),
                    Some("#/components/schemas/ErrorBody"),
                    "{path} {code}"
                );
            }
            assert!(
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string(),
                "{path}"
            );
        }
    }
    assert_eq!(
        doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/HealthResponse"
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
    ] {
        assert!(
            schemas.contains_key(name),
            "schema {name} missing: {:?}",
            schemas.keys().collect::<Vec<_>>()
        );
    }
    let detail = &schemas["ErrorDetail"]["properties"];
    assert!(detail["code"].is_object() && detail["message"].is_object());
    server.stop().await;
}
