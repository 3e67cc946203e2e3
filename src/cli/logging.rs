//! `cli::logging` sets up the process's log output (text or JSON on standard error, from
//! `KEYBROKER_LOG_FORMAT` and `RUST_LOG`). It decides where lines go, never what they say.

use crate::tls;

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

/// Logs go to standard error, filtered by `RUST_LOG` (default `info,sqlx=warn`), as text or
/// JSON as `KEYBROKER_LOG_FORMAT` says.
///
/// # Errors
/// The message for a `KEYBROKER_LOG_FORMAT` that is neither `text` nor `json` (nothing is set
/// up then).
pub fn init_logging() -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let format = LogFormat::from_env()?;
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
    Ok(())
}
