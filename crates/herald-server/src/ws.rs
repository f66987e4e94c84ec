//! The WebSocket transport: upgrade handshake, then one task per connection that reads
//! commands, feeds the [`Session`], and writes everything queued in the connection's
//! [`Outbox`] with vectored writes.
//!
//! The writer, the waiting and the close sequence are [`crate::conn::Conn`]'s, shared with SSE;
//! this module adds what is WebSocket's own ([`WebSocket`]): the frame decoder, commands applied
//! beside the writer, `ping` pushes and the client's silence (4011), the `disconnect` push and
//! close frame.
//!
//! After the HTTP upgrade the raw [`TcpStream`] is taken back from hyper, so the connection
//! owns no HTTP buffers. One task serves both directions: it waits for the socket to be readable,
//! for frames in the outbox, for the socket to drain, or for the ping timer. While idle it holds
//! no read or write buffer (a read lands in a stack buffer and only an incomplete frame tail is
//! kept), so an idle subscribed connection costs a few KB.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::{Node, Outbox, Session};
use herald_protocol::format::Negotiated;
use herald_protocol::{ws, CloseCode, WireFormat};
use http::{header, HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::app::App;
use crate::conn::{
    Close, Conn, Input, RunEnd, Transport, WsFrame, MAX_IOVECS, MAX_READS_PER_WAKE, READ_CHUNK,
};
use crate::error::ApiError;
use crate::query::query_param;
use crate::wire::Wire;

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
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Err(e) = crate::origin::check(&app.config.allowed_origins, origin) {
        return e.into_response();
    }
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
    let offers =
        headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    let (format, named) = match WireFormat::negotiate(offers) {
        Negotiated::Default(format) => (format, false),
        Negotiated::Chosen(format) => (format, true),
        Negotiated::Refused(offers) => {
            let supported: Vec<&str> = WireFormat::ALL.iter().map(|f| f.subprotocol()).collect();
            let message = format!(
                "none of the offered subprotocols ({}) is spoken here: offer one of {}, or none \
                 for {}",
                offers.join(", "),
                supported.join(", "),
                WireFormat::Json.subprotocol()
            );
            return ApiError::bad_request(message).into_response();
        }
    };
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
        let Some((stream, prefix, permit)) = take_apart(upgraded) else { return };
        // The socket's permit stays with the connection until it closes.
        let _permit = permit;
        let _guard = app.tracker.token();
        // Measured in a block of its own: a borrow of `run` alive at the `.await` would keep a
        // second copy of the future in the task.
        let run = {
            let run = serve(app, stream, prefix, auth, format);
            tracing::trace!(bytes = std::mem::size_of_val(&run), "connection future size");
            run
        };
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
    if named {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static(format.subprotocol()),
        );
    }
    response
}

/// The raw stream of an upgraded connection, the bytes read past the request head and the
/// socket's permit.
fn take_apart(
    upgraded: hyper::upgrade::Upgraded,
) -> Option<(TcpStream, Vec<u8>, crate::socket::Permit)> {
    let Ok(parts) = upgraded.downcast::<TokioIo<crate::socket::Socket>>() else {
        tracing::error!("upgraded connection is not a listener Socket");
        return None;
    };
    let (stream, mut prefix, permit) = parts.io.into_inner().into_parts();
    // Bytes read past the request head. Copied out: even an empty `Bytes` split from hyper's
    // read buffer would keep that whole buffer alive for the connection's life.
    prefix.extend_from_slice(&parts.read_buf);
    Some((stream, prefix, permit))
}

/// What a read found.
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

/// The WebSocket side of a connection (the writer and the close sequence are
/// [`crate::conn::Conn`]'s): decoding input, applying commands beside the writer, pings as
/// pushes in the connection's format and the client's silence.
struct WebSocket {
    node: Arc<Node>,
    decoder: ws::Decoder,
    /// Decoded messages not yet applied.
    messages: Vec<ws::Message>,
    /// `None` while a command batch holds it.
    session: Option<Session>,
    /// The connection's wire format (of pings and the `disconnect` push).
    format: WireFormat,
    /// The command batch running beside the writer.
    command: Option<CommandRun>,
    /// A decoder error found after some valid messages: applied once they are.
    invalid: Option<CloseCode>,
    /// A fragmented message is open after the last frame taken from the outbox.
    taken_open: bool,
    /// The connection may move to the API runtime once its client publishes (there is one,
    /// and the connection is not on it yet).
    may_move: bool,
    last_heard: Instant,
    interval: Duration,
    next_ping: Instant,
}

