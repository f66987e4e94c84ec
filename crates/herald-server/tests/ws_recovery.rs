//! Recovery over real reconnects: `subscribe` with `since` returns exactly what was missed (or
//! says plainly that it cannot), live publications follow with no gap and no duplicate even
//! while publishes race the subscribe, history expires after its TTL, and the `history` op and
//! `GET /api/history` page through retained publications.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::StreamPosition;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[namespaces.h]
history_size = 5
[namespaces.big]
history_size = 100000
[namespaces.short]
history_size = 10
history_ttl_secs = 1
"#;

fn pos(offset: u64, epoch: &str) -> StreamPosition {
    StreamPosition { offset, epoch: epoch.to_string() }
}

#[tokio::test]
async fn reconnect_recovers_exactly_what_was_missed() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let (client, mut events) = server.client().await;
    let sub = client.subscribe("h:a", None).await.expect("subscribe");
    assert_eq!(sub.offset, Some(0));
    assert!(!sub.recovered && sub.publications.is_empty());
    let epoch = sub.epoch.clone().expect("epoch");
    for i in 1..=3 {
        api.publish("h:a", &json!(i)).await.expect("publish");
    }
    let mut last = 0;
    for i in 1..=3 {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.expect("pub");
        assert_eq!((offset, data), (Some(i), json!(i)));
        last = i;
    }
    client.close().await;

    // Missed while away: 4, 5.
    for i in 4..=5 {
        api.publish("h:a", &json!(i)).await.expect("publish");
    }
    let (client, mut events) = server.client().await;
    let sub = client.subscribe("h:a", Some(pos(last, &epoch))).await.expect("resubscribe");
    assert!(sub.recovered, "nothing is missing");
    assert_eq!(sub.offset, Some(5));
    assert_eq!(sub.publications, vec![(Some(4), json!(4)), (Some(5), json!(5))]);
    api.publish("h:a", &json!(6)).await.expect("publish");
    let (_, offset, data) = events.next_pub(TIMEOUT).await.expect("live");
    assert_eq!((offset, data), (Some(6), json!(6)));

    // Already up to date: recovered with nothing to send.
    let (c2, _e2) = server.client().await;
    let sub = c2.subscribe("h:a", Some(pos(6, &epoch))).await.expect("subscribe");
    assert!(sub.recovered && sub.publications.is_empty());
}

#[tokio::test]
async fn unrecoverable_positions_say_so_with_what_history_has() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut epoch = String::new();
    for i in 1..=12 {
        let r = api.publish("h:t", &json!(i)).await.expect("publish");
        epoch = r["epoch"].as_str().expect("epoch").to_string();
    }
    let (client, _events) = server.client().await;
    // Trimmed: history holds 8..=12 only.
    let sub = client.subscribe("h:t", Some(pos(3, &epoch))).await.expect("subscribe");
    assert!(!sub.recovered);
    let offsets: Vec<u64> = sub.publications.iter().filter_map(|p| p.0).collect();
    assert_eq!(offsets, [8, 9, 10, 11, 12]);
    client.unsubscribe("h:t").await.expect("unsubscribe");
    // Another epoch.
    let sub = client.subscribe("h:t", Some(pos(11, "zzzzzzzz"))).await.expect("subscribe");
    assert!(!sub.recovered);
    assert_eq!(sub.publications.len(), 5);
    client.unsubscribe("h:t").await.expect("unsubscribe");
    // A position from the future.
    let sub = client.subscribe("h:t", Some(pos(99, &epoch))).await.expect("subscribe");
    assert!(!sub.recovered);
    // A channel without history: no offset, no epoch, not recovered.
    let sub = client.subscribe("plain", Some(pos(1, &epoch))).await.expect("subscribe");
    assert!(!sub.recovered && sub.offset.is_none() && sub.epoch.is_none());
    assert!(sub.publications.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_racing_publishes_has_no_gap_and_no_duplicate() {
    const TOTAL: u64 = 3000;
    const CLIENTS: usize = 12;
    let server = Arc::new(Server::start(CONFIG, &[]));
    let done = Arc::new(AtomicBool::new(false));
    // Learn the epoch first.
    let epoch = server.api().await.publish("big:r", &json!(1)).await.expect("publish")["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();

    let pump = {
        let server = server.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut api = server.api().await;
            let mut next = 2;
            while next <= TOTAL {
                let batch: Vec<(String, Value)> = (next..(next + 10).min(TOTAL + 1))
                    .map(|i| ("big:r".to_string(), json!(i)))
                    .collect();
                next += batch.len() as u64;
                api.batch(&batch).await.expect("batch");
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    let mut checks = Vec::new();
    for k in 0..CLIENTS {
        let server = server.clone();
        let epoch = epoch.clone();
        checks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * k as u64)).await;
            let (client, mut events) = server.client().await;
            // Half resume from an earlier position, half start fresh.
            let since = (k % 2 == 0).then(|| pos(1 + k as u64 * 7, &epoch));
            let sub = client.subscribe("big:r", since.clone()).await.expect("subscribe");
            let mut expected = match &since {
                Some(s) => {
                    assert!(sub.recovered, "history is large enough");
                    s.offset + 1
                }
                None => sub.offset.expect("offset") + 1,
            };
            for (offset, data) in &sub.publications {
                assert_eq!(
                    *offset,
                    Some(expected),
                    "client {k}: reply publications are contiguous"
                );
                assert_eq!(data, &json!(expected));
                expected += 1;
            }
            assert_eq!(expected - 1, sub.offset.expect("offset"), "reply ends at its position");
            while expected <= TOTAL {
                let (_, offset, data) = events.next_pub(TIMEOUT).await.expect("live publication");
                assert_eq!(offset, Some(expected), "client {k}: live follows the reply exactly");
                assert_eq!(data, json!(expected));
                expected += 1;
            }
        }));
    }
    for c in checks {
        c.await.expect("client check");
    }
    pump.await.expect("pump");
    assert!(done.load(Ordering::SeqCst));
}

