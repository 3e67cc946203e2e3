//! Schema pieces the derive cannot say: the encryption context's limits, the exact patterns of
//! base64 key material, secrets and blobs, names, scope words and scope lists, address lists,
//! and the per-format lengths of managed keys and random material. Each states a rule the
//! broker enforces elsewhere, from the same constants where there are constants, and the unit
//! tests below hold each pattern to the parser it describes, so that the published document
//! and the server cannot drift apart.

use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    Array, ArrayBuilder, Object, ObjectBuilder, Schema, SchemaType, Type,
};

use super::ContextMap;
use crate::crypto::formats::KeyFormat;

impl utoipa::PartialSchema for ContextMap {
    fn schema() -> RefOr<Schema> {
        use crate::crypto::{MAX_CONTEXT_ENTRIES, MAX_CONTEXT_FIELD_LEN};
        use utoipa::openapi::schema::AdditionalProperties;
        let text = |min: usize| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length((min > 0).then_some(min))
                .max_length(Some(MAX_CONTEXT_FIELD_LEN))
                .pattern(Some(NO_NUL_PATTERN))
        };
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A string map bound into the AAD; the same map must be given to open what it \
                 sealed. Entry order does not matter (keys are sorted before binding).",
            ))
            .max_properties(Some(MAX_CONTEXT_ENTRIES))
            .property_names(Some(text(1)))
            .additional_properties(Some(AdditionalProperties::RefOr(text(0).build().into())))
            .examples([serde_json::json!({"tenant": "acme", "purpose": "invoices"})])
            .into()
    }
}

impl ToSchema for ContextMap {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("EncryptionContext")
    }
}

/// A pattern for exactly the base64 texts of `min..=max` bytes that the `base64` crate's
/// decoders accept: the given alphabet (standard `A-Za-z0-9+/` or URL-safe `A-Za-z0-9_-`),
/// with or without padding, and no stray bits in the last character (the crate refuses them).
/// One alternative per length modulo 3: full groups, then a 2- or 3-character tail.
pub(super) fn base64_pattern(alphabet: &str, padded: bool, min: usize, max: usize) -> String {
    let symbol = format!("[{alphabet}]");
    let (pad1, pad2) = if padded { ("==", "=") } else { ("", "") };
    let mut alternatives = Vec::new();
    for (rest, tail) in [
        (0, String::new()),
        (1, format!("{symbol}[AQgw]{pad1}")),
        (2, format!("{symbol}{{2}}[AEIMQUYcgkosw048]{pad2}")),
    ] {
        // Lengths 3g + rest within min..=max.
        let first = min.saturating_sub(rest).div_ceil(3);
        let Some(last) = max.checked_sub(rest).map(|n| n / 3) else {
            continue;
        };
        if first > last || 3 * first + rest < min {
            continue;
        }
        alternatives.push(format!("(?:{symbol}{{4}}){{{first},{last}}}{tail}"));
    }
    format!("^(?:{})$", alternatives.join("|"))
}

const STANDARD_ALPHABET: &str = "A-Za-z0-9+/";
const URL_SAFE_ALPHABET: &str = "A-Za-z0-9_-";

/// The schema of `WrapBody.plaintext`: 16 to 64 bytes of standard padded base64.
pub(super) fn wrappable_base64() -> Object {
    use crate::crypto::{MAX_WRAP_LEN, MIN_WRAP_LEN};
    text_matching(
        &base64_pattern(STANDARD_ALPHABET, true, MIN_WRAP_LEN, MAX_WRAP_LEN),
        "16 to 64 bytes of key material, standard base64 with padding.",
    )
}

/// The schema of `PutSecretBody.value`: up to 64 KiB of standard padded base64.
pub(super) fn secret_value() -> Object {
    text_matching(
        &base64_pattern(STANDARD_ALPHABET, true, 0, crate::broker::MAX_SECRET_LEN),
        "The value, standard base64 with padding, at most 64 KiB decoded.",
    )
}

/// The schema of `BlobBody.wrapped`: what `WrappedBlob::parse` reads, `kb:v1:`, a master-key
/// version (digits without a leading zero; nine at most here, which every real version fits)
/// and the unpadded base64url of the payload (IV, 16 to 64 bytes of key, tag).
pub(super) fn blob() -> Object {
    let (min, max) = crate::crypto::BLOB_PAYLOAD_LEN;
    let payload = base64_pattern(URL_SAFE_ALPHABET, false, min, max);
    let payload = payload.trim_start_matches('^');
    text_matching(
        &format!("^kb:v1:[1-9][0-9]{{0,8}}:{payload}"),
        "A blob from `datakey`, `wrap` or `rewrap`: `kb:v1:<mk_version>:<base64url payload>`.",
    )
}

