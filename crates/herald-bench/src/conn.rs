//! A lean WebSocket client for measuring: the upgrade written by hand, a frame reader that
//! parses server frames in place (no copy, no allocation per message), and the few scans the
//! bench needs on each `herald.json` line (no JSON parse of publications). The same for
//! Server-Sent Events: `GET /sse` written by hand and an event-stream reader ([`SseReader`])
//! that handles lines in place.
//!
//! `herald-client`'s [`herald_client::Client`] decodes every publication into a
//! `serde_json::Value` and hands it through a channel to another task: correct and convenient,
//! but at a few hundred thousand messages per second per core that costs more than the server
//! being measured. Subscribers here count and time publications in the task that reads them.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context as _};
use herald_protocol::ws::{encode_frame, Opcode, Role};
use memchr::memmem;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// Largest frame accepted from the server.
const MAX_FRAME: usize = 64 << 20;

/// A parsed `ws://host:port/path?query`.
#[derive(Debug, Clone)]
pub(crate) struct WsUrl {
    /// Where to connect.
    pub(crate) addr: SocketAddr,
    /// `Host` header value.
    pub(crate) authority: String,
    /// Path and query.
    pub(crate) target: String,
}

impl WsUrl {
    pub(crate) fn parse(url: &str) -> anyhow::Result<WsUrl> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("{url}: only ws:// (or http://) URLs are supported"))?;
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .ok_or_else(|| anyhow!("{with_port}: no address"))?;
        Ok(WsUrl { addr, authority: authority.to_owned(), target: target.to_owned() })
    }
}

/// Opens a TCP connection from `local` (port chosen by the system), with a receive buffer of
/// `recv_buffer` bytes when given (set before connecting, so the window offered is small from
/// the start).
async fn connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Close with a reset: the bench's sockets leave no TIME_WAIT behind, which would otherwise
    // exhaust the ports of a bound source address over successive runs (and slow connecting
    // down to a few hundred per second long before).
    #[allow(deprecated)] // a zero linger never blocks: it resets at once
    socket.set_linger(Some(std::time::Duration::ZERO))?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(ip) = local {
        // Ports of earlier runs' connections linger in TIME_WAIT; without this, binding a
        // source address runs out of ports that `connect` alone would reuse.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding {ip}"))?;
    }
    let stream = socket.connect(addr).await.with_context(|| format!("connecting {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads an HTTP response head: (head bytes, length of the head including its blank line).
async fn read_head(stream: &mut TcpStream, what: &str) -> anyhow::Result<(Vec<u8>, usize)> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("server closed during the {what}");
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(i) = memmem::find(&head, b"\r\n\r\n") {
            return Ok((head, i + 4));
        }
        if head.len() > 16 * 1024 {
            bail!("{what} response head too long");
        }
    }
}

/// Opens a TCP connection from `local` (port chosen by the system) and performs the upgrade,
/// offering `herald.json`. Returns the stream and any bytes read past the response head.
pub(crate) async fn open(
    url: &WsUrl,
    local: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    open_as(url, local, recv_buffer, "herald.json").await
}

/// [`open`], offering `subprotocol`; the server must choose it.
pub(crate) async fn open_as(
    url: &WsUrl,
    local: Option<IpAddr>,
    recv_buffer: Option<u32>,
    subprotocol: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = connect(url.addr, local, recv_buffer).await?;
    let key = herald_protocol::ws::client_key();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n",
        url.target, url.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let (head, end) = read_head(&mut stream, "upgrade").await?;
    let status_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if !status_line.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(status_line).trim());
    }
    let chosen = format!("sec-websocket-protocol: {subprotocol}\r\n");
    let lower = String::from_utf8_lossy(&head[..end]).to_lowercase();
    if subprotocol != "herald.json" && !lower.contains(&chosen) {
        bail!("the server did not choose subprotocol {subprotocol}");
    }
    let early = head[end..].to_vec();
    Ok((stream, early))
}

