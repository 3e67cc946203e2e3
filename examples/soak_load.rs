//! The load generator of `scripts/soak.sh`: keybroker's mixed workload (mostly data keys and
//! unwraps, some managed-key reads, some secret reads and writes), either as fast as
//! [`CONNECTIONS`] keep-alive connections go (`peak SECONDS`) or open-loop at a fixed rate
//! (`rate RPS SECONDS`). It prints one `key=value` summary line (requests, errors, achieved
//! rate, p50/p99 latency), then the requests by status and the errors by code.
//!
//! ```text
//! KB_URL=https://127.0.0.1:8443 KB_CA=ca.pem KB_BEARER_FILE=bearer \
//!   cargo run --release --example soak_load -- rate 800 600
//! ```
//!
//! `KB_BEARER_FILE` holds an access token with the scopes `datakey unwrap keys:* secrets:*`
//! (a file, not an argument, so `ps` never shows it). In `rate` mode a request's latency counts
//! from the moment it was due, not from when it was sent: a broker that stalls shows in p99
//! instead of silently slowing the load down (wrk and its kind measure the other way).
//!
//! Why a tool of ours: wrk has no rate control, and a rate-controlled tool with a mixed,
//! stateful workload (a blob to unwrap, a managed key, secrets) would need scripting anyway;
//! this one reuses the HTTP client the test suite already builds, and on tokio a few thousand
//! requests per second cost it far less than the broker's share of the machine.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// Keep-alive connections in `peak` mode, and the most requests in flight in `rate` mode.
const CONNECTIONS: usize = 64;

/// One kind of request of the mix.
#[derive(Debug, Clone, Copy)]
enum Op {
    DataKey,
    Unwrap,
    KeyRead,
    SecretRead,
    SecretWrite,
}

/// Twenty requests: 8 data keys, 8 unwraps, 2 managed-key reads, 1 secret read, 1 secret write.
const MIX: [Op; 20] = {
    use Op::*;
    [
        DataKey,
        Unwrap,
        DataKey,
        Unwrap,
        KeyRead,
        DataKey,
        Unwrap,
        DataKey,
        Unwrap,
        SecretRead,
        DataKey,
        Unwrap,
        DataKey,
        Unwrap,
        KeyRead,
        DataKey,
        Unwrap,
        DataKey,
        Unwrap,
        SecretWrite,
    ]
};

/// Secret names the writes spread over, so two writes to one name rarely overlap (a broker that
/// has retried a write racing another for the same name answers 409 `concurrent_update`).
const WRITE_NAMES: u64 = 64;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// What the mix works on: a blob to unwrap and a managed key to read, made at start.
struct Target {
    http: reqwest::Client,
    base: String,
    bearer: String,
    wrapped: String,
    key_id: String,
}

/// Everything the requests got back.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn record(&mut self, outcome: &Outcome, latency: Duration) {
        let (status, error) = match outcome {
            Outcome::Ok(status) => (status.to_string(), None),
            Outcome::Refused(status, code) => {
                (status.to_string(), Some(format!("{status} {code}")))
            }
            Outcome::NoAnswer(what) => ("none".to_owned(), Some(format!("no answer: {what}"))),
        };
        *self.by_status.entry(status).or_default() += 1;
        if let Some(error) = error {
            *self.errors.entry(error).or_default() += 1;
        }
        self.latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }
}

enum Outcome {
    Ok(u16),
    Refused(u16, String),
    NoAnswer(String),
}

fn client(ca_pem: &[u8]) -> Result<reqwest::Client> {
    keybroker::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 keep-alive, one request per connection at a time, as wrk in scripts/bench.sh.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .pool_max_idle_per_host(CONNECTIONS)
        .timeout(Duration::from_secs(30))
        .build()?)
}