#[tokio::test]
async fn history_expires_after_its_ttl() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let r = api.publish("short:x", &json!(1)).await.expect("publish");
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (client, _events) = server.client().await;
    let sub = client.subscribe("short:x", Some(pos(1, &epoch))).await.expect("subscribe");
    assert!(!sub.recovered, "history expired");
    assert_ne!(sub.epoch.as_deref(), Some(epoch.as_str()), "a new epoch began");
    assert!(sub.publications.is_empty());
    let r = api.publish("short:x", &json!(2)).await.expect("publish");
    assert_eq!(r["offset"], json!(1), "offsets restart in the new epoch");
}

#[tokio::test]
async fn history_op_and_api_page_through_retained_publications() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let mut epoch = String::new();
    for i in 1..=8 {
        epoch = api.publish("h:p", &json!({"n": i})).await.expect("publish")["epoch"]
            .as_str()
            .expect("epoch")
            .to_string();
    }
    let (client, _events) = server.client().await;
    let offsets = |v: &Value| -> Vec<u64> {
        v["publications"]
            .as_array()
            .expect("array")
            .iter()
            .map(|p| p["offset"].as_u64().expect("offset"))
            .collect()
    };
    // Newest 2.
    let h = client.history("h:p", None, Some(2)).await.expect("history");
    assert_eq!((h["offset"].clone(), h["epoch"].clone()), (json!(8), json!(epoch)));
    assert_eq!(offsets(&h), [7, 8]);
    // All retained (5).
    assert_eq!(
        offsets(&client.history("h:p", None, None).await.expect("history")),
        [4, 5, 6, 7, 8]
    );
    // Page forward from 4, two at a time.
    assert_eq!(
        offsets(&client.history("h:p", Some(pos(4, &epoch)), Some(2)).await.expect("h")),
        [5, 6]
    );
    assert_eq!(
        offsets(&client.history("h:p", Some(pos(6, &epoch)), Some(2)).await.expect("h")),
        [7, 8]
    );
    // limit 0: only the position.
    let h = client.history("h:p", None, Some(0)).await.expect("history");
    assert_eq!(h["publications"], json!([]));
    assert_eq!(h["offset"], json!(8));
    // Without history.
    let h = client.history("plain", None, None).await.expect("history");
    assert_eq!(h, json!({"publications": []}));

    // The same over HTTP.
    let (status, _, body) = api
        .request(
            "GET",
            &format!("/api/history?channel=h:p&since_offset=5&since_epoch={epoch}&limit=2"),
            None,
        )
        .await
        .expect("history");
    assert_eq!(status, 200);
    let h: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(offsets(&h), [6, 7]);
    assert_eq!(h["publications"][0]["data"], json!({"n": 6}));
    for (query, code) in [
        ("channel=bad%20name", 400),
        ("channel=nope:x", 404),
        ("", 400),
        ("channel=h:p&since_offset=x&since_epoch=e", 400),
        ("channel=h:p&since_offset=1", 400),
        ("channel=h:p&limit=-1", 400),
    ] {
        let (status, _, body) =
            api.request("GET", &format!("/api/history?{query}"), None).await.expect("req");
        assert_eq!(status, code, "{query}: {}", String::from_utf8_lossy(&body));
    }
    // Retained history is visible in the metrics.
    let (_, _, metrics) = api.request("GET", "/metrics", None).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("herald_history_publications 5"), "{metrics}");
}

