//! [`Client`]: a cheap handle to one WebSocket connection (`herald.json`), [`Events`]: the
//! pushes it receives.
//!
//! [`Client::connect`] performs the HTTP/1.1 upgrade by hand over a [`TcpStream`], optionally
//! sends `connect`, and spawns the connection task (see `connection.rs`); every call on a
//! [`Client`] queues a command to that task and, where the command has a reply, awaits it.
//!
//! ```no_run
//! # async fn run() -> Result<(), herald_client::ClientError> {
//! use herald_client::{Client, ConnectOptions};
//! use std::time::Duration;
//!
//! let (client, mut events, _info) =
//!     Client::connect("ws://127.0.0.1:8080/ws", ConnectOptions::default()).await?;
//! client.subscribe("news", None).await?;
//! client.publish("news", &serde_json::json!({"text": "hi"})).await?;
//! let (channel, _offset, data) = events.next_pub(Duration::from_secs(5)).await?;
//! assert_eq!((channel.as_str(), &data["text"]), ("news", &serde_json::json!("hi")));
//! client.close().await;
//! # Ok(()) }
//! ```

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::json::ReplyError;
use herald_protocol::ws::{self, Opcode};
use herald_protocol::{pb, StreamPosition, WireFormat};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::connection::{Connection, Outbound, Shared};
use crate::error::ClientError;
use crate::http;

/// Commands a connection task buffers before [`Client`] calls wait for room.
const COMMAND_CAPACITY: usize = 1024;

/// How to open a connection; start from [`ConnectOptions::default`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// A token (JWT) sent in the `connect` command (when `send_connect`).
    pub token: Option<String>,
    /// A token sent in the URL as `?token=` (appended to any query the URL has).
    pub query_token: Option<String>,
    /// The local source address to bind before connecting (port chosen by the system); lets a
    /// load generator spread connections over `127.0.0.x` beyond one address's ephemeral ports.
    pub local_addr: Option<IpAddr>,
    /// Send `connect` first and await its reply (default true); without it the connection is
    /// anonymous unless `query_token` authenticates it.
    pub send_connect: bool,
    /// Answer each `ping` push with `{"op":"pong"}` (default true); [`Event::Ping`] is emitted
    /// either way.
    pub auto_pong: bool,
    /// Capacity of the bounded [`Events`] channel (default 65536). When it is full the
    /// connection task stops reading the socket until the consumer catches up: backpressure
    /// reaches the server, which may then disconnect a slow consumer (4008).
    pub event_capacity: usize,
    /// Longest message accepted from the server (default 64 MiB); beyond, the client closes
    /// with 1009 and the connection ends.
    pub max_message_bytes: usize,
    /// Limit on the whole of [`Client::connect`] and on each request's wait for its reply
    /// (default 30 s); `None` waits forever. (An addition to the brief, so tests cannot hang.)
    pub timeout: Option<Duration>,
    /// The wire format (subprotocol) to speak: `herald.json` (default) or `herald.proto`.
    /// Every call works alike in both; replies are handed over in the JSON shape.
    pub format: WireFormat,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            query_token: None,
            local_addr: None,
            send_connect: true,
            auto_pong: true,
            event_capacity: 65536,
            max_message_bytes: 64 * 1024 * 1024,
            timeout: Some(Duration::from_secs(30)),
            format: WireFormat::Json,
        }
    }
}

/// Something the server pushed, or the end of the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publication in a subscribed channel.
    Pub {
        /// The channel.
        channel: String,
        /// The publication's offset; `None` where the channel keeps no history.
        offset: Option<u64>,
        /// The channel's new epoch, on the first publication of an epoch this connection had
        /// not seen (its stream was reset: offsets start again).
        epoch: Option<String>,
        /// The publication's data when it is JSON; `null` when it is not (see `binary`).
        data: Value,
        /// The publication's data when it is not JSON text (binary data, published in
        /// `herald.proto`, as protobuf over the API or as `b64data`).
        binary: Option<Vec<u8>>,
        /// When the bytes carrying it were read from the socket (one instant per read, for
        /// latency measurements).
        received: Instant,
    },
    /// A `ping` push (answered already when [`ConnectOptions::auto_pong`]).
    Ping,
    /// The server ended one subscription.
    Unsub {
        /// The channel.
        channel: String,
        /// Why, as a code.
        code: u16,
        /// Why, in words.
        reason: String,
    },
    /// The server announced it is closing the connection; [`Event::Closed`] follows.
    Disconnect {
        /// The close code.
        code: u16,
        /// Why.
        reason: String,
        /// Whether the client should reconnect.
        reconnect: bool,
    },
    /// The connection ended: a close frame arrived (`code` is its code) or the socket ended
    /// or failed (`code` is `None`, `reason` says what happened). Always the last event.
    Closed {
        /// The close frame's code, when there was one.
        code: Option<u16>,
        /// The close frame's reason, or a description of how the connection ended.
        reason: String,
    },
}

