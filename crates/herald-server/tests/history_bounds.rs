//! History against misbehaving readers, over real sockets against the `herald` binary:
//! reads of fresh channel names (WebSocket `subscribe` and `history`, SSE opens,
//! `GET /api/history`) create no stream state, positions read before the first publication
//! still recover exactly, and history replies of a huge channel come back in bounded pages that
//! page forward to every publication exactly once (op `history` and `GET /api/history`).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::StreamPosition;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[namespaces.h]
history_size = 1000
[limits]
max_history_page = 1000
max_history_page_bytes = 524288
"#;

/// `herald_history_streams` from `/metrics`.
async fn streams(server: &Server) -> u64 {
    let mut api = server.api().await;
    let (_, _, body) = api.request("GET", "/metrics", None).await.expect("metrics");
    let text = String::from_utf8(body).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix("herald_history_streams "))
        .and_then(|v| v.trim().parse().ok())
        .expect("herald_history_streams in /metrics")
}

/// Opens a raw SSE stream of `channels`, reads its first bytes, and closes it.
fn open_sse(server: &Server, channels: &[String]) {
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    write!(
        s,
        "GET /sse?{} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
        query.join("&")
    )
    .expect("write");
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).expect("read the head");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn reads_of_fresh_names_create_no_stream_state() {
    let server = Server::start(CONFIG, &[]);
    let (client, _events) = server.client().await;
    for i in 0..200 {
        let sub = client.subscribe(&format!("h:sub{i}"), None).await.expect("subscribe");
        assert_eq!(sub.offset, Some(0));
        let reply = client.history(&format!("h:read{i}"), None, None).await.expect("history");
        assert_eq!(reply["offset"], json!(0));
        let since =
            StreamPosition { offset: 0, epoch: reply["epoch"].as_str().expect("epoch").into() };
        let again =
            client.history(&format!("h:read{i}"), Some(since), Some(0)).await.expect("history");
        assert_eq!(again["offset"], json!(0));
    }
    let mut api = server.api().await;
    for i in 0..200 {
        let page =
            api.json("GET", &format!("/api/history?channel=h:api{i}"), None).await.expect("api");
        assert_eq!(page["offset"], json!(0));
    }
    for batch in 0..10 {
        let names: Vec<String> = (0..20).map(|i| format!("h:sse{batch}x{i}")).collect();
        open_sse(&server, &names);
    }
    assert_eq!(streams(&server).await, 0, "reads kept stream state");
    api.publish("h:sub0", &json!(1)).await.expect("publish");
    assert_eq!(streams(&server).await, 1, "a publication creates its stream");
}

#[tokio::test]
async fn a_position_read_before_the_first_publication_recovers_exactly() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let (client, mut events) = server.client().await;
    let sub = client.subscribe("h:quiet", None).await.expect("subscribe");
    let void = sub.position().expect("position");
    assert_eq!(void.offset, 0);
    // Nothing published yet: that position is complete.
    let (again, _e2) = server.client().await;
    let resumed = again.subscribe("h:quiet", Some(void.clone())).await.expect("resubscribe");
    assert!(resumed.recovered, "nothing was published since the read");
    again.close().await;

    for i in 1..=3 {
        api.publish("h:quiet", &json!(i)).await.expect("publish");
    }
    for i in 1..=3 {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.expect("pub");
        assert_eq!((offset, data), (Some(i), json!(i)));
    }
    client.close().await;
    api.publish("h:quiet", &json!(4)).await.expect("publish");
    // A client that saw offsets 1..=3 after that read (keeping the read's epoch) resumes
    // exactly; one that saw nothing gets everything.
    let (client, _events) = server.client().await;
    let held = StreamPosition { offset: 3, epoch: void.epoch.clone() };
    let sub = client.subscribe("h:quiet", Some(held)).await.expect("resubscribe");
    assert!(sub.recovered);
    assert_eq!(sub.publications, vec![(Some(4), json!(4))]);
    let (client2, _events2) = server.client().await;
    let sub = client2.subscribe("h:quiet", Some(void)).await.expect("resubscribe");
    assert!(sub.recovered);
    assert_eq!(sub.publications.len(), 4);
}

/// Fills `channel` with `n` publications of `size` bytes of `data` each (a JSON string).
async fn fill(server: &Server, channel: &str, n: usize, size: usize) {
    let mut api = server.api().await.with_timeout(Some(Duration::from_secs(60)));
    let mut i = 0;
    while i < n {
        let batch: Vec<(String, Value)> = (i..(i + 50).min(n))
            .map(|k| (channel.to_string(), json!(format!("{k:08}{}", "x".repeat(size - 10)))))
            .collect();
        i += batch.len();
        let answer = api.batch(&batch).await.expect("batch");
        assert!(answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r.get("error").is_none()));
    }
}

