//! Recovery larger than a queue does not fail the stream. (Publisher pushback, which happens only
//! when the node itself is saturated, is tested in herald-core's `node` module; slow readers
//! never make publishers wait: see `hostile_readers.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream as StdTcpStream;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

#[tokio::test]
async fn an_sse_resume_larger_than_its_queue_resets_channels_instead_of_failing() {
    let config = "[limits]\nmax_queue_bytes = 262144\n[namespaces.h]\nhistory_size = 1000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let pad = "z".repeat(1000);
    let mut epoch = String::new();
    for c in ["h:a", "h:b", "h:c"] {
        for chunk in (1..=500u64).collect::<Vec<_>>().chunks(100) {
            let batch: Vec<(String, serde_json::Value)> =
                chunk.iter().map(|i| (c.to_string(), json!({"i": i, "pad": pad}))).collect();
            epoch = api.batch(&batch).await.unwrap()["results"][0]["epoch"]
                .as_str()
                .unwrap()
                .to_string();
        }
    }
    // Epochs differ per channel; ask each from its own epoch, 400 behind the top.
    let mut id = Vec::new();
    for c in ["h:a", "h:b", "h:c"] {
        let (_, _, body) =
            api.request("GET", &format!("/api/history?channel={c}&limit=0"), None).await.unwrap();
        let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
        id.push(format!("{c}~{}~100", h["epoch"].as_str().unwrap()));
    }
    let _ = epoch;
    let mut stream = StdTcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "GET /sse?channel=h:a&channel=h:b&channel=h:c HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {}\r\n\r\n",
        id.join(";")
    )
    .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    // Read until the id-only event that ends the opening (recovered events come before it).
    while Instant::now() < deadline && !String::from_utf8_lossy(&text).contains("\n\nid: ") {
        match std::io::Read::read(&mut stream, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&text).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    assert!(text.contains("event: reset"), "some channel did not fit and was reset");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, metrics) = api.request("GET", "/metrics", None).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("herald_backlog_bytes 0\n"), "{metrics}");
    assert!(metrics.contains("herald_channels 0\n"), "{metrics}");
}
