//! The broker client: HTTPS with rustls, the client-credentials token kept fresh, retries on
//! 503 and 429, the stateless calls (`datakey`, `wrap`, `unwrap`, `rewrap` and their batch
//! forms) and envelope encryption on top of them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use zeroize::{Zeroize, Zeroizing};

use crate::cache::{DataKeyCache, Dek};
use crate::envelope::{self, KEY_LEN};
use crate::retry::{self, Backoff};
use crate::{Error, ErrorCode};

/// An encryption context: a string map bound to a key (and to an envelope); the same map must
/// be given to take the key out again.
pub type Context = BTreeMap<String, String>;

/// A fresh data key from [`Client::datakey`].
pub struct DataKey {
    /// The 32-byte key, when asked for (`plaintext: true`); wiped on drop.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    /// The key wrapped by the broker (`kb:v1:…`): store it; only the broker opens it.
    pub wrapped: String,
    /// The master-key version that wrapped it.
    pub mk_version: u32,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &self.plaintext.as_ref().map(|_| "<redacted>"))
            .field("wrapped", &self.wrapped)
            .field("mk_version", &self.mk_version)
            .finish()
    }
}

/// A blob from [`Client::wrap`] or [`Client::rewrap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// `kb:v1:<mk_version>:…`.
    pub wrapped: String,
    /// The master-key version that wrapped it.
    pub mk_version: u32,
}

/// What a client has asked of the broker so far (all its clones together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Access tokens fetched.
    pub token_requests: u64,
    /// HTTP requests to the broker's API, retries and batch calls included (token requests
    /// not).
    pub api_requests: u64,
    /// `datakey` calls (single or batch), each counted once however often it was retried.
    pub datakey_calls: u64,
    /// `unwrap` calls (single or batch), likewise.
    pub unwrap_calls: u64,
    /// Requests repeated after a 503 or 429.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    api_requests: AtomicU64,
    datakey_calls: AtomicU64,
    unwrap_calls: AtomicU64,
    retries: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Sets up a [`Client`]; see [`Client::builder`].
pub struct ClientBuilder {
    url: String,
    client_id: String,
    client_secret: Zeroizing<String>,
    ca_file: Option<PathBuf>,
    timeout: Duration,
    max_retries: u32,
    backoff: Backoff,
    cache: Option<DataKeyCache>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("cache", &self.cache)
            .finish()
    }
}

impl ClientBuilder {
    /// Trust only the CA certificates in this PEM file (the broker's, for a private CA);
    /// without it, the operating system's trust store.
    #[must_use]
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_owned());
        self
    }

    /// The deadline of one HTTP request, connection included (default 10 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often a call answered 503 or 429 is repeated before the error is returned (default
    /// 4).
    #[must_use]
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// The first retry's wait and the longest wait (defaults 200 ms and 30 s). A `Retry-After`
    /// from the broker is waited for, but never longer than `max`.
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff { base, max };
        self
    }

    /// Cache data keys for [`Client::encrypt`] and [`Client::decrypt`].
    #[must_use]
    pub fn cache(mut self, cache: DataKeyCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The client. No request is made yet: the first call fetches the access token (or
    /// [`Client::authenticate`], to fail early on bad credentials).
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that is not `https://` (plain `http://` only to a loopback
    /// address), an unreadable CA file, or a TLS set-up that fails.
    pub fn build(self) -> Result<Client, Error> {
        let base = self.url.trim_end_matches('/').to_owned();
        check_url(&base)?;
        let tls = tls_config(self.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(self.timeout)
            .user_agent(concat!("keybroker-client-rust/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                base,
                http,
                client_id: self.client_id,
                client_secret: self.client_secret,
                max_retries: self.max_retries,
                backoff: self.backoff,
                cache: self.cache,
                token: tokio::sync::Mutex::new(None),
                counters: Counters::default(),
            }),
        })
    }
}

/// Refuses cleartext HTTP except to this machine (tests, a local proxy): the credentials and
/// every key travel in these requests.
fn check_url(base: &str) -> Result<(), Error> {
    let url = reqwest::Url::parse(base).map_err(|e| Error::Config(format!("URL: {e}")))?;
    let loopback = url.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(Error::Config(
            "the broker URL must be https:// (http:// only to a loopback address)".to_owned(),
        )),
    }
}

