//! Writes the seed corpora under `seeds/<target>/` from the repository's test vectors: the
//! bodies, blobs, contexts and control files the unit and integration tests use, and tokens and
//! assertions signed with the fixed fuzzing key (`src/lib.rs`). The output is committed; run
//! again after changing a target's input format:
//! `cargo run --manifest-path tests/fuzz/Cargo.toml --example make_seeds`.

use std::fs;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keybroker::crypto::envelope::{self, DataKey};
use keybroker::crypto::{MasterKeyVersion, WrappedBlob};
use keybroker_fuzz::{AUDIENCE, CLIENT, ISSUER, KID, NOW, auth_config, sign_jws};
use serde_json::json;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = |target: &str, seeds: Vec<Vec<u8>>| {
        let dir = root.join(target);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("seed folder");
        for (i, seed) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("{i:03}")), seed).expect("seed file");
        }
        println!("{target}: {} seeds", seeds.len());
    };

    // blob: blobs of every payload length the format allows and a few it does not, the unit
    // tests' broken ones, and sealed secrets under the target's key and AAD.
    let mut blobs: Vec<Vec<u8>> = [44usize, 45, 60, 61, 62, 92]
        .iter()
        .map(|&len| {
            let version = MasterKeyVersion::new(u32::try_from(len).expect("small")).expect("≥1");
            WrappedBlob::new(version, (0..len).map(|i| i as u8).collect())
                .to_string()
                .into_bytes()
        })
        .collect();
    for text in [
        "kb:v1:3",
        "kb:v7:1:AAAA",
        "vault:v1:abc",
        "kb:v1:03:AAAA",
        "kb:v1:4294967295:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "kb:v1:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        blobs.push(text.as_bytes().to_vec());
    }
    let key = DataKey::from_bytes(&[0x24; 32]).expect("32 bytes");
    for plaintext in [&b""[..], b"x", b"attack at dawn, 20 b", &[0xa5; 200]] {
        blobs.push(envelope::seal(&key, [7; 12], b"keybroker-fuzz-aad", plaintext).expect("seal"));
    }
    write("blob", blobs);

    // context: version byte, then client id, key ref and pairs separated by 0xFF; the contexts
    // the integration tests bind.
    let context = |version: u8, fields: &[&str]| {
        let mut out = vec![version];
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(0xff);
            }
            out.extend_from_slice(field.as_bytes());
        }
        out
    };
    write(
        "context",
        vec![
            context(0, &[CLIENT]),
            context(0, &[CLIENT, "", "app", "billing"]),
            context(1, &[CLIENT, "key-1:v2", "tenant", "acme", "env", "prod"]),
            context(2, &[CLIENT, "", "a", "x\u{0}y", "", "v"]),
            context(3, &["", "", "ünïcode", "värde", "k", &"v".repeat(300)]),
        ],
    );

    // request_body: the selector byte (see the target's `match`), then the bodies the
    // integration tests send, valid and refused.
    let b64 = |n: usize| STANDARD.encode(vec![1u8; n]);
    let blob = WrappedBlob::new(MasterKeyVersion::FIRST, vec![9; 60]).to_string();
    let bodies: Vec<(u8, serde_json::Value)> = vec![
        (0, json!({})),
        (
            0,
            json!({"context": {"app": "billing"}, "plaintext": false}),
        ),
        (0, json!({"context": {"": "v"}})),
        (
            1,
            json!({"items": [{}, {"plaintext": false}, {"context": {"k": 1}}]}),
        ),
        (
            2,
            json!({"plaintext": b64(32), "context": {"tenant": "acme"}}),
        ),
        (2, json!({"plaintext": b64(15)})),
        (2, json!({"plaintext": "not base64!"})),
        (3, json!({"items": [{"plaintext": b64(16), "extra": 1}]})),
        (4, json!({"wrapped": blob, "context": {"tenant": "acme"}})),
        (4, json!({"wrapped": "kb:v7:1:AAAA"})),
        (5, json!({"items": [{"wrapped": "x"}, {"wrapped": blob}]})),
        (6, json!({"bytes": 32})),
        (6, json!({"format": "uuid"})),
        (6, json!({"format": "numeric", "length": 65})),
        (6, json!({"bytes": 1, "format": "hex"})),
        (
            7,
            json!({"items": [{"bytes": 1024}, {"format": "alphanumeric", "length": 8}]}),
        ),
        (
            8,
            json!({"name": "billing/db", "format": "hex", "ttl_days": 30, "context": {"app": "billing"}}),
        ),
        (
            8,
            json!({"name": "r", "format": "hex", "rotation": "auto", "rotation_period_days": 90, "expires_at": NOW + 86_400}),
        ),
        (
            8,
            json!({"name": "r", "format": "raw", "length": 257, "return_plaintext": true}),
        ),
        (9, json!({"context": {"app": "billing"}, "version": 2})),
        (10, json!({"ttl_days": 30})),
        (10, json!({"never_expires": true, "expires_at": 1})),
        (
            11,
            json!({"value": STANDARD.encode(b"v"), "context": {"\u{0}": "x"}}),
        ),
        (
            12,
            json!({"name": "svc", "ip_mode": "strict", "ips": ["127.0.0.1", "10.0.0.0/8", "::1"], "scopes": ["datakey", "keys:*"]}),
        ),
        (
            12,
            json!({"name": "a\u{0}b", "ip_mode": "none", "scopes": ["datakey"], "public_key": "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n"}),
        ),
        (13, json!({"scopes": ["admin"], "public_key": ""})),
        (
            14,
            json!({"reason": "stolen", "block": {"cidrs": ["10.0.0.0/24"], "secs": 3600}}),
        ),
        (
            15,
            json!({"anomaly_refusals": 2, "anomaly_window_secs": 300}),
        ),
        (15, json!({"per_ip_per_second": 0.0})),
    ];
    let mut seeds: Vec<Vec<u8>> = bodies
        .into_iter()
        .map(|(kind, body)| {
            let mut seed = vec![kind];
            seed.extend_from_slice(body.to_string().as_bytes());
            seed
        })
        .collect();
    seeds.push(b"\x00[]".to_vec());
    seeds.push(b"\x02{\"plaintext\": \"AAAA\", \"plaintext\": 1".to_vec());
    write("request_body", seeds);

    // bearer_token: tokens signed with the fixed key, valid and wrong in one claim each, and the
    // header tricks the verifier pins against.
    let claims = json!({
        "iss": ISSUER, "sub": CLIENT, "aud": AUDIENCE, "iat": 1_700_000_000,
        "nbf": 1_700_000_000, "exp": 4_000_000_000_i64,
        "jti": "0b5c3a1e-9d2f-4e7a-8c6b-1f0e2d3c4b5a", "scope": "datakey keys:read",
    });
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": KID});
    let mut tokens = vec![sign_jws(&header, &claims)];
    for (field, value) in [
        ("iss", json!("https://elsewhere")),
        ("aud", json!("other")),
        ("exp", json!(1_000)),
        ("nbf", json!(4_000_000_000_i64)),
        ("sub", json!("not-a-uuid")),
        ("scope", json!("datakey nonsense")),
    ] {
        let mut wrong = claims.clone();
        wrong[field] = value;
        tokens.push(sign_jws(&header, &wrong));
    }
    tokens.push(sign_jws(&json!({"alg": "ES256", "kid": "other"}), &claims));
    tokens.push(sign_jws(&json!({"alg": "HS256", "kid": KID}), &claims));
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": KID}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    tokens.push(unsigned);
    write(
        "bearer_token",
        tokens.into_iter().map(String::into_bytes).collect(),
    );

    // client_assertion: assertions from the fixed client, signed with its key.
    let endpoint = auth_config().token_endpoint();
    let assertion_claims = json!({
        "iss": CLIENT, "sub": CLIENT, "aud": endpoint, "exp": NOW + 60,
        "jti": "a1b2c3d4-0000-4000-8000-000000000001",
    });
    let es256 = json!({"alg": "ES256", "typ": "JWT"});
    let mut assertions = vec![
        sign_jws(&es256, &assertion_claims),
        format!("{CLIENT}\n{}", sign_jws(&es256, &assertion_claims)),
    ];
    for (field, value) in [
        ("aud", json!([endpoint, "https://other"])),
        ("exp", json!(NOW + 3_600)),
        ("nbf", json!(NOW + 3_600)),
        ("jti", json!("")),
        ("iss", json!("someone")),
    ] {
        let mut wrong = assertion_claims.clone();
        wrong[field] = value;
        assertions.push(sign_jws(&es256, &wrong));
    }
    write(
        "client_assertion",
        assertions.into_iter().map(String::into_bytes).collect(),
    );

    // token_form: selector byte (bit 0: the token= form; bit 1: first line is Authorization).
    let assertion = sign_jws(&es256, &assertion_claims);
    let basic = STANDARD.encode(format!("{CLIENT}:s3cret"));
    let forms: Vec<(u8, String)> = vec![
        (0, "grant_type=client_credentials&client_id=3f2b8c1e-5d4a-4b6f-9e2d-7a1c0b9d8e6f&client_secret=s3cret&scope=datakey+keys%3Aread".to_owned()),
        (2, format!("Basic {basic}\ngrant_type=client_credentials")),
        (2, format!("Basic {basic}\ngrant_type=client_credentials&client_secret=x")),
        (0, format!("grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}")),
        (0, "grant_type=password&username=a".to_owned()),
        (0, "scope=admin".to_owned()),
        (1, "token=eyJhbGciOiJFUzI1NiJ9.e30.AA&token_type_hint=access_token".to_owned()),
    ];
    write(
        "token_form",
        forms
            .into_iter()
            .map(|(kind, body)| {
                let mut seed = vec![kind];
                seed.extend_from_slice(body.as_bytes());
                seed
            })
            .collect(),
    );

    // fault_control: the module's documented example and its unit tests' files.
    let plans = [
        "# fail the second and fourth C_Encrypt, each after 50 ms\nfunctions = C_Encrypt\nrv = CKR_DEVICE_REMOVED\nevery = 2\ntimes = 2\nlatency_ms = 50\n",
        "# faults for the retry test\n\nfunctions=C_Encrypt ,  C_EncryptInit   # the two encrypt calls\nrv = CKR_DEVICE_REMOVED\n\tevery = 3\r\ntimes= 2\nlatency_ms =250\nhide_mechanisms = CKM_AES_GCM, 0x251\n",
        "gcm_iv = token\nmax_sessions = 0x3\n",
        "gcm_iv = corrupt\ncount_calls = yes\nfunctions = *\n",
        "rv = 0XB3",
        "rv = 50\nrv = 51",
        "functions = C_GetFunctionList",
        "hide_mechanisms = CKM_NOT_A_THING",
        "max_sessions = -1",
        "latency_ms = 0xffffffffffffffff",
    ];
    write(
        "fault_control",
        plans.iter().map(|p| p.as_bytes().to_vec()).collect(),
    );
}
