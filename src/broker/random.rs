//! Random material from the token's RNG (`POST /v1/random`): raw bytes or text in a managed-key
//! format, one token call per batch. Nothing here is stored, sealed or logged.

use zeroize::Zeroizing;

use super::{Broker, BrokerError};
use crate::crypto::formats::{KeyFormat, render};

/// One validated request: a format and a length already checked against its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomRequest {
    format: KeyFormat,
    length: usize,
}

impl RandomRequest {
    /// Most raw bytes one item may ask for with `{"bytes": n}` (as Vault Transit's `/random`).
    pub const MAX_BYTES: usize = 1024;

    /// `bytes` raw random bytes, 1 to [`Self::MAX_BYTES`].
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`] outside that range.
    pub fn bytes(bytes: usize) -> Result<Self, BrokerError> {
        if !(1..=Self::MAX_BYTES).contains(&bytes) {
            return Err(BrokerError::InvalidSpec(format!(
                "bytes must be 1 to {}",
                Self::MAX_BYTES
            )));
        }
        Ok(Self {
            format: KeyFormat::Raw,
            length: bytes,
        })
    }

    /// Material in a managed-key format, with the same lengths and defaults as a managed key.
    ///
    /// # Errors
    /// [`BrokerError::InvalidSpec`] for a length the format does not allow.
    pub fn formatted(format: KeyFormat, length: Option<usize>) -> Result<Self, BrokerError> {
        let length = format
            .resolve_length(length)
            .map_err(|e| BrokerError::InvalidSpec(e.to_string()))?;
        Ok(Self { format, length })
    }

    /// The format asked for.
    pub fn format(&self) -> KeyFormat {
        self.format
    }
}

/// Random material, rendered in its format; zeroized on drop.
pub struct RandomMaterial {
    /// The format it was rendered in.
    pub format: KeyFormat,
    /// Raw bytes, or the text's ASCII bytes.
    pub material: Zeroizing<Vec<u8>>,
}

impl Broker {
    /// Draws random material for every item in one token call.
    ///
    /// # Errors
    /// Whole-call failures (batch size, outages); each item has its own result.
    pub async fn random(
        &self,
        items: Vec<RandomRequest>,
    ) -> Result<Vec<Result<RandomMaterial, BrokerError>>, BrokerError> {
        self.check_batch(items.len())?;
        self.each_item(items, |token, item| {
            // As for managed keys: the sampled alphabets may run short of bytes, very rarely;
            // we then draw twice as many and render again.
            let mut want = item.format.random_bytes_hint(item.length);
            let material = loop {
                let random = token.random(want)?;
                if let Some(material) = render(item.format, item.length, &random) {
                    break material;
                }
                want = want.saturating_mul(2);
            };
            Ok(RandomMaterial {
                format: item.format,
                material,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn raw_byte_counts_are_bounded() {
        assert!(RandomRequest::bytes(0).is_err());
        assert!(RandomRequest::bytes(RandomRequest::MAX_BYTES + 1).is_err());
        for n in [1, 32, RandomRequest::MAX_BYTES] {
            let r = RandomRequest::bytes(n).unwrap();
            assert_eq!((r.format, r.length), (KeyFormat::Raw, n));
        }
    }

    #[test]
    fn formats_take_the_managed_key_lengths() {
        assert_eq!(
            RandomRequest::formatted(KeyFormat::Hex, None)
                .unwrap()
                .length,
            64
        );
        assert_eq!(
            RandomRequest::formatted(KeyFormat::Uuid, Some(36))
                .unwrap()
                .length,
            36
        );
        assert!(RandomRequest::formatted(KeyFormat::Uuid, Some(16)).is_err());
        assert!(RandomRequest::formatted(KeyFormat::Numeric, Some(3)).is_err());
        assert!(RandomRequest::formatted(KeyFormat::Raw, Some(257)).is_err());
    }
}
