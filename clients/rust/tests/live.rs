//! The library against a real broker (SoftHSM2, Postgres, HTTPS), as `scripts/clients-test.sh`
//! starts one: `KEYBROKER_URL`, `KEYBROKER_CA_FILE`, `KEYBROKER_CLIENT_ID`,
//! `KEYBROKER_CLIENT_SECRET` (scopes datakey, wrap, unwrap, rewrap, random) and `KB_ADMIN_TOKEN`
//! (the bootstrap admin's access token). Without them every test fails and says how to run it.
//!
//! The one test that changes the broker's security settings (the 429) holds a write lock while
//! the others hold a read lock, so the tiny rate it sets never meets another test's calls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker_client::{Client, Context, DataKeyCache, Error, ErrorCode};
use serde_json::{Value, json};
use tokio::sync::RwLock;

/// Held for writing by the test that changes the security settings, for reading by the rest.
static SETTINGS: RwLock<()> = RwLock::const_new(());

/// How long a test waits for the broker to show a change it made (settings, revocation).
const PATIENCE: Duration = Duration::from_secs(30);

struct Env {
    url: String,
    ca_file: String,
    client_id: String,
    client_secret: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the live tests need a running broker and a client registered on \
             it. Run them with ./scripts/clients-test.sh (it starts a throwaway broker and sets \
             KEYBROKER_URL, KEYBROKER_CA_FILE, KEYBROKER_CLIENT_ID, KEYBROKER_CLIENT_SECRET and \
             KB_ADMIN_TOKEN)"
        )
    })
}

fn env() -> Env {
    Env {
        url: var("KEYBROKER_URL"),
        ca_file: var("KEYBROKER_CA_FILE"),
        client_id: var("KEYBROKER_CLIENT_ID"),
        client_secret: var("KEYBROKER_CLIENT_SECRET"),
    }
}

fn client() -> Client {
    let e = env();
    Client::builder(e.url, e.client_id, e.client_secret)
        .ca_file(e.ca_file)
        .build()
        .unwrap()
}

fn cached(cache: DataKeyCache) -> Client {
    let e = env();
    Client::builder(e.url, e.client_id, e.client_secret)
        .ca_file(e.ca_file)
        .cache(cache)
        .build()
        .unwrap()
}

