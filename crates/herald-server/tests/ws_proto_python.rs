//! Cross-language `herald.proto`: a Python client whose message classes `protoc` generates from
//! `proto/herald.proto` (Debian's protobuf-compiler and python3-protobuf, installed by
//! scripts/test), with its own WebSocket code, subscribes and publishes binary data beside a
//! Rust JSON client and the HTTP API (JSON and protobuf bodies) on one channel: both clients
//! receive every publication, in order, with the same data.
//!
//! Skipped when protoc or Python's protobuf is missing, unless `HERALD_REQUIRE_PROTOC=1`
//! (scripts/test sets it), which makes it fail instead.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::{Client, ConnectOptions, Event};
use serde_json::{json, Value};

/// A small page bound: the Python client's recovery of the whole stream comes in parts.
const CONFIG: &str =
    "[namespaces.x]\nhistory_size = 1000\nclient_publish = true\n[limits]\nmax_history_page = 16\n";
const EACH: usize = 40;

/// A Python with the protobuf runtime: Debian's (python3-protobuf) first.
fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import google.protobuf"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn skip(why: &str) -> bool {
    if std::env::var("HERALD_REQUIRE_PROTOC").is_ok_and(|v| v == "1") {
        panic!("{why} (HERALD_REQUIRE_PROTOC=1)");
    }
    eprintln!("skipped: {why}");
    true
}

/// A publication's data as a comparable value: JSON when the bytes are JSON text, else bytes.
fn comparable(bytes: &[u8]) -> Value {
    if herald_protocol::push::is_json_text(bytes) {
        serde_json::from_slice(bytes).unwrap()
    } else {
        json!({ "bytes": bytes })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protoc_generated_python_client_and_a_json_client_see_the_same_stream() {
    let Some(python) = python() else {
        skip("no Python with the protobuf runtime");
        return;
    };
    let generated = tempfile::tempdir().unwrap();
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    match Command::new("protoc")
        .arg(format!("--proto_path={proto_dir}"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg("herald.proto")
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("protoc failed: {s}"),
        Err(_) => {
            skip("no protoc");
            return;
        }
    }

    let server = Server::start(CONFIG, &[]);
    let channel = "x:ticks";
    let (json_client, mut json_events, _) =
        Client::connect(&server.ws_url(), ConnectOptions::default()).await.unwrap();
    json_client.subscribe(channel, None).await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/proto_client.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(server.addr.port().to_string())
        .arg(channel)
        .arg(EACH.to_string())
        .arg((3 * EACH).to_string())
        .env("PYTHONPATH", generated.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let ready = tokio::time::timeout(TIMEOUT, lines_rx.recv()).await.unwrap().unwrap();
    assert_eq!(ready, "READY");

    // Python publishes binary data meanwhile; the JSON client and the API publish too.
    let mut api = server.api().await;
    for i in 0..EACH {
        json_client.publish(channel, &json!({"json": i})).await.unwrap();
        if i % 2 == 0 {
            api.publish(channel, &json!({"api": i})).await.unwrap();
        } else {
            api.publish_protobuf(channel, &[0xff, i as u8]).await.unwrap();
        }
    }

    // The JSON client's stream.
    let mut seen = Vec::new();
    while seen.len() < 3 * EACH {
        match tokio::time::timeout(TIMEOUT, json_events.recv()).await.unwrap() {
            Some(Event::Pub { offset, data, binary, .. }) => {
                let data = match binary {
                    Some(bytes) => json!({ "bytes": bytes }),
                    None => data,
                };
                seen.push((offset.unwrap(), data));
            }
            Some(Event::Ping) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Python's.
    let mut python_seen = Vec::new();
    let mut published = Vec::new();
    let mut recovery_seen = false;
    while python_seen.len() < 3 * EACH || published.len() < EACH {
        let line = tokio::time::timeout(Duration::from_secs(30), lines_rx.recv())
            .await
            .expect("python in time")
            .expect("python output");
        assert!(!line.starts_with("ERROR"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(offset) = v.get("published") {
            published.push(offset.as_u64().unwrap());
        } else if let Some(recovered) = v.get("recovered") {
            assert_eq!(recovered, &json!(true));
            let want: Vec<u64> = (2..=3 * EACH as u64).collect();
            assert_eq!(v["offsets"], json!(want), "the recovery, joined from its parts");
            recovery_seen = true;
        } else {
            let bytes: Vec<u8> = (0..v["hex"].as_str().unwrap().len() / 2)
                .map(|i| u8::from_str_radix(&v["hex"].as_str().unwrap()[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()
                .unwrap();
            python_seen.push((v["offset"].as_u64().unwrap(), comparable(&bytes)));
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(recovery_seen, "python reported its recovery");

    // Every publication, once, in offset order, the same on both sides.
    let offsets: Vec<u64> = seen.iter().map(|p| p.0).collect();
    assert_eq!(offsets, (1..=3 * EACH as u64).collect::<Vec<_>>());
    assert_eq!(python_seen, seen);
    // Python's own publications are among them, in the order it sent them.
    let mut mine: Vec<u64> = published.clone();
    mine.sort_unstable();
    assert_eq!(mine, published, "publish replies in command order");
    let python_data: Vec<&Value> =
        seen.iter().filter(|p| published.contains(&p.0)).map(|p| &p.1).collect();
    let sent: Vec<Value> = (0..EACH as u32)
        .map(|k| {
            let mut b = b"\x00py".to_vec();
            b.extend_from_slice(&k.to_be_bytes());
            json!({ "bytes": b })
        })
        .collect();
    assert_eq!(python_data, sent.iter().collect::<Vec<_>>());
}
