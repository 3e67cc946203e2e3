//! `listener` owns the connection-level limits of the HTTPS listener: a cap on connections per
//! source address, the TLS handshake deadline, the header deadline (a request head must arrive
//! complete within it) and the idle deadline of keep-alive connections. It knows bytes and
//! connections, never requests' meaning.
//!
//! hyper's own `header_read_timeout` starts when a connection becomes ready for a request, so
//! it would also end idle keep-alive connections at the header deadline. We want what nginx
//! does instead: an idle connection may wait `idle` for its next request, and once that
//! request's first byte has arrived its head must be complete within `header`. So the stream
//! below watches the plaintext: it finds the end of each HTTP/1 head (`\r\n\r\n`), treats the
//! first write after it as the response (the connection is idle again from its last write on),
//! and never times out while a request is being worked on. HTTP/2 connections (recognised by
//! their preface) are multiplexed and binary: for them only the idle deadline applies, measured
//! from the last byte either way.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The limits, all configurable (`keybroker serve --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// A request head must be complete this long after the connection opened or after its
    /// first byte arrived.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Open connections per source address (the TCP peer); more are closed at once.
    pub max_connections_per_source: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections_per_source: 256,
        }
    }
}

/// Open connections by source address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One connection's place in its source's count, given back on drop.
struct SourceSlot {
    counts: Counts,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(counts: &Counts, ip: IpAddr, max: usize) -> Option<Self> {
        let mut map = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = map.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = map.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The acceptor: per-source cap, then TLS (with its deadline), then the deadlines above.
#[derive(Clone)]
pub struct LimitedAcceptor {
    tls: RustlsAcceptor,
    limits: ListenerLimits,
    counts: Counts,
}

impl LimitedAcceptor {
    /// An acceptor serving `tls` within `limits`.
    pub fn new(tls: RustlsConfig, limits: ListenerLimits) -> Self {
        Self {
            tls: RustlsAcceptor::new(tls).handshake_timeout(limits.handshake_timeout),
            limits,
            counts: Counts::default(),
        }
    }
}

/// What [`LimitedAcceptor`] hands hyper.
pub type LimitedStream = TimedStream<<RustlsAcceptor as Accept<TcpStream, ()>>::Stream>;

impl<S: Send + 'static> Accept<TcpStream, S> for LimitedAcceptor {
    type Stream = LimitedStream;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let limits = self.limits;
        let slot = stream.peer_addr().ok().and_then(|peer| {
            SourceSlot::take(
                &self.counts,
                peer.ip().to_canonical(),
                limits.max_connections_per_source,
            )
        });
        let Some(slot) = slot else {
            // Dropping the stream closes it before any TLS work is spent on it.
            tracing::debug!(target: "keybroker::listener", "connection refused: too many from its source");
            return Box::pin(std::future::ready(Err(io::Error::other(
                "too many connections from this source",
            ))));
        };
        let tls = self.tls.clone();
        Box::pin(async move {
            let (stream, ()) = Accept::<TcpStream, ()>::accept(&tls, stream, ()).await?;
            Ok((TimedStream::new(stream, slot, limits), service))
        })
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The end of an HTTP/1 head.
const HEAD_END: &[u8; 4] = b"\r\n\r\n";

/// Where a connection is, as far as its deadlines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the rest of a request head: the header deadline runs.
    Head,
    /// A request is being read or worked on: no deadline of ours.
    Busy,
    /// Answered; waiting for the next request: the idle deadline runs.
    Idle,
    /// HTTP/2: the idle deadline runs from the last byte either way.
    Http2,
}

/// A stream that fails (and so is closed by hyper) when its deadline passes.
pub struct TimedStream<S> {
    inner: S,
    _slot: SourceSlot,
    limits: ListenerLimits,
    phase: Phase,
    /// How much of [`HEAD_END`] the last bytes matched.
    head_end: usize,
    /// How much of [`H2_PREFACE`] the first bytes matched; `None` once they did not.
    preface: Option<usize>,
    deadline: Pin<Box<Sleep>>,
}

impl<S> TimedStream<S> {
    fn new(inner: S, slot: SourceSlot, limits: ListenerLimits) -> Self {
        Self {
            inner,
            _slot: slot,
            limits,
            phase: Phase::Head,
            head_end: 0,
            preface: Some(0),
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
        }
    }

