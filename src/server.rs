//! `server` wires the pieces into a running HTTPS listener: it owns start-up and graceful
//! shutdown, and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use tokio::task::JoinHandle;

use crate::api::{AppState, RequestLog, router};
use crate::listener::{LimitedAcceptor, ListenerLimits};

/// How long in-flight requests may take to finish after a shutdown is asked for.
const GRACE: Duration = Duration::from_secs(10);

/// A listening server.
pub struct RunningServer {
    /// The address it listens on (useful when the port was 0).
    pub addr: SocketAddr,
    handle: Handle<SocketAddr>,
    task: JoinHandle<std::io::Result<()>>,
    request_log: RequestLog,
}

impl RunningServer {
    /// Binds `listen` and serves the API over TLS in a background task, with the default
    /// connection limits.
    ///
    /// # Errors
    /// An I/O error when the address cannot be bound.
    pub async fn start(
        state: AppState,
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        max_body_bytes: usize,
    ) -> std::io::Result<Self> {
        Self::start_with_limits(
            state,
            listen,
            tls,
            max_body_bytes,
            ListenerLimits::default(),
        )
        .await
    }

    /// As [`RunningServer::start`], with the given connection limits.
    ///
    /// # Errors
    /// An I/O error when the address cannot be bound.
    pub async fn start_with_limits(
        state: AppState,
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        max_body_bytes: usize,
        limits: ListenerLimits,
    ) -> std::io::Result<Self> {
        let request_log = state.request_log.clone();
        let app = router(state, max_body_bytes);
        let handle = Handle::new();
        let mut server = axum_server::bind(listen)
            .acceptor(LimitedAcceptor::new(RustlsConfig::from_config(tls), limits))
            .handle(handle.clone());
        // Our stream keeps the header and idle deadlines (see `listener`); hyper's own header
        // timer would also end idle keep-alive connections at the header deadline.
        server.http_builder().http1().header_read_timeout(None);
        let task = tokio::spawn(async move {
            server
                .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                .await
        });
        let Some(addr) = handle.listening().await else {
            // The serve task ended before listening: report its bind error.
            return match task.await {
                Ok(Err(e)) => Err(e),
                _ => Err(std::io::Error::other("the server stopped before listening")),
            };
        };
        Ok(Self {
            addr,
            handle,
            task,
            request_log,
        })
    }

    /// Stops accepting connections, lets in-flight requests finish (up to a grace period), waits
    /// for the server to stop, and then for the request log to write every row, those of the
    /// last requests included.
    ///
    /// # Errors
    /// The server task's I/O error, if it failed.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.handle.graceful_shutdown(Some(GRACE));
        let result = self
            .task
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.request_log.shutdown().await;
        result
    }

    /// Waits until the server stops by itself (it only does on error).
    ///
    /// # Errors
    /// The server task's I/O error.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}