/// Applies decoded messages in order; stops at the first that ends the connection.
async fn apply(
    mut session: Session,
    outbox: Arc<Outbox>,
    messages: Vec<ws::Message>,
) -> (Session, Vec<ws::Message>, Handled) {
    let mut handled = Handled::Done;
    let format = session.format();
    for message in messages.iter() {
        match message {
            // Data frames of the connection's format: commands.
            ws::Message::Text(payload) | ws::Message::Binary(payload)
                if message.opcode() == format.opcode() =>
            {
                if let Err(code) = session.handle_message(payload).await {
                    handled = Handled::Close(code);
                    break;
                }
            }
            // Text on a protobuf connection, binary on a JSON one.
            ws::Message::Text(_) | ws::Message::Binary(_) => {
                tracing::debug!(conn = session.id(), %format, "data frame of the other kind");
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

/// Serves one upgraded connection until it closes. `auth` is the verdict on a query token.
///
/// The connection is set up here, outside the returned future, and closed in a boxed future:
/// what only set-up and close need takes no room in the task of every idle connection.
fn serve(
    app: App,
    stream: TcpStream,
    prefix: Vec<u8>,
    auth: Result<Option<herald_core::VerifiedToken>, CloseCode>,
    format: WireFormat,
) -> impl std::future::Future<Output = ()> + Send {
    let node = app.node.clone();
    node.metrics.connections.fetch_add(1, Ordering::Relaxed);
    node.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let limits = &node.limits;
    let outbox = Arc::new(Outbox::with_limits(limits.queue_limits(), node.metrics.clone()));
    let user = auth.as_ref().ok().cloned().flatten();
    let session = Session::new(node.clone(), outbox.clone(), user, format);
    let conn_id = session.id();
    tracing::debug!(conn = conn_id, "websocket connected");
    let ip = stream.peer_addr().ok().map(|a| a.ip());
    let registered = session.register(ip);
    let interval = node.ping_interval;
    let now = Instant::now();
    let transport = WebSocket {
        decoder: ws::Decoder::new(ws::Role::Server, limits.max_message_bytes),
        node: node.clone(),
        messages: Vec::new(),
        session: Some(session),
        format,
        command: None,
        invalid: None,
        taken_open: false,
        may_move: app.api.is_some(),
        last_heard: now,
        interval,
        next_ping: now + interval,
    };
    // Without coalescing (a benchmark baseline), one frame per write.
    let iovecs = if app.config.write_coalescing { MAX_IOVECS } else { 1 };
    let mut conn = Conn::new(&app, conn_id, stream, outbox, transport, iovecs);

    if let Err(code) = auth {
        conn.start_close(Close::Server(code));
    } else if let Err(limit) = registered {
        tracing::debug!(conn = conn_id, %limit, "connection refused by a limit");
        conn.start_close(Close::Server(CloseCode::LimitReached));
    } else if !prefix.is_empty() {
        conn.transport_mut().feed(&prefix);
    }
    let mut next_ping = now + interval;
    let api = app.api.clone();
    let moved = app.moved.clone();
    async move {
        while conn.run(next_ping).await == RunEnd::Move {
            conn.transport_mut().may_move = false;
            next_ping = Instant::now();
            let Some(api) = api.as_ref() else { continue };
            if moved.fetch_add(1, Ordering::Relaxed) >= crate::app::MAX_MOVED {
                // Full: this client is served where it is.
                moved.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            Box::pin(move_to(conn, api.clone())).await;
            moved.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        Box::pin(close(conn)).await;
    }
}

/// Serves the rest of a connection whose client publishes on the API runtime, where publishers
/// are served: its next command is read as soon as it arrives, not after a round of the
/// subscriber writers its last publication woke (see docs/architecture.md, "Publishers and
/// fan-out"). The socket is moved between reactors; the calling task waits for it to end.
async fn move_to(conn: Conn<TcpStream, WebSocket>, api: tokio::runtime::Handle) {
    let id = conn.id();
    let conn = match conn.map_wire(TcpStream::into_std) {
        Ok(conn) => conn,
        Err((e, transport)) => {
            tracing::debug!(conn = id, error = %e, "cannot move the connection");
            return end_session(transport, id, None).await;
        }
    };
    tracing::debug!(conn = id, "publishing client: served on the API runtime");
    let moved = api.spawn(async move {
        let mut conn = match conn.map_wire(TcpStream::from_std) {
            Ok(conn) => conn,
            Err((e, transport)) => {
                tracing::debug!(conn = id, error = %e, "cannot move the connection");
                return end_session(transport, id, None).await;
            }
        };
        conn.run(Instant::now()).await;
        close(conn).await;
    });
    let _ = moved.await;
}

/// Ends a connection whose loop ended: its session's subscriptions, its counts.
async fn close(conn: Conn<TcpStream, WebSocket>) {
    let conn_id = conn.id();
    let closing = conn.closing();
    let (stream, transport) = conn.into_parts();
    end_session(transport, conn_id, closing).await;
    drop(stream);
}

/// Ends the session of a connection that ended (or could not go on).
async fn end_session(mut transport: WebSocket, conn_id: u64, closing: Option<CloseCode>) {
    let mut session = transport.session.take();
    if let Some(run) = transport.command.take() {
        // Let the command finish: it holds the session (and may hold a pending
        // subscription the close must find). The queue is closed, so it ends promptly.
        let (s, _, _) = run.await;
        session = Some(s);
    }
    if let Some(mut session) = session {
        session.close().await;
    }
    transport.node.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(conn = conn_id, code = ?closing, "websocket closed");
}

impl WebSocket {
    /// Feeds bytes read before the connection task started (they came with the upgrade).
    fn feed(&mut self, bytes: &[u8]) {
        if let Err(e) = self.decoder.feed(bytes, &mut self.messages) {
            self.invalid = Some(ws_close_code(e));
        }
    }

    /// Reads what the socket has (bounded) and feeds the decoder. Never awaits, so the read
    /// buffer lives on the stack only while reading.
    fn read_input(&mut self, wire: &impl Wire) -> ReadResult {
        let mut buf = [0u8; READ_CHUNK];
        let mut got = false;
        for _ in 0..MAX_READS_PER_WAKE {
            match wire.try_read(&mut buf) {
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
}

impl Transport for WebSocket {
    type Item = Bytes;
    type Chunk = WsFrame;
    type Event = (Session, Vec<ws::Message>, Handled);

    /// Takes the queued frames, noting after each whether a fragmented message is open.
    fn refill(&mut self, outbox: &Outbox, out: &mut VecDeque<WsFrame>) {
        let mut taken = VecDeque::new();
        outbox.take(&mut taken);
        let mut open = self.taken_open;
        out.extend(taken.into_iter().map(|bytes| {
            open = ws::message_open_after(&bytes, open);
            WsFrame { bytes, open_after: open }
        }));
        self.taken_open = open;
    }

    /// A server close: the `disconnect` push and the close frame, after what is already queued
    /// (replies to the commands before a bad one, the drain of a shutdown), except for a slow
    /// consumer (4008), whose pending publications are dropped: it recovers them from history.
    /// A client close: a normal close frame. While a message sent in fragments is open, only
    /// a control frame may follow: the close frame alone says why.
    fn finish(&mut self, outbox: &Outbox, close: Close, wire_open: bool) {
        let drop_pending = close.drops_pending();
        let code = match close {
            Close::Server(code) => code,
            Close::Peer => {
                outbox.finish([ws::encode_close(ws::Role::Server, 1000, "")], drop_pending);
                return;
            }
        };
        let close = ws::encode_close(ws::Role::Server, code.as_u16(), code.reason());
        // What the peer will have read before the final frames: what the writer keeps, and
        // unless dropped, what the outbox still holds.
        let open = if drop_pending { wire_open } else { outbox.message_open() };
        if open || outbox.message_open() {
            outbox.finish([close], drop_pending);
        } else {
            let disconnect = self.format.codec().encode_disconnect(code);
            let disconnect = ws::encode_frame(ws::Role::Server, self.format.opcode(), &disconnect);
            outbox.finish([disconnect, close], drop_pending);
        }
    }

    /// Wakes at the next ping or when the client's silence reaches two intervals, whichever
    /// comes first. Silence does not count while the client's own command runs (its input is
    /// not read meanwhile).
    fn ping(&mut self, outbox: &Outbox, now: Instant) -> Result<Instant, CloseCode> {
        let interval = self.interval;
        let silent_until = self.last_heard + interval * 2;
        if now >= silent_until && self.command.is_none() {
            return Err(CloseCode::NoPong);
        }
        if now >= self.next_ping {
            let ping = self.format.codec().encode_ping();
            let frame = ws::encode_frame(ws::Role::Server, self.format.opcode(), &ping);
            outbox.push_final(frame);
            self.next_ping = now + interval;
        }
        if self.command.is_some() {
            self.last_heard = self.last_heard.max(now - interval);
        }
        Ok(self.next_ping.min(self.last_heard + interval * 2 + Duration::from_millis(1)))
    }

    /// Applies what was read: commands run beside the writer, which keeps writing. A decoder
    /// error closes once the messages before it are applied.
    fn prepare(&mut self, outbox: &Arc<Outbox>, open: bool) -> Option<Close> {
        if self.command.is_none() && !self.messages.is_empty() && open {
            if let Some(s) = self.session.take() {
                let messages = std::mem::take(&mut self.messages);
                self.command = Some(Box::pin(apply(s, outbox.clone(), messages)));
            }
        }
        if self.command.is_none() && self.messages.is_empty() {
            if let Some(code) = self.invalid.take() {
                if code == CloseCode::MessageTooBig {
                    self.node.metrics.limit(herald_core::metrics::LimitKind::MessageSize);
                }
                return Some(Close::Server(code));
            }
        }
        None
    }

    /// Not while a command batch runs: the client's commands are applied in order, and TCP
    /// holds the rest.
    fn wants_input(&self) -> bool {
        self.command.is_none() && self.invalid.is_none()
    }

    fn read(&mut self, wire: &impl Wire) -> Input {
        match self.read_input(wire) {
            ReadResult::Eof => return Input::Eof,
            ReadResult::Invalid(code) => {
                self.last_heard = Instant::now();
                self.invalid = Some(code);
            }
            ReadResult::Empty => {}
            ReadResult::Data => self.last_heard = Instant::now(),
        }
        Input::More
    }

    fn waiting(&self) -> bool {
        self.command.is_some()
    }

    async fn event(&mut self) -> Self::Event {
        self.command.as_mut().expect("awaited only while waiting").await
    }

    fn on_event(&mut self, (session, messages, handled): Self::Event) -> Option<Close> {
        self.command = None;
        self.session = Some(session);
        // Give the vector's allocation back for the next read, but not a large one.
        let mut messages = messages;
        messages.clear();
        if messages.capacity() <= 2 && self.messages.is_empty() {
            self.messages = messages;
        }
        match handled {
            Handled::Done => None,
            Handled::Close(code) => Some(Close::Server(code)),
            Handled::ClientClosed => Some(Close::Peer),
        }
    }

    fn busy(&self) -> bool {
        self.command.is_some()
    }

    /// Once the client published, when there is an API runtime to move to.
    fn wants_move(&self) -> bool {
        self.may_move
            && self.command.is_none()
            && self.session.as_ref().is_some_and(Session::has_published)
    }
}

fn ws_close_code(e: ws::WsError) -> CloseCode {
    match e {
        ws::WsError::MessageTooBig { .. } => CloseCode::MessageTooBig,
        ws::WsError::Protocol(_) => CloseCode::ProtocolError,
    }
}