/// The receiving side of a connection: its pushes, in order, ending with [`Event::Closed`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` after [`Event::Closed`] has been received.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready now.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The next publication as `(channel, offset, data)`, skipping pings, waiting at most
    /// `timeout`.
    ///
    /// Errors: [`ClientError::Timeout`]; [`ClientError::Closed`] at a `disconnect` push or the
    /// end of the connection; [`ClientError::Protocol`] at an `unsub` push (naming it).
    pub async fn next_pub(
        &mut self,
        timeout: Duration,
    ) -> Result<(String, Option<u64>, Value), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(Some(Event::Pub { channel, offset, data, .. })) => {
                    return Ok((channel, offset, data))
                }
                Ok(Some(Event::Ping)) => {}
                Ok(Some(Event::Unsub { channel, code, reason })) => {
                    return Err(ClientError::Protocol(format!(
                        "expected a publication, got unsub of {channel:?} ({code} {reason})"
                    )))
                }
                Ok(Some(Event::Disconnect { .. } | Event::Closed { .. }) | None) => {
                    return Err(ClientError::Closed)
                }
            }
        }
    }
}

/// The `connect` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The connection's id, as the server names it.
    pub client: String,
    /// How often the server pings; stay silent for twice this and it disconnects (4011).
    pub ping_interval_ms: u64,
}

/// The `subscribe` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    /// The channel's current offset; `None` where it keeps no history.
    pub offset: Option<u64>,
    /// The channel's epoch; `None` where it keeps no history.
    pub epoch: Option<String>,
    /// True when nothing after `since` is missing.
    pub recovered: bool,
    /// The recovered publications `(offset, data)`, oldest first; data that is not JSON is
    /// `null` here and its bytes are in `binary` at the same index.
    pub publications: Vec<(Option<u64>, Value)>,
    /// For each publication, its bytes when its data is not JSON text (`b64data`), else `None`.
    pub binary: Vec<Option<Vec<u8>>>,
}

impl Subscribed {
    /// The channel's position, to pass as `since` on a later subscribe; `None` without history.
    pub fn position(&self) -> Option<StreamPosition> {
        Some(StreamPosition { offset: self.offset?, epoch: self.epoch.clone()? })
    }
}

/// A handle to one connection; clones are cheap and share it.
///
/// Requests from any clone may be in flight at once; replies are matched by id. Each call
/// queues its command to the connection task and returns [`ClientError::Closed`] once the
/// connection has ended. Dropping every handle does not close the connection while its
/// [`Events`] is alive; dropping both does (close 1000).
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
    timeout: Option<Duration>,
    format: WireFormat,
}

impl Client {
    /// Opens a WebSocket connection to `url` (`ws://host[:port][/path][?query]`, no TLS),
    /// and, when [`ConnectOptions::send_connect`], sends `connect` and awaits its reply
    /// (returned as [`ConnectInfo`]).
    ///
    /// A refused `connect` is [`ClientError::Reply`]; if the server closes instead, the
    /// error is [`ClientError::Closed`]: to see the close code, connect with
    /// `send_connect: false` and watch [`Events`].
    pub async fn connect(
        url: &str,
        options: ConnectOptions,
    ) -> Result<(Client, Events, Option<ConnectInfo>), ClientError> {
        match options.timeout {
            Some(limit) => tokio::time::timeout(limit, Self::open(url, options))
                .await
                .map_err(|_| ClientError::Timeout)?,
            None => Self::open(url, options).await,
        }
    }

