//! `config` turns flags and environment variables into the settings each layer needs. Secrets
//! (PINs) come only from the environment or a file, never from a flag, so they do not show in
//! `ps` output, and nothing here prints them.

use std::net::SocketAddr;

use ipnet::IpNet;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use crate::auth::AuthConfig;
use crate::hsm::HsmConfig;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required secret is in neither `NAME` nor `NAME_FILE`.
    #[error("set {0} or {0}_FILE (a file holding it)")]
    MissingSecret(&'static str),
    /// `NAME_FILE` names a file we cannot read.
    #[error("cannot read {name}_FILE")]
    SecretFile {
        /// The variable.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a secret from the environment variable `name`, or from the file named by `name_FILE`
/// (trailing newline removed).
///
/// # Errors
/// [`ConfigError`] when neither is set or the file cannot be read.
pub fn read_secret(name: &'static str) -> Result<SecretString, ConfigError> {
    if let Ok(value) = std::env::var(name) {
        return Ok(SecretString::from(value));
    }
    let Ok(path) = std::env::var(format!("{name}_FILE")) else {
        return Err(ConfigError::MissingSecret(name));
    };
    let mut text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile { name, source })?;
    let trimmed = text.trim_end_matches(['\r', '\n']).to_owned();
    zeroize::Zeroize::zeroize(&mut text);
    Ok(SecretString::from(trimmed))
}

/// Where the token is.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Path of the PKCS#11 module (the vendor's library).
    #[arg(
        long,
        env = "PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pub pkcs11_module: PathBuf,
    /// Label of the token keybroker uses.
    #[arg(long, env = "KEYBROKER_TOKEN_LABEL", default_value = "keybroker")]
    pub token_label: String,
    /// Sessions in the pool, i.e. token calls at once. SoftHSM2 serialises work, so more than
    /// the core count buys nothing there; a networked HSM wants more.
    #[arg(long, env = "KEYBROKER_HSM_POOL_SIZE", default_value_t = 2)]
    pub hsm_pool_size: usize,
    /// How long a call waits for a session and the token's answer, in milliseconds.
    #[arg(long, env = "KEYBROKER_HSM_TIMEOUT_MS", default_value_t = 5000)]
    pub hsm_timeout_ms: u64,
}

impl TokenArgs {
    /// The HSM layer's settings, with the user PIN from `KEYBROKER_PIN` or `KEYBROKER_PIN_FILE`.
    ///
    /// # Errors
    /// [`ConfigError`] when the PIN is not available.
    pub fn hsm_config(&self) -> Result<HsmConfig, ConfigError> {
        Ok(HsmConfig {
            module: self.pkcs11_module.clone(),
            token_label: self.token_label.clone(),
            pin: read_secret("KEYBROKER_PIN")?,
            pool_size: self.hsm_pool_size,
            op_timeout: Duration::from_millis(self.hsm_timeout_ms),
        })
    }
}

/// Where Postgres is.
#[derive(Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://user@127.0.0.1:5432/keybroker.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Most connections this process opens.
    #[arg(long, env = "KEYBROKER_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl std::fmt::Debug for DatabaseArgs {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field("database_url", &"[REDACTED]")
            .field("db_max_connections", &self.db_max_connections)
            .finish()
    }
}

/// How to serve HTTPS.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYBROKER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "KEYBROKER_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key for TLS.
    #[arg(long, env = "KEYBROKER_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Most items in one batch request.
    #[arg(long, env = "KEYBROKER_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "KEYBROKER_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Milliseconds a request head may take to arrive complete, from the connection's opening
    /// or from the request's first byte; slower connections are closed.
    #[arg(long, env = "KEYBROKER_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Milliseconds a keep-alive connection may wait for its next request.
    #[arg(long, env = "KEYBROKER_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Milliseconds the TLS handshake may take.
    #[arg(
        long,
        env = "KEYBROKER_TLS_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub tls_handshake_timeout_ms: u64,
    /// Open connections per source address (the TCP peer); more are closed at once.
    #[arg(
        long,
        env = "KEYBROKER_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 256
    )]
    pub max_connections_per_source: usize,
    /// Seconds between background maintenance passes (scheduled rotation, expiry, destruction,
    /// purges, usage flush).
    #[arg(
        long,
        env = "KEYBROKER_MAINTENANCE_INTERVAL_SECS",
        default_value_t = 30
    )]
    pub maintenance_interval_secs: u64,
    /// Seconds between reads of the key-custody gauges `/metrics` shows from Postgres (a scrape
    /// reads memory only; which versions the token holds is checked by each maintenance pass).
    #[arg(long, env = "KEYBROKER_METRICS_REFRESH_SECS", default_value_t = 15)]
    pub metrics_refresh_secs: u64,
    /// Days the request log keeps a row; the maintenance pass purges older ones.
    #[arg(
        long,
        env = "KEYBROKER_REQUEST_LOG_RETENTION_DAYS",
        default_value_t = 7
    )]
    pub request_log_retention_days: u32,
    /// Milliseconds between writes of the request log's partial batches (a full batch of 500
    /// rows is written at once): how far behind the log may be while serving.
    #[arg(long, env = "KEYBROKER_REQUEST_LOG_FLUSH_MS", default_value_t = 200)]
    pub request_log_flush_ms: u64,
    /// Rotate the master key when the active version is this many days old (0: never by age);
    /// a rewrap job then moves the stored blobs.
    #[arg(long, env = "KEYBROKER_MK_ROTATION_DAYS", default_value_t = 365)]
    pub mk_rotation_days: u32,
    /// Rotate the master key when the active version has done this many seals (GCM with random
    /// IVs allows 2^32 per key; the default, 2^30, stays far below).
    #[arg(long, env = "KEYBROKER_MK_MAX_SEALS", default_value_t = 1 << 30)]
    pub mk_max_seals: u64,
}

