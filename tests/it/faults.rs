//! A token that fails on purpose: the real binary reaches the real token (SoftHSM2 or Kryoptic)
//! through `tests/pkcs11-faults`, a PKCS#11 module that forwards every call and injects return
//! codes or latency as a control file says (its module doc is the reference).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::{
    PATIENCE, b64, count, env, error_code, read, real_pkcs11_module, scratch_dir, vendor_faults,
};
use crate::token::shared_env;

/// A child broker whose token calls go through the fault-injecting module, and the control
/// file that steers it.
pub(crate) struct FaultyToken {
    pub(crate) server: ChildServer,
    pub(crate) control: PathBuf,
}

impl FaultyToken {
    async fn start(name: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_with_control(name, None, extra).await
    }

    /// A child broker on the shared token (or the one `extra` names) through the fault module,
    /// whose control file holds exactly `control` from the first call (`None`: the run's
    /// emulated vendor behaviour, if any).
    pub(crate) async fn start_with_control(
        name: &str,
        control_text: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::launch(name, control_text, extra, None).await
    }

    /// As [`FaultyToken::start`], on the database at `database_url` (e.g. on a Postgres
    /// cluster of the test's own, which it may restart).
    pub(crate) async fn start_on_database(
        name: &str,
        database_url: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::launch(name, None, extra, Some(database_url)).await
    }

    async fn launch(
        name: &str,
        control_text: Option<&str>,
        extra: &[(&str, &str)],
        database_url: Option<&str>,
    ) -> Self {
        let dir = scratch_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("faults.conf");
        let through = through_fault_module(&control);
        let mut vars: Vec<(&str, &str)> = through.iter().map(|(k, v)| (*k, v.as_str())).collect();
        vars.extend_from_slice(extra);
        // The run's emulated vendor behaviour (if any) holds from the first call.
        match control_text {
            Some(text) => write_exact(&control, text),
            None => heal_control(&control),
        }
        let log = dir.join("server.log");
        let server = match database_url {
            Some(url) => ChildServer::start_on_database(shared_env(), log, &vars, url).await,
            None => ChildServer::start_with_env(shared_env(), log, &vars).await,
        };
        Self { server, control }
    }

    /// Replaces the injection instructions (the module reads them at every call).
    pub(crate) fn inject(&self, instructions: &str) {
        write_control(&self.control, instructions);
    }

    /// Stops injecting: the module forwards every call again.
    pub(crate) fn heal(&self) {
        heal_control(&self.control);
    }