/// Opens a TCP connection from `local` and asks for the event stream of `channels`:
/// `GET /sse?channel=A&channel=B` on `url`'s host and port. Returns the stream and any bytes
/// read past the response head; a refusal (a status other than 200, with a JSON error body) is
/// an error carrying the status and the body.
pub(crate) async fn open_sse(
    url: &WsUrl,
    local: Option<IpAddr>,
    recv_buffer: Option<u32>,
    channels: impl IntoIterator<Item = String>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = connect(url.addr, local, recv_buffer).await?;
    let mut target = String::from("/sse");
    for (i, channel) in channels.into_iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        target.push_str("channel=");
        percent_encode(&channel, &mut target);
    }
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
        url.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let (mut head, end) = read_head(&mut stream, "stream request").await?;
    let status_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if !status_line.starts_with(b"HTTP/1.1 200") {
        let status = String::from_utf8_lossy(status_line).trim().to_owned();
        // The JSON error: what came with the head, and the rest until the server closes
        // (it answers `connection: close`), briefly.
        let mut chunk = [0u8; 1024];
        while head.len() < end + 4096 {
            match tokio::time::timeout(std::time::Duration::from_secs(1), stream.read(&mut chunk))
                .await
            {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let body = String::from_utf8_lossy(&head[end..]);
        bail!("stream refused: {status} {}", body.trim());
    }
    let early = head[end..].to_vec();
    Ok((stream, early))
}

/// Appends `text` percent-encoded for a query value (everything but unreserved characters).
fn percent_encode(text: &str, out: &mut String) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// One masked client text frame.
pub(crate) fn text_frame(payload: &[u8]) -> bytes::Bytes {
    encode_frame(Role::Client, Opcode::Text, payload)
}

/// One masked client binary frame.
pub(crate) fn binary_frame(payload: &[u8]) -> bytes::Bytes {
    encode_frame(Role::Client, Opcode::Binary, payload)
}

/// The `herald.proto` `pong` command (`Command { pong: {} }`, length-prefixed).
pub(crate) const PROTO_PONG: &[u8] = &[0x02, 0x42, 0x00];

/// Incremental reader of server frames: complete frames are handed out as slices of the input;
/// only an incomplete trailing frame (and a fragmented message) is copied.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    partial: Vec<u8>,
    /// A fragmented message being reassembled: its opcode and bytes so far.
    fragmented: Option<(u8, Vec<u8>)>,
}

/// A frame header: (header length, payload length, opcode, fin, mask).
type Header = (usize, usize, u8, bool, Option<[u8; 4]>);

fn parse_header(data: &[u8]) -> anyhow::Result<Option<Header>> {
    let (b0, b1) = match data {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    let (mut hlen, len) = match b1 & 0x7f {
        126 => {
            if data.len() < 4 {
                return Ok(None);
            }
            (4, u16::from_be_bytes([data[2], data[3]]) as u64)
        }
        127 => {
            if data.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[2..10]);
            (10, u64::from_be_bytes(b))
        }
        n => (2, n as u64),
    };
    if len > MAX_FRAME as u64 {
        bail!("frame of {len} bytes from the server");
    }
    let mask = if masked {
        if data.len() < hlen + 4 {
            return Ok(None);
        }
        let m = [data[hlen], data[hlen + 1], data[hlen + 2], data[hlen + 3]];
        hlen += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some((hlen, len as usize, opcode, fin, mask)))
}

