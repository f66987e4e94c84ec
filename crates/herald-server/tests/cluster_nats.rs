//! Several nodes on one NATS server (JetStream for history) behave as one server: the cluster
//! cases every broker must pass (`cluster/mod.rs`), then NATS's own faults: the server killed
//! and restarted from its store, the server frozen, and subscriptions only for the channels a
//! node's clients use. Real processes: `nats-server -js` and `herald` nodes.

#![allow(clippy::unwrap_used)]

mod cluster;
mod common;

use std::time::Duration;

use common::{NatsServer, Server, TIMEOUT};
use herald_client::StreamPosition;
use serde_json::{json, Value};

fn config(nats: &NatsServer) -> String {
    format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 1000\n", nats.url())
}

async fn nodes(nats: &NatsServer, n: usize) -> Vec<Server> {
    cluster::nodes(&config(nats), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order(&config(
        &nats,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_what_it_missed() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::a_client_recovers_on_another_node_what_it_missed(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_other_nodes_while_one_publishes_miss_nothing() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::subscribers_joining_other_nodes_while_one_publishes_miss_nothing(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_recover_on_another_with_no_loss() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::clients_of_a_killed_node_recover_on_another_with_no_loss(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_on_another_node_with_last_event_id() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::an_sse_stream_resumes_on_another_node_with_last_event_id(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_live_nodes_and_a_dead_one_drops_out() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::every_node_lists_the_live_nodes_and_a_dead_one_drops_out(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_by_user_acts_on_every_node() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::a_disconnect_by_user_acts_on_every_node(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_nats_never_lets_an_epoch_continue() {
    // nats-server is killed (SIGKILL) and restarted on its store while a publisher runs on
    // another node. It may have lost acknowledged writes (an OS crash before its sync
    // interval; Herald cannot tell), so offsets are not trusted across the restart: publishes
    // answer 200 or 503 meanwhile (never hang), the subscriber is told to recover (4008), the
    // next publication starts a new epoch, and a client that held a position from before gets
    // `recovered: false`, never a false `true`.
    let Some(mut nats) = NatsServer::start() else { return };
    let nodes = nodes(&nats, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, mut events) = b.client().await;
    client.subscribe("h:restart", None).await.unwrap();
    let mut api = a.api().await;
    let mut before = Value::Null;
    for i in 1..=20 {
        before = api.publish("h:restart", &json!(i)).await.unwrap();
    }
    for i in 1..=20u64 {
        assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(i));
    }
    nats.restart();
    for i in 21..=40 {
        let body = serde_json::to_vec(&json!({"channel": "h:restart", "data": i})).unwrap();
        let started = std::time::Instant::now();
        let (status, _, _) = api.request("POST", "/api/publish", Some(&body)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "a publish hung");
        assert!(status == 200 || status == 503, "publish answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::wait_ready(a, TIMEOUT * 2).await;
    common::wait_ready(b, TIMEOUT * 2).await;
    let mut code = None;
    while let Ok(Some(event)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
        if let herald_client::Event::Disconnect { code: c, .. } = event {
            code = Some(c);
            break;
        }
    }
    assert_eq!(code, Some(4008), "the subscriber is told to recover");
    let after = api.publish("h:restart", &json!("after")).await.unwrap();
    assert_ne!(after["epoch"], before["epoch"], "a new epoch after the restart");
    let (client, _events) = b.client().await;
    let pos = StreamPosition { offset: 20, epoch: before["epoch"].as_str().unwrap().to_string() };
    let sub = client.subscribe("h:restart", Some(pos)).await.unwrap();
    assert!(!sub.recovered, "never a false recovered across a restart");
    let last = sub.publications.last().map(|p| p.1.clone());
    assert_eq!(last, Some(json!("after")), "what history holds of the new epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_makes_publishes_fail_fast_and_nothing_is_lost_after() {
    let Some(nats) = NatsServer::start() else { return };
    let nodes = nodes(&nats, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, mut events) = b.client().await;
    client.subscribe("h:frozen", None).await.unwrap();
    let mut api = a.api().await;
    for i in 1..=5 {
        api.publish("h:frozen", &json!(i)).await.unwrap();
    }
    let pid = nats.child.id().to_string();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let body = serde_json::to_vec(&json!({"channel": "h:frozen", "data": "during"})).unwrap();
    let started = std::time::Instant::now();
    let (status, _, _) = api.request("POST", "/api/publish", Some(&body)).await.unwrap();
    assert_eq!(status, 503, "a publish to a frozen NATS is refused");
    assert!(started.elapsed() < Duration::from_secs(8), "and fails fast");
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let mut went_unready = false;
    while std::time::Instant::now() < deadline && !went_unready {
        let (status, _, _) = b.api().await.request("GET", "/readyz", None).await.unwrap();
        went_unready = status == 503;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(went_unready, "/readyz turned 503 while NATS was frozen");
    common::wait_ready(a, TIMEOUT * 2).await;
    common::wait_ready(b, TIMEOUT * 2).await;
    for i in 6..=10 {
        api.publish("h:frozen", &json!(i)).await.unwrap();
    }
    // The refused publish may have been applied once NATS resumed ("maybe published").
    let mut got = Vec::new();
    loop {
        let (_, offset, data) = events.next_pub(TIMEOUT * 2).await.unwrap();
        got.push((offset.unwrap(), data.clone()));
        if data == json!(10) {
            break;
        }
    }
    let offsets: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(offsets, (1..=got.len() as u64).collect::<Vec<u64>>(), "contiguous, in order");
    let data: Vec<Value> = got.into_iter().map(|g| g.1).filter(|d| *d != json!("during")).collect();
    assert_eq!(data, (1..=10).map(|i| json!(i)).collect::<Vec<Value>>());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_subscribe_in_nats_only_to_the_channels_their_clients_use() {
    let Some(nats) = NatsServer::start() else { return };
    let nodes = nodes(&nats, 2).await;
    let live = || {
        let mut s: Vec<String> =
            nats.subscriptions().into_iter().filter(|s| s.starts_with("herald.l.")).collect();
        s.sort();
        s
    };
    assert!(live().is_empty(), "no client, no subscription: {:?}", live());
    let (c1, _e1) = nodes[0].client().await;
    c1.subscribe("h:a.b", None).await.unwrap();
    let (c2, _e2) = nodes[1].client().await;
    c2.subscribe("plain", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(live(), ["herald.l.h:a~b", "herald.l.plain"], "one subject per used channel");
    c1.unsubscribe("h:a.b").await.unwrap();
    c2.close().await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !live().is_empty() {
        assert!(std::time::Instant::now() < deadline, "still subscribed: {:?}", live());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A recovery position across nodes still works with the mapped names.
    let mut api = nodes[0].api().await;
    let r = api.publish("h:a.b", &json!(1)).await.unwrap();
    let epoch = r["epoch"].as_str().unwrap().to_string();
    api.publish("h:a.b", &json!(2)).await.unwrap();
    let (c3, _e3) = nodes[1].client().await;
    let sub = c3.subscribe("h:a.b", Some(StreamPosition { offset: 1, epoch })).await.unwrap();
    assert!(sub.recovered);
    assert_eq!(sub.publications.iter().map(|p| p.0).collect::<Vec<_>>(), [Some(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets() {
    let Some(nats) = NatsServer::start() else { return };
    cluster::concurrent_publishers_on_several_nodes_get_contiguous_offsets(&config(&nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_are_used_and_never_logged() {
    let Some(nats) = NatsServer::start_with(&["--user", "herald", "--pass", "s3cret-pw"]) else {
        return;
    };
    let url = |pass: &str| format!("nats://herald:{pass}@127.0.0.1:{}", nats.port);
    let good = format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 10\n", url("s3cret-pw"));
    let node = Server::start(&good, &[]);
    common::wait_ready(&node, TIMEOUT).await;
    let mut api = node.api().await;
    let r = api.publish("h:auth", &json!(1)).await.unwrap();
    assert_eq!(r["offset"], json!(1));
    let bad = format!("broker = \"{}\"\n", url("wrong-pw"));
    let refused = Server::start(&bad, &[]);
    let mut api = refused.api().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _, _) = api.request("GET", "/readyz", None).await.unwrap();
    assert_eq!(status, 503, "a wrong password: never ready");
    let body = serde_json::to_vec(&json!({"channel": "plain", "data": 1})).unwrap();
    let (status, _, _) = api.request("POST", "/api/publish", Some(&body)).await.unwrap();
    assert_eq!(status, 503);
    for log in [node.log(), refused.log()] {
        assert!(!log.contains("s3cret-pw") && !log.contains("wrong-pw"), "a password in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_different_servers_of_a_nats_cluster_behave_as_one() {
    // Three nats-servers in one cluster (JetStream clustered), each Herald node connected to
    // another server: publications on one node reach subscribers on the others in order, a
    // client recovers on another node, offsets stay contiguous with publishers on two nodes.
    let Some(nats) = common::NatsCluster::start() else { return };
    let config =
        |i: usize| format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 1000\n", nats.url(i));
    let nodes: Vec<Server> = (0..3).map(|i| Server::start(&config(i), &[])).collect();
    // JetStream elects its meta leader first: allow for it.
    for node in &nodes {
        common::wait_ready(node, TIMEOUT * 6).await;
    }
    let (cb, mut eb) = nodes[1].client().await;
    let (cc, mut ec) = nodes[2].client().await;
    let sub = cb.subscribe("h:nc", None).await.unwrap();
    cc.subscribe("h:nc", None).await.unwrap();
    let mut api_a = nodes[0].api().await;
    let mut api_c = nodes[2].api().await;
    for i in 1..=40u64 {
        let api = if i % 2 == 0 { &mut api_a } else { &mut api_c };
        let r = api.publish("h:nc", &json!(i)).await.unwrap();
        assert_eq!(r["offset"], json!(i), "contiguous offsets across servers");
    }
    for (name, events) in [("B", &mut eb), ("C", &mut ec)] {
        for i in 1..=40u64 {
            let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
            assert_eq!((offset, data), (Some(i), json!(i)), "node {name}");
        }
    }
    // A client of B that saw 25 recovers the rest on A.
    let epoch = {
        let (_, _, body) =
            api_a.request("GET", "/api/history?channel=h:nc&limit=0", None).await.unwrap();
        let h: Value = serde_json::from_slice(&body).unwrap();
        h["epoch"].as_str().unwrap().to_string()
    };
    let _ = sub;
    let (ca, _ea) = nodes[0].client().await;
    let got = ca.subscribe("h:nc", Some(StreamPosition { offset: 25, epoch })).await.unwrap();
    assert!(got.recovered);
    let offsets: Vec<Option<u64>> = got.publications.iter().map(|p| p.0).collect();
    assert_eq!(offsets, (26..=40).map(Some).collect::<Vec<_>>());
    // The stream was created with three replicas: it survives the loss of one server.
    let replicas = (0..3).find_map(|i| nats.stream_replicas(i));
    assert_eq!(replicas, Some(3), "a clustered stream is replicated");
    // The server of node C dies: C's connection moves to another server of the cluster (the
    // client learned them), the replicated stream goes on, and B and C both end with the same
    // contiguous sequence (a publish refused while the stream changes leader is retried, and
    // may then be stored twice: "maybe published").
    let _ = nats_kill(&mut nats_servers(&nats), 2);
    let mut accepted = 0;
    for i in 41..=60u64 {
        let deadline = std::time::Instant::now() + TIMEOUT * 3;
        loop {
            let body = serde_json::to_vec(&json!({"channel": "h:nc", "data": i})).unwrap();
            let (status, _, answer) =
                api_a.request("POST", "/api/publish", Some(&body)).await.unwrap();
            if status == 200 {
                accepted += 1;
                break;
            }
            let answer = String::from_utf8_lossy(&answer).to_string();
            assert_eq!(status, 503, "a refused publish says 503: {answer}");
            assert!(std::time::Instant::now() < deadline, "publishing never resumed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(accepted, 20);
    common::wait_ready(&nodes[2], TIMEOUT * 3).await;
    let mut seen = Vec::new();
    for (name, events) in [("B", &mut eb), ("C", &mut ec)] {
        let mut got = Vec::new();
        loop {
            let (_, offset, data) = events.next_pub(TIMEOUT * 3).await.unwrap();
            got.push((offset.unwrap(), data.clone()));
            if data == json!(60) {
                break;
            }
        }
        let offsets: Vec<u64> = got.iter().map(|g| g.0).collect();
        let want: Vec<u64> = (41..41 + offsets.len() as u64).collect();
        assert_eq!(offsets, want, "node {name}: contiguous after the server died");
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "B and C got the same sequence");
    drop((cb, cc));
}

/// The cluster's server processes (to kill one).
fn nats_servers(nats: &common::NatsCluster) -> Vec<u32> {
    nats.servers.iter().map(std::process::Child::id).collect()
}

/// Kills server `i` of `pids` (SIGKILL).
fn nats_kill(pids: &mut [u32], i: usize) -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("kill").args(["-KILL", &pids[i].to_string()]).status()
}
