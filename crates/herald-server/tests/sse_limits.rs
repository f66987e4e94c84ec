//! Bounds of the SSE transport and of the accept loop, with real misbehaving clients over TCP:
//! streams of many long channel names keep small id lines and are bounded in memory (the id
//! lines count against the queue bound), a stream holds at most
//! `limits.max_channels_per_stream` channels, the raw request head is at most 16 KiB, and a flood
//! of sockets that never finish their request is refused at accept beyond the socket cap while
//! established clients go on being served. A stream served through hyper (on a kept-alive
//! connection) follows the same writer rules as one on the raw socket.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{metric, metrics, Server, TIMEOUT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `GET path` on a new connection (the raw-socket path) and reads the response head:
/// (status, the bytes read after the head).
async fn open(addr: std::net::SocketAddr, path: &str) -> (TcpStream, u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let (status, rest) = read_head(&mut s).await;
    (s, status, rest)
}

async fn read_head(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await.expect("head").unwrap();
        assert!(n > 0, "closed before the head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, buf[end..].to_vec())
}

/// Reads until the connection closes (or `limit` bytes), returning the body bytes.
async fn read_to_close(s: &mut TcpStream, mut body: Vec<u8>, limit: usize) -> Vec<u8> {
    let mut chunk = [0u8; 65536];
    while body.len() < limit {
        match tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await.expect("closed in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body
}

/// The events of an SSE body: blocks separated by a blank line, as `(id line, event, data)`.
fn events(body: &[u8]) -> Vec<(Option<String>, Option<String>, Option<String>)> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            let field =
                |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_string);
            (field("id: "), field("event: "), field("data: "))
        })
        .collect()
}

/// `n` channel names of `len` bytes each, distinct, in namespace `h` (with history, so that
/// every id entry holds a position).
fn long_names(n: usize, len: usize) -> Vec<String> {
    (0..n).map(|i| format!("h:{i:03}{}", "x".repeat(len - 5))).collect()
}

/// The namespace of [`long_names`].
const HISTORY: &str = "[namespaces.h]\nhistory_size = 10\n";

fn query(names: &[String]) -> String {
    names.iter().map(|n| format!("channel={}", n.replace(':', "%3A"))).collect::<Vec<_>>().join("&")
}

/// The bound `herald_protocol::sse::id_line_bound` documents: 6 bytes + 29 per channel.
fn id_line_bound(channels: usize) -> usize {
    herald_protocol::sse::id_line_bound(channels)
}

#[tokio::test]
async fn many_long_channel_names_keep_each_id_line_within_its_bound() {
    let server = Server::start(HISTORY, &[]);
    let mut api = server.api().await;
    // 64 channels (the default maximum) of 200-byte names: a 14 KB head, under 16 KiB.
    let names = long_names(64, 200);
    let (mut s, status, rest) = open(server.addr, &format!("/sse?{}", query(&names))).await;
    assert_eq!(status, 200);
    // 50-byte publications on every channel.
    let mut publications = Vec::new();
    for n in &names {
        publications.push(json!({"channel": n, "data": "x".repeat(48)}));
    }
    let (status, _, body) = api
        .request(
            "POST",
            "/api/batch",
            Some(json!({"publications": publications}).to_string().as_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut body = rest;
    let mut chunk = [0u8; 65536];
    while events(&body).iter().filter(|e| e.1.as_deref() == Some("pub")).count() < names.len() {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "stream ended");
        body.extend_from_slice(&chunk[..n]);
    }
    let pubs: Vec<_> =
        events(&body).into_iter().filter(|e| e.1.as_deref() == Some("pub")).collect();
    assert_eq!(pubs.len(), 64);
    for (id, _, data) in &pubs {
        let line = format!("id: {}\n", id.as_deref().expect("an id"));
        // The named form would be 64 x ~215 bytes = 13.8 KB per event.
        assert!(line.len() <= id_line_bound(64), "{} bytes: {line}", line.len());
        let data: Value = serde_json::from_str(data.as_deref().unwrap()).unwrap();
        assert_eq!(data["data"], json!("x".repeat(48)));
    }
    assert!(id_line_bound(64) < 2000);
}

#[tokio::test]
async fn a_stream_holds_at_most_max_channels_per_stream() {
    let server = Server::start(&format!("{HISTORY}[limits]\nmax_channels_per_stream = 5\n"), &[]);
    let names = long_names(6, 10);
    let (_, status, _) = open(server.addr, &format!("/sse?{}", query(&names[..5]))).await;
    assert_eq!(status, 200);
    // Duplicates do not count.
    let mut dup = names[..5].to_vec();
    dup.push(names[0].clone());
    let (_, status, _) = open(server.addr, &format!("/sse?{}", query(&dup))).await;
    assert_eq!(status, 200);
    let (mut s, status, rest) = open(server.addr, &format!("/sse?{}", query(&names))).await;
    assert_eq!(status, 429);
    let body = read_to_close(&mut s, rest, 1 << 16).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 5 channels"), "{message}");
    assert!(message.contains("max_channels_per_stream"), "{message}");

    // The default: 64. The 241-channel stream is refused (through hyper here, since
    // its URL is larger than the raw path's 16 KiB head).
    let server = Server::start(HISTORY, &[]);
    let mut api = server.api().await;
    let names = long_names(241, 250);
    // On the raw path, its 62 KB head alone is refused.
    let (status, _, body) =
        api.request("GET", &format!("/sse?{}", query(&names)), None).await.unwrap();
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&body));
    let mut api = server.api().await;
    let (status, _, _) = api.request("GET", "/healthz", None).await.unwrap();
    assert_eq!(status, 200);
    let (status, _, body) =
        api.request("GET", &format!("/sse?{}", query(&names)), None).await.unwrap();
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("at most 64 channels"));
}

