//! `api` is the only module that knows HTTP: the axum router, thin handlers that parse requests
//! into validated types, the one [`ApiError`] that picks every status and error code, and the
//! OpenAPI document. Business logic lives in `broker`: handlers call the broker, and `auth` for
//! the caller and the client registry; they never reach the database or the token themselves.
//! One file per resource (`crypto`, `random`, `keys`, `secrets`, `usage`, `oauth`, `admin`,
//! `security`, `audit`, `custody`, `metrics`, `operations`, `console`), beside `router`,
//! `error`, `extract`, `json_body`, `secret_text`, the `limits` and `request_log` layers and the
//! document (`openapi`, `schema`).

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::broker::Broker;

pub mod admin;
mod audit;
mod console;
mod crypto;
mod custody;
mod error;
mod extract;
mod json_body;
pub mod keys;
mod limiter;
pub mod limits;
mod metrics;
pub mod oauth;
mod openapi;
mod operations;
pub mod random;
mod request_log;
mod router;
mod schema;
mod secret_text;
pub mod secrets;
pub mod security;
pub mod usage;

pub use crypto::{
    BatchItem, BatchRequestItem, BlobBatchBody, BlobBody, ContextMap, DataKeyBatchBody,
    DataKeyBatchResponse, DataKeyBody, DataKeyResponse, UnwrapBatchResponse, UnwrapResponse,
    WrapBatchBody, WrapBody, WrappedBatchResponse, WrappedResponse, parse_blob, parse_context,
    parse_datakey, parse_wrap,
};
pub use error::{ApiError, ErrorBody, ErrorDetail, error_chain};
pub use extract::ApiJson;
pub use openapi::ApiDoc;
pub use operations::HealthResponse;
pub use request_log::RequestLog;
pub use router::router;
pub use secret_text::SecretText;

use crypto::{check_batch_size, count_batch, run_batch, single};
use extract::{ApiPath, Source, admit, mismatch_message, request_source};
use router::REQUEST_ID;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The crypto use cases.
    pub broker: Arc<Broker>,
    /// Clients and tokens.
    pub auth: Arc<Authenticator>,
    /// Where each request's log row goes.
    pub request_log: RequestLog,
    /// Rate limits and blocked sources.
    pub limiter: Arc<limits::Limiter>,
}
