//! The accept loop: one task per TCP connection serving HTTP/1.1 (with upgrades), until shutdown.
//!
//! Every accepted socket first takes a [`Permit`] from a semaphore of
//! `limits.max_connections + limits.socket_reserve` permits, held until the socket closes
//! (WebSocket connections and SSE streams included); without one it is answered 503 and closed
//! at once. Then the first bytes are read (at most 9, within [`FIRST_BYTES_TIMEOUT`]): `GET /sse`
//! followed by `?` or a space goes to [`crate::sse::serve_raw`], everything else to hyper
//! through a [`Socket`] that replays those bytes. Nothing polls: each step awaits readiness.
//!
//! Plain HTTP requests (publishers, the API; everything but a WebSocket upgrade `GET /ws` and
//! a raw event stream) are served on their own runtime ([`App::api`], `api_threads`): on the
//! runtime of the connections, a publisher's next request waited behind every subscriber
//! writer its last publication woke (tokio runs woken tasks in order), so each writer found
//! only a few frames per write and the node paid a system call per subscriber per handful of
//! publications (see `docs/architecture.md`, "Publishers and fan-out").

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::app::App;
pub use crate::socket::PeerAddr;
use crate::socket::{Permit, Socket};

/// How long a client has to send a complete HTTP request head (hyper: also the idle time
/// allowed between requests on a kept-alive connection; the raw SSE path: from the accept).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new connection has to send its first bytes (enough to tell `GET /sse`).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read before choosing the path: `GET /sse` and the byte after it.
const SNIFF_LEN: usize = 9;

/// The answer to a connection beyond the socket cap.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
    content-length: 85\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
    {\"error\":{\"code\":503,\"message\":\"the node holds its maximum of sockets; retry later\"}}";

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

/// Reads the first bytes of a connection, at most [`SNIFF_LEN`], stopping as soon as they
/// cannot start `GET /sse`: `None` when the client closed or sent nothing in time.
async fn first_bytes(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; SNIFF_LEN];
    let mut n = 0;
    let read = async {
        while n < SNIFF_LEN {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return n > 0,
                Ok(k) => n += k,
            }
            if !b"GET /sse".starts_with(&buf[..n.min(8)]) || buf[..n].contains(&b'\n') {
                break;
            }
        }
        true
    };
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, read).await {
        Ok(true) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Answers a connection beyond the socket cap with 503 and closes it, without waiting for it.
fn refuse(stream: TcpStream) {
    // The socket is new: its send buffer is empty, so the answer goes out in one try.
    let _ = stream.try_write(REFUSAL);
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
}

/// Accepts connections until `app.shutdown` is cancelled. Accept errors (e.g. out of file
/// descriptors) back off instead of spinning.
pub async fn run(listener: TcpListener, app: App) {
    let router = crate::api::router(app.clone());
    let sockets = Arc::new(Semaphore::new(
        (app.node.limits.max_connections + app.config.socket_reserve).min(Semaphore::MAX_PERMITS),
    ));
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
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            app.node.metrics.limit(herald_core::metrics::LimitKind::Connections);
            tracing::debug!(%peer, "socket cap reached; connection refused");
            refuse(stream);
            continue;
        };
        let permit = Permit::new(permit);
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
            let accepted = Instant::now();
            let mut stream = stream;
            let Some(prefix) = first_bytes(&mut stream).await else { return };
            // Event streams are served on the raw socket, without HTTP buffers.
            if crate::sse::is_sse_request(&prefix) {
                // Its own task, sized for the stream alone: this one is sized for hyper's
                // connection future and would stay that large for the stream's whole life.
                let tracker = app2.tracker.clone();
                let deadline = accepted + HEADER_READ_TIMEOUT;
                tracker.spawn(crate::sse::serve_raw(stream, prefix, permit, app2, deadline));
                return;
            }
            match app2.api.as_ref().filter(|_| !is_ws_request(&prefix)) {
                Some(api) => {
                    // Moved to the API runtime's reactor: deregistered here, registered there.
                    let Ok(stream) = stream.into_std() else { return };
                    let serve = async move {
                        let Ok(stream) = TcpStream::from_std(stream) else { return };
                        serve_http(stream, prefix, permit, service, shutdown, peer).await;
                    };
                    api.spawn(app2.tracker.track_future(serve));
                }
                None => serve_http(stream, prefix, permit, service, shutdown, peer).await,
            }
        });
    }
}

/// True when `prefix`, a connection's first bytes, may start a WebSocket upgrade (`GET /ws`
/// then a space or `?`): such connections stay on the connections' runtime.
fn is_ws_request(prefix: &[u8]) -> bool {
    const WS: &[u8] = b"GET /ws";
    let n = prefix.len().min(WS.len());
    prefix[..n] == WS[..n] && prefix.get(WS.len()).is_none_or(|b| *b == b' ' || *b == b'?')
}

/// Serves one HTTP/1.1 connection (with upgrades) until it ends or shutdown.
async fn serve_http<S>(
    stream: TcpStream,
    prefix: Vec<u8>,
    permit: Permit,
    service: S,
    shutdown: tokio_util::sync::CancellationToken,
    peer: std::net::SocketAddr,
) where
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // A request head must arrive within this (slowloris connections are dropped).
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(Socket::new(stream, prefix, permit)), service)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_upgrades_are_told_from_other_requests() {
        for ws in [&b"GET /ws "[..], b"GET /ws?token=x", b"GET /w", b"GET /ws", b"GE"] {
            assert!(is_ws_request(ws), "{}", String::from_utf8_lossy(ws));
        }
        for other in [&b"POST /api/publish"[..], b"GET /wsx", b"GET /metrics", b"PUT /ws "] {
            assert!(!is_ws_request(other), "{}", String::from_utf8_lossy(other));
        }
    }
}
