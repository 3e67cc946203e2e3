//! Master keys cannot leave the token, and the officer commands are idempotent and honest.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use crate::common::{TestServer, fresh_database, hsm_config, pkcs11_module, token_label, user_pin};
use keybroker::broker::{Broker, Limits};
use keybroker::hsm::Hsm;
use keybroker::store::Store;

/// Our own cryptoki context, independent of keybroker's HSM layer (it may share the process's
/// `C_Initialize`, which is allowed).
fn raw_session(label: &str) -> Session {
    let ctx = Pkcs11::new(pkcs11_module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
        .expect("token present");
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&SecretString::from(user_pin()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    session
}

fn find_key(session: &Session, label: &str) -> ObjectHandle {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{label} not on the token"))
}

fn rv(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

#[test]
fn the_master_key_cannot_be_read_wrapped_or_made_extractable() {
    let session = raw_session(&token_label());
    let mk = find_key(&session, "keybroker-mk-v1");

    // CKA_VALUE: SoftHSM2 answers with no value, other tokens with CKR_ATTRIBUTE_SENSITIVE.
    match session.get_attributes(mk, &[AttributeType::Value]) {
        Ok(attrs) => {
            for attr in attrs {
                if let Attribute::Value(bytes) = attr {
                    assert!(bytes.is_empty(), "CKA_VALUE of the master key was readable");
                }
            }
        }
        Err(e) => assert_eq!(rv(&e), Some(RvError::AttributeSensitive), "{e}"),
    }

    // C_WrapKey under a wrapping key we control fails.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
        .unwrap();
    // Every wrapping mechanism the token offers refuses; tokens differ in which they offer
    // (Kryoptic has no CKM_AES_KEY_WRAP_PAD), and at least two must have been tried.
    let mut tried = 0;
    for mechanism in [
        Mechanism::AesKeyWrapPad,
        Mechanism::AesKeyWrap,
        Mechanism::AesCbcPad([0u8; 16]),
        Mechanism::AesEcb,
    ] {
        match session.wrap_key(&mechanism, wrapping, mk) {
            Err(e) if rv(&e) == Some(RvError::MechanismInvalid) => continue,
            Err(e) => assert_eq!(
                rv(&e),
                Some(RvError::KeyUnextractable),
                "{mechanism:?}: {e}"
            ),
            Ok(_) => panic!("the master key was wrapped out with {mechanism:?}"),
        }
        tried += 1;
    }
    assert!(
        tried >= 2,
        "the token offers too few wrapping mechanisms to test"
    );

    // CKA_EXTRACTABLE cannot be set back to true, on the key or on a copy of it.
    let err = session
        .update_attributes(mk, &[Attribute::Extractable(true)])
        .unwrap_err();
    assert_eq!(rv(&err), Some(RvError::AttributeReadOnly), "{err}");
    assert!(
        session
            .copy_object(mk, &[Attribute::Token(false), Attribute::Extractable(true)])
            .is_err(),
        "a copy of the master key could be made extractable"
    );
    assert!(
        session
            .copy_object(mk, &[Attribute::Token(false), Attribute::Sensitive(false)])
            .is_err(),
        "a copy of the master key could be made non-sensitive"
    );

    let flags = session
        .get_attributes(
            mk,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Token,
                AttributeType::Private,
            ],
        )
        .unwrap();
    for flag in flags {
        match flag {
            Attribute::Sensitive(v) | Attribute::NeverExtractable(v) => assert!(v),
            Attribute::Extractable(v) => assert!(!v),
            Attribute::Token(v) | Attribute::Private(v) => assert!(v),
            other => panic!("unexpected attribute {other:?}"),
        }
    }
    session.destroy_object(wrapping).unwrap();
}

#[test]
fn pkcs11_tool_shows_the_master_key_sensitive_and_never_extractable() {
    // The PIN goes through the environment, not the command line. Another test may be adding a
    // token to the shared token folder at this moment, which can make pkcs11-tool's slot scan
    // miss ours once: that is the test bed, not the broker, so we ask again.
    let list = || {
        std::process::Command::new("pkcs11-tool")
            .args(["--module"])
            .arg(pkcs11_module())
            .args([
                "--token-label",
                &token_label(),
                "--login",
                "--pin",
                "env:KB_TEST_PKCS11_TOOL_PIN",
            ])
            .args(["--list-objects", "--type", "secrkey"])
            .env("KB_TEST_PKCS11_TOOL_PIN", user_pin())
            .output()
            .expect("pkcs11-tool runs")
    };
    // (Asked again until it works, for as long as a loaded machine may take to finish that
    // other test's change, not a fixed number of times.)
    let start = std::time::Instant::now();
    let mut output = list();
    while !output.status.success() && start.elapsed() < crate::common::PATIENCE {
        std::thread::sleep(std::time::Duration::from_millis(200));
        output = list();
    }
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let block = text
        .split("Secret Key Object")
        .find(|b| b.contains("label:      keybroker-mk-v1\n"))
        .unwrap_or_else(|| panic!("keybroker-mk-v1 not listed:\n{text}"));
    let access = block
        .lines()
        .find(|l| l.trim_start().starts_with("Access:"))
        .unwrap_or_else(|| panic!("no Access line:\n{block}"));
    let flags: Vec<&str> = access
        .trim_start()
        .trim_start_matches("Access:")
        .split(',')
        .map(str::trim)
        .collect();
    assert!(flags.contains(&"sensitive"), "{access}");
    assert!(flags.contains(&"never extractable"), "{access}");
    assert!(!flags.contains(&"extractable"), "{access}");
    assert!(block.contains("AES length 32"), "{block}");
}

#[tokio::test]
async fn hsm_init_is_idempotent_and_never_makes_a_second_v1() {
    let store = Store::connect_lazy(&fresh_database().await, 2).unwrap();
    store.migrate().await.unwrap();
    let broker = Broker::new(
        Hsm::connect(hsm_config()).await.unwrap(),
        store.clone(),
        Limits { max_batch: 1 },
    );
    let first = broker.initialise().await.unwrap();
    let second = broker.initialise().await.unwrap();
    assert!(second.created.is_empty(), "{:?}", second.created);
    // Other test processes may rotate the shared token meanwhile: versions can only be added.
    assert!(
        first
            .master_keys
            .iter()
            .all(|v| second.master_keys.contains(v)),
        "{:?} then {:?}",
        first.master_keys,
        second.master_keys
    );
    let objects = broker.token_objects().await.unwrap();
    let v1: Vec<_> = objects
        .iter()
        .filter(|o| o.label == "keybroker-mk-v1")
        .collect();
    assert_eq!(v1.len(), 1, "exactly one MK v1");
    assert_eq!(v1[0].sensitive, Some(true));
    assert_eq!(v1[0].extractable, Some(false));
    assert_eq!(v1[0].never_extractable, Some(true));
    assert_eq!((v1[0].wrap, v1[0].unwrap), (Some(false), Some(false)));
    assert!(
        objects
            .iter()
            .any(|o| o.label == "keybroker-sign-v1" && o.class == "private-key")
    );
    assert!(
        objects
            .iter()
            .any(|o| o.label == "keybroker-audit-v1" && o.key_type == "generic-secret")
    );

    // The database records exactly one active version.
    let rows = store.master_keys().await.unwrap();
    assert_eq!(
        rows.iter()
            .filter(|r| r.state == keybroker::broker::MasterKeyState::Active)
            .count(),
        1
    );
}

#[tokio::test]
async fn hsm_init_refuses_a_token_whose_master_key_is_extractable() {
    // A token folder of our own (through the real CLI, as an officer would), so that neither the
    // shared token nor other tests' view of the token folder is disturbed.
    let token = crate::token::PrivateToken::empty("unsafe");
    let (conf_var, conf) = token.env();
    let database_url = fresh_database().await;
    let keybroker = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(args)
            .env(conf_var, &conf)
            .env("KEYBROKER_TOKEN_LABEL", "kb-unsafe")
            .env("KEYBROKER_SO_PIN", "so-pin-for-this-test")
            .env("DATABASE_URL", &database_url)
            .output()
            .unwrap()
    };
    let init_token = keybroker(&["hsm", "init-token"]);
    assert!(init_token.status.success(), "{init_token:?}");
    // An AES key with keybroker's label, made extractable and not sensitive.
    let keygen = std::process::Command::new("pkcs11-tool")
        .arg("--module")
        .arg(pkcs11_module())
        .args([
            "--token-label",
            "kb-unsafe",
            "--login",
            "--pin",
            "env:KB_TEST_PIN",
        ])
        .args([
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "keybroker-mk-v1",
            "--extractable",
        ])
        .env(conf_var, &conf)
        .env("KB_TEST_PIN", user_pin())
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");

    let init = keybroker(&["hsm", "init"]);
    assert!(
        !init.status.success(),
        "hsm init accepted an unsafe token: {init:?}"
    );
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert!(
        stderr.contains("keybroker-mk-v1") && stderr.contains("unsafe"),
        "{stderr}"
    );
    // Nothing was created next to the unsafe key.
    let status = keybroker(&["hsm", "status"]);
    assert!(status.status.success(), "{status:?}");
    let listed: Vec<String> = String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter(|l| l.starts_with("keybroker-"))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(listed, vec!["keybroker-mk-v1".to_owned()]);
}

#[tokio::test]
async fn hsm_status_command_lists_flags_and_no_secret() {
    let db = fresh_database().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["hsm", "status"])
        .env("DATABASE_URL", &db)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mk_line = stdout
        .lines()
        .find(|l| l.starts_with("keybroker-mk-v1 "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let columns: Vec<&str> = mk_line.split_whitespace().collect();
    // LABEL CLASS KEY-TYPE SENSITIVE EXTRACTABLE NEVER-EXTRACTABLE WRAP UNWRAP ENCRYPT DECRYPT ID
    assert_eq!(
        &columns[1..10],
        [
            "secret-key",
            "aes",
            "yes",
            "no",
            "yes",
            "no",
            "no",
            "yes",
            "yes"
        ]
    );
    assert!(!stdout.contains(&user_pin()) && !stderr.contains(&user_pin()));
}

#[tokio::test]
async fn a_lost_login_is_restored_and_the_caller_sees_success() {
    let server = TestServer::start().await;
    let (status, key) = server.post("/v1/datakey", &serde_json::json!({})).await;
    assert_eq!(status, 200, "{key}");

    // Log the whole application out from a session of our own (login state is per
    // application), as a token reset would: the pool's sessions lose their login.
    let session = raw_session(&token_label());
    session.logout().unwrap();
    let visible = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"keybroker-mk-v1".to_vec()),
        ])
        .unwrap();
    assert!(visible.is_empty(), "the logout did not take effect");
    drop(session);

    for _ in 0..3 {
        let (status, body) = server
            .post(
                "/v1/unwrap",
                &serde_json::json!({"wrapped": key["wrapped"]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["plaintext"], key["plaintext"]);
        let (status, body) = server.post("/v1/datakey", &serde_json::json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}