/// Checks one page: ascending offsets, within the bounds, data matching the offset.
fn check_page(page: &Value, max_bytes: usize) -> Vec<u64> {
    let pubs = page["publications"].as_array().expect("publications");
    let bytes: usize = pubs.iter().map(|p| p["data"].as_str().expect("string").len() + 2).sum();
    assert!(pubs.len() <= 1000);
    assert!(
        pubs.len() == 1 || bytes <= max_bytes,
        "page of {} publications, {bytes} bytes",
        pubs.len()
    );
    let offsets: Vec<u64> = pubs.iter().map(|p| p["offset"].as_u64().expect("offset")).collect();
    for (p, o) in pubs.iter().zip(&offsets) {
        assert!(p["data"].as_str().expect("string").starts_with(&format!("{:08}", o - 1)));
    }
    assert!(offsets.windows(2).all(|w| w[0] + 1 == w[1]), "{offsets:?}");
    offsets
}

const HUGE: usize = 300;
const SIZE: usize = 100 * 1024;
const PAGE_BYTES: usize = 524288;

#[tokio::test]
async fn history_op_of_a_huge_channel_comes_back_in_bounded_pages() {
    let server = Server::start(CONFIG, &[]);
    fill(&server, "h:huge", HUGE, SIZE).await;
    let (client, _events) = server.client().await;

    // No limit, no since: the newest page only, and `more`.
    let newest = client.history("h:huge", None, None).await.expect("history");
    let offsets = check_page(&newest, PAGE_BYTES);
    assert_eq!(offsets.len(), PAGE_BYTES / (SIZE + 2 + 10), "newest that fit");
    assert_eq!(offsets.last(), Some(&(HUGE as u64)));
    assert_eq!(newest["more"], json!(true));
    let epoch = newest["epoch"].as_str().expect("epoch").to_string();

    // Page forward from the start: every publication exactly once.
    let mut since = StreamPosition { offset: 0, epoch: epoch.clone() };
    let mut all = Vec::new();
    loop {
        let page = client.history("h:huge", Some(since.clone()), None).await.expect("page");
        let offsets = check_page(&page, PAGE_BYTES);
        assert!(!offsets.is_empty());
        all.extend_from_slice(&offsets);
        let last = *offsets.last().expect("one");
        if last == page["offset"].as_u64().expect("offset") {
            assert!(page.get("more").is_none(), "the last page says nothing more");
            break;
        }
        assert_eq!(page["more"], json!(true));
        since = StreamPosition { offset: last, epoch: epoch.clone() };
    }
    assert_eq!(all, (1..=HUGE as u64).collect::<Vec<_>>());

    // A limit within the bounds is honoured without `more`.
    let two = client.history("h:huge", None, Some(2)).await.expect("history");
    assert_eq!(check_page(&two, PAGE_BYTES), [HUGE as u64 - 1, HUGE as u64]);
    assert!(two.get("more").is_none());
}

#[tokio::test]
async fn api_history_of_a_huge_channel_comes_back_in_bounded_pages() {
    let server = Server::start(CONFIG, &[]);
    fill(&server, "h:huge", HUGE, SIZE).await;
    let mut api = server.api().await;
    let newest = api.json("GET", "/api/history?channel=h:huge", None).await.expect("history");
    let offsets = check_page(&newest, PAGE_BYTES);
    assert_eq!(offsets.last(), Some(&(HUGE as u64)));
    assert!(offsets.len() < HUGE);
    assert_eq!(newest["more"], json!(true));
    let epoch = newest["epoch"].as_str().expect("epoch").to_string();
    let mut since = 0u64;
    let mut all = Vec::new();
    loop {
        let path = format!(
            "/api/history?channel=h:huge&since_offset={since}&since_epoch={epoch}&limit=100000"
        );
        let page = api.json("GET", &path, None).await.expect("page");
        let offsets = check_page(&page, PAGE_BYTES);
        all.extend_from_slice(&offsets);
        let last = *offsets.last().expect("one");
        if page.get("more").is_none() {
            assert_eq!(last, HUGE as u64);
            break;
        }
        since = last;
    }
    assert_eq!(all, (1..=HUGE as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_publication_larger_than_a_page_still_comes_back_alone() {
    let server = Server::start(
        "[namespaces.h]\nhistory_size = 10\n[limits]\nmax_history_page_bytes = 1024\n",
        &[],
    );
    fill(&server, "h:big", 3, 4096).await;
    let mut api = server.api().await;
    let newest = api.json("GET", "/api/history?channel=h:big", None).await.expect("history");
    assert_eq!(check_page(&newest, 1024), [3]);
    assert_eq!(newest["more"], json!(true));
    let (client, _events) = server.client().await;
    let epoch = newest["epoch"].as_str().expect("epoch").to_string();
    let first = client
        .history("h:big", Some(StreamPosition { offset: 0, epoch }), None)
        .await
        .expect("history");
    assert_eq!(check_page(&first, 1024), [1]);
    assert_eq!(first["more"], json!(true));
}
