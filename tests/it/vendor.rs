//! Production-HSM behaviours, emulated by the fault module on top of the real token: a token that
//! makes its own AES-GCM IV and writes it back (AWS CloudHSM), one that refuses a caller's IV
//! (FIPS mode), one that reports another IV than it used (broken: the self-test must catch it),
//! a session limit, and `keybroker hsm probe` on each.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::{
    dev_certificate, error_code, fresh_database, real_pkcs11_module, scratch_dir, token_label,
};
use crate::faults::{FaultyToken, through_fault_module, write_exact};
use crate::token::{PrivateToken, shared_env};

/// One `C_EncryptInit` the fault module's `gcm_iv` acted on, from `<control>.gcm`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GcmCall {
    /// The IV keybroker passed.
    passed: String,
    /// The IV the real token encrypted with (`-` for a refused call).
    used: String,
    /// What keybroker read back.
    returned: String,
}

fn gcm_calls(control: &Path) -> Vec<GcmCall> {
    let mut path = control.as_os_str().to_owned();
    path.push(".gcm");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                    .to_owned()
            };
            GcmCall {
                passed: field("passed"),
                used: field("used"),
                returned: field("returned"),
            }
        })
        .collect()
}

const ZERO_IV: &str = "000000000000000000000000";

/// The IV of a `kb:v1:<mk>:<payload>` blob, hex.
fn blob_iv(wrapped: &str) -> String {
    let payload = URL_SAFE_NO_PAD
        .decode(wrapped.rsplit(':').next().unwrap())
        .unwrap();
    hex(&payload[..12])
}

