//! The managed keys' wire types: requests, responses and queries, and how a key becomes its
//! body. No handler logic here.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::api::{ContextMap, SecretText};
use crate::broker::{KeyDetails, ManagedKey, Rotation};

/// `POST /v1/keys` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// Unique among your live keys: 1 to 200 letters, digits or `._-/`.
    pub name: String,
    /// `raw` (bytes, shown base64), `hex`, `uuid`, `alphanumeric` or `numeric`.
    pub format: String,
    /// In the format's unit: raw bytes 16-256 (32), hex characters 16-512 (64), alphanumeric
    /// 8-256 (32), numeric digits 4-64 (16); none for uuid.
    pub length: Option<usize>,
    /// Expiry, unix seconds (or use `ttl_days`).
    pub expires_at: Option<i64>,
    /// Expiry in days from now.
    pub ttl_days: Option<u32>,
    /// `manual` (default) or `auto`.
    pub rotation: Option<String>,
    /// Required with `auto`.
    pub rotation_period_days: Option<u32>,
    /// Bound into the key's AAD: reads must give the same map.
    pub context: Option<ContextMap>,
    /// Return the plaintext in this response (default false).
    pub return_plaintext: Option<bool>,
}

/// A managed key's metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyBody {
    /// Key id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Format.
    pub format: String,
    /// Length in the format's unit.
    pub length: usize,
    /// `active`, `disabled`, `expired`, `pending_deletion` or `destroyed`.
    pub state: String,
    /// The version reads get by default.
    pub current_version: u32,
    /// `manual` or `auto`.
    pub rotation: String,
    /// Period of `auto` rotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_days: Option<u32>,
    /// When `auto` rotation is next due (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<i64>,
    /// Expiry (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Scheduled destruction (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_due: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// When the material was erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<i64>,
}

impl From<ManagedKey> for KeyBody {
    fn from(k: ManagedKey) -> Self {
        let (rotation, period) = match k.rotation {
            Rotation::Manual => ("manual", None),
            Rotation::Auto { period_days } => ("auto", Some(period_days)),
        };
        Self {
            id: k.id,
            name: k.name,
            format: k.format.as_str().to_owned(),
            length: k.length,
            state: k.state.as_str().to_owned(),
            current_version: k.current_version,
            rotation: rotation.to_owned(),
            rotation_period_days: period,
            next_rotation_at: k.next_rotation_at,
            expires_at: k.expires_at,
            deletion_due: k.deletion_due,
            created_at: k.created_at,
            updated_at: k.updated_at,
            destroyed_at: k.destroyed_at,
        }
    }
}

/// `POST /v1/keys` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKeyBody {
    /// The key.
    pub key: KeyBody,
    /// Version 1's material, when `return_plaintext` was asked (raw: base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub plaintext: Option<SecretText>,
}

/// One version of a key (no material).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyVersionBody {
    /// Version.
    pub version: i32,
    /// Master-key version that sealed it.
    pub mk_version: i32,
    /// False once destroyed.
    pub has_material: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// One rotation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotationBody {
    /// Before.
    pub from_version: i32,
    /// After.
    pub to_version: i32,
    /// `manual` or `scheduled`.
    pub reason: String,
    /// Client id, or `scheduler`.
    pub actor: String,
    /// Unix seconds.
    pub rotated_at: i64,
}

/// `GET /v1/keys/{id}` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyDetailsBody {
    /// The key.
    pub key: KeyBody,
    /// Every version.
    pub versions: Vec<KeyVersionBody>,
    /// Every rotation, oldest first.
    pub rotations: Vec<RotationBody>,
}

impl From<KeyDetails> for KeyDetailsBody {
    fn from(d: KeyDetails) -> Self {
        Self {
            key: d.key.into(),
            versions: d
                .versions
                .into_iter()
                .map(|v| KeyVersionBody {
                    version: v.version,
                    mk_version: v.mk_version,
                    has_material: v.has_material,
                    created_at: v.created_at,
                })
                .collect(),
            rotations: d
                .rotations
                .into_iter()
                .map(|r| RotationBody {
                    from_version: r.from_version,
                    to_version: r.to_version,
                    reason: r.reason,
                    actor: r.actor,
                    rotated_at: r.rotated_at,
                })
                .collect(),
        }
    }
}

/// `GET /v1/keys` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyListBody {
    /// Keys ordered by id.
    pub items: Vec<KeyBody>,
    /// Pass as `after` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<Uuid>,
}

/// `GET /v1/keys` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyListQuery {
    /// Only keys in this state.
    #[param(nullable = false, value_type = Option<KeyStateName>, inline)]
    pub state: Option<String>,
    /// Only the key of this name.
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub name: Option<String>,
    /// Page size 1-500 (100).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    #[param(nullable = false)]
    pub after: Option<Uuid>,
}

/// The states of a managed key. Only the schema uses it; the query keeps the text.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum KeyStateName {
    /// In use.
    Active,
    /// Refused until enabled.
    Disabled,
    /// Past its expiry.
    Expired,
    /// Scheduled for destruction.
    PendingDeletion,
    /// Material erased.
    Destroyed,
}

/// `POST /v1/keys/{id}/plaintext` request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadKeyBody {
    /// The context the key was created with.
    pub context: Option<ContextMap>,
    /// A version; default the current one.
    pub version: Option<u32>,
}

/// `POST /v1/keys/{id}/plaintext` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyPlaintextBody {
    /// Key id.
    pub id: Uuid,
    /// The version read.
    pub version: u32,
    /// Format.
    pub format: String,
    /// The material (raw: base64).
    #[schema(value_type = String)]
    pub plaintext: SecretText,
}

/// `POST /v1/keys/{id}/refresh` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshKeyBody {
    /// New expiry, unix seconds.
    pub expires_at: Option<i64>,
    /// New expiry in days from now.
    pub ttl_days: Option<u32>,
    /// True to remove the expiry.
    pub never_expires: Option<bool>,
}

/// Pending window of a deletion.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeletionQuery {
    /// Days before destruction, 1 to 30 (default 7).
    #[param(nullable = false, minimum = 1, maximum = 30)]
    pub pending_window_days: Option<u32>,
}
