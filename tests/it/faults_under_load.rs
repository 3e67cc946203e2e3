//! Faults under load, nothing lost: data keys, managed-key creation and secret writes keep
//! running from several tasks against a child broker (real HTTPS; its token reached through the
//! fault module; its database on a Postgres cluster of this test's own) while that Postgres is
//! restarted with `pg_ctl restart -m immediate`, then while the token is taken away and given
//! back. Every request answered 2xx must read back afterwards, every failure must be a 503 with
//! an outage code, and the broker must serve again by itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{PATIENCE, b64, scratch_dir};
use crate::faults::FaultyToken;

/// The codes a failed request may carry: the three outages `src/api/mod.rs` maps to 503. Any
/// other answer (a 500 above all, or a 4xx) fails the test.
const OUTAGE_CODES: [&str; 3] = ["database_unavailable", "hsm_unavailable", "hsm_timeout"];

/// Load tasks per kind of request.
const TASKS_PER_KIND: usize = 2;

/// Successes of each kind wanted before a fault and after it: enough to show the kind works,
/// few enough for a loaded machine.
const SUCCESSES_AROUND_A_FAULT: usize = 10;

/// The kinds of request the load sends, each of them a write that must not be lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    DataKey,
    CreateKey,
    WriteSecret,
}

const KINDS: [Kind; 3] = [Kind::DataKey, Kind::CreateKey, Kind::WriteSecret];

/// What one request got back.
#[derive(Debug, Clone)]
enum Answer {
    /// `POST /v1/datakey`: the task (its context), the blob and the key it must open to.
    DataKey {
        task: String,
        wrapped: String,
        plaintext: String,
    },
    /// `POST /v1/keys` with `return_plaintext`: the key and its material.
    Key { id: String, plaintext: String },
    /// `PUT /v1/secrets/{name}`: the version stored and the value written.
    Secret {
        name: String,
        version: u64,
        value: String,
    },
    /// 503 with one of [`OUTAGE_CODES`].
    Outage(String),
    /// Anything else the server answered: status and body.
    Unexpected(String),
    /// No answer at all (a dropped connection, or none within [`PATIENCE`]).
    Dropped(String),
}

impl Answer {
    fn is_success(&self) -> bool {
        matches!(
            self,
            Self::DataKey { .. } | Self::Key { .. } | Self::Secret { .. }
        )
    }
}

/// One request of the load, with the fault clock read when it was sent and when its answer
/// came: the clock moves at each fault's start and end, so whether a request overlapped a fault
/// follows from the order of events, not from a duration.
#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    sent: u64,
    answered: u64,
    answer: Answer,
}

/// A fault's place on the clock: it began when the clock became `start` and was over when it
/// became `end`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: u64,
    end: u64,
}

impl Window {
    fn before(&self, o: &Outcome) -> bool {
        o.answered < self.start
    }
    fn during(&self, o: &Outcome) -> bool {
        o.sent < self.end && o.answered >= self.start
    }
    fn after(&self, o: &Outcome) -> bool {
        o.sent >= self.end
    }
}

