//! Recovery larger than a queue is delivered whole, page by page. (Publisher pushback, which happens only
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
async fn an_sse_resume_larger_than_its_queue_is_delivered_and_a_dropped_one_leaves_nothing() {
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
    let open = || {
        let mut stream = StdTcpStream::connect(server.addr).unwrap();
        write!(
            stream,
            "GET /sse?channel=h:a&channel=h:b&channel=h:c HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {}\r\n\r\n",
            id.join(";")
        )
        .unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream
    };
    // Read until `done` says so.
    let read = |stream: &mut StdTcpStream, done: &dyn Fn(&str) -> bool| {
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !done(&String::from_utf8_lossy(&text)) {
            match std::io::Read::read(stream, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&text).to_string()
    };
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, _, metrics) = server.api().await.request("GET", "/metrics", None).await.unwrap();
        let metrics = String::from_utf8_lossy(&metrics).to_string();
        assert!(metrics.contains("herald_backlog_bytes 0\n"), "{metrics}");
        assert!(metrics.contains("herald_channels 0\n"), "{metrics}");
    };

    // Dropped during its recovery (the opening read, 1.2 MB still due): nothing stays behind.
    let mut stream = open();
    let text = read(&mut stream, &|t| t.contains("\n\nid: "));
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    drop(stream);
    settled().await;

    // Read to the end: all 3 x 400 missed publications, no reset.
    let mut stream = open();
    let text = read(&mut stream, &|t| t.matches("\"offset\":500,").count() == 3);
    assert!(!text.contains("event: reset"), "history holds all of it");
    for c in ["h:a", "h:b", "h:c"] {
        let offsets: Vec<u64> = text
            .split("data: ")
            .filter(|e| e.starts_with(&format!("{{\"channel\":\"{c}\"")))
            .filter_map(|e| e.split("\"offset\":").nth(1)?.split(',').next()?.parse().ok())
            .collect();
        assert_eq!(offsets, (101..=500).collect::<Vec<u64>>(), "{c}: every missed one, in order");
    }
    drop(stream);
    settled().await;
}
