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

use crate::app::App;
use crate::error::ApiError;
use crate::query::query_param;

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
    /// The decoder refused the input; the messages decoded before the bad one are kept.
    Invalid(CloseCode),
}

/// How a batch of inbound messages ended.
enum Handled {
    /// Every message was applied.
    Done,
    /// The connection must close with this code.
    Close(CloseCode),
    /// The client sent a close frame.
    ClientClosed,
}

/// Commands being applied: the session is lent to the future and comes back with it.
type CommandRun = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Session, Vec<ws::Message>, Handled)> + Send>,
>;

/// How long the server keeps reading (and discarding) after its close frame and FIN went out,
/// so a client still sending is not answered with a reset that destroys what it has not read.
const LINGER: Duration = Duration::from_secs(2);

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
    /// The client's side is closed (EOF read).
    peer_done: bool,
}

/// Applies decoded messages in order; stops at the first that ends the connection.
async fn apply(
    mut session: Session,
    outbox: Arc<Outbox>,
    messages: Vec<ws::Message>,
) -> (Session, Vec<ws::Message>, Handled) {
    let mut handled = Handled::Done;
    for message in messages.iter() {
        match message {
            ws::Message::Text(text) => {
                if let Err(code) = session.handle_text(text).await {
                    handled = Handled::Close(code);
                    break;
                }
            }
            ws::Message::Binary(_) => {
                handled = Handled::Close(CloseCode::ProtocolError);
                break;
            }
            ws::Message::Ping(payload) => {
                let pong = ws::encode_frame(ws::Role::Server, ws::Opcode::Pong, payload);
                if outbox.push(pong).is_err() {
                    handled = Handled::Close(CloseCode::SlowConsumer);
                    break;
                }
            }
            ws::Message::Pong(_) => {}
            ws::Message::Close(_) => {
                handled = Handled::ClientClosed;
                break;
            }
        }
    }
    (session, messages, handled)
}

