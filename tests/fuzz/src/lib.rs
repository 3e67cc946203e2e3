//! What the fuzz targets share: a fixed clock, client, signing key and broker configuration, so
//! that well-formed but wrong input (a token signed with this key, an assertion from this
//! client) gets past the parsers into the checks behind them. The seed generator
//! (`examples/make_seeds.rs`) signs its seeds with the same key.

use std::future::Future;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use keybroker::auth::AuthConfig;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey, signature::Signer};

/// The clock of the client-assertion checks (unix seconds, 2030-03-17).
pub const NOW: i64 = 1_900_000_000;
/// The client every signed seed claims to be.
pub const CLIENT: &str = "3f2b8c1e-5d4a-4b6f-9e2d-7a1c0b9d8e6f";
/// The `kid` of the fixed access-token signing key.
pub const KID: &str = "fuzz-kid";
/// The broker's issuer URL; the token endpoint (an assertion's `aud`) hangs off it.
pub const ISSUER: &str = "https://kb.fuzz:8443";
/// The audience of access tokens.
pub const AUDIENCE: &str = "keybroker";
/// Leeway on `exp`/`nbf`, seconds.
pub const LEEWAY: u64 = 30;

/// Not a secret: a fixed key, so that seeds signed once stay valid.
const FIXED_SCALAR: [u8; 32] = [0x42; 32];

/// The fixed P-256 key that signs seed tokens and assertions.
pub fn signing_key() -> SigningKey {
    SigningKey::from_slice(&FIXED_SCALAR).expect("a fixed scalar below the group order")
}

/// Its public half: a client's registered key, for assertions.
pub fn verifying_key() -> VerifyingKey {
    *signing_key().verifying_key()
}

/// Its public half as the broker holds its own signing keys, for access tokens: built from the
/// point's coordinates by the broker's own `ec_point_coordinates`.
pub fn decoding_key() -> DecodingKey {
    let point = verifying_key().to_encoded_point(false);
    let (x, y) = keybroker::auth::ec_point_coordinates(point.as_bytes())
        .expect("the fixed key is a P-256 point");
    DecodingKey::from_ec_components(&x, &y).expect("coordinates the broker produced")
}

/// The broker's authentication settings, as a test broker would have them.
pub fn auth_config() -> AuthConfig {
    AuthConfig {
        issuer: ISSUER.to_owned(),
        audience: AUDIENCE.to_owned(),
        token_ttl: Duration::from_secs(300),
        leeway: LEEWAY,
        trusted_proxies: Vec::new(),
        refusal_window: Duration::from_secs(60),
        cache_max_age: Duration::from_secs(30),
        console_idle: Duration::from_secs(900),
        console_absolute: Duration::from_secs(28_800),
    }
}

/// A compact JWS (ES256) of `header` and `claims`, signed with the fixed key.
pub fn sign_jws(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature: Signature = signing_key().sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// Runs an extractor's future to completion. Over an in-memory body it never waits, so a
/// current-thread runtime per fuzzing thread is all it needs.
pub fn block_on<F: Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|runtime| runtime.block_on(future))
}
