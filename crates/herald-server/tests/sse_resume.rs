//! The Server-Sent Events transport over real sockets (PROTOCOL.md section 3): several channels
//! per stream, the per-stream id holding every channel's position, resumption through the
//! `Last-Event-ID` header and the `last_event_id=` query, `event: reset` where history does not
//! reach (trimmed, another epoch, expired, no history), pings, errors and CORS, subscriber
//! counts, and a race of publishers against clients that connect and resume at random moments.
//!
//! The client below is a small SSE parser written from the HTML specification ("Server-sent
//! events", "Interpreting an event stream"), not the server's own code; the first test checks
//! it against a canned stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Server, TIMEOUT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// A tiny SSE client.

/// One thing read from an event stream.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// A dispatched event: its type (`message` without an `event:` field), its data (the
    /// `data:` lines joined by `\n`) and the stream's last event id when it was dispatched.
    Event { event: String, data: String, id: String },
    /// A block with an `id:` field but no data: per the specification nothing is dispatched,
    /// only the last event id is updated. Reported so that the tests see start positions.
    IdOnly(String),
    /// A comment line (`: ping`), without the colon and one leading space.
    Comment(String),
}

/// What waiting for the next item gave.
#[derive(Debug)]
enum Next {
    Item(Item),
    Eof,
    Timeout,
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// Until the connection closes (the raw-socket path).
    Close,
    /// `Transfer-Encoding: chunked`, expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, with this many bytes left.
    ChunkData(usize),
    /// After a chunk's data, expecting its CRLF.
    ChunkEnd,
    /// After the last chunk (trailers are ignored).
    Done,
}

struct SseClient {
    stream: TcpStream,
    /// Bytes read, not yet decoded from the transfer framing.
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into lines.
    body: Vec<u8>,
    framing: Framing,
    eof: bool,
    bom_checked: bool,
    status: u16,
    headers: Vec<(String, String)>,
    // Parser state (the specification's buffers).
    event_type: String,
    data: String,
    id_buffer: String,
    block_has_id: bool,
    last_event_id: String,
    retry: Option<u64>,
}

impl SseClient {
    fn new(stream: TcpStream) -> SseClient {
        SseClient {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            framing: Framing::Close,
            eof: false,
            bom_checked: false,
            status: 0,
            headers: Vec::new(),
            event_type: String::new(),
            data: String::new(),
            id_buffer: String::new(),
            block_has_id: false,
            last_event_id: String::new(),
            retry: None,
        }
    }

    /// Opens `GET <path>` on a new connection (served on the raw-socket path).
    async fn open(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut c = SseClient::new(stream);
        c.request(path, last_event_id).await;
        c
    }