    async fn open(
        url: &str,
        options: ConnectOptions,
    ) -> Result<(Client, Events, Option<ConnectInfo>), ClientError> {
        let url = http::parse_url(url, "ws", 80)?;
        let mut stream = http::connect_tcp(&url.host, url.port, options.local_addr).await?;
        let format = options.format;
        let early = handshake(&mut stream, &url, options.query_token.as_deref(), format).await?;

        let (events_tx, events_rx) = mpsc::channel(options.event_capacity.max(1));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let shared = Arc::new(Shared::new());
        let connection = Connection::new(
            stream,
            options.max_message_bytes,
            events_tx,
            commands_rx,
            options.auto_pong,
            Arc::clone(&shared),
            format,
        );
        tokio::spawn(connection.run(early));
        let client = Client { commands: commands_tx, shared, timeout: options.timeout, format };
        let events = Events { rx: events_rx };

        let info = if options.send_connect {
            let id = client.shared.next_id();
            let cmd = Op::Connect { token: options.token.as_deref() }.encode(format, id);
            let ok = client.call(id, cmd).await?;
            Some(ConnectInfo {
                client: ok
                    .get("client")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_reply("connect", "client"))?
                    .to_owned(),
                ping_interval_ms: ok
                    .get("ping_interval_ms")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad_reply("connect", "ping_interval_ms"))?,
            })
        } else {
            None
        };
        Ok((client, events, info))
    }

    /// Subscribes to `channel`, recovering from `since` when given.
    ///
    /// The name is sent as given (not checked here), so the server's answer to a bad name can
    /// be tested.
    pub async fn subscribe(
        &self,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Result<Subscribed, ClientError> {
        let id = self.shared.next_id();
        let cmd = Op::Subscribe { channel, since: since.as_ref() }.encode(self.format, id);
        let ok = self.call(id, cmd).await?;
        parse_subscribed(ok)
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        let id = self.shared.next_id();
        let cmd = Op::Unsubscribe { channel }.encode(self.format, id);
        self.call(id, cmd).await.map(drop)
    }

    /// Publishes `data` into `channel` (where the namespace allows client publish); returns
    /// the publication's offset, `None` where the channel keeps no history.
    pub async fn publish(&self, channel: &str, data: &Value) -> Result<Option<u64>, ClientError> {
        let mut json = Vec::with_capacity(64);
        serde_json::to_writer(&mut json, data)
            .map_err(|e| ClientError::Protocol(format!("cannot encode data: {e}")))?;
        self.publish_data(channel, Data::Json(&json)).await
    }

    /// Publishes binary `data` (any bytes): sent as bytes in `herald.proto`, as `b64data` in
    /// `herald.json`. Subscribers receive it as [`Event::Pub`]'s `binary` (or as JSON `data`
    /// when the bytes happen to be JSON text).
    pub async fn publish_binary(
        &self,
        channel: &str,
        data: &[u8],
    ) -> Result<Option<u64>, ClientError> {
        self.publish_data(channel, Data::Binary(data)).await
    }

    /// Publishes raw JSON text as `data`, embedded verbatim (not checked; a `'\n'` becomes a
    /// space so the command stays on one line); returns the offset as [`Client::publish`].
    pub async fn publish_raw(
        &self,
        channel: &str,
        data_json: &str,
    ) -> Result<Option<u64>, ClientError> {
        self.publish_data(channel, Data::Json(data_json.as_bytes())).await
    }

    async fn publish_data(
        &self,
        channel: &str,
        data: Data<'_>,
    ) -> Result<Option<u64>, ClientError> {
        let id = self.shared.next_id();
        let cmd = Op::Publish { channel, data }.encode(self.format, id);
        let ok = self.call(id, cmd).await?;
        Ok(ok.get("offset").and_then(Value::as_u64))
    }

    /// Reads `channel`'s history: with `since`, the first `limit` publications after it;
    /// without, the newest `limit`. Returns the reply's `ok` object as is.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<StreamPosition>,
        limit: Option<u64>,
    ) -> Result<Value, ClientError> {
        let id = self.shared.next_id();
        let cmd = Op::History { channel, since: since.as_ref(), limit }.encode(self.format, id);
        self.call(id, cmd).await
    }

    /// Replaces the connection's token with `token`, a new token for the same user, before the
    /// current one expires (else the server closes with 4012). A bad token, or one for another
    /// user, is [`ClientError::Reply`] 401 and leaves the connection as it was.
    pub async fn refresh(&self, token: &str) -> Result<(), ClientError> {
        let id = self.shared.next_id();
        let cmd = Op::Refresh { token }.encode(self.format, id);
        self.call(id, cmd).await.map(drop)
    }

    /// Sends any command JSON (without id handling) or raw text as one text frame; for
    /// protocol tests. Returns once queued (not written).
    pub async fn send_text(&self, text: &str) -> Result<(), ClientError> {
        self.send_frame(Opcode::Text, text.as_bytes()).await
    }

    /// Sends a command the caller encoded in the connection's format (JSON text, or protobuf
    /// with its length prefix), with id `id` already in it, as one frame, and awaits the reply
    /// with that id: `Ok(Ok(ok))` or `Ok(Err(error))`.
    ///
    /// Ids of [`Client`]'s own calls count up from 1; pick ids far from them (e.g. from
    /// 1_000_000) to avoid [`ClientError::Protocol`] ("already in flight").
    pub async fn request_raw(
        &self,
        id: u32,
        text: &str,
    ) -> Result<Result<Value, ReplyError>, ClientError> {
        self.request(id, text.as_bytes().to_vec()).await
    }

    /// [`Client::request_raw`] with any bytes: a `herald.proto` command the caller encoded
    /// (length prefix included), or text on a JSON connection.
    pub async fn request_raw_bytes(
        &self,
        id: u32,
        payload: &[u8],
    ) -> Result<Result<Value, ReplyError>, ClientError> {
        self.request(id, payload.to_vec()).await
    }

    /// Sends one raw frame (masked, FIN set, never fragmented), whatever its opcode and
    /// length; for tests of bad input. A close frame sent this way ends the connection once
    /// the server answers it. Returns once queued (not written).
    pub async fn send_frame(&self, opcode: Opcode, payload: &[u8]) -> Result<(), ClientError> {
        self.commands
            .send(Outbound::Frame { opcode, payload: payload.to_vec() })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends close 1000 and waits until the connection has ended (the server's close frame,
    /// or at most about 2 s). Pending requests fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        let (done, ended) = oneshot::channel();
        if self.commands.send(Outbound::Close { done }).await.is_ok() {
            // The task drops `done` when it ends.
            let _ = ended.await;
        }
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.commands.is_closed()
    }

    /// Sends a command and awaits its reply, an error reply becoming [`ClientError::Reply`].
    async fn call(&self, id: u32, payload: Vec<u8>) -> Result<Value, ClientError> {
        self.request(id, payload)
            .await?
            .map_err(|e| ClientError::Reply { code: e.code, message: e.message })
    }

    async fn request(
        &self,
        id: u32,
        payload: Vec<u8>,
    ) -> Result<Result<Value, ReplyError>, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Outbound::Request { id, payload, reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        let answer = async { answer.await.unwrap_or(Err(ClientError::Closed)) };
        match self.timeout {
            Some(limit) => {
                tokio::time::timeout(limit, answer).await.map_err(|_| ClientError::Timeout)?
            }
            None => answer.await,
        }
    }
}

