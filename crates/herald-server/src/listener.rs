//! The accept loop: one task per TCP connection serving HTTP/1.1 (with upgrades), until shutdown.

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;

/// The client address of an HTTP request, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// How long a client has to send a complete HTTP request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle time before TCP keepalive probes start, so half-open connections do not accumulate.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Sets the socket options every client connection gets.
fn configure(stream: &TcpStream, send_buffer: usize) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    if send_buffer > 0 {
        // Bounds the kernel's share of a slow reader's backlog (autotuning would let it grow
        // to tcp_wmem's maximum, several MB per socket, before the outbox bound even starts).
        let _ = sock.set_send_buffer_size(send_buffer);
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = sock.set_tcp_keepalive(&keepalive);
}

/// Peeks at the first bytes of a connection: true for `GET /sse`.
async fn starts_sse(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 9];
    let peek = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= buf.len() || buf[..n].contains(&b'\n') => {
                    return crate::sse::is_sse_request(&buf[..n]);
                }
                Ok(n) => {
                    if !b"GET /sse".starts_with(&buf[..n.min(8)]) {
                        return false;
                    }
                    // Wait for more bytes of the request line.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), peek).await.unwrap_or(false)
}

/// Accepts connections until `app.shutdown` is cancelled. Accept errors (e.g. out of file
/// descriptors) back off instead of spinning.
pub async fn run(listener: TcpListener, app: App) {
    let router = crate::api::router(app.clone());
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        configure(&stream, app.config.socket_send_buffer);
        // The client address rides along as a request extension (no per-connection router).
        let with_peer = tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            },
        );
        let service = TowerToHyperService::new(with_peer);
        let shutdown = app.shutdown.clone();
        let app2 = app.clone();
        app.tracker.spawn(async move {
            // Event streams are served on the raw socket, without HTTP buffers.
            if starts_sse(&stream).await {
                // Its own task, sized for the stream alone: this one is sized for hyper's
                // connection future and would stay that large for the stream's whole life.
                let tracker = app2.tracker.clone();
                tracker.spawn(crate::sse::serve_raw(stream, app2));
                return;
            }
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // A request head must arrive within this (slowloris connections are dropped).
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "http connection ended with error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}
