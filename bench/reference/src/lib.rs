//! The reference fan-out server, as a library so tests (and the binary) can run it on any
//! listener with [`run`].
//!
//! It is the simplest honest fan-out server: no protocol, one broadcast, one pre-encoded
//! WebSocket frame per publication shared (as [`Bytes`]) by every subscriber, and each
//! connection's queued frames written with one vectored write. Herald's benchmark figures are
//! reported as a ratio to this server, measured by the same load tool in the same run.
//!
//! Endpoints (HTTP/1.1, request head parsed by hand, at most 8 KiB):
//! - `GET /ws` with `Upgrade: websocket`: a subscriber of the broadcast. `Sec-WebSocket-Protocol:
//!   herald.json` is echoed when offered. Client frames are read and discarded, except pings
//!   (answered with a pong) and close (answered with a close, then the connection ends).
//! - `POST /publish` with a `Content-Length` body: every non-empty line `L` is broadcast, in
//!   order, as the text frame `{"pub":{"channel":"bench","data":L}}`; answers `200 {}`.
//!   Keep-alive.
//! - `GET /healthz`: `200 ok`. `GET /stats`: subscribers, publications and bytes queued (JSON).
//! - Anything else: `404`.
//!
//! Queues are unbounded (a slow subscriber makes its queue grow without limit): acceptable for a
//! reference whose job is to measure the machine's ceiling, not to protect itself. The bytes
//! queued across all subscribers are counted and reported by `/stats`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use herald_protocol::ws::{self, Decoder, Message, Opcode, Role};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Number of registry shards (a broadcast locks them one after the other).
const SHARDS: usize = 16;
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest `/publish` body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Most frames written by one vectored write.
const MAX_IOV: usize = 64;
/// Size of the stack buffer client frames are read into.
const READ_BUF: usize = 1024;
/// Largest client message accepted (they are discarded anyway).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// A drained queue keeping more capacity than this (in frames) gives its allocation back. The
/// two queues of a connection (shared and pending) alternate, so both are trimmed over time.
const KEEP_QUEUE_CAPACITY: usize = 64;

