//! The node-local cache of client state and revocations (step 9): two brokers on one database
//! stay coherent through Postgres notifications, a broker whose listener is gone reads Postgres
//! per request until it listens again, and a change that no notification announced is still
//! seen within the cache's maximum age.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Method;
use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::{PATIENCE, TestServer, error_code, scratch_dir, send_json};
use crate::token::PrivateToken;

/// Long enough that only a notification (or the fallback) can explain what a test sees: the
/// background re-read then runs every 200 s.
const NO_BACKSTOP: (&str, &str) = ("KEYBROKER_AUTH_CACHE_MAX_AGE_MS", "600000");
/// One issuer for both brokers, so that a token from one is valid on the other (as behind a
/// load balancer).
const ISSUER: (&str, &str) = ("KEYBROKER_PUBLIC_URL", "https://keybroker.test");
const RELOADED: &str = "auth cache: listening for changes; cache reloaded";
const LOST: &str = "auth cache: change listener lost";

/// A data key on `broker` with `token`: the status and the error code (empty on success).
async fn datakey(broker: &ChildServer, token: &str) -> (u16, String) {
    let (http, base) = broker.endpoint();
    let (status, body) = send_json(
        &http,
        Method::POST,
        format!("{base}/v1/datakey"),
        token,
        Some(&json!({})),
    )
    .await;
    let code = if status == 200 { "" } else { error_code(&body) };
    (status, code.to_owned())
}

/// How a broker logs (at debug, with "auth cache: change applied") each change to `id` (a
/// client id or a jti) that it applies.
fn applied(id: &str, kind: &str) -> String {
    format!("{kind}({id})")
}

fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_disable_a_revocation_and_a_lockdown_on_one_broker_are_refused_by_another_once_notified()
{
    let token = PrivateToken::copy();
    let a = ChildServer::start_with_env(
        token.env(),
        scratch_dir("cache-a").join("server.log"),
        &[NO_BACKSTOP, ISSUER],
    )
    .await;
    let b = ChildServer::start_beside(
        &a,
        token.env(),
        scratch_dir("cache-b").join("server.log"),
        &[NO_BACKSTOP, ISSUER],
    )
    .await;
    b.wait_for_log(RELOADED).await;

    let clients = [
        a.register("disabled-on-a", &["datakey"]).await,
        a.register("revoked-on-a", &["datakey"]).await,
        a.register("locked-down-on-a", &["datakey"]).await,
    ];
    // B serves each from its cache from now on.
    for (_, bearer) in &clients {
        assert_eq!(datakey(&b, bearer).await, (200, String::new()));
    }

    // Disabled on A: once B heard of it, B's next request is refused.
    let (id, bearer) = &clients[0];
    let heard = b.log_lines_with(&applied(id, "Client"));
    let (status, body) = a
        .request(&format!("/v1/admin/clients/{id}/disable"), Some(&json!({})))
        .await;
    assert_eq!(status, 200, "{body}");
    b.wait_for_log_lines(&applied(id, "Client"), heard + 1)
        .await;
    assert_eq!(datakey(&b, bearer).await, (403, "client_disabled".into()));

    // Revoked on A (RFC 7009, by the admin): B refuses the token, and only that token.
    let (_, bearer) = &clients[1];
    let (http, base) = a.endpoint();
    let response = http
        .post(format!("{base}/v1/oauth/revoke"))
        .bearer_auth(&a.token)
        .form(&[("token", bearer.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    b.wait_for_log_lines(&applied(&jti_of(bearer), "Revoked"), 1)
        .await;
    assert_eq!(datakey(&b, bearer).await, (401, "invalid_token".into()));

    // Locked down on A.
    let (id, bearer) = &clients[2];
    let heard = b.log_lines_with(&applied(id, "Client"));
    let (status, body) = a
        .request(
            &format!("/v1/admin/clients/{id}/lockdown"),
            Some(&json!({"reason": "test"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.wait_for_log_lines(&applied(id, "Client"), heard + 1)
        .await;
    assert_eq!(datakey(&b, bearer).await, (403, "client_disabled".into()));

    // The admin, untouched by all this, is still served by B.
    assert_eq!(datakey(&b, &b.token).await, (200, String::new()));
    b.stop().await;
    a.stop().await;
}

/// Runs `sql` on `db` with triggers off for the transaction: a change no broker is told of.
async fn silently(db: &mut sqlx::PgConnection, sql: &str, id: &str) {
    let mut tx = sqlx::Connection::begin(db).await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let changed = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(uuid::Uuid::parse_str(id).unwrap())
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    tx.commit().await.unwrap();
}

const SILENT_DISABLE: &str = "UPDATE clients SET state = 'disabled' WHERE id = $1";
const SILENT_ENABLE: &str = "UPDATE clients SET state = 'active' WHERE id = $1";

#[tokio::test]
async fn without_its_listener_a_broker_reads_postgres_per_request_until_it_listens_again() {
    let token = PrivateToken::copy();
    let broker = ChildServer::start_with_env(
        token.env(),
        scratch_dir("cache-fallback").join("server.log"),
        &[NO_BACKSTOP],
    )
    .await;
    broker.wait_for_log(RELOADED).await;
    let (id, bearer) = broker.register("watched", &["datakey"]).await;
    assert_eq!(datakey(&broker, &bearer).await, (200, String::new()));
    // One connection, not a pool: while the test forbids new connections below, a pool could
    // open one (a connection it is still handing back looks busy) and be refused (55000).
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&broker.database_url)
        .await
        .unwrap();

    // A change no notification announces is not seen while the cache is live: what answers is
    // the cache, not Postgres.
    silently(&mut db, SILENT_DISABLE, &id).await;
    assert_eq!(datakey(&broker, &bearer).await, (200, String::new()));

    // The listener's connection is killed, and no new connection to the database is allowed,
    // so it cannot come back for now.
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    // (Postgres refuses this from a connection to the database itself.)
    let admin = sqlx::PgPool::connect(&crate::common::env("DATABASE_URL"))
        .await
        .unwrap();
    let allow = |on: bool| format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {on}");
    sqlx::query(sqlx::AssertSqlSafe(allow(false)))
        .execute(&admin)
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(keybroker::store::AUTH_LISTENER_APPLICATION)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the broker's listener");
    broker.wait_for_log(LOST).await;

    // Fail closed: each request reads Postgres, in both directions.
    assert_eq!(
        datakey(&broker, &bearer).await,
        (403, "client_disabled".into())
    );
    silently(&mut db, SILENT_ENABLE, &id).await;
    assert_eq!(datakey(&broker, &bearer).await, (200, String::new()));
    silently(&mut db, SILENT_DISABLE, &id).await;
    assert_eq!(
        datakey(&broker, &bearer).await,
        (403, "client_disabled".into())
    );

    // The listener comes back by itself, reloads, and the cache answers again.
    silently(&mut db, SILENT_ENABLE, &id).await;
    sqlx::query(sqlx::AssertSqlSafe(allow(true)))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    broker.wait_for_log_lines(RELOADED, 2).await;
    assert_eq!(datakey(&broker, &bearer).await, (200, String::new()));
    silently(&mut db, SILENT_DISABLE, &id).await;
    assert_eq!(datakey(&broker, &bearer).await, (200, String::new()));
    // A notified change is applied at once again.
    let heard = broker.log_lines_with(&applied(&id, "Client"));
    sqlx::query("UPDATE clients SET updated_at = now() WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .execute(&mut db)
        .await
        .unwrap();
    broker
        .wait_for_log_lines(&applied(&id, "Client"), heard + 1)
        .await;
    assert_eq!(
        datakey(&broker, &bearer).await,
        (403, "client_disabled".into())
    );
    sqlx::Connection::close(db).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_change_no_notification_announced_is_seen_within_the_maximum_age() {
    // The in-process broker, with the default maximum age of 1 s.
    let server = TestServer::start().await;
    let (status, body) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&server.database_url)
        .await
        .unwrap();
    silently(&mut db, SILENT_DISABLE, &server.main.id).await;
    // Polled, not timed: the re-read runs a few times a second, however slow the machine.
    let start = Instant::now();
    loop {
        let (status, body) = server.post("/v1/datakey", &json!({})).await;
        if status == 403 {
            assert_eq!(error_code(&body), "client_disabled");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(start.elapsed() < PATIENCE, "never seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::Connection::close(db).await.unwrap();
    server.stop().await;
}