#[tokio::test]
async fn raw_request_heads_over_16_kib_get_431() {
    let server = Server::start("", &[]);
    for (pad, want) in [(15 * 1024, 200), (16 * 1024, 431), (64 * 1024, 431)] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let head =
            format!("GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "p".repeat(pad));
        s.write_all(head.as_bytes()).await.unwrap();
        let (status, _) = read_head(&mut s).await;
        assert_eq!(status, want, "a head of {} bytes", head.len());
    }
}

/// A stream of many long channel names that stops reading during a burst: its queue bound
/// counts the id line of every queued event, so it is cut with 4008 once the events *with their
/// ids* exceed `max_queue_bytes`, instead of pinning their rendered ids in memory (the bodies
/// alone stay far below the bound).
#[tokio::test]
async fn id_lines_count_against_the_queue_bound() {
    // The hard cap at the soft bound: a push past 1 MiB cuts at once (the default lets a reader
    // that drains survive a larger burst).
    let config =
        format!("{HISTORY}[limits]\nmax_queue_bytes = 1048576\nmax_queue_burst_bytes = 1048576\n");
    let server = Server::start(&config, &[]);
    let mut api = server.api().await;
    let names = long_names(64, 200);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(socket.into()).unwrap();
    let path = format!("/sse?{}", query(&names));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let (status, rest) = read_head(&mut s).await;
    assert_eq!(status, 200);
    // Not reading: 3,000 publications of ~50 bytes (bodies ~280 bytes with the channel name:
    // 0.8 MB in all, under the bound; with their ~1.9 KB id lines: 6 MB, far over it).
    for round in 0..3 {
        let publications: Vec<Value> = (0..1000)
            .map(|i| json!({"channel": names[i % names.len()], "data": format!("{round}-{i:044}")}))
            .collect();
        let (status, _, body) = api
            .request(
                "POST",
                "/api/batch",
                Some(json!({"publications": publications}).to_string().as_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let body = read_to_close(&mut s, rest, 64 << 20).await;
    let all = events(&body);
    let last = all.last().expect("events");
    assert_eq!(last.1.as_deref(), Some("disconnect"), "the stream ends with disconnect");
    let data: Value = serde_json::from_str(last.2.as_deref().unwrap()).unwrap();
    assert_eq!(data["code"], json!(4008), "{data}");
    let pubs = all.iter().filter(|e| e.1.as_deref() == Some("pub")).count();
    assert!(pubs < 3000, "cut before everything was delivered ({pubs})");
    // What reached the client is bounded by the queue bound plus the kernel's buffers, not by
    // the 3,000 events with their ids.
    assert!(body.len() < 4 << 20, "{} bytes reached the client", body.len());
}

/// Undoes the chunked framing of a complete response body (`0` chunk included): the body bytes,
/// and whether the terminating chunk arrived.
fn unchunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    while let Some(p) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..p]).unwrap(), 16).unwrap();
        raw = &raw[p + 2..];
        if size == 0 {
            return (body, true);
        }
        if raw.len() < size + 2 {
            break;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
    (body, false)
}