    /// Opens `GET <path>` on a kept-alive connection that first served `GET /healthz`, so
    /// that the stream is served through hyper (chunked body).
    async fn open_kept_alive(
        addr: SocketAddr,
        path: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut c = SseClient::new(stream);
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        c.read_head().await;
        assert_eq!(c.status, 200, "/healthz");
        let len: usize = c.header("content-length").expect("content-length").parse().unwrap();
        c.read_exact_body(len).await;
        assert!(!c.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")));
        c.request(path, last_event_id).await;
        c
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send request");
    }

    async fn request(&mut self, path: &str, last_event_id: Option<&str>) {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes()).await;
        self.read_head().await;
        if self.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            self.framing = Framing::ChunkSize;
        }
    }

    /// Reads more bytes into `raw`; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// Reads a response head: status line and headers (the rest stays in `raw`).
    async fn read_head(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let end = loop {
            if let Some(p) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.fill()).await {
                Ok(true) => {}
                Ok(false) => panic!("connection closed before the response head"),
                Err(_) => panic!("no response head within {TIMEOUT:?}"),
            }
        };
        let head = String::from_utf8(self.raw[..end].to_vec()).expect("ASCII head");
        self.raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {status_line:?}");
        self.status = parts.next().and_then(|s| s.parse().ok()).expect("status code");
        self.headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
    }

    async fn read_exact_body(&mut self, len: usize) -> Vec<u8> {
        while self.raw.len() < len {
            let got = tokio::time::timeout(TIMEOUT, self.fill()).await.expect("body in time");
            assert!(got, "connection closed inside a body");
        }
        self.raw.drain(..len).collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The JSON body of a refused request (status other than 200).
    async fn error_body(&mut self) -> Value {
        let len: usize = self.header("content-length").expect("content-length").parse().unwrap();
        let body = self.read_exact_body(len).await;
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
    }

    /// Moves what `raw` holds of the body into `body`, undoing the chunked framing.
    fn decode(&mut self) {
        loop {
            match self.framing {
                Framing::Close => {
                    self.body.append(&mut self.raw);
                    return;
                }
                Framing::ChunkSize => {
                    let Some(p) = self.raw.windows(2).position(|w| w == b"\r\n") else { return };
                    let line = String::from_utf8_lossy(&self.raw[..p]).into_owned();
                    self.raw.drain(..p + 2);
                    let size = line.split(';').next().unwrap().trim();
                    let size = usize::from_str_radix(size, 16).expect("chunk size");
                    if size == 0 {
                        self.framing = Framing::Done;
                        self.eof = true;
                        return;
                    }
                    self.framing = Framing::ChunkData(size);
                }
                Framing::ChunkData(left) => {
                    if self.raw.is_empty() {
                        return;
                    }
                    let n = left.min(self.raw.len());
                    self.body.extend(self.raw.drain(..n));
                    self.framing =
                        if n == left { Framing::ChunkEnd } else { Framing::ChunkData(left - n) };
                }
                Framing::Done => return,
                Framing::ChunkEnd => {
                    if self.raw.len() < 2 {
                        return;
                    }
                    assert_eq!(&self.raw[..2], b"\r\n", "chunk ends with CRLF");
                    self.raw.drain(..2);
                    self.framing = Framing::ChunkSize;
                }
            }
        }
    }

    /// The next complete line of the body (CRLF, LF or CR ends a line).
    fn take_line(&mut self) -> Option<String> {
        if !self.bom_checked {
            if self.body.len() < 3 && !self.eof {
                if !b"\xEF\xBB\xBF".starts_with(&self.body) {
                    self.bom_checked = true;
                }
                if !self.bom_checked {
                    return None;
                }
            } else {
                self.bom_checked = true;
                if self.body.starts_with(b"\xEF\xBB\xBF") {
                    self.body.drain(..3);
                }
            }
        }
        let pos = self.body.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let mut end = pos + 1;
        if self.body[pos] == b'\r' {
            if pos + 1 == self.body.len() && !self.eof {
                return None; // maybe CRLF split across reads
            }
            if self.body.get(pos + 1) == Some(&b'\n') {
                end += 1;
            }
        }
        let line = String::from_utf8_lossy(&self.body[..pos]).into_owned();
        self.body.drain(..end);
        Some(line)
    }

    /// Interprets one line; an item when it ends a block that dispatches (or records an id).
    fn process_line(&mut self, line: &str) -> Option<Item> {
        if line.is_empty() {
            // Dispatch: the last event id is set whether or not there is data.
            self.last_event_id = self.id_buffer.clone();
            let had_id = std::mem::take(&mut self.block_has_id);
            let event = std::mem::take(&mut self.event_type);
            if self.data.is_empty() {
                return had_id.then(|| Item::IdOnly(self.last_event_id.clone()));
            }
            let mut data = std::mem::take(&mut self.data);
            data.pop(); // the last line's LF
            let event = if event.is_empty() { "message".to_string() } else { event };
            return Some(Item::Event { event, data, id: self.last_event_id.clone() });
        }
        if let Some(comment) = line.strip_prefix(':') {
            return Some(Item::Comment(comment.strip_prefix(' ').unwrap_or(comment).to_string()));
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event_type = value.to_string(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => {
                self.id_buffer = value.to_string();
                self.block_has_id = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    /// The next item, waiting at most `limit`.
    async fn next_within(&mut self, limit: Duration) -> Next {
        let deadline = Instant::now() + limit;
        loop {
            self.decode();
            while let Some(line) = self.take_line() {
                if let Some(item) = self.process_line(&line) {
                    return Next::Item(item);
                }
            }
            if self.eof {
                // An unfinished block at the end of the stream is discarded.
                return Next::Eof;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.fill()).await {
                Ok(true) => {}
                Ok(false) => self.eof = true,
                Err(_) => return Next::Timeout,
            }
        }
    }

    /// The next item, panicking after [`TIMEOUT`]; `None` at end of stream.
    async fn next(&mut self) -> Option<Item> {
        match self.next_within(TIMEOUT).await {
            Next::Item(item) => Some(item),
            Next::Eof => None,
            Next::Timeout => panic!("no SSE item within {TIMEOUT:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading streams.

/// A position on one channel: `(tag, offset)`, `None` for a channel without history. The tag
/// stands for the channel's epoch (see `herald_protocol::sse::position_tag`).
type Pos = Option<(String, u64)>;

/// Parses an event id of the compact form (`~`, then per channel of the stream, in the order of
/// its `channel=` parameters, an 8-character tag and the offset, or nothing without history,
/// joined by `;`), naming the entries after `channels`.
fn parse_id(id: &str, channels: &[&str]) -> Vec<(String, Pos)> {
    let entries = id.strip_prefix('~').unwrap_or_else(|| panic!("not a compact id: {id:?}"));
    let entries: Vec<&str> = entries.split(';').collect();
    assert_eq!(entries.len(), channels.len(), "one entry per channel in {id:?}");
    channels
        .iter()
        .zip(entries)
        .map(|(c, entry)| {
            let pos = (!entry.is_empty()).then(|| {
                assert!(entry.len() > 8, "malformed entry {entry:?} in {id:?}");
                let (tag, offset) = entry.split_at(8);
                (tag.to_string(), offset.parse().expect("numeric offset"))
            });
            (c.to_string(), pos)
        })
        .collect()
}

/// Builds a compact id from `(channel, Some((tag, offset)))` entries (channels without history:
/// `None`), in the stream's order.
fn id_of(entries: &[(&str, Option<(&str, u64)>)]) -> String {
    let body = entries
        .iter()
        .map(|(_, p)| match p {
            Some((t, o)) => format!("{t}{o}"),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join(";");
    format!("~{body}")
}

/// The tag of `epoch` on `channel` (what a compact id carries instead of the epoch).
fn tag(channel: &str, epoch: &str) -> String {
    String::from_utf8(herald_protocol::sse::position_tag(channel, epoch).to_vec()).unwrap()
}

/// A publication received as `event: pub`.
#[derive(Debug, Clone, PartialEq)]
struct Pub {
    channel: String,
    offset: Option<u64>,
    data: Value,
    id: String,
}

fn as_pub(item: &Item) -> Option<Pub> {
    match item {
        Item::Event { event, data, id } if event == "pub" => {
            let v: Value = serde_json::from_str(data).expect("pub data is JSON");
            let keys: Vec<&String> = v.as_object().expect("pub data is an object").keys().collect();
            assert!(
                keys.iter().all(|k| ["channel", "offset", "data"].contains(&k.as_str())),
                "{v}"
            );
            Some(Pub {
                channel: v["channel"].as_str().expect("channel").to_string(),
                offset: v.get("offset").map(|o| o.as_u64().expect("offset")),
                data: v["data"].clone(),
                id: id.clone(),
            })
        }
        _ => None,
    }
}

/// What a stream sends before going live.
#[derive(Debug)]
struct Start {
    reset: Option<Vec<String>>,
    recovered: Vec<Pub>,
    /// The id-only event's id.
    id: String,
}

/// Reads the stream's opening: `retry`, optional `reset`, recovered publications, the id-only
/// event. (Nothing is published meanwhile in the callers, so no live event comes first.)
async fn read_start(c: &mut SseClient) -> Start {
    assert_eq!(c.status, 200, "stream refused: {:?}", c.headers);
    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.header("access-control-allow-origin"), Some("*"));
    let mut reset = None;
    let mut recovered = Vec::new();
    loop {
        match c.next().await.expect("stream ended during its opening") {
            Item::IdOnly(id) => {
                assert_eq!(c.retry, Some(1000), "retry: 1000 comes first");
                return Start { reset, recovered, id };
            }
            Item::Event { event, data, .. } if event == "reset" => {
                assert!(reset.is_none(), "one reset event");
                assert!(recovered.is_empty(), "reset comes before recovered publications");
                let v: Value = serde_json::from_str(&data).unwrap();
                let chans = v["channels"].as_array().expect("channels").iter();
                reset = Some(chans.map(|c| c.as_str().unwrap().to_string()).collect());
            }
            item => match as_pub(&item) {
                Some(p) => recovered.push(p),
                None => panic!("unexpected item in the opening: {item:?}"),
            },
        }
    }
}

/// The next `pub` event, skipping pings; panics on anything else.
async fn next_pub(c: &mut SseClient) -> Pub {
    loop {
        let item = c.next().await.expect("stream ended");
        if matches!(&item, Item::Comment(t) if t == "ping") {
            continue;
        }
        return as_pub(&item).unwrap_or_else(|| panic!("expected a pub event, got {item:?}"));
    }
}

/// Reads until the server's `disconnect` event and the end of the stream.
async fn expect_disconnect(c: &mut SseClient) {
    loop {
        match c.next().await {
            Some(Item::Event { event, data, .. }) if event == "disconnect" => {
                let v: Value = serde_json::from_str(&data).unwrap();
                assert!(v["code"].is_u64(), "{v}");
                break;
            }
            Some(Item::Comment(_)) => {}
            other => panic!("expected the disconnect event, got {other:?}"),
        }
    }
    assert_eq!(c.next().await, None, "the stream ends after disconnect");
}

/// Makes the server end every stream.
async fn drop_all_streams(server: &Server) {
    let mut api = server.api().await;
    let (status, _, body) =
        api.request("POST", "/api/disconnect", Some(br#"{"all": true}"#)).await.expect("request");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

async fn publish(api: &mut herald_client::HttpApi, channel: &str, data: Value) -> Option<u64> {
    let r = api.publish(channel, &data).await.expect("publish");
    r.get("offset").and_then(Value::as_u64)
}

/// The tag of `channel`'s position in `id`, a stream of `channels`.
fn tag_of(id: &str, channels: &[&str], channel: &str) -> String {
    parse_id(id, channels)
        .into_iter()
        .find(|(c, _)| c == channel)
        .and_then(|(_, p)| p)
        .unwrap_or_else(|| panic!("{channel} has no position in {id:?}"))
        .0
}

/// Publishes and returns `(offset, epoch)`.
async fn publish_at(api: &mut herald_client::HttpApi, channel: &str, data: Value) -> (u64, String) {
    let r = api.publish(channel, &data).await.expect("publish");
    (r["offset"].as_u64().expect("offset"), r["epoch"].as_str().expect("epoch").to_string())
}

fn pubs_on<'a>(pubs: &'a [Pub], channel: &str) -> Vec<&'a Pub> {
    pubs.iter().filter(|p| p.channel == channel).collect()
}

const CONFIG: &str = r#"
[namespaces.hist]
history_size = 100
[namespaces.small]
history_size = 3
[namespaces.ttl]
history_size = 100
history_ttl_secs = 1
[namespaces.race]
history_size = 5000
"#;

// ---------------------------------------------------------------------------------------------
// Tests.

/// The client itself, on a canned chunked stream cut into 3-byte pieces: BOM, CRLF / CR / LF
/// line ends, comments, multi-line data, `id` without data, an unknown field, a field without a
/// colon, a bad `retry`, and an unfinished block at the end.
#[tokio::test]
async fn the_test_client_follows_the_sse_parsing_rules() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body: &[u8] =
        b"\xEF\xBB\xBFretry: 1500\r\n\r\n: hello\rid: 1\n\nevent: pub\ndata:a\ndata: b\r\n\
        \r\ndata\nid\nretry: x\nfoo: bar\n\n: \nevent: e\ndata: c\nid: 2\n\ndata: lost";
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for chunk in body.chunks(7) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        for piece in out.chunks(3) {
            s.write_all(piece).await.unwrap();
            s.flush().await.unwrap();
        }
    });
    let mut c = SseClient::open(addr, "/sse", None).await;
    let mut items = Vec::new();
    while let Some(item) = c.next().await {
        items.push(item);
    }
    let ev = |event: &str, data: &str, id: &str| Item::Event {
        event: event.into(),
        data: data.into(),
        id: id.into(),
    };
    assert_eq!(
        items,
        [
            Item::Comment("hello".into()),
            Item::IdOnly("1".into()),
            ev("pub", "a\nb", "1"),
            // `data` without a colon adds an empty line; `id` without a value clears the id.
            ev("message", "", ""),
            Item::Comment("".into()),
            ev("e", "c", "2"),
        ]
    );
    assert_eq!(c.retry, Some(1500), "a bad retry value is ignored");
    assert_eq!(c.last_event_id, "2");
    server.await.unwrap();
}

#[tokio::test]
async fn several_channels_in_order_with_positions_in_every_id() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    // Publications before the stream opens are not sent (no Last-Event-ID).
    let (_, epoch_a) = publish_at(&mut api, "hist:a", json!("before")).await;
    let mut c =
        SseClient::open(server.addr, "/sse?channel=hist:a&channel=plain&channel=hist:z", None)
            .await;
    assert_eq!(c.header("cache-control"), Some("no-cache"));
    let start = read_start(&mut c).await;
    assert_eq!(start.reset, None);
    assert!(start.recovered.is_empty());
    let chans = ["hist:a", "plain", "hist:z"];
    let ea = tag_of(&start.id, &chans, "hist:a");
    let mut ez = tag_of(&start.id, &chans, "hist:z");
    assert_eq!(ea, tag("hist:a", &epoch_a), "the tag stands for the channel's epoch");
    assert_eq!(
        start.id,
        id_of(&[("hist:a", Some((&ea, 1))), ("plain", None), ("hist:z", Some((&ez, 0)))])
    );

    // Interleaved publications: one stream, in publication order, each id carrying the
    // position on every channel.
    let mut expected = Vec::new();
    let (mut a, mut z) = (1, 0);
    for i in 0..12u64 {
        let (channel, offset) = match i % 3 {
            0 => ("hist:a", Some(a + 1)),
            1 => ("plain", None),
            _ => ("hist:z", Some(z + 1)),
        };
        let r = api.publish(channel, &json!({"i": i})).await.expect("publish");
        assert_eq!(r.get("offset").and_then(Value::as_u64), offset);
        if channel == "hist:z" {
            // The first publication creates the stream: its epoch follows the read's void one.
            ez = tag("hist:z", r["epoch"].as_str().expect("epoch"));
        }
        match i % 3 {
            0 => a += 1,
            2 => z += 1,
            _ => {}
        }
        let id = id_of(&[("hist:a", Some((&ea, a))), ("plain", None), ("hist:z", Some((&ez, z)))]);
        expected.push(Pub { channel: channel.into(), offset, data: json!({"i": i}), id });
    }
    for want in &expected {
        assert_eq!(&next_pub(&mut c).await, want);
    }
    assert_eq!(c.last_event_id, expected.last().unwrap().id);
    // Data with newlines, quotes and unicode stays one `data:` line and round-trips.
    let odd = json!({"s": "line1\nline2\r\n\"q\" \u{e9}\u{1F600}", "n": [1, 2]});
    publish(&mut api, "plain", odd.clone()).await;
    assert_eq!(next_pub(&mut c).await.data, odd);
}

/// Subscribes to two history channels and one without history, reads some publications, has
/// the server drop the stream, publishes `n` more on each channel and resumes.
async fn resume_case(via_header: bool, kept_alive: bool) {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let path = "/sse?channel=hist:a&channel=hist:b&channel=plain";
    let open = |id: Option<String>| {
        let addr = server.addr;
        async move {
            let path = match (&id, via_header) {
                (Some(id), false) => format!("{path}&last_event_id={}", encode_query(id)),
                _ => path.to_string(),
            };
            let header = if via_header { id.as_deref() } else { None };
            if kept_alive {
                SseClient::open_kept_alive(addr, &path, header).await
            } else {
                SseClient::open(addr, &path, header).await
            }
        }
    };
    let mut c = open(None).await;
    if kept_alive {
        assert_eq!(c.header("transfer-encoding"), Some("chunked"), "served through hyper");
    }
    read_start(&mut c).await;
    let chans = ["hist:a", "hist:b", "plain"];
    // Before the first publications the ids name void epochs; their tags change below.
    for i in 1..=3 {
        for ch in ["hist:a", "hist:b", "plain"] {
            publish(&mut api, ch, json!({"ch": ch, "i": i})).await;
            let p = next_pub(&mut c).await;
            assert_eq!((p.channel.as_str(), p.data["i"].as_u64()), (ch, Some(i)));
        }
    }
    let last = c.last_event_id.clone();
    // The streams were created by the first publications (the open read created nothing).
    let (ea, eb) = (tag_of(&last, &chans, "hist:a"), tag_of(&last, &chans, "hist:b"));
    assert_eq!(
        last,
        id_of(&[("hist:a", Some((&ea, 3))), ("hist:b", Some((&eb, 3))), ("plain", None)])
    );
    drop_all_streams(&server).await;
    expect_disconnect(&mut c).await;
    assert_eq!(c.last_event_id, last, "the disconnect event carries no id");

    // Missed while disconnected: 4 on each channel.
    for i in 4..=7 {
        for ch in ["hist:a", "hist:b", "plain"] {
            publish(&mut api, ch, json!({"ch": ch, "i": i})).await;
        }
    }
    let mut c = open(Some(last)).await;
    let start = read_start(&mut c).await;
    // "plain" is mentioned but keeps no history: it cannot be recovered.
    assert_eq!(start.reset, Some(vec!["plain".to_string()]));
    let a: Vec<u64> =
        pubs_on(&start.recovered, "hist:a").iter().map(|p| p.offset.unwrap()).collect();
    let b: Vec<u64> =
        pubs_on(&start.recovered, "hist:b").iter().map(|p| p.offset.unwrap()).collect();
    assert_eq!(a, [4, 5, 6, 7], "missed on hist:a, in order, once");
    assert_eq!(b, [4, 5, 6, 7], "missed on hist:b, in order, once");
    assert_eq!(start.recovered.len(), 8, "nothing else: {:?}", start.recovered);
    for p in &start.recovered {
        assert_eq!(p.data, json!({"ch": p.channel, "i": p.offset.unwrap()}));
        // Each id holds the channel's new position and the other's current one.
        let ids = parse_id(&p.id, &chans);
        assert_eq!(ids.len(), 3);
        for (ch, pos) in ids {
            let (e, o) = match ch.as_str() {
                "plain" => {
                    assert_eq!(pos, None);
                    continue;
                }
                "hist:a" => (&ea, if p.channel == "hist:a" { p.offset.unwrap() } else { 7 }),
                _ => (&eb, if p.channel == "hist:b" { p.offset.unwrap() } else { 3 }),
            };
            assert_eq!(pos, Some((e.clone(), o)), "id {:?} of {p:?}", p.id);
        }
    }
    assert_eq!(
        start.id,
        id_of(&[("hist:a", Some((&ea, 7))), ("hist:b", Some((&eb, 7))), ("plain", None)])
    );
    // Then live, on every channel.
    for i in 8..=9 {
        for ch in ["plain", "hist:b", "hist:a"] {
            publish(&mut api, ch, json!({"ch": ch, "i": i})).await;
            let p = next_pub(&mut c).await;
            assert_eq!(p.channel, ch);
            assert_eq!(p.data["i"], json!(i));
            if ch != "plain" {
                assert_eq!(p.offset, Some(i));
            }
        }
    }
    assert_eq!(
        c.last_event_id,
        id_of(&[("hist:a", Some((&ea, 9))), ("hist:b", Some((&eb, 9))), ("plain", None)])
    );
}

/// Percent-encodes a query value.
fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn resume_with_last_event_id_header() {
    resume_case(true, false).await;
}

#[tokio::test]
async fn resume_with_last_event_id_query() {
    resume_case(false, false).await;
}

#[tokio::test]
async fn resume_on_a_kept_alive_connection_served_through_hyper() {
    resume_case(true, true).await;
    resume_case(false, true).await;
}

#[tokio::test]
async fn header_wins_over_query() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    for i in 1..=5 {
        publish(&mut api, "hist:h", json!(i)).await;
    }
    let mut c = SseClient::open(server.addr, "/sse?channel=hist:h", None).await;
    let e = tag_of(&read_start(&mut c).await.id, &["hist:h"], "hist:h");
    drop(c);
    let query = encode_query(&id_of(&[("hist:h", Some((&e, 1)))]));
    let header = id_of(&[("hist:h", Some((&e, 3)))]);
    let mut c = SseClient::open(
        server.addr,
        &format!("/sse?channel=hist:h&last_event_id={query}"),
        Some(&header),
    )
    .await;
    let start = read_start(&mut c).await;
    let offsets: Vec<_> = start.recovered.iter().map(|p| p.offset.unwrap()).collect();
    assert_eq!(offsets, [4, 5]);
}

/// A resume whose missed publications are far larger than the stream's queue: every one is
/// delivered, in order, page by page as the stream drains, with live publications of the same
/// channel after them and those of another channel flowing meanwhile; no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_larger_than_the_queue_streams_every_missed_publication() {
    let config = "[limits]\nmax_queue_bytes = 262144\n[namespaces.big]\nhistory_size = 100000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let chans = ["big:a", "big:b"];
    let path = "/sse?channel=big:a&channel=big:b";
    let mut c = SseClient::open(server.addr, path, None).await;
    read_start(&mut c).await;
    for ch in chans {
        publish(&mut api, ch, json!({"i": 1})).await;
        next_pub(&mut c).await;
    }
    let last = c.last_event_id.clone();
    drop_all_streams(&server).await;
    expect_disconnect(&mut c).await;
    // Missed: 400 x 8 KB (3.2 MB, 25 pages of 128 KiB) on big:a, 50 small ones on big:b.
    let pad = "q".repeat(8000);
    for chunk in (2..=401u64).collect::<Vec<_>>().chunks(20) {
        let batch: Vec<(String, Value)> =
            chunk.iter().map(|i| ("big:a".to_string(), json!({"i": i, "pad": pad}))).collect();
        api.batch(&batch).await.expect("batch");
    }
    for i in 2..=51 {
        publish(&mut api, "big:b", json!({"i": i})).await;
    }
    let mut c = SseClient::open(server.addr, path, Some(&last)).await;
    // Live publications while the recovery streams.
    const LIVE: u64 = 100;
    let pump = {
        let mut api = server.api().await;
        tokio::spawn(async move {
            for i in 1..=LIVE {
                let batch = vec![
                    ("big:a".to_string(), json!({"i": 401 + i})),
                    ("big:b".to_string(), json!({"i": 51 + i})),
                ];
                api.batch(&batch).await.expect("batch");
            }
        })
    };
    let mut next = BTreeMap::from([("big:a", 2u64), ("big:b", 2u64)]);
    let end = BTreeMap::from([("big:a", 401 + LIVE), ("big:b", 51 + LIVE)]);
    while next.iter().any(|(ch, n)| *n <= end[ch]) {
        let item = c.next().await.expect("stream ended");
        match &item {
            Item::Comment(_) | Item::IdOnly(_) => continue,
            Item::Event { event, .. } if event == "pub" => {}
            other => panic!("only publications are due, got {other:?}"),
        }
        let p = as_pub(&item).expect("pub");
        let n = next.get_mut(p.channel.as_str()).expect("a stream channel");
        assert_eq!(p.offset, Some(*n), "{}: every publication once, in order", p.channel);
        assert_eq!(p.data["i"], json!(*n));
        // The id always holds the channel's position as delivered.
        assert_eq!(
            parse_id(&p.id, &chans)
                .iter()
                .find(|(ch, _)| *ch == p.channel)
                .unwrap()
                .1
                .as_ref()
                .map(|x| x.1),
            Some(*n)
        );
        *n += 1;
    }
    pump.await.expect("pump");
}

/// Forty channels, each with more than a page to recover: the first pages queued at open share
/// half the queue, the rest follows page by page; the stream opens (no 503) and delivers all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_channels_with_large_resumes_open_and_deliver_everything() {
    let server = Server::start("[namespaces.big]\nhistory_size = 100000\n", &[]);
    let mut api = server.api().await;
    let names: Vec<String> = (0..40).map(|i| format!("big:c{i}")).collect();
    let mut entries = Vec::new();
    for ch in &names {
        let batch: Vec<(String, Value)> = (1..=1001).map(|i| (ch.clone(), json!(i))).collect();
        let r = api.batch(&batch).await.expect("batch");
        let epoch = r["results"][0]["epoch"].as_str().unwrap().to_string();
        entries.push(format!("{}0", tag(ch, &epoch)));
    }
    let id = format!("~{}", entries.join(";"));
    let query: Vec<String> = names.iter().map(|c| format!("channel={c}")).collect();
    let mut c = SseClient::open(server.addr, &format!("/sse?{}", query.join("&")), Some(&id)).await;
    assert_eq!(c.status, 200, "resume refused: {:?}", c.headers);
    let mut next: BTreeMap<String, u64> = names.iter().map(|n| (n.clone(), 1)).collect();
    let mut left = 40 * 1001;
    while left > 0 {
        let item = c.next().await.expect("stream ended");
        let Some(p) = as_pub(&item) else {
            assert!(!matches!(&item, Item::Event { .. }), "only publications are due: {item:?}");
            continue;
        };
        let n = next.get_mut(&p.channel).expect("a stream channel");
        assert_eq!((p.offset, p.data), (Some(*n), json!(*n)), "{}: in order, once", p.channel);
        *n += 1;
        left -= 1;
    }
}

#[tokio::test]
async fn reset_when_history_was_trimmed() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut c = SseClient::open(server.addr, "/sse?channel=small:x&channel=hist:k", None).await;
    read_start(&mut c).await;
    for i in 1..=2 {
        publish(&mut api, "small:x", json!(i)).await;
        assert_eq!(next_pub(&mut c).await.offset, Some(i));
    }
    publish(&mut api, "hist:k", json!(1)).await;
    next_pub(&mut c).await;
    let last = c.last_event_id.clone();
    drop_all_streams(&server).await;
    expect_disconnect(&mut c).await;
    // 5 more on small:x, which keeps 3 (offsets 5..=7): offsets 3 and 4 are lost.
    for i in 3..=7 {
        publish(&mut api, "small:x", json!(i)).await;
    }
    publish(&mut api, "hist:k", json!(2)).await;
    let mut c =
        SseClient::open(server.addr, "/sse?channel=small:x&channel=hist:k", Some(&last)).await;
    let start = read_start(&mut c).await;
    assert_eq!(start.reset, Some(vec!["small:x".to_string()]));
    // Nothing of small:x is replayed (not even what is retained); hist:k is recovered.
    let got: Vec<_> = start.recovered.iter().map(|p| (p.channel.as_str(), p.offset)).collect();
    assert_eq!(got, [("hist:k", Some(2))]);
    let e = tag_of(&last, &["small:x", "hist:k"], "small:x");
    let ek = tag_of(&last, &["small:x", "hist:k"], "hist:k");
    assert_eq!(start.id, id_of(&[("small:x", Some((&e, 7))), ("hist:k", Some((&ek, 2)))]));
    publish(&mut api, "small:x", json!(8)).await;
    let p = next_pub(&mut c).await;
    assert_eq!((p.offset, p.data), (Some(8), json!(8)));
}

#[tokio::test]
async fn reset_for_wrong_epoch_future_offset_and_channel_without_history() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut epochs = BTreeMap::new();
    for ch in ["hist:e", "hist:f", "hist:g", "hist:n"] {
        for i in 1..=3 {
            epochs.insert(ch, publish_at(&mut api, ch, json!(i)).await.1);
        }
    }
    let eg = epochs["hist:g"].clone();
    let channels = ["hist:e", "hist:f", "hist:g", "plain", "hist:n"];
    let path = format!("/sse?{}", channels.map(|c| format!("channel={c}")).join("&"));
    // hist:e: an epoch that never existed; hist:f: an offset from the future; hist:g: a good
    // position; plain: mentioned but without history; hist:n: not mentioned at all; plus
    // garbage entries and a channel the stream does not subscribe to, which are ignored.
    let id = format!(
        "hist:e~nosuchepoch~1;hist:f~{eg}~99;hist:g~{eg}~1;plain;other~x~1;bad name~e~1;~~;"
    );
    let mut c = SseClient::open(server.addr, &path, Some(&id)).await;
    let start = read_start(&mut c).await;
    let first_id = start.id.clone();
    let reset = start.reset.expect("a reset event");
    // hist:f's epoch is hist:g's, hence another epoch for hist:f too (or a future offset).
    assert_eq!(reset, ["hist:e", "hist:f", "plain"]);
    let got: Vec<_> = start.recovered.iter().map(|p| (p.channel.as_str(), p.offset)).collect();
    assert_eq!(got, [("hist:g", Some(2)), ("hist:g", Some(3))]);
    let ids = parse_id(&start.id, &channels);
    let chans: Vec<&str> = ids.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(chans, channels, "the id positions every channel of the stream, in order");
    for (ch, pos) in &ids {
        match ch.as_str() {
            "plain" => assert_eq!(pos, &None),
            _ => assert_eq!(pos.as_ref().map(|p| p.1), Some(3), "{ch} is at its top"),
        }
    }
    // Everything is live afterwards, hist:n included.
    for ch in channels {
        publish(&mut api, ch, json!("live")).await;
        let p = next_pub(&mut c).await;
        assert_eq!(p.channel, ch);
        assert_eq!(p.offset, (ch != "plain").then_some(4));
    }

    // An offset from the future in the right epoch is a reset too.
    let ef = tag_of(&start.id, &channels, "hist:f");
    assert_eq!(ef, tag("hist:f", &epochs["hist:f"]));
    let id = id_of(&[("hist:f", Some((&ef, 50)))]);
    let mut c = SseClient::open(server.addr, "/sse?channel=hist:f", Some(&id)).await;
    let start = read_start(&mut c).await;
    assert_eq!(start.reset, Some(vec!["hist:f".to_string()]));
    assert!(start.recovered.is_empty());
    // A resume from the top recovers nothing and resets nothing.
    let id = id_of(&[("hist:f", Some((&ef, 4)))]);
    let mut c = SseClient::open(server.addr, "/sse?channel=hist:f", Some(&id)).await;
    let start = read_start(&mut c).await;
    assert_eq!((start.reset, start.recovered.len()), (None, 0));
    assert_eq!(start.id, id);
    // A channel that the id does not mention is simply live: no reset.
    let id = id_of(&[("hist:e", Some((&tag_of(&first_id, &channels, "hist:e"), 4)))]);
    let mut c = SseClient::open(server.addr, "/sse?channel=hist:e&channel=hist:n", Some(&id)).await;
    let start = read_start(&mut c).await;
    assert_eq!((start.reset, start.recovered.len()), (None, 0));
}

#[tokio::test]
async fn reset_after_history_ttl_expired() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut c = SseClient::open(server.addr, "/sse?channel=ttl:x&channel=hist:t", None).await;
    read_start(&mut c).await;
    for i in 1..=2 {
        publish(&mut api, "ttl:x", json!(i)).await;
        publish(&mut api, "hist:t", json!(i)).await;
        next_pub(&mut c).await;
        next_pub(&mut c).await;
    }
    let last = c.last_event_id.clone();
    drop(c);
    // Idle for longer than the 1 s TTL: the stream state (history, epoch) is dropped.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut c =
        SseClient::open(server.addr, "/sse?channel=ttl:x&channel=hist:t", Some(&last)).await;
    let start = read_start(&mut c).await;
    assert_eq!(start.reset, Some(vec!["ttl:x".to_string()]));
    assert!(start.recovered.is_empty());
    let chans = ["ttl:x", "hist:t"];
    let old = tag_of(&last, &chans, "ttl:x");
    let new = tag_of(&start.id, &chans, "ttl:x");
    assert_ne!(old, new, "a new epoch");
    assert_eq!(
        start.id,
        id_of(&[
            ("ttl:x", Some((&new, 0))),
            ("hist:t", Some((&tag_of(&last, &chans, "hist:t"), 2)))
        ])
    );
    publish(&mut api, "ttl:x", json!(1)).await;
    let p = next_pub(&mut c).await;
    assert_eq!(p.offset, Some(1));
    // The read created no stream (its tag named a void epoch); the publication created one.
    assert_ne!(tag_of(&p.id, &chans, "ttl:x"), old);
}

