//! [`SecretText`]: the text of a secret in a request or response body (key material in base64,
//! a secret's value, a client secret, an access token). It is wiped from memory when dropped and
//! `Debug` never shows it, so a wire type that holds one may derive `Debug` safely. On the wire
//! and in the OpenAPI document it is a plain string (each field says `value_type = String`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A secret's text: zeroized on drop, redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    /// The text itself, for the one place that needs it (decoding, encoding, a header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretText {
    fn from(text: String) -> Self {
        Self(Zeroizing::new(text))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText([REDACTED])")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde hands an owned String to `String`'s visitor when the input has one (JSON text
        // with escapes is unescaped into a fresh buffer), which moves here without a copy.
        String::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn debug_never_shows_the_text_and_the_wire_form_is_a_plain_string() {
        let secret = SecretText::from("hunter2-key-material".to_owned());
        assert_eq!(format!("{secret:?}"), "SecretText([REDACTED])");
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
        let json = serde_json::to_string(&secret).unwrap();
        assert_eq!(json, "\"hunter2-key-material\"");
        let back: SecretText = serde_json::from_str(&json).unwrap();
        assert_eq!(back.expose(), "hunter2-key-material");
        // Not a string: refused like a String field would be.
        assert!(serde_json::from_str::<SecretText>("42").is_err());
    }
}
