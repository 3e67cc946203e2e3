//! The request path of step 9: refusals before authentication are cheap (counted in memory and
//! audited once per source per window), the authentication cache stays coherent across brokers
//! and fails closed, and `/metrics` needs no token.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::child::ChildServer;
use crate::common::{PATIENCE, count, read, scratch_dir};
use crate::token::shared_env;

/// Rows of the audit trail, and the `auth.refused` rows with their details.
async fn audit_rows(pool: &sqlx::PgPool) -> (i64, Vec<Value>) {
    let all = count(pool, "SELECT count(*) FROM audit_events").await;
    let refused: Vec<(String,)> = sqlx::query_as(
        "SELECT details FROM audit_events WHERE event = 'auth.refused' ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let refused = refused
        .into_iter()
        .map(|(d,)| serde_json::from_str(&d).unwrap())
        .collect();
    (all, refused)
}

#[tokio::test]
async fn a_flood_of_bad_tokens_adds_at_most_one_audit_row_per_source_per_window() {
    let dir = scratch_dir("refusal-flood");
    std::fs::create_dir_all(&dir).unwrap();
    let server = ChildServer::start_with_env(
        shared_env(),
        dir.join("server.log"),
        &[("KEYBROKER_REFUSAL_AUDIT_SECS", "2")],
    )
    .await;
    let pool = sqlx::PgPool::connect(&server.database_url).await.unwrap();
    let (before, refused) = audit_rows(&pool).await;
    assert!(refused.is_empty(), "{refused:?}");

    // Garbage, a missing token and a well-formed JWT with a bad signature, from eight tasks at
    // once.
    let forged = {
        let (status, body) = server.issue_admin_token().await;
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_owned();
        let (head, _) = token.rsplit_once('.').unwrap();
        format!("{head}.AAAA")
    };
    const TASKS: usize = 8;
    const EACH: usize = 60;
    let started = Instant::now();
    let (http, base) = server.endpoint();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (http, base, forged) = (http.clone(), base.clone(), forged.clone());
        tasks.push(tokio::spawn(async move {
            let mut reasons = Vec::new();
            for i in 0..EACH {
                let request = match (t + i) % 3 {
                    0 => http
                        .post(format!("{base}/v1/datakey"))
                        .bearer_auth("garbage"),
                    1 => http.post(format!("{base}/v1/datakey")),
                    _ => http.post(format!("{base}/v1/datakey")).bearer_auth(&forged),
                };
                let request = request.json(&json!({}));
                let (status, body) = read(request.send().await.unwrap()).await;
                reasons.push((status, body));
            }
            reasons
        }));
    }
    // Token requests naming no client id (not even a well-formed one): as many as a source may
    // fail there before it is throttled.
    const UNKNOWN: usize = 5;
    let mut answers = Vec::new();
    for _ in 0..UNKNOWN {
        let request = http.post(format!("{base}/v1/oauth/token")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nobody"),
            ("client_secret", "kb_nope"),
        ]);
        answers.push(read(request.send().await.unwrap()).await);
    }
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    for (status, body) in &answers {
        assert_eq!(*status, 401, "{body}");
        // The API's error shape, or OAuth's at the token endpoint.
        let code = body["error"]["code"].as_str().or(body["error"].as_str());
        assert!(
            matches!(code, Some("invalid_token" | "invalid_client")),
            "{body}"
        );
    }
    // The broker is not slowed down for anyone else.
    let (status, body) = server.request("/v1/datakey", Some(&json!({}))).await;
    assert_eq!(status, 200, "{body}");

    // Every refusal is counted, in as few rows as the windows that passed allow.
    let total = u64::try_from(TASKS * EACH + UNKNOWN).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let refused = loop {
        let (_, refused) = audit_rows(&pool).await;
        let counted: u64 = refused.iter().map(|d| d["count"].as_u64().unwrap()).sum();
        if counted >= total {
            assert_eq!(counted, total, "{refused:#?}");
            break refused;
        }
        assert!(
            Instant::now() < deadline,
            "only {counted} of {total} counted: {refused:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let windows = usize::try_from(elapsed.as_secs() / 2).unwrap() + 2;
    assert!(
        refused.len() <= windows,
        "{} rows for {elapsed:?} of refusals from one source: {refused:#?}",
        refused.len()
    );
    let mut reasons = std::collections::BTreeMap::<String, u64>::new();
    for details in &refused {
        for (reason, n) in details["reasons"].as_object().unwrap() {
            *reasons.entry(reason.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    let third = u64::try_from(TASKS * EACH / 3).unwrap();
    for reason in [
        "no bearer token",
        "not a JWT",
        "signature or claims do not verify",
    ] {
        assert_eq!(reasons.get(reason), Some(&third), "{reasons:?}");
    }
    assert_eq!(reasons.values().sum::<u64>(), total, "{reasons:?}");
    // Nothing else was written for them: the one token issued for the forgery is the only other.
    let (after, _) = audit_rows(&pool).await;
    let others = after - before - i64::try_from(refused.len()).unwrap();
    assert_eq!(others, 1, "rows besides auth.refused (one token.issued)");
    let failed = count(
        &pool,
        "SELECT count(*) FROM audit_events WHERE event IN ('auth.failed', 'ip_mismatch')",
    )
    .await;
    assert_eq!(failed, 0);
    server.stop().await;
}