/// rustls with the ring provider (the broker's own), built here so that no process-wide
/// provider has to be installed by the application.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let mut config = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "CA file {}: no certificate in it",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| Error::Config(format!("TLS trust store: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A keybroker client: cheap to clone (clones share the connection pool, the access token,
/// the cache and the counters), `Send + Sync`.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.base)
            .field("client_id", &self.inner.client_id)
            .field("max_retries", &self.inner.max_retries)
            .field("cache", &self.inner.cache)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base: String,
    http: reqwest::Client,
    client_id: String,
    client_secret: Zeroizing<String>,
    max_retries: u32,
    backoff: Backoff,
    cache: Option<DataKeyCache>,
    /// The current access token. An async mutex: one task fetches a new token while the
    /// others wait for it, instead of all of them asking at once.
    token: tokio::sync::Mutex<Option<Token>>,
    counters: Counters,
}

struct Token {
    value: Arc<Zeroizing<String>>,
    obtained: Instant,
    lifetime: Duration,
    /// Counts tokens fetched, so a 401 throws away only the token it was answered for.
    generation: u64,
}

impl Token {
    /// Renew when less than 30 s or 20 % of its life is left, whichever is more (but always
    /// use a token for the first half of its life, so a very short-lived one is not fetched
    /// again for every call).
    fn due(&self, now: Instant) -> bool {
        renewal_due(self.obtained, self.lifetime, now)
    }
}

fn renewal_due(obtained: Instant, lifetime: Duration, now: Instant) -> bool {
    let margin = Duration::from_secs(30).max(lifetime / 5).min(lifetime / 2);
    now.saturating_duration_since(obtained) + margin >= lifetime
}

/// The token endpoint's answer (RFC 6749 §5.1).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct DataKeyResponse {
    wrapped: String,
    plaintext: Option<String>,
    mk_version: u32,
}

#[derive(Deserialize)]
struct WrappedResponse {
    wrapped: String,
    mk_version: u32,
}

#[derive(Deserialize)]
struct UnwrapResponse {
    plaintext: String,
}

#[derive(Deserialize)]
struct BatchResponse {
    items: Vec<Value>,
}

/// A per-item answer of a batch.
type Item<T> = Result<T, Error>;

