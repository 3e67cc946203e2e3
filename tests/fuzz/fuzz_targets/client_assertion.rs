//! `private_key_jwt` client assertions: `ClientAssertion::parse` (compact JWS, ES256 header,
//! the RFC 7523 claims, `sub` a client id matching `client_id`) and `ClientAssertion::verify`
//! (the signature with the client's key, then the claims at a fixed time), as the token
//! endpoint runs them around its database lookup. Seeds are assertions signed with the fixed
//! key, so mutations of them reach the signature and claim checks.
//!
//! Input: optionally `client_id` and a newline, then the assertion.
#![no_main]

use std::sync::LazyLock;

use keybroker::auth::ClientAssertion;
use keybroker_fuzz::{LEEWAY, NOW, auth_config, verifying_key};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::VerifyingKey;
use uuid::Uuid;

static KEY: LazyLock<VerifyingKey> = LazyLock::new(verifying_key);
static ENDPOINT: LazyLock<String> = LazyLock::new(|| auth_config().token_endpoint());

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (client_id, assertion) = match text.split_once('\n') {
        Some((client_id, assertion)) => (Some(client_id), assertion),
        None => (None, text),
    };
    if let Ok(parsed) = ClientAssertion::parse(client_id, assertion) {
        // A `client_id` sent must be the assertion's `sub` (any spelling a UUID parses from).
        if let Some(client_id) = client_id {
            assert_eq!(Uuid::parse_str(client_id).ok(), Some(parsed.client()));
        }
        let leeway = i64::try_from(LEEWAY).expect("small");
        let _ = parsed.verify(&KEY, &ENDPOINT, NOW, leeway);
    }
});
