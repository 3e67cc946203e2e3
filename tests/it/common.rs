//! Shared set-up: the environment `scripts/test.sh` exports, a fresh database per test, the
//! broker served in-process over TLS on a free port, and an HTTPS client that trusts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keybroker::auth::{AuthConfig, Authenticator, ClientSpec, IpPolicy};
use keybroker::broker::{Broker, Limits};
use keybroker::cli::serve::{self, ServeOptions, Serving};
use keybroker::hsm::{Hsm, HsmConfig};
use keybroker::store::Store;
use keybroker::tls;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::Connection;

/// A variable `scripts/test.sh` exports.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the suite through ./scripts/test.sh"))
}

pub fn pkcs11_module() -> PathBuf {
    PathBuf::from(env("PKCS11_MODULE"))
}

/// The real token's module. In a run under an emulated vendor behaviour (`scripts/test.sh`'s
/// `softhsm+iv-token` and the like), `PKCS11_MODULE` is the fault-injecting module and this is
/// the module it forwards to; otherwise the two are the same.
pub fn real_pkcs11_module() -> PathBuf {
    std::env::var("KB_FAULTS_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| pkcs11_module())
}

/// The fault-module lines of this run's emulated vendor behaviour (e.g. `gcm_iv = token`), which
/// every control file a fault test writes must start with; empty in a plain run.
pub fn vendor_faults() -> String {
    std::env::var("KB_TEST_VENDOR_FAULTS").unwrap_or_default()
}

pub fn token_label() -> String {
    env("KEYBROKER_TOKEN_LABEL")
}

pub fn user_pin() -> String {
    env("KEYBROKER_PIN")
}

pub fn hsm_config() -> HsmConfig {
    HsmConfig {
        module: pkcs11_module(),
        token_label: token_label(),
        pin: SecretString::from(user_pin()),
        pool_size: 2,
        op_timeout: Duration::from_secs(10),
    }
}

/// Server logs go to the test output (RUST_LOG), so `scripts/test.sh` can check the whole
/// run's log for secrets.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A scratch folder for this test process.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keybroker-it-{}-{}-{}",
        std::process::id(),
        name,
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new database on the test cluster, for this test alone, with the migrations applied;
/// returns its URL. It is a copy of a migrated template (a file copy, cheaper than running the
/// migrations again), and it is dropped when this test process ends, however it ends: nextest
/// runs each test in a process of its own, so that is the end of the test.
pub async fn fresh_database() -> String {
    /// The droppers, their pipes kept open (never written to) until the process ends.
    static DROPPERS: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());
    let (url, dropper) = database_with_dropper().await;
    DROPPERS.lock().unwrap().push(dropper);
    url
}

/// As [`fresh_database`], with the process that drops the database once its stdin is closed:
/// when the caller drops that pipe, or at the latest when this process ends (the kernel closes
/// it then, however the process ends, and children we spawn do not inherit it).
pub async fn database_with_dropper() -> (String, std::process::Child) {
    let admin_url = env("DATABASE_URL");
    let template = migrated_template(&admin_url).await;
    let name = format!("kb_test_{}", uuid::Uuid::new_v4().simple());
    // The dropper first, so that no database of ours exists without one.
    let dropper = dropper(&admin_url, &name);
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    // The names are ours (a UUID, a hash), not input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE {template}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    (database_url(&admin_url, &name), dropper)
}

/// The URL of database `name` on the cluster of `admin_url`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// The name of the template that test databases are copied from: one per set of migrations (a
/// hash of their versions and checksums), so a cluster kept between runs never hands out a
/// template older than the code.
fn template_name() -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for migration in sqlx::migrate!("./migrations").iter() {
        hash.update(migration.version.to_be_bytes());
        hash.update(&*migration.checksum);
    }
    let hex: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("kb_template_{hex}")
}

