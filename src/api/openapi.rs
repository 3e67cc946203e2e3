//! The served OpenAPI document, which is the API's contract. It is what the handlers and wire
//! types declare (utoipa), completed here with what no single handler can say: the refusals of
//! the layers in front of every operation (blocked and rate-limited sources, the bearer check,
//! body parsing, parameters that do not parse), the configured batch limit, rules that span
//! several declarations (a key's length by its format, names, the true bounds of unsigned
//! integers, batch items checked one by one) and the links from each create operation to the
//! operations that take its id or name. `scripts/contract.sh` holds the server to it.

use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use super::schema::{ITEM_NAME_PATTERN, lengths_by_format};
use super::{
    ErrorBody, ErrorDetail, admin, audit, crypto, custody, keys, metrics, oauth, operations,
    random, secrets, security, usage,
};

/// What the document says that depends on the configuration.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    /// The most items a batch request may carry (`KEYBROKER_MAX_BATCH`).
    pub max_batch: usize,
}

/// The whole document, as served at `/openapi.json`.
pub fn document(limits: DocumentLimits) -> Value {
    let mut api = ApiDoc::openapi();
    api.merge(<super::console::ConsoleDoc as utoipa::OpenApi>::openapi());
    let mut doc = serde_json::to_value(api).unwrap_or_else(|_| json!({}));
    set_format_lengths(&mut doc);
    set_item_name_patterns(&mut doc);
    batch_schemas(&mut doc, limits.max_batch);
    unsigned_integer_bounds(&mut doc);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for operation in item.values_mut() {
                if let Some(operation) = operation.as_object_mut() {
                    complete_responses(path, operation);
                }
            }
        }
    }
    add_links(&mut doc);
    doc
}