impl FrameReader {
    /// Feeds bytes read from the socket; calls `on_message(opcode, payload)` for every complete
    /// message (fragments reassembled).
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        on_message: &mut impl FnMut(u8, &[u8]),
    ) -> anyhow::Result<()> {
        while !self.partial.is_empty() {
            match parse_header(&self.partial)? {
                Some((hlen, plen, op, fin, mask)) => {
                    let total = hlen + plen;
                    if self.partial.len() < total {
                        let take = (total - self.partial.len()).min(input.len());
                        self.partial.extend_from_slice(&input[..take]);
                        input = &input[take..];
                        if self.partial.len() < total {
                            return Ok(());
                        }
                    }
                    let mut frame = std::mem::take(&mut self.partial);
                    if frame.len() > total {
                        self.partial.extend_from_slice(&frame[total..]);
                    }
                    let payload = &mut frame[hlen..total];
                    if let Some(m) = mask {
                        herald_protocol::ws::apply_mask(payload, m);
                    }
                    Self::frame(&mut self.fragmented, op, fin, payload, on_message)?;
                }
                None => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let take = input.len().min(14);
                    self.partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
            }
        }
        while !input.is_empty() {
            match parse_header(input)? {
                Some((hlen, plen, op, fin, None)) if input.len() >= hlen + plen => {
                    Self::frame(
                        &mut self.fragmented,
                        op,
                        fin,
                        &input[hlen..hlen + plen],
                        on_message,
                    )?;
                    input = &input[hlen + plen..];
                }
                _ => {
                    self.partial.extend_from_slice(input);
                    // A masked complete frame (servers do not mask) goes the slow way.
                    if let Some((hlen, plen, _, _, Some(_))) = parse_header(input)? {
                        if input.len() >= hlen + plen {
                            return self.feed(&[], on_message);
                        }
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn frame(
        fragmented: &mut Option<(u8, Vec<u8>)>,
        op: u8,
        fin: bool,
        payload: &[u8],
        on_message: &mut impl FnMut(u8, &[u8]),
    ) -> anyhow::Result<()> {
        match (op, fin) {
            (0, _) => {
                let Some((_, buf)) = fragmented.as_mut() else {
                    bail!("continuation without a start")
                };
                buf.extend_from_slice(payload);
                if buf.len() > MAX_FRAME {
                    bail!("fragmented message too long");
                }
                if fin {
                    if let Some((op, buf)) = fragmented.take() {
                        on_message(op, &buf);
                    }
                }
            }
            (1 | 2, false) => *fragmented = Some((op, payload.to_vec())),
            _ => on_message(op, payload),
        }
        Ok(())
    }
}

/// One event of an event stream, as [`SseReader`] hands it out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SseEvent<'a> {
    /// The `event:` field (empty when absent: a `message`).
    pub(crate) event: &'a [u8],
    /// The `data:` lines, joined by `\n`.
    pub(crate) data: &'a [u8],
    /// Whether the event had an `id:` line.
    pub(crate) id: bool,
}

/// Incremental reader of a `text/event-stream`: complete lines are read where they lie in the
/// input; only an incomplete trailing line is copied, and the data of the event being built
/// (one short copy per event, into a buffer that is reused). An event is handed out at its
/// blank line when it had an `id`, an `event` or `data`; blocks of only comments (`: ping`) or
/// `retry:` are not. Lines end with `\n` or `\r\n` (a lone `\r`, which the format allows and
/// Herald never sends, is not recognised).
#[derive(Debug, Default)]
pub(crate) struct SseReader {
    partial: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    has_id: bool,
    /// Comment lines seen (`: ping`).
    pub(crate) comments: u64,
}

impl SseReader {
    /// Feeds bytes read from the socket; calls `on_event` for every complete event.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) -> anyhow::Result<()> {
        if !self.partial.is_empty() {
            let Some(i) = memchr::memchr(b'\n', input) else {
                self.partial.extend_from_slice(input);
                if self.partial.len() > MAX_FRAME {
                    bail!("event-stream line longer than {MAX_FRAME} bytes");
                }
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&input[..i]);
            self.line(&line, on_event);
            line.clear();
            self.partial = line;
            input = &input[i + 1..];
        }
        while let Some(i) = memchr::memchr(b'\n', input) {
            self.line(&input[..i], on_event);
            input = &input[i + 1..];
        }
        self.partial.extend_from_slice(input);
        Ok(())
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data || self.has_id || !self.event.is_empty() {
                on_event(SseEvent { event: &self.event, data: &self.data, id: self.has_id });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.has_id = false;
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => {
                self.comments += 1;
                return;
            }
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" => self.has_id = true,
            // `retry:` and unknown fields.
            _ => {}
        }
    }
}

/// Precomputed searches over `herald.json` lines.
#[derive(Debug)]
pub(crate) struct Scanner {
    t: memmem::Finder<'static>,
    s: memmem::Finder<'static>,
    c: memmem::Finder<'static>,
    w: memmem::Finder<'static>,
    code: memmem::Finder<'static>,
}

/// The fields of a bench payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) t: u64,
    pub(crate) s: u64,
    pub(crate) c: u32,
    pub(crate) w: u32,
}

/// Digits at the start of `b`, as a number, and how many bytes they took.
pub(crate) fn digits(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &d in b {
        if !d.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

impl Scanner {
    pub(crate) fn new() -> Scanner {
        Scanner {
            t: memmem::Finder::new(b"{\"t\":").into_owned(),
            s: memmem::Finder::new(b"\"s\":").into_owned(),
            c: memmem::Finder::new(b"\"c\":").into_owned(),
            w: memmem::Finder::new(b"\"w\":").into_owned(),
            code: memmem::Finder::new(b"\"code\":").into_owned(),
        }
    }

    /// The stamp of a `pub` line: fields read in the order the bench writes them, each one
    /// searched for where the order differs (a server that re-encodes data).
    pub(crate) fn stamp(&self, line: &[u8]) -> Option<Stamp> {
        let start = self.t.find(line)? + 5;
        let (t, n) = digits(&line[start..])?;
        let mut at = start + n;
        let mut field = |finder: &memmem::Finder<'static>, key: &[u8]| -> Option<u64> {
            let rest = &line[at..];
            let pos = if rest.first() == Some(&b',') && rest[1..].starts_with(key) {
                at + 1 + key.len()
            } else {
                finder.find(line)? + key.len()
            };
            let (v, n) = digits(&line[pos..])?;
            at = pos + n;
            Some(v)
        };
        let s = field(&self.s, b"\"s\":")?;
        let c = field(&self.c, b"\"c\":")?;
        let w = field(&self.w, b"\"w\":")?;
        Some(Stamp { t, s, c: c as u32, w: w as u32 })
    }

    /// The `"code":N` in a line (disconnect and error replies).
    pub(crate) fn code(&self, line: &[u8]) -> Option<u64> {
        let at = self.code.find(line)? + 7;
        digits(&line[at..]).map(|(v, _)| v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use herald_protocol::ws::encode_frame;

    #[test]
    fn reads_frames_split_anywhere() {
        let mut wire = Vec::new();
        for i in 0..50u32 {
            let text = format!("{{\"pub\":{{\"channel\":\"b\",\"data\":{{\"t\":{i},\"s\":{i},\"c\":0,\"w\":1,\"p\":\"{}\"}}}}}}", "x".repeat(i as usize * 7));
            wire.extend_from_slice(&encode_frame(Role::Server, Opcode::Text, text.as_bytes()));
        }
        let scanner = Scanner::new();
        for chunk in [1, 2, 3, 7, 100, 4096] {
            let mut reader = FrameReader::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                reader
                    .feed(piece, &mut |op, p| {
                        assert_eq!(op, 1);
                        got.push(scanner.stamp(p).unwrap().s)
                    })
                    .unwrap();
            }
            assert_eq!(got, (0..50).collect::<Vec<u64>>(), "chunk {chunk}");
        }
    }

    #[test]
    fn scans_stamps_in_any_order() {
        let s = Scanner::new();
        let line = br#"{"pub":{"channel":"bench:1","data":{"t":123,"s":4,"c":1,"w":2,"p":"xx"}}}"#;
        assert_eq!(s.stamp(line), Some(Stamp { t: 123, s: 4, c: 1, w: 2 }));
        let sorted = br#"{"pub":{"channel":"c","data":{"c":1,"p":"x","s":4,"t":123,"w":2}}}"#;
        assert_eq!(s.stamp(sorted), None); // "t" is not first: not a bench payload written by us
        assert_eq!(s.code(br#"{"disconnect":{"code":4008,"reason":"slow"}}"#), Some(4008));
    }
    #[test]
    fn reads_event_streams_split_anywhere() {
        let mut wire = b"retry: 1000\n\nid: bench:0@e:0\n\n".to_vec();
        for i in 1..=30u32 {
            wire.extend_from_slice(format!("id: bench:0@e:{i}\n").as_bytes());
            wire.extend_from_slice(&herald_protocol::sse::encode_pub_event(
                "bench:0",
                Some(i as u64),
                format!(
                    "{{\"t\":{i},\"s\":{i},\"c\":0,\"w\":1,\"p\":\"{}\"}}",
                    "x".repeat(i as usize * 5)
                )
                .as_bytes(),
            ));
            if i % 7 == 0 {
                wire.extend_from_slice(herald_protocol::sse::PING);
            }
        }
        wire.extend_from_slice(&herald_protocol::sse::encode_disconnect_event(4008, "slow", true));
        let scanner = Scanner::new();
        for chunk in [1, 2, 3, 7, 100, 4096] {
            let mut reader = SseReader::default();
            let (mut ready, mut got, mut code) = (0, Vec::new(), None);
            for piece in wire.chunks(chunk) {
                reader
                    .feed(piece, &mut |e| match e.event {
                        b"" if e.id && e.data.is_empty() => ready += 1,
                        b"pub" => got.push(scanner.stamp(e.data).unwrap().s),
                        b"disconnect" => code = scanner.code(e.data),
                        other => panic!("unexpected event {other:?}"),
                    })
                    .unwrap();
            }
            assert_eq!(ready, 1, "chunk {chunk}");
            assert_eq!(got, (1..=30).collect::<Vec<u64>>(), "chunk {chunk}");
            assert_eq!(code, Some(4008), "chunk {chunk}");
            assert_eq!(reader.comments, 4, "chunk {chunk}");
        }
        let mut reader = SseReader::default();
        let mut joined = Vec::new();
        reader
            .feed(b"event: x\r\ndata: a\r\ndata:b\r\n\r\n", &mut |e| {
                joined = [e.event, b"|", e.data].concat()
            })
            .unwrap();
        assert_eq!(joined, b"x|a\nb");
    }
}
