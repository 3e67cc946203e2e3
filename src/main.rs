//! The `keybroker` command: `serve`, the officer's `hsm …` commands, `dev-cert`, `bench`, and
//! its own shell completions and man pages.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};

use keybroker::api::{AppState, RequestLog, error_chain};
use keybroker::auth::{
    Authenticator, BlockRequest, Client, ClientSecret, ClientSpec, SecuritySettings,
};
use keybroker::broker::{Broker, Limits, RewrapStart};
use keybroker::config::{AuthArgs, DatabaseArgs, ServeArgs, TokenArgs, read_secret};
use keybroker::crypto::{Aad, DEK_LEN, EncryptionContext, MasterKeyVersion};
use keybroker::hsm::{self, Hsm};
use keybroker::server::RunningServer;
use keybroker::store::AdminGuard;
use keybroker::store::Store;
use keybroker::tls;

/// The broker allocates a little for every request (JSON, headers, the request-log row) from
/// many threads at once; mimalloc's per-thread heaps make that markedly cheaper than glibc's
/// malloc (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "keybroker", version, about = "HSM-backed key broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTPS API.
    Serve {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Security-officer commands on the token.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Security-officer commands on clients.
    Client {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// The audit trail.
    Audit {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Make (once) a development CA and server certificate in a folder.
    DevCert {
        /// Folder for ca.pem, server.pem and server-key.pem.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Measure the token's raw seal rate through the HSM layer (no HTTP).
    Bench {
        #[command(flatten)]
        token: TokenArgs,
        /// How long each measurement runs, in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent callers of the HSM layer; 0 runs every seal inside one blocking call.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Print a shell completion script, e.g. `keybroker completions bash >
    /// /etc/bash_completion.d/keybroker`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a folder.
    Man {
        /// Write keybroker.1 and a page for every subcommand (keybroker-hsm-init.1, ...) here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Initialise a token in a free slot (SoftHSM2 and other software tokens). PINs come from
    /// KEYBROKER_SO_PIN and KEYBROKER_PIN (or their _FILE forms), never from flags.
    InitToken {
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Create master key v1, the signing key pair and the audit key where missing, check the
    /// existing ones, and record the master keys in Postgres. Idempotent.
    Init {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        /// Where to write the bootstrap admin's credentials as JSON (mode 0600), when this run
        /// creates them; they are printed either way, once.
        #[arg(long)]
        admin_credentials_out: Option<PathBuf>,
        /// The broker's public base URL, for the `token_url` in those credentials.
        #[arg(
            long,
            env = "KEYBROKER_PUBLIC_URL",
            default_value = "https://127.0.0.1:8443"
        )]
        public_url: String,
    },
    /// Ask the token for everything keybroker depends on, without touching keybroker's
    /// objects or Postgres: library and token, the mechanisms with their flags and key sizes,
    /// whether the token keeps or replaces a caller's AES-GCM IV (a seal/open round trip on a
    /// temporary session key, destroyed afterwards), how many sessions it grants (up to the
    /// pool size), and a verdict. Exits non-zero when the token is not usable.
    Probe {
        #[command(flatten)]
        token: TokenArgs,
    },
    /// List keybroker's objects on the token (flags only, never a value) and the master-key
    /// versions recorded in Postgres, and run the self-test.
    Status {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Create master key v(N+1) and make it active for new seals (or finish a rotation that
    /// stopped half-way). Older versions stay decrypt-only.
    RotateMaster {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Move every stored blob to the active master key, with a progress bar (joins the job
    /// running on any broker; interrupting it loses nothing: run it again).
    Rewrap {
        /// Blobs per batch (one transaction and one token call each).
        #[arg(long, default_value_t = keybroker::broker::REWRAP_BATCH)]
        batch_size: i64,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Retire a decrypt-only master-key version that no stored blob references.
    RetireMaster {
        /// The version, e.g. 1.
        #[arg(long)]
        version: u32,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Remove a retired master-key version from the token, for good. Refused while any stored
    /// blob references it; asks to type its label unless --yes.
    DestroyMaster {
        /// The version, e.g. 1.
        #[arg(long)]
        version: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Create token-signing key v(N+1) and sign with it; the previous key stays in the JWKS
    /// until every token it signed has expired.
    RotateSigning {
        #[command(flatten)]
        token: TokenArgs,
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the MAC chain and report the first broken link (exit status 1 if any).
    Verify,
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Register a client; its secret is printed once.
    Register {
        /// Display name.
        #[arg(long)]
        name: String,
        /// An allowed source address (repeatable).
        #[arg(long = "ip")]
        ips: Vec<String>,
        /// An allowed source network (repeatable).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// `strict`: only from the addresses given; `none`: from anywhere.
        #[arg(long, value_parser = ["strict", "none"])]
        ip_mode: String,
        /// Space-separated scopes, e.g. "datakey unwrap keys:*".
        #[arg(long)]
        scopes: String,
        /// A P-256 public key (SPKI PEM file) for private_key_jwt.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// List clients.
    List,
    /// Show one client.
    Show {
        /// Client id.
        id: uuid::Uuid,
    },
    /// Disable a client: its live tokens stop working at once.
    Disable {
        /// Client id.
        id: uuid::Uuid,
        /// Allow disabling the last active client with the admin scope (the API then has no
        /// administrator until an officer registers or enables one here).
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Enable a client again.
    Enable {
        /// Client id.
        id: uuid::Uuid,
    },
    /// Delete a client.
    Delete {
        /// Client id.
        id: uuid::Uuid,
        /// Allow deleting the last active client with the admin scope.
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Lock a client down at once: disabled, its live tokens refused, a critical audit event.
    /// With --block, also block its registered addresses (or the --cidr parts of them) for a
    /// while; `client unblock` lifts that sooner.
    Lockdown {
        /// Client id.
        id: uuid::Uuid,
        /// Why, for the audit trail.
        #[arg(long, default_value = "lockdown by the officer")]
        reason: String,
        /// Also block the client's registered addresses.
        #[arg(long)]
        block: bool,
        /// Block only this network, within the client's own (repeatable; implies --block).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// How long the block lasts, in seconds.
        #[arg(long, default_value_t = keybroker::auth::DEFAULT_BLOCK_SECS)]
        block_secs: u64,
        /// Allow locking down the last active client with the admin scope.
        #[arg(long)]
        allow_no_admin: bool,
    },
    /// Lift the address blocks of a client's lockdowns (the client stays disabled until
    /// enabled).
    Unblock {
        /// Client id.
        id: uuid::Uuid,
    },
}

/// `--allow-no-admin` as the store's guard.
fn admin_guard(allow_no_admin: bool) -> AdminGuard {
    if allow_no_admin {
        AdminGuard::AllowNone
    } else {
        AdminGuard::KeepOne
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How log lines are written, from `KEYBROKER_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers: timestamp, level, target, the event's fields
    /// (the access line's request id, client id, route, status and latency among them) and the
    /// request span's fields under `span`.
    Json,
}

impl LogFormat {
    fn from_env() -> Result<Self, String> {
        match std::env::var("KEYBROKER_LOG_FORMAT") {
            Err(std::env::VarError::NotPresent) => Ok(Self::Text),
            Ok(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Ok(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Ok(v) => Err(format!(
                "KEYBROKER_LOG_FORMAT must be `text` or `json`, not `{}`",
                v.escape_debug()
            )),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err("KEYBROKER_LOG_FORMAT must be `text` or `json`".to_owned())
            }
        }
    }
}

/// Logs go to standard error, filtered by `RUST_LOG` (default `info,sqlx=warn`), as text or JSON.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let text = (format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        // After the level filter: only warnings that would be written use up its minute.
        .with(tls::PeerWarningThrottle::default())
        .with(text)
        .with(json)
        .init();
}

/// `keybroker completions SHELL`: the completion script clap makes from the CLI definitions.
fn print_completions(shell: clap_complete::Shell) {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "keybroker",
        &mut std::io::stdout(),
    );
}

/// `keybroker man [--dir DIR]`: the man page from the CLI definitions, or every page into DIR.
fn write_man(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(Cli::command(), dir)
        }
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    }
}

fn main() -> ExitCode {
    match LogFormat::from_env() {
        Ok(format) => init_logging(format),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::Serve {
            token,
            db,
            serve,
            auth,
        } => serve_api(token, db, serve, auth).await,
        Command::Hsm { command } => run_hsm(command).await,
        Command::Client { token, db, command } => run_client(token, db, command).await,
        Command::Audit {
            token,
            db,
            command: AuditCommand::Verify,
        } => {
            let broker = broker(&token, &db, Limits { max_batch: 1 }).await?;
            let verdict = keybroker::audit::verify(broker.store(), broker.hsm()).await?;
            match verdict.first_broken {
                None => {
                    println!("audit chain intact: {} rows verified", verdict.rows);
                    Ok(())
                }
                Some((seq, why)) => {
                    println!("audit chain BROKEN at row {seq}: {why}");
                    Err(format!("audit chain broken at row {seq}").into())
                }
            }
        }
        Command::DevCert { dir } => {
            let cert = tls::ensure_dev_certificate(&dir)?;
            println!("CA (trust this):  {}", cert.ca.display());
            println!("server cert:      {}", cert.cert.display());
            println!("server key:       {}", cert.key.display());
            Ok(())
        }
        Command::Bench {
            token,
            seconds,
            concurrency,
        } => bench_token(token, seconds, concurrency).await,
        Command::Completions { shell } => {
            print_completions(shell);
            Ok(())
        }
        Command::Man { dir } => Ok(write_man(dir.as_deref())?),
    }
}

async fn broker(token: &TokenArgs, db: &DatabaseArgs, limits: Limits) -> Result<Broker, BoxError> {
    let hsm = Hsm::connect(token.hsm_config()?).await?;
    let store = Store::connect_lazy(&db.database_url, db.db_max_connections)?;
    store.migrate().await?;
    Ok(Broker::new(hsm, store, limits))
}

async fn serve_api(
    token: TokenArgs,
    db: DatabaseArgs,
    serve: ServeArgs,
    auth: AuthArgs,
) -> Result<(), BoxError> {
    let tls_config = tls::server_config(&serve.tls_cert, &serve.tls_key)?;
    let limits = Limits {
        max_batch: serve.max_batch,
    };
    let broker = Arc::new(broker(&token, &db, limits).await?.with_master_key_policy(
        keybroker::broker::MasterKeyPolicy {
            rotation_period_days: serve.mk_rotation_days,
            max_seals: serve.mk_max_seals,
        },
    ));
    // Before anything is served: a token that would seal what it cannot open stops us here.
    let tested = broker.self_test().await?;
    tracing::info!(token = %token.token_label, versions = ?tested.iter().map(ToString::to_string).collect::<Vec<_>>(), "self-test passed: AES-GCM seal and open under every master key in use");
    // The custody gauges hold something from the first scrape on; the task keeps them fresh.
    broker.refresh_custody_snapshot().await;
    let custody_gauges =
        broker.spawn_custody_refresher(Duration::from_secs(serve.metrics_refresh_secs));
    let auth = Arc::new(
        Authenticator::load(
            broker.hsm().clone(),
            broker.store().clone(),
            auth.auth_config(serve.listen),
        )
        .await?,
    );
    let request_log = RequestLog::start(
        broker.store().clone(),
        Duration::from_millis(serve.request_log_flush_ms),
    );
    let limiter = Arc::new(keybroker::api::limits::Limiter::new(
        keybroker::auth::SecuritySettings::load(broker.store()).await?,
        keybroker::api::limits::system_clock(),
    ));
    limiter.refresh(broker.store()).await?;
    auth.start_cache();
    let refresher = tokio::spawn(refresh_limits(
        limiter.clone(),
        broker.clone(),
        auth.cache().limits_changes(),
    ));
    let state = AppState {
        broker: broker.clone(),
        auth: auth.clone(),
        request_log: request_log.clone(),
        limiter,
    };
    let limits = keybroker::listener::ListenerLimits {
        header_timeout: Duration::from_millis(serve.header_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(serve.idle_timeout_ms.max(1)),
        handshake_timeout: Duration::from_millis(serve.tls_handshake_timeout_ms.max(1)),
        max_connections_per_source: serve.max_connections_per_source.max(1),
    };
    let mut server = RunningServer::start_with_limits(
        state,
        serve.listen,
        tls_config,
        serve.max_body_bytes,
        limits,
    )
    .await?;
    let maintenance = tokio::spawn(maintenance_loop(
        broker.clone(),
        auth.clone(),
        Duration::from_secs(serve.maintenance_interval_secs.max(1)),
        serve.request_log_retention_days,
    ));
    tracing::info!(addr = %server.addr, token = %token.token_label, "serving https");
    // `shutdown` drains the server and then writes the request log; a server that failed by
    // itself has no requests left in flight, so its log is written here.
    let served = tokio::select! {
        result = server.wait() => result,
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            server.shutdown().await
        }
    };
    request_log.shutdown().await;
    auth.flush_refusals().await;
    served?;
    maintenance.abort();
    refresher.abort();
    custody_gauges.abort();
    // Counts gathered since the last tick.
    if let Err(e) = broker.flush_usage().await {
        tracing::warn!(error = %error_chain(&e), "usage counts not saved at shutdown");
    }
    Ok(())
}

/// Re-reads rate-limit settings and blocked sources as soon as Postgres announces a change to
/// them (made on any broker), and every two seconds regardless.
async fn refresh_limits(
    limiter: Arc<keybroker::api::limits::Limiter>,
    broker: Arc<Broker>,
    mut changes: tokio::sync::watch::Receiver<u64>,
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
        if let Err(e) = limiter.refresh(broker.store()).await {
            tracing::warn!(error = %error_chain(&e), "rate-limit settings not refreshed");
        }
    }
}

/// Scheduled rotation, expiry, destruction after the pending window, purges (the request log's
/// after `request_log_retention_days`) and usage flushes, every `interval`. Several brokers may
/// run it at once: Postgres hands each item to one.
async fn maintenance_loop(
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    interval: Duration,
    request_log_retention_days: u32,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match broker.run_maintenance(keybroker::auth::unix_now()).await {
            Ok(report) => {
                if !report.rotated.is_empty()
                    || report.expired > 0
                    || !report.destroyed_keys.is_empty()
                    || !report.destroyed_secrets.is_empty()
                    || report.master_key_rotated.is_some()
                    || report.rewrapped > 0
                {
                    tracing::info!(
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
            Err(e) => tracing::warn!(error = %error_chain(&e), "maintenance pass failed"),
        }
        // Replaced signing keys leave the JWKS once their tokens expired; a rotation made on
        // another broker is picked up.
        if let Err(e) = auth
            .maintain_signing_keys(keybroker::auth::unix_now())
            .await
        {
            tracing::warn!(error = %error_chain(&e), "signing keys not refreshed");
        }
        // Apart from the pass above, so that a failed rotation does not keep old rows.
        match broker
            .purge_request_log(keybroker::auth::unix_now(), request_log_retention_days)
            .await
        {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "request log purged"),
            Err(e) => tracing::warn!(error = %error_chain(&e), "request log purge failed"),
        }
        // The first pass runs at start-up: tests wait for this line before doing what a pass
        // must not race with.
        tracing::debug!("maintenance pass finished");
    }
}

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

async fn run_hsm(command: HsmCommand) -> Result<(), BoxError> {
    let limits = Limits { max_batch: 1 };
    match command {
        HsmCommand::InitToken { token } => {
            let so_pin = read_secret("KEYBROKER_SO_PIN")?;
            let user_pin = read_secret("KEYBROKER_PIN")?;
            hsm::init_token(
                token.pkcs11_module.clone(),
                token.token_label.clone(),
                so_pin,
                user_pin,
            )
            .await?;
            println!("initialised token {:?}", token.token_label);
        }
        HsmCommand::Init {
            token,
            db,
            admin_credentials_out,
            public_url,
        } => {
            let broker = broker(&token, &db, limits).await?;
            let report = broker.initialise().await?;
            if report.created.is_empty() {
                println!(
                    "token {:?} already initialised; nothing created",
                    token.token_label
                );
            }
            for label in &report.created {
                println!("created {label}");
            }
            print_self_test(&broker).await?;
            print_master_keys(&broker).await?;
            let auth = authenticator(&broker, &public_url).await?;
            if let Some((client, secret)) = auth.bootstrap_admin().await? {
                print_bootstrap(
                    &client,
                    &secret,
                    &public_url,
                    admin_credentials_out.as_deref(),
                )?;
            }
        }
        HsmCommand::Probe { token } => {
            let report = hsm::probe(token.hsm_config()?).await?;
            print!("{report}");
            let problems = report.problems();
            if !problems.is_empty() {
                return Err(format!(
                    "token {:?} is not usable by keybroker: {}",
                    token.token_label,
                    problems.join("; ")
                )
                .into());
            }
        }
        HsmCommand::Status { token, db } => {
            let broker = broker(&token, &db, limits).await?;
            print_status(&broker).await?;
        }
        HsmCommand::RotateMaster { token, db } => {
            let broker = broker(&token, &db, limits).await?;
            let version = broker.rotate_master_key().await?;
            println!(
                "master key v{version} is active; run `keybroker hsm rewrap` to move stored blobs to it"
            );
            print_master_keys(&broker).await?;
        }
        HsmCommand::Rewrap {
            batch_size,
            token,
            db,
        } => {
            let broker = broker(&token, &db, limits).await?;
            let (job, start) = broker.start_rewrap("officer").await?;
            if job.state == "running" {
                let verb = if start == RewrapStart::Joined {
                    "joined"
                } else {
                    "started"
                };
                println!(
                    "{verb} rewrap job {}: {} blobs to move",
                    job.id, job.remaining
                );
                let total = job.rewrapped + job.remaining;
                broker
                    .run_rewrap(batch_size, |step| {
                        print_progress(step.rewrapped, total.max(step.rewrapped));
                    })
                    .await?;
                println!();
            } else {
                println!(
                    "nothing to move: every stored blob is under the active version (rewrap job {} is done)",
                    job.id
                );
            }
            print_master_keys(&broker).await?;
        }
        HsmCommand::RetireMaster { version, token, db } => {
            let version = MasterKeyVersion::new(version).ok_or("versions start at 1")?;
            let broker = broker(&token, &db, limits).await?;
            broker.retire_master_key(version).await?;
            println!("master key v{version} retired");
            print_master_keys(&broker).await?;
        }
        HsmCommand::DestroyMaster {
            version,
            yes,
            token,
            db,
        } => {
            let version = MasterKeyVersion::new(version).ok_or("versions start at 1")?;
            let label = version.token_label();
            if !yes {
                confirm(
                    &format!(
                        "This removes {label} from the token for good: blobs that clients still hold \
                     under it can never be opened again. Type {label} to go on: "
                    ),
                    &label,
                )?;
            }
            let broker = broker(&token, &db, limits).await?;
            broker.destroy_master_key(version).await?;
            println!("master key v{version} destroyed");
            print_master_keys(&broker).await?;
        }
        HsmCommand::RotateSigning { token, db, auth } => {
            let broker = broker(&token, &db, limits).await?;
            let config = auth.auth_config(std::net::SocketAddr::from(([127, 0, 0, 1], 8443)));
            let authenticator =
                Authenticator::load(broker.hsm().clone(), broker.store().clone(), config).await?;
            let version = authenticator
                .rotate_signing_key(keybroker::auth::unix_now())
                .await?;
            println!(
                "token-signing key {} signs from now on; brokers pick it up within one \
                 maintenance pass, and the previous key stays in the JWKS until its tokens expire",
                keybroker::hsm::signing_key_label(version)
            );
        }
    }
    Ok(())
}

async fn authenticator(broker: &Broker, public_url: &str) -> Result<Authenticator, BoxError> {
    let config = AuthArgs {
        public_url: Some(public_url.to_owned()),
        token_audience: "keybroker".to_owned(),
        token_ttl_secs: 300,
        token_leeway_secs: 30,
        trusted_proxies: Vec::new(),
        refusal_audit_secs: 60,
        auth_cache_max_age_ms: 1000,
        console_idle_secs: 900,
        console_absolute_secs: 28_800,
    }
    .auth_config(std::net::SocketAddr::from(([127, 0, 0, 1], 8443)));
    Ok(Authenticator::load(broker.hsm().clone(), broker.store().clone(), config).await?)
}

/// Shows the bootstrap admin's credentials once, and writes them to `out` (mode 0600) if asked.
fn print_bootstrap(
    client: &Client,
    secret: &ClientSecret,
    public_url: &str,
    out: Option<&std::path::Path>,
) -> Result<(), BoxError> {
    let token_url = format!("{}/v1/oauth/token", public_url.trim_end_matches('/'));
    println!();
    println!("bootstrap admin client (shown once; keep the secret somewhere safe):");
    println!("  client_id:     {}", client.id);
    println!("  client_secret: {}", secret.expose());
    println!("  token_url:     {token_url}");
    if let Some(path) = out {
        let json = serde_json::json!({
            "client_id": client.id,
            "client_secret": secret.expose(),
            "token_url": token_url,
        });
        // A file left by an earlier database holds credentials that no longer exist.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        std::io::Write::write_all(&mut file, format!("{json:#}\n").as_bytes())?;
        println!("  written to:    {}", path.display());
    }
    Ok(())
}

async fn run_client(
    token: TokenArgs,
    db: DatabaseArgs,
    command: ClientCommand,
) -> Result<(), BoxError> {
    let broker = broker(&token, &db, Limits { max_batch: 1 }).await?;
    let auth = authenticator(&broker, "https://127.0.0.1:8443").await?;
    match command {
        ClientCommand::Register {
            name,
            ips,
            cidrs,
            ip_mode,
            scopes,
            public_key,
        } => {
            let public_key = public_key.map(std::fs::read_to_string).transpose()?;
            let addresses: Vec<String> = ips.into_iter().chain(cidrs).collect();
            let spec = ClientSpec::new(name, &ip_mode, &addresses, &scopes, public_key)?;
            let (client, secret) = auth.register(spec).await?;
            print_client(&client);
            println!("client_secret: {} (shown once)", secret.expose());
        }
        ClientCommand::List => {
            let mut after = None;
            loop {
                let page = auth.clients(after, 200).await?;
                for client in &page {
                    println!(
                        "{}  {:<8}  {:<6}  {}",
                        client.id,
                        if client.active { "active" } else { "disabled" },
                        client.ip_policy.mode(),
                        client.name
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 200 => after = Some(last.id),
                    _ => break,
                }
            }
        }
        ClientCommand::Show { id } => print_client(&auth.client(id).await?),
        ClientCommand::Disable { id, allow_no_admin } => print_client(
            &auth
                .set_active(id, false, admin_guard(allow_no_admin))
                .await?,
        ),
        ClientCommand::Enable { id } => {
            print_client(&auth.set_active(id, true, AdminGuard::KeepOne).await?);
        }
        ClientCommand::Delete { id, allow_no_admin } => {
            auth.delete(id, admin_guard(allow_no_admin)).await?;
            println!("deleted {id}");
        }
        ClientCommand::Lockdown {
            id,
            reason,
            block,
            cidrs,
            block_secs,
            allow_no_admin,
        } => {
            let settings = SecuritySettings::load(broker.store()).await?;
            let request = (block || !cidrs.is_empty()).then(|| BlockRequest {
                cidrs: (!cidrs.is_empty()).then_some(cidrs.as_slice()),
                secs: block_secs,
                min_prefix_v4: settings.block_min_prefix_v4,
                min_prefix_v6: settings.block_min_prefix_v6,
            });
            let (client, block) = auth
                .lock_down(id, &reason, request, admin_guard(allow_no_admin))
                .await?;
            print_client(&client);
            match block {
                Some(block) => println!(
                    "blocked:    {} (until unix time {}; every broker within seconds)",
                    block.cidrs.join(" "),
                    block.until
                ),
                None => println!("blocked:    nothing (use --block to block its addresses)"),
            }
        }
        ClientCommand::Unblock { id } => {
            auth.client(id).await?;
            let lifted = broker
                .store()
                .unblock_client_sources(id, &keybroker::audit::meta())
                .await?;
            println!("lifted {lifted} block(s) of {id}; every broker within seconds");
        }
    }
    Ok(())
}

fn print_client(client: &Client) {
    println!("client_id:  {}", client.id);
    println!("name:       {}", client.name);
    println!(
        "state:      {}",
        if client.active { "active" } else { "disabled" }
    );
    println!(
        "ip policy:  {} {}",
        client.ip_policy.mode(),
        client.ip_policy.cidrs().join(" ")
    );
    println!("scopes:     {}", client.scopes);
    println!(
        "public key: {}",
        if client.public_key_pem.is_some() {
            "yes"
        } else {
            "no"
        }
    );
}

/// Runs the self-test and prints its verdict; a failure is the command's error.
async fn print_self_test(broker: &Broker) -> Result<(), BoxError> {
    let tested = broker.self_test().await?;
    if tested.is_empty() {
        println!("self-test: no master key in use yet; nothing to test");
        return Ok(());
    }
    let versions: Vec<String> = tested.iter().map(|v| format!("v{v}")).collect();
    println!(
        "self-test passed: CKM_AES_GCM seal and open under master key {}",
        versions.join(", ")
    );
    Ok(())
}

async fn print_status(broker: &Broker) -> Result<(), BoxError> {
    let objects = broker.hsm().status().await?;
    let flag = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    println!(
        "{:<22} {:<12} {:<15} {:<9} {:<11} {:<17} {:<5} {:<7} {:<8} {:<8} ID",
        "LABEL",
        "CLASS",
        "KEY TYPE",
        "SENSITIVE",
        "EXTRACTABLE",
        "NEVER-EXTRACTABLE",
        "WRAP",
        "UNWRAP",
        "ENCRYPT",
        "DECRYPT"
    );
    for o in objects {
        println!(
            "{:<22} {:<12} {:<15} {:<9} {:<11} {:<17} {:<5} {:<7} {:<8} {:<8} {}",
            o.label,
            o.class,
            o.key_type,
            flag(o.sensitive),
            flag(o.extractable),
            flag(o.never_extractable),
            flag(o.wrap),
            flag(o.unwrap),
            flag(o.encrypt),
            flag(o.decrypt),
            o.id
        );
    }
    println!();
    print_master_keys(broker).await?;
    println!();
    print_self_test(broker).await
}

async fn print_master_keys(broker: &Broker) -> Result<(), BoxError> {
    println!(
        "{:<8} {:<13} {:<12} {:<12} {:<9} CREATED",
        "MK", "STATE", "SEALS", "BLOBS", "ON TOKEN"
    );
    for view in broker.master_key_overview().await? {
        let on_token = if view.on_token { "yes" } else { "no" };
        match &view.recorded {
            Some(row) => println!(
                "{:<8} {:<13} {:<12} {:<12} {:<9} {}",
                format!("v{}", view.version),
                row.state,
                row.seals,
                row.stored_blobs,
                on_token,
                row.created_at
            ),
            // Created on the token but never recorded (a rotation whose database was restored
            // from a backup, or by hand): `hsm init` adopts it as decrypt-only.
            None => println!(
                "{:<8} {:<13} {:<12} {:<12} {:<9} -",
                format!("v{}", view.version),
                "unrecorded",
                "-",
                "-",
                on_token
            ),
        }
    }
    Ok(())
}

/// A one-line progress bar on stderr, redrawn in place.
fn print_progress(done: i64, total: i64) {
    const WIDTH: i64 = 40;
    let filled = if total > 0 {
        done * WIDTH / total
    } else {
        WIDTH
    };
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    eprint!("\r[{bar}] {done}/{total} blobs rewrapped");
}

/// Asks on the terminal for `expected` to be typed; anything else (or no terminal) stops.
fn confirm(prompt: &str, expected: &str) -> Result<(), BoxError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err("refusing without confirmation: no terminal to ask on (use --yes)".into());
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != expected {
        return Err("not confirmed; nothing was destroyed".into());
    }
    Ok(())
}

/// Seals a fresh DEK (token RNG, then AES-GCM under MK v1) as `datakey` does, minus HTTP and
/// Postgres, and prints the rate and latency percentiles: with `concurrency` 0, in tight loops
/// of 1000 inside one blocking call each (the token's own rate); otherwise one [`Hsm::run`] per seal from
/// that many tasks (the HSM layer's rate, thread hand-offs included).
async fn bench_token(token: TokenArgs, seconds: u64, concurrency: usize) -> Result<(), BoxError> {
    let hsm = Hsm::connect(token.hsm_config()?).await?;
    let version = MasterKeyVersion::FIRST;
    let context = EncryptionContext::default();
    let aad = Aad {
        mk_version: version,
        client_id: None,
        key_ref: None,
        context: &context,
    }
    .bytes();
    let duration = Duration::from_secs(seconds);
    let started = Instant::now();
    let mut all = if concurrency == 0 {
        // Blocks of 1000 seals per call, so that no call outlives the HSM layer's deadline.
        let mut all = Vec::new();
        while started.elapsed() < duration {
            let aad = aad.clone();
            all.extend(
                hsm.run(move |t| {
                    let mut latencies = Vec::with_capacity(1000);
                    for _ in 0..1000 {
                        let one = Instant::now();
                        let dek = t.random(DEK_LEN)?;
                        t.seal(version, &dek, &aad)?;
                        latencies.push(one.elapsed());
                    }
                    Ok(latencies)
                })
                .await?,
            );
        }
        all
    } else {
        let deadline = started + duration;
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let hsm = hsm.clone();
            let aad = aad.clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let aad = aad.clone();
                    let start = Instant::now();
                    hsm.run(move |t| {
                        let dek = t.random(DEK_LEN)?;
                        t.seal(version, &dek, &aad)
                    })
                    .await?;
                    latencies.push(start.elapsed());
                }
                Ok::<_, hsm::HsmError>(latencies)
            }));
        }
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await??);
        }
        all
    };
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let mode = if concurrency == 0 {
        "inline".to_owned()
    } else {
        format!("layer concurrency={concurrency}")
    };
    println!(
        "token_seal {mode} ops={} ops_per_s={:.0} p50_us={:.1} p99_us={:.1}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}