/// A managed key's or a secret's name, as `check_name` allows.
pub(super) const ITEM_NAME_PATTERN: &str = "^[A-Za-z0-9._/-]{1,200}$";

/// Text without NUL characters (Postgres text cannot hold them), as a schema pattern.
pub(super) const NO_NUL_PATTERN: &str = "^[^\\u0000]*$";

fn text_matching(pattern: &str, description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .build()
}

/// Every word a scope list may hold: each scope, and the families `keys:*` and `secrets:*`.
pub(super) fn scope_words() -> Vec<&'static str> {
    let mut words: Vec<&str> = crate::auth::Scope::ALL.iter().map(|s| s.as_str()).collect();
    words.extend(["keys:*", "secrets:*"]);
    words
}

/// A `scope` parameter (RFC 6749 §3.3): scope words, each once or more, separated by single
/// spaces.
pub(super) fn scope_sentence_pattern() -> String {
    let words: Vec<String> = scope_words()
        .iter()
        .map(|w| w.replace('*', "\\*"))
        .collect();
    let word = format!("(?:{})", words.join("|"));
    format!("^{word}(?: {word})*$")
}

/// A schema written as JSON, for the shapes the builders make awkward (`oneOf` of objects).
/// The JSON is a constant of ours; should it ever not parse, the schema says "any value"
/// rather than take the document down (a unit test parses every one).
pub(super) fn from_json(value: Value) -> RefOr<Schema> {
    serde_json::from_value(value).unwrap_or_else(|_| RefOr::T(Schema::default()))
}

/// The schema of a client's `scopes`: at least one, each a scope word.
pub(super) fn scope_list() -> Array {
    scopes(false)
}

/// [`scope_list`], or `null` for "unchanged".
pub(super) fn scope_list_or_null() -> Array {
    scopes(true)
}

fn scopes(nullable: bool) -> Array {
    array(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(scope_words())),
        (Some(1), None),
        nullable,
        "At least one of `datakey`, `wrap`, `unwrap`, `rewrap`, `random`, `keys:create`, \
         `keys:read`, `keys:rotate`, `keys:manage`, `secrets:read`, `secrets:write`, `admin`, \
         or the families `keys:*`, `secrets:*`.",
    )
}

/// The schema of a list of addresses or networks (`10.0.0.0/8`, `::1`): the pattern admits
/// every address the broker parses, which also checks that it is one (422 otherwise).
pub(super) fn network_list(nullable: bool, description: &str) -> Array {
    array(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9A-Fa-f.:]{2,45}(/[0-9]+)?$")),
        (None, None),
        nullable,
        description,
    )
}

fn array(
    items: ObjectBuilder,
    (min_items, max_items): (Option<usize>, Option<usize>),
    nullable: bool,
    description: &str,
) -> Array {
    let types = if nullable {
        SchemaType::Array(vec![Type::Array, Type::Null])
    } else {
        SchemaType::Type(Type::Array)
    };
    ArrayBuilder::new()
        .schema_type(types)
        .items(items)
        .min_items(min_items)
        .max_items(max_items)
        .description(Some(description))
        .build()
}

/// A client's display name: 1 to 200 characters, not only ASCII spaces, no NUL.
pub(super) fn client_name() -> Object {
    name_text(false)
}

/// [`client_name`], or `null` for "unchanged".
pub(super) fn client_name_or_null() -> Object {
    name_text(true)
}

fn name_text(nullable: bool) -> Object {
    let types = if nullable {
        SchemaType::Array(vec![Type::String, Type::Null])
    } else {
        SchemaType::Type(Type::String)
    };
    ObjectBuilder::new()
        .schema_type(types)
        .min_length(Some(1))
        .max_length(Some(200))
        .pattern(Some(CLIENT_NAME_PATTERN))
        .description(Some(
            "Display name: 1 to 200 characters, not only spaces (leading and trailing ASCII \
             whitespace is dropped).",
        ))
        .build()
}

/// Something besides ASCII whitespace, and no NUL anywhere (`ClientSpec::new` trims ASCII
/// whitespace; Postgres text cannot hold NUL).
const CLIENT_NAME_PATTERN: &str = "^[^\\u0000]*[^\\u0000\\t\\n\\f\\r ][^\\u0000]*$";

