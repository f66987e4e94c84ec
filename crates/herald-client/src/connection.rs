//! The one task behind each [`crate::Client`]: it owns the socket, reads and decodes frames,
//! resolves replies, forwards pushes as [`Event`]s and writes what the handles queue.
//!
//! The task never splits the socket: it waits on read readiness, write readiness (only while
//! bytes are queued) and the command channel at once. Commands queued while the task was busy
//! are framed into a single write buffer and go out in one `write` call. Reads use a buffer on
//! the thread's stack, so an idle connection holds no read buffer.
//!
//! Backpressure: pushes are handed to a bounded channel; when it is full the task waits for
//! the consumer before reading anything more from the socket (the server then sees a slow
//! consumer). While it waits it neither sends queued commands nor answers pings.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use herald_protocol::json::{decode_server_messages, ReplyError, ServerMessage};
use herald_protocol::ws::{self, Decoder, Message, Opcode, Role, WsError};
use herald_protocol::{proto, WireFormat};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::client::Event;
use crate::error::ClientError;

/// What a request's waiter receives: the reply's `ok` or `error`, or why none will come.
pub(crate) type ReplyResult = Result<Result<serde_json::Value, ReplyError>, ClientError>;

/// What a [`crate::Client`] handle asks of the task.
pub(crate) enum Outbound {
    /// A command line (its JSON already holds `"id": id`) whose reply goes to `reply`.
    Request { id: u32, payload: Vec<u8>, reply: oneshot::Sender<ReplyResult> },
    /// A frame written as is (after masking).
    Frame { opcode: Opcode, payload: Vec<u8> },
    /// Close with 1000; `done` is dropped when the task has ended.
    Close { done: oneshot::Sender<()> },
}

/// State shared by the handles and the task.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Set when the task has ended.
    pub(crate) closed: AtomicBool,
    /// The next request id to hand out.
    pub(crate) next_id: AtomicU32,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared { closed: AtomicBool::new(false), next_id: AtomicU32::new(1) }
    }

    /// A fresh request id, never 0.
    pub(crate) fn next_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }
}

/// Bytes read per `read` call (on the stack).
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before the decoded messages are handled.
const READS_PER_WAKE: usize = 4;
/// Above this many queued bytes the task stops taking commands until the socket drains.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A write buffer emptied with more capacity than this is released (idle connections stay small).
const KEEP_WRITE_CAPACITY: usize = 8 * 1024;
/// How long a closing connection waits for the peer's close frame or for a final flush.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The `pong` command of `herald.json`, sent in answer to a `ping` push.
const PONG: &[u8] = b"{\"op\":\"pong\"}";
/// The `pong` command of `herald.proto` (`Command { pong: {} }`, length-prefixed).
const PONG_PROTO: &[u8] = &[0x02, 0x42, 0x00];

/// How a connection ended: the close frame's code and reason, or no code and what happened.
type End = (Option<u16>, String);

/// What one round of reading achieved.
enum Read {
    /// Messages were decoded into `Connection::messages` (maybe none yet).
    Data,
    /// The peer closed its side.
    Eof,
    /// The socket failed.
    Failed(io::Error),
    /// The peer broke RFC 6455.
    Invalid(WsError),
}

/// The connection task's state.
pub(crate) struct Connection {
    stream: TcpStream,
    decoder: Decoder,
    /// Messages decoded and not yet handled; kept to reuse its allocation.
    messages: Vec<Message>,
    /// Framed bytes not yet written.
    wbuf: BytesMut,
    /// Requests sent and not yet answered.
    pending: HashMap<u32, oneshot::Sender<ReplyResult>>,
    events: mpsc::Sender<Event>,
    /// False once the [`crate::Events`] receiver is gone: pushes are then dropped.
    events_open: bool,
    commands: mpsc::Receiver<Outbound>,
    /// False once every [`crate::Client`] handle is gone.
    commands_open: bool,
    auto_pong: bool,
    /// A close frame was queued: nothing more is sent.
    close_sent: bool,
    /// A write failed: the task only reads on, to learn why, until `deadline`.
    write_failed: Option<io::Error>,
    /// When a closing connection gives up waiting for the peer.
    deadline: Option<tokio::time::Instant>,
    /// `close()` callers, woken (by drop) when the task ends.
    close_waiters: Vec<oneshot::Sender<()>>,
    shared: Arc<Shared>,
    /// The connection's wire format.
    format: WireFormat,
}

