//! `POST /v1/random` and its batch form: bytes from the token's RNG, raw (base64) or in a
//! managed-key format. Parses and presents only; the draw is `Broker::random`.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SecretText;
use super::{
    ApiError, ApiJson, AppState, BatchItem, BatchRequestItem, ErrorBody, check_batch_size,
    count_batch, run_batch, single,
};
use crate::auth::{Caller, Scope, unix_now};
use crate::broker::{Operation, RandomMaterial, RandomRequest};
use crate::crypto::formats::{KeyFormat, present};

/// `POST /v1/random` request: either `{"bytes": n}` for raw bytes, or `{"format": …,
/// "length"?: …}` for material in a managed-key format. Exactly one of the two shapes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RandomBody {
    /// Raw bytes, returned as standard base64.
    Bytes(RandomBytesBody),
    /// Material in a managed-key format.
    Formatted(RandomFormatBody),
}

/// Raw random bytes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomBytesBody {
    /// How many bytes, 1 to 1024.
    #[schema(minimum = 1, maximum = 1024)]
    pub bytes: u64,
}

/// Random material in a managed-key format, with the lengths and defaults of managed keys.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomFormatBody {
    /// The format.
    pub format: RandomFormat,
    /// In the format's unit, with its range and default: `raw`/`base64` bytes 16-256 (32), `hex`
    /// characters 16-512 (64), `uuid` 36 only (may be left out), `alphanumeric` characters
    /// 8-256 (32), `numeric` digits 4-64 (16).
    #[serde(default)]
    #[schema(minimum = 4, maximum = 512)]
    pub length: Option<u64>,
}

/// The formats of `POST /v1/random`: the managed-key formats, and `base64`, another name for
/// `raw` (bytes shown as standard base64).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RandomFormat {
    /// Bytes, shown as standard base64 with padding.
    Raw,
    /// The same as `raw`.
    Base64,
    /// Lowercase hex text.
    Hex,
    /// A lowercase RFC 9562 version-4 UUID.
    Uuid,
    /// Text over `A-Za-z0-9`.
    Alphanumeric,
    /// Decimal digits.
    Numeric,
}

impl RandomFormat {
    fn key_format(self) -> KeyFormat {
        match self {
            Self::Raw | Self::Base64 => KeyFormat::Raw,
            Self::Hex => KeyFormat::Hex,
            Self::Uuid => KeyFormat::Uuid,
            Self::Alphanumeric => KeyFormat::Alphanumeric,
            Self::Numeric => KeyFormat::Numeric,
        }
    }
}

/// `POST /v1/random` response: the material as managed keys present theirs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RandomResponse {
    /// `raw`: standard base64 with padding of the bytes; other formats: the text itself.
    #[schema(value_type = String)]
    pub plaintext: SecretText,
    /// `raw` (also for `{"bytes": n}` and `base64`), `hex`, `uuid`, `alphanumeric` or `numeric`.
    #[schema(example = "raw")]
    pub format: String,
}

/// `POST /v1/random/batch` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomBatchBody {
    /// 1 to the configured maximum (default 1000) requests.
    #[schema(value_type = Vec<RandomBody>)]
    pub items: Vec<BatchRequestItem<RandomBody>>,
}

/// `POST /v1/random/batch` response: results in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RandomBatchResponse {
    /// One per request item, same order.
    pub items: Vec<BatchItem<RandomResponse>>,
}

/// The error answers of the random endpoints that are their own (the refusals in front of
/// every operation are added to the document by `openapi`). Only its OpenAPI description is
/// used.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum RandomErrorResponses {
    /// `invalid_json`: the body is not JSON
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `insufficient_scope` (needs `random`), `ip_not_allowed`, `client_disabled` or
    /// `source_blocked`
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `invalid_request` (neither or both of `bytes` and `format`, a count or length out of
    /// range, wrong types, unknown fields), `empty_batch`, `batch_too_large`
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal_error`: a bug; the request id finds it in the server log
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `hsm_unavailable` or `hsm_timeout` (the token did not answer within the deadline)
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

pub fn parse_random(body: RandomBody) -> Result<RandomRequest, ApiError> {
    let request = match body {
        RandomBody::Bytes(RandomBytesBody { bytes }) => {
            RandomRequest::bytes(usize::try_from(bytes).unwrap_or(usize::MAX))
        }
        RandomBody::Formatted(RandomFormatBody { format, length }) => {
            let length = length.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            RandomRequest::formatted(format.key_format(), length)
        }
    };
    Ok(request?)
}

fn random_response(random: RandomMaterial) -> RandomResponse {
    // `present` hands back a zeroizing string; the response's copy lives only until it is sent,
    // as a managed key's plaintext does.
    let shown = present(random.format, &random.material);
    RandomResponse {
        plaintext: SecretText::from(shown.as_str().to_owned()),
        format: random.format.as_str().to_owned(),
    }
}

/// Random bytes from the token.
///
/// `{"bytes": n}` (1 to 1024) gives raw bytes as standard base64; `{"format", "length"?}` gives
/// material in a managed-key format, with the same lengths and defaults as a managed key. The
/// bytes come from the token's RNG (`C_GenerateRandom`); nothing is stored or logged.
#[utoipa::path(post, path = "/v1/random", tag = "crypto",
    security(("bearer" = [])),
    request_body = RandomBody,
    responses(
        (status = 200, description = "The random material", body = RandomResponse),
        RandomErrorResponses,
    ))]
pub(super) async fn random(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RandomBody>,
) -> Result<Json<RandomResponse>, ApiError> {
    caller.require(Scope::Random)?;
    let request = parse_random(body)?;
    let material = single(state.broker.random(vec![request]).await?)?;
    state
        .broker
        .count(caller.client_id, Operation::Random, 1, unix_now());
    Ok(Json(random_response(material)))
}

/// Random bytes from the token, in a batch (one token call for the whole batch).
#[utoipa::path(post, path = "/v1/random/batch", tag = "crypto",
    security(("bearer" = [])),
    request_body = RandomBatchBody,
    responses(
        (status = 200, description = "One result or error per item, in order", body = RandomBatchResponse),
        RandomErrorResponses,
    ))]
pub(super) async fn random_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RandomBatchBody>,
) -> Result<Json<RandomBatchResponse>, ApiError> {
    caller.require(Scope::Random)?;
    check_batch_size(&state, &body.items)?;
    let items = run_batch(
        body.items,
        parse_random,
        |reqs| state.broker.random(reqs),
        random_response,
    )
    .await?;
    count_batch(&state, &caller, Operation::Random, &items);
    Ok(Json(RandomBatchResponse { items }))
}