/// Makes the `length` of an object schema depend on its `format`, as
/// [`KeyFormat::resolve_length`] does: one `oneOf` branch per group of format names, each with
/// that format's range. `groups` names the API's format words for each key format.
pub(super) fn lengths_by_format(schema: &mut Value, groups: &[(Vec<&str>, KeyFormat)]) {
    let branches: Vec<Value> = groups
        .iter()
        .map(|(names, format)| {
            let (min, _, max) = format.lengths();
            json!({
                "properties": {
                    "format": {"enum": names},
                    "length": {"type": ["integer", "null"], "minimum": min, "maximum": max},
                },
            })
        })
        .collect();
    schema["oneOf"] = Value::Array(branches);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use super::*;

    fn matches(pattern: &str, text: &str) -> bool {
        regex::Regex::new(pattern).unwrap().is_match(text)
    }

    #[test]
    fn base64_patterns_admit_exactly_the_lengths_the_decoder_takes() {
        let wrap = base64_pattern(STANDARD_ALPHABET, true, 16, 64);
        for n in 0..=70 {
            let text = STANDARD.encode(vec![0xa5u8; n]);
            assert_eq!(
                matches(&wrap, &text),
                (16..=64).contains(&n),
                "{n} bytes: {text}"
            );
        }
        let payload = base64_pattern(URL_SAFE_ALPHABET, false, 44, 92);
        for n in 40..=96 {
            let text = URL_SAFE_NO_PAD.encode(vec![0xfbu8; n]);
            assert_eq!(
                matches(&payload, &text),
                (44..=92).contains(&n),
                "{n} bytes"
            );
        }
        // The secret's pattern repeats a group up to 21845 times: over the default size limit.
        let secret = regex::RegexBuilder::new(&base64_pattern(STANDARD_ALPHABET, true, 0, 65_536))
            .size_limit(1 << 30)
            .build()
            .unwrap();
        for n in [0, 1, 2, 3, 65_534, 65_535, 65_536] {
            assert!(secret.is_match(&STANDARD.encode(vec![7u8; n])), "{n}");
        }
        assert!(!secret.is_match(&STANDARD.encode(vec![7u8; 65_537])));
    }

    #[test]
    fn base64_patterns_refuse_what_the_decoder_refuses() {
        let wrap = base64_pattern(STANDARD_ALPHABET, true, 16, 64);
        let good = STANDARD.encode([1u8; 16]); // 22 symbols and `==`
        assert!(matches(&wrap, &good));
        // Stray bits in the last symbol, a missing pad, the URL-safe alphabet, a newline.
        let stray = format!("{}B==", &good[..21]);
        assert!(STANDARD.decode(&stray).is_err());
        for bad in [
            stray,
            good.trim_end_matches('=').to_owned(),
            good.replace('A', "-"),
            format!("{good}\n"),
        ] {
            assert!(!matches(&wrap, &bad), "{bad:?}");
        }
    }

    #[test]
    fn the_blob_pattern_admits_real_blobs_and_nothing_the_parser_refuses() {
        let pattern = blob().pattern.unwrap();
        let payload = URL_SAFE_NO_PAD.encode([3u8; 12 + 32 + 16]);
        let blob = format!("kb:v1:7:{payload}");
        assert!(crate::crypto::WrappedBlob::parse(&blob).is_ok());
        assert!(matches(&pattern, &blob));
        for bad in [
            format!("kb:v1:07:{payload}"),
            format!("kb:v2:7:{payload}"),
            format!("kb:v1:0:{payload}"),
            format!("kb:v1:7:{payload}="),
            "kb:v1:7:AAAA".to_owned(),
        ] {
            assert!(!matches(&pattern, &bad), "{bad}");
            assert!(crate::crypto::WrappedBlob::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_scopes_and_contexts_follow_the_server() {
        let name = client_name().pattern.unwrap();
        for (text, ok) in [
            ("a", true),
            (" a ", true),
            ("\u{a0}", true),
            ("  ", false),
            ("\t\n", false),
            ("a\0b", false),
        ] {
            assert_eq!(matches(&name, text), ok, "{text:?}");
        }
        let scope = scope_sentence_pattern();
        for (text, ok) in [
            ("datakey", true),
            ("datakey keys:*", true),
            ("", false),
            ("datakey  wrap", false),
            ("keys:x", false),
            (" datakey", false),
        ] {
            assert_eq!(matches(&scope, text), ok, "{text:?}");
        }
        assert!(matches(NO_NUL_PATTERN, "text"));
        assert!(!matches(NO_NUL_PATTERN, "te\0xt"));
        assert!(matches(ITEM_NAME_PATTERN, "db/password-1.v2"));
        assert!(!matches(ITEM_NAME_PATTERN, "a b"));
    }

    #[test]
    fn every_schema_written_as_json_parses() {
        use utoipa::PartialSchema;
        let token_form = serde_json::to_value(crate::api::oauth::TokenForm::schema()).unwrap();
        assert_eq!(
            token_form["oneOf"].as_array().map(Vec::len),
            Some(3),
            "{token_form}"
        );
    }
}