/// Sends the upgrade request and checks the response; returns the bytes read past its head.
async fn handshake(
    stream: &mut TcpStream,
    url: &http::Url,
    query_token: Option<&str>,
    format: WireFormat,
) -> Result<Vec<u8>, ClientError> {
    let key = ws::client_key();
    let mut target = url.target.clone();
    if let Some(token) = query_token {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str("token=");
        http::percent_encode(&mut target, token);
    }
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n",
        host = url.authority,
        protocol = format.subprotocol(),
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let head = http::read_head(stream, &mut buf).await.map_err(|e| match e {
        ClientError::Closed => ClientError::Handshake("the server closed the connection".into()),
        ClientError::Protocol(why) => ClientError::Handshake(why),
        other => other,
    })?;
    check_upgrade(&head, &key, format)?;
    Ok(buf)
}

/// Checks a `101 Switching Protocols` answer to an upgrade request sent with `key`.
fn check_upgrade(
    head: &http::ResponseHead,
    key: &str,
    format: WireFormat,
) -> Result<(), ClientError> {
    let refuse = |why: String| Err(ClientError::Handshake(why));
    if head.status != 101 {
        return refuse(format!(
            "expected 101 Switching Protocols, got {} {}",
            head.status, head.reason
        ));
    }
    if !head.has_token("upgrade", "websocket") {
        return refuse("the response lacks `Upgrade: websocket`".into());
    }
    if !head.has_token("connection", "upgrade") {
        return refuse("the response lacks `Connection: Upgrade`".into());
    }
    let want = ws::accept_key(key);
    match head.header("sec-websocket-accept") {
        Some(accept) if accept == want => {}
        other => return refuse(format!("Sec-WebSocket-Accept is {other:?}, expected {want:?}")),
    }
    match head.header("sec-websocket-protocol") {
        // Without a subprotocol the server speaks JSON (PROTOCOL.md section 2).
        None if format == WireFormat::Json => Ok(()),
        None => refuse(format!("the server did not accept subprotocol {format}")),
        Some(p) if p == format.subprotocol() => Ok(()),
        Some(p) => refuse(format!("the server chose subprotocol {p:?}")),
    }
}

