//! The suite's own databases (`common::fresh_database`): each is a migrated copy of the
//! template, and it is dropped once its test has ended, even with a session still on it.

use std::time::Instant;

use sqlx::Connection;

use crate::common::{self, PATIENCE};

/// Whether database `name` exists on the test cluster.
async fn exists(name: &str) -> bool {
    let mut admin = sqlx::PgConnection::connect(&common::env("DATABASE_URL"))
        .await
        .unwrap();
    let found = common::database_exists(&mut admin, name).await;
    admin.close().await.unwrap();
    found
}

#[tokio::test]
async fn a_test_database_is_migrated_and_dropped_when_its_test_ends_even_with_a_session_on_it() {
    let (url, mut dropper) = common::database_with_dropper().await;
    let (_, name) = url.rsplit_once('/').unwrap();
    assert!(name.starts_with("kb_test_"), "{name}");
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let expected: Vec<i64> = sqlx::migrate!("./migrations")
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert_eq!(applied, expected, "the copy carries every migration");
    // Each test gets a database of its own, not the same one twice.
    let other = common::fresh_database().await;
    assert_ne!(other, url);
    assert!(exists(name).await);

    // The end of its pipe is what the end of the test process does.
    drop(dropper.stdin.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = dropper.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the dropper of {name} never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the dropper of {name}: {status}");
    assert!(!exists(name).await, "{name} is still there");
    // The session left open did not keep the database; Postgres ended it.
    assert!(sqlx::query("SELECT 1").execute(&mut db).await.is_err());
}
