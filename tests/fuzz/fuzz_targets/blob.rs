//! The wrapped-DEK blob (`kb:v1:<mk_version>:<base64url payload>`, `WrappedBlob::parse`, what
//! `unwrap` and `rewrap` read from callers) and the sealed-secret bytes (`nonce || ciphertext ||
//! tag`, `envelope::open`, what secrets read back from the database).
#![no_main]

use keybroker::crypto::envelope::{self, DataKey, NONCE_LEN};
use keybroker::crypto::{GCM_IV_LEN, GCM_TAG_LEN, MAX_WRAP_LEN, MIN_WRAP_LEN, WrappedBlob};
use libfuzzer_sys::fuzz_target;

/// The data key and AAD the envelope seeds were sealed under (`examples/make_seeds.rs`).
const KEY: [u8; 32] = [0x24; 32];
const AAD: &[u8] = b"keybroker-fuzz-aad";

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(blob) = WrappedBlob::parse(text)
    {
        // Only canonical text parses, so a parsed blob prints back as the very input: one blob,
        // one spelling.
        assert_eq!(blob.to_string(), text);
        let len = blob.payload().len();
        assert!(
            (GCM_IV_LEN + MIN_WRAP_LEN + GCM_TAG_LEN..=GCM_IV_LEN + MAX_WRAP_LEN + GCM_TAG_LEN)
                .contains(&len)
        );
    }
    let key = DataKey::from_bytes(&KEY).expect("32 bytes");
    if let Ok(plaintext) = envelope::open(&key, AAD, data) {
        // Authentic: sealing the plaintext again under the same nonce gives the same bytes.
        let nonce: [u8; NONCE_LEN] = data[..NONCE_LEN]
            .try_into()
            .expect("opened, so long enough");
        let sealed = envelope::seal(&key, nonce, AAD, &plaintext).expect("a short plaintext");
        assert_eq!(sealed, data);
    }
});