/// The load: tasks sending requests in closed loops, and everything they got back.
struct Load {
    clock: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &reqwest::Client, base: &str, bearer: &str) -> Self {
        let clock = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for kind in KINDS {
            for n in 0..TASKS_PER_KIND {
                let task = format!("{kind:?}-{n}").to_lowercase();
                let (http, base, bearer) = (http.clone(), base.to_owned(), bearer.to_owned());
                let (clock, stop, outcomes) = (clock.clone(), stop.clone(), outcomes.clone());
                tasks.push(tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let sent = clock.load(Ordering::SeqCst);
                        let answer = send(kind, &http, &base, &bearer, &task, seq).await;
                        let answered = clock.load(Ordering::SeqCst);
                        let failed = !answer.is_success();
                        outcomes.lock().unwrap().push(Outcome {
                            kind,
                            sent,
                            answered,
                            answer,
                        });
                        seq += 1;
                        // A client backs off after a failure instead of spinning on a broker
                        // that answers 503 at once.
                        if failed {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }));
            }
        }
        Self {
            clock,
            stop,
            outcomes,
            tasks,
        }
    }

    /// Moves the fault clock on; returns its new value.
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self, kind: Kind, wanted: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.kind == kind && wanted(o))
            .count()
    }

    /// Polls until every kind has `n` outcomes that `wanted` accepts, for up to [`PATIENCE`].
    async fn wait_for_each_kind(&self, n: usize, what: &str, wanted: impl Fn(&Outcome) -> bool) {
        let start = Instant::now();
        loop {
            let counts: Vec<usize> = KINDS.iter().map(|k| self.count(*k, &wanted)).collect();
            if counts.iter().all(|c| *c >= n) {
                return;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{what}: wanted {n} of each of {KINDS:?}, got {counts:?}; {}",
                self.summary()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the tasks (each finishes the request it is in) and returns every outcome.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.outcomes.lock().unwrap().clone()
    }

    fn summary(&self) -> String {
        summarise(&self.outcomes.lock().unwrap())
    }
}

/// Per kind: successes, outages by code, and anything else.
fn summarise(outcomes: &[Outcome]) -> String {
    let mut lines = Vec::new();
    for kind in KINDS {
        let of_kind: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
        let ok = of_kind.iter().filter(|o| o.answer.is_success()).count();
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        for o in &of_kind {
            let label = match &o.answer {
                Answer::Outage(code) => format!("503 {code}"),
                Answer::Unexpected(_) => "unexpected".to_owned(),
                Answer::Dropped(_) => "dropped".to_owned(),
                _ => continue,
            };
            *codes.entry(label).or_default() += 1;
        }
        lines.push(format!("{kind:?}: {ok} ok, failures {codes:?}"));
    }
    lines.join("; ")
}

/// One request of `kind`, told apart by `task` and `seq`.
async fn send(
    kind: Kind,
    http: &reqwest::Client,
    base: &str,
    bearer: &str,
    task: &str,
    seq: u64,
) -> Answer {
    // The value a secret write stores: unique, so a read of another version cannot match it.
    let value = b64(format!("{task} {seq} {}", uuid::Uuid::new_v4()).as_bytes());
    let request = match kind {
        Kind::DataKey => http
            .post(format!("{base}/v1/datakey"))
            .json(&json!({"context": {"task": task}})),
        Kind::CreateKey => http.post(format!("{base}/v1/keys")).json(&json!({
            "name": format!("{task}-{seq}"),
            "format": "raw",
            "length": 32,
            "return_plaintext": true,
        })),
        Kind::WriteSecret => http
            .put(format!("{base}/v1/secrets/{task}"))
            .json(&json!({ "value": value })),
    };
    let response = match request.bearer_auth(bearer).timeout(PATIENCE).send().await {
        Ok(response) => response,
        Err(e) => return Answer::Dropped(format!("{e:?}")),
    };
    let status = response.status().as_u16();
    let body: Value = match response.bytes().await {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            Err(_) => {
                return Answer::Unexpected(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
        },
        Err(e) => return Answer::Dropped(format!("{status}, then {e:?}")),
    };
    let text = |field: &Value| field.as_str().map(str::to_owned);
    let understood = match (kind, status) {
        (Kind::DataKey, 200) => {
            text(&body["wrapped"])
                .zip(text(&body["plaintext"]))
                .map(|(wrapped, plaintext)| Answer::DataKey {
                    task: task.to_owned(),
                    wrapped,
                    plaintext,
                })
        }
        (Kind::CreateKey, 201) => text(&body["key"]["id"])
            .zip(text(&body["plaintext"]))
            .map(|(id, plaintext)| Answer::Key { id, plaintext }),
        (Kind::WriteSecret, 200) => {
            body["current_version"]
                .as_u64()
                .map(|version| Answer::Secret {
                    name: task.to_owned(),
                    version,
                    value: value.clone(),
                })
        }
        (_, 503) => body["error"]["code"]
            .as_str()
            .filter(|code| OUTAGE_CODES.contains(code))
            .map(|code| Answer::Outage(code.to_owned())),
        _ => None,
    };
    understood.unwrap_or_else(|| Answer::Unexpected(format!("{status}: {body}")))
}

/// A Postgres cluster of this test's own, which it may restart: the suite's shared cluster
/// serves every other test at the same time. Made and run by `scripts/lib.sh`, as
/// `scripts/test.sh` makes the shared one, but by the test itself: it costs only the runs that
/// include this test, and lives and dies with it (stopped when dropped, a failed test too).
struct PrivatePostgres {
    dir: PathBuf,
    url: String,
}

impl PrivatePostgres {
    fn start(name: &str) -> Self {
        let scratch = scratch_dir(name);
        // The unprivileged user Postgres runs as must reach its folder.
        std::fs::set_permissions(
            &scratch,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let dir = scratch.join("pg");
        let url = lib_sh(
            r#"kb_setup_postgres "$1" keybroker >&2; echo "$DATABASE_URL""#,
            &dir,
        );
        Self {
            dir,
            url: url.trim().to_owned(),
        }
    }
}

/// `pg_ctl restart -m immediate` on the cluster in `dir`: every backend is killed without a
/// checkpoint (a crash, as far as clients can tell), then the server starts again with crash
/// recovery, on the same port (pg_ctl reuses the options it was started with). Returns once it
/// accepts connections.
fn restart_immediately(dir: &Path) {
    lib_sh(
        r#"kb_pg_run "$KB_PG_BIN/pg_ctl" -D "$1" -m immediate -w -l "$1/server.log" restart >&2"#,
        dir,
    );
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(r#"source "$0"; kb_stop_postgres "$1""#)
            .arg(lib_path())
            .arg(&self.dir)
            .output();
    }
}

fn lib_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib.sh")
}

/// Runs `script` in bash with `scripts/lib.sh` sourced and `dir` as `$1`; its stdout.
fn lib_sh(script: &str, dir: &Path) -> String {
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(r#"set -euo pipefail; source "$0"; {script}"#))
        .arg(lib_path())
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Polls until some backend of the cluster at `url` waits for a lock, for up to [`PATIENCE`].
async fn wait_for_a_blocked_backend(url: &str) {
    let start = Instant::now();
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    loop {
        let waiting = crate::common::count(
            &pool,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if waiting > 0 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no write of the load ever waited for the audit table's lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.close().await;
}

/// Asserts that `window` really overlapped the load: every kind succeeded before it and after
/// it, and some request in it failed with an outage.
fn assert_overlapped(outcomes: &[Outcome], window: Window, fault: &str) {
    for kind in KINDS {
        let of_kind = |wanted: &dyn Fn(&Outcome) -> bool| {
            outcomes
                .iter()
                .filter(|o| o.kind == kind && o.answer.is_success() && wanted(o))
                .count()
        };
        assert!(
            of_kind(&|o| window.before(o)) > 0,
            "{fault}: no {kind:?} succeeded before"
        );
        assert!(
            of_kind(&|o| window.after(o)) > 0,
            "{fault}: no {kind:?} succeeded after"
        );
    }
    let during: Vec<&Outcome> = outcomes.iter().filter(|o| window.during(o)).collect();
    let outages = during
        .iter()
        .filter(|o| matches!(o.answer, Answer::Outage(_)))
        .count();
    assert!(outages > 0, "{fault}: no request failed during the fault");
    println!(
        "{fault}: {} requests overlapped it, {outages} of them answered 503; during it: {}",
        during.len(),
        summarise(&during.into_iter().cloned().collect::<Vec<_>>())
    );
}

/// A read that must give back what the broker acknowledged.
#[derive(Debug, Clone)]
enum Check {
    /// Blobs, each with its task's context and the key it must open to.
    Unwrap(Vec<(String, String, String)>),
    Key {
        id: String,
        plaintext: String,
    },
    Secret {
        name: String,
        version: u64,
        value: String,
    },
}

/// What is wrong with one check, if anything.
async fn run_check(
    http: &reqwest::Client,
    base: &str,
    bearer: &str,
    check: &Check,
) -> Option<String> {
    let (method, path, body) = match check {
        Check::Unwrap(items) => {
            let items: Vec<Value> = items
                .iter()
                .map(|(wrapped, task, _)| json!({"wrapped": wrapped, "context": {"task": task}}))
                .collect();
            (
                reqwest::Method::POST,
                "/v1/unwrap/batch".to_owned(),
                Some(json!({ "items": items })),
            )
        }
        Check::Key { id, .. } => (
            reqwest::Method::POST,
            format!("/v1/keys/{id}/plaintext"),
            Some(json!({})),
        ),
        Check::Secret { name, version, .. } => (
            reqwest::Method::GET,
            format!("/v1/secrets/{name}?version={version}"),
            None,
        ),
    };
    let url = format!("{base}{path}");
    let (status, reply) = crate::common::send_json(http, method, url, bearer, body.as_ref()).await;
    if status != 200 {
        return Some(format!("{path}: {status} {reply}"));
    }
    let wrong = match check {
        Check::Unwrap(items) => {
            items
                .iter()
                .zip(reply["items"].as_array().into_iter().flatten())
                .any(|((_, _, plaintext), got)| got["plaintext"] != plaintext.as_str())
                || reply["items"].as_array().map(Vec::len) != Some(items.len())
        }
        Check::Key { plaintext, .. } => reply["plaintext"] != plaintext.as_str(),
        Check::Secret { value, .. } => reply["value"] != value.as_str(),
    };
    wrong.then(|| format!("{path}: acknowledged, but reads back as {reply}"))
}

/// Checks that everything the broker acknowledged is there: each data key's blob opens to its
/// key, each created key reads back with its material, each secret version with its value.
/// Eight readers at a time, so thousands of checks stay quick.
async fn assert_all_readable(token: &FaultyToken, acknowledged: &[Answer]) {
    let mut checks = Vec::new();
    let mut blobs = Vec::new();
    for answer in acknowledged {
        match answer.clone() {
            Answer::DataKey {
                task,
                wrapped,
                plaintext,
            } => blobs.push((wrapped, task, plaintext)),
            Answer::Key { id, plaintext } => checks.push(Check::Key { id, plaintext }),
            Answer::Secret {
                name,
                version,
                value,
            } => checks.push(Check::Secret {
                name,
                version,
                value,
            }),
            Answer::Outage(_) | Answer::Unexpected(_) | Answer::Dropped(_) => {}
        }
    }
    checks.extend(blobs.chunks(100).map(|c| Check::Unwrap(c.to_vec())));
    let total = checks.len();
    let checks = Arc::new(Mutex::new(checks));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, base) = token.server.endpoint();
        let (bearer, checks) = (token.server.token.clone(), checks.clone());
        readers.spawn(async move {
            let mut problems = Vec::new();
            loop {
                let Some(check) = checks.lock().unwrap().pop() else {
                    return problems;
                };
                problems.extend(run_check(&http, &base, &bearer, &check).await);
            }
        });
    }
    let mut problems = Vec::new();
    while let Some(found) = readers.join_next().await {
        problems.extend(found.unwrap());
    }
    assert!(
        problems.is_empty(),
        "{} of {total} reads lost what was acknowledged, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_a_postgres_restart_and_a_token_outage_under_load() {
    let postgres = PrivatePostgres::start("faults-under-load-pg");
    let token = FaultyToken::start_on_database(
        "faults-under-load",
        &postgres.url,
        &[
            // The admin's one access token outlives the test, however slow the machine.
            ("KEYBROKER_TOKEN_TTL_SECS", "3600"),
            // Thousands of requests: trace level would cost more than the load itself.
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let server = &token.server;
    // The test measures outages, not the rate limits: lifted, as scripts/bench.sh does.
    let (status, body) = server
        .send(
            reqwest::Method::PUT,
            "/v1/admin/security-settings",
            Some(&json!({
                "per_ip_per_second": 1_000_000, "per_ip_burst": 1_000_000,
                "per_client_per_second": 1_000_000, "per_client_burst": 1_000_000,
                "block_after_violations": 1_000_000, "anomaly_refusals": 0,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (http, base) = server.endpoint();
    let load = Load::start(&http, &base, &server.token);
    let succeeded = |o: &Outcome| o.answer.is_success();

    // Phase 1: Postgres crashes and comes back. To be sure writes are in flight when it goes,
    // a transaction of ours holds the audit table (every key creation and secret write appends
    // to it) until some write of the load waits for it; then the restart kills them all.
    load.wait_for_each_kind(SUCCESSES_AROUND_A_FAULT, "before the restart", succeeded)
        .await;
    let start = load.tick();
    let mut holder = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&postgres.url).await.unwrap()
    };
    sqlx::raw_sql("BEGIN; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    wait_for_a_blocked_backend(&postgres.url).await;
    let dir = postgres.dir.clone();
    tokio::task::spawn_blocking(move || restart_immediately(&dir))
        .await
        .unwrap();
    let restart = Window {
        start,
        end: load.tick(),
    };
    drop(holder); // its backend died with the others
    load.wait_for_each_kind(SUCCESSES_AROUND_A_FAULT, "after the restart", |o| {
        succeeded(o) && restart.after(o)
    })
    .await;

    // Phase 2: the token goes away (every call fails as a removed device does) until every
    // kind of request has met it, then comes back.
    let start = load.tick();
    token.inject("rv = CKR_DEVICE_REMOVED\n");
    load.wait_for_each_kind(1, "while the token is away", |o| {
        o.sent >= start && matches!(o.answer, Answer::Outage(_))
    })
    .await;
    token.heal();
    let outage = Window {
        start,
        end: load.tick(),
    };
    load.wait_for_each_kind(SUCCESSES_AROUND_A_FAULT, "after the token came back", |o| {
        succeeded(o) && outage.after(o)
    })
    .await;

    let outcomes = load.finish().await;
    println!(
        "whole run: {} requests; {}",
        outcomes.len(),
        summarise(&outcomes)
    );
    // Every answer was a success or a 503 outage; none was missing.
    let wrong: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match &o.answer {
            Answer::Unexpected(what) => Some(format!("{:?}: {what}", o.kind)),
            Answer::Dropped(what) => Some(format!("{:?}: no answer: {what}", o.kind)),
            _ => None,
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} answers outside the contract, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_overlapped(&outcomes, restart, "pg_ctl restart -m immediate");
    assert_overlapped(&outcomes, outage, "token away");

    // Nothing acknowledged was lost, and the same broker process (never restarted) serves it.
    let acknowledged: Vec<Answer> = outcomes
        .into_iter()
        .map(|o| o.answer)
        .filter(Answer::is_success)
        .collect();
    assert_all_readable(&token, &acknowledged).await;
    let log = token.server.stop().await;
    assert!(!log.contains("panicked"), "the broker panicked");
}