/// Runs the reference server on `listener` until the process ends (or accepting fails
/// permanently, which it never does: transient errors such as EMFILE are retried).
pub async fn run(listener: TcpListener) -> io::Result<()> {
    let server = Arc::new(Server::new());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let server = server.clone();
                tokio::spawn(async move {
                    // Errors only end the connection; the reference has nobody to report to.
                    let _ = handle_connection(server, stream).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The broadcast: subscribers sharded by id, plus counters.
struct Server {
    shards: Vec<Mutex<Vec<Arc<Conn>>>>,
    next_id: AtomicUsize,
    subscribers: AtomicUsize,
    publications: AtomicU64,
    /// Bytes pushed to subscriber queues and not written yet.
    queued_bytes: AtomicU64,
}

/// One subscriber, as seen by the broadcast.
struct Conn {
    shard: usize,
    /// Index in its shard's vector; only read or written under that shard's lock.
    slot: AtomicUsize,
    queue: Mutex<VecDeque<Bytes>>,
    notify: Notify,
}

impl Server {
    fn new() -> Self {
        Server {
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            next_id: AtomicUsize::new(0),
            subscribers: AtomicUsize::new(0),
            publications: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
        }
    }

    fn subscribe(&self) -> Arc<Conn> {
        let shard = self.next_id.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let conn = Arc::new(Conn {
            shard,
            slot: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        let mut list = self.shards[shard].lock();
        conn.slot.store(list.len(), Ordering::Relaxed);
        list.push(conn.clone());
        drop(list);
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        conn
    }

    fn unsubscribe(&self, conn: &Arc<Conn>) {
        let mut list = self.shards[conn.shard].lock();
        let slot = conn.slot.load(Ordering::Relaxed);
        if list.get(slot).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            list.swap_remove(slot);
            if let Some(moved) = list.get(slot) {
                moved.slot.store(slot, Ordering::Relaxed);
            }
        }
        drop(list);
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
        // Frames the connection will never write.
        let left: usize = conn.queue.lock().drain(..).map(|b| b.len()).sum();
        self.queued_bytes.fetch_sub(left as u64, Ordering::Relaxed);
    }

    /// Appends `frames` (in order) to every subscriber's queue, waking a subscriber only when its
    /// queue goes from empty to non-empty.
    fn broadcast(&self, frames: &[Bytes]) {
        if frames.is_empty() {
            return;
        }
        let per_conn: usize = frames.iter().map(Bytes::len).sum();
        let mut total = 0u64;
        for shard in &self.shards {
            let list = shard.lock();
            for conn in list.iter() {
                let mut queue = conn.queue.lock();
                let was_empty = queue.is_empty();
                queue.extend(frames.iter().cloned());
                drop(queue);
                if was_empty {
                    conn.notify.notify_one();
                }
            }
            total += (per_conn * list.len()) as u64;
        }
        self.queued_bytes.fetch_add(total, Ordering::Relaxed);
        self.publications.fetch_add(frames.len() as u64, Ordering::Relaxed);
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    websocket_key: Option<String>,
    upgrade_websocket: bool,
    offers_herald_json: bool,
    content_length: Option<usize>,
    connection_close: bool,
    /// Length of the head, `\r\n\r\n` included.
    len: usize,
}

/// Reads requests until the connection becomes a subscriber or ends.
async fn handle_connection(server: Arc<Server>, mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Heap buffer for the request heads (and publish bodies); dropped before a subscriber
    // starts waiting, so idle subscribers keep no buffer.
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let head = loop {
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                match parse_head(&buf[..end + 4]) {
                    Some(head) => break head,
                    None => {
                        return respond(
                            &mut stream,
                            "400 Bad Request",
                            "text/plain",
                            b"bad request",
                            true,
                        )
                        .await
                    }
                }
            }
            if buf.len() >= MAX_HEAD {
                return respond(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    b"too large",
                    true,
                )
                .await;
            }
            buf.reserve(1024);
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        buf.advance(head.len);
        match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/ws") if head.upgrade_websocket && head.websocket_key.is_some() => {
                let key = head.websocket_key.as_deref().unwrap_or_default();
                let mut response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                    ws::accept_key(key)
                );
                if head.offers_herald_json {
                    response.push_str("Sec-WebSocket-Protocol: herald.json\r\n");
                }
                response.push_str("\r\n");
                // Subscribed before the handshake completes: a client that has its 101 receives
                // every publication made from then on.
                let sub = Subscription {
                    conn: server.subscribe(),
                    server: server.clone(),
                    pending: VecDeque::new(),
                };
                stream.write_all(response.as_bytes()).await?;
                let early = buf.split().freeze();
                drop(buf);
                return subscriber(sub, stream, early).await;
            }
            ("POST", "/publish") => {
                let Some(len) = head.content_length.filter(|&n| n <= MAX_BODY) else {
                    return respond(
                        &mut stream,
                        "411 Length Required",
                        "text/plain",
                        b"content-length required",
                        true,
                    )
                    .await;
                };
                while buf.len() < len {
                    buf.reserve(len - buf.len());
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                let body = buf.split_to(len);
                server.broadcast(&publication_frames(&body));
                respond(&mut stream, "200 OK", "application/json", b"{}", head.connection_close)
                    .await?;
            }
            ("GET", "/healthz") => {
                respond(&mut stream, "200 OK", "text/plain", b"ok", head.connection_close).await?;
            }
            ("GET", "/stats") => {
                let body = format!(
                    "{{\"subscribers\":{},\"publications\":{},\"queued_bytes\":{}}}",
                    server.subscribers.load(Ordering::Relaxed),
                    server.publications.load(Ordering::Relaxed),
                    server.queued_bytes.load(Ordering::Relaxed)
                );
                respond(
                    &mut stream,
                    "200 OK",
                    "application/json",
                    body.as_bytes(),
                    head.connection_close,
                )
                .await?;
            }
            _ => {
                // A body we do not read would be taken for the next request: close instead.
                let close = head.connection_close || head.content_length.is_some_and(|n| n > 0);
                respond(&mut stream, "404 Not Found", "text/plain", b"not found", close).await?;
            }
        }
        if head.connection_close {
            return Ok(());
        }
    }
}

/// The text frames of a `/publish` body: one per non-empty line.
fn publication_frames(body: &[u8]) -> Vec<Bytes> {
    const PREFIX: &[u8] = br#"{"pub":{"channel":"bench","data":"#;
    const SUFFIX: &[u8] = b"}}";
    let mut payload = Vec::new();
    body.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| {
            payload.clear();
            payload.extend_from_slice(PREFIX);
            payload.extend_from_slice(line);
            payload.extend_from_slice(SUFFIX);
            ws::encode_frame(Role::Server, Opcode::Text, &payload)
        })
        .collect()
}

/// Writes a complete response with a fixed body.
async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    stream.write_all(&out).await
}

/// Parses a request head (request line and headers, ending with the empty line).
fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut head = Head {
        method,
        path,
        websocket_key: None,
        upgrade_websocket: false,
        offers_herald_json: false,
        content_length: None,
        connection_close: false,
        len: raw.len(),
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.websocket_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            head.offers_herald_json |= value.split(',').any(|p| p.trim() == "herald.json");
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().ok()?);
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection_close |=
                value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    Some(head)
}