/// A client of its own for a test whose refusals (another context, a revoked token) must not
/// count against the shared one: the broker disables a client after 20 refusals in 5 minutes,
/// and the Python suite runs after this one with the shared client.
async fn own_client(name: &str, cache: Option<DataKeyCache>) -> Client {
    let (status, registered) = admin(
        reqwest::Method::POST,
        "/v1/admin/clients",
        Some(json!({"name": name, "ip_mode": "none",
                    "scopes": ["datakey", "wrap", "unwrap", "rewrap"]})),
    )
    .await;
    assert_eq!(status, 201, "registering {name}: {registered}");
    let e = env();
    let mut builder = Client::builder(
        e.url,
        registered["client"]["client_id"].as_str().unwrap(),
        registered["client_secret"].as_str().unwrap(),
    )
    .ca_file(e.ca_file);
    if let Some(cache) = cache {
        builder = builder.cache(cache);
    }
    builder.build().unwrap()
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Plain HTTPS to the broker beside the library (admin calls, revocation).
fn raw_http() -> reqwest::Client {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env().ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

async fn admin(method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = raw_http()
        .request(method, format!("{}{path}", env().url))
        .bearer_auth(var("KB_ADMIN_TOKEN"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Error>, code: ErrorCode, status: u16) {
    match result {
        Err(Error::Broker {
            status: s, code: c, ..
        }) => assert_eq!((s, c), (status, code)),
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The stateless calls

#[tokio::test]
async fn datakey_wrap_unwrap_rewrap() {
    let _shared = SETTINGS.read().await;
    let c = own_client("rust-live-calls", None).await;
    let a = ctx(&[("tenant", "acme"), ("purpose", "live")]);

    let key = c.datakey(&a, true).await.unwrap();
    let plaintext = key.plaintext.clone().unwrap();
    assert_eq!(plaintext.len(), 32);
    assert!(key.wrapped.starts_with("kb:v1:"), "{}", key.wrapped);
    assert!(key.mk_version >= 1);
    assert_eq!(c.unwrap(&key.wrapped, &a).await.unwrap(), plaintext);

    let wrapped_only = c.datakey(None, false).await.unwrap();
    assert!(wrapped_only.plaintext.is_none());
    assert_eq!(
        c.unwrap(&wrapped_only.wrapped, None).await.unwrap().len(),
        32
    );

    let material = [0x5a_u8; 48];
    let w = c.wrap(&material, &a).await.unwrap();
    assert_eq!(&c.unwrap(&w.wrapped, &a).await.unwrap()[..], &material);
    let r = c.rewrap(&w.wrapped, Some(&a)).await.unwrap();
    assert_ne!(r.wrapped, w.wrapped);
    assert_eq!(&c.unwrap(&r.wrapped, &a).await.unwrap()[..], &material);

    // The context is bound: another one (or none) is refused by the broker.
    assert_code(
        c.unwrap(&w.wrapped, &ctx(&[("tenant", "other")])).await,
        ErrorCode::ContextMismatch,
        422,
    );
    assert_code(
        c.unwrap(&w.wrapped, None).await,
        ErrorCode::ContextMismatch,
        422,
    );
    assert_code(
        c.wrap(&[1, 2, 3], None).await,
        ErrorCode::InvalidKeyLength,
        422,
    );
    assert_code(
        c.unwrap("kb:v1:1:%%%", None).await,
        ErrorCode::InvalidBlob,
        400,
    );
    // The whole sequence needed one token.
    assert_eq!(c.stats().token_requests, 1);
}

#[tokio::test]
async fn batches_answer_per_item_in_order() {
    let _shared = SETTINGS.read().await;
    let c = own_client("rust-live-batches", None).await;
    let a = ctx(&[("k", "a")]);
    let b = ctx(&[("k", "b")]);

    let keys = c
        .datakey_batch(&[Some(&a), None, Some(&b)], true)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
    let keys: Vec<_> = keys.into_iter().map(Result::unwrap).collect();
    assert!(
        keys.iter()
            .all(|k| k.plaintext.as_ref().unwrap().len() == 32)
    );

    let k1 = [1u8; 32];
    let wrapped = c
        .wrap_batch(&[
            (&k1[..], Some(&a)),
            (&[9u8; 3][..], None),
            (&k1[..], Some(&b)),
        ])
        .await
        .unwrap();
    assert_eq!(wrapped.len(), 3);
    let w1 = wrapped[0].as_ref().unwrap().wrapped.clone();
    assert_code(
        wrapped[1].as_ref().map(|_| ()).map_err(clone_err),
        ErrorCode::InvalidKeyLength,
        422,
    );
    let w3 = wrapped[2].as_ref().unwrap().wrapped.clone();

    let opened = c
        .unwrap_batch(&[
            (&w1, Some(&a)),
            (&w1, Some(&b)),
            (&keys[0].wrapped, Some(&a)),
            (&w3, Some(&b)),
        ])
        .await
        .unwrap();
    assert_eq!(&opened[0].as_ref().unwrap()[..], &k1);
    assert_code(
        opened[1].as_ref().map(|_| ()).map_err(clone_err),
        ErrorCode::ContextMismatch,
        422,
    );
    assert_eq!(
        opened[2].as_ref().unwrap(),
        keys[0].plaintext.as_ref().unwrap()
    );
    assert_eq!(&opened[3].as_ref().unwrap()[..], &k1);

    let rewrapped = c
        .rewrap_batch(&[(&w1, Some(&a)), (&w1, None)])
        .await
        .unwrap();
    let r1 = rewrapped[0].as_ref().unwrap();
    assert_eq!(&c.unwrap(&r1.wrapped, &a).await.unwrap()[..], &k1);
    assert_code(
        rewrapped[1].as_ref().map(|_| ()).map_err(clone_err),
        ErrorCode::ContextMismatch,
        422,
    );

    // A whole-request failure is the outer error.
    assert_code(c.unwrap_batch(&[]).await, ErrorCode::EmptyBatch, 422);
}

/// Batch item errors are borrowed out of the list; the assertion helper takes them by value.
fn clone_err(e: &Error) -> Error {
    match e {
        Error::Broker {
            status,
            code,
            message,
            request_id,
        } => Error::Broker {
            status: *status,
            code: code.clone(),
            message: message.clone(),
            request_id: request_id.clone(),
        },
        other => Error::Protocol(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope encryption

#[tokio::test]
async fn encrypt_then_decrypt_round_trips_and_binds_the_context() {
    let _shared = SETTINGS.read().await;
    let c = own_client("rust-live-envelopes", None).await;
    let a = ctx(&[("tenant", "acme"), ("région", "Zürich")]);
    for message in [&b""[..], b"x", &[0xa5; 100_000]] {
        let envelope = c.encrypt(message, &a).await.unwrap();
        assert_eq!(&envelope[..4], b"kbe\x01");
        assert_eq!(
            envelope.len(),
            6 + (u16::from_be_bytes([envelope[4], envelope[5]]) as usize) + 12 + message.len() + 16
        );
        assert_eq!(&c.decrypt(&envelope, &a).await.unwrap()[..], message);
    }
    let none = c.encrypt(b"no context", None).await.unwrap();
    assert_eq!(&c.decrypt(&none, None).await.unwrap()[..], b"no context");
    assert_eq!(
        &c.decrypt(&none, &Context::new()).await.unwrap()[..],
        b"no context"
    );

    // Without a cache, another context is the broker's refusal.
    let envelope = c.encrypt(b"secret", &a).await.unwrap();
    assert_code(
        c.decrypt(&envelope, &ctx(&[("tenant", "acme")])).await,
        ErrorCode::ContextMismatch,
        422,
    );
    // Altered ciphertext: the broker hands out the key, GCM refuses the message.
    let mut altered = envelope.clone();
    *altered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        c.decrypt(&altered, &a).await,
        Err(Error::EnvelopeAuthentication)
    ));
    // Not an envelope: refused before any broker call.
    let before = c.stats().api_requests;
    for bad in [&b"kbe\x02"[..], b"nope", &envelope[..40]] {
        assert!(matches!(c.decrypt(bad, &a).await, Err(Error::Envelope(_))));
    }
    assert_eq!(c.stats().api_requests, before);
}

#[tokio::test]
async fn another_context_fails_at_the_broker_or_at_gcm_with_a_cache() {
    let _shared = SETTINGS.read().await;
    let c = own_client("rust-live-contexts", Some(DataKeyCache::new())).await;
    let a = ctx(&[("tenant", "acme")]);
    let b = ctx(&[("tenant", "other")]);

    let envelope = c.encrypt(b"for acme", &a).await.unwrap();
    assert_eq!(&c.decrypt(&envelope, &a).await.unwrap()[..], b"for acme");
    let unwraps = c.stats().unwrap_calls;
    // The cache keys by (wrapped key, context): another context never takes a cached key, so
    // the broker decides, and refuses.
    assert_code(
        c.decrypt(&envelope, &b).await,
        ErrorCode::ContextMismatch,
        422,
    );
    assert_eq!(c.stats().unwrap_calls, unwraps + 1);

    // A key that did come from the cache still cannot open a message sealed under another
    // context: an envelope forged with the right wrapped key and data key but AAD for `b`.
    let key = c.datakey(&a, true).await.unwrap();
    let dek = key.plaintext.as_ref().unwrap();
    let genuine =
        keybroker_client::seal_with(dek, &[1; 12], &key.wrapped, b"genuine", Some(&a)).unwrap();
    let forged =
        keybroker_client::seal_with(dek, &[2; 12], &key.wrapped, b"forged", Some(&b)).unwrap();
    assert_eq!(&c.decrypt(&genuine, &a).await.unwrap()[..], b"genuine");
    let unwraps = c.stats().unwrap_calls;
    assert!(matches!(
        c.decrypt(&forged, &a).await,
        Err(Error::EnvelopeAuthentication)
    ));
    assert_eq!(
        c.stats().unwrap_calls,
        unwraps,
        "the key came from the cache"
    );
    // Read under `b`, the broker refuses the key itself.
    assert_code(
        c.decrypt(&forged, &b).await,
        ErrorCode::ContextMismatch,
        422,
    );
}

#[tokio::test]
async fn the_cache_makes_one_datakey_call_for_many_encryptions() {
    let _shared = SETTINGS.read().await;
    let c = cached(DataKeyCache::new());
    let a = ctx(&[("bulk", "1")]);
    let mut envelopes = Vec::new();
    for i in 0..200u32 {
        envelopes.push(c.encrypt(&i.to_be_bytes(), &a).await.unwrap());
    }
    assert_eq!(c.stats().datakey_calls, 1);
    // Every envelope carries the same wrapped key, so decryption needs one unwrap.
    for (i, e) in envelopes.iter().enumerate() {
        assert_eq!(
            &c.decrypt(e, &a).await.unwrap()[..],
            &(i as u32).to_be_bytes()
        );
    }
    assert_eq!(c.stats().unwrap_calls, 1);
    // Nonces are fresh per message even under one key.
    let nonces: std::collections::HashSet<_> = envelopes
        .iter()
        .map(|e| e[e.len() - 4 - 16 - 12..e.len() - 4 - 16].to_vec())
        .collect();
    assert_eq!(nonces.len(), envelopes.len());
    // Another context, another key.
    c.encrypt(b"x", &ctx(&[("bulk", "2")])).await.unwrap();
    assert_eq!(c.stats().datakey_calls, 2);
    // And a client without a cache asks every time.
    let plain = client();
    for _ in 0..3 {
        plain.encrypt(b"x", &a).await.unwrap();
    }
    assert_eq!(plain.stats().datakey_calls, 3);
}

#[tokio::test]
async fn the_cache_honours_each_bound() {
    let _shared = SETTINGS.read().await;
    let a = ctx(&[("bound", "test")]);

    // At most 3 messages per key: 7 messages, 3 keys.
    let c = cached(DataKeyCache::new().max_messages(3));
    for _ in 0..7 {
        c.encrypt(b"m", &a).await.unwrap();
    }
    assert_eq!(c.stats().datakey_calls, 3);

    // At most 100 bytes per key: 40 + 40 fit, the third 40 needs a new key; 6 messages, 3
    // keys. A message over the bound alone gets a key of its own that is not kept.
    let c = cached(DataKeyCache::new().max_bytes(100));
    for _ in 0..6 {
        c.encrypt(&[0u8; 40], &a).await.unwrap();
    }
    assert_eq!(c.stats().datakey_calls, 3);
    c.encrypt(&[0u8; 101], &a).await.unwrap();
    c.encrypt(&[0u8; 101], &a).await.unwrap();
    assert_eq!(c.stats().datakey_calls, 5);

    // At most 1 s old. The sleep is a lower bound, which a loaded machine only lengthens; the
    // hit before it is a lookup right after the key was stored.
    let c = cached(DataKeyCache::new().max_age(Duration::from_secs(1)));
    c.encrypt(b"m", &a).await.unwrap();
    c.encrypt(b"m", &a).await.unwrap();
    assert_eq!(c.stats().datakey_calls, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = c.encrypt(b"m", &a).await.unwrap();
    assert_eq!(c.stats().datakey_calls, 2);
    // Decryption keys expire likewise.
    c.decrypt(&e, &a).await.unwrap();
    c.decrypt(&e, &a).await.unwrap();
    assert_eq!(c.stats().unwrap_calls, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.decrypt(&e, &a).await.unwrap();
    assert_eq!(c.stats().unwrap_calls, 2);

    // At most 2 keys: a, b, c evicts a (the least recently used), so a needs a key again.
    let c = cached(DataKeyCache::new().capacity(2));
    for name in ["a", "b", "c", "a"] {
        c.encrypt(b"m", &ctx(&[("ctx", name)])).await.unwrap();
    }
    assert_eq!(c.stats().datakey_calls, 4);
    assert_eq!(c.cache().unwrap().len(), 2);
    c.encrypt(b"m", &ctx(&[("ctx", "a")])).await.unwrap();
    assert_eq!(c.stats().datakey_calls, 4);
}

// ---------------------------------------------------------------------------------------------
// Tokens and retries

#[tokio::test]
async fn a_revoked_token_is_replaced_at_the_next_call() {
    let _shared = SETTINGS.read().await;
    let c = own_client("rust-live-revocation", None).await;
    c.authenticate().await.unwrap();
    assert_eq!(c.stats().token_requests, 1);
    let token = c.access_token_for_tests().await.unwrap();

    // The client revokes its own token (RFC 7009), beside the library.
    let http = raw_http();
    let url = env().url;
    let response = http
        .post(format!("{url}/v1/oauth/revoke"))
        .bearer_auth(token.as_str())
        // A JWT is URL-safe as it is: no form encoding needed.
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", token.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Revocation reaches every broker within a second; wait until this one refuses it.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = http
            .post(format!("{url}/v1/datakey"))
            .bearer_auth(token.as_str())
            .json(&json!({"plaintext": false}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked token still works ({status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let w = c.wrap(&[3u8; 32], None).await.unwrap();
    assert_eq!(&c.unwrap(&w.wrapped, None).await.unwrap()[..], &[3u8; 32]);
    assert_eq!(c.stats().token_requests, 2);
    assert_ne!(*c.access_token_for_tests().await.unwrap(), *token);
}

#[tokio::test]
async fn a_429_is_retried_and_finally_surfaced() {
    let _exclusive = SETTINGS.write().await;
    // A client of its own, so the refusals below count against nobody else.
    let e = env();
    let (status, registered) = admin(
        reqwest::Method::POST,
        "/v1/admin/clients",
        Some(json!({"name": "rust-live-429", "ip_mode": "none", "scopes": ["wrap"]})),
    )
    .await;
    assert_eq!(status, 201, "{registered}");
    let c = Client::builder(
        e.url,
        registered["client"]["client_id"].as_str().unwrap(),
        registered["client_secret"].as_str().unwrap(),
    )
    .ca_file(e.ca_file)
    .max_retries(2)
    .backoff(Duration::from_millis(10), Duration::from_millis(200))
    .build()
    .unwrap();
    c.authenticate().await.unwrap();

    let (status, saved) = admin(reqwest::Method::GET, "/v1/admin/security-settings", None).await;
    assert_eq!(status, 200, "{saved}");
    let mut tiny = saved.clone();
    // One request per 1000 s, burst 1: after the first call, every call is refused with a
    // Retry-After far beyond the client's longest wait.
    tiny["per_client_per_second"] = json!(0.001);
    tiny["per_client_burst"] = json!(1);
    let (status, body) = admin(
        reqwest::Method::PUT,
        "/v1/admin/security-settings",
        Some(tiny),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Until the broker applies the settings, calls succeed; then one is refused after its
    // retries. The settings are restored before anything is asserted.
    let outcome = async {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let before = c.stats();
            match c.wrap(&[4u8; 32], None).await {
                Ok(_) if Instant::now() < deadline => continue,
                Ok(_) => return Err("no 429 within the deadline".to_owned()),
                Err(err) => {
                    let after = c.stats();
                    return Ok((
                        err,
                        after.retries - before.retries,
                        after.api_requests - before.api_requests,
                    ));
                }
            }
        }
    }
    .await;
    let (status, body) = admin(
        reqwest::Method::PUT,
        "/v1/admin/security-settings",
        Some(saved),
    )
    .await;
    assert_eq!(status, 200, "restoring the settings: {body}");

    let (err, retries, requests) = outcome.unwrap();
    match &err {
        Error::Broker { status, code, .. } => {
            assert_eq!((*status, code), (429, &ErrorCode::RateLimited), "{err}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(retries, 2, "max_retries(2): two retries, then the error");
    assert_eq!(requests, 3);
}