#[tokio::test]
async fn pings_arrive_as_comments() {
    let server = Server::start(&format!("ping_interval_secs = 1\n{CONFIG}"), &[]);
    for kept_alive in [false, true] {
        let path = "/sse?channel=hist:p";
        let mut c = if kept_alive {
            SseClient::open_kept_alive(server.addr, path, None).await
        } else {
            SseClient::open(server.addr, path, None).await
        };
        let start = read_start(&mut c).await;
        let began = Instant::now();
        let mut pings = 0;
        while pings < 2 {
            match c.next_within(Duration::from_secs(4)).await {
                Next::Item(Item::Comment(t)) => {
                    assert_eq!(t, "ping");
                    pings += 1;
                }
                other => panic!("expected a ping (kept alive: {kept_alive}), got {other:?}"),
            }
        }
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(1500), "2 pings 1 s apart took {took:?}");
        assert!(took < Duration::from_secs(4), "2 pings 1 s apart took {took:?}");
        assert_eq!(c.last_event_id, start.id, "comments change no id");
    }
}

#[tokio::test]
async fn refused_streams_answer_json_errors_with_cors() {
    let server = Server::start(
        &format!("{CONFIG}\n[namespaces.closed]\nanonymous_subscribe = false\n"),
        &[],
    );
    let cases: &[(&str, u16)] = &[
        ("/sse?channel=bad%20name", 400),
        ("/sse?channel=hist:a&channel=a%0Ab", 400),
        ("/sse?channel=nope:x", 404),
        ("/sse", 400),
        ("/sse?token=abc", 401),
        ("/sse?channel=", 400),
        ("/sse?channel=hist:a&token=abc", 401),
        ("/sse?channel=closed:x", 401),
        ("/sse?channel=hist:a%23alice", 403),
    ];
    for kept_alive in [false, true] {
        for &(path, code) in cases {
            let stream = TcpStream::connect(server.addr).await.unwrap();
            let mut c = SseClient::new(stream);
            if kept_alive {
                c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
                c.read_head().await;
                let len: usize = c.header("content-length").unwrap().parse().unwrap();
                c.read_exact_body(len).await;
            }
            c.send(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nOrigin: http://example.com\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            c.read_head().await;
            let what = format!("{path} (kept alive: {kept_alive})");
            assert_eq!(c.status, code, "{what}");
            assert_eq!(c.header("access-control-allow-origin"), Some("*"), "{what}");
            assert!(
                c.header("content-type").unwrap_or("").starts_with("application/json"),
                "{what}"
            );
            let body = c.error_body().await;
            assert_eq!(body["error"]["code"], json!(code), "{what}: {body}");
            assert!(body["error"]["message"].is_string(), "{what}: {body}");
        }
    }
    // The CORS preflight.
    let mut api = server.api().await;
    let (status, headers, _) = api.request("OPTIONS", "/sse", None).await.expect("preflight");
    assert!(status == 204 || status == 200, "{status}");
    let h = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
    };
    assert_eq!(h("access-control-allow-origin"), "*");
    assert!(h("access-control-allow-methods").contains("get"));
    assert!(h("access-control-allow-headers").contains("last-event-id"));
    // The server is still fine.
    let mut c = SseClient::open(server.addr, "/sse?channel=hist:ok", None).await;
    read_start(&mut c).await;
}

