//! When the readers as a whole cannot keep up, Herald slows its publishers (a publish waits,
//! bounded, then answers 503 with Retry-After) instead of queueing without bound or cutting
//! the subscribers.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream as StdTcpStream;
use std::time::{Duration, Instant};

use common::Server;
use herald_protocol::ws::{self, Opcode, Role};
use serde_json::json;

/// A subscriber that never reads, on a socket with tiny buffers.
fn never_reader(server: &Server, channel: &str) -> StdTcpStream {
    let mut stream = common::raw_ws(server, 4096);
    let cmd = format!(r#"{{"op":"subscribe","id":1,"channel":"{channel}"}}"#);
    stream.write_all(&ws::encode_frame(Role::Client, Opcode::Text, cmd.as_bytes())).unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_get_503_with_retry_after_when_every_reader_lags() {
    let config = "[limits]\nmax_queue_bytes = 65536\nsocket_send_buffer_bytes = 4096\npublish_timeout_ms = 300\n";
    let server = Server::start(config, &[]);
    let _readers: Vec<StdTcpStream> = (0..4).map(|_| never_reader(&server, "stalled")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut api = server.api().await;
    let pad = "p".repeat(4000);
    let started = Instant::now();
    let mut answer = None;
    for i in 0..200 {
        let body = json!({"channel": "stalled", "data": {"i": i, "pad": pad}}).to_string();
        let (status, headers, body) =
            api.request("POST", "/api/publish", Some(body.as_bytes())).await.unwrap();
        if status != 200 {
            answer = Some((status, headers, body, started.elapsed()));
            break;
        }
    }
    let (status, headers, body, elapsed) = answer.expect("the publisher was eventually refused");
    assert_eq!(status, 503);
    assert!(headers.iter().any(|(k, v)| k == "retry-after" && v == "1"), "{headers:?}");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], json!(503));
    assert!(elapsed >= Duration::from_millis(300), "the publish waited first ({elapsed:?})");
    // The readers were slowed down to, not cut.
    let (_, _, metrics) = api.request("GET", "/metrics", None).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("herald_disconnects_total{code=\"4008\"} 0"), "{metrics}");
    assert!(!metrics.contains("herald_publish_overloaded_total 0\n"), "{metrics}");
    assert!(metrics.contains("herald_connections 4"), "{metrics}");
}