/// Whether database `name` exists on the cluster `admin` is connected to.
pub async fn database_exists(admin: &mut sqlx::PgConnection, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// The migrated template on the cluster of `admin_url`, made by the first test process that
/// needs it while the others wait (a Postgres advisory lock: tests run in processes of their
/// own). It takes no connections once made, since a database someone is connected to cannot be
/// copied.
async fn migrated_template(admin_url: &str) -> String {
    /// The advisory lock key of making the template (any number nothing else uses).
    const TEMPLATE_LOCK: i64 = 0x6b62_7465_6d70;
    let template = template_name();
    let mut admin = sqlx::PgConnection::connect(admin_url).await.unwrap();
    if !database_exists(&mut admin, &template).await {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut admin)
            .await
            .unwrap();
        if !database_exists(&mut admin, &template).await {
            // Made under another name and renamed when complete, so no test ever copies a
            // half-migrated template (a maker that died leaves only the other name behind).
            let building = format!("{template}_building");
            for statement in [
                format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
                format!("CREATE DATABASE {building}"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut admin)
                    .await
                    .unwrap();
            }
            let pool = sqlx::PgPool::connect(&database_url(admin_url, &building))
                .await
                .unwrap();
            sqlx::migrate!("./migrations").run(&pool).await.unwrap();
            pool.close().await;
            // (Postgres waits a few seconds for the pool's sessions to end before it renames.)
            for statement in [
                format!("ALTER DATABASE {building} ALLOW_CONNECTIONS false"),
                format!("ALTER DATABASE {building} RENAME TO {template}"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut admin)
                    .await
                    .unwrap();
            }
        }
    }
    // Closing the session releases the lock, if we took it.
    admin.close().await.unwrap();
    template
}

