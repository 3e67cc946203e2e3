//! `tls` loads the HTTPS certificate and key into a rustls configuration (ring provider only,
//! one provider for every crate), and makes a development CA and server certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What went wrong with TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read PEM file {path}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate or key.
    #[error("invalid TLS certificate or key")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("cannot generate the development certificate")]
    Generate(#[from] rcgen::Error),
    /// Writing the development certificate failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// rustls warns about what a peer sent in its handshake (an IP address as SNI, a repeated name)
/// before any rate limit applies, so anyone could fill the log for free. This layer lets through
/// at most one rustls warning a minute; every other event passes untouched. Add it to the
/// subscriber after the level filter, so only warnings that would be written use up the minute.
pub struct PeerWarningThrottle {
    /// Unix ms of the last rustls warning let through (`i64::MIN`: none yet).
    last_ms: AtomicI64,
    clock: fn() -> i64,
}

/// How often a rustls warning may reach the log.
const PEER_WARNING_EVERY_MS: i64 = 60_000;

impl Default for PeerWarningThrottle {
    fn default() -> Self {
        Self::with_clock(|| crate::audit::now_us() / 1000)
    }
}

impl PeerWarningThrottle {
    /// A throttle on the given clock (unix ms), for tests.
    pub fn with_clock(clock: fn() -> i64) -> Self {
        Self {
            last_ms: AtomicI64::new(i64::MIN),
            clock,
        }
    }

    /// Whether an event of `target` at `level` may be written now.
    pub fn allows(&self, target: &str, level: tracing::Level) -> bool {
        if level != tracing::Level::WARN || !(target == "rustls" || target.starts_with("rustls::"))
        {
            return true;
        }
        let now = (self.clock)();
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != i64::MIN && now.saturating_sub(last) < PEER_WARNING_EVERY_MS {
            return false;
        }
        // Of racing threads, one writes.
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PeerWarningThrottle {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        // rustls logs through the `log` crate: such events carry the real target in a field,
        // and their own metadata says only "log".
        use tracing_log::NormalizeEvent;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        self.allows(meta.target(), *meta.level())
    }
}

/// Makes ring the process-wide rustls provider, so no crate can pick another one later.
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A rustls server configuration from PEM files, offering HTTP/2 and HTTP/1.1.
///
/// # Errors
/// [`TlsError`] when a file is unreadable or the pair is invalid.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Pem { path, source }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Paths of a development certificate set.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    /// The CA to trust (`curl --cacert`).
    pub ca: PathBuf,
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key (mode 0600).
    pub key: PathBuf,
}

/// Makes, once, a development CA and a server certificate for `localhost` and `127.0.0.1` in
/// `dir`; later calls reuse the files.
///
/// # Errors
/// [`TlsError`] when generation or writing fails.
pub fn ensure_dev_certificate(dir: &Path) -> Result<DevCertificate, TlsError> {
    let out = DevCertificate {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if out.ca.exists() && out.cert.exists() && out.key.exists() {
        return Ok(out);
    }
    let write = |path: &Path, text: &str, private: bool| -> Result<(), TlsError> {
        let err = |source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if private {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
        let mut file = options.open(path).map_err(err)?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)
    };

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keybroker development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "keybroker development server");
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write(&out.ca, &ca_cert.pem(), false)?;
    write(&out.key, &server_key.serialize_pem(), true)?;
    write(&out.cert, &server_cert.pem(), false)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::PeerWarningThrottle;
    use tracing::Level;

    static NOW: AtomicI64 = AtomicI64::new(1_000_000);

    #[test]
    fn rustls_warnings_pass_once_a_minute_and_nothing_else_is_held_back() {
        let throttle = PeerWarningThrottle::with_clock(|| NOW.load(Ordering::Relaxed));
        let sni = "rustls::msgs::handshake";
        assert!(throttle.allows(sni, Level::WARN));
        assert!(!throttle.allows(sni, Level::WARN));
        assert!(!throttle.allows("rustls", Level::WARN));
        // Other levels, other targets and look-alike names pass regardless.
        assert!(throttle.allows(sni, Level::ERROR));
        assert!(throttle.allows(sni, Level::DEBUG));
        assert!(throttle.allows("keybroker::api", Level::WARN));
        assert!(throttle.allows("rustlsish", Level::WARN));
        NOW.fetch_add(59_999, Ordering::Relaxed);
        assert!(!throttle.allows(sni, Level::WARN));
        NOW.fetch_add(1, Ordering::Relaxed);
        assert!(throttle.allows(sni, Level::WARN));
        assert!(!throttle.allows(sni, Level::WARN));
    }
}