/// A stream on a kept-alive connection is written by hyper from a body channel. Its client does
/// not read: the bytes queued to it leave the node backlog like a blocked socket's (before, they
/// stayed in it and made every publisher wait and get 503), it is cut with 4008 by the
/// slow-consumer rule, and the body then ends cleanly with the `disconnect` event.
#[tokio::test]
async fn a_never_reading_stream_served_through_hyper_is_judged_like_a_socket() {
    let config = "[limits]\nmax_backlog_bytes = 262144\npublish_timeout_ms = 300\n\
                  slow_consumer_grace_ms = 1000\nsocket_send_buffer_bytes = 4096\n";
    let server = Server::start(config, &[]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(socket.into()).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (status, mut rest) = read_head(&mut s).await;
    assert_eq!(status, 200);
    while rest.len() < b"ok\n".len() {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).await.unwrap();
        rest.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(rest, b"ok\n", "nothing follows the /healthz body");
    s.write_all(b"GET /sse?channel=hot HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (status, rest) = read_head(&mut s).await;
    assert_eq!(status, 200);

    // Not reading. 900 KB (under the 1 MiB queue bound): far more than the backlog bound, which
    // would hold them if they counted.
    let mut api = server.api().await;
    let pad = "p".repeat(5000);
    let publish = |i: u64| json!({"channel": "hot", "data": {"i": i, "pad": pad}}).to_string();
    for i in 0..180 {
        let (status, _, answer) =
            api.request("POST", "/api/publish", Some(publish(i).as_bytes())).await.unwrap();
        assert_eq!(status, 200, "publish {i}: {}", String::from_utf8_lossy(&answer));
    }
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "herald_publish_overloaded_total"), 0.0, "{m}");
    assert!(metric(&m, "herald_backlog_bytes") < 65536.0, "{m}");

    // Past the queue bound without progress: cut after the grace period.
    for i in 180..300 {
        let (status, _, _) =
            api.request("POST", "/api/publish", Some(publish(i).as_bytes())).await.unwrap();
        assert_eq!(status, 200, "publish {i}");
    }
    let deadline = Instant::now() + TIMEOUT;
    while metric(&metrics(&server).await, "herald_disconnects_total{code=\"4008\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the never-reader was not cut");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reading now: a prefix of the publications, in order, then the disconnect event and the
    // body's end; the connection stays usable.
    let mut raw = rest;
    let mut chunk = [0u8; 65536];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await.expect("in time").unwrap();
        assert!(n > 0, "the connection closed inside the body");
        raw.extend_from_slice(&chunk[..n]);
    }
    let (body, ended) = unchunk(&raw);
    assert!(ended, "the body ends with its last chunk");
    let all = events(&body);
    let last = all.last().expect("events");
    assert_eq!(last.1.as_deref(), Some("disconnect"), "the stream ends with disconnect");
    let data: Value = serde_json::from_str(last.2.as_deref().unwrap()).unwrap();
    assert_eq!(data["code"], json!(4008), "{data}");
    let pubs: Vec<u64> = all
        .iter()
        .filter(|e| e.1.as_deref() == Some("pub"))
        .map(|e| {
            serde_json::from_str::<Value>(e.2.as_deref().unwrap()).unwrap()["data"]["i"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(!pubs.is_empty() && pubs.len() < 300, "{} publications", pubs.len());
    assert!(pubs.iter().enumerate().all(|(k, &i)| k as u64 == i), "in order, none skipped");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200, "the connection serves the next request");
}

/// 200 sockets that send `GET /s` and nothing more, against `max_connections = 20` and
/// `socket_reserve = 10`: those beyond the 30 permits are refused at once (503 or closed),
/// the rest are closed by the first-bytes deadline; an SSE stream opened before the flood is
/// served throughout, and new clients are served once the flood is gone.
#[tokio::test]
async fn a_flood_of_unfinished_requests_is_refused_at_accept() {
    let server = Server::start("[limits]\nmax_connections = 20\nsocket_reserve = 10\n", &[]);
    let (mut stream, status, rest) = open(server.addr, "/sse?channel=flood").await;
    assert_eq!(status, 200);

    let began = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let _ = s.write_all(b"GET /s").await;
        flood.push(s);
    }
    // Each flood socket: how long until the server answered or closed it.
    let waits: Vec<_> = flood
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let mut got = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                        Err(_) => panic!("a flood socket was held for 30 s"),
                    }
                }
                (Instant::now(), got)
            })
        })
        .collect();
    // While the flood holds its permits, the established stream is still served.
    let publisher = {
        let base = server.http_base();
        tokio::spawn(async move {
            // The API connection itself may be refused while the flood holds every permit.
            loop {
                if let Ok(mut api) = herald_client::HttpApi::connect(&base, None).await {
                    if api.publish("flood", &json!("during")).await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let body = {
        let mut body = rest;
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&body).contains("\"during\"") {
            let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
                .await
                .expect("the established stream is served")
                .unwrap();
            assert!(n > 0);
            body.extend_from_slice(&chunk[..n]);
        }
        body
    };
    assert!(!body.is_empty());
    publisher.await.unwrap();

    let mut ended = Vec::new();
    for w in waits {
        ended.push(w.await.unwrap());
    }
    // The refused ones were answered or closed long before the 5 s first-bytes deadline (the
    // ones holding a permit are closed by that deadline).
    let prompt = ended.iter().filter(|(at, _)| at.duration_since(began) < Duration::from_secs(3));
    let prompt = prompt.count();
    assert!(prompt >= 200 - 30, "only {prompt} of 200 refused at once");
    let answered = ended.iter().filter(|(_, got)| got.starts_with(b"HTTP/1.1 503")).count();
    eprintln!("{prompt} flood sockets refused at once, {answered} of them read the 503");

    // The flood is gone: new clients are served.
    let mut api = server.api().await;
    let (status, _, _) = api.request("GET", "/healthz", None).await.unwrap();
    assert_eq!(status, 200);
    let (_, status, _) = open(server.addr, "/sse?channel=after").await;
    assert_eq!(status, 200);
}
