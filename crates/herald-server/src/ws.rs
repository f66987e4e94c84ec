//! The WebSocket transport: upgrade handshake, then one task per connection that reads
//! commands, feeds the [`Session`], and writes everything queued in the connection's
//! [`Outbox`] with vectored writes.
//!
//! After the HTTP upgrade the raw [`TcpStream`] is taken back from hyper, so the connection
//! owns no HTTP buffers. One task serves both directions: it waits for the socket to be readable,
//! for frames in the outbox, for the socket to drain, or for the ping timer. While idle it holds
//! no read or write buffer (a read lands in a stack buffer and only an incomplete frame tail is
//! kept), so an idle subscribed connection costs a few KB.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use herald_core::{Outbox, Session};
use herald_protocol::{push, ws, CloseCode};
use http::{header, HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::api::ApiError;
use crate::app::App;

/// The subprotocol of the JSON protocol.
pub const PROTOCOL_JSON: &str = "herald.json";

/// Most iovecs handed to one `writev`.
const MAX_IOVECS: usize = 512;
/// Size of the stack buffer one read lands in.
const READ_CHUNK: usize = 8192;
/// Most reads per wake-up, so one chatty client cannot starve the others on its thread.
const MAX_READS_PER_WAKE: usize = 16;
/// How long a closing connection may take to flush its final frames (except on shutdown).
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let query = query?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` of a query value.
pub(crate) fn percent_decode(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `GET /ws`: checks the upgrade request, answers 101 and spawns the connection task.
pub(crate) async fn upgrade(State(app): State<App>, mut req: Request<Body>) -> Response {
    let headers = req.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return ApiError::bad_request("expected a WebSocket upgrade (Upgrade: websocket)")
            .into_response();
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::SEC_WEBSOCKET_VERSION, "13")],
            ApiError::new(426, "only WebSocket version 13 is supported"),
        )
            .into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).and_then(|k| k.to_str().ok()) else {
        return ApiError::bad_request("Sec-WebSocket-Key is missing").into_response();
    };
    let accept = ws::accept_key(key.trim());
    let protocol = header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL_JSON);
    let token = query_param(req.uri().query(), "token").map(|t| t.into_owned());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::bad_request("this connection cannot be upgraded").into_response();
    };

    // Verify a query token now; a bad one is told with close 4001 after the upgrade.
    let auth = match token {
        None => Ok(None),
        Some(token) => match &app.node.auth.verifier {
            Some(v) => v.verify(&token).map(Some).map_err(|_| CloseCode::InvalidToken),
            None => Err(CloseCode::InvalidToken),
        },
    };

    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<crate::socket::Socket>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!("upgraded connection is not a listener Socket");
                return;
            }
        };
        // The socket's permit stays with the connection until it closes.
        let (stream, mut prefix, _permit) = parts.io.into_inner().into_parts();
        // Bytes read past the request head. Copied out: even an empty `Bytes` split from
        // hyper's read buffer would keep that whole buffer alive for the connection's life.
        prefix.extend_from_slice(&parts.read_buf);
        drop(parts.read_buf);
        let _guard = app.tracker.token();
        let run = Connection::new(app, stream).run(prefix, auth);
        tracing::trace!(bytes = std::mem::size_of_val(&run), "connection future size");
        run.await;
    });

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, http::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(PROTOCOL_JSON));
    }
    response
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket's send buffer is full.
    Blocked,
}

/// What a read achieved.
enum ReadResult {
    /// Some bytes were read (and fed to the decoder).
    Data,
    /// Nothing was there after all.
    Empty,
    /// The peer closed its side.
    Eof,
    /// The decoder refused the input.
    Invalid(CloseCode),
}

/// One WebSocket connection.
struct Connection {
    app: App,
    stream: TcpStream,
    outbox: Arc<Outbox>,
    decoder: ws::Decoder,
    /// Frames taken from the outbox and not fully written; the first may be partly written.
    writing: VecDeque<Bytes>,
    messages: Vec<ws::Message>,
    last_heard: Instant,
    /// Why the server is closing (`None` while open or when the client closed first).
    closing: Option<CloseCode>,
    /// Set once closing starts: the final frames must be flushed by then.
    close_by: Option<Instant>,
}

impl Connection {
    fn new(app: App, stream: TcpStream) -> Self {
        let limits = &app.node.limits;
        let outbox = Arc::new(Outbox::new(
            limits.max_queue_bytes,
            limits.max_queue_messages,
            app.node.metrics.clone(),
        ));
        let decoder = ws::Decoder::new(ws::Role::Server, limits.max_message_bytes);
        Connection {
            app,
            stream,
            outbox,
            decoder,
            writing: VecDeque::new(),
            messages: Vec::new(),
            last_heard: Instant::now(),
            closing: None,
            close_by: None,
        }
    }

    async fn run(mut self, prefix: Vec<u8>, auth: Result<Option<String>, CloseCode>) {
        let node = self.app.node.clone();
        node.metrics.connections.fetch_add(1, Ordering::Relaxed);
        node.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let user = auth.as_ref().ok().cloned().flatten();
        let mut session = Session::new(node.clone(), self.outbox.clone(), user);
        tracing::debug!(conn = session.id(), "websocket connected");
        let ip = self.stream.peer_addr().ok().map(|a| a.ip());
        let registered = session.register(ip);

        let interval = node.ping_interval;
        let mut next_ping = Instant::now() + interval;
        let ping = tokio::time::sleep_until(next_ping);
        tokio::pin!(ping);
        let shutdown = self.app.shutdown.clone();

        if let Err(code) = auth {
            self.start_close(code);
        } else if let Err(limit) = registered {
            tracing::debug!(conn = session.id(), %limit, "connection refused by a limit");
            self.start_close(CloseCode::LimitReached);
        } else if !prefix.is_empty() {
            if let Err(code) = self.decoder.feed(&prefix, &mut self.messages).map_err(ws_close_code)
            {
                self.start_close(code);
            } else if let Err(code) = self.handle_messages(&mut session).await {
                self.start_close(code);
            }
        }
        drop(prefix);

        loop {
            let flushed = match self.flush() {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(conn = session.id(), error = %e, "write failed");
                    break;
                }
            };
            if self.close_by.is_some()
                && flushed == Flushed::All
                && self.outbox.pending_bytes() == 0
            {
                break;
            }
            if self.close_by.is_none() {
                if let Some(code) = self.outbox.pending_close() {
                    self.start_close(code);
                    continue;
                }
            }
            let blocked = flushed == Flushed::Blocked;
            let open = self.close_by.is_none();
            let close_by =
                self.close_by.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if open => {
                    self.start_close(CloseCode::Shutdown);
                    self.close_by = Some(Instant::now() + self.app.shutdown_timeout);
                }
                r = self.stream.readable(), if open => {
                    if r.is_err() { break; }
                    match self.read() {
                        ReadResult::Eof => break,
                        ReadResult::Invalid(code) => {
                            if code == CloseCode::MessageTooBig {
                                node.metrics.limit(herald_core::metrics::LimitKind::MessageSize);
                            }
                            self.start_close(code);
                        }
                        ReadResult::Empty => {}
                        ReadResult::Data => {
                            self.last_heard = Instant::now();
                            if let Err(code) = self.handle_messages(&mut session).await {
                                self.start_close(code);
                            }
                        }
                    }
                }
                r = self.stream.writable(), if blocked => {
                    if r.is_err() { break; }
                    self.outbox.set_blocked(false);
                }
                // Also while blocked: an overflow or a close request must wake the writer.
                _ = self.outbox.notified() => {}
                _ = &mut ping, if open => {
                    // Wakes at the next ping or when the client's silence reaches two
                    // intervals, whichever comes first.
                    let now = Instant::now();
                    let silent_until = self.last_heard + interval * 2;
                    if now >= silent_until {
                        self.start_close(CloseCode::NoPong);
                    } else {
                        if now >= next_ping {
                            let frame = ws::encode_frame(ws::Role::Server, ws::Opcode::Text, push::encode_ping());
                            if self.outbox.push(frame).is_err() {
                                self.outbox.overflow();
                            }
                            next_ping = now + interval;
                        }
                        ping.as_mut().reset(next_ping.min(self.last_heard + interval * 2 + Duration::from_millis(1)));
                    }
                }
                _ = tokio::time::sleep_until(close_by), if !open => break,
            }
        }

        self.outbox.close();
        Box::pin(session.close()).await;
        let _ = self.stream.try_write(&[]);
        drop(self.stream);
        node.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(conn = session.id(), code = ?self.closing, "websocket closed");
    }

    /// Queues the `disconnect` push and the close frame and bounds the time left to flush. What
    /// is already queued goes out first (replies to the commands before a bad one, the drain
    /// of a shutdown), except for a slow consumer (4008), whose pending publications are
    /// dropped: it recovers them from history.
    fn start_close(&mut self, code: CloseCode) {
        if self.close_by.is_some() {
            return;
        }
        self.closing = Some(code);
        self.app.node.metrics.disconnect(code);
        let drop_pending = code == CloseCode::SlowConsumer;
        if drop_pending {
            // Keep a partly written frame (cutting it would corrupt the stream), drop the rest.
            let keep = usize::from(!self.writing.is_empty());
            let dropped: usize = self.writing.drain(keep..).map(|b| b.len()).sum();
            self.outbox.forget(dropped);
        }
        let disconnect = push::encode_disconnect(code);
        self.outbox.finish(
            [
                ws::encode_frame(ws::Role::Server, ws::Opcode::Text, &disconnect),
                ws::encode_close(ws::Role::Server, code.as_u16(), code.reason()),
            ],
            drop_pending,
        );
        self.close_by = Some(Instant::now() + CLOSE_FLUSH);
    }

    /// Reads what the socket has (bounded) and feeds the decoder. Never awaits, so the read
    /// buffer lives on the stack only while reading.
    fn read(&mut self) -> ReadResult {
        let mut buf = [0u8; READ_CHUNK];
        let mut got = false;
        for _ in 0..MAX_READS_PER_WAKE {
            match self.stream.try_read(&mut buf) {
                Ok(0) => return ReadResult::Eof,
                Ok(n) => {
                    got = true;
                    if let Err(e) = self.decoder.feed(&buf[..n], &mut self.messages) {
                        return ReadResult::Invalid(ws_close_code(e));
                    }
                    if n < READ_CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return ReadResult::Eof,
            }
        }
        if got {
            ReadResult::Data
        } else {
            ReadResult::Empty
        }
    }

    /// Applies decoded messages.
    async fn handle_messages(&mut self, session: &mut Session) -> Result<(), CloseCode> {
        let messages = std::mem::take(&mut self.messages);
        let mut result = Ok(());
        for message in messages.iter() {
            match message {
                ws::Message::Text(text) => {
                    // Boxed: the command futures are large and short-lived; inline they would
                    // sit in every idle connection's task.
                    if let Err(code) = Box::pin(session.handle_text(text)).await {
                        result = Err(code);
                        break;
                    }
                }
                ws::Message::Binary(_) => {
                    result = Err(CloseCode::ProtocolError);
                    break;
                }
                ws::Message::Ping(payload) => {
                    let pong = ws::encode_frame(ws::Role::Server, ws::Opcode::Pong, payload);
                    if self.outbox.push(pong).is_err() {
                        result = Err(CloseCode::SlowConsumer);
                        break;
                    }
                }
                ws::Message::Pong(_) => {}
                ws::Message::Close(_) => {
                    // The client closes: answer with a normal close frame and end.
                    self.close_by = Some(Instant::now() + CLOSE_FLUSH);
                    self.outbox.finish([ws::encode_close(ws::Role::Server, 1000, "")], true);
                    break;
                }
            }
        }
        // Give the vector's allocation back for the next read, but not a large one.
        let mut messages = messages;
        messages.clear();
        if messages.capacity() <= 2 {
            self.messages = messages;
        }
        result
    }

    /// Writes as much of the queue as the socket takes, in vectored writes.
    fn flush(&mut self) -> io::Result<Flushed> {
        loop {
            if self.writing.is_empty() {
                self.outbox.take(&mut self.writing);
                if self.writing.is_empty() {
                    if self.writing.capacity() > 4 {
                        self.writing = VecDeque::new();
                    }
                    return Ok(Flushed::All);
                }
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            // Without coalescing (a benchmark baseline), one frame per write.
            let limit = if self.app.config.write_coalescing { MAX_IOVECS } else { 1 };
            for (slot, frame) in slices[..limit].iter_mut().zip(self.writing.iter()) {
                *slot = IoSlice::new(frame);
                count += 1;
            }
            match self.stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    self.outbox.written(n);
                    self.app.node.metrics.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    while n > 0 {
                        let Some(front) = self.writing.front_mut() else { break };
                        if n >= front.len() {
                            n -= front.len();
                            self.writing.pop_front();
                        } else {
                            front.advance(n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.outbox.set_blocked(true);
                    return Ok(Flushed::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn ws_close_code(e: ws::WsError) -> CloseCode {
    match e {
        ws::WsError::MessageTooBig { .. } => CloseCode::MessageTooBig,
        ws::WsError::Protocol(_) => CloseCode::ProtocolError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb+c"), "a.b c");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%2"), "end%2");
        assert_eq!(percent_decode("%41"), "A");
    }
}