/// How access tokens are issued and checked.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// The broker's public base URL: the `iss` of its tokens, and with `/v1/oauth/token` the
    /// `aud` that client assertions must carry. Default: https:// and the listen address.
    #[arg(long, env = "KEYBROKER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The `aud` of access tokens.
    #[arg(long, env = "KEYBROKER_TOKEN_AUDIENCE", default_value = "keybroker")]
    pub token_audience: String,
    /// Access-token lifetime, in seconds.
    #[arg(long, env = "KEYBROKER_TOKEN_TTL_SECS", default_value_t = 300)]
    pub token_ttl_secs: u64,
    /// Clock skew allowed on `exp`/`nbf`, in seconds.
    #[arg(long, env = "KEYBROKER_TOKEN_LEEWAY_SECS", default_value_t = 30)]
    pub token_leeway_secs: u64,
    /// Proxies (addresses or CIDRs, comma-separated) whose X-Forwarded-For is believed.
    #[arg(long, env = "KEYBROKER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
    /// Refusals before authentication (missing, bad, expired or revoked bearer tokens; token
    /// requests naming no client id) are recorded as one `auth.refused` audit event per source
    /// per this many seconds.
    #[arg(long, env = "KEYBROKER_REFUSAL_AUDIT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub refusal_audit_secs: u64,
    /// The oldest, in milliseconds, that this broker's cache of client state and revoked
    /// tokens may be. Changes reach every broker at once through Postgres notifications; this
    /// re-read is the backstop, and a cache older than it is not used (requests read Postgres).
    /// The default, 1000, is the design's guarantee; a larger value only weakens the backstop.
    #[arg(long, env = "KEYBROKER_AUTH_CACHE_MAX_AGE_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub auth_cache_max_age_ms: u64,
    /// An officer's console session ends after this many seconds without a request.
    #[arg(long, env = "KEYBROKER_CONSOLE_IDLE_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub console_idle_secs: u64,
    /// An officer's console session ends this many seconds after sign-in, used or not.
    #[arg(long, env = "KEYBROKER_CONSOLE_ABSOLUTE_SECS", default_value_t = 28_800,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub console_absolute_secs: u64,
}

impl AuthArgs {
    /// The token settings, for a server listening on `listen`.
    pub fn auth_config(&self, listen: SocketAddr) -> AuthConfig {
        AuthConfig {
            issuer: self
                .public_url
                .clone()
                .unwrap_or_else(|| format!("https://{listen}"))
                .trim_end_matches('/')
                .to_owned(),
            audience: self.token_audience.clone(),
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            leeway: self.token_leeway_secs,
            trusted_proxies: self.trusted_proxies.clone(),
            refusal_window: Duration::from_secs(self.refusal_audit_secs),
            cache_max_age: Duration::from_millis(self.auth_cache_max_age_ms),
            console_idle: Duration::from_secs(self.console_idle_secs),
            console_absolute: Duration::from_secs(self.console_absolute_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::ServeArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn request_log_retention_is_seven_days_unless_set() {
        let base = ["keybroker", "--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let cli = Cli::try_parse_from(base).unwrap();
        assert_eq!(cli.serve.request_log_retention_days, 7);
        assert_eq!(cli.serve.request_log_flush_ms, 200);
        let set = base
            .into_iter()
            .chain(["--request-log-retention-days", "30"]);
        let cli = Cli::try_parse_from(set).unwrap();
        assert_eq!(cli.serve.request_log_retention_days, 30);
    }
}
