//! The stateless crypto endpoints: datakey, wrap, unwrap and rewrap, single and batch, with
//! their wire types and the parsing of each body into the broker's validated requests. The
//! cryptography itself happens in the broker and the token.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::auth::{Caller, Scope, unix_now};
use crate::broker::{BlobRequest, BrokerError, DataKeyRequest, Operation, WrapRequest};
use crate::crypto::{EncryptionContext, KeyMaterial, WrappedBlob};

use super::{ApiError, ApiJson, AppState, ErrorBody, schema};

/// Encryption context: a string map bound into the blob's AAD; keys are sorted before binding.
/// Its schema (`EncryptionContext`) states the limits `crypto::EncryptionContext` enforces.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct ContextMap(pub BTreeMap<String, String>);

/// One item of a batch request. Items are JSON objects, as the schema says: serde alone would
/// also fill a struct from an array by position, which no client means.
#[derive(Debug)]
pub struct BatchRequestItem<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for BatchRequestItem<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                // The item's own fields are read through the same map access, so an error
                // keeps its path (`items[2].context`).
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Self)
    }
}

/// `POST /v1/datakey` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataKeyBody {
    /// Bound as AAD; the same map must be given to unwrap.
    #[serde(default)]
    pub context: Option<ContextMap>,
    /// Whether to return the plaintext DEK as well (default true).
    #[serde(default)]
    pub plaintext: Option<bool>,
}

/// `POST /v1/datakey` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DataKeyResponse {
    /// `kb:v1:<mk_version>:<base64url(iv||ciphertext||tag)>`.
    #[schema(example = "kb:v1:1:3q2-7wAAAAAAAAAA...")]
    pub wrapped: String,
    /// The 32-byte DEK, standard base64; absent when `plaintext: false` was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    /// The master-key version that sealed the DEK.
    pub mk_version: u32,
}

/// `POST /v1/wrap` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WrapBody {
    /// 16 to 64 bytes of key material, standard base64 with padding.
    #[schema(schema_with = schema::wrappable_base64)]
    pub plaintext: String,
    /// Bound as AAD.
    #[serde(default)]
    pub context: Option<ContextMap>,
}

/// `POST /v1/wrap` and `POST /v1/rewrap` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WrappedResponse {
    /// The blob.
    pub wrapped: String,
    /// The master-key version that sealed it.
    pub mk_version: u32,
}

/// `POST /v1/unwrap` and `POST /v1/rewrap` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobBody {
    /// A blob from `datakey`, `wrap` or `rewrap`: `kb:v1:<mk_version>:<base64url payload>`.
    #[schema(schema_with = schema::blob)]
    pub wrapped: String,
    /// The context the blob was sealed with.
    #[serde(default)]
    pub context: Option<ContextMap>,
}

/// `POST /v1/unwrap` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnwrapResponse {
    /// The key material, standard base64.
    pub plaintext: String,
}

/// `POST /v1/datakey/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataKeyBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<DataKeyBody>)]
    pub items: Vec<BatchRequestItem<DataKeyBody>>,
}

/// `POST /v1/wrap/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WrapBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<WrapBody>)]
    pub items: Vec<BatchRequestItem<WrapBody>>,
}

/// `POST /v1/unwrap/batch` and `POST /v1/rewrap/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<BlobBody>)]
    pub items: Vec<BatchRequestItem<BlobBody>>,
}

/// One result of a batch: the single call's response, or its error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem<T> {
    /// The item succeeded.
    Ok(T),
    /// The item failed; the others are unaffected.
    Err(ErrorBody),
}

/// `POST /v1/datakey/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DataKeyBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<DataKeyResponse>>,
}

/// `POST /v1/wrap/batch` and `POST /v1/rewrap/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WrappedBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<WrappedResponse>>,
}

/// `POST /v1/unwrap/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnwrapBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<UnwrapResponse>>,
}

