//! The formats of managed-key material (raw bytes, hex, UUID, alphanumeric, numeric), rendered
//! from random bytes the caller fetched from the HSM's RNG. Pure: no I/O, no RNG of its own.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Length of a canonical hyphenated UUID string.
const UUID_TEXT_LEN: usize = 36;
/// Random bytes behind a UUID: 128 bits, of which 122 stay random.
const UUID_RANDOM_LEN: usize = 16;
/// Lowercase hex digits, indexed by nibble.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
/// The alphanumeric alphabet, in the order the API documents: `A-Za-z0-9`.
const ALPHANUMERIC: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// The numeric alphabet.
const DIGITS: &[u8; 10] = b"0123456789";

/// A format of managed-key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyFormat {
    /// Random bytes; the length counts bytes. Shown as standard base64.
    Raw,
    /// Lowercase hex text (`0-9a-f`); the length counts characters.
    Hex,
    /// A canonical lowercase RFC 9562 version-4 UUID, always 36 characters.
    Uuid,
    /// Text over `A-Za-z0-9`; the length counts characters.
    Alphanumeric,
    /// Decimal digits; the length counts characters.
    Numeric,
}

/// A requested length the format does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The length is outside the format's range (in the format's own unit).
    #[error("the length of a {format} key must be {min} to {max} {unit}", unit = unit_of(.format))]
    LengthOutOfRange {
        /// The format's name, as [`KeyFormat::as_str`] gives it.
        format: &'static str,
        /// The smallest length allowed.
        min: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// A length other than 36 was given for a UUID, whose length is fixed.
    #[error("a uuid key is always {UUID_TEXT_LEN} characters; leave the length out")]
    LengthNotAllowed,
}

impl KeyFormat {
    /// Every format, in the order the API lists them.
    pub const ALL: [KeyFormat; 5] = [
        KeyFormat::Raw,
        KeyFormat::Hex,
        KeyFormat::Uuid,
        KeyFormat::Alphanumeric,
        KeyFormat::Numeric,
    ];

    /// Parses the API name: `raw`, `hex`, `uuid`, `alphanumeric` or `numeric` (exact case).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyFormat::Raw => "raw",
            KeyFormat::Hex => "hex",
            KeyFormat::Uuid => "uuid",
            KeyFormat::Alphanumeric => "alphanumeric",
            KeyFormat::Numeric => "numeric",
        }
    }

    /// The lengths a key of this format may have, in its own unit: `(min, default, max)` (see
    /// [`KeyFormat::resolve_length`]). The API's schema publishes the same numbers.
    pub fn lengths(self) -> (usize, usize, usize) {
        match self {
            KeyFormat::Raw => (16, 32, 256),
            KeyFormat::Hex => (16, 64, 512),
            KeyFormat::Alphanumeric => (8, 32, 256),
            KeyFormat::Numeric => (4, 16, 64),
            KeyFormat::Uuid => (UUID_TEXT_LEN, UUID_TEXT_LEN, UUID_TEXT_LEN),
        }
    }

    /// Validates a requested length (in the format's own unit) or picks the default.
    ///
    /// | format         | unit       | range     | default |
    /// |----------------|------------|-----------|---------|
    /// | `raw`          | bytes      | 16..=256  | 32      |
    /// | `hex`          | characters | 16..=512  | 64      |
    /// | `uuid`         | characters | 36 only   | 36      |
    /// | `alphanumeric` | characters | 8..=256   | 32      |
    /// | `numeric`      | digits     | 4..=64    | 16      |
    ///
    /// For `uuid`, `Some(36)` is accepted as well as `None`: a client that echoes back the length
    /// it was shown is not wrong.
    ///
    /// # Errors
    /// [`FormatError::LengthOutOfRange`] outside the range; [`FormatError::LengthNotAllowed`] for
    /// a `uuid` with any length but 36.
    pub fn resolve_length(self, requested: Option<usize>) -> Result<usize, FormatError> {
        let (min, default, max) = self.lengths();
        if self == KeyFormat::Uuid {
            return match requested {
                None | Some(UUID_TEXT_LEN) => Ok(UUID_TEXT_LEN),
                Some(_) => Err(FormatError::LengthNotAllowed),
            };
        }
        match requested {
            None => Ok(default),
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(_) => Err(FormatError::LengthOutOfRange {
                format: self.as_str(),
                min,
                max,
            }),
        }
    }

    /// How many random bytes [`render`] will most likely need for `length` (generous: rejection
    /// sampling may discard some).
    ///
    /// Exact for `raw`, `hex` (two characters per byte) and `uuid` (16 bytes). For the sampled
    /// alphabets a byte is discarded with probability 8/256 (alphanumeric) or 6/256 (numeric);
    /// the hint allows a quarter more plus 16, so running short is astronomically unlikely, but
    /// possible: `render` then returns `None` and the caller fetches more.
    pub fn random_bytes_hint(self, length: usize) -> usize {
        match self {
            KeyFormat::Raw => length,
            KeyFormat::Hex => length.div_ceil(2),
            KeyFormat::Uuid => UUID_RANDOM_LEN,
            KeyFormat::Alphanumeric | KeyFormat::Numeric => {
                length.saturating_add(length / 4).saturating_add(16)
            }
        }
    }
}

