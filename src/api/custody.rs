//! The custody administration API (scope `admin`): master-key versions, their rotation, the
//! rewrap job and retirement; token-signing key rotation. Destroying a master key is an
//! officer's command only (`keybroker hsm destroy-master`), never an API call.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::AdminErrorResponses;
use super::{ApiError, ApiPath, AppState, ErrorBody};
use crate::auth::{Caller, Scope};
use crate::broker::{MasterKeyView, RewrapJob, RewrapJobState};
use crate::crypto::MasterKeyVersion;

/// One master-key version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MasterKeyBody {
    /// The version (`keybroker-mk-v<version>` on the token).
    pub version: u32,
    /// `pending` (a rotation under way), `active` (seals new blobs), `decrypt_only`, `retired`
    /// (no stored blob under it; may be destroyed), `destroyed`, or `unrecorded` (on the token
    /// but not in the database: `keybroker hsm init` adopts it).
    pub state: String,
    /// Whether the token holds it.
    pub on_token: bool,
    /// Seals done under it (an upper bound: brokers reserve them in blocks).
    pub seals: i64,
    /// Stored blobs (managed-key versions, secret data keys) still sealed under it.
    pub stored_blobs: i64,
    /// RFC 3339.
    pub created_at: Option<String>,
    /// RFC 3339.
    pub activated_at: Option<String>,
    /// RFC 3339.
    pub retired_at: Option<String>,
    /// RFC 3339.
    pub destroyed_at: Option<String>,
}

impl From<MasterKeyView> for MasterKeyBody {
    fn from(view: MasterKeyView) -> Self {
        match view.recorded {
            Some(row) => Self {
                version: view.version.get(),
                state: row.state.as_str().to_owned(),
                on_token: view.on_token,
                seals: row.seals,
                stored_blobs: row.stored_blobs,
                created_at: Some(row.created_at),
                activated_at: row.activated_at,
                retired_at: row.retired_at,
                destroyed_at: row.destroyed_at,
            },
            None => Self {
                version: view.version.get(),
                state: "unrecorded".to_owned(),
                on_token: view.on_token,
                seals: 0,
                stored_blobs: 0,
                created_at: None,
                activated_at: None,
                retired_at: None,
                destroyed_at: None,
            },
        }
    }
}

/// A rewrap job and its progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RewrapJobBody {
    /// Its id.
    pub id: i64,
    /// `running` or `done`.
    pub state: String,
    /// `officer`, `scheduler` or the admin client's id.
    pub started_by: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once done.
    pub finished_at: Option<String>,
    /// Stored blobs outside the active version when it started.
    pub total: i64,
    /// Blobs moved so far.
    pub rewrapped: i64,
    /// Blobs still outside the active version.
    pub remaining: i64,
}

impl From<RewrapJob> for RewrapJobBody {
    fn from(job: RewrapJob) -> Self {
        Self {
            id: job.id,
            state: job.state.as_str().to_owned(),
            started_by: job.started_by,
            started_at: job.started_at,
            finished_at: job.finished_at,
            total: job.total,
            rewrapped: job.rewrapped,
            remaining: job.remaining,
        }
    }
}

/// `GET /v1/admin/master-keys` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MasterKeysBody {
    /// Every version recorded or on the token, ascending.
    pub master_keys: Vec<MasterKeyBody>,
    /// The running rewrap job, else the latest; none if there never was one.
    pub rewrap: Option<RewrapJobBody>,
}

/// `POST /v1/admin/signing-keys/rotate` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SigningKeyRotatedBody {
    /// The new version (`keybroker-sign-v<version>` on the token).
    pub version: u32,
    /// Its `kid` in the JWKS.
    pub kid: String,
}

async fn overview(state: &AppState) -> Result<MasterKeysBody, ApiError> {
    let master_keys = state.broker.master_key_overview().await?;
    let rewrap = state.broker.rewrap_job().await?;
    Ok(MasterKeysBody {
        master_keys: master_keys.into_iter().map(Into::into).collect(),
        rewrap: rewrap.map(Into::into),
    })
}

/// Master-key versions with their state, seals and the stored blobs under each, and the rewrap
/// job's progress.
#[utoipa::path(get, path = "/v1/admin/master-keys", tag = "custody",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The versions", body = MasterKeysBody),
        AdminErrorResponses,
    ))]
pub(super) async fn list_master_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MasterKeysBody>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(overview(&state).await?))
}

