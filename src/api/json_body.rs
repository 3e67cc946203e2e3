//! Reading a JSON request body straight from its bytes into its type: no `serde_json::Value`
//! in between, so a plaintext in the body is copied only into the field that owns it (a
//! `SecretText`, wiped on drop). It decides the body's error codes: `invalid_json` (400) for
//! anything that is not one well-formed JSON document, `invalid_request` (422) for a document
//! of the wrong shape, said in our words (see `describe_mismatch`).

use serde::de::{DeserializeOwned, IgnoredAny};
use zeroize::Zeroizing;

use super::ApiError;
use super::extract::describe_mismatch;

/// Parses `bytes` into a `T`.
///
/// # Errors
/// [`ApiError::InvalidJson`] when the body is not well-formed JSON (wherever the fault, even
/// after a field of the wrong shape), [`ApiError::InvalidRequest`] when it is not an object or
/// does not fit `T`.
pub(super) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Well-formedness first and as a whole, as before any field is looked at. `IgnoredAny`
    // keeps nothing of what it reads.
    if serde_json::from_slice::<IgnoredAny>(bytes).is_err() {
        return Err(ApiError::InvalidJson);
    }
    // Every request body is a JSON object: serde would otherwise fill a struct from an array
    // by position, which no client means.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "the request body must be a JSON object".to_owned(),
        ));
    }
    let rewritten = integral_numbers_as_integers(bytes);
    let input = rewritten.as_deref().map_or(bytes, Vec::as_slice);
    let mut deserializer = serde_json::Deserializer::from_slice(input);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let inner = e.inner().to_string();
        let path = e.path().to_string();
        ApiError::InvalidRequest(describe_mismatch(
            object_of_unknown_field(&path, &inner),
            &inner,
            "body",
        ))
    })
}

/// Read from text, the path of an unknown or repeated field ends with the field itself; the
/// message names the field already and says where it stands, so the path is that of the object
/// holding it.
fn object_of_unknown_field<'p>(path: &'p str, inner: &str) -> &'p str {
    let Some(name) = inner
        .strip_prefix("unknown field `")
        .or_else(|| inner.strip_prefix("duplicate field `"))
        .and_then(|rest| rest.split('`').next())
    else {
        return path;
    };
    match path.strip_suffix(name) {
        Some(parent) => match parent.strip_suffix('.') {
            Some(parent) => parent,
            None if parent.is_empty() => ".",
            None => path,
        },
        None => path,
    }
}

/// JSON has one kind of number: `34.0` is the integer 34, as JSON Schema's `integer` says. serde
/// would refuse it for an integer field, so each number with a fraction or an exponent whose
/// value is integral and fits a 64-bit integer is written as that integer (a float field takes
/// it either way). Returns the rewritten body, wiped on drop, or `None` when nothing changes
/// (the common case: the body is then read where it is). `json` must be well-formed.
fn integral_numbers_as_integers(json: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut rewritten: Option<Zeroizing<Vec<u8>>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => i = after_string(json, i),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &json[start..i];
                if number.iter().any(|b| matches!(b, b'.' | b'e' | b'E'))
                    && let Some(integer) = as_integer(number)
                {
                    let out = rewritten
                        .get_or_insert_with(|| Zeroizing::new(Vec::with_capacity(json.len())));
                    out.extend_from_slice(&json[copied..start]);
                    out.extend_from_slice(integer.as_bytes());
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    if let Some(out) = rewritten.as_mut() {
        out.extend_from_slice(&json[copied..]);
    }
    rewritten
}

/// The index just after the string that opens at `start` (a `"`).
fn after_string(json: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    json.len()
}

/// The integer a JSON number with a fraction or exponent stands for, if it is one that fits
/// `u64` (non-negative) or `i64` (negative).
fn as_integer(number: &[u8]) -> Option<String> {
    let f: f64 = std::str::from_utf8(number).ok()?.parse().ok()?;
    if f.fract() != 0.0 {
        return None;
    }
    // 2^64 and -2^63: the bounds of u64 and i64, exactly representable as f64.
    if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
        Some((f as u64).to_string())
    } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
        Some((f as i64).to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rewritten(json: &str) -> String {
        integral_numbers_as_integers(json.as_bytes()).map_or_else(
            || json.to_owned(),
            |v| String::from_utf8(v.to_vec()).unwrap(),
        )
    }

    #[test]
    fn integral_numbers_become_integers_and_nothing_else_changes() {
        assert_eq!(
            rewritten(r#"{"a": 34.0, "b": -2e1, "c": 1.5}"#),
            r#"{"a": 34, "b": -20, "c": 1.5}"#
        );
        // Inside strings (escaped quotes included) nothing is touched.
        assert_eq!(
            rewritten(r#"{"a\"3.0": "4.0 \" 5.0", "b": [6.0]}"#),
            r#"{"a\"3.0": "4.0 \" 5.0", "b": [6]}"#
        );
        // Out of both ranges, or not integral: left as they are; plain integers need no copy.
        assert_eq!(
            rewritten(r#"{"a": 1e30, "b": -1e19, "c": 0.5}"#),
            r#"{"a": 1e30, "b": -1e19, "c": 0.5}"#
        );
        assert!(integral_numbers_as_integers(br#"{"a": 12, "b": "3.0"}"#).is_none());
        assert_eq!(rewritten(r#"{"a": -0.0}"#), r#"{"a": 0}"#);
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Read through `Debug` only.
    struct Body {
        n: u32,
        #[serde(default)]
        text: Option<String>,
    }

    fn code(result: Result<Body, ApiError>) -> String {
        match result {
            Ok(body) => format!("ok {body:?}"),
            Err(ApiError::InvalidJson) => "invalid_json".to_owned(),
            Err(ApiError::InvalidRequest(message)) => format!("invalid_request: {message}"),
            Err(other) => format!("other: {other}"),
        }
    }

    #[test]
    fn each_fault_gets_its_code_whatever_comes_first_in_the_body() {
        assert_eq!(
            code(parse(br#"{"n": 34.0}"#)),
            r#"ok Body { n: 34, text: None }"#
        );
        assert_eq!(code(parse(b"{\"n\": 1,")), "invalid_json");
        // A field of the wrong shape before a syntax error: still not JSON.
        assert_eq!(code(parse(br#"{"n": "x", "#)), "invalid_json");
        assert_eq!(code(parse(br#"{"n": 1} {}"#)), "invalid_json");
        assert_eq!(
            code(parse(b" [1]")),
            "invalid_request: the request body must be a JSON object"
        );
        assert_eq!(
            code(parse(br#"{"n": 1, "extra": true}"#)),
            "invalid_request: the body has a field this request does not accept: `extra`"
        );
        assert_eq!(
            code(parse(br#"{}"#)),
            "invalid_request: the body lacks the required field `n`"
        );
        assert_eq!(
            code(parse(br#"{"n": "seven"}"#)),
            "invalid_request: the field `n` of the body has the wrong type"
        );
        assert_eq!(
            code(parse(br#"{"n": 4294967296}"#)),
            "invalid_request: the field `n` of the body has a value out of range or of the wrong form"
        );
    }
}