/// The unit a format's length counts, for error messages.
fn unit_of(format: &str) -> &'static str {
    if format == KeyFormat::Raw.as_str() {
        "bytes"
    } else {
        "characters"
    }
}

/// Renders key material of `format` and `length` from `random`. Returns None when `random` ran out
/// (the caller then fetches more random bytes and calls again with a longer buffer).
///
/// `length` should come from [`KeyFormat::resolve_length`]; it is not range-checked here. For
/// `uuid` it is ignored: the result is always 36 characters. Textual material is the UTF-8 (in
/// fact ASCII) bytes of the text. Only a prefix of `random` is read; bytes beyond what the
/// format needs are ignored, and nothing outside the slice is touched.
///
/// Characters are uniform over their alphabet: a byte `b` is used only when
/// `b < 256 - 256 % alphabet_len`, so `b % alphabet_len` carries no modulo bias.
pub fn render(format: KeyFormat, length: usize, random: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    match format {
        // `to_vec` allocates exactly once, so no unzeroized copy is left behind by a regrowth.
        KeyFormat::Raw => random.get(..length).map(|b| Zeroizing::new(b.to_vec())),
        KeyFormat::Hex => render_hex(length, random),
        KeyFormat::Uuid => render_uuid(random),
        KeyFormat::Alphanumeric => render_sampled(ALPHANUMERIC, length, random),
        KeyFormat::Numeric => render_sampled(DIGITS, length, random),
    }
}

/// Two hex characters per byte, high nibble first; an odd length uses only the last byte's high
/// nibble.
fn render_hex(length: usize, random: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = random.get(..length.div_ceil(2))?;
    // Capacity fixed up front: the vector never regrows, so every copy is zeroized on drop.
    let mut out = Zeroizing::new(Vec::with_capacity(length));
    out.extend(
        bytes
            .iter()
            .flat_map(|&b| [hex_digit(b >> 4), hex_digit(b)])
            .take(length),
    );
    Some(out)
}

/// An RFC 9562 version-4 UUID from 16 random bytes: version nibble 4, variant bits `10`.
fn render_uuid(random: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = random.get(..UUID_RANDOM_LEN)?;
    let mut out = Zeroizing::new(Vec::with_capacity(UUID_TEXT_LEN));
    for (i, &b) in bytes.iter().enumerate() {
        let b = match i {
            6 => (b & 0x0f) | 0x40,
            8 => (b & 0x3f) | 0x80,
            _ => b,
        };
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(hex_digit(b >> 4));
        out.push(hex_digit(b));
    }
    Some(out)
}

/// Uniform characters over `alphabet` (at most 256 symbols) by rejection sampling on bytes.
fn render_sampled(alphabet: &[u8], length: usize, random: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let n = alphabet.len();
    // 256 - 256 % n is the largest multiple of n that fits in a byte's range; bytes at or above
    // it would make the first 256 % n symbols more likely, so we drop them.
    let limit = 256 - 256 % n;
    let mut out = Zeroizing::new(Vec::with_capacity(length));
    out.extend(
        random
            .iter()
            .map(|&b| usize::from(b))
            .filter(|&b| b < limit)
            .filter_map(|b| alphabet.get(b % n).copied())
            .take(length),
    );
    (out.len() == length).then_some(out)
}

/// The lowercase hex digit of the low nibble of `nibble`.
fn hex_digit(nibble: u8) -> u8 {
    HEX_DIGITS[usize::from(nibble & 0x0f)]
}

