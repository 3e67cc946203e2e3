//! The real `keybroker` binary as a child process: a token that goes away and comes back, and a
//! captured log that must hold no key material and no PIN.

use serde_json::json;

use crate::child::ChildServer;
use crate::common::{b64, scratch_dir, user_pin};
use crate::token::PrivateToken;

/// SoftHSM2 only: it re-reads its token folder, so taking the folder away makes the token
/// really go away. Kryoptic keeps its SQLite file open, so renaming it changes nothing; on both
/// tokens `faults::a_token_that_stays_gone_gives_503_and_recovers_without_a_restart` takes the
/// token away through the fault-injecting module instead.
#[tokio::test]
async fn a_softhsm_token_whose_storage_vanishes_gives_503_and_service_returns_without_a_restart() {
    if crate::token::kind() != crate::token::Kind::SoftHsm {
        eprintln!(
            "not applicable to {:?}: see the doc comment",
            crate::token::kind()
        );
        return;
    }
    let token = PrivateToken::copy();
    let server = ChildServer::start(token.env(), scratch_dir("outage").join("server.log")).await;
    server.wait_for("/readyz", 200).await;
    let (status, key) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{key}");

    // The token's storage disappears (as a removed device or an unmounted volume would).
    let away = token.storage().with_extension("away");
    std::fs::rename(token.storage(), &away).unwrap();
    server
        .assert_token_outage(&key["wrapped"], "storage gone")
        .await;

    // It comes back; so does the service, by itself.
    std::fs::rename(&away, token.storage()).unwrap();
    server.wait_for("/readyz", 200).await;
    let (status, body) = server
        .request("/v1/unwrap", Some(&json!({"wrapped": key["wrapped"]})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plaintext"], key["plaintext"]);
    let (status, _) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_whole_session_log_holds_no_key_material_and_no_pin() {
    let token = PrivateToken::copy();
    let server = ChildServer::start(token.env(), scratch_dir("logs").join("server.log")).await;
    let mut secrets: Vec<String> = Vec::new();
    let remember = |secrets: &mut Vec<String>, bytes: &[u8]| {
        secrets.push(b64(bytes));
        secrets.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
    };

    let (_, key) = server
        .request("/v1/datakey", Some(&json!({"context": {"a": "b"}})))
        .await;
    let dek = crate::common::unb64(key["plaintext"].as_str().unwrap());
    remember(&mut secrets, &dek);

    let material: Vec<u8> = (100u8..148).collect();
    remember(&mut secrets, &material);
    let (_, wrapped) = server
        .request("/v1/wrap", Some(&json!({"plaintext": b64(&material)})))
        .await;
    let (status, _) = server
        .request("/v1/unwrap", Some(&json!({"wrapped": wrapped["wrapped"]})))
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request(
            "/v1/rewrap",
            Some(&json!({"wrapped": key["wrapped"], "context": {"a": "b"}})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, batch) = server
        .request("/v1/datakey/batch", Some(&json!({"items": [{}, {}]})))
        .await;
    for item in batch["items"].as_array().unwrap() {
        remember(
            &mut secrets,
            &crate::common::unb64(item["plaintext"].as_str().unwrap()),
        );
    }
    // Random material, raw and formatted, single and batched (the bootstrap admin holds
    // `random`): none of it may reach the log.
    for body in [json!({"bytes": 48}), json!({"format": "hex", "length": 48})] {
        let (status, random) = server.request("/v1/random", Some(&body)).await;
        assert_eq!(status, 200, "{random}");
        secrets.push(random["plaintext"].as_str().unwrap().to_owned());
    }
    let (status, random) = server
        .request(
            "/v1/random/batch",
            Some(&json!({"items": [{"format": "alphanumeric", "length": 48}]})),
        )
        .await;
    assert_eq!(status, 200, "{random}");
    secrets.push(random["items"][0]["plaintext"].as_str().unwrap().to_owned());
    // Refused requests that carry key material in the wrong place.
    let odd: Vec<u8> = (1u8..=20).map(|b| b * 11).collect();
    remember(&mut secrets, &odd);
    for body in [
        json!({"plaintext": b64(&odd), "unexpected": true}),
        json!({"plaintext": b64(&odd), "context": 5}),
        json!({"plaintext": b64(&[odd.as_slice(), odd.as_slice(), odd.as_slice(), odd.as_slice()].concat())}),
    ] {
        let (status, _) = server.request("/v1/wrap", Some(&body)).await;
        assert!((400..500).contains(&status));
    }
    // A wrong type: the answer names the field in our words and does not quote the value
    // back (serde's own message would); nor may the value reach the log.
    let (status, body) = server
        .request("/v1/datakey", Some(&json!({"plaintext": b64(&odd)})))
        .await;
    assert_eq!(status, 422);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`plaintext`") && message.contains("wrong type"),
        "{message}"
    );
    assert!(!message.contains(&b64(&odd)), "{message}");
    let (status, _) = server
        .request(
            "/v1/unwrap",
            Some(&json!({"wrapped": wrapped["wrapped"], "context": {"x": "y"}})),
        )
        .await;
    assert_eq!(status, 422);

    // Secrets of the session itself: the admin's client secret and access token.
    secrets.push(server.admin_secret.clone());
    secrets.push(server.token.clone());
    let log = server.stop().await;
    assert!(log.contains("serving https"), "the log was captured: {log}");
    assert!(log.contains("request refused"), "refusals are logged");
    assert!(!log.contains(&user_pin()), "the PIN appears in the log");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "key material {secret} appears in the log"
        );
    }
}