    fn restart(&mut self, after: Duration) {
        self.deadline.as_mut().reset(Instant::now() + after);
    }

    /// Follows the plaintext the client sent.
    fn saw_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(matched) = self.preface {
            let n = bytes.len().min(H2_PREFACE.len() - matched);
            self.preface = (bytes[..n] == H2_PREFACE[matched..matched + n]).then_some(matched + n);
            if self.preface == Some(H2_PREFACE.len()) {
                self.preface = None;
                self.phase = Phase::Http2;
            }
        }
        match self.phase {
            Phase::Http2 => {
                self.restart(self.limits.idle_timeout);
                return;
            }
            Phase::Idle => {
                // The next request's first byte: its head must now come within the deadline.
                self.phase = Phase::Head;
                self.head_end = 0;
                self.restart(self.limits.header_timeout);
            }
            Phase::Head | Phase::Busy => {}
        }
        if self.phase == Phase::Head {
            for &byte in bytes {
                self.head_end = match (self.head_end, byte) {
                    (n, b) if b == HEAD_END[n] => n + 1,
                    (_, b'\r') => 1,
                    _ => 0,
                };
                if self.head_end == HEAD_END.len() {
                    self.phase = Phase::Busy;
                    self.head_end = 0;
                    break;
                }
            }
        }
    }

    /// A response (or part of one) went out: idle from now on, unless more follows.
    fn saw_write(&mut self) {
        match self.phase {
            Phase::Busy | Phase::Idle => {
                self.phase = Phase::Idle;
                self.restart(self.limits.idle_timeout);
            }
            Phase::Http2 => self.restart(self.limits.idle_timeout),
            // An early answer to a head still coming in (e.g. a refusal): the head's deadline
            // stands.
            Phase::Head => {}
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.phase != Phase::Busy && self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out(phase: Phase) -> io::Error {
    let what = match phase {
        Phase::Head => "no complete request head within the header timeout",
        _ => "idle past the idle timeout",
    };
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = buf.filled()[before..].to_vec();
                this.saw_read(&fresh);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.expired(cx) => {
                tracing::debug!(target: "keybroker::listener", phase = ?this.phase, "connection closed by its deadline");
                Poll::Ready(Err(timed_out(this.phase)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.saw_write();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.saw_write();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stream() -> TimedStream<()> {
        let counts = Counts::default();
        let slot = SourceSlot::take(&counts, "192.0.2.1".parse().unwrap(), 1).unwrap();
        TimedStream::new((), slot, ListenerLimits::default())
    }

    #[tokio::test]
    async fn heads_are_followed_byte_by_byte_and_answers_make_the_connection_idle() {
        let mut s = stream();
        for chunk in [&b"GET / HTTP/1.1\r\nHost: x\r"[..], b"\n", b"\r", b"\nbody"] {
            assert_eq!(s.phase, Phase::Head);
            s.saw_read(chunk);
        }
        assert_eq!(s.phase, Phase::Busy);
        s.saw_write();
        assert_eq!(s.phase, Phase::Idle);
        // A head with a lone `\r\r\n\r\n` still ends.
        s.saw_read(b"GET / HTTP/1.1\r\r\n\r\n");
        assert_eq!(s.phase, Phase::Busy);
    }

    #[tokio::test]
    async fn the_http2_preface_switches_to_idle_only() {
        let mut s = stream();
        s.saw_read(&H2_PREFACE[..10]);
        s.saw_read(&H2_PREFACE[10..]);
        assert_eq!(s.phase, Phase::Http2);
        s.saw_write();
        assert_eq!(s.phase, Phase::Http2);
        let mut h1 = stream();
        h1.saw_read(b"PRI * HTTP/1.1\r\n\r\n");
        assert_eq!(h1.phase, Phase::Busy);
        assert_eq!(h1.preface, None);
    }

    #[test]
    fn a_source_gets_its_cap_and_a_closed_connection_gives_its_place_back() {
        let counts = Counts::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = SourceSlot::take(&counts, ip, 2).unwrap();
        let _b = SourceSlot::take(&counts, ip, 2).unwrap();
        assert!(SourceSlot::take(&counts, ip, 2).is_none());
        assert!(SourceSlot::take(&counts, "192.0.2.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(SourceSlot::take(&counts, ip, 2).is_some());
    }
}