/// A publication's data as a client call gives it.
#[derive(Debug, Clone, Copy)]
enum Data<'a> {
    /// JSON text, embedded verbatim in JSON (a `'\n'` becomes a space).
    Json(&'a [u8]),
    /// Any bytes: `b64data` in JSON.
    Binary(&'a [u8]),
}

/// A command as the client's calls build it; channel names go out unchecked, so tests can see
/// the server's answer to bad ones.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Connect { token: Option<&'a str> },
    Subscribe { channel: &'a str, since: Option<&'a StreamPosition> },
    Unsubscribe { channel: &'a str },
    Publish { channel: &'a str, data: Data<'a> },
    History { channel: &'a str, since: Option<&'a StreamPosition>, limit: Option<u64> },
    Refresh { token: &'a str },
}

impl Op<'_> {
    /// The command with `id`, in `format`.
    fn encode(self, format: WireFormat, id: u32) -> Vec<u8> {
        match format {
            WireFormat::Json => self.json(id),
            WireFormat::Proto => self.proto(id),
        }
    }

    fn json(self, id: u32) -> Vec<u8> {
        let (op, channel) = match self {
            Op::Connect { .. } => ("connect", None),
            Op::Subscribe { channel, .. } => ("subscribe", Some(channel)),
            Op::Unsubscribe { channel } => ("unsubscribe", Some(channel)),
            Op::Publish { channel, .. } => ("publish", Some(channel)),
            Op::History { channel, .. } => ("history", Some(channel)),
            Op::Refresh { .. } => ("refresh", None),
        };
        let mut cmd = Vec::with_capacity(96);
        cmd.extend_from_slice(b"{\"op\":\"");
        cmd.extend_from_slice(op.as_bytes());
        cmd.extend_from_slice(b"\",\"id\":");
        cmd.extend_from_slice(id.to_string().as_bytes());
        if let Some(channel) = channel {
            cmd.extend_from_slice(b",\"channel\":");
            write_json(&mut cmd, channel);
        }
        match self {
            Op::Connect { token: Some(token) } | Op::Refresh { token } => {
                cmd.extend_from_slice(b",\"token\":");
                write_json(&mut cmd, token);
            }
            Op::Subscribe { since, .. } => write_since(&mut cmd, since),
            Op::History { since, limit, .. } => {
                write_since(&mut cmd, since);
                if let Some(limit) = limit {
                    cmd.extend_from_slice(b",\"limit\":");
                    cmd.extend_from_slice(limit.to_string().as_bytes());
                }
            }
            Op::Publish { data: Data::Json(data), .. } => {
                cmd.extend_from_slice(b",\"data\":");
                let start = cmd.len();
                cmd.extend_from_slice(data);
                for b in &mut cmd[start..] {
                    if *b == b'\n' {
                        *b = b' ';
                    }
                }
            }
            Op::Publish { data: Data::Binary(data), .. } => {
                use base64::Engine as _;
                cmd.extend_from_slice(b",\"b64data\":\"");
                cmd.extend_from_slice(
                    base64::engine::general_purpose::STANDARD.encode(data).as_bytes(),
                );
                cmd.push(b'"');
            }
            Op::Connect { token: None } | Op::Unsubscribe { .. } => {}
        }
        cmd.push(b'}');
        cmd
    }

    fn proto(self, id: u32) -> Vec<u8> {
        use pb::command::Op as P;
        use prost::Message as _;
        let since = |s: Option<&StreamPosition>| {
            s.map(|p| pb::StreamPosition { offset: p.offset, epoch: p.epoch.clone() })
        };
        let op = match self {
            Op::Connect { token } => P::Connect(pb::Connect { token: token.map(str::to_owned) }),
            Op::Subscribe { channel, since: s } => {
                P::Subscribe(pb::Subscribe { channel: channel.to_owned(), since: since(s) })
            }
            Op::Unsubscribe { channel } => {
                P::Unsubscribe(pb::Unsubscribe { channel: channel.to_owned() })
            }
            Op::Publish { channel, data: Data::Json(d) | Data::Binary(d) } => {
                P::Publish(pb::Publish {
                    channel: channel.to_owned(),
                    data: Some(d.to_vec().into()),
                })
            }
            Op::History { channel, since: s, limit } => {
                P::History(pb::History { channel: channel.to_owned(), since: since(s), limit })
            }
            Op::Refresh { token } => P::Refresh(pb::Refresh { token: token.to_owned() }),
        };
        pb::Command { id, op: Some(op) }.encode_length_delimited_to_vec()
    }
}

/// Writes `s` as a JSON string.
fn write_json(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing a string into a Vec cannot fail; keep the output JSON regardless.
        out.extend_from_slice(b"\"\"");
    }
}

fn write_since(out: &mut Vec<u8>, since: Option<&StreamPosition>) {
    if let Some(pos) = since {
        out.extend_from_slice(b",\"since\":{\"offset\":");
        out.extend_from_slice(pos.offset.to_string().as_bytes());
        out.extend_from_slice(b",\"epoch\":");
        write_json(out, &pos.epoch);
        out.push(b'}');
    }
}

fn bad_reply(op: &str, field: &str) -> ClientError {
    ClientError::Protocol(format!("`{op}` reply lacks a valid `{field}`"))
}

fn parse_subscribed(ok: Value) -> Result<Subscribed, ClientError> {
    let Value::Object(mut ok) = ok else {
        return Err(ClientError::Protocol("`subscribe` reply is not an object".into()));
    };
    let parsed: Vec<(Option<u64>, Value, Option<Vec<u8>>)> = match ok.remove("publications") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            list.into_iter().map(parse_publication).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad_reply("subscribe", "publications")),
    };
    let mut publications = Vec::with_capacity(parsed.len());
    let mut binary = Vec::with_capacity(parsed.len());
    for (offset, data, bytes) in parsed {
        publications.push((offset, data));
        binary.push(bytes);
    }
    Ok(Subscribed {
        offset: ok.get("offset").and_then(Value::as_u64),
        epoch: match ok.remove("epoch") {
            Some(Value::String(epoch)) => Some(epoch),
            _ => None,
        },
        recovered: ok.get("recovered").and_then(Value::as_bool).unwrap_or(false),
        publications,
        binary,
    })
}