impl Target {
    async fn connect() -> Result<Self> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let http = client(&std::fs::read(var("KB_CA")?)?)?;
        let bearer = std::fs::read_to_string(var("KB_BEARER_FILE")?)?
            .trim()
            .to_owned();
        let mut target = Self {
            http,
            base: var("KB_URL")?,
            bearer,
            wrapped: String::new(),
            key_id: String::new(),
        };
        let key = target
            .set_up(
                "/v1/datakey",
                json!({"context": {"soak": "yes"}, "plaintext": false}),
            )
            .await?;
        target.wrapped = text(&key["wrapped"])?;
        let name = format!("soak-{}", uuid::Uuid::new_v4().simple());
        let managed = target
            .set_up(
                "/v1/keys",
                json!({"name": name, "format": "raw", "length": 32}),
            )
            .await?;
        target.key_id = text(&managed["key"]["id"])?;
        let response = target
            .http
            .put(format!("{}/v1/secrets/soak-read", target.base))
            .bearer_auth(&target.bearer)
            .json(&json!({"value": b64(b"read me, again and again")}))
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("writing a secret: {}", response.text().await?).into());
        }
        Ok(target)
    }

    async fn set_up(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.bearer)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {body}").into());
        }
        Ok(body)
    }

    /// Request number `n` of the mix (`op` is `MIX[n % 20]`).
    fn request(&self, op: Op, n: u64) -> reqwest::RequestBuilder {
        let base = &self.base;
        match op {
            Op::DataKey => self
                .http
                .post(format!("{base}/v1/datakey"))
                .json(&json!({"context": {"soak": "yes"}})),
            Op::Unwrap => self
                .http
                .post(format!("{base}/v1/unwrap"))
                .json(&json!({"wrapped": self.wrapped, "context": {"soak": "yes"}})),
            Op::KeyRead => self
                .http
                .post(format!("{base}/v1/keys/{}/plaintext", self.key_id))
                .json(&json!({})),
            Op::SecretRead => self.http.get(format!("{base}/v1/secrets/soak-read")),
            Op::SecretWrite => self
                .http
                // One write in every 20 requests: by round, not by `n`, or the 20 would share
                // a quarter of the names (gcd(20, 64) = 4).
                .put(format!(
                    "{base}/v1/secrets/soak-{}",
                    (n / MIX.len() as u64) % WRITE_NAMES
                ))
                .json(&json!({"value": b64(format!("value {n}").as_bytes())})),
        }
    }

    async fn send(&self, n: u64) -> Outcome {
        let op = MIX[(n % MIX.len() as u64) as usize];
        let response = match self.request(op, n).bearer_auth(&self.bearer).send().await {
            Ok(response) => response,
            Err(e) => return Outcome::NoAnswer(e.to_string()),
        };
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Outcome::NoAnswer(format!("{status}, then {e}")),
        };
        if (200..300).contains(&status) {
            return Outcome::Ok(status);
        }
        let code = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|b| b["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "-".to_owned());
        Outcome::Refused(status, format!("{op:?} {code}"))
    }
}

fn text(value: &Value) -> Result<String> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, got {value}").into())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// As fast as [`CONNECTIONS`] connections go, each sending its next request when the last one
/// is answered.
async fn peak(target: Arc<Target>, seconds: u64) -> (Tally, Duration) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (target, tally, next) = (target.clone(), tally.clone(), next.clone());
        workers.spawn(async move {
            while Instant::now() < end {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let outcome = target.send(n).await;
                if let Ok(mut tally) = tally.lock() {
                    tally.record(&outcome, sent.elapsed());
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    (take(tally), elapsed)
}

/// Open loop: request `n` is due at `start + n / rps`, whatever happened to the ones before
/// (at most [`CONNECTIONS`] in flight; a request waiting for a free slot is late, and its
/// latency says so).
async fn rate(target: Arc<Target>, rps: f64, seconds: u64) -> (Tally, Duration) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let start = tokio::time::Instant::now();
    let total = (rps * seconds as f64) as u64;
    let mut in_flight = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rps);
        tokio::time::sleep_until(due).await;
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (target, tally) = (target.clone(), tally.clone());
        in_flight.spawn(async move {
            let outcome = target.send(n).await;
            if let Ok(mut tally) = tally.lock() {
                tally.record(&outcome, due.elapsed());
            }
            drop(slot);
        });
        // Reap finished tasks as we go, so the set does not grow for the whole run.
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    (take(tally), elapsed)
}

fn take(tally: Arc<Mutex<Tally>>) -> Tally {
    tally
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default()
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: soak_load peak SECONDS | soak_load rate RPS SECONDS";
    let target = Arc::new(Target::connect().await?);
    let (mode, target_rps, (mut tally, elapsed)) = match args.as_slice() {
        [mode, seconds] if mode == "peak" => {
            let seconds = seconds.parse()?;
            ("peak", 0.0, peak(target, seconds).await)
        }
        [mode, rps, seconds] if mode == "rate" => {
            let rps: f64 = rps.parse()?;
            if !rps.is_finite() || rps <= 0.0 {
                return Err(usage.into());
            }
            ("rate", rps, rate(target, rps, seconds.parse()?).await)
        }
        _ => return Err(usage.into()),
    };
    tally.latencies_us.sort_unstable();
    let requests = tally.latencies_us.len();
    let errors: u64 = tally.errors.values().sum();
    println!(
        "mode={mode} target_rps={target_rps:.0} seconds={:.1} requests={requests} errors={errors} \
         achieved_rps={:.0} p50_ms={:.2} p99_ms={:.2}",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        percentile_ms(&tally.latencies_us, 0.50),
        percentile_ms(&tally.latencies_us, 0.99),
    );
    for (status, n) in &tally.by_status {
        println!("  status {status}: {n}");
    }
    for (error, n) in &tally.errors {
        println!("  error {error}: {n}");
    }
    Ok(())
}
