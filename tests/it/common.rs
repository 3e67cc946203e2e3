//! Shared set-up: the environment `scripts/test.sh` exports, a fresh database per test, the
//! broker served in-process over TLS on a free port, and an HTTPS client that trusts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keybroker::broker::{Broker, Limits};
use keybroker::hsm::{Hsm, HsmConfig};
use keybroker::server::RunningServer;
use keybroker::store::Store;
use keybroker::tls;
use secrecy::SecretString;
use serde_json::Value;

/// A variable `scripts/test.sh` exports.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the suite through ./scripts/test.sh"))
}

pub fn pkcs11_module() -> PathBuf {
    PathBuf::from(env("PKCS11_MODULE"))
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

/// A new, empty database on the test cluster; returns its URL.
pub async fn fresh_database() -> String {
    let admin_url = env("DATABASE_URL");
    let name = format!("kb_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    // The name is ours (a UUID), not input.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// A dev CA and server certificate for this test process (made once, then reused).
pub fn dev_certificate() -> tls::DevCertificate {
    static CERT: std::sync::OnceLock<tls::DevCertificate> = std::sync::OnceLock::new();
    CERT.get_or_init(|| tls::ensure_dev_certificate(&scratch_dir("tls")).unwrap())
        .clone()
}

/// An HTTPS client that trusts only the dev CA.
pub fn https_client() -> reqwest::Client {
    tls::install_crypto_provider();
    let ca_pem = std::fs::read(dev_certificate().ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

/// The broker, served in-process over TLS, on its own database.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub broker: Arc<Broker>,
    server: Option<RunningServer>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Limits { max_batch: 1000 }, 1024 * 1024).await
    }

    pub async fn start_with(limits: Limits, max_body_bytes: usize) -> Self {
        tls::install_crypto_provider();
        let store = Store::connect_lazy(&fresh_database().await, 4).unwrap();
        store.migrate().await.unwrap();
        let hsm = Hsm::connect(hsm_config()).await.unwrap();
        let broker = Arc::new(Broker::new(hsm, store, limits));
        broker.initialise().await.unwrap();
        let cert = dev_certificate();
        let tls_config = tls::server_config(&cert.cert, &cert.key).unwrap();
        let server = RunningServer::start(
            broker.clone(),
            "127.0.0.1:0".parse().unwrap(),
            tls_config,
            max_body_bytes,
        )
        .await
        .unwrap();
        Self {
            base: format!("https://127.0.0.1:{}", server.addr.port()),
            client: https_client(),
            broker,
            server: Some(server),
        }
    }

    /// POSTs a JSON body; returns status and parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    /// POSTs raw bytes with a content type.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        read(response).await
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.unwrap();
        }
    }
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