/// `{"offset": N, "data": ...}` as `(offset, data, None)`; with `b64data`, `(offset, null,
/// Some(bytes))`.
type ParsedPublication = (Option<u64>, Value, Option<Vec<u8>>);

fn parse_publication(publication: Value) -> Result<ParsedPublication, ClientError> {
    use base64::Engine as _;
    let bad = || bad_reply("subscribe", "publications");
    match publication {
        Value::Object(mut p) => {
            let offset = p.get("offset").and_then(Value::as_u64);
            match (p.remove("data"), p.remove("b64data")) {
                (_, Some(Value::String(b64))) => {
                    let bytes =
                        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad())?;
                    Ok((offset, Value::Null, Some(bytes)))
                }
                (Some(data), None) => Ok((offset, data, None)),
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builds_commands() {
        let since = StreamPosition { offset: 3, epoch: "e".into() };
        let cmd = Op::Subscribe { channel: "a\"b", since: Some(&since) }.json(7);
        assert_eq!(
            std::str::from_utf8(&cmd).unwrap(),
            r#"{"op":"subscribe","id":7,"channel":"a\"b","since":{"offset":3,"epoch":"e"}}"#
        );
        let cmd = Op::Publish { channel: "c", data: Data::Binary(b"\x00\x01") }.json(8);
        assert_eq!(
            std::str::from_utf8(&cmd).unwrap(),
            r#"{"op":"publish","id":8,"channel":"c","b64data":"AAE="}"#
        );
        // Both formats decode to the same command on the server.
        for op in [
            Op::Connect { token: Some("t") },
            Op::Subscribe { channel: "c", since: Some(&since) },
            Op::History { channel: "c", since: None, limit: Some(0) },
            Op::Publish { channel: "c", data: Data::Json(b"{\"x\":1}") },
            Op::Publish { channel: "c", data: Data::Binary(b"\xff") },
            Op::Refresh { token: "u" },
            Op::Unsubscribe { channel: "c" },
        ] {
            let json: Vec<_> = herald_protocol::json::decode_commands(&op.json(9)).collect();
            let proto: Vec<_> = herald_protocol::proto::decode_commands(&op.proto(9)).collect();
            assert_eq!(json, proto, "{op:?}");
            assert!(json[0].is_ok());
        }
    }

    #[test]
    fn parses_subscribe_replies() {
        let got = parse_subscribed(json!({
            "offset": 5, "epoch": "xy", "recovered": true,
            "publications": [{"offset": 4, "data": {"a": 1}}, {"data": null}]
        }))
        .unwrap();
        assert_eq!(
            got,
            Subscribed {
                offset: Some(5),
                epoch: Some("xy".into()),
                recovered: true,
                publications: vec![(Some(4), json!({"a": 1})), (None, Value::Null)],
                binary: vec![None, None],
            }
        );
        assert_eq!(got.position(), Some(StreamPosition { offset: 5, epoch: "xy".into() }));
        let empty = parse_subscribed(json!({"recovered": false, "publications": []})).unwrap();
        assert_eq!(empty.position(), None);
        assert!(parse_subscribed(json!([])).is_err());
        assert!(parse_subscribed(json!({"publications": [{"offset": 1}]})).is_err());
        assert!(parse_subscribed(json!({"publications": 3})).is_err());
        let binary = parse_subscribed(json!({"publications": [
            {"offset": 1, "data": null, "b64data": "AAE="}, {"offset": 2, "data": {"b64data": "x"}}
        ]}))
        .unwrap();
        assert_eq!(
            binary.publications,
            [(Some(1), Value::Null), (Some(2), json!({"b64data": "x"}))]
        );
        assert_eq!(binary.binary, [Some(vec![0, 1]), None]);
    }

    #[test]
    fn checks_upgrade_responses() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let head = |text: &str| http::parse_response_head(text.as_bytes()).unwrap();
        let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        let json = WireFormat::Json;
        assert!(check_upgrade(&head(good), key, json).is_ok());
        assert!(check_upgrade(
            &head(&format!("{good}\r\nSec-WebSocket-Protocol: herald.json")),
            key,
            json
        )
        .is_ok());
        let proto = format!("{good}\r\nSec-WebSocket-Protocol: herald.proto");
        assert!(check_upgrade(&head(&proto), key, WireFormat::Proto).is_ok());
        assert!(check_upgrade(&head(good), key, WireFormat::Proto).is_err());
        for bad in [
            good.replace("101 Switching Protocols", "401 Unauthorized"),
            good.replace("Upgrade: websocket\r\n", ""),
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            good.replace("s3pP", "xxxx"),
            format!("{good}\r\nSec-WebSocket-Protocol: herald.proto"),
        ] {
            assert!(
                matches!(check_upgrade(&head(&bad), key, json), Err(ClientError::Handshake(_))),
                "{bad}"
            );
        }
    }

    use herald_protocol::json::decode_commands;
    use herald_protocol::ws::{Decoder, Message, Role};
    use herald_protocol::{Command, CommandKind};
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    /// The server side of one fake connection: frames in, frames out.
    struct FakeServer {
        socket: TcpStream,
        decoder: Decoder,
        inbox: std::collections::VecDeque<Message>,
    }

    impl FakeServer {
        /// Accepts one connection and answers its upgrade, with `early` right after the head.
        async fn accept(listener: &TcpListener, early: &[u8]) -> (FakeServer, String) {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(socket.read_u8().await.unwrap());
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_owned();
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\nsec-websocket-protocol: herald.json\r\n\r\n",
                ws::accept_key(&key)
            )
            .into_bytes();
            answer.extend_from_slice(early);
            socket.write_all(&answer).await.unwrap();
            let server = FakeServer {
                socket,
                decoder: Decoder::new(Role::Server, 1 << 20),
                inbox: Default::default(),
            };
            (server, head)
        }

        async fn message(&mut self) -> Message {
            while self.inbox.is_empty() {
                let mut buf = [0u8; 4096];
                let n = self.socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "client went away");
                let mut out = Vec::new();
                self.decoder.feed(&buf[..n], &mut out).unwrap();
                self.inbox.extend(out);
            }
            self.inbox.pop_front().unwrap()
        }

        async fn command(&mut self) -> Command {
            match self.message().await {
                Message::Text(t) => {
                    let mut cmds: Vec<_> = decode_commands(&t).map(Result::unwrap).collect();
                    assert_eq!(cmds.len(), 1);
                    cmds.remove(0)
                }
                other => panic!("expected a command, got {other:?}"),
            }
        }

        async fn send(&mut self, text: &str) {
            let frame = ws::encode_frame(Role::Server, Opcode::Text, text.as_bytes());
            self.socket.write_all(&frame).await.unwrap();
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn matches_replies_and_delivers_pushes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws?x=1", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let early = ws::encode_frame(
                Role::Server,
                Opcode::Text,
                br#"{"pub":{"channel":"early","data":0}}"#,
            );
            let (mut s, head) = FakeServer::accept(&listener, &early).await;
            assert!(head.starts_with("GET /ws?x=1&token=q%2Bt HTTP/1.1\r\n"), "{head}");
            assert!(head.contains("Sec-WebSocket-Protocol: herald.json\r\n"));
            let connect = s.command().await;
            assert_eq!(connect.kind, CommandKind::Connect { token: Some("jwt".into()) });
            s.send(r#"{"id":1,"ok":{"client":"c1","ping_interval_ms":25000}}"#).await;

            // Three publishes in flight: answer in reverse order, offset = data.
            let mut publishes = Vec::new();
            while publishes.len() < 3 {
                let cmd = s.command().await;
                let CommandKind::Publish { data, .. } = &cmd.kind else { panic!("{cmd:?}") };
                publishes.push((cmd.id.unwrap(), std::str::from_utf8(data).unwrap().to_owned()));
            }
            let mut batch = String::from(r#"{"id":999,"ok":{}}"#);
            for (id, data) in publishes.iter().rev() {
                batch.push_str(&format!("\n{{\"id\":{id},\"ok\":{{\"offset\":{data}}}}}"));
            }
            s.send(&batch).await;

            // A ping push gets a pong command; a ping frame a pong frame.
            s.socket.write_all(&ws::encode_frame(Role::Server, Opcode::Ping, b"hb")).await.unwrap();
            s.send(r#"{"ping":{}}"#).await;
            assert_eq!(s.message().await, Message::Pong(bytes::Bytes::from_static(b"hb")));
            assert_eq!(s.command().await.kind, CommandKind::Pong);

            let sub = s.command().await;
            s.send(&format!(
                r#"{{"id":{},"error":{{"code":409,"message":"already subscribed"}}}}"#,
                sub.id.unwrap()
            ))
            .await;

            // A history request stays unanswered: the disconnect fails it.
            assert!(matches!(s.command().await.kind, CommandKind::History { .. }));
            s.send(r#"{"pub":{"channel":"c","offset":7,"data":{"k":[1]}}}"#).await;
            s.send(r#"{"unknown":{}}"#).await;
            s.send(r#"{"disconnect":{"code":4000,"reason":"shutdown","reconnect":true}}"#).await;
            s.socket.write_all(&ws::encode_close(Role::Server, 4000, "shutdown")).await.unwrap();
            match s.message().await {
                Message::Close(Some(c)) => assert_eq!(c.code, 4000),
                other => panic!("expected the close echo, got {other:?}"),
            }
        });

        let options = ConnectOptions {
            token: Some("jwt".into()),
            query_token: Some("q+t".into()),
            ..ConnectOptions::default()
        };
        let (client, mut events, info) = Client::connect(&url, options).await.unwrap();
        assert_eq!(info, Some(ConnectInfo { client: "c1".into(), ping_interval_ms: 25000 }));
        assert_eq!(events.next_pub(WAIT).await.unwrap(), ("early".into(), None, json!(0)));

        let (ten, thirty, other) = (json!(10), json!(30), client.clone());
        let (a, b, c) = tokio::join!(
            client.publish("c", &ten),
            client.publish_raw("c", "20"),
            other.publish("c", &thirty),
        );
        assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (Some(10), Some(20), Some(30)));
        assert_eq!(events.recv().await, Some(Event::Ping));

        match client.subscribe("c", None).await {
            Err(ClientError::Reply { code: 409, message }) => {
                assert_eq!(message, "already subscribed")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(client.history("c", None, Some(1)).await, Err(ClientError::Closed)));
        assert_eq!(events.next_pub(WAIT).await.unwrap(), ("c".into(), Some(7), json!({"k": [1]})));
        assert_eq!(
            events.recv().await,
            Some(Event::Disconnect { code: 4000, reason: "shutdown".into(), reconnect: true })
        );
        assert_eq!(
            events.recv().await,
            Some(Event::Closed { code: Some(4000), reason: "shutdown".into() })
        );
        assert_eq!(events.recv().await, None);
        assert!(client.is_closed());
        assert!(matches!(client.unsubscribe("c").await, Err(ClientError::Closed)));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn close_and_raw_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, head) = FakeServer::accept(&listener, b"").await;
            assert!(head.starts_with("GET / HTTP/1.1\r\n"));
            match s.message().await {
                Message::Text(t) => assert_eq!(&t[..], b"not json"),
                other => panic!("{other:?}"),
            }
            assert_eq!(s.message().await, Message::Binary(bytes::Bytes::from_static(b"\x01")));
            match s.message().await {
                Message::Text(t) => assert_eq!(&t[..], br#"{"op":"nope","id":77}"#),
                other => panic!("{other:?}"),
            }
            s.send(r#"{"id":77,"error":{"code":400,"message":"unknown op"}}"#).await;
            match s.message().await {
                Message::Close(Some(c)) => assert_eq!(c.code, 1000),
                other => panic!("{other:?}"),
            }
            s.socket.write_all(&ws::encode_close(Role::Server, 1000, "")).await.unwrap();
        });
        let options = ConnectOptions { send_connect: false, ..ConnectOptions::default() };
        let (client, mut events, info) = Client::connect(&url, options).await.unwrap();
        assert_eq!(info, None);
        client.send_text("not json").await.unwrap();
        client.send_frame(Opcode::Binary, b"\x01").await.unwrap();
        let reply = client.request_raw(77, r#"{"op":"nope","id":77}"#).await.unwrap();
        assert_eq!(reply, Err(ReplyError { code: 400, message: "unknown op".into() }));
        client.close().await;
        assert!(client.is_closed());
        assert_eq!(
            events.recv().await,
            Some(Event::Closed { code: Some(1000), reason: String::new() })
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_upgrade_and_eof() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket
                .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            // Then a connection that ends without a close frame.
            let (s, _) = FakeServer::accept(&listener, b"").await;
            drop(s);
        });
        match Client::connect(&url, ConnectOptions::default()).await {
            Err(ClientError::Handshake(why)) => assert!(why.contains("426"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let options = ConnectOptions {
            send_connect: false,
            local_addr: Some("127.0.0.1".parse().unwrap()),
            ..ConnectOptions::default()
        };
        let (client, mut events, _) = Client::connect(&url, options).await.unwrap();
        match events.recv().await {
            Some(Event::Closed { code: None, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(client.is_closed());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_every_handle_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = FakeServer::accept(&listener, b"").await;
            match s.message().await {
                Message::Close(Some(c)) => assert_eq!(c.code, 1000),
                other => panic!("{other:?}"),
            }
        });
        let options = ConnectOptions { send_connect: false, ..ConnectOptions::default() };
        let (client, events, _) = Client::connect(&url, options).await.unwrap();
        drop(client);
        tokio::task::yield_now().await;
        drop(events);
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    }
}
