//! End-to-end test: three raw WebSocket subscribers, one publisher, frames checked in order.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use herald_protocol::ws::{self, Decoder, Message, Opcode, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

async fn start() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(herald_reference::run(listener));
    addr
}

/// Reads until `\r\n\r\n`; returns the head and whatever followed it.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let mut chunk = [0u8; 1024];
        let n = timeout(WAIT, stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "eof while reading a response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A subscriber: connected, handshake checked; returns the stream and bytes read past the head.
async fn subscribe(addr: std::net::SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let key = ws::client_key();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: herald.json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains(&format!("Sec-WebSocket-Accept: {}\r\n", ws::accept_key(&key))),
        "{head}"
    );
    assert!(head.contains("Sec-WebSocket-Protocol: herald.json\r\n"), "{head}");
    (stream, rest)
}

/// Reads frames until `count` messages are decoded.
async fn read_messages(stream: &mut TcpStream, mut pending: Vec<u8>, count: usize) -> Vec<Message> {
    let mut decoder = Decoder::new(Role::Client, 1 << 20);
    let mut out = Vec::new();
    loop {
        decoder.feed(&pending, &mut out).unwrap();
        if out.len() >= count {
            return out;
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "eof while reading frames");
        pending = chunk[..n].to_vec();
    }
}

async fn request(stream: &mut TcpStream, raw: &str) -> (String, String) {
    stream.write_all(raw.as_bytes()).await.unwrap();
    let (head, mut body) = read_head(stream).await;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while body.len() < len {
        let mut chunk = [0u8; 1024];
        let n = timeout(WAIT, stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    (head, String::from_utf8(body).unwrap())
}

fn publish_request(body: &str) -> String {
    format!("POST /publish HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_subscribers_receive_both_publications_in_order() {
    let addr = start().await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        subscribers.push(subscribe(addr).await);
    }

    let mut publisher = TcpStream::connect(addr).await.unwrap();
    let (head, body) = request(&mut publisher, &publish_request("{\"n\":1}\n\n\"two\"\n")).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: application/json\r\n"), "{head}");
    assert_eq!(body, "{}");
    // Keep-alive: a second request on the same connection.
    let (head, body) = request(&mut publisher, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "ok");
    let (head, _) = request(&mut publisher, "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");

    for (stream, rest) in &mut subscribers {
        let messages = read_messages(stream, std::mem::take(rest), 2).await;
        assert_eq!(
            messages,
            vec![
                Message::Text(r#"{"pub":{"channel":"bench","data":{"n":1}}}"#.into()),
                Message::Text(r#"{"pub":{"channel":"bench","data":"two"}}"#.into()),
            ]
        );
    }

    // Ping is answered with a pong, close with a close, then the server ends the connection.
    let (stream, _) = &mut subscribers[0];
    stream.write_all(&ws::encode_frame(Role::Client, Opcode::Ping, b"hi")).await.unwrap();
    stream.write_all(&ws::encode_close(Role::Client, 1000, "bye")).await.unwrap();
    let messages = read_messages(stream, Vec::new(), 2).await;
    assert_eq!(messages[0], Message::Pong("hi".into()));
    assert!(matches!(messages[1], Message::Close(_)), "{messages:?}");
    let mut rest = Vec::new();
    let n = timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(n, 0);

    // The others still receive, the closed one is gone from the registry.
    let (head, body) = request(&mut publisher, "GET /stats HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(body.contains("\"subscribers\":2"), "{body}");
    assert!(body.contains("\"queued_bytes\":0"), "{body}");
    request(&mut publisher, &publish_request("3")).await;
    for (stream, _) in &mut subscribers[1..] {
        let messages = read_messages(stream, Vec::new(), 1).await;
        assert_eq!(messages, vec![Message::Text(r#"{"pub":{"channel":"bench","data":3}}"#.into())]);
    }
}

#[tokio::test]
async fn large_backlog_is_written_completely() {
    // Many frames published before the subscriber reads: exercises partial vectored writes.
    let addr = start().await;
    let (mut stream, rest) = subscribe(addr).await;
    let mut publisher = TcpStream::connect(addr).await.unwrap();
    let line = format!("\"{}\"", "x".repeat(1000));
    let body: String = (0..2000).map(|_| format!("{line}\n")).collect();
    request(&mut publisher, &publish_request(&body)).await;
    let messages = read_messages(&mut stream, rest, 2000).await;
    assert_eq!(messages.len(), 2000);
    let expected = format!(r#"{{"pub":{{"channel":"bench","data":{line}}}}}"#);
    assert!(messages.iter().all(|m| *m == Message::Text(expected.clone().into())));
}