impl Client {
    /// Starts setting up a client of the broker at `url` (e.g. `https://127.0.0.1:8443`) with
    /// a registered client's id and secret (the secret is sent with HTTP Basic to the token
    /// endpoint only, and wiped when the client is dropped).
    pub fn builder(
        url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            client_id: client_id.into(),
            client_secret: Zeroizing::new(client_secret.into()),
            ca_file: None,
            timeout: Duration::from_secs(10),
            max_retries: 4,
            backoff: Backoff::default(),
            cache: None,
        }
    }

    /// What this client (and its clones) asked of the broker so far.
    #[must_use]
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            token_requests: c.token_requests.load(Ordering::Relaxed),
            api_requests: c.api_requests.load(Ordering::Relaxed),
            datakey_calls: c.datakey_calls.load(Ordering::Relaxed),
            unwrap_calls: c.unwrap_calls.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    /// The data-key cache, if the client has one.
    #[must_use]
    pub fn cache(&self) -> Option<&DataKeyCache> {
        self.inner.cache.as_ref()
    }

    /// Fetches an access token now, if the client holds none that is fresh.
    ///
    /// # Errors
    /// [`Error::Broker`] with [`ErrorCode::InvalidClient`] for a wrong id or secret; the
    /// transport and retry errors of every call.
    pub async fn authenticate(&self) -> Result<(), Error> {
        self.access_token().await.map(|_| ())
    }

    /// The access token the client holds now (fetched if needed): for tools and tests that
    /// talk to the broker beside the library.
    ///
    /// # Errors
    /// As [`Client::authenticate`].
    #[doc(hidden)]
    pub async fn access_token_for_tests(&self) -> Result<Zeroizing<String>, Error> {
        let (token, _) = self.access_token().await?;
        Ok(Zeroizing::new(token.as_str().to_owned()))
    }

    /// A fresh data key, wrapped under `context` (and its plaintext with `plaintext: true`).
    ///
    /// # Errors
    /// [`Error::Broker`] (e.g. `invalid_context`, `hsm_unavailable` after the retries), and
    /// the transport errors.
    pub async fn datakey<'a>(
        &self,
        context: impl Into<Option<&'a Context>>,
        plaintext: bool,
    ) -> Result<DataKey, Error> {
        bump(&self.inner.counters.datakey_calls);
        let body = json!({"context": context.into(), "plaintext": plaintext});
        let answer: DataKeyResponse = self.post("/v1/datakey", &body).await?;
        data_key(answer)
    }

    /// Data keys in one request, one per context, results in the same order.
    ///
    /// # Errors
    /// Whole-request failures (`batch_too_large`, `empty_batch`, authentication, transport);
    /// an item's own failure is its entry in the list.
    pub async fn datakey_batch(
        &self,
        contexts: &[Option<&Context>],
        plaintext: bool,
    ) -> Result<Vec<Item<DataKey>>, Error> {
        bump(&self.inner.counters.datakey_calls);
        let items: Vec<Value> = contexts
            .iter()
            .map(|c| json!({"context": c, "plaintext": plaintext}))
            .collect();
        let answer = self.post_batch("/v1/datakey/batch", items).await?;
        Ok(items_of(answer, |v| data_key(parse_item(v)?)))
    }

    /// Wraps caller key material (16 to 64 bytes) under `context`.
    ///
    /// # Errors
    /// [`Error::Broker`] (e.g. `invalid_key_length`), and the transport errors.
    pub async fn wrap<'a>(
        &self,
        plaintext: &[u8],
        context: impl Into<Option<&'a Context>>,
    ) -> Result<Wrapped, Error> {
        let body = wrap_item(plaintext, context.into());
        let answer: WrappedResponse = self.post("/v1/wrap", &body).await?;
        Ok(wrapped(answer))
    }

    /// Wraps several keys in one request, results in order.
    ///
    /// # Errors
    /// As [`Client::datakey_batch`].
    pub async fn wrap_batch(
        &self,
        items: &[(&[u8], Option<&Context>)],
    ) -> Result<Vec<Item<Wrapped>>, Error> {
        let items = items.iter().map(|(p, c)| wrap_item(p, *c)).collect();
        let answer = self.post_batch("/v1/wrap/batch", items).await?;
        Ok(items_of(answer, |v| Ok(wrapped(parse_item(v)?))))
    }

    /// The key material in a blob, given the context it was wrapped under.
    ///
    /// # Errors
    /// [`Error::Broker`] with `context_mismatch` for another context (or another client's or
    /// an altered blob), `invalid_blob`; the transport errors.
    pub async fn unwrap<'a>(
        &self,
        wrapped: &str,
        context: impl Into<Option<&'a Context>>,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        bump(&self.inner.counters.unwrap_calls);
        let body = json!({"wrapped": wrapped, "context": context.into()});
        let answer: UnwrapResponse = self.post("/v1/unwrap", &body).await?;
        unwrapped(answer)
    }

    /// Unwraps several blobs in one request, results in order.
    ///
    /// # Errors
    /// As [`Client::datakey_batch`].
    pub async fn unwrap_batch(
        &self,
        items: &[(&str, Option<&Context>)],
    ) -> Result<Vec<Item<Zeroizing<Vec<u8>>>>, Error> {
        bump(&self.inner.counters.unwrap_calls);
        let items = items
            .iter()
            .map(|(w, c)| json!({"wrapped": w, "context": c}))
            .collect();
        let answer = self.post_batch("/v1/unwrap/batch", items).await?;
        Ok(items_of(answer, |v| unwrapped(parse_item(v)?)))
    }

    /// The same key wrapped under the active master-key version (the plaintext never leaves
    /// the broker).
    ///
    /// # Errors
    /// As [`Client::unwrap`].
    pub async fn rewrap<'a>(
        &self,
        wrapped_key: &str,
        context: impl Into<Option<&'a Context>>,
    ) -> Result<Wrapped, Error> {
        let body = json!({"wrapped": wrapped_key, "context": context.into()});
        let answer: WrappedResponse = self.post("/v1/rewrap", &body).await?;
        Ok(wrapped(answer))
    }

    /// Rewraps several blobs in one request, results in order.
    ///
    /// # Errors
    /// As [`Client::datakey_batch`].
    pub async fn rewrap_batch(
        &self,
        items: &[(&str, Option<&Context>)],
    ) -> Result<Vec<Item<Wrapped>>, Error> {
        let items = items
            .iter()
            .map(|(w, c)| json!({"wrapped": w, "context": c}))
            .collect();
        let answer = self.post_batch("/v1/rewrap/batch", items).await?;
        Ok(items_of(answer, |v| Ok(wrapped(parse_item(v)?))))
    }

    /// Encrypts `plaintext` locally with AES-256-GCM under a data key from the broker (or the
    /// cache), into the envelope of `clients/ENVELOPE.md`, which carries the wrapped key.
    ///
    /// # Errors
    /// The errors of [`Client::datakey`]; [`Error::Random`] if the system has no randomness.
    pub async fn encrypt<'a>(
        &self,
        plaintext: &[u8],
        context: impl Into<Option<&'a Context>>,
    ) -> Result<Vec<u8>, Error> {
        let context = context.into();
        let encoded = envelope::context_encoding(context);
        let len = u64::try_from(plaintext.len()).unwrap_or(u64::MAX);
        let nonce = envelope::fresh_nonce()?;
        if let Some(cache) = &self.inner.cache
            && let Some((dek, wrapped)) = cache.take_for_encrypt(&encoded, len, Instant::now())
        {
            return envelope::seal_with(&*dek, &nonce, &wrapped, plaintext, context);
        }
        let key = self.datakey(context, true).await?;
        let dek = dek_of(key.plaintext.as_deref().map(Vec::as_slice))?;
        let sealed = envelope::seal_with(&*dek, &nonce, &key.wrapped, plaintext, context)?;
        if let Some(cache) = &self.inner.cache {
            cache.put_for_encrypt(&encoded, &dek, &key.wrapped, len, Instant::now());
        }
        Ok(sealed)
    }

    /// Decrypts an envelope from [`Client::encrypt`] (of this library or the Python one),
    /// given the context it was encrypted under: the broker unwraps its key (unless the cache
    /// holds it), then AES-256-GCM opens it locally.
    ///
    /// # Errors
    /// [`Error::Envelope`] for bytes that are not an envelope (before any broker call);
    /// [`Error::Broker`] with `context_mismatch` when the broker refuses the key for this
    /// context; [`Error::EnvelopeAuthentication`] when GCM refuses the message.
    pub async fn decrypt<'a>(
        &self,
        envelope_bytes: &[u8],
        context: impl Into<Option<&'a Context>>,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let context = context.into();
        let parsed = envelope::parse(envelope_bytes)?;
        let encoded = envelope::context_encoding(context);
        if let Some(cache) = &self.inner.cache
            && let Some(dek) = cache.get_for_decrypt(parsed.wrapped, &encoded, Instant::now())
        {
            return envelope::open_parsed(&*dek, &parsed, context);
        }
        let key = self.unwrap(parsed.wrapped, context).await?;
        let dek = dek_of(Some(&key))?;
        let opened = envelope::open_parsed(&*dek, &parsed, context)?;
        if let Some(cache) = &self.inner.cache {
            cache.put_for_decrypt(parsed.wrapped, &encoded, &dek, Instant::now());
        }
        Ok(opened)
    }

    // -----------------------------------------------------------------------------------------
    // Transport

    /// The current access token, fetching a new one when there is none or it is due.
    async fn access_token(&self) -> Result<(Arc<Zeroizing<String>>, u64), Error> {
        let mut slot = self.inner.token.lock().await;
        if let Some(token) = slot.as_ref()
            && !token.due(Instant::now())
        {
            return Ok((token.value.clone(), token.generation));
        }
        let generation = slot.as_ref().map_or(1, |t| t.generation + 1);
        let token = self.fetch_token(generation).await?;
        let out = (token.value.clone(), token.generation);
        *slot = Some(token);
        Ok(out)
    }

    /// Drops the token a 401 was answered for (not a newer one another task already got).
    async fn discard_token(&self, generation: u64) {
        let mut slot = self.inner.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    /// `POST /v1/oauth/token`, client-credentials grant with `client_secret_basic`.
    async fn fetch_token(&self, generation: u64) -> Result<Token, Error> {
        let url = format!("{}/v1/oauth/token", self.inner.base);
        let mut retries = 0;
        loop {
            bump(&self.inner.counters.token_requests);
            let obtained = Instant::now();
            let response = self
                .inner
                .http
                .post(&url)
                .basic_auth(
                    &self.inner.client_id,
                    Some(self.inner.client_secret.as_str()),
                )
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
                .send()
                .await
                .map_err(Error::Transport)?;
            let status = response.status();
            if status.is_success() {
                let mut body =
                    Zeroizing::new(response.bytes().await.map_err(Error::Transport)?.to_vec());
                let parsed: Result<TokenResponse, _> = serde_json::from_slice(&body);
                body.zeroize();
                let mut answer = parsed
                    .map_err(|_| Error::Protocol("a token response without a token".to_owned()))?;
                let value = Arc::new(Zeroizing::new(std::mem::take(&mut answer.access_token)));
                return Ok(Token {
                    value,
                    obtained,
                    lifetime: Duration::from_secs(answer.expires_in),
                    generation,
                });
            }
            if let Some(wait) = self.retry_wait(status, response.headers(), retries) {
                self.pause(wait, &mut retries).await;
                continue;
            }
            return Err(error_of(response).await);
        }
    }

    /// The wait before a retry, if this answer is retried.
    fn retry_wait(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        retries: u32,
    ) -> Option<Duration> {
        if !retry::retryable(status.as_u16()) || retries >= self.inner.max_retries {
            return None;
        }
        let hint = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
        Some(self.inner.backoff.delay(retries, retry::jitter(), hint))
    }

    async fn pause(&self, wait: Duration, retries: &mut u32) {
        bump(&self.inner.counters.retries);
        *retries += 1;
        tokio::time::sleep(wait).await;
    }

    /// A JSON call of the API: bearer token, retries on 503 and 429, one new token on a 401
    /// `invalid_token` (the token may have been revoked or the broker's keys rotated).
    async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, Error> {
        let url = format!("{}{path}", self.inner.base);
        // Serialised once; the copy may hold key material (wrap), so it is wiped afterwards.
        let payload = Zeroizing::new(
            serde_json::to_vec(body).map_err(|e| Error::Protocol(format!("request body: {e}")))?,
        );
        let mut retries = 0;
        let mut renewed = false;
        loop {
            let (token, generation) = self.access_token().await?;
            bump(&self.inner.counters.api_requests);
            let response = self
                .inner
                .http
                .post(&url)
                .bearer_auth(token.as_str())
                .header("content-type", "application/json")
                .body(payload.to_vec())
                .send()
                .await
                .map_err(Error::Transport)?;
            let status = response.status();
            if status.is_success() {
                let mut bytes =
                    Zeroizing::new(response.bytes().await.map_err(Error::Transport)?.to_vec());
                let parsed = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Protocol(format!("{path}: {e}")));
                bytes.zeroize();
                return parsed;
            }
            if status == StatusCode::UNAUTHORIZED && !renewed {
                let error = error_of(response).await;
                if error.code() == Some(&ErrorCode::InvalidToken) {
                    renewed = true;
                    self.discard_token(generation).await;
                    continue;
                }
                return Err(error);
            }
            if let Some(wait) = self.retry_wait(status, response.headers(), retries) {
                self.pause(wait, &mut retries).await;
                continue;
            }
            return Err(error_of(response).await);
        }
    }

    async fn post_batch(&self, path: &str, items: Vec<Value>) -> Result<Vec<Value>, Error> {
        let answer: BatchResponse = self.post(path, &json!({ "items": items })).await?;
        Ok(answer.items)
    }
}

