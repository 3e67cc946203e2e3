//! The real `keybroker` binary as a child process: a token that goes away and comes back, and a
//! captured log that must hold no key material and no PIN.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    b64, dev_certificate, env, error_code, fresh_database, https_client, read, scratch_dir,
    user_pin,
};

struct ChildServer {
    child: Child,
    base: String,
    log: PathBuf,
    client: reqwest::Client,
    /// The bootstrap admin's secret, from the credentials file `hsm init` wrote.
    admin_secret: String,
    token: String,
}

impl ChildServer {
    /// `keybroker hsm init` then `keybroker serve`, with the given SoftHSM2 config.
    async fn start(softhsm_conf: &Path, log: PathBuf) -> Self {
        let database_url = fresh_database().await;
        let cert = dev_certificate();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let command = |args: &[&str]| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybroker"));
            cmd.args(args)
                .env("SOFTHSM2_CONF", softhsm_conf)
                .env("DATABASE_URL", &database_url)
                .env("KEYBROKER_TLS_CERT", &cert.cert)
                .env("KEYBROKER_TLS_KEY", &cert.key)
                .env("KEYBROKER_LISTEN", format!("127.0.0.1:{port}"))
                .env("KEYBROKER_HSM_TIMEOUT_MS", "3000")
                .env("RUST_LOG", "trace");
            cmd
        };
        let credentials = log.with_file_name("admin-credentials.json");
        let init = command(&["hsm", "init", "--admin-credentials-out"])
            .arg(&credentials)
            .output()
            .unwrap();
        assert!(init.status.success(), "{init:?}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&credentials).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "credentials readable by others");
        let credentials: Value =
            serde_json::from_slice(&std::fs::read(&credentials).unwrap()).unwrap();
        let log_file = std::fs::File::create(&log).unwrap();
        let child = command(&["serve"])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            base: format!("https://127.0.0.1:{port}"),
            log,
            client: https_client(),
            admin_secret: credentials["client_secret"].as_str().unwrap().to_owned(),
            token: String::new(),
        };
        server
            .wait_for("/healthz", 200, Duration::from_secs(30))
            .await;
        // client_secret_basic, as most OAuth libraries send it.
        let response = server
            .client
            .post(format!("{}/v1/oauth/token", server.base))
            .basic_auth(
                credentials["client_id"].as_str().unwrap(),
                Some(&server.admin_secret),
            )
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 200, "{body}");
        server.token = body["access_token"].as_str().unwrap().to_owned();
        server
    }

    async fn request(&self, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let request = match body {
            Some(body) => self.client.post(url).json(body),
            None => self.client.get(url),
        };
        read(request.bearer_auth(&self.token).send().await.unwrap()).await
    }

    /// Polls `path` until it answers `status` (a readiness probe's loop, not a timing test).
    async fn wait_for(&self, path: &str, status: u16, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let url = format!("{}{path}", self.base);
            if let Ok(response) = self.client.get(url).send().await {
                let (got, body) = read(response).await;
                if got == status {
                    return body;
                }
            }
            assert!(start.elapsed() < limit, "{path} never answered {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the whole log. It waits asynchronously: our HTTP/2 connections must keep
    /// answering the server's shutdown handshake, or it waits out its whole grace period.
    async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                panic!("the server did not stop on SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for ChildServer {
    // A failed assertion must not leave the server running after the test process ends.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private copy of the test token, so breaking it cannot disturb other tests.
fn private_token_copy() -> (PathBuf, PathBuf) {
    let dir = scratch_dir("token");
    let tokens = dir.join("tokens");
    let source = PathBuf::from(env("KB_TEST_SOFTHSM_DIR")).join("tokens");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&source)
        .arg(&tokens)
        .status()
        .unwrap();
    assert!(status.success());
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    (conf, tokens)
}

#[tokio::test]
async fn a_lost_token_gives_503_and_service_returns_without_a_restart() {
    let (conf, tokens) = private_token_copy();
    let server = ChildServer::start(&conf, scratch_dir("outage").join("server.log")).await;
    server
        .wait_for("/readyz", 200, Duration::from_secs(10))
        .await;
    let (status, key) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{key}");

    // The token's storage disappears (as a removed device or an unmounted volume would).
    let away = tokens.with_extension("away");
    std::fs::rename(&tokens, &away).unwrap();
    let ready = server
        .wait_for("/readyz", 503, Duration::from_secs(10))
        .await;
    assert_eq!(ready["checks"]["token"], "hsm_unavailable", "{ready}");
    assert_eq!(ready["checks"]["database"], "ok", "{ready}");
    for (path, body) in [
        ("/v1/datakey", json!({})),
        ("/v1/unwrap", json!({"wrapped": key["wrapped"]})),
        ("/v1/wrap", json!({"plaintext": b64(&[3u8; 32])})),
    ] {
        let (status, body) = server.request(path, Some(&body)).await;
        assert_eq!(
            (status, error_code(&body)),
            (503, "hsm_unavailable"),
            "{path}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("CKR_") && !message.contains("PKCS"),
            "{message}"
        );
    }

    // It comes back; so does the service, by itself.
    std::fs::rename(&away, &tokens).unwrap();
    server
        .wait_for("/readyz", 200, Duration::from_secs(20))
        .await;
    let (status, body) = server
        .request("/v1/unwrap", Some(&json!({"wrapped": key["wrapped"]})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plaintext"], key["plaintext"]);
    let (status, _) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_whole_session_log_holds_no_key_material_and_no_pin() {
    let (conf, _tokens) = private_token_copy();
    let server = ChildServer::start(&conf, scratch_dir("logs").join("server.log")).await;
    let mut secrets: Vec<String> = Vec::new();
    let remember = |secrets: &mut Vec<String>, bytes: &[u8]| {
        secrets.push(b64(bytes));
        secrets.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
    };

    let (_, key) = server
        .request("/v1/datakey", Some(&json!({"context": {"a": "b"}})))
        .await;
    let dek = crate::common::unb64(key["plaintext"].as_str().unwrap());
    remember(&mut secrets, &dek);

    let material: Vec<u8> = (100u8..148).collect();
    remember(&mut secrets, &material);
    let (_, wrapped) = server
        .request("/v1/wrap", Some(&json!({"plaintext": b64(&material)})))
        .await;
    let (status, _) = server
        .request("/v1/unwrap", Some(&json!({"wrapped": wrapped["wrapped"]})))
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request(
            "/v1/rewrap",
            Some(&json!({"wrapped": key["wrapped"], "context": {"a": "b"}})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, batch) = server
        .request("/v1/datakey/batch", Some(&json!({"items": [{}, {}]})))
        .await;
    for item in batch["items"].as_array().unwrap() {
        remember(
            &mut secrets,
            &crate::common::unb64(item["plaintext"].as_str().unwrap()),
        );
    }
    // Refused requests that carry key material in the wrong place.
    let odd: Vec<u8> = (1u8..=20).map(|b| b * 11).collect();
    remember(&mut secrets, &odd);
    for body in [
        json!({"plaintext": b64(&odd), "unexpected": true}),
        json!({"plaintext": b64(&odd), "context": 5}),
        json!({"plaintext": b64(&[odd.as_slice(), odd.as_slice(), odd.as_slice(), odd.as_slice()].concat())}),
    ] {
        let (status, _) = server.request("/v1/wrap", Some(&body)).await;
        assert!((400..500).contains(&status));
    }
    // A wrong type makes serde quote the value back to the caller; it must not reach the log.
    let (status, body) = server
        .request("/v1/datakey", Some(&json!({"plaintext": b64(&odd)})))
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected a boolean")
    );
    let (status, _) = server
        .request(
            "/v1/unwrap",
            Some(&json!({"wrapped": wrapped["wrapped"], "context": {"x": "y"}})),
        )
        .await;
    assert_eq!(status, 422);

    // Secrets of the session itself: the admin's client secret and access token.
    secrets.push(server.admin_secret.clone());
    secrets.push(server.token.clone());
    let log = server.stop().await;
    assert!(log.contains("serving https"), "the log was captured: {log}");
    assert!(log.contains("request refused"), "refusals are logged");
    assert!(!log.contains(&user_pin()), "the PIN appears in the log");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "key material {secret} appears in the log"
        );
    }
}