impl Connection {
    fn new(app: App, stream: TcpStream) -> Self {
        let limits = &app.node.limits;
        let outbox = Arc::new(Outbox::with_limits(limits.queue_limits(), app.node.metrics.clone()));
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
            peer_done: false,
        }
    }

    async fn run(
        mut self,
        prefix: Vec<u8>,
        auth: Result<Option<herald_core::VerifiedToken>, CloseCode>,
    ) {
        let node = self.app.node.clone();
        node.metrics.connections.fetch_add(1, Ordering::Relaxed);
        node.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let user = auth.as_ref().ok().cloned().flatten();
        let session = Session::new(node.clone(), self.outbox.clone(), user);
        let conn_id = session.id();
        tracing::debug!(conn = conn_id, "websocket connected");
        let ip = self.stream.peer_addr().ok().map(|a| a.ip());
        let registered = session.register(ip);
        let mut session = Some(session);
        let mut command: Option<CommandRun> = None;
        // A decoder error found after some valid messages: applied once they are.
        let mut invalid: Option<CloseCode> = None;

        let interval = node.ping_interval;
        let mut next_ping = Instant::now() + interval;
        let ping = tokio::time::sleep_until(next_ping);
        tokio::pin!(ping);
        let shutdown = self.app.shutdown.clone();

        if let Err(code) = auth {
            self.start_close(code);
        } else if let Err(limit) = registered {
            tracing::debug!(conn = conn_id, %limit, "connection refused by a limit");
            self.start_close(CloseCode::LimitReached);
        } else if !prefix.is_empty() {
            if let Err(e) = self.decoder.feed(&prefix, &mut self.messages) {
                invalid = Some(ws_close_code(e));
            }
        }
        drop(prefix);

        loop {
            // Apply what was read: commands run beside this loop, which keeps writing.
            if command.is_none() && !self.messages.is_empty() && self.close_by.is_none() {
                if let Some(s) = session.take() {
                    let messages = std::mem::take(&mut self.messages);
                    command = Some(Box::pin(apply(s, self.outbox.clone(), messages)));
                }
            }
            if command.is_none() && self.messages.is_empty() {
                if let Some(code) = invalid.take() {
                    if code == CloseCode::MessageTooBig {
                        node.metrics.limit(herald_core::metrics::LimitKind::MessageSize);
                    }
                    self.start_close(code);
                }
            }
            let flushed = match self.flush() {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(conn = conn_id, error = %e, "write failed");
                    break;
                }
            };
            if self.close_by.is_some()
                && flushed == Flushed::All
                && self.outbox.pending_bytes() == 0
                && command.is_none()
            {
                self.linger().await;
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
            let reading = !self.peer_done && (command.is_none() || !open) && invalid.is_none();
            let close_by =
                self.close_by.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let check_at = if open { self.outbox.next_check() } else { None };
            let check_at = check_at.map(Instant::from_std).unwrap_or(close_by);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if open => {
                    self.start_close(CloseCode::Shutdown);
                    self.close_by = Some(Instant::now() + self.app.shutdown_timeout);
                }
                done = async { command.as_mut().expect("guarded").await }, if command.is_some() => {
                    command = None;
                    let (s, messages, handled) = done;
                    session = Some(s);
                    // Give the vector's allocation back for the next read, but not a large one.
                    let mut messages = messages;
                    messages.clear();
                    if messages.capacity() <= 2 && self.messages.is_empty() {
                        self.messages = messages;
                    }
                    match handled {
                        Handled::Done => {}
                        Handled::Close(code) => self.start_close(code),
                        Handled::ClientClosed => self.client_closed(),
                    }
                }
                r = self.stream.readable(), if reading => {
                    if r.is_err() { break; }
                    if !open {
                        // Closing: what the client still sends is read and dropped, so the
                        // kernel does not answer it with a reset that loses our last frames.
                        self.discard_input();
                        continue;
                    }
                    match self.read() {
                        ReadResult::Eof => break,
                        ReadResult::Invalid(code) => {
                            self.last_heard = Instant::now();
                            invalid = Some(code);
                        }
                        ReadResult::Empty => {}
                        ReadResult::Data => self.last_heard = Instant::now(),
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
                    // intervals, whichever comes first. Silence does not count while the
                    // client's own command runs (its input is not read meanwhile).
                    let now = Instant::now();
                    let silent_until = self.last_heard + interval * 2;
                    if now >= silent_until && command.is_none() {
                        self.start_close(CloseCode::NoPong);
                    } else {
                        if now >= next_ping {
                            let frame = ws::encode_frame(ws::Role::Server, ws::Opcode::Text, push::encode_ping());
                            self.outbox.push_final(frame);
                            next_ping = now + interval;
                        }
                        if command.is_some() {
                            self.last_heard = self.last_heard.max(now - interval);
                        }
                        ping.as_mut().reset(next_ping.min(self.last_heard + interval * 2 + Duration::from_millis(1)));
                    }
                }
                _ = tokio::time::sleep_until(check_at), if open && check_at < close_by => {
                    self.outbox.check_progress(std::time::Instant::now());
                }
                _ = tokio::time::sleep_until(close_by), if !open => {
                    // The client did not take the final frames in time: a reset tells it the
                    // stream is broken, where a FIN after a partial frame would look clean.
                    tracing::debug!(conn = conn_id, "close flush timed out; resetting");
                    let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
                    break;
                }
            }
        }

        self.outbox.close();
        if let Some(run) = command.take() {
            // Let the command finish: it holds the session (and may hold a pending
            // subscription the close must find). The queue is closed, so it ends promptly.
            let (s, _, _) = run.await;
            session = Some(s);
        }
        if let Some(mut session) = session {
            Box::pin(session.close()).await;
        }
        drop(self.stream);
        node.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(conn = conn_id, code = ?self.closing, "websocket closed");
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
        let close = ws::encode_close(ws::Role::Server, code.as_u16(), code.reason());
        if self.outbox.message_open() {
            // Inside a reply sent in parts only a control frame may follow: the close frame
            // alone says why.
            self.outbox.finish([close], drop_pending);
        } else {
            let disconnect = push::encode_disconnect(code);
            let disconnect = ws::encode_frame(ws::Role::Server, ws::Opcode::Text, &disconnect);
            self.outbox.finish([disconnect, close], drop_pending);
        }
        self.close_by = Some(Instant::now() + CLOSE_FLUSH);
    }

    /// The client sent a close frame: answer with a normal close frame and end.
    fn client_closed(&mut self) {
        if self.close_by.is_some() {
            return;
        }
        self.close_by = Some(Instant::now() + CLOSE_FLUSH);
        self.outbox.finish([ws::encode_close(ws::Role::Server, 1000, "")], true);
    }

    /// After the close frame: half-close (FIN), then read and drop what the client still
    /// sends until it closes too or [`LINGER`] passes. Dropping the socket with unread input
    /// would make the kernel send a reset, and a reset makes the client's kernel throw away
    /// what it had received but the client had not read yet: the disconnect push and the
    /// close frame.
    async fn linger(&mut self) {
        if self.peer_done {
            return;
        }
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + LINGER;
        while !self.peer_done {
            tokio::select! {
                r = self.stream.readable() => {
                    if r.is_err() { return; }
                    self.discard_input();
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Reads and drops whatever input is there (bounded per call); notes EOF.
    fn discard_input(&mut self) {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..MAX_READS_PER_WAKE {
            match self.stream.try_read(&mut buf) {
                Ok(0) => {
                    self.peer_done = true;
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_done = true;
                    return;
                }
            }
        }
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