fn wrap_item(plaintext: &[u8], context: Option<&Context>) -> Value {
    json!({"plaintext": STANDARD.encode(plaintext), "context": context})
}

/// A batch's items, each parsed or turned into its error.
fn items_of<T>(items: Vec<Value>, parse: impl Fn(Value) -> Result<T, Error>) -> Vec<Item<T>> {
    items
        .into_iter()
        .map(|item| match item_error(&item) {
            Some(error) => Err(error),
            None => parse(item),
        })
        .collect()
}

/// `{"error": {"code", "message"}}` in place of a result.
fn item_error(item: &Value) -> Option<Error> {
    let error = item.get("error")?;
    let code = ErrorCode::from(
        error
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    Some(Error::Broker {
        status: code.usual_status(),
        message: error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        request_id: error
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        code,
    })
}

fn parse_item<T: DeserializeOwned>(item: Value) -> Result<T, Error> {
    serde_json::from_value(item).map_err(|e| Error::Protocol(format!("batch item: {e}")))
}

fn data_key(mut answer: DataKeyResponse) -> Result<DataKey, Error> {
    let plaintext = match answer.plaintext.as_mut() {
        Some(text) => {
            let key = decode_secret(text)?;
            text.zeroize();
            Some(key)
        }
        None => None,
    };
    Ok(DataKey {
        plaintext,
        wrapped: answer.wrapped,
        mk_version: answer.mk_version,
    })
}

fn wrapped(answer: WrappedResponse) -> Wrapped {
    Wrapped {
        wrapped: answer.wrapped,
        mk_version: answer.mk_version,
    }
}

fn unwrapped(mut answer: UnwrapResponse) -> Result<Zeroizing<Vec<u8>>, Error> {
    let key = decode_secret(&answer.plaintext);
    answer.plaintext.zeroize();
    key
}

fn decode_secret(text: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    STANDARD
        .decode(text)
        .map(Zeroizing::new)
        .map_err(|_| Error::Protocol("key material that is not base64".to_owned()))
}

/// A 32-byte data key out of the broker's answer.
fn dek_of(bytes: Option<&[u8]>) -> Result<Dek, Error> {
    let bytes = bytes.ok_or(Error::InvalidDataKey)?;
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(Error::InvalidDataKey);
    }
    dek.copy_from_slice(bytes);
    Ok(dek)
}