/// A subscriber's state; removes it from the registry when its task ends, however it ends.
struct Subscription {
    server: Arc<Server>,
    conn: Arc<Conn>,
    /// Frames taken from the shared queue (swapped with it, so both allocations are reused)
    /// plus our own control frames (pong, close).
    pending: VecDeque<Bytes>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.server.unsubscribe(&self.conn);
        let left: usize = self.pending.iter().map(Bytes::len).sum();
        self.server.queued_bytes.fetch_sub(left as u64, Ordering::Relaxed);
    }
}

/// What reading from a subscriber socket led to.
enum ReadOutcome {
    /// Nothing to do (or nothing more to read for now).
    Continue,
    /// The peer closed the TCP connection.
    Eof,
    /// The peer sent a close frame; answer it and end.
    Close,
}

/// The life of a subscriber: write queued frames, read and discard client frames.
async fn subscriber(mut sub: Subscription, stream: TcpStream, early: Bytes) -> io::Result<()> {
    let result = subscriber_loop(&mut sub, &stream, early).await;
    // Out of the registry before the peer sees the socket close.
    drop(sub);
    drop(stream);
    result
}

/// The body of [`subscriber`]; returns when the connection is to be closed.
async fn subscriber_loop(
    sub: &mut Subscription,
    stream: &TcpStream,
    early: Bytes,
) -> io::Result<()> {
    let conn = &sub.conn;
    let queued = &sub.server.queued_bytes;
    let pending = &mut sub.pending;
    let mut decoder = Decoder::new(Role::Server, MAX_CLIENT_MESSAGE);
    let mut closing = false;
    let mut blocked = false;
    if !early.is_empty() {
        let mut messages = Vec::new();
        if decoder.feed(&early, &mut messages).is_err() {
            return Ok(());
        }
        closing = handle_messages(messages, pending, queued);
    }
    drop(early);
    loop {
        if !blocked {
            // Write everything there is, taking more from the shared queue as we go.
            loop {
                if pending.is_empty() && !closing {
                    std::mem::swap(&mut *conn.queue.lock(), pending);
                }
                if pending.is_empty() {
                    break;
                }
                if !write_pending(stream, pending, queued)? {
                    blocked = true;
                    break;
                }
            }
            if pending.is_empty() && pending.capacity() > KEEP_QUEUE_CAPACITY {
                *pending = VecDeque::new();
            }
            if closing && !blocked {
                return Ok(());
            }
        }
        tokio::select! {
            biased;
            r = stream.writable(), if blocked => {
                r?;
                blocked = false;
            }
            r = stream.readable(), if !closing => {
                r?;
                match read_available(stream, &mut decoder, pending, queued)? {
                    ReadOutcome::Continue => {}
                    ReadOutcome::Eof => return Ok(()),
                    ReadOutcome::Close => closing = true,
                }
            }
            _ = conn.notify.notified(), if !blocked && !closing => {}
        }
    }
}

/// Reads what the socket has (into a stack buffer), decoding and discarding client messages.
fn read_available(
    stream: &TcpStream,
    decoder: &mut Decoder,
    pending: &mut VecDeque<Bytes>,
    queued: &AtomicU64,
) -> io::Result<ReadOutcome> {
    let mut buf = [0u8; READ_BUF];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return Ok(ReadOutcome::Eof),
            Ok(n) => {
                let mut messages = Vec::new();
                if decoder.feed(&buf[..n], &mut messages).is_err() {
                    return Ok(ReadOutcome::Eof);
                }
                if handle_messages(messages, pending, queued) {
                    return Ok(ReadOutcome::Close);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::Continue),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Queues the answers to client messages; true when a close frame was received.
fn handle_messages(
    messages: Vec<Message>,
    pending: &mut VecDeque<Bytes>,
    queued: &AtomicU64,
) -> bool {
    for message in messages {
        let (answer, close) = match message {
            Message::Ping(payload) => {
                (ws::encode_message(Role::Server, &Message::Pong(payload)), false)
            }
            Message::Close(_) => (ws::encode_frame(Role::Server, Opcode::Close, &[]), true),
            _ => continue,
        };
        queued.fetch_add(answer.len() as u64, Ordering::Relaxed);
        pending.push_back(answer);
        if close {
            return true;
        }
    }
    false
}

/// Writes `pending` with vectored writes of up to [`MAX_IOV`] frames until it is empty (true) or
/// the socket would block (false). Partially written frames are advanced in place.
fn write_pending(
    stream: &TcpStream,
    pending: &mut VecDeque<Bytes>,
    queued: &AtomicU64,
) -> io::Result<bool> {
    while !pending.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, frame) in slices.iter_mut().zip(pending.iter()) {
            *slot = IoSlice::new(frame);
            count += 1;
        }
        let mut written = match stream.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        queued.fetch_sub(written as u64, Ordering::Relaxed);
        while written > 0 {
            let Some(front) = pending.front_mut() else { break };
            if written >= front.len() {
                written -= front.len();
                pending.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(true)
}