/// The refusals every operation can meet before or around its handler, each added to the
/// operation's responses (or to the description of a status it lists already).
fn complete_responses(path: &str, operation: &mut Map<String, Value>) {
    let probe = matches!(path, "/healthz" | "/readyz");
    // The console's pages: behind the same source limits (answered in JSON by that layer), but
    // signed in by cookie, and answering their own refusals in HTML (listed by each page).
    let console = path.starts_with("/console");
    let bearer = !console && operation.contains_key("security");
    let body_type = operation
        .get("requestBody")
        .and_then(|b| b.get("content"))
        .and_then(Value::as_object)
        .and_then(|c| c.keys().next().cloned());
    let parameters: Vec<(String, String)> = operation
        .get("parameters")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some((
                        p.get("in")?.as_str()?.to_owned(),
                        p.get("name")?.as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if !probe {
        add_error(
            responses,
            "403",
            "`source_blocked`: an officer blocked this source address (a lockdown)",
        );
        add_error(
            responses,
            "429",
            "`rate_limited` (this source's rate limit) or `source_blocked` (repeated violations); \
             `Retry-After` says when to try again",
        );
        retry_after_header(responses);
    }
    if bearer {
        add_error(
            responses,
            "401",
            "`invalid_token`: missing, expired, revoked or otherwise bad access token",
        );
        add_error(
            responses,
            "403",
            "`insufficient_scope`, `ip_not_allowed` or `client_disabled`",
        );
        add_error(
            responses,
            "429",
            "`rate_limited` (this client's rate limit)",
        );
        add_error(
            responses,
            "503",
            "`database_unavailable` (the client could not be checked)",
        );
    }
    // A form endpoint answers a bad form itself, in its own shape (the token endpoint's is
    // OAuth's), and lists that answer.
    if body_type.as_deref() == Some("application/json") {
        add_error(responses, "400", "`invalid_json`: the body is not JSON");
        add_error(
            responses,
            "413",
            "`payload_too_large`: the body is over the configured limit",
        );
        add_error(
            responses,
            "415",
            "`unsupported_media_type`: the body is not sent as `application/json`",
        );
        add_error(
            responses,
            "422",
            "`invalid_request`: JSON that does not fit the request's schema",
        );
    }
    if !console && parameters.iter().any(|(place, _)| place == "path") {
        add_error(
            responses,
            "422",
            "`invalid_request`: a path segment that does not parse",
        );
    }
    if !console && parameters.iter().any(|(place, _)| place == "query") {
        add_error(
            responses,
            "422",
            "`invalid_request`: a query string that does not fit the parameters",
        );
    }
}

/// Lists `status` with the error shape, or adds `codes` to the description of the status
/// listed already. A status listed with another shape (the token endpoint's OAuth errors)
/// keeps it and gains ours as an alternative: the layers in front of a handler answer in ours.
fn add_error(responses: &mut Map<String, Value>, status: &str, codes: &str) {
    let ours = json!({"$ref": "#/components/schemas/ErrorBody"});
    let Some(existing) = responses.get_mut(status) else {
        responses.insert(
            status.to_owned(),
            json!({
                "description": codes,
                "content": {"application/json": {"schema": ours}},
            }),
        );
        return;
    };
    if let Some(description) = existing.get_mut("description") {
        let text = description.as_str().unwrap_or_default();
        let code = codes.split('`').nth(1).unwrap_or(codes);
        if !text.contains(code) {
            *description = Value::String(format!("{text}; {codes}"));
        }
    }
    let schema = existing
        .get_mut("content")
        .and_then(|c| c.get_mut("application/json"))
        .and_then(|m| m.get_mut("schema"));
    match schema {
        Some(schema) if *schema == ours => {}
        Some(schema) => {
            let mut alternatives = match schema.get("oneOf").and_then(Value::as_array) {
                Some(list) => list.clone(),
                None => vec![schema.clone()],
            };
            if !alternatives.contains(&ours) {
                alternatives.push(ours);
            }
            *schema = json!({ "oneOf": alternatives });
        }
        // No JSON answer listed yet: ours joins whatever else the status answers with (the
        // console's HTML pages).
        None => match existing.get_mut("content").and_then(Value::as_object_mut) {
            Some(content) => {
                content.insert("application/json".to_owned(), json!({ "schema": ours }));
            }
            None => existing["content"] = json!({"application/json": {"schema": ours}}),
        },
    }
}

fn retry_after_header(responses: &mut Map<String, Value>) {
    if let Some(response) = responses.get_mut("429").and_then(Value::as_object_mut) {
        let headers = response.entry("headers").or_insert_with(|| json!({}));
        if let Some(headers) = headers.as_object_mut() {
            headers.entry("Retry-After").or_insert_with(|| {
                json!({
                    "description": "Seconds until a retry may succeed",
                    "schema": {"type": "integer", "minimum": 0},
                })
            });
        }
    }
}

/// Managed-key and secret names: the pattern `check_name` enforces, on the key's body and on
/// every `{name}` path segment.
fn set_item_name_patterns(doc: &mut Value) {
    if let Some(name) = doc.pointer_mut("/components/schemas/CreateKeyBody/properties/name") {
        name["pattern"] = json!(ITEM_NAME_PATTERN);
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for operation in paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
    {
        let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for parameter in parameters {
            if parameter["in"] == "path" && parameter["name"] == "name" {
                parameter["schema"]["pattern"] = json!(ITEM_NAME_PATTERN);
            }
        }
    }
}

/// utoipa writes `u32` and `u64` as `int32` and `int64` with `minimum: 0`, whose implied upper
/// bounds (2^31 - 1, 2^63 - 1) are not the server's: it takes every value of the Rust type. So
/// such a schema states the type's own maximum instead (where none is stated) and drops the
/// format.
fn unsigned_integer_bounds(value: &mut Value) {
    match value {
        Value::Object(schema) => {
            let unsigned = schema
                .get("minimum")
                .and_then(Value::as_i64)
                .is_some_and(|m| m >= 0);
            let format = schema
                .get("format")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let max = match format.as_deref() {
                Some("int32") if unsigned => Some(json!(u32::MAX)),
                Some("int64") if unsigned => Some(json!(u64::MAX)),
                _ => None,
            };
            if let Some(max) = max {
                schema.remove("format");
                schema.entry("maximum").or_insert(max);
            }
            schema.values_mut().for_each(unsigned_integer_bounds);
        }
        Value::Array(items) => items.iter_mut().for_each(unsigned_integer_bounds),
        _ => {}
    }
}

/// Every batch request: 1 to the configured maximum items. A batch's items are checked one by
/// one: one whose values break its single call's rules (lengths, patterns, ranges, context
/// limits, a blob that does not parse) gets its error in place and the others go ahead. What
/// refuses the whole request is only its structure: not an object, a field of the wrong type,
/// an unknown or missing field. So each batch schema's items are its single call's schema with
/// the value rules taken out, and say so.
fn batch_schemas(doc: &mut Value, max_batch: usize) {
    let Some(schemas) = doc.pointer("/components/schemas").cloned() else {
        return;
    };
    let Some(batch_schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for (name, schema) in batch_schemas.iter_mut() {
        if !name.ends_with("BatchBody") {
            continue;
        }
        let Some(list) = schema.pointer_mut("/properties/items") else {
            continue;
        };
        list["minItems"] = json!(1);
        list["maxItems"] = json!(max_batch);
        list["description"] = json!(format!("1 to {max_batch} requests"));
        let Some(items) = list.get_mut("items") else {
            continue;
        };
        let single = items
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit('/').next())
            .map(str::to_owned);
        let mut structural = items.clone();
        resolve_and_strip(&mut structural, &schemas, 0);
        if let (Some(single), Some(fields)) = (single, structural.as_object_mut()) {
            fields.insert(
                "description".to_owned(),
                json!(format!(
                    "An item as `{single}` has it. An item whose values break that schema's \
                     rules (lengths, patterns, ranges, context limits) gets its error in place \
                     in the response; the others go ahead."
                )),
            );
        }
        *items = structural;
    }
}

/// The value rules a batch item is checked against one by one (see `batch_schemas`).
const VALUE_RULES: [&str; 9] = [
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "maxProperties",
    "propertyNames",
];

/// Inlines `$ref`s (schemas of ours, never recursive; the depth bound only guards the loop)
/// and removes [`VALUE_RULES`].
fn resolve_and_strip(value: &mut Value, schemas: &Value, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Some(target) = value
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .and_then(|name| schemas.get(name))
    {
        *value = target.clone();
    }
    match value {
        Value::Object(schema) => {
            // An unsigned integer keeps its type's bounds: serde refuses a negative or too
            // large number for the whole request, before any item is looked at.
            let is_integer = match schema.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            let unsigned = is_integer
                && schema
                    .get("minimum")
                    .and_then(Value::as_i64)
                    .is_some_and(|m| m >= 0);
            let type_max = match schema.get("format").and_then(Value::as_str) {
                Some("int32") => json!(u32::MAX),
                _ => json!(u64::MAX),
            };
            for rule in VALUE_RULES {
                schema.remove(rule);
            }
            if unsigned {
                schema.remove("format");
                schema.insert("minimum".to_owned(), json!(0));
                schema.insert("maximum".to_owned(), type_max);
            }
            for child in schema.values_mut() {
                resolve_and_strip(child, schemas, depth + 1);
            }
        }
        Value::Array(items) => {
            for child in items {
                resolve_and_strip(child, schemas, depth + 1);
            }
        }
        _ => {}
    }
}

/// The `length` of a managed key and of formatted random material, by format.
fn set_format_lengths(doc: &mut Value) {
    use crate::crypto::formats::KeyFormat;
    let key_formats: Vec<_> = KeyFormat::ALL
        .iter()
        .map(|f| (vec![f.as_str()], *f))
        .collect();
    if let Some(schema) = doc.pointer_mut("/components/schemas/CreateKeyBody") {
        lengths_by_format(schema, &key_formats);
    }
    // `base64` is another name for `raw` there.
    let random_formats: Vec<_> = KeyFormat::ALL
        .iter()
        .map(|f| match f {
            KeyFormat::Raw => (vec!["raw", "base64"], *f),
            _ => (vec![f.as_str()], *f),
        })
        .collect();
    if let Some(schema) = doc.pointer_mut("/components/schemas/RandomFormatBody") {
        lengths_by_format(schema, &random_formats);
    }
}

/// OpenAPI links: from each create operation's response to the operations that take what it
/// created, so a client (or a stateful fuzzer) can follow them.
fn add_links(doc: &mut Value) {
    let key_ops = [
        ("GetKey", "get", "/v1/keys/{id}"),
        ("DeleteKey", "delete", "/v1/keys/{id}"),
        ("ReadKey", "post", "/v1/keys/{id}/plaintext"),
        ("RotateKey", "post", "/v1/keys/{id}/rotate"),
        ("RefreshKey", "post", "/v1/keys/{id}/refresh"),
        ("DisableKey", "post", "/v1/keys/{id}/disable"),
        ("EnableKey", "post", "/v1/keys/{id}/enable"),
        ("CancelKeyDeletion", "post", "/v1/keys/{id}/cancel-deletion"),
    ];
    let secret_ops = [
        ("GetSecret", "get", "/v1/secrets/{name}"),
        ("DeleteSecret", "delete", "/v1/secrets/{name}"),
        (
            "CancelSecretDeletion",
            "post",
            "/v1/secrets/{name}/cancel-deletion",
        ),
    ];
    let client_ops = [
        ("GetClient", "get", "/v1/admin/clients/{id}"),
        ("UpdateClient", "patch", "/v1/admin/clients/{id}"),
        ("DeleteClient", "delete", "/v1/admin/clients/{id}"),
        ("DisableClient", "post", "/v1/admin/clients/{id}/disable"),
        ("EnableClient", "post", "/v1/admin/clients/{id}/enable"),
        ("LockdownClient", "post", "/v1/admin/clients/{id}/lockdown"),
        ("UnblockClient", "post", "/v1/admin/clients/{id}/unblock"),
    ];
    link(
        doc,
        ("/v1/keys", "post", "201"),
        &key_ops,
        "id",
        "$response.body#/key/id",
    );
    // Reading the key just made: its current version, under the context it was made with (a
    // version it does not have would be 404 `key_version_not_found`, not a lost key).
    set_link_body(
        doc,
        ("/v1/keys", "post", "201"),
        "ReadKey",
        json!({
            "context": "$request.body#/context",
            "version": "$response.body#/key/current_version",
        }),
    );
    // A key read leads to the same operations (but its material: the read has no context).
    let key_ops_without_read: Vec<_> = key_ops
        .iter()
        .copied()
        .filter(|(name, ..)| *name != "ReadKey")
        .collect();
    link(
        doc,
        ("/v1/keys/{id}", "get", "200"),
        &key_ops_without_read,
        "id",
        "$response.body#/key/id",
    );
    link(
        doc,
        ("/v1/secrets/{name}", "put", "200"),
        &secret_ops,
        "name",
        "$response.body#/name",
    );
    link(
        doc,
        ("/v1/admin/clients", "post", "201"),
        &client_ops,
        "id",
        "$response.body#/client/client_id",
    );
    link(
        doc,
        ("/v1/admin/master-keys/rotate", "post", "200"),
        &[(
            "RetireMasterKey",
            "post",
            "/v1/admin/master-keys/{version}/retire",
        )],
        "version",
        "$response.body#/master_keys/0/version",
    );
}

fn link(
    doc: &mut Value,
    (path, method, status): (&str, &str, &str),
    targets: &[(&str, &str, &str)],
    parameter: &str,
    expression: &str,
) {
    let ids: Vec<(String, Value)> = targets
        .iter()
        .filter_map(|(name, target_method, target_path)| {
            let id = operation_id(doc, target_path, target_method)?;
            Some((
                (*name).to_owned(),
                json!({"operationId": id, "parameters": {parameter: expression}}),
            ))
        })
        .collect();
    let pointer = format!(
        "/paths/{}/{method}/responses/{status}",
        path.replace('~', "~0").replace('/', "~1")
    );
    let Some(response) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) else {
        return;
    };
    let links = response.entry("links").or_insert_with(|| json!({}));
    if let Some(links) = links.as_object_mut() {
        links.extend(ids);
    }
}

/// Gives the link `name` of a response a request body (runtime expressions inside it).
fn set_link_body(
    doc: &mut Value,
    (path, method, status): (&str, &str, &str),
    name: &str,
    body: Value,
) {
    let pointer = format!(
        "/paths/{}/{method}/responses/{status}/links/{name}",
        path.replace('~', "~0").replace('/', "~1")
    );
    if let Some(link) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) {
        link.insert("requestBody".to_owned(), body);
    }
}

fn operation_id(doc: &Value, path: &str, method: &str) -> Option<String> {
    doc.get("paths")?
        .get(path)?
        .get(method)?
        .get("operationId")?
        .as_str()
        .map(str::to_owned)
}

/// The OpenAPI document of every endpoint, request, response and error shape.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keybroker",
        description = "HSM-backed key broker: data keys generated, wrapped and unwrapped inside a PKCS#11 token. Every error is `{\"error\": {\"code\", \"message\", \"request_id\"}}`."
    ),
    paths(
        crypto::datakey, crypto::datakey_batch, crypto::wrap, crypto::wrap_batch, crypto::unwrap,
        crypto::unwrap_batch, crypto::rewrap, crypto::rewrap_batch,
        random::random, random::random_batch,
        oauth::oauth_token, oauth::oauth_introspect, oauth::oauth_revoke, oauth::jwks,
        admin::register_client, admin::list_clients, admin::get_client, admin::update_client,
        admin::disable_client, admin::enable_client, admin::delete_client,
        audit::audit_events, audit::audit_verify, security::lockdown_client, security::unblock_client,
        security::get_security_settings, security::put_security_settings,
        keys::create_key, keys::list_keys, keys::get_key, keys::read_key, keys::rotate_key,
        keys::refresh_key, keys::disable_key, keys::enable_key, keys::delete_key,
        keys::cancel_key_deletion, secrets::put_secret, secrets::get_secret, secrets::delete_secret,
        secrets::cancel_secret_deletion, usage::own_usage, usage::admin_usage, usage::keys_due,
        custody::list_master_keys, custody::rotate_master_key, custody::start_rewrap,
        custody::get_rewrap, custody::retire_master_key, custody::rotate_signing_key,
        metrics::metrics, operations::healthz, operations::readyz, operations::openapi
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "crypto", description = "Stateless data-key operations"),
        (name = "oauth", description = "Client credentials, introspection, revocation, JWKS"),
        (name = "admin", description = "Client registration and lockdown (scope `admin`)"),
        (name = "keys", description = "Managed keys kept sealed in Postgres, and usage"),
        (name = "secrets", description = "Secrets under envelope encryption"),
        (name = "custody", description = "Master-key and token-signing key rotation, rewrap, retirement (scope `admin`)"),
        (name = "operations", description = "Health, readiness, this document"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the protected paths refer to.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An ES256 access token from POST /v1/oauth/token"))
                    .build(),
            ),
        );
    }
}