/// The broker's error shape (`{"error": {"code", "message", "request_id"}}`), or RFC 6749's at
/// the token endpoint (`{"error", "error_description"}`), as an [`Error::Broker`].
async fn error_of(response: reqwest::Response) -> Error {
    let status = response.status().as_u16();
    let header_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let (code, message, body_id) = match body.get("error") {
        Some(Value::Object(e)) => (
            e.get("code").and_then(Value::as_str),
            e.get("message").and_then(Value::as_str),
            e.get("request_id").and_then(Value::as_str),
        ),
        Some(Value::String(code)) => (
            Some(code.as_str()),
            body.get("error_description").and_then(Value::as_str),
            None,
        ),
        _ => (None, None, None),
    };
    Error::Broker {
        status,
        code: ErrorCode::from(code.unwrap_or("unknown")),
        message: message.map_or_else(
            || format!("HTTP {status} without the error shape"),
            str::to_owned,
        ),
        request_id: body_id.map(str::to_owned).or(header_id),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_token_is_renewed_with_30_s_or_a_fifth_of_its_life_left() {
        let t = Instant::now();
        let five_min = Duration::from_secs(300);
        // 20 % of 300 s is 60 s, more than 30 s.
        assert!(!renewal_due(t, five_min, t + Duration::from_secs(239)));
        assert!(renewal_due(t, five_min, t + Duration::from_secs(240)));
        // 20 % of 100 s is 20 s: the 30 s floor wins.
        let hundred = Duration::from_secs(100);
        assert!(!renewal_due(t, hundred, t + Duration::from_secs(69)));
        assert!(renewal_due(t, hundred, t + Duration::from_secs(70)));
        // A 20 s token is used for half its life, not refetched at once.
        let twenty = Duration::from_secs(20);
        assert!(!renewal_due(t, twenty, t + Duration::from_secs(9)));
        assert!(renewal_due(t, twenty, t + Duration::from_secs(10)));
    }

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://kb.example:8443").is_ok());
        assert!(check_url("http://127.0.0.1:8080").is_ok());
        assert!(check_url("http://[::1]:8080").is_ok());
        assert!(check_url("http://localhost:8080").is_ok());
        assert!(check_url("http://kb.example").is_err());
        assert!(check_url("ftp://127.0.0.1").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn nothing_secret_in_debug() {
        let builder = Client::builder("https://127.0.0.1:1", "id-1", "s3cr3t-value");
        assert!(!format!("{builder:?}").contains("s3cr3t"));
        let client = builder.build().unwrap();
        let text = format!("{client:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("id-1"), "{text}");
        let key = DataKey {
            plaintext: Some(Zeroizing::new(vec![0xab; 32])),
            wrapped: "kb:v1:1:x".to_owned(),
            mk_version: 1,
        };
        let text = format!("{key:?}");
        assert!(
            text.contains("<redacted>") && !text.contains("171"),
            "{text}"
        );
    }

    #[test]
    fn client_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<Client>();
        check::<DataKeyCache>();
    }

    #[test]
    fn batch_items_become_results_or_typed_errors() {
        let items = vec![
            json!({"wrapped": "kb:v1:1:a", "mk_version": 1}),
            json!({"error": {"code": "context_mismatch", "message": "no"}}),
            json!({"error": {"code": "new_code", "message": "?"}}),
        ];
        let out = items_of(items, |v| Ok(wrapped(parse_item(v)?)));
        assert_eq!(out[0].as_ref().unwrap().mk_version, 1);
        match &out[1] {
            Err(Error::Broker { status, code, .. }) => {
                assert_eq!((*status, code), (422, &ErrorCode::ContextMismatch));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            out[2].as_ref().unwrap_err().code(),
            Some(&ErrorCode::Other("new_code".to_owned()))
        );
    }

    #[test]
    fn a_data_key_must_be_32_bytes() {
        assert!(dek_of(Some(&[0u8; 32])).is_ok());
        assert!(matches!(
            dek_of(Some(&[0u8; 16])),
            Err(Error::InvalidDataKey)
        ));
        assert!(matches!(dek_of(None), Err(Error::InvalidDataKey)));
    }
}
