//! The real `keybroker` binary as a child process, for tests that need their own token copy
//! (they break it) or the server's whole log: `hsm init` with the bootstrap admin's credentials
//! written to a file, then `serve` at trace level, on a fresh database.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    PATIENCE, b64, dev_certificate, error_code, fresh_database, https_client, read, send_json,
};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls the child's `/healthz` until it answers 200. `Err` with its whole log when it exits
/// first or does not answer within `limit`.
async fn wait_until_serving(
    child: &mut Child,
    port: u16,
    log: &std::path::Path,
    limit: Duration,
) -> Result<(), String> {
    let client = https_client();
    let start = Instant::now();
    loop {
        let url = format!("https://127.0.0.1:{port}/healthz");
        if let Ok(response) = client.get(url).send().await
            && response.status() == 200
        {
            return Ok(());
        }
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("{}\n(exited: {status})", log_text()));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{}\n(no answer within {limit:?})", log_text()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `keybroker serve` child process, logged in as the bootstrap admin.
pub struct ChildServer {
    child: Child,
    base: String,
    log: PathBuf,
    client: reqwest::Client,
    /// The bootstrap admin's id and secret, from the credentials file `hsm init` wrote.
    pub admin_id: String,
    pub admin_secret: String,
    pub token: String,
    /// The child's own database.
    pub database_url: String,
}

impl ChildServer {
    /// `keybroker hsm init` then `keybroker serve`, on the token storage that `token` (an
    /// environment variable, see [`crate::token::PrivateToken::env`]) names.
    pub async fn start(token: (&str, String), log: PathBuf) -> Self {
        Self::start_with_env(token, log, &[]).await
    }

    /// As [`ChildServer::start`], with more environment variables for both commands.
    pub async fn start_with_env(
        token: (&str, String),
        log: PathBuf,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::launch(token, log, extra, None, None).await
    }

    /// As [`ChildServer::start_with_env`], on the database at `database_url` (which exists and
    /// may be on another cluster than the suite's).
    pub async fn start_on_database(
        token: (&str, String),
        log: PathBuf,
        extra: &[(&str, &str)],
        database_url: &str,
    ) -> Self {
        Self::launch(token, log, extra, None, Some(database_url)).await
    }

    /// A second broker on `first`'s database (and the token `token` names, which must be the
    /// same token), logged in with `first`'s admin credentials.
    pub async fn start_beside(
        first: &ChildServer,
        token: (&str, String),
        log: PathBuf,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::launch(token, log, extra, Some(first), None).await
    }

    async fn launch(
        token: (&str, String),
        log: PathBuf,
        extra: &[(&str, &str)],
        beside: Option<&ChildServer>,
        database: Option<&str>,
    ) -> Self {
        let database_url = match (beside, database) {
            (Some(first), _) => first.database_url.clone(),
            (None, Some(url)) => url.to_owned(),
            (None, None) => fresh_database().await,
        };
        let cert = dev_certificate();
        let mut port = free_port();
        let command = |args: &[&str], port: u16| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybroker"));
            cmd.args(args)
                .env(token.0, &token.1)
                .env("DATABASE_URL", &database_url)
                .env("KEYBROKER_TLS_CERT", &cert.cert)
                .env("KEYBROKER_TLS_KEY", &cert.key)
                .env("KEYBROKER_LISTEN", format!("127.0.0.1:{port}"))
                .env("KEYBROKER_HSM_TIMEOUT_MS", "3000")
                .env("RUST_LOG", "trace")
                .envs(extra.iter().copied());
            cmd
        };
        let credentials: Value = match beside {
            Some(first) => serde_json::json!({
                "client_id": first.admin_id,
                "client_secret": first.admin_secret,
            }),
            None => {
                let credentials = log.with_file_name("admin-credentials.json");
                let init = command(&["hsm", "init", "--admin-credentials-out"], port)
                    .arg(&credentials)
                    .output()
                    .unwrap();
                assert!(init.status.success(), "{init:?}");
                let mode = std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(&credentials).unwrap().permissions(),
                );
                assert_eq!(mode & 0o777, 0o600, "credentials readable by others");
                serde_json::from_slice(&std::fs::read(&credentials).unwrap()).unwrap()
            }
        };
        // The port was free when picked, but another process can take it before the child binds
        // it: then the child exits with its bind error and gets another port.
        let mut attempts = 0;
        let child = loop {
            attempts += 1;
            let log_file = std::fs::File::create(&log).unwrap();
            let mut child = command(&["serve"], port)
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap();
            match wait_until_serving(&mut child, port, &log, PATIENCE).await {
                Ok(()) => break child,
                Err(log_text) if attempts < 3 && log_text.contains("Address already in use") => {
                    port = free_port();
                }
                Err(log_text) => panic!(
                    "the server on port {port} did not start; the end of its log:\n{}",
                    tail(&log_text, 40)
                ),
            }
        };
        let mut server = Self {
            child,
            base: format!("https://127.0.0.1:{port}"),
            log,
            client: https_client(),
            admin_id: credentials["client_id"].as_str().unwrap().to_owned(),
            admin_secret: credentials["client_secret"].as_str().unwrap().to_owned(),
            token: String::new(),
            database_url: database_url.clone(),
        };
        let (status, body) = server.issue_admin_token().await;
        assert_eq!(status, 200, "{body}");
        server.token = body["access_token"].as_str().unwrap().to_owned();
        server
    }

    /// A token request as the bootstrap admin (client_secret_basic, as most OAuth libraries
    /// send it): the status and the body.
    pub async fn issue_admin_token(&self) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/v1/oauth/token", self.base))
            .basic_auth(&self.admin_id, Some(&self.admin_secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        read(response).await
    }

    /// Registers a client with `scopes` and no address policy, through the admin API, and gets
    /// it an access token: (client id, bearer token).
    pub async fn register(&self, name: &str, scopes: &[&str]) -> (String, String) {
        let (status, reply) = self
            .request(
                "/v1/admin/clients",
                Some(&serde_json::json!({"name": name, "ip_mode": "none", "scopes": scopes})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
        let id = reply["client"]["client_id"].as_str().unwrap().to_owned();
        let response = self
            .client
            .post(format!("{}/v1/oauth/token", self.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id.as_str()),
                ("client_secret", reply["client_secret"].as_str().unwrap()),
            ])
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 200, "{body}");
        (id, body["access_token"].as_str().unwrap().to_owned())
    }

    /// The HTTPS client (a clone shares its connections) and the base URL, for requests that
    /// must outlive a borrow of the server, e.g. still running while it stops.
    pub fn endpoint(&self) -> (reqwest::Client, String) {
        (self.client.clone(), self.base.clone())
    }

    /// POSTs `body`, or GETs without one, as the admin.
    pub async fn request(&self, path: &str, body: Option<&Value>) -> (u16, Value) {
        let method = match body {
            Some(_) => reqwest::Method::POST,
            None => reqwest::Method::GET,
        };
        self.send(method, path, body).await
    }

    /// Sends any method, with the admin's bearer token and an optional JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        send_json(&self.client, method, url, &self.token, body).await
    }

    /// Asserts what a token outage looks like: `/readyz` fails on the token alone, and a data
    /// key, an unwrap of `wrapped` and a wrap each answer 503 `hsm_unavailable` without naming
    /// PKCS#11 internals.
    pub async fn assert_token_outage(&self, wrapped: &Value, what: &str) {
        let ready = self.wait_for("/readyz", 503).await;
        assert_eq!(
            ready["checks"]["token"], "hsm_unavailable",
            "{what}: {ready}"
        );
        assert_eq!(ready["checks"]["database"], "ok", "{what}: {ready}");
        for (path, body) in [
            ("/v1/datakey", serde_json::json!({})),
            ("/v1/unwrap", serde_json::json!({"wrapped": wrapped})),
            (
                "/v1/wrap",
                serde_json::json!({"plaintext": b64(&[3u8; 32])}),
            ),
        ] {
            let (status, body) = self.request(path, Some(&body)).await;
            assert_eq!(
                (status, error_code(&body)),
                (503, "hsm_unavailable"),
                "{what} {path}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                !message.contains("CKR_") && !message.contains("PKCS"),
                "{what}: {message}"
            );
        }
    }

    /// Polls `path` until it answers `status` (a readiness probe's loop, not a timing test),
    /// for up to [`PATIENCE`].
    pub async fn wait_for(&self, path: &str, status: u16) -> Value {
        let start = Instant::now();
        loop {
            let url = format!("{}{path}", self.base);
            if let Ok(response) = self.client.get(url).send().await {
                let (got, body) = read(response).await;
                if got == status {
                    return body;
                }
            }
            assert!(start.elapsed() < PATIENCE, "{path} never answered {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the log holds `line` (a message the server logs at debug or trace level;
    /// children log at trace), however slow the machine: for a test that must not race with a
    /// background task's first run, e.g. the maintenance pass at start-up.
    pub async fn wait_for_log(&self, line: &str) {
        let start = Instant::now();
        while !std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(line)
        {
            assert!(
                start.elapsed() < PATIENCE,
                "`{line}` never logged; the end of the log:\n{}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many lines of the log hold `text`.
    pub fn log_lines_with(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Waits until `n` lines of the log hold `text` (see [`ChildServer::wait_for_log`]).
    pub async fn wait_for_log_lines(&self, text: &str, n: usize) {
        let start = Instant::now();
        while self.log_lines_with(text) < n {
            assert!(
                start.elapsed() < PATIENCE,
                "`{text}` never logged {n} times; the end of the log:\n{}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the whole log. It waits asynchronously: our HTTP/2 connections must keep
    /// answering the server's shutdown handshake, or it waits out its whole grace period. (That
    /// grace is 10 s, and the request log is written after it: on a loaded machine, stopping
    /// can take longer than that, so we wait up to [`PATIENCE`].)
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > PATIENCE {
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
