//! `keybroker serve`, and the one serve wiring the library offers: [`start`] brings up
//! everything a serving broker runs (self-test, custody gauges, authenticator and its cache,
//! request log, rate limiter and its refresh, the HTTPS listener, the maintenance loop) and
//! [`Serving`] stops it in order. `keybroker serve` and the integration tests both use it, so
//! tests run what production runs. The HTTP router stays in `api` and the listener in `server`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::BoxError;
use crate::api::limits::{Clock, Limiter};
use crate::api::{AppState, RequestLog, error_chain};
use crate::auth::{AuthConfig, Authenticator};
use crate::broker::{Broker, Limits, MasterKeyPolicy};
use crate::config::{AuthArgs, DatabaseArgs, ServeArgs, TokenArgs};
use crate::listener::ListenerLimits;
use crate::server::RunningServer;
use crate::tls;

/// The target of this file's log lines: the binary's, as when they were written in `main`, so
/// that log filters and shippers see the lines they always saw.
const LOG_TARGET: &str = "keybroker";

/// How to serve: what `keybroker serve` reads from its flags, and tests set as they need.
pub struct ServeOptions {
    /// Address to listen on (port 0: any free port; [`Serving::addr`] tells which).
    pub listen: SocketAddr,
    /// The TLS settings (certificate and key already loaded).
    pub tls: Arc<rustls::ServerConfig>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Connection limits of the listener.
    pub listener: ListenerLimits,
    /// Token issue and verification settings.
    pub auth: AuthConfig,
    /// How often the custody gauges are read from Postgres.
    pub metrics_refresh: Duration,
    /// How often the request log writes a partial batch.
    pub request_log_flush: Duration,
    /// Time between maintenance passes (the first runs at start-up).
    pub maintenance_interval: Duration,
    /// Days the request log keeps a row.
    pub request_log_retention_days: u32,
    /// The rate limiter's clock ([`crate::api::limits::system_clock`] outside tests).
    pub clock: Clock,
}

/// A serving broker and the tasks around it.
pub struct Serving {
    /// The address the listener is bound to.
    pub addr: SocketAddr,
    /// The broker it serves.
    pub broker: Arc<Broker>,
    /// Its authenticator.
    pub auth: Arc<Authenticator>,
    /// Its rate limiter.
    pub limiter: Arc<Limiter>,
    server: RunningServer,
    request_log: RequestLog,
    /// Maintenance loop, limiter refresh, custody gauges: aborted at shutdown.
    tasks: Vec<JoinHandle<()>>,
    passes: watch::Receiver<u64>,
}

/// Starts serving `broker` (already connected and migrated) as `options` say: the self-test
/// first (a token that would seal what it cannot open stops us here), then everything else, the
/// first maintenance pass running as soon as the listener is up.
///
/// # Errors
/// A failed self-test, an unreadable signing key or setting, or an address that cannot be
/// bound.
pub async fn start(broker: Arc<Broker>, options: ServeOptions) -> Result<Serving, BoxError> {
    let tested = broker.self_test().await?;
    tracing::info!(target: LOG_TARGET, token = %broker.token_label(), versions = ?tested.iter().map(ToString::to_string).collect::<Vec<_>>(), "self-test passed: AES-GCM seal and open under every master key in use");
    // The custody gauges hold something from the first scrape on; the task keeps them fresh.
    broker.refresh_custody_snapshot().await;
    let mut tasks = vec![broker.spawn_custody_refresher(options.metrics_refresh)];
    // Should a later step fail, the loops started here stop (a `serve` that fails exits anyway;
    // a test goes on).
    let started = async {
        let auth = Arc::new(broker.authenticator(options.auth).await?);
        let request_log = RequestLog::start(broker.clone(), options.request_log_flush);
        let limiter = Arc::new(Limiter::new(
            broker.security_settings().await?,
            options.clock,
        ));
        limiter.refresh(&broker).await?;
        auth.start_cache();
        tasks.push(tokio::spawn(refresh_limits(
            limiter.clone(),
            broker.clone(),
            auth.cache().limits_changes(),
        )));
        let state = AppState {
            broker: broker.clone(),
            auth: auth.clone(),
            request_log: request_log.clone(),
            limiter: limiter.clone(),
        };
        let server = RunningServer::start_with_limits(
            state,
            options.listen,
            options.tls,
            options.max_body_bytes,
            options.listener,
        )
        .await?;
        let (passed, passes) = watch::channel(0);
        tasks.push(tokio::spawn(maintenance_loop(
            broker.clone(),
            auth.clone(),
            options.maintenance_interval,
            options.request_log_retention_days,
            passed,
        )));
        tracing::info!(target: LOG_TARGET, addr = %server.addr, token = %broker.token_label(), "serving https");
        Ok::<_, BoxError>((auth, request_log, limiter, server, passes))
    }
    .await;
    match started {
        Ok((auth, request_log, limiter, server, passes)) => Ok(Serving {
            addr: server.addr,
            broker,
            auth,
            limiter,
            server,
            request_log,
            tasks,
            passes,
        }),
        Err(e) => {
            for task in &tasks {
                task.abort();
            }
            Err(e)
        }
    }
}

