//! The encryption context's canonicalisation: a context and the blob's other bindings into the
//! AAD bytes (`EncryptionContext::new`, `Aad::bytes`). Beyond "no crash", it checks the bytes
//! decode back to exactly what went in, so no two bindings share an AAD.
//!
//! Input: UTF-8 fields separated by 0xFF (a byte UTF-8 never uses): the first byte picks the
//! master-key version, then client id, key ref, and key/value pairs of the context.
#![no_main]

use std::collections::BTreeMap;

use keybroker::crypto::{Aad, EncryptionContext, MasterKeyVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&version, rest)) = data.split_first() else {
        return;
    };
    let Ok(fields) = rest
        .split(|&b| b == 0xff)
        .map(std::str::from_utf8)
        .collect::<Result<Vec<&str>, _>>()
    else {
        return;
    };
    let client_id = fields.first().copied();
    let key_ref = fields.get(1).copied();
    let map: BTreeMap<String, String> = fields
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|pair| (pair[0].to_owned(), pair[1].to_owned()))
        .collect();
    let Ok(context) = EncryptionContext::new(map.clone()) else {
        return;
    };
    let mk_version = MasterKeyVersion::new(u32::from(version) + 1).expect("not zero");
    let aad = Aad {
        mk_version,
        client_id,
        key_ref,
        context: &context,
    };
    let bytes = aad.bytes();

    let mut reader = Reader(&bytes);
    assert_eq!(reader.field(), b"keybroker-aad");
    assert_eq!(reader.field(), b"v1");
    assert_eq!(reader.u32(), mk_version.get());
    assert_eq!(reader.field(), client_id.unwrap_or("").as_bytes());
    assert_eq!(reader.field(), key_ref.unwrap_or("").as_bytes());
    assert_eq!(reader.u32() as usize, map.len());
    for (k, v) in &map {
        assert_eq!(reader.field(), k.as_bytes());
        assert_eq!(reader.field(), v.as_bytes());
    }
    assert!(reader.0.is_empty(), "bytes left over after the last field");
});

/// Reads the AAD back: big-endian u32 lengths, then the bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> u32 {
        let (head, rest) = self.0.split_first_chunk::<4>().expect("a length");
        self.0 = rest;
        u32::from_be_bytes(*head)
    }

    fn field(&mut self) -> &'a [u8] {
        let len = self.u32() as usize;
        let (field, rest) = self.0.split_at_checked(len).expect("a whole field");
        self.0 = rest;
        field
    }
}
