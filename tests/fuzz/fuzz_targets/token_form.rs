//! The token endpoint's form (`application/x-www-form-urlencoded`) and `Authorization: Basic`
//! header, through the handler's own path: axum's `Form` extractor over a real request,
//! `basic_credentials`, `token_request` (grant type, exactly one authentication method), then
//! what `issue` parses before any lookup (the scope list, an assertion). The introspection and
//! revocation form (`token=`) goes through its extractor too.
//!
//! Input: the first byte's low bit picks the token form (0) or the `token=` form (1); its
//! second bit says the first line is an `Authorization` header value; the rest is the body.
#![no_main]

use axum::body::Body;
use axum::extract::{Form, FromRequest, Request};
use axum::http::HeaderValue;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use keybroker::api::oauth::{TokenForm, TokenParam, basic_credentials, token_request};
use keybroker::auth::{ClientAssertion, ClientCredentials, Scopes};
use keybroker_fuzz::block_on;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let (authorization, body) = match (kind & 2 != 0, rest.iter().position(|&b| b == b'\n')) {
        (true, Some(end)) => (Some(&rest[..end]), &rest[end + 1..]),
        _ => (None, rest),
    };
    let mut request = Request::builder()
        .method("POST")
        .uri("/v1/oauth/token")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(value) = authorization.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        request = request.header(AUTHORIZATION, value);
    }
    let request = request
        .body(Body::from(body.to_vec()))
        .expect("a well-formed request");
    if kind & 1 == 1 {
        let _ = block_on(Form::<TokenParam>::from_request(request, &()));
        return;
    }
    let basic = basic_credentials(request.headers());
    let form = block_on(Form::<TokenForm>::from_request(request, &()));
    if let Ok((form, credentials)) = token_request(basic, form) {
        if let Some(scope) = &form.scope {
            let _ = Scopes::parse(scope);
        }
        if let ClientCredentials::Assertion {
            client_id,
            assertion,
        } = credentials
        {
            let _ = ClientAssertion::parse(client_id.as_deref(), &assertion);
        }
    }
});