/// Publishes `n` publications of about `size` bytes to `channel` in batches of 20; returns the
/// epoch.
async fn fill(
    api: &mut herald_client::HttpApi,
    channel: &str,
    from: u64,
    n: u64,
    size: usize,
) -> String {
    let pad = "q".repeat(size);
    let mut epoch = String::new();
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(20) {
        let batch: Vec<(String, Value)> =
            chunk.iter().map(|i| (channel.to_string(), json!({"i": i, "pad": pad}))).collect();
        let r = api.batch(&batch).await.expect("batch");
        epoch = r["results"][0]["epoch"].as_str().expect("epoch").to_string();
    }
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_larger_than_the_queue_streams_exactly_while_live_traffic_waits() {
    // 400 x 8 KB (3.2 MB) to recover through a 256 KiB queue (128 KiB pages), while the same
    // channel and another one the client already follows get live publications.
    let config = "[limits]\nmax_queue_bytes = 262144\n[namespaces.big]\nhistory_size = 100000\n";
    let server = Arc::new(Server::start(config, &[]));
    let mut api = server.api().await;
    let epoch = fill(&mut api, "big:r", 1, 400, 8000).await;
    let (client, mut events) = server.client().await;
    client.subscribe("big:other", None).await.expect("subscribe");

    const LIVE: u64 = 200;
    let pump = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut api = server.api().await;
            for i in 1..=LIVE {
                let batch = vec![
                    ("big:r".to_string(), json!({"i": 400 + i})),
                    ("big:other".to_string(), json!(i)),
                ];
                api.batch(&batch).await.expect("batch");
            }
        })
    };
    let sub = client.subscribe("big:r", Some(pos(0, &epoch))).await.expect("subscribe");
    assert!(sub.recovered, "history holds everything after offset 0");
    let top = sub.offset.expect("offset");
    assert!(top >= 400);
    assert_eq!(sub.publications.len() as u64, top, "every publication up to the reply's position");
    for (k, (offset, data)) in sub.publications.iter().enumerate() {
        assert_eq!(*offset, Some(k as u64 + 1), "in order, no gap");
        assert_eq!(data["i"], json!(k + 1));
    }
    pump.await.expect("pump");
    let (mut next_r, mut next_other) = (top + 1, 1);
    while next_r <= 400 + LIVE || next_other <= LIVE {
        let (channel, offset, data) = events.next_pub(TIMEOUT).await.expect("live publication");
        if channel == "big:r" {
            assert_eq!(offset, Some(next_r), "live follows the streamed reply exactly");
            assert_eq!(data["i"], json!(next_r));
            next_r += 1;
        } else {
            assert_eq!(data, json!(next_other), "held traffic of other channels keeps its order");
            next_other += 1;
        }
    }
    assert!(client.history("big:r", None, Some(0)).await.is_ok(), "still connected");
}