/// The blob with its IV replaced by `iv_hex`: what a broker that stored another IV than the
/// token used would have written.
fn with_iv(wrapped: &str, iv_hex: &str) -> String {
    let (prefix, payload) = wrapped.rsplit_once(':').unwrap();
    let mut payload = URL_SAFE_NO_PAD.decode(payload).unwrap();
    for (i, byte) in payload[..12].iter_mut().enumerate() {
        *byte = u8::from_str_radix(&iv_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    format!("{prefix}:{}", URL_SAFE_NO_PAD.encode(payload))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A data key from `server`, and the blob opened again.
async fn datakey_round_trip(server: &ChildServer, context: &Value) -> String {
    let (status, key) = server
        .request("/v1/datakey", Some(&json!({ "context": context })))
        .await;
    assert_eq!(status, 200, "{key}");
    let wrapped = key["wrapped"].as_str().unwrap().to_owned();
    assert_eq!(unwrap(server, &wrapped, context).await, key["plaintext"]);
    wrapped
}

/// The plaintext of `wrapped`, opened by `server`.
async fn unwrap(server: &ChildServer, wrapped: &str, context: &Value) -> Value {
    let (status, opened) = server
        .request(
            "/v1/unwrap",
            Some(&json!({"wrapped": wrapped, "context": context})),
        )
        .await;
    assert_eq!(status, 200, "{opened}");
    opened["plaintext"].clone()
}

#[tokio::test]
async fn a_token_that_makes_its_own_iv_gets_that_iv_stored_and_the_old_code_would_have_lost_the_blob()
 {
    let token =
        FaultyToken::start_with_control("vendor-iv-token", Some("gcm_iv = token\n"), &[]).await;
    let server = &token.server;
    let context = json!({"tenant": "cloudhsm"});
    let wrapped = datakey_round_trip(server, &context).await;

    let calls = gcm_calls(&token.control);
    // Every broker process starts by drawing its own IV (it cannot know the token's habit):
    // the start-up self-test's seal. The token ignored it.
    let first = &calls[0];
    assert_ne!(first.passed, ZERO_IV, "{calls:?}");
    assert_ne!(first.used, first.passed, "{calls:?}");
    assert_eq!(first.returned, first.used, "{calls:?}");
    // The data key's blob holds the IV the token used for it.
    let last = calls.last().unwrap();
    assert_eq!(blob_iv(&wrapped), last.used, "{calls:?}");
    // What the code before this step stored: the IV it drew, with the token's ciphertext.
    // That blob does not open: the data key would have been lost.
    let as_before = with_iv(&wrapped, &first.passed);
    let (status, body) = server
        .request(
            "/v1/unwrap",
            Some(&json!({"wrapped": as_before, "context": context})),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "context_mismatch"),
        "{body}"
    );
    // Having seen the token replace its IV, the broker stops drawing one (a round trip less).
    assert_eq!(last.passed, ZERO_IV, "{calls:?}");
    let log = token.server.stop().await;
    assert!(
        log.contains("the token makes them; keybroker stores the IV it returns"),
        "{log}"
    );
}

#[tokio::test]
async fn a_token_that_refuses_a_callers_iv_gets_a_zeroed_buffer_and_its_iv_is_stored() {
    let token =
        FaultyToken::start_with_control("vendor-iv-reject", Some("gcm_iv = reject\n"), &[]).await;
    let server = &token.server;
    let context = json!({"tenant": "fips"});
    let wrapped = datakey_round_trip(server, &context).await;
    // A batch too: several seals in one token call.
    let (status, batch) = server
        .request(
            "/v1/datakey/batch",
            Some(&json!({"items": [{"context": context}, {"context": context}]})),
        )
        .await;
    assert_eq!(status, 200, "{batch}");

    let calls = gcm_calls(&token.control);
    let refused: Vec<&GcmCall> = calls.iter().filter(|c| c.used == "-").collect();
    assert!(!refused.is_empty(), "no IV was refused: {calls:?}");
    assert!(refused.iter().all(|c| c.passed != ZERO_IV), "{calls:?}");
    // Every seal the token did started from a zeroed buffer, and no zero IV was ever used.
    for call in calls.iter().filter(|c| c.used != "-") {
        assert_eq!(call.passed, ZERO_IV, "{calls:?}");
        assert_ne!(call.used, ZERO_IV, "{calls:?}");
        assert_eq!(call.returned, call.used, "{calls:?}");
    }
    // Each blob holds the IV the token used for it.
    let mut blobs = vec![wrapped];
    for item in batch["items"].as_array().unwrap() {
        blobs.push(item["wrapped"].as_str().unwrap().to_owned());
    }
    for blob in &blobs {
        assert!(
            calls.iter().any(|c| c.used == blob_iv(blob)),
            "{blob}: {calls:?}"
        );
    }
    token.server.stop().await;
}

#[tokio::test]
async fn blobs_made_under_one_iv_behaviour_open_under_the_others() {
    // One database and one token, three brokers: direct, a token that makes IVs, a token that
    // refuses ours. Each one's blob opens on each other one.
    let direct = FaultyToken::start_with_control("vendor-cross-direct", Some(""), &[]).await;
    let mut brokers = vec![direct.server];
    let mut controls = vec![direct.control];
    for (name, control_text) in [
        ("vendor-cross-token", "gcm_iv = token\n"),
        ("vendor-cross-reject", "gcm_iv = reject\n"),
    ] {
        let dir = scratch_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("faults.conf");
        write_exact(&control, control_text);
        let through = through_fault_module(&control);
        let vars: Vec<(&str, &str)> = through.iter().map(|(k, v)| (*k, v.as_str())).collect();
        brokers.push(
            ChildServer::start_beside(&brokers[0], shared_env(), dir.join("server.log"), &vars)
                .await,
        );
        controls.push(control);
    }
    let context = json!({"cross": "behaviours"});
    for maker in &brokers {
        let (status, key) = maker
            .request("/v1/datakey", Some(&json!({ "context": context })))
            .await;
        assert_eq!(status, 200, "{key}");
        let wrapped = key["wrapped"].as_str().unwrap();
        for opener in &brokers {
            assert_eq!(unwrap(opener, wrapped, &context).await, key["plaintext"]);
        }
    }
    // The emulations really acted.
    assert!(!gcm_calls(&controls[1]).is_empty());
    assert!(gcm_calls(&controls[2]).iter().any(|c| c.used == "-"));
    for broker in brokers {
        broker.stop().await;
    }
}

/// `keybroker <args>` through the fault module with `control_text`, on the shared token.
fn keybroker_through_faults(
    args: &[&str],
    control: &Path,
    control_text: &str,
    extra: &[(&str, &str)],
) -> Output {
    write_exact(control, control_text);
    let (conf_var, conf) = shared_env();
    Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(args)
        .env(conf_var, conf)
        .envs(through_fault_module(control))
        .envs(extra.iter().copied())
        .output()
        .unwrap()
}

fn assert_names_the_self_test_failure(output: &Output) {
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "self-test failed",
        &format!("{:?}", token_label()),
        "CKM_AES_GCM",
        "master key v1",
        "does not open",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

#[tokio::test]
async fn a_token_that_reports_another_iv_than_it_used_is_refused_at_start() {
    let dir = scratch_dir("vendor-corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("faults.conf");
    let database_url = fresh_database().await;
    let db = [("DATABASE_URL", database_url.as_str())];
    // Recorded on a healthy path first, so that only the token's answer differs.
    let init = keybroker_through_faults(&["hsm", "init"], &control, "", &db);
    assert!(init.status.success(), "{init:?}");
    assert!(
        String::from_utf8_lossy(&init.stdout).contains("self-test passed"),
        "{init:?}"
    );

    let status = keybroker_through_faults(&["hsm", "status"], &control, "gcm_iv = corrupt\n", &db);
    assert_names_the_self_test_failure(&status);
    let init = keybroker_through_faults(&["hsm", "init"], &control, "gcm_iv = corrupt\n", &db);
    assert_names_the_self_test_failure(&init);

    // `serve` stops before it listens: /readyz never answers, let alone 200.
    let cert = dev_certificate();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let listen = format!("127.0.0.1:{port}");
    let cert_path = cert.cert.display().to_string();
    let key_path = cert.key.display().to_string();
    let serve = keybroker_through_faults(
        &["serve"],
        &control,
        "gcm_iv = corrupt\n",
        &[
            ("DATABASE_URL", database_url.as_str()),
            ("KEYBROKER_LISTEN", listen.as_str()),
            ("KEYBROKER_TLS_CERT", cert_path.as_str()),
            ("KEYBROKER_TLS_KEY", key_path.as_str()),
        ],
    );
    assert_names_the_self_test_failure(&serve);
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "something listens on {listen}"
    );
}

#[tokio::test]
async fn a_token_that_comes_back_broken_after_a_reinitialisation_is_not_used_until_it_is_sound() {
    let token = FaultyToken::start_with_control("vendor-reinit", Some(""), &[]).await;
    let server = &token.server;
    let context = json!({"after": "failover"});
    let wrapped = datakey_round_trip(server, &context).await;

    // The token goes away; the broker re-initialises the module to find it again.
    write_exact(&token.control, "rv = CKR_DEVICE_REMOVED\n");
    server
        .assert_token_outage(&json!(wrapped), "token gone")
        .await;
    server
        .wait_for_log("re-initialising the PKCS#11 module")
        .await;
    // It comes back, but now reports other IVs than it uses (another HSM behind a failover,
    // say): the self-test after the re-initialisation refuses it.
    write_exact(&token.control, "gcm_iv = corrupt\n");
    let ready = server.wait_for("/readyz", 503).await;
    assert_eq!(ready["checks"]["token"], "hsm_unavailable", "{ready}");
    let (status, body) = server
        .request("/v1/datakey", Some(&json!({ "context": context })))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (503, "hsm_unavailable"),
        "{body}"
    );
    server.wait_for_log("self-test failed").await;
    // Sound again: the broker verifies it and serves, by itself.
    write_exact(&token.control, "");
    server.wait_for("/readyz", 200).await;
    let again = datakey_round_trip(server, &context).await;
    assert_ne!(again, wrapped);
    assert!(unwrap(server, &wrapped, &context).await.is_string());
    token.server.stop().await;
}

#[tokio::test]
async fn a_token_with_fewer_sessions_than_the_pool_leaves_a_smaller_pool_not_an_outage() {
    // A private token: this test rotates the master key (an admin session at the limit).
    let private = PrivateToken::copy();
    let dir = scratch_dir("vendor-sessions");
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("faults.conf");
    // Slow calls, so that concurrent requests really want more sessions than there are.
    write_exact(&control, "max_sessions = 3\nlatency_ms = 3\n");
    let through = through_fault_module(&control);
    let mut vars: Vec<(&str, &str)> = through.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.push(("KEYBROKER_HSM_POOL_SIZE", "8"));
    let server = ChildServer::start_with_env(private.env(), dir.join("server.log"), &vars).await;
    let server = std::sync::Arc::new(server);
    let mut requests = Vec::new();
    for i in 0..32 {
        let server = server.clone();
        requests.push(tokio::spawn(async move {
            server
                .request(
                    "/v1/datakey",
                    Some(&json!({"context": {"n": i.to_string()}})),
                )
                .await
        }));
    }
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // The token did refuse sessions...
    let injected: u64 = std::fs::read_to_string(control.with_extension("conf.injected"))
        .expect("no CKR_SESSION_COUNT was answered")
        .trim()
        .parse()
        .unwrap();
    assert!(injected >= 1);
    // ... an officer's action still gets one ...
    let (status, body) = server
        .request("/v1/admin/master-keys/rotate", Some(&json!({})))
        .await;
    assert!(status == 200 || status == 201, "{body}");
    let (status, body) = server
        .request(
            "/v1/datakey",
            Some(&json!({"context": {"after": "rotation"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    server.wait_for("/readyz", 200).await;
    let server = std::sync::Arc::into_inner(server).unwrap();
    let log = server.stop().await;
    // ... and the smaller pool was said once, not as an outage.
    let said = log.matches("the token allows no more sessions").count();
    assert_eq!(said, 1, "{log}");
    assert!(!log.contains("reopening the session"), "{log}");
}

/// `keybroker hsm probe` through the fault module with `control_text` (pool size `pool`).
fn probe(name: &str, control_text: Option<&str>, pool: &str) -> (bool, String) {
    let output = match control_text {
        None => {
            let (conf_var, conf) = shared_env();
            Command::new(env!("CARGO_BIN_EXE_keybroker"))
                .args(["hsm", "probe"])
                .env(conf_var, conf)
                .env("PKCS11_MODULE", real_pkcs11_module())
                .env("KEYBROKER_HSM_POOL_SIZE", pool)
                .output()
                .unwrap()
        }
        Some(text) => {
            let dir = scratch_dir(name);
            std::fs::create_dir_all(&dir).unwrap();
            keybroker_through_faults(
                &["hsm", "probe"],
                &dir.join("faults.conf"),
                text,
                &[("KEYBROKER_HSM_POOL_SIZE", pool)],
            )
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.success(), format!("{stdout}{stderr}"))
}

fn line<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{report}"))
}

#[test]
fn the_probe_reports_each_iv_behaviour_and_session_limit_with_a_verdict() {
    let (ok, direct) = probe("probe-direct", None, "4");
    assert!(ok, "{direct}");
    assert!(
        line(&direct, "token").contains(&format!("{:?}", token_label())),
        "{direct}"
    );
    assert!(line(&direct, "library").contains("Cryptoki"), "{direct}");
    for mechanism in [
        "CKM_AES_GCM",
        "CKM_ECDSA",
        "CKM_SHA256_HMAC",
        "CKM_AES_KEY_GEN",
        "CKM_EC_KEY_PAIR_GEN",
        "C_GenerateRandom",
    ] {
        let l = line(&direct, &format!("  {mechanism} "));
        assert!(l.trim_end().ends_with("ok"), "{l}");
    }
    assert!(
        line(&direct, "  CKM_AES_GCM").contains("encrypt, decrypt"),
        "{direct}"
    );
    assert!(
        line(&direct, "  CKM_AES_GCM").contains("keys 16-32 bytes"),
        "{direct}"
    );
    assert!(line(&direct, "gcm iv").contains("kept"), "{direct}");
    assert!(
        line(&direct, "sessions").contains("opened 4 of 4"),
        "{direct}"
    );
    assert_eq!(line(&direct, "verdict"), "verdict     usable");

    let (ok, token) = probe("probe-token", Some("gcm_iv = token\n"), "2");
    assert!(ok, "{token}");
    assert!(line(&token, "gcm iv").contains("replaced"), "{token}");
    assert_eq!(line(&token, "verdict"), "verdict     usable");

    let (ok, reject) = probe("probe-reject", Some("gcm_iv = reject\n"), "2");
    assert!(ok, "{reject}");
    assert!(line(&reject, "gcm iv").contains("rejected"), "{reject}");
    assert_eq!(line(&reject, "verdict"), "verdict     usable");

    let (ok, corrupt) = probe("probe-corrupt", Some("gcm_iv = corrupt\n"), "2");
    assert!(!ok, "{corrupt}");
    assert!(line(&corrupt, "gcm iv").contains("UNUSABLE"), "{corrupt}");
    assert!(
        line(&corrupt, "verdict").contains("NOT usable"),
        "{corrupt}"
    );
    assert!(
        line(&corrupt, "verdict").contains("does not open"),
        "{corrupt}"
    );

    let (ok, limited) = probe("probe-sessions", Some("max_sessions = 3\n"), "8");
    assert!(ok, "{limited}");
    let sessions = line(&limited, "sessions");
    assert!(sessions.contains("reported max 3"), "{limited}");
    assert!(sessions.contains("opened 3 of 8"), "{limited}");
    assert!(sessions.contains("CKR_SESSION_COUNT"), "{limited}");
    assert_eq!(line(&limited, "verdict"), "verdict     usable");

    let (ok, missing) = probe("probe-missing", Some("hide_mechanisms = CKM_ECDSA\n"), "1");
    assert!(!ok, "{missing}");
    assert!(
        line(&missing, "  CKM_ECDSA").contains("MISSING"),
        "{missing}"
    );
    assert!(
        line(&missing, "verdict").contains("CKM_ECDSA lacks sign"),
        "{missing}"
    );
}

/// The probe's key is a session object, destroyed: the token has exactly the objects it had.
#[test]
fn the_probe_leaves_the_token_as_it_found_it() {
    let private = PrivateToken::copy();
    let count = || {
        let (var, conf) = private.env();
        let output = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(real_pkcs11_module())
            .args(["--token-label", &token_label(), "--login", "--pin"])
            .arg("env:KB_TEST_PROBE_PIN")
            .env("KB_TEST_PROBE_PIN", crate::common::user_pin())
            .env(var, conf)
            .arg("--list-objects")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .matches("Object;")
            .count()
    };
    let before = count();
    let (var, conf) = private.env();
    let output = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["hsm", "probe"])
        .env(var, conf)
        .env("PKCS11_MODULE", real_pkcs11_module())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(before > 0);
    assert_eq!(count(), before);
}
