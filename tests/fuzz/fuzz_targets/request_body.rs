//! JSON request bodies into their validated types, through the handlers' own path: the
//! `ApiJson` extractor (axum's `Json` over a real request, the object check, serde with the
//! field path), then the validator the handler calls; every refusal is rendered as the
//! response the server would send.
//!
//! Input: the first byte picks the body type (its value modulo 16, see `match` below), the rest
//! is the body.
#![no_main]

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use keybroker::api::admin::{RegisterClientBody, UpdateClientBody, register_spec};
use keybroker::api::keys::{
    CreateKeyBody, ReadKeyBody, RefreshKeyBody, key_spec, refreshed_expiry,
};
use keybroker::api::random::{RandomBatchBody, RandomBody, parse_random};
use keybroker::api::secrets::{PutSecretBody, secret_value};
use keybroker::api::security::LockdownBody;
use keybroker::api::{
    ApiError, ApiJson, BatchRequestItem, BlobBatchBody, BlobBody, DataKeyBatchBody, DataKeyBody,
    WrapBatchBody, WrapBody, parse_blob, parse_context, parse_datakey, parse_wrap,
};
use keybroker::broker::SecuritySettings;
use keybroker_fuzz::{NOW, block_on};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => check(body, |b: DataKeyBody| parse_datakey(b).map(drop)),
        1 => check(body, |b: DataKeyBatchBody| each(b.items, parse_datakey)),
        2 => check(body, |b: WrapBody| {
            let request = parse_wrap(b)?;
            assert!((16..=64).contains(&request.key.expose().len()));
            Ok(())
        }),
        3 => check(body, |b: WrapBatchBody| each(b.items, parse_wrap)),
        4 => check(body, |b: BlobBody| parse_blob(b).map(drop)),
        5 => check(body, |b: BlobBatchBody| each(b.items, parse_blob)),
        6 => check(body, |b: RandomBody| parse_random(b).map(drop)),
        7 => check(body, |b: RandomBatchBody| each(b.items, parse_random)),
        8 => check(body, |b: CreateKeyBody| key_spec(b, NOW).map(drop)),
        9 => check(body, |b: ReadKeyBody| parse_context(b.context).map(drop)),
        10 => check(body, |b: RefreshKeyBody| {
            refreshed_expiry(&b, NOW).map(drop)
        }),
        11 => check(body, |b: PutSecretBody| secret_value(b).map(drop)),
        12 => check(body, |b: RegisterClientBody| {
            register_spec(b).map(drop).map_err(ApiError::from)
        }),
        // The update's checks run on the merge with the stored client, and the lockdown's in
        // the database: the extractor is what sees untrusted bytes.
        13 => check(body, |_: UpdateClientBody| Ok(())),
        14 => check(body, |_: LockdownBody| Ok(())),
        _ => check(body, |b: SecuritySettings| {
            b.validate()
                .map_err(|m| ApiError::from(keybroker::broker::BrokerError::InvalidSpec(m)))
        }),
    }
});

/// The body through `ApiJson` and then `validate`, as a handler takes it; a refusal at either
/// step becomes its response.
fn check<T: DeserializeOwned>(body: &[u8], validate: impl FnOnce(T) -> Result<(), ApiError>) {
    let request = Request::builder()
        .method("POST")
        .uri("/")
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a well-formed request");
    let result = block_on(ApiJson::<T>::from_request(request, &()))
        .and_then(|ApiJson(value)| validate(value));
    if let Err(error) = result {
        let _ = error.into_response();
    }
}

/// A batch: every item through the single call's validator (a refusal answers that item only).
fn each<B, R>(
    items: Vec<BatchRequestItem<B>>,
    parse: fn(B) -> Result<R, ApiError>,
) -> Result<(), ApiError> {
    for BatchRequestItem(item) in items {
        if let Err(error) = parse(item) {
            let _ = error.into_response();
        }
    }
    Ok(())
}
