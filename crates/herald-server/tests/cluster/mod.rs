//! Cluster behaviour every broker must show (fan-out, recovery and the publish/subscribe race
//! across nodes, a killed node, SSE resumption, the registry, cluster-wide disconnect), written
//! once and run by each broker's test file (`cluster_redis.rs`, `cluster_nats.rs`) against
//! nodes configured with `config` (its `broker` and a namespace `h` with history).
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use herald_client::StreamPosition;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Server, TIMEOUT};

/// `n` nodes started with `config`, each ready (broker connected).
pub async fn nodes(config: &str, n: usize) -> Vec<Server> {
    let nodes: Vec<Server> = (0..n).map(|_| Server::start(config, &[])).collect();
    for node in &nodes {
        common::wait_ready(node, TIMEOUT).await;
    }
    nodes
}

/// Reads `count` `pub` events of an SSE stream (raw socket); returns their (offset, data).
pub async fn sse_pubs(addr: std::net::SocketAddr, path: &str, count: usize) -> Vec<(u64, Value)> {
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

/// Reads SSE blocks until `count` `pub` events arrived; returns their data and the last id.
pub async fn sse_read(
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

/// The ids `/api/info` of `node` lists.
pub async fn listed(node: &Server) -> Vec<String> {
    let mut api = node.api().await;
    let (_, _, body) = api.request("GET", "/api/info", None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
}

pub async fn a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order(
    config: &str,
) {
    let nodes = nodes(config, 3).await;
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

pub async fn a_client_recovers_on_another_node_what_it_missed(config: &str) {
    let nodes = nodes(config, 3).await;
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

pub async fn subscribers_joining_other_nodes_while_one_publishes_miss_nothing(config: &str) {
    let nodes = nodes(config, 3).await;
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

pub async fn clients_of_a_killed_node_recover_on_another_with_no_loss(config: &str) {
    let mut nodes = nodes(config, 3).await;
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

pub async fn an_sse_stream_resumes_on_another_node_with_last_event_id(config: &str) {
    let nodes = nodes(config, 3).await;
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

pub async fn every_node_lists_the_live_nodes_and_a_dead_one_drops_out(config: &str) {
    let mut nodes = nodes(config, 3).await;
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

pub async fn a_disconnect_by_user_acts_on_every_node(config: &str) {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let config = format!("{}[auth]\nhmac_secret = \"{SECRET}\"\n", config);
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

/// Publishers on two nodes at once, four each, all into one channel: the offsets the
/// publishers are given are distinct and contiguous (1..=N, nothing skipped, nothing twice),
/// and a subscriber on a third node receives every publication once, in offset order, with
/// the offset its publisher was given.
pub async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets(config: &str) {
    const EACH: u64 = 100;
    let nodes = nodes(config, 3).await;
    let (client, mut events) = nodes[2].client().await;
    client.subscribe("h:multi", None).await.unwrap();
    let mut publishers = Vec::new();
    for (n, node) in nodes[..2].iter().enumerate() {
        for p in 0..4u64 {
            let base = node.http_base();
            publishers.push(tokio::spawn(async move {
                let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
                let mut given = Vec::new();
                for i in 0..EACH {
                    let data = json!(format!("{n}.{p}.{i}"));
                    let r = api.publish("h:multi", &data).await.unwrap();
                    given.push((r["offset"].as_u64().unwrap(), data));
                }
                given
            }));
        }
    }
    let mut given: Vec<(u64, Value)> = Vec::new();
    for p in publishers {
        given.extend(p.await.unwrap());
    }
    given.sort_by_key(|g| g.0);
    let total = given.len() as u64;
    let offsets: Vec<u64> = given.iter().map(|g| g.0).collect();
    assert_eq!(offsets, (1..=total).collect::<Vec<u64>>(), "distinct and contiguous");
    for (offset, data) in &given {
        let (_, got, d) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!((got, &d), (Some(*offset), data), "in offset order, as given");
    }
    assert!(events.next_pub(Duration::from_millis(300)).await.is_err(), "no duplicate");
}