impl Connection {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        stream: TcpStream,
        max_message_bytes: usize,
        events: mpsc::Sender<Event>,
        commands: mpsc::Receiver<Outbound>,
        auto_pong: bool,
        shared: Arc<Shared>,
        format: WireFormat,
    ) -> Self {
        Connection {
            stream,
            decoder: Decoder::new(Role::Client, max_message_bytes),
            messages: Vec::new(),
            wbuf: BytesMut::new(),
            pending: HashMap::new(),
            events,
            events_open: true,
            commands,
            commands_open: true,
            auto_pong,
            close_sent: false,
            write_failed: None,
            deadline: None,
            close_waiters: Vec::new(),
            shared,
            format,
        }
    }

    /// Runs the connection to its end; `early` holds bytes read past the handshake response.
    pub(crate) async fn run(mut self, early: Vec<u8>) {
        let (code, reason) = self.drive(early).await;
        self.shared.closed.store(true, Ordering::Release);
        let Connection { stream, pending, commands, close_waiters, events, events_open, .. } = self;
        drop(stream);
        // Every waiter, in flight or still queued, sees its sender dropped: `Closed`.
        drop(pending);
        drop(commands);
        drop(close_waiters);
        if events_open {
            let _ = events.send(Event::Closed { code, reason }).await;
        }
    }

    async fn drive(&mut self, early: Vec<u8>) -> End {
        if !early.is_empty() {
            let read = match self.decoder.feed(&early, &mut self.messages) {
                Ok(()) => Read::Data,
                Err(e) => Read::Invalid(e),
            };
            if let Some(end) = self.after_read(read, Instant::now()).await {
                return end;
            }
        }
        loop {
            if !self.commands_open && !self.events_open && !self.close_sent {
                // Nobody can use this connection any more.
                self.queue_close(1000, "");
            }
            self.try_write();
            let deadline = self.deadline;
            let want_write = !self.wbuf.is_empty() && self.write_failed.is_none();
            let take_commands =
                self.commands_open && !self.close_sent && self.wbuf.len() < WRITE_HIGH_WATER;
            tokio::select! {
                ready = self.stream.readable() => {
                    if let Err(e) = ready {
                        return (None, format!("socket failed: {e}"));
                    }
                    let read = self.read();
                    if let Some(end) = self.after_read(read, Instant::now()).await {
                        return end;
                    }
                }
                ready = self.stream.writable(), if want_write => {
                    if let Err(e) = ready {
                        self.fail_write(e);
                    }
                }
                command = self.commands.recv(), if take_commands => match command {
                    Some(command) => {
                        self.handle(command);
                        // Coalesce whatever else is queued into the same write.
                        while self.wbuf.len() < WRITE_HIGH_WATER && !self.close_sent {
                            match self.commands.try_recv() {
                                Ok(command) => self.handle(command),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.commands_open = false,
                },
                // With every handle gone, notice the consumer leaving without waiting for a push.
                () = self.events.closed(), if self.events_open && !self.commands_open => {
                    self.events_open = false;
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    return match self.write_failed.take() {
                        Some(e) => (None, format!("write failed: {e}")),
                        None => (None, "the server did not answer the close frame".into()),
                    };
                }
            }
        }
    }

    /// Reads what the socket has (without waiting) and decodes it into `self.messages`.
    fn read(&mut self) -> Read {
        let mut chunk = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKE {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return if self.messages.is_empty() { Read::Eof } else { Read::Data },
                Ok(n) => {
                    if let Err(e) = self.decoder.feed(&chunk[..n], &mut self.messages) {
                        return Read::Invalid(e);
                    }
                    if n < READ_CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return if self.messages.is_empty() { Read::Failed(e) } else { Read::Data }
                }
            }
        }
        Read::Data
    }

    /// Handles the outcome of a read; `Some` when the connection has ended.
    async fn after_read(&mut self, read: Read, received: Instant) -> Option<End> {
        // Messages decoded before a failure are handled first (a close frame explains it).
        if let Some(end) = self.handle_messages(received).await {
            return Some(end);
        }
        match read {
            Read::Data => None,
            Read::Eof => Some(match self.write_failed.take() {
                Some(e) => (None, format!("write failed: {e}")),
                None => (None, "the server closed the connection without a close frame".into()),
            }),
            Read::Failed(e) => Some((None, format!("read failed: {e}"))),
            Read::Invalid(e) => {
                let code = match e {
                    WsError::MessageTooBig { .. } => 1009,
                    WsError::Protocol(_) => 1002,
                };
                Some(self.fail(code, format!("invalid input from the server: {e}")).await)
            }
        }
    }

    /// Sends close `code` (best effort) and ends with `reason`.
    async fn fail(&mut self, code: u16, reason: String) -> End {
        if !self.close_sent {
            self.queue_close(code, "");
        }
        self.flush().await;
        (None, reason)
    }

    async fn handle_messages(&mut self, received: Instant) -> Option<End> {
        let mut messages = std::mem::take(&mut self.messages);
        let mut end = None;
        for message in messages.drain(..) {
            end = self.handle_message(message, received).await;
            if end.is_some() {
                break;
            }
        }
        messages.clear();
        self.messages = messages;
        end
    }

    async fn handle_message(&mut self, message: Message, received: Instant) -> Option<End> {
        match message {
            Message::Text(text) if self.format == WireFormat::Json => {
                self.handle_text(text, received).await
            }
            Message::Binary(data) if self.format == WireFormat::Proto => {
                self.handle_proto(data, received).await
            }
            Message::Text(_) | Message::Binary(_) => {
                let why =
                    format!("the server sent a data frame of the wrong kind for {}", self.format);
                Some(self.fail(1003, why).await)
            }
            Message::Ping(payload) => {
                if !self.close_sent {
                    ws::encode_frame_into(Role::Client, Opcode::Pong, &payload, &mut self.wbuf);
                }
                None
            }
            Message::Pong(_) => None,
            Message::Close(frame) => {
                let (code, reason) = match frame {
                    Some(f) => (Some(f.code), f.reason),
                    None => (None, String::new()),
                };
                if !self.close_sent {
                    // Echo the close (RFC 6455 section 5.5.1).
                    match code {
                        Some(code) => {
                            self.wbuf.extend_from_slice(&ws::encode_close(Role::Client, code, ""))
                        }
                        None => {
                            ws::encode_frame_into(Role::Client, Opcode::Close, &[], &mut self.wbuf)
                        }
                    }
                    self.close_sent = true;
                }
                self.flush().await;
                Some((code, reason))
            }
        }
    }

    async fn handle_text(&mut self, text: Bytes, received: Instant) -> Option<End> {
        for message in decode_server_messages(&text) {
            match message {
                Ok(message) => self.handle_server_message(message, received).await,
                // Valid JSON this client does not know (the protocol may grow): skipped.
                Err(e) if e.classify() == serde_json::error::Category::Data => {}
                Err(e) => {
                    return Some(
                        self.fail(1007, format!("the server sent invalid JSON: {e}")).await,
                    )
                }
            }
        }
        None
    }

    async fn handle_proto(&mut self, data: Bytes, received: Instant) -> Option<End> {
        for message in proto::decode_server_messages(&data) {
            match message {
                Ok(message) => self.handle_server_message(message, received).await,
                Err(e) => return Some(self.fail(1007, format!("the server sent {e}")).await),
            }
        }
        None
    }

    async fn handle_server_message(&mut self, message: ServerMessage, received: Instant) {
        match message {
            ServerMessage::Reply { id, result } => {
                // A reply to an unknown id (or to a request that timed out) is ignored.
                if let Some(waiter) = self.pending.remove(&id) {
                    let _ = waiter.send(Ok(result));
                }
            }
            ServerMessage::Pub { channel, offset, epoch, data, binary } => {
                self.emit(Event::Pub { channel, offset, epoch, data, binary, received }).await;
            }
            ServerMessage::Ping => {
                if self.auto_pong && !self.close_sent {
                    let pong = match self.format {
                        WireFormat::Json => PONG,
                        WireFormat::Proto => PONG_PROTO,
                    };
                    ws::encode_frame_into(Role::Client, self.format.opcode(), pong, &mut self.wbuf);
                }
                self.emit(Event::Ping).await;
            }
            ServerMessage::Disconnect { code, reason, reconnect } => {
                self.emit(Event::Disconnect { code, reason, reconnect }).await;
            }
            ServerMessage::Unsub { channel, code, reason } => {
                self.emit(Event::Unsub { channel, code, reason }).await;
            }
        }
    }

    /// Hands an event to the consumer, waiting while its channel is full (backpressure).
    async fn emit(&mut self, event: Event) {
        if self.events_open && self.events.send(event).await.is_err() {
            self.events_open = false;
        }
    }

    fn handle(&mut self, command: Outbound) {
        match command {
            Outbound::Request { id, payload, reply } => {
                if self.close_sent || self.write_failed.is_some() {
                    let _ = reply.send(Err(ClientError::Closed));
                    return;
                }
                if self.pending.get(&id).is_some_and(|w| !w.is_closed()) {
                    let _ = reply.send(Err(ClientError::Protocol(format!(
                        "request id {id} is already in flight"
                    ))));
                    return;
                }
                self.pending.insert(id, reply);
                ws::encode_frame_into(Role::Client, self.format.opcode(), &payload, &mut self.wbuf);
            }
            Outbound::Frame { opcode, payload } => {
                ws::encode_frame_into(Role::Client, opcode, &payload, &mut self.wbuf);
                if opcode == Opcode::Close {
                    self.close_sent = true;
                    self.deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                }
            }
            Outbound::Close { done } => {
                self.close_waiters.push(done);
                self.queue_close(1000, "");
            }
        }
    }

    fn queue_close(&mut self, code: u16, reason: &str) {
        if self.close_sent {
            return;
        }
        self.wbuf.extend_from_slice(&ws::encode_close(Role::Client, code, reason));
        self.close_sent = true;
        self.deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
    }

    /// Writes what it can without waiting.
    fn try_write(&mut self) {
        while !self.wbuf.is_empty() && self.write_failed.is_none() {
            match self.stream.try_write(&self.wbuf) {
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail_write(e),
            }
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > KEEP_WRITE_CAPACITY {
            self.wbuf = BytesMut::new();
        }
    }

    /// Nothing more can be sent; read on briefly to learn why (a close frame may be waiting).
    fn fail_write(&mut self, e: io::Error) {
        self.wbuf = BytesMut::new();
        self.write_failed = Some(e);
        self.close_sent = true;
        // Pending requests stay: replies already received may still be read.
        if self.deadline.is_none() {
            self.deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
        }
    }

    /// Writes everything queued, waiting at most [`CLOSE_GRACE`]; for the end of a connection.
    async fn flush(&mut self) {
        if self.write_failed.is_some() || self.wbuf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.wbuf);
        let _ = tokio::time::timeout(CLOSE_GRACE, self.stream.write_all(&buf)).await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod pong_tests {
    use herald_protocol::{Command, CommandKind};

    #[test]
    fn the_pongs_are_the_formats_pong_commands() {
        let pong = Command { id: None, kind: CommandKind::Pong };
        assert_eq!(super::PONG, herald_protocol::json::encode_command(&pong));
        assert_eq!(super::PONG_PROTO, herald_protocol::proto::encode_command(&pong));
    }
}
