//! Persisted states and constraint classification against the real schema: each state enum
//! lists exactly what its table's CHECK allows, every constraint the store classifies exists,
//! a state Postgres holds that the build does not know is a clear store error, and a request
//! breaking a named constraint gets its own error, end to end.

use std::collections::BTreeSet;

use keybroker::store::{
    ClientState, ItemWriteError, KeyState, MasterKeyState, NewKey, NewSecretVersion,
    RewrapJobState, SecretState, SigningKeyState, Store, StoreError, UnknownState, Violation,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::{self, TestServer, error_code};

/// A migrated database of its own, with a pool for raw SQL.
async fn migrated() -> (Store, sqlx::PgPool) {
    let url = common::fresh_database().await;
    let store = Store::connect_lazy(&url, 2).unwrap();
    store.migrate().await.unwrap();
    (store, sqlx::PgPool::connect(&url).await.unwrap())
}

/// The quoted values of a CHECK constraint's definition, e.g. `state IN ('a', 'b')`.
async fn check_values(pool: &sqlx::PgPool, constraint: &str) -> BTreeSet<String> {
    let (definition,): (String,) = sqlx::query_as(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1 AND contype = 'c'",
    )
    .bind(constraint)
    .fetch_one(pool)
    .await
    .unwrap();
    definition
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn texts<S: ToString>(all: &[S]) -> BTreeSet<String> {
    all.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn every_state_enum_lists_exactly_what_its_check_constraint_allows() {
    let (_store, pool) = migrated().await;
    let expected = [
        ("clients_state_check", texts(ClientState::ALL)),
        ("keys_state_check", texts(KeyState::ALL)),
        ("secrets_state_check", texts(SecretState::ALL)),
        ("master_keys_state_check", texts(MasterKeyState::ALL)),
        ("signing_keys_state_check", texts(SigningKeyState::ALL)),
        ("rewrap_jobs_state_check", texts(RewrapJobState::ALL)),
    ];
    for (constraint, states) in expected {
        assert_eq!(
            check_values(&pool, constraint).await,
            states,
            "{constraint}"
        );
    }
}

#[tokio::test]
async fn every_constraint_the_store_classifies_exists_in_the_schema() {
    let (_store, pool) = migrated().await;
    // A unique index reports its own name as the constraint; the others are in pg_constraint.
    let (names,): (Vec<String>,) = sqlx::query_as(
        "SELECT array_agg(name) FROM (
             SELECT conname::text AS name FROM pg_constraint
             UNION SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public') n",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let names: BTreeSet<String> = names.into_iter().collect();
    let missing: Vec<&str> = Violation::constraint_names()
        .filter(|name| !names.contains(*name))
        .collect();
    assert!(missing.is_empty(), "not in the schema: {missing:?}");
    assert_eq!(
        Violation::of("keys_pkey"),
        None,
        "an unnamed one stays internal"
    );
}

#[tokio::test]
async fn a_state_the_build_does_not_know_is_a_clear_store_error_not_a_panic() {
    let (store, pool) = migrated().await;
    // As if a newer build had added a state: its CHECK allows it, this enum does not.
    for sql in [
        "ALTER TABLE signing_keys DROP CONSTRAINT signing_keys_state_check",
        "INSERT INTO signing_keys (version, token_label, state) VALUES (1, 'sk', 'paused')",
        "ALTER TABLE master_keys DROP CONSTRAINT master_keys_state_check",
        "INSERT INTO master_keys (version, token_label, state) VALUES (1, 'mk', 'sealed_away')",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    match store.signing_keys().await {
        Err(StoreError::UnknownState(unknown)) => assert_eq!(
            unknown,
            UnknownState {
                kind: "signing key",
                value: "paused".to_owned()
            }
        ),
        other => panic!("expected an unknown signing key state, got {other:?}"),
    }
    let err = store.master_keys().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the database holds an invalid value: unknown master key state \"sealed_away\""
    );
}

#[tokio::test]
async fn a_request_that_breaks_a_named_constraint_gets_its_own_error_end_to_end() {
    let server = TestServer::start().await;
    let store = &server.store;
    let meta = keybroker::audit::meta();
    let owner = Uuid::parse_str(&server.main.id).unwrap();
    let key = |name: &str, length: i32, mk_version: i32| NewKey {
        id: Uuid::new_v4(),
        client_id: owner,
        name: name.to_owned(),
        format: "raw".to_owned(),
        length,
        context: "{}".to_owned(),
        rotation: "manual".to_owned(),
        rotation_period_days: None,
        expires_at: None,
        mk_version,
        sealed: vec![0; 44],
        now: 1_700_000_000,
    };

    // Over HTTPS: the second key of a name is refused as before, by its constraint now.
    let first = server
        .post("/v1/keys", &json!({"name": "twice", "format": "raw"}))
        .await;
    assert_eq!(first.0, 201, "{first:?}");
    let again = server
        .post("/v1/keys", &json!({"name": "twice", "format": "raw"}))
        .await;
    assert_eq!(
        (again.0, error_code(&again.1)),
        (409, "key_name_taken"),
        "{again:?}"
    );

    // In the store: the same name, a value a CHECK refuses, and a constraint no request can
    // break (an unrecorded master-key version), which stays an internal error.
    store.insert_key(&key("dup", 32, 1), &meta).await.unwrap();
    let dup = store
        .insert_key(&key("dup", 32, 1), &meta)
        .await
        .unwrap_err();
    assert!(dup.violated(Violation::KeyNameTaken), "{dup:?}");
    let short = store
        .insert_key(&key("empty", 0, 1), &meta)
        .await
        .unwrap_err();
    assert!(short.violated(Violation::ValueRefused), "{short:?}");
    let unrecorded = store.insert_key(&key("lost", 32, 999), &meta).await;
    assert!(
        matches!(unrecorded, Err(ItemWriteError::Store(StoreError::Query(_)))),
        "{unrecorded:?}"
    );

    // Two writers creating one secret: the loser's unique violation is a conflict (it seals
    // again for the winner's next version), not a failure.
    let secret = |id: Uuid| NewSecretVersion {
        secret_id: id,
        version: 1,
        client_id: owner,
        name: "raced".to_owned(),
        mk_version: 1,
        wrapped_dek: vec![1; 60],
        sealed: vec![2; 40],
        context: "{}".to_owned(),
        now: 1_700_000_000,
    };
    store
        .put_secret_version(&secret(Uuid::new_v4()), &meta)
        .await
        .unwrap();
    let lost = store
        .put_secret_version(&secret(Uuid::new_v4()), &meta)
        .await;
    assert!(matches!(lost, Err(ItemWriteError::Conflict)), "{lost:?}");
    server.stop().await;
}
