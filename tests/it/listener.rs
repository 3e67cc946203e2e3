//! The HTTPS listener's connection limits, seen from a raw TLS client: a slow request head is
//! cut off at the header timeout, an idle keep-alive connection at the idle timeout (and not at
//! the shorter header timeout), a handshake that never finishes at the handshake timeout, and a
//! source past its connection cap is refused while its open connections keep working. The
//! timeouts are short here; the bounds are generous, so a slow machine cannot fail them.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker::listener::ListenerLimits;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;

use crate::common::{TestServer, dev_certificate};

const HEADER: Duration = Duration::from_millis(1500);
const IDLE: Duration = Duration::from_millis(3000);
const HANDSHAKE: Duration = Duration::from_millis(1500);
/// How late a deadline may fire on a loaded machine and still pass.
const SLACK: Duration = Duration::from_secs(10);

fn limits(cap: usize) -> ListenerLimits {
    ListenerLimits {
        header_timeout: HEADER,
        idle_timeout: IDLE,
        handshake_timeout: HANDSHAKE,
        max_connections_per_source: cap,
    }
}

fn port(server: &TestServer) -> u16 {
    server.base.rsplit(':').next().unwrap().parse().unwrap()
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A blocking TLS connection speaking HTTP/1.1 (so we control every byte), from 127.0.0.9:
/// the test server's own HTTP client holds connections from 127.0.0.1, which count towards
/// that source's cap.
fn connect(port: u16) -> std::io::Result<Tls> {
    keybroker::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(dev_certificate().ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = tcp_from_127_0_0_9(port)?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Reads what arrives within `wait`; `None` once the server closed the connection.
fn read_some(tls: &mut Tls, wait: Duration) -> Option<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < wait {
        match tls.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !got.is_empty() {
                    return Some(got);
                }
            }
            Err(_) => return None,
        }
    }
    Some(got)
}

/// Waits until the server closes `tls`; returns how long that took.
fn time_until_closed(tls: &mut Tls, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if read_some(tls, Duration::from_millis(200)).is_none() {
            return start.elapsed();
        }
    }
    panic!("the connection was still open after {limit:?}");
}

/// A TCP connection to the server from 127.0.0.9 (called on a blocking thread).
fn tcp_from_127_0_0_9(port: u16) -> std::io::Result<TcpStream> {
    tokio::runtime::Handle::current().block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.9:0".parse().unwrap())?;
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    })
}

/// Reads one whole response (head and `Content-Length` body); `None` if the server closed.
fn read_answer(tls: &mut Tls, wait: Duration) -> Option<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < wait {
        match tls.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
        let text = String::from_utf8_lossy(&got).to_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Some(got);
            }
        }
    }
    Some(got)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

#[tokio::test]
async fn a_head_trickled_line_by_line_is_cut_off_at_the_header_timeout() {
    let server = TestServer::start_with_listener(limits(16)).await;
    let port = port(&server);
    let (elapsed, answered) = blocking(move || {
        let mut tls = connect(port).unwrap();
        let start = Instant::now();
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .unwrap();
        let mut answered = Vec::new();
        // One header line every 300 ms, as a slowloris client does, until the server hangs up.
        for i in 0.. {
            if tls
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .is_err()
            {
                break;
            }
            match read_some(&mut tls, Duration::from_millis(300)) {
                None => break,
                Some(bytes) => answered.extend(bytes),
            }
            assert!(
                start.elapsed() < HEADER + SLACK,
                "still open after {:?}",
                start.elapsed()
            );
        }
        (start.elapsed(), answered)
    })
    .await;
    assert!(
        elapsed >= HEADER - Duration::from_millis(100),
        "closed early: {elapsed:?}"
    );
    assert!(
        answered.is_empty(),
        "{}",
        String::from_utf8_lossy(&answered)
    );
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_before() {
    let server = TestServer::start_with_listener(limits(16)).await;
    let port = port(&server);
    let idle_for = blocking(move || {
        let mut tls = connect(port).unwrap();
        for _ in 0..2 {
            tls.write_all(REQUEST).unwrap();
            let answer = read_some(&mut tls, Duration::from_secs(10)).expect("closed");
            assert!(
                answer.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&answer)
            );
            // Longer than the header timeout between requests: idle is not "no head yet".
            std::thread::sleep(HEADER + Duration::from_millis(300));
        }
        HEADER + Duration::from_millis(300) + time_until_closed(&mut tls, IDLE + SLACK)
    })
    .await;
    // Measured from when our read of the answer returned (up to one 200 ms read timeout after
    // the server wrote it), so a little short of the idle timeout, and well past the header one.
    assert!(
        idle_for >= IDLE - Duration::from_millis(500),
        "closed early: {idle_for:?}"
    );
    assert!(
        idle_for > HEADER + Duration::from_millis(900),
        "{idle_for:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_closed_at_the_handshake_timeout() {
    let server = TestServer::start_with_listener(limits(16)).await;
    let port = port(&server);
    let elapsed = blocking(move || {
        let mut tcp = tcp_from_127_0_0_9(port).unwrap();
        tcp.set_read_timeout(Some(HANDSHAKE + SLACK)).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 64];
        // Nothing sent: the server closes (EOF or reset) once the deadline passes.
        let read = tcp.read(&mut buf);
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() != ErrorKind::WouldBlock),
            "{read:?}"
        );
        start.elapsed()
    })
    .await;
    assert!(
        elapsed >= HANDSHAKE - Duration::from_millis(100),
        "closed early: {elapsed:?}"
    );
    assert!(elapsed < HANDSHAKE + SLACK, "{elapsed:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_source_past_its_connection_cap_is_refused_and_its_open_connections_work() {
    let server = TestServer::start_with_listener(limits(4)).await;
    let port = port(&server);
    blocking(move || {
        let mut open: Vec<Tls> = (0..4).map(|_| connect(port).unwrap()).collect();
        // The fifth is closed before its handshake completes.
        let fifth = connect(port).and_then(|mut tls| {
            tls.write_all(REQUEST)?;
            read_answer(&mut tls, Duration::from_secs(5))
                .filter(|a| a.starts_with(b"HTTP/1.1"))
                .ok_or_else(|| std::io::Error::other("closed"))
        });
        assert!(fifth.is_err(), "a fifth connection was served");
        for tls in &mut open {
            tls.write_all(REQUEST).unwrap();
            let answer = read_answer(tls, Duration::from_secs(10)).expect("closed");
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        }
        // One closes: its place is free again (as soon as the server has seen it go).
        drop(open.pop());
        let start = Instant::now();
        loop {
            if let Ok(mut tls) = connect(port)
                && tls.write_all(REQUEST).is_ok()
                && read_answer(&mut tls, Duration::from_secs(5))
                    .is_some_and(|a| a.starts_with(b"HTTP/1.1 200"))
            {
                break;
            }
            assert!(
                start.elapsed() < SLACK,
                "the freed place was never given back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await;
    server.stop().await;
}