impl Serving {
    /// Waits until the maintenance loop has finished `n` passes since start-up (the first runs
    /// at once), for callers that must not race with one.
    pub async fn maintenance_passes(&self, n: u64) {
        let mut passes = self.passes.clone();
        // Err: the loop is gone (aborted); there is nothing to wait for.
        let _ = passes.wait_for(|done| *done >= n).await;
    }

    /// Serves until `signal` fires (then shuts down as [`Serving::shutdown`] does) or the
    /// server stops by itself on an error.
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), BoxError> {
        let Self {
            broker,
            auth,
            mut server,
            request_log,
            tasks,
            ..
        } = self;
        // `shutdown` drains the server and then writes the request log; a server that failed
        // by itself has no requests left in flight, so its log is written here.
        let served = tokio::select! {
            result = server.wait() => result,
            () = signal => {
                tracing::info!(target: LOG_TARGET, "shutting down");
                server.shutdown().await
            }
        };
        finish(broker, auth, request_log, tasks, served).await
    }

    /// Stops accepting connections, lets in-flight requests finish, writes the request log and
    /// the pending refusal audits, stops the background tasks and saves the usage counts.
    ///
    /// # Errors
    /// The server's I/O error.
    pub async fn shutdown(self) -> Result<(), BoxError> {
        let served = self.server.shutdown().await;
        finish(self.broker, self.auth, self.request_log, self.tasks, served).await
    }
}

/// What follows the listener's stop, in this order: the request log written, refusals
/// audited, the tasks stopped, the usage counts gathered since the last tick saved.
async fn finish(
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    request_log: RequestLog,
    tasks: Vec<JoinHandle<()>>,
    served: std::io::Result<()>,
) -> Result<(), BoxError> {
    request_log.shutdown().await;
    auth.flush_refusals().await;
    for task in &tasks {
        task.abort();
    }
    served?;
    if let Err(e) = broker.flush_usage().await {
        tracing::warn!(target: LOG_TARGET, error = %error_chain(&e), "usage counts not saved at shutdown");
    }
    Ok(())
}

