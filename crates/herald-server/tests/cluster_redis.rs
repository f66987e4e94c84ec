//! Several nodes on one Redis behave as one server: a publication sent to any node reaches
//! every subscriber on every node in offset order, exactly once, over WebSocket and SSE; a
//! client recovers on another node what it missed on the first; and subscribers joining on
//! other nodes while a publisher runs get the reply plus the live stream with no gap and no
//! duplicate. Real processes: `redis-server` and three `herald` nodes.

#![allow(clippy::unwrap_used)]

mod cluster;
mod common;

use std::time::Duration;

use common::{RedisServer, Server, TIMEOUT};
use herald_client::StreamPosition;
use serde_json::{json, Value};

fn config(redis: &RedisServer) -> String {
    format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 1000\n", redis.url())
}

async fn nodes(redis: &RedisServer, n: usize) -> Vec<Server> {
    cluster::nodes(&config(redis), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order(&config(
        &redis,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_what_it_missed() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::a_client_recovers_on_another_node_what_it_missed(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_other_nodes_while_one_publishes_miss_nothing() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::subscribers_joining_other_nodes_while_one_publishes_miss_nothing(&config(&redis))
        .await;
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
    // Sixteen publishers at once while Redis is frozen: each answers within the Redis timeout
    // and a margin, not after the others' connection attempts in turn.
    let crowd: Vec<_> = (0..16)
        .map(|k| {
            let base = a.http_base();
            tokio::spawn(async move {
                let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
                // Once the first timeouts dropped the node's connection to Redis: each
                // publish now needs a new one.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                let body = json!({"channel": "h:crowd", "data": k}).to_string();
                let started = tokio::time::Instant::now();
                let (status, _, _) =
                    api.request("POST", "/api/publish", Some(body.as_bytes())).await.unwrap();
                (status, started.elapsed())
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut went_unready = false;
    while tokio::time::Instant::now() < deadline {
        let (status, _, _) = api_b.request("GET", "/readyz", None).await.unwrap();
        went_unready |= status == 503;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(went_unready, "/readyz turned 503 while redis was frozen");
    for publish in crowd {
        let (status, took) = publish.await.unwrap();
        assert!(status == 503 || status == 200, "a crowd publish answered {status}");
        assert!(took < Duration::from_secs(5), "a crowd publish waited {took:?}");
    }
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
    cluster::clients_of_a_killed_node_recover_on_another_with_no_loss(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_on_another_node_with_last_event_id() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::an_sse_stream_resumes_on_another_node_with_last_event_id(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_live_nodes_and_a_dead_one_drops_out() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::every_node_lists_the_live_nodes_and_a_dead_one_drops_out(&config(&redis)).await;
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
    cluster::a_disconnect_by_user_acts_on_every_node(&config(&redis)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets() {
    let Some(redis) = RedisServer::start() else { return };
    cluster::concurrent_publishers_on_several_nodes_get_contiguous_offsets(&config(&redis)).await;
}
