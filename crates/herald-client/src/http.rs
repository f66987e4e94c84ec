//! The few pieces of hand-written HTTP/1.1 shared by the WebSocket upgrade ([`crate::Client`])
//! and the HTTP API helper ([`crate::HttpApi`]): URL parsing, TCP connect with an optional
//! source address, response heads, and response bodies (Content-Length, chunked, until EOF).
//!
//! Reads go through a caller-owned buffer so that bytes received past a head (the first
//! WebSocket frames, the next keep-alive response) are never lost.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::ClientError;

/// Longest response head accepted (status line and headers).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Longest response body accepted by [`read_body`].
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// A parsed `scheme://host[:port][/path][?query]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Url {
    /// The host to resolve, without IPv6 brackets.
    pub(crate) host: String,
    /// The port (the scheme's default when absent).
    pub(crate) port: u16,
    /// `host:port` as written, for the `Host` header.
    pub(crate) authority: String,
    /// Path and query, starting with `/`; no fragment.
    pub(crate) target: String,
}

fn bad_url(url: &str, why: &str) -> ClientError {
    ClientError::Handshake(format!("invalid URL {url:?}: {why}"))
}

/// Parses `url`, which must use `scheme` (case-insensitive); `default_port` when none is given.
pub(crate) fn parse_url(url: &str, scheme: &str, default_port: u16) -> Result<Url, ClientError> {
    let rest = url
        .split_once("://")
        .filter(|(s, _)| s.eq_ignore_ascii_case(scheme))
        .map(|(_, rest)| rest)
        .ok_or_else(|| bad_url(url, &format!("expected a {scheme}:// URL")))?;
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    let target = match target.chars().next() {
        None => "/".to_owned(),
        Some('?') => format!("/{target}"),
        Some(_) => target.to_owned(),
    };
    if authority.contains('@') {
        return Err(bad_url(url, "user info is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) =
            v6.split_once(']').ok_or_else(|| bad_url(url, "unterminated IPv6 address"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad_url(url, "junk after the IPv6 address")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad_url(url, "no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().map_err(|_| bad_url(url, "bad port"))?,
    };
    Ok(Url { host: host.to_owned(), port, authority: authority.to_owned(), target })
}

/// Appends `s` to `out`, percent-encoding every byte outside the URL-unreserved set.
pub(crate) fn percent_encode(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Opens a TCP connection to `host:port` (trying each resolved address), bound to `local` when
/// given (only addresses of the same family are tried then); `TCP_NODELAY` is set.
pub(crate) async fn connect_tcp(
    host: &str,
    port: u16,
    local: Option<IpAddr>,
) -> Result<TcpStream, ClientError> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if local.is_some_and(|l| l.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        match connect_addr(addr, local).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(ClientError::Io(last_error.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("no usable address for {host}:{port}"))
    })))
}

async fn connect_addr(addr: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(local) = local {
        socket.bind(SocketAddr::new(local, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A response's status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    /// The status code.
    pub(crate) status: u16,
    /// The reason phrase.
    pub(crate) reason: String,
    /// The headers in order, names in lower case, values trimmed.
    pub(crate) headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first value of header `name` (lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// True when some value of header `name` lists `token` (comma-separated, any case).
    pub(crate) fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Parses a response head (without its final empty line).
pub(crate) fn parse_response_head(head: &[u8]) -> Result<ResponseHead, String> {
    let head = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status in {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) =
            line.split_once(':').ok_or_else(|| format!("bad header line {line:?}"))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(format!("bad header name in {line:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(ResponseHead { status, reason, headers })
}

/// Reads more bytes into `buf`; `Ok(0)` at end of stream.
async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(4096);
    io.read_buf(buf).await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads a response head through `buf` (which may already hold bytes) and removes it from
/// `buf`, leaving whatever followed it.
///
/// End of stream before any byte is [`ClientError::Closed`]; in the middle of a head, a
/// [`ClientError::Protocol`].
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<ResponseHead, ClientError> {
    let mut searched = 0;
    loop {
        if let Some(at) = find(&buf[searched..], b"\r\n\r\n") {
            let end = searched + at;
            let head = parse_response_head(&buf[..end]).map_err(ClientError::Protocol)?;
            buf.drain(..end + 4);
            return Ok(head);
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD_BYTES {
            return Err(ClientError::Protocol(format!(
                "response head longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
        if fill(io, buf).await? == 0 {
            return Err(if buf.is_empty() {
                ClientError::Closed
            } else {
                ClientError::Protocol("connection closed in the middle of a response head".into())
            });
        }
    }
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// No body (1xx, 204, 304, or a response to HEAD).
    Empty,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilEof,
}

/// How the body of a response with `head` to a `method` request is delimited.
pub(crate) fn body_length(head: &ResponseHead, method: &str) -> Result<BodyLength, ClientError> {
    if method.eq_ignore_ascii_case("HEAD")
        || head.status / 100 == 1
        || head.status == 204
        || head.status == 304
    {
        return Ok(BodyLength::Empty);
    }
    if let Some(te) = head.header("transfer-encoding") {
        return if te.rsplit(',').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")) {
            Ok(BodyLength::Chunked)
        } else {
            Ok(BodyLength::UntilEof)
        };
    }
    match head.header("content-length") {
        Some(len) => len
            .parse::<usize>()
            .map(BodyLength::Length)
            .map_err(|_| ClientError::Protocol(format!("bad Content-Length {len:?}"))),
        None => Ok(BodyLength::UntilEof),
    }
}

fn truncated() -> ClientError {
    ClientError::Protocol("connection closed in the middle of a response body".into())
}

fn too_big() -> ClientError {
    ClientError::Protocol(format!("response body longer than {MAX_BODY_BYTES} bytes"))
}

/// Makes `buf` hold at least `n` bytes; end of stream first is an error.
async fn fill_to<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> Result<(), ClientError> {
    if n > buf.len() {
        buf.reserve(n - buf.len());
    }
    while buf.len() < n {
        if io.read_buf(buf).await? == 0 {
            return Err(truncated());
        }
    }
    Ok(())
}

/// Reads one CRLF-terminated line from `buf`/`io` and removes it, without its line end.
async fn read_line<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, ClientError> {
    let mut searched = 0;
    loop {
        if let Some(at) = buf[searched..].iter().position(|b| *b == b'\n') {
            let end = searched + at;
            let mut line: Vec<u8> = buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        searched = buf.len();
        if buf.len() > MAX_HEAD_BYTES {
            return Err(ClientError::Protocol("chunk header line too long".into()));
        }
        if fill(io, buf).await? == 0 {
            return Err(truncated());
        }
    }
}

/// Reads a body delimited as `length` through `buf`, leaving whatever followed it in `buf`.
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    length: BodyLength,
) -> Result<Vec<u8>, ClientError> {
    match length {
        BodyLength::Empty => Ok(Vec::new()),
        BodyLength::Length(n) => {
            if n > MAX_BODY_BYTES {
                return Err(too_big());
            }
            fill_to(io, buf, n).await?;
            Ok(buf.drain(..n).collect())
        }
        BodyLength::UntilEof => {
            while fill(io, buf).await? > 0 {
                if buf.len() > MAX_BODY_BYTES {
                    return Err(too_big());
                }
            }
            Ok(std::mem::take(buf))
        }
        BodyLength::Chunked => {
            let mut body = Vec::new();
            loop {
                let line = read_line(io, buf).await?;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .map(|l| l.split(';').next().unwrap_or_default().trim())
                    .and_then(|hex| usize::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| {
                        ClientError::Protocol(format!(
                            "bad chunk size line {:?}",
                            String::from_utf8_lossy(&line)
                        ))
                    })?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(io, buf).await?.is_empty() {}
                    return Ok(body);
                }
                if body.len().saturating_add(size) > MAX_BODY_BYTES {
                    return Err(too_big());
                }
                fill_to(io, buf, size + 2).await?;
                if &buf[size..size + 2] != b"\r\n" {
                    return Err(ClientError::Protocol("chunk not followed by CRLF".into()));
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn url(host: &str, port: u16, authority: &str, target: &str) -> Url {
        Url { host: host.into(), port, authority: authority.into(), target: target.into() }
    }

    #[test]
    fn parses_urls() {
        let table = [
            ("ws://127.0.0.1:8080/ws", url("127.0.0.1", 8080, "127.0.0.1:8080", "/ws")),
            ("WS://h/ws?token=a.b", url("h", 80, "h", "/ws?token=a.b")),
            ("ws://h:1", url("h", 1, "h:1", "/")),
            ("ws://h?x=1", url("h", 80, "h", "/?x=1")),
            ("ws://h/p#frag", url("h", 80, "h", "/p")),
            ("ws://[::1]:9000/ws", url("::1", 9000, "[::1]:9000", "/ws")),
            ("ws://[::1]/ws", url("::1", 80, "[::1]", "/ws")),
        ];
        for (input, want) in table {
            assert_eq!(parse_url(input, "ws", 80).unwrap(), want, "{input}");
        }
        for bad in [
            "wss://h/ws",
            "http://h/",
            "h:80/ws",
            "ws://",
            "ws://:80/",
            "ws://h:x/",
            "ws://h:70000/",
            "ws://[::1/",
            "ws://[::1]x/",
            "ws://u@h/",
        ] {
            assert!(
                matches!(parse_url(bad, "ws", 80), Err(ClientError::Handshake(_))),
                "{bad} should be refused"
            );
        }
        assert_eq!(parse_url("http://a:1", "http", 80).unwrap().port, 1);
    }

    #[test]
    fn percent_encodes() {
        let mut s = String::new();
        percent_encode(&mut s, "aZ9-._~ +/=&é");
        assert_eq!(s, "aZ9-._~%20%2B%2F%3D%26%C3%A9");
    }

    #[test]
    fn parses_heads() {
        let head = parse_response_head(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nX-Empty:\r\nSec-WebSocket-Accept:  abc= ",
        )
        .unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.reason, "Switching Protocols");
        assert_eq!(head.header("sec-websocket-accept"), Some("abc="));
        assert_eq!(head.header("x-empty"), Some(""));
        assert!(head.has_token("upgrade", "websocket"));
        assert!(head.has_token("connection", "upgrade"));
        assert!(!head.has_token("connection", "close"));
        assert_eq!(parse_response_head(b"HTTP/1.0 200").unwrap().reason, "");
        for bad in [
            &b"SSH-2.0"[..],
            b"HTTP/1.1 2000 X",
            b"HTTP/1.1 abc",
            b"HTTP/1.1 200 OK\r\nNoColon",
            b"HTTP/1.1 200 OK\r\nBad Name: x",
            b"\xff",
        ] {
            assert!(parse_response_head(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// Reads one whole response from `input`, returning head, body and the rest.
    async fn response(input: &[u8], method: &str) -> Result<(u16, Vec<u8>, Vec<u8>), ClientError> {
        let mut io = input;
        let mut buf = Vec::new();
        let head = read_head(&mut io, &mut buf).await?;
        let length = body_length(&head, method)?;
        let body = read_body(&mut io, &mut buf, length).await?;
        buf.extend_from_slice(io);
        Ok((head.status, body, buf))
    }

    #[tokio::test]
    async fn reads_bodies() {
        let (status, body, rest) =
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1", "GET")
                .await
                .unwrap();
        assert_eq!((status, &body[..], &rest[..]), (200, &b"hello"[..], &b"HTTP/1.1"[..]));

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nB\r\n, world! :)\r\n0\r\nTrailer: x\r\n\r\nnext";
        let (_, body, rest) = response(chunked, "GET").await.unwrap();
        assert_eq!((&body[..], &rest[..]), (&b"hello, world! :)"[..], &b"next"[..]));

        let (_, body, _) =
            response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", "GET")
                .await
                .unwrap();
        assert_eq!(body, b"all of it");

        let (status, body, rest) =
            response(b"HTTP/1.1 204 No Content\r\n\r\nnext", "POST").await.unwrap();
        assert_eq!((status, body.len(), &rest[..]), (204, 0, &b"next"[..]));
        let (_, body, _) =
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD").await.unwrap();
        assert!(body.is_empty());

        assert!(matches!(response(b"", "GET").await, Err(ClientError::Closed)));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Le"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
        ] {
            assert!(
                matches!(response(bad, "GET").await, Err(ClientError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn reads_byte_by_byte() {
        // A reader that yields one byte per read exercises every partial path.
        struct OneByte<'a>(&'a [u8]);
        impl AsyncRead for OneByte<'_> {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                out: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                if let Some((first, rest)) = self.0.split_first() {
                    out.put_slice(&[*first]);
                    self.0 = rest;
                }
                std::task::Poll::Ready(Ok(()))
            }
        }
        let input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut io = OneByte(input);
        let mut buf = Vec::new();
        let head = read_head(&mut io, &mut buf).await.unwrap();
        let body = read_body(&mut io, &mut buf, body_length(&head, "GET").unwrap()).await.unwrap();
        assert_eq!(body, b"abc");
        assert!(buf.is_empty());
    }
}