/// A small shell that waits for the end of its stdin (a pipe only we hold), then drops database
/// `name` with `psql`, terminating any session still on it (a child server the test left
/// behind). The drop (a checkpoint, in Postgres 15) so runs beside the next test instead of
/// inside this one. In a process group of its own, so that a signal to the test's group (a
/// nextest timeout) does not stop it; what it prints goes to a log in `KB_TEST_WORK`, which
/// `scripts/test.sh` shows if a database is left over.
fn dropper(admin_url: &str, name: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let log = match std::env::var("KB_TEST_WORK") {
        Ok(work) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(PathBuf::from(work).join("dropped-databases.log"))
            .map(std::process::Stdio::from)
            .unwrap(),
        Err(_) => std::process::Stdio::null(),
    };
    std::process::Command::new("sh")
        .args([
            "-c",
            r#"cat >/dev/null; exec psql -X -q -v ON_ERROR_STOP=1 -d "$1" -c "$2""#,
            "drop-test-database",
            admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the dropper of a test database (sh, psql): {e}"))
}

/// A dev CA and server certificate for this test process (made once, then reused).
pub fn dev_certificate() -> tls::DevCertificate {
    static CERT: std::sync::OnceLock<tls::DevCertificate> = std::sync::OnceLock::new();
    CERT.get_or_init(|| tls::ensure_dev_certificate(&scratch_dir("tls")).unwrap())
        .clone()
}

/// An HTTPS client that trusts only the dev CA.
pub fn https_client() -> reqwest::Client {
    https_client_from(None)
}

/// An HTTPS client that trusts only the dev CA and connects from `local` (any 127.0.0.0/8
/// address works on loopback).
pub fn https_client_from(local: Option<std::net::IpAddr>) -> reqwest::Client {
    tls::install_crypto_provider();
    let ca_pem = std::fs::read(dev_certificate().ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/2, as most clients negotiate: an early 413 then arrives as a response, not as a
    // reset of a half-sent HTTP/1.1 body.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .local_address(local)
        .build()
        .unwrap()
}

/// How long a test waits for something another task or process does in its own time (a
/// maintenance pass, a refresh, a log writer, a server starting or stopping), polling for it:
/// long enough for CI's loaded two-core machine, where seconds can pass between two steps. No
/// test sleeps a guessed time and then asserts; it polls until the condition holds or this has
/// passed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How often test servers write partial request-log batches: never, in practice.
pub const REQUEST_LOG_FLUSH: Duration = Duration::from_secs(3600);

/// Time between test servers' maintenance passes: only the start-up pass runs, in practice.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);

/// The `iss` of test tokens; the token endpoint a client assertion names is this plus
/// `/v1/oauth/token`.
pub const TEST_ISSUER: &str = "https://keybroker.test";

/// A registered client and a token for it.
#[derive(Debug, Clone)]
pub struct TestClient {
    pub id: String,
    pub secret: String,
    pub token: String,
}

/// The broker, served in-process over TLS, on its own database, with a client holding every
/// scope whose token `post`/`get` send.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub broker: Arc<Broker>,
    pub auth: Arc<Authenticator>,
    pub database_url: String,
    /// The test database, for setting up and checking what the API does not show (the
    /// broker keeps its own store to itself).
    pub store: Store,
    /// Holds every scope, from anywhere.
    pub main: TestClient,
    /// The rate limiter, and how far its clock is ahead of real time (ms): tests move it.
    pub limiter: Arc<keybroker::api::limits::Limiter>,
    pub clock_offset_ms: Arc<std::sync::atomic::AtomicI64>,
    server: Option<Serving>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Limits { max_batch: 1000 }, 1024 * 1024).await
    }

    pub async fn start_with(limits: Limits, max_body_bytes: usize) -> Self {
        Self::start_on(&fresh_database().await, limits, max_body_bytes).await
    }

    /// Serves with the given connection limits.
    pub async fn start_with_listener(listener: keybroker::listener::ListenerLimits) -> Self {
        let url = fresh_database().await;
        Self::start_full(&url, Limits { max_batch: 1000 }, 1024 * 1024, listener).await
    }

    /// Serves on the database at `database_url` (already created).
    pub async fn start_on(database_url: &str, limits: Limits, max_body_bytes: usize) -> Self {
        let listener = keybroker::listener::ListenerLimits::default();
        Self::start_full(database_url, limits, max_body_bytes, listener).await
    }

    async fn start_full(
        database_url: &str,
        limits: Limits,
        max_body_bytes: usize,
        listener: keybroker::listener::ListenerLimits,
    ) -> Self {
        tls::install_crypto_provider();
        init_logging();
        let store = Store::connect_lazy(database_url, 4).unwrap();
        store.migrate().await.unwrap();
        let hsm = Hsm::connect(hsm_config()).await.unwrap();
        let broker = Arc::new(Broker::new(hsm, store.clone(), limits));
        broker.initialise().await.unwrap();
        let clock_offset_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let offset = clock_offset_ms.clone();
        let cert = dev_certificate();
        // What `keybroker serve` runs, with test timings.
        let options = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: tls::server_config(&cert.cert, &cert.key).unwrap(),
            max_body_bytes,
            listener,
            auth: auth_config(),
            // Custody gauges kept fresh quickly, for tests.
            metrics_refresh: Duration::from_secs(1),
            // Rows are written at shutdown (or in full batches), not on a timer, so a test
            // that reads the log after `stop` sees the shutdown flush at work.
            request_log_flush: REQUEST_LOG_FLUSH,
            maintenance_interval: MAINTENANCE_INTERVAL,
            request_log_retention_days: 7,
            clock: Arc::new(move || {
                keybroker::audit::now_us() / 1000 + offset.load(std::sync::atomic::Ordering::SeqCst)
            }),
        };
        let server = serve::start(broker, options).await.unwrap();
        // The start-up pass must not race with what the test does first (tests run their own
        // passes, at the times they choose).
        server.maintenance_passes(1).await;
        let mut this = Self {
            base: format!("https://127.0.0.1:{}", server.addr.port()),
            client: https_client(),
            broker: server.broker.clone(),
            auth: server.auth.clone(),
            database_url: database_url.to_owned(),
            store,
            limiter: server.limiter.clone(),
            clock_offset_ms,
            main: TestClient {
                id: String::new(),
                secret: String::new(),
                token: String::new(),
            },
            server: Some(server),
        };
        this.main = this
            .register(
                "main",
                IpPolicy::Any,
                "datakey wrap unwrap rewrap random keys:* secrets:* admin",
            )
            .await;
        this
    }

    /// Registers a client (through the library, as the CLI does) and gets it a token over
    /// HTTPS with client_secret_post.
    pub async fn register(&self, name: &str, ip_policy: IpPolicy, scopes: &str) -> TestClient {
        let (mode, addresses) = match &ip_policy {
            IpPolicy::Any => ("none", Vec::new()),
            IpPolicy::Strict(nets) => ("strict", nets.iter().map(ToString::to_string).collect()),
        };
        let spec = ClientSpec::new(name.to_owned(), mode, &addresses, scopes, None).unwrap();
        let (client, secret) = self.auth.register(spec).await.unwrap();
        let id = client.id.to_string();
        let secret = secret.expose().to_owned();
        let token = self.token_for(&id, &secret, &self.client).await;
        TestClient { id, secret, token }
    }

    /// A token for a client, asked for over `http` (which may be bound to another address).
    pub async fn token_for(&self, id: &str, secret: &str, http: &reqwest::Client) -> String {
        let response = http
            .post(format!("{}/v1/oauth/token", self.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 200, "token endpoint: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// POSTs a JSON body as the main client; returns status and parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_as(&self.main.token, path, body).await
    }

    /// POSTs a JSON body with a bearer token (none when empty).
    pub async fn post_as(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        send_json(&self.client, reqwest::Method::POST, url, token, Some(body)).await
    }

    /// POSTs a body the server refuses before reading it all (over the size limit). The server
    /// answers at once; a client still sending may then see its stream reset before it reads
    /// that answer, which is a transport race, not the server's verdict, so we send again.
    pub async fn post_oversized(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut last_error = None;
        for _ in 0..5 {
            match self
                .client
                .post(format!("{}{path}", self.base))
                .bearer_auth(&self.main.token)
                .json(body)
                .send()
                .await
            {
                Ok(response) => return read(response).await,
                Err(e) => last_error = Some(e),
            }
        }
        panic!("no answer to an oversized body: {last_error:?}")
    }

    /// POSTs raw bytes with a content type.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.main.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    /// GETs as the main client.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(&self.main.token, path).await
    }

    /// GETs with a bearer token (none when empty).
    pub async fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        send_json(&self.client, reqwest::Method::GET, url, token, None).await
    }

    /// Lets failed authentications go unthrottled, for tests that fail on purpose many times
    /// in a row at the token endpoint (the throttle has tests of its own).
    pub async fn lift_auth_throttle(&self) {
        let settings = keybroker::broker::SecuritySettings {
            auth_failures_per_client: 1_000_000,
            auth_failures_per_source: 1_000_000,
            ..keybroker::broker::SecuritySettings::default()
        };
        let url = format!("{}/v1/admin/security-settings", self.base);
        let body = serde_json::to_value(settings).unwrap();
        let (status, body) = send_json(
            &self.client,
            reqwest::Method::PUT,
            url,
            &self.main.token,
            Some(&body),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
}

/// The token settings of test servers.
pub fn auth_config() -> AuthConfig {
    AuthConfig {
        issuer: TEST_ISSUER.to_owned(),
        audience: "keybroker".to_owned(),
        token_ttl: Duration::from_secs(300),
        leeway: 5,
        trusted_proxies: Vec::new(),
        refusal_window: Duration::from_secs(60),
        cache_max_age: keybroker::auth::DEFAULT_CACHE_MAX_AGE,
        console_idle: Duration::from_secs(900),
        console_absolute: Duration::from_secs(28_800),
    }
}

/// Sends `method` to `url` with a bearer token (none when empty) and an optional JSON body:
/// the status and the parsed body.
pub async fn send_json(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = http.request(method, url);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    read(request.send().await.unwrap()).await
}

pub async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "status {status}: body is not JSON: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// Asserts the error shape and returns the code.
pub fn error_code(body: &Value) -> &str {
    let error = &body["error"];
    assert!(error["message"].is_string(), "no message in {body}");
    assert!(error["request_id"].is_string(), "no request id in {body}");
    error["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code in {body}"))
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// The single number a `SELECT count(*) …` answers.
pub async fn count(pool: &sqlx::PgPool, query: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(query).fetch_one(pool).await.unwrap();
    n
}
