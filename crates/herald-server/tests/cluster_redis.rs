//! Several nodes on one Redis behave as one server: a publication sent to any node reaches
//! every subscriber on every node in offset order, exactly once, over WebSocket and SSE; a
//! client recovers on another node what it missed on the first; and subscribers joining on
//! other nodes while a publisher runs get the reply plus the live stream with no gap and no
//! duplicate. Real processes: `redis-server` and three `herald` nodes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RedisServer, Server, TIMEOUT};
use herald_client::StreamPosition;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(redis: &RedisServer) -> String {
    format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 1000\n", redis.url())
}

async fn nodes(redis: &RedisServer, n: usize) -> Vec<Server> {
    let config = config(redis);
    let nodes: Vec<Server> = (0..n).map(|_| Server::start(&config, &[])).collect();
    for node in &nodes {
        common::wait_ready(node, TIMEOUT).await;
    }
    nodes
}

/// Reads `count` `pub` events of an SSE stream (raw socket); returns their (offset, data).
async fn sse_pubs(addr: std::net::SocketAddr, path: &str, count: usize) -> Vec<(u64, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while out.len() < count {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("SSE events in time")
            .unwrap();
        assert!(n > 0, "the stream ended after {} events", out.len());
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if block.contains("event: pub\n") {
                let line = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                let v: Value = serde_json::from_str(line).unwrap();
                out.push((v["offset"].as_u64().unwrap(), v["data"].clone()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (cb, mut eb) = b.client().await;
    let (cc, mut ec) = c.client().await;
    cb.subscribe("h:x", None).await.unwrap();
    cc.subscribe("h:x", None).await.unwrap();
    let sse = tokio::spawn(sse_pubs(c.addr, "/sse?channel=h:x", 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 100 single publications on A, then 100 in batches on B.
    let mut api_a = a.api().await;
    for i in 1..=100 {
        api_a.publish("h:x", &json!(i)).await.unwrap();
    }
    let mut api_b = b.api().await;
    for chunk in (101..=200).collect::<Vec<i32>>().chunks(25) {
        let batch: Vec<(String, Value)> =
            chunk.iter().map(|i| ("h:x".to_string(), json!(i))).collect();
        api_b.batch(&batch).await.unwrap();
    }
    for (name, events) in [("B", &mut eb), ("C", &mut ec)] {
        for i in 1..=200u64 {
            let (channel, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
            assert_eq!((channel.as_str(), offset, data), ("h:x", Some(i), json!(i)), "node {name}");
        }
    }
    let got = tokio::time::timeout(TIMEOUT * 2, sse).await.unwrap().unwrap();
    let want: Vec<(u64, Value)> = (1..=200u64).map(|i| (i, json!(i))).collect();
    assert_eq!(got, want, "the SSE stream on C");
    // Nothing more: no duplicate arrives.
    assert!(eb.next_pub(Duration::from_millis(300)).await.is_err(), "no duplicate on B");
    drop((cb, cc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_what_it_missed() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut api = a.api().await;
    let (client, mut events) = b.client().await;
    let sub = client.subscribe("h:r", None).await.unwrap();
    let epoch = sub.epoch.clone().unwrap();
    for i in 1..=5 {
        api.publish("h:r", &json!(i)).await.unwrap();
    }
    for i in 1..=5u64 {
        assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(i));
    }
    client.close().await;
    for i in 6..=9 {
        api.publish("h:r", &json!(i)).await.unwrap();
    }
    // Node B's history read said epoch E at offset 0 (a void epoch: nothing was published
    // yet); the first publication made the stream whose epoch the pubs carry.
    let (_, _, body) = api.request("GET", "/api/history?channel=h:r&limit=0", None).await.unwrap();
    let h: Value = serde_json::from_slice(&body).unwrap();
    let stream_epoch = h["epoch"].as_str().unwrap().to_string();
    let cases =
        [(stream_epoch.as_str(), "stream epoch"), (epoch.as_str(), "void epoch of the first read")];
    for (k, (since_epoch, what)) in cases.into_iter().enumerate() {
        let (client, mut events) = c.client().await;
        let pos = StreamPosition { offset: 5, epoch: since_epoch.to_string() };
        let sub = client.subscribe("h:r", Some(pos)).await.unwrap();
        assert!(sub.recovered, "{what}: history on Redis holds 6..9");
        // 6..9, and the live publication of the case before.
        let got: Vec<Option<u64>> = sub.publications.iter().map(|p| p.0).collect();
        let want: Vec<Option<u64>> = (6..=9 + k as u64).map(Some).collect();
        assert_eq!(got, want, "{what}");
        api.publish("h:r", &json!("live")).await.unwrap();
        let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!(data, json!("live"), "{what}");
        assert!(offset.unwrap() >= 10, "{what}");
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_other_nodes_while_one_publishes_miss_nothing() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut api = a.api().await;
    let first = api.publish("h:race", &json!(1)).await.unwrap();
    let epoch = first["epoch"].as_str().unwrap().to_string();
    const TOTAL: u64 = 400;
    let pump = {
        let base = a.http_base();
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            for i in 2..=TOTAL {
                api.publish("h:race", &json!(i)).await.unwrap();
            }
        })
    };
    let mut joiners = Vec::new();
    for k in 0..8u64 {
        let url = if k % 2 == 0 { b.ws_url() } else { c.ws_url() };
        let epoch = epoch.clone();
        joiners.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * k)).await;
            let (client, mut events, _) =
                herald_client::Client::connect(&url, Default::default()).await.unwrap();
            let pos = StreamPosition { offset: 1, epoch };
            let sub = client.subscribe("h:race", Some(pos)).await.unwrap();
            assert!(sub.recovered, "joiner {k}");
            let mut seen: Vec<u64> = sub.publications.iter().filter_map(|p| p.0).collect();
            while seen.last().copied().unwrap_or(1) < TOTAL {
                let (_, offset, _) = events.next_pub(TIMEOUT).await.unwrap();
                seen.push(offset.unwrap());
            }
            assert_eq!(seen, (2..=TOTAL).collect::<Vec<u64>>(), "joiner {k}: reply then live");
            client.close().await;
        }));
    }
    pump.await.unwrap();
    for j in joiners {
        tokio::time::timeout(TIMEOUT * 2, j).await.unwrap().unwrap();
    }
}

/// Sends one inline command to Redis and returns its first reply line.
fn redis_command(redis: &RedisServer, command: &str) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pubsub_connection_is_caught_up_from_history() {
    // Redis drops the nodes' pub/sub connections three times while a publisher runs: what was
    // published meanwhile reaches the subscribers from history, in order, once.
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, mut events) = b.client().await;
    client.subscribe("h:k", None).await.unwrap();
    const TOTAL: u64 = 600;
    let pump = {
        let base = a.http_base();
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            for i in 1..=TOTAL {
                api.publish("h:k", &json!(i)).await.unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed = redis_command(&redis, "CLIENT KILL TYPE pubsub");
        assert!(killed.starts_with(':'), "{killed}");
    }
    pump.await.unwrap();
    for i in 1..=TOTAL {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!((offset, data), (Some(i), json!(i)), "in order, none missing, none twice");
    }
    assert!(events.next_pub(Duration::from_millis(300)).await.is_err(), "no duplicate");
    let m = common::metrics(b).await;
    assert_eq!(common::metric(&m, "herald_broker_channels_lost_total"), 0.0);
    assert!(common::metric(&m, "herald_broker_reconnects_total") >= 3.0, "counted");
    assert!(b.log().contains("caught up from redis history"), "a gap was filled");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_channels_are_caught_up_after_a_lost_pubsub_connection() {
    // 100 channels, published in batches on A while Redis drops the pub/sub connections
    // twice: every channel's subscriber on B gets its whole sequence, in order, once (the
    // catch-up reads of the channels run concurrently after each reconnect).
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    const CHANNELS: usize = 100;
    const ROUNDS: u64 = 20;
    let (client, mut events) = b.client().await;
    for c in 0..CHANNELS {
        client.subscribe(&format!("h:m{c}"), None).await.unwrap();
    }
    let pump = {
        let base = a.http_base();
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            for round in 1..=ROUNDS {
                let batch: Vec<(String, Value)> =
                    (0..CHANNELS).map(|c| (format!("h:m{c}"), json!(round))).collect();
                api.batch(&batch).await.unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        let killed = redis_command(&redis, "CLIENT KILL TYPE pubsub");
        assert!(killed.starts_with(':'), "{killed}");
    }
    pump.await.unwrap();
    let mut next = vec![1u64; CHANNELS];
    for _ in 0..CHANNELS as u64 * ROUNDS {
        let (channel, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        let c: usize = channel.strip_prefix("h:m").unwrap().parse().unwrap();
        assert_eq!((offset, data), (Some(next[c]), json!(next[c])), "{channel}: in order, once");
        next[c] += 1;
    }
    assert!(events.next_pub(Duration::from_millis(300)).await.is_err(), "no duplicate");
    let m = common::metrics(b).await;
    assert_eq!(common::metric(&m, "herald_broker_channels_lost_total"), 0.0);
    assert!(common::metric(&m, "herald_broker_reconnects_total") >= 2.0, "counted");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_tells_subscribers_and_the_node_serves_on() {
    // Redis dies and comes back without its data: the node does not crash, /readyz goes 503
    // and back, the subscriber is cut with 4008 (its history is gone: it must recover), and
    // publishing works again in a new epoch.
    let Some(mut redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, mut events) = b.client().await;
    let sub = client.subscribe("h:z", None).await.unwrap();
    let mut api = a.api().await;
    let first = api.publish("h:z", &json!(1)).await.unwrap();
    assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(1));
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let mut api_b = b.api().await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (status, _, _) = api_b.request("GET", "/readyz", None).await.unwrap();
        if status == 503 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/readyz stayed 200 with redis down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, _) =
        api.request("POST", "/api/publish", Some(br#"{"channel":"h:z","data":2}"#)).await.unwrap();
    assert_eq!(status, 503, "publishing without redis is refused");
    redis.restart(&[]);
    for node in [a, b] {
        common::wait_ready(node, TIMEOUT * 2).await;
    }
    // Its channel's history is gone: the subscriber is told to recover.
    let mut code = None;
    while let Some(event) = tokio::time::timeout(TIMEOUT, events.recv()).await.unwrap() {
        if let herald_client::Event::Disconnect { code: c, reconnect, .. } = event {
            assert!(reconnect);
            code = Some(c);
        }
    }
    assert_eq!(code, Some(4008));
    // It reconnects and recovers: another epoch, `recovered: false`, then live again.
    let (client, mut events) = b.client().await;
    let pos = StreamPosition { offset: 1, epoch: first["epoch"].as_str().unwrap().to_string() };
    let again = client.subscribe("h:z", Some(pos)).await.unwrap();
    assert!(!again.recovered, "the history was lost with redis");
    let r = api.publish("h:z", &json!(3)).await.unwrap();
    assert_ne!(r["epoch"], first["epoch"], "a new epoch");
    let (_, _, data) = events.next_pub(TIMEOUT).await.unwrap();
    assert_eq!(data, json!(3));
    assert_eq!(common::metric(&common::metrics(b).await, "herald_broker_channels_lost_total"), 1.0);
    drop(sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_makes_publishes_fail_fast_and_nothing_is_lost_after() {
    // Redis stops answering (SIGSTOP) for 5 s while a publisher runs: publishes answer 503
    // within the Redis timeout (never hang), the nodes turn not-ready (their pub/sub probes do
    // not come back), and once Redis resumes the subscriber gets every acknowledged
    // publication, offsets contiguous (a publish that timed out may still have happened: it is
    // then a publication like any other).
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, mut events) = b.client().await;
    client.subscribe("h:f", None).await.unwrap();
    let pump = {
        let base = a.http_base();
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            let (mut acknowledged, mut refused, mut slowest) = (Vec::new(), 0, Duration::ZERO);
            let end = tokio::time::Instant::now() + Duration::from_secs(9);
            let mut i = 0u64;
            while tokio::time::Instant::now() < end {
                i += 1;
                let body = json!({"channel": "h:f", "data": i}).to_string();
                let started = tokio::time::Instant::now();
                let (status, _, _) =
                    api.request("POST", "/api/publish", Some(body.as_bytes())).await.unwrap();
                slowest = slowest.max(started.elapsed());
                match status {
                    200 => acknowledged.push(i),
                    503 => refused += 1,
                    other => panic!("publish answered {other}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acknowledged, refused, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = redis.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let mut api_b = b.api().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut went_unready = false;
    while tokio::time::Instant::now() < deadline {
        let (status, _, _) = api_b.request("GET", "/readyz", None).await.unwrap();
        went_unready |= status == 503;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(went_unready, "/readyz turned 503 while redis was frozen");
    let (acknowledged, refused, slowest) = pump.await.unwrap();
    assert!(refused > 0, "publishes were refused while redis was frozen");
    assert!(slowest < Duration::from_secs(4), "no publish hung: slowest {slowest:?}");
    for node in [a, b] {
        common::wait_ready(node, TIMEOUT).await;
    }
    // Everything published, in order, offsets contiguous: wait for the last acknowledged one.
    let last = *acknowledged.last().unwrap();
    let mut seen = Vec::new();
    let mut next_offset = 1;
    while !seen.contains(&last) {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!(offset, Some(next_offset), "offsets contiguous, none skipped or repeated");
        next_offset += 1;
        seen.push(data.as_u64().unwrap());
    }
    for i in &acknowledged {
        assert!(seen.contains(i), "acknowledged publication {i} was delivered");
    }
    drop(client);
}

/// Every RESP bulk string of one reply (enough for `PUBSUB CHANNELS`).
fn redis_list(redis: &RedisServer, command: &str) -> Vec<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(text).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with('$'))
        .filter_map(|(i, _)| lines.get(i + 1).map(|v| v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_subscribe_in_redis_only_to_the_channels_their_clients_use() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let channels = || {
        let mut c: Vec<String> = redis_list(&redis, "PUBSUB CHANNELS herald:{*");
        c.sort();
        c
    };
    assert!(channels().is_empty(), "nobody subscribed yet");
    let (c1, _e1) = nodes[0].client().await;
    let (c2, _e2) = nodes[1].client().await;
    c1.subscribe("h:one", None).await.unwrap();
    c2.subscribe("h:one", None).await.unwrap();
    c2.subscribe("h:two", None).await.unwrap();
    assert_eq!(channels(), ["herald:{h:one}", "herald:{h:two}"]);
    // `/api/channels` answers for the node asked, and says so.
    let mut api = nodes[1].api().await;
    let (_, _, body) = api.request("GET", "/api/channels", None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["scope"], json!("node"));
    assert_eq!(v["channels"].as_array().unwrap().len(), 2, "{v}");
    c2.unsubscribe("h:two").await.unwrap();
    assert_eq!(channels(), ["herald:{h:one}"], "the last subscriber left h:two");
    c1.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(channels(), ["herald:{h:one}"], "node 2 still has a subscriber of h:one");
    c2.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(channels().is_empty(), "no node has subscribers any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_recover_on_another_with_no_loss() {
    let Some(redis) = RedisServer::start() else { return };
    let mut nodes = nodes(&redis, 3).await;
    let mut api = nodes[0].api().await;
    let (client, mut events) = nodes[1].client().await;
    client.subscribe("h:kill", None).await.unwrap();
    let mut last = None;
    for i in 1..=50u64 {
        let r = api.publish("h:kill", &json!(i)).await.unwrap();
        last = Some(r["epoch"].as_str().unwrap().to_string());
    }
    let epoch = last.unwrap();
    let mut got = 0;
    while got < 30 {
        got = events.next_pub(TIMEOUT).await.unwrap().1.unwrap();
    }
    // Node 1 dies (SIGKILL) after its client saw 30; 20 more are published meanwhile.
    nodes[1].child.kill().unwrap();
    nodes[1].child.wait().unwrap();
    for i in 51..=70u64 {
        api.publish("h:kill", &json!(i)).await.unwrap();
    }
    let (client, mut events) = nodes[2].client().await;
    let pos = StreamPosition { offset: got, epoch };
    let sub = client.subscribe("h:kill", Some(pos)).await.unwrap();
    assert!(sub.recovered);
    let offsets: Vec<u64> = sub.publications.iter().filter_map(|p| p.0).collect();
    assert_eq!(offsets, (got + 1..=70).collect::<Vec<u64>>(), "exactly what it missed");
    api.publish("h:kill", &json!(71)).await.unwrap();
    assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(71));
    nodes.remove(1);
}

/// Reads SSE blocks until `count` `pub` events arrived; returns their data and the last id.
async fn sse_read(
    stream: &mut tokio::net::TcpStream,
    count: usize,
) -> (Vec<Value>, Option<String>) {
    let mut text = String::new();
    let mut buf = vec![0u8; 65536];
    let (mut out, mut last_id) = (Vec::new(), None);
    while out.len() < count {
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended");
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
                last_id = Some(id.to_string());
            }
            if block.contains("event: pub\n") {
                let line = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                out.push(serde_json::from_str::<Value>(line).unwrap()["data"].clone());
            }
        }
    }
    (out, last_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_on_another_node_with_last_event_id() {
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 3).await;
    let mut api = nodes[0].api().await;
    let open = |addr: std::net::SocketAddr, last: Option<String>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = "GET /sse?channel=h:sse HTTP/1.1\r\nHost: x\r\n".to_string();
        if let Some(id) = last {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s
    };
    let mut s = open(nodes[1].addr, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 1..=3 {
        api.publish("h:sse", &json!(i)).await.unwrap();
    }
    let (got, last) = sse_read(&mut s, 3).await;
    assert_eq!(got, [json!(1), json!(2), json!(3)]);
    drop(s);
    for i in 4..=6 {
        api.publish("h:sse", &json!(i)).await.unwrap();
    }
    // The browser reconnects to another node with the id it last saw.
    let mut s = open(nodes[2].addr, last).await;
    let (got, _) = sse_read(&mut s, 3).await;
    assert_eq!(got, [json!(4), json!(5), json!(6)], "exactly what it missed, no reset");
    api.publish("h:sse", &json!(7)).await.unwrap();
    let (got, _) = sse_read(&mut s, 1).await;
    assert_eq!(got, [json!(7)]);
}

/// The ids `/api/info` of `node` lists.
async fn listed(node: &Server) -> Vec<String> {
    let mut api = node.api().await;
    let (_, _, body) = api.request("GET", "/api/info", None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_live_nodes_and_a_dead_one_drops_out() {
    let Some(redis) = RedisServer::start() else { return };
    let mut nodes = nodes(&redis, 3).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for n in &nodes {
            ids.push(listed(n).await[0].clone());
        }
        ids
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut seen = listed(&nodes[0]).await;
        seen.sort();
        let mut all = ids.clone();
        all.sort();
        if seen == all {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "all three announced: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first entry is the node answering, with its address.
    let mut api = nodes[1].api().await;
    let (_, _, body) = api.request("GET", "/api/info", None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["nodes"][0]["address"], json!(nodes[1].addr.to_string()));
    // Node 2 dies: it drops out within three announcement intervals (6 s).
    nodes[2].child.kill().unwrap();
    nodes[2].child.wait().unwrap();
    let died = std::time::Instant::now();
    loop {
        let seen = listed(&nodes[0]).await;
        if !seen.contains(&ids[2]) {
            assert_eq!(seen.len(), 2);
            break;
        }
        assert!(died.elapsed() < Duration::from_secs(9), "the dead node is still listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes.remove(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_with_its_data_never_lets_an_epoch_continue() {
    // Redis with an append-only file, killed and restarted from it: it may have lost writes
    // (not here, with `always`, but Herald cannot know), so its offsets are not trusted across
    // the restart: a new epoch, the subscriber is told (4008), and a client that held a
    // position from before recovers with `recovered: false` and what history still holds.
    let dir = std::env::temp_dir().join(format!("herald-redis-aof-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap().to_string();
    let aof = ["--appendonly", "yes", "--appendfsync", "always", "--dir", dir_arg.as_str()];
    let Some(mut redis) = RedisServer::start_with(&aof) else { return };
    let nodes = nodes(&redis, 2).await;
    let (client, mut events) = nodes[1].client().await;
    client.subscribe("h:aof", None).await.unwrap();
    let mut api = nodes[0].api().await;
    let mut before = Value::Null;
    for i in 1..=5 {
        before = api.publish("h:aof", &json!(i)).await.unwrap();
    }
    for i in 1..=5u64 {
        assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(i));
    }
    redis.restart(&aof);
    for node in &nodes {
        common::wait_ready(node, TIMEOUT * 2).await;
    }
    let mut code = None;
    while let Some(event) = tokio::time::timeout(TIMEOUT, events.recv()).await.unwrap() {
        if let herald_client::Event::Disconnect { code: c, .. } = event {
            code = Some(c);
        }
    }
    assert_eq!(code, Some(4008), "the subscriber is told to recover");
    let after = api.publish("h:aof", &json!(6)).await.unwrap();
    assert_ne!(after["epoch"], before["epoch"], "a new epoch after the restart");
    assert_eq!(after["offset"], json!(1));
    let (client, _events) = nodes[1].client().await;
    let pos = StreamPosition { offset: 5, epoch: before["epoch"].as_str().unwrap().to_string() };
    let sub = client.subscribe("h:aof", Some(pos)).await.unwrap();
    assert!(!sub.recovered, "never a false recovered across a restart");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_by_user_acts_on_every_node() {
    let Some(redis) = RedisServer::start() else { return };
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let config = format!("{}[auth]\nhmac_secret = \"{SECRET}\"\n", config(&redis));
    let nodes: Vec<Server> = (0..2).map(|_| Server::start(&config, &[])).collect();
    for node in &nodes {
        common::wait_ready(node, TIMEOUT).await;
    }
    let token = herald_server::auth::sign_hs256(SECRET.as_bytes(), &json!({"sub": "u1"}));
    let connect = |url: String, token: Option<String>| async move {
        let options = herald_client::ConnectOptions { token, ..Default::default() };
        let (c, e, _) = herald_client::Client::connect(&url, options).await.unwrap();
        (c, e)
    };
    let (_a, mut ea) = connect(nodes[0].ws_url(), Some(token.clone())).await;
    let (_b, mut eb) = connect(nodes[1].ws_url(), Some(token)).await;
    let (other, _eo) = connect(nodes[1].ws_url(), None).await;
    let mut api = nodes[0].api().await;
    let (status, _, body) =
        api.request("POST", "/api/disconnect", Some(br#"{"user":"u1"}"#)).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["disconnected"], json!(1));
    for (name, events) in [("node 0", &mut ea), ("node 1", &mut eb)] {
        let mut code = None;
        while let Some(event) = tokio::time::timeout(TIMEOUT, events.recv()).await.unwrap() {
            if let herald_client::Event::Disconnect { code: c, .. } = event {
                code = Some(c);
            }
        }
        assert_eq!(code, Some(4000), "{name}: u1 disconnected");
    }
    assert!(other.history("h:x", None, Some(0)).await.is_ok(), "another user stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_gap_after_a_lost_pubsub_connection_is_caught_up_page_by_page() {
    // The pub/sub connections are dropped and 900 publications follow at once (history keeps
    // 1,000): the node catches up what it missed, more than a page of history (500) when the
    // reconnect is slow enough, and the subscriber gets all, in order.
    let Some(redis) = RedisServer::start() else { return };
    let nodes = nodes(&redis, 2).await;
    let (client, mut events) = nodes[1].client().await;
    client.subscribe("h:long", None).await.unwrap();
    let mut api = nodes[0].api().await;
    let killed = redis_command(&redis, "CLIENT KILL TYPE pubsub");
    assert!(killed.starts_with(':'), "{killed}");
    for chunk in (1..=900u64).collect::<Vec<_>>().chunks(300) {
        let batch: Vec<(String, Value)> =
            chunk.iter().map(|i| ("h:long".to_string(), json!(i))).collect();
        api.batch(&batch).await.unwrap();
    }
    for i in 1..=900u64 {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!((offset, data), (Some(i), json!(i)), "in order, none missing, none twice");
    }
    let m = common::metrics(&nodes[1]).await;
    assert_eq!(common::metric(&m, "herald_broker_channels_lost_total"), 0.0);
    drop(client);
}

/// `rediss://`: nodes reach a Redis that speaks only TLS and requires client certificates
/// (CA, server and client certificates made by the test), fan out and recover across nodes
/// over it; a node that does not trust the server's certificate, or has no client certificate,
/// never turns ready and answers publishes 503 instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_redis_over_tls_and_an_untrusting_node_stays_unready() {
    let pki = common::TestPki::new();
    let Some(redis) = RedisServer::start_tls(&pki) else { return };
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let file = |name: &str| pki.path(name).to_str().unwrap().to_string();
    let tls_config = |ca: &str, client: bool| {
        let mut c = format!(
            "broker = \"{url}\"\n[namespaces.h]\nhistory_size = 100\n[broker_tls]\nca_file = \"{}\"\n",
            file(ca)
        );
        if client {
            c += &format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                file("client.pem"),
                file("client.key")
            );
        }
        c
    };
    let good = tls_config("ca.pem", true);
    let (a, b) = (Server::start(&good, &[]), Server::start(&good, &[]));
    common::wait_ready(&a, TIMEOUT).await;
    common::wait_ready(&b, TIMEOUT).await;
    let (client, mut events) = b.client().await;
    client.subscribe("h:tls", None).await.unwrap();
    let mut api = a.api().await;
    for i in 1..=20 {
        api.publish("h:tls", &json!(i)).await.unwrap();
    }
    for i in 1..=20u64 {
        let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!((offset, data), (Some(i), json!(i)), "fan-out across nodes over TLS");
    }
    // History on the TLS Redis: a client on A recovers from offset 15 of B's epoch.
    let epoch = {
        let (_, _, body) =
            api.request("GET", "/api/history?channel=h:tls&limit=0", None).await.unwrap();
        let h: Value = serde_json::from_slice(&body).unwrap();
        h["epoch"].as_str().unwrap().to_string()
    };
    let (other, _e) = a.client().await;
    let sub = other.subscribe("h:tls", Some(StreamPosition { offset: 15, epoch })).await.unwrap();
    assert!(sub.recovered);
    let got: Vec<Option<u64>> = sub.publications.iter().map(|p| p.0).collect();
    assert_eq!(got, (16..=20).map(Some).collect::<Vec<_>>());
    // Another CA, or no client certificate: never ready, publishes fail fast with 503.
    for (config, what) in [
        (tls_config("other-ca.pem", true), "untrusted server"),
        (tls_config("ca.pem", false), "no client certificate"),
    ] {
        let node = Server::start(&config, &[]);
        let mut api = node.api().await;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            let (status, _, _) = api.request("GET", "/readyz", None).await.unwrap();
            assert_eq!(status, 503, "{what}: /readyz");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let body = serde_json::to_vec(&json!({"channel": "h:tls", "data": 1})).unwrap();
        let t = std::time::Instant::now();
        let (status, _, _) = api.request("POST", "/api/publish", Some(&body)).await.unwrap();
        assert_eq!(status, 503, "{what}: publish");
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: the publish answered in time");
    }
    drop((client, other));
}