/// A channel's subscriber count in `/api/channels` (0 when absent).
async fn subscribers(api: &mut herald_client::HttpApi, channel: &str) -> u64 {
    let (status, _, body) = api.request("GET", "/api/channels", None).await.expect("channels");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == json!(channel))
        .map_or(0, |c| c["subscribers"].as_u64().unwrap())
}

async fn connections_metric(api: &mut herald_client::HttpApi) -> i64 {
    let (status, _, body) = api.request("GET", "/metrics", None).await.expect("metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("herald_connections ") || l.starts_with("herald_connections{"))
        .unwrap_or_else(|| panic!("no herald_connections in\n{text}"));
    line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as i64
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn channels_and_metrics_count_sse_streams() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    assert_eq!(connections_metric(&mut api).await, 0);
    let mut one = SseClient::open(server.addr, "/sse?channel=hist:c&channel=plain2", None).await;
    let mut two = SseClient::open_kept_alive(server.addr, "/sse?channel=hist:c", None).await;
    read_start(&mut one).await;
    read_start(&mut two).await;
    assert_eq!(subscribers(&mut api, "hist:c").await, 2);
    assert_eq!(subscribers(&mut api, "plain2").await, 1);
    assert_eq!(connections_metric(&mut api).await, 2);
    let (_, _, body) = api.request("GET", "/api/info", None).await.unwrap();
    let info: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["nodes"][0]["connections"], json!(2), "{info}");
    assert_eq!(info["nodes"][0]["subscriptions"], json!(3), "{info}");

    drop(one);
    let s = &server;
    eventually("hist:c down to 1 subscriber", || async move {
        let mut api = s.api().await;
        subscribers(&mut api, "hist:c").await == 1 && subscribers(&mut api, "plain2").await == 0
    })
    .await;
    assert_eq!(connections_metric(&mut api).await, 1);
    drop(two);
    eventually("no SSE stream left", || async move {
        let mut api = s.api().await;
        subscribers(&mut api, "hist:c").await == 0 && connections_metric(&mut api).await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The race: publications pumped while clients connect, drop and resume at random moments.

/// xorshift64*: deterministic from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const RACE_CHANNELS: [&str; 2] = ["race:a", "race:b"];
const RACE_PER_CHANNEL: u64 = 1000;

/// Follows one client's view of both channels across its connections, checking every item.
struct Tracker {
    /// The client's position per channel, from the ids it received: `(epoch, offset)`.
    cursor: BTreeMap<String, (String, u64)>,
    /// The first position per channel (where the client started).
    first: BTreeMap<String, u64>,
    received: BTreeMap<String, Vec<u64>>,
    /// Items the server sent after its `disconnect` event.
    after_disconnect: usize,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            cursor: BTreeMap::new(),
            first: BTreeMap::new(),
            received: BTreeMap::new(),
            after_disconnect: 0,
        }
    }

    fn done(&self) -> bool {
        RACE_CHANNELS.iter().all(|c| self.cursor.get(*c).is_some_and(|p| p.1 == RACE_PER_CHANNEL))
    }

    /// Checks an id against the cursor; `moved` is the channel and offset of the publication
    /// the id comes with.
    fn check_id(&mut self, who: &str, id: &str, moved: Option<(&str, u64)>) {
        let ids = parse_id(id, &RACE_CHANNELS);
        let chans: Vec<&str> = ids.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(chans, RACE_CHANNELS, "{who}: id {id:?}");
        for (ch, pos) in ids {
            let (epoch, offset) = pos.unwrap_or_else(|| panic!("{who}: {ch} without position"));
            let moved_here = moved.filter(|(c, _)| *c == ch).map(|(_, o)| o);
            match self.cursor.get(&ch) {
                None => {
                    // The first id of the client: where it starts.
                    let start = moved_here.map_or(offset, |o| o - 1);
                    self.first.insert(ch.clone(), start);
                }
                Some((e, o)) => {
                    assert_eq!(*e, epoch, "{who}: epoch of {ch} changed");
                    let want = moved_here.map_or(*o, |_| o + 1);
                    assert_eq!(offset, want, "{who}: {ch} in id {id:?} (cursor {o}, {moved:?})");
                }
            }
            if let Some(o) = moved_here {
                assert_eq!(offset, o, "{who}: the id positions {ch} at the publication's offset");
            }
            self.cursor.insert(ch, (epoch, offset));
        }
    }

    /// One item of a stream; false when the stream ended (disconnect event).
    fn item(&mut self, who: &str, item: &Item) -> bool {
        match item {
            Item::IdOnly(id) => self.check_id(who, id, None),
            Item::Comment(_) => {}
            Item::Event { event, .. } if event == "disconnect" => return false,
            Item::Event { event, data, .. } if event == "reset" => {
                panic!("{who}: unexpected reset {data}")
            }
            other => {
                let p = as_pub(other).unwrap_or_else(|| panic!("{who}: unexpected {other:?}"));
                let offset = p.offset.expect("offset");
                assert_eq!(p.data, json!({"n": offset}), "{who}: data of {} {offset}", p.channel);
                self.check_id(who, &p.id, Some((&p.channel, offset)));
                self.received.entry(p.channel.clone()).or_default().push(offset);
            }
        }
        true
    }
}

/// Publications made so far by the race's publishers (both channels).
type Progress = std::sync::Arc<std::sync::atomic::AtomicU64>;

async fn wait_progress(progress: &Progress, at_least: u64) {
    while progress.load(std::sync::atomic::Ordering::Relaxed) < at_least {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn race_client(
    addr: SocketAddr,
    who: String,
    seed: u64,
    progress: Progress,
) -> (Tracker, usize) {
    let mut rng = Rng(seed);
    let mut t = Tracker::new();
    // Connects first at a random moment while the publishers run.
    wait_progress(&progress, rng.below(2 * RACE_PER_CHANNEL * 9 / 10)).await;
    let mut last: Option<String> = None;
    let mut connections = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !t.done() {
        assert!(Instant::now() < deadline, "{who}: not done in time");
        connections += 1;
        let base = "/sse?channel=race:a&channel=race:b";
        let (path, header) = match (&last, rng.below(2)) {
            (Some(id), 0) => (format!("{base}&last_event_id={}", encode_query(id)), None),
            (id, _) => (base.to_string(), id.clone()),
        };
        let mut c = if rng.below(4) == 0 {
            SseClient::open_kept_alive(addr, &path, header.as_deref()).await
        } else {
            SseClient::open(addr, &path, header.as_deref()).await
        };
        assert_eq!(c.status, 200, "{who}");
        // Read a random number of items, then drop the connection (or the server does).
        let budget = 20 + rng.below(400);
        let mut n = 0;
        while n < budget && !t.done() {
            match c.next_within(Duration::from_secs(20)).await {
                Next::Item(item) => {
                    if !t.item(&who, &item) {
                        // The server's disconnect: the stream ends next. Whatever still comes
                        // (see `nothing_follows_the_disconnect_event_under_load`) is processed
                        // as a browser would, and must be consistent all the same.
                        while let Some(item) = c.next().await {
                            assert!(t.item(&who, &item), "{who}: a second disconnect event");
                            t.after_disconnect += 1;
                        }
                        break;
                    }
                    n += 1;
                }
                Next::Eof => panic!("{who}: stream ended without a disconnect event"),
                Next::Timeout => panic!("{who}: nothing for 20 s at {:?}", t.cursor),
            }
        }
        if !c.last_event_id.is_empty() {
            last = Some(c.last_event_id.clone());
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(rng.below(50))).await;
    }
    (t, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_publishers_against_resuming_clients() {
    let server = Server::start(CONFIG, &[]);
    let seed =
        std::env::var("HERALD_RACE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
                | 1
        });
    eprintln!("race seed {seed} (set HERALD_RACE_SEED to repeat)");
    let began = Instant::now();
    let progress = Progress::default();
    let publishers: Vec<_> = RACE_CHANNELS
        .iter()
        .map(|&ch| {
            let addr = server.http_base();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut api = herald_client::HttpApi::connect(&addr, None).await.unwrap();
                for n in 1..=RACE_PER_CHANNEL {
                    let r = api.publish(ch, &json!({"n": n})).await.expect("publish");
                    assert_eq!(r["offset"], json!(n));
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Small pauses spread the publications over about a second.
                    if n % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    let mut rng = Rng(seed);
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let who = format!("client {i}");
            tokio::spawn(race_client(server.addr, who, rng.next() | 1, progress.clone()))
        })
        .collect();
    // Once, in the middle, the server drops every stream.
    wait_progress(&progress, RACE_PER_CHANNEL + rng.below(RACE_PER_CHANNEL / 2)).await;
    drop_all_streams(&server).await;
    for p in publishers {
        p.await.expect("publisher");
    }
    let published_in = began.elapsed();
    for (i, c) in clients.into_iter().enumerate() {
        let (t, connections) = c.await.expect("client");
        for ch in RACE_CHANNELS {
            let first = t.first[ch];
            let got = t.received.get(ch).cloned().unwrap_or_default();
            let want: Vec<u64> = (first + 1..=RACE_PER_CHANNEL).collect();
            assert!(got == want, "client {i} on {ch}: from {first}, got {} items", got.len());
        }
        eprintln!(
            "client {i}: {connections} connections, from a {} / b {}, {} items after a \
             disconnect event",
            t.first["race:a"], t.first["race:b"], t.after_disconnect
        );
    }
    eprintln!(
        "published 2 x {RACE_PER_CHANNEL} in {published_in:?}, all checked in {:?}",
        began.elapsed()
    );
}

/// The server's `disconnect` event is the last thing on a stream, even while publications
/// keep coming (PROTOCOL.md: the stream gets `event: disconnect`, then the connection closes).
///
/// (This once failed: the outbox stayed open after the disconnect event was queued; closing
/// now refuses every later push, see `Outbox::finish`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_follows_the_disconnect_event_under_load() {
    let server = Server::start(CONFIG, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (base, stop) = (server.http_base(), stop.clone());
            tokio::spawn(async move {
                let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    api.publish("hist:d", &json!("x")).await.expect("publish");
                }
            })
        })
        .collect();
    let mut bad = Vec::new();
    for round in 0..300 {
        let kept_alive = round % 2 == 1;
        let path = "/sse?channel=hist:d";
        let mut c = if kept_alive {
            SseClient::open_kept_alive(server.addr, path, None).await
        } else {
            SseClient::open(server.addr, path, None).await
        };
        // Let some live publications flow, then end every stream.
        for _ in 0..5 {
            c.next().await.expect("live");
        }
        drop_all_streams(&server).await;
        loop {
            match c.next().await {
                Some(Item::Event { event, .. }) if event == "disconnect" => break,
                Some(_) => {}
                None => panic!("round {round}: the stream ended without a disconnect event"),
            }
        }
        let mut after = Vec::new();
        while let Some(item) = c.next().await {
            after.push(item);
        }
        if !after.is_empty() {
            bad.push(format!(
                "round {round} (kept alive: {kept_alive}): {} items after disconnect, first {:?}",
                after.len(),
                after[0]
            ));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(bad.is_empty(), "events after `event: disconnect`:\n{}", bad.join("\n"));
}

/// Compact ids resume like named ones: a tag of another epoch, an offset from the future and
/// an empty entry (no history) are reset, a good entry is recovered exactly, a channel beyond
/// the id's entries is live; and an id replayed with the channels in another order never
/// recovers one channel's offsets on another (their tags do not match: reset instead).
#[tokio::test]
async fn compact_ids_resume_by_place_and_never_mix_channels() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut epochs = BTreeMap::new();
    for ch in ["hist:ce", "hist:cf", "hist:cg", "hist:cn"] {
        for i in 1..=3 {
            epochs.insert(ch, publish_at(&mut api, ch, json!(i)).await.1);
        }
    }
    let channels = ["hist:ce", "hist:cf", "hist:cg", "plain", "hist:cn"];
    let path = format!("/sse?{}", channels.map(|c| format!("channel={c}")).join("&"));
    let (tf, tg) = (tag("hist:cf", &epochs["hist:cf"]), tag("hist:cg", &epochs["hist:cg"]));
    // hist:ce: hist:cg's tag (another channel's epoch); hist:cf: a future offset; hist:cg: a
    // good position; plain: no history; hist:cn: no entry.
    let id = id_of(&[
        ("hist:ce", Some((&tg, 1))),
        ("hist:cf", Some((&tf, 99))),
        ("hist:cg", Some((&tg, 1))),
        ("plain", None),
    ]);
    let mut c = SseClient::open(server.addr, &path, Some(&id)).await;
    let start = read_start(&mut c).await;
    assert_eq!(start.reset.expect("a reset event"), ["hist:ce", "hist:cf", "plain"]);
    let got: Vec<_> = start.recovered.iter().map(|p| (p.channel.as_str(), p.offset)).collect();
    assert_eq!(got, [("hist:cg", Some(2)), ("hist:cg", Some(3))]);
    for (ch, pos) in parse_id(&start.id, &channels) {
        match ch.as_str() {
            "plain" => assert_eq!(pos, None),
            _ => assert_eq!(pos, Some((tag(&ch, &epochs[ch.as_str()]), 3)), "{ch}"),
        }
    }
    for ch in channels {
        publish(&mut api, ch, json!("live")).await;
        assert_eq!(next_pub(&mut c).await.channel, ch);
    }
    let last = c.last_event_id.clone();
    drop(c);

    // Missed: two on each channel. The same URL recovers them all, exactly.
    for ch in channels {
        publish(&mut api, ch, json!("missed 1")).await;
        publish(&mut api, ch, json!("missed 2")).await;
    }
    let mut c = SseClient::open(server.addr, &path, Some(&last)).await;
    let start = read_start(&mut c).await;
    assert_eq!(start.reset, Some(vec!["plain".to_string()]));
    let got: Vec<_> = start.recovered.iter().map(|p| (p.channel.as_str(), p.offset)).collect();
    let want: Vec<_> = channels
        .iter()
        .filter(|c| **c != "plain")
        .flat_map(|c| [(*c, Some(5)), (*c, Some(6))])
        .collect();
    assert_eq!(got, want);
    drop(c);

    // The same id with the channels in another order: the tags name other channels, so
    // nothing is recovered on a wrong channel; every mentioned channel is reset.
    let swapped = ["hist:cg", "hist:ce", "hist:cf", "hist:cn", "plain"];
    let path = format!("/sse?{}", swapped.map(|c| format!("channel={c}")).join("&"));
    let mut c = SseClient::open(server.addr, &path, Some(&last)).await;
    let start = read_start(&mut c).await;
    assert!(start.recovered.is_empty(), "{:?}", start.recovered);
    assert_eq!(start.reset.expect("a reset event"), swapped);
}

/// On conflated channels too, `event: disconnect` is the last thing on a stream: a slot
/// holding the newest publication of a conflated channel is never written after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_follows_the_disconnect_event_on_conflated_channels() {
    let server = Server::start(
        &format!("{CONFIG}\n[namespaces.conf]\nhistory_size = 10\nconflate = true\n"),
        &[],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishers: Vec<_> = (0..4)
        .map(|i| {
            let (base, stop) = (server.http_base(), stop.clone());
            tokio::spawn(async move {
                let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
                let channel = format!("conf:{}", i % 2);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    api.publish(&channel, &json!("x")).await.expect("publish");
                }
            })
        })
        .collect();
    let mut bad = Vec::new();
    for round in 0..100 {
        let kept_alive = round % 2 == 1;
        let path = "/sse?channel=conf:0&channel=conf:1";
        let mut c = if kept_alive {
            SseClient::open_kept_alive(server.addr, path, None).await
        } else {
            SseClient::open(server.addr, path, None).await
        };
        for _ in 0..3 {
            c.next().await.expect("live");
        }
        drop_all_streams(&server).await;
        loop {
            match c.next().await {
                Some(Item::Event { event, .. }) if event == "disconnect" => break,
                Some(_) => {}
                None => panic!("round {round}: the stream ended without a disconnect event"),
            }
        }
        let mut after = Vec::new();
        while let Some(item) = c.next().await {
            after.push(item);
        }
        if !after.is_empty() {
            bad.push(format!(
                "round {round} (kept alive: {kept_alive}): {} items after disconnect, first {:?}",
                after.len(),
                after[0]
            ));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(bad.is_empty(), "events after `event: disconnect`:\n{}", bad.join("\n"));
}