/// The material as the API shows it: raw → standard base64 with padding; every other format →
/// the text itself.
///
/// Textual material that is not UTF-8 (which [`render`] never makes) is shown with U+FFFD in
/// place of the bad bytes rather than refused, so that showing a stored key cannot fail.
pub fn present(format: KeyFormat, material: &[u8]) -> Zeroizing<String> {
    match format {
        // `encode` sizes its buffer once, so the only copy is the one we wrap.
        KeyFormat::Raw => Zeroizing::new(STANDARD.encode(material)),
        KeyFormat::Hex | KeyFormat::Uuid | KeyFormat::Alphanumeric | KeyFormat::Numeric => {
            present_text(material)
        }
    }
}

fn present_text(material: &[u8]) -> Zeroizing<String> {
    if let Ok(text) = std::str::from_utf8(material) {
        let mut out = Zeroizing::new(String::with_capacity(text.len()));
        out.push_str(text);
        return out;
    }
    // Each bad byte becomes at most one 3-byte U+FFFD, so this capacity is never outgrown.
    let mut out = Zeroizing::new(String::with_capacity(material.len().saturating_mul(3)));
    for chunk in material.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// SplitMix64: a small deterministic byte stream, so the statistical tests are reproducible.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(n + 8);
            while out.len() < n {
                out.extend_from_slice(&self.next_u64().to_le_bytes());
            }
            out.truncate(n);
            out
        }
    }

    fn alphabet(format: KeyFormat) -> &'static [u8] {
        match format {
            KeyFormat::Raw => &[],
            KeyFormat::Hex => HEX_DIGITS,
            KeyFormat::Uuid => b"0123456789abcdef-",
            KeyFormat::Alphanumeric => ALPHANUMERIC,
            KeyFormat::Numeric => DIGITS,
        }
    }

    fn range(format: KeyFormat) -> (usize, usize) {
        match format.resolve_length(Some(0)).unwrap_err() {
            FormatError::LengthOutOfRange { min, max, .. } => (min, max),
            FormatError::LengthNotAllowed => (UUID_TEXT_LEN, UUID_TEXT_LEN),
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for format in KeyFormat::ALL {
            assert_eq!(KeyFormat::parse(format.as_str()), Some(format));
        }
        for bad in [
            "",
            "RAW",
            "Hex",
            "base64",
            "uuid4",
            " numeric",
            "alphanumeric\0",
        ] {
            assert_eq!(KeyFormat::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_ranges() {
        let table = [
            (KeyFormat::Raw, 16, 32, 256),
            (KeyFormat::Hex, 16, 64, 512),
            (KeyFormat::Alphanumeric, 8, 32, 256),
            (KeyFormat::Numeric, 4, 16, 64),
        ];
        for (format, min, default, max) in table {
            assert_eq!(format.resolve_length(None), Ok(default));
            assert_eq!(format.resolve_length(Some(min)), Ok(min));
            assert_eq!(format.resolve_length(Some(max)), Ok(max));
            let out_of_range = Err(FormatError::LengthOutOfRange {
                format: format.as_str(),
                min,
                max,
            });
            for bad in [0, min - 1, max + 1, usize::MAX] {
                assert_eq!(format.resolve_length(Some(bad)), out_of_range, "{format:?}");
            }
        }
        assert_eq!(KeyFormat::Uuid.resolve_length(None), Ok(36));
        assert_eq!(KeyFormat::Uuid.resolve_length(Some(36)), Ok(36));
        for bad in [0, 32, 35, 37] {
            assert_eq!(
                KeyFormat::Uuid.resolve_length(Some(bad)),
                Err(FormatError::LengthNotAllowed)
            );
        }
    }

    #[test]
    fn error_messages_give_the_range_and_unit() {
        let raw = KeyFormat::Raw.resolve_length(Some(1)).unwrap_err();
        assert_eq!(
            raw.to_string(),
            "the length of a raw key must be 16 to 256 bytes"
        );
        let numeric = KeyFormat::Numeric.resolve_length(Some(1)).unwrap_err();
        assert_eq!(
            numeric.to_string(),
            "the length of a numeric key must be 4 to 64 characters"
        );
    }

    #[test]
    fn every_format_has_its_alphabet_and_length() {
        let mut rng = SplitMix64(1);
        for format in KeyFormat::ALL {
            let (min, max) = range(format);
            for length in [min, min + 1, (min + max) / 2, max - 1, max] {
                let random = rng.bytes(format.random_bytes_hint(length));
                let material = render(format, length, &random).unwrap();
                match format {
                    KeyFormat::Raw => assert_eq!(&material[..], &random[..length]),
                    _ => {
                        let allowed = alphabet(format);
                        assert!(
                            material.iter().all(|c| allowed.contains(c)),
                            "{format:?}: {:?}",
                            String::from_utf8_lossy(&material)
                        );
                    }
                }
                let expected_len = if format == KeyFormat::Uuid {
                    36
                } else {
                    length
                };
                assert_eq!(material.len(), expected_len, "{format:?} {length}");
            }
        }
    }

    #[test]
    fn every_symbol_of_each_alphabet_can_appear() {
        let mut rng = SplitMix64(2);
        for format in [KeyFormat::Hex, KeyFormat::Alphanumeric, KeyFormat::Numeric] {
            let (_, max) = range(format);
            let mut seen = [false; 256];
            for _ in 0..50 {
                let random = rng.bytes(format.random_bytes_hint(max));
                for &c in render(format, max, &random).unwrap().iter() {
                    seen[usize::from(c)] = true;
                }
            }
            for &c in alphabet(format) {
                assert!(
                    seen[usize::from(c)],
                    "{format:?} never produced {}",
                    c as char
                );
            }
        }
    }

    #[test]
    fn hex_is_the_bytes_high_nibble_first() {
        let random = [0x01, 0xab, 0xf0];
        assert_eq!(&render(KeyFormat::Hex, 6, &random).unwrap()[..], b"01abf0");
        assert_eq!(&render(KeyFormat::Hex, 5, &random).unwrap()[..], b"01abf");
    }

    #[test]
    fn uuid_is_canonical_version_4() {
        let mut rng = SplitMix64(3);
        let mut samples: Vec<Vec<u8>> = (0..200).map(|_| rng.bytes(16)).collect();
        samples.push(vec![0xff; 16]);
        samples.push(vec![0; 16]);
        for random in samples {
            let material = render(KeyFormat::Uuid, 36, &random).unwrap();
            let text = std::str::from_utf8(&material).unwrap();
            assert_eq!(text.len(), 36);
            for (i, c) in text.chars().enumerate() {
                if matches!(i, 8 | 13 | 18 | 23) {
                    assert_eq!(c, '-', "{text}");
                } else {
                    assert!(matches!(c, '0'..='9' | 'a'..='f'), "{text}");
                }
            }
            assert_eq!(&text[14..15], "4", "{text}");
            assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
            let parsed = uuid::Uuid::parse_str(text).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(parsed.hyphenated().to_string(), text);
            // The other 122 bits are the random bytes, unchanged.
            let mut expected = random.clone();
            expected[6] = (expected[6] & 0x0f) | 0x40;
            expected[8] = (expected[8] & 0x3f) | 0x80;
            assert_eq!(parsed.as_bytes()[..], expected[..]);
        }
    }

    #[test]
    fn sampling_skips_exactly_the_biased_bytes() {
        // 256 % 62 == 8: bytes 248..=255 are dropped, 247 is the last symbol ('9').
        let random = [248, 255, 0, 249, 61, 247, 62];
        assert_eq!(
            &render(KeyFormat::Alphanumeric, 4, &random).unwrap()[..],
            b"A99A"
        );
        // 256 % 10 == 6: bytes 250..=255 are dropped.
        let random = [250, 251, 252, 253, 254, 255, 249, 10, 0];
        assert_eq!(&render(KeyFormat::Numeric, 3, &random).unwrap()[..], b"900");
        assert_eq!(render(KeyFormat::Numeric, 1, &[250, 251, 255]), None);
    }

    #[test]
    fn too_little_randomness_gives_none_and_only_a_prefix_is_read() {
        let mut rng = SplitMix64(4);
        for format in KeyFormat::ALL {
            let (min, max) = range(format);
            for length in [min, max] {
                let random = rng.bytes(format.random_bytes_hint(length) + 64);
                let full = render(format, length, &random).unwrap();
                // The shortest prefix that suffices gives the same material; every shorter one
                // gives None (and none of them panics or reads past its end).
                let needed = (0..=random.len())
                    .find(|&k| render(format, length, &random[..k]).is_some())
                    .unwrap();
                assert_eq!(render(format, length, &random[..needed]).unwrap(), full);
                for k in 0..needed {
                    assert_eq!(render(format, length, &random[..k]), None, "{format:?}");
                }
                assert!(needed <= format.random_bytes_hint(length), "{format:?}");
                match format {
                    KeyFormat::Raw => assert_eq!(needed, length),
                    KeyFormat::Hex => assert_eq!(needed, length.div_ceil(2)),
                    KeyFormat::Uuid => assert_eq!(needed, 16),
                    KeyFormat::Alphanumeric | KeyFormat::Numeric => assert!(needed >= length),
                }
            }
        }
        assert_eq!(render(KeyFormat::Alphanumeric, 8, &[]), None);
        assert_eq!(render(KeyFormat::Alphanumeric, 8, &[255; 1000]), None);
    }

    /// Pearson's chi-square statistic of `counts` against a uniform distribution.
    fn chi_square(counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        let expected = total as f64 / counts.len() as f64;
        counts
            .iter()
            .map(|&c| {
                let d = c as f64 - expected;
                d * d / expected
            })
            .sum()
    }

    /// Counts of each symbol over `SAMPLE` characters, produced in API-sized pieces by `make`.
    fn symbol_counts(alphabet: &[u8], mut make: impl FnMut() -> Vec<u8>) -> Vec<u64> {
        const SAMPLE: usize = 200_000;
        let mut index = [usize::MAX; 256];
        for (i, &c) in alphabet.iter().enumerate() {
            index[usize::from(c)] = i;
        }
        let mut counts = vec![0u64; alphabet.len()];
        let mut seen = 0;
        while seen < SAMPLE {
            for &c in make().iter().take(SAMPLE - seen) {
                counts[index[usize::from(c)]] += 1;
                seen += 1;
            }
        }
        counts
    }

    fn check_uniformity(format: KeyFormat, seed: u64, critical: f64) {
        let symbols = alphabet(format);
        let (_, max) = range(format);
        let mut rng = SplitMix64(seed);
        let fair = symbol_counts(symbols, || {
            let random = rng.bytes(format.random_bytes_hint(max));
            render(format, max, &random).unwrap().to_vec()
        });
        let fair_stat = chi_square(&fair);
        assert!(
            fair_stat < critical,
            "{format:?}: chi-square {fair_stat:.2} >= {critical}"
        );

        // Negative control: the same statistic on the naive `b % n` mapping must fail, or this
        // test could not tell a biased generator from ours.
        let mut rng = SplitMix64(seed);
        let n = symbols.len();
        let biased = symbol_counts(symbols, || {
            rng.bytes(max)
                .into_iter()
                .map(|b| symbols[usize::from(b) % n])
                .collect()
        });
        let biased_stat = chi_square(&biased);
        assert!(
            biased_stat > critical,
            "{format:?}: the biased control passed with {biased_stat:.2} < {critical}"
        );
    }

    #[test]
    fn numeric_is_uniform() {
        // p = 0.001 critical value for 9 degrees of freedom.
        check_uniformity(KeyFormat::Numeric, 0x5eed_0001, 27.88);
    }

    #[test]
    fn alphanumeric_is_uniform() {
        // p = 0.001 critical value for 61 degrees of freedom.
        check_uniformity(KeyFormat::Alphanumeric, 0x5eed_0002, 100.9);
    }

    #[test]
    fn present_raw_is_padded_standard_base64() {
        assert_eq!(&*present(KeyFormat::Raw, &[0xfb, 0xff]), "+/8=");
        assert_eq!(
            &*present(KeyFormat::Raw, &[0; 16]),
            "AAAAAAAAAAAAAAAAAAAAAA=="
        );
        assert_eq!(&*present(KeyFormat::Raw, b""), "");
    }

    #[test]
    fn present_text_is_the_text() {
        let mut rng = SplitMix64(5);
        for format in KeyFormat::ALL.into_iter().filter(|&f| f != KeyFormat::Raw) {
            let length = format.resolve_length(None).unwrap();
            let random = rng.bytes(format.random_bytes_hint(length));
            let material = render(format, length, &random).unwrap();
            assert_eq!(present(format, &material).as_bytes(), &material[..]);
        }
        assert_eq!(&*present(KeyFormat::Numeric, b"0123"), "0123");
        assert_eq!(&*present(KeyFormat::Hex, b"ab\xffcd"), "ab\u{fffd}cd");
    }
}