/// The error answers of every crypto endpoint that are its own, all in the one error shape (the
/// refusals in front of every operation, 401, 413, 415 and 429 among them, are added to the
/// document by `openapi`). Only its OpenAPI description is used.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum CryptoErrorResponses {
    /// `invalid_json`, `invalid_base64`, `invalid_blob` or `unsupported_blob_version`
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `insufficient_scope`, `ip_not_allowed` or `client_disabled`
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `invalid_request` (wrong types, unknown or missing fields), `invalid_key_length`,
    /// `invalid_context`, `empty_batch`, `batch_too_large`, `unknown_mk_version`,
    /// `context_mismatch` (another context, or an altered blob)
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal_error`: a bug; the request id finds it in the server log
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `hsm_unavailable`, `hsm_timeout` (the token did not answer within the deadline),
    /// `database_unavailable` or `no_active_key`
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

// ---------------------------------------------------------------------------------------------
// Parsing at the edge

pub fn parse_context(map: Option<ContextMap>) -> Result<EncryptionContext, ApiError> {
    EncryptionContext::new(map.unwrap_or_default().0).map_err(ApiError::InvalidContext)
}

pub fn parse_datakey(body: DataKeyBody) -> Result<DataKeyRequest, ApiError> {
    Ok(DataKeyRequest {
        context: parse_context(body.context)?,
        with_plaintext: body.plaintext.unwrap_or(true),
    })
}

pub fn parse_wrap(body: WrapBody) -> Result<WrapRequest, ApiError> {
    // Decode into a zeroizing buffer: the caller's key must not linger in freed memory.
    let bytes = Zeroizing::new(
        STANDARD
            .decode(body.plaintext.as_bytes())
            .map_err(|_| ApiError::InvalidBase64("plaintext"))?,
    );
    let key = KeyMaterial::new(bytes).map_err(|_| ApiError::InvalidKeyLength)?;
    // The request's base64 copy of the key is wiped as well.
    let mut text = body.plaintext;
    zeroize::Zeroize::zeroize(&mut text);
    Ok(WrapRequest {
        key,
        context: parse_context(body.context)?,
    })
}

pub fn parse_blob(body: BlobBody) -> Result<BlobRequest, ApiError> {
    Ok(BlobRequest {
        wrapped: WrappedBlob::parse(&body.wrapped).map_err(ApiError::InvalidBlob)?,
        context: parse_context(body.context)?,
    })
}

fn datakey_response(key: crate::broker::DataKey) -> DataKeyResponse {
    DataKeyResponse {
        mk_version: key.wrapped.mk_version().get(),
        wrapped: key.wrapped.to_string(),
        plaintext: key.plaintext.map(|p| STANDARD.encode(p.as_slice())),
    }
}

fn wrapped_response(blob: WrappedBlob) -> WrappedResponse {
    WrappedResponse {
        mk_version: blob.mk_version().get(),
        wrapped: blob.to_string(),
    }
}

fn unwrap_response(plaintext: Zeroizing<Vec<u8>>) -> UnwrapResponse {
    UnwrapResponse {
        plaintext: STANDARD.encode(plaintext.as_slice()),
    }
}

/// Runs a batch: items that fail to parse get their error in place, the rest go to the broker
/// in one call, and the results come back in request order.
pub(super) async fn run_batch<B, R, O, W, Fut>(
    bodies: Vec<BatchRequestItem<B>>,
    parse: impl Fn(B) -> Result<R, ApiError>,
    call: impl FnOnce(Vec<R>) -> Fut,
    respond: impl Fn(O) -> W,
) -> Result<Vec<BatchItem<W>>, ApiError>
where
    Fut: std::future::Future<Output = Result<Vec<Result<O, BrokerError>>, BrokerError>>,
{
    let parsed: Vec<Result<R, ApiError>> = bodies
        .into_iter()
        .map(|BatchRequestItem(body)| parse(body))
        .collect();
    let mut valid = Vec::new();
    let mut slots = Vec::with_capacity(parsed.len());
    for item in parsed {
        match item {
            Ok(request) => {
                valid.push(request);
                slots.push(None);
            }
            Err(e) => slots.push(Some(e)),
        }
    }
    let mut results = if valid.is_empty() {
        Vec::new().into_iter()
    } else {
        call(valid).await?.into_iter()
    };
    let mut out = Vec::with_capacity(slots.len());
    for slot in slots {
        let item = match slot {
            Some(err) => BatchItem::Err(err.body()),
            None => match results.next() {
                Some(Ok(value)) => BatchItem::Ok(respond(value)),
                Some(Err(err)) => BatchItem::Err(ApiError::from(err).body()),
                None => BatchItem::Err(ApiError::Broker(BrokerError::EmptyBatch).body()),
            },
        };
        out.push(item);
    }
    Ok(out)
}

/// Checks a batch's size before any item is parsed.
pub(super) fn check_batch_size<T>(state: &AppState, items: &[T]) -> Result<(), ApiError> {
    Ok(state.broker.check_batch(items.len())?)
}

/// Counts a batch's successful items for usage statistics.
pub(super) fn count_batch<T>(
    state: &AppState,
    caller: &Caller,
    op: Operation,
    items: &[BatchItem<T>],
) {
    let ok = items
        .iter()
        .filter(|i| matches!(i, BatchItem::Ok(_)))
        .count();
    state.broker.count(caller.client_id, op, ok, unix_now());
}

/// A single call is a batch of one: the same path, and its one result or error.
pub(super) fn single<T>(mut results: Vec<Result<T, BrokerError>>) -> Result<T, ApiError> {
    results
        .pop()
        .unwrap_or(Err(BrokerError::EmptyBatch))
        .map_err(ApiError::from)
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// Generate a data key.
///
/// A 256-bit DEK from the token's RNG, sealed by the token under the active master key
/// (AES-256-GCM, 96-bit random IV, 128-bit tag) with the context bound as AAD.
#[utoipa::path(post, path = "/v1/datakey", tag = "crypto",
    security(("bearer" = [])),
    request_body = DataKeyBody,
    responses(
        (status = 200, description = "The data key", body = DataKeyResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn datakey(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DataKeyBody>,
) -> Result<Json<DataKeyResponse>, ApiError> {
    caller.require(Scope::Datakey)?;
    let request = parse_datakey(body)?;
    let key = single(
        state
            .broker
            .datakeys(&caller.aad_id(), vec![request])
            .await?,
    )?;
    state
        .broker
        .count(caller.client_id, Operation::Datakey, 1, unix_now());
    Ok(Json(datakey_response(key)))
}

/// Generate data keys in a batch.
#[utoipa::path(post, path = "/v1/datakey/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = DataKeyBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = DataKeyBatchResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn datakey_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DataKeyBatchBody>,
) -> Result<Json<DataKeyBatchResponse>, ApiError> {
    caller.require(Scope::Datakey)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_datakey,
        |reqs| state.broker.datakeys(&owner, reqs),
        datakey_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Datakey, &items);
    Ok(Json(DataKeyBatchResponse { items }))
}

/// Wrap caller key material.
///
/// Seals 16 to 64 bytes under the active master key with the context bound as AAD.
#[utoipa::path(post, path = "/v1/wrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = WrapBody,
    responses(
        (status = 200, description = "The blob", body = WrappedResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn wrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<WrapBody>,
) -> Result<Json<WrappedResponse>, ApiError> {
    caller.require(Scope::Wrap)?;
    let request = parse_wrap(body)?;
    let blob = single(state.broker.wrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Wrap, 1, unix_now());
    Ok(Json(wrapped_response(blob)))
}

/// Wrap caller key material in a batch.
#[utoipa::path(post, path = "/v1/wrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = WrapBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = WrappedBatchResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn wrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<WrapBatchBody>,
) -> Result<Json<WrappedBatchResponse>, ApiError> {
    caller.require(Scope::Wrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_wrap,
        |reqs| state.broker.wrap(&owner, reqs),
        wrapped_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Wrap, &items);
    Ok(Json(WrappedBatchResponse { items }))
}

/// Unwrap a blob.
///
/// Opens a blob inside the token with the context it was sealed with.
#[utoipa::path(post, path = "/v1/unwrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBody,
    responses(
        (status = 200, description = "The key material", body = UnwrapResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn unwrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBody>,
) -> Result<Json<UnwrapResponse>, ApiError> {
    caller.require(Scope::Unwrap)?;
    let request = parse_blob(body)?;
    let plaintext = single(state.broker.unwrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Unwrap, 1, unix_now());
    Ok(Json(unwrap_response(plaintext)))
}

/// Unwrap blobs in a batch.
#[utoipa::path(post, path = "/v1/unwrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = UnwrapBatchResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn unwrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBatchBody>,
) -> Result<Json<UnwrapBatchResponse>, ApiError> {
    caller.require(Scope::Unwrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_blob,
        |reqs| state.broker.unwrap(&owner, reqs),
        unwrap_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Unwrap, &items);
    Ok(Json(UnwrapBatchResponse { items }))
}

/// Rewrap a blob under the active master key.
///
/// Decrypts and re-encrypts inside the broker; the plaintext is never returned.
#[utoipa::path(post, path = "/v1/rewrap", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBody,
    responses(
        (status = 200, description = "The new blob", body = WrappedResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn rewrap(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBody>,
) -> Result<Json<WrappedResponse>, ApiError> {
    caller.require(Scope::Rewrap)?;
    let request = parse_blob(body)?;
    let blob = single(state.broker.rewrap(&caller.aad_id(), vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Rewrap, 1, unix_now());
    Ok(Json(wrapped_response(blob)))
}

/// Rewrap blobs in a batch.
#[utoipa::path(post, path = "/v1/rewrap/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = BlobBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = WrappedBatchResponse),
        CryptoErrorResponses,
    ))]
pub(super) async fn rewrap_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BlobBatchBody>,
) -> Result<Json<WrappedBatchResponse>, ApiError> {
    caller.require(Scope::Rewrap)?;
    check_batch_size(&state, &body.items)?;
    let owner = caller.aad_id();
    let items = run_batch(
        body.items,
        parse_blob,
        |reqs| state.broker.rewrap(&owner, reqs),
        wrapped_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Rewrap, &items);
    Ok(Json(WrappedBatchResponse { items }))
}
