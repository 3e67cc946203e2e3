//! The request loop against a scripted HTTP server on the loopback address (no broker): retries
//! on 503 and 429 with `Retry-After`, giving up after `max_retries`, one new token on a 401
//! `invalid_token`, one token for many calls, and the broker's error shape read into
//! `Error::Broker`. The live tests (`tests/live.rs`) do the same against a real broker, where
//! some of it cannot be made to happen on demand.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{Client, Error, ErrorCode};

/// One scripted answer.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: body.to_owned(),
    }
}

fn token(value: &str) -> Reply {
    reply(
        200,
        &format!(
            r#"{{"access_token":"{value}","token_type":"Bearer","expires_in":300,"scope":"wrap"}}"#
        ),
    )
}

fn wrapped() -> Reply {
    reply(200, r#"{"wrapped":"kb:v1:1:abc","mk_version":1}"#)
}

fn error(status: u16, code: &str) -> Reply {
    reply(
        status,
        &format!(r#"{{"error":{{"code":"{code}","message":"scripted {code}"}}}}"#),
    )
}

/// What the server saw: request path and `Authorization` header.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Serves `script` in order, one answer per request (each on its own connection), and records
/// the requests.
async fn serve(script: Vec<Reply>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            let (head_len, body_len) = loop {
                let n = stream.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    break (pos + 4, len);
                }
            };
            if head_len == 0 {
                continue;
            }
            while buf.len() < head_len + body_len {
                let n = stream.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
            let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
            let auth = head
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .starts_with("authorization:")
                        .then(|| l["authorization:".len()..].trim().to_owned())
                })
                .unwrap_or_default();
            log.lock().unwrap().push((path, auth));
            let answer = script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| error(500, "script_exhausted"));
            let mut out = format!(
                "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nx-request-id: req-{}\r\n",
                answer.status,
                answer.body.len(),
                log.lock().unwrap().len()
            );
            for (k, v) in &answer.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            out.push_str(&answer.body);
            let _ = stream.write_all(out.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (url, seen)
}

fn client(url: &str, max_retries: u32) -> Client {
    Client::builder(url, "id", "secret")
        .max_retries(max_retries)
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .build()
        .unwrap()
}

fn paths(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect()
}

#[tokio::test]
async fn one_token_serves_many_calls_and_goes_as_basic_then_bearer() {
    let (url, seen) = serve(vec![token("t1"), wrapped(), wrapped()]).await;
    let c = client(&url, 0);
    c.wrap(&[7; 32], None).await.unwrap();
    c.rewrap("kb:v1:1:abc", None).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, "/v1/oauth/token");
    // HTTP Basic of "id:secret".
    assert_eq!(seen[0].1, "Basic aWQ6c2VjcmV0");
    assert_eq!(seen[1], ("/v1/wrap".to_owned(), "Bearer t1".to_owned()));
    assert_eq!(seen[2], ("/v1/rewrap".to_owned(), "Bearer t1".to_owned()));
    assert_eq!(c.stats().token_requests, 1);
}

#[tokio::test]
async fn retries_503_and_429_then_succeeds() {
    let mut limited = error(429, "rate_limited");
    limited.headers.push(("retry-after", "0"));
    let (url, seen) = serve(vec![
        token("t1"),
        error(503, "hsm_unavailable"),
        limited,
        wrapped(),
    ])
    .await;
    let c = client(&url, 4);
    let w = c.wrap(&[7; 32], None).await.unwrap();
    assert_eq!(w.mk_version, 1);
    assert_eq!(c.stats().retries, 2);
    assert_eq!(
        paths(&seen),
        ["/v1/oauth/token", "/v1/wrap", "/v1/wrap", "/v1/wrap"]
    );
}

#[tokio::test]
async fn gives_up_after_max_retries_with_the_last_error() {
    let (url, _) = serve(vec![
        token("t1"),
        error(503, "hsm_unavailable"),
        error(503, "hsm_unavailable"),
        error(503, "database_unavailable"),
        wrapped(),
    ])
    .await;
    let c = client(&url, 2);
    match c.wrap(&[7; 32], None).await.unwrap_err() {
        Error::Broker {
            status,
            code,
            message,
            request_id,
        } => {
            assert_eq!(status, 503);
            assert_eq!(code, ErrorCode::DatabaseUnavailable);
            assert_eq!(message, "scripted database_unavailable");
            // From the header, since the body has none.
            assert_eq!(request_id.as_deref(), Some("req-4"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.stats().retries, 2);
}

#[tokio::test]
async fn other_errors_are_not_retried() {
    let (url, seen) = serve(vec![token("t1"), error(422, "context_mismatch"), wrapped()]).await;
    let c = client(&url, 4);
    let err = c.unwrap("kb:v1:1:abc", None).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::ContextMismatch));
    assert_eq!(paths(&seen).len(), 2);
}

#[tokio::test]
async fn retry_after_is_waited_for() {
    let mut limited = error(429, "rate_limited");
    limited.headers.push(("retry-after", "1"));
    let (url, _) = serve(vec![token("t1"), limited, wrapped()]).await;
    let c = Client::builder(&url, "id", "secret")
        .backoff(Duration::from_millis(1), Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    c.wrap(&[7; 32], None).await.unwrap();
    // A lower bound only: a loaded machine makes it longer, never shorter.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once() {
    let (url, seen) = serve(vec![
        token("t1"),
        error(401, "invalid_token"),
        token("t2"),
        wrapped(),
    ])
    .await;
    let c = client(&url, 0);
    c.wrap(&[7; 32], None).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[1].1, "Bearer t1");
    assert_eq!(seen[3].1, "Bearer t2");
    assert_eq!(c.stats().token_requests, 2);
}

#[tokio::test]
async fn a_second_401_after_renewal_is_returned() {
    let (url, _) = serve(vec![
        token("t1"),
        error(401, "invalid_token"),
        token("t2"),
        error(401, "invalid_token"),
        wrapped(),
    ])
    .await;
    let c = client(&url, 4);
    let err = c.wrap(&[7; 32], None).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::InvalidToken));
    assert_eq!(c.stats().token_requests, 2);
}

#[tokio::test]
async fn wrong_credentials_give_the_oauth_error() {
    let (url, _) = serve(vec![reply(
        401,
        r#"{"error":"invalid_client","error_description":"client authentication failed"}"#,
    )])
    .await;
    let err = client(&url, 4).authenticate().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.code(), Some(&ErrorCode::InvalidClient));
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[tokio::test]
async fn a_bad_envelope_makes_no_request() {
    let (url, seen) = serve(vec![]).await;
    let c = client(&url, 0);
    let err = c.decrypt(b"kbx\x01garbage", None).await.unwrap_err();
    assert!(matches!(err, Error::Envelope(_)), "{err:?}");
    assert!(paths(&seen).is_empty());
}
