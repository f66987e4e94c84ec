//! `allowed_origins` and `insecure` (PROTOCOL.md section 5) with the real binary: browsers'
//! requests from other origins are refused with 403 on `/ws` and `/sse`, listed origins and
//! requests without `Origin` pass; `insecure = true` lets a node listen beyond loopback without
//! an API key and token auth, and says so.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::Server;

/// The status line and body of a request to `server`, read until the head (and a little more).
fn status_of(server: &Server, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 200 {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ws(origin: Option<&str>) -> String {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
}

fn sse(origin: Option<&str>) -> String {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    format!(
        "GET /sse?channel=news HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{origin}\r\n"
    )
}

#[test]
fn only_listed_origins_may_open_websockets_and_streams() {
    let server = Server::start(
        "allowed_origins = [\"https://app.example\", \"http://localhost:3000\"]\n",
        &[],
    );
    for (origin, ok) in [
        (Some("https://app.example"), true),
        (Some("http://localhost:3000"), true),
        (None, true),
        (Some("https://evil.example"), false),
        (Some("null"), false),
    ] {
        let answer = status_of(&server, &ws(origin));
        let want = if ok { "HTTP/1.1 101" } else { "HTTP/1.1 403" };
        assert!(answer.starts_with(want), "ws {origin:?}: {answer}");
        let answer = status_of(&server, &sse(origin));
        let want = if ok { "HTTP/1.1 200" } else { "HTTP/1.1 403" };
        assert!(answer.starts_with(want), "sse {origin:?}: {answer}");
        if !ok {
            assert!(answer.contains("allowed_origins"), "{answer}");
        }
    }
}

#[test]
fn an_empty_list_allows_any_origin() {
    let server = Server::start("", &[]);
    assert!(status_of(&server, &ws(Some("https://any.example"))).starts_with("HTTP/1.1 101"));
    assert!(status_of(&server, &sse(Some("https://any.example"))).starts_with("HTTP/1.1 200"));
}

#[test]
fn bad_origins_and_the_secure_default_stop_start_up_with_the_key_named() {
    let (code, text) = common::run_herald(&["--set", "allowed_origins=app.example"], &[]);
    assert_ne!(code, Some(0));
    assert!(text.contains("allowed_origins") && text.contains("app.example"), "{text}");
    let (code, text) = common::run_herald(&["--listen", "0.0.0.0:1"], &[]);
    assert_ne!(code, Some(0));
    assert!(text.contains("insecure = true"), "{text}");
}

#[tokio::test]
async fn insecure_lets_a_node_listen_beyond_loopback_and_says_so() {
    use std::io::BufRead as _;
    // 0.0.0.0 on a free port: the test reaches it over loopback.
    let port = common::free_addr().port();
    let mut child = std::process::Command::new(common::herald_bin())
        .args(["--listen", &format!("0.0.0.0:{port}"), "--set", "insecure=true"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
            if line.contains("herald listening on") {
                let _ = tx.send(log.clone());
            }
        }
        let _ = tx.send(log);
    });
    let log = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(log.contains("herald listening on"), "{log}");
    assert!(log.contains("insecure = true"), "the warning at start: {log}");
    let mut api =
        herald_client::HttpApi::connect(&format!("http://127.0.0.1:{port}"), None).await.unwrap();
    let info = api.json("GET", "/api/info", None).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(info["insecure"], serde_json::json!(true));
}