/// Create master key v(N+1) on the token and make it active for new seals; older versions stay
/// decrypt-only. Racing calls make one new version; a rotation that stopped half-way is
/// finished instead. Stored blobs move with `POST /v1/admin/master-keys/rewrap`.
#[utoipa::path(post, path = "/v1/admin/master-keys/rotate", tag = "custody",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rotated; the versions after it", body = MasterKeysBody),
        AdminErrorResponses,
    ))]
pub(super) async fn rotate_master_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<MasterKeysBody>, ApiError> {
    caller.require(Scope::Admin)?;
    state.broker.rotate_master_key().await?;
    Ok(Json(overview(&state).await?))
}

/// Start moving every stored blob to the active master key (or join the job already running).
/// This broker works on it at once, every broker at each maintenance pass; progress is in
/// `GET /v1/admin/master-keys/rewrap`. Reads and unwraps keep working throughout. When nothing
/// is left outside the active version and no job runs, no job starts: the answer is 200 with
/// the latest job, already done (on a store that never had one, a job recorded as done with
/// nothing moved).
#[utoipa::path(post, path = "/v1/admin/master-keys/rewrap", tag = "custody",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Started, or already running", body = RewrapJobBody),
        (status = 200, description = "Nothing left to move: the latest job, done", body = RewrapJobBody),
        AdminErrorResponses,
    ))]
pub(super) async fn start_rewrap(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<(StatusCode, Json<RewrapJobBody>), ApiError> {
    caller.require(Scope::Admin)?;
    let (job, _) = state
        .broker
        .start_rewrap(&caller.client_id.to_string())
        .await?;
    if job.state != RewrapJobState::Running {
        return Ok((StatusCode::OK, Json(job.into())));
    }
    let broker = state.broker.clone();
    tokio::spawn(crate::audit::scope(
        crate::audit::Context::system("scheduler"),
        async move {
            if let Err(e) = broker.run_rewrap(crate::broker::REWRAP_BATCH, |_| {}).await {
                tracing::warn!(target: "keybroker::api", error = %e, "rewrap stopped; the maintenance pass goes on with it");
            }
        },
    ));
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

/// The running rewrap job, else the latest one.
#[utoipa::path(get, path = "/v1/admin/master-keys/rewrap", tag = "custody",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The job", body = RewrapJobBody),
        (status = 404, description = "`no_rewrap_job`: none was ever started", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn get_rewrap(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<RewrapJobBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let job = state
        .broker
        .rewrap_job()
        .await?
        .ok_or(ApiError::NoRewrapJob)?;
    Ok(Json(job.into()))
}

/// Retire a decrypt-only version that no stored blob references any more. It still opens
/// blobs that clients hold (so they can rewrap them) until an officer destroys it with
/// `keybroker hsm destroy-master`.
#[utoipa::path(post, path = "/v1/admin/master-keys/{version}/retire", tag = "custody",
    params(("version" = u32, Path, minimum = 1, description = "Master-key version")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Retired; the versions after it", body = MasterKeysBody),
        (status = 404, description = "`mk_version_not_found`", body = ErrorBody),
        (status = 409, description = "`mk_version_state` (not decrypt-only) or `mk_version_in_use` (stored blobs remain)", body = ErrorBody),
        AdminErrorResponses,
    ))]
pub(super) async fn retire_master_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(version): ApiPath<String>,
) -> Result<Json<MasterKeysBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let version = version
        .parse::<u32>()
        .ok()
        .and_then(MasterKeyVersion::new)
        .ok_or_else(|| ApiError::InvalidQuery("the version is a whole number from 1".to_owned()))?;
    state.broker.retire_master_key(version).await?;
    Ok(Json(overview(&state).await?))
}

/// Rotate the ES256 token-signing key: `keybroker-sign-v<N+1>` signs from now on; the previous
/// key stays in the JWKS, and its tokens stay valid, until every token it signed has expired.
#[utoipa::path(post, path = "/v1/admin/signing-keys/rotate", tag = "custody",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rotated", body = SigningKeyRotatedBody),
        AdminErrorResponses,
    ))]
pub(super) async fn rotate_signing_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SigningKeyRotatedBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let version = state
        .auth
        .rotate_signing_key(crate::auth::unix_now())
        .await?;
    let kid = state.auth.signing_kid().unwrap_or_default();
    Ok(Json(SigningKeyRotatedBody { version, kid }))
}
