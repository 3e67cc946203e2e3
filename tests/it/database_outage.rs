//! Postgres going away and coming back, through a TCP relay the test can cut: 503
//! `database_unavailable` while it is gone (every call checks its token's client there), and
//! the service recovers by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::common::{PATIENCE, TestServer, error_code, fresh_database};
use keybroker::broker::Limits;

/// Relays connections to Postgres while enabled; disabling drops every live connection and
/// refuses new ones, as a crashed or partitioned database would look.
struct Relay {
    port: u16,
    enabled: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let enabled = Arc::new(AtomicBool::new(true));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (on, connections) = (enabled.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !on.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close at once
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            port,
            enabled,
            live,
        }
    }

    fn cut(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        for task in self.live.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }
}

async fn poll_until(
    server: &TestServer,
    path: &str,
    body: Option<serde_json::Value>,
    status: u16,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (got, answer) = match &body {
            Some(body) => server.post(path, body).await,
            None => server.get(path).await,
        };
        if got == status {
            return answer;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{path} never answered {status}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_lost_database_gives_503_and_service_returns_without_a_restart() {
    let direct = fresh_database().await;
    let (_, rest) = direct.split_once('@').unwrap();
    let (host_port, db_name) = rest.split_once('/').unwrap();
    let relay = Relay::start(host_port.to_owned()).await;
    let relayed = direct.replace(host_port, &format!("127.0.0.1:{}", relay.port));
    assert!(relayed.ends_with(db_name));

    let server = TestServer::start_on(&relayed, Limits { max_batch: 10 }, 1024 * 1024).await;
    let (status, key) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200, "{key}");

    relay.cut();
    let ready = poll_until(&server, "/readyz", None, 503).await;
    assert_eq!(
        ready["checks"]["database"], "database_unavailable",
        "{ready}"
    );
    assert_eq!(ready["checks"]["token"], "ok", "{ready}");
    for (path, body) in [
        ("/v1/datakey", json!({})),
        ("/v1/unwrap", json!({"wrapped": key["wrapped"]})),
    ] {
        let answer = poll_until(&server, path, Some(body), 503).await;
        assert_eq!(error_code(&answer), "database_unavailable", "{path}");
    }

    relay.restore();
    poll_until(&server, "/readyz", None, 200).await;
    let (status, body) = server.post("/v1/datakey", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post("/v1/unwrap", &json!({"wrapped": key["wrapped"]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plaintext"], key["plaintext"]);
    server.stop().await;
}