    /// How many failures the module injected under the current instructions.
    pub(crate) fn injected(&self) -> u64 {
        std::fs::read_to_string(self.control.with_extension("conf.injected"))
            .map(|n| n.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

/// The environment that puts the fault module, steered by `control`, between a `keybroker`
/// process and the real token.
pub(crate) fn through_fault_module(control: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PKCS11_MODULE", env("KB_TEST_FAULT_MODULE")),
        (
            "KB_FAULTS_MODULE",
            real_pkcs11_module().display().to_string(),
        ),
        ("KB_FAULTS_CONTROL", control.display().to_string()),
    ]
}

/// Writes the fault module's control file atomically: the run's emulated vendor behaviour (see
/// [`vendor_faults`]), then `instructions`.
fn write_control(control: &Path, instructions: &str) {
    write_exact(control, &format!("{}\n{instructions}", vendor_faults()));
}

/// Writes the fault module's control file atomically, holding exactly `text`.
pub(crate) fn write_exact(control: &Path, text: &str) {
    let staged = control.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, control).unwrap();
}

/// Only the run's emulated vendor behaviour, if any; no control file otherwise.
fn heal_control(control: &Path) {
    if vendor_faults().is_empty() {
        let _ = std::fs::remove_file(control);
    } else {
        write_control(control, "");
    }
}

#[tokio::test]
async fn a_single_transient_token_failure_is_retried_and_the_client_sees_success() {
    let token = FaultyToken::start("faults-transient", &[]).await;
    let server = &token.server;
    let (status, key) = server
        .request("/v1/datakey", Some(&json!({"context": {"a": "b"}})))
        .await;
    assert_eq!(status, 200, "{key}");

    for rv in [
        "CKR_DEVICE_REMOVED",
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_DEVICE_ERROR",
        "CKR_GENERAL_ERROR",
    ] {
        // Sealing: a new data key.
        token.inject(&format!("functions = C_Encrypt\nrv = {rv}\ntimes = 1\n"));
        let (status, body) = server
            .request("/v1/datakey", Some(&json!({"context": {"a": "b"}})))
            .await;
        assert_eq!(status, 200, "{rv} on C_Encrypt: {body}");
        assert_eq!(token.injected(), 1, "{rv} was not injected on C_Encrypt");
        let (status, opened) = server
            .request(
                "/v1/unwrap",
                Some(&json!({"wrapped": body["wrapped"], "context": {"a": "b"}})),
            )
            .await;
        assert_eq!(status, 200, "{opened}");
        assert_eq!(opened["plaintext"], body["plaintext"]);

        // Signing: a new access token (CKM_ECDSA on the token).
        token.inject(&format!("functions = C_Sign\nrv = {rv}\ntimes = 1\n"));
        let (status, body) = server.request("/.well-known/jwks.json", None).await;
        assert_eq!(status, 200, "{body}");
        let reply = server.issue_admin_token().await;
        assert_eq!(reply.0, 200, "{rv} on C_Sign: {}", reply.1);
        assert_eq!(token.injected(), 1, "{rv} was not injected on C_Sign");
    }

    // Opening an existing blob. CKR_GENERAL_ERROR from C_Decrypt is also what SoftHSM2 says to a
    // bad tag: the broker opens a control value to tell the two apart, and tries again.
    for rv in [
        "CKR_DEVICE_REMOVED",
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_DEVICE_ERROR",
        "CKR_GENERAL_ERROR",
    ] {
        token.inject(&format!("functions = C_Decrypt\nrv = {rv}\ntimes = 1\n"));
        let (status, opened) = server
            .request(
                "/v1/unwrap",
                Some(&json!({"wrapped": key["wrapped"], "context": {"a": "b"}})),
            )
            .await;
        assert_eq!(status, 200, "{rv} on C_Decrypt: {opened}");
        assert_eq!(opened["plaintext"], key["plaintext"]);
        assert_eq!(token.injected(), 1, "{rv} was not injected on C_Decrypt");
    }

    // A token that fails every third C_Encrypt (a seal makes two): every request still
    // succeeds, most of them after a retry.
    token.inject("functions = C_Encrypt\nrv = CKR_DEVICE_ERROR\nevery = 3\n");
    for _ in 0..10 {
        let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(token.injected() >= 5, "only {} injected", token.injected());
    token.heal();
    token.server.stop().await;
}

#[tokio::test]
async fn a_token_that_stays_gone_gives_503_and_recovers_without_a_restart() {
    let token = FaultyToken::start("faults-gone", &[]).await;
    let server = &token.server;
    let (status, key) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{key}");

    for rv in ["CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT"] {
        token.inject(&format!("rv = {rv}\n"));
        server.assert_token_outage(&key["wrapped"], rv).await;
        // The process itself is alive and answering.
        let health = server.wait_for("/healthz", 200).await;
        assert_eq!(health["status"], "ok");
        assert!(token.injected() > 0);

        // The token comes back: so does the service, by itself.
        token.heal();
        server.wait_for("/readyz", 200).await;
        let (status, body) = server
            .request("/v1/unwrap", Some(&json!({"wrapped": key["wrapped"]})))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["plaintext"], key["plaintext"]);
        let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
        assert_eq!(status, 200, "{body}");
    }
    token.server.stop().await;
}

#[tokio::test]
async fn a_slow_token_does_not_starve_the_server_and_calls_time_out_with_a_clear_503() {
    // Two sessions, a 10 s deadline, and a token that takes 250 ms for every call on a key (a
    // data key makes four: random, init, and encrypt twice, so 1 s of token time each).
    let token = FaultyToken::start(
        "faults-slow",
        &[
            ("KEYBROKER_HSM_TIMEOUT_MS", "10000"),
            ("KEYBROKER_HSM_POOL_SIZE", "2"),
        ],
    )
    .await;
    let server = &token.server;
    token.inject(
        "functions = C_EncryptInit, C_Encrypt, C_DecryptInit, C_Decrypt, C_GenerateRandom\n\
         latency_ms = 250\n",
    );

    // 48 data keys at once: 24 s of token time, two at a time, so more than half of them wait
    // past the deadline. The first answers come after about a second; the last no sooner than
    // 10 s after the calls arrived: that is the time the /healthz calls below have to show
    // the executor free while the token is busy (it was 1 s, after a fixed 200 ms sleep,
    // which a loaded machine could use up).
    const CALLS: usize = 48;
    let done = Arc::new(AtomicUsize::new(0));
    let (client, base) = server.endpoint();
    let mut calls = Vec::new();
    for _ in 0..CALLS {
        let (client, base, done) = (client.clone(), base.clone(), done.clone());
        let bearer = server.token.clone();
        calls.push(tokio::spawn(async move {
            let response = client
                .post(format!("{base}/v1/datakey"))
                .bearer_auth(bearer)
                .json(&json!({}))
                .timeout(PATIENCE)
                .send()
                .await
                .expect("a call hung instead of answering");
            let reply = read(response).await;
            done.fetch_add(1, Ordering::SeqCst);
            reply
        }));
    }
    // The first answer says the calls have reached the token (rather than a guessed delay).
    let start = std::time::Instant::now();
    while done.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < PATIENCE, "no crypto call answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While the crypto calls queue for the token, liveness answers: the executor is free.
    for _ in 0..5 {
        let (status, body) = server.request("/healthz", None).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        done.load(Ordering::SeqCst) < CALLS,
        "every crypto call finished before /healthz answered: the token was not slow"
    );

    // Every call answers: a data key, or a clear 503 after the deadline. None hangs.
    let (mut served, mut timed_out) = (0, 0);
    for call in calls {
        let (status, body) = call.await.unwrap();
        match status {
            200 => {
                assert!(body["wrapped"].as_str().unwrap().starts_with("kb:v1:"));
                served += 1;
            }
            503 => {
                assert_eq!(error_code(&body), "hsm_timeout", "{body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("10000 ms"), "{message}");
                timed_out += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(served + timed_out, CALLS);
    assert!(timed_out > 0, "no call reached the deadline");

    // Once the token is quick again, everything works.
    token.heal();
    let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{body}");
    token.server.stop().await;
}

/// Rows of keys, key versions, secrets and audit events in the child's database.
async fn stored_rows(pool: &sqlx::PgPool) -> [i64; 4] {
    [
        count(pool, "SELECT count(*) FROM keys").await,
        count(pool, "SELECT count(*) FROM key_versions").await,
        count(pool, "SELECT count(*) FROM secrets").await,
        count(pool, "SELECT count(*) FROM audit_events").await,
    ]
}

#[tokio::test]
async fn nothing_is_acknowledged_or_stored_for_a_seal_the_token_did_not_do() {
    use reqwest::Method;
    let token = FaultyToken::start("faults-no-ack", &[]).await;
    let server = &token.server;
    let (status, key) = server
        .send(
            Method::POST,
            "/v1/keys",
            Some(&json!({"name": "before", "format": "raw", "length": 32})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let before = stored_rows(&pool).await;

    // Every seal fails (also on the retry); reads and the audit MAC still work.
    token.inject("functions = C_Encrypt\nrv = CKR_DEVICE_ERROR\n");
    let attempts: Vec<(Method, String, Value)> = vec![
        (Method::POST, "/v1/datakey".into(), json!({})),
        (
            Method::POST,
            "/v1/wrap".into(),
            json!({"plaintext": b64(&[9u8; 32])}),
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({"name": "during", "format": "raw", "length": 32}),
        ),
        (
            Method::POST,
            format!("/v1/keys/{}/rotate", key["key"]["id"].as_str().unwrap()),
            json!({}),
        ),
        (
            Method::PUT,
            "/v1/secrets/during".into(),
            json!({"value": b64(b"hush")}),
        ),
    ];
    for (method, path, body) in &attempts {
        let (status, reply) = server.send(method.clone(), path, Some(body)).await;
        assert_eq!(
            (status, error_code(&reply)),
            (503, "hsm_unavailable"),
            "{path}: {reply}"
        );
        assert!(reply.get("wrapped").is_none() && reply.get("key").is_none());
    }
    assert!(token.injected() >= attempts.len() as u64);
    // Nothing was written: no key, no version, no secret, no audit event of a change.
    assert_eq!(before, stored_rows(&pool).await);
    pool.close().await;

    // The same requests succeed once the token does its job.
    token.heal();
    for (method, path, body) in &attempts {
        let (status, reply) = server.send(method.clone(), path, Some(body)).await;
        assert!(status == 200 || status == 201, "{path}: {status} {reply}");
    }
    token.server.stop().await;
}

#[tokio::test]
async fn a_token_without_a_required_mechanism_is_refused_at_start_naming_it() {
    let dir = scratch_dir("faults-mechanisms");
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("faults.conf");
    write_control(
        &control,
        "functions = C_GenerateRandom\nrv = 0x121 # CKR_RANDOM_NO_RNG\n\
         hide_mechanisms = CKM_AES_GCM, CKM_SHA256_HMAC\n",
    );
    let (conf_var, conf) = shared_env();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["hsm", "status"])
        .env(conf_var, conf)
        .envs(through_fault_module(&control))
        .env("DATABASE_URL", crate::common::fresh_database().await)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for missing in ["C_GenerateRandom", "CKM_AES_GCM", "CKM_SHA256_HMAC"] {
        assert!(stderr.contains(missing), "{missing} not named: {stderr}");
    }
    assert!(!stderr.contains("CKM_ECDSA"), "{stderr}");
}

#[tokio::test]
async fn a_token_error_during_unwrap_is_an_outage_and_never_counts_against_the_client() {
    let token = FaultyToken::start("faults-unwrap-outage", &[]).await;
    let server = &token.server;
    // Two refusals within five minutes would disable a client.
    let (status, body) = server
        .send(
            reqwest::Method::PUT,
            "/v1/admin/security-settings",
            Some(&json!({"anomaly_refusals": 2, "anomaly_window_secs": 300})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (id, bearer) = server.register("app", &["datakey", "unwrap"]).await;
    let (http, base) = server.endpoint();
    let as_app = |path: &'static str, body: Value| {
        let (http, url, bearer) = (http.clone(), format!("{base}{path}"), bearer.clone());
        async move {
            crate::common::send_json(&http, reqwest::Method::POST, url, &bearer, Some(&body)).await
        }
    };
    let (status, key) = as_app("/v1/datakey", json!({"context": {"a": "b"}})).await;
    assert_eq!(status, 200, "{key}");
    let unwrap = json!({"wrapped": key["wrapped"], "context": {"a": "b"}});

    // Every C_Decrypt fails the way a bad tag does on SoftHSM2: an outage, not the blob's fault.
    token.inject("functions = C_Decrypt\nrv = CKR_GENERAL_ERROR\n");
    for _ in 0..4 {
        let (status, body) = as_app("/v1/unwrap", unwrap.clone()).await;
        assert_eq!(
            (status, error_code(&body)),
            (503, "hsm_unavailable"),
            "{body}"
        );
    }
    assert!(token.injected() >= 4, "only {} injected", token.injected());
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let refused = |pool: sqlx::PgPool| async move {
        count(
            &pool,
            "SELECT count(*) FROM audit_events WHERE event = 'unauthorized_key_access'",
        )
        .await
    };
    assert_eq!(
        refused(pool.clone()).await,
        0,
        "an outage was counted as a refusal"
    );
    let (status, client) = server
        .request(&format!("/v1/admin/clients/{id}"), None)
        .await;
    assert_eq!(
        (status, client["state"].as_str()),
        (200, Some("active")),
        "{client}"
    );

    // The token heals: the same blob opens, and a tampered one is the caller's doing again.
    token.heal();
    server.wait_for("/readyz", 200).await;
    let (status, opened) = as_app("/v1/unwrap", unwrap.clone()).await;
    assert_eq!(status, 200, "{opened}");
    assert_eq!(opened["plaintext"], key["plaintext"]);
    let wrapped = key["wrapped"].as_str().unwrap();
    let tampered = format!(
        "{}{}",
        &wrapped[..wrapped.len() - 2],
        if wrapped.ends_with("AA") { "AB" } else { "AA" }
    );
    let (status, body) = as_app(
        "/v1/unwrap",
        json!({"wrapped": tampered, "context": {"a": "b"}}),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "context_mismatch"),
        "{body}"
    );
    assert_eq!(refused(pool.clone()).await, 1);
    token.server.stop().await;
}

/// The number of calls the fault module counted (`count_calls = yes`) under the current
/// instructions.
fn counted_calls(control: &Path) -> u64 {
    std::fs::read_to_string(control.with_extension("conf.calls"))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn concurrent_data_keys_on_one_worker_become_batches_that_share_one_random_draw() {
    // One worker, and a token whose every C_GenerateRandom takes 100 ms: while a pass waits for
    // it, the other clients' requests queue, and the next pass takes them all. The module on the
    // token's side counts the C_GenerateRandom calls it really saw.
    let token = FaultyToken::start("faults-batching", &[("KEYBROKER_HSM_POOL_SIZE", "1")]).await;
    let server = &token.server;
    let context = json!({"context": {"batch": "yes"}});
    let (status, body) = server.request("/v1/datakey", Some(&context)).await;
    assert_eq!(status, 200, "{body}");
    token.inject("functions = C_GenerateRandom\nlatency_ms = 100\ncount_calls = yes\n");

    // Clients that each ask for their next data key as soon as the last one came: a closed
    // loop, so the count of passes depends on how many requests wait together, not on a clock.
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 8;
    let (client, base) = server.endpoint();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, base, bearer, context) = (
            client.clone(),
            base.clone(),
            server.token.clone(),
            context.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            for _ in 0..ROUNDS {
                let (status, body) = crate::common::send_json(
                    &client,
                    reqwest::Method::POST,
                    format!("{base}/v1/datakey"),
                    &bearer,
                    Some(&context),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                keys.push(body);
            }
            keys
        }));
    }
    let mut keys = Vec::new();
    for client in clients {
        keys.extend(client.await.unwrap());
    }
    let calls = counted_calls(&token.control);
    let data_keys = (CLIENTS * ROUNDS) as u64;
    println!("{calls} C_GenerateRandom calls for {data_keys} data keys");
    assert!(calls >= 1, "the token saw no C_GenerateRandom");
    // One draw per data key (two, when the broker also draws the IV) without batching; with it,
    // about two passes per round of the clients.
    assert!(
        calls * 3 <= data_keys,
        "{calls} C_GenerateRandom calls for {data_keys} data keys: the calls were not batched"
    );

    // Every key is distinct, and what was sealed in a batch opens.
    token.heal();
    let distinct: std::collections::BTreeSet<&str> = keys
        .iter()
        .map(|k| k["plaintext"].as_str().unwrap())
        .collect();
    assert_eq!(
        distinct.len(),
        keys.len(),
        "a data key was handed out twice"
    );
    let ivs: std::collections::BTreeSet<String> = keys
        .iter()
        .map(|k| k["wrapped"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ivs.len(), keys.len());
    for key in keys.iter().step_by(17) {
        let (status, opened) = server
            .request(
                "/v1/unwrap",
                Some(&json!({"wrapped": key["wrapped"], "context": {"batch": "yes"}})),
            )
            .await;
        assert_eq!(status, 200, "{opened}");
        assert_eq!(opened["plaintext"], key["plaintext"]);
    }
    token.server.stop().await;
}

#[tokio::test]
async fn a_hung_token_holds_its_workers_and_never_gets_more_sessions_than_the_pool() {
    // Two workers, a 1 s deadline, and a token that lets this process open three sessions: the
    // pool's two and one for an officer command (start-up and the maintenance pass may open
    // one at any time). A pool that opened a session per hung call would be refused, and the
    // module counts every refusal.
    let limit = "max_sessions = 3\n";
    let token = FaultyToken::start_with_control(
        "faults-hung",
        Some(&format!("{}\n{limit}", vendor_faults())),
        &[
            ("KEYBROKER_HSM_POOL_SIZE", "2"),
            ("KEYBROKER_HSM_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let server = &token.server;
    let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{body}");

    // The token hangs: every draw from its RNG takes 5 s, far past the deadline.
    token.inject(&format!(
        "{limit}functions = C_GenerateRandom\nlatency_ms = 5000\n"
    ));
    let (client, base) = server.endpoint();
    let mut calls = Vec::new();
    for _ in 0..12 {
        let (client, base, bearer) = (client.clone(), base.clone(), server.token.clone());
        calls.push(tokio::spawn(async move {
            crate::common::send_json(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/datakey"),
                &bearer,
                Some(&json!({})),
            )
            .await
        }));
    }
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!((status, error_code(&body)), (503, "hsm_timeout"), "{body}");
    }
    // While the workers wait on the token, the process answers.
    let (status, body) = server.request("/healthz", None).await;
    assert_eq!(status, 200, "{body}");

    // The token answers again: the broker serves, by itself, once its workers are back (the
    // calls that timed out meanwhile are skipped, not run).
    token.inject(limit);
    let start = std::time::Instant::now();
    loop {
        let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
        if status == 200 {
            break;
        }
        assert_eq!(error_code(&body), "hsm_timeout", "{body}");
        assert!(start.elapsed() < PATIENCE, "the broker did not recover");
    }
    // No session beyond the pool was ever asked for: the module refused none.
    assert_eq!(
        token.injected(),
        0,
        "a C_OpenSession past the pool's two and an officer's"
    );
    let log = token.server.stop().await;
    assert!(!log.contains("the token allows no more sessions"), "{log}");
}