/// `keybroker serve`: the broker the flags describe, served until SIGINT or SIGTERM.
pub(super) async fn serve_api(
    token: TokenArgs,
    db: DatabaseArgs,
    serve: ServeArgs,
    auth: AuthArgs,
) -> Result<(), BoxError> {
    let tls_config = tls::server_config(&serve.tls_cert, &serve.tls_key)?;
    let limits = Limits {
        max_batch: serve.max_batch,
    };
    let broker = Arc::new(
        super::broker(&token, &db, limits)
            .await?
            .with_master_key_policy(MasterKeyPolicy {
                rotation_period_days: serve.mk_rotation_days,
                max_seals: serve.mk_max_seals,
            }),
    );
    let options = ServeOptions {
        listen: serve.listen,
        tls: tls_config,
        max_body_bytes: serve.max_body_bytes,
        listener: ListenerLimits {
            header_timeout: Duration::from_millis(serve.header_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(serve.idle_timeout_ms.max(1)),
            handshake_timeout: Duration::from_millis(serve.tls_handshake_timeout_ms.max(1)),
            max_connections_per_source: serve.max_connections_per_source.max(1),
        },
        auth: auth.auth_config(serve.listen),
        metrics_refresh: Duration::from_secs(serve.metrics_refresh_secs),
        request_log_flush: Duration::from_millis(serve.request_log_flush_ms),
        maintenance_interval: Duration::from_secs(serve.maintenance_interval_secs.max(1)),
        request_log_retention_days: serve.request_log_retention_days,
        clock: crate::api::limits::system_clock(),
    };
    start(broker, options)
        .await?
        .run_until(shutdown_signal())
        .await
}

/// Re-reads rate-limit settings and blocked sources as soon as Postgres announces a change to
/// them (made on any broker), and every two seconds regardless.
async fn refresh_limits(
    limiter: Arc<Limiter>,
    broker: Arc<Broker>,
    mut changes: watch::Receiver<u64>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    let mut announced = true;
    loop {
        if announced {
            tokio::select! {
                _ = ticks.tick() => {}
                // Err: the cache is gone (shutting down); the timer alone remains.
                changed = changes.changed() => announced = changed.is_ok(),
            }
        } else {
            ticks.tick().await;
        }
        if let Err(e) = limiter.refresh(&broker).await {
            tracing::warn!(target: LOG_TARGET, error = %error_chain(&e), "rate-limit settings not refreshed");
        }
    }
}
/// Scheduled rotation, expiry, destruction after the pending window, purges (the request log's
/// after `request_log_retention_days`) and usage flushes, every `interval`. Several brokers may
/// run it at once: Postgres hands each item to one. `passed` counts the passes finished.
async fn maintenance_loop(
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    interval: Duration,
    request_log_retention_days: u32,
    passed: watch::Sender<u64>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match broker.run_maintenance(crate::auth::unix_now()).await {
            Ok(report) => {
                if !report.rotated.is_empty()
                    || report.expired > 0
                    || !report.destroyed_keys.is_empty()
                    || !report.destroyed_secrets.is_empty()
                    || report.master_key_rotated.is_some()
                    || report.rewrapped > 0
                {
                    tracing::info!(
                        target: LOG_TARGET,
                        master_key = report.master_key_rotated.map(|v| v.get()),
                        rewrapped = report.rewrapped,
                        rotated = report.rotated.len(),
                        expired = report.expired,
                        destroyed_keys = report.destroyed_keys.len(),
                        destroyed_secrets = report.destroyed_secrets.len(),
                        purged = report.purged_token_rows,
                        "maintenance"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %error_chain(&e), "maintenance pass failed")
            }
        }
        // Replaced signing keys leave the JWKS once their tokens expired; a rotation made on
        // another broker is picked up.
        if let Err(e) = auth.maintain_signing_keys(crate::auth::unix_now()).await {
            tracing::warn!(target: LOG_TARGET, error = %error_chain(&e), "signing keys not refreshed");
        }
        // Apart from the pass above, so that a failed rotation does not keep old rows.
        match broker
            .purge_request_log(crate::auth::unix_now(), request_log_retention_days)
            .await
        {
            Ok(0) => {}
            Ok(purged) => tracing::info!(target: LOG_TARGET, purged, "request log purged"),
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %error_chain(&e), "request log purge failed")
            }
        }
        // The first pass runs at start-up: tests wait for this line before doing what a pass
        // must not race with.
        tracing::debug!(target: LOG_TARGET, "maintenance pass finished");
        passed.send_modify(|done| *done += 1);
    }
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
