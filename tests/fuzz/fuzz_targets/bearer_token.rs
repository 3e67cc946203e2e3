//! Bearer tokens: `verify_access_token`, the signature and claims check every protected request
//! runs on a token it has not verified before, with a fixed key under a fixed `kid`, then the
//! ids and scopes read from verified claims. Seeds are tokens signed with that key, so mutations
//! of well-formed tokens reach the signature and claim checks.
#![no_main]

use std::sync::LazyLock;

use axum::response::IntoResponse;
use jsonwebtoken::DecodingKey;
use keybroker::api::ApiError;
use keybroker::auth::{AuthConfig, Scopes, parse_ids, verify_access_token};
use keybroker_fuzz::{AUDIENCE, ISSUER, KID, auth_config, decoding_key};
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<DecodingKey> = LazyLock::new(decoding_key);
static CONFIG: LazyLock<AuthConfig> = LazyLock::new(auth_config);

fuzz_target!(|data: &[u8]| {
    // A header value the server reads as text; anything else never reaches the verifier.
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    match verify_access_token(token, |kid| (kid == KID).then_some(&*KEY), &CONFIG) {
        Ok(claims) => {
            assert_eq!(claims.iss, ISSUER);
            assert_eq!(claims.aud, AUDIENCE);
            let _ = parse_ids(&claims);
            let _ = Scopes::parse(&claims.scope);
        }
        Err(error) => {
            let _ = ApiError::from(error).into_response();
        }
    }
});