#[tokio::test]
async fn a_reader_cut_inside_a_streamed_recovery_gets_only_a_close_frame_after_the_parts() {
    let config = "[limits]\nmax_queue_bytes = 262144\nslow_consumer_grace_ms = 300\n\
                  [namespaces.big]\nhistory_size = 100000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let epoch = fill(&mut api, "big:r", 1, 400, 8000).await;
    let mut raw = common::RawWs::connect(&server, 4096);
    raw.send(&json!({"op": "subscribe", "id": 1, "channel": "big:other"}).to_string());
    raw.send(
        &json!({"op": "subscribe", "id": 2, "channel": "big:r", "since": {"offset": 0, "epoch": epoch}})
            .to_string(),
    );
    // Live traffic held behind the open reply grows the queue while the client reads nothing.
    let pad = "z".repeat(8000);
    for i in 0..100 {
        api.publish("big:other", &json!({"i": i, "pad": pad})).await.expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The decoder refuses any data frame inside the fragmented reply: reading to the close
    // frame proves only control frames followed the parts.
    let (messages, code) =
        tokio::task::spawn_blocking(move || raw.read_until(Duration::from_secs(10), |_| false))
            .await
            .expect("reader");
    assert_eq!(code, Some(4008), "cut as a slow consumer");
    assert!(
        messages.iter().all(|m| m.get("disconnect").is_none() && m["id"] != json!(2)),
        "no disconnect push and no complete reply inside the open reply: {:?}",
        messages
            .iter()
            .map(|m| m.to_string().chars().take(80).collect::<String>())
            .collect::<Vec<_>>()
    );
    let text = common::metrics(&server).await;
    assert_eq!(common::metric(&text, r#"herald_disconnects_total{code="4008"}"#), 1.0);
}

#[tokio::test]
async fn several_large_recoveries_in_one_frame_are_all_complete() {
    // 1,000 publications of ~1 KB retained per channel, a 256 KiB queue.
    let config = "[limits]\nmax_queue_bytes = 262144\n[namespaces.big]\nhistory_size = 1000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let mut epochs = Vec::new();
    for c in ["r", "s", "t"] {
        epochs.push(fill(&mut api, &format!("big:{c}"), 1, 1000, 1000).await);
    }
    let (client, mut events) = server.client().await;
    let frame = (0..3)
        .map(|k| {
            json!({"op": "subscribe", "id": 100 + k, "channel": format!("big:{}", ["r", "s", "t"][k]),
                   "since": {"offset": 0, "epoch": epochs[k]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    client.send_text(&frame).await.expect("send");
    // Commands are handled in order: once this reply is in, the three are subscribed.
    let sub = client.subscribe("big:u", None).await.expect("still connected");
    assert!(!sub.recovered);
    let r = api.publish("big:r", &json!({"live": true})).await.expect("publish");
    let (_, offset, data) = events.next_pub(TIMEOUT).await.expect("live publication, no 4008");
    assert_eq!(offset, r["offset"].as_u64());
    assert_eq!(data, json!({"live": true}));
    client.close().await;

    // One live publication trimmed offset 1 from the 1,000 kept: since 1, all 1,000 are due.
    let (client, _events) = server.client().await;
    let sub = client.subscribe("big:r", Some(pos(1, &epochs[0]))).await.expect("subscribe");
    assert!(sub.recovered, "history holds all of it");
    let offsets: Vec<u64> = sub.publications.iter().filter_map(|p| p.0).collect();
    assert_eq!(offsets, (2..=1001).collect::<Vec<_>>());
    assert_eq!(sub.offset, Some(1001));
    // From before history: what it has, oldest first, and `recovered: false`.
    let sub = client.subscribe("big:s", Some(pos(0, &epochs[1]))).await.expect("subscribe");
    assert!(sub.recovered, "nothing was trimmed on big:s");
    assert_eq!(sub.publications.len(), 1000);
    let sub = client.subscribe("big:t", Some(pos(0, "another"))).await.expect("subscribe");
    assert!(!sub.recovered, "another epoch");
    assert_eq!(sub.publications.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_just_after_a_streamed_recovery_ends_never_breaks_the_framing() {
    // Recoveries of several sizes to a reader that reads nothing, with live traffic held
    // behind them: the cut (4008) lands before, inside, or just after the reply's last part was
    // queued. Whatever the peer received must stay valid WebSocket framing: the test decoder
    // refuses a data frame (the `disconnect` push) inside an unfinished fragmented message.
    let config = "[limits]\nmax_queue_bytes = 262144\nslow_consumer_grace_ms = 300\n\
                  [namespaces.big]\nhistory_size = 100000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let pad = "y".repeat(8000);
    for pages in [2u64, 3, 4, 6, 8, 12, 16, 24] {
        let channel = format!("big:r{pages}");
        let epoch = fill(&mut api, &channel, 1, pages * 16, 8000).await;
        let mut raw = common::RawWs::connect(&server, 4096);
        raw.send(&json!({"op": "subscribe", "id": 1, "channel": "big:other"}).to_string());
        raw.send(
            &json!({"op": "subscribe", "id": 2, "channel": channel,
                    "since": {"offset": 0, "epoch": epoch}})
            .to_string(),
        );
        for i in 0..60 {
            api.publish("big:other", &json!({"i": i, "pad": pad})).await.expect("publish");
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (_, code) =
            tokio::task::spawn_blocking(move || raw.read_until(Duration::from_secs(10), |_| false))
                .await
                .unwrap_or_else(|e| panic!("{pages} pages: the stream broke its framing: {e}"));
        assert_eq!(code, Some(4008), "{pages} pages: cut as a slow consumer");
    }
}
